//! `stowage rm NAME|REF`: forget stored apps. An installed app is
//! uninstalled first (refused while it has containers), so that one prune
//! then frees both stores.

use anyhow::Result;

use super::{Context, blocking};
use crate::app::stored::{RmReport, find_apps, rm};
use crate::engine::record::Installed;
use crate::engine::run::uninstall;

pub struct RmOptions {
    pub app: String,
    pub docker_host: Option<String>,
}

impl RmOptions {
    pub async fn run(self, ctx: &Context) -> Result<RmReport> {
        let store = ctx.store()?;
        let state = Installed::load(&ctx.root)?;
        let installed: Vec<String> = find_apps(&store, &self.app)?
            .into_iter()
            .filter(|a| {
                state
                    .apps
                    .get(&a.name)
                    .is_some_and(|r| r.reference == a.reference)
            })
            .map(|a| a.name)
            .collect();
        if !installed.is_empty() {
            let engine = ctx.engine(self.docker_host.as_deref()).await?;
            for name in &installed {
                uninstall(ctx.device(&store, &engine), name).await?;
            }
        }
        blocking(move || rm(&store, &self.app)).await
    }
}
