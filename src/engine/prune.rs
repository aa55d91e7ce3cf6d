//! The Docker side of prune ([`prune_docker`]): it takes the apps lock (see
//! `record`), and removes only images stowage loaded that no installed app
//! references and no container uses.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::Digest;
use crate::engine::docker::DockerEngine;
use crate::engine::record::{self, APPS_LOCK_TIMEOUT, Installed};

/// An image the Docker side of prune removed or would remove.
#[derive(Debug, Clone, Serialize)]
pub struct PrunedImage {
    pub image_id: Digest,
    pub tags: Vec<String>,
    /// Bytes of layers no other image shares, as the engine reports them.
    pub bytes: u64,
}

/// An image stowage loaded that no installed app needs, kept because a
/// container uses it.
#[derive(Debug, Clone, Serialize)]
pub struct KeptImage {
    pub image_id: Digest,
    pub tags: Vec<String>,
    pub containers: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DockerPruneReport {
    pub dry_run: bool,
    pub removed: Vec<PrunedImage>,
    pub kept_in_use: Vec<KeptImage>,
    /// Bytes the engine's image store shrank by (measured before and after;
    /// in a dry run, the sum of the removed images' own bytes).
    pub freed_bytes: u64,
}

/// The Docker side of prune: removes the images stowage loaded that no
/// installed app references and no container (running or not) uses. Only
/// stowage's own tags are removed, so an image a user also tagged survives
/// (and stops being stowage's); images stowage did not load are never
/// touched. Holds the apps lock, so it never races an install.
pub async fn prune_docker(
    root: &Path,
    engine: &DockerEngine,
    dry_run: bool,
) -> Result<DockerPruneReport> {
    prune_docker_keeping(root, engine, dry_run, &BTreeSet::new()).await
}

/// Like [`prune_docker`], also keeping the images in `keep` (the update's
/// rollback copy, which is stored but not installed).
pub async fn prune_docker_keeping(
    root: &Path,
    engine: &DockerEngine,
    dry_run: bool,
    keep: &BTreeSet<Digest>,
) -> Result<DockerPruneReport> {
    let _apps_lock = record::lock_apps_async(root, APPS_LOCK_TIMEOUT).await?;
    let mut state = Installed::load(root)?;
    if !dry_run {
        // Left by a killed layer-by-layer load; they hold nothing an app needs.
        engine.remove_intermediate_images().await?;
    }
    let mut referenced = state.referenced_images();
    referenced.extend(keep.iter().cloned());
    let before = engine.image_disk_usage().await?;
    let own_bytes = |id: &Digest| {
        before
            .images
            .iter()
            .find(|i| &i.id == id)
            .map_or(0, |i| i.size.saturating_sub(i.shared_size.unwrap_or(0)))
    };
    let mut report = DockerPruneReport {
        dry_run,
        removed: Vec::new(),
        kept_in_use: Vec::new(),
        freed_bytes: 0,
    };
    let owned: Vec<(Digest, BTreeSet<String>)> = state
        .owned_images
        .iter()
        .map(|(id, tags)| (id.clone(), tags.clone()))
        .collect();
    for (id, tags) in owned {
        if referenced.contains(&id) {
            continue;
        }
        if engine.image_exists(&id.to_string()).await?.is_none() {
            // Loaded once, gone since (removed by hand, or a load that never finished).
            state.owned_images.remove(&id);
            continue;
        }
        let containers = engine.containers_using(&id).await?;
        if !containers.is_empty() {
            report.kept_in_use.push(KeptImage {
                image_id: id,
                tags: tags.into_iter().collect(),
                containers,
            });
            continue;
        }
        let bytes = own_bytes(&id);
        if !dry_run {
            for tag in &tags {
                engine.remove_image(tag).await?;
            }
            // Still there: someone else tagged it too, so it is theirs now.
            state.owned_images.remove(&id);
        }
        report.removed.push(PrunedImage {
            image_id: id,
            tags: tags.into_iter().collect(),
            bytes,
        });
    }
    // Tags stowage put on other people's images: removed only where the
    // image keeps another name, so that untagging never deletes it.
    let referenced_tags = state.referenced_tags();
    let foreign: Vec<(String, Digest)> = state
        .foreign_tags
        .iter()
        .map(|(t, d)| (t.clone(), d.clone()))
        .collect();
    for (tag, id) in foreign {
        if referenced_tags.contains(&tag) {
            continue;
        }
        match engine.image_exists(&tag).await? {
            Some(image) if image.id == id => {
                if image.repo_tags.iter().any(|t| t != &tag) && !dry_run {
                    engine.remove_image(&tag).await?;
                    state.foreign_tags.remove(&tag);
                }
            }
            _ => {
                if !dry_run {
                    state.foreign_tags.remove(&tag);
                }
            }
        }
    }
    if !dry_run {
        state.save(root)?;
        let after = engine.image_disk_usage().await?;
        report.freed_bytes = before.total_bytes.saturating_sub(after.total_bytes);
    } else {
        report.freed_bytes = report.removed.iter().map(|i| i.bytes).sum();
    }
    Ok(report)
}
