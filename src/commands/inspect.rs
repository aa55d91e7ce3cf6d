//! `stowage inspect REF`: an app in a registry, described (see
//! [`crate::app::inspect`]).

use anyhow::{Context as _, Result};

use super::Context;
use crate::app::StoreFirst;
use crate::app::inspect::{AppDescription, Inspect};

pub async fn run(ctx: &Context, app: &str) -> Result<AppDescription> {
    let registry = ctx.registry_client()?;
    let store = ctx.store()?;
    // A pinned app already pulled is described from the store.
    let source = StoreFirst {
        store: &store,
        registry: &registry,
    };
    Inspect { app: app.parse()? }
        .run(&source)
        .await
        .context("cannot inspect the app")
}
