//! `stowage target publish|show`: the set of apps a fleet should run.

use anyhow::Result;

use super::{Context, parse_refs};
use crate::update::target::{Target, fetch_target, publish_target};

pub async fn publish(ctx: &Context, at: &str, apps: &[String]) -> Result<Target> {
    let client = ctx.registry_client()?;
    publish_target(&client, &at.parse()?, &parse_refs(apps)?).await
}

pub async fn show(ctx: &Context, at: &str) -> Result<Target> {
    let client = ctx.registry_client()?;
    fetch_target(&client, &at.parse()?).await
}
