//! `stowage prune [--dry-run]`: both stores. The blob store loses every blob
//! no stored app needs; Docker loses the images stowage loaded that no
//! installed app references. When Docker cannot be reached, its images are
//! left alone and the report says why.

use anyhow::Result;

use super::{Context, blocking};
use crate::app::stored::prune;
use crate::engine::prune::{DockerPruneReport, prune_docker};
use crate::store::PruneReport;

pub struct PruneOptions {
    pub dry_run: bool,
    pub docker_host: Option<String>,
}

pub struct PruneBoth {
    pub blobs: PruneReport,
    /// Docker's side, or why it was left alone.
    pub docker: Result<DockerPruneReport, String>,
}

impl PruneOptions {
    pub async fn run(self, ctx: &Context) -> Result<PruneBoth> {
        let store = ctx.store()?;
        let dry_run = self.dry_run;
        let blobs = blocking(move || prune(&store, dry_run)).await?;
        let docker = match ctx.engine(self.docker_host.as_deref()).await {
            Ok(engine) => prune_docker(&ctx.root, &engine, self.dry_run)
                .await
                .map_err(|e| format!("{e:#}")),
            Err(e) => Err(format!(
                "Docker is not reachable, its images were left alone: {e:#}"
            )),
        };
        Ok(PruneBoth { blobs, docker })
    }
}
