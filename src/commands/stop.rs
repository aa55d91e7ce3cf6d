//! `stowage stop NAME... | --all`: compose down; the images stay.

use anyhow::Result;

use super::Context;
use crate::engine::run::{Selection, StopReport, stop};
use crate::progress::Progress;

pub struct StopOptions {
    pub apps: Selection,
    pub docker_host: Option<String>,
}

impl StopOptions {
    pub async fn run(self, ctx: &Context, progress: &dyn Progress) -> Result<StopReport> {
        let store = ctx.store()?;
        let engine = ctx.engine(self.docker_host.as_deref()).await?;
        let compose = ctx.compose(self.docker_host.as_deref()).await?;
        stop(ctx.device(&store, &engine), &compose, &self.apps, progress).await
    }
}
