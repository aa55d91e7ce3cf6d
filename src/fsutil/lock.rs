//! One `flock(2)` primitive with a deadline, for every lock file stowage
//! takes (the store lock, one ingest, the apps lock, the update lock).
//!
//! `flock` locks belong to an open file description, so every acquisition
//! opens the file anew: two handles in one process contend like two
//! processes, and the kernel drops the lock when a holder dies, even by
//! SIGKILL. Waiting is a poll with a deadline rather than a blocking call, so
//! a stuck holder turns into a clear error instead of a hang. The poll sleeps
//! the calling thread: async code calls it through `spawn_blocking`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};
use rustix::io::Errno;

/// How a lock is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Any number of holders at once.
    Shared,
    /// The only holder.
    Exclusive,
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

/// A lock file taken, or who holds it when it could not be taken in time.
pub enum Locked {
    Held(File),
    /// Still held by another process; its pid when it wrote one.
    Busy(Option<u32>),
}

/// Opens (creating, mode 0600) the lock file at `path`, takes `mode` on it
/// within `timeout`, and records this process's pid in it so that a process
/// kept waiting can say who holds it. Shared holders overwrite each other's
/// pid; any one of them is a fair answer to "who holds it".
pub fn lock_file(path: &Path, mode: LockMode, timeout: Duration) -> std::io::Result<Locked> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if !flock_with_deadline(&file, mode, timeout)? {
        return Ok(Locked::Busy(read_pid(&mut file)));
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(pid.as_bytes())?;
    Ok(Locked::Held(file))
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exclusive_lock_file_is_busy_for_another_open_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = match lock_file(&path, LockMode::Exclusive, Duration::ZERO).unwrap() {
            Locked::Held(f) => f,
            Locked::Busy(_) => panic!("a fresh lock file was busy"),
        };
        match lock_file(&path, LockMode::Shared, Duration::ZERO).unwrap() {
            Locked::Busy(pid) => assert_eq!(pid, Some(std::process::id())),
            Locked::Held(_) => panic!("a held exclusive lock was taken again"),
        }
        drop(held);
        assert!(matches!(
            lock_file(&path, LockMode::Shared, Duration::ZERO).unwrap(),
            Locked::Held(_)
        ));
    }
}
