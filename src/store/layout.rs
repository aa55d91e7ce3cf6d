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

use serde::Deserialize;

pub const OCI_LAYOUT_FILE: &str = "oci-layout";
pub const INDEX_FILE: &str = "index.json";
/// The largest `index.json` read (about 300 bytes a ref).
const INDEX_CAP: u64 = 64 << 20;
pub const OCI_LAYOUT_VERSION: &str = "1.0.0";

/// Descriptors are the wire format's, which keeps unknown fields verbatim.
pub use crate::oci::format::Descriptor;

/// A named entry of `index.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct RefEntry {
    pub name: String,
    pub descriptor: Descriptor,
}

/// `index.json` is an OCI image index.
pub(crate) use crate::oci::format::ImageIndex;

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
    let bytes = super::read_regular_capped(path, INDEX_CAP)?;
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
        let again: serde_json::Value = serde_json::from_slice(&index.to_bytes().unwrap()).unwrap();
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
