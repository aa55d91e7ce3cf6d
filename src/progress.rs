//! Progress as a trait handed in: library code says what is happening, the
//! CLI decides whether that becomes bars on a terminal, JSON lines or nothing.

use serde::Serialize;

use crate::Digest;

/// Something a long command reports while it works.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A step a person would want to see.
    Step { message: String },
    /// The downloads about to start: how many blobs, and their bytes in all
    /// (what partial downloads already hold included).
    Transfer { blobs: usize, bytes: u64 },
    /// A blob transfer begins; `offset` bytes are already there (a resume).
    BlobStarted {
        digest: Digest,
        size: u64,
        offset: u64,
    },
    /// Bytes moved for a blob so far, counted from zero.
    BlobProgress {
        digest: Digest,
        done: u64,
        size: u64,
    },
    /// A blob is complete and verified.
    BlobDone { digest: Digest, size: u64 },
}

pub trait Progress: Send + Sync {
    fn emit(&self, event: Event);

    fn step(&self, message: String) {
        self.emit(Event::Step { message });
    }
}

/// Reports nothing: for tests and for library users who do not care.
pub struct NoProgress;

impl Progress for NoProgress {
    fn emit(&self, _event: Event) {}
}
