//! `stowage run`, `stop` and `ps`: installed apps as compose projects.
//!
//! The project name is the app name and its directory `ROOT/apps/<name>`;
//! compose runs with the bundled file plus stowage's override, so every
//! service starts on the image stowage loaded and compose never contacts a
//! registry (see `compose`). `run` installs first whatever is missing (an
//! app never installed, images Docker lost, a directory a crash left
//! incomplete), so it works offline from the blob store alone. `run` and
//! `stop` hold the apps lock, so they never interleave with an install or a
//! prune; `ps` only reads.
//!
//! `--all` means every installed app (the record in
//! `ROOT/state/installed.json`).

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::engine::compose::{self, Compose};
use crate::engine::install::{Device, InstallOptions, InstallReport, install_locked, resolve_app};
use crate::engine::record::{self, APPS_LOCK_TIMEOUT, Installed};
use crate::progress::Progress;
use crate::store::LockMode;

/// Which apps a command is about.
#[derive(Debug, Clone)]
pub enum Selection {
    Named(Vec<String>),
    All,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub started: Vec<String>,
    pub installs: Vec<InstallReport>,
}

/// Installs (where needed) and starts each selected app; with
/// `check_layers`, the installed ones' images are checked first as a quick
/// `fsck` does, and what is damaged is restored from the blob store.
pub async fn run(
    device: Device<'_>,
    compose: &Compose,
    selection: &Selection,
    options: &InstallOptions,
    check_layers: bool,
    progress: &dyn Progress,
) -> Result<RunReport> {
    let _store_lock = device.store.lock_async(LockMode::Shared).await?;
    let _apps_lock = record::lock_apps_async(device.root, APPS_LOCK_TIMEOUT).await?;
    let mut state = Installed::load(device.root)?;
    let names: Vec<String> = match selection {
        Selection::Named(names) => names.clone(),
        Selection::All => state.apps.keys().cloned().collect(),
    };
    if names.is_empty() {
        bail!("no app is installed: name the apps to run (`stowage run NAME`)");
    }
    if check_layers {
        crate::engine::repair::repair_before_start(
            device,
            &mut state,
            &names,
            options,
            Some(compose),
            progress,
        )
        .await?;
    }
    let mut report = RunReport {
        started: Vec::new(),
        installs: Vec::new(),
    };
    for name in &names {
        let app = resolve_app(device.store, &state, name)?;
        let installed = install_locked(device, &mut state, &app, options, progress).await?;
        let record = state
            .apps
            .get(&app.name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("app {} vanished from the record", app.name))?;
        progress.step(format!("starting {}", app.name));
        compose
            .up(
                device.engine,
                &record.dir,
                &app.name,
                &record.compose_files(),
            )
            .await?;
        report.started.push(app.name.clone());
        report.installs.push(installed);
    }
    Ok(report)
}

#[derive(Debug, Clone, Serialize)]
pub struct StopReport {
    pub stopped: Vec<String>,
}

/// Brings each selected app down (containers and networks; images stay).
pub async fn stop(
    device: Device<'_>,
    compose: &Compose,
    selection: &Selection,
    progress: &dyn Progress,
) -> Result<StopReport> {
    let _apps_lock = record::lock_apps_async(device.root, APPS_LOCK_TIMEOUT).await?;
    let state = Installed::load(device.root)?;
    let names: Vec<String> = match selection {
        Selection::Named(names) => names.clone(),
        Selection::All => state.apps.keys().cloned().collect(),
    };
    let mut stopped = Vec::new();
    for name in names {
        let Some(record) = state.apps.get(&name) else {
            bail!("no app named {name:?} is installed (see `stowage ps`)");
        };
        progress.step(format!("stopping {name}"));
        compose
            .down(&record.dir, &name, &record.compose_files())
            .await?;
        stopped.push(name);
    }
    Ok(StopReport { stopped })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    /// Empty when the service has no container.
    pub container: String,
    /// running, exited, restarting, created, ... or "not created".
    pub state: String,
    pub health: Option<String>,
    pub exit_code: Option<i64>,
}

/// An app's state as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppState {
    /// Every service runs, and is healthy where it has a healthcheck.
    Running,
    /// Some service has a container that does not run (or is unhealthy).
    Degraded,
    /// No service has a container (`stowage stop`, or never started).
    Stopped,
    /// Started again too many times without staying up: left down and
    /// reported (the reconciliation's verdict, never `ps`'s).
    Failed,
}

impl AppState {
    pub fn as_str(self) -> &'static str {
        match self {
            AppState::Running => "running",
            AppState::Degraded => "degraded",
            AppState::Stopped => "stopped",
            AppState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppStatus {
    pub name: String,
    pub reference: String,
    pub state: AppState,
    pub services: Vec<ServiceStatus>,
}

impl ServiceStatus {
    /// Running, and healthy where it has a healthcheck.
    pub fn is_up(&self) -> bool {
        self.state == "running" && self.health.as_deref().is_none_or(|h| h == "healthy")
    }

    /// Why it is not up, in a few words ("exited (code 1)", "unhealthy").
    pub fn why_down(&self) -> String {
        match (self.state.as_str(), self.health.as_deref(), self.exit_code) {
            ("running", Some(health), _) => health.to_string(),
            ("exited", _, Some(code)) => format!("exited (code {code})"),
            (state, _, _) => state.to_string(),
        }
    }
}

/// The state of every installed app's services, read from the engine.
pub async fn ps(device: Device<'_>) -> Result<Vec<AppStatus>> {
    let state = Installed::load(device.root)?;
    let mut apps = Vec::new();
    for (name, record) in &state.apps {
        let containers = compose::ps(device.engine, name).await?;
        let mut services: Vec<ServiceStatus> = containers
            .into_iter()
            .map(|c| ServiceStatus {
                service: c.service,
                container: c.container,
                state: c.state,
                health: c.health,
                exit_code: c.exit_code,
            })
            .collect();
        let mut declared: Vec<&str> = record.images.iter().map(|i| i.service.as_str()).collect();
        declared.sort();
        declared.dedup();
        // A service behind a profile is not started by `compose up`: its
        // absence leaves the app running.
        let profiled =
            crate::app::compose_file::ComposeFile::load(&record.dir.join(&record.compose_file))
                .map(|c| c.profiled_services())
                .unwrap_or_default();
        for service in declared {
            if !services.iter().any(|s| s.service == service) && !profiled.contains(service) {
                services.push(ServiceStatus {
                    service: service.to_string(),
                    container: String::new(),
                    state: "not created".into(),
                    health: None,
                    exit_code: None,
                });
            }
        }
        services.sort_by(|a, b| (&a.service, &a.container).cmp(&(&b.service, &b.container)));
        let all_up = services.iter().all(ServiceStatus::is_up);
        let none = services.iter().all(|s| s.container.is_empty());
        apps.push(AppStatus {
            name: name.clone(),
            reference: record.reference.clone(),
            state: if all_up && !services.is_empty() {
                AppState::Running
            } else if none {
                AppState::Stopped
            } else {
                AppState::Degraded
            },
            services,
        });
    }
    Ok(apps)
}

/// Forgets the installation of app `name` (its record and directory), so
/// that prune may remove the images stowage loaded for it. Refused while
/// any of its containers exists. Returns whether it was installed.
pub async fn uninstall(device: Device<'_>, name: &str) -> Result<bool> {
    let _apps_lock = record::lock_apps_async(device.root, APPS_LOCK_TIMEOUT).await?;
    let mut state = Installed::load(device.root)?;
    let Some(record) = state.apps.get(name).cloned() else {
        return Ok(false);
    };
    let containers = compose::ps(device.engine, name).await?;
    if !containers.is_empty() {
        bail!(
            "app {name} still has containers ({}): stop it first (`stowage stop {name}`)",
            containers
                .iter()
                .map(|c| c.container.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    state.apps.remove(name);
    state.save(device.root)?;
    if record.dir.exists() {
        std::fs::remove_dir_all(&record.dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot remove the app directory {}: {e}",
                record.dir.display()
            )
        })?;
    }
    Ok(true)
}
