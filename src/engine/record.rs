//! What stowage has installed into Docker: the durable record in
//! `ROOT/state/installed.json`, the apps directory `ROOT/apps/<name>`, and
//! the lock (`ROOT/apps.lock`) that serialises every command changing
//! Docker's side (install, run, stop, rm, prune, fsck --repair).
//!
//! The record says, for each installed app, which reference is installed,
//! where its bundle is extracted and, per service, the local tag and image ID
//! it runs; and, for the whole device, which images stowage itself loaded
//! (`owned_images`) and which tags it put on images it did not load
//! (`foreign_tags`). Prune removes only owned images that no installed app
//! references, and only by stowage's own tags, so an image a user built,
//! pulled or loaded is never touched.
//!
//! Durability: the file is replaced with [`crate::fsutil::write_atomic`].
//! Ownership of an image is recorded *before* it is loaded, so a crash mid
//! load can leave a record of an image that does not exist (harmless: prune
//! finds nothing to remove and forgets it) but never an image stowage loaded
//! without a record of it, which prune could then never clean.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::fsutil::lock::{LockMode, Locked, lock_file};
use crate::fsutil::{ensure_dir, write_atomic};

/// How long a command waits for another one changing Docker's side.
pub const APPS_LOCK_TIMEOUT: Duration = Duration::from_secs(300);

/// The override file stowage writes into each app directory: it maps every
/// service to the local tag of the image stowage loaded.
pub const OVERRIDE_FILE: &str = ".stowage-images.yml";

/// Written into an app directory after its bundle was extracted and
/// verified; names the app digest, so a directory is re-extracted when the
/// marker is missing (a crash) or names another version.
pub const BUNDLE_MARKER: &str = ".stowage-bundle";

#[derive(Debug, thiserror::Error)]
pub enum InstalledError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid record of installed apps: {reason}; fix or remove it")]
    Corrupt { path: PathBuf, reason: String },
    #[error("another stowage command has held {path} for {waited:?}; try again when it ends")]
    Busy { path: PathBuf, waited: Duration },
    #[error(
        "{name:?} cannot be an app directory or compose project name: use lowercase letters, digits, '-' and '_'"
    )]
    BadName { name: String },
}

/// One service image of an installed app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledImage {
    pub service: String,
    /// The image as the bundled compose file pins it.
    pub pinned: String,
    /// The local `name:tag` compose runs it as (see `docker::local_tag_for`).
    pub tag: String,
    /// The image ID: the digest of its config.
    pub image_id: Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledApp {
    pub reference: String,
    pub digest: Digest,
    /// The compose file's name inside `dir`.
    pub compose_file: String,
    pub dir: PathBuf,
    pub images: Vec<InstalledImage>,
}

impl InstalledApp {
    /// The compose files to run the app with: the bundled one, then the
    /// override that points each service at its local tag.
    pub fn compose_files(&self) -> Vec<PathBuf> {
        vec![
            PathBuf::from(&self.compose_file),
            PathBuf::from(OVERRIDE_FILE),
        ]
    }
}

/// The record of what stowage installed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// By app name (= compose project name = directory name).
    #[serde(default)]
    pub apps: BTreeMap<String, InstalledApp>,
    /// Images stowage loaded, by image ID, with the tags it gave them.
    #[serde(default)]
    pub owned_images: BTreeMap<Digest, BTreeSet<String>>,
    /// Tags stowage put on images it did not load (they were there already,
    /// loaded or built by someone else), with the image each names.
    #[serde(default)]
    pub foreign_tags: BTreeMap<String, Digest>,
    /// Where the engine keeps its data, as fsck last saw it: where fsck
    /// looks when the engine does not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineSeen>,
}

/// The engine's data root and storage driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSeen {
    pub data_root: PathBuf,
    pub driver: String,
}

impl Installed {
    pub fn path(root: &Path) -> PathBuf {
        root.join("state").join("installed.json")
    }

    /// Reads the record; an absent file is an empty record.
    pub fn load(root: &Path) -> Result<Installed, InstalledError> {
        let path = Installed::path(root);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Installed::default()),
            Err(source) => {
                return Err(InstalledError::Io {
                    action: "read",
                    path,
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| InstalledError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Replaces the record atomically and durably.
    pub fn save(&self, root: &Path) -> Result<(), InstalledError> {
        let path = Installed::path(root);
        let dir = root.join("state");
        ensure_dir(&dir, 0o700).map_err(|source| InstalledError::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        write_atomic(&path, &bytes).map_err(|source| InstalledError::Io {
            action: "write",
            path,
            source,
        })
    }

    /// Every image ID an installed app runs.
    pub fn referenced_images(&self) -> BTreeSet<Digest> {
        self.apps
            .values()
            .flat_map(|a| a.images.iter().map(|i| i.image_id.clone()))
            .collect()
    }

    /// Every local tag an installed app runs.
    pub fn referenced_tags(&self) -> BTreeSet<String> {
        self.apps
            .values()
            .flat_map(|a| a.images.iter().map(|i| i.tag.clone()))
            .collect()
    }
}

/// Where an app named `name` is extracted.
pub fn app_dir(root: &Path, name: &str) -> Result<PathBuf, InstalledError> {
    check_name(name)?;
    Ok(root.join("apps").join(name))
}

/// An app name must be usable as a directory and a compose project name
/// (compose v1 would silently rewrite other characters, and `ps` finds
/// containers by the project label).
pub fn check_name(name: &str) -> Result<(), InstalledError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(InstalledError::BadName {
            name: name.to_string(),
        })
    }
}

/// A held apps lock; dropping it releases the lock (the kernel releases it
/// too when the process dies, even by SIGKILL).
#[derive(Debug)]
pub struct AppsLock {
    _file: File,
}

/// [`lock_apps`] for async code: the wait happens on a blocking thread,
/// never on a runtime worker.
pub async fn lock_apps_async(root: &Path, timeout: Duration) -> Result<AppsLock, InstalledError> {
    let root = root.to_path_buf();
    crate::fsutil::blocking(move || lock_apps(&root, timeout)).await
}

/// Takes the apps lock exclusively, waiting up to `timeout`.
pub fn lock_apps(root: &Path, timeout: Duration) -> Result<AppsLock, InstalledError> {
    let path = root.join("apps.lock");
    let io = |action, source| InstalledError::Io {
        action,
        path: path.clone(),
        source,
    };
    ensure_dir(root, 0o700).map_err(|e| io("create", e))?;
    let started = Instant::now();
    match lock_file(&path, LockMode::Exclusive, timeout).map_err(|e| io("lock", e))? {
        Locked::Held(file) => Ok(AppsLock { _file: file }),
        Locked::Busy(_) => Err(InstalledError::Busy {
            path,
            waited: started.elapsed(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_survives_a_round_trip_and_an_absent_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Installed::load(dir.path()).unwrap(), Installed::default());
        let id = Digest::of(b"config");
        let mut record = Installed::default();
        record.apps.insert(
            "shop".into(),
            InstalledApp {
                reference: "r.local/shop@sha256:00".into(),
                digest: Digest::of(b"app"),
                compose_file: "docker-compose.yml".into(),
                dir: dir.path().join("apps/shop"),
                images: vec![InstalledImage {
                    service: "web".into(),
                    pinned: "r.local/web@sha256:11".into(),
                    tag: "r.local/web:stowage-sha256-11".into(),
                    image_id: id.clone(),
                }],
            },
        );
        record
            .owned_images
            .insert(id.clone(), BTreeSet::from(["r.local/web:x".to_string()]));
        record.save(dir.path()).unwrap();
        let back = Installed::load(dir.path()).unwrap();
        assert_eq!(back, record);
        assert!(back.referenced_images().contains(&id));
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(Installed::path(dir.path()), b"{not json").unwrap();
        let err = Installed::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("installed.json"), "{err}");
    }

    #[test]
    fn app_names_must_be_safe_directory_and_project_names() {
        for good in ["shop", "app-1_x", "9lives"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "..", "a/b", "Shop", "-x", "a.b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_apps_lock_is_exclusive_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_apps(dir.path(), Duration::ZERO).unwrap();
        assert!(matches!(
            lock_apps(dir.path(), Duration::from_millis(30)),
            Err(InstalledError::Busy { .. })
        ));
        drop(held);
        lock_apps(dir.path(), Duration::ZERO).unwrap();
    }
}
