//! Offline updates: `stowage export` writes stored apps and all their blobs
//! for the device's architecture into a directory (a stowage store: an OCI
//! layout at `DIR/store`) on removable media; `stowage pull oci:DIR[:NAME]`
//! and `stowage update oci:DIR[:NAME]` take them from there with no network,
//! through the same fit check, and every blob is verified as it is copied.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::Digest;
use crate::app::stored::{StoredApp, find_apps, list_apps};
use crate::app::{App, LayoutSource, fetch_app};
use crate::fsutil::blocking;
use crate::oci::reference::ImageRef;
use crate::plan::space::Policy;
use crate::plan::{CheckReport, DockerView, Paths, check_update, refuse_unless_fits};
use crate::progress::{NoProgress, Progress};
use crate::store::copy::{FileSource, copy_blob};
use crate::store::{LockMode, Store};
use crate::update::pull::name_app;

/// A file on local media either copies or fails; a retry reads it again once.
const FILE_COPY_ATTEMPTS: u32 = 1;

/// `oci:DIR` or `oci:DIR:NAME`, as the device commands accept it.
#[derive(Debug, Clone)]
pub struct LayoutRef {
    pub dir: PathBuf,
    /// An app name, reference or digest; all apps in the layout when `None`.
    pub app: Option<String>,
    /// Only these apps (by manifest digest): a signed target's, when the
    /// update was verified.
    pub only: Option<Vec<Digest>>,
}

impl LayoutRef {
    pub fn parse(s: &str) -> Option<LayoutRef> {
        let rest = s.strip_prefix("oci:")?;
        // DIR may not contain ':'; what follows the first ':' names the app.
        Some(match rest.split_once(':') {
            Some((dir, app)) => LayoutRef {
                dir: PathBuf::from(dir),
                app: Some(app.to_string()),
                only: None,
            },
            None => LayoutRef {
                dir: PathBuf::from(rest),
                app: None,
                only: None,
            },
        })
    }

    /// Opens the layout read-only: nothing on the medium is created or
    /// changed, and links inside it are refused ([`Store::open_medium`]).
    pub fn open(&self) -> Result<Store> {
        let marker = self.dir.join("store").join("oci-layout");
        if std::fs::symlink_metadata(&marker).is_err() {
            bail!(
                "{} is not a stowage export (no store/oci-layout in it; write one with `stowage export`)",
                self.dir.display()
            );
        }
        Store::open_medium(&self.dir)
            .with_context(|| format!("{} is refused as an export", self.dir.display()))
    }

    /// The apps of the layout this names.
    pub fn apps(&self, layout: &Store) -> Result<Vec<StoredApp>> {
        let mut apps = match (&self.app, &self.only) {
            (_, Some(_)) | (None, None) => list_apps(layout)?,
            (Some(name), None) => find_apps(layout, name)?,
        };
        if let Some(only) = &self.only {
            apps.retain(|a| only.contains(&a.digest));
            if let Some(missing) = only.iter().find(|d| !apps.iter().any(|a| &a.digest == *d)) {
                bail!(
                    "{} lacks app {missing} of the signed target: export it too",
                    self.dir.display()
                );
            }
        }
        if apps.is_empty() {
            bail!(
                "no app {}in {}",
                self.app
                    .as_ref()
                    .map(|a| format!("{a:?} "))
                    .unwrap_or_default(),
                self.dir.display()
            );
        }
        if let Some(partial) = apps.iter().find(|a| !a.is_complete()) {
            bail!(
                "app {} in {} is incomplete (blob {} is missing, or is not a regular file): export it again",
                partial.reference,
                self.dir.display(),
                partial
                    .missing
                    .first()
                    .map_or_else(|| "?".to_string(), |d| d.to_string()),
            );
        }
        Ok(apps)
    }
}

#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub dir: PathBuf,
    pub apps: Vec<String>,
    pub blobs: usize,
    pub bytes: u64,
}

/// Copies the stored apps `names` and every blob they need into `dir`.
pub async fn export(
    store: &Store,
    names: &[String],
    dir: &Path,
    architecture: &str,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    let _lock = store.lock_async(LockMode::Shared).await?;
    let out = Store::open(dir)
        .with_context(|| format!("cannot create the export at {}", dir.display()))?;
    let source = LayoutSource { store };
    let mut report = ExportReport {
        dir: dir.to_path_buf(),
        apps: Vec::new(),
        blobs: 0,
        bytes: 0,
    };
    for name in names {
        let stored = find_apps(store, name)?;
        let Some(app) = stored.iter().find(|a| a.is_complete()) else {
            bail!("no complete stored app is named {name:?}: pull it first (`stowage pull REF`)");
        };
        let reference: ImageRef = app.reference.parse()?;
        let app = fetch_app(&source, &reference, architecture).await?;
        for (digest, size) in blobs_of(&app) {
            if !out.has(&digest) {
                copy_file(&out, store.blob_path(&digest), &digest, size, &NoProgress)
                    .await
                    .with_context(|| format!("cannot export blob {digest}"))?;
                report.blobs += 1;
                report.bytes += size;
            }
        }
        name_app(&out, &app)?;
        progress.step(format!("exported {} ({})", app.name, app.reference));
        report.apps.push(app.reference.to_string());
    }
    Ok(report)
}

/// Every blob of `app`, with the size its descriptor declares.
fn blobs_of(app: &App) -> Vec<(Digest, u64)> {
    app.meta_blobs
        .iter()
        .map(|b| &b.descriptor)
        .chain(app.layers.iter().map(|l| &l.descriptor))
        .map(|d| (d.digest.clone(), d.size))
        .collect()
}

/// Copies the file at `path` into `store` as blob `digest` of `size` bytes
/// (its descriptor's), resuming a partial copy, preallocated and verified.
/// A file that is not a regular one, or of another size than declared, is
/// refused before anything is made in the store.
async fn copy_file(
    store: &Store,
    path: std::path::PathBuf,
    digest: &Digest,
    size: u64,
    progress: &dyn Progress,
) -> Result<()> {
    {
        let (path, digest) = (path.clone(), digest.clone());
        blocking(move || crate::store::copy::check_file_source(&path, &digest, size)).await?;
    }
    let ingest = {
        let store = store.clone();
        let digest = digest.clone();
        blocking(move || {
            let mut ingest = store.ingest(&digest, size)?;
            if !ingest.is_stored() {
                ingest.preallocate()?;
            }
            Ok::<_, crate::store::StoreError>(ingest)
        })
        .await?
    };
    let mut source = FileSource {
        path,
        digest: digest.clone(),
        size,
    };
    copy_blob(ingest, &mut source, FILE_COPY_ATTEMPTS, progress).await?;
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct ImportReport {
    pub check: CheckReport,
    pub imported_blobs: usize,
    pub imported_bytes: u64,
    pub apps: Vec<String>,
}

/// `pull oci:DIR[:NAME]`: the fit check, then every missing blob copied in
/// and verified, then the apps named.
pub async fn import(
    store: &Store,
    from: &LayoutRef,
    architecture: &str,
    policy: Policy,
    docker: &DockerView,
    progress: &dyn Progress,
) -> Result<ImportReport> {
    let _lock = store.lock_async(LockMode::Shared).await?;
    let layout = from.open()?;
    let source = LayoutSource { store: &layout };
    let mut apps = Vec::new();
    for stored in from.apps(&layout)? {
        apps.push(fetch_app(&source, &stored.reference.parse()?, architecture).await?);
    }
    let (_, check) = check_update(&apps, store, &Paths::under(store.root()), docker, policy)?;
    let check = refuse_unless_fits(check)?;
    let mut imported_blobs = 0;
    let mut imported_bytes = 0;
    for app in &apps {
        for (digest, size) in blobs_of(app) {
            if store.has(&digest) {
                continue;
            }
            copy_file(store, layout.blob_path(&digest), &digest, size, progress)
                .await
                .with_context(|| {
                    format!("cannot copy blob {digest} from {}", from.dir.display())
                })?;
            imported_blobs += 1;
            imported_bytes += size;
        }
        name_app(store, app)?;
        progress.step(format!("stored {} ({})", app.name, app.reference));
    }
    Ok(ImportReport {
        check,
        imported_blobs,
        imported_bytes,
        apps: apps.iter().map(|a| a.reference.to_string()).collect(),
    })
}
