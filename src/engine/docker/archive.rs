//! The image archive stowage streams into `POST /images/load`: a
//! `docker save`-style tar built on the fly from stored blobs, with no
//! temporary file. Layers go UNCOMPRESSED, inflated on worker threads ahead of
//! the one being sent and checked against their `diff_id` and declared tar
//! size while they stream; a mismatch breaks the request body, so the engine
//! never creates the image. Layers whose chain the engine holds are left out.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::sync::mpsc;

use bytes::Bytes;

use crate::Digest;
use crate::oci::digest::DigestWriter;
use crate::plan::held::{HeldLayers, IMAGES_AT_ONCE};

use super::DockerError;
use super::tags::validate_tag_reference;

/// Size of the pieces a layer is read and sent in.
const CHUNK: usize = 256 * 1024;

/// An image to load, as the blob store holds it.
#[derive(Debug, Clone)]
pub struct ImageToLoad {
    pub config: Vec<u8>,
    pub config_digest: Digest,
    /// `name:tag` references to give it (digest references cannot be loaded;
    /// see [`local_tag_for`]).
    pub repo_tags: Vec<String>,
    /// In the order of the config's `rootfs.diff_ids`.
    pub layers: Vec<LayerSource>,
}

/// One layer blob on disk.
#[derive(Debug, Clone)]
pub struct LayerSource {
    pub diff_id: Digest,
    pub blob_path: PathBuf,
    /// Decides how the blob is unpacked: `...gzip`, `...zstd` or a plain `...tar`.
    pub media_type: String,
    /// Bytes of the uncompressed tar, when known (stowage's layers-meta has it).
    /// When unknown the blob is inflated twice: once to count, once to send.
    pub tar_size: Option<u64>,
}

/// How a load spends the machine.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Images loaded at once (independent ones: images that share a layer
    /// the engine lacks are loaded one after the other).
    pub images: usize,
    /// Layers inflated at once, each on its own thread, ahead of the one being sent.
    pub jobs: usize,
    /// Bytes each layer's worker may buffer ahead of the sender.
    pub buffer_bytes: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        LoadOptions {
            images: IMAGES_AT_ONCE,
            jobs: cores.clamp(1, 4),
            buffer_bytes: 4 * 1024 * 1024,
        }
    }
}

/// The layers of an image a load will send: all but the held prefix.
/// Their `tar_size`s are what [`crate::plan::held::load_temp_bytes`] needs.
pub fn layers_to_send<'a>(held: &HeldLayers, layers: &'a [LayerSource]) -> &'a [LayerSource] {
    let diff_ids: Vec<Digest> = layers.iter().map(|l| l.diff_id.clone()).collect();
    &layers[held.held_prefix_len(&diff_ids)..]
}

pub(super) fn image_name(image: &ImageToLoad) -> String {
    image
        .repo_tags
        .first()
        .cloned()
        .unwrap_or_else(|| image.config_digest.to_string())
}

/// Refuses, before anything is sent, an image the engine would refuse or
/// that does not match what the caller claims.
pub(super) fn validate_image(image: &ImageToLoad) -> Result<(), DockerError> {
    let name = image_name(image);
    let invalid = |reason: String| DockerError::InvalidImage {
        image: name.clone(),
        reason,
    };
    let actual = Digest::of(&image.config);
    if actual != image.config_digest {
        return Err(invalid(format!(
            "its config hashes to {actual}, not {}",
            image.config_digest
        )));
    }
    #[derive(Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(Deserialize)]
    struct RootFs {
        diff_ids: Vec<Digest>,
    }
    let config: Config = serde_json::from_slice(&image.config)
        .map_err(|e| invalid(format!("its config is not an image config: {e}")))?;
    let given: Vec<&Digest> = image.layers.iter().map(|l| &l.diff_id).collect();
    if config.rootfs.diff_ids.iter().collect::<Vec<_>>() != given {
        return Err(invalid(format!(
            "its config lists {} layer diff_ids that differ from the {} layers given",
            config.rootfs.diff_ids.len(),
            given.len()
        )));
    }
    for tag in &image.repo_tags {
        validate_tag_reference(tag).map_err(|reason| invalid(format!("tag {tag:?}: {reason}")))?;
    }
    for layer in &image.layers {
        Decompression::for_media_type(&layer.media_type).ok_or_else(|| {
            DockerError::UnsupportedMediaType {
                diff_id: layer.diff_id.clone(),
                media_type: layer.media_type.clone(),
            }
        })?;
    }
    Ok(())
}

// ---- The archive, built on the fly ----

pub(super) enum ArchiveError {
    /// The engine stopped reading (it refused the archive or went away).
    Closed,
    /// A layer could not be read or failed its checks.
    Layer(DockerError),
}

/// Starts writing the archive of `image`, less its first `skip` layers, on a
/// blocking thread: the stream is the request body, the task's answer the
/// bytes sent. A layer that fails its checks breaks the body, so the engine
/// discards the partial archive.
pub(super) fn stream_archive(
    image: &ImageToLoad,
    skip: usize,
    options: &LoadOptions,
) -> (
    impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + use<>,
    tokio::task::JoinHandle<Result<u64, ArchiveError>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let image = image.clone();
    let options = options.clone();
    let producer = tokio::task::spawn_blocking(move || {
        let mut sink = ChannelSink { tx, sent: 0 };
        let result = write_archive(&image, skip, &options, &mut sink);
        if let Err(ArchiveError::Layer(e)) = &result {
            let _ = sink
                .tx
                .blocking_send(Err(std::io::Error::other(e.to_string())));
        }
        result.map(|()| sink.sent)
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (body, producer)
}

struct ChannelSink {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    sent: u64,
}

impl ChannelSink {
    fn send(&mut self, bytes: Bytes) -> Result<(), ArchiveError> {
        self.sent += bytes.len() as u64;
        self.tx
            .blocking_send(Ok(bytes))
            .map_err(|_| ArchiveError::Closed)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ManifestItem<'a> {
    config: String,
    repo_tags: &'a [String],
    layers: Vec<String>,
}

use serde::{Deserialize, Serialize};

fn tar_header(path: &str, size: u64, directory: bool) -> [u8; 512] {
    let mut header = tar::Header::new_ustar();
    // Paths here are at most 64 hex digits plus "/layer.tar": they always fit.
    let _ = header.set_path(path);
    header.set_size(size);
    header.set_mode(if directory { 0o755 } else { 0o644 });
    header.set_entry_type(if directory {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    header.set_mtime(0);
    header.set_cksum();
    let mut block = [0u8; 512];
    block.copy_from_slice(header.as_bytes());
    block
}

fn padding(size: u64) -> usize {
    ((512 - size % 512) % 512) as usize
}

fn write_file_entry(sink: &mut ChannelSink, path: &str, bytes: &[u8]) -> Result<(), ArchiveError> {
    let mut entry = Vec::with_capacity(512 + bytes.len() + 512);
    entry.extend_from_slice(&tar_header(path, bytes.len() as u64, false));
    entry.extend_from_slice(bytes);
    entry.resize(entry.len() + padding(bytes.len() as u64), 0);
    sink.send(Bytes::from(entry))
}

/// Writes `manifest.json`, the config, then `<diff_id hex>/layer.tar` for
/// every layer after the first `skip`, in order. The manifest still lists the
/// skipped layers: the engine finds their chain and never opens their files.
fn write_archive(
    image: &ImageToLoad,
    skip: usize,
    options: &LoadOptions,
    sink: &mut ChannelSink,
) -> Result<(), ArchiveError> {
    let config_name = format!("{}.json", image.config_digest.hex());
    let manifest = [ManifestItem {
        config: config_name.clone(),
        repo_tags: &image.repo_tags,
        layers: image
            .layers
            .iter()
            .map(|l| format!("{}/layer.tar", l.diff_id.hex()))
            .collect(),
    }];
    let manifest = serde_json::to_vec(&manifest).map_err(|e| {
        ArchiveError::Layer(DockerError::InvalidImage {
            image: image_name(image),
            reason: e.to_string(),
        })
    })?;
    write_file_entry(sink, "manifest.json", &manifest)?;
    write_file_entry(sink, &config_name, &image.config)?;

    let mut inflaters = Inflaters::new(image.layers[skip..].to_vec(), options);
    while let Some((layer, pieces)) = inflaters.next() {
        let hex = layer.diff_id.hex().to_string();
        sink.send(Bytes::copy_from_slice(&tar_header(
            &format!("{hex}/"),
            0,
            true,
        )))?;
        let size = match pieces.recv() {
            Ok(Piece::Size(size)) => size,
            Ok(Piece::Failed(e)) => return Err(ArchiveError::Layer(e)),
            _ => return Err(inflater_vanished(&layer)),
        };
        sink.send(Bytes::copy_from_slice(&tar_header(
            &format!("{hex}/layer.tar"),
            size,
            false,
        )))?;
        loop {
            match pieces.recv() {
                Ok(Piece::Data(bytes)) => sink.send(bytes)?,
                Ok(Piece::Done) => break,
                Ok(Piece::Failed(e)) => return Err(ArchiveError::Layer(e)),
                Ok(Piece::Size(_)) | Err(_) => return Err(inflater_vanished(&layer)),
            }
        }
        let pad = padding(size);
        if pad > 0 {
            sink.send(Bytes::from(vec![0u8; pad]))?;
        }
    }
    // The end of a tar: two zero blocks.
    sink.send(Bytes::from(vec![0u8; 1024]))
}

fn inflater_vanished(layer: &LayerSource) -> ArchiveError {
    ArchiveError::Layer(DockerError::LayerRead {
        diff_id: layer.diff_id.clone(),
        path: layer.blob_path.clone(),
        source: std::io::Error::other("the thread inflating it stopped unexpectedly"),
    })
}

enum Piece {
    Size(u64),
    Data(Bytes),
    Done,
    Failed(DockerError),
}

/// Inflates up to `jobs` layers at once, each on its own thread, each into a
/// bounded buffer; the archive writer takes them in order.
struct Inflaters {
    pending: VecDeque<LayerSource>,
    running: VecDeque<(LayerSource, mpsc::Receiver<Piece>)>,
    jobs: usize,
    buffer_chunks: usize,
}

impl Inflaters {
    fn new(layers: Vec<LayerSource>, options: &LoadOptions) -> Inflaters {
        let mut inflaters = Inflaters {
            pending: layers.into(),
            running: VecDeque::new(),
            jobs: options.jobs.max(1),
            buffer_chunks: (options.buffer_bytes / CHUNK).max(1),
        };
        inflaters.fill();
        inflaters
    }

    fn fill(&mut self) {
        while self.running.len() < self.jobs {
            let Some(layer) = self.pending.pop_front() else {
                return;
            };
            let (tx, rx) = mpsc::sync_channel(self.buffer_chunks);
            let work = layer.clone();
            std::thread::spawn(move || inflate_layer(&work, &tx));
            self.running.push_back((layer, rx));
        }
    }

    fn next(&mut self) -> Option<(LayerSource, mpsc::Receiver<Piece>)> {
        let next = self.running.pop_front();
        self.fill();
        next
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decompression {
    Gzip,
    Zstd,
    None,
}

impl Decompression {
    fn for_media_type(media_type: &str) -> Option<Decompression> {
        if media_type.ends_with("gzip") {
            Some(Decompression::Gzip)
        } else if media_type.ends_with("zstd") {
            Some(Decompression::Zstd)
        } else if media_type.ends_with(".tar") {
            Some(Decompression::None)
        } else {
            None
        }
    }
}

fn open_layer(layer: &LayerSource) -> Result<Box<dyn Read>, DockerError> {
    let read_error = |source| DockerError::LayerRead {
        diff_id: layer.diff_id.clone(),
        path: layer.blob_path.clone(),
        source,
    };
    let file = BufReader::with_capacity(CHUNK, File::open(&layer.blob_path).map_err(read_error)?);
    Ok(
        match Decompression::for_media_type(&layer.media_type).ok_or_else(|| {
            DockerError::UnsupportedMediaType {
                diff_id: layer.diff_id.clone(),
                media_type: layer.media_type.clone(),
            }
        })? {
            Decompression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
            Decompression::Zstd => {
                Box::new(zstd::stream::read::Decoder::with_buffer(file).map_err(read_error)?)
            }
            Decompression::None => Box::new(file),
        },
    )
}

/// Reads the layer's uncompressed bytes, hashing them, and hands them on.
/// Returns the size and digest of everything read.
fn read_layer(
    layer: &LayerSource,
    limit: Option<u64>,
    mut forward: impl FnMut(Bytes) -> bool,
) -> Result<Option<(u64, Digest)>, DockerError> {
    let read_error = |source| DockerError::LayerRead {
        diff_id: layer.diff_id.clone(),
        path: layer.blob_path.clone(),
        source,
    };
    let mut reader = open_layer(layer)?;
    let mut hasher = DigestWriter::new();
    loop {
        let mut buffer = vec![0u8; CHUNK];
        let mut filled = 0;
        // Fill whole chunks: decoders return small reads.
        while filled < CHUNK {
            let n = match reader.read(&mut buffer[filled..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            };
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        buffer.truncate(filled);
        hasher.update(&buffer);
        if let Some(limit) = limit
            && hasher.len() > limit
        {
            return Err(DockerError::LayerSizeMismatch {
                diff_id: layer.diff_id.clone(),
                path: layer.blob_path.clone(),
                expected: limit,
                actual: hasher.len(),
            });
        }
        if !forward(Bytes::from(buffer)) {
            return Ok(None);
        }
    }
    let size = hasher.len();
    Ok(Some((size, hasher.finish())))
}

fn check_layer(
    layer: &LayerSource,
    expected_size: Option<u64>,
    size: u64,
    digest: Digest,
) -> Result<(), DockerError> {
    if let Some(expected) = expected_size
        && size != expected
    {
        return Err(DockerError::LayerSizeMismatch {
            diff_id: layer.diff_id.clone(),
            path: layer.blob_path.clone(),
            expected,
            actual: size,
        });
    }
    if digest != layer.diff_id {
        return Err(DockerError::LayerDigestMismatch {
            diff_id: layer.diff_id.clone(),
            path: layer.blob_path.clone(),
            actual: digest,
        });
    }
    Ok(())
}

fn inflate_layer(layer: &LayerSource, tx: &mpsc::SyncSender<Piece>) {
    let result = (|| -> Result<bool, DockerError> {
        let size = match layer.tar_size {
            Some(size) => size,
            None => {
                // A tar entry needs its size up front: count by inflating once.
                let Some((size, digest)) = read_layer(layer, None, |_| true)? else {
                    return Ok(false);
                };
                check_layer(layer, None, size, digest)?;
                size
            }
        };
        if tx.send(Piece::Size(size)).is_err() {
            return Ok(false);
        }
        let Some((read, digest)) = read_layer(layer, Some(size), |bytes| {
            tx.send(Piece::Data(bytes)).is_ok()
        })?
        else {
            return Ok(false);
        };
        check_layer(layer, Some(size), read, digest)?;
        Ok(true)
    })();
    let _ = match result {
        Ok(true) => tx.send(Piece::Done),
        Ok(false) => Ok(()),
        Err(e) => tx.send(Piece::Failed(e)),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn layer_file(dir: &Path, name: &str, bytes: &[u8], media_type: &str) -> LayerSource {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        LayerSource {
            diff_id: digest(0),
            blob_path: path,
            media_type: media_type.to_string(),
            tar_size: None,
        }
    }

    #[test]
    fn media_types_pick_the_decompressor() {
        use Decompression::*;
        for (media_type, expected) in [
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Gzip),
            ),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Some(Gzip)),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Some(Zstd)),
            ("application/vnd.oci.image.layer.v1.tar", Some(None)),
            ("application/vnd.oci.image.layer.v1.tar+bzip2", Option::None),
        ] {
            assert_eq!(
                Decompression::for_media_type(media_type),
                expected,
                "{media_type}"
            );
        }
    }

    #[test]
    fn a_gzip_layer_is_inflated_and_verified_against_its_diff_id() {
        let dir = tempfile::tempdir().unwrap();
        let plain: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &plain).unwrap();
        let mut layer = layer_file(
            dir.path(),
            "l.gz",
            &gz.finish().unwrap(),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        );
        layer.diff_id = Digest::of(&plain);

        let (tx, rx) = mpsc::sync_channel(100);
        inflate_layer(&layer, &tx);
        let mut received = Vec::new();
        let mut size = 0;
        for piece in rx.try_iter() {
            match piece {
                Piece::Size(s) => size = s,
                Piece::Data(b) => received.extend_from_slice(&b),
                Piece::Done => break,
                Piece::Failed(e) => panic!("{e}"),
            }
        }
        assert_eq!(size, plain.len() as u64);
        assert_eq!(received, plain);

        // The same blob claimed as another diff_id fails, naming both digests.
        layer.diff_id = digest(7);
        let (tx, rx) = mpsc::sync_channel(100);
        inflate_layer(&layer, &tx);
        let failure = rx.try_iter().find_map(|p| match p {
            Piece::Failed(e) => Some(e),
            _ => Option::None,
        });
        assert!(matches!(
            failure,
            Some(DockerError::LayerDigestMismatch { .. })
        ));
    }

    #[test]
    fn a_declared_tar_size_that_is_wrong_fails_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let plain = vec![5u8; 10_000];
        let mut zst = zstd::stream::encode_all(&plain[..], 1).unwrap();
        let mut layer = layer_file(
            dir.path(),
            "l.zst",
            &std::mem::take(&mut zst),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        );
        layer.diff_id = Digest::of(&plain);
        for wrong in [9_999u64, 10_001] {
            layer.tar_size = Some(wrong);
            let (tx, rx) = mpsc::sync_channel(100);
            inflate_layer(&layer, &tx);
            let failure = rx.try_iter().find_map(|p| match p {
                Piece::Failed(e) => Some(e),
                _ => Option::None,
            });
            assert!(
                matches!(failure, Some(DockerError::LayerSizeMismatch { expected, .. }) if expected == wrong),
                "declared {wrong}"
            );
        }
    }
}
