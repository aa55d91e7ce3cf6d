//! `stowage status`: what the agent last did (or, when no agent has run, the
//! device state the update transaction keeps), apart from what runs now as
//! the engine reports it, and when an app was last started again and why.

use anyhow::Result;
use serde::Serialize;

use super::Context;
use crate::engine::run::{AppState, AppStatus, ps};
use crate::update::agent::{AgentStatus, read_status};
use crate::update::reconcile::{Restart, failed_apps, last_restart};
use crate::update::transaction::{DeviceState, StateFiles, UpdateWrites};
use crate::update::tuf::client::{TrustedRole, trusted_roles};

#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// What the agent last did; `None` when no agent has run.
    #[serde(flatten)]
    pub agent: Option<Box<AgentStatus>>,
    /// The device state, when no agent has run.
    #[serde(flatten)]
    pub device: Option<DeviceState>,
    /// Each installed app and its services as the engine reports them now;
    /// an app the reconciliation gave up on is `failed`.
    pub live_apps: Vec<AppStatus>,
    /// When an app was last started again, and why.
    pub last_restart: Option<Restart>,
    /// Why the engine could not be asked, when it could not.
    pub docker_error: Option<String>,
    /// What the last committed update wrote to each volume (flash wear).
    pub last_update_writes: Option<UpdateWrites>,
    /// What the device trusts, when a trusted root is configured.
    pub trust: Option<TrustStatus>,
}

/// The trusted root and the versions and expiry of each role the device
/// verified last (empty before the first verification).
#[derive(Debug, Serialize)]
pub struct TrustStatus {
    pub trusted_root: std::path::PathBuf,
    pub hardware: Option<String>,
    pub roles: Vec<TrustedRole>,
}

pub async fn run(ctx: &Context, docker_host: Option<&str>) -> Result<StatusReport> {
    let mut device = StateFiles::under(&ctx.root).device()?;
    let last_update_writes = device.last_update_writes.take();
    let (agent, device) = match read_status(&ctx.root)? {
        Some(mut status) => {
            // What should run, even when a `stowage update` ran after the agent.
            status.apps = device.running;
            (Some(Box::new(status)), None)
        }
        None => (None, Some(device)),
    };
    let (mut live_apps, docker_error) = match live(ctx, docker_host).await {
        Ok(apps) => (apps, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    let failed = failed_apps(&ctx.root)?;
    for app in &mut live_apps {
        if app.state != AppState::Running && failed.contains(&app.name) {
            app.state = AppState::Failed;
        }
    }
    let trust = match ctx.trust() {
        Some(trust) => Some(TrustStatus {
            roles: trusted_roles(&trust.state_dir)?,
            trusted_root: trust.root_file,
            hardware: trust.hardware,
        }),
        None => None,
    };
    Ok(StatusReport {
        agent,
        device,
        live_apps,
        last_restart: last_restart(&ctx.root)?,
        docker_error,
        last_update_writes,
        trust,
    })
}

async fn live(ctx: &Context, docker_host: Option<&str>) -> Result<Vec<AppStatus>> {
    let store = ctx.store()?;
    let engine = ctx.engine(docker_host).await?;
    ps(ctx.device(&store, &engine)).await
}
