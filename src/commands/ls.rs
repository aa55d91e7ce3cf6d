//! `stowage ls`: the apps in the store.

use anyhow::Result;

use super::Context;
use crate::app::stored::{StoredApp, ls};

pub fn run(ctx: &Context) -> Result<Vec<StoredApp>> {
    ls(&ctx.store()?)
}
