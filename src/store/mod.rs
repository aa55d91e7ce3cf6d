//! The device blob store: content-addressed blobs in a standard OCI image
//! layout, written crash-safely.
//!
//! Lifecycle (after containerd's content store): a blob being written is an
//! *ingest* under `ROOT/ingest/`, invisible to readers. [`Ingest::commit`]
//! checks its size and sha256 against what the caller declared, fsyncs it,
//! makes it read-only and renames it to `ROOT/store/blobs/sha256/<hex>`, then
//! fsyncs that directory: a blob is visible only once it is verified and
//! durable. Committed blobs are read by digest ([`Store::open_blob`],
//! [`Store::read_capped`]), named by refs in `index.json` ([`Store::set_ref`]),
//! and managed: listed, deleted, pruned to what the refs reach, and checked
//! ([`Store::fsck`]).
//!
//! Layout under ROOT:
//! - `store/`: the OCI layout (`oci-layout`, `index.json`, `blobs/sha256/`),
//!   readable by skopeo and other OCI tools.
//! - `ingest/<hex>`: a partial download; `ingest/<hex>.state` its checkpoint
//!   (declared size, and the sha256 state at a fsynced offset, so that a
//!   resume re-hashes only what came after the last checkpoint).
//! - `lock`: the store lock ([`LockMode`]); `index.lock` serialises updates
//!   of `index.json`.
//! - `corrupt/`: blobs that fsck moved aside.
//!
//! Directories are 0700 and committed blobs 0444. Every state file is replaced
//! atomically and durably ([`crate::fsutil::write_atomic`]).
//!
//! Locking is the caller's duty: hold [`LockMode::Shared`] while adding
//! (pull, install) and [`LockMode::Exclusive`] while removing (prune, rm,
//! fsck). Ingests lock themselves per blob.

pub mod copy;
mod facts;
mod fsck;
mod gc;
mod ingest;
mod layout;
mod lock;

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Digest;
use crate::fsutil::{self, ensure_dir, fsync_dir, write_atomic};

use crate::oci::format::REF_NAME;
pub use facts::FACTS_FILE;
pub use fsck::{CorruptBlob, FsckReport, StrayFile};
pub use gc::PruneReport;
pub use ingest::{Ingest, IngestStatus};
pub use layout::{Descriptor, RefEntry, is_valid_ref_name};
pub use lock::{LockMode, StoreLock};

/// Opens `path` for reading if it is a regular file, never through a link
/// and never waiting on a fifo (`O_NOFOLLOW | O_NONBLOCK`, then `fstat`).
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(io::ErrorKind::InvalidInput, "it is a symlink")
            } else {
                e
            }
        })?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is not a regular file",
        ));
    }
    Ok(file)
}

/// Reads a regular file (see [`open_regular`]) of at most `cap` bytes.
fn read_regular_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    let file = open_regular(path).map_err(|e| StoreError::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| StoreError::io(path, e))?;
    if bytes.len() as u64 > cap {
        return Err(StoreError::BrokenLayout {
            path: path.to_path_buf(),
            reason: format!("it is over {cap} bytes"),
        });
    }
    Ok(bytes)
}

/// Mode of every directory the store creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every committed blob.
pub const BLOB_MODE: u32 = 0o444;
/// Cap on JSON blobs (manifests, indexes) read while walking refs.
pub const JSON_BLOB_CAP: u64 = 4 * 1024 * 1024;
/// How long [`Store::lock`] waits for another process by default.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Store::ingest`] waits for another process writing the same blob.
pub const DEFAULT_INGEST_LOCK_TIMEOUT: Duration = Duration::from_secs(600);

/// Everything that can go wrong in the store, each naming what is at fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "no space left on the volume holding {path}{}; free space there (or run `stowage prune`) and try again",
        needed.map(|n| format!(" ({n} more bytes needed)")).unwrap_or_default()
    )]
    NoSpace { path: PathBuf, needed: Option<u64> },
    #[error("{path} is broken ({reason}); run `stowage fsck` to repair the store")]
    BrokenLayout { path: PathBuf, reason: String },
    #[error("another stowage process holds {root} ({})", pid.map(|p| format!("pid {p}")).unwrap_or_else(|| "pid unknown".into()))]
    Locked { root: PathBuf, pid: Option<u32> },
    #[error("another stowage process is writing blob {digest}")]
    IngestBusy { digest: Digest },
    #[error("blob {digest} is not in the store")]
    NotFound { digest: Digest },
    #[error("blob {digest} is {size} bytes, over the {cap}-byte limit for what is read here")]
    TooLarge { digest: Digest, size: u64, cap: u64 },
    #[error("blob {digest} was declared as {expected} bytes but has {got}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        got: u64,
    },
    #[error("blob {expected} was rejected: its content hashes to {got}")]
    DigestMismatch { expected: Digest, got: Digest },
    #[error(
        "blob {digest} would grow to {attempted} bytes, beyond its declared size of {declared}; the write was refused"
    )]
    BeyondDeclaredSize {
        digest: Digest,
        declared: u64,
        attempted: u64,
    },
    #[error("blob {digest} is incomplete: {got} of {expected} bytes written")]
    Incomplete {
        digest: Digest,
        expected: u64,
        got: u64,
    },
    #[error(
        "the ingest of blob {digest} failed earlier and cannot continue; open it again to resume"
    )]
    IngestFailed { digest: Digest },
    #[error("stored blob {digest} is corrupt ({reason}); run `stowage fsck`")]
    Corrupt { digest: Digest, reason: String },
    #[error("manifest {digest} in the store cannot be read: {reason}")]
    BadManifest { digest: Digest, reason: String },
    #[error("{name:?} is not a valid ref name (letters, digits and -._:@+ joined by /)")]
    InvalidRefName { name: String },
}

impl StoreError {
    /// An I/O error on `path`; a full volume becomes [`StoreError::NoSpace`].
    pub(crate) fn io(path: &Path, source: io::Error) -> StoreError {
        if is_no_space(&source) {
            StoreError::NoSpace {
                path: path.to_path_buf(),
                needed: None,
            }
        } else {
            StoreError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Bytes the store occupies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub blobs: u64,
    /// Sum of committed blob lengths.
    pub blob_bytes: u64,
    /// Blocks allocated to committed blobs, in bytes.
    pub blob_allocated_bytes: u64,
    pub ingests: u64,
    /// Bytes written so far into partial downloads.
    pub ingest_bytes: u64,
    /// Blocks allocated to partial downloads (including preallocation).
    pub ingest_allocated_bytes: u64,
}

/// A blob store rooted at one directory. Cheap to open; holds no file open.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    layout_dir: PathBuf,
    blobs_dir: PathBuf,
    ingest_dir: PathBuf,
    corrupt_dir: PathBuf,
    lock_timeout: Duration,
    ingest_lock_timeout: Duration,
}

impl Store {
    /// Opens the store at `root`, creating whatever is missing, and refuses a
    /// layout whose `oci-layout` or `index.json` is broken.
    pub fn open(root: &Path) -> Result<Store> {
        let store = Store::open_for_repair(root)?;
        for (path, check) in [
            (
                store.layout_dir.join(layout::OCI_LAYOUT_FILE),
                layout::check_oci_layout as fn(&[u8]) -> Result<(), String>,
            ),
            (store.index_path(), |b: &[u8]| {
                layout::ImageIndex::parse(b).map(|_| ())
            }),
        ] {
            let bytes = fs::read(&path).map_err(|e| StoreError::io(&path, e))?;
            check(&bytes).map_err(|reason| StoreError::BrokenLayout { path, reason })?;
        }
        Ok(store)
    }

    /// Opens the store like [`Store::open`] but accepts broken layout files,
    /// so that [`Store::fsck`] can repair them.
    pub fn open_for_repair(root: &Path) -> Result<Store> {
        let layout_dir = root.join("store");
        let store = Store {
            root: root.to_path_buf(),
            blobs_dir: layout_dir.join("blobs").join("sha256"),
            layout_dir,
            ingest_dir: root.join("ingest"),
            corrupt_dir: root.join("corrupt"),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            ingest_lock_timeout: DEFAULT_INGEST_LOCK_TIMEOUT,
        };
        for dir in [
            &store.root,
            &store.layout_dir,
            &store.layout_dir.join("blobs"),
            &store.blobs_dir,
            &store.ingest_dir,
            &store.corrupt_dir,
        ] {
            ensure_dir(dir, DIR_MODE).map_err(|e| StoreError::io(dir, e))?;
        }
        store.create_if_missing(
            &store.layout_dir.join(layout::OCI_LAYOUT_FILE),
            &layout::oci_layout_bytes(),
        )?;
        let empty = layout::ImageIndex::empty()
            .to_bytes()
            .map_err(|e| StoreError::io(&store.index_path(), io::Error::other(e)))?;
        store.create_if_missing(&store.index_path(), &empty)?;
        Ok(store)
    }

    /// Sets how long [`Store::lock`] waits before failing.
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Store {
        self.lock_timeout = timeout;
        self
    }

    /// Sets how long [`Store::ingest`] waits for another writer of a blob.
    pub fn with_ingest_lock_timeout(mut self, timeout: Duration) -> Store {
        self.ingest_lock_timeout = timeout;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `ROOT/store`, the directory an OCI tool opens (`oci:ROOT/store:NAME`).
    pub fn layout_dir(&self) -> &Path {
        &self.layout_dir
    }

    pub fn ingest_dir(&self) -> &Path {
        &self.ingest_dir
    }

    pub fn corrupt_dir(&self) -> &Path {
        &self.corrupt_dir
    }

    fn index_path(&self) -> PathBuf {
        self.layout_dir.join(layout::INDEX_FILE)
    }

    /// Takes the store lock, waiting up to the lock timeout.
    pub fn lock(&self, mode: LockMode) -> Result<StoreLock> {
        self.lock_with_timeout(mode, self.lock_timeout)
    }

    pub fn lock_with_timeout(&self, mode: LockMode, timeout: Duration) -> Result<StoreLock> {
        lock::lock_store(&self.root.join("lock"), &self.root, mode, timeout)
    }

    /// [`Store::lock`] for async code: the wait happens on a blocking
    /// thread, never on a runtime worker.
    pub async fn lock_async(&self, mode: LockMode) -> Result<StoreLock> {
        let store = self.clone();
        crate::fsutil::blocking(move || store.lock(mode)).await
    }

    // ---- Reading ----------------------------------------------------------

    /// Where the blob `digest` lives once committed.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir.join(digest.hex())
    }

    /// Whether the blob is committed: one `stat`.
    pub fn has(&self, digest: &Digest) -> bool {
        self.size(digest).is_some()
    }

    /// The committed blob's length: one `stat`, not following a link (a
    /// blob is a regular file, or is not there).
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        fs::symlink_metadata(self.blob_path(digest))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    /// Opens a committed blob for reading: a regular file, never through a
    /// link (a store on removable media may hold anything).
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.blob_path(digest);
        open_regular(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NotFound {
                digest: digest.clone(),
            },
            _ => StoreError::io(&path, e),
        })
    }

    /// Opens an OCI layout written by `stowage export` to read from it, as
    /// on removable media: nothing is created or changed on it (no
    /// directory made, no mode set, no lock taken), no part of the layout
    /// may be a link (its directories, `oci-layout`, `index.json`, and each
    /// blob as it is opened), and `oci-layout` and `index.json` must be
    /// valid. `root` itself may be reached through links.
    pub fn open_medium(root: &Path) -> Result<Store> {
        let layout_dir = root.join("store");
        let store = Store {
            root: root.to_path_buf(),
            blobs_dir: layout_dir.join("blobs").join("sha256"),
            layout_dir,
            ingest_dir: root.join("ingest"),
            corrupt_dir: root.join("corrupt"),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            ingest_lock_timeout: DEFAULT_INGEST_LOCK_TIMEOUT,
        };
        let broken = |path: &Path, reason: &str| StoreError::BrokenLayout {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        for dir in [
            &store.layout_dir,
            &store.layout_dir.join("blobs"),
            &store.blobs_dir,
        ] {
            let meta = fs::symlink_metadata(dir).map_err(|e| StoreError::io(dir, e))?;
            if meta.file_type().is_symlink() {
                return Err(broken(
                    dir,
                    "it is a symlink, which a layout on removable media may not hold",
                ));
            }
            if !meta.is_dir() {
                return Err(broken(dir, "it is not a directory"));
            }
        }
        let oci_layout = store.layout_dir.join(layout::OCI_LAYOUT_FILE);
        let bytes = read_regular_capped(&oci_layout, JSON_BLOB_CAP)?;
        layout::check_oci_layout(&bytes).map_err(|reason| broken(&oci_layout, &reason))?;
        layout::read_index(&store.index_path())?;
        Ok(store)
    }

    /// Reads a whole blob of at most `cap` bytes and checks its digest (cheap
    /// at this size, and it keeps bit rot out of the JSON parsers).
    pub fn read_capped(&self, digest: &Digest, cap: u64) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let file = self.open_blob(digest)?;
        let size = file.metadata().map_err(|e| StoreError::io(&path, e))?.len();
        if size > cap {
            return Err(StoreError::TooLarge {
                digest: digest.clone(),
                size,
                cap,
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        file.take(cap + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| StoreError::io(&path, e))?;
        let got = Digest::of(&bytes);
        if &got != digest {
            return Err(StoreError::Corrupt {
                digest: digest.clone(),
                reason: format!("its content hashes to {got}"),
            });
        }
        Ok(bytes)
    }

    // ---- Writing small blobs ----------------------------------------------

    /// Stores a small blob held in memory (manifest, config, index): verified
    /// first, then written through the same fsync-chmod-rename-fsync path as
    /// an ingest. Storing a blob that is already there is a no-op.
    pub fn put_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let got = Digest::of(bytes);
        if &got != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                got,
            });
        }
        if self.size(digest) == Some(bytes.len() as u64) {
            return Ok(());
        }
        let tmp = fsutil::temp_path_beside(&self.ingest_dir.join(digest.hex()));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            file.set_permissions(fs::Permissions::from_mode(BLOB_MODE))?;
            fs::rename(&tmp, self.blob_path(digest))
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io(&self.blob_path(digest), e));
        }
        fsync_dir(&self.blobs_dir).map_err(|e| StoreError::io(&self.blobs_dir, e))
    }

    // ---- Refs -------------------------------------------------------------

    /// Every named entry of `index.json`, in file order.
    pub fn refs(&self) -> Result<Vec<RefEntry>> {
        let index = layout::read_index(&self.index_path())?;
        Ok(index
            .manifests
            .into_iter()
            .filter_map(|d| {
                d.ref_name().map(|name| RefEntry {
                    name: name.to_string(),
                    descriptor: d.clone(),
                })
            })
            .collect())
    }

    /// The descriptor named `name`, if any.
    pub fn get_ref(&self, name: &str) -> Result<Option<Descriptor>> {
        Ok(self
            .refs()?
            .into_iter()
            .find(|r| r.name == name)
            .map(|r| r.descriptor))
    }

    /// Names the committed blob `digest` (a manifest or index) `name`,
    /// replacing any entry of that name.
    pub fn set_ref(&self, name: &str, media_type: &str, digest: &Digest, size: u64) -> Result<()> {
        self.set_ref_descriptor(name, Descriptor::new(media_type, digest.clone(), size))
    }

    /// Like [`Store::set_ref`], with a full descriptor (platform, annotations).
    /// The blob must be committed and of the declared size: a ref never
    /// points at nothing.
    pub fn set_ref_descriptor(&self, name: &str, mut descriptor: Descriptor) -> Result<()> {
        if !is_valid_ref_name(name) {
            return Err(StoreError::InvalidRefName {
                name: name.to_string(),
            });
        }
        match self.size(&descriptor.digest) {
            None => {
                return Err(StoreError::NotFound {
                    digest: descriptor.digest,
                });
            }
            Some(got) if got != descriptor.size => {
                return Err(StoreError::SizeMismatch {
                    digest: descriptor.digest,
                    expected: descriptor.size,
                    got,
                });
            }
            Some(_) => {}
        }
        descriptor
            .annotations
            .insert(REF_NAME.to_string(), name.to_string());
        self.update_index(|index| {
            match index
                .manifests
                .iter_mut()
                .find(|d| d.ref_name() == Some(name))
            {
                Some(slot) => *slot = descriptor,
                None => index.manifests.push(descriptor),
            }
            true
        })
    }

    /// Removes the entry named `name`; says whether there was one.
    pub fn remove_ref(&self, name: &str) -> Result<bool> {
        let mut removed = false;
        self.update_index(|index| {
            let before = index.manifests.len();
            index.manifests.retain(|d| d.ref_name() != Some(name));
            removed = index.manifests.len() != before;
            removed
        })?;
        Ok(removed)
    }

    /// Read-modify-write of `index.json` under `ROOT/index.lock`, so that two
    /// pulls naming apps at once do not lose each other's ref.
    fn update_index(&self, change: impl FnOnce(&mut layout::ImageIndex) -> bool) -> Result<()> {
        let lock_path = self.root.join("index.lock");
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| StoreError::io(&lock_path, e))?;
        let got = crate::fsutil::lock::flock_with_deadline(
            &lock_file,
            LockMode::Exclusive,
            self.lock_timeout,
        )
        .map_err(|e| StoreError::io(&lock_path, e))?;
        if !got {
            return Err(StoreError::Locked {
                root: self.root.clone(),
                pid: None,
            });
        }
        let path = self.index_path();
        let mut index = layout::read_index(&path)?;
        if change(&mut index) {
            let bytes = index
                .to_bytes()
                .map_err(|e| StoreError::io(&path, io::Error::other(e)))?;
            write_atomic(&path, &bytes).map_err(|e| StoreError::io(&path, e))?;
        }
        drop(lock_file);
        Ok(())
    }

    // ---- Managing ---------------------------------------------------------

    /// Every committed blob and its length, from one directory scan.
    pub fn list(&self) -> Result<Vec<(Digest, u64)>> {
        let mut blobs = Vec::new();
        for entry in self.read_blobs_dir()? {
            if let (Some(digest), Ok(meta)) = (entry.digest, entry.entry.metadata())
                && meta.is_file()
            {
                blobs.push((digest, meta.len()));
            }
        }
        blobs.sort();
        Ok(blobs)
    }

    /// Deletes a committed blob; says whether it was there.
    pub fn delete(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::io(&path, e)),
        }
        fsync_dir(&self.blobs_dir).map_err(|e| StoreError::io(&self.blobs_dir, e))?;
        Ok(true)
    }

    /// Bytes used by committed blobs and by partial downloads.
    pub fn disk_usage(&self) -> Result<DiskUsage> {
        let mut usage = DiskUsage::default();
        for entry in self.read_blobs_dir()? {
            if let Ok(meta) = entry.entry.metadata()
                && meta.is_file()
            {
                usage.blobs += 1;
                usage.blob_bytes += meta.len();
                usage.blob_allocated_bytes += meta.blocks() * 512;
            }
        }
        for status in self.ingests()? {
            usage.ingests += 1;
            usage.ingest_bytes += status.offset;
            usage.ingest_allocated_bytes += status.allocated;
        }
        Ok(usage)
    }

    fn read_blobs_dir(&self) -> Result<Vec<BlobDirEntry>> {
        let dir = &self.blobs_dir;
        let entries = fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io(dir, e))?;
            let digest = entry
                .file_name()
                .to_str()
                .and_then(|name| format!("sha256:{name}").parse().ok());
            out.push(BlobDirEntry { entry, digest });
        }
        Ok(out)
    }

    /// Writes `bytes` to `path` only if nothing is there, without ever
    /// replacing a file another process created meanwhile.
    fn create_if_missing(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        if path.exists() {
            return Ok(());
        }
        let tmp = fsutil::temp_path_beside(path);
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(fsutil::STATE_FILE_MODE)
                .open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            // A hard link is an atomic create-if-absent.
            match fs::hard_link(&tmp, path) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
                _ => Ok(()),
            }
        })();
        let _ = fs::remove_file(&tmp);
        result.map_err(|e| StoreError::io(path, e))?;
        let dir = path.parent().unwrap_or(&self.layout_dir);
        fsync_dir(dir).map_err(|e| StoreError::io(dir, e))
    }

    /// Every digest reachable from the refs: manifests and indexes are
    /// followed through `config`, `layers`, `manifests`, `blobs`, `subject`
    /// and the bundle index annotation; missing blobs are counted, not
    /// followed. A present manifest that cannot be read is an error.
    pub fn reachable(&self) -> Result<HashSet<Digest>> {
        gc::reachable(self)
    }
}

struct BlobDirEntry {
    entry: fs::DirEntry,
    /// `None` when the file name is not a digest.
    digest: Option<Digest>,
}

#[cfg(test)]
mod tests;
