//! `stowage check REF...`: plan an update and say, per volume, whether it
//! fits, before a byte is downloaded.

use anyhow::Result;

use super::{Context, FitOptions, parse_refs};
use crate::app::{Depth, StoreFirst, fetch_apps};
use crate::plan::{CheckReport, Paths, check_update};

pub struct CheckOptions {
    pub apps: Vec<String>,
    pub fit: FitOptions,
}

impl CheckOptions {
    /// The report; whether it fits is `report.fit.fits` (the CLI exits 100
    /// when it does not).
    pub async fn run(self, ctx: &Context) -> Result<CheckReport> {
        let fit = ctx.fit(&self.fit)?;
        let store = ctx.store()?;
        let registry = ctx.registry_client()?;
        // A pinned app already pulled is planned from the store.
        let client = StoreFirst {
            store: &store,
            registry: &registry,
        };
        let references = parse_refs(&self.apps)?;
        // Docker and the registry are asked at once: the check's time is
        // mostly their round trips.
        let ((docker, note), apps) = tokio::join!(
            ctx.docker_view(self.fit.docker_host.as_deref()),
            fetch_apps(&client, &references, &fit.arch, Depth::Plan)
        );
        let apps = apps?;
        let (_, mut report) =
            check_update(&apps, &store, &Paths::under(&ctx.root), &docker, fit.policy)?;
        report.fit.notes.extend(note);
        Ok(report)
    }
}
