//! Files made under a directory descriptor, never through a link.
//!
//! A [`Dir`] is an open directory; every path given to it is relative, made
//! of plain names (no `..`, no `.`, not absolute), and is resolved beneath
//! it with no symlink followed on the way, at the last component included:
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` where the kernel has it
//! (Linux 5.6), else one `openat(O_NOFOLLOW | O_DIRECTORY)` per component.
//! Files are created exclusively (`O_CREAT | O_EXCL | O_NOFOLLOW`), so a
//! name planted in advance (a link to a file elsewhere) makes the creation
//! fail instead of writing through it.
//!
//! This is what stowage writes app directories with: their content comes
//! from a bundle, which may hold links meant to turn a write by root into a
//! write anywhere.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use super::TEMP_PREFIX;

/// Whether `openat2` works here: 0 unknown, 1 yes, 2 no (older kernel or a
/// seccomp filter that does not know it).
static OPENAT2: AtomicU8 = AtomicU8::new(0);

/// An open directory under which files are made without following links.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// What is at a name, without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

impl Dir {
    /// Opens the directory `path`. Its own last component must not be a
    /// link (the components before it are the caller's to trust).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| with_path(e.into(), path))?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The path this directory was opened as, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the directory `rel` beneath this one.
    pub fn open_dir(&self, rel: &str) -> io::Result<Dir> {
        let fd = self.open_beneath(
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir {
            fd,
            path: self.path.join(rel),
        })
    }

    /// Opens the regular file `rel` for reading.
    pub fn open_file(&self, rel: &str) -> io::Result<File> {
        let fd = self.open_beneath(
            rel,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", self.path.join(rel).display()),
            ));
        }
        Ok(file)
    }

    /// Creates the regular file `rel` (which must not exist, not even as a
    /// link) for writing, with `mode` (narrowed by the umask: set it on the
    /// file when it matters).
    pub fn create_file(&self, rel: &str, mode: u32) -> io::Result<File> {
        let fd = self.open_beneath(
            rel,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        Ok(File::from(fd))
    }

    /// Creates the directory `rel`; its parent must exist.
    pub fn create_dir(&self, rel: &str, mode: u32) -> io::Result<()> {
        let (parent, name) = self.parent_of(rel)?;
        rustix::fs::mkdirat(&parent.fd, name, Mode::from_raw_mode(mode))
            .map_err(|e| with_path(e.into(), &self.path.join(rel)))
    }

    /// Creates the symlink `rel` pointing to `target` (not checked here).
    pub fn symlink(&self, target: &str, rel: &str) -> io::Result<()> {
        let (parent, name) = self.parent_of(rel)?;
        rustix::fs::symlinkat(target, &parent.fd, name)
            .map_err(|e| with_path(e.into(), &self.path.join(rel)))
    }

    /// Makes `rel` a hard link to the existing `existing` (a link there is
    /// linked itself, never followed).
    pub fn hard_link(&self, existing: &str, rel: &str) -> io::Result<()> {
        let (from_dir, from_name) = self.parent_of(existing)?;
        let (to_dir, to_name) = self.parent_of(rel)?;
        rustix::fs::linkat(
            &from_dir.fd,
            from_name,
            &to_dir.fd,
            to_name,
            AtFlags::empty(),
        )
        .map_err(|e| with_path(e.into(), &self.path.join(rel)))
    }

    /// What `rel` is, without following it; `None` when nothing is there.
    pub fn kind(&self, rel: &str) -> io::Result<Option<Kind>> {
        let (parent, name) = match self.parent_of(rel) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&parent.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(match FileType::from_raw_mode(stat.st_mode) {
                FileType::RegularFile => Kind::File,
                FileType::Directory => Kind::Dir,
                FileType::Symlink => Kind::Symlink,
                _ => Kind::Other,
            })),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(with_path(e.into(), &self.path.join(rel))),
        }
    }

    /// The target of the symlink `rel`, as its text.
    pub fn read_link(&self, rel: &str) -> io::Result<String> {
        let (parent, name) = self.parent_of(rel)?;
        let target = rustix::fs::readlinkat(&parent.fd, name, Vec::new())
            .map_err(|e| with_path(e.into(), &self.path.join(rel)))?;
        target.into_string().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: the link's target is not UTF-8",
                    self.path.join(rel).display()
                ),
            )
        })
    }

    /// Sets the mode of this directory.
    pub fn set_mode(&self, mode: u32) -> io::Result<()> {
        rustix::fs::fchmod(&self.fd, Mode::from_raw_mode(mode))
            .map_err(|e| with_path(e.into(), &self.path))
    }

    /// Makes this directory's entries durable.
    pub fn sync(&self) -> io::Result<()> {
        rustix::fs::fsync(&self.fd).map_err(|e| with_path(e.into(), &self.path))
    }

    /// Replaces the entry `name` of this directory with a regular file of
    /// `bytes` and `mode`, atomically and durably: a fresh temporary file
    /// created exclusively (never through a link), written, fsynced, renamed
    /// over `name` (a link there is replaced, not followed), then this
    /// directory fsynced.
    pub fn write_atomic(&self, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
        if name.contains('/') {
            return Err(bad_name(name));
        }
        check_rel(name)?;
        let (temp, mut file) = self.create_temp(name, mode)?;
        let written = (|| {
            file.write_all(bytes)?;
            rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))?;
            file.sync_all()?;
            drop(file);
            rustix::fs::renameat(&self.fd, temp.as_str(), &self.fd, name)?;
            Ok(())
        })();
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(&self.fd, temp.as_str(), AtFlags::empty());
            return Err(with_path(e, &self.path.join(name)));
        }
        self.sync()
    }

    /// A temporary file beside `name`, with a name no one could have
    /// planted (pid, counter and random bits; tried again if taken).
    fn create_temp(&self, name: &str, mode: u32) -> io::Result<(String, File)> {
        let mut last = None;
        for _ in 0..16 {
            let temp = temp_name(name);
            match self.create_file(&temp, mode) {
                Ok(file) => return Ok((temp, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no temporary name was free")))
    }

    /// The directory holding `rel` and the last component's name.
    fn parent_of<'a>(&self, rel: &'a str) -> io::Result<(DirRef<'_>, &'a str)> {
        check_rel(rel)?;
        match rel.rsplit_once('/') {
            None => Ok((DirRef::Borrowed(self), rel)),
            Some((parent, name)) => Ok((DirRef::Owned(self.open_dir(parent)?), name)),
        }
    }

    fn open_beneath(&self, rel: &str, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        check_rel(rel)?;
        let full = || self.path.join(rel);
        if OPENAT2.load(Ordering::Relaxed) != 2 {
            match rustix::fs::openat2(
                &self.fd,
                rel,
                flags,
                mode,
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
            ) {
                Ok(fd) => {
                    OPENAT2.store(1, Ordering::Relaxed);
                    return Ok(fd);
                }
                Err(rustix::io::Errno::NOSYS) => OPENAT2.store(2, Ordering::Relaxed),
                Err(rustix::io::Errno::LOOP) => return Err(through_link(&full())),
                Err(e) => return Err(with_path(e.into(), &full())),
            }
        }
        // One component at a time, none of them followed if a link.
        let mut components = rel.split('/').peekable();
        let mut current: Option<OwnedFd> = None;
        while let Some(component) = components.next() {
            let at = current.as_ref().map_or(self.fd.as_fd(), |fd| fd.as_fd());
            let last = components.peek().is_none();
            let (flags, mode) = if last {
                (flags | OFlags::NOFOLLOW, mode)
            } else {
                (
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
            };
            match rustix::fs::openat(at, component, flags, mode) {
                Ok(fd) => current = Some(fd),
                Err(rustix::io::Errno::LOOP) => return Err(through_link(&full())),
                Err(rustix::io::Errno::NOTDIR) if !last => {
                    // A link to a directory says ENOTDIR with O_NOFOLLOW.
                    return Err(through_link(&full()));
                }
                Err(e) => return Err(with_path(e.into(), &full())),
            }
        }
        current.ok_or_else(|| bad_name(rel))
    }
}

enum DirRef<'a> {
    Borrowed(&'a Dir),
    Owned(Dir),
}

impl std::ops::Deref for DirRef<'_> {
    type Target = Dir;
    fn deref(&self) -> &Dir {
        match self {
            DirRef::Borrowed(d) => d,
            DirRef::Owned(d) => d,
        }
    }
}

/// A temporary name beside `name`, starting with [`TEMP_PREFIX`].
pub fn temp_name(name: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{TEMP_PREFIX}{name}.{}.{}.{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        super::random_u32()
    )
}

/// Plain names only: not empty, not absolute, no `.` or `..`, no empty
/// component.
fn check_rel(rel: &str) -> io::Result<()> {
    if rel.is_empty()
        || rel.contains('\0')
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad_name(rel));
    }
    Ok(())
}

fn bad_name(rel: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{rel:?} is not a relative path of plain names"),
    )
}

fn through_link(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{} is or passes through a symlink", path.display()),
    )
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn with_both_ways(test: impl Fn()) {
        test();
        let before = OPENAT2.swap(2, Ordering::Relaxed);
        test();
        OPENAT2.store(before, Ordering::Relaxed);
    }

    #[test]
    fn nothing_is_created_or_written_through_a_link() {
        with_both_ways(|| {
            let scratch = tempfile::tempdir().unwrap();
            let outside = scratch.path().join("outside");
            fs::create_dir(&outside).unwrap();
            fs::write(outside.join("victim"), b"precious").unwrap();
            let root = scratch.path().join("root");
            fs::create_dir(&root).unwrap();
            symlink(&outside, root.join("out")).unwrap();
            symlink("../outside/victim", root.join("file")).unwrap();
            fs::create_dir(root.join("real")).unwrap();
            let dir = Dir::open(&root).unwrap();

            assert!(dir.create_file("out/new", 0o644).is_err());
            assert!(dir.create_file("out/victim", 0o644).is_err());
            let err = dir.create_file("file", 0o644).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
            assert!(dir.create_dir("out/d", 0o755).is_err());
            assert!(dir.symlink("x", "out/l").is_err());
            assert!(dir.open_dir("out").is_err());
            assert!(dir.open_file("file").is_err());
            assert!(dir.hard_link("out/victim", "real/h").is_err());
            assert!(dir.create_file("../outside/x", 0o644).is_err());
            assert!(dir.create_file("/tmp/x", 0o644).is_err());
            assert_eq!(dir.kind("out").unwrap(), Some(Kind::Symlink));
            assert_eq!(dir.kind("real").unwrap(), Some(Kind::Dir));
            assert_eq!(dir.kind("real/none").unwrap(), None);

            // Replacing a link replaces the link, never its target.
            dir.write_atomic("file", b"new", 0o640).unwrap();
            assert_eq!(fs::read(outside.join("victim")).unwrap(), b"precious");
            assert_eq!(fs::read(root.join("file")).unwrap(), b"new");
            let meta = fs::symlink_metadata(root.join("file")).unwrap();
            assert!(meta.is_file());
            assert_eq!(meta.permissions().mode() & 0o777, 0o640);
            assert!(dir.write_atomic("out/victim", b"x", 0o644).is_err());
            assert!(Dir::open(&root.join("out")).is_err());

            let names: Vec<_> = fs::read_dir(&outside)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["victim"]);
            let names: Vec<_> = fs::read_dir(&root)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.starts_with(TEMP_PREFIX))
                .collect();
            assert!(names.is_empty(), "{names:?}");
        });
    }

    #[test]
    fn files_and_directories_are_made_beneath() {
        with_both_ways(|| {
            let scratch = tempfile::tempdir().unwrap();
            let dir = Dir::open(scratch.path()).unwrap();
            dir.create_dir("a", 0o755).unwrap();
            dir.create_dir("a/b", 0o755).unwrap();
            dir.create_file("a/b/f", 0o644)
                .unwrap()
                .write_all(b"hi")
                .unwrap();
            dir.hard_link("a/b/f", "a/h").unwrap();
            dir.symlink("b/f", "a/l").unwrap();
            assert_eq!(fs::read(scratch.path().join("a/h")).unwrap(), b"hi");
            assert_eq!(dir.kind("a/l").unwrap(), Some(Kind::Symlink));
            assert_eq!(dir.kind("a/b/f").unwrap(), Some(Kind::File));
            let mut content = String::new();
            io::Read::read_to_string(&mut dir.open_file("a/b/f").unwrap(), &mut content).unwrap();
            assert_eq!(content, "hi");
            assert!(dir.create_file("a/b/f", 0o644).is_err(), "exclusive");
        });
    }
}
