//! `stowage run NAME... | --all`: install where needed, then start with
//! compose. Refused for space: the error is a [`crate::plan::DoesNotFit`].

use anyhow::Result;

use super::{Context, FitOptions};
use crate::engine::run::{RunReport, Selection, run};
use crate::progress::Progress;

pub struct RunOptions {
    pub apps: Selection,
    pub fit: FitOptions,
}

impl RunOptions {
    pub async fn run(self, ctx: &Context, progress: &dyn Progress) -> Result<RunReport> {
        let store = ctx.store()?;
        let engine = ctx.engine(self.fit.docker_host.as_deref()).await?;
        let compose = ctx.compose(self.fit.docker_host.as_deref()).await?;
        let options = ctx.install_options(&self.fit)?;
        run(
            ctx.device(&store, &engine),
            &compose,
            &self.apps,
            &options,
            true,
            progress,
        )
        .await
    }
}
