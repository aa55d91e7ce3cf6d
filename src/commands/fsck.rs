//! `stowage fsck [--quick] [--repair]`: every stored blob, then every
//! installed app's images and directory; `--repair` reloads from the blob
//! store what Docker lost.

use anyhow::Result;

use super::{Context, FitOptions, blocking};
use crate::app::stored::fsck;
use crate::engine::install::{InstalledCheck, verify_installed};
use crate::engine::record::Installed;
use crate::progress::Progress;
use crate::store::{FsckReport, Store};

pub struct FsckOptions {
    pub quick: bool,
    pub repair: bool,
    pub fit: FitOptions,
}

pub struct FsckBoth {
    pub store: FsckReport,
    pub installed: Vec<InstalledCheck>,
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
            });
        }
        let installed = match ctx.engine(self.fit.docker_host.as_deref()).await {
            Ok(engine) => {
                let options = ctx.install_options(&self.fit)?;
                verify_installed(ctx.device(&store, &engine), self.repair, &options, progress)
                    .await?
            }
            // The store's verdict still stands; the apps cannot be checked.
            Err(e) => state
                .apps
                .iter()
                .map(|(name, app)| InstalledCheck {
                    name: name.clone(),
                    reference: app.reference.clone(),
                    missing_images: Vec::new(),
                    directory_damaged: false,
                    repaired: false,
                    error: Some(format!("{e:#}")),
                })
                .collect(),
        };
        Ok(FsckBoth {
            store: report,
            installed,
        })
    }
}
