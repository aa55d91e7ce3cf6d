//! `stowage update` and `stowage agent` on a real device: the update
//! transaction's steps ([`crate::update::transaction::DeviceOps`]) carried out with the
//! blob store, the Docker Engine and compose.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Digest;
use crate::app::stored as admin;
use crate::app::{LayoutSource, fetch_app};
use crate::engine::compose::Compose;
use crate::engine::docker::DockerEngine;
use crate::engine::install::{self, Device, InstallOptions};
use crate::engine::prune as docker_prune;
use crate::engine::run::{self as run_cmd, AppStatus, Selection};
use crate::oci::reference::{AppName, AppRef, ImageRef};
use crate::oci::registry::RegistryClient;
use crate::plan::room::{Candidate, Freeable};
use crate::plan::space::Policy;
use crate::plan::{CheckReport, DockerView, Paths, check_update, refuse_unless_fits};
use crate::progress::Progress;
use crate::store::Store;
use crate::update::agent::AgentDevice;
use crate::update::pull::PullOptions;
use crate::update::reconcile::Supervised;
use crate::update::transaction::{
    AppSet, BlobsPruned, DeviceOps, DeviceState, ImagesPruned, PruneSummary, UpdateEvent,
    UpdateWrites, VolumeWrites,
};

/// The device as the update transaction drives it.
pub struct LiveDevice<'a> {
    pub root: PathBuf,
    pub store: Store,
    pub engine: DockerEngine,
    pub compose: Compose,
    pub client: &'a RegistryClient,
    pub architecture: String,
    pub policy: Policy,
    pub jobs: usize,
    pub install: InstallOptions,
    pub progress: &'a dyn Progress,
    /// Take the apps from this export instead of their registries.
    pub layout: Option<crate::update::export::LayoutRef>,
    /// Receives the transaction's events (JSON lines or text).
    pub events: &'a (dyn Fn(&UpdateEvent) + Send + Sync),
    /// What this update writes, for flash wear.
    pub wear: Wear,
}

/// Counts what an update writes (see [`UpdateWrites`]).
#[derive(Debug)]
pub struct Wear {
    /// The process's `write_bytes` when the device was made.
    started: Option<u64>,
    /// Docker's data root, once an install asked for it.
    data_root: std::sync::Mutex<Option<PathBuf>>,
    engine_growth: std::sync::atomic::AtomicU64,
    engine_temp: std::sync::atomic::AtomicU64,
    /// Of the process's writes, those made while an install grew a data
    /// root on the store's volume (counted once, on the store's side).
    overlap: std::sync::atomic::AtomicU64,
}

impl Default for Wear {
    fn default() -> Self {
        Wear {
            started: crate::fsutil::process_write_bytes(),
            data_root: std::sync::Mutex::new(None),
            engine_growth: Default::default(),
            engine_temp: Default::default(),
            overlap: Default::default(),
        }
    }
}

impl Wear {
    /// The figures so far, per volume of `root` and the data root.
    pub fn writes(&self, root: &std::path::Path) -> Option<UpdateWrites> {
        use std::sync::atomic::Ordering::Relaxed;
        let store_bytes = crate::fsutil::process_write_bytes()?.saturating_sub(self.started?);
        let growth = self
            .engine_growth
            .load(Relaxed)
            .saturating_sub(self.overlap.load(Relaxed));
        let temp = self.engine_temp.load(Relaxed);
        let engine_bytes = growth.saturating_add(temp);
        let data_root = self.data_root.lock().ok().and_then(|d| d.clone());
        let dev = |p: &std::path::Path| crate::plan::space::Volume::of(p).map(|v| v.dev).ok();
        let mut volumes = vec![VolumeWrites {
            paths: vec![root.display().to_string()],
            bytes: store_bytes,
        }];
        if let Some(data_root) = data_root {
            if dev(&data_root).is_some() && dev(&data_root) == dev(root) {
                volumes[0].paths.push(data_root.display().to_string());
                volumes[0].bytes = volumes[0].bytes.saturating_add(engine_bytes);
            } else {
                volumes.push(VolumeWrites {
                    paths: vec![data_root.display().to_string()],
                    bytes: engine_bytes,
                });
            }
        }
        Some(UpdateWrites {
            store_bytes,
            engine_bytes,
            engine_temp_bytes: temp,
            volumes,
        })
    }
}

impl LiveDevice<'_> {
    fn device(&self) -> Device<'_> {
        Device {
            root: &self.root,
            store: &self.store,
            engine: &self.engine,
        }
    }

    fn refs(to: &AppSet) -> Vec<ImageRef> {
        to.values().map(|r| r.image().clone()).collect()
    }

    /// The apps of `to` read from the store, when every one is stored whole.
    async fn stored_apps(&self, to: &AppSet) -> Result<Option<Vec<crate::app::App>>> {
        let source = LayoutSource { store: &self.store };
        let mut apps = Vec::new();
        for reference in to.values() {
            let complete = crate::app::stored::find_apps(&self.store, &reference.to_string())?
                .iter()
                .any(|a| a.is_complete());
            if !complete {
                return Ok(None);
            }
            apps.push(fetch_app(&source, reference.image(), &self.architecture).await?);
        }
        Ok(Some(apps))
    }

    /// The fit check of `apps` on this device, as Docker holds it now.
    async fn check(&self, apps: &[crate::app::App]) -> Result<CheckReport> {
        let docker = self.docker_view().await;
        let paths = Paths::under(&self.root);
        let (_, report) = check_update(apps, &self.store, &paths, &docker, self.policy)?;
        Ok(report)
    }

    /// Forgets stored apps outside `keep`, then prunes the blob store
    /// (keeping `roots` too: the target's blobs, so that its partial
    /// downloads survive) and the images stowage loaded, keeping the images
    /// of every app in `keep`.
    async fn prune_keeping(&self, keep: &[AppRef], roots: HashSet<Digest>) -> Result<PruneSummary> {
        let keep_refs: BTreeSet<String> = keep.iter().map(AppRef::to_string).collect();
        let store = self.store.clone();
        // Store walks, lock waits and deletions: blocking file work.
        let (keep_images, blobs) = crate::fsutil::blocking(move || {
            let mut keep_images: BTreeSet<Digest> = BTreeSet::new();
            for app in crate::app::stored::list_apps(&store)? {
                if keep_refs.contains(&app.reference) {
                    keep_images.extend(
                        app.images
                            .iter()
                            .filter_map(|i| i.config.as_ref().map(|c| c.digest.clone())),
                    );
                } else {
                    admin::rm(&store, &app.reference)?;
                }
            }
            let _lock = store.lock(crate::store::LockMode::Exclusive)?;
            let blobs = store.prune(false, &roots)?;
            anyhow::Ok((keep_images, blobs))
        })
        .await?;
        let docker =
            docker_prune::prune_docker_keeping(&self.root, &self.engine, false, &keep_images)
                .await?;
        Ok(PruneSummary {
            blob_store: BlobsPruned {
                removed_blobs: blobs.removed.len(),
                freed_bytes: blobs.freed_bytes,
                stale_ingest_bytes: blobs.stale_ingest_bytes,
            },
            docker: ImagesPruned {
                removed_images: docker.removed.len(),
                freed_bytes: docker.freed_bytes,
            },
        })
    }

    /// The image IDs of the stored apps among `refs`.
    async fn images_of(&self, refs: &BTreeSet<String>) -> Result<BTreeSet<Digest>> {
        let store = self.store.clone();
        let refs = refs.clone();
        crate::fsutil::blocking(move || {
            let mut images = BTreeSet::new();
            for app in crate::app::stored::list_apps(&store)? {
                if refs.contains(&app.reference) {
                    images.extend(
                        app.images
                            .iter()
                            .filter_map(|i| i.config.as_ref().map(|c| c.digest.clone())),
                    );
                }
            }
            anyhow::Ok(images)
        })
        .await
    }

    /// Every blob the apps of `to` are made of, when they can be read (from
    /// the store, or the registry's manifests); `None` when one cannot.
    async fn target_blobs(&self, to: &AppSet) -> Option<HashSet<Digest>> {
        let mut blobs = HashSet::new();
        for reference in to.values() {
            let one: AppSet = [(reference.name().ok()?, reference.clone())].into();
            let app = match self.stored_apps(&one).await {
                Ok(Some(mut apps)) => apps.pop()?,
                _ if self.layout.is_some() => return None,
                _ => crate::app::fetch_app_to(
                    self.client,
                    reference.image(),
                    &self.architecture,
                    crate::app::Depth::Plan,
                )
                .await
                .ok()?,
            };
            blobs.insert(reference.image().digest.clone()?);
            blobs.extend(app.meta_blobs.iter().map(|b| b.descriptor.digest.clone()));
            blobs.extend(app.unfetched.iter().map(|d| d.digest.clone()));
            blobs.extend(app.layers.iter().map(|l| l.descriptor.digest.clone()));
        }
        Some(blobs)
    }

    async fn docker_view(&self) -> DockerView {
        crate::engine::docker::probe_view(Some(&self.engine))
            .await
            .0
    }
}

impl DeviceOps for LiveDevice<'_> {
    async fn pull(&self, to: &AppSet) -> Result<CheckReport> {
        // Apps already whole in the store need no network: plan from the
        // store alone (the check still counts Docker and the apps directory).
        if let Some(apps) = self.stored_apps(to).await? {
            return refuse_unless_fits(self.check(&apps).await?);
        }
        if let Some(layout) = &self.layout {
            let docker = self.docker_view().await;
            let report = crate::update::export::import(
                &self.store,
                layout,
                &self.architecture,
                self.policy,
                &docker,
                self.progress,
            )
            .await?;
            return Ok(report.check);
        }
        let options = PullOptions {
            apps: Self::refs(to),
            architecture: self.architecture.clone(),
            policy: self.policy,
            jobs: self.jobs,
        };
        let docker = async { (self.docker_view().await, None) };
        let report = options
            .run(self.client, &self.store, docker, self.progress)
            .await?;
        Ok(report.check)
    }

    async fn install(&self, reference: &AppRef) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let reference = reference.to_string();
        let data_root = self.engine.info().await.ok().map(|i| i.data_root);
        let used = || data_root.as_deref().and_then(crate::fsutil::used_bytes);
        let (used_before, io_before) = (used(), crate::fsutil::process_write_bytes());
        let report =
            install::install(self.device(), &reference, &self.install, self.progress).await?;
        let sent: u64 = report.images.iter().map(|i| i.bytes_sent).sum();
        self.wear.engine_temp.fetch_add(sent, Relaxed);
        if let (Some(before), Some(after)) = (used_before, used()) {
            self.wear
                .engine_growth
                .fetch_add(after.saturating_sub(before), Relaxed);
        }
        if let Some(data_root) = data_root {
            let same = crate::plan::space::Volume::of(&data_root)
                .ok()
                .zip(crate::plan::space::Volume::of(&self.root).ok())
                .is_some_and(|(a, b)| a.dev == b.dev);
            if same
                && let (Some(before), Some(after)) =
                    (io_before, crate::fsutil::process_write_bytes())
            {
                self.wear
                    .overlap
                    .fetch_add(after.saturating_sub(before), Relaxed);
            }
            if let Ok(mut known) = self.wear.data_root.lock() {
                *known = Some(data_root);
            }
        }
        Ok(())
    }

    /// Starts the version of `name` installed last: the transaction
    /// installs `reference` (making it the one the name stands for) first.
    async fn start(&self, name: &AppName, _reference: &AppRef) -> Result<()> {
        run_cmd::run(
            self.device(),
            &self.compose,
            &Selection::Named(vec![name.to_string()]),
            &self.install,
            // Checked by the boot's and the agent's repair; the update's
            // start is the app's downtime, and it has just been installed.
            false,
            self.progress,
        )
        .await?;
        Ok(())
    }

    async fn stop(&self, name: &AppName) -> Result<()> {
        run_cmd::stop(
            self.device(),
            &self.compose,
            &Selection::Named(vec![name.to_string()]),
            self.progress,
        )
        .await?;
        Ok(())
    }

    /// Every service running, and healthy where it has a healthcheck, seen
    /// twice in a row a second apart (a service that exits at once is
    /// caught), within `timeout`. An exited or unhealthy service fails at once.
    async fn verify(&self, name: &AppName, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut good_polls = 0;
        loop {
            let apps = run_cmd::ps(self.device()).await?;
            let app = apps
                .iter()
                .find(|a| a.name == name.as_str())
                .ok_or_else(|| anyhow::anyhow!("app {name} is not installed"))?;
            let mut waiting = Vec::new();
            for s in &app.services {
                match (s.state.as_str(), s.health.as_deref()) {
                    ("exited" | "dead", _) => bail!(
                        "service {} of {name} exited (code {}) instead of running",
                        s.service,
                        s.exit_code.unwrap_or(-1)
                    ),
                    (_, Some("unhealthy")) => bail!("service {} of {name} is unhealthy", s.service),
                    ("running", None | Some("healthy")) => {}
                    (state, health) => waiting.push(format!(
                        "{} ({state}{})",
                        s.service,
                        health.map(|h| format!(", {h}")).unwrap_or_default()
                    )),
                }
            }
            if app.services.is_empty() {
                waiting.push("no services".into());
            }
            if waiting.is_empty() {
                good_polls += 1;
                if good_polls >= 2 {
                    return Ok(());
                }
            } else {
                good_polls = 0;
            }
            if Instant::now() >= deadline {
                bail!(
                    "app {name} was not running and healthy within {} s: waiting for {}",
                    timeout.as_secs(),
                    waiting.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Forgets stored apps outside `keep`, then prunes the blob store and the
    /// images stowage loaded, keeping the images of every app in `keep`.
    async fn prune(&self, keep: &[AppRef]) -> Result<PruneSummary> {
        self.prune_keeping(keep, HashSet::new()).await
    }

    /// What each kind of [`Freeable`] would free: the blob store's side
    /// measured by walking the refs with and without the apps each kind
    /// drops, Docker's as a dry run of its prune; the apps the target drops
    /// by their images' own bytes (those apps run until they are freed).
    async fn room(&self, state: &DeviceState, to: &AppSet) -> Result<Vec<Candidate>> {
        let sets = RoomSets::of(state, to);
        let without_dropped = sets.without_dropped.clone();
        let roots = self.target_blobs(to).await;
        let store = self.store.clone();
        let store_volume = crate::plan::space::Volume::of(&self.root.join("store"))?;
        let (store_dev, block) = (store_volume.dev, store_volume.block_size);
        let (kept, with_previous) = (sets.kept.clone(), sets.with_previous.clone());
        let (partials, unneeded, rollback, dropped_apps) = crate::fsutil::blocking(move || {
            let _lock = store.lock(crate::store::LockMode::Shared)?;
            let apps = crate::app::stored::list_apps(&store)?;
            let target = roots.clone().unwrap_or_default();
            let reach = |keep: &BTreeSet<String>| {
                let dropped = dropped_refs(&apps, keep);
                store.reachable_from(&|n| !dropped.contains(n), &target)
            };
            let (need_kept, need_previous) = (reach(&kept)?, reach(&with_previous)?);
            let need_target = reach(&without_dropped)?;
            let (mut unneeded, mut rollback, mut dropped_apps) = (0u64, 0u64, 0u64);
            for (digest, size) in store.list()? {
                let disk = crate::plan::space::round_up(size, block);
                if !need_previous.contains(&digest) {
                    unneeded = unneeded.saturating_add(disk);
                } else if !need_kept.contains(&digest) {
                    rollback = rollback.saturating_add(disk);
                } else if !need_target.contains(&digest) {
                    dropped_apps = dropped_apps.saturating_add(disk);
                }
            }
            // Without the target's blobs, a partial download of one of
            // them cannot be told from a stale one: none is offered.
            let mut partials = 0u64;
            if roots.is_some() {
                for ingest in store.ingests()? {
                    if !need_previous.contains(&ingest.digest) {
                        partials =
                            partials.saturating_add(store.partial_taken_bytes(&ingest.digest));
                    }
                }
            }
            anyhow::Ok((partials, unneeded, rollback, dropped_apps))
        })
        .await?;
        let data_root = self.engine.info().await?.data_root;
        let docker_dev = crate::plan::space::Volume::of(&data_root)?.dev;
        let images_of_previous = self.images_of(&sets.with_previous).await?;
        let images_kept = self.images_of(&sets.kept).await?;
        let dry = |keep| docker_prune::prune_docker_keeping(&self.root, &self.engine, true, keep);
        let docker_unneeded = dry(&images_of_previous).await?.freed_bytes;
        let docker_with_rollback = dry(&images_kept).await?.freed_bytes;
        // The dropped apps' images are installed and in use, so a dry prune
        // does not count them: their own bytes (layers no other image has).
        let images_left = self.images_of(&sets.without_dropped).await?;
        let docker_dropped = if sets.kept == sets.without_dropped {
            0
        } else {
            self.engine
                .image_disk_usage()
                .await?
                .images
                .iter()
                .filter(|i| images_kept.contains(&i.id) && !images_left.contains(&i.id))
                .map(|i| i.size.saturating_sub(i.shared_size.unwrap_or(0)))
                .sum()
        };
        let on = |pairs: &[(u64, u64)]| {
            let mut bytes = std::collections::BTreeMap::new();
            for (dev, n) in pairs {
                let entry: &mut u64 = bytes.entry(*dev).or_default();
                *entry = entry.saturating_add(*n);
            }
            bytes
        };
        Ok(vec![
            Candidate {
                what: Freeable::StalePartials,
                bytes: on(&[(store_dev, partials)]),
            },
            Candidate {
                what: Freeable::Unneeded,
                bytes: on(&[(store_dev, unneeded), (docker_dev, docker_unneeded)]),
            },
            Candidate {
                what: Freeable::RollbackCopy,
                bytes: on(&[
                    (store_dev, rollback),
                    (
                        docker_dev,
                        docker_with_rollback.saturating_sub(docker_unneeded),
                    ),
                ]),
            },
            Candidate {
                what: Freeable::DroppedApps,
                bytes: on(&[(store_dev, dropped_apps), (docker_dev, docker_dropped)]),
            },
        ])
    }

    async fn free(&self, what: Freeable, state: &DeviceState, to: &AppSet) -> Result<()> {
        let sets = RoomSets::of(state, to);
        let roots = self.target_blobs(to).await;
        match what {
            Freeable::StalePartials => {
                let Some(roots) = roots else { return Ok(()) };
                let store = self.store.clone();
                let with_previous = sets.with_previous.clone();
                crate::fsutil::blocking(move || {
                    let _lock = store.lock(crate::store::LockMode::Exclusive)?;
                    let apps = crate::app::stored::list_apps(&store)?;
                    let dropped = dropped_refs(&apps, &with_previous);
                    let need = store.reachable_from(&|n| !dropped.contains(n), &roots)?;
                    for ingest in store.ingests()? {
                        if !need.contains(&ingest.digest) {
                            match store.abort(&ingest.digest) {
                                Ok(_) | Err(crate::store::StoreError::IngestBusy { .. }) => {}
                                Err(e) => return Err(e.into()),
                            }
                        }
                    }
                    anyhow::Ok(())
                })
                .await?;
            }
            Freeable::Unneeded | Freeable::RollbackCopy => {
                let keep = if what == Freeable::Unneeded {
                    &sets.with_previous
                } else {
                    &sets.kept
                };
                let keep: Vec<AppRef> = keep.iter().map(|r| r.parse()).collect::<Result<_, _>>()?;
                self.prune_keeping(&keep, roots.unwrap_or_default()).await?;
            }
            Freeable::DroppedApps => {
                // `state` still names them; the caller's no longer does.
                for name in state.running.keys().filter(|n| !to.contains_key(*n)) {
                    self.stop(name).await?;
                    run_cmd::uninstall(self.device(), name.as_str()).await?;
                }
                let keep: Vec<AppRef> = sets
                    .without_dropped
                    .iter()
                    .map(|r| r.parse())
                    .collect::<Result<_, _>>()?;
                self.prune_keeping(&keep, roots.unwrap_or_default()).await?;
            }
        }
        Ok(())
    }

    async fn installed(&self) -> Result<AppSet> {
        let state = crate::engine::record::Installed::load(&self.root)?;
        state
            .apps
            .into_iter()
            .map(|(name, app)| Ok((name.parse()?, app.reference.parse()?)))
            .collect()
    }

    /// `syncfs` of Docker's data root and of the stowage root: the engine
    /// does not fsync the layer files it applies.
    async fn sync(&self) -> Result<()> {
        // Docker's data root (an engine on another machine: only a warning),
        // then the stowage root (store, apps directory, state).
        let data_root = self.engine.info().await?.data_root;
        install::flush_engine(&data_root).await?;
        let root = self.root.clone();
        crate::fsutil::blocking(move || {
            crate::fsutil::syncfs(&root)
                .with_context(|| format!("cannot flush the file system of {}", root.display()))
        })
        .await
    }

    fn writes(&self) -> Option<UpdateWrites> {
        self.wear.writes(&self.root)
    }

    fn event(&self, event: UpdateEvent) {
        (self.events)(&event);
    }
}

impl Supervised for LiveDevice<'_> {
    async fn status(&self) -> Result<Vec<AppStatus>> {
        run_cmd::ps(self.device()).await
    }

    async fn restart(&self, _name: &str, reference: &str) -> Result<()> {
        run_cmd::run(
            self.device(),
            &self.compose,
            &Selection::Named(vec![reference.to_string()]),
            &self.install,
            // Checked by the boot's and the agent's repair; the update's
            // start is the app's downtime, and it has just been installed.
            false,
            self.progress,
        )
        .await?;
        Ok(())
    }
}

impl AgentDevice for LiveDevice<'_> {
    async fn fits(&self, to: &AppSet) -> Result<CheckReport> {
        let mut apps = Vec::new();
        for reference in Self::refs(to) {
            apps.push(
                crate::app::fetch_app_to(
                    self.client,
                    &reference,
                    &self.architecture,
                    crate::app::Depth::Plan,
                )
                .await?,
            );
        }
        self.check(&apps).await
    }
}

/// The app set a list of references names: app name -> pinned reference.
/// Tags are resolved to digests first, so the set is exact. The set is the
/// whole of what should run: running apps it does not name are stopped.
pub async fn app_set(client: &RegistryClient, refs: &[ImageRef]) -> Result<AppSet> {
    let mut set = AppSet::new();
    for reference in refs {
        let pinned = match &reference.digest {
            Some(_) => reference.clone(),
            None => {
                let fetched = client
                    .get_manifest(
                        reference,
                        &[crate::oci::media::OCI_MANIFEST],
                        crate::oci::format::APP_MANIFEST_CAP,
                    )
                    .await?;
                reference.pinned(&fetched.digest)
            }
        };
        let pinned = AppRef::try_from(pinned)?;
        let name = pinned.name()?;
        if let Some(other) = set.insert(name.clone(), pinned.clone()) {
            bail!("two versions of app {name} were named: {other} and {pinned}");
        }
    }
    Ok(set)
}

/// The store's refs that forgetting every stored app outside `keep` removes:
/// those apps' own, and their images' that no kept app shares (as
/// [`admin::rm`] removes them).
fn dropped_refs(apps: &[admin::StoredApp], keep: &BTreeSet<String>) -> BTreeSet<String> {
    let (kept, dropped): (Vec<_>, Vec<_>) = apps.iter().partition(|a| keep.contains(&a.reference));
    let mut refs = BTreeSet::new();
    for app in dropped {
        refs.insert(app.reference.clone());
        for image in &app.images {
            if !kept
                .iter()
                .any(|k| k.images.iter().any(|i| i.pinned == image.pinned))
            {
                refs.insert(image.pinned.clone());
            }
        }
    }
    refs
}

/// The apps an attempt to make room keeps: `kept` (what runs and the
/// target) and `with_previous` (those and the rollback copy), as references.
struct RoomSets {
    kept: BTreeSet<String>,
    with_previous: BTreeSet<String>,
    /// `kept` less the apps the target drops.
    without_dropped: BTreeSet<String>,
}

impl RoomSets {
    fn of(state: &DeviceState, to: &AppSet) -> RoomSets {
        let kept: BTreeSet<String> = state
            .running
            .values()
            .chain(to.values())
            .map(AppRef::to_string)
            .collect();
        let mut with_previous = kept.clone();
        with_previous.extend(state.previous.values().map(AppRef::to_string));
        let without_dropped = state
            .running
            .iter()
            .filter(|(name, _)| to.contains_key(*name))
            .map(|(_, r)| r)
            .chain(to.values())
            .map(AppRef::to_string)
            .collect();
        RoomSets {
            kept,
            with_previous,
            without_dropped,
        }
    }
}
