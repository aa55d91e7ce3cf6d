//! `stowage reconcile`: start again, with no network, every app the device
//! should run and does not (see [`crate::update::reconcile`]). The boot unit
//! runs it on devices without the agent; the agent does it at every poll.

use anyhow::Result;

use super::{Context, FitOptions};
use crate::progress::Progress;
use crate::update::reconcile::{ReconcileReport, reconcile};
use crate::update::transaction::{StateFiles, UpdateEvent, lock_updates};

pub struct ReconcileOptions {
    pub restart_limit: u32,
    pub fit: FitOptions,
}

impl ReconcileOptions {
    pub async fn run(self, ctx: &Context, progress: &dyn Progress) -> Result<ReconcileReport> {
        let client = ctx.registry_client()?;
        let quiet: &(dyn Fn(&UpdateEvent) + Send + Sync) = &|_| {};
        let device = ctx
            .live_device(&self.fit, &client, progress, None, quiet)
            .await?;
        // Not while an update or the agent changes what runs.
        let _lock = lock_updates(&ctx.root)?;
        reconcile(
            &device,
            &StateFiles::under(&ctx.root),
            &ctx.root,
            self.restart_limit,
        )
        .await
    }
}
