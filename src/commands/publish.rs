//! `stowage publish [-f FILE] [--dir DIR] ... REGISTRY/REPO:TAG`: a compose
//! project pushed as an app (see [`crate::app::publish`]).

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use super::Context;
use crate::app::publish::{Publish, PublishReport};
use crate::oci::reference::ImageRef;
use crate::progress::Progress;

pub struct PublishOptions {
    /// The app directory; the compose file's directory when `None` and a
    /// compose file is given (as `docker compose -f` takes it), else `.`.
    pub app_dir: Option<PathBuf>,
    /// `-f`: at most one compose file.
    pub compose_files: Vec<PathBuf>,
    pub archs: Vec<String>,
    pub pinned_images: Option<PathBuf>,
    pub dry_run: bool,
    pub target: String,
    /// Where analysed layers are cached; the context's default when `None`.
    pub cache_dir: Option<PathBuf>,
    pub jobs: usize,
    /// `--mount-from`: repositories (`REGISTRY/REPO`) to mount blobs from.
    pub mount_from: Vec<String>,
}

impl PublishOptions {
    pub async fn run(self, ctx: &Context, progress: &dyn Progress) -> Result<PublishReport> {
        let (app_dir, compose_file) = project(self.app_dir, self.compose_files)?;
        let target: ImageRef = self.target.parse()?;
        let mut mount_from = Vec::new();
        for repo in &self.mount_from {
            let source: ImageRef = repo
                .parse()
                .with_context(|| format!("--mount-from {repo}"))?;
            if source.registry != target.registry {
                bail!(
                    "--mount-from {repo}: blobs are mounted only within one registry, and {} is not the target's {}",
                    source.registry,
                    target.registry
                );
            }
            mount_from.push(source);
        }
        let publish = Publish {
            app_dir,
            compose_file,
            archs: self.archs,
            pinned_images: self.pinned_images,
            dry_run: self.dry_run,
            target,
            cache_dir: ctx.cache_dir(self.cache_dir),
            jobs: self.jobs,
            mount_from,
        };
        publish.run(&ctx.registry_client()?, progress).await
    }
}

/// The app directory and the compose file in it, as `docker compose` finds
/// them: `-f FILE` alone makes FILE's directory the project directory (a
/// relative FILE is taken from the current directory); with `--dir`, a
/// relative FILE is taken from that directory. Several `-f` files are
/// refused: compose merges them by rules of its own, and an app must carry
/// one file that says what runs.
fn project(dir: Option<PathBuf>, files: Vec<PathBuf>) -> Result<(PathBuf, Option<PathBuf>)> {
    if files.len() > 1 {
        let list: Vec<String> = files
            .iter()
            .map(|f| format!("-f {}", f.display()))
            .collect();
        bail!(
            "publish takes one compose file, and {} were given; merge them first, as compose would run them: `docker-compose {} config > docker-compose.yml`, then publish that file",
            files.len(),
            list.join(" ")
        );
    }
    let file = files.into_iter().next();
    Ok(match (dir, file) {
        (Some(dir), file) => (dir, file),
        (None, None) => (PathBuf::from("."), None),
        (None, Some(file)) => {
            let parent = match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let name = file.file_name().map(PathBuf::from).unwrap_or(file);
            (parent, Some(name))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_project_directory_is_the_compose_files_own() {
        let p = |d: Option<&str>, f: &[&str]| {
            project(d.map(PathBuf::from), f.iter().map(PathBuf::from).collect())
        };
        assert_eq!(
            p(None, &["deploy/app/compose.yaml"]).unwrap(),
            (
                PathBuf::from("deploy/app"),
                Some(PathBuf::from("compose.yaml"))
            )
        );
        assert_eq!(
            p(None, &["docker-compose.yml"]).unwrap(),
            (
                PathBuf::from("."),
                Some(PathBuf::from("docker-compose.yml"))
            )
        );
        assert_eq!(
            p(Some("app"), &["other.yml"]).unwrap(),
            (PathBuf::from("app"), Some(PathBuf::from("other.yml")))
        );
        assert_eq!(p(None, &[]).unwrap(), (PathBuf::from("."), None));
        let err = p(None, &["a.yml", "b.yml"]).unwrap_err().to_string();
        assert!(
            err.contains("docker-compose -f a.yml -f b.yml config > docker-compose.yml"),
            "{err}"
        );
    }
}
