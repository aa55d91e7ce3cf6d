//! Where a device reads a TUF repository: the OCI registry that holds the
//! apps, or an export's `tuf/` directory. Both answer tough through
//! [`TufTransport`], which also serves the files the device already verified
//! (the versioned snapshot and targets, the target files named by hash) from
//! its own copies, so that a poll that finds nothing new asks the network for
//! the next root and the timestamp only.
//!
//! In a registry each repository file is an OCI artifact in the repository
//! the device follows: an image manifest (artifactType
//! [`METADATA_ARTIFACT`], empty config) at a tag named after the file
//! (`timestamp.json`, `3.root.json`, `7.targets.json`; a target file
//! `HASH.NAME` at `target-HASH`) whose one layer is the file. The layer's
//! bytes are also embedded in its descriptor (`data`, OCI 1.1) when small,
//! so one manifest request fetches a file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde::Deserialize;
use tough::{Transport, TransportError, TransportErrorKind, TransportStream};
use url::Url;

use crate::Digest;
use crate::oci::format::{self, Descriptor};
use crate::oci::media;
use crate::oci::reference::ImageRef;
use crate::oci::registry::{RegistryClient, RegistryError};
use crate::update::tuf::METADATA_CAP;

pub const METADATA_ARTIFACT: &str = "application/vnd.stowage.tuf.v1";
pub const FILE_MEDIA_TYPE: &str = "application/vnd.stowage.tuf.file.v1+json";
pub const TUF_ANNOTATION: &str = "stowage-tuf";
/// Files up to this size are embedded in their manifest.
pub const EMBED_LIMIT: u64 = 512 * 1024;

const SCHEME: &str = "stowage-tuf";

/// The base URL tough is given for metadata.
pub fn metadata_url() -> Url {
    // A constant that parses.
    Url::parse(&format!("{SCHEME}:///metadata/")).unwrap_or_else(|_| unreachable!())
}

/// The base URL tough is given for target files.
pub fn targets_url() -> Url {
    Url::parse(&format!("{SCHEME}:///targets/")).unwrap_or_else(|_| unreachable!())
}

/// One file of a TUF repository, by the name tough asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoFile {
    /// `root.json`, `N.root.json`, `timestamp.json`, `N.snapshot.json`, ...
    Metadata(String),
    /// A target file as consistent snapshots name it: `SHA256HEX.NAME`.
    Target { sha256: String, name: String },
}

/// Target names are kept to what a tag and a file name both allow.
pub fn valid_target_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl RepoFile {
    pub fn metadata(name: &str) -> Option<RepoFile> {
        let (version, role) = match name.split_once('.') {
            Some((v, rest)) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                (Some(v), rest)
            }
            _ => (None, name),
        };
        let role = role.strip_suffix(".json")?;
        if !matches!(role, "root" | "timestamp" | "snapshot" | "targets") {
            return None;
        }
        if version.is_some_and(|v| v.len() > 19) {
            return None;
        }
        Some(RepoFile::Metadata(name.to_string()))
    }

    pub fn target(file: &str) -> Option<RepoFile> {
        let (sha256, name) = file.split_once('.')?;
        let hex = sha256.len() == 64
            && sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        (hex && valid_target_name(name)).then(|| RepoFile::Target {
            sha256: sha256.to_string(),
            name: name.to_string(),
        })
    }

    /// The file a tough URL names.
    pub fn from_url(url: &Url) -> Option<RepoFile> {
        if url.scheme() != SCHEME {
            return None;
        }
        let path = url.path();
        if let Some(name) = path.strip_prefix("/metadata/") {
            RepoFile::metadata(name)
        } else if let Some(name) = path.strip_prefix("/targets/") {
            RepoFile::target(name)
        } else {
            None
        }
    }

    /// Its file name.
    pub fn file_name(&self) -> String {
        match self {
            RepoFile::Metadata(name) => name.clone(),
            RepoFile::Target { sha256, name } => format!("{sha256}.{name}"),
        }
    }

    /// Its path in a repository directory (`metadata/...`, `targets/...`).
    pub fn path(&self) -> PathBuf {
        match self {
            RepoFile::Metadata(name) => Path::new("metadata").join(name),
            RepoFile::Target { .. } => Path::new("targets").join(self.file_name()),
        }
    }

    /// The tag it is stored under in a registry.
    pub fn tag(&self) -> String {
        match self {
            RepoFile::Metadata(name) => name.clone(),
            RepoFile::Target { sha256, .. } => format!("target-{sha256}"),
        }
    }

    /// Files named by version or hash never change: a verified copy may be
    /// served again. The timestamp and roots are always asked for.
    fn immutable(&self) -> bool {
        match self {
            RepoFile::Metadata(name) => {
                name.as_bytes().first().is_some_and(u8::is_ascii_digit)
                    && !name.ends_with("root.json")
            }
            RepoFile::Target { .. } => true,
        }
    }
}

/// Why a file could not be read from where the repository is.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{what} is larger than the {cap}-byte limit")]
    TooLarge { what: String, cap: u64 },
    #[error("{0}")]
    Other(String),
}

/// Where a repository's files are.
#[derive(Clone)]
pub enum Source {
    /// The registry repository `repo` (tag and digest ignored).
    Registry {
        client: Arc<RegistryClient>,
        repo: ImageRef,
    },
    /// A directory with `metadata/` and `targets/` (an export's `tuf/`, or a
    /// repository as the release engineer keeps it).
    Dir(PathBuf),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

#[derive(Deserialize)]
struct FileManifest {
    layers: Vec<Descriptor>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::Registry { repo, .. } => repo.name(),
            Source::Dir(dir) => dir.display().to_string(),
        }
    }

    /// The file's bytes, `None` when the repository has no such file.
    pub async fn get(&self, file: &RepoFile) -> Result<Option<Vec<u8>>, FetchError> {
        match self {
            Source::Registry { client, repo } => get_from_registry(client, repo, file).await,
            Source::Dir(dir) => {
                let path = dir.join(file.path());
                let what = path.display().to_string();
                crate::fsutil::blocking(move || read_capped_file(&path, &what)).await
            }
        }
    }
}

fn read_capped_file(path: &Path, what: &str) -> Result<Option<Vec<u8>>, FetchError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FetchError::Other(format!("cannot open {what}: {e}"))),
    };
    let meta = file
        .metadata()
        .map_err(|e| FetchError::Other(format!("cannot stat {what}: {e}")))?;
    if !meta.is_file() {
        return Err(FetchError::Other(format!("{what} is not a regular file")));
    }
    if meta.len() > METADATA_CAP {
        return Err(FetchError::TooLarge {
            what: what.to_string(),
            cap: METADATA_CAP,
        });
    }
    let mut bytes = Vec::new();
    file.take(METADATA_CAP + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FetchError::Other(format!("cannot read {what}: {e}")))?;
    if bytes.len() as u64 > METADATA_CAP {
        return Err(FetchError::TooLarge {
            what: what.to_string(),
            cap: METADATA_CAP,
        });
    }
    Ok(Some(bytes))
}

fn registry_error(e: RegistryError) -> FetchError {
    match e {
        RegistryError::TooLarge { what, cap, .. } => FetchError::TooLarge { what, cap },
        other => FetchError::Other(other.to_string()),
    }
}

async fn get_from_registry(
    client: &RegistryClient,
    repo: &ImageRef,
    file: &RepoFile,
) -> Result<Option<Vec<u8>>, FetchError> {
    let at = ImageRef {
        tag: Some(file.tag()),
        digest: None,
        ..repo.clone()
    };
    let fetched = match client
        .get_manifest(&at, &[media::OCI_MANIFEST], METADATA_CAP)
        .await
    {
        Ok(m) => m,
        Err(RegistryError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(registry_error(e)),
    };
    let what = format!("TUF file {} ({at})", file.file_name());
    let manifest: FileManifest =
        format::parse_json(&fetched.bytes, &what).map_err(|e| FetchError::Other(e.to_string()))?;
    if manifest.annotations.get(TUF_ANNOTATION).map(String::as_str) != Some("v1") {
        return Err(FetchError::Other(format!(
            "{what} is not a stowage TUF file (no {TUF_ANNOTATION}: v1 annotation)"
        )));
    }
    let [layer] = manifest.layers.as_slice() else {
        return Err(FetchError::Other(format!(
            "{what} has not exactly one layer"
        )));
    };
    if layer.size > METADATA_CAP {
        return Err(FetchError::TooLarge {
            what,
            cap: METADATA_CAP,
        });
    }
    if let Some(serde_json::Value::String(data)) = layer.extra.get("data") {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| FetchError::Other(format!("{what}: embedded data: {e}")))?;
        if bytes.len() as u64 != layer.size || Digest::of(&bytes) != layer.digest {
            return Err(FetchError::Other(format!(
                "{what}: the embedded data does not match its descriptor"
            )));
        }
        return Ok(Some(bytes));
    }
    let bytes = client
        .get_blob(&at, &layer.digest, layer.size, METADATA_CAP)
        .await
        .map_err(registry_error)?;
    Ok(Some(bytes))
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct FileManifestOut {
    schema_version: u32,
    media_type: &'static str,
    artifact_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
    annotations: std::collections::BTreeMap<String, String>,
}

/// Stores `bytes` as the repository file `file` in the registry repository
/// `repo`: its blob, then the manifest at the file's tag (the file
/// embedded when small).
pub async fn push_file(
    client: &RegistryClient,
    repo: &ImageRef,
    file: &RepoFile,
    bytes: &[u8],
) -> Result<(), RegistryError> {
    let at = ImageRef {
        tag: Some(file.tag()),
        digest: None,
        ..repo.clone()
    };
    let config = Descriptor::of(media::EMPTY, format::EMPTY_CONFIG);
    client
        .push_blob(&at, &config.digest, format::EMPTY_CONFIG.to_vec().into())
        .await?;
    let mut layer = Descriptor::of(FILE_MEDIA_TYPE, bytes);
    layer.annotations.insert(
        "org.opencontainers.image.title".to_string(),
        file.file_name(),
    );
    if bytes.len() as u64 <= EMBED_LIMIT {
        layer.extra.insert(
            "data".to_string(),
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
        );
    }
    client
        .push_blob(&at, &layer.digest, bytes.to_vec().into())
        .await?;
    let manifest = FileManifestOut {
        schema_version: 2,
        media_type: media::OCI_MANIFEST,
        artifact_type: METADATA_ARTIFACT,
        config,
        layers: vec![layer],
        annotations: [(TUF_ANNOTATION.to_string(), "v1".to_string())].into(),
    };
    let manifest = format::to_json(&manifest).map_err(|e| RegistryError::Protocol {
        host: at.registry.clone(),
        what: format!("the manifest of {}", file.file_name()),
        message: e.to_string(),
    })?;
    client
        .push_manifest(&at, media::OCI_MANIFEST, &manifest)
        .await?;
    Ok(())
}

/// A file read from the source, and its bytes.
pub type FetchedFile = (RepoFile, Vec<u8>);

/// A tough transport over a [`Source`], serving immutable files from the
/// device's verified copies in `cache` and keeping what it fetched in
/// `fetched` (saved by the client only once the metadata verified).
#[derive(Clone)]
pub struct TufTransport {
    pub source: Source,
    pub cache: Option<PathBuf>,
    pub fetched: Arc<Mutex<Vec<FetchedFile>>>,
    /// Requests that went to the source (for the benchmark and the status).
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for TufTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TufTransport({})", self.source.describe())
    }
}

impl TufTransport {
    pub fn new(source: Source, cache: Option<PathBuf>) -> TufTransport {
        TufTransport {
            source,
            cache,
            fetched: Arc::default(),
            requests: Arc::default(),
        }
    }

    async fn get(&self, file: &RepoFile) -> Result<Option<Vec<u8>>, FetchError> {
        if file.immutable()
            && let Some(cache) = &self.cache
        {
            let path = cache.join(file.file_name());
            let what = path.display().to_string();
            let cached = crate::fsutil::blocking(move || read_capped_file(&path, &what)).await;
            if let Ok(Some(bytes)) = cached {
                return Ok(Some(bytes));
            }
        }
        if let Ok(mut requests) = self.requests.lock() {
            requests.push(file.file_name());
        }
        let bytes = self.source.get(file).await?;
        if let Some(bytes) = &bytes
            && file.immutable()
            && let Ok(mut fetched) = self.fetched.lock()
        {
            fetched.push((file.clone(), bytes.clone()));
        }
        Ok(bytes)
    }
}

#[tough::async_trait]
impl Transport for TufTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        let Some(file) = RepoFile::from_url(&url) else {
            return Err(TransportError::new(
                TransportErrorKind::UnsupportedUrlScheme,
                url,
            ));
        };
        match self.get(&file).await {
            Ok(Some(bytes)) => {
                let chunk: Result<bytes::Bytes, TransportError> = Ok(bytes.into());
                Ok(Box::pin(futures_util::stream::iter([chunk])))
            }
            Ok(None) => Err(TransportError::new(TransportErrorKind::FileNotFound, url)),
            Err(e) => Err(TransportError::new_with_cause(
                TransportErrorKind::Other,
                url,
                e,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_map_to_tags_and_paths() {
        let f = RepoFile::from_url(&metadata_url().join("3.root.json").unwrap()).unwrap();
        assert_eq!(f, RepoFile::Metadata("3.root.json".into()));
        assert_eq!(f.tag(), "3.root.json");
        assert!(!f.immutable());
        let ts = RepoFile::metadata("timestamp.json").unwrap();
        assert!(!ts.immutable());
        assert!(RepoFile::metadata("12.targets.json").unwrap().immutable());
        assert!(RepoFile::metadata("evil.json").is_none());
        assert!(RepoFile::metadata("../root.json").is_none());
        let hex = "a".repeat(64);
        let t = RepoFile::from_url(&targets_url().join(&format!("{hex}.prod")).unwrap()).unwrap();
        assert_eq!(t.tag(), format!("target-{hex}"));
        assert_eq!(t.path(), Path::new("targets").join(format!("{hex}.prod")));
        assert!(RepoFile::target("abc.prod").is_none());
        assert!(RepoFile::target(&format!("{hex}.a/b")).is_none());
        assert!(RepoFile::from_url(&Url::parse("file:///metadata/root.json").unwrap()).is_none());
    }
}
