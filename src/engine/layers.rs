//! Docker's unpacked layers checked against the stored layer blobs.
//!
//! For each image of an installed app, the engine's inspect says where its
//! storage driver holds every layer (`GraphDriver`; overlay2: `UpperDir` is
//! the top layer's `diff` directory, `LowerDir` the others', top first).
//! The image's `RootFS` diff_ids line up with the app's stored layers (the
//! image ID is the digest of the config that lists them), so each `diff`
//! directory is compared with the listing of its stored layer tar
//! ([`crate::app::listing`]): the directory exists; every path the tar
//! names exists with its kind (whiteouts as 0:0 character devices, opaque
//! directories with overlay2's attribute); every regular file has the
//! tar's size; and with `deep`, the sha256 of its content.
//!
//! When the engine cannot describe an image (its layer directory was
//! removed, say: the inspect fails), the layer directories are found in
//! its layer database, `DATA/image/overlay2/layerdb/sha256/<chain ID>/cache-id`.
//! A layer database entry whose `cache-id` is torn (empty or not a layer
//! directory's name) is engine metadata stowage cannot repair through the
//! engine: the engine neither loads that layer nor lets it be loaded
//! again; the report says which directory to remove.
//!
//! overlay2's own metadata of each layer is checked too: its `link` (a
//! short name under `overlay2/l/`) and its `lower` list (the short names
//! of the layers below). A power cut that empties them leaves the engine
//! unable to inspect or mount the image ([`check_layer_links`]).
//!
//! Listings are made once per layer blob (the blob read and inflated,
//! every file hashed) and kept in `ROOT/layer-files/<hex>.json`, so a quick
//! check is one `lstat` per path. Only overlay2 is checked; other drivers
//! are reported as not checked.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::Digest;
use crate::app::listing::{EntryKind, LayerListing, hash_reader, list_layer};
use crate::engine::docker::DockerEngine;
use crate::store::Store;

/// The one storage driver whose layers are checked.
pub const CHECKED_DRIVER: &str = "overlay2";

/// Damaged files listed per layer in a report; the count says the rest.
const FILES_LISTED: usize = 50;

/// Exit code of `fsck` when it finds damage it did not repair.
#[derive(Debug, thiserror::Error)]
#[error("fsck found damage it did not repair")]
pub struct DamageFound;

impl DamageFound {
    pub const EXIT_CODE: u8 = 1;
}

/// One damaged path of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileDamage {
    pub path: String,
    pub problem: String,
}

/// One damaged layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerDamage {
    pub diff_id: Digest,
    /// The stored blob it is reloaded from.
    pub blob: Digest,
    pub chain_id: Digest,
    /// Its `diff` directory, when known.
    pub dir: Option<PathBuf>,
    pub problem: String,
    /// The first damaged paths.
    pub files: Vec<FileDamage>,
    /// All damaged paths.
    pub files_damaged: usize,
    /// Engine metadata stowage cannot repair: remove this (dockerd running
    /// or not: the engine did not load it), then `stowage fsck --repair`.
    pub remove_to_recover: Option<PathBuf>,
}

/// A damaged image of an installed app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageDamage {
    pub tag: String,
    pub image_id: Digest,
    pub services: Vec<String>,
    /// What the engine answered when asked to describe it, if it failed.
    pub engine_error: Option<String>,
    pub layers: Vec<LayerDamage>,
}

/// The layers of one image, as the app's stored metadata gives them.
#[derive(Debug, Clone)]
pub struct StoredLayers {
    pub image_id: Digest,
    /// (blob, diff_id), base first.
    pub layers: Vec<(Digest, Digest)>,
}

/// Layer listings, made from the store's blobs once and kept on disk.
pub struct Listings {
    dir: PathBuf,
    memory: HashMap<Digest, Arc<LayerListing>>,
}

impl Listings {
    pub fn under(root: &Path) -> Listings {
        Listings {
            dir: root.join("layer-files"),
            memory: HashMap::new(),
        }
    }

    /// The listing of layer blob `blob`: from memory, from its file, or
    /// made from the blob (and kept). The reading runs off the runtime.
    pub async fn get(&mut self, store: &Store, blob: &Digest) -> Result<Arc<LayerListing>> {
        if let Some(listing) = self.memory.get(blob) {
            return Ok(listing.clone());
        }
        let (dir, store, wanted) = (self.dir.clone(), store.clone(), blob.clone());
        let listing =
            Arc::new(crate::fsutil::blocking(move || load_listing(&dir, &store, &wanted)).await?);
        self.memory.insert(blob.clone(), listing.clone());
        Ok(listing)
    }

    /// Removes the kept listings of blobs the store no longer holds.
    pub fn forget_absent(&self, store: &Store) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = name
                .strip_suffix(".json")
                .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok())
                .is_some_and(|d| store.has(&d));
            if !keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// A kept listing, or one made from the blob and kept.
fn load_listing(dir: &Path, store: &Store, blob: &Digest) -> Result<LayerListing> {
    let path = dir.join(format!("{}.json", blob.hex()));
    if let Some(listing) = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<LayerListing>(&bytes).ok())
    {
        return Ok(listing);
    }
    let file = store
        .open_blob(blob)
        .with_context(|| format!("cannot read layer blob {blob}"))?;
    let listing =
        list_layer(file).with_context(|| format!("cannot list the files of layer blob {blob}"))?;
    // A listing that cannot be kept costs only time at the next check.
    if let Err(e) = crate::fsutil::ensure_dir(dir, 0o700).and_then(|()| {
        crate::fsutil::write_atomic(&path, &serde_json::to_vec(&listing).unwrap_or_default())
    }) {
        tracing::warn!("cannot keep the listing {}: {e}", path.display());
    }
    Ok(listing)
}

/// What [`LayerChecker`] needs of Docker.
pub struct EngineLayout {
    pub data_root: PathBuf,
    pub driver: String,
}

impl EngineLayout {
    /// Why the layers cannot be checked here, if they cannot.
    pub fn not_checked(&self) -> Option<String> {
        if self.driver != CHECKED_DRIVER {
            return Some(format!(
                "Docker's layers not checked: storage driver {} (only {CHECKED_DRIVER} is checked)",
                self.driver
            ));
        }
        let overlay = self.data_root.join(CHECKED_DRIVER);
        if let Err(e) = std::fs::read_dir(&overlay) {
            return Some(format!(
                "Docker's layers not checked: cannot read {} ({e}; fsck must run as root on the engine's machine)",
                overlay.display()
            ));
        }
        None
    }

    fn layerdb(&self, chain_id: &Digest) -> PathBuf {
        self.data_root
            .join("image")
            .join(&self.driver)
            .join("layerdb")
            .join("sha256")
            .join(chain_id.hex())
    }
}

/// Checks images' layers, each layer (by chain ID) once per run.
pub struct LayerChecker<'a> {
    pub engine: &'a DockerEngine,
    pub store: &'a Store,
    pub layout: EngineLayout,
    pub deep: bool,
    pub listings: Listings,
    seen: BTreeMap<Digest, Option<LayerDamage>>,
}

impl<'a> LayerChecker<'a> {
    pub fn new(
        engine: &'a DockerEngine,
        store: &'a Store,
        root: &Path,
        layout: EngineLayout,
        deep: bool,
    ) -> LayerChecker<'a> {
        LayerChecker {
            engine,
            store,
            layout,
            deep,
            listings: Listings::under(root),
            seen: BTreeMap::new(),
        }
    }

    /// Forgets what was checked (after a repair changed the engine).
    pub fn forget(&mut self) {
        self.seen.clear();
    }

    /// The damaged layers of `image`, and the engine's error when it could
    /// not describe the image; `None` when the engine lacks the image.
    pub async fn check_image(
        &mut self,
        image: &StoredLayers,
    ) -> Result<Option<(Vec<LayerDamage>, Option<String>)>> {
        let diff_ids: Vec<Digest> = image.layers.iter().map(|(_, d)| d.clone()).collect();
        let chains = crate::oci::digest::chain_ids(&diff_ids);
        let (dirs, engine_error) =
            match self.engine.image_storage(&image.image_id.to_string()).await {
                Ok(None) => return Ok(None),
                Ok(Some(storage)) => (overlay_dirs(&storage.data, diff_ids.len()), None),
                Err(e) => (None, Some(e.to_string())),
            };
        let mut damaged = Vec::new();
        for (i, ((blob, diff_id), chain_id)) in image.layers.iter().zip(&chains).enumerate() {
            if let Some(verdict) = self.seen.get(chain_id) {
                damaged.extend(verdict.clone());
                continue;
            }
            let from_db = self.dir_from_layerdb(chain_id, diff_id);
            let dir = match (&dirs, &from_db) {
                (Some(dirs), _) => Ok(dirs[i].clone()),
                (None, Ok(dir)) => Ok(dir.clone()),
                (None, Err(torn)) => Err(torn.clone()),
            };
            let verdict = match dir {
                Err(torn) => Some(LayerDamage {
                    diff_id: diff_id.clone(),
                    blob: blob.clone(),
                    chain_id: chain_id.clone(),
                    dir: None,
                    problem: torn.problem,
                    files: Vec::new(),
                    files_damaged: 0,
                    remove_to_recover: torn.remove,
                }),
                Ok(dir) => {
                    let listing = self.listings.get(self.store, blob).await?;
                    let (deep, check_dir) = (self.deep, dir.clone());
                    let files = crate::fsutil::blocking(move || {
                        Ok::<_, std::io::Error>(check_layer_dir(&check_dir, &listing, deep))
                    })
                    .await?;
                    let overlay = self.layout.data_root.join(CHECKED_DRIVER);
                    let files = files.or_else(|| {
                        check_layer_links(&dir, &overlay, i).map(|p| (p, Vec::new(), 0))
                    });
                    files.map(|(problem, files, count)| LayerDamage {
                        diff_id: diff_id.clone(),
                        blob: blob.clone(),
                        chain_id: chain_id.clone(),
                        dir: Some(dir),
                        problem,
                        files,
                        files_damaged: count,
                        remove_to_recover: None,
                    })
                }
            };
            self.seen.insert(chain_id.clone(), verdict.clone());
            damaged.extend(verdict);
        }
        Ok(Some((damaged, engine_error)))
    }

    /// The torn layer database entries of an image the engine lacks: the
    /// engine drops an image whose layer entry it cannot read, and then
    /// refuses to load that layer again while the entry is there.
    pub fn torn_entries(&self, image: &StoredLayers) -> Vec<LayerDamage> {
        let diff_ids: Vec<Digest> = image.layers.iter().map(|(_, d)| d.clone()).collect();
        let chains = crate::oci::digest::chain_ids(&diff_ids);
        image
            .layers
            .iter()
            .zip(&chains)
            .filter_map(|((blob, diff_id), chain_id)| {
                let torn = self.dir_from_layerdb(chain_id, diff_id).err()?;
                torn.remove.as_ref()?;
                Some(LayerDamage {
                    diff_id: diff_id.clone(),
                    blob: blob.clone(),
                    chain_id: chain_id.clone(),
                    dir: None,
                    problem: torn.problem,
                    files: Vec::new(),
                    files_damaged: 0,
                    remove_to_recover: torn.remove,
                })
            })
            .collect()
    }

    /// A layer's `diff` directory from the layer database (its `cache-id`).
    fn dir_from_layerdb(&self, chain_id: &Digest, diff_id: &Digest) -> Result<PathBuf, Torn> {
        let entry = self.layout.layerdb(chain_id);
        let cache_id = match std::fs::read_to_string(entry.join("cache-id")) {
            Ok(id) => id,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !entry.exists() => {
                return Err(Torn {
                    problem: format!(
                        "the engine has no layer database entry {} for it: the layer is gone (a load puts it back)",
                        entry.display()
                    ),
                    remove: None,
                });
            }
            Err(e) => {
                return Err(Torn {
                    problem: format!(
                        "the engine's layer database entry {} is torn: cache-id: {e}",
                        entry.display()
                    ),
                    remove: Some(entry),
                });
            }
        };
        let cache_id = cache_id.trim();
        let recorded_diff = std::fs::read_to_string(entry.join("diff")).unwrap_or_default();
        let plausible = !cache_id.is_empty()
            && cache_id.bytes().all(|b| b.is_ascii_hexdigit())
            && recorded_diff.trim() == diff_id.to_string();
        if !plausible {
            return Err(Torn {
                problem: format!(
                    "the engine's layer database entry {} is torn (cache-id {:?}, diff {:?}): the engine neither uses this layer nor loads it again while the entry is there",
                    entry.display(),
                    cache_id,
                    recorded_diff.trim()
                ),
                remove: Some(entry),
            });
        }
        Ok(self
            .layout
            .data_root
            .join(CHECKED_DRIVER)
            .join(cache_id)
            .join("diff"))
    }
}

#[derive(Clone)]
struct Torn {
    problem: String,
    remove: Option<PathBuf>,
}

/// The `diff` directory of every layer, base first, from overlay2's
/// `GraphDriver` data; `None` when the data does not name one per layer.
fn overlay_dirs(data: &HashMap<String, String>, layers: usize) -> Option<Vec<PathBuf>> {
    let upper = PathBuf::from(data.get("UpperDir")?);
    let mut dirs: Vec<PathBuf> = data
        .get("LowerDir")
        .map(|l| {
            l.split(':')
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    // LowerDir is top first.
    dirs.reverse();
    dirs.push(upper);
    (dirs.len() == layers).then_some(dirs)
}

/// Compares one layer's `diff` directory with its listing: `None` when it
/// matches, else a summary, the first damaged paths and their count.
pub fn check_layer_dir(
    dir: &Path,
    listing: &LayerListing,
    deep: bool,
) -> Option<(String, Vec<FileDamage>, usize)> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Some((
                format!("its directory {} is not a directory", dir.display()),
                Vec::new(),
                0,
            ));
        }
        Err(e) => {
            return Some((
                format!("its directory {} is missing ({e})", dir.display()),
                Vec::new(),
                0,
            ));
        }
    }
    let mut damaged = Vec::new();
    let mut count = 0;
    let mut buffer = vec![0u8; 256 * 1024];
    for entry in &listing.entries {
        let path = dir.join(&entry.path);
        let problem = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(format!("missing (the layer has a {})", entry.kind.as_str()))
            }
            Err(e) => Some(format!("unreadable: {e}")),
            Ok(m) => {
                let t = m.file_type();
                match entry.kind {
                    EntryKind::File if !t.is_file() => {
                        Some("not a regular file (the layer has one)".to_string())
                    }
                    EntryKind::File if m.len() != entry.size => {
                        Some(format!("{} bytes, the layer has {}", m.len(), entry.size))
                    }
                    EntryKind::File if deep => {
                        match std::fs::File::open(&path).and_then(|f| hash_reader(f, &mut buffer)) {
                            Ok((hash, _)) if Some(&hash) == entry.sha256.as_ref() => None,
                            Ok(_) => Some("its content differs from the layer's".to_string()),
                            Err(e) => Some(format!("unreadable: {e}")),
                        }
                    }
                    EntryKind::Dir if !t.is_dir() => {
                        Some("not a directory (the layer has one)".to_string())
                    }
                    EntryKind::OpaqueDir if !t.is_dir() => {
                        Some("not a directory (the layer has an opaque one)".to_string())
                    }
                    EntryKind::OpaqueDir if !is_opaque(&path) => {
                        Some("its opaque attribute (trusted.overlay.opaque) is missing".to_string())
                    }
                    EntryKind::Symlink if !t.is_symlink() => {
                        Some("not a symbolic link (the layer has one)".to_string())
                    }
                    EntryKind::Whiteout if !(t.is_char_device() && m.rdev() == 0) => {
                        Some("not a whiteout (0:0 character device)".to_string())
                    }
                    _ => None,
                }
            }
        };
        if let Some(problem) = problem {
            count += 1;
            if damaged.len() < FILES_LISTED {
                damaged.push(FileDamage {
                    path: entry.path.clone(),
                    problem,
                });
            }
        }
    }
    (count > 0).then(|| {
        (
            format!(
                "{count} of its {} paths damaged in {}",
                listing.entries.len(),
                dir.display()
            ),
            damaged,
            count,
        )
    })
}

/// overlay2's own metadata of the layer whose `diff` directory is `diff`
/// and that has `below` layers under it: its `link` (the short name under
/// `OVERLAY/l/`) and its `lower` (the short names of the layers below, top
/// first). A power cut leaves these empty when dockerd did not flush them;
/// the engine then answers 500 (`readlink .../overlay2: invalid argument`)
/// to an inspect of the image and cannot mount it. `None` when they hold.
pub fn check_layer_links(diff: &Path, overlay: &Path, below: usize) -> Option<String> {
    let layer = diff.parent()?;
    let is_link = |short: &str| {
        !short.is_empty()
            && !short.contains('/')
            && std::fs::symlink_metadata(overlay.join("l").join(short))
                .is_ok_and(|m| m.file_type().is_symlink())
    };
    let link_file = layer.join("link");
    match std::fs::read_to_string(&link_file) {
        Ok(short) if is_link(short.trim()) => {}
        Ok(short) => {
            return Some(format!(
                "its overlay2 link {} is torn ({:?} names no link under {}/l)",
                link_file.display(),
                short.trim(),
                overlay.display()
            ));
        }
        Err(e) => {
            return Some(format!(
                "its overlay2 link {} is unreadable ({e})",
                link_file.display()
            ));
        }
    }
    let lower_file = layer.join("lower");
    let lower = match std::fs::read_to_string(&lower_file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && below == 0 => return None,
        Err(e) => {
            return Some(format!(
                "its overlay2 lower-layer list {} is unreadable ({e}); {below} layers are below it",
                lower_file.display()
            ));
        }
        Ok(lower) => lower,
    };
    let parts: Vec<&str> = lower.trim().split(':').collect();
    let whole = parts.len() == below
        && parts
            .iter()
            .all(|p| p.strip_prefix("l/").is_some_and(is_link));
    (!whole).then(|| {
        format!(
            "its overlay2 lower-layer list {} is torn ({} bytes, {below} layers are below it)",
            lower_file.display(),
            lower.len()
        )
    })
}

/// overlay2's opaque mark (`trusted.`, or `user.` for an unprivileged engine).
fn is_opaque(path: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| {
            let mut value = [0u8; 4];
            rustix::fs::lgetxattr(path, *name, &mut value[..]).is_ok_and(|n| value[..n] == *b"y")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::listing::ListedEntry;

    fn file(path: &str, content: &[u8]) -> ListedEntry {
        ListedEntry {
            path: path.into(),
            kind: EntryKind::File,
            size: content.len() as u64,
            sha256: Some(hash_reader(content, &mut [0u8; 64]).unwrap().0),
        }
    }

    #[test]
    fn a_layer_directory_is_checked_by_size_and_with_deep_by_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("opt")).unwrap();
        std::fs::write(dir.path().join("opt/job.bin"), b"abcd").unwrap();
        std::fs::write(dir.path().join("opt/same.bin"), b"wxyz").unwrap();
        std::os::unix::fs::symlink("opt", dir.path().join("link")).unwrap();
        let listing = LayerListing {
            entries: vec![
                ListedEntry {
                    path: "link".into(),
                    kind: EntryKind::Symlink,
                    size: 0,
                    sha256: None,
                },
                ListedEntry {
                    path: "opt".into(),
                    kind: EntryKind::Dir,
                    size: 0,
                    sha256: None,
                },
                file("opt/job.bin", b"abcd"),
                file("opt/same.bin", b"1234"),
            ],
            unlisted: 0,
        };
        // Same sizes: quick finds nothing, deep finds the changed content.
        assert_eq!(check_layer_dir(dir.path(), &listing, false), None);
        let (_, files, count) = check_layer_dir(dir.path(), &listing, true).unwrap();
        assert_eq!(count, 1);
        assert_eq!(files[0].path, "opt/same.bin");
        // Truncated, then removed.
        std::fs::write(dir.path().join("opt/job.bin"), b"").unwrap();
        let (_, files, _) = check_layer_dir(dir.path(), &listing, false).unwrap();
        assert_eq!(files[0].path, "opt/job.bin");
        assert!(
            files[0].problem.contains("0 bytes, the layer has 4"),
            "{files:?}"
        );
        std::fs::remove_dir_all(dir.path().join("opt")).unwrap();
        let (_, files, count) = check_layer_dir(dir.path(), &listing, false).unwrap();
        assert_eq!(count, 3, "{files:?}");
        // The whole directory.
        let gone = dir.path().join("gone");
        let (problem, _, _) = check_layer_dir(&gone, &listing, false).unwrap();
        assert!(problem.contains("missing"), "{problem}");
    }

    #[test]
    fn overlay2_links_and_lower_lists_are_checked() {
        let overlay = tempfile::tempdir().unwrap();
        let o = overlay.path();
        std::fs::create_dir_all(o.join("l")).unwrap();
        for (id, short) in [("a", "SHORTA"), ("b", "SHORTB")] {
            std::fs::create_dir_all(o.join(id).join("diff")).unwrap();
            std::fs::write(o.join(id).join("link"), short).unwrap();
            std::os::unix::fs::symlink(format!("../{id}/diff"), o.join("l").join(short)).unwrap();
        }
        std::fs::write(o.join("b/lower"), "l/SHORTA").unwrap();
        assert_eq!(check_layer_links(&o.join("a/diff"), o, 0), None);
        assert_eq!(check_layer_links(&o.join("b/diff"), o, 1), None);
        // One layer too few below it, an empty list, a name with no link.
        let torn = |below| check_layer_links(&o.join("b/diff"), o, below).unwrap();
        assert!(torn(2).contains("lower-layer list"), "{}", torn(2));
        std::fs::write(o.join("b/lower"), "").unwrap();
        assert!(torn(1).contains("torn (0 bytes"), "{}", torn(1));
        std::fs::write(o.join("b/lower"), "l/GONE").unwrap();
        assert!(torn(1).contains("torn"), "{}", torn(1));
        // A base layer with an empty list, a torn link.
        std::fs::write(o.join("a/lower"), "").unwrap();
        assert!(check_layer_links(&o.join("a/diff"), o, 0).is_some());
        std::fs::remove_file(o.join("a/lower")).unwrap();
        std::fs::write(o.join("a/link"), "").unwrap();
        let why = check_layer_links(&o.join("a/diff"), o, 0).unwrap();
        assert!(
            why.contains("overlay2 link") && why.contains("torn"),
            "{why}"
        );
    }

    #[test]
    fn overlay2_dirs_are_base_first() {
        let data = HashMap::from([
            ("UpperDir".to_string(), "/d/c/diff".to_string()),
            ("LowerDir".to_string(), "/d/b/diff:/d/a/diff".to_string()),
        ]);
        assert_eq!(
            overlay_dirs(&data, 3).unwrap(),
            ["/d/a/diff", "/d/b/diff", "/d/c/diff"].map(PathBuf::from)
        );
        assert_eq!(overlay_dirs(&data, 2), None);
        let single = HashMap::from([("UpperDir".to_string(), "/d/a/diff".to_string())]);
        assert_eq!(
            overlay_dirs(&single, 1).unwrap(),
            vec![PathBuf::from("/d/a/diff")]
        );
    }
}
