//! `stowage ls`: the apps in the store.

use anyhow::Result;

use super::{Context, blocking};
use crate::app::stored::{StoredApp, ls};

pub async fn run(ctx: &Context) -> Result<Vec<StoredApp>> {
    let store = ctx.store()?;
    blocking(move || ls(&store)).await
}
