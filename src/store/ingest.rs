//! Ingests: blobs being written, invisible until verified and committed.
//!
//! An ingest is `ROOT/ingest/<hex>` (the bytes so far) plus
//! `ROOT/ingest/<hex>.state`, a checkpoint holding the declared size and the
//! serialized sha256 state at an offset whose bytes were fsynced before the
//! checkpoint was written. Resuming restores that state and hashes only the
//! bytes after it (containerd re-hashes the whole prefix). Without a usable
//! checkpoint the prefix is hashed once, from the start.
//!
//! Promises:
//! - The data file never grows beyond the declared size: a write that would
//!   is refused whole, and nothing of it is written.
//! - A failed write is rolled back to the last good offset, or the ingest is
//!   marked failed, so the hash always covers exactly the bytes in the file.
//! - Only one process writes an ingest at a time (`flock` on the data file);
//!   a second one waits, and finds the blob committed when the first is done.
//! - Commit: size and digest checked, file fsynced, made 0444, renamed into
//!   `blobs/sha256/`, directory fsynced. A digest mismatch deletes the ingest.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{FallocateFlags, fallocate};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest as _, Sha256};

use super::{BLOB_MODE, Result, Store, StoreError};
use crate::Digest;
use crate::fsutil::lock::{LockMode, flock_with_deadline};
use crate::fsutil::{fsync_dir, write_atomic, write_replacing};

/// A checkpoint is written after this many new bytes, so that a process
/// killed mid-download re-hashes at most this much when it resumes.
const CHECKPOINT_INTERVAL: u64 = 64 * 1024 * 1024;

/// How much is appended before its writeback is started.
const WRITEBACK_STEP: u64 = 8 * 1024 * 1024;

const STATE_SUFFIX: &str = ".state";

/// A partial download, as [`Store::ingests`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestStatus {
    pub digest: Digest,
    /// Bytes written so far.
    pub offset: u64,
    /// The declared size, when the checkpoint recorded it.
    pub expected: Option<u64>,
    /// Bytes of disk the partial file holds, preallocation included.
    pub allocated: u64,
    pub modified: SystemTime,
}

/// The checkpoint file's content.
#[derive(Serialize, Deserialize)]
struct Checkpoint {
    digest: Digest,
    expected: u64,
    offset: u64,
    /// Hex of the sha256 state after `offset` bytes.
    sha256_state: String,
}

/// A blob being written. Obtained from [`Store::ingest`]; finished with
/// [`Ingest::commit`]. Dropping it keeps the partial file for a later resume.
pub struct Ingest {
    digest: Digest,
    expected: u64,
    state: IngestState,
}

enum IngestState {
    /// The blob was committed already (before, or by the process we waited
    /// for): nothing to write, and commit succeeds at once.
    Stored,
    Open(Box<OpenIngest>),
}

struct OpenIngest {
    /// Holds the ingest's flock for as long as the ingest lives.
    file: File,
    data_path: PathBuf,
    state_path: PathBuf,
    blob_path: PathBuf,
    blobs_dir: PathBuf,
    hasher: Sha256,
    offset: u64,
    checkpointed: u64,
    /// Bytes handed to the disk's writeback so far (see [`WRITEBACK_STEP`]).
    written_back: u64,
    /// Bytes hashed again when this ingest was resumed.
    rehashed: u64,
    failed: bool,
}

impl Store {
    fn ingest_data_path(&self, digest: &Digest) -> PathBuf {
        self.ingest_dir.join(digest.hex())
    }

    fn ingest_state_path(&self, digest: &Digest) -> PathBuf {
        self.ingest_dir
            .join(format!("{}{STATE_SUFFIX}", digest.hex()))
    }

    /// Opens or resumes the ingest of `digest`, declared as `expected_size`
    /// bytes. Waits (up to the ingest lock timeout) while another process
    /// writes the same blob. When the blob is, or becomes, committed, the
    /// returned ingest is already complete ([`Ingest::is_stored`]).
    pub fn ingest(&self, digest: &Digest, expected_size: u64) -> Result<Ingest> {
        self.open_ingest(digest, expected_size, self.ingest_lock_timeout)?
            .ok_or_else(|| StoreError::IngestBusy {
                digest: digest.clone(),
            })
    }

    /// Like [`Store::ingest`], but returns `None` at once when another
    /// process is writing the blob.
    pub fn try_ingest(&self, digest: &Digest, expected_size: u64) -> Result<Option<Ingest>> {
        self.open_ingest(digest, expected_size, Duration::ZERO)
    }

    fn open_ingest(
        &self,
        digest: &Digest,
        expected: u64,
        wait: Duration,
    ) -> Result<Option<Ingest>> {
        let data_path = self.ingest_data_path(digest);
        let file = loop {
            if let Some(size) = self.size(digest) {
                if size != expected {
                    return Err(StoreError::SizeMismatch {
                        digest: digest.clone(),
                        expected,
                        got: size,
                    });
                }
                return Ok(Some(Ingest {
                    digest: digest.clone(),
                    expected,
                    state: IngestState::Stored,
                }));
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&data_path)
                .map_err(|e| StoreError::io(&data_path, e))?;
            let locked = flock_with_deadline(&file, LockMode::Exclusive, wait)
                .map_err(|e| StoreError::io(&data_path, e))?;
            if !locked {
                return Ok(None);
            }
            // The holder we waited for may have committed (renamed our inode
            // into the blobs) or aborted (unlinked it): then start over.
            let ours = file.metadata().map_err(|e| StoreError::io(&data_path, e))?;
            match fs::metadata(&data_path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {}
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(&data_path, e)),
            }
            // Committed between our first look and our open: the file we
            // hold is a leftover (or was just created by us) and useless.
            if self.size(digest).is_some() {
                remove_ingest_files(&data_path, &self.ingest_state_path(digest))?;
                continue;
            }
            break file;
        };
        let mut open = Box::new(OpenIngest {
            file,
            data_path,
            state_path: self.ingest_state_path(digest),
            blob_path: self.blob_path(digest),
            blobs_dir: self.blobs_dir.clone(),
            hasher: Sha256::new(),
            offset: 0,
            checkpointed: 0,
            written_back: 0,
            rehashed: 0,
            failed: false,
        });
        open.resume(digest, expected)?;
        Ok(Some(Ingest {
            digest: digest.clone(),
            expected,
            state: IngestState::Open(open),
        }))
    }

    /// Every partial download, with what its checkpoint says.
    pub fn ingests(&self) -> Result<Vec<IngestStatus>> {
        let dir = &self.ingest_dir;
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(dir, e))?;
            let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok())
            else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            out.push(IngestStatus {
                expected: read_checkpoint(&self.ingest_state_path(&digest), &digest)
                    .map(|c| c.expected),
                digest,
                offset: meta.len(),
                allocated: meta.blocks() * 512,
                modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// Bytes already downloaded for `digest` (0 when there is no ingest):
    /// a partial blob needs only the rest.
    pub fn partial_bytes(&self, digest: &Digest) -> u64 {
        self.partial_stat(digest, |m| m.len())
    }

    /// Disk bytes already allocated to the ingest of `digest`, preallocation
    /// included: what a space check may credit as already taken.
    pub fn partial_allocated_bytes(&self, digest: &Digest) -> u64 {
        self.partial_stat(digest, |m| m.blocks() * 512)
    }

    /// What the ingest of `digest` already takes from its volume: its bytes
    /// or, when more, the blocks allocated to it (a preallocation). One
    /// `stat`, for the fit check, which asks this of every missing blob.
    pub fn partial_taken_bytes(&self, digest: &Digest) -> u64 {
        self.partial_stat(digest, |m| m.len().max(m.blocks() * 512))
    }

    /// `figure` of the ingest file of `digest`'s metadata; 0 without one.
    fn partial_stat(&self, digest: &Digest, figure: impl Fn(&fs::Metadata) -> u64) -> u64 {
        fs::metadata(self.ingest_data_path(digest)).map_or(0, |m| figure(&m))
    }

    /// Deletes the ingest of `digest`; fails with [`StoreError::IngestBusy`]
    /// while another process writes it. Says whether there was one.
    pub fn abort(&self, digest: &Digest) -> Result<bool> {
        let data_path = self.ingest_data_path(digest);
        let file = match File::open(&data_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let _ = fs::remove_file(self.ingest_state_path(digest));
                return Ok(false);
            }
            Err(e) => return Err(StoreError::io(&data_path, e)),
        };
        if !flock_with_deadline(&file, LockMode::Exclusive, Duration::ZERO)
            .map_err(|e| StoreError::io(&data_path, e))?
        {
            return Err(StoreError::IngestBusy {
                digest: digest.clone(),
            });
        }
        remove_ingest_files(&data_path, &self.ingest_state_path(digest))?;
        Ok(true)
    }
}

impl Ingest {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn expected_size(&self) -> u64 {
        self.expected
    }

    /// Bytes already in the ingest and covered by the hash: continue the
    /// download from here (an HTTP Range request).
    pub fn offset(&self) -> u64 {
        match &self.state {
            IngestState::Stored => self.expected,
            IngestState::Open(open) => open.offset,
        }
    }

    /// Bytes that resuming this ingest had to hash again (those written
    /// after the last checkpoint); 0 for a fresh ingest.
    pub fn rehashed_bytes(&self) -> u64 {
        match &self.state {
            IngestState::Stored => 0,
            IngestState::Open(open) => open.rehashed,
        }
    }

    /// True when the blob is committed already and nothing needs writing.
    pub fn is_stored(&self) -> bool {
        matches!(self.state, IngestState::Stored)
    }

    /// Reserves disk blocks for the rest of the declared size, leaving the
    /// file length at the bytes written (`FALLOC_FL_KEEP_SIZE`), so that a
    /// full volume shows now rather than half way. A file system without
    /// fallocate reserves nothing and this succeeds. [`Ingest::restart`]
    /// releases the reservation.
    pub fn preallocate(&mut self) -> Result<()> {
        let expected = self.expected;
        let IngestState::Open(open) = &mut self.state else {
            return Ok(());
        };
        let remaining = expected.saturating_sub(open.offset);
        if remaining == 0 {
            return Ok(());
        }
        match fallocate(
            &open.file,
            FallocateFlags::KEEP_SIZE,
            open.offset,
            remaining,
        ) {
            Ok(()) => Ok(()),
            Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) => Ok(()),
            Err(Errno::NOSPC) | Err(Errno::DQUOT) => Err(StoreError::NoSpace {
                path: open.data_path.clone(),
                needed: Some(remaining),
            }),
            Err(e) => Err(StoreError::io(&open.data_path, e.into())),
        }
    }

    /// Appends `bytes`, hashing them. A write that would take the blob past
    /// its declared size is refused and writes nothing.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let expected = self.expected;
        let digest = &self.digest;
        let open = match &mut self.state {
            IngestState::Open(open) => open,
            IngestState::Stored if bytes.is_empty() => return Ok(()),
            IngestState::Stored => {
                return Err(StoreError::BeyondDeclaredSize {
                    digest: digest.clone(),
                    declared: expected,
                    attempted: expected + bytes.len() as u64,
                });
            }
        };
        if open.failed {
            return Err(StoreError::IngestFailed {
                digest: digest.clone(),
            });
        }
        let end = open.offset + bytes.len() as u64;
        if end > expected {
            return Err(StoreError::BeyondDeclaredSize {
                digest: digest.clone(),
                declared: expected,
                attempted: end,
            });
        }
        if let Err(e) = open.file.write_all_at(bytes, open.offset) {
            // Part of the buffer may be on disk; cut it off so the file and
            // the hash agree again. If even that fails, stop this ingest.
            if open.file.set_len(open.offset).is_err() {
                open.failed = true;
            }
            return Err(match StoreError::io(&open.data_path, e) {
                StoreError::NoSpace { path, .. } => StoreError::NoSpace {
                    path,
                    needed: Some(expected - open.offset),
                },
                other => other,
            });
        }
        open.hasher.update(bytes);
        open.offset = end;
        if open.offset - open.written_back >= WRITEBACK_STEP {
            open.start_writeback();
        }
        if open.offset - open.checkpointed >= CHECKPOINT_INTERVAL {
            open.checkpoint(digest, expected)?;
        }
        Ok(())
    }

    /// Makes the bytes written so far durable and records a checkpoint, so a
    /// resume after a crash need not re-hash them.
    pub fn checkpoint(&mut self) -> Result<()> {
        match &mut self.state {
            IngestState::Open(open) if !open.failed => open.checkpoint(&self.digest, self.expected),
            _ => Ok(()),
        }
    }

    /// Throws away what was written and starts from byte zero (for a
    /// registry that answers a range request with the whole blob).
    pub fn restart(&mut self) -> Result<()> {
        let IngestState::Open(open) = &mut self.state else {
            return Ok(());
        };
        open.file
            .set_len(0)
            .map_err(|e| StoreError::io(&open.data_path, e))?;
        open.hasher = Sha256::new();
        open.offset = 0;
        open.written_back = 0;
        open.failed = false;
        open.checkpoint(&self.digest, self.expected)
    }

    /// Verifies size and digest and publishes the blob. On a digest mismatch
    /// the ingest is deleted; an incomplete ingest is kept for a resume.
    pub fn commit(mut self) -> Result<()> {
        let state = std::mem::replace(&mut self.state, IngestState::Stored);
        let IngestState::Open(open) = state else {
            return Ok(());
        };
        open.commit(&self.digest, self.expected)
    }

    /// Deletes this ingest.
    pub fn abort(mut self) -> Result<()> {
        let state = std::mem::replace(&mut self.state, IngestState::Stored);
        match state {
            IngestState::Open(open) => remove_ingest_files(&open.data_path, &open.state_path),
            IngestState::Stored => Ok(()),
        }
    }
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("digest", &self.digest)
            .field("expected", &self.expected)
            .field("offset", &self.offset())
            .field("stored", &self.is_stored())
            .finish()
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        // Best effort: saves the next resume from re-hashing what came since
        // the last checkpoint. A crash here costs only that re-hash.
        if let IngestState::Open(open) = &mut self.state
            && !open.failed
            && open.offset != open.checkpointed
        {
            let _ = open.checkpoint(&self.digest, self.expected);
        }
    }
}

impl OpenIngest {
    /// Brings the hasher up to the end of the data file, from the checkpoint
    /// when it is usable.
    fn resume(&mut self, digest: &Digest, expected: u64) -> Result<()> {
        let len = self
            .file
            .metadata()
            .map_err(|e| StoreError::io(&self.data_path, e))?
            .len();
        if len > expected {
            // Bytes past the declared size cannot be this blob: a different
            // size was declared before. Start again.
            self.file
                .set_len(0)
                .map_err(|e| StoreError::io(&self.data_path, e))?;
            return self.checkpoint(digest, expected);
        }
        let had_state = self.state_path.exists();
        let mut start = 0;
        if let Some(cp) = read_checkpoint(&self.state_path, digest)
            && cp.offset <= len
            && let Some(hasher) = decode_state(&cp.sha256_state)
        {
            self.hasher = hasher;
            start = cp.offset;
            self.checkpointed = cp.offset;
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = start;
        while pos < len {
            let want = buf.len().min((len - pos) as usize);
            let n = match self.file.read_at(&mut buf[..want], pos) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StoreError::io(&self.data_path, e)),
            };
            self.hasher.update(&buf[..n]);
            pos += n as u64;
        }
        self.offset = pos;
        self.written_back = pos;
        self.rehashed = pos - start;
        if pos != len {
            self.file
                .set_len(pos)
                .map_err(|e| StoreError::io(&self.data_path, e))?;
        }
        if self.offset == 0 && !had_state {
            self.record_fresh(digest, expected)?;
        } else if self.offset == 0 || self.offset - self.checkpointed >= CHECKPOINT_INTERVAL {
            // A fresh ingest records its declared size at once; a long
            // re-hash is not repeated after another crash.
            self.checkpoint(digest, expected)?;
        }
        Ok(())
    }

    /// The first state of an ingest that never had one: the declared size
    /// and an empty hash. A power cut that loses the file loses no work and
    /// cannot leave an older state behind (there was none), so it is written
    /// without the three fsyncs a pull would otherwise pay per layer before
    /// its first byte.
    fn record_fresh(&mut self, digest: &Digest, expected: u64) -> Result<()> {
        let bytes = self.state_bytes(digest, expected);
        write_replacing(&self.state_path, &bytes)
            .map_err(|e| StoreError::io(&self.state_path, e))?;
        self.checkpointed = 0;
        Ok(())
    }

    /// Asks the kernel to start writing what was appended since the last
    /// call, without waiting for it. Left to itself the kernel writes a
    /// blob's pages late and all at once, and the fsync of the commit then
    /// waits for all of them; started as the download goes, the disk writes
    /// while the network reads, and the commit's fsync has little left to
    /// do (on this project's test machine a 200 MiB file became durable in
    /// 0.15 s instead of 0.2-0.45 s). Only a hint: durability still comes from
    /// the fsync, so a failure here is ignored.
    fn start_writeback(&mut self) {
        let from = self.written_back;
        let len = self.offset - from;
        // SAFETY: sync_file_range reads no memory of ours; the descriptor is
        // open for as long as `self.file` lives.
        let _ = unsafe {
            libc::sync_file_range(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                from as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        self.written_back = self.offset;
    }

    /// The state file's content: where the ingest stands and its hash so far.
    fn state_bytes(&self, digest: &Digest, expected: u64) -> Vec<u8> {
        let checkpoint = Checkpoint {
            digest: digest.clone(),
            expected,
            offset: self.offset,
            sha256_state: hex::encode(self.hasher.serialize().as_slice()),
        };
        serde_json::to_vec(&checkpoint).unwrap_or_default()
    }

    fn checkpoint(&mut self, digest: &Digest, expected: u64) -> Result<()> {
        let bytes = self.state_bytes(digest, expected);
        self.file
            .sync_data()
            .map_err(|e| StoreError::io(&self.data_path, e))?;
        write_atomic(&self.state_path, &bytes).map_err(|e| StoreError::io(&self.state_path, e))?;
        self.checkpointed = self.offset;
        Ok(())
    }

    fn commit(self, digest: &Digest, expected: u64) -> Result<()> {
        if self.failed {
            return Err(StoreError::IngestFailed {
                digest: digest.clone(),
            });
        }
        let len = self
            .file
            .metadata()
            .map_err(|e| StoreError::io(&self.data_path, e))?
            .len();
        if self.offset != expected || len != self.offset {
            return Err(StoreError::Incomplete {
                digest: digest.clone(),
                expected,
                got: self.offset,
            });
        }
        let got = Digest::from_hasher(self.hasher.clone());
        if &got != digest {
            remove_ingest_files(&self.data_path, &self.state_path)?;
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                got,
            });
        }
        let io = |e| StoreError::io(&self.data_path, e);
        self.file.sync_all().map_err(io)?;
        // Read-only before it becomes visible, not after.
        self.file
            .set_permissions(fs::Permissions::from_mode(BLOB_MODE))
            .map_err(io)?;
        fs::rename(&self.data_path, &self.blob_path)
            .map_err(|e| StoreError::io(&self.blob_path, e))?;
        fsync_dir(&self.blobs_dir).map_err(|e| StoreError::io(&self.blobs_dir, e))?;
        // The checkpoint alone is harmless (a new ingest ignores it), so it
        // needs no fsync of its own.
        let _ = fs::remove_file(&self.state_path);
        // Dropping `self.file` releases the flock; a waiter finds the blob.
        Ok(())
    }
}

fn remove_ingest_files(data_path: &Path, state_path: &Path) -> Result<()> {
    for path in [data_path, state_path] {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(path, e)),
        }
    }
    Ok(())
}

fn read_checkpoint(path: &Path, digest: &Digest) -> Option<Checkpoint> {
    let mut bytes = Vec::new();
    File::open(path)
        .ok()?
        .take(4096)
        .read_to_end(&mut bytes)
        .ok()?;
    let cp: Checkpoint = serde_json::from_slice(&bytes).ok()?;
    (&cp.digest == digest).then_some(cp)
}

fn decode_state(text: &str) -> Option<Sha256> {
    let bytes = hex::decode(text).ok()?;
    let state = SerializedState::<Sha256>::try_from(bytes.as_slice()).ok()?;
    Sha256::deserialize(&state).ok()
}

/// Whether `name` (in `ROOT/ingest/`) is a checkpoint file, and for which
/// digest.
pub(crate) fn checkpoint_digest(name: &str) -> Option<Digest> {
    name.strip_suffix(STATE_SUFFIX)
        .and_then(|hex| format!("sha256:{hex}").parse().ok())
}

#[cfg(test)]
impl Ingest {
    /// Closes the ingest the way a killed process would: no checkpoint.
    pub(crate) fn vanish_without_checkpoint(mut self) {
        self.state = IngestState::Stored;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_state_survives_serialization_mid_block() {
        let mut hasher = Sha256::new();
        hasher.update([7u8; 100]);
        let restored = decode_state(&hex::encode(hasher.serialize().as_slice())).unwrap();
        let mut restored = restored;
        hasher.update(b"tail");
        restored.update(b"tail");
        assert_eq!(
            Digest::from_hasher(hasher).to_string(),
            Digest::from_hasher(restored).to_string()
        );
        assert!(decode_state("00").is_none());
    }
}
