//! The OCI image layout's own files: `oci-layout` and `index.json`, and the
//! descriptors they hold.
//!
//! `index.json` is the store's list of names (refs): each entry is a
//! descriptor annotated with `org.opencontainers.image.ref.name`, which is
//! what `skopeo ... oci:ROOT/store:NAME` looks up. Fields this module does not
//! know (platform, urls, other annotations) are kept as they were, so that an
//! entry written by another tool survives our rewrites. The file is only ever
//! replaced whole, atomically and durably.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const OCI_LAYOUT_FILE: &str = "oci-layout";
pub const INDEX_FILE: &str = "index.json";
pub const OCI_LAYOUT_VERSION: &str = "1.0.0";

/// The annotation that names an `index.json` entry.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Annotation on an app bundle's layer descriptor naming its bundle index
/// blob (FORMAT.md); the index is part of the app and must survive a prune.
pub const BUNDLE_INDEX_ANNOTATION: &str = "org.foundries.app.bundle.index.digest";
/// Annotation on the OCI form of an image that a registry served as a Docker
/// manifest, naming that manifest: the digest an app's compose file pins, so
/// it is kept beside the OCI form and must survive a prune too.
pub const SOURCE_MANIFEST_ANNOTATION: &str = "org.stowage.source.manifest.digest";

pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// Media types whose blobs are JSON documents pointing at other blobs.
pub fn is_manifest_media_type(media_type: &str) -> bool {
    matches!(
        media_type,
        MEDIA_TYPE_OCI_INDEX
            | MEDIA_TYPE_OCI_MANIFEST
            | MEDIA_TYPE_DOCKER_MANIFEST
            | MEDIA_TYPE_DOCKER_LIST
    )
}

/// Descriptors are the wire format's, which keeps unknown fields verbatim.
pub use crate::oci::format::Descriptor;

/// A named entry of `index.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct RefEntry {
    pub name: String,
    pub descriptor: Descriptor,
}

/// `index.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ImageIndex {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ImageIndex {
    pub fn empty() -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_OCI_INDEX.to_string()),
            manifests: Vec::new(),
            extra: Map::new(),
        }
    }

    /// Parses `index.json`; the error is a reason to show after the path.
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

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain data into memory cannot fail.
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }
}

/// Checks the `oci-layout` marker file's content.
pub(crate) fn check_oci_layout(bytes: &[u8]) -> Result<(), String> {
    #[derive(Deserialize)]
    struct OciLayout {
        #[serde(rename = "imageLayoutVersion")]
        version: String,
    }
    let layout: OciLayout = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if layout.version != OCI_LAYOUT_VERSION {
        return Err(format!(
            "imageLayoutVersion is {:?}, expected {OCI_LAYOUT_VERSION:?}",
            layout.version
        ));
    }
    Ok(())
}

pub(crate) fn oci_layout_bytes() -> Vec<u8> {
    format!("{{\"imageLayoutVersion\":\"{OCI_LAYOUT_VERSION}\"}}\n").into_bytes()
}

/// A ref name as the OCI layout grammar allows it: components of
/// alphanumerics joined by `-._:@+` (or `--`), separated by `/`.
pub fn is_valid_ref_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    name.split('/').all(|component| {
        let bytes = component.as_bytes();
        let is_sep = |b: u8| matches!(b, b'-' | b'.' | b'_' | b':' | b'@' | b'+');
        !bytes.is_empty()
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || is_sep(b))
            // A separator is one character, except the double dash.
            && !bytes.windows(2).any(|w| {
                is_sep(w[0]) && is_sep(w[1]) && !(w[0] == b'-' && w[1] == b'-')
            })
    })
}

/// Reads and parses `index.json` at `path`.
pub(crate) fn read_index(path: &Path) -> Result<ImageIndex, super::StoreError> {
    let bytes = std::fs::read(path).map_err(|e| super::StoreError::io(path, e))?;
    ImageIndex::parse(&bytes).map_err(|reason| super::StoreError::BrokenLayout {
        path: path.to_path_buf(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names_follow_the_oci_grammar() {
        for good in [
            "app",
            "shellhttpd:v1",
            "apps/shellhttpd@sha256-abc",
            "a--b",
            "v1.0+x",
        ] {
            assert!(is_valid_ref_name(good), "{good} refused");
        }
        for bad in [
            "", "/a", "a/", "a//b", ":a", "a:", "a..b", "a b", "../x", "a\nb",
        ] {
            assert!(!is_valid_ref_name(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn unknown_index_fields_survive_a_round_trip() {
        let text = r#"{"schemaVersion":2,"annotations":{"k":"v"},"manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json",
             "digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
             "size":2,"platform":{"architecture":"arm64","os":"linux"},
             "annotations":{"org.opencontainers.image.ref.name":"x"}}]}"#;
        let index = ImageIndex::parse(text.as_bytes()).unwrap();
        let again: Value = serde_json::from_slice(&index.to_bytes()).unwrap();
        assert_eq!(again["annotations"]["k"], "v");
        assert_eq!(again["manifests"][0]["platform"]["architecture"], "arm64");
        assert_eq!(index.manifests[0].ref_name(), Some("x"));
    }

    #[test]
    fn an_index_that_is_not_an_index_is_refused() {
        assert!(ImageIndex::parse(b"not json").is_err());
        assert!(ImageIndex::parse(br#"{"schemaVersion":1,"manifests":[]}"#).is_err());
        assert!(
            ImageIndex::parse(
                br#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:../../etc","size":1}]}"#
            )
            .is_err()
        );
    }
}
