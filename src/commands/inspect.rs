//! `stowage inspect REF`: an app in a registry, described (see
//! [`crate::app::inspect`]).

use anyhow::{Context as _, Result};

use super::Context;
use crate::app::inspect::{AppDescription, Inspect};

pub async fn run(ctx: &Context, app: &str) -> Result<AppDescription> {
    let client = ctx.registry_client()?;
    Inspect { app: app.parse()? }
        .run(&client)
        .await
        .context("cannot inspect the app")
}
