//! `stowage agent --target REF [--interval D] [--once]`: poll a target and
//! apply it with the update transaction (see [`crate::update::agent`]).

use std::time::Duration;

use anyhow::{Context as _, Result};

use super::{Context, FitOptions};
use crate::engine::repair::{VerifyOptions, verify_installed};
use crate::progress::Progress;
use crate::update::agent::{AgentOptions as Agent, AgentStatus, SignedTarget, run_agent};
use crate::update::transaction::{UpdateEvent, UpdateOptions, lock_updates};
use crate::update::tuf::transport::Source;

pub struct AgentOptions {
    pub target: String,
    pub interval: Duration,
    pub verify_timeout: Duration,
    pub once: bool,
    /// How long one poll may spend on the registry (see the agent).
    pub cycle_timeout: Duration,
    pub restart_limit: u32,
    pub fit: FitOptions,
}

impl AgentOptions {
    /// Runs until killed, or after one poll with `once`; the status says how
    /// the last poll went (its `last_result` gives the exit code).
    pub async fn run(
        self,
        ctx: &Context,
        progress: &dyn Progress,
        events: &(dyn Fn(&UpdateEvent) + Send + Sync),
    ) -> Result<AgentStatus> {
        if ctx.trust().is_none() {
            tracing::warn!(
                "no trusted root is configured (--trusted-root, STOWAGE_TRUSTED_ROOT, trusted_root in the config file): target {} is applied without verifying who signed it",
                self.target
            );
        }
        let client = ctx.registry_client()?;
        let device = ctx
            .live_device(&self.fit, &client, progress, None, events)
            .await?;
        let target: crate::oci::reference::ImageRef = self.target.parse()?;
        let signed = match ctx.trust() {
            None => None,
            Some(trust) => Some(SignedTarget {
                trust,
                source: Source::Registry {
                    client: std::sync::Arc::new(ctx.registry_client()?),
                    repo: target.clone(),
                },
                name: target.tag.clone().with_context(|| {
                    format!("--target {target}: name the signed target (REGISTRY/REPO:NAME)")
                })?,
            }),
        };
        let options = Agent {
            target,
            signed,
            interval: self.interval,
            update: UpdateOptions {
                verify_timeout: self.verify_timeout,
                // The config file's `make_room`, as `stowage update` takes it.
                make_room: ctx.config.make_room.unwrap_or_default(),
            },
            once: self.once,
            cycle_deadline: self.cycle_timeout,
            restart_limit: self.restart_limit,
        };
        let _lock = lock_updates(&ctx.root)?;
        // Before anything runs: Docker's copy of the installed apps, which a
        // power cut may have damaged, restored from the blob store (a boot
        // unit may have done it already; then this is a quick check).
        repair_at_start(&device, progress).await;
        run_agent(&device, &client, &ctx.root, &options).await
    }
}

/// `fsck --repair`'s Docker side, quick; what it cannot repair is logged
/// (the update's recovery and the reconciliation then report the apps).
async fn repair_at_start(device: &crate::update::device::LiveDevice<'_>, progress: &dyn Progress) {
    let target = crate::engine::install::Device {
        root: &device.root,
        store: &device.store,
        engine: &device.engine,
    };
    let verify = VerifyOptions {
        repair: true,
        deep: false,
    };
    match verify_installed(
        target,
        verify,
        &device.install,
        Some(&device.compose),
        progress,
    )
    .await
    {
        Ok(checks) => {
            for check in checks {
                if check.repaired {
                    tracing::warn!("{}: restored Docker's copy from the blob store", check.name);
                }
                if let Some(e) = &check.error {
                    tracing::error!("{}: {e}", check.name);
                }
            }
        }
        Err(e) => tracing::error!("cannot check Docker's copy of the installed apps: {e:#}"),
    }
}
