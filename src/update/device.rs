//! `stowage update` and `stowage agent` on a real device: the update
//! transaction's steps ([`crate::update::transaction::DeviceOps`]) carried out with the
//! blob store, the Docker Engine and compose.

use std::collections::BTreeSet;
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
use crate::plan::space::Policy;
use crate::plan::{CheckReport, DockerView, Paths, check_update, refuse_unless_fits};
use crate::progress::Progress;
use crate::store::Store;
use crate::update::agent::AgentDevice;
use crate::update::pull::PullOptions;
use crate::update::reconcile::Supervised;
use crate::update::transaction::{
    AppSet, BlobsPruned, DeviceOps, ImagesPruned, PruneSummary, UpdateEvent,
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
        let reference = reference.to_string();
        install::install(self.device(), &reference, &self.install, self.progress).await?;
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
            let blobs = admin::prune(&store, false)?;
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
