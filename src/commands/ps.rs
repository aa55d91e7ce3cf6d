//! `stowage ps`: each installed app's services and their state.

use anyhow::Result;

use super::Context;
use crate::engine::run::{AppStatus, ps};

pub async fn run(ctx: &Context, docker_host: Option<&str>) -> Result<Vec<AppStatus>> {
    let store = ctx.store()?;
    let engine = ctx.engine(docker_host).await?;
    ps(ctx.device(&store, &engine)).await
}
