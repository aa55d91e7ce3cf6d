//! What the refs reach, and removing the rest.
//!
//! The walk starts at every entry of `index.json` (named or not) and follows,
//! in every manifest or index it can read, the descriptors under `config`,
//! `layers`, `manifests`, `blobs` and `subject`, plus the bundle index named
//! by the `org.foundries.app.bundle.index.digest` annotation (FORMAT.md) and
//! the Docker manifest an OCI form names in `org.stowage.source.manifest.digest`. A
//! blob that is missing (an app fetched for one architecture only, or a
//! partial pull) is still counted as reachable and simply not followed.
//!
//! Prune deletes only what the walk did not reach and the caller did not name
//! in `extra_roots`; a manifest it cannot read makes it fail rather than guess,
//! since deleting too little is always safe. The caller holds the store lock
//! exclusive, so no pull is adding blobs meanwhile.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;

use serde_json::Value;

use super::ingest::checkpoint_digest;
use super::layout::read_index;
use super::{JSON_BLOB_CAP, Result, Store, StoreError};
use crate::Digest;
use crate::fsutil::{TEMP_PREFIX, fsync_dir};
use crate::oci::format::{BUNDLE_INDEX_DIGEST, SOURCE_MANIFEST_ANNOTATION};
use crate::oci::media;

/// What a prune removed (or, in a dry run, would remove).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub dry_run: bool,
    /// Blobs no ref reaches, with their lengths.
    pub removed: Vec<(Digest, u64)>,
    /// Bytes of those blobs.
    pub freed_bytes: u64,
    /// Partial downloads of blobs nothing wants, with the bytes they held.
    pub stale_ingests_removed: Vec<(Digest, u64)>,
    /// Bytes of those partial downloads.
    pub stale_ingest_bytes: u64,
    /// Blobs kept.
    pub kept: usize,
}

/// The result of walking the refs.
#[derive(Default)]
pub(crate) struct Walk {
    pub reachable: HashSet<Digest>,
    /// The size each reached blob was declared with (the first one seen).
    pub declared_sizes: HashMap<Digest, u64>,
    /// Present manifests that could not be read, with why.
    pub unreadable: Vec<(Digest, StoreError)>,
}

/// How a walk treats a manifest it cannot read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnUnreadable {
    Fail,
    Record,
}

pub(crate) fn reachable(store: &Store) -> Result<HashSet<Digest>> {
    Ok(walk(store, &HashSet::new(), OnUnreadable::Fail)?.reachable)
}

/// Walks from `index.json` and from `extra_roots`. A blob whose media type
/// is unknown (an extra root, a descriptor without one) is followed when its
/// own `mediaType` field names a manifest or index.
pub(crate) fn walk(
    store: &Store,
    extra_roots: &HashSet<Digest>,
    on_unreadable: OnUnreadable,
) -> Result<Walk> {
    walk_refs(store, extra_roots, on_unreadable, &|_| true)
}

/// [`walk`] from only the named refs `follow` accepts (unnamed entries of
/// `index.json` are always followed).
fn walk_refs(
    store: &Store,
    extra_roots: &HashSet<Digest>,
    on_unreadable: OnUnreadable,
    follow: &dyn Fn(&str) -> bool,
) -> Result<Walk> {
    let index = read_index(&store.index_path())?;
    let mut walk = Walk::default();
    // (digest, media type if known, declared size if known)
    let mut pending: Vec<(Digest, Option<String>, Option<u64>)> = index
        .manifests
        .into_iter()
        .filter(|d| d.ref_name().is_none_or(follow))
        .map(|d| (d.digest, Some(d.media_type), Some(d.size)))
        .collect();
    pending.extend(extra_roots.iter().map(|d| (d.clone(), None, None)));

    while let Some((digest, media_type, size)) = pending.pop() {
        if let Some(size) = size {
            walk.declared_sizes.entry(digest.clone()).or_insert(size);
        }
        if !walk.reachable.insert(digest.clone()) {
            continue;
        }
        let worth_reading = match &media_type {
            Some(mt) => media::is_manifest(mt),
            // Unknown: peek only at what could be a manifest.
            None => store.size(&digest).is_some_and(|s| s <= JSON_BLOB_CAP),
        };
        if !worth_reading || !store.has(&digest) {
            continue;
        }
        let parsed = store.read_capped(&digest, JSON_BLOB_CAP).and_then(|bytes| {
            serde_json::from_slice::<Value>(&bytes).map_err(|e| StoreError::BadManifest {
                digest: digest.clone(),
                reason: format!("not JSON: {e}"),
            })
        });
        let doc = match parsed {
            Ok(doc) => doc,
            // A blob of unknown type that is not JSON is simply a leaf.
            Err(_) if media_type.is_none() => continue,
            Err(e) => match on_unreadable {
                OnUnreadable::Fail => return Err(e),
                OnUnreadable::Record => {
                    walk.unreadable.push((digest, e));
                    continue;
                }
            },
        };
        if media_type.is_none()
            && !doc
                .get("mediaType")
                .and_then(Value::as_str)
                .is_some_and(media::is_manifest)
        {
            continue;
        }
        children(&doc, &mut pending);
    }
    Ok(walk)
}

/// The descriptors a manifest or index points at.
fn children(doc: &Value, out: &mut Vec<(Digest, Option<String>, Option<u64>)>) {
    let mut push = |desc: &Value| {
        let Some(digest) = desc
            .get("digest")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Digest>().ok())
        else {
            return;
        };
        if let Some(bundle_index) = annotated_digest(desc, BUNDLE_INDEX_DIGEST) {
            out.push((bundle_index, Some("application/json".into()), None));
        }
        // Without a media type, the blob's own `mediaType` field decides.
        let media_type = desc
            .get("mediaType")
            .and_then(Value::as_str)
            .map(str::to_string);
        out.push((digest, media_type, desc.get("size").and_then(Value::as_u64)));
    };
    for key in ["config", "subject"] {
        if let Some(desc) = doc.get(key) {
            push(desc);
        }
    }
    for key in ["layers", "manifests", "blobs"] {
        if let Some(list) = doc.get(key).and_then(Value::as_array) {
            list.iter().for_each(&mut push);
        }
    }
    // Without a media type: the walk peeks at it, and follows it as the
    // manifest it is.
    if let Some(source) = annotated_digest(doc, SOURCE_MANIFEST_ANNOTATION) {
        out.push((source, None, None));
    }
}

/// The digest an annotation of `value` (a descriptor or a manifest) names.
fn annotated_digest(value: &Value, key: &str) -> Option<Digest> {
    value.get("annotations")?.get(key)?.as_str()?.parse().ok()
}

impl Store {
    /// The blobs reachable from the named refs `follow` accepts (unnamed
    /// entries are always followed) and from `extra_roots`: what would stay
    /// needed if the other refs were removed. A manifest it cannot read
    /// makes it fail.
    pub fn reachable_from(
        &self,
        follow: &dyn Fn(&str) -> bool,
        extra_roots: &HashSet<Digest>,
    ) -> Result<HashSet<Digest>> {
        Ok(walk_refs(self, extra_roots, OnUnreadable::Fail, follow)?.reachable)
    }

    /// Removes every blob that neither the refs nor `extra_roots` reach, and
    /// every partial download of a blob they do not reach. A dry run only
    /// reports. The caller holds [`super::LockMode::Exclusive`].
    pub fn prune(&self, dry_run: bool, extra_roots: &HashSet<Digest>) -> Result<PruneReport> {
        let keep = walk(self, extra_roots, OnUnreadable::Fail)?.reachable;
        let mut report = PruneReport {
            dry_run,
            ..PruneReport::default()
        };
        for (digest, size) in self.list()? {
            if keep.contains(&digest) {
                report.kept += 1;
                continue;
            }
            if !dry_run {
                let path = self.blob_path(&digest);
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(StoreError::io(&path, e)),
                }
            }
            report.freed_bytes += size;
            report.removed.push((digest, size));
        }
        for status in self.ingests()? {
            if keep.contains(&status.digest) {
                continue;
            }
            if !dry_run {
                match self.abort(&status.digest) {
                    Ok(_) => {}
                    // Someone is writing it right now: not stale after all.
                    Err(StoreError::IngestBusy { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            report.stale_ingest_bytes += status.offset;
            report
                .stale_ingests_removed
                .push((status.digest, status.offset));
        }
        if !dry_run {
            self.remove_leftovers()?;
            if !report.removed.is_empty() {
                fsync_dir(&self.blobs_dir).map_err(|e| StoreError::io(&self.blobs_dir, e))?;
            }
        }
        Ok(report)
    }

    /// Removes temporary files of interrupted writes and checkpoints whose
    /// data file is gone. Only safe under the exclusive lock.
    pub(crate) fn remove_leftovers(&self) -> Result<usize> {
        let mut removed = 0;
        for dir in [&self.ingest_dir, &self.layout_dir, &self.blobs_dir] {
            for entry in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
                let entry = entry.map_err(|e| StoreError::io(dir, e))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let orphan_checkpoint = dir == &self.ingest_dir
                    && checkpoint_digest(name)
                        .is_some_and(|d| !self.ingest_dir.join(d.hex()).exists());
                if name.starts_with(TEMP_PREFIX) || orphan_checkpoint {
                    let path = entry.path();
                    match fs::remove_file(&path) {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(StoreError::io(&path, e)),
                    }
                }
            }
        }
        Ok(removed)
    }
}
