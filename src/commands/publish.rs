//! `stowage publish [-f FILE] [--dir DIR] ... REGISTRY/REPO:TAG`: a compose
//! project pushed as an app (see [`crate::app::publish`]).

use std::path::PathBuf;

use anyhow::Result;

use super::Context;
use crate::app::publish::{Publish, PublishReport};
use crate::progress::Progress;

pub struct PublishOptions {
    pub app_dir: PathBuf,
    pub compose_file: Option<PathBuf>,
    pub archs: Vec<String>,
    pub pinned_images: Option<PathBuf>,
    pub dry_run: bool,
    pub target: String,
    /// Where analysed layers are cached; the context's default when `None`.
    pub cache_dir: Option<PathBuf>,
    pub jobs: usize,
}

impl PublishOptions {
    pub async fn run(self, ctx: &Context, progress: &dyn Progress) -> Result<PublishReport> {
        let publish = Publish {
            app_dir: self.app_dir,
            compose_file: self.compose_file,
            archs: self.archs,
            pinned_images: self.pinned_images,
            dry_run: self.dry_run,
            target: self.target.parse()?,
            cache_dir: ctx.cache_dir(self.cache_dir),
            jobs: self.jobs,
        };
        publish.run(&ctx.registry_client()?, progress).await
    }
}
