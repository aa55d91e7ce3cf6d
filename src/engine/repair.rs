//! `fsck`'s Docker side: every installed app's images, their layers as the
//! engine holds them (see [`crate::engine::layers`]) and its directory;
//! with `repair`, restored from the blob store with no network.
//!
//! The repair of damaged layers, in this order:
//! 1. The damaged layers' chains are looked up in every image the engine
//!    holds. An image stowage did not load (or that someone else also
//!    tagged) is foreign: it is never touched, and an app whose damaged
//!    layer it shares is reported, not repaired (the engine keeps a layer
//!    as long as one image uses it, so a reload would not replace it).
//! 2. The containers using the images to remove are listed: those of
//!    stowage's apps (compose project = app name) are stopped and removed;
//!    a foreign one keeps its image, which is then left alone.
//! 3. The images are removed by stowage's own tags, so the engine deletes
//!    the damaged layers.
//! 4. Each app is installed again from the blob store (`install_locked`:
//!    the missing images are loaded, the directory restored), checked
//!    again, and the apps whose containers were running are started.
//!
//! Engine metadata stowage cannot repair through the engine (a torn layer
//! database entry, a torn tag store that keeps dockerd from starting) is
//! reported with the one command that recovers it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use serde::Serialize;

use crate::Digest;
use crate::app::stored::{StoredApp, load_app};
use crate::engine::compose::Compose;
use crate::engine::install::{Device, InstallOptions, install_locked, read_marker};
use crate::engine::layers::{EngineLayout, ImageDamage, LayerChecker, Listings, StoredLayers};
use crate::engine::record::{
    self, APPS_LOCK_TIMEOUT, BUNDLE_MARKER, EngineSeen, Installed, InstalledApp, OVERRIDE_FILE,
};
use crate::progress::Progress;
use crate::store::LockMode;

/// The state of one installed app as fsck sees it.
#[derive(Debug, Clone, Serialize)]
pub struct InstalledCheck {
    pub name: String,
    pub reference: String,
    /// Local tags of images Docker lacks.
    pub missing_images: Vec<String>,
    /// Images whose layers, as the engine holds them, do not match the
    /// stored layers (or that the engine cannot describe).
    pub damaged_images: Vec<ImageDamage>,
    /// Why the layers were not checked (another storage driver, an engine
    /// on another machine, no permission), if they were not.
    pub layers_not_checked: Option<String>,
    /// Foreign images sharing a damaged layer: left alone.
    pub foreign: Vec<String>,
    /// The extracted bundle or the override file is missing.
    pub directory_damaged: bool,
    /// Reloaded from the blob store by `--repair`.
    pub repaired: bool,
    /// Why it could not be repaired.
    pub error: Option<String>,
}

impl InstalledCheck {
    fn new(name: &str, app: &InstalledApp) -> InstalledCheck {
        InstalledCheck {
            name: name.to_string(),
            reference: app.reference.clone(),
            missing_images: Vec::new(),
            damaged_images: Vec::new(),
            layers_not_checked: None,
            foreign: Vec::new(),
            directory_damaged: false,
            repaired: false,
            error: None,
        }
    }

    /// An app whose check found nothing, or whose repair succeeded.
    pub fn is_healthy(&self) -> bool {
        (self.is_intact() || self.repaired) && self.error.is_none()
    }

    fn is_intact(&self) -> bool {
        self.missing_images.is_empty() && self.damaged_images.is_empty() && !self.directory_damaged
    }

    /// The installed app could not be checked at all (no engine).
    pub fn unchecked(name: &str, app: &InstalledApp, error: String) -> InstalledCheck {
        InstalledCheck {
            error: Some(error),
            ..InstalledCheck::new(name, app)
        }
    }
}

/// How fsck checks Docker's side.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    pub repair: bool,
    /// Hash every file of every layer.
    pub deep: bool,
}

/// Checks every installed app (see the module comment); with `repair`,
/// restores what is damaged or missing from the blob store, and starts
/// again (with `compose`) the apps whose containers it removed.
pub async fn verify_installed(
    device: Device<'_>,
    verify: VerifyOptions,
    options: &InstallOptions,
    compose: Option<&Compose>,
    progress: &dyn Progress,
) -> Result<Vec<InstalledCheck>> {
    let _store_lock = device.store.lock_async(LockMode::Shared).await?;
    let _apps_lock = record::lock_apps_async(device.root, APPS_LOCK_TIMEOUT).await?;
    let mut state = Installed::load(device.root)?;
    let checks =
        verify_locked(device, &mut state, None, verify, options, compose, progress).await?;
    // Listings of layers the store no longer holds (pruned) go too.
    let (listings, store) = (Listings::under(device.root), device.store.clone());
    crate::fsutil::blocking(move || {
        listings.forget_absent(&store);
        Ok::<_, std::convert::Infallible>(())
    })
    .await
    .ok();
    Ok(checks)
}

/// `stowage install NAME|REF`, repairing first what fsck would find
/// damaged in an installed app's images (see [`verify_locked`]).
pub async fn install_repairing(
    device: Device<'_>,
    name_or_ref: &str,
    options: &InstallOptions,
    compose: Option<&Compose>,
    progress: &dyn Progress,
) -> Result<crate::engine::install::InstallReport> {
    let _store_lock = device.store.lock_async(LockMode::Shared).await?;
    let _apps_lock = record::lock_apps_async(device.root, APPS_LOCK_TIMEOUT).await?;
    let mut state = Installed::load(device.root)?;
    let app = crate::engine::install::resolve_app(device.store, &state, name_or_ref)?;
    repair_before_start(
        device,
        &mut state,
        std::slice::from_ref(&app.name),
        options,
        compose,
        progress,
    )
    .await?;
    install_locked(device, &mut state, &app, options, progress).await
}

/// The quick check and repair of the installed apps among `names`, for
/// `install` and `run` (the caller holds the locks): an app whose damage
/// cannot be repaired is an error naming it.
pub async fn repair_before_start(
    device: Device<'_>,
    state: &mut Installed,
    names: &[String],
    options: &InstallOptions,
    compose: Option<&Compose>,
    progress: &dyn Progress,
) -> Result<()> {
    let only: BTreeSet<String> = names
        .iter()
        .filter(|n| state.apps.contains_key(n.as_str()))
        .cloned()
        .collect();
    if only.is_empty() {
        return Ok(());
    }
    // First only look: what is missing or only in the directory, the
    // install that follows restores (and reports) itself.
    let look = VerifyOptions {
        repair: false,
        deep: false,
    };
    let damaged: BTreeSet<String> =
        verify_locked(device, state, Some(&only), look, options, compose, progress)
            .await?
            .into_iter()
            .filter(|c| !c.damaged_images.is_empty())
            .map(|c| c.name)
            .collect();
    if damaged.is_empty() {
        return Ok(());
    }
    let repair = VerifyOptions {
        repair: true,
        deep: false,
    };
    let checks = verify_locked(
        device,
        state,
        Some(&damaged),
        repair,
        options,
        compose,
        progress,
    )
    .await?;
    for check in checks {
        if check.repaired {
            progress.step(format!(
                "{}: Docker's copy of its images was damaged; restored from the blob store",
                check.name
            ));
        }
        let damaged = !check.damaged_images.is_empty() || !check.missing_images.is_empty();
        if let (true, Some(e)) = (damaged, &check.error) {
            anyhow::bail!(
                "app {}: Docker's copy of its images is damaged ({}) and cannot be restored: {e}",
                check.name,
                summary(&check)
            );
        }
    }
    Ok(())
}

/// [`verify_installed`] with the locks held and the record loaded by the
/// caller, for every installed app or those in `only`.
pub async fn verify_locked(
    device: Device<'_>,
    state: &mut Installed,
    only: Option<&BTreeSet<String>>,
    verify: VerifyOptions,
    options: &InstallOptions,
    compose: Option<&Compose>,
    progress: &dyn Progress,
) -> Result<Vec<InstalledCheck>> {
    let info = device.engine.info().await?;
    let seen = EngineSeen {
        data_root: info.data_root.clone(),
        driver: info.storage_driver.clone(),
    };
    if state.engine.as_ref() != Some(&seen) {
        state.engine = Some(seen);
        state.save(device.root)?;
    }
    let layout = EngineLayout {
        data_root: info.data_root,
        driver: info.storage_driver,
    };
    let not_checked = layout.not_checked();
    let mut checker = LayerChecker::new(
        device.engine,
        device.store,
        device.root,
        layout,
        verify.deep,
    );
    let apps: Vec<(String, InstalledApp)> = state
        .apps
        .iter()
        .filter(|(n, _)| only.is_none_or(|only| only.contains(n.as_str())))
        .map(|(n, a)| (n.clone(), a.clone()))
        .collect();
    let mut checks = Vec::new();
    let mut stored_apps: BTreeMap<String, StoredApp> = BTreeMap::new();
    for (name, installed_app) in &apps {
        let mut check = InstalledCheck::new(name, installed_app);
        let stored = match load_app(
            device.store,
            &installed_app.reference,
            &installed_app.digest,
        ) {
            Ok(Some(app)) => Some(app),
            Ok(None) => {
                check.error = Some(format!(
                    "the store no longer holds {}: pull it again",
                    installed_app.reference
                ));
                None
            }
            Err(e) => {
                check.error = Some(format!("{e:#}"));
                None
            }
        };
        check_app(
            device,
            &mut checker,
            &not_checked,
            installed_app,
            stored.as_ref(),
            &mut check,
        )
        .await?;
        if let Some(stored) = stored {
            stored_apps.insert(name.clone(), stored);
        }
        checks.push(check);
    }
    if !verify.repair || checks.iter().all(|c| c.is_intact() || c.error.is_some()) {
        return Ok(checks);
    }

    // Damaged layers: clear the engine of stowage's images holding them.
    let restart = clear_damaged(device, state, &mut checks, progress).await?;

    // Reload from the blob store, then check again.
    checker.forget();
    for (check, (name, installed_app)) in checks.iter_mut().zip(&apps) {
        if check.is_intact() || check.error.is_some() {
            continue;
        }
        let Some(stored) = stored_apps.get(name) else {
            continue;
        };
        progress.step(format!("restoring {name} from the blob store"));
        if let Err(e) = install_locked(device, state, stored, options, progress).await {
            check.error = Some(format!("{e:#}"));
            continue;
        }
        let mut after = InstalledCheck::new(name, installed_app);
        check_app(
            device,
            &mut checker,
            &not_checked,
            installed_app,
            Some(stored),
            &mut after,
        )
        .await?;
        if after.is_intact() {
            check.repaired = true;
        } else {
            check.error = Some(format!(
                "still damaged after the reload from the blob store: {}",
                summary(&after)
            ));
        }
    }
    if let Some(compose) = compose {
        for name in restart {
            let Some(app) = state.apps.get(&name) else {
                continue;
            };
            progress.step(format!("starting {name} again"));
            if let Err(e) = compose
                .up(device.engine, &app.dir, &name, &app.compose_files())
                .await
                && let Some(check) = checks.iter_mut().find(|c| c.name == name)
            {
                check.error = Some(format!("restored, but cannot start it again: {e}"));
            }
        }
    }
    Ok(checks)
}

/// One app's images, layers and directory.
async fn check_app(
    device: Device<'_>,
    checker: &mut LayerChecker<'_>,
    not_checked: &Option<String>,
    app: &InstalledApp,
    stored: Option<&StoredApp>,
    check: &mut InstalledCheck,
) -> Result<()> {
    for image in &app.images {
        // An engine that cannot describe the image (its layers torn) holds
        // it still: the layer check below says what is wrong with it.
        let ok = match device.engine.image_exists(&image.tag).await {
            Ok(Some(summary)) => summary.id == image.image_id,
            Ok(None) => false,
            Err(_) => true,
        };
        if !ok && !check.missing_images.contains(&image.tag) {
            check.missing_images.push(image.tag.clone());
        }
    }
    let is_file =
        |name: &str| std::fs::symlink_metadata(app.dir.join(name)).is_ok_and(|m| m.is_file());
    check.directory_damaged = read_marker(&app.dir)
        .is_none_or(|m| m.trim() != app.digest.to_string())
        || !is_file(OVERRIDE_FILE)
        || !is_file(BUNDLE_MARKER)
        || !is_file(&app.compose_file);
    if let Some(why) = not_checked {
        check.layers_not_checked = Some(why.clone());
        return Ok(());
    }
    let Some(stored) = stored else {
        return Ok(());
    };
    let mut done = BTreeSet::new();
    for image in &stored.images {
        let Some(config) = &image.config else {
            continue;
        };
        if !done.insert(config.digest.clone()) {
            continue;
        }
        let layers = StoredLayers {
            image_id: config.digest.clone(),
            layers: image
                .layers
                .iter()
                .map(|(desc, diff_id)| (desc.digest.clone(), diff_id.clone()))
                .collect(),
        };
        let (layers, engine_error) = match checker.check_image(&layers).await? {
            Some(found) => found,
            // Missing (reported by tag above); a torn layer entry may be why.
            None => match checker.torn_entries(&layers) {
                torn if torn.is_empty() => continue,
                torn => (
                    torn,
                    Some("the engine does not have this image: its layer metadata is torn".into()),
                ),
            },
        };
        if layers.is_empty() && engine_error.is_none() {
            continue;
        }
        let of_image: Vec<_> = app
            .images
            .iter()
            .filter(|i| i.image_id == config.digest)
            .collect();
        check.damaged_images.push(ImageDamage {
            tag: of_image.first().map(|i| i.tag.clone()).unwrap_or_default(),
            image_id: config.digest.clone(),
            services: of_image.iter().map(|i| i.service.clone()).collect(),
            engine_error,
            layers,
        });
    }
    Ok(())
}

/// What one check found, in a line.
fn summary(check: &InstalledCheck) -> String {
    let mut parts = Vec::new();
    if !check.missing_images.is_empty() {
        parts.push(format!("missing {}", check.missing_images.join(", ")));
    }
    for image in &check.damaged_images {
        for layer in &image.layers {
            parts.push(format!(
                "{} layer {}: {}",
                image.tag, layer.diff_id, layer.problem
            ));
        }
        if let Some(e) = &image.engine_error {
            parts.push(format!("{}: {e}", image.tag));
        }
    }
    if check.directory_damaged {
        parts.push("its directory is damaged".into());
    }
    parts.join("; ")
}

/// Removes from the engine stowage's images that hold a damaged layer,
/// after the containers of stowage's apps using them; returns the apps
/// whose running containers were removed. Apps whose damage cannot be
/// cleared get their `error` (and `foreign`) set.
async fn clear_damaged(
    device: Device<'_>,
    state: &Installed,
    checks: &mut [InstalledCheck],
    progress: &dyn Progress,
) -> Result<BTreeSet<String>> {
    let engine = device.engine;
    let mut damaged_chains: BTreeMap<Digest, Digest> = BTreeMap::new();
    for check in checks.iter_mut() {
        let mut torn = Vec::new();
        for image in &check.damaged_images {
            for layer in &image.layers {
                damaged_chains.insert(layer.chain_id.clone(), layer.diff_id.clone());
                if let Some(path) = &layer.remove_to_recover {
                    torn.push(path.clone());
                }
            }
        }
        if !torn.is_empty() {
            check.error = Some(torn_message(&torn));
        }
    }
    let damaged_ids: BTreeSet<Digest> = checks
        .iter()
        .flat_map(|c| c.damaged_images.iter().map(|i| i.image_id.clone()))
        .collect();
    if damaged_ids.is_empty() {
        return Ok(BTreeSet::new());
    }

    // Every image holding a damaged layer: stowage's are removed, foreign
    // ones block the repair of the layers they share.
    let mut remove: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
    let mut blocked: BTreeMap<Digest, String> = BTreeMap::new();
    for (image, diff_ids) in engine.images_with_layers().await? {
        let chains = crate::oci::digest::chain_ids(&diff_ids);
        let shared: Vec<&Digest> = chains
            .iter()
            .filter(|c| damaged_chains.contains_key(*c))
            .collect();
        if shared.is_empty() && !damaged_ids.contains(&image.id) {
            continue;
        }
        let ours = state.owned_images.get(&image.id);
        let owned = ours.is_some_and(|tags| image.repo_tags.iter().all(|t| tags.contains(t)));
        if owned {
            remove.insert(image.id.clone(), image.repo_tags.clone());
        } else {
            let who = if image.repo_tags.is_empty() {
                image.id.to_string()
            } else {
                image.repo_tags.join(", ")
            };
            for chain in shared {
                blocked.insert(
                    chain.clone(),
                    format!(
                        "image {who} (not loaded by stowage) shares the damaged layer {}: left alone; the layer stays damaged until it is removed (`docker rmi {who}`), then `stowage fsck --repair`",
                        damaged_chains[chain]
                    ),
                );
            }
        }
    }

    // Containers: stowage's apps' are removed, a foreign one keeps its image.
    let mut restart = BTreeSet::new();
    let containers = engine.containers().await?;
    let mut keep: BTreeMap<Digest, String> = BTreeMap::new();
    for container in &containers {
        let Some(image_id) = &container.image_id else {
            continue;
        };
        if !remove.contains_key(image_id) {
            continue;
        }
        let stowage_app = container
            .project
            .as_ref()
            .filter(|p| state.apps.contains_key(p.as_str()));
        if stowage_app.is_none() {
            keep.insert(
                image_id.clone(),
                format!(
                    "container {} (not one of stowage's apps) uses image {image_id}, which holds a damaged layer: left alone; remove the container, then `stowage fsck --repair`",
                    container.name
                ),
            );
        }
    }
    for (id, why) in &keep {
        remove.remove(id);
        for check in checks.iter_mut() {
            if check.damaged_images.iter().any(|i| &i.image_id == id) {
                check.foreign.push(why.clone());
            }
        }
    }
    for check in checks.iter_mut() {
        for image in &check.damaged_images {
            for layer in &image.layers {
                if let Some(why) = blocked.get(&layer.chain_id)
                    && !check.foreign.contains(why)
                {
                    check.foreign.push(why.clone());
                }
            }
        }
        if !check.foreign.is_empty() && check.error.is_none() {
            check.error = Some(check.foreign.join("; "));
        }
    }
    // An app blocked by a foreign image or container keeps its images.
    let blocked_images: BTreeSet<Digest> = checks
        .iter()
        .filter(|c| c.error.is_some())
        .flat_map(|c| c.damaged_images.iter().map(|i| i.image_id.clone()))
        .collect();
    remove.retain(|id, _| !blocked_images.contains(id));
    for container in &containers {
        let (Some(image_id), Some(project)) = (&container.image_id, &container.project) else {
            continue;
        };
        if remove.contains_key(image_id) && state.apps.contains_key(project.as_str()) {
            progress.step(format!(
                "removing container {} of {project}: its image holds a damaged layer",
                container.name
            ));
            engine.remove_container(&container.id).await?;
            if container.running {
                restart.insert(project.clone());
            }
        }
    }
    for (id, tags) in &remove {
        progress.step(format!("removing damaged image {id}"));
        for tag in tags {
            engine.remove_image(tag).await?;
        }
        // By ID too, whatever an inspect says: an image whose tags a power
        // cut took is untagged, and one with a torn layer cannot be
        // inspected (the engine answers 500), yet both are there and a
        // reload would keep the damaged copy. Not found is no error.
        engine.remove_image(&id.to_string()).await?;
    }
    Ok(restart)
}

/// Torn engine metadata: what to remove, then the repair.
fn torn_message(paths: &[PathBuf]) -> String {
    format!(
        "the engine's metadata for a layer is torn (a power cut while dockerd wrote it); dockerd neither uses nor reloads that layer while it is there. Recover with: rm -rf {} && stowage fsck --repair",
        paths
            .iter()
            .map(|p| shell_quote(p))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn shell_quote(path: &Path) -> String {
    let s = path.to_string_lossy();
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:".contains(&b))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// What keeps an engine that does not answer from starting, as far as its
/// data root shows it: each finding with the command that recovers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EngineDamage {
    pub what: String,
    pub path: PathBuf,
    /// The one command that recovers it.
    pub recover: String,
}

/// Looks at the data root of an engine that does not answer (as recorded
/// by an earlier fsck) for the metadata a power cut is known to tear so
/// that dockerd does not start: its tag store (`repositories.json`; dockerd
/// 20.10 stops with "Couldn't create reference store repository: EOF").
pub fn diagnose_stopped_engine(root: &Path) -> Result<Vec<EngineDamage>> {
    let state = Installed::load(root)?;
    let Some(engine) = state.engine else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    let tags = engine
        .data_root
        .join("image")
        .join(&engine.driver)
        .join("repositories.json");
    match std::fs::read(&tags) {
        Ok(bytes) if serde_json::from_slice::<serde_json::Value>(&bytes).is_err() => {
            found.push(EngineDamage {
                what: format!(
                    "Docker's tag store {} is torn ({} bytes, not JSON): dockerd does not start with it. Removing it loses only tags; `stowage fsck --repair` then tags stowage's images again",
                    tags.display(),
                    bytes.len()
                ),
                path: tags.clone(),
                recover: format!(
                    "rm {} && systemctl restart docker && stowage fsck --repair",
                    shell_quote(&tags)
                ),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow!("cannot read {}: {e}", tags.display())),
    }
    Ok(found)
}
