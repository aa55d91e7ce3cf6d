//! The one resume-and-commit loop that brings a blob into the store, from a
//! registry or from a file on an export medium alike.
//!
//! [`copy_blob`] takes an [`Ingest`] (which knows the blob's digest and its
//! declared size, and resumes where a killed run stopped), asks the
//! [`BlobSource`] for the bytes from the ingest's offset, writes them, and
//! when the source breaks off asks again from the new offset, a bounded
//! number of times. A source that can only start from the beginning makes
//! the ingest restart: a whole blob is never appended to a prefix. The
//! commit verifies size and digest before the blob becomes visible.
//!
//! Writing and fsyncing are blocking file work: the ingest lives on a
//! blocking thread for each attempt, fed through a small channel, so the
//! async runtime's workers never wait on the disk.

use std::path::PathBuf;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::{Ingest, StoreError};
use crate::Digest;
use crate::fsutil::blocking;
use crate::progress::{Event, Progress};

/// A blob's bytes as a source streams them.
pub type Body = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// A source's answer to a request for the bytes from an offset.
pub enum Opened {
    /// The bytes from the offset asked for.
    At(Body),
    /// The whole blob from byte 0: the source cannot resume.
    FromStart(Body),
}

/// Why a source gave no bytes.
#[derive(Debug)]
pub enum SourceError {
    /// Worth asking again (the connection broke).
    Transient(anyhow::Error),
    /// Not worth asking again (the source refused or lied).
    Fatal(anyhow::Error),
}

/// Where a blob comes from.
#[allow(async_fn_in_trait)]
pub trait BlobSource {
    /// Opens the blob at `offset`.
    async fn open(&mut self, offset: u64) -> Result<Opened, SourceError>;
    /// The source, for messages ("registry.local:5000", a directory).
    fn name(&self) -> String;
}

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The source failed for good, or broke off too often.
    #[error("{0:#}")]
    Source(anyhow::Error),
    /// The store refused the bytes: a disk error, more bytes than declared,
    /// or a size or digest that does not match at the commit.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Brings the blob of `ingest` in from `source`, asking again up to
/// `attempts` times after the source broke off, and commits it. Returns the
/// bytes transferred. Emits `blob_started` per attempt, `blob_progress`
/// every MiB and `blob_done`.
pub async fn copy_blob(
    mut ingest: Ingest,
    source: &mut impl BlobSource,
    attempts: u32,
    progress: &dyn Progress,
) -> Result<u64, CopyError> {
    let digest = ingest.digest().clone();
    let size = ingest.expected_size();
    if ingest.is_stored() {
        // Another process stored it meanwhile: done, as the transfer counted it.
        progress.emit(Event::BlobDone { digest, size });
        return Ok(0);
    }
    let mut transferred = 0u64;
    let mut attempt = 0;
    // A complete ingest left by a run that died before committing needs no
    // request: the commit below verifies it.
    while ingest.offset() < size {
        let offset = ingest.offset();
        progress.emit(Event::BlobStarted {
            digest: digest.clone(),
            size,
            offset,
        });
        let broke = match source.open(offset).await {
            Ok(opened) => {
                let (restart, body) = match opened {
                    Opened::At(body) => (false, body),
                    Opened::FromStart(body) => (offset > 0, body),
                };
                let (back, written) = write_body(ingest, body, restart, progress).await;
                ingest = back;
                let written = written?;
                transferred += written.received;
                match written.broke {
                    Some(e) => anyhow::anyhow!(
                        "the copy of blob {digest} from {} broke off: {e}",
                        source.name()
                    ),
                    None if ingest.offset() < size => anyhow::anyhow!(
                        "the copy of blob {digest} broke off: {} ended it after {} of {size} bytes",
                        source.name(),
                        ingest.offset()
                    ),
                    None => break,
                }
            }
            Err(SourceError::Transient(e)) => e,
            Err(SourceError::Fatal(e)) => return Err(CopyError::Source(e)),
        };
        if attempt >= attempts {
            return Err(CopyError::Source(broke));
        }
        attempt += 1;
        tracing::warn!("{broke:#}; resuming (attempt {attempt})");
    }
    blocking(move || ingest.commit()).await?;
    progress.emit(Event::BlobDone { digest, size });
    Ok(transferred)
}

/// What one attempt wrote.
struct Written {
    received: u64,
    /// Why the body broke off, when it did.
    broke: Option<std::io::Error>,
}

/// Streams `body` into the ingest on a blocking thread, and hands the ingest
/// back with what was written. A store error ends the attempt for good.
async fn write_body(
    ingest: Ingest,
    mut body: Body,
    restart: bool,
    progress: &dyn Progress,
) -> (Ingest, Result<Written, CopyError>) {
    let digest = ingest.digest().clone();
    let size = ingest.expected_size();
    let start = if restart { 0 } else { ingest.offset() };
    // One chunk queued at most: what a kill loses (received, not yet
    // written) stays about one chunk, as when the write was inline.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let writer = tokio::task::spawn_blocking(move || {
        let mut ingest = ingest;
        let mut write = || -> Result<(), StoreError> {
            if restart {
                ingest.restart()?;
            }
            while let Some(chunk) = rx.blocking_recv() {
                ingest.write_all(&chunk)?;
            }
            Ok(())
        };
        let result = write();
        (ingest, result)
    });
    let mut written = Written {
        received: 0,
        broke: None,
    };
    let mut since_report = 0u64;
    while let Some(item) = body.next().await {
        match item {
            Ok(chunk) => {
                let n = chunk.len() as u64;
                if tx.send(chunk).await.is_err() {
                    // The writer stopped on a store error; it says which below.
                    break;
                }
                written.received += n;
                since_report += n;
                if since_report >= 1 << 20 {
                    since_report = 0;
                    progress.emit(Event::BlobProgress {
                        digest: digest.clone(),
                        done: start + written.received,
                        size,
                    });
                }
            }
            Err(e) => {
                written.broke = Some(e);
                break;
            }
        }
    }
    drop(tx);
    match writer.await {
        Ok((ingest, Ok(()))) => (ingest, Ok(written)),
        Ok((ingest, Err(e))) => (ingest, Err(CopyError::Store(e))),
        // The writer thread panicked: the ingest is gone with it.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// A blob in a file, such as another store's blob on an export medium. The
/// file must hold exactly the size the descriptor declares: a file of
/// another size is refused before a byte is written.
pub struct FileSource {
    pub path: PathBuf,
    pub digest: Digest,
    pub size: u64,
}

/// Opens the file holding blob `digest` for a copy: a regular file, not
/// reached through a link, of exactly the `size` its descriptor declares
/// (as the open file says, not its path).
pub fn check_file_source(
    path: &std::path::Path,
    digest: &Digest,
    size: u64,
) -> anyhow::Result<std::fs::File> {
    let file = super::open_regular(path)
        .map_err(|e| anyhow::anyhow!("cannot read blob {digest} from {}: {e}", path.display()))?;
    let length = file
        .metadata()
        .map_err(|e| anyhow::anyhow!("cannot read blob {digest} from {}: {e}", path.display()))?
        .len();
    if length != size {
        anyhow::bail!(
            "blob {digest} in {} is {length} bytes, but its descriptor says {size}: refused before copying",
            path.display(),
        );
    }
    Ok(file)
}

impl BlobSource for FileSource {
    async fn open(&mut self, offset: u64) -> Result<Opened, SourceError> {
        use tokio::io::AsyncSeekExt as _;
        let fatal = |e: std::io::Error| {
            SourceError::Fatal(anyhow::anyhow!(
                "cannot read blob {} from {}: {e}",
                self.digest,
                self.path.display()
            ))
        };
        let (path, digest, size) = (self.path.clone(), self.digest.clone(), self.size);
        let file = crate::fsutil::blocking(move || check_file_source(&path, &digest, size))
            .await
            .map_err(SourceError::Fatal)?;
        let mut file = tokio::fs::File::from_std(file);
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(fatal)?;
        let body = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
        Ok(Opened::At(Box::pin(body)))
    }

    fn name(&self) -> String {
        self.path.parent().map_or_else(
            || self.path.display().to_string(),
            |p| p.display().to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use crate::store::Store;

    /// Serves `blob` in pieces; the first `breaks` answers stop after
    /// `cut` bytes with an error, and with `whole` every answer starts at 0.
    struct Flaky {
        blob: Vec<u8>,
        breaks: u32,
        cut: usize,
        whole: bool,
        offsets: Vec<u64>,
    }

    impl BlobSource for Flaky {
        async fn open(&mut self, offset: u64) -> Result<Opened, SourceError> {
            self.offsets.push(offset);
            let start = if self.whole { 0 } else { offset as usize };
            let mut rest = self.blob[start..].to_vec();
            let mut items: Vec<std::io::Result<Bytes>> = Vec::new();
            if self.breaks > 0 {
                self.breaks -= 1;
                rest.truncate(self.cut);
                items.push(Ok(Bytes::from(rest)));
                items.push(Err(std::io::Error::other("connection reset")));
            } else {
                items.push(Ok(Bytes::from(rest)));
            }
            let body: Body = Box::pin(futures_util::stream::iter(items));
            Ok(if self.whole {
                Opened::FromStart(body)
            } else {
                Opened::At(body)
            })
        }

        fn name(&self) -> String {
            "a flaky source".into()
        }
    }

    fn blob() -> Vec<u8> {
        (0..300_000u32).map(|i| (i % 251) as u8).collect()
    }

    /// A fresh store in `dir`, the test blob and an ingest for it.
    fn setup(dir: &std::path::Path) -> (Store, Vec<u8>, Digest, Ingest) {
        let store = Store::open(dir).unwrap();
        let blob = blob();
        let digest = Digest::of(&blob);
        let ingest = store.ingest(&digest, blob.len() as u64).unwrap();
        (store, blob, digest, ingest)
    }

    fn flaky(blob: &[u8], breaks: u32, cut: usize, whole: bool) -> Flaky {
        Flaky {
            blob: blob.to_vec(),
            breaks,
            cut,
            whole,
            offsets: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_copy_that_breaks_off_resumes_at_the_offset_and_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (store, blob, digest, ingest) = setup(dir.path());
        let mut source = flaky(&blob, 2, 100_000, false);
        let sent = copy_blob(ingest, &mut source, 2, &NoProgress)
            .await
            .unwrap();
        assert_eq!(source.offsets, vec![0, 100_000, 200_000]);
        assert_eq!(sent, blob.len() as u64);
        assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), blob);
    }

    #[tokio::test]
    async fn a_source_that_cannot_resume_restarts_the_ingest_instead_of_appending() {
        let dir = tempfile::tempdir().unwrap();
        let (store, blob, digest, ingest) = setup(dir.path());
        let mut source = flaky(&blob, 1, 100_000, true);
        copy_blob(ingest, &mut source, 1, &NoProgress)
            .await
            .unwrap();
        assert_eq!(source.offsets, vec![0, 100_000]);
        assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), blob);
    }

    #[tokio::test]
    async fn a_source_that_keeps_breaking_fails_with_its_reason_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, blob, digest, ingest) = setup(dir.path());
        let mut source = flaky(&blob, 5, 1_000, false);
        let err = copy_blob(ingest, &mut source, 2, &NoProgress)
            .await
            .unwrap_err();
        assert!(matches!(err, CopyError::Source(_)), "{err}");
        assert!(err.to_string().contains("broke off"), "{err}");
        assert_eq!(source.offsets.len(), 3);
        assert!(!store.has(&digest));
    }

    #[tokio::test]
    async fn a_file_of_another_size_than_its_descriptor_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, blob, digest, ingest) = setup(&dir.path().join("root"));
        let path = dir.path().join("medium-blob");
        // Longer than declared, as a crafted medium would make it.
        let mut longer = blob.clone();
        longer.extend_from_slice(&[0; 4096]);
        std::fs::write(&path, &longer).unwrap();
        let mut source = FileSource {
            path,
            digest: digest.clone(),
            size: blob.len() as u64,
        };
        let err = copy_blob(ingest, &mut source, 1, &NoProgress)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("descriptor says"), "{err}");
        assert_eq!(store.partial_bytes(&digest), 0);
        assert!(!store.has(&digest));
    }
}
