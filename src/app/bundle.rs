//! The app bundle (FORMAT.md "Bundle"): a reproducible `tar.gz` of the app
//! directory, its index of file digests, and its safe extraction.
//!
//! Reproducible: the same app directory and pinned compose file give the same
//! bytes on any machine and at any time. Entries are sorted by path, owned by
//! 0:0 without names, dated 0, with modes normalised to 0644/0755, and the
//! gzip header carries no time and no file name.
//!
//! The pinned compose file is always bundled as `docker-compose.yml`, the
//! only name Foundries' devices read.
//!
//! Extraction is all or nothing and durable: the bundle is unpacked into a
//! fresh directory beside the destination, every regular file checked against
//! the bundle index (or, for an app published without one, the bundle against
//! its digest and each file read back against its tar entry), modes kept
//! without setuid, setgid, sticky or world-write bits, and every file and
//! directory fsync'd, then renamed into
//! place and the parent directory fsync'd. On any error the partial directory
//! is removed and the destination is untouched. Each refusal names the path
//! at fault: absolute paths, `..`, links leaving the directory, devices and
//! fifos, entries past the size limits, and files the index does not vouch for.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::Digest;
use crate::fsutil::beneath::{self, Dir};

/// The file listing paths to leave out of the bundle (gitignore syntax).
pub const IGNORE_FILE: &str = ".composeappignores";

/// The one list of compose file names, shared with publish.
pub use crate::app::compose_file::COMPOSE_FILE_NAMES;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Sizes past which a bundle is refused on read (FORMAT.md's limits by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleLimits {
    /// The compose file.
    pub compose_file: u64,
    /// Any one file.
    pub file: u64,
    /// The whole bundle, compressed and uncompressed.
    pub bundle: u64,
}

impl Default for BundleLimits {
    fn default() -> Self {
        BundleLimits {
            compose_file: MIB,
            file: GIB,
            bundle: GIB,
        }
    }
}

/// A bundle ready to push: its bytes, their digest, and the bundle index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    /// Each regular file's path, relative to the app directory, to the digest
    /// of its content.
    pub index: BTreeMap<String, Digest>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("could not read {path}: {source}")]
    ReadApp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the app directory {dir} has no compose file {name}")]
    NoComposeInApp { dir: PathBuf, name: String },
    #[error("{path} is not a valid ignore file: {message}")]
    BadIgnoreFile { path: PathBuf, message: String },
    #[error("{path}: bundle paths must be UTF-8")]
    NotUtf8 { path: PathBuf },
    #[error("{path} is neither a file, a directory nor a symlink, and cannot be bundled")]
    Unbundlable { path: PathBuf },
    #[error(
        "{path} uses a name stowage keeps for its own files on the device ({RESERVED_PREFIX}*): rename it or list it in {IGNORE_FILE}"
    )]
    ReservedInApp { path: PathBuf },
    #[error("symlink {path} points to {target}, outside the app directory")]
    SymlinkOutsideApp { path: PathBuf, target: PathBuf },

    #[error("the bundle is not a valid tar.gz: {0}")]
    Corrupt(String),
    #[error("could not read the bundle: {0}")]
    Read(#[source] io::Error),
    #[error("bundle entry {path:?} is not valid UTF-8")]
    EntryNotUtf8 { path: String },
    #[error("bundle entry {path} has an absolute path")]
    AbsolutePath { path: String },
    #[error("bundle entry {path} has a '..' component")]
    ParentComponent { path: String },
    #[error("bundle entry {path} lies under the symlink {link}")]
    UnderSymlink { path: String, link: String },
    #[error("bundle entry {path} appears twice")]
    Duplicate { path: String },
    #[error("bundle entry {path} links to {target}, outside the bundle")]
    LinkEscapes { path: String, target: String },
    #[error(
        "bundle entry {path} links to {target}, through the link {through}, which could lead anywhere"
    )]
    LinkThroughLink {
        path: String,
        target: String,
        through: String,
    },
    #[error("bundle entry {path} uses a name stowage keeps for its own files ({RESERVED_PREFIX}*)")]
    ReservedName { path: String },
    #[error("bundle entry {path} is a hard link to {target}, which is not a file of the bundle")]
    BadHardLink { path: String, target: String },
    #[error("bundle entry {path} is a {kind}, which a bundle may not hold")]
    SpecialFile { path: String, kind: &'static str },
    #[error("compose file {path} is {size} bytes, over the limit of {limit}")]
    ComposeTooLarge { path: String, size: u64, limit: u64 },
    #[error("bundle entry {path} is {size} bytes, over the limit of {limit}")]
    FileTooLarge { path: String, size: u64, limit: u64 },
    #[error("the bundle is over the limit of {limit} bytes")]
    BundleTooLarge { limit: u64 },
    #[error("bundle entry {path} is not in the bundle index")]
    NotInIndex { path: String },
    #[error("bundle entry {path} has digest {actual}, but the bundle index says {expected}")]
    DigestMismatch {
        path: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("the bundle's bytes have digest {actual}, but the app manifest says {expected}")]
    BundleDigest { expected: Digest, actual: Digest },
    #[error("the bundle index lists {path}, which the bundle does not hold")]
    MissingFromBundle { path: String },
    #[error("the bundle holds no compose file ({})", COMPOSE_FILE_NAMES.join(", "))]
    NoComposeInBundle,
    #[error("cannot extract the bundle to {dest}: it already exists")]
    DestinationExists { dest: PathBuf },
    #[error("could not write {path} while extracting the bundle: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The name the compose file has in every bundle stowage writes: the only
/// one Foundries' devices read (FORMAT.md, "Bundle").
pub const BUNDLED_COMPOSE_NAME: &str = "docker-compose.yml";

/// Builds the reproducible bundle of `app_dir`, carrying `pinned_compose`
/// as the top-level `docker-compose.yml`. `compose_file_name`, the
/// project's own compose file (a path relative to `app_dir`, when it lies
/// there), is left out: the pinned copy takes its place, whatever it was
/// called. A `docker-compose.yml` the project has beside another compose
/// file is replaced too (a device would read only that one).
pub fn create_bundle(
    app_dir: &Path,
    compose_file_name: Option<&str>,
    pinned_compose: &[u8],
) -> Result<Bundle, BundleError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::ReadApp { path, source }
    };
    if let Some(name) = compose_file_name {
        match fs::symlink_metadata(app_dir.join(name)) {
            Ok(m) if m.is_file() => {}
            _ => {
                return Err(BundleError::NoComposeInApp {
                    dir: app_dir.to_path_buf(),
                    name: name.to_string(),
                });
            }
        }
    }
    let ignores = load_ignores(app_dir)?;

    let mut paths = Vec::new();
    collect(app_dir, app_dir, &ignores, &mut paths)?;
    paths.retain(|(rel, _)| rel != BUNDLED_COMPOSE_NAME && Some(rel.as_str()) != compose_file_name);
    paths.push((BUNDLED_COMPOSE_NAME.to_string(), Kind::Compose));
    // Sorted by path bytes: a directory comes before what it holds.
    paths.sort_by(|a, b| a.0.cmp(&b.0));

    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut index = BTreeMap::new();
    for (rel, kind) in &paths {
        let full = app_dir.join(rel);
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        let append = match kind {
            Kind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                tar.append_data(&mut header, format!("{rel}/"), io::empty())
            }
            Kind::Symlink(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                tar.append_link(&mut header, rel, target)
            }
            Kind::File { .. } | Kind::Compose => {
                header.set_entry_type(tar::EntryType::Regular);
                let executable = matches!(kind, Kind::File { executable: true });
                header.set_mode(if executable { 0o755 } else { 0o644 });
                let content = if matches!(kind, Kind::Compose) {
                    pinned_compose.to_vec()
                } else {
                    fs::read(&full).map_err(read_err(&full))?
                };
                index.insert(rel.clone(), Digest::of(&content));
                header.set_size(content.len() as u64);
                tar.append_data(&mut header, rel, &content[..])
            }
        };
        append.map_err(read_err(&full))?;
    }
    let bytes = tar
        .into_inner()
        .and_then(|gz| gz.finish())
        .map_err(read_err(app_dir))?;
    Ok(Bundle {
        digest: Digest::of(&bytes),
        bytes,
        index,
    })
}

/// The bundle index as FORMAT.md has it: compact JSON, keys sorted.
pub fn index_json(index: &BTreeMap<String, Digest>) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(index)
}

enum Kind {
    Dir,
    File {
        executable: bool,
    },
    Symlink(PathBuf),
    /// The pinned compose file, written as `docker-compose.yml`.
    Compose,
}

fn load_ignores(app_dir: &Path) -> Result<ignore::gitignore::Gitignore, BundleError> {
    let path = app_dir.join(IGNORE_FILE);
    let mut builder = ignore::gitignore::GitignoreBuilder::new(app_dir);
    if path.exists()
        && let Some(e) = builder.add(&path)
    {
        return Err(BundleError::BadIgnoreFile {
            path,
            message: e.to_string(),
        });
    }
    builder.build().map_err(|e| BundleError::BadIgnoreFile {
        path,
        message: e.to_string(),
    })
}

fn collect(
    app_dir: &Path,
    dir: &Path,
    ignores: &ignore::gitignore::Gitignore,
    out: &mut Vec<(String, Kind)>,
) -> Result<(), BundleError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::ReadApp { path, source }
    };
    for entry in fs::read_dir(dir).map_err(read_err(dir))? {
        let entry = entry.map_err(read_err(dir))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(read_err(&path))?;
        let rel_path = path.strip_prefix(app_dir).unwrap_or(&path);
        let rel = rel_path
            .to_str()
            .ok_or_else(|| BundleError::NotUtf8 { path: path.clone() })?
            .to_string();
        if rel == IGNORE_FILE || ignores.matched(rel_path, meta.is_dir()).is_ignore() {
            continue;
        }
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(RESERVED_PREFIX)
        {
            return Err(BundleError::ReservedInApp { path });
        }
        let file_type = meta.file_type();
        if file_type.is_dir() {
            out.push((rel, Kind::Dir));
            collect(app_dir, &path, ignores, out)?;
        } else if file_type.is_file() {
            let executable = meta.permissions().mode() & 0o111 != 0;
            out.push((rel, Kind::File { executable }));
        } else if file_type.is_symlink() {
            let target = fs::read_link(&path).map_err(read_err(&path))?;
            let parent = rel_path.parent().unwrap_or(Path::new(""));
            let inside = target
                .to_str()
                .is_some_and(|t| resolve_link(parent.to_str().unwrap_or(""), t).is_some());
            if !inside {
                return Err(BundleError::SymlinkOutsideApp { path, target });
            }
            out.push((rel, Kind::Symlink(target)));
        } else {
            return Err(BundleError::Unbundlable { path });
        }
    }
    Ok(())
}

/// Where a symlink in `parent` (relative to the bundle root) pointing to
/// `target` leads, relative to the root, or `None` when it leaves it.
fn resolve_link(parent: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = parent.split('/').filter(|c| !c.is_empty()).collect();
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// Checks an entry path and returns it without `./` and trailing `/`.
fn checked_path(raw: &[u8]) -> Result<String, BundleError> {
    let path = std::str::from_utf8(raw).map_err(|_| BundleError::EntryNotUtf8 {
        path: String::from_utf8_lossy(raw).into_owned(),
    })?;
    if path.starts_with('/') {
        return Err(BundleError::AbsolutePath { path: path.into() });
    }
    let mut clean = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err(BundleError::ParentComponent { path: path.into() }),
            c => clean.push(c),
        }
    }
    Ok(clean.join("/"))
}

/// Counts bytes passing through and fails past a limit, recording that it did.
struct Capped<R> {
    inner: R,
    left: u64,
    exceeded: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.exceeded.set(true);
            return Err(io::Error::other("the bundle is over its size limit"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The tar stream of a bundle, with both its compressed and uncompressed
/// sizes capped at `limit`.
fn open_bundle<R: Read>(
    bundle: R,
    limit: u64,
    exceeded: &std::rc::Rc<std::cell::Cell<bool>>,
) -> tar::Archive<Capped<flate2::read::GzDecoder<Capped<R>>>> {
    let compressed = Capped {
        inner: bundle,
        left: limit,
        exceeded: exceeded.clone(),
    };
    tar::Archive::new(Capped {
        inner: flate2::read::GzDecoder::new(compressed),
        left: limit,
        exceeded: exceeded.clone(),
    })
}

fn stream_error(
    e: io::Error,
    limits: &BundleLimits,
    exceeded: &std::rc::Rc<std::cell::Cell<bool>>,
) -> BundleError {
    if exceeded.get() {
        BundleError::BundleTooLarge {
            limit: limits.bundle,
        }
    } else {
        BundleError::Corrupt(e.to_string())
    }
}

/// Reads the compose file a device would use from a bundle: its name and content.
pub fn read_compose_from_bundle(
    bundle: impl Read,
    limits: &BundleLimits,
) -> Result<(String, Vec<u8>), BundleError> {
    let exceeded = Default::default();
    let mut archive = open_bundle(bundle, limits.bundle, &exceeded);
    let fail = |e| stream_error(e, limits, &exceeded);
    let mut found: Vec<(usize, String, Vec<u8>)> = Vec::new();
    for entry in archive.entries().map_err(fail)? {
        let mut entry = entry.map_err(fail)?;
        let path = checked_path(&entry.path_bytes())?;
        let Some(rank) = COMPOSE_FILE_NAMES.iter().position(|n| *n == path) else {
            continue;
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        if entry.size() > limits.compose_file {
            return Err(BundleError::ComposeTooLarge {
                path,
                size: entry.size(),
                limit: limits.compose_file,
            });
        }
        let mut content = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut content).map_err(fail)?;
        found.push((rank, path, content));
    }
    found
        .into_iter()
        .min_by_key(|(rank, ..)| *rank)
        .map(|(_, name, content)| (name, content))
        .ok_or(BundleError::NoComposeInBundle)
}

/// What an extraction checks the bundle against.
#[derive(Debug, Clone, Copy)]
pub enum Verify<'a> {
    /// The bundle index: every regular file, symlink and hard link must be
    /// in it (a link with the digest of empty content, as composectl lists
    /// links, or a hard link with its target's), and everything it lists
    /// must be in the bundle.
    Index(&'a BTreeMap<String, Digest>),
    /// No index (legacy apps, `APP_BUNDLE_INDEX_OFF=1`): the bundle's bytes
    /// must have this digest (hashed as they are extracted), and every
    /// file, read back from disk, must match what its tar entry held.
    Digest(&'a Digest),
}

/// Extracts a bundle to `dest` (which must not exist), verifying it as
/// `verify` says. Nothing is left behind on error, and nothing is written
/// outside the staging directory: every entry is made under its directory
/// descriptor, exclusively and without following a link
/// ([`crate::fsutil::beneath`]).
///
/// Modes are kept within safe limits: the permission bits of files and
/// directories as the tar has them, without setuid, setgid, sticky or
/// world-write bits (a directory keeps its owner's rwx); devices and fifos
/// are refused. Owners are not kept: everything belongs to the extracting
/// user (root on a device).
pub fn extract_bundle(
    bundle: impl Read,
    verify: Verify<'_>,
    dest: &Path,
    limits: &BundleLimits,
) -> Result<(), BundleError> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(BundleError::DestinationExists {
            dest: dest.to_path_buf(),
        });
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".into());
    let staging = Staging::create(parent, &name)?;
    let root = Dir::open(&staging.path).map_err(|source| BundleError::Write {
        path: staging.path.clone(),
        source,
    })?;
    unpack(bundle, verify, &root, limits)?;
    staging.commit(dest)
}

/// The mode a file extracted from a tar entry of `mode` gets.
pub fn safe_file_mode(mode: u32) -> u32 {
    mode & 0o775
}

/// The mode a directory extracted from a tar entry of `mode` gets.
pub fn safe_dir_mode(mode: u32) -> u32 {
    (mode & 0o775) | 0o700
}

/// Hashes what passes through.
struct Hashing<R> {
    inner: R,
    hasher: std::rc::Rc<std::cell::RefCell<Sha256>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.borrow_mut().update(&buf[..n]);
        Ok(n)
    }
}

/// Names of the staging directories [`extract_bundle`] makes beside its
/// destination start with this; whoever cleans that directory after a
/// killed extraction (under the lock extractions run under) removes them.
pub const STAGING_PREFIX: &str = ".extract-";

/// A fresh directory beside the destination, removed unless committed.
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    fn create(parent: &Path, name: &str) -> Result<Staging, BundleError> {
        for attempt in 0..100u32 {
            let path = parent.join(format!(
                "{STAGING_PREFIX}{name}-{}-{}",
                std::process::id(),
                crate::fsutil::random_u32().wrapping_add(attempt)
            ));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    return Ok(Staging {
                        path,
                        committed: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(BundleError::Write { path, source }),
            }
        }
        Err(BundleError::Write {
            path: parent.to_path_buf(),
            source: io::Error::other("could not make a unique staging directory"),
        })
    }

    fn commit(mut self, dest: &Path) -> Result<(), BundleError> {
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BundleError::Write { path, source }
        };
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o755))
            .map_err(write_err(&self.path))?;
        fs::rename(&self.path, dest).map_err(write_err(dest))?;
        self.committed = true;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fsync_dir(parent)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn fsync_dir(dir: &Path) -> Result<(), BundleError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| BundleError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

/// Whether a path component is one of the names stowage writes into an app
/// directory (`.stowage-images.yml`, `.stowage-bundle`, ...).
fn is_reserved(component: &str) -> bool {
    component.starts_with(RESERVED_PREFIX)
}

/// The prefix of the names stowage keeps for its own files in an app
/// directory; a bundle may hold none of them.
pub const RESERVED_PREFIX: &str = ".stowage-";

fn unpack(
    bundle: impl Read,
    verify: Verify<'_>,
    root: &Dir,
    limits: &BundleLimits,
) -> Result<(), BundleError> {
    let exceeded = Default::default();
    let hasher = std::rc::Rc::new(std::cell::RefCell::new(Sha256::new()));
    let bundle = Hashing {
        inner: bundle,
        hasher: hasher.clone(),
    };
    let mut archive = open_bundle(bundle, limits.bundle, &exceeded);
    let index = match verify {
        Verify::Index(index) => Some(index),
        Verify::Digest(_) => None,
    };
    let empty: Digest = crate::oci::format::EMPTY_SHA256
        .parse()
        .map_err(|_| BundleError::Corrupt("the empty digest does not parse".into()))?;
    // Directories and their modes, set once everything under them is made.
    let mut dir_modes: Vec<(String, u32)> = Vec::new();
    let fail = |e| stream_error(e, limits, &exceeded);
    let write_err = |rel: &str| {
        let path = root.path().join(rel);
        move |source| BundleError::Write { path, source }
    };

    let mut seen = BTreeSet::new();
    let mut symlinks = BTreeSet::new();
    let mut files: HashMap<String, Digest> = HashMap::new();
    // Directories made, relative to the root, to fsync at the end.
    let mut dirs = BTreeSet::new();
    let mut buf = vec![0u8; 64 * 1024];

    for entry in archive.entries().map_err(fail)? {
        let mut entry = entry.map_err(fail)?;
        let path = checked_path(&entry.path_bytes())?;
        if path.is_empty() {
            continue; // "./"
        }
        if path.split('/').any(is_reserved) {
            return Err(BundleError::ReservedName { path });
        }
        if !seen.insert(path.clone()) {
            return Err(BundleError::Duplicate { path });
        }
        // Nothing may be written through a symlink of the bundle.
        let mut prefix = path.as_str();
        while let Some(i) = prefix.rfind('/') {
            prefix = &prefix[..i];
            if symlinks.contains(prefix) {
                return Err(BundleError::UnderSymlink {
                    link: prefix.to_string(),
                    path,
                });
            }
        }
        let parent_rel = path.rsplit_once('/').map_or("", |(p, _)| p);
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644);
        use tar::EntryType as T;
        match kind {
            T::Directory => {
                make_dirs(root, &path, &mut dirs)?;
                dir_modes.push((path, safe_dir_mode(mode)));
            }
            T::Regular | T::Continuous => {
                let size = entry.size();
                if parent_rel.is_empty()
                    && COMPOSE_FILE_NAMES.contains(&path.as_str())
                    && size > limits.compose_file
                {
                    return Err(BundleError::ComposeTooLarge {
                        path,
                        size,
                        limit: limits.compose_file,
                    });
                }
                if size > limits.file {
                    return Err(BundleError::FileTooLarge {
                        path,
                        size,
                        limit: limits.file,
                    });
                }
                let expected = match index {
                    Some(index) => match index.get(&path) {
                        Some(d) => Some(d),
                        None => return Err(BundleError::NotInIndex { path }),
                    },
                    None => None,
                };
                make_dirs(root, parent_rel, &mut dirs)?;
                let mut file = root.create_file(&path, 0o600).map_err(write_err(&path))?;
                let mut hasher = Sha256::new();
                loop {
                    let n = entry.read(&mut buf).map_err(fail)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    file.write_all(&buf[..n]).map_err(write_err(&path))?;
                }
                let actual = Digest::from_hasher(hasher);
                if let Some(expected) = expected
                    && actual != *expected
                {
                    return Err(BundleError::DigestMismatch {
                        path,
                        expected: expected.clone(),
                        actual,
                    });
                }
                file.set_permissions(fs::Permissions::from_mode(safe_file_mode(mode)))
                    .and_then(|()| file.sync_all())
                    .map_err(write_err(&path))?;
                files.insert(path, actual);
            }
            T::Symlink => {
                let link = link_name(&entry, &path)?;
                if link.is_empty() || resolve_link(parent_rel, &link).is_none() {
                    return Err(BundleError::LinkEscapes { path, target: link });
                }
                // composectl's index lists a link with the digest of its
                // (empty) tar body; stowage's leaves links out.
                if let Some(index) = index
                    && let Some(expected) = index.get(&path)
                    && *expected != empty
                {
                    return Err(BundleError::DigestMismatch {
                        path,
                        expected: expected.clone(),
                        actual: empty.clone(),
                    });
                }
                make_dirs(root, parent_rel, &mut dirs)?;
                root.symlink(&link, &path).map_err(write_err(&path))?;
                symlinks.insert(path);
            }
            T::Link => {
                let link = link_name(&entry, &path)?;
                let link_path = match checked_path(link.as_bytes()) {
                    Ok(p) if !p.is_empty() => p,
                    _ => return Err(BundleError::LinkEscapes { path, target: link }),
                };
                let Some(digest) = files.get(&link_path).cloned() else {
                    return Err(BundleError::BadHardLink { path, target: link });
                };
                match index.map(|index| index.get(&path)) {
                    None => {}
                    Some(None) => return Err(BundleError::NotInIndex { path }),
                    // composectl lists a hard link with the digest of its
                    // empty tar body; stowage with its target's.
                    Some(Some(expected)) if *expected != digest && *expected != empty => {
                        return Err(BundleError::DigestMismatch {
                            path,
                            expected: expected.clone(),
                            actual: digest,
                        });
                    }
                    Some(_) => {}
                }
                make_dirs(root, parent_rel, &mut dirs)?;
                root.hard_link(&link_path, &path)
                    .map_err(write_err(&path))?;
                files.insert(path, digest);
            }
            T::Char => return Err(special(path, "character device")),
            T::Block => return Err(special(path, "block device")),
            T::Fifo => return Err(special(path, "fifo")),
            _ => return Err(special(path, "special entry")),
        }
    }

    if let Some(index) = index
        && let Some(missing) = index
            .keys()
            .find(|p| !files.contains_key(*p) && !symlinks.contains(*p))
    {
        return Err(BundleError::MissingFromBundle {
            path: missing.clone(),
        });
    }
    if let Verify::Digest(expected) = verify {
        // The whole blob, to its last byte (the tar reader stops at the
        // end-of-archive blocks, before the gzip trailer).
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(fail)?;
        let mut raw = rest.inner.into_inner();
        io::copy(&mut raw, &mut io::sink()).map_err(fail)?;
        let actual = Digest::from_hasher(hasher.replace(Sha256::new()));
        if actual != *expected {
            return Err(BundleError::BundleDigest {
                expected: expected.clone(),
                actual,
            });
        }
        // The tree as written, against what the tar's entries held.
        for (path, digest) in &files {
            let mut file = root.open_file(path).map_err(write_err(path))?;
            let mut hasher = Sha256::new();
            loop {
                let n = file.read(&mut buf).map_err(write_err(path))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            let on_disk = Digest::from_hasher(hasher);
            if on_disk != *digest {
                return Err(BundleError::DigestMismatch {
                    path: path.clone(),
                    expected: digest.clone(),
                    actual: on_disk,
                });
            }
        }
    }
    // Directory modes last, deepest first, once nothing more is made in them.
    dir_modes.sort_by_key(|(d, _)| std::cmp::Reverse(d.matches('/').count()));
    for (dir, mode) in &dir_modes {
        root.open_dir(dir)
            .and_then(|d| d.set_mode(*mode))
            .map_err(write_err(dir))?;
    }
    // Every link against the tree as extracted: its target may not pass
    // through another link (which could take it anywhere), whatever the
    // order the entries came in.
    for link in &symlinks {
        check_link_on_disk(root, link)?;
    }
    // Deepest first, so that a directory is synced after what it holds.
    let mut dirs: Vec<String> = dirs.into_iter().collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
    for dir in &dirs {
        root.open_dir(dir)
            .and_then(|d| d.sync())
            .map_err(write_err(dir))?;
    }
    root.sync().map_err(write_err(""))?;
    Ok(())
}

/// Follows the symlink at `link` (relative to the root) by its text, as the
/// kernel would, on the extracted tree: it must stay beneath the root, and
/// no component it passes through on the way (`d` in `d/x` or `d/..`) may
/// be a link. Its last component may be one (a link to a link), since that
/// link is checked in turn.
fn check_link_on_disk(root: &Dir, link: &str) -> Result<(), BundleError> {
    let escapes = |target: &str| BundleError::LinkEscapes {
        path: link.to_string(),
        target: target.to_string(),
    };
    let target = root.read_link(link).map_err(|source| BundleError::Write {
        path: root.path().join(link),
        source,
    })?;
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop();
    if target.starts_with('/') {
        return Err(escapes(&target));
    }
    let components: Vec<&str> = target
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    for (i, component) in components.iter().enumerate() {
        if *component == ".." {
            if parts.pop().is_none() {
                return Err(escapes(&target));
            }
            continue;
        }
        parts.push(component);
        if i + 1 == components.len() {
            break;
        }
        let walked = parts.join("/");
        match root.kind(&walked) {
            Ok(Some(beneath::Kind::Symlink)) => {
                return Err(BundleError::LinkThroughLink {
                    path: link.to_string(),
                    target: target.clone(),
                    through: walked,
                });
            }
            Ok(_) => {}
            // A component that is a file: the link leads nowhere.
            Err(_) => {}
        }
    }
    Ok(())
}

/// Creates `rel` and the directories above it that a tar only implies,
/// beneath the root and never through a link; remembers them for fsync.
fn make_dirs(root: &Dir, rel: &str, dirs: &mut BTreeSet<String>) -> Result<(), BundleError> {
    if rel.is_empty() {
        return Ok(());
    }
    let mut end = 0;
    while end < rel.len() {
        end = rel[end..].find('/').map_or(rel.len(), |i| end + i);
        let dir = &rel[..end];
        end += 1;
        if dirs.contains(dir) {
            continue;
        }
        let write_err = |source| BundleError::Write {
            path: root.path().join(dir),
            source,
        };
        match root.create_dir(dir, 0o755) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if root.kind(dir).map_err(write_err)? != Some(beneath::Kind::Dir) {
                    return Err(write_err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "an entry of the bundle that is not a directory is in the way",
                    )));
                }
            }
            Err(e) => return Err(write_err(e)),
        }
        dirs.insert(dir.to_string());
    }
    Ok(())
}

fn special(path: String, kind: &'static str) -> BundleError {
    BundleError::SpecialFile { path, kind }
}

fn link_name<R: Read>(entry: &tar::Entry<'_, R>, path: &str) -> Result<String, BundleError> {
    let raw = entry.link_name_bytes().unwrap_or_default();
    String::from_utf8(raw.into_owned()).map_err(|_| BundleError::EntryNotUtf8 {
        path: path.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const PINNED: &[u8] = b"services:\n  web:\n    image: reg.example/web@sha256:0000\n";

    /// An app directory as a developer has it, with a build section, a
    /// script, nested config, a symlink, and things to ignore.
    fn app_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        fs::write(
            p.join("docker-compose.yml"),
            "services:\n  web:\n    build: .\n",
        )
        .unwrap();
        fs::create_dir_all(p.join("config/nested")).unwrap();
        fs::write(p.join("config/nested/app.conf"), "port=80\n").unwrap();
        fs::write(p.join("config/secret.key"), "k").unwrap();
        fs::write(p.join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(p.join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir_all(p.join("node_modules/x")).unwrap();
        fs::write(p.join("node_modules/x/index.js"), "1").unwrap();
        fs::write(p.join("notes.tmp"), "scratch").unwrap();
        fs::write(p.join("keep.tmp"), "kept by negation").unwrap();
        symlink("config/nested/app.conf", p.join("app.conf")).unwrap();
        fs::write(
            p.join(IGNORE_FILE),
            "node_modules/\n*.tmp\n!keep.tmp\n/config/*.key\n",
        )
        .unwrap();
        dir
    }

    fn entries(bytes: &[u8]) -> Vec<(String, tar::EntryType, u32, u64, u64, u64)> {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.entry_type(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    h.mtime().unwrap(),
                )
            })
            .collect()
    }

    fn extract(
        bytes: &[u8],
        index: &BTreeMap<String, Digest>,
    ) -> (tempfile::TempDir, Result<(), BundleError>) {
        let parent = tempfile::tempdir().unwrap();
        let result = extract_bundle(
            bytes,
            Verify::Index(index),
            &parent.path().join("app"),
            &BundleLimits::default(),
        );
        (parent, result)
    }

    fn leftovers(parent: &Path) -> Vec<String> {
        fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// A gzip'd tar made entry by entry with raw headers, as an attacker would.
    struct Hostile {
        tar: tar::Builder<Vec<u8>>,
        index: BTreeMap<String, Digest>,
    }

    impl Hostile {
        fn new() -> Self {
            Hostile {
                tar: tar::Builder::new(Vec::new()),
                index: BTreeMap::new(),
            }
        }
        /// Writes the name straight into the header, bypassing the checks
        /// the tar crate makes on `set_path`.
        fn raw(
            &mut self,
            kind: tar::EntryType,
            name: &str,
            link: &str,
            content: &[u8],
        ) -> &mut Self {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(kind);
            h.set_mode(0o644);
            h.set_size(content.len() as u64);
            h.set_cksum();
            self.tar.append(&h, content).unwrap();
            self
        }
        fn file(&mut self, name: &str, content: &[u8]) -> &mut Self {
            self.index.insert(name.to_string(), Digest::of(content));
            self.raw(tar::EntryType::Regular, name, "", content)
        }
        fn finish(&mut self) -> Vec<u8> {
            let tar = std::mem::replace(&mut self.tar, tar::Builder::new(Vec::new()));
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar.into_inner().unwrap()).unwrap();
            gz.finish().unwrap()
        }
    }

    /// The bundle is refused, the error names `path`, and nothing is left.
    fn assert_refused(bytes: &[u8], index: &BTreeMap<String, Digest>, path: &str) -> BundleError {
        let (parent, result) = extract(bytes, index);
        let err = result.expect_err("hostile bundle was extracted");
        assert!(err.to_string().contains(path), "{err} does not name {path}");
        assert_eq!(leftovers(parent.path()), Vec::<String>::new(), "{err}");
        err
    }

    #[test]
    fn the_same_app_gives_the_same_bytes_whatever_the_mtimes_and_owners() {
        let a = app_dir();
        let first = create_bundle(a.path(), Some("docker-compose.yml"), PINNED).unwrap();
        let again = create_bundle(a.path(), Some("docker-compose.yml"), PINNED).unwrap();
        assert_eq!(first, again);

        let b = app_dir();
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        fs::File::options()
            .write(true)
            .open(b.path().join("run.sh"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        std::os::unix::fs::lchown(
            b.path().join("config/nested/app.conf"),
            Some(1234),
            Some(99),
        )
        .unwrap();
        std::os::unix::fs::lchown(b.path().join("config"), Some(42), Some(42)).unwrap();
        fs::set_permissions(
            b.path().join("config/nested/app.conf"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let other = create_bundle(b.path(), Some("docker-compose.yml"), PINNED).unwrap();
        assert_eq!(first.bytes, other.bytes);
        assert_eq!(first.digest, Digest::of(&other.bytes));

        // The gzip header has no time, no name, and an "unknown" OS.
        assert_eq!(&first.bytes[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
    }

    #[test]
    fn bundle_is_sorted_normalised_pinned_and_honours_ignores() {
        let app = app_dir();
        let bundle = create_bundle(app.path(), Some("docker-compose.yml"), PINNED).unwrap();
        let listed = entries(&bundle.bytes);
        let names: Vec<&str> = listed.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "app.conf",
                "config/",
                "config/nested/",
                "config/nested/app.conf",
                "docker-compose.yml",
                "keep.tmp",
                "run.sh"
            ]
        );
        for (name, kind, mode, uid, gid, mtime) in &listed {
            assert_eq!((*uid, *gid, *mtime), (0, 0, 0), "{name}");
            let expected = match (*kind, name.as_str()) {
                (tar::EntryType::Directory, _) | (_, "run.sh") => 0o755,
                (tar::EntryType::Symlink, _) => 0o777,
                _ => 0o644,
            };
            assert_eq!(*mode, expected, "{name}");
        }
        assert_eq!(bundle.index["docker-compose.yml"], Digest::of(PINNED));
        assert_eq!(
            bundle.index["config/nested/app.conf"],
            Digest::of(b"port=80\n")
        );
        assert_eq!(bundle.index.len(), 4, "only regular files are indexed");
        let json = String::from_utf8(index_json(&bundle.index).unwrap()).unwrap();
        assert!(
            json.starts_with("{\"config/nested/app.conf\":\"sha256:"),
            "{json}"
        );
        assert!(!json.contains(' '), "{json}");

        let (name, compose) =
            read_compose_from_bundle(&bundle.bytes[..], &BundleLimits::default()).unwrap();
        assert_eq!(
            (name.as_str(), compose.as_slice()),
            ("docker-compose.yml", PINNED)
        );
    }

    #[test]
    fn a_verified_bundle_extracts_into_place() {
        let app = app_dir();
        let bundle = create_bundle(app.path(), Some("docker-compose.yml"), PINNED).unwrap();
        let (parent, result) = extract(&bundle.bytes, &bundle.index);
        result.unwrap();
        let dest = parent.path().join("app");
        assert_eq!(fs::read(dest.join("docker-compose.yml")).unwrap(), PINNED);
        assert_eq!(
            fs::read_to_string(dest.join("app.conf")).unwrap(),
            "port=80\n"
        );
        let mode = fs::metadata(dest.join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(!dest.join("node_modules").exists());
        assert_eq!(
            leftovers(parent.path()),
            ["app"],
            "no staging directory left"
        );

        // A second extraction to the same place does not clobber it.
        let err = extract_bundle(
            &bundle.bytes[..],
            Verify::Index(&bundle.index),
            &dest,
            &BundleLimits::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, BundleError::DestinationExists { .. }),
            "{err}"
        );
    }

    #[test]
    fn path_escapes_are_refused() {
        let mut h = Hostile::new();
        let bytes = h.file("ok.txt", b"fine").file("/etc/evil", b"x").finish();
        let err = assert_refused(&bytes, &h.index, "/etc/evil");
        assert!(matches!(err, BundleError::AbsolutePath { .. }));

        let mut h = Hostile::new();
        let bytes = h.file("sub/../../evil", b"x").finish();
        let err = assert_refused(&bytes, &h.index, "sub/../../evil");
        assert!(matches!(err, BundleError::ParentComponent { .. }));
    }

    #[test]
    fn links_leaving_the_directory_are_refused() {
        let mut h = Hostile::new();
        let bytes = h.raw(tar::EntryType::Symlink, "etc", "/etc", b"").finish();
        assert_refused(&bytes, &h.index, "etc");

        let mut h = Hostile::new();
        let bytes = h
            .raw(tar::EntryType::Symlink, "a/up", "../../outside", b"")
            .finish();
        let err = assert_refused(&bytes, &h.index, "a/up");
        assert!(matches!(err, BundleError::LinkEscapes { .. }));

        let mut h = Hostile::new();
        let bytes = h
            .raw(tar::EntryType::Link, "hard", "/etc/passwd", b"")
            .finish();
        assert_refused(&bytes, &h.index, "hard");

        // A symlink that stays inside, then a write through it.
        let mut h = Hostile::new();
        let bytes = h
            .raw(tar::EntryType::Symlink, "dir", ".", b"")
            .file("dir/x", b"x")
            .finish();
        let err = assert_refused(&bytes, &h.index, "dir/x");
        assert!(matches!(err, BundleError::UnderSymlink { .. }));
    }

    #[test]
    fn devices_and_fifos_are_refused() {
        for (kind, name) in [
            (tar::EntryType::Char, "null"),
            (tar::EntryType::Block, "sda"),
            (tar::EntryType::Fifo, "pipe"),
        ] {
            let mut h = Hostile::new();
            let bytes = h.file("ok", b"ok").raw(kind, name, "", b"").finish();
            let err = assert_refused(&bytes, &h.index, name);
            assert!(matches!(err, BundleError::SpecialFile { .. }), "{err}");
        }
    }

    #[test]
    fn oversized_compose_files_files_and_bundles_are_refused() {
        let big_compose = vec![b'#'; (MIB + 1) as usize];
        for name in COMPOSE_FILE_NAMES {
            let mut h = Hostile::new();
            let bytes = h.file(name, &big_compose).finish();
            let err = assert_refused(&bytes, &h.index, name);
            assert!(matches!(err, BundleError::ComposeTooLarge { .. }), "{err}");
            let err = read_compose_from_bundle(&bytes[..], &BundleLimits::default()).unwrap_err();
            assert!(matches!(err, BundleError::ComposeTooLarge { .. }), "{err}");
        }
        // The same size is fine for another file.
        let mut h = Hostile::new();
        let bytes = h.file("data/docker-compose.yml", &big_compose).finish();
        let (_parent, result) = extract(&bytes, &h.index);
        result.unwrap();

        let small = BundleLimits {
            compose_file: 100,
            file: 1000,
            bundle: 4096,
        };
        let mut h = Hostile::new();
        let bytes = h.file("a", &[1; 500]).file("big.bin", &[2; 1001]).finish();
        let parent = tempfile::tempdir().unwrap();
        let err = extract_bundle(
            &bytes[..],
            Verify::Index(&h.index),
            &parent.path().join("app"),
            &small,
        )
        .unwrap_err();
        assert!(matches!(err, BundleError::FileTooLarge { .. }), "{err}");
        assert!(err.to_string().contains("big.bin"), "{err}");
        assert!(leftovers(parent.path()).is_empty());

        let mut h = Hostile::new();
        for i in 0..10 {
            h.file(&format!("f{i}"), &[i; 900]);
        }
        let bytes = h.finish();
        let err = extract_bundle(
            &bytes[..],
            Verify::Index(&h.index),
            &parent.path().join("app"),
            &small,
        )
        .unwrap_err();
        assert!(matches!(err, BundleError::BundleTooLarge { .. }), "{err}");
        assert!(leftovers(parent.path()).is_empty());
    }

    #[test]
    fn files_the_index_does_not_vouch_for_are_refused() {
        let mut h = Hostile::new();
        let bytes = h.file("a.txt", b"original").finish();
        let mut index = h.index.clone();
        index.insert("a.txt".into(), Digest::of(b"tampered"));
        let err = assert_refused(&bytes, &index, "a.txt");
        assert!(matches!(err, BundleError::DigestMismatch { .. }), "{err}");

        let mut h = Hostile::new();
        let bytes = h
            .file("a.txt", b"a")
            .raw(tar::EntryType::Regular, "extra", "", b"e")
            .finish();
        let err = assert_refused(&bytes, &h.index, "extra");
        assert!(matches!(err, BundleError::NotInIndex { .. }), "{err}");

        let mut h = Hostile::new();
        let bytes = h.file("a.txt", b"a").finish();
        let mut index = h.index.clone();
        index.insert("gone.txt".into(), Digest::of(b"g"));
        let err = assert_refused(&bytes, &index, "gone.txt");
        assert!(
            matches!(err, BundleError::MissingFromBundle { .. }),
            "{err}"
        );

        let mut h = Hostile::new();
        let bytes = h.file("a.txt", b"a").file("a.txt", b"a").finish();
        let err = assert_refused(&bytes, &h.index, "a.txt");
        assert!(matches!(err, BundleError::Duplicate { .. }), "{err}");
    }

    #[test]
    fn what_is_not_a_bundle_is_refused() {
        let err = assert_refused(b"not gzip at all", &BTreeMap::new(), "");
        assert!(matches!(err, BundleError::Corrupt(_)), "{err}");
        let err = read_compose_from_bundle(
            &Hostile::new().file("x", b"x").finish()[..],
            &BundleLimits::default(),
        )
        .unwrap_err();
        assert!(matches!(err, BundleError::NoComposeInBundle), "{err}");
    }

    #[test]
    fn every_name_publish_accepts_is_a_compose_file_on_the_device() {
        for name in COMPOSE_FILE_NAMES {
            let bytes = Hostile::new().file(name, b"services: {}").finish();
            let compose = read_compose_from_bundle(&bytes[..], &BundleLimits::default())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(compose.0, *name);
        }
    }

    #[test]
    fn the_device_prefers_docker_compose_yml() {
        let mut h = Hostile::new();
        let bytes = h
            .file("compose.yaml", b"yaml")
            .file("docker-compose.yml", b"dc")
            .finish();
        let (name, content) =
            read_compose_from_bundle(&bytes[..], &BundleLimits::default()).unwrap();
        assert_eq!(
            (name.as_str(), content.as_slice()),
            ("docker-compose.yml", &b"dc"[..])
        );
    }

    #[test]
    fn an_app_holding_a_name_stowage_keeps_cannot_be_bundled() {
        let app = app_dir();
        fs::write(app.path().join("config/.stowage-images.yml"), "x").unwrap();
        let err = create_bundle(app.path(), Some("docker-compose.yml"), PINNED).unwrap_err();
        assert!(matches!(err, BundleError::ReservedInApp { .. }), "{err}");
        fs::write(app.path().join(IGNORE_FILE), ".stowage-*\n").unwrap();
        create_bundle(app.path(), Some("docker-compose.yml"), PINNED).unwrap();
    }

    #[test]
    fn an_app_with_a_symlink_out_of_it_cannot_be_bundled() {
        let app = app_dir();
        symlink("../../etc/passwd", app.path().join("config/pw")).unwrap();
        let err = create_bundle(app.path(), Some("docker-compose.yml"), PINNED).unwrap_err();
        assert!(
            matches!(err, BundleError::SymlinkOutsideApp { .. }),
            "{err}"
        );
        let err = create_bundle(app.path(), Some("compose.yml"), PINNED).unwrap_err();
        assert!(matches!(err, BundleError::NoComposeInApp { .. }), "{err}");
    }

    /// `d0/d1/.../d11`, and a link at its bottom up to the root (inside).
    fn deep_link(h: &mut Hostile) -> String {
        let deep: Vec<String> = (0..12).map(|i| format!("d{i}")).collect();
        let deep = deep.join("/");
        let up = [".."; 12].join("/");
        h.raw(tar::EntryType::Directory, &format!("{deep}/"), "", b"")
            .raw(tar::EntryType::Symlink, &format!("{deep}/l"), &up, b"");
        format!("{deep}/l")
    }

    #[test]
    fn a_link_that_leaves_through_another_link_is_refused_whatever_the_order() {
        // Alone, the deep link points at the root: fine.
        let mut h = Hostile::new();
        deep_link(&mut h);
        let bytes = h.file("docker-compose.yml", b"services: {}").finish();
        let (_parent, result) = extract(&bytes, &h.index);
        result.unwrap();

        // Its text stays inside, but followed on disk through the deep link
        // it ends above the root.
        let mut h = Hostile::new();
        let l = deep_link(&mut h);
        let bytes = h
            .raw(tar::EntryType::Symlink, "escape", &format!("{l}/.."), b"")
            .finish();
        let err = assert_refused(&bytes, &h.index, "escape");
        assert!(
            matches!(&err, BundleError::LinkThroughLink { through, .. } if *through == l),
            "{err}"
        );

        // The same, the escaping link first.
        let mut h = Hostile::new();
        let deep: Vec<String> = (0..12).map(|i| format!("d{i}")).collect();
        let deep = deep.join("/");
        let bytes = h
            .raw(
                tar::EntryType::Symlink,
                "escape",
                &format!("{deep}/l/../.."),
                b"",
            )
            .raw(tar::EntryType::Directory, &format!("{deep}/"), "", b"")
            .raw(
                tar::EntryType::Symlink,
                &format!("{deep}/l"),
                &[".."; 12].join("/"),
                b"",
            )
            .finish();
        let err = assert_refused(&bytes, &h.index, "escape");
        assert!(matches!(err, BundleError::LinkThroughLink { .. }), "{err}");

        // Any link through a link, even one that stays inside.
        let mut h = Hostile::new();
        let bytes = h
            .file("sub/f", b"f")
            .raw(tar::EntryType::Symlink, "a", "sub", b"")
            .raw(tar::EntryType::Symlink, "b", "a/f", b"")
            .finish();
        let err = assert_refused(&bytes, &h.index, "b");
        assert!(matches!(err, BundleError::LinkThroughLink { .. }), "{err}");

        // A link to a link is fine: each is checked.
        let mut h = Hostile::new();
        let bytes = h
            .file("sub/f", b"f")
            .raw(tar::EntryType::Symlink, "a", "sub/f", b"")
            .raw(tar::EntryType::Symlink, "b", "a", b"")
            .raw(tar::EntryType::Symlink, "c", "./sub/../a", b"")
            .finish();
        let (_parent, result) = extract(&bytes, &h.index);
        result.unwrap();
    }

    #[test]
    fn names_stowage_keeps_for_itself_are_refused() {
        for (kind, name, link) in [
            (
                tar::EntryType::Symlink,
                ".stowage-images.yml.tmp",
                "docker-compose.yml",
            ),
            (tar::EntryType::Symlink, ".stowage-images.yml", "x"),
            (tar::EntryType::Regular, ".stowage-bundle", ""),
            (tar::EntryType::Directory, ".stowage-x/", ""),
            (tar::EntryType::Regular, "sub/.stowage-images.yml", ""),
        ] {
            let mut h = Hostile::new();
            h.file("docker-compose.yml", b"services: {}");
            if kind == tar::EntryType::Regular {
                h.file(name, b"x");
            } else {
                h.raw(kind, name, link, b"");
            }
            let bytes = h.finish();
            let err = assert_refused(&bytes, &h.index, name.trim_end_matches('/'));
            assert!(matches!(err, BundleError::ReservedName { .. }), "{err}");
        }
    }

    #[test]
    fn extraction_never_writes_outside_even_past_the_checks() {
        // A link planted where the bundle then writes: refused, and the
        // file it points to untouched.
        let parent = tempfile::tempdir().unwrap();
        let victim = parent.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let mut h = Hostile::new();
        let bytes = h
            .raw(tar::EntryType::Symlink, "x", "y", b"")
            .file("x", b"overwritten")
            .finish();
        // The index vouches for the link as composectl lists links (the
        // digest of empty content), so only the duplicate check stands in
        // the way.
        h.index.insert(
            "x".into(),
            crate::oci::format::EMPTY_SHA256.parse().unwrap(),
        );
        let err = extract_bundle(
            &bytes[..],
            Verify::Index(&h.index),
            &parent.path().join("app"),
            &BundleLimits::default(),
        )
        .unwrap_err();
        assert!(matches!(err, BundleError::Duplicate { .. }), "{err}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(leftovers(parent.path()), ["victim"]);
    }

    /// A bundle as composectl writes one: Go's tar of the app directory,
    /// modes and links kept, every non-directory entry in the index (links
    /// with the digest of their empty body).
    fn composectl_bundle() -> (Vec<u8>, BTreeMap<String, Digest>) {
        let empty: Digest = crate::oci::format::EMPTY_SHA256.parse().unwrap();
        let mut tar = tar::Builder::new(Vec::new());
        let mut index = BTreeMap::new();
        let mut add = |name: &str, kind: tar::EntryType, mode: u32, link: &str, body: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(body.len() as u64);
            h.set_mtime(0);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            tar.append_data(&mut h, name, body).unwrap();
            if kind != tar::EntryType::Directory {
                index.insert(name.trim_end_matches('/').to_string(), Digest::of(body));
            }
        };
        add("conf/", tar::EntryType::Directory, 0o750, "", b"");
        add(
            "conf/app.conf",
            tar::EntryType::Regular,
            0o644,
            "",
            b"port=80\n",
        );
        add("conf/secret", tar::EntryType::Regular, 0o600, "", b"s3cret");
        add("conf/link", tar::EntryType::Symlink, 0o777, "app.conf", b"");
        add(
            "conf/hard",
            tar::EntryType::Link,
            0o644,
            "conf/app.conf",
            b"",
        );
        add(
            "docker-compose.yml",
            tar::EntryType::Regular,
            0o644,
            "",
            PINNED,
        );
        add(
            "run.sh",
            tar::EntryType::Regular,
            0o4755,
            "",
            b"#!/bin/sh\n",
        );
        add("shared", tar::EntryType::Regular, 0o666, "", b"w");
        assert_eq!(index["conf/link"], empty);
        assert_eq!(index["conf/hard"], empty);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar.into_inner().unwrap()).unwrap();
        (gz.finish().unwrap(), index)
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_composectl_bundle_extracts_with_its_links_and_safe_modes() {
        let (bytes, index) = composectl_bundle();
        let (parent, result) = extract(&bytes, &index);
        result.unwrap();
        let app = parent.path().join("app");
        assert_eq!(fs::read(app.join("conf/link")).unwrap(), b"port=80\n");
        assert_eq!(
            fs::read_link(app.join("conf/link")).unwrap(),
            Path::new("app.conf")
        );
        assert_eq!(fs::read(app.join("conf/hard")).unwrap(), b"port=80\n");
        assert_eq!(mode_of(&app.join("conf/secret")), 0o600, "kept");
        assert_eq!(mode_of(&app.join("conf")), 0o750, "kept");
        assert_eq!(mode_of(&app.join("run.sh")), 0o755, "setuid dropped");
        assert_eq!(mode_of(&app.join("shared")), 0o664, "world-write dropped");

        // A link the index gives a content digest is refused.
        let mut lying = index.clone();
        lying.insert("conf/link".into(), Digest::of(b"port=80\n"));
        assert_refused(&bytes, &lying, "conf/link");
    }

    #[test]
    fn without_an_index_the_bundle_digest_and_the_tar_vouch_for_it() {
        let (bytes, _) = composectl_bundle();
        let digest = Digest::of(&bytes);
        let parent = tempfile::tempdir().unwrap();
        let dest = parent.path().join("app");
        extract_bundle(
            &bytes[..],
            Verify::Digest(&digest),
            &dest,
            &BundleLimits::default(),
        )
        .unwrap();
        assert_eq!(fs::read(dest.join("conf/secret")).unwrap(), b"s3cret");
        assert_eq!(mode_of(&dest.join("conf/secret")), 0o600);

        // Other bytes than the manifest names: refused, nothing left.
        let other = Digest::of(b"another bundle");
        let parent = tempfile::tempdir().unwrap();
        let err = extract_bundle(
            &bytes[..],
            Verify::Digest(&other),
            &parent.path().join("app"),
            &BundleLimits::default(),
        )
        .unwrap_err();
        assert!(matches!(err, BundleError::BundleDigest { .. }), "{err}");
        assert_eq!(leftovers(parent.path()), Vec::<String>::new());
    }

    #[test]
    fn the_compose_file_is_bundled_as_docker_compose_yml_whatever_its_name() {
        let app = app_dir();
        fs::rename(
            app.path().join("docker-compose.yml"),
            app.path().join("compose.yaml"),
        )
        .unwrap();
        let bundle = create_bundle(app.path(), Some("compose.yaml"), PINNED).unwrap();
        let names: Vec<String> = entries(&bundle.bytes).into_iter().map(|e| e.0).collect();
        assert!(
            names.contains(&"docker-compose.yml".to_string()),
            "{names:?}"
        );
        assert!(!names.contains(&"compose.yaml".to_string()), "{names:?}");
        assert_eq!(bundle.index["docker-compose.yml"], Digest::of(PINNED));
        assert!(!bundle.index.contains_key("compose.yaml"));
    }
}
