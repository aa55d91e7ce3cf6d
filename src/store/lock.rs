//! Cross-process locks on the store, built on `flock(2)`.
//!
//! `ROOT/lock` is the store lock: commands that add to the store (pull,
//! install) hold it shared, commands that remove from it (prune, rm, fsck)
//! hold it exclusive, so a prune can never delete what a pull in progress has
//! fetched but not yet referenced. The same primitive locks one ingest file,
//! so two processes never write the same partial blob.
//!
//! `flock` locks belong to an open file description, so every acquisition
//! opens the file anew: two handles in one process contend like two
//! processes, and the kernel drops the lock when a holder dies, even by
//! SIGKILL. Waiting is a poll with a deadline rather than a blocking call, so
//! a stuck holder turns into a clear error instead of a hang.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};
use rustix::io::Errno;

use super::StoreError;

/// How the store lock is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Adding to the store: any number of holders at once.
    Shared,
    /// Removing from the store: the only holder.
    Exclusive,
}

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
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::io(path, e))?;
    let got = flock_with_deadline(&file, mode, timeout).map_err(|e| StoreError::io(path, e))?;
    if !got {
        return Err(StoreError::Locked {
            root: root.to_path_buf(),
            pid: read_pid(&mut file),
        });
    }
    // Shared holders overwrite each other's pid; any one of them is a fair
    // answer to "who holds it".
    let pid = format!("{}\n", std::process::id());
    let recorded = file
        .set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(pid.as_bytes()));
    recorded.map_err(|e| StoreError::io(path, e))?;
    Ok(StoreLock { _file: file, mode })
}

/// Tries to take `mode` on `file` until `timeout` has passed. `Ok(false)`
/// means someone else still holds it; a zero timeout tries exactly once.
pub fn flock_with_deadline(
    file: &File,
    mode: LockMode,
    timeout: Duration,
) -> std::io::Result<bool> {
    let op = match mode {
        LockMode::Shared => FlockOperation::NonBlockingLockShared,
        LockMode::Exclusive => FlockOperation::NonBlockingLockExclusive,
    };
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        match flock(file, op) {
            Ok(()) => return Ok(true),
            Err(Errno::WOULDBLOCK) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}
