//! The device's side: the TUF client workflow (tough's `RepositoryLoader`:
//! root rotation, expiry, signature thresholds, snapshot and timestamp
//! consistency, rollback checks) from the trusted root installed at
//! provisioning, then the one target the device may apply.
//!
//! What the device trusts is kept under `ROOT/state/tuf/`, each file
//! replaced with `write_atomic` once the whole metadata verified:
//! `root.json` (the newest root, which the next load starts from),
//! `timestamp.json`, `snapshot.json`, `targets.json` (the versions a
//! repository may not go back from), and `cache/` (the verified versioned
//! snapshot and targets and the target files, served again instead of
//! downloaded). tough's own datastore is a scratch copy of those files made
//! for each load, so a cut during a load leaves the last trusted state.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::Serialize;
use tough::schema::RoleType;
use tough::{
    ExpirationEnforcement, IntoVec as _, Limits, Repository, RepositoryLoader, TargetName,
};

use crate::Digest;
use crate::fsutil::{blocking, ensure_dir, write_atomic};
use crate::update::target::{TargetContent, apps_of};
use crate::update::transaction::AppSet;
use crate::update::tuf::transport::{
    FetchError, RepoFile, Source, TufTransport, metadata_url, targets_url,
};
use crate::update::tuf::{METADATA_CAP, TargetCustom, TrustError, version_at_least};

/// The roles whose last trusted copy is kept, in the order they are saved.
const TRUSTED_FILES: [&str; 4] = [
    "root.json",
    "timestamp.json",
    "snapshot.json",
    "targets.json",
];

/// The device's trust settings.
#[derive(Debug, Clone)]
pub struct Trust {
    /// The root installed at provisioning (`/etc/stowage/root.json`).
    pub root_file: PathBuf,
    /// `ROOT/state/tuf`.
    pub state_dir: PathBuf,
    /// The device's hardware or group tag.
    pub hardware: Option<String>,
}

/// Where a device keeps its trusted metadata.
pub fn state_dir(root: &Path) -> PathBuf {
    root.join("state").join("tuf")
}

/// tough's download limits: every file capped as a manifest is.
pub fn limits() -> Limits {
    Limits {
        max_root_size: METADATA_CAP,
        max_targets_size: METADATA_CAP,
        max_timestamp_size: METADATA_CAP,
        max_snapshot_size: METADATA_CAP,
        max_root_updates: 1024,
    }
}

/// A target that verified.
#[derive(Debug, Clone, Serialize)]
pub struct VerifiedTarget {
    /// The TUF target's name.
    pub name: String,
    /// The repository it came from.
    pub repository: String,
    /// The target file's digest.
    pub digest: Digest,
    pub custom: TargetCustom,
    pub apps: AppSet,
    /// The files asked of the repository (the rest came from the device's
    /// verified copies).
    pub requests: Vec<String>,
}

/// The trusted versions and expiry of each role, as `stowage status` shows
/// them.
#[derive(Debug, Clone, Serialize)]
pub struct TrustedRole {
    pub role: String,
    pub version: u64,
    pub expires: String,
}

/// What the device trusts now: each role's version and expiry, oldest
/// first in the file order; empty before the first verification.
pub fn trusted_roles(state_dir: &Path) -> Result<Vec<TrustedRole>> {
    #[derive(serde::Deserialize)]
    struct Signed {
        signed: Role,
    }
    #[derive(serde::Deserialize)]
    struct Role {
        version: u64,
        expires: String,
    }
    let mut roles = Vec::new();
    for file in TRUSTED_FILES {
        let path = state_dir.join(file);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let signed: Signed = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not TUF metadata", path.display()))?;
        roles.push(TrustedRole {
            role: file.trim_end_matches(".json").to_string(),
            version: signed.signed.version,
            expires: signed.signed.expires,
        });
    }
    Ok(roles)
}

impl Trust {
    /// Verifies the repository at `source` and returns the target `wanted`
    /// (the one target for this device's tag when `None`). Nothing but
    /// metadata and the small target file is read; an error that is a
    /// refusal is a [`TrustError`].
    pub async fn verify(&self, source: Source, wanted: Option<&str>) -> Result<VerifiedTarget> {
        let repo = source.describe();
        let (state, root_file) = (self.state_dir.clone(), self.root_file.clone());
        let (root, work) = blocking(move || prepare(&state, &root_file)).await?;
        let transport = TufTransport::new(source, Some(self.state_dir.join("cache")));
        let loaded = RepositoryLoader::new(&root, metadata_url(), targets_url())
            .transport(transport.clone())
            .limits(limits())
            .datastore(work.clone())
            .expiration_enforcement(ExpirationEnforcement::Safe)
            .load()
            .await;
        let result = match loaded {
            Ok(repository) => self.finish(&repository, &transport, &work, wanted).await,
            Err(e) => Err(classify(e, &repo)),
        };
        let cleanup = work.clone();
        let _ = blocking(move || std::fs::remove_dir_all(cleanup)).await;
        let mut target = result?;
        target.requests = transport
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default();
        Ok(target)
    }

    async fn finish(
        &self,
        repository: &Repository,
        transport: &TufTransport,
        work: &Path,
        wanted: Option<&str>,
    ) -> Result<VerifiedTarget> {
        let repo = transport.source.describe();
        // The metadata verified: it is what the device trusts from now on,
        // whatever becomes of the target.
        let snapshot_file = format!("{}.snapshot.json", repository.snapshot().signed.version);
        let targets_file = format!("{}.targets.json", repository.targets().signed.version);
        let fetched = transport
            .fetched
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default();
        {
            let (state, work) = (self.state_dir.clone(), work.to_path_buf());
            let keep_meta = [snapshot_file.clone(), targets_file.clone()];
            let fetched = fetched.clone();
            blocking(move || save_trusted(&state, &work, &keep_meta, &fetched)).await?;
        }

        let targets = &repository.targets().signed.targets;
        let name = match wanted {
            Some(name) => name.to_string(),
            None => self.pick(repository, &repo)?,
        };
        let not_signed = || TrustError::NotSigned {
            repo: repo.clone(),
            target: name.clone(),
        };
        let target_name = TargetName::new(name.clone()).map_err(|_| not_signed())?;
        let Some(target) = targets.get(&target_name) else {
            return Err(not_signed().into());
        };
        let custom =
            TargetCustom::from_custom(&target.custom).map_err(|e| TrustError::Invalid {
                repo: repo.clone(),
                detail: format!("target {name:?} has malformed custom fields: {e}"),
            })?;
        self.check_fits(&name, &custom)?;
        let stream = repository
            .read_target(&target_name)
            .await
            .map_err(|e| classify(e, &repo))?
            .ok_or_else(not_signed)?;
        let bytes = stream.into_vec().await.map_err(|e| classify(e, &repo))?;
        let content: TargetContent =
            serde_json::from_slice(&bytes).map_err(|e| TrustError::Invalid {
                repo: repo.clone(),
                detail: format!("target {name:?} is not a stowage target: {e}"),
            })?;
        let apps = apps_of(content, &format!("target {name:?} of {repo}"))?;
        // Every target file the metadata names may stay in the cache.
        let keep: BTreeSet<String> = targets
            .values()
            .map(|t| hex::encode(&t.hashes.sha256))
            .collect();
        let file = RepoFile::Target {
            sha256: hex::encode(&target.hashes.sha256),
            name: name.clone(),
        };
        {
            let state = self.state_dir.clone();
            let bytes = bytes.clone();
            let keep_meta = [snapshot_file, targets_file];
            blocking(move || save_target_file(&state, &file, &bytes, &keep_meta, &keep)).await?;
        }
        Ok(VerifiedTarget {
            name,
            repository: repo,
            digest: Digest::of(&bytes),
            custom,
            apps,
            requests: Vec::new(),
        })
    }

    /// The one target for this device's tag.
    fn pick(&self, repository: &Repository, repo: &str) -> Result<String> {
        let mut matching = Vec::new();
        for (name, target) in &repository.targets().signed.targets {
            let custom = TargetCustom::from_custom(&target.custom).unwrap_or_default();
            if custom.hardware.is_none() || custom.hardware == self.hardware {
                matching.push(name.raw().to_string());
            }
        }
        matching.sort();
        match matching.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(TrustError::NotSigned {
                repo: repo.to_string(),
                target: format!(
                    "(any for hardware {})",
                    self.hardware.as_deref().unwrap_or("(none)")
                ),
            }
            .into()),
            many => anyhow::bail!(
                "{repo} signs several targets for this device ({}): name one",
                many.join(", ")
            ),
        }
    }

    fn check_fits(&self, name: &str, custom: &TargetCustom) -> Result<(), TrustError> {
        if let Some(tag) = &custom.hardware
            && self.hardware.as_ref() != Some(tag)
        {
            return Err(TrustError::WrongHardware {
                target: name.to_string(),
                target_tag: tag.clone(),
                device_tag: match &self.hardware {
                    Some(t) => format!("{t:?}"),
                    None => "not set (--hardware, STOWAGE_HARDWARE)".to_string(),
                },
            });
        }
        let have = env!("CARGO_PKG_VERSION");
        if let Some(needs) = &custom.min_stowage_version
            && !version_at_least(have, needs)
        {
            return Err(TrustError::StowageTooOld {
                target: name.to_string(),
                needs: needs.clone(),
                have: have.to_string(),
            });
        }
        Ok(())
    }
}

/// Reads the root to start from and makes tough's scratch datastore with
/// the trusted copies in it.
fn prepare(state: &Path, root_file: &Path) -> Result<(Vec<u8>, PathBuf)> {
    ensure_dir(state, 0o700)?;
    ensure_dir(&state.join("cache"), 0o700)?;
    let provisioned = std::fs::read(root_file).with_context(|| {
        format!(
            "cannot read the trusted root {} (installed at provisioning)",
            root_file.display()
        )
    })?;
    // The newest root the device verified, unless the provisioned one is
    // newer still (the device was provisioned again).
    let version = |bytes: &[u8]| -> Option<u64> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        v["signed"]["version"].as_u64()
    };
    let root = match std::fs::read(state.join("root.json")) {
        Ok(stored) if version(&stored) >= version(&provisioned) => stored,
        _ => provisioned,
    };
    let work = state.join(format!(".load-{:08x}", crate::fsutil::random_u32()));
    ensure_dir(&work, 0o700)?;
    for file in &TRUSTED_FILES[1..] {
        match std::fs::read(state.join(file)) {
            Ok(bytes) => std::fs::write(work.join(file), bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((root, work))
}

/// Saves what tough verified: the roles it wrote into its datastore, then
/// the versioned files fetched for them.
fn save_trusted(
    state: &Path,
    work: &Path,
    keep_meta: &[String; 2],
    fetched: &[(RepoFile, Vec<u8>)],
) -> Result<()> {
    for file in TRUSTED_FILES {
        match std::fs::read(work.join(file)) {
            Ok(bytes) => write_if_changed(&state.join(file), &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    let cache = state.join("cache");
    for (file, bytes) in fetched {
        let name = file.file_name();
        if matches!(file, RepoFile::Metadata(_)) && keep_meta.contains(&name) {
            write_if_changed(&cache.join(name), bytes)?;
        }
    }
    Ok(())
}

/// `write_atomic`, unless the file already holds `bytes`: a poll that
/// found nothing new writes (and flushes) nothing.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    write_atomic(path, bytes)?;
    Ok(())
}

/// Saves the verified target file and drops cached files no longer named.
fn save_target_file(
    state: &Path,
    file: &RepoFile,
    bytes: &[u8],
    keep_meta: &[String; 2],
    keep_targets: &BTreeSet<String>,
) -> Result<()> {
    let cache = state.join("cache");
    write_if_changed(&cache.join(file.file_name()), bytes)?;
    for entry in std::fs::read_dir(&cache)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let keep = keep_meta.contains(&name)
            || match RepoFile::target(&name) {
                Some(RepoFile::Target { sha256, .. }) => keep_targets.contains(&sha256),
                _ => false,
            };
        if !keep {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// A tough error as what was refused and why; a repository that could not
/// be reached stays a plain error (not a refusal).
pub fn classify(e: tough::error::Error, repo: &str) -> anyhow::Error {
    match refusal(&e, repo) {
        Some(refused) => refused.into(),
        None => anyhow::Error::new(e).context(format!("cannot read the TUF metadata of {repo}")),
    }
}

/// The refusal `e` is, if it is one. A download's stream carries tough's
/// own checks (hash, size) as the cause of a transport error: the causes
/// are searched too.
fn refusal(e: &tough::error::Error, repo: &str) -> Option<TrustError> {
    use tough::error::Error as E;
    use tough::schema::Error as S;
    let repo = repo.to_string();
    let threshold = |role: String, source: &S| -> TrustError {
        match source {
            S::SignatureThreshold {
                threshold, valid, ..
            } => TrustError::Threshold {
                repo: repo.clone(),
                role,
                threshold: *threshold,
                valid: *valid,
            },
            _ => TrustError::Invalid {
                repo: repo.clone(),
                detail: e.to_string(),
            },
        }
    };
    Some(match e {
        E::ExpiredMetadata { role, .. } => TrustError::Expired {
            repo,
            role: role.to_string(),
        },
        E::OlderMetadata {
            role,
            current_version,
            new_version,
            ..
        } => TrustError::Rollback {
            repo,
            role: role.to_string(),
            detail: format!(
                "version {new_version} was offered, version {current_version} is trusted"
            ),
        },
        E::OlderSnapshotInTimestamp { .. } => TrustError::Rollback {
            repo,
            role: RoleType::Snapshot.to_string(),
            detail: e.to_string(),
        },
        E::SnapshotRoleRollback { role, .. } => TrustError::Rollback {
            repo,
            role: role.clone(),
            detail: e.to_string(),
        },
        E::VerifyMetadata { role, source, .. } => threshold(role.to_string(), source),
        E::VerifyRoleMetadata { role, source, .. } => threshold(role.clone(), source),
        E::VerifyTrustedMetadata { source, .. } => threshold("root".into(), source),
        E::HashMismatch {
            context,
            calculated,
            expected,
            ..
        } => TrustError::HashMismatch {
            repo,
            what: context.clone(),
            detail: format!("its sha256 is {calculated}, the signed one is {expected}"),
        },
        E::VersionMismatch {
            role,
            fetched,
            expected,
            ..
        } if fetched < expected => TrustError::Rollback {
            repo,
            role: role.to_string(),
            detail: format!("version {fetched} was served where version {expected} is signed"),
        },
        E::VersionMismatch {
            role,
            fetched,
            expected,
            ..
        } => TrustError::Mismatch {
            repo,
            role: role.to_string(),
            detail: format!("version {fetched} was served where version {expected} is signed"),
        },
        E::MaxSizeExceeded { .. } => TrustError::TooLarge {
            repo,
            what: e.to_string(),
            cap: METADATA_CAP,
        },
        E::Transport { source, url, .. }
            if source.kind() == tough::TransportErrorKind::FileNotFound =>
        {
            TrustError::Invalid {
                repo,
                detail: format!(
                    "it has no {} (not a signed repository, or not published yet: `stowage tuf publish`)",
                    url.path().rsplit('/').next().unwrap_or_default()
                ),
            }
        }
        E::Transport { source, .. } => {
            let mut cause = std::error::Error::source(source);
            while let Some(c) = cause {
                if let Some(FetchError::TooLarge { what, cap }) = c.downcast_ref::<FetchError>() {
                    return Some(TrustError::TooLarge {
                        repo,
                        what: what.clone(),
                        cap: *cap,
                    });
                }
                if let Some(inner) = c.downcast_ref::<tough::error::Error>()
                    && let Some(refused) = refusal(inner, &repo)
                {
                    return Some(refused);
                }
                cause = c.source();
            }
            return None;
        }
        _ => TrustError::Invalid {
            repo,
            detail: e.to_string(),
        },
    })
}
