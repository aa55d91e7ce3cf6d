//! Cross-process locks on the store, built on `flock(2)`.
//!
//! `ROOT/lock` is the store lock: commands that add to the store (pull,
//! install) hold it shared, commands that remove from it (prune, rm, fsck)
//! hold it exclusive, so a prune can never delete what a pull in progress has
//! fetched but not yet referenced. The same primitive locks one ingest file,
//! so two processes never write the same partial blob.
//!
//! The primitive, and what `flock` promises, is [`crate::fsutil::lock`].

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use crate::fsutil::lock::{Locked, lock_file};

use super::StoreError;

pub use crate::fsutil::lock::LockMode;

/// A held store lock; dropping it releases the lock.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
    mode: LockMode,
}

impl StoreLock {
    pub fn mode(&self) -> LockMode {
        self.mode
    }
}

/// Takes `mode` on the lock file at `path`, waiting up to `timeout`, and
/// records this process's pid in the file so that a process kept waiting can
/// say who holds the store.
pub(crate) fn lock_store(
    path: &Path,
    root: &Path,
    mode: LockMode,
    timeout: Duration,
) -> Result<StoreLock, StoreError> {
    match lock_file(path, mode, timeout).map_err(|e| StoreError::io(path, e))? {
        Locked::Held(file) => Ok(StoreLock { _file: file, mode }),
        Locked::Busy(pid) => Err(StoreError::Locked {
            root: root.to_path_buf(),
            pid,
        }),
    }
}
