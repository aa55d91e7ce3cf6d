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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{
    ImportImageOptionsBuilder, ListContainersOptionsBuilder, ListImagesOptionsBuilder,
    RemoveImageOptionsBuilder,
};
use futures_util::StreamExt;
use serde::Deserialize;

use crate::Digest;
use crate::plan::DockerView;
use crate::plan::held::HeldLayers;

mod archive;
mod gate;
mod tags;

pub use archive::{
    Allowance, ImageToLoad, LayerSource, LoadOptions, SpaceGuard, VerifiedAhead, layers_to_send,
};
pub use gate::{LoadGate, LoadPermit};
pub use tags::local_tag_for;
use tags::validate_tag_reference;

use archive::{ArchiveError, TailGate, image_name, stream_archive, validate_image};

/// Where the engine listens when neither `DOCKER_HOST` nor an explicit host is given.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// Requests other than a load answer quickly; a load may apply gigabytes.
const API_TIMEOUT: Duration = Duration::from_secs(120);
const LOAD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

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
    #[error(
        "layer {blob} (diff_id {diff_id}) needs at least {measured} {what} on the volume of {volume}, but the check counted {counted} for it (from the app's layers-meta) and left room for only {headroom} more: refused before Docker applied it"
    )]
    LayerOverCounted {
        blob: Digest,
        diff_id: Digest,
        /// "bytes (...)" or "inodes".
        what: &'static str,
        measured: u64,
        counted: u64,
        volume: PathBuf,
        headroom: u64,
    },
    #[error("layer {diff_id} in {path} cannot be measured: its tar is malformed: {reason}")]
    LayerNotATar {
        diff_id: Digest,
        path: PathBuf,
        reason: String,
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
    #[error(
        "the Docker Engine at {host} ({version}) keeps its images in containerd's image store (the `containerd-snapshotter` feature: its info names driver-type {CONTAINERD_SNAPSHOTTER_DRIVER_TYPE}), which stowage cannot install into: that store names an image by its manifest, not by its config digest, so stowage cannot find what it loaded. Turn the feature off (\"features\": {{\"containerd-snapshotter\": false}} in daemon.json) and restart dockerd; nothing was installed"
    )]
    ContainerdImageStore { host: String, version: String },
}

/// What `GET /info`'s `DriverStatus` names as `driver-type` when the engine
/// keeps images in containerd (Docker 24 and later, with the
/// `containerd-snapshotter` feature).
pub const CONTAINERD_SNAPSHOTTER_DRIVER_TYPE: &str = "io.containerd.snapshotter.v1";

/// Where the engine keeps its images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageStore {
    /// Its own graph driver (overlay2 and the like): an image's ID is its
    /// config digest, and `POST /images/load` unpacks into the driver. What
    /// stowage installs into.
    GraphDriver,
    /// containerd's content store and snapshotter: an image's ID is its
    /// manifest's digest. stowage refuses to install into it.
    Containerd,
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
    /// Where it keeps images (from `DriverStatus`).
    pub image_store: ImageStore,
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

/// The compose project a container belongs to (its label).
pub const COMPOSE_PROJECT_LABEL: &str = "com.docker.compose.project";

/// How the storage driver holds an image: the inspect's `GraphDriver` and
/// `RootFS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageStorage {
    /// `overlay2`, `btrfs`, ...
    pub driver: String,
    /// For overlay2: `UpperDir` (the top layer's `diff`), `LowerDir` (the
    /// others', top first, `:`-separated), `MergedDir`, `WorkDir`.
    pub data: HashMap<String, String>,
    pub diff_ids: Vec<Digest>,
}

/// A container as fsck's repair sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    pub id: String,
    pub name: String,
    pub image_id: Option<Digest>,
    /// Its `com.docker.compose.project` label.
    pub project: Option<String>,
    pub running: bool,
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

/// What the engine's `GET /_ping` says about itself.
struct Ping {
    api_version: Option<bollard::ClientVersion>,
    server: Option<String>,
}

/// One `GET path` to the engine at `host` (`unix://`, or `tcp://`/`http://`)
/// in plain HTTP/1.0, so the answer is neither chunked nor kept alive, read
/// up to `cap` bytes within `timeout`. This is the one exchange stowage
/// writes by hand beside bollard, for the two answers bollard cannot give:
/// the ping's headers (the API version, without bollard's `GET /version`)
/// and `GET /system/df` in the engines' older dialect.
async fn http10_get(
    host: &str,
    path: &str,
    cap: u64,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    async fn exchange(
        mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        request: &[u8],
        cap: u64,
    ) -> std::io::Result<Vec<u8>> {
        stream.write_all(request).await?;
        let mut answer = Vec::new();
        stream.take(cap).read_to_end(&mut answer).await?;
        Ok(answer)
    }
    let request = format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n");
    let answer = async {
        match host.strip_prefix("unix://") {
            Some(socket) => {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                exchange(stream, request.as_bytes(), cap).await
            }
            None => {
                let address = host
                    .trim_start_matches("tcp://")
                    .trim_start_matches("http://")
                    .trim_end_matches('/');
                let stream = tokio::net::TcpStream::connect(address).await?;
                exchange(stream, request.as_bytes(), cap).await
            }
        }
    };
    tokio::time::timeout(timeout, answer)
        .await
        .map_err(|_| "no answer within the timeout".to_string())?
        .map_err(|e| e.to_string())
}

/// The body of a 200 answer, or what the status line said instead.
fn body_of_200(answer: &[u8]) -> Result<&[u8], String> {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer has no HTTP header end")?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.starts_with("HTTP/1.") || status_line.split_whitespace().nth(1) != Some("200") {
        return Err(format!("it answered {status_line:?}"));
    }
    Ok(&answer[split + 4..])
}

/// Pings the engine and reads the `Api-Version` and `Server` headers, as the
/// docker CLI negotiates: the engine answers a ping at once, while
/// `GET /version` (bollard's way) costs it about 10 ms of work, which a fit
/// check pays on every run. `None` when there is no usable answer.
async fn ping(host: &str) -> Option<Ping> {
    let answer = http10_get(host, "/_ping", 16 * 1024, Duration::from_secs(10))
        .await
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
        let image_store = image_store_of(info.driver_status.as_deref().unwrap_or_default());
        Ok(EngineInfo {
            data_root: PathBuf::from(data_root),
            storage_driver: info.driver.unwrap_or_default(),
            image_store,
            api_version: format!("{}.{}", negotiated.major_version, negotiated.minor_version),
            server_version: info
                .server_version
                .or_else(|| self.server.clone())
                .unwrap_or_default(),
        })
    }

    /// Fails with [`DockerError::ContainerdImageStore`] when `info` says the
    /// engine keeps images in containerd: what install calls before it
    /// writes anything.
    pub fn require_graph_driver(&self, info: &EngineInfo) -> Result<(), DockerError> {
        match info.image_store {
            ImageStore::GraphDriver => Ok(()),
            ImageStore::Containerd => Err(DockerError::ContainerdImageStore {
                host: self.host.clone(),
                version: if info.server_version.is_empty() {
                    format!("API {}", info.api_version)
                } else {
                    format!("Docker {}", info.server_version)
                },
            }),
        }
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

    /// How the engine's storage driver holds image `id` (`GraphDriver` of
    /// an inspect) and its layers' diff_ids; `None` when there is no such
    /// image. An engine whose layer metadata is torn answers an error here.
    pub async fn image_storage(&self, id: &str) -> Result<Option<ImageStorage>, DockerError> {
        let inspect = match self.client.inspect_image(id).await {
            Ok(inspect) => inspect,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(self.api_error(format!("inspect image {id}"))(e)),
        };
        let bad = |reason: String| DockerError::BadAnswer {
            host: self.host.clone(),
            action: format!("GET /images/{id}/json"),
            reason,
        };
        let diff_ids = inspect
            .root_fs
            .and_then(|r| r.layers)
            .unwrap_or_default()
            .iter()
            .map(|l| l.parse::<Digest>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let (driver, data) = inspect
            .graph_driver
            .map(|g| (g.name, g.data))
            .unwrap_or_default();
        Ok(Some(ImageStorage {
            driver,
            data,
            diff_ids,
        }))
    }

    /// Every top-level image with its layers' diff_ids (an image the
    /// engine cannot describe is listed with none).
    pub async fn images_with_layers(
        &self,
    ) -> Result<Vec<(ImageSummary, Vec<Digest>)>, DockerError> {
        let mut out = Vec::new();
        for image in self.list_images().await? {
            let layers = match self.image_storage(&image.id.to_string()).await {
                Ok(Some(storage)) => storage.diff_ids,
                Ok(None) => continue,
                Err(_) => Vec::new(),
            };
            out.push((image, layers));
        }
        Ok(out)
    }

    /// Every container, running or not, with its image and compose project.
    pub async fn containers(&self) -> Result<Vec<ContainerRef>, DockerError> {
        let containers = self
            .client
            .list_containers(Some(
                ListContainersOptionsBuilder::default().all(true).build(),
            ))
            .await
            .map_err(self.api_error("list its containers"))?;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let id = c.id.clone()?;
                Some(ContainerRef {
                    name: container_name(c.names.as_deref(), c.id.as_deref()),
                    id,
                    image_id: c.image_id.as_deref().and_then(|i| i.parse().ok()),
                    project: c
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(COMPOSE_PROJECT_LABEL).cloned()),
                    running: c
                        .state
                        .as_ref()
                        .is_some_and(|s| s.to_string().eq_ignore_ascii_case("running")),
                })
            })
            .collect())
    }

    /// Stops (10 s, then killed) and removes container `id`.
    pub async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        let stop = bollard::query_parameters::StopContainerOptionsBuilder::default()
            .t(10)
            .build();
        match self.client.stop_container(id, Some(stop)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(()),
            // Already stopped (304) or failing to stop: the forced removal decides.
            Err(_) => {}
        }
        let remove = bollard::query_parameters::RemoveContainerOptionsBuilder::default()
            .force(true)
            .build();
        match self.client.remove_container(id, Some(remove)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.api_error(format!("remove container {id}"))(e)),
        }
    }

    pub(crate) fn client(&self) -> &Docker {
        &self.client
    }

    /// Disk used by images, as `docker system df` reports it.
    ///
    /// bollard models only the newest answer of `GET /system/df`, so this
    /// reads it directly and understands both the 1.41 form (`LayersSize`,
    /// `Images`) and the newer one (`ImageUsage`), over a unix socket or TCP.
    pub async fn image_disk_usage(&self) -> Result<ImageDiskUsage, DockerError> {
        let version = self.client.client_version();
        let path = format!(
            "/v{}.{}/system/df",
            version.major_version, version.minor_version
        );
        let bad = |reason| DockerError::BadAnswer {
            host: self.host.clone(),
            action: format!("GET {path}"),
            reason,
        };
        let answer = http10_get(&self.host, &path, 64 * 1024 * 1024, API_TIMEOUT)
            .await
            .map_err(bad)?;
        parse_system_df(body_of_200(&answer).map_err(bad)?).map_err(bad)
    }

    /// Loads one image, with default [`LoadOptions`].
    pub async fn load_image(&self, image: &ImageToLoad) -> Result<LoadReport, DockerError> {
        self.load_image_with(image, &LoadOptions::default()).await
    }

    /// Loads one image from its blobs, leaving out the leading layers whose
    /// chain the engine holds, ONE LAYER PER LOAD: each load carries one new
    /// layer on top of the chain the engine already holds, under a
    /// synthesized intermediate config (untagged, labelled
    /// [`INTERMEDIATE_LABEL`]), and the last carries the image's own config
    /// and tags. The engine's temporary copy is then one layer's file, not
    /// the whole archive. The intermediate images are removed once the image
    /// is there (its layers hold the chain), and also when a load fails, so
    /// a failed image leaves nothing behind in the engine but the chains it
    /// shares with others. Should a held layer vanish between the check and
    /// the load (its image removed meanwhile), the engine refuses the first
    /// archive, and the load starts again from the first layer.
    pub async fn load_image_with(
        &self,
        image: &ImageToLoad,
        options: &LoadOptions,
    ) -> Result<LoadReport, DockerError> {
        validate_image(image)?;
        let diff_ids: Vec<Digest> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
        let skip = self.held_layers().await?.held_prefix_len(&diff_ids);
        let mut intermediates = Vec::new();
        let result = match self
            .load_chain(image, skip, options, &mut intermediates)
            .await
        {
            Err(DockerError::LoadRefused { message, .. })
                if skip > 0 && message.contains("layer.tar") =>
            {
                self.load_chain(image, 0, options, &mut intermediates).await
            }
            other => other,
        };
        if let Some(gate) = &options.gate {
            gate.image_done(&image.config_digest);
        }
        // The image (or nothing, after a failure) now holds the chain.
        for id in intermediates.iter().rev() {
            if let Err(e) = self.remove_image(&id.to_string()).await {
                tracing::warn!("cannot remove the intermediate image {id}: {e}");
            }
        }
        result
    }

    /// Loads layers `skip..` of `image` one per load (see
    /// [`Self::load_image_with`]), pushing each intermediate image it made
    /// to `intermediates` before loading it.
    async fn load_chain(
        &self,
        image: &ImageToLoad,
        skip: usize,
        options: &LoadOptions,
        intermediates: &mut Vec<Digest>,
    ) -> Result<LoadReport, DockerError> {
        let started = Instant::now();
        let last = image.layers.len();
        if options.whole {
            let bytes_sent = self.load_archive(image, skip, options, true).await?;
            return Ok(LoadReport {
                layers_sent: last - skip,
                layers_skipped: skip,
                bytes_sent,
                elapsed: started.elapsed(),
            });
        }
        let mut bytes_sent = 0;
        // While the engine applies one layer, the next one's first read
        // (a layer sent as stored) runs beside it.
        let ahead = options.ahead.clone().unwrap_or_default();
        let options = &LoadOptions {
            ahead: Some(ahead.clone()),
            ..options.clone()
        };
        let read_ahead = |index: usize| ahead.start(image.layers.get(index)?, options);
        // Each load waits for its turn within the lean peak (see `LoadGate`).
        let gate = options.gate.clone();
        if let Some(gate) = &gate {
            gate.skip(&image.config_digest, skip);
        }
        let admit = |index: usize| {
            let gate = gate.clone();
            let digest = image.config_digest.clone();
            async move {
                match gate {
                    Some(gate) => Some(gate.admit(&digest, index).await),
                    None => None,
                }
            }
        };
        // One load under its permit (ended with it): a permit to stream
        // early holds the archive's last bytes until the load may be applied.
        let load = |step: ImageToLoad, skip: usize, check: bool, permit: Option<LoadPermit>| async move {
            match permit {
                Some(mut permit) if permit.is_early() => {
                    let tail = Arc::new(TailGate::default());
                    // Given up with this future, should it be dropped: the
                    // writer never waits for nothing.
                    let _give_up = AbandonOnDrop(tail.clone());
                    let load =
                        self.load_archive_held(&step, skip, options, check, Some(tail.clone()));
                    tokio::pin!(load);
                    let mut held = true;
                    let sent = loop {
                        tokio::select! {
                            sent = &mut load => break sent?,
                            () = permit.until_apply(), if held => {
                                held = false;
                                tail.open();
                            }
                        }
                    };
                    permit.applied();
                    Ok::<u64, DockerError>(sent)
                }
                permit => {
                    let sent = self.load_archive(&step, skip, options, check).await?;
                    if let Some(permit) = permit {
                        permit.applied();
                    }
                    Ok(sent)
                }
            }
        };
        // Layer k is sent on top of layers ..k; the last load sends the
        // last layer (or none, when the engine holds every one) with the
        // image's own config.
        for top in (skip + 1)..last {
            let (config, id) = intermediate_config(image, top)?;
            let step = ImageToLoad {
                config,
                config_digest: id.clone(),
                repo_tags: Vec::new(),
                layers: image.layers[..top].to_vec(),
            };
            if !intermediates.contains(&id) {
                intermediates.push(id);
            }
            let next = read_ahead(top);
            let permit = admit(top - 1).await;
            bytes_sent += load(step, top - 1, false, permit).await?;
            if let Some(next) = next {
                // Its failure shows when its own load reads it again.
                let _ = next.await;
            }
        }
        let from = last.saturating_sub(1).max(skip);
        // With every layer held, only the config goes: no figure counted it.
        let permit = admit(if from < last { from } else { last }).await;
        bytes_sent += load(image.clone(), from, true, permit).await?;
        Ok(LoadReport {
            layers_sent: last - skip,
            layers_skipped: skip,
            bytes_sent,
            elapsed: started.elapsed(),
        })
    }

    /// Removes intermediate images a killed install left behind (labelled
    /// [`INTERMEDIATE_LABEL`]; stowage alone makes them). The caller holds
    /// the apps lock, so no load of this root is running. Returns how many
    /// were removed.
    pub async fn remove_intermediate_images(&self) -> Result<usize, DockerError> {
        let filters = HashMap::from([("label", vec![INTERMEDIATE_LABEL])]);
        let images = self
            .client
            .list_images(Some(
                ListImagesOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(self.api_error("list its intermediate images"))?;
        let mut removed = 0;
        for image in images {
            self.remove_image(&image.id).await?;
            removed += 1;
        }
        Ok(removed)
    }

    /// One `POST /images/load` of `image` less its first `skip` layers;
    /// the bytes sent. With `check`, the image must be there afterwards.
    async fn load_archive(
        &self,
        image: &ImageToLoad,
        skip: usize,
        options: &LoadOptions,
        check: bool,
    ) -> Result<u64, DockerError> {
        self.load_archive_held(image, skip, options, check, None)
            .await
    }

    /// [`Self::load_archive`], the archive's last bytes held until
    /// `hold_tail` says (see [`stream_archive`]).
    async fn load_archive_held(
        &self,
        image: &ImageToLoad,
        skip: usize,
        options: &LoadOptions,
        check: bool,
        hold_tail: Option<Arc<TailGate>>,
    ) -> Result<u64, DockerError> {
        let name = image_name(image);
        let started = Instant::now();
        let (body, producer) = stream_archive(image, skip, options, hold_tail.clone());
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
        // The engine answered (or went away): an archive still held back
        // will not end now; its writer stops.
        if let Some(tail) = &hold_tail {
            tail.abandon();
        }
        tracing::debug!(
            "load of {name} (layers {skip}..) answered in {} ms",
            started.elapsed().as_millis()
        );
        let produced = producer.await.map_err(|e| DockerError::InvalidImage {
            image: name.clone(),
            reason: format!("the archive writer stopped: {e}"),
        })?;
        let bytes_sent = match produced {
            // A layer that failed its checks is the cause, whatever the engine said.
            Err(ArchiveError::Layer(e)) => return Err(e),
            Err(ArchiveError::Abandoned) => {
                return Err(DockerError::LoadRefused {
                    image: name,
                    message: engine_error
                        .unwrap_or_else(|| "install gave it up before its archive ended".into()),
                });
            }
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
        if check
            && self
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
        Ok(bytes_sent)
    }
}

/// Gives a held archive up when dropped (after it opened, nothing).
struct AbandonOnDrop(Arc<TailGate>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// The image store `DriverStatus` (pairs of name and value) describes:
/// containerd's when a `driver-type` names its snapshotter plugin type
/// (`[["driver-type", "io.containerd.snapshotter.v1"]]` on Docker 26).
fn image_store_of(driver_status: &[Vec<String>]) -> ImageStore {
    let containerd = driver_status.iter().any(|pair| {
        matches!(pair.as_slice(), [name, value]
            if name.eq_ignore_ascii_case("driver-type")
                && value.starts_with(CONTAINERD_SNAPSHOTTER_DRIVER_TYPE))
    });
    if containerd {
        ImageStore::Containerd
    } else {
        ImageStore::GraphDriver
    }
}

/// The label of the intermediate images a layer-by-layer load makes; its
/// value is the image they lead to.
pub const INTERMEDIATE_LABEL: &str = "org.stowage.intermediate";

/// The config of the intermediate image holding the first `layers` layers
/// of `image` (same architecture and OS, no history), and its image ID.
/// The label naming the final image keeps its ID apart from any image a
/// user has.
fn intermediate_config(
    image: &ImageToLoad,
    layers: usize,
) -> Result<(Vec<u8>, Digest), DockerError> {
    let invalid = |reason: String| DockerError::InvalidImage {
        image: image_name(image),
        reason,
    };
    let full: serde_json::Value = serde_json::from_slice(&image.config)
        .map_err(|e| invalid(format!("its config is not JSON: {e}")))?;
    let mut config = serde_json::Map::new();
    for key in ["architecture", "os", "variant", "os.version"] {
        if let Some(value) = full.get(key) {
            config.insert(key.to_string(), value.clone());
        }
    }
    config.insert(
        "config".into(),
        serde_json::json!({
            "Labels": { INTERMEDIATE_LABEL: image.config_digest.to_string() }
        }),
    );
    config.insert(
        "rootfs".into(),
        serde_json::json!({
            "type": "layers",
            "diff_ids": image.layers[..layers]
                .iter()
                .map(|l| l.diff_id.to_string())
                .collect::<Vec<_>>(),
        }),
    );
    let bytes = serde_json::to_vec(&serde_json::Value::Object(config))
        .map_err(|e| invalid(e.to_string()))?;
    let id = Digest::of(&bytes);
    Ok((bytes, id))
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_containerd_image_store_is_told_from_the_driver_status() {
        let pairs = |list: &[(&str, &str)]| -> Vec<Vec<String>> {
            list.iter()
                .map(|(a, b)| vec![a.to_string(), b.to_string()])
                .collect()
        };
        // Docker 26.1 with the containerd-snapshotter feature.
        assert_eq!(
            image_store_of(&pairs(&[("driver-type", "io.containerd.snapshotter.v1")])),
            ImageStore::Containerd
        );
        // Docker 20.10 and 26.1 on overlay2.
        assert_eq!(
            image_store_of(&pairs(&[
                ("Backing Filesystem", "extfs"),
                ("Supports d_type", "true"),
                ("Native Overlay Diff", "true"),
            ])),
            ImageStore::GraphDriver
        );
        assert_eq!(image_store_of(&[]), ImageStore::GraphDriver);
        assert_eq!(
            image_store_of(&[vec!["driver-type".into()]]),
            ImageStore::GraphDriver
        );
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
}
