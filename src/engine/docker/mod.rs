//! The Docker Engine, spoken to through its API (the `bollard` crate).
//!
//! This module owns everything stowage asks of the engine: which layers it
//! already holds, loading an image from stored blobs, naming loaded images so
//! that a pinned compose file finds them, and listing, measuring and removing
//! images. It takes plain inputs (paths, bytes, digests), never the store.
//!
//! Loading streams a `docker save`-style archive built on the fly into
//! `POST /images/load`: no temporary tar is written by stowage. Layers are
//! handed to the engine UNCOMPRESSED, inflated on worker threads and verified
//! against their `diff_id` while they stream; a mismatch aborts the request
//! mid-body, so the engine never creates the image. Layers whose chain the
//! engine already holds are left out of the archive (the engine does not open
//! a layer file whose chain it holds; verified on dockerd 20.10).
//!
//! Durability is the engine's: an image exists once the load response says so
//! and `image_exists` finds it by its config digest. Errors are one sentence
//! naming the engine's address, the image or the layer at fault.
//!
//! The engine's temporary copy: `POST /images/load` first unpacks the whole
//! archive into `<data root>/tmp/docker-import-*`, then applies the layers,
//! then deletes that directory. The peak extra disk of a load is therefore the
//! archive's files (every layer sent, as sent: uncompressed here) on top of the
//! applied layers; [`load_temp_bytes`] computes it for the space check.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{
    ImportImageOptionsBuilder, ListContainersOptionsBuilder, ListImagesOptionsBuilder,
    RemoveImageOptionsBuilder,
};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;

use crate::Digest;
use crate::oci::digest::DigestWriter;
use crate::plan::DockerView;
use crate::plan::held::{HeldLayers, IMAGES_AT_ONCE};

/// Where the engine listens when neither `DOCKER_HOST` nor an explicit host is given.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// Requests other than a load answer quickly; a load may apply gigabytes.
const API_TIMEOUT: Duration = Duration::from_secs(120);
const LOAD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Size of the pieces a layer is read and sent in.
const CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("the Docker Engine socket {socket} does not exist; is dockerd running?")]
    SocketMissing { socket: String },
    #[error(
        "{host:?} is not a Docker host stowage can use: expected unix:///PATH, tcp://HOST:PORT or http://HOST:PORT"
    )]
    UnsupportedHost { host: String },
    #[error("cannot reach the Docker Engine at {host}: {source}")]
    Unreachable {
        host: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("the Docker Engine at {host} failed to {action}: {source}")]
    Api {
        host: String,
        action: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("the Docker Engine at {host} gave an unreadable answer to {action}: {reason}")]
    BadAnswer {
        host: String,
        action: String,
        reason: String,
    },
    #[error("the Docker Engine refused to load image {image}: {message}")]
    LoadRefused { image: String, message: String },
    #[error(
        "layer {diff_id} in {path} does not match its diff_id: its uncompressed bytes hash to {actual}; the stored blob is corrupt"
    )]
    LayerDigestMismatch {
        diff_id: Digest,
        path: PathBuf,
        actual: Digest,
    },
    #[error(
        "layer {diff_id} in {path} is {actual} bytes once uncompressed, but its tar size was declared as {expected}"
    )]
    LayerSizeMismatch {
        diff_id: Digest,
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("cannot read layer {diff_id} from {path}: {source}")]
    LayerRead {
        diff_id: Digest,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {diff_id} has media type {media_type:?}, which stowage cannot unpack")]
    UnsupportedMediaType { diff_id: Digest, media_type: String },
    #[error("image {image} cannot be loaded: {reason}")]
    InvalidImage { image: String, reason: String },
    #[error("{reference:?} is not a usable image reference: {reason}")]
    InvalidReference { reference: String, reason: String },
}

/// A connection to one Docker Engine, at the API version both sides speak.
#[derive(Clone)]
pub struct DockerEngine {
    client: Docker,
    host: String,
    /// The engine's version as its ping named it (`Server: Docker/20.10.24`).
    server: Option<String>,
    /// The diff_ids of each image inspected so far, by image ID. An image ID
    /// is the digest of its config, which lists the diff_ids, so an entry
    /// never goes stale: it is only dropped when the image is gone.
    image_layers: std::sync::Arc<std::sync::Mutex<HashMap<String, Vec<Digest>>>>,
    /// Where that map is kept between runs, if anywhere.
    layer_cache: Option<PathBuf>,
}

/// What stowage needs to know about the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    /// `DockerRootDir`: the volume the space check must count Docker's layers on.
    pub data_root: PathBuf,
    pub storage_driver: String,
    /// The API version this connection negotiated (e.g. "1.41" for dockerd 20.10).
    pub api_version: String,
    pub server_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    /// The image ID, which is the digest of its config.
    pub id: Digest,
    /// Bytes of all its layers, shared ones included, as Docker reports them.
    pub size: u64,
    pub repo_tags: Vec<String>,
}

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

/// What a load did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    pub layers_sent: usize,
    /// Leading layers left out because the engine held their chain already.
    pub layers_skipped: usize,
    /// Bytes of the archive sent to the engine (headers and padding included).
    pub bytes_sent: u64,
    pub elapsed: Duration,
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

/// What the engine's `GET /_ping` says about itself.
struct Ping {
    api_version: Option<bollard::ClientVersion>,
    server: Option<String>,
}

/// Pings the engine at `host` (`unix://` or `tcp://`/`http://`) with one
/// plain HTTP/1.0 request and reads the `Api-Version` and `Server` headers,
/// as the docker CLI negotiates: the engine answers a ping at once, while
/// `GET /version` (bollard's way) costs it about 10 ms of work, which a fit
/// check pays on every run. `None` when there is no usable answer.
async fn ping(host: &str) -> Option<Ping> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const REQUEST: &[u8] = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n";
    async fn exchange(
        mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    ) -> std::io::Result<Vec<u8>> {
        stream.write_all(REQUEST).await?;
        let mut answer = Vec::new();
        stream.take(16 * 1024).read_to_end(&mut answer).await?;
        Ok(answer)
    }
    let answer = async {
        match host.strip_prefix("unix://") {
            Some(socket) => exchange(tokio::net::UnixStream::connect(socket).await?).await,
            None => {
                let address = host
                    .trim_start_matches("tcp://")
                    .trim_start_matches("http://")
                    .trim_end_matches('/');
                exchange(tokio::net::TcpStream::connect(address).await?).await
            }
        }
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .ok()?
        .ok()?;
    parse_ping(&String::from_utf8_lossy(&answer))
}

fn parse_ping(answer: &str) -> Option<Ping> {
    let head = answer.split("\r\n\r\n").next()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?;
    if !status.starts_with("HTTP/1.") || status.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    let mut ping = Ping {
        api_version: None,
        server: None,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("api-version") {
            let (major, minor) = value.split_once('.')?;
            ping.api_version = Some(bollard::ClientVersion {
                major_version: major.parse().ok()?,
                minor_version: minor.parse().ok()?,
            });
        } else if name.eq_ignore_ascii_case("server") {
            // "Docker/20.10.24 (linux)"
            ping.server = value
                .strip_prefix("Docker/")
                .and_then(|v| v.split_whitespace().next())
                .map(str::to_string);
        }
    }
    Some(ping)
}

/// The local `name:tag` under which stowage loads the image a compose file
/// pins as `NAME@sha256:<hex>`: `NAME:stowage-sha256-<hex>` (79-character tag,
/// within Docker's 128).
///
/// Why: `docker load` only creates `name:tag` references, and an unpatched
/// engine has no way to record `NAME@sha256:...` without pulling from a
/// registry, so compose would try to pull a digest-pinned image. stowage
/// therefore loads each image under this tag and starts the app with an
/// override file that maps every service to it (see `compose`). The tag keeps
/// the repository name, so `docker images` says what the image is, and it
/// carries the whole pinned digest, so the mapping is exact and a tag
/// starting with `stowage-` marks an image stowage loaded.
pub fn local_tag_for(pinned: &str) -> Result<String, DockerError> {
    let invalid = |reason: &str| DockerError::InvalidReference {
        reference: pinned.to_string(),
        reason: reason.to_string(),
    };
    let (named, digest) = pinned
        .split_once('@')
        .ok_or_else(|| invalid("it is not pinned by digest (NAME@sha256:...)"))?;
    let digest: Digest = digest
        .parse()
        .map_err(|_| invalid("its digest is not sha256: followed by 64 lowercase hex digits"))?;
    // A pinned reference may keep its tag (`repo:v1@sha256:...`); the digest wins.
    let name = strip_tag(named);
    validate_repository_name(name).map_err(|reason| invalid(&reason))?;
    Ok(format!("{name}:stowage-sha256-{}", digest.hex()))
}

/// `name` without a `:tag` (a `:` before the last `/` is a registry port).
fn strip_tag(named: &str) -> &str {
    let last_component = named.rfind('/').map_or(0, |slash| slash + 1);
    match named[last_component..].rfind(':') {
        Some(colon) => &named[..last_component + colon],
        None => named,
    }
}

/// Checks a repository name the way the engine will: an optional registry
/// host (with port) and lowercase path components.
fn validate_repository_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the repository name is empty".into());
    }
    if name.len() > 255 {
        return Err("the repository name is longer than 255 characters".into());
    }
    let mut components: Vec<&str> = name.split('/').collect();
    let first = components[0];
    let has_registry = components.len() > 1
        && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_registry {
        let (host, port) = first.split_once(':').unwrap_or((first, ""));
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        let port_ok = port.bytes().all(|b| b.is_ascii_digit());
        if !host_ok || !port_ok {
            return Err(format!("{first:?} is not a registry host"));
        }
        components.remove(0);
    }
    for component in components {
        let ok = !component.is_empty()
            && component
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
            && component.as_bytes()[0].is_ascii_alphanumeric()
            && component.as_bytes()[component.len() - 1].is_ascii_alphanumeric();
        if !ok {
            return Err(format!(
                "path component {component:?} must be lowercase letters, digits and separators"
            ));
        }
    }
    Ok(())
}

/// Checks a `name:tag` reference that `docker load` accepts.
fn validate_tag_reference(reference: &str) -> Result<(), String> {
    if reference.contains('@') {
        return Err("docker load cannot create digest references; use a name:tag".into());
    }
    let last_component = reference.rfind('/').map_or(0, |slash| slash + 1);
    let colon = reference[last_component..]
        .rfind(':')
        .ok_or_else(|| "it has no :tag".to_string())?;
    let (name, tag) = (
        &reference[..last_component + colon],
        &reference[last_component + colon + 1..],
    );
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && (tag.as_bytes()[0].is_ascii_alphanumeric() || tag.as_bytes()[0] == b'_');
    if !tag_ok {
        return Err(format!("tag {tag:?} is not a valid Docker tag"));
    }
    validate_repository_name(name)
}

/// What Docker looks like to the plan, asked of `engine`; when it cannot be
/// reached, the view says so and counts every layer.
pub async fn probe_view(engine: Option<&DockerEngine>) -> (DockerView, Option<String>) {
    let Some(engine) = engine else {
        return DockerView::unreachable("no engine connection");
    };
    let (info, held) = tokio::join!(engine.info(), engine.held_layers());
    match (info, held) {
        (Ok(info), Ok(held)) => (
            DockerView {
                reachable: true,
                data_root: info.data_root,
                held,
            },
            None,
        ),
        (Err(e), _) | (_, Err(e)) => DockerView::unreachable(&e.to_string()),
    }
}

impl DockerEngine {
    /// Connects to `host` (`unix:///path`, `tcp://host:port`, `http://...`),
    /// else to `DOCKER_HOST`, else to the default socket, and negotiates the
    /// API version with the engine (dockerd 20.10 speaks 1.41, older than
    /// bollard's default).
    pub async fn connect(host: Option<&str>) -> Result<DockerEngine, DockerError> {
        let host = match host {
            Some(host) => host.to_string(),
            None => std::env::var("DOCKER_HOST")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string()),
        };
        let host = if host.starts_with('/') {
            format!("unix://{host}")
        } else {
            host
        };
        if let Some(socket) = host.strip_prefix("unix://")
            && !Path::new(socket).exists()
        {
            return Err(DockerError::SocketMissing {
                socket: socket.to_string(),
            });
        }
        if !(host.starts_with("unix://")
            || host.starts_with("tcp://")
            || host.starts_with("http://"))
        {
            return Err(DockerError::UnsupportedHost { host });
        }
        let ping = ping(&host).await;
        let version = ping.as_ref().and_then(|p| p.api_version).map(|served| {
            let ours = bollard::API_DEFAULT_VERSION;
            if (served.major_version, served.minor_version)
                < (ours.major_version, ours.minor_version)
            {
                served
            } else {
                *ours
            }
        });
        let connect = |version: &bollard::ClientVersion| {
            if host.starts_with("unix://") {
                Docker::connect_with_unix(&host, API_TIMEOUT.as_secs(), version)
            } else {
                Docker::connect_with_http(&host, API_TIMEOUT.as_secs(), version)
            }
            .map_err(|source| DockerError::Unreachable {
                host: host.clone(),
                source,
            })
        };
        let client = match &version {
            Some(version) => connect(version)?,
            // No usable answer to the ping: bollard's own negotiation, which
            // asks `GET /version` and says why it failed.
            None => connect(bollard::API_DEFAULT_VERSION)?
                .negotiate_version()
                .await
                .map_err(|source| DockerError::Unreachable {
                    host: host.clone(),
                    source,
                })?,
        };
        Ok(DockerEngine {
            client,
            host,
            server: ping.and_then(|p| p.server),
            image_layers: Default::default(),
            layer_cache: None,
        })
    }

    /// Keeps the diff_ids of the engine's images in `path` between runs, so
    /// that a check on an engine with hundreds of images lists them in one
    /// request instead of inspecting each. A missing or unreadable file is
    /// an empty cache; one that cannot be written is left alone.
    pub fn with_layer_cache(mut self, path: PathBuf) -> DockerEngine {
        if let Ok(bytes) = std::fs::read(&path)
            && let Ok(map) = serde_json::from_slice::<HashMap<String, Vec<Digest>>>(&bytes)
            && let Ok(mut layers) = self.image_layers.lock()
        {
            *layers = map;
        }
        self.layer_cache = Some(path);
        self
    }

    /// The address this connection uses, for messages.
    pub fn host(&self) -> &str {
        &self.host
    }

    fn api_error(
        &self,
        action: impl Into<String>,
    ) -> impl FnOnce(bollard::errors::Error) -> DockerError {
        let host = self.host.clone();
        let action = action.into();
        move |source| DockerError::Api {
            host,
            action,
            source,
        }
    }

    pub async fn ping(&self) -> Result<(), DockerError> {
        self.client
            .ping()
            .await
            .map(|_| ())
            .map_err(|source| DockerError::Unreachable {
                host: self.host.clone(),
                source,
            })
    }

    pub async fn info(&self) -> Result<EngineInfo, DockerError> {
        let info = self
            .client
            .info()
            .await
            .map_err(self.api_error("describe itself (GET /info)"))?;
        let data_root = info.docker_root_dir.ok_or_else(|| DockerError::BadAnswer {
            host: self.host.clone(),
            action: "GET /info".into(),
            reason: "it does not name its data root (DockerRootDir)".into(),
        })?;
        let negotiated = self.client.client_version();
        Ok(EngineInfo {
            data_root: PathBuf::from(data_root),
            storage_driver: info.driver.unwrap_or_default(),
            api_version: format!("{}.{}", negotiated.major_version, negotiated.minor_version),
            server_version: info
                .server_version
                .or_else(|| self.server.clone())
                .unwrap_or_default(),
        })
    }

    /// The layers of every image the engine holds (intermediate images too).
    pub async fn held_layers(&self) -> Result<HeldLayers, DockerError> {
        let images = self
            .client
            .list_images(Some(ListImagesOptionsBuilder::default().all(true).build()))
            .await
            .map_err(self.api_error("list its images"))?;
        let known = self
            .image_layers
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        let unknown: Vec<String> = images
            .iter()
            .map(|image| image.id.clone())
            .filter(|id| !known.contains_key(id))
            .collect();
        // One inspect per image not seen before, several at once: an engine
        // with hundreds of images answers in a fraction of the time of
        // one-by-one requests.
        let inspections: Vec<_> = futures_util::stream::iter(unknown)
            .map(|id| async move {
                let answer = self.client.inspect_image(&id).await;
                (id, answer)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut current: HashMap<String, Vec<Digest>> = images
            .iter()
            .filter_map(|image| Some((image.id.clone(), known.get(&image.id)?.clone())))
            .collect();
        for (id, answer) in inspections {
            let inspect = match answer {
                Ok(inspect) => inspect,
                // Removed between the listing and now: it holds nothing any more.
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(self.api_error(format!("inspect image {id}"))(e)),
            };
            let layers = inspect
                .root_fs
                .and_then(|root_fs| root_fs.layers)
                .unwrap_or_default();
            let diff_ids = layers
                .iter()
                .map(|layer| layer.parse::<Digest>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|bad| DockerError::BadAnswer {
                    host: self.host.clone(),
                    action: format!("GET /images/{id}/json"),
                    reason: bad.to_string(),
                })?;
            current.insert(id, diff_ids);
        }
        let mut held = HeldLayers::default();
        for diff_ids in current.values() {
            held.add_image(diff_ids);
        }
        if current != known {
            self.remember_image_layers(current);
        }
        Ok(held)
    }

    fn remember_image_layers(&self, current: HashMap<String, Vec<Digest>>) {
        if let Some(path) = &self.layer_cache
            && let Ok(bytes) = serde_json::to_vec(&current)
            && let Err(e) = crate::fsutil::write_atomic(path, &bytes)
        {
            tracing::debug!(
                "cannot keep the engine's image layers in {}: {e}",
                path.display()
            );
        }
        if let Ok(mut layers) = self.image_layers.lock() {
            *layers = current;
        }
    }

    /// The image with this name, tag or ID, if the engine has it.
    pub async fn image_exists(
        &self,
        name_or_id: &str,
    ) -> Result<Option<ImageSummary>, DockerError> {
        match self.client.inspect_image(name_or_id).await {
            Ok(inspect) => {
                let id = inspect.id.unwrap_or_default();
                let id = id.parse::<Digest>().map_err(|bad| DockerError::BadAnswer {
                    host: self.host.clone(),
                    action: format!("GET /images/{name_or_id}/json"),
                    reason: bad.to_string(),
                })?;
                Ok(Some(ImageSummary {
                    id,
                    size: inspect.size.unwrap_or(0).max(0) as u64,
                    repo_tags: inspect.repo_tags.unwrap_or_default(),
                }))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.api_error(format!("inspect image {name_or_id}"))(e)),
        }
    }

    /// Every top-level image.
    pub async fn list_images(&self) -> Result<Vec<ImageSummary>, DockerError> {
        let images = self
            .client
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .map_err(self.api_error("list its images"))?;
        images
            .into_iter()
            .map(|image| {
                let id = image
                    .id
                    .parse::<Digest>()
                    .map_err(|bad| DockerError::BadAnswer {
                        host: self.host.clone(),
                        action: "GET /images/json".into(),
                        reason: bad.to_string(),
                    })?;
                Ok(ImageSummary {
                    id,
                    size: image.size.max(0) as u64,
                    repo_tags: image
                        .repo_tags
                        .into_iter()
                        .filter(|tag| tag != "<none>:<none>")
                        .collect(),
                })
            })
            .collect()
    }

    /// Removes an image (by ID: every tag; by tag: that tag). Never forced:
    /// the engine refuses to remove an image a container uses, naming it.
    pub async fn remove_image(&self, name_or_id: &str) -> Result<(), DockerError> {
        let options = RemoveImageOptionsBuilder::default()
            .force(false)
            .noprune(false)
            .build();
        match self
            .client
            .remove_image(name_or_id, Some(options), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.api_error(format!("remove image {name_or_id}"))(e)),
        }
    }

    /// Gives image `image_id` the extra reference `name:tag` (what
    /// `docker tag` does), moving the tag if another image had it.
    pub async fn tag_image(&self, image_id: &Digest, reference: &str) -> Result<(), DockerError> {
        validate_tag_reference(reference).map_err(|reason| DockerError::InvalidReference {
            reference: reference.to_string(),
            reason,
        })?;
        let last_component = reference.rfind('/').map_or(0, |slash| slash + 1);
        let colon = last_component + reference[last_component..].rfind(':').unwrap_or(0);
        let options = bollard::query_parameters::TagImageOptionsBuilder::default()
            .repo(&reference[..colon])
            .tag(&reference[colon + 1..])
            .build();
        self.client
            .tag_image(&image_id.to_string(), Some(options))
            .await
            .map_err(self.api_error(format!("tag image {image_id} as {reference}")))
    }

    /// Names of the containers (running or not) created from this image.
    pub async fn containers_using(&self, image_id: &Digest) -> Result<Vec<String>, DockerError> {
        let containers = self
            .client
            .list_containers(Some(
                ListContainersOptionsBuilder::default().all(true).build(),
            ))
            .await
            .map_err(self.api_error("list its containers"))?;
        let wanted = image_id.to_string();
        Ok(containers
            .into_iter()
            .filter(|c| c.image_id.as_deref() == Some(wanted.as_str()))
            .map(|c| container_name(c.names.as_deref(), c.id.as_deref()))
            .collect())
    }

    pub(crate) fn client(&self) -> &Docker {
        &self.client
    }

    /// Disk used by images, as `docker system df` reports it.
    ///
    /// bollard models only the newest answer of `GET /system/df`, so this
    /// reads it directly and understands both the 1.41 form (`LayersSize`,
    /// `Images`) and the newer one (`ImageUsage`). Over TCP, where that raw
    /// read is not done, the figures come from the image list instead (the
    /// total then counts shared layers once per image).
    pub async fn image_disk_usage(&self) -> Result<ImageDiskUsage, DockerError> {
        if let Some(socket) = self.host.strip_prefix("unix://") {
            let version = self.client.client_version();
            let path = format!(
                "/v{}.{}/system/df",
                version.major_version, version.minor_version
            );
            let body =
                raw_get_unix(socket, &path)
                    .await
                    .map_err(|reason| DockerError::BadAnswer {
                        host: self.host.clone(),
                        action: format!("GET {path}"),
                        reason,
                    })?;
            return parse_system_df(&body).map_err(|reason| DockerError::BadAnswer {
                host: self.host.clone(),
                action: format!("GET {path}"),
                reason,
            });
        }
        let images = self.list_images().await?;
        Ok(ImageDiskUsage {
            total_bytes: images.iter().map(|i| i.size).sum(),
            images: images
                .into_iter()
                .map(|i| ImageUsage {
                    id: i.id,
                    repo_tags: i.repo_tags,
                    size: i.size,
                    shared_size: None,
                    containers: None,
                })
                .collect(),
        })
    }

    /// Loads one image, with default [`LoadOptions`].
    pub async fn load_image(&self, image: &ImageToLoad) -> Result<LoadReport, DockerError> {
        self.load_image_with(image, &LoadOptions::default()).await
    }

    /// Loads one image from its blobs, leaving out the leading layers whose
    /// chain the engine holds. Should such a layer vanish between the check
    /// and the load (its image removed meanwhile), the engine refuses the
    /// archive, and the load is retried once with every layer.
    pub async fn load_image_with(
        &self,
        image: &ImageToLoad,
        options: &LoadOptions,
    ) -> Result<LoadReport, DockerError> {
        validate_image(image)?;
        let diff_ids: Vec<Digest> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
        let skip = self.held_layers().await?.held_prefix_len(&diff_ids);
        match self.load_archive(image, skip, options).await {
            Err(DockerError::LoadRefused { message, .. })
                if skip > 0 && message.contains("layer.tar") =>
            {
                self.load_archive(image, 0, options).await
            }
            other => other,
        }
    }

    async fn load_archive(
        &self,
        image: &ImageToLoad,
        skip: usize,
        options: &LoadOptions,
    ) -> Result<LoadReport, DockerError> {
        let started = Instant::now();
        let name = image_name(image);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
        let producer = {
            let image = image.clone();
            let options = options.clone();
            tokio::task::spawn_blocking(move || {
                let mut sink = ChannelSink { tx, sent: 0 };
                let result = write_archive(&image, skip, &options, &mut sink);
                if let Err(ArchiveError::Layer(e)) = &result {
                    // Breaks the request body so the engine discards the partial archive.
                    let _ = sink
                        .tx
                        .blocking_send(Err(std::io::Error::other(e.to_string())));
                }
                result.map(|()| sink.sent)
            })
        };
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let client = self.client.clone().with_timeout(LOAD_TIMEOUT);
        let mut responses = client.import_image_stream(
            ImportImageOptionsBuilder::default().quiet(true).build(),
            body,
            None,
        );
        let mut engine_error: Option<String> = None;
        while let Some(message) = responses.next().await {
            match message {
                Ok(_) => {}
                Err(bollard::errors::Error::DockerStreamError { error }) => {
                    engine_error = Some(error);
                    break;
                }
                Err(e) => {
                    engine_error = Some(format!(
                        "the connection broke before it answered: {}",
                        error_chain(&e)
                    ));
                    break;
                }
            }
        }
        drop(responses);
        let produced = producer.await.map_err(|e| DockerError::InvalidImage {
            image: name.clone(),
            reason: format!("the archive writer stopped: {e}"),
        })?;
        let bytes_sent = match produced {
            // A layer that failed its checks is the cause, whatever the engine said.
            Err(ArchiveError::Layer(e)) => return Err(e),
            Err(ArchiveError::Closed) => {
                return Err(DockerError::LoadRefused {
                    image: name,
                    message: engine_error
                        .unwrap_or_else(|| "it closed the connection mid-archive".into()),
                });
            }
            Ok(sent) => sent,
        };
        if let Some(message) = engine_error {
            return Err(DockerError::LoadRefused {
                image: name,
                message,
            });
        }
        if self
            .image_exists(&image.config_digest.to_string())
            .await?
            .is_none()
        {
            return Err(DockerError::LoadRefused {
                image: name,
                message: format!(
                    "the load reported success but image {} is not there",
                    image.config_digest
                ),
            });
        }
        Ok(LoadReport {
            layers_sent: image.layers.len() - skip,
            layers_skipped: skip,
            bytes_sent,
            elapsed: started.elapsed(),
        })
    }
}

/// Per-image disk use, like `docker system df -v`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDiskUsage {
    /// Bytes of all image layers, each counted once (`LayersSize`).
    pub total_bytes: u64,
    pub images: Vec<ImageUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUsage {
    pub id: Digest,
    pub repo_tags: Vec<String>,
    pub size: u64,
    pub shared_size: Option<u64>,
    pub containers: Option<u64>,
}

fn parse_system_df(body: &[u8]) -> Result<ImageDiskUsage, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Df {
        layers_size: Option<i64>,
        images: Option<Vec<DfImage>>,
        image_usage: Option<DfImageUsage>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct DfImageUsage {
        total_size: Option<i64>,
        items: Option<Vec<DfImage>>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct DfImage {
        id: String,
        repo_tags: Option<Vec<String>>,
        size: i64,
        shared_size: Option<i64>,
        containers: Option<i64>,
    }
    let df: Df = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let (total, images) = match (df.layers_size, df.image_usage) {
        (Some(total), _) => (total, df.images.unwrap_or_default()),
        (None, Some(usage)) => (
            usage.total_size.unwrap_or(0),
            usage.items.unwrap_or_default(),
        ),
        (None, None) => return Err("it has neither LayersSize nor ImageUsage".into()),
    };
    let known = |n: Option<i64>| n.filter(|n| *n >= 0).map(|n| n as u64);
    let images = images
        .into_iter()
        .map(|image| {
            Ok(ImageUsage {
                id: image.id.parse::<Digest>().map_err(|e| e.to_string())?,
                repo_tags: image
                    .repo_tags
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|tag| tag != "<none>:<none>")
                    .collect(),
                size: image.size.max(0) as u64,
                shared_size: known(image.shared_size),
                containers: known(image.containers),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(ImageDiskUsage {
        total_bytes: total.max(0) as u64,
        images,
    })
}

/// `GET path` over a unix socket with HTTP/1.0, so the answer is neither
/// chunked nor kept alive; returns the body of a 200.
async fn raw_get_unix(socket: &str, path: &str) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot connect to {socket}: {e}"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    tokio::time::timeout(API_TIMEOUT, stream.read_to_end(&mut answer))
        .await
        .map_err(|_| "no answer within the timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer has no HTTP header end")?;
    let status_line = String::from_utf8_lossy(&answer[..split]);
    let status_line = status_line.lines().next().unwrap_or_default().to_string();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(format!("it answered {status_line:?}"));
    }
    Ok(answer[split + 4..].to_vec())
}

fn container_name(names: Option<&[String]>, id: Option<&str>) -> String {
    names
        .and_then(|names| names.first())
        .map(|name| name.trim_start_matches('/').to_string())
        .or_else(|| id.map(|id| id.chars().take(12).collect()))
        .unwrap_or_default()
}

/// An error and its causes, as one line: transport errors hide the useful
/// part in their sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

pub(crate) fn is_not_found(error: &bollard::errors::Error) -> bool {
    matches!(
        error,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn image_name(image: &ImageToLoad) -> String {
    image
        .repo_tags
        .first()
        .cloned()
        .unwrap_or_else(|| image.config_digest.to_string())
}

/// Refuses, before anything is sent, an image the engine would refuse or
/// that does not match what the caller claims.
fn validate_image(image: &ImageToLoad) -> Result<(), DockerError> {
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

enum ArchiveError {
    /// The engine stopped reading (it refused the archive or went away).
    Closed,
    /// A layer could not be read or failed its checks.
    Layer(DockerError),
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

use serde::Serialize;

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

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn a_ping_answer_gives_the_api_version_and_the_server() {
        let answer = "HTTP/1.0 200 OK\r\nApi-Version: 1.41\r\nContent-Type: text/plain\r\n\
                      Server: Docker/20.10.24+dfsg1 (linux)\r\n\r\nOK";
        let ping = parse_ping(answer).unwrap();
        let version = ping.api_version.unwrap();
        assert_eq!((version.major_version, version.minor_version), (1, 41));
        assert_eq!(ping.server.as_deref(), Some("20.10.24+dfsg1"));
        // Not an engine's answer, or a refusal: bollard negotiates instead.
        assert!(parse_ping("HTTP/1.0 404 Not Found\r\n\r\n").is_none());
        assert!(parse_ping("SSH-2.0-OpenSSH_9.2\r\n").is_none());
        assert!(parse_ping("HTTP/1.0 200 OK\r\nApi-Version: one\r\n\r\n").is_none());
    }

    #[test]
    fn local_tag_keeps_the_repository_and_the_whole_digest() {
        let hex = "a".repeat(64);
        assert_eq!(
            local_tag_for(&format!("registry.local:5000/team/app@sha256:{hex}")).unwrap(),
            format!("registry.local:5000/team/app:stowage-sha256-{hex}")
        );
        assert_eq!(
            local_tag_for(&format!("registry.local:5000/app:v3@sha256:{hex}")).unwrap(),
            format!("registry.local:5000/app:stowage-sha256-{hex}")
        );
        let tag = local_tag_for(&format!("app@sha256:{hex}")).unwrap();
        assert!(validate_tag_reference(&tag).is_ok());
    }

    #[test]
    fn local_tag_refuses_what_is_not_pinned() {
        for bad in [
            "registry.local/app:v3",
            "registry.local/app@sha256:abc",
            "Registry.local/App@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(local_tag_for(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn tag_references_are_checked_like_the_engine() {
        assert!(validate_tag_reference("localhost:5000/a/b:v1").is_ok());
        assert!(validate_tag_reference("localhost:5000/a/b").is_err());
        assert!(validate_tag_reference("a/b:").is_err());
        assert!(validate_tag_reference(&format!("a:{}", "x".repeat(129))).is_err());
        assert!(validate_tag_reference("a@sha256:00:x").is_err());
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
    fn system_df_is_read_in_both_engine_dialects() {
        let id = format!("sha256:{}", "b".repeat(64));
        let old = format!(
            r#"{{"LayersSize":1000,"Images":[{{"Id":"{id}","RepoTags":["a:1"],"Size":700,"SharedSize":-1,"Containers":2}}]}}"#
        );
        let usage = parse_system_df(old.as_bytes()).unwrap();
        assert_eq!(usage.total_bytes, 1000);
        assert_eq!(usage.images[0].size, 700);
        assert_eq!(usage.images[0].shared_size, Option::None);
        assert_eq!(usage.images[0].containers, Some(2));
        let new = format!(
            r#"{{"ImageUsage":{{"TotalSize":5,"Items":[{{"Id":"{id}","RepoTags":null,"Size":5}}]}}}}"#
        );
        let usage = parse_system_df(new.as_bytes()).unwrap();
        assert_eq!(usage.total_bytes, 5);
        assert!(usage.images[0].repo_tags.is_empty());
        assert!(parse_system_df(b"{}").is_err());
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
