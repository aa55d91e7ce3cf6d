//! The update transaction: take the device from the apps it runs to the apps
//! it should run, and never leave it with neither.
//!
//! Steps, each recorded in a durable journal (`ROOT/state/journal.json`,
//! replaced atomically) before it is taken:
//!
//! 1. `checking`/`pulling`: the fit check and the download. Nothing that runs
//!    is touched; a refusal (exit 100) or a failure leaves the device as it was.
//! 2. `installing`: images loaded into Docker under their own tags, bundles
//!    extracted. The running apps keep running.
//! 3. `stopping`: the apps being replaced, and those no longer wanted, stop.
//! 4. `starting` and `verifying`: the new apps start; every service must be
//!    running, and healthy where it has a healthcheck, within the timeout.
//! 5. `committed`: the device state (`ROOT/state/device.json`) names the new
//!    apps as running and the replaced ones as the rollback copy.
//!
//! A failure from step 3 on rolls back: the new apps stop and the previous
//! ones start again from the local store and Docker, with no network. After a
//! crash or power cut, [`recover`] reads the journal before anything else and
//! finishes or rolls back the interrupted update. Whatever the outcome but a
//! refusal for space, both stores are pruned of what neither the running
//! apps nor the rollback copy (nor, after a failure, a retry) need.
//!
//! A refusal for space carries the plan to make room
//! ([`crate::plan::room`]); with `make_room` allowing that plan, it is
//! carried out in order of harm before the check runs again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::fsutil::lock::{LockMode, Locked, lock_file};
use crate::fsutil::write_atomic;
use crate::oci::reference::{AppName, AppRef};
use crate::plan::room::{Candidate, Freeable, MakeRoom, RoomPlan, plan_room};
use crate::plan::{CheckReport, DoesNotFit};

/// Where the transaction is; every value is written before the step starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Pulling,
    Installing,
    Stopping,
    Starting,
    Verifying,
    RollingBack,
}

/// Apps by name -> reference (`REGISTRY/REPO@sha256:...`).
pub type AppSet = BTreeMap<AppName, AppRef>;

/// The journal of the update in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Journal {
    pub phase: Phase,
    /// What ran before the update.
    pub from: AppSet,
    /// What should run after it.
    pub to: AppSet,
    /// Why a rollback started, once one has.
    #[serde(default)]
    pub error: Option<String>,
}

/// What the device runs, and what it keeps to roll back to.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceState {
    pub running: AppSet,
    pub previous: AppSet,
    /// What the last committed update wrote to each volume (flash wear).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_writes: Option<UpdateWrites>,
}

/// Bytes an update wrote, for flash wear: the blob store's side as the
/// process's own I/O counters saw it (`write_bytes` of `/proc/self/io`:
/// blobs, bundle, state files), the engine's as its data root's growth
/// during the installs plus the temporary copies it wrote and deleted
/// (every archive sent to its load endpoint), and both per volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateWrites {
    pub store_bytes: u64,
    pub engine_bytes: u64,
    /// Of `engine_bytes`: the temporary copies.
    pub engine_temp_bytes: u64,
    pub volumes: Vec<VolumeWrites>,
}

/// Bytes an update wrote to one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeWrites {
    /// The paths on this volume (the store root, Docker's data root).
    pub paths: Vec<String>,
    pub bytes: u64,
}

pub struct StateFiles {
    dir: PathBuf,
}

impl StateFiles {
    pub fn under(root: &Path) -> StateFiles {
        StateFiles {
            dir: root.join("state"),
        }
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("journal.json")
    }

    fn device_path(&self) -> PathBuf {
        self.dir.join("device.json")
    }

    pub fn journal(&self) -> Result<Option<Journal>> {
        read_json(&self.journal_path())
    }

    pub fn write_journal(&self, journal: &Journal) -> Result<()> {
        self.write(&self.journal_path(), journal)
    }

    pub fn clear_journal(&self) -> Result<()> {
        match std::fs::remove_file(self.journal_path()) {
            Ok(()) => crate::fsutil::fsync_dir(&self.dir)
                .with_context(|| format!("cannot sync {}", self.dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                Err(e).with_context(|| format!("cannot remove {}", self.journal_path().display()))
            }
        }
    }

    pub fn device(&self) -> Result<DeviceState> {
        Ok(self.device_if_any()?.unwrap_or_default())
    }

    /// The device state, or `None` before the first update.
    pub fn device_if_any(&self) -> Result<Option<DeviceState>> {
        read_json(&self.device_path())
    }

    pub fn write_device(&self, state: &DeviceState) -> Result<()> {
        self.write(&self.device_path(), state)
    }

    fn write<T: Serialize>(&self, path: &Path, value: &T) -> Result<()> {
        crate::fsutil::ensure_dir(&self.dir, 0o700)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let bytes = serde_json::to_vec_pretty(value)?;
        write_atomic(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Held while an update or the agent runs: one transaction at a time.
pub struct UpdateLock {
    _file: std::fs::File,
}

/// Takes the update lock, failing at once when another update holds it.
pub fn lock_updates(root: &Path) -> Result<UpdateLock> {
    let dir = root.join("state");
    crate::fsutil::ensure_dir(&dir, 0o700)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("update.lock");
    let locked = lock_file(&path, LockMode::Exclusive, Duration::ZERO)
        .with_context(|| format!("cannot lock {}", path.display()))?;
    let file = match locked {
        Locked::Held(file) => file,
        Locked::Busy(pid) => anyhow::bail!(
            "another stowage update or agent{} is running on {}",
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            root.display()
        ),
    };
    Ok(UpdateLock { _file: file })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| {
            format!(
                "{} is damaged; move it aside to start afresh",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The device operations the transaction is made of. The real one drives
/// the store, Docker and compose; tests may stand in a fake to explore the
/// transaction's every failure point.
#[allow(async_fn_in_trait)]
pub trait DeviceOps {
    /// Fetches the apps, returning the fit check's report; an `Err` that is
    /// a [`DoesNotFit`] means the update was refused for space.
    async fn pull(&self, to: &AppSet) -> Result<CheckReport>;
    /// Loads images and extracts the bundle of one app, without starting it.
    async fn install(&self, reference: &AppRef) -> Result<()>;
    async fn start(&self, name: &AppName, reference: &AppRef) -> Result<()>;
    async fn stop(&self, name: &AppName) -> Result<()>;
    /// Every service running, and healthy where it has a healthcheck.
    async fn verify(&self, name: &AppName, timeout: Duration) -> Result<()>;
    /// The apps installed before stowage kept a device state (apps started
    /// with `stowage run`): what an update replaces when there is no state.
    async fn installed(&self) -> Result<AppSet>;
    /// Removes from both stores what `keep` does not need.
    async fn prune(&self, keep: &[AppRef]) -> Result<PruneSummary>;
    /// Makes what the new apps run on durable (Docker's layers, the
    /// extracted bundles) before the commit points at it.
    async fn sync(&self) -> Result<()>;
    fn event(&self, event: UpdateEvent);
    /// What each kind of [`Freeable`] would free now, per volume, for an
    /// update from `state` to `to`; never counting what `state.running` or
    /// `to` need. A device that cannot tell offers nothing.
    async fn room(&self, _state: &DeviceState, _to: &AppSet) -> Result<Vec<Candidate>> {
        Ok(Vec::new())
    }
    /// Frees one kind of [`Freeable`] that [`DeviceOps::room`] offered.
    async fn free(&self, what: Freeable, _state: &DeviceState, _to: &AppSet) -> Result<()> {
        anyhow::bail!("this device cannot free {}", what.label())
    }
    /// What this update wrote so far, when the device counts it.
    fn writes(&self) -> Option<UpdateWrites> {
        None
    }
}

/// What an update reports as it goes (JSON lines with `--json`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum UpdateEvent {
    Started {
        from: AppSet,
        to: AppSet,
    },
    Recovering {
        phase: Phase,
        from: AppSet,
        to: AppSet,
    },
    Check {
        report: Box<CheckReport>,
    },
    /// The update did not fit and `--make-room` allows the plan: what it
    /// frees before checking again.
    MakingRoom {
        plan: Box<RoomPlan>,
    },
    /// One kind of [`Freeable`] was freed.
    Freed {
        what: Freeable,
    },
    Installed {
        app: AppName,
        reference: AppRef,
    },
    Stopped {
        app: AppName,
    },
    AppStarted {
        app: AppName,
        reference: AppRef,
    },
    Verified {
        app: AppName,
    },
    Committed {
        running: AppSet,
        /// Bytes written per volume (flash wear), when counted.
        #[serde(skip_serializing_if = "Option::is_none")]
        writes: Option<UpdateWrites>,
    },
    RolledBack {
        running: AppSet,
        error: String,
    },
    Pruned {
        report: PruneSummary,
    },
    NothingToDo {
        running: AppSet,
    },
}

/// What the update's prune removed from both stores.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneSummary {
    pub blob_store: BlobsPruned,
    pub docker: ImagesPruned,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobsPruned {
    pub removed_blobs: usize,
    pub freed_bytes: u64,
    pub stale_ingest_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesPruned {
    pub removed_images: usize,
    pub freed_bytes: u64,
}

/// The outcome of an update.
#[derive(Debug)]
pub enum Outcome {
    Committed,
    Unchanged,
    RolledBack(anyhow::Error),
    /// Refused for space before anything was downloaded or touched.
    Refused(Box<CheckReport>),
    /// Failed before anything running was touched.
    Failed(anyhow::Error),
}

impl Outcome {
    /// The command's exit code: 0 committed or unchanged, 100 refused for
    /// space, 1 rolled back or failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Committed | Outcome::Unchanged => 0,
            Outcome::Refused(_) => DoesNotFit::EXIT_CODE,
            Outcome::RolledBack(_) | Outcome::Failed(_) => 1,
        }
    }
}

pub struct UpdateOptions {
    pub verify_timeout: Duration,
    /// What the update may free when it does not fit.
    pub make_room: MakeRoom,
}

/// Runs the whole transaction towards `to`.
pub async fn update(
    device: &impl DeviceOps,
    files: &StateFiles,
    to: AppSet,
    options: &UpdateOptions,
) -> Result<Outcome> {
    recover(device, files, options).await?;
    let mut state = match files.device_if_any()? {
        Some(state) => state,
        None => DeviceState {
            running: device.installed().await?,
            previous: AppSet::new(),
            last_update_writes: None,
        },
    };
    if state.running == to {
        device.event(UpdateEvent::NothingToDo { running: to });
        return Ok(Outcome::Unchanged);
    }
    let mut journal = Journal {
        phase: Phase::Pulling,
        from: state.running.clone(),
        to: to.clone(),
        error: None,
    };
    device.event(UpdateEvent::Started {
        from: journal.from.clone(),
        to: to.clone(),
    });
    files.write_journal(&journal)?;

    // Up to here a failure leaves what runs untouched (making room frees
    // only what neither the running apps nor the target need).
    let pulled = pull_making_room(device, files, &mut state, &to, options).await;
    let dropped_rollback = matches!(pulled, Ok((_, true)));
    if journal.from != state.running {
        // Apps the target drops were stopped to make room: the switch
        // neither stops them nor a rollback starts them.
        journal.from = state.running.clone();
        files.write_journal(&journal)?;
    }
    let prepared = async {
        let (check, _) = pulled?;
        device.event(UpdateEvent::Check {
            report: Box::new(check),
        });
        journal.phase = Phase::Installing;
        files.write_journal(&journal)?;
        for (name, reference) in &to {
            if state.running.get(name) != Some(reference) {
                device.install(reference).await?;
                device.event(UpdateEvent::Installed {
                    app: name.clone(),
                    reference: reference.clone(),
                });
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = prepared {
        files.clear_journal()?;
        return Ok(match e.downcast::<DoesNotFit>() {
            // A refusal frees nothing (`--make-room` decides what may go,
            // before the check); what the update downloaded is kept for a retry.
            Ok(refused) => Outcome::Refused(refused.report),
            Err(e) => {
                prune_quietly(device, &keep(&[&state.running, &state.previous, &to])).await;
                Outcome::Failed(e)
            }
        });
    }

    let switched = switch(device, files, &mut journal, options).await;
    match switched {
        Ok(()) => {
            let new_state = DeviceState {
                running: to.clone(),
                // The rollback copy was dropped to make room: the
                // replaced version is not kept either (the device has
                // shown it lacks the room for one).
                previous: if dropped_rollback {
                    AppSet::new()
                } else {
                    changed(&state.running, &to)
                },
                last_update_writes: device.writes(),
            };
            // A committed state must never point at layers still in the page cache.
            device.sync().await?;
            files.write_device(&new_state)?;
            files.clear_journal()?;
            device.event(UpdateEvent::Committed {
                running: to,
                writes: new_state.last_update_writes.clone(),
            });
            prune_quietly(device, &keep(&[&new_state.running, &new_state.previous])).await;
            Ok(Outcome::Committed)
        }
        Err(e) => {
            journal.error = Some(format!("{e:#}"));
            roll_back(device, files, &mut journal).await?;
            // Keep the new version's blobs too: a retry needs them.
            prune_quietly(device, &keep(&[&state.running, &state.previous, &to])).await;
            Ok(Outcome::RolledBack(e))
        }
    }
}

/// The pull, and when it is refused for space, the plan to make room: a
/// refusal carries the plan; when `options.make_room` allows the plan (and
/// the plan makes the update fit) it is carried out, in order of harm, and
/// the pull tried again. Returns the check and whether the rollback copy
/// was dropped.
async fn pull_making_room(
    device: &impl DeviceOps,
    files: &StateFiles,
    state: &mut DeviceState,
    to: &AppSet,
    options: &UpdateOptions,
) -> Result<(CheckReport, bool)> {
    let mut refused = match device.pull(to).await {
        Ok(check) => return Ok((check, false)),
        Err(e) => e.downcast::<DoesNotFit>()?,
    };
    let plan = room_plan(device, state, to, &refused.report).await;
    if !plan.allowed_by(options.make_room) {
        // Nothing is freed: not allowed, or not enough even if it were.
        refused.report.make_room = Some(plan);
        return Err(refused.into());
    }
    device.event(UpdateEvent::MakingRoom {
        plan: Box::new(plan.clone()),
    });
    let mut dropped = false;
    for item in plan.chosen() {
        // The state stops naming what goes before it goes, so that a crash
        // never leaves a state that points at removed images.
        let before = state.clone();
        if item.what == Freeable::RollbackCopy && !state.previous.is_empty() {
            state.previous.clear();
            files.write_device(state)?;
        }
        if item.what == Freeable::DroppedApps {
            // The apps the target drops stop now, not at the switch, and a
            // rollback does not bring them back.
            state.running.retain(|name, _| to.contains_key(name));
            files.write_device(state)?;
        }
        dropped |= item.what == Freeable::RollbackCopy;
        device.free(item.what, &before, to).await?;
        device.event(UpdateEvent::Freed { what: item.what });
    }
    match device.pull(to).await {
        Ok(check) => Ok((check, dropped)),
        Err(e) => {
            let mut refused = e.downcast::<DoesNotFit>()?;
            refused.report.make_room = Some(room_plan(device, state, to, &refused.report).await);
            Err(refused.into())
        }
    }
}

/// The plan to make room for a refused update; a device that cannot say
/// what it could free offers nothing (and the refusal says so).
pub async fn room_plan(
    device: &impl DeviceOps,
    state: &DeviceState,
    to: &AppSet,
    report: &CheckReport,
) -> RoomPlan {
    let candidates = match device.room(state, to).await {
        Ok(candidates) => candidates,
        Err(e) => {
            tracing::warn!("cannot tell what could be freed to make room: {e:#}");
            Vec::new()
        }
    };
    plan_room(&report.fit, &candidates)
}

/// Steps 3 and 4: stop what goes, start what comes, verify.
async fn switch(
    device: &impl DeviceOps,
    files: &StateFiles,
    journal: &mut Journal,
    options: &UpdateOptions,
) -> Result<()> {
    journal.phase = Phase::Stopping;
    files.write_journal(journal)?;
    for name in journal.from.keys() {
        if journal.to.get(name) != journal.from.get(name) {
            device.stop(name).await?;
            device.event(UpdateEvent::Stopped { app: name.clone() });
        }
    }
    journal.phase = Phase::Starting;
    files.write_journal(journal)?;
    for (name, reference) in &journal.to {
        if journal.from.get(name) != Some(reference) {
            device.start(name, reference).await?;
            device.event(UpdateEvent::AppStarted {
                app: name.clone(),
                reference: reference.clone(),
            });
        }
    }
    journal.phase = Phase::Verifying;
    files.write_journal(journal)?;
    for name in journal.to.keys() {
        device.verify(name, options.verify_timeout).await?;
        device.event(UpdateEvent::Verified { app: name.clone() });
    }
    Ok(())
}

/// Stops the new apps and starts the previous ones again, from what is on
/// the device. Idempotent, so that a crash during a rollback resumes it.
async fn roll_back(
    device: &impl DeviceOps,
    files: &StateFiles,
    journal: &mut Journal,
) -> Result<()> {
    journal.phase = Phase::RollingBack;
    files.write_journal(journal)?;
    for name in journal.to.keys() {
        if journal.from.get(name) != journal.to.get(name) {
            // Best effort: an app that never started has nothing to stop.
            if let Err(e) = device.stop(name).await {
                tracing::warn!("rollback: cannot stop {name}: {e:#}");
            }
        }
    }
    for (name, reference) in &journal.from {
        device
            .install(reference)
            .await
            .with_context(|| format!("rollback: cannot reinstall {name} from the local store"))?;
        device
            .start(name, reference)
            .await
            .with_context(|| format!("rollback: cannot start {name} again"))?;
    }
    // As at a commit: the state written must not point at layers the
    // reinstall left in the page cache.
    device.sync().await?;
    let state = files.device()?;
    files.write_device(&DeviceState {
        running: journal.from.clone(),
        previous: state.previous,
        last_update_writes: state.last_update_writes,
    })?;
    files.clear_journal()?;
    device.event(UpdateEvent::RolledBack {
        running: journal.from.clone(),
        error: journal.error.clone().unwrap_or_default(),
    });
    Ok(())
}

/// Finishes or rolls back an update a crash interrupted. Before `stopping`
/// nothing that ran was touched: the update is simply dropped (the previous
/// apps are started again in case the crash took them down). An update
/// whose commit was written (the device state names the new apps) is
/// finished. Otherwise, from `stopping` on, it is rolled back.
pub async fn recover(
    device: &impl DeviceOps,
    files: &StateFiles,
    _options: &UpdateOptions,
) -> Result<()> {
    let Some(mut journal) = files.journal()? else {
        return Ok(());
    };
    device.event(UpdateEvent::Recovering {
        phase: journal.phase,
        from: journal.from.clone(),
        to: journal.to.clone(),
    });
    // The commit writes the device state, then removes the journal: a crash
    // between the two leaves a verified update that only needs the journal
    // gone. (A rollback writes the state with the old apps, never the new.)
    let state = files.device()?;
    if journal.phase == Phase::Verifying
        && journal.to != journal.from
        && state.running == journal.to
    {
        files.clear_journal()?;
        device.event(UpdateEvent::Committed {
            running: journal.to.clone(),
            writes: state.last_update_writes.clone(),
        });
        return Ok(());
    }
    if journal.phase < Phase::Stopping {
        for (name, reference) in &journal.from {
            device.install(reference).await?;
            device.start(name, reference).await?;
        }
        files.clear_journal()?;
        return Ok(());
    }
    if journal.error.is_none() {
        journal.error =
            Some(format!("the update was interrupted while {:?}", journal.phase).to_lowercase());
    }
    roll_back(device, files, &mut journal).await
}

async fn prune_quietly(device: &impl DeviceOps, keep: &[AppRef]) {
    match device.prune(keep).await {
        Ok(report) => device.event(UpdateEvent::Pruned { report }),
        Err(e) => tracing::warn!("prune after the update failed: {e:#}"),
    }
}

/// Every version the sets name, each once: an app's name may stand for
/// another version in each set, and both are kept.
fn keep(sets: &[&AppSet]) -> Vec<AppRef> {
    let mut out: Vec<AppRef> = Vec::new();
    for reference in sets.iter().flat_map(|set| set.values()) {
        if !out.contains(reference) {
            out.push(reference.clone());
        }
    }
    out
}

/// The apps of `old` that `new` replaces or drops: the rollback copy.
fn changed(old: &AppSet, new: &AppSet) -> AppSet {
    old.iter()
        .filter(|(name, reference)| new.get(*name) != Some(*reference))
        .map(|(n, r)| (n.clone(), r.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A device whose steps succeed or fail on cue, recording what it did.
    #[derive(Default)]
    struct FakeDevice {
        fail_at: Option<&'static str>,
        /// The pull is refused for space.
        refuse: bool,
        /// Refused for space while the volume lacks this many bytes; each
        /// kind freed gives back what `room` offers for it.
        short_by: Mutex<u64>,
        offers: Vec<(Freeable, u64)>,
        log: Mutex<Vec<String>>,
        running: Mutex<AppSet>,
    }

    impl FakeDevice {
        fn step(&self, what: &str) -> Result<()> {
            self.log.lock().unwrap().push(what.to_string());
            if self.fail_at.is_some_and(|f| what.starts_with(f)) {
                anyhow::bail!("{what} failed on cue");
            }
            Ok(())
        }
    }

    impl DeviceOps for FakeDevice {
        async fn pull(&self, _to: &AppSet) -> Result<CheckReport> {
            self.step("pull")?;
            let short = *self.short_by.lock().unwrap();
            if short > 0 {
                return Err(DoesNotFit {
                    report: Box::new(short_report(short)),
                }
                .into());
            }
            if self.refuse {
                return Err(DoesNotFit {
                    report: Box::new(CheckReport::default()),
                }
                .into());
            }
            Ok(CheckReport::default())
        }
        async fn install(&self, reference: &AppRef) -> Result<()> {
            self.step(&format!("install {}", label(reference)))
        }
        async fn start(&self, name: &AppName, reference: &AppRef) -> Result<()> {
            self.step(&format!("start {}", label(reference)))?;
            self.running
                .lock()
                .unwrap()
                .insert(name.clone(), reference.clone());
            Ok(())
        }
        async fn stop(&self, name: &AppName) -> Result<()> {
            self.step(&format!("stop {name}"))?;
            self.running.lock().unwrap().remove(name);
            Ok(())
        }
        async fn verify(&self, name: &AppName, _timeout: Duration) -> Result<()> {
            let reference = self
                .running
                .lock()
                .unwrap()
                .get(name)
                .map(label)
                .unwrap_or_default();
            self.step(&format!("verify {reference}"))
        }
        async fn prune(&self, _keep: &[AppRef]) -> Result<PruneSummary> {
            Ok(PruneSummary::default())
        }
        async fn installed(&self) -> Result<AppSet> {
            Ok(self.running.lock().unwrap().clone())
        }
        async fn sync(&self) -> Result<()> {
            self.step("sync")
        }
        fn event(&self, _event: UpdateEvent) {}
        async fn room(&self, _state: &DeviceState, _to: &AppSet) -> Result<Vec<Candidate>> {
            Ok(self
                .offers
                .iter()
                .map(|(what, bytes)| Candidate {
                    what: *what,
                    bytes: [(1, *bytes)].into(),
                })
                .collect())
        }
        async fn free(&self, what: Freeable, _state: &DeviceState, _to: &AppSet) -> Result<()> {
            self.step(&format!("free {}", what.label()))?;
            let bytes = self
                .offers
                .iter()
                .find(|(w, _)| *w == what)
                .map_or(0, |o| o.1);
            let mut short = self.short_by.lock().unwrap();
            *short = short.saturating_sub(bytes);
            Ok(())
        }
    }

    /// A report of one volume (dev 1) that lacks `short` bytes.
    fn short_report(short: u64) -> CheckReport {
        let mut report = CheckReport::default();
        report.fit.volumes.push(crate::plan::space::VolumeReport {
            paths: vec!["/store (blobs)".into()],
            dev: 1,
            block_size: 4096,
            size: 1 << 30,
            free: 100,
            reserved: 0,
            available: 100,
            required: 100 + short,
            required_parts: Default::default(),
            peak_step: crate::plan::space::Step::Install,
            steps: Default::default(),
            sum_of_parts: 100 + short,
            inodes_free: 10,
            inodes_required: 1,
            fits: false,
            reason: "short".into(),
        });
        report
    }

    fn with_make_room(make_room: MakeRoom) -> UpdateOptions {
        UpdateOptions {
            make_room,
            ..options()
        }
    }

    fn short_device(short: u64) -> FakeDevice {
        FakeDevice {
            short_by: Mutex::new(short),
            offers: vec![
                (Freeable::StalePartials, 10),
                (Freeable::Unneeded, 40),
                (Freeable::RollbackCopy, 100),
            ],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_refusal_lists_the_plan_and_frees_nothing_without_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::under(dir.path());
        start_at(&files, set(&[("shop", "v1")]));
        let device = short_device(30);
        let outcome = update(&device, &files, set(&[("shop", "v2")]), &options())
            .await
            .unwrap();
        let Outcome::Refused(report) = outcome else {
            panic!("expected a refusal: {outcome:?}");
        };
        let plan = report.make_room.expect("a plan");
        assert_eq!(plan.free_first, 2);
        assert_eq!(plan.make_room, Some(MakeRoom::Prune));
        let log = device.log.lock().unwrap().clone();
        assert_eq!(log, ["pull"]);
    }

    #[tokio::test]
    async fn make_room_frees_the_plan_in_order_and_the_update_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::under(dir.path());
        files
            .write_device(&DeviceState {
                running: set(&[("shop", "v1")]),
                previous: set(&[("shop", "v0")]),
                last_update_writes: None,
            })
            .unwrap();
        // 120 short: partials and unneeded (50) are not enough.
        let device = short_device(120);
        let outcome = update(
            &device,
            &files,
            set(&[("shop", "v2")]),
            &with_make_room(MakeRoom::Prune),
        )
        .await
        .unwrap();
        assert!(matches!(outcome, Outcome::Refused(_)), "{outcome:?}");
        assert!(
            !device
                .log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.starts_with("free")),
            "prune does not allow the plan: nothing is freed"
        );
        assert_eq!(files.device().unwrap().previous, set(&[("shop", "v0")]));

        let outcome = update(
            &device,
            &files,
            set(&[("shop", "v2")]),
            &with_make_room(MakeRoom::DropRollback),
        )
        .await
        .unwrap();
        assert!(matches!(outcome, Outcome::Committed), "{outcome:?}");
        let log = device.log.lock().unwrap().clone();
        let frees: Vec<&String> = log.iter().filter(|l| l.starts_with("free")).collect();
        assert_eq!(
            frees,
            [
                "free stale partial downloads",
                "free blobs and images no app needs (what `stowage prune` frees)",
                "free the rollback copy"
            ]
        );
        // The rollback copy is gone and none is kept after the commit.
        let state = files.device().unwrap();
        assert_eq!(state.running, set(&[("shop", "v2")]));
        assert!(state.previous.is_empty());
    }

    #[tokio::test]
    async fn when_even_all_of_it_does_not_fit_nothing_is_freed() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::under(dir.path());
        start_at(&files, set(&[("shop", "v1")]));
        let device = short_device(1000);
        let outcome = update(
            &device,
            &files,
            set(&[("shop", "v2")]),
            &with_make_room(MakeRoom::DropRollback),
        )
        .await
        .unwrap();
        let Outcome::Refused(report) = outcome else {
            panic!("expected a refusal: {outcome:?}");
        };
        let plan = report.make_room.expect("a plan");
        assert!(!plan.fits_after);
        assert_eq!(plan.still_short[0].bytes, 1000 - 150);
        assert_eq!(device.log.lock().unwrap().clone(), ["pull"]);
    }

    /// App `name` at version `v`: `registry.local/NAME:V@sha256:...`, the
    /// tag kept so that the log names the version.
    fn set(pairs: &[(&str, &str)]) -> AppSet {
        pairs
            .iter()
            .map(|(name, v)| {
                let reference = format!(
                    "registry.local/{name}:{v}@{}",
                    crate::Digest::of(v.as_bytes())
                );
                (name.parse().unwrap(), reference.parse().unwrap())
            })
            .collect()
    }

    fn label(reference: &AppRef) -> String {
        reference.image().tag.clone().unwrap_or_default()
    }

    fn options() -> UpdateOptions {
        UpdateOptions {
            verify_timeout: Duration::from_secs(1),
            make_room: MakeRoom::None,
        }
    }

    fn start_at(files: &StateFiles, running: AppSet) {
        files
            .write_device(&DeviceState {
                running,
                previous: AppSet::new(),
                last_update_writes: None,
            })
            .unwrap();
    }

    #[tokio::test]
    async fn a_verified_update_commits_and_keeps_the_old_version_for_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::under(dir.path());
        start_at(&files, set(&[("shop", "v1")]));
        let device = FakeDevice::default();
        device
            .running
            .lock()
            .unwrap()
            .extend(set(&[("shop", "v1")]));
        let outcome = update(&device, &files, set(&[("shop", "v2")]), &options())
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Committed));
        let state = files.device().unwrap();
        assert_eq!(state.running, set(&[("shop", "v2")]));
        assert_eq!(state.previous, set(&[("shop", "v1")]));
        assert!(files.journal().unwrap().is_none());
        // v1 ran until v2 was installed: the stop comes after the install.
        let log = device.log.lock().unwrap().clone();
        let install = log.iter().position(|l| l == "install v2").unwrap();
        let stop = log.iter().position(|l| l == "stop shop").unwrap();
        assert!(install < stop, "{log:?}");
        // The engine's layers are flushed after the verify, before the commit.
        let verify = log.iter().position(|l| l.starts_with("verify")).unwrap();
        let sync = log.iter().position(|l| l == "sync").unwrap();
        assert!(verify < sync, "{log:?}");
    }

    #[tokio::test]
    async fn a_failing_new_version_rolls_back_to_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::under(dir.path());
        start_at(&files, set(&[("shop", "v2")]));
        let device = FakeDevice {
            fail_at: Some("verify v3"),
            ..Default::default()
        };
        let outcome = update(&device, &files, set(&[("shop", "v3")]), &options())
            .await
            .unwrap();
        let Outcome::RolledBack(e) = outcome else {
            panic!("expected a rollback");
        };
        assert!(format!("{e:#}").contains("verify v3"));
        // The old version is reinstalled, then everything flushed, before
        // the state naming it is written.
        let log = device.log.lock().unwrap().clone();
        let reinstall = log.iter().rposition(|l| l == "install v2").unwrap();
        let sync = log.iter().rposition(|l| l == "sync").unwrap();
        assert!(reinstall < sync, "{log:?}");
        assert_eq!(files.device().unwrap().running, set(&[("shop", "v2")]));
        assert_eq!(
            device.running.lock().unwrap().clone(),
            set(&[("shop", "v2")])
        );
        assert!(files.journal().unwrap().is_none());
    }

    #[tokio::test]
    async fn a_pull_refused_for_space_is_a_refusal_exiting_100_that_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::under(dir.path());
        start_at(&files, set(&[("shop", "v1")]));
        let device = FakeDevice {
            refuse: true,
            ..Default::default()
        };
        let outcome = update(&device, &files, set(&[("shop", "v2")]), &options())
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Refused(_)), "{outcome:?}");
        assert_eq!(outcome.exit_code(), 100);
        let log = device.log.lock().unwrap().clone();
        assert!(!log.iter().any(|l| l.starts_with("stop")), "{log:?}");
        assert!(files.journal().unwrap().is_none());
        assert_eq!(files.device().unwrap().running, set(&[("shop", "v1")]));
    }

    #[tokio::test]
    async fn a_failed_pull_touches_nothing_that_runs() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::under(dir.path());
        start_at(&files, set(&[("shop", "v1")]));
        let device = FakeDevice {
            fail_at: Some("pull"),
            ..Default::default()
        };
        let outcome = update(&device, &files, set(&[("shop", "v2")]), &options())
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Failed(_)));
        let log = device.log.lock().unwrap().clone();
        assert!(!log.iter().any(|l| l.starts_with("stop")), "{log:?}");
        assert_eq!(files.device().unwrap().running, set(&[("shop", "v1")]));
    }

    #[tokio::test]
    async fn an_update_interrupted_after_its_commit_was_written_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::under(dir.path());
        files
            .write_device(&DeviceState {
                running: set(&[("shop", "v2")]),
                previous: set(&[("shop", "v1")]),
                last_update_writes: None,
            })
            .unwrap();
        files
            .write_journal(&Journal {
                phase: Phase::Verifying,
                from: set(&[("shop", "v1")]),
                to: set(&[("shop", "v2")]),
                error: None,
            })
            .unwrap();
        let device = FakeDevice::default();
        recover(&device, &files, &options()).await.unwrap();
        assert!(files.journal().unwrap().is_none());
        let state = files.device().unwrap();
        assert_eq!(state.running, set(&[("shop", "v2")]));
        assert_eq!(state.previous, set(&[("shop", "v1")]));
        // Nothing was stopped or started again.
        assert!(device.log.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_interrupted_update_is_rolled_back_at_the_next_start() {
        for phase in [
            Phase::Pulling,
            Phase::Installing,
            Phase::Stopping,
            Phase::Starting,
            Phase::Verifying,
            Phase::RollingBack,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let files = StateFiles::under(dir.path());
            start_at(&files, set(&[("shop", "v1")]));
            files
                .write_journal(&Journal {
                    phase,
                    from: set(&[("shop", "v1")]),
                    to: set(&[("shop", "v2")]),
                    error: None,
                })
                .unwrap();
            let device = FakeDevice::default();
            recover(&device, &files, &options()).await.unwrap();
            assert!(files.journal().unwrap().is_none(), "{phase:?}");
            assert_eq!(
                files.device().unwrap().running,
                set(&[("shop", "v1")]),
                "{phase:?}"
            );
            assert_eq!(
                device
                    .running
                    .lock()
                    .unwrap()
                    .get(&"shop".parse().unwrap())
                    .map(label)
                    .as_deref(),
                Some("v1"),
                "{phase:?}"
            );
        }
    }
}
