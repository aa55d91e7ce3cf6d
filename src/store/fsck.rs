//! Checking the store and repairing what can be repaired without a network.
//!
//! fsck re-hashes every blob (or, quick, compares each blob's length with
//! the size its referencing descriptors declare) and moves whatever is wrong
//! to `ROOT/corrupt/`, where a person can look at it; a later pull fetches the
//! blob again. A broken `oci-layout` or `index.json` is moved there too and
//! replaced by a fresh one (the refs it held are lost and reported). Stray
//! files in `blobs/sha256/` (names that are not digests) are moved aside.
//! The caller holds the store lock exclusive.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::gc::{OnUnreadable, walk};
use super::layout::{self, ImageIndex, check_oci_layout, oci_layout_bytes};
use super::{Result, Store, StoreError};
use crate::Digest;
use crate::fsutil::{fsync_dir, write_atomic};

/// A blob fsck found wrong and moved aside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptBlob {
    pub digest: Digest,
    pub reason: String,
    pub moved_to: PathBuf,
}

/// A file in the blobs directory, or a layout file, that fsck moved aside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StrayFile {
    pub path: PathBuf,
    pub reason: String,
    pub moved_to: PathBuf,
}

/// What fsck checked and what it found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FsckReport {
    pub quick: bool,
    /// Blobs examined.
    pub checked: usize,
    /// Bytes hashed (0 in a quick check).
    pub bytes_hashed: u64,
    pub corrupt: Vec<CorruptBlob>,
    /// Stray files and broken layout files, moved aside.
    pub moved_aside: Vec<StrayFile>,
    /// Manifests present and intact but not readable as JSON.
    pub unreadable_manifests: Vec<(Digest, String)>,
    /// Refs whose manifest is not in the store (a pull will fetch it again).
    pub missing_ref_targets: Vec<(String, Digest)>,
    /// Temporary files of interrupted writes that were removed.
    pub leftovers_removed: usize,
}

impl FsckReport {
    /// True when fsck found nothing wrong.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty()
            && self.moved_aside.is_empty()
            && self.unreadable_manifests.is_empty()
            && self.missing_ref_targets.is_empty()
    }
}

impl Store {
    /// Verifies the store; see the module comment. Open the store with
    /// [`Store::open_for_repair`] to reach a store whose layout files are
    /// broken.
    pub fn fsck(&self, quick: bool) -> Result<FsckReport> {
        let mut report = FsckReport {
            quick,
            ..FsckReport::default()
        };
        self.repair_layout_file(
            &self.layout_dir.join(layout::OCI_LAYOUT_FILE),
            check_oci_layout,
            &oci_layout_bytes(),
            &mut report,
        )?;
        let empty_index = ImageIndex::empty()
            .to_bytes()
            .map_err(|e| StoreError::io(&self.index_path(), std::io::Error::other(e)))?;
        self.repair_layout_file(
            &self.index_path(),
            |b| ImageIndex::parse(b).map(|_| ()),
            &empty_index,
            &mut report,
        )?;
        report.leftovers_removed = self.remove_leftovers()?;

        let walked = walk(self, &Default::default(), OnUnreadable::Record)?;
        for (digest, error) in walked.unreadable {
            // A manifest whose bytes do not match its digest is corrupt
            // storage; one that matches but is not JSON is a bad app.
            match error {
                StoreError::Corrupt { reason, .. } if self.has(&digest) => {
                    let moved_to = self.move_aside(&self.blob_path(&digest))?;
                    report.corrupt.push(CorruptBlob {
                        digest,
                        reason,
                        moved_to,
                    });
                }
                other => report
                    .unreadable_manifests
                    .push((digest, other.to_string())),
            }
        }

        let mut buf = vec![0u8; 1 << 20];
        for entry in self.read_blobs_dir()? {
            let path = entry.entry.path();
            let meta = entry
                .entry
                .metadata()
                .map_err(|e| StoreError::io(&path, e))?;
            let Some(digest) = entry.digest.filter(|_| meta.is_file()) else {
                let moved_to = self.move_aside(&path)?;
                report.moved_aside.push(StrayFile {
                    path,
                    reason: "not a blob named by its sha256 digest".into(),
                    moved_to,
                });
                continue;
            };
            report.checked += 1;
            let mut reason = walked
                .declared_sizes
                .get(&digest)
                .filter(|&&declared| declared != meta.len())
                .map(|declared| {
                    format!("{} bytes, but referenced as {declared} bytes", meta.len())
                });
            if reason.is_none() && !quick {
                let got = hash_file(&path, &mut buf)?;
                report.bytes_hashed += meta.len();
                if got != digest {
                    reason = Some(format!("its content hashes to {got}"));
                }
            }
            if let Some(reason) = reason {
                let moved_to = self.move_aside(&path)?;
                report.corrupt.push(CorruptBlob {
                    digest,
                    reason,
                    moved_to,
                });
            }
        }
        if !report.corrupt.is_empty() || !report.moved_aside.is_empty() {
            fsync_dir(&self.blobs_dir).map_err(|e| StoreError::io(&self.blobs_dir, e))?;
            fsync_dir(&self.corrupt_dir).map_err(|e| StoreError::io(&self.corrupt_dir, e))?;
        }
        report.corrupt.sort_by(|a, b| a.digest.cmp(&b.digest));
        for entry in self.refs()? {
            if !self.has(&entry.descriptor.digest) {
                report
                    .missing_ref_targets
                    .push((entry.name, entry.descriptor.digest));
            }
        }
        Ok(report)
    }

    /// Replaces a layout file that fails `check` with `fresh`, keeping the
    /// broken one in `corrupt/`.
    fn repair_layout_file(
        &self,
        path: &Path,
        check: fn(&[u8]) -> Result<(), String>,
        fresh: &[u8],
        report: &mut FsckReport,
    ) -> Result<()> {
        let reason = match fs::read(path) {
            Ok(bytes) => match check(&bytes) {
                Ok(()) => return Ok(()),
                Err(reason) => reason,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => "missing".to_string(),
            Err(e) => return Err(StoreError::io(path, e)),
        };
        let moved_to = if path.exists() {
            let to = self.move_aside(path)?;
            fsync_dir(&self.corrupt_dir).map_err(|e| StoreError::io(&self.corrupt_dir, e))?;
            to
        } else {
            PathBuf::new()
        };
        write_atomic(path, fresh).map_err(|e| StoreError::io(path, e))?;
        report.moved_aside.push(StrayFile {
            path: path.to_path_buf(),
            reason: format!("{reason}; replaced by an empty one"),
            moved_to,
        });
        Ok(())
    }

    /// Moves `path` into `corrupt/`, under a name not taken yet.
    fn move_aside(&self, path: &Path) -> Result<PathBuf> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "unnamed".into());
        let mut target = self.corrupt_dir.join(&name);
        let mut n = 1;
        while target.exists() {
            target = self.corrupt_dir.join(format!("{name}.{n}"));
            n += 1;
        }
        fs::rename(path, &target).map_err(|e| StoreError::io(path, e))?;
        Ok(target)
    }
}

fn hash_file(path: &Path, buf: &mut [u8]) -> Result<Digest> {
    let mut file = fs::File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut hasher = Sha256::new();
    loop {
        match file.read(buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::io(path, e)),
        }
    }
    Ok(Digest::from_hasher(hasher))
}
