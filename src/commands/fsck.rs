//! `stowage fsck [--quick] [--deep] [--repair]`: every stored blob, then
//! every installed app's images, their layers as Docker holds them, and
//! its directory; `--repair` restores from the blob store what Docker lost
//! or damaged, with no network.

use anyhow::Result;

use super::{Context, FitOptions, blocking};
use crate::app::stored::fsck;
use crate::engine::record::Installed;
use crate::engine::repair::{
    EngineDamage, InstalledCheck, VerifyOptions, diagnose_stopped_engine, verify_installed,
};
use crate::progress::Progress;
use crate::store::{FsckReport, Store};

pub struct FsckOptions {
    /// The store's blobs by size only.
    pub quick: bool,
    /// Docker's layers by content too (every file hashed).
    pub deep: bool,
    pub repair: bool,
    pub fit: FitOptions,
}

pub struct FsckBoth {
    pub store: FsckReport,
    pub installed: Vec<InstalledCheck>,
    /// When the engine does not answer: what in its data root keeps it
    /// from starting, with the command that recovers it.
    pub engine: Vec<EngineDamage>,
}

impl FsckBoth {
    pub fn is_clean(&self) -> bool {
        self.store.is_clean() && self.installed.iter().all(|c| c.is_healthy())
    }
}

impl FsckOptions {
    pub async fn run(self, ctx: &Context, progress: &dyn Progress) -> Result<FsckBoth> {
        let store = if self.repair {
            Store::open_for_repair(&ctx.root)?
        } else {
            ctx.store()?
        };
        let report = {
            let (store, quick) = (store.clone(), self.quick);
            blocking(move || fsck(&store, quick)).await?
        };
        let state = Installed::load(&ctx.root)?;
        if state.apps.is_empty() {
            return Ok(FsckBoth {
                store: report,
                installed: Vec::new(),
                engine: Vec::new(),
            });
        }
        let verify = VerifyOptions {
            repair: self.repair,
            deep: self.deep,
        };
        let mut engine_damage = Vec::new();
        let engine = match ctx.engine(self.fit.docker_host.as_deref()).await {
            Ok(engine) => match engine.ping().await {
                Ok(()) => Ok(engine),
                Err(e) => Err(anyhow::Error::from(e)),
            },
            Err(e) => Err(e),
        };
        let installed = match engine {
            Ok(engine) => {
                let options = ctx.install_options(&self.fit)?;
                // Compose only to start again the apps a repair stopped.
                let compose = if self.repair {
                    ctx.compose(self.fit.docker_host.as_deref()).await.ok()
                } else {
                    None
                };
                verify_installed(
                    ctx.device(&store, &engine),
                    verify,
                    &options,
                    compose.as_ref(),
                    progress,
                )
                .await?
            }
            // The store's verdict still stands; the apps cannot be checked,
            // and the engine's data root may say why it does not answer.
            Err(e) => {
                let root = ctx.root.clone();
                engine_damage = blocking(move || diagnose_stopped_engine(&root)).await?;
                state
                    .apps
                    .iter()
                    .map(|(name, app)| InstalledCheck::unchecked(name, app, format!("{e:#}")))
                    .collect()
            }
        };
        Ok(FsckBoth {
            store: report,
            installed,
            engine: engine_damage,
        })
    }
}
