//! `stowage pull REF...` (from registries) and `stowage pull oci:DIR[:NAME]`
//! (from an export): check, then fetch the missing blobs into the store.
//! Refused for space: the error is a [`crate::plan::DoesNotFit`].

use anyhow::{Context as _, Result, bail};

use super::{Context, FitOptions, parse_refs};
use crate::progress::Progress;
use crate::update::export::{ImportReport, LayoutRef, import};
use crate::update::pull::{PullOptions as Pull, PullReport};

pub struct PullOptions {
    pub apps: Vec<String>,
    pub fit: FitOptions,
    pub jobs: Option<usize>,
}

/// What a pull did, by where it took the blobs from.
pub enum Pulled {
    Registry(PullReport),
    Export(ImportReport),
}

impl PullOptions {
    pub async fn run(self, ctx: &Context, progress: &dyn Progress) -> Result<Pulled> {
        let fit = ctx.fit(&self.fit)?;
        let store = ctx.store()?;
        if self.apps.iter().any(|a| a.starts_with("oci:")) {
            let [one] = self.apps.as_slice() else {
                bail!("a pull from oci:DIR takes that one argument (oci:DIR or oci:DIR:NAME)");
            };
            let from = LayoutRef::parse(one).context("oci:DIR[:NAME] expected")?;
            let (docker, _) = ctx.docker_view(self.fit.docker_host.as_deref()).await;
            let report = import(&store, &from, &fit.arch, fit.policy, &docker, progress).await?;
            return Ok(Pulled::Export(report));
        }
        let client = ctx.registry_client()?;
        let pull = Pull {
            apps: parse_refs(&self.apps)?,
            architecture: fit.arch.clone(),
            policy: fit.policy,
            jobs: ctx.jobs(self.jobs)?,
        };
        let docker = ctx.docker_view(self.fit.docker_host.as_deref());
        let report = pull.run(&client, &store, docker, progress).await?;
        Ok(Pulled::Registry(report))
    }
}
