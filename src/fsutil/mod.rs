//! Durable file-system primitives shared by every module that keeps state on
//! disk.
//!
//! The promise: a file written with [`write_atomic`] is either the old version
//! or the complete new one after a crash or power cut, never a mix, and once
//! the call returns the new version survives a power cut (data fsynced, then
//! renamed, then the directory fsynced so that the rename itself is durable).

pub mod beneath;
pub mod lock;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of files written by [`write_atomic`].
pub const STATE_FILE_MODE: u32 = 0o644;

/// Prefix of the temporary files [`write_atomic`] creates beside their target;
/// anything that cleans a directory may remove files starting with it.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Replaces `path` with `bytes` atomically and durably (mode 0644).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, STATE_FILE_MODE)
}

/// Replaces `path` with `bytes` atomically and durably, with the given mode.
///
/// The temporary file lives in the same directory (so the rename cannot cross
/// a file system) and is removed again when any step fails.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    replace_with(path, bytes, mode, true)?;
    fsync_dir(&parent_dir(path))
}

/// Replaces `path` with `bytes` atomically (readers see the old or the new
/// content, never a mix) but not durably: no fsync, so after a power cut
/// the file may be the old one or gone. For hints that cost nothing to lose.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_with(path, bytes, STATE_FILE_MODE, false)
}

/// Writes `bytes` to a temporary file beside `path` (fsynced when `durable`)
/// and renames it over `path`; the temporary file goes when a step fails.
fn replace_with(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let tmp = temp_path_beside(path);
    let result = (|| {
        // Exclusive and not through a link: a name planted in advance makes
        // the write fail rather than land elsewhere.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        // The umask may have narrowed the mode at creation; state it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        if durable {
            file.sync_all()?;
        }
        drop(file);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A fresh name beside `path` for a temporary file: unique within this
/// process (counter), across processes (pid), and not guessable in advance
/// (random bits), so no one can plant a file or link under it.
pub fn temp_path_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_dir(path).join(beneath::temp_name(&name))
}

/// Makes the entries of directory `dir` (creations, renames, removals)
/// durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and missing parents) with `mode`, durably (each new
/// directory's parent is fsynced, so a blob fsynced inside it cannot vanish
/// with its directory), and sets `mode` on it even when it already existed,
/// so that a directory made by an older version or by hand ends up with the
/// promised permissions.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            if meta.permissions().mode() & 0o7777 != mode {
                fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
            }
            return Ok(());
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", dir.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let parent = parent_dir(dir);
    if parent != dir && !parent.exists() {
        ensure_dir(&parent, mode)?;
    }
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        // Another process was quicker; it makes the entry durable.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return ensure_dir(dir, mode),
        Err(e) => return Err(e),
    }
    // The umask may have narrowed the mode at creation.
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
    fsync_dir(&parent)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Flushes the whole file system holding `path` to stable storage
/// (`syncfs(2)`): for files stowage did not write itself and cannot fsync
/// one by one, such as the layers the Docker engine applied.
pub fn syncfs(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    rustix::fs::syncfs(&dir)?;
    Ok(())
}

/// 32 random bits from the kernel (`getrandom(2)`), for names no other
/// process can guess; zero in the unlikely case the kernel cannot say.
pub fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    match rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()) {
        Ok(_) => u32::from_ne_bytes(bytes),
        Err(_) => 0,
    }
}

/// Runs blocking file work (walks, hashing, fsyncs, lock waits) on a
/// blocking thread of the async runtime, never on one of its workers.
pub async fn blocking<T: Send + 'static, E: Send + 'static>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Bytes this process caused to be written to storage so far
/// (`write_bytes` of `/proc/self/io`); `None` where the kernel does not say.
pub fn process_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Bytes in use on the file system holding `path` (blocks minus free blocks).
pub fn used_bytes(path: &Path) -> Option<u64> {
    let vfs = rustix::fs::statvfs(path).ok()?;
    let unit = if vfs.f_frsize > 0 {
        vfs.f_frsize
    } else {
        vfs.f_bsize
    };
    Some(
        vfs.f_blocks
            .saturating_sub(vfs.f_bfree)
            .saturating_mul(unit),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "stowage-fsutil-{name}-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn write_atomic_replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = scratch("atomic");
        let target = dir.join("state.json");
        write_atomic(&target, b"a much longer first version").unwrap();
        write_atomic(&target, b"v2").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"v2");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        let mode = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, STATE_FILE_MODE);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_atomic_into_a_missing_directory_fails_and_creates_nothing() {
        let dir = scratch("missing");
        let target = dir.join("no-such-dir").join("x");
        assert!(write_atomic(&target, b"x").is_err());
        assert!(!dir.join("no-such-dir").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ensure_dir_fixes_the_mode_of_an_existing_directory() {
        let dir = scratch("mode");
        let sub = dir.join("a/b");
        ensure_dir(&sub, 0o700).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_dir(&sub, 0o700).unwrap();
        assert_eq!(
            fs::metadata(&sub).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
