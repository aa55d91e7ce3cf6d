//! The store's housekeeping verbs: `ls`, `rm`, `prune` and `fsck`. Each
//! takes the store lock it needs: shared to read, exclusive to delete.

use anyhow::{Result, bail};
use serde::Serialize;

use crate::store::{FsckReport, LockMode, PruneReport, Store};
use crate::stored::{StoredApp, find_apps, list_apps};

pub fn ls(store: &Store) -> Result<Vec<StoredApp>> {
    let _lock = store.lock(LockMode::Shared)?;
    list_apps(store)
}

#[derive(Debug, Serialize)]
pub struct RmReport {
    pub forgotten: Vec<String>,
}

/// Forgets the apps `name_or_ref` names, and the image refs no other app
/// still uses. Their blobs go at the next prune.
pub fn rm(store: &Store, name_or_ref: &str) -> Result<RmReport> {
    let _lock = store.lock(LockMode::Exclusive)?;
    let doomed = find_apps(store, name_or_ref)?;
    if doomed.is_empty() {
        bail!("no stored app is named {name_or_ref:?} (see `stowage ls`)");
    }
    let kept: Vec<StoredApp> = list_apps(store)?
        .into_iter()
        .filter(|a| !doomed.iter().any(|d| d.reference == a.reference))
        .collect();
    for app in &doomed {
        store.remove_ref(&app.reference)?;
        for image in &app.images {
            let still_used = kept
                .iter()
                .any(|k| k.images.iter().any(|i| i.pinned == image.pinned));
            if !still_used {
                store.remove_ref(&image.pinned)?;
            }
        }
    }
    Ok(RmReport {
        forgotten: doomed.into_iter().map(|a| a.reference).collect(),
    })
}

pub fn prune(store: &Store, dry_run: bool) -> Result<PruneReport> {
    let _lock = store.lock(LockMode::Exclusive)?;
    Ok(store.prune(dry_run, &Default::default())?)
}

pub fn fsck(store: &Store, quick: bool) -> Result<FsckReport> {
    let _lock = store.lock(LockMode::Exclusive)?;
    Ok(store.fsck(quick)?)
}
