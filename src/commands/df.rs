//! `stowage df`: where the device's disk goes, like `docker system df`.
//!
//! Per store: the blob store (blocks allocated to committed blobs and to
//! partial downloads), Docker's images (the engine's own figure, and the
//! share stowage loaded) and the apps directory (blocks of the extracted
//! bundles). Per app: its stored blobs (shared blobs count for every app
//! that uses them), its images' unpacked layers on Docker's volume (from the
//! publisher's layers-meta figures for that volume's block size, each layer
//! once per app) and its directory. Per volume (paths grouped by `st_dev`):
//! size, used and free. Reads only; takes the store lock shared.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use crate::Digest;
use crate::app::stored::list_apps;
use crate::engine::docker::DockerEngine;
use crate::engine::record::Installed;
use crate::oci::format::{self, AppManifest};
use crate::plan::space::Volume;
use crate::store::{LockMode, Store};

#[derive(Debug, Clone, Serialize)]
pub struct AppUsage {
    pub name: String,
    pub reference: String,
    pub installed: bool,
    /// Bytes of the app's blobs in the store.
    pub store_bytes: u64,
    /// The app's unpacked layers on Docker's volume (0 when not installed).
    pub docker_bytes: u64,
    /// Blocks of its extracted directory.
    pub dir_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreUsage {
    /// "blob store", "docker images" or "apps directory".
    pub store: String,
    pub path: PathBuf,
    pub bytes: u64,
    /// Blobs, images or app directories.
    pub items: u64,
    /// What stowage owns of it: partial downloads in the blob store, images
    /// stowage loaded in Docker's store.
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeUsage {
    pub paths: Vec<PathBuf>,
    pub block_size: u64,
    pub size: u64,
    pub used: u64,
    pub free: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DfReport {
    pub apps: Vec<AppUsage>,
    pub stores: Vec<StoreUsage>,
    pub volumes: Vec<VolumeUsage>,
    pub notes: Vec<String>,
}

/// Measures the device; `engine` is `None` when Docker is unreachable (its
/// figures are then left out and a note says so).
pub async fn df(
    root: &Path,
    store: &Store,
    engine: Option<&DockerEngine>,
    architecture: &str,
) -> Result<DfReport> {
    let _lock = store.lock_async(LockMode::Shared).await?;
    let state = Installed::load(root)?;
    let apps_dir = root.join("apps");
    let mut notes = Vec::new();

    let mut data_root = None;
    let mut images = None;
    if let Some(engine) = engine {
        match (engine.info().await, engine.image_disk_usage().await) {
            (Ok(info), Ok(usage)) => {
                data_root = Some(info.data_root);
                images = Some(usage);
            }
            (Err(e), _) | (_, Err(e)) => notes.push(format!("Docker is not reachable: {e}")),
        }
    } else {
        notes.push("Docker is not reachable: its figures are left out".into());
    }
    let docker_block = data_root
        .as_deref()
        .and_then(|p| Volume::of(p).ok())
        .map_or(format::DEFAULT_BLOCK_SIZE, |v| v.block_size);

    let mut apps = Vec::new();
    for app in list_apps(store)? {
        let record = state.apps.get(&app.name);
        let installed = record.is_some_and(|r| r.reference == app.reference);
        let docker_bytes = if installed {
            app_docker_bytes(store, &app, architecture, docker_block).unwrap_or(0)
        } else {
            0
        };
        let dir_bytes = if installed {
            du(&apps_dir.join(&app.name))
        } else {
            0
        };
        apps.push(AppUsage {
            name: app.name.clone(),
            reference: app.reference.clone(),
            installed,
            store_bytes: app.stored_bytes,
            docker_bytes,
            dir_bytes,
        });
    }

    let usage = store.disk_usage()?;
    let mut stores = vec![StoreUsage {
        store: "blob store".into(),
        path: store.layout_dir().to_path_buf(),
        bytes: usage.blob_allocated_bytes + usage.ingest_allocated_bytes,
        items: usage.blobs,
        detail: format!(
            "{} partial downloads, {} bytes allocated",
            usage.ingests, usage.ingest_allocated_bytes
        ),
    }];
    if let (Some(images), Some(data_root)) = (&images, &data_root) {
        let owned: BTreeSet<&Digest> = state.owned_images.keys().collect();
        let ours: Vec<_> = images
            .images
            .iter()
            .filter(|i| owned.contains(&i.id))
            .collect();
        stores.push(StoreUsage {
            store: "docker images".into(),
            path: data_root.clone(),
            bytes: images.total_bytes,
            items: images.images.len() as u64,
            detail: format!(
                "{} loaded by stowage ({} bytes of their own)",
                ours.len(),
                ours.iter()
                    .map(|i| i.size.saturating_sub(i.shared_size.unwrap_or(0)))
                    .sum::<u64>()
            ),
        });
    }
    let dirs = std::fs::read_dir(&apps_dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .count() as u64
        })
        .unwrap_or(0);
    stores.push(StoreUsage {
        store: "apps directory".into(),
        path: apps_dir.clone(),
        bytes: du(&apps_dir),
        items: dirs,
        detail: format!("{} installed apps", state.apps.len()),
    });

    let mut volumes: BTreeMap<u64, VolumeUsage> = BTreeMap::new();
    let mut paths = vec![store.layout_dir().to_path_buf(), apps_dir];
    paths.extend(data_root);
    for path in paths {
        let volume = Volume::of(&path)?;
        let used = rustix::fs::statvfs(existing(&path))
            .map(|v| {
                let frsize = if v.f_frsize > 0 {
                    v.f_frsize
                } else {
                    v.f_bsize
                };
                (v.f_blocks - v.f_bfree) * frsize
            })
            .unwrap_or(0);
        volumes
            .entry(volume.dev)
            .or_insert_with(|| VolumeUsage {
                paths: Vec::new(),
                block_size: volume.block_size,
                size: volume.total_bytes,
                used,
                free: volume.free_bytes,
            })
            .paths
            .push(path);
    }
    Ok(DfReport {
        apps,
        stores,
        volumes: volumes.into_values().collect(),
        notes,
    })
}

/// The usage of the app's distinct layers on a volume of `block_size`
/// blocks, from its stored layers-meta (FORMAT.md's fallback without one).
fn app_docker_bytes(
    store: &Store,
    app: &crate::app::stored::StoredApp,
    architecture: &str,
    block_size: u64,
) -> Result<u64> {
    let manifest = AppManifest::parse(
        &store.read_capped(&app.digest, format::APP_MANIFEST_CAP)?,
        &app.reference,
    )?;
    let mut meta = BTreeMap::new();
    if let Some(desc) = manifest.layers_meta() {
        let mut all =
            format::parse_layers_meta(&store.read_capped(&desc.digest, format::MANIFEST_CAP)?)?;
        let arch = format::Arch::parse(architecture).architecture;
        meta = all.remove(&arch).map(|a| a.layers).unwrap_or_default();
    }
    let mut seen = BTreeSet::new();
    let mut bytes = 0;
    for image in &app.images {
        for (desc, _) in &image.layers {
            if seen.insert(desc.digest.clone()) {
                bytes += match meta.get(&desc.digest) {
                    Some(m) => m.usage_for_block_size(block_size),
                    None => format::fallback_usage(desc.size),
                };
            }
        }
    }
    Ok(bytes)
}

fn existing(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    while !p.exists() && p.pop() {}
    p
}

/// Blocks allocated under `path` (files, directories, links), like `du`.
fn du(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut bytes = meta.blocks() * 512;
    if meta.is_dir()
        && let Ok(entries) = std::fs::read_dir(path)
    {
        for entry in entries.flatten() {
            bytes += du(&entry.path());
        }
    }
    bytes
}

/// `stowage df`'s settings.
pub struct DfOptions {
    pub arch: Option<String>,
    pub docker_host: Option<String>,
}

impl DfOptions {
    /// Docker's figures are left out, with a note, when it cannot be reached.
    pub async fn run(self, ctx: &super::Context) -> Result<DfReport> {
        let store = ctx.store()?;
        let engine = ctx.engine(self.docker_host.as_deref()).await.ok();
        let arch = ctx.arch(self.arch.as_deref())?;
        df(&ctx.root, &store, engine.as_ref(), &arch).await
    }
}
