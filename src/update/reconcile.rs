//! Keeping the device running what it should run, with no network: after a
//! reboot or an engine restart the services of an app without a restart
//! policy are left exited, and a container may be killed by hand or by the
//! kernel. [`reconcile`] starts again (compose up, from the store and
//! Docker) every app that should run and does not.
//!
//! Which apps should run: those the device state (`state/device.json`, the
//! update transaction's) names; on a device that never ran an update, the
//! installed apps that were started (they have containers): an app stopped
//! with `stowage stop` has none and is left alone.
//!
//! A service that keeps exiting is not started forever: each app has a
//! budget of `limit` tries, spaced by a backoff counted in reconciliations
//! (0, 1, 3, 7 ... skipped between tries); found down after its last try,
//! it is reported as failed and left down. Its budget is restored when it is seen running, or
//! when another version of it is to run. The tries are kept in
//! `state/restarts.json`, so the budget holds across agent restarts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine::run::{AppState, AppStatus, ServiceStatus};
use crate::fsutil::write_atomic;
use crate::update::transaction::{AppSet, StateFiles};

/// Tries an app gets before it is reported as failed.
pub const DEFAULT_RESTART_LIMIT: u32 = 5;

/// What the reconciliation needs of the device.
#[allow(async_fn_in_trait)]
pub trait Supervised {
    /// The state of every installed app's services.
    async fn status(&self) -> Result<Vec<AppStatus>>;
    /// Starts `reference` as app `name` (installing it from the store first
    /// if needed); the services that run are left as they are.
    async fn restart(&self, name: &str, reference: &str) -> Result<()>;
}

/// One start of an app by the reconciliation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    pub app: String,
    /// Seconds since the epoch.
    pub at: u64,
    /// The services that were down, and why ("web: exited (code 137)").
    pub why: Vec<String>,
}

/// An app's budget of tries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Tries {
    reference: String,
    attempts: u32,
    /// Reconciliations still to skip before the next try.
    wait: u32,
    failed: bool,
}

/// `state/restarts.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Restarts {
    apps: BTreeMap<String, Tries>,
    last: Option<Restart>,
}

/// What the reconciliation did with one app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// It runs: nothing to do.
    Running,
    /// Started again (`attempt` of the budget).
    Started { attempt: u32, why: Vec<String> },
    /// Down, waiting out the backoff (this many more reconciliations).
    Waiting { reconciliations_left: u32 },
    /// Down, its budget spent: left down until it runs again or changes.
    GaveUp { attempts: u32, why: Vec<String> },
    /// Starting it failed (the error is said).
    Error { error: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppReconcile {
    pub name: String,
    pub reference: String,
    /// After the reconciliation: failed when its budget is spent.
    pub state: AppState,
    pub action: Action,
    pub services: Vec<ServiceStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReconcileReport {
    pub apps: Vec<AppReconcile>,
    /// The last time an app was started again, and why (this run or before).
    pub last_restart: Option<Restart>,
}

impl ReconcileReport {
    /// Every app runs, or was just started again.
    pub fn is_healthy(&self) -> bool {
        self.apps
            .iter()
            .all(|a| matches!(a.action, Action::Running | Action::Started { .. }))
    }
}

fn restarts_path(root: &Path) -> PathBuf {
    root.join("state").join("restarts.json")
}

fn load(root: &Path) -> Result<Restarts> {
    let path = restarts_path(root);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is damaged; remove it to start afresh", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Restarts::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn save(root: &Path, restarts: &Restarts) -> Result<()> {
    let path = restarts_path(root);
    crate::fsutil::ensure_dir(&root.join("state"), 0o700)?;
    write_atomic(&path, &serde_json::to_vec_pretty(restarts)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The apps that should run: the device state's, else the installed apps
/// that were started.
fn wanted(files: &StateFiles, status: &[AppStatus]) -> Result<AppSet> {
    Ok(match files.device_if_any()? {
        Some(state) => state.running,
        None => status
            .iter()
            .filter(|a| a.state != AppState::Stopped)
            .map(|a| Ok((a.name.parse()?, a.reference.parse()?)))
            .collect::<Result<_>>()?,
    })
}

/// Starts again every app that should run and does not, within its budget
/// of `limit` tries.
pub async fn reconcile(
    device: &impl Supervised,
    files: &StateFiles,
    root: &Path,
    limit: u32,
) -> Result<ReconcileReport> {
    let status = device.status().await?;
    let wanted = wanted(files, &status)?;
    let mut restarts = load(root)?;
    let wanted: BTreeMap<String, String> = wanted
        .iter()
        .map(|(name, reference)| (name.to_string(), reference.to_string()))
        .collect();
    restarts.apps.retain(|name, _| wanted.contains_key(name));
    let mut report = ReconcileReport::default();
    for (name, reference) in &wanted {
        let seen = status
            .iter()
            .find(|a| &a.name == name && &a.reference == reference);
        let services = seen.map(|a| a.services.clone()).unwrap_or_default();
        let tries = restarts.apps.entry(name.clone()).or_default();
        if &tries.reference != reference {
            *tries = Tries {
                reference: reference.clone(),
                ..Tries::default()
            };
        }
        let running = seen.is_some_and(|a| a.state == AppState::Running);
        let why: Vec<String> = match seen {
            Some(app) => app
                .services
                .iter()
                .filter(|s| !s.is_up())
                .map(|s| format!("{}: {}", s.service, s.why_down()))
                .collect(),
            None => vec![format!("{reference} is not the installed version")],
        };
        let (state, action) = if running {
            *tries = Tries {
                reference: reference.clone(),
                ..Tries::default()
            };
            (AppState::Running, Action::Running)
        } else if tries.failed || tries.attempts >= limit {
            tries.failed = true;
            let action = Action::GaveUp {
                attempts: tries.attempts,
                why,
            };
            (AppState::Failed, action)
        } else if tries.wait > 0 {
            tries.wait -= 1;
            let state = seen.map_or(AppState::Stopped, |a| a.state);
            let action = Action::Waiting {
                reconciliations_left: tries.wait,
            };
            (state, action)
        } else {
            tries.attempts += 1;
            // 0, 1, 3, 7 ... reconciliations between tries.
            tries.wait = (1u32 << (tries.attempts - 1).min(16)) - 1;
            tracing::warn!("starting app {name} again: {}", why.join(", "));
            restarts.last = Some(Restart {
                app: name.clone(),
                at: now(),
                why: why.clone(),
            });
            let attempt = tries.attempts;
            match device.restart(name, reference).await {
                Ok(()) => {
                    // A try that brings the app up for good restores its
                    // budget at once: after a power cut the next
                    // reconciliation may be the next boot's, and a device
                    // whose power fails again before that must not count
                    // each boot as a crash.
                    if stays_up(device, name, reference).await {
                        *tries = Tries {
                            reference: reference.clone(),
                            ..Tries::default()
                        };
                    }
                    (AppState::Running, Action::Started { attempt, why })
                }
                Err(e) => (
                    seen.map_or(AppState::Stopped, |a| a.state),
                    Action::Error {
                        error: format!("{e:#}"),
                    },
                ),
            }
        };
        report.apps.push(AppReconcile {
            name: name.clone(),
            reference: reference.clone(),
            state,
            action,
            services,
        });
    }
    report.last_restart = restarts.last.clone();
    save(root, &restarts)?;
    Ok(report)
}

/// How long a started app must be seen running for its try to count as a
/// success (the update's verification sees services twice a second apart).
const SETTLE: Duration = Duration::from_secs(1);

/// Whether app `name` at `reference` still runs [`SETTLE`] after a start.
async fn stays_up(device: &impl Supervised, name: &str, reference: &str) -> bool {
    tokio::time::sleep(SETTLE).await;
    device.status().await.is_ok_and(|status| {
        status
            .iter()
            .any(|a| a.name == name && a.reference == reference && a.state == AppState::Running)
    })
}

/// Which apps the reconciliation gave up on, for `stowage status`.
pub fn failed_apps(root: &Path) -> Result<Vec<String>> {
    Ok(load(root)?
        .apps
        .into_iter()
        .filter(|(_, t)| t.failed)
        .map(|(name, _)| name)
        .collect())
}

/// When an app was last started again, and why.
pub fn last_restart(root: &Path) -> Result<Option<Restart>> {
    Ok(load(root)?.last)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Apps whose services are up or down on cue; a restart brings an app
    /// up unless it crash-loops.
    struct FakeEngine {
        apps: Mutex<Vec<AppStatus>>,
        crash_loops: Vec<&'static str>,
        restarts: Mutex<Vec<String>>,
    }

    fn service(name: &str, state: &str) -> ServiceStatus {
        ServiceStatus {
            service: name.into(),
            container: format!("{name}-1"),
            state: state.into(),
            health: None,
            exit_code: (state == "exited").then_some(137),
        }
    }

    fn app(name: &str, reference: &str, state: AppState) -> AppStatus {
        let (web, db) = match state {
            AppState::Running => ("running", "running"),
            _ => ("exited", "running"),
        };
        AppStatus {
            name: name.into(),
            reference: reference.into(),
            state,
            services: vec![service("web", web), service("db", db)],
        }
    }

    impl Supervised for FakeEngine {
        async fn status(&self) -> Result<Vec<AppStatus>> {
            Ok(self.apps.lock().unwrap().clone())
        }
        async fn restart(&self, name: &str, reference: &str) -> Result<()> {
            self.restarts.lock().unwrap().push(name.to_string());
            if !self.crash_loops.contains(&name) {
                let mut apps = self.apps.lock().unwrap();
                apps.retain(|a| a.name != name);
                apps.push(app(name, reference, AppState::Running));
            }
            Ok(())
        }
    }

    fn engine(apps: Vec<AppStatus>, crash_loops: Vec<&'static str>) -> FakeEngine {
        FakeEngine {
            apps: Mutex::new(apps),
            crash_loops,
            restarts: Mutex::new(Vec::new()),
        }
    }

    /// App `name` at version `v`, pinned: `registry.local/NAME@sha256:...`.
    fn r(name: &str, v: &str) -> String {
        format!("registry.local/{name}@{}", crate::Digest::of(v.as_bytes()))
    }

    fn device_state(files: &StateFiles, apps: &[(&str, &str)]) {
        files
            .write_device(&crate::update::transaction::DeviceState {
                running: apps
                    .iter()
                    .map(|(n, v)| (n.parse().unwrap(), r(n, v).parse().unwrap()))
                    .collect(),
                previous: AppSet::new(),
                last_update_writes: None,
            })
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_exited_app_of_the_device_state_is_started_and_a_running_one_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::under(dir.path());
        device_state(&files, &[("shop", "r1"), ("blog", "r2")]);
        let device = engine(
            vec![
                app("shop", &r("shop", "r1"), AppState::Degraded),
                app("blog", &r("blog", "r2"), AppState::Running),
            ],
            vec![],
        );
        let report = reconcile(&device, &files, dir.path(), 3).await.unwrap();
        assert_eq!(*device.restarts.lock().unwrap(), vec!["shop".to_string()]);
        assert!(report.is_healthy());
        let shop = report.apps.iter().find(|a| a.name == "shop").unwrap();
        assert_eq!(
            shop.action,
            Action::Started {
                attempt: 1,
                why: vec!["web: exited (code 137)".into()]
            }
        );
        assert_eq!(report.last_restart.as_ref().unwrap().app, "shop");
        // Up now: the next reconciliation does nothing.
        let report = reconcile(&device, &files, dir.path(), 3).await.unwrap();
        assert!(report.apps.iter().all(|a| a.action == Action::Running));
        assert_eq!(device.restarts.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_loop_gets_its_budget_with_backoff_then_is_failed_and_left_down() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::under(dir.path());
        device_state(&files, &[("shop", "r1"), ("blog", "r2")]);
        let device = engine(
            vec![
                app("shop", &r("shop", "r1"), AppState::Degraded),
                app("blog", &r("blog", "r2"), AppState::Running),
            ],
            vec!["shop"],
        );
        let mut actions = Vec::new();
        for _ in 0..10 {
            let report = reconcile(&device, &files, dir.path(), 3).await.unwrap();
            let shop = report.apps.iter().find(|a| a.name == "shop").unwrap();
            actions.push(match &shop.action {
                Action::Started { attempt, .. } => format!("start {attempt}"),
                Action::Waiting { .. } => "wait".into(),
                Action::GaveUp { .. } => "failed".into(),
                other => format!("{other:?}"),
            });
            let blog = report.apps.iter().find(|a| a.name == "blog").unwrap();
            assert_eq!(blog.action, Action::Running);
        }
        assert_eq!(
            actions,
            [
                "start 1", "start 2", "wait", "start 3", "failed", "failed", "failed", "failed",
                "failed", "failed"
            ]
        );
        assert_eq!(failed_apps(dir.path()).unwrap(), vec!["shop".to_string()]);
        // A new version to run restores the budget.
        device_state(&files, &[("shop", "r9"), ("blog", "r2")]);
        device.apps.lock().unwrap()[0] = app("shop", &r("shop", "r9"), AppState::Degraded);
        let report = reconcile(&device, &files, dir.path(), 3).await.unwrap();
        let shop = report.apps.iter().find(|a| a.name == "shop").unwrap();
        assert!(matches!(shop.action, Action::Started { attempt: 1, .. }));
    }

    /// A device whose power fails again and again, each time before a
    /// second reconciliation sees the app running: each boot starts it at
    /// once, as the first (a power-cut torture found the app left down at
    /// the third boot, waiting out a backoff meant for crash loops).
    #[tokio::test(start_paused = true)]
    async fn an_app_that_stays_up_after_each_start_is_started_at_every_boot() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::under(dir.path());
        device_state(&files, &[("shop", "r1")]);
        let device = engine(
            vec![app("shop", &r("shop", "r1"), AppState::Degraded)],
            vec![],
        );
        for boot in 0..8 {
            let report = reconcile(&device, &files, dir.path(), 3).await.unwrap();
            assert!(
                matches!(report.apps[0].action, Action::Started { attempt: 1, .. }),
                "boot {boot}: {:?}",
                report.apps[0].action
            );
            // The power fails: the services are down at the next boot.
            device.apps.lock().unwrap()[0] = app("shop", &r("shop", "r1"), AppState::Degraded);
        }
        assert!(failed_apps(dir.path()).unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_device_state_started_apps_are_kept_running_and_stopped_ones_left() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::under(dir.path());
        let mut stopped = app("blog", &r("blog", "r2"), AppState::Stopped);
        for s in &mut stopped.services {
            s.container.clear();
        }
        let device = engine(
            vec![app("shop", &r("shop", "r1"), AppState::Degraded), stopped],
            vec![],
        );
        let report = reconcile(&device, &files, dir.path(), 3).await.unwrap();
        assert_eq!(*device.restarts.lock().unwrap(), vec!["shop".to_string()]);
        assert_eq!(report.apps.len(), 1);
    }
}
