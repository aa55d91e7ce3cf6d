//! The image archive stowage streams into `POST /images/load`: a
//! `docker save`-style tar built on the fly from stored blobs, with no
//! temporary file. Layers go UNCOMPRESSED, inflated on worker threads ahead of
//! the one being sent and checked against their `diff_id` and declared tar
//! size while they stream; a mismatch breaks the request body, so the engine
//! never creates the image. Layers whose chain the engine holds are left out.
//!
//! Every layer's tar is also walked as it streams ([`crate::app::layer::walk_tar`]):
//! its real footprint on Docker's volume (bytes for the volume's block size,
//! inodes, and the temporary copy the engine keeps while it loads) is held
//! against what the fit check counted for it, and whatever it takes beyond
//! that is drawn from the room the check left on the volume
//! ([`SpaceGuard`]). A layer that would take more than that room breaks the
//! body before its last byte is sent: the engine writes the whole archive
//! to a temporary directory before it applies any layer, so nothing of the
//! image is applied, and the error names the layer and both figures.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex, mpsc};

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
    /// Keeps the loads within what the fit check counted; every layer is
    /// measured as it streams either way.
    pub guard: Option<Arc<SpaceGuard>>,
    /// Hand the engine gzip layers as stored (verified and measured here
    /// first) rather than inflated: its temporary copy is then the blob, not
    /// the tar. The engine inflates them itself (`unpigz` when on its PATH).
    pub send_gzip: bool,
    /// Gzip layers (by diff_id) handed inflated all the same: the plan
    /// found their larger copy keeps the peak where it is.
    pub inflate: Arc<BTreeSet<Digest>>,
    /// Layers sent as stored that were verified while the engine applied
    /// the one before ([`VerifiedAhead`]); their sends skip the first read.
    pub ahead: Option<Arc<VerifiedAhead>>,
    /// All of an image's new layers in one load (the plan chose it: its
    /// larger temporary copy fits), rather than one layer per load.
    pub whole: bool,
    /// Holds the loads of one install to the lean peak its check counted.
    pub gate: Option<Arc<super::LoadGate>>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        LoadOptions {
            images: IMAGES_AT_ONCE,
            jobs: cores.clamp(1, 4),
            buffer_bytes: 1024 * 1024,
            guard: None,
            send_gzip: crate::plan::held::send_gzip(),
            inflate: Arc::default(),
            ahead: None,
            whole: false,
            gate: None,
        }
    }
}

/// What the fit check counted for one layer it planned to send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allowance {
    /// Disk bytes once unpacked, for the volume's block size.
    pub usage: u64,
    pub inodes: u64,
    /// Bytes of the layer's file in the engine's temporary copy (the
    /// uncompressed tar, or the blob when sent as stored).
    pub tar_size: u64,
}

/// What a layer measured as it streamed, once it was sent whole and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasuredLayer {
    /// The blob it was inflated from.
    pub blob: Digest,
    pub tar_size: u64,
    /// Bytes of regular files' content.
    pub file_bytes: u64,
    pub entries: u64,
    pub inodes: u64,
    pub usage_by_block_size: BTreeMap<u64, u64>,
}

/// Keeps the loads of one install within what its fit check counted: each
/// layer may take what the check counted for it, and what it takes beyond
/// that is drawn from the room the check left on Docker's volume (free
/// space above the reserve, minus all the check counted). Shared by every
/// load of the install, so two images loading at once draw from one room.
#[derive(Debug)]
pub struct SpaceGuard {
    volume: PathBuf,
    block_size: u64,
    /// By diff_id: the blob, and what the check counted for it.
    allowances: HashMap<Digest, (Digest, Allowance)>,
    /// Bytes and inodes beyond what the check counted: at first, and left.
    room: (u64, u64),
    headroom: Mutex<(u64, u64)>,
    /// By diff_id.
    measured: Mutex<BTreeMap<Digest, MeasuredLayer>>,
}

impl SpaceGuard {
    /// For Docker's volume at `volume` with `block_size` blocks, the layers
    /// the check counted (by diff_id: blob, allowance), and the room it left.
    pub fn new(
        volume: PathBuf,
        block_size: u64,
        allowances: HashMap<Digest, (Digest, Allowance)>,
        headroom_bytes: u64,
        headroom_inodes: u64,
    ) -> SpaceGuard {
        SpaceGuard {
            volume,
            block_size,
            allowances,
            room: (headroom_bytes, headroom_inodes),
            headroom: Mutex::new((headroom_bytes, headroom_inodes)),
            measured: Mutex::new(BTreeMap::new()),
        }
    }

    /// What the loads measured so far, by diff_id.
    pub fn measured(&self) -> BTreeMap<Digest, MeasuredLayer> {
        self.measured.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The blob a layer comes from: as the check knew it, else its file's name.
    fn blob_of(&self, layer: &LayerSource) -> Digest {
        if let Some((blob, _)) = self.allowances.get(&layer.diff_id) {
            return blob.clone();
        }
        layer
            .blob_path
            .file_name()
            .and_then(|n| format!("sha256:{}", n.to_string_lossy()).parse().ok())
            .unwrap_or_else(|| layer.diff_id.clone())
    }

    /// Admits `layer` taking `usage` bytes and `inodes` once unpacked, and
    /// `tar` bytes of temporary copy, so far: what is beyond its allowance
    /// and not drawn yet (`drawn`: bytes, inodes) is drawn from the room
    /// left, or the layer is refused, naming both figures.
    fn admit(
        &self,
        layer: &LayerSource,
        usage: u64,
        inodes: u64,
        tar: u64,
        drawn: &mut (u64, u64),
    ) -> Result<(), DockerError> {
        let allowance = self
            .allowances
            .get(&layer.diff_id)
            .map(|(_, a)| *a)
            .unwrap_or_default();
        let over_bytes = usage
            .saturating_sub(allowance.usage)
            .saturating_add(tar.saturating_sub(allowance.tar_size));
        let over_inodes = inodes.saturating_sub(allowance.inodes);
        let more_bytes = over_bytes.saturating_sub(drawn.0);
        let more_inodes = over_inodes.saturating_sub(drawn.1);
        if more_bytes == 0 && more_inodes == 0 {
            return Ok(());
        }
        let mut headroom = self
            .headroom
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let refuse = |what, measured, counted, room| DockerError::LayerOverCounted {
            blob: self.blob_of(layer),
            diff_id: layer.diff_id.clone(),
            what,
            measured,
            counted,
            volume: self.volume.clone(),
            headroom: room,
        };
        if more_bytes > headroom.0 {
            return Err(refuse(
                "bytes (unpacked, plus the engine's temporary copy)",
                usage.saturating_add(tar),
                allowance.usage.saturating_add(allowance.tar_size),
                self.room.0,
            ));
        }
        if more_inodes > headroom.1 {
            return Err(refuse("inodes", inodes, allowance.inodes, self.room.1));
        }
        headroom.0 -= more_bytes;
        headroom.1 -= more_inodes;
        drawn.0 += more_bytes;
        drawn.1 += more_inodes;
        Ok(())
    }

    fn record(&self, layer: &LayerSource, tar_size: u64, walk: &crate::app::layer::TarWalk) {
        let (inodes, usage_by_block_size) = walk.footprint();
        let measured = MeasuredLayer {
            blob: self.blob_of(layer),
            tar_size,
            file_bytes: walk.file_bytes(),
            entries: walk.entries(),
            inodes,
            usage_by_block_size,
        };
        if let Ok(mut all) = self.measured.lock() {
            all.insert(layer.diff_id.clone(), measured);
        }
    }
}

/// Gzip layers sent as stored are read twice: once here, inflated, hashed,
/// walked and held to what the check counted, then, once they passed, sent
/// as stored. A layer-by-layer load does the first read of the next layer
/// while the engine applies the one before, so the two overlap; the send
/// takes the result from here (by diff_id, for the same blob length). A
/// layer that fails here is not kept: its send reads it again and reports
/// why, as without this.
///
/// One install shares one: the next layer of an image, and the first layer
/// of an image still waiting for its turn, are read ahead one at a time
/// (`gate`), so the reads ahead take one core beside the engine's.
pub struct VerifiedAhead {
    done: Mutex<HashMap<Digest, (u64, Walked)>>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Default for VerifiedAhead {
    fn default() -> Self {
        VerifiedAhead {
            done: Mutex::new(HashMap::new()),
            gate: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }
}

impl std::fmt::Debug for VerifiedAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layers = self.done.lock().map(|all| all.len()).unwrap_or_default();
        f.debug_struct("VerifiedAhead")
            .field("layers", &layers)
            .finish()
    }
}

/// Whether `layer` goes to the engine as stored (a gzip layer, gzip
/// layers going so, and not one picked to go inflated).
fn sent_as_stored(layer: &LayerSource, send_gzip: bool, inflate: &BTreeSet<Digest>) -> bool {
    send_gzip
        && Decompression::for_media_type(&layer.media_type) == Some(Decompression::Gzip)
        && !inflate.contains(&layer.diff_id)
}

impl VerifiedAhead {
    /// Whether `layer` goes to the engine as stored, so that its first read
    /// can run ahead.
    pub fn applies(layer: &LayerSource, options: &LoadOptions) -> bool {
        sent_as_stored(layer, options.send_gzip, &options.inflate)
    }

    /// Starts the first read of `layer` when it goes as stored, after the
    /// reads ahead before it; the handle ends when it is done (kept when it
    /// passed). `None` when the layer is not read ahead.
    pub fn start(
        self: &Arc<Self>,
        layer: &LayerSource,
        options: &LoadOptions,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if !Self::applies(layer, options) {
            return None;
        }
        let (ahead, layer, guard) = (self.clone(), layer.clone(), options.guard.clone());
        Some(tokio::spawn(async move {
            let Ok(_turn) = ahead.gate.clone().acquire_owned().await else {
                return;
            };
            let _ =
                tokio::task::spawn_blocking(move || ahead.verify(&layer, guard.as_deref())).await;
        }))
    }

    /// The first read of `layer` (blocking): kept when it passed.
    fn verify(&self, layer: &LayerSource, guard: Option<&SpaceGuard>) {
        if self
            .done
            .lock()
            .is_ok_and(|all| all.contains_key(&layer.diff_id))
        {
            return;
        }
        let Ok(blob_len) = std::fs::metadata(&layer.blob_path).map(|m| m.len()) else {
            return;
        };
        let Ok(Some(walked)) = walk_layer(layer, layer.tar_size, guard, Some(blob_len), |_| true)
        else {
            return;
        };
        if check_layer(layer, layer.tar_size, walked.size, walked.digest.clone()).is_ok()
            && let Ok(mut all) = self.done.lock()
        {
            all.insert(layer.diff_id.clone(), (blob_len, walked));
        }
    }

    fn take(&self, layer: &LayerSource, blob_len: u64) -> Option<Walked> {
        match self.done.lock().ok()?.remove(&layer.diff_id) {
            Some((len, walked)) if len == blob_len => Some(walked),
            _ => None,
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

#[derive(Debug)]
pub(super) enum ArchiveError {
    /// The engine stopped reading (it refused the archive or went away).
    Closed,
    /// A layer could not be read or failed its checks.
    Layer(DockerError),
    /// Install gave up the load before its archive's last bytes were let go.
    Abandoned,
}

/// Starts writing the archive of `image`, less its first `skip` layers, on a
/// blocking thread: the stream is the request body, the task's answer the
/// bytes sent. A layer that fails its checks breaks the body, so the engine
/// discards the partial archive.
///
/// With `hold_tail`, the archive's last bytes wait until it opens (or the
/// load is given up): the engine applies nothing before the archive ends, so
/// the archive can be sent ahead of its turn.
pub(super) fn stream_archive(
    image: &ImageToLoad,
    skip: usize,
    options: &LoadOptions,
    hold_tail: Option<Arc<TailGate>>,
) -> (
    impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + use<>,
    tokio::task::JoinHandle<Result<u64, ArchiveError>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let image = image.clone();
    let options = options.clone();
    let producer = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut sink = ChannelSink { tx, sent: 0 };
        let result = write_archive(&image, skip, &options, &mut sink, hold_tail);
        tracing::debug!(
            "archive of {} (layers {skip}..) written: {} bytes in {} ms",
            image_name(&image),
            sink.sent,
            started.elapsed().as_millis()
        );
        // A broken body, so that the engine discards the partial archive
        // (a body that just ended would read as a whole one).
        match &result {
            Err(ArchiveError::Layer(e)) => {
                let _ = sink
                    .tx
                    .blocking_send(Err(std::io::Error::other(e.to_string())));
            }
            Err(ArchiveError::Abandoned) => {
                let _ = sink
                    .tx
                    .blocking_send(Err(std::io::Error::other("the load was abandoned")));
            }
            _ => {}
        }
        result.map(|()| sink.sent)
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (body, producer)
}

/// Holds an archive's last bytes until it opens, or until the load is
/// given up (whichever comes first wins). The archive writer waits on it
/// on its blocking thread.
#[derive(Debug, Default)]
pub struct TailGate {
    state: Mutex<Option<bool>>,
    changed: std::sync::Condvar,
}

impl TailGate {
    /// The archive may end.
    pub fn open(&self) {
        self.settle(true);
    }

    /// The load is given up: the archive breaks instead of ending.
    pub fn abandon(&self) {
        self.settle(false);
    }

    fn settle(&self, open: bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.is_none() {
            *state = Some(open);
        }
        self.changed.notify_all();
    }

    /// Waits until it is settled: whether it opened.
    fn wait(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(open) = *state {
                return open;
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
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
    hold_tail: Option<Arc<TailGate>>,
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
    if let Some(tail) = hold_tail
        && !tail.wait()
    {
        return Err(ArchiveError::Abandoned);
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
    guard: Option<Arc<SpaceGuard>>,
    send_gzip: bool,
    inflate: Arc<BTreeSet<Digest>>,
    ahead: Option<Arc<VerifiedAhead>>,
}

impl Inflaters {
    fn new(layers: Vec<LayerSource>, options: &LoadOptions) -> Inflaters {
        let mut inflaters = Inflaters {
            pending: layers.into(),
            running: VecDeque::new(),
            jobs: options.jobs.max(1),
            buffer_chunks: (options.buffer_bytes / CHUNK).max(1),
            guard: options.guard.clone(),
            send_gzip: options.send_gzip,
            inflate: options.inflate.clone(),
            ahead: options.ahead.clone(),
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
            let guard = self.guard.clone();
            let raw = sent_as_stored(&layer, self.send_gzip, &self.inflate);
            let ahead = raw.then(|| self.ahead.clone()).flatten();
            std::thread::spawn(move || {
                inflate_layer(&work, guard.as_deref(), ahead.as_deref(), raw, &tx)
            });
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

/// Why a [`Tee`] stopped the reader it feeds.
enum Stop {
    /// The receiver went away.
    Closed,
    Failed(DockerError),
}

/// Passes the layer's uncompressed bytes to whoever reads it (the tar
/// walk), hashing and counting them, capped at the declared tar size, and
/// forwards them in whole chunks.
struct Tee<'a, R, F> {
    layer: &'a LayerSource,
    inner: R,
    hasher: DigestWriter,
    limit: Option<u64>,
    pending: Vec<u8>,
    forward: F,
    read_so_far: Rc<Cell<u64>>,
    /// Set once the layer is refused: it is still read to its end (to be
    /// measured), but no more of it is sent.
    muted: Rc<Cell<bool>>,
    stop: Option<Stop>,
}

impl<R: Read, F: FnMut(Bytes) -> bool> Tee<'_, R, F> {
    fn flush_pending(&mut self) -> std::io::Result<()> {
        if self.muted.get() {
            self.pending.clear();
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes = Bytes::from(std::mem::replace(
            &mut self.pending,
            Vec::with_capacity(CHUNK),
        ));
        if (self.forward)(bytes) {
            Ok(())
        } else {
            self.stop = Some(Stop::Closed);
            Err(std::io::Error::other("the archive's reader went away"))
        }
    }
}

impl<R: Read, F: FnMut(Bytes) -> bool> Read for Tee<'_, R, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = loop {
            match self.inner.read(buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    let message = source.to_string();
                    self.stop = Some(Stop::Failed(DockerError::LayerRead {
                        diff_id: self.layer.diff_id.clone(),
                        path: self.layer.blob_path.clone(),
                        source,
                    }));
                    return Err(std::io::Error::other(message));
                }
            }
        };
        self.hasher.update(&buf[..n]);
        self.read_so_far.set(self.hasher.len());
        if let Some(limit) = self.limit
            && self.hasher.len() > limit
        {
            self.stop = Some(Stop::Failed(DockerError::LayerSizeMismatch {
                diff_id: self.layer.diff_id.clone(),
                path: self.layer.blob_path.clone(),
                expected: limit,
                actual: self.hasher.len(),
            }));
            return Err(std::io::Error::other("over the declared tar size"));
        }
        self.pending.extend_from_slice(&buf[..n]);
        if self.pending.len() >= CHUNK {
            self.flush_pending()?;
        }
        Ok(n)
    }
}

/// A layer inflated whole, its tar walked: size, digest and the walk.
struct Walked {
    size: u64,
    digest: Digest,
    walk: crate::app::layer::TarWalk,
}

/// Inflates the layer, walking its tar, and hands its bytes on; with a
/// guard, admits its running figures after each entry and its whole
/// footprint at the end (before the caller's last word on it). `None` when
/// the receiver went away. A layer the guard refuses is sent no further
/// but read to its end, so that, if it is the layer it claims to be, what
/// it really takes is recorded for the next plan.
///
/// `temp` is the engine's temporary copy of the layer when it is known up
/// front (a blob sent as stored); otherwise the tar read so far counts.
fn walk_layer(
    layer: &LayerSource,
    limit: Option<u64>,
    guard: Option<&SpaceGuard>,
    temp: Option<u64>,
    forward: impl FnMut(Bytes) -> bool,
) -> Result<Option<Walked>, DockerError> {
    let read_so_far = Rc::new(Cell::new(0u64));
    let mut tee = Tee {
        layer,
        inner: open_layer(layer)?,
        hasher: DigestWriter::new(),
        limit,
        pending: Vec::with_capacity(CHUNK),
        forward,
        read_so_far: read_so_far.clone(),
        muted: Rc::new(Cell::new(false)),
        stop: None,
    };
    let muted = tee.muted.clone();
    let mut drawn = (0u64, 0u64);
    let mut refused = None;
    let walked = crate::app::layer::walk_tar(BufReader::with_capacity(CHUNK, &mut tee), |walk| {
        let Some(guard) = guard else { return Ok(()) };
        if refused.is_some() {
            return Ok(());
        }
        if let Err(e) = guard.admit(
            layer,
            walk.file_bytes(),
            walk.inodes(),
            temp.unwrap_or_else(|| read_so_far.get()),
            &mut drawn,
        ) {
            refused = Some(e);
            muted.set(true);
        }
        Ok(())
    })
    .and_then(|(walk, mut rest)| {
        // Padding after the end of the tar is part of the diff_id.
        std::io::copy(&mut rest, &mut std::io::sink())?;
        Ok(walk)
    })
    .and_then(|walk| tee.flush_pending().map(|()| walk));
    let walk = match walked {
        Ok(walk) => walk,
        Err(e) => {
            return match tee.stop.take() {
                Some(Stop::Closed) => Ok(None),
                Some(Stop::Failed(failure)) => Err(failure),
                None => Err(DockerError::LayerNotATar {
                    diff_id: layer.diff_id.clone(),
                    path: layer.blob_path.clone(),
                    reason: e.to_string(),
                }),
            };
        }
    };
    let size = tee.hasher.len();
    let digest = tee.hasher.finish();
    if let Some(guard) = guard {
        let refused = refused.or_else(|| {
            let (inodes, usage) = walk.footprint();
            let usage = crate::oci::format::usage_for_block_size(&usage, guard.block_size);
            guard
                .admit(layer, usage, inodes, temp.unwrap_or(size), &mut drawn)
                .err()
        });
        if let Some(refused) = refused {
            if digest == layer.diff_id && limit.is_none_or(|l| l == size) {
                guard.record(layer, size, &walk);
            }
            return Err(refused);
        }
    }
    Ok(Some(Walked { size, digest, walk }))
}

fn inflate_layer(
    layer: &LayerSource,
    guard: Option<&SpaceGuard>,
    ahead: Option<&VerifiedAhead>,
    raw: bool,
    tx: &mpsc::SyncSender<Piece>,
) {
    let result = (|| -> Result<bool, DockerError> {
        if raw {
            return send_raw_layer(layer, guard, ahead, tx);
        }
        match layer.tar_size {
            Some(size) => {
                if tx.send(Piece::Size(size)).is_err() {
                    return Ok(false);
                }
                let Some(walked) = walk_layer(layer, Some(size), guard, None, |bytes| {
                    tx.send(Piece::Data(bytes)).is_ok()
                })?
                else {
                    return Ok(false);
                };
                check_layer(layer, Some(size), walked.size, walked.digest)?;
                if let Some(guard) = guard {
                    guard.record(layer, walked.size, &walked.walk);
                }
            }
            None => {
                // A tar entry needs its size up front: count (and measure,
                // and admit) by inflating once, then send.
                let Some(walked) = walk_layer(layer, None, guard, None, |_| true)? else {
                    return Ok(false);
                };
                check_layer(layer, None, walked.size, walked.digest)?;
                let size = walked.size;
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
                if let Some(guard) = guard {
                    guard.record(layer, size, &walked.walk);
                }
            }
        }
        Ok(true)
    })();
    let _ = match result {
        Ok(true) => tx.send(Piece::Done),
        Ok(false) => Ok(()),
        Err(e) => tx.send(Piece::Failed(e)),
    };
}

/// Sends a gzip layer as stored: first inflated, hashed, walked and held
/// to what the check counted (its temporary copy on the engine's side is
/// the blob's size), then, only once it passed, its compressed bytes. The
/// engine inflates it again and checks its `diff_id` itself.
fn send_raw_layer(
    layer: &LayerSource,
    guard: Option<&SpaceGuard>,
    ahead: Option<&VerifiedAhead>,
    tx: &mpsc::SyncSender<Piece>,
) -> Result<bool, DockerError> {
    let read_error = |source| DockerError::LayerRead {
        diff_id: layer.diff_id.clone(),
        path: layer.blob_path.clone(),
        source,
    };
    let blob_len = std::fs::metadata(&layer.blob_path)
        .map_err(read_error)?
        .len();
    let walked = match ahead.and_then(|a| a.take(layer, blob_len)) {
        Some(walked) => walked,
        None => {
            let Some(walked) = walk_layer(layer, layer.tar_size, guard, Some(blob_len), |_| true)?
            else {
                return Ok(false);
            };
            check_layer(layer, layer.tar_size, walked.size, walked.digest.clone())?;
            walked
        }
    };
    if tx.send(Piece::Size(blob_len)).is_err() {
        return Ok(false);
    }
    let mut file = File::open(&layer.blob_path).map_err(read_error)?;
    let mut sent = 0u64;
    loop {
        let mut buffer = vec![0u8; CHUNK];
        let n = loop {
            match file.read(&mut buffer) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            }
        };
        if n == 0 {
            break;
        }
        sent += n as u64;
        if sent > blob_len {
            break;
        }
        buffer.truncate(n);
        if tx.send(Piece::Data(Bytes::from(buffer))).is_err() {
            return Ok(false);
        }
    }
    if sent != blob_len {
        return Err(read_error(std::io::Error::other(format!(
            "the blob changed while it was sent ({sent} bytes read, {blob_len} expected)"
        ))));
    }
    if let Some(guard) = guard {
        guard.record(layer, walked.size, &walked.walk);
    }
    Ok(true)
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

    /// A tar of regular files, as a layer holds them.
    fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, bytes) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, bytes.as_slice()).unwrap();
        }
        tar.into_inner().unwrap()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, bytes).unwrap();
        gz.finish().unwrap()
    }

    /// Runs the inflater of `layer` under `guard`: the bytes it sent and
    /// how it ended.
    fn inflate(layer: &LayerSource, guard: &SpaceGuard) -> (u64, Result<(), DockerError>) {
        let (tx, rx) = mpsc::sync_channel(100_000);
        inflate_layer(layer, Some(guard), None, false, &tx);
        let mut sent = 0;
        for piece in rx.try_iter() {
            match piece {
                Piece::Data(b) => sent += b.len() as u64,
                Piece::Done => return (sent, Ok(())),
                Piece::Failed(e) => return (sent, Err(e)),
                Piece::Size(_) => {}
            }
        }
        (
            sent,
            Err(DockerError::InvalidImage {
                image: String::new(),
                reason: "no end".into(),
            }),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_archive_ends_once_it_opens_and_breaks_when_given_up() {
        use futures_util::StreamExt as _;
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_of(&[("opt/a.txt", b"hello".to_vec())]);
        let mut layer = layer_file(
            dir.path(),
            "layer",
            &tar,
            "application/vnd.oci.image.layer.v1.tar",
        );
        layer.diff_id = Digest::of(&tar);
        let image = ImageToLoad {
            config: b"{}".to_vec(),
            config_digest: digest(1),
            repo_tags: Vec::new(),
            layers: vec![layer],
        };
        for open in [true, false] {
            let tail = Arc::new(TailGate::default());
            let (body, producer) =
                stream_archive(&image, 0, &LoadOptions::default(), Some(tail.clone()));
            let items = tokio::spawn(body.collect::<Vec<_>>());
            // Settled once: the second call changes nothing.
            if open {
                tail.open();
                tail.abandon();
            } else {
                tail.abandon();
                tail.open();
            }
            let items = items.await.unwrap();
            let written = producer.await.unwrap();
            let last = items.last().unwrap();
            if open {
                assert!(matches!(written, Ok(n) if n % 512 == 0), "{written:?}");
                assert_eq!(last.as_ref().unwrap().as_ref(), &[0u8; 1024][..]);
            } else {
                assert!(matches!(written, Err(ArchiveError::Abandoned)));
                // The body breaks, so the engine discards what it read.
                assert!(last.is_err());
            }
        }
    }

    #[test]
    fn a_layer_verified_ahead_is_sent_from_that_result_and_a_failed_one_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_of(&[("opt/a.bin", vec![7u8; 300_000])]);
        let blob = gzip(&tar);
        let mut layer = layer_file(
            dir.path(),
            "good",
            &blob,
            "application/vnd.oci.image.layer.v1.tar+gzip",
        );
        layer.diff_id = Digest::of(&tar);
        layer.tar_size = Some(tar.len() as u64);
        let ahead = VerifiedAhead::default();
        ahead.verify(&layer, None);
        // Another blob length is not the blob that was verified.
        assert!(ahead.take(&layer, blob.len() as u64 + 1).is_none());
        ahead.verify(&layer, None);
        let (tx, rx) = mpsc::sync_channel(100_000);
        assert!(send_raw_layer(&layer, None, Some(&ahead), &tx).unwrap());
        let sent: u64 = rx
            .try_iter()
            .map(|p| match p {
                Piece::Data(b) => b.len() as u64,
                _ => 0,
            })
            .sum();
        assert_eq!(sent, blob.len() as u64);
        assert!(
            ahead.take(&layer, blob.len() as u64).is_none(),
            "taken by the send"
        );

        // A layer that is not what its diff_id says is not kept; its send
        // reads it again and says why.
        let mut bad = layer.clone();
        bad.diff_id = digest(9);
        ahead.verify(&bad, None);
        assert!(ahead.take(&bad, blob.len() as u64).is_none());
        ahead.verify(&bad, None);
        let (tx, _rx) = mpsc::sync_channel(100_000);
        let err = send_raw_layer(&bad, None, Some(&ahead), &tx).unwrap_err();
        assert!(
            matches!(err, DockerError::LayerDigestMismatch { .. }),
            "{err}"
        );
    }

    fn guard_for(layer: &LayerSource, allowance: Allowance, headroom: (u64, u64)) -> SpaceGuard {
        SpaceGuard::new(
            PathBuf::from("/docker"),
            4096,
            HashMap::from([(layer.diff_id.clone(), (digest(9), allowance))]),
            headroom.0,
            headroom.1,
        )
    }

    #[test]
    fn a_layer_larger_than_counted_is_stopped_before_its_content_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        // 64 MiB of zeros declared as one block: the file's header tells.
        let plain = tar_of(&[("small", vec![1; 100]), ("zeros", vec![0; 64 << 20])]);
        let mut layer = layer_file(
            dir.path(),
            "z.gz",
            &gzip(&plain),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        );
        layer.diff_id = Digest::of(&plain);
        let small = Allowance {
            usage: 4096,
            inodes: 20,
            tar_size: plain.len() as u64,
        };
        for tar_size in [Some(plain.len() as u64), None] {
            layer.tar_size = tar_size;
            let guard = guard_for(&layer, small, (1 << 20, 1000));
            let (sent, result) = inflate(&layer, &guard);
            let err = result.unwrap_err();
            assert!(
                matches!(&err, DockerError::LayerOverCounted { blob, counted, .. }
                    if *blob == digest(9) && *counted == 4096 + plain.len() as u64),
                "{err}"
            );
            let said = err.to_string();
            assert!(
                said.contains("/docker") && said.contains(&digest(9).to_string()),
                "{said}"
            );
            assert!(sent <= 2 * CHUNK as u64, "{sent} bytes sent");
            // Read to its end all the same: what it really takes is known.
            let measured = &guard.measured()[&layer.diff_id];
            assert_eq!(measured.file_bytes, (64 << 20) + 100);
        }

        // With room enough on the volume, the same layer goes through and
        // what it measured is kept.
        layer.tar_size = Some(plain.len() as u64);
        let guard = guard_for(&layer, small, (80 << 20, 1000));
        let (sent, result) = inflate(&layer, &guard);
        result.unwrap();
        assert_eq!(sent, plain.len() as u64);
        let measured = &guard.measured()[&layer.diff_id];
        assert_eq!(measured.blob, digest(9));
        assert_eq!(measured.tar_size, plain.len() as u64);
        assert_eq!(measured.file_bytes, (64 << 20) + 100);
        assert!(measured.usage_by_block_size[&4096] > 64 << 20);
    }

    #[test]
    fn a_layer_with_more_inodes_than_counted_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<(String, Vec<u8>)> =
            (0..5000).map(|i| (format!("e{i}"), Vec::new())).collect();
        let files: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
        let plain = tar_of(&files);
        let mut layer = layer_file(
            dir.path(),
            "e.gz",
            &gzip(&plain),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        );
        layer.diff_id = Digest::of(&plain);
        layer.tar_size = Some(plain.len() as u64);
        let allowance = Allowance {
            usage: 1 << 30,
            inodes: 1,
            tar_size: plain.len() as u64,
        };
        let guard = guard_for(&layer, allowance, (1 << 30, 100));
        let (sent, result) = inflate(&layer, &guard);
        let err = result.unwrap_err();
        assert!(
            matches!(
                &err,
                DockerError::LayerOverCounted {
                    what: "inodes",
                    counted: 1,
                    headroom: 100,
                    ..
                }
            ),
            "{err}"
        );
        assert!(sent < plain.len() as u64, "{sent}");
    }

    #[test]
    fn a_layer_that_is_not_a_tar_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let plain = vec![7u8; 5000];
        let mut layer = layer_file(
            dir.path(),
            "n.gz",
            &gzip(&plain),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        );
        layer.diff_id = Digest::of(&plain);
        let guard = guard_for(&layer, Allowance::default(), (1 << 30, 1 << 20));
        let (_, result) = inflate(&layer, &guard);
        let err = result.unwrap_err();
        assert!(matches!(err, DockerError::LayerNotATar { .. }), "{err}");
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
        let plain = tar_of(&[(
            "data.bin",
            (0..700_000u32).map(|i| (i % 251) as u8).collect(),
        )]);
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
        inflate_layer(&layer, None, None, false, &tx);
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
        inflate_layer(&layer, None, None, false, &tx);
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
        let plain = tar_of(&[("fives", vec![5u8; 10_000])]);
        let mut zst = zstd::stream::encode_all(&plain[..], 1).unwrap();
        let mut layer = layer_file(
            dir.path(),
            "l.zst",
            &std::mem::take(&mut zst),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        );
        layer.diff_id = Digest::of(&plain);
        let right = plain.len() as u64;
        for wrong in [right - 1, right + 1] {
            layer.tar_size = Some(wrong);
            let (tx, rx) = mpsc::sync_channel(100);
            inflate_layer(&layer, None, None, false, &tx);
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
