//! `stowage export NAME|REF... DIR`: stored apps and all their blobs, written
//! into DIR for an offline update (`stowage update oci:DIR`).

use std::path::PathBuf;

use anyhow::Result;

use super::Context;
use crate::progress::Progress;
use crate::update::export::{ExportReport, export};

pub struct ExportOptions {
    pub apps: Vec<String>,
    pub dir: PathBuf,
    pub arch: Option<String>,
}

impl ExportOptions {
    pub async fn run(self, ctx: &Context, progress: &dyn Progress) -> Result<ExportReport> {
        let store = ctx.store()?;
        let arch = ctx.arch(self.arch.as_deref())?;
        export(&store, &self.apps, &self.dir, &arch, progress).await
    }
}
