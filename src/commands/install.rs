//! `stowage install NAME|REF`: load a stored app's images into Docker and
//! extract its bundle, with no network. Refused for space: the error is a
//! [`crate::plan::DoesNotFit`].

use anyhow::Result;

use super::{Context, FitOptions};
use crate::engine::install::{InstallReport, resolve_app};
use crate::engine::record::Installed;
use crate::engine::repair::install_repairing;
use crate::progress::Progress;

pub struct InstallOptions {
    pub app: String,
    pub fit: FitOptions,
}

impl InstallOptions {
    pub async fn run(self, ctx: &Context, progress: &dyn Progress) -> Result<InstallReport> {
        let store = ctx.store()?;
        let engine = ctx.engine(self.fit.docker_host.as_deref()).await?;
        let options = ctx.install_options(&self.fit)?;
        // Compose only to start again apps whose damaged images a repair
        // took away; without it they are started by `run` or the agent. A
        // first install repairs nothing, so it does not probe compose (a
        // process start each: `docker-compose version` takes about 0.4 s).
        let installed_before = Installed::load(&ctx.root).is_ok_and(|state| {
            resolve_app(&store, &state, &self.app)
                .is_ok_and(|app| state.apps.contains_key(&app.name))
        });
        let compose = if installed_before {
            ctx.compose(self.fit.docker_host.as_deref()).await.ok()
        } else {
            None
        };
        install_repairing(
            ctx.device(&store, &engine),
            &self.app,
            &options,
            compose.as_ref(),
            progress,
        )
        .await
    }
}
