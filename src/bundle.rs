//! The app bundle: a reproducible `tar.gz` of the app directory, its index
//! of file digests, and its safe extraction on the device.
//!
//! Reproducible: entries sorted, owner 0:0 without names, mtime 0, modes
//! normalised, gzip header without time or name, so the same directory gives
//! the same bytes on any machine. Safe: extraction goes into a fresh
//! directory beside the destination and is renamed into place only when every
//! entry passed every check, so a refused bundle leaves nothing behind.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::Digest;
use crate::compose_file::COMPOSE_FILE_NAMES;
use crate::digest::DigestWriter;
use crate::fsutil::fsync_dir;

/// The file that lists what to leave out (gitignore syntax); left out itself.
pub const IGNORE_FILE: &str = ".composeappignores";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {message}")]
    Ignore { path: PathBuf, message: String },
    #[error("the bundle is not a valid tar.gz: {0}")]
    Format(String),
    #[error("the bundle entry {path:?} is refused: {reason}")]
    Refused { path: String, reason: String },
    #[error("the bundle has no compose file (docker-compose.yml, compose.yml or compose.yaml)")]
    NoCompose,
    #[error("cannot write the extracted bundle at {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Limits on what a device reads from a bundle (FORMAT.md).
#[derive(Debug, Clone, Copy)]
pub struct BundleLimits {
    pub max_compose: u64,
    pub max_file: u64,
    pub max_total: u64,
}

impl Default for BundleLimits {
    fn default() -> Self {
        BundleLimits {
            max_compose: 1 << 20,
            max_file: 1 << 30,
            max_total: 1 << 30,
        }
    }
}

/// A bundle as published.
pub struct Bundle {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    /// Every regular file's path and the digest of its content.
    pub index: BTreeMap<String, Digest>,
}

/// Bundles `app_dir`, with the compose file `compose_name` replaced by
/// `pinned_compose`.
pub fn create_bundle(
    app_dir: &Path,
    compose_name: &str,
    pinned_compose: &[u8],
) -> Result<Bundle, BundleError> {
    let ignore = load_ignores(app_dir)?;
    let mut paths = Vec::new();
    collect(app_dir, app_dir, &ignore, &mut paths)?;
    paths.sort();

    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::best());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut index = BTreeMap::new();
    for rel in &paths {
        let full = app_dir.join(rel);
        let read_error = |source| BundleError::Read {
            path: full.clone(),
            source,
        };
        let meta = fs::symlink_metadata(&full).map_err(read_error)?;
        let name = rel.to_string_lossy().to_string();
        let mut header = tar::Header::new_ustar();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        if meta.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            header.set_cksum();
            tar.append_data(&mut header, format!("{name}/"), io::empty())
                .map_err(|e| BundleError::Format(e.to_string()))?;
        } else if meta.file_type().is_symlink() {
            let target = fs::read_link(&full).map_err(read_error)?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            tar.append_link(&mut header, &name, &target)
                .map_err(|e| BundleError::Format(e.to_string()))?;
        } else if meta.is_file() {
            let content = if name == compose_name {
                pinned_compose.to_vec()
            } else {
                fs::read(&full).map_err(read_error)?
            };
            let executable = meta.permissions().mode() & 0o111 != 0;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(if executable { 0o755 } else { 0o644 });
            header.set_size(content.len() as u64);
            header.set_cksum();
            index.insert(name.clone(), Digest::of(&content));
            tar.append_data(&mut header, &name, content.as_slice())
                .map_err(|e| BundleError::Format(e.to_string()))?;
        }
    }
    let gz = tar
        .into_inner()
        .map_err(|e| BundleError::Format(e.to_string()))?;
    let bytes = gz
        .finish()
        .map_err(|e| BundleError::Format(e.to_string()))?;
    Ok(Bundle {
        digest: Digest::of(&bytes),
        bytes,
        index,
    })
}

/// The bundle index as pushed: compact JSON with sorted keys.
pub fn index_json(index: &BTreeMap<String, Digest>) -> Vec<u8> {
    crate::format::to_json(index)
}

fn load_ignores(app_dir: &Path) -> Result<ignore::gitignore::Gitignore, BundleError> {
    let mut builder = ignore::gitignore::GitignoreBuilder::new(app_dir);
    let file = app_dir.join(IGNORE_FILE);
    if file.exists()
        && let Some(e) = builder.add(&file)
    {
        return Err(BundleError::Ignore {
            path: file,
            message: e.to_string(),
        });
    }
    builder.build().map_err(|e| BundleError::Ignore {
        path: file,
        message: e.to_string(),
    })
}

fn collect(
    root: &Path,
    dir: &Path,
    ignore: &ignore::gitignore::Gitignore,
    out: &mut Vec<PathBuf>,
) -> Result<(), BundleError> {
    let entries = fs::read_dir(dir).map_err(|source| BundleError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| BundleError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if rel == Path::new(IGNORE_FILE)
            || ignore.matched_path_or_any_parents(&rel, is_dir).is_ignore()
        {
            continue;
        }
        out.push(rel);
        if is_dir {
            collect(root, &path, ignore, out)?;
        }
    }
    Ok(())
}

/// Reads the compose file out of a bundle, refusing one over `limit` bytes.
pub fn read_compose_from_bundle(
    bundle: impl Read,
    limit: u64,
) -> Result<(String, Vec<u8>), BundleError> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bundle));
    let entries = archive
        .entries()
        .map_err(|e| BundleError::Format(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| BundleError::Format(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| BundleError::Format(e.to_string()))?;
        let name = path.to_string_lossy().trim_start_matches("./").to_string();
        if !COMPOSE_FILE_NAMES.contains(&name.as_str()) {
            continue;
        }
        let size = entry.header().size().unwrap_or(u64::MAX);
        if size > limit {
            return Err(BundleError::Refused {
                path: name,
                reason: format!("the compose file is {size} bytes, over the {limit}-byte limit"),
            });
        }
        let mut content = Vec::with_capacity(size as usize);
        entry
            .by_ref()
            .take(limit + 1)
            .read_to_end(&mut content)
            .map_err(|e| BundleError::Format(e.to_string()))?;
        return Ok((name, content));
    }
    Err(BundleError::NoCompose)
}

/// Extracts a bundle into `dest`, verifying every file against `index`.
/// Nothing appears at `dest` unless everything passed.
pub fn extract_bundle(
    bundle: impl Read,
    index: &BTreeMap<String, Digest>,
    dest: &Path,
    limits: &BundleLimits,
) -> Result<(), BundleError> {
    let parent = dest.parent().unwrap_or(Path::new("/"));
    let write_error = |path: &Path, source| BundleError::Write {
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(parent).map_err(|e| write_error(parent, e))?;
    let staging = tempfile::Builder::new()
        .prefix(".extract-")
        .tempdir_in(parent)
        .map_err(|e| write_error(parent, e))?;
    unpack_checked(bundle, index, staging.path(), limits)?;
    if dest.exists() {
        fs::remove_dir_all(dest).map_err(|e| write_error(dest, e))?;
    }
    let staged = staging.keep();
    fs::rename(&staged, dest).map_err(|e| write_error(dest, e))?;
    fsync_dir(parent).map_err(|e| write_error(parent, e))?;
    Ok(())
}

fn unpack_checked(
    bundle: impl Read,
    index: &BTreeMap<String, Digest>,
    into: &Path,
    limits: &BundleLimits,
) -> Result<(), BundleError> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bundle));
    let entries = archive
        .entries()
        .map_err(|e| BundleError::Format(e.to_string()))?;
    let mut total = 0u64;
    let mut seen = std::collections::BTreeSet::new();
    let refuse = |path: &str, reason: &str| BundleError::Refused {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    for entry in entries {
        let mut entry = entry.map_err(|e| BundleError::Format(e.to_string()))?;
        let raw = entry
            .path()
            .map_err(|e| BundleError::Format(e.to_string()))?
            .into_owned();
        let name = raw.to_string_lossy().trim_end_matches('/').to_string();
        let rel =
            safe_relative(&raw).ok_or_else(|| refuse(&name, "absolute path or '..' component"))?;
        let target = into.join(&rel);
        let kind = entry.header().entry_type();
        let size = entry.header().size().unwrap_or(u64::MAX);
        match kind {
            tar::EntryType::Directory => {
                fs::create_dir_all(&target).map_err(|e| BundleError::Write {
                    path: target.clone(),
                    source: e,
                })?;
                fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).map_err(|e| {
                    BundleError::Write {
                        path: target.clone(),
                        source: e,
                    }
                })?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let is_compose = COMPOSE_FILE_NAMES.contains(&name.as_str());
                if is_compose && size > limits.max_compose {
                    return Err(refuse(
                        &name,
                        &format!(
                            "the compose file is {size} bytes, over the {}-byte limit",
                            limits.max_compose
                        ),
                    ));
                }
                if size > limits.max_file {
                    return Err(refuse(
                        &name,
                        &format!(
                            "{size} bytes, over the {}-byte limit for one file",
                            limits.max_file
                        ),
                    ));
                }
                total = total.saturating_add(size);
                if total > limits.max_total {
                    return Err(refuse(
                        &name,
                        &format!("the bundle passes the {}-byte limit", limits.max_total),
                    ));
                }
                let expected = index
                    .get(&name)
                    .ok_or_else(|| refuse(&name, "not in the bundle index"))?;
                if let Some(p) = target.parent() {
                    fs::create_dir_all(p).map_err(|e| BundleError::Write {
                        path: p.to_path_buf(),
                        source: e,
                    })?;
                }
                let mut file = fs::File::create(&target).map_err(|e| BundleError::Write {
                    path: target.clone(),
                    source: e,
                })?;
                let mut hasher = DigestWriter::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = entry
                        .read(&mut buf)
                        .map_err(|e| BundleError::Format(e.to_string()))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    file.write_all(&buf[..n]).map_err(|e| BundleError::Write {
                        path: target.clone(),
                        source: e,
                    })?;
                }
                if &hasher.finish() != expected {
                    return Err(refuse(&name, "its content does not match the bundle index"));
                }
                let mode = if entry.header().mode().unwrap_or(0o644) & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                };
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| BundleError::Write {
                        path: target.clone(),
                        source: e,
                    })?;
                file.sync_all().map_err(|e| BundleError::Write {
                    path: target.clone(),
                    source: e,
                })?;
                seen.insert(name);
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| BundleError::Format(e.to_string()))?
                    .ok_or_else(|| refuse(&name, "a symlink without a target"))?
                    .into_owned();
                let base = rel.parent().unwrap_or(Path::new(""));
                if link.is_absolute() || safe_relative(&base.join(&link)).is_none() {
                    return Err(refuse(
                        &name,
                        &format!("a symlink to {} leaves the app directory", link.display()),
                    ));
                }
                if let Some(p) = target.parent() {
                    fs::create_dir_all(p).map_err(|e| BundleError::Write {
                        path: p.to_path_buf(),
                        source: e,
                    })?;
                }
                std::os::unix::fs::symlink(&link, &target).map_err(|e| BundleError::Write {
                    path: target.clone(),
                    source: e,
                })?;
            }
            tar::EntryType::Link => {
                return Err(refuse(&name, "hard links are not allowed in a bundle"));
            }
            other => {
                return Err(refuse(
                    &name,
                    &format!("entries of type {other:?} (devices, fifos) are not allowed"),
                ));
            }
        }
    }
    if let Some(missing) = index.keys().find(|k| !seen.contains(*k)) {
        return Err(refuse(
            missing,
            "listed in the bundle index but not in the bundle",
        ));
    }
    fsync_dir(into).map_err(|e| BundleError::Write {
        path: into.to_path_buf(),
        source: e,
    })?;
    Ok(())
}

/// `path` as a plain relative path, or `None` when it is absolute or climbs
/// out with `..` (resolving `..` lexically, as a link target would).
fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("docker-compose.yml"), "services: {}\n").unwrap();
        fs::create_dir(dir.path().join("conf")).unwrap();
        fs::write(dir.path().join("conf/app.ini"), "a=1\n").unwrap();
        fs::write(dir.path().join("secret.key"), "k").unwrap();
        fs::write(dir.path().join(IGNORE_FILE), "*.key\n").unwrap();
        dir
    }

    #[test]
    fn the_same_directory_gives_the_same_bytes_and_honours_ignores() {
        let dir = app_dir();
        let a = create_bundle(dir.path(), "docker-compose.yml", b"pinned\n").unwrap();
        filetime_bump(&dir.path().join("conf/app.ini"));
        let b = create_bundle(dir.path(), "docker-compose.yml", b"pinned\n").unwrap();
        assert_eq!(a.bytes, b.bytes);
        assert!(a.index.contains_key("conf/app.ini"));
        assert!(!a.index.contains_key("secret.key"));
        assert!(!a.index.contains_key(IGNORE_FILE));
        assert_eq!(a.index["docker-compose.yml"], Digest::of(b"pinned\n"));
        let (name, compose) = read_compose_from_bundle(a.bytes.as_slice(), 1 << 20).unwrap();
        assert_eq!(
            (name.as_str(), compose.as_slice()),
            ("docker-compose.yml", &b"pinned\n"[..])
        );
    }

    fn filetime_bump(path: &Path) {
        let content = fs::read(path).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(path, content).unwrap();
    }

    #[test]
    fn extraction_verifies_every_file() {
        let dir = app_dir();
        let bundle = create_bundle(dir.path(), "docker-compose.yml", b"pinned\n").unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("app");
        extract_bundle(
            bundle.bytes.as_slice(),
            &bundle.index,
            &dest,
            &BundleLimits::default(),
        )
        .unwrap();
        assert_eq!(fs::read(dest.join("conf/app.ini")).unwrap(), b"a=1\n");

        let mut lying = bundle.index.clone();
        lying.insert("conf/app.ini".into(), Digest::of(b"other"));
        let dest2 = out.path().join("app2");
        let err = extract_bundle(
            bundle.bytes.as_slice(),
            &lying,
            &dest2,
            &BundleLimits::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("conf/app.ini"), "{err}");
        assert!(!dest2.exists());
        assert_eq!(
            fs::read_dir(out.path()).unwrap().count(),
            1,
            "no staging directory left"
        );
    }

    fn hostile(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut builder = tar::Builder::new(gz);
        for (path, kind, link) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(0);
            header.set_mode(0o644);
            // Write the raw name: the tar crate refuses `..` through its safe API.
            let name = header.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            if !link.is_empty() {
                header.set_link_name(link).unwrap();
            }
            header.set_cksum();
            builder.append(&header, io::empty()).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn hostile_entries_are_refused_and_nothing_is_extracted() {
        let out = tempfile::tempdir().unwrap();
        let index = BTreeMap::new();
        for (case, entries) in [
            ("escape", vec![("../evil", tar::EntryType::Regular, "")]),
            ("absolute", vec![("/etc/evil", tar::EntryType::Regular, "")]),
            (
                "symlink out",
                vec![("link", tar::EntryType::Symlink, "../../etc/passwd")],
            ),
            (
                "symlink absolute",
                vec![("link", tar::EntryType::Symlink, "/etc/passwd")],
            ),
            ("device", vec![("dev", tar::EntryType::Char, "")]),
            ("hard link", vec![("h", tar::EntryType::Link, "x")]),
        ] {
            let dest = out.path().join("app");
            let err = extract_bundle(
                hostile(&entries).as_slice(),
                &index,
                &dest,
                &BundleLimits::default(),
            );
            assert!(
                matches!(err, Err(BundleError::Refused { .. })),
                "{case}: {err:?}"
            );
            assert!(!dest.exists(), "{case}");
        }
        assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_oversized_compose_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b'#'; 2048];
        fs::write(dir.path().join("docker-compose.yml"), &big).unwrap();
        let bundle = create_bundle(dir.path(), "docker-compose.yml", &big).unwrap();
        let limits = BundleLimits {
            max_compose: 1024,
            ..BundleLimits::default()
        };
        let out = tempfile::tempdir().unwrap();
        let err = extract_bundle(
            bundle.bytes.as_slice(),
            &bundle.index,
            &out.path().join("a"),
            &limits,
        )
        .unwrap_err();
        assert!(err.to_string().contains("compose"), "{err}");
        assert!(read_compose_from_bundle(bundle.bytes.as_slice(), 1024).is_err());
    }
}
