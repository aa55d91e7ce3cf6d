//! `stowage agent --target REF [--interval D] [--once]`: poll a target and
//! apply it with the update transaction (see [`crate::update::agent`]).

use std::time::Duration;

use anyhow::Result;

use super::{Context, FitOptions};
use crate::progress::Progress;
use crate::update::agent::{AgentOptions as Agent, AgentStatus, run_agent};
use crate::update::transaction::{UpdateEvent, UpdateOptions, lock_updates};

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
        let client = ctx.registry_client()?;
        let device = ctx
            .live_device(&self.fit, &client, progress, None, events)
            .await?;
        let options = Agent {
            target: self.target.parse()?,
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
        run_agent(&device, &client, &ctx.root, &options).await
    }
}
