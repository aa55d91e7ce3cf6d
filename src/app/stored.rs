//! Apps as the device's blob store holds them: read back from `index.json`
//! refs and the stored blobs, with no network. `ls`, `rm`, `install` and the
//! prune of Docker images all start here.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::Digest;
use crate::app::compose_file::ComposeFile;
use crate::oci::format::SOURCE_MANIFEST_ANNOTATION;
use crate::oci::format::{self, AppManifest, Descriptor, ImageConfig, ImageManifest};
use crate::oci::reference::ImageRef;
use crate::store::{FsckReport, LockMode, PruneReport, Store};

/// One service image of a stored app.
#[derive(Debug, Clone, Serialize)]
pub struct StoredImage {
    pub service: String,
    pub pinned: String,
    /// The per-architecture manifest the pin's ref points at, when stored.
    pub manifest: Option<Descriptor>,
    pub config: Option<Descriptor>,
    /// Layers in order with their diff_ids.
    pub layers: Vec<(Descriptor, Digest)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoredApp {
    pub name: String,
    pub reference: String,
    pub digest: Digest,
    pub compose_file: String,
    pub images: Vec<StoredImage>,
    /// Blobs the app needs that the store lacks (after fsck moved a corrupt
    /// one aside, say): the app is partial until a pull fetches them again.
    pub missing: Vec<Digest>,
    /// Bytes of the app's blobs present in the store.
    pub stored_bytes: u64,
}

impl StoredApp {
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }
}

/// Every app named in the store.
pub fn list_apps(store: &Store) -> Result<Vec<StoredApp>> {
    let mut apps = Vec::new();
    for entry in store.refs()? {
        if entry.descriptor.media_type != crate::oci::media::OCI_MANIFEST {
            continue;
        }
        if let Some(app) = load_app(store, &entry.name, &entry.descriptor.digest)? {
            apps.push(app);
        }
    }
    Ok(apps)
}

/// The stored apps that `name_or_ref` names: an app name (all its
/// versions), a full reference, or a digest.
pub fn find_apps(store: &Store, name_or_ref: &str) -> Result<Vec<StoredApp>> {
    Ok(list_apps(store)?
        .into_iter()
        .filter(|a| {
            a.name == name_or_ref
                || a.reference == name_or_ref
                || a.digest.to_string() == name_or_ref
        })
        .collect())
}

/// Bytes of an app's stored blobs, each blob counted once however many of
/// its images share it.
#[derive(Default)]
struct StoredBytes {
    counted: HashSet<Digest>,
    total: u64,
}

impl StoredBytes {
    fn add(&mut self, digest: &Digest, size: u64) {
        if self.counted.insert(digest.clone()) {
            self.total += size;
        }
    }
}

/// Reads the app that ref `name` points at, or `None` when the manifest is
/// an image, not an app.
pub fn load_app(store: &Store, ref_name: &str, digest: &Digest) -> Result<Option<StoredApp>> {
    let mut missing = Vec::new();
    let mut stored_bytes = StoredBytes::default();
    let present = |d: &Digest, missing: &mut Vec<Digest>, bytes: &mut StoredBytes| -> bool {
        match store.size(d) {
            Some(n) => {
                bytes.add(d, n);
                true
            }
            None => {
                missing.push(d.clone());
                false
            }
        }
    };
    if !present(digest, &mut missing, &mut stored_bytes) {
        return Ok(None);
    }
    let bytes = store.read_capped(digest, format::APP_MANIFEST_CAP)?;
    let Ok(manifest) = AppManifest::parse(&bytes, ref_name) else {
        return Ok(None);
    };
    let reference: ImageRef = ref_name
        .parse()
        .with_context(|| format!("the store's ref {ref_name:?} is not a reference"))?;
    // The bundle index, named in the bundle's annotations, is the app's too.
    // (The layer indexes of `manifests` are optional and not needed: a
    // pull stores only its own architecture's, when the registry has it.)
    let bundle_index = manifest.bundle_index(ref_name).ok().flatten();
    for d in std::iter::once(&manifest.config)
        .chain(manifest.layers.iter())
        .chain(bundle_index.iter())
    {
        present(&d.digest, &mut missing, &mut stored_bytes);
    }
    let bundle = manifest.bundle().clone();
    let mut compose_file = String::new();
    let mut images = Vec::new();
    if store.has(&bundle.digest) {
        let file = store.open_blob(&bundle.digest)?;
        let (name, compose_bytes) = crate::app::bundle::read_compose_from_bundle(
            file,
            &crate::app::bundle::BundleLimits::default(),
        )
        .with_context(|| format!("the stored bundle of {ref_name}"))?;
        let compose =
            ComposeFile::parse(Path::new(&name), &String::from_utf8_lossy(&compose_bytes))?;
        compose_file = name;
        for (service, pinned) in compose.images(&|_| None)? {
            images.push(load_image(
                store,
                service,
                pinned,
                &mut missing,
                &mut stored_bytes,
            )?);
        }
    }
    Ok(Some(StoredApp {
        name: reference.short_name().to_string(),
        reference: ref_name.to_string(),
        digest: digest.clone(),
        compose_file,
        images,
        missing,
        stored_bytes: stored_bytes.total,
    }))
}

fn load_image(
    store: &Store,
    service: String,
    pinned: String,
    missing: &mut Vec<Digest>,
    stored_bytes: &mut StoredBytes,
) -> Result<StoredImage> {
    let mut image = StoredImage {
        service,
        pinned,
        manifest: None,
        config: None,
        layers: Vec::new(),
    };
    let Some(desc) = store.get_ref(&image.pinned)? else {
        // Not named yet: the pull that fetches it names it.
        if let Some(d) = image.pinned.split('@').nth(1).and_then(|d| d.parse().ok()) {
            missing.push(d);
        }
        return Ok(image);
    };
    let desc = Descriptor::new(&desc.media_type, desc.digest.clone(), desc.size);
    if !store.has(&desc.digest) {
        missing.push(desc.digest.clone());
        return Ok(image);
    }
    stored_bytes.add(&desc.digest, desc.size);
    let manifest: ImageManifest = format::parse_json(
        &store.read_capped(&desc.digest, format::MANIFEST_CAP)?,
        &format!("manifest of {}", image.pinned),
    )?;
    // The Docker manifest an OCI form was made from is kept beside it. An
    // app does not need it to install, so its absence does not make the app
    // partial.
    if let Some(served) = manifest
        .annotations
        .get(SOURCE_MANIFEST_ANNOTATION)
        .and_then(|d| d.parse::<Digest>().ok())
        && let Some(n) = store.size(&served)
    {
        stored_bytes.add(&served, n);
    }
    image.manifest = Some(desc);
    let config_digest = manifest.config.digest.clone();
    if !store.has(&config_digest) {
        missing.push(config_digest);
        return Ok(image);
    }
    stored_bytes.add(&config_digest, manifest.config.size);
    let config: ImageConfig = format::parse_json(
        &store.read_capped(&config_digest, format::MANIFEST_CAP)?,
        &format!("config of {}", image.pinned),
    )?;
    image.config = Some(manifest.config.clone());
    for (layer, diff_id) in manifest.layers.into_iter().zip(config.rootfs.diff_ids) {
        match store.size(&layer.digest) {
            Some(n) => stored_bytes.add(&layer.digest, n),
            None => missing.push(layer.digest.clone()),
        }
        image.layers.push((layer, diff_id));
    }
    Ok(image)
}

// The store's housekeeping: each takes the store lock it needs, shared to
// read, exclusive to delete.

pub fn ls(store: &Store) -> Result<Vec<StoredApp>> {
    let _lock = store.lock(LockMode::Shared)?;
    list_apps(store)
}

#[derive(Debug, Serialize)]
pub struct RmReport {
    pub forgotten: Vec<String>,
}

/// Forgets the apps `name_or_ref` names, and the image refs no other app
/// still uses. Their blobs go at the next prune.
pub fn rm(store: &Store, name_or_ref: &str) -> Result<RmReport> {
    let _lock = store.lock(LockMode::Exclusive)?;
    let doomed = find_apps(store, name_or_ref)?;
    if doomed.is_empty() {
        bail!("no stored app is named {name_or_ref:?} (see `stowage ls`)");
    }
    let kept: Vec<StoredApp> = list_apps(store)?
        .into_iter()
        .filter(|a| !doomed.iter().any(|d| d.reference == a.reference))
        .collect();
    for app in &doomed {
        store.remove_ref(&app.reference)?;
        for image in &app.images {
            let still_used = kept
                .iter()
                .any(|k| k.images.iter().any(|i| i.pinned == image.pinned));
            if !still_used {
                store.remove_ref(&image.pinned)?;
            }
        }
    }
    Ok(RmReport {
        forgotten: doomed.into_iter().map(|a| a.reference).collect(),
    })
}

pub fn prune(store: &Store, dry_run: bool) -> Result<PruneReport> {
    let _lock = store.lock(LockMode::Exclusive)?;
    Ok(store.prune(dry_run, &Default::default())?)
}

pub fn fsck(store: &Store, quick: bool) -> Result<FsckReport> {
    let _lock = store.lock(LockMode::Exclusive)?;
    Ok(store.fsck(quick)?)
}
