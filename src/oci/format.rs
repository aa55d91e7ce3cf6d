//! The Compose App wire format (see FORMAT.md): the app manifest, the
//! layers-meta blob, the per-architecture layer index and the bundle index.
//!
//! Everything here is pure data. Serialisation is deterministic (struct field
//! order, sorted maps, no timestamps) so that publishing the same project twice
//! yields the same app digest. Parsing refuses what a device must not trust:
//! oversized manifests, a missing bundle, malformed digests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::oci::media;

/// The annotation that marks a manifest as a compose app.
pub const APP_ANNOTATION: &str = "compose-app";
/// The annotation that marks the layers-meta descriptor.
pub const LAYERS_META_ANNOTATION: &str = "layers-meta";
pub const BUNDLE_INDEX_DIGEST: &str = "org.foundries.app.bundle.index.digest";
pub const BUNDLE_INDEX_SIZE: &str = "org.foundries.app.bundle.index.size";
pub const LAYER_INDEX_ANNOTATION: &str = "compose-app-layers";
/// The OCI image layout annotation naming a ref in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation on the OCI form of an image that a registry served as a Docker
/// manifest, naming that manifest: the digest an app's compose file pins, so
/// it is kept beside the OCI form and must survive a prune too.
pub const SOURCE_MANIFEST_ANNOTATION: &str = "org.stowage.source.manifest.digest";

/// Readers cap the app manifest at 50 KiB (FORMAT.md).
pub const APP_MANIFEST_CAP: u64 = 50 * 1024;
/// Image manifests, indexes and configs are capped at 4 MiB.
pub const MANIFEST_CAP: u64 = 4 * 1024 * 1024;
/// The block sizes for which publish records usage.
pub const BLOCK_SIZES: [u64; 4] = [1024, 4096, 16384, 65536];
/// The block size of the plain `usage` figure.
pub const DEFAULT_BLOCK_SIZE: u64 = 4096;

/// The empty JSON object used as the app manifest's config.
pub const EMPTY_CONFIG: &[u8] = b"{}";

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{what} is {size} bytes, over the {cap}-byte limit")]
    TooLarge { what: String, size: u64, cap: u64 },
    #[error("{what} is not valid JSON of the expected shape: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0} is not a compose app: {1}")]
    NotAnApp(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Every other field (urls, artifactType, ...), kept verbatim so that a
    /// descriptor read and written again (in `index.json`) loses nothing.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            platform: None,
            annotations: BTreeMap::new(),
            extra: serde_json::Map::new(),
        }
    }

    /// The ref name of an `index.json` entry, if it has one.
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations.get(REF_NAME).map(String::as_str)
    }

    pub fn of(media_type: &str, bytes: &[u8]) -> Descriptor {
        Descriptor::new(media_type, Digest::of(bytes), bytes.len() as u64)
    }
}

/// The app manifest: an OCI image manifest whose `layers` are the bundle and
/// the layers-meta blob, and whose optional `manifests` name layer indexes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppManifest {
    pub schema_version: u32,
    pub media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifests: Vec<Descriptor>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl AppManifest {
    /// Parses app manifest bytes, refusing anything over the 50 KiB cap or
    /// lacking the `compose-app` annotation or a bundle.
    pub fn parse(bytes: &[u8], what: &str) -> Result<AppManifest, FormatError> {
        check_cap(what, bytes.len() as u64, APP_MANIFEST_CAP)?;
        let manifest: AppManifest = parse_json(bytes, what)?;
        if manifest.annotations.get(APP_ANNOTATION).map(String::as_str) != Some("v1") {
            return Err(FormatError::NotAnApp(
                what.to_string(),
                "the manifest lacks the annotation compose-app: v1".into(),
            ));
        }
        if manifest.layers.is_empty() {
            return Err(FormatError::NotAnApp(
                what.to_string(),
                "the manifest has no bundle layer".into(),
            ));
        }
        // A bundle index is optional (legacy apps, APP_BUNDLE_INDEX_OFF=1),
        // but one named badly is refused.
        manifest.bundle_index(what)?;
        Ok(manifest)
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        to_json(self)
    }

    pub fn bundle(&self) -> &Descriptor {
        // parse() guarantees at least one layer; a hand-built manifest
        // always has the bundle first.
        &self.layers[0]
    }

    /// The bundle index descriptor, read from the bundle's annotations:
    /// `None` when the bundle has neither annotation (an app published with
    /// `APP_BUNDLE_INDEX_OFF=1`, or by the legacy publisher), an error when
    /// only one is there or either is malformed.
    pub fn bundle_index(&self, what: &str) -> Result<Option<Descriptor>, FormatError> {
        let bundle = self.layers.first().ok_or_else(|| {
            FormatError::NotAnApp(what.to_string(), "the manifest has no bundle layer".into())
        })?;
        let digest = bundle.annotations.get(BUNDLE_INDEX_DIGEST);
        let size = bundle.annotations.get(BUNDLE_INDEX_SIZE);
        if digest.is_none() && size.is_none() {
            return Ok(None);
        }
        let digest = digest.and_then(|d| d.parse::<Digest>().ok());
        let size = size.and_then(|s| s.parse::<u64>().ok());
        match (digest, size) {
            (Some(digest), Some(size)) => {
                Ok(Some(Descriptor::new(media::LAYERS_META, digest, size)))
            }
            _ => Err(FormatError::NotAnApp(
                what.to_string(),
                "the bundle lacks a valid bundle index annotation".into(),
            )),
        }
    }

    /// The layers-meta descriptor: `layers[1]` when annotated
    /// `layers-meta: v1` (where Foundries' readers look), else the first
    /// layer so annotated.
    pub fn layers_meta(&self) -> Option<&Descriptor> {
        let is_meta = |d: &&Descriptor| {
            d.annotations
                .get(LAYERS_META_ANNOTATION)
                .map(String::as_str)
                == Some("v1")
        };
        self.layers
            .get(1)
            .filter(is_meta)
            .or_else(|| self.layers.iter().find(is_meta))
    }

    pub fn layer_index_for(&self, architecture: &str) -> Option<&Descriptor> {
        self.manifests
            .iter()
            .find(|d| d.platform.as_ref().map(|p| p.architecture.as_str()) == Some(architecture))
    }
}

/// Per-layer metadata in the layers-meta blob. The first three keys are the
/// Foundries format; the rest are stowage's extensions, which older readers
/// ignore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    pub size: u64,
    pub usage: u64,
    pub archive_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tar_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inodes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_by_block_size: Option<BTreeMap<u64, u64>>,
}

impl LayerMeta {
    /// Disk bytes the unpacked layer takes on a volume with `block_size`
    /// blocks (see [`usage_for_block_size`]); the plain `usage` when the
    /// publisher recorded no per-block-size figures.
    pub fn usage_for_block_size(&self, block_size: u64) -> u64 {
        match &self.usage_by_block_size {
            Some(map) if !map.is_empty() => usage_for_block_size(map, block_size),
            _ => self.usage,
        }
    }
}

/// The recorded usage for `block_size`, or for the next larger recorded
/// size (a safe over-estimate); above the largest, that figure scaled up by
/// the ratio of block sizes. 0 for an empty map.
pub fn usage_for_block_size(map: &BTreeMap<u64, u64>, block_size: u64) -> u64 {
    if let Some((_, &bytes)) = map.range(block_size..).next() {
        return bytes;
    }
    match map.iter().next_back() {
        Some((&largest, &bytes)) if largest > 0 => {
            let scaled = u128::from(bytes) * u128::from(block_size).div_ceil(u128::from(largest));
            u64::try_from(scaled).unwrap_or(u64::MAX)
        }
        _ => 0,
    }
}

/// The sha256 of empty content: what composectl's bundle index gives a
/// symlink or a hard link (their tar entries have no body).
pub const EMPTY_SHA256: &str =
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The FORMAT.md rule for a layer an app's layers-meta does not describe.
pub fn fallback_usage(archive_size: u64) -> u64 {
    archive_size.saturating_mul(5)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchLayers {
    pub fs_block_size: u64,
    pub layers: BTreeMap<Digest, LayerMeta>,
}

/// The layers-meta blob: per architecture, per compressed layer digest.
pub type LayersMeta = BTreeMap<String, ArchLayers>;

pub fn parse_layers_meta(bytes: &[u8]) -> Result<LayersMeta, FormatError> {
    check_cap("layers-meta", bytes.len() as u64, MANIFEST_CAP)?;
    parse_json(bytes, "layers-meta")
}

/// The per-architecture layer index: every layer of the app's images for one
/// architecture, de-duplicated and sorted by digest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerIndex {
    pub schema_version: u32,
    pub media_type: String,
    pub platform: Platform,
    pub layers: Vec<Descriptor>,
    pub annotations: BTreeMap<String, String>,
}

impl LayerIndex {
    pub fn new(architecture: &str, mut layers: Vec<Descriptor>) -> LayerIndex {
        layers.sort_by(|a, b| a.digest.cmp(&b.digest));
        layers.dedup_by(|a, b| a.digest == b.digest);
        LayerIndex {
            schema_version: 2,
            media_type: media::OCI_INDEX.to_string(),
            platform: Platform {
                architecture: architecture.to_string(),
                os: String::new(),
                variant: None,
            },
            layers,
            annotations: BTreeMap::from([(LAYER_INDEX_ANNOTATION.to_string(), "v1".to_string())]),
        }
    }
}

/// The bundle index: every regular file of the bundle and its digest.
pub type BundleIndex = BTreeMap<String, Digest>;

pub fn parse_bundle_index(bytes: &[u8]) -> Result<BundleIndex, FormatError> {
    check_cap("bundle index", bytes.len() as u64, MANIFEST_CAP)?;
    parse_json(bytes, "bundle index")
}

/// A single-platform image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index or Docker manifest list; also the store's `index.json`.
/// Fields stowage does not know are kept verbatim, so that an entry written
/// by another tool survives a rewrite.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ImageIndex {
    /// An OCI index naming nothing.
    pub fn empty() -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: Some(media::OCI_INDEX.to_string()),
            manifests: Vec::new(),
            extra: serde_json::Map::new(),
        }
    }

    /// Parses an index of schema version 2; the error is a reason to show
    /// after the file's name.
    pub fn parse(bytes: &[u8]) -> Result<ImageIndex, String> {
        let index: ImageIndex = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if index.schema_version != 2 {
            return Err(format!(
                "schemaVersion is {}, expected 2",
                index.schema_version
            ));
        }
        Ok(index)
    }

    /// Pretty JSON with a final newline. An error, never empty bytes, when
    /// it cannot be serialised: an empty file must never replace an index.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        Ok(bytes)
    }
}

/// The parts of an image config stowage reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

pub fn check_cap(what: &str, size: u64, cap: u64) -> Result<(), FormatError> {
    if size > cap {
        return Err(FormatError::TooLarge {
            what: what.to_string(),
            size,
            cap,
        });
    }
    Ok(())
}

pub fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<T, FormatError> {
    serde_json::from_slice(bytes).map_err(|source| FormatError::Json {
        what: what.to_string(),
        source,
    })
}

/// Compact JSON with the field order of the structs: the exact bytes pushed.
/// An error, never empty bytes, when a value cannot be serialised.
pub fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(value)
}

/// The architecture a device runs, as a registry platform names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arch {
    pub architecture: String,
    pub variant: Option<String>,
}

impl Arch {
    /// The device's architecture from the kernel's machine name.
    pub fn from_machine(machine: &str) -> Option<Arch> {
        let (architecture, variant) = match machine {
            "x86_64" | "amd64" => ("amd64", None),
            "aarch64" | "arm64" => ("arm64", None),
            "armv7l" | "armv7" => ("arm", Some("v7")),
            "armv6l" => ("arm", Some("v6")),
            "i686" | "i386" => ("386", None),
            "riscv64" => ("riscv64", None),
            "ppc64le" => ("ppc64le", None),
            "s390x" => ("s390x", None),
            _ => return None,
        };
        Some(Arch {
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        })
    }

    pub fn detect() -> Option<Arch> {
        let uname = rustix::system::uname();
        Arch::from_machine(&uname.machine().to_string_lossy())
    }

    /// Parses `amd64`, `arm64`, `arm/v7` as given on the command line.
    pub fn parse(s: &str) -> Arch {
        match s.split_once('/') {
            Some((a, v)) => Arch {
                architecture: a.to_string(),
                variant: Some(v.to_string()),
            },
            None => Arch {
                architecture: s.to_string(),
                variant: None,
            },
        }
    }

    /// Whether an index entry's platform serves this architecture.
    pub fn matches(&self, platform: &Platform) -> bool {
        if platform.architecture != self.architecture {
            return false;
        }
        if !platform.os.is_empty() && platform.os != "linux" {
            return false;
        }
        match (&self.variant, &platform.variant) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.variant {
            Some(v) => write!(f, "{}/{}", self.architecture, v),
            None => f.write_str(&self.architecture),
        }
    }
}

pub fn round_up(bytes: u64, block: u64) -> u64 {
    if block == 0 {
        return bytes;
    }
    bytes.div_ceil(block).saturating_mul(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    #[test]
    fn layer_index_is_sorted_and_deduplicated() {
        let index = LayerIndex::new(
            "arm64",
            vec![
                Descriptor::new(media::DOCKER_LAYER_GZIP, d('b'), 2),
                Descriptor::new(media::DOCKER_LAYER_GZIP, d('a'), 1),
                Descriptor::new(media::DOCKER_LAYER_GZIP, d('b'), 2),
            ],
        );
        let digests: Vec<_> = index.layers.iter().map(|l| l.digest.clone()).collect();
        assert_eq!(digests, vec![d('a'), d('b')]);
        let json = String::from_utf8(to_json(&index).unwrap()).unwrap();
        assert!(json.starts_with(r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","platform":{"architecture":"arm64"}"#), "{json}");
    }

    #[test]
    fn layers_meta_keeps_block_sizes_in_numeric_order() {
        let meta = LayerMeta {
            size: 1,
            usage: 4096,
            archive_size: 1,
            diff_id: None,
            tar_size: None,
            entries: None,
            inodes: None,
            usage_by_block_size: Some(BTreeMap::from([
                (65536, 65536),
                (1024, 1024),
                (4096, 4096),
                (16384, 16384),
            ])),
        };
        let json = String::from_utf8(to_json(&meta).unwrap()).unwrap();
        assert!(
            json.contains(
                r#""usage_by_block_size":{"1024":1024,"4096":4096,"16384":16384,"65536":65536}"#
            ),
            "{json}"
        );
        let back: LayerMeta = serde_json::from_str(&json).unwrap();
        assert_eq!(back, meta);
        assert_eq!(meta.usage_for_block_size(2048), 4096);
        assert_eq!(meta.usage_for_block_size(131072), 131072);
    }

    #[test]
    fn an_oversized_app_manifest_is_refused() {
        let big = vec![b' '; (APP_MANIFEST_CAP + 1) as usize];
        assert!(matches!(
            AppManifest::parse(&big, "app"),
            Err(FormatError::TooLarge { .. })
        ));
    }

    #[test]
    fn kernel_machine_names_map_to_registry_architectures() {
        assert_eq!(Arch::from_machine("x86_64").unwrap().to_string(), "amd64");
        assert_eq!(Arch::from_machine("aarch64").unwrap().to_string(), "arm64");
        assert_eq!(Arch::from_machine("armv7l").unwrap().to_string(), "arm/v7");
    }
}
