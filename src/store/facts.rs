//! What stowage measured of its stored layers, kept beside the blobs in
//! `ROOT/layer-facts.json`: a layer's real footprint (tar size, usage per
//! block size, inodes) as install measured it while streaming it into
//! Docker. A blob's content never changes, so neither do these figures: a
//! later check or install plans with them instead of what a publisher
//! declared. Entries whose blob is no longer stored are dropped on the next
//! write. The file is a cache of facts: a missing or unreadable one is
//! empty, and it is replaced atomically and durably.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::Digest;
use crate::fsutil::write_atomic;
use crate::oci::format::LayerMeta;

use super::{Result, Store, StoreError};

/// The file, under the store's root.
pub const FACTS_FILE: &str = "layer-facts.json";

/// Largest facts file read (about 300 bytes a layer).
const FACTS_CAP: u64 = 64 << 20;

impl Store {
    fn facts_path(&self) -> PathBuf {
        self.root.join(FACTS_FILE)
    }

    /// The measured figures of stored layers, by blob digest.
    pub fn layer_facts(&self) -> BTreeMap<Digest, LayerMeta> {
        let path = self.facts_path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            return BTreeMap::new();
        };
        if !meta.is_file() || meta.len() > FACTS_CAP {
            return BTreeMap::new();
        }
        std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Adds `measured` (by blob digest) to the facts.
    pub fn record_layer_facts(&self, measured: BTreeMap<Digest, LayerMeta>) -> Result<()> {
        if measured.is_empty() {
            return Ok(());
        }
        let mut facts = self.layer_facts();
        facts.extend(measured);
        facts.retain(|digest, _| self.has(digest));
        let path = self.facts_path();
        let bytes = serde_json::to_vec(&facts).map_err(|e| StoreError::BrokenLayout {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &bytes).map_err(|e| StoreError::io(&path, e))
    }
}
