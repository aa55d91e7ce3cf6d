//! `stowage tuf ...`: the release engineer's verbs on a TUF repository kept
//! in a directory (see [`crate::update::tuf::repo`]): keys, the root and its
//! rotation, targets, threshold signing, the timestamp, publishing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use tough::schema::RoleType;

use super::{Context, parse_refs};
use crate::update::target::pin_apps;
use crate::update::tuf::TargetCustom;
use crate::update::tuf::repo::{
    self, Destination, KeyReport, RepoDir, RepoReport, SigningKey, TargetReport, key_id,
    load_public_key, parse_expiry,
};
use crate::update::tuf::transport::valid_target_name;

pub fn key_gen(path: &Path) -> Result<KeyReport> {
    repo::generate_key(path)
}

/// A role's name on the command line.
pub fn role(name: &str) -> Result<RoleType> {
    Ok(match name {
        "root" => RoleType::Root,
        "targets" => RoleType::Targets,
        "snapshot" => RoleType::Snapshot,
        "timestamp" => RoleType::Timestamp,
        other => bail!("unknown role {other:?}: root, targets, snapshot or timestamp"),
    })
}

fn expiry(flag: Option<&str>, default: &str) -> Result<jiff::Timestamp> {
    parse_expiry(flag.unwrap_or(default))
}

fn signing_keys(paths: &[PathBuf]) -> Result<Vec<SigningKey>> {
    paths.iter().map(|p| SigningKey::load(p)).collect()
}

pub struct InitOptions {
    pub dir: PathBuf,
    /// Public (or private) key files of each role, and its threshold.
    pub root_keys: Vec<PathBuf>,
    pub root_threshold: u64,
    pub targets_keys: Vec<PathBuf>,
    pub targets_threshold: u64,
    pub snapshot_keys: Vec<PathBuf>,
    pub timestamp_keys: Vec<PathBuf>,
    pub expires: Option<String>,
}

impl InitOptions {
    pub fn run(self) -> Result<RepoReport> {
        let load = |paths: &[PathBuf]| -> Result<Vec<_>> {
            paths.iter().map(|p| load_public_key(p)).collect()
        };
        let keys = HashMap::from([
            (
                RoleType::Root,
                (load(&self.root_keys)?, self.root_threshold),
            ),
            (
                RoleType::Targets,
                (load(&self.targets_keys)?, self.targets_threshold),
            ),
            (RoleType::Snapshot, (load(&self.snapshot_keys)?, 1)),
            (RoleType::Timestamp, (load(&self.timestamp_keys)?, 1)),
        ]);
        let dir = RepoDir::new(&self.dir);
        dir.init(&keys, expiry(self.expires.as_deref(), repo::ROOT_EXPIRY)?)?;
        dir.report()
    }
}

pub struct RotateOptions {
    pub dir: PathBuf,
    pub role: String,
    pub add: Vec<PathBuf>,
    /// Key ids, or key files.
    pub remove: Vec<String>,
    pub threshold: Option<u64>,
    pub expires: Option<String>,
}

impl RotateOptions {
    pub fn run(self) -> Result<RepoReport> {
        let add = self
            .add
            .iter()
            .map(|p| load_public_key(p))
            .collect::<Result<Vec<_>>>()?;
        let mut remove = Vec::new();
        for r in &self.remove {
            if Path::new(r).exists() {
                remove.push(key_id(&load_public_key(Path::new(r))?)?);
            } else {
                remove.push(r.clone());
            }
        }
        let expires = self.expires.as_deref().map(parse_expiry).transpose()?;
        let dir = RepoDir::new(&self.dir);
        dir.rotate(role(&self.role)?, &add, &remove, self.threshold, expires)?;
        dir.report()
    }
}

pub struct AddTargetOptions {
    pub dir: PathBuf,
    pub name: String,
    pub apps: Vec<String>,
    pub hardware: Option<String>,
    pub min_stowage_version: Option<String>,
    pub expires: Option<String>,
}

impl AddTargetOptions {
    /// Resolves each app to its digest in its registry and stages the target.
    pub async fn run(self, ctx: &Context) -> Result<TargetReport> {
        if !valid_target_name(&self.name) {
            bail!(
                "target name {:?}: use letters, digits, '.', '_' and '-' (at most 100)",
                self.name
            );
        }
        let client = ctx.registry_client()?;
        let apps = pin_apps(&client, &parse_refs(&self.apps)?).await?;
        let custom = TargetCustom {
            hardware: self.hardware,
            min_stowage_version: self.min_stowage_version,
        };
        let expires = self.expires.as_deref().map(parse_expiry).transpose()?;
        RepoDir::new(&self.dir).add_target(&self.name, apps, &custom, expires)
    }
}

pub fn remove_target(dir: &Path, name: &str) -> Result<RepoReport> {
    let repo = RepoDir::new(dir);
    repo.remove_target(name)?;
    repo.report()
}

pub async fn sign(
    dir: &Path,
    role_name: &str,
    keys: &[PathBuf],
    expires: Option<&str>,
) -> Result<RepoReport> {
    let repo = RepoDir::new(dir);
    let expires = expires.map(parse_expiry).transpose()?;
    repo.sign(role(role_name)?, &signing_keys(keys)?, expires)
        .await?;
    repo.report()
}

pub fn show(dir: &Path) -> Result<RepoReport> {
    RepoDir::new(dir).report()
}

#[derive(Debug, Serialize)]
pub struct PublishReport {
    #[serde(flatten)]
    pub repository: RepoReport,
    pub published_to: Vec<String>,
    pub files: Vec<String>,
}

pub struct PublishOptions {
    pub dir: PathBuf,
    /// The snapshot and timestamp keys (and any other; each signs what it may).
    pub keys: Vec<PathBuf>,
    /// Registry repositories, or `oci:DIR` exports.
    pub to: Vec<String>,
    pub snapshot_expires: Option<String>,
    pub timestamp_expires: Option<String>,
    /// Only a new timestamp (`stowage tuf timestamp`).
    pub timestamp_only: bool,
}

impl PublishOptions {
    /// Takes the staged roles, signs a new snapshot and timestamp, checks the
    /// whole repository as a device would, then copies it to each `to`.
    pub async fn run(self, ctx: &Context) -> Result<PublishReport> {
        let repo = RepoDir::new(&self.dir);
        let keys = signing_keys(&self.keys)?;
        let destinations = self
            .to
            .iter()
            .map(|t| Destination::parse(t))
            .collect::<Result<Vec<_>>>()?;
        let timestamp_expires = expiry(self.timestamp_expires.as_deref(), repo::TIMESTAMP_EXPIRY)?;
        if self.timestamp_only {
            repo.timestamp(&keys, timestamp_expires).await?;
        } else {
            let snapshot_expires = expiry(self.snapshot_expires.as_deref(), repo::SNAPSHOT_EXPIRY)?;
            repo.commit(&keys, snapshot_expires, timestamp_expires)
                .await?;
        }
        repo.verify_all()
            .await
            .context("the repository does not verify as a device would verify it")?;
        let files = repo.files()?;
        let client = ctx.registry_client()?;
        for to in &destinations {
            repo::upload(&client, &files, to).await?;
        }
        Ok(PublishReport {
            repository: repo.report()?,
            published_to: destinations.iter().map(|d| d.to_string()).collect(),
            files: files.iter().map(|(f, _)| f.file_name()).collect(),
        })
    }
}
