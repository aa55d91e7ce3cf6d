//! `stowage install NAME|REF`: turn an app fetched into the blob store into
//! one Docker can run, with no network.
//!
//! Steps, in this order, so that a refusal changes nothing and a crash at any
//! point is finished by running install again:
//! 1. Take the store lock shared (a prune cannot delete the blobs being
//!    read) and the apps lock (one command at a time changes Docker's side),
//!    and remove extraction directories a killed install left behind.
//! 2. Ask the engine which images it has (by image ID = config digest) and
//!    which layer chains it holds; plan with the fit check of `check`: the
//!    Docker data root's volume must hold the usage of every layer not held
//!    plus the engine's temporary copy of the largest archive, and the apps
//!    directory the extracted bundle. Not fitting stops here with
//!    [`DoesNotFit`](crate::plan::DoesNotFit) (exit 100), before anything is written.
//! 3. Extract the verified bundle into `ROOT/apps/<name>` (atomically, see
//!    `bundle::extract_bundle`) unless the marker there already names this
//!    app digest; then write the marker.
//! 4. Record the app and the images stowage is about to load in
//!    `ROOT/state/installed.json` (before loading: see `record`).
//! 5. Load each missing image, streaming its stored layers uncompressed and
//!    leaving out the chains the engine holds, under a local tag
//!    (`docker::local_tag_for`); tag present images that lack that tag.
//! 6. Write the compose override mapping every service to its local tag.
//!
//! Images the engine already has are never loaded again, so installing an
//! app twice, or after a crash, only does what is left. The same function
//! restores an installed app whose images Docker lost ([`verify_installed`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::Digest;
use crate::app::bundle::{BundleLimits, STAGING_PREFIX, Verify, extract_bundle};
use crate::app::stored::{StoredApp, find_apps};
use crate::app::{App, LayerNeed, ServiceImage};
use crate::engine::compose::write_image_override;
use crate::engine::docker::{
    Allowance, DockerEngine, ImageToLoad, LayerSource, LoadOptions, LoadReport, SpaceGuard,
    local_tag_for,
};
use crate::engine::record::{
    self, APPS_LOCK_TIMEOUT, BUNDLE_MARKER, Installed, InstalledApp, InstalledImage, OVERRIDE_FILE,
};
use crate::fsutil::STATE_FILE_MODE;
use crate::fsutil::beneath::Dir;
use crate::oci::format::{self, AppManifest, LayerMeta};
use crate::plan::held::HeldLayers;
use crate::plan::space::Policy;
use crate::plan::{CheckReport, DockerView, Paths, UpdatePlan, check_update, refuse_unless_fits};
use crate::progress::Progress;
use crate::store::{LockMode, Store};

/// Where install works: the root, its store, and the engine.
#[derive(Clone, Copy)]
pub struct Device<'a> {
    pub root: &'a Path,
    pub store: &'a Store,
    pub engine: &'a DockerEngine,
}

#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// The device architecture, to read the layers-meta figures.
    pub architecture: String,
    pub policy: Policy,
    pub load: LoadOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageAction {
    /// Loaded from the blob store.
    Loaded,
    /// The engine had it under its local tag already.
    Present,
    /// The engine had it (same image ID) and stowage added its local tag.
    Tagged,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageInstall {
    pub services: Vec<String>,
    pub tags: Vec<String>,
    pub image_id: Digest,
    pub action: ImageAction,
    pub layers: usize,
    pub layers_sent: usize,
    pub layers_skipped: usize,
    pub bytes_sent: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstallReport {
    pub name: String,
    pub reference: String,
    pub dir: PathBuf,
    pub bundle_extracted: bool,
    pub images: Vec<ImageInstall>,
    /// The fit check, when there was something to write.
    pub check: Option<CheckReport>,
}

impl InstallReport {
    pub fn layers_sent(&self) -> usize {
        self.images.iter().map(|i| i.layers_sent).sum()
    }
}

/// Installs the stored app `name_or_ref` (see the module comment).
pub async fn install(
    device: Device<'_>,
    name_or_ref: &str,
    options: &InstallOptions,
    progress: &dyn Progress,
) -> Result<InstallReport> {
    let _store_lock = device.store.lock_async(LockMode::Shared).await?;
    let _apps_lock = record::lock_apps_async(device.root, APPS_LOCK_TIMEOUT).await?;
    let mut state = Installed::load(device.root)?;
    let app = resolve_app(device.store, &state, name_or_ref)?;
    install_locked(device, &mut state, &app, options, progress).await
}

/// The one stored app `name_or_ref` names: a reference or digest, or a name;
/// when several stored versions share the name, the installed one.
pub fn resolve_app(store: &Store, state: &Installed, name_or_ref: &str) -> Result<StoredApp> {
    let mut found = find_apps(store, name_or_ref)?;
    if found.is_empty() {
        bail!("no stored app is named {name_or_ref:?}: pull it first (`stowage pull REF`)");
    }
    if found.len() > 1 {
        let installed = state.apps.get(name_or_ref).map(|a| a.reference.clone());
        match found
            .iter()
            .position(|a| Some(&a.reference) == installed.as_ref())
        {
            Some(i) => return Ok(found.swap_remove(i)),
            None => bail!(
                "{name_or_ref:?} names {} stored versions ({}); name one by its reference",
                found.len(),
                found
                    .iter()
                    .map(|a| a.reference.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(found.remove(0))
}

/// One image of the app as it will be loaded: the services running it.
struct PlannedImage {
    services: Vec<String>,
    tags: BTreeSet<String>,
    image_id: Digest,
    layers: Vec<(format::Descriptor, Digest)>,
}

/// [`install`] with the locks held and the record loaded by the caller.
pub(crate) async fn install_locked(
    device: Device<'_>,
    state: &mut Installed,
    app: &StoredApp,
    options: &InstallOptions,
    progress: &dyn Progress,
) -> Result<InstallReport> {
    let Device {
        root,
        store,
        engine,
    } = device;
    if !app.is_complete() {
        bail!(
            "app {} is not completely in the store ({} blobs missing): pull it again with `stowage pull {}`",
            app.name,
            app.missing.len(),
            app.reference
        );
    }
    let dir = record::app_dir(root, &app.name)?;
    // A first install that fails leaves neither directory nor record; a new
    // version's that fails is left for the update's rollback to replace.
    let first_install = !state.apps.contains_key(&app.name);
    let apps_dir = root.join("apps");
    remove_stale_extractions(&apps_dir)?;
    let manifest = AppManifest::parse(
        &store.read_capped(&app.digest, format::APP_MANIFEST_CAP)?,
        &format!("stored app {}", app.reference),
    )?;
    let mut meta = layers_meta(store, &manifest, &options.architecture)?;
    // What stowage measured of a layer before beats what was declared.
    meta.extend(store.layer_facts());

    let (images, service_tags) = plan_images(app)?;
    // What the engine has.
    let mut to_load = Vec::new();
    let mut to_tag: Vec<(&PlannedImage, Vec<String>)> = Vec::new();
    let mut present = Vec::new();
    for planned in images.values() {
        match engine.image_exists(&planned.image_id.to_string()).await {
            Ok(None) => to_load.push(planned),
            // The engine knows the image but cannot describe it: its layer
            // is gone (fsck found why). A load puts the layer back.
            Err(e) => {
                tracing::warn!("loading {} again: {e}", planned.image_id);
                to_load.push(planned)
            }
            Ok(Some(summary)) => {
                let missing: Vec<String> = planned
                    .tags
                    .iter()
                    .filter(|t| !summary.repo_tags.contains(t))
                    .cloned()
                    .collect();
                if missing.is_empty() {
                    present.push(planned);
                } else {
                    to_tag.push((planned, missing));
                }
            }
        }
    }
    let bundle_current = read_marker(&dir).is_some_and(|m| m.trim() == app.digest.to_string());

    // The fit check, when anything is to be written.
    let mut check = None;
    // What the engine holds, as the check saw it: the loads are scheduled on it.
    let mut docker = None;
    // What the check counted: the loads are held to it.
    let mut guard = None;
    let mut whole_images = false;
    let mut gate = None;
    let mut load_order = Vec::new();
    let mut inflate = Default::default();
    if !to_load.is_empty() || !bundle_current {
        let (info, held) = tokio::join!(engine.info(), engine.held_layers());
        let info = info?;
        // Before anything is written: the loads could not be found there.
        engine.require_graph_driver(&info)?;
        // Where fsck looks should the engine stop answering (saved below).
        state.engine = Some(record::EngineSeen {
            data_root: info.data_root.clone(),
            driver: info.storage_driver.clone(),
        });
        let docker = docker.insert(DockerView {
            reachable: true,
            data_root: info.data_root,
            held: held?,
        });
        let plan_app = app_for_plan(store, app, manifest.clone(), options, &meta)?;
        let mut apps = vec![plan_app];
        if bundle_current {
            // Only the images count: the bundle is extracted already.
            apps[0].bundle.clear();
        }
        let (plan, mut report) =
            check_update(&apps, store, &Paths::under(root), docker, options.policy)?;
        guard = Some(space_guard(&plan, &docker.data_root));
        whole_images = plan.whole_images;
        gate = plan
            .load_budget
            .clone()
            .map(crate::engine::docker::LoadGate::new);
        load_order = plan.load_order.clone();
        inflate = plan.inflated.clone();
        if bundle_current {
            report.fit.notes.push(format!(
                "the bundle is already extracted in {}",
                dir.display()
            ));
        }
        check = Some(refuse_unless_fits(report)?);
    }

    if !bundle_current {
        progress.step(format!(
            "extracting the bundle of {} into {}",
            app.name,
            dir.display()
        ));
        let (store, manifest, stored, apps_dir, dir) = (
            store.clone(),
            manifest.clone(),
            app.clone(),
            apps_dir.clone(),
            dir.clone(),
        );
        // Writing and fsyncing up to a whole bundle: off the runtime's workers.
        crate::fsutil::blocking(move || {
            extract_app_bundle(&store, &manifest, &stored, &apps_dir, &dir)
        })
        .await?;
    }

    // Record before loading: see the `record` module.
    record_install(state, app, &dir, &service_tags, &to_load, &to_tag);
    state.save(root)?;

    let mut report_images = Vec::new();
    for planned in &present {
        report_images.push(image_report(planned, ImageAction::Present));
    }
    for (planned, tags) in &to_tag {
        for tag in tags {
            engine.tag_image(&planned.image_id, tag).await?;
        }
        report_images.push(image_report(planned, ImageAction::Tagged));
    }
    let load_options = LoadOptions {
        guard: guard.clone(),
        // Whole images go inflated, as the plan counted them.
        send_gzip: options.load.send_gzip && !whole_images,
        inflate: Arc::new(inflate),
        whole: whole_images,
        // Whole images inflate several layers each: the machine's cores
        // shared between the images loading at once, not each taking all
        // (memory: each inflater buffers its layer ahead).
        jobs: if whole_images {
            (options.load.jobs / options.load.images.max(1)).max(1)
        } else {
            options.load.jobs
        },
        gate,
        ..options.load.clone()
    };
    // A killed install's intermediate images (the apps lock is held: no
    // load is running); one filtered listing when there are none.
    engine.remove_intermediate_images().await?;
    let held = docker.as_ref().map(|d| d.held.clone()).unwrap_or_default();
    // In the plan's order, which its figures counted (images it did not
    // count last).
    to_load.sort_by_key(|planned| {
        load_order
            .iter()
            .position(|digest| *digest == planned.image_id)
            .unwrap_or(usize::MAX)
    });
    let loaded = load_images(
        engine,
        store,
        &held,
        &to_load,
        &meta,
        &load_options,
        progress,
    )
    .await;
    if let Some(guard) = &guard {
        record_facts(store, guard);
    }
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            if first_install {
                forget_failed_install(root, state, &app.name, &dir);
            }
            return Err(e).with_context(|| format!("cannot install {}", app.reference));
        }
    };
    for (planned, loaded) in to_load.iter().zip(loaded) {
        let mut row = image_report(planned, ImageAction::Loaded);
        row.layers_sent = loaded.layers_sent;
        row.layers_skipped = loaded.layers_skipped;
        row.bytes_sent = loaded.bytes_sent;
        row.seconds = loaded.elapsed.as_secs_f64();
        report_images.push(row);
    }

    // The override marks the install done: the layers the engine applied
    // (it does not fsync them) and the tags it wrote reach the disk first.
    if !to_load.is_empty() || !to_tag.is_empty() {
        let data_root = match &docker {
            Some(docker) => docker.data_root.clone(),
            None => engine.info().await?.data_root,
        };
        flush_engine(&data_root).await?;
    }
    write_image_override(
        &dir.join(&app.compose_file),
        &dir.join(OVERRIDE_FILE),
        &service_tags,
    )?;
    progress.step(format!("installed {} ({})", app.name, app.reference));
    Ok(InstallReport {
        name: app.name.clone(),
        reference: app.reference.clone(),
        dir,
        bundle_extracted: !bundle_current,
        images: report_images,
        check,
    })
}

/// The app's images, each once with the services that run it (several may
/// run the same one), and each service's local tag.
fn plan_images(
    app: &StoredApp,
) -> Result<(BTreeMap<Digest, PlannedImage>, BTreeMap<String, String>)> {
    let mut images: BTreeMap<Digest, PlannedImage> = BTreeMap::new();
    let mut service_tags = BTreeMap::new();
    for image in &app.images {
        let config = image.config.as_ref().ok_or_else(|| {
            anyhow!(
                "the store lacks the config of {} (service {})",
                image.pinned,
                image.service
            )
        })?;
        let tag = local_tag_for(&image.pinned)?;
        service_tags.insert(image.service.clone(), tag.clone());
        let planned = images
            .entry(config.digest.clone())
            .or_insert_with(|| PlannedImage {
                services: Vec::new(),
                tags: BTreeSet::new(),
                image_id: config.digest.clone(),
                layers: image.layers.clone(),
            });
        planned.services.push(image.service.clone());
        planned.tags.insert(tag);
    }
    Ok((images, service_tags))
}

/// Extracts the app's verified bundle into `dir`: into a staging directory
/// beside it, then swapped in, so a refused bundle changes nothing; the
/// marker naming the app's digest is written last.
fn extract_app_bundle(
    store: &Store,
    manifest: &AppManifest,
    app: &StoredApp,
    apps_dir: &Path,
    dir: &Path,
) -> Result<()> {
    let (reference, name, digest) = (app.reference.as_str(), &app.name, &app.digest);
    let index = match manifest.bundle_index(reference)? {
        Some(d) => Some(format::parse_bundle_index(
            &store.read_capped(&d.digest, format::MANIFEST_CAP)?,
        )?),
        None => None,
    };
    let bundle_digest = &manifest.bundle().digest;
    let verify = match &index {
        Some(index) => Verify::Index(index),
        None => Verify::Digest(bundle_digest),
    };
    let bundle = store.open_blob(bundle_digest)?;
    crate::fsutil::ensure_dir(apps_dir, 0o700)
        .with_context(|| format!("cannot create {}", apps_dir.display()))?;
    // Another version's directory may be there (an update): extract
    // beside it, then swap, so a refused bundle changes nothing.
    let incoming = apps_dir.join(format!("{INCOMING_PREFIX}{}", name));
    if incoming.exists() {
        std::fs::remove_dir_all(&incoming)
            .with_context(|| format!("cannot remove {}", incoming.display()))?;
    }
    extract_bundle(bundle, verify, &incoming, &BundleLimits::default())
        .with_context(|| format!("the bundle of {} is refused", reference))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot remove the previous version in {}", dir.display()))?;
    }
    std::fs::rename(&incoming, dir)
        .with_context(|| format!("cannot move the bundle into {}", dir.display()))?;
    crate::fsutil::fsync_dir(apps_dir)
        .with_context(|| format!("cannot sync {}", apps_dir.display()))?;
    Dir::open(dir)
        .and_then(|d| {
            d.write_atomic(
                BUNDLE_MARKER,
                format!("{}\n", digest).as_bytes(),
                STATE_FILE_MODE,
            )
        })
        .with_context(|| format!("cannot write {}", dir.join(BUNDLE_MARKER).display()))?;
    Ok(())
}

/// Undoes a first install whose loads failed: its record and its directory
/// go (the images it meant to own stay recorded until prune finds them
/// absent). Best effort: the install's own error is what is reported.
fn forget_failed_install(root: &Path, state: &mut Installed, name: &str, dir: &Path) {
    state.apps.remove(name);
    if let Err(e) = state.save(root) {
        tracing::warn!("cannot forget the failed install of {name}: {e}");
    }
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove {}: {e}", dir.display());
    }
}

/// `syncfs` of Docker's data root, when this machine sees it (an engine
/// reached over TCP may keep it elsewhere: then only a warning).
pub async fn flush_engine(data_root: &Path) -> Result<()> {
    let path = data_root.to_path_buf();
    match crate::fsutil::blocking(move || crate::fsutil::syncfs(&path)).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                "Docker's data root {} is not on this machine: its layers were not flushed",
                data_root.display()
            );
            Ok(())
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot flush Docker's data root {} to disk",
                data_root.display()
            )
        }),
    }
}

/// The app's record, and the images and tags stowage is about to own.
fn record_install(
    state: &mut Installed,
    app: &StoredApp,
    dir: &Path,
    service_tags: &BTreeMap<String, String>,
    to_load: &[&PlannedImage],
    to_tag: &[(&PlannedImage, Vec<String>)],
) {
    state.apps.insert(
        app.name.clone(),
        InstalledApp {
            reference: app.reference.clone(),
            digest: app.digest.clone(),
            compose_file: app.compose_file.clone(),
            dir: dir.to_path_buf(),
            images: app
                .images
                .iter()
                .filter_map(|i| {
                    Some(InstalledImage {
                        service: i.service.clone(),
                        pinned: i.pinned.clone(),
                        tag: service_tags.get(&i.service)?.clone(),
                        image_id: i.config.as_ref()?.digest.clone(),
                    })
                })
                .collect(),
        },
    );
    for planned in to_load {
        state
            .owned_images
            .entry(planned.image_id.clone())
            .or_default()
            .extend(planned.tags.iter().cloned());
    }
    for (planned, tags) in to_tag {
        for tag in tags {
            match state.owned_images.get_mut(&planned.image_id) {
                Some(owned) => {
                    owned.insert(tag.clone());
                }
                None => {
                    state
                        .foreign_tags
                        .insert(tag.clone(), planned.image_id.clone());
                }
            }
        }
    }
}

/// Holds the loads to what `plan` counted on Docker's volume at `data_root`.
fn space_guard(plan: &UpdatePlan, data_root: &Path) -> Arc<SpaceGuard> {
    let allowances = plan
        .docker_counts
        .iter()
        .map(|(blob, count)| {
            (
                count.diff_id.clone(),
                (
                    blob.clone(),
                    Allowance {
                        usage: count.usage,
                        inodes: count.inodes,
                        tar_size: count.sent_size,
                    },
                ),
            )
        })
        .collect();
    Arc::new(SpaceGuard::new(
        data_root.to_path_buf(),
        plan.docker_block_size,
        allowances,
        plan.docker_room.0,
        plan.docker_room.1,
    ))
}

/// Keeps what the loads measured of each layer with its blob, for the next
/// plans; a failure to write them costs only precision, so it is logged.
fn record_facts(store: &Store, guard: &SpaceGuard) {
    let facts = guard
        .measured()
        .into_iter()
        .map(|(diff_id, m)| {
            let meta = LayerMeta {
                size: m.file_bytes,
                usage: format::usage_for_block_size(
                    &m.usage_by_block_size,
                    crate::app::layer::USAGE_BLOCK_SIZE,
                ),
                archive_size: store.size(&m.blob).unwrap_or(0),
                diff_id: Some(diff_id),
                tar_size: Some(m.tar_size),
                entries: Some(m.entries),
                inodes: Some(m.inodes),
                usage_by_block_size: Some(m.usage_by_block_size),
            };
            (m.blob, meta)
        })
        .collect();
    if let Err(e) = store.record_layer_facts(facts) {
        tracing::warn!("cannot keep the measured layer figures: {e}");
    }
}

/// Loads `images` into the engine, [`LoadOptions::images`] at a time (the
/// engine unpacks each archive on about one core). An image that shares a
/// layer the engine lacks with an earlier one waits for that one, so the
/// layer is sent once. Every load started runs to its end; the first error,
/// in the images' order, is returned. Reports come in the images' order.
async fn load_images(
    engine: &DockerEngine,
    store: &Store,
    held: &HeldLayers,
    images: &[&PlannedImage],
    meta: &BTreeMap<Digest, LayerMeta>,
    options: &LoadOptions,
    progress: &dyn Progress,
) -> Result<Vec<LoadReport>> {
    use futures_util::FutureExt as _;
    use futures_util::future::{BoxFuture, Shared};

    if images.is_empty() {
        return Ok(Vec::new());
    }
    // One read-ahead for the whole install: an image waiting for its turn
    // has its first layer read while the engine applies another's.
    let ahead = Arc::new(crate::engine::docker::VerifiedAhead::default());
    let options = &LoadOptions {
        ahead: Some(ahead.clone()),
        ..options.clone()
    };
    let first_sent = first_sent_layers(held, images);
    let read_first = |i: usize, image: &ImageToLoad| {
        first_sent[i].and_then(|k| ahead.start(&image.layers[k], options))
    };
    if options.images <= 1 {
        // Strictly in order, as the plan's peak for one at a time assumes.
        let mut reports = Vec::with_capacity(images.len());
        let mut next = match images.first() {
            Some(planned) => Some(image_to_load(store, planned, meta)?),
            None => None,
        };
        for (i, planned) in images.iter().enumerate() {
            progress.step(format!(
                "loading {} ({} layers) for {}",
                planned.tags.iter().next().map_or("", String::as_str),
                planned.layers.len(),
                planned.services.join(", ")
            ));
            let Some(image) = next.take() else { break };
            next = match images.get(i + 1) {
                Some(after) => Some(image_to_load(store, after, meta)?),
                None => None,
            };
            let read = next.as_ref().and_then(|after| read_first(i + 1, after));
            reports.push(engine.load_image_with(&image, options).await?);
            if let Some(read) = read {
                let _ = read.await;
            }
        }
        return Ok(reports);
    }
    let mut owner: BTreeMap<Digest, usize> = BTreeMap::new();
    let mut waits_for: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); images.len()];
    // With a gate, an image waits only for the layers it shares: by
    // earlier image, the last shared layer's index.
    let mut shared_upto: Vec<BTreeMap<usize, usize>> = vec![BTreeMap::new(); images.len()];
    for (i, planned) in images.iter().enumerate() {
        let diff_ids: Vec<Digest> = planned.layers.iter().map(|(_, d)| d.clone()).collect();
        for (index, chain) in crate::oci::digest::chain_ids(&diff_ids)
            .into_iter()
            .enumerate()
        {
            if held.chain_ids.contains(&chain) {
                continue;
            }
            match owner.get(&chain) {
                Some(&first) => {
                    waits_for[i].insert(first);
                    let upto = shared_upto[i].entry(first).or_insert(index);
                    *upto = (*upto).max(index);
                }
                None => {
                    owner.insert(chain, i);
                }
            }
        }
    }

    let slots = tokio::sync::Semaphore::new(options.images.max(1));
    let turn = Turn::default();
    let results: std::sync::Mutex<Vec<Option<Result<LoadReport>>>> =
        std::sync::Mutex::new((0..images.len()).map(|_| None).collect());
    // Each load as a shared future that says whether it succeeded, so that
    // the loads waiting for it can await it too.
    let mut loads: Vec<Shared<BoxFuture<'_, bool>>> = Vec::with_capacity(images.len());
    for (i, planned) in images.iter().enumerate() {
        let before: Vec<_> = waits_for[i].iter().map(|&j| loads[j].clone()).collect();
        let shared: Vec<(Digest, usize)> = shared_upto[i]
            .iter()
            .map(|(&j, &index)| (images[j].image_id.clone(), index))
            .collect();
        let (slots, results, turn) = (&slots, &results, &turn);
        let load = async move {
            let image = image_to_load(store, planned, meta);
            let read = image.as_ref().ok().and_then(|image| read_first(i, image));
            let mut ready = true;
            let mut slot = None;
            match &options.gate {
                // Slots in the plan's order, so that the image whose load is
                // next in that order always holds one (the gate lets that
                // load go when nothing loads); then until the engine holds
                // the layers it shares with earlier images.
                Some(gate) => {
                    turn.wait_for(i).await;
                    slot = slots.acquire().await.ok();
                    turn.pass(i + 1);
                    for (earlier, index) in &shared {
                        ready &= gate.applied(earlier, *index).await;
                    }
                }
                None => {
                    for earlier in before {
                        ready &= earlier.await;
                    }
                }
            }
            let result = if !ready {
                Err(anyhow!(
                    "{} was not loaded: an image it shares layers with failed to load",
                    planned.tags.iter().next().map_or("", String::as_str)
                ))
            } else {
                let _slot = match slot {
                    Some(slot) => Some(slot),
                    None => slots.acquire().await.ok(),
                };
                progress.step(format!(
                    "loading {} ({} layers) for {}",
                    planned.tags.iter().next().map_or("", String::as_str),
                    planned.layers.len(),
                    planned.services.join(", ")
                ));
                if let Some(read) = read {
                    // Read by now, mostly: its load need not read it again.
                    let _ = read.await;
                }
                match image {
                    Ok(image) => engine
                        .load_image_with(&image, options)
                        .await
                        .map_err(Into::into),
                    Err(e) => Err(e),
                }
            };
            // Also when it never reached the engine: the gate must not keep
            // room for its loads.
            if let Some(gate) = &options.gate {
                gate.image_done(&planned.image_id);
            }
            let ok = result.is_ok();
            if let Ok(mut results) = results.lock() {
                results[i] = Some(result);
            }
            ok
        }
        .boxed()
        .shared();
        loads.push(load);
    }
    futures_util::future::join_all(loads).await;
    let results = results
        .into_inner()
        .map_err(|_| anyhow!("a load panicked"))?;
    let mut reports = Vec::with_capacity(results.len());
    let mut first_error = None;
    for result in results {
        match result {
            Some(Ok(report)) => reports.push(report),
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
            None => {
                first_error.get_or_insert_with(|| anyhow!("a load did not run"));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(reports),
    }
}

/// Whose turn it is to take a load slot, by image index in the plan's order.
#[derive(Default)]
struct Turn {
    next: std::sync::Mutex<usize>,
    changed: tokio::sync::Notify,
}

impl Turn {
    async fn wait_for(&self, i: usize) {
        loop {
            let changed = self.changed.notified();
            if *self.next.lock().unwrap_or_else(|p| p.into_inner()) >= i {
                return;
            }
            changed.await;
        }
    }

    fn pass(&self, to: usize) {
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = to;
        self.changed.notify_waiters();
    }
}

/// For each image, in order, the index of the first layer its load will
/// send: the first whose chain neither the engine nor an earlier image holds.
fn first_sent_layers(held: &HeldLayers, images: &[&PlannedImage]) -> Vec<Option<usize>> {
    let mut seen: BTreeSet<Digest> = BTreeSet::new();
    images
        .iter()
        .map(|planned| {
            let diff_ids: Vec<Digest> = planned.layers.iter().map(|(_, d)| d.clone()).collect();
            let chains = crate::oci::digest::chain_ids(&diff_ids);
            let first = chains
                .iter()
                .position(|c| !held.chain_ids.contains(c) && !seen.contains(c));
            seen.extend(chains);
            first
        })
        .collect()
}

fn image_report(planned: &PlannedImage, action: ImageAction) -> ImageInstall {
    ImageInstall {
        services: planned.services.clone(),
        tags: planned.tags.iter().cloned().collect(),
        image_id: planned.image_id.clone(),
        action,
        layers: planned.layers.len(),
        layers_sent: 0,
        layers_skipped: 0,
        bytes_sent: 0,
        seconds: 0.0,
    }
}

fn image_to_load(
    store: &Store,
    planned: &PlannedImage,
    meta: &BTreeMap<Digest, LayerMeta>,
) -> Result<ImageToLoad> {
    let config = store.read_capped(&planned.image_id, format::MANIFEST_CAP)?;
    Ok(ImageToLoad {
        config,
        config_digest: planned.image_id.clone(),
        repo_tags: planned.tags.iter().cloned().collect(),
        layers: planned
            .layers
            .iter()
            .map(|(desc, diff_id)| LayerSource {
                diff_id: diff_id.clone(),
                blob_path: store.blob_path(&desc.digest),
                media_type: desc.media_type.clone(),
                tar_size: meta.get(&desc.digest).and_then(|m| m.tar_size),
            })
            .collect(),
    })
}

/// The publisher's per-layer figures for this architecture, from the
/// stored layers-meta blob (empty for apps published without one: the
/// check then falls back to FORMAT.md's rule).
fn layers_meta(
    store: &Store,
    manifest: &AppManifest,
    architecture: &str,
) -> Result<BTreeMap<Digest, LayerMeta>> {
    let Some(desc) = manifest.layers_meta() else {
        return Ok(BTreeMap::new());
    };
    let mut all =
        format::parse_layers_meta(&store.read_capped(&desc.digest, format::MANIFEST_CAP)?)?;
    let arch = format::Arch::parse(architecture).architecture;
    Ok(all.remove(&arch).map(|a| a.layers).unwrap_or_default())
}

/// The stored app in the shape the fit check plans with. Its blobs are all
/// stored, so the plan counts only Docker's side and the bundle.
fn app_for_plan(
    store: &Store,
    app: &StoredApp,
    manifest: AppManifest,
    options: &InstallOptions,
    meta: &BTreeMap<Digest, LayerMeta>,
) -> Result<App> {
    let reference = app
        .reference
        .parse()
        .with_context(|| format!("the stored app reference {:?}", app.reference))?;
    let bundle = store.read_capped(&manifest.bundle().digest, crate::app::BUNDLE_MEMORY_CAP)?;
    let mut images = Vec::new();
    let mut layers: BTreeMap<Digest, LayerNeed> = BTreeMap::new();
    for image in &app.images {
        let (Some(manifest_desc), Some(config)) = (&image.manifest, &image.config) else {
            bail!("the store lacks the manifest of {}", image.pinned);
        };
        let image_ref: crate::oci::reference::ImageRef = image
            .pinned
            .parse()
            .with_context(|| format!("service {} of {}", image.service, app.reference))?;
        for (desc, diff_id) in &image.layers {
            layers
                .entry(desc.digest.clone())
                .or_insert_with(|| LayerNeed {
                    descriptor: desc.clone(),
                    source: image_ref.clone(),
                    diff_id: diff_id.clone(),
                    meta: meta.get(&desc.digest).cloned(),
                });
        }
        images.push(ServiceImage {
            service: image.service.clone(),
            pinned: image.pinned.clone(),
            image: image_ref,
            manifest: manifest_desc.clone(),
            config: config.clone(),
            layers: image.layers.clone(),
        });
    }
    Ok(App {
        reference,
        name: app.name.clone(),
        digest: app.digest.clone(),
        architecture: format::Arch::parse(&options.architecture).architecture,
        manifest,
        compose_name: app.compose_file.clone(),
        bundle,
        meta_blobs: Vec::new(),
        images,
        layers: layers.into_values().collect(),
        unfetched: Vec::new(),
    })
}

/// An app's bundle is extracted as `.incoming-NAME` in the apps directory,
/// then swapped into place.
const INCOMING_PREFIX: &str = ".incoming-";

/// The bundle marker of an app directory, read without following a link.
pub(crate) fn read_marker(dir: &Path) -> Option<String> {
    use std::io::Read as _;
    let mut marker = String::new();
    Dir::open(dir)
        .and_then(|d| d.open_file(BUNDLE_MARKER))
        .and_then(|f| f.take(4096).read_to_string(&mut marker))
        .ok()?;
    Some(marker)
}

/// Removes what killed extractions left in the apps directory: staging
/// directories and bundles extracted but not swapped into place (the caller
/// holds the apps lock, so no extraction is running). App names never
/// start with a dot, so nothing else matches.
fn remove_stale_extractions(apps_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(apps_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(STAGING_PREFIX) || name.starts_with(INCOMING_PREFIX) {
            let path = entry.path();
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            if is_dir {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            }
            .with_context(|| {
                format!(
                    "cannot remove the interrupted extraction {}",
                    entry.path().display()
                )
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(diff_ids: &[&[u8]]) -> PlannedImage {
        PlannedImage {
            services: Vec::new(),
            tags: BTreeSet::new(),
            image_id: Digest::of(b"config"),
            layers: diff_ids
                .iter()
                .map(|d| {
                    (
                        format::Descriptor::new("application/x", Digest::of(d), 1),
                        Digest::of(d),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn each_image_reads_ahead_the_first_layer_no_one_loads_before_it() {
        let (a, b, c) = (
            planned(&[b"base", b"a"]),
            planned(&[b"base", b"b"]),
            planned(&[b"base"]),
        );
        let images = [&a, &b, &c];
        // Nothing held: the first image sends the base, the second only its
        // own layer, the third nothing.
        assert_eq!(
            first_sent_layers(&HeldLayers::default(), &images),
            [Some(0), Some(1), None]
        );
        // The engine holds the base: every image starts above it.
        let held = HeldLayers {
            diff_ids: [Digest::of(b"base")].into(),
            chain_ids: crate::oci::digest::chain_ids(&[Digest::of(b"base")])
                .into_iter()
                .collect(),
        };
        assert_eq!(first_sent_layers(&held, &images), [Some(1), Some(1), None]);
    }
}
