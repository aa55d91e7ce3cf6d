//! What a layer puts on disk, file by file: the listing `fsck` checks
//! Docker's unpacked layers against.
//!
//! A layer tar is read once (gzip, zstd or plain, told by its first bytes)
//! and turned into what overlay2 holds for it in the layer's `diff`
//! directory: every path with its kind, and for regular files the size and
//! the sha256 of the content. Tar rules applied: a later entry for a path
//! replaces an earlier one; a hard link is a regular file with its target's
//! size and content; `.wh.NAME` is a whiteout (overlay2 stores a 0:0
//! character device named `NAME`); `.wh..wh..opq` makes its directory
//! opaque (overlay2 sets `trusted.overlay.opaque`); other `.wh..wh.` names
//! are aufs bookkeeping and put nothing on disk. Paths that are not UTF-8
//! are counted, not listed.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::app::layer::LayerError;

/// One path of a layer, as overlay2 holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedEntry {
    /// Relative to the layer's root, without `./` or a trailing `/`.
    #[serde(rename = "p")]
    pub path: String,
    #[serde(rename = "k")]
    pub kind: EntryKind,
    /// Bytes of a regular file (0 for anything else).
    #[serde(rename = "s", default)]
    pub size: u64,
    /// sha256 of a regular file's content, lowercase hex.
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// `.wh.NAME`: a 0:0 character device named `NAME`.
    Whiteout,
    /// A directory with `.wh..wh..opq`: overlay2's opaque attribute.
    OpaqueDir,
    /// A device or a FIFO.
    Special,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "regular file",
            EntryKind::Dir => "directory",
            EntryKind::Symlink => "symbolic link",
            EntryKind::Whiteout => "whiteout",
            EntryKind::OpaqueDir => "opaque directory",
            EntryKind::Special => "device or fifo",
        }
    }
}

/// Every path a layer puts on disk, sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerListing {
    pub entries: Vec<ListedEntry>,
    /// Entries whose path is not UTF-8: not checked.
    #[serde(default)]
    pub unlisted: u64,
}

impl LayerListing {
    /// Regular files, and the bytes of their content.
    pub fn files(&self) -> (u64, u64) {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .fold((0, 0), |(n, b), e| (n + 1, b + e.size))
    }
}

/// Reads the layer blob `blob` (compressed or not) and lists what it puts
/// on disk, hashing every regular file.
pub fn list_layer(blob: impl Read) -> Result<LayerListing, LayerError> {
    let mut raw = BufReader::with_capacity(256 * 1024, blob);
    let mut magic = Vec::with_capacity(4);
    (&mut raw)
        .take(4)
        .read_to_end(&mut magic)
        .map_err(LayerError::Read)?;
    let chained = io::Cursor::new(magic.clone()).chain(raw);
    let tar: Box<dyn Read> = match magic.as_slice() {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(chained)),
        [0x28, 0xb5, 0x2f, 0xfd] => {
            Box::new(zstd::stream::read::Decoder::new(chained).map_err(LayerError::Read)?)
        }
        _ => Box::new(chained),
    };
    list_tar(tar).map_err(|e| LayerError::NotATar(e.to_string()))
}

/// Lists an uncompressed layer tar.
pub fn list_tar(tar: impl Read) -> io::Result<LayerListing> {
    let mut archive = tar::Archive::new(tar);
    let mut by_path: BTreeMap<String, ListedEntry> = BTreeMap::new();
    let mut unlisted = 0;
    let mut buffer = vec![0u8; 128 * 1024];
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        let Some(path) = std::str::from_utf8(&entry.path_bytes()).ok().map(normalise) else {
            unlisted += 1;
            continue;
        };
        if path.is_empty() && kind.is_dir() {
            continue;
        }
        let (dir, name) = match path.rsplit_once('/') {
            Some((dir, name)) => (dir.to_string(), name.to_string()),
            None => (String::new(), path.clone()),
        };
        if name == ".wh..wh..opq" {
            by_path.insert(
                dir.clone(),
                ListedEntry {
                    path: dir,
                    kind: EntryKind::OpaqueDir,
                    size: 0,
                    sha256: None,
                },
            );
            continue;
        }
        if name.starts_with(".wh..wh.") {
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let path = if dir.is_empty() {
                hidden.to_string()
            } else {
                format!("{dir}/{hidden}")
            };
            by_path.insert(
                path.clone(),
                ListedEntry {
                    path,
                    kind: EntryKind::Whiteout,
                    size: 0,
                    sha256: None,
                },
            );
            continue;
        }
        let listed = if kind.is_file() || kind == tar::EntryType::Continuous {
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            loop {
                let n = entry.read(&mut buffer)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
                size += n as u64;
            }
            ListedEntry {
                path: path.clone(),
                kind: EntryKind::File,
                size,
                sha256: Some(hex(&hasher.finalize())),
            }
        } else if kind.is_hard_link() {
            let target = entry
                .link_name_bytes()
                .and_then(|t| std::str::from_utf8(&t).ok().map(normalise));
            match target.and_then(|t| by_path.get(&t).cloned()) {
                Some(target) if target.kind == EntryKind::File => ListedEntry {
                    path: path.clone(),
                    ..target
                },
                // A link to something not listed: checked for existence only.
                _ => ListedEntry {
                    path: path.clone(),
                    kind: EntryKind::Special,
                    size: 0,
                    sha256: None,
                },
            }
        } else if kind.is_dir() {
            // A directory made opaque earlier stays opaque.
            if by_path
                .get(&path)
                .is_some_and(|e| e.kind == EntryKind::OpaqueDir)
            {
                continue;
            }
            ListedEntry {
                path: path.clone(),
                kind: EntryKind::Dir,
                size: 0,
                sha256: None,
            }
        } else if kind.is_symlink() {
            ListedEntry {
                path: path.clone(),
                kind: EntryKind::Symlink,
                size: 0,
                sha256: None,
            }
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            ListedEntry {
                path: path.clone(),
                kind: EntryKind::Special,
                size: 0,
                sha256: None,
            }
        } else {
            // PAX and GNU extension headers are folded into the next entry
            // by the tar crate; anything else puts nothing on disk.
            continue;
        };
        by_path.insert(path, listed);
    }
    Ok(LayerListing {
        entries: by_path.into_values().collect(),
        unlisted,
    })
}

/// `./a/b/` -> `a/b`.
fn normalise(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// sha256 of everything `reader` yields, lowercase hex, and its length.
pub fn hash_reader(mut reader: impl Read, buffer: &mut [u8]) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    loop {
        let n = match reader.read(buffer) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((hex(&hasher.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    #[test]
    fn whiteouts_opaque_directories_hard_links_and_replacements_are_listed_as_overlay2_holds_them()
    {
        let tar = tar_of(|b| {
            b.append_data(&mut header(tar::EntryType::Directory, 0), "./etc/", &[][..])
                .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 3),
                "etc/a",
                &b"old"[..],
            )
            .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 5),
                "etc/a",
                &b"newer"[..],
            )
            .unwrap();
            let mut link = header(tar::EntryType::Link, 0);
            b.append_link(&mut link, "etc/b", "etc/a").unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 0),
                "etc/.wh.gone",
                &[][..],
            )
            .unwrap();
            b.append_data(&mut header(tar::EntryType::Directory, 0), "var/", &[][..])
                .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 0),
                "var/.wh..wh..opq",
                &[][..],
            )
            .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 0),
                "var/.wh..wh.plnk",
                &[][..],
            )
            .unwrap();
            let mut sym = header(tar::EntryType::Symlink, 0);
            b.append_link(&mut sym, "lib", "usr/lib").unwrap();
        });
        let listing = list_layer(&tar[..]).unwrap();
        let kinds: Vec<(&str, EntryKind, u64)> = listing
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.kind, e.size))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("etc", EntryKind::Dir, 0),
                ("etc/a", EntryKind::File, 5),
                ("etc/b", EntryKind::File, 5),
                ("etc/gone", EntryKind::Whiteout, 0),
                ("lib", EntryKind::Symlink, 0),
                ("var", EntryKind::OpaqueDir, 0),
            ]
        );
        let newer = hash_reader(&b"newer"[..], &mut [0u8; 16]).unwrap().0;
        assert_eq!(listing.entries[1].sha256.as_deref(), Some(newer.as_str()));
        assert_eq!(listing.entries[2].sha256, listing.entries[1].sha256);
        assert_eq!(listing.files(), (2, 10));
    }

    #[test]
    fn a_gzip_layer_lists_like_its_tar_and_garbage_is_refused() {
        use std::io::Write as _;
        let tar = tar_of(|b| {
            b.append_data(&mut header(tar::EntryType::Regular, 4), "x/y", &b"data"[..])
                .unwrap();
        });
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(list_layer(&gz[..]).unwrap(), list_layer(&tar[..]).unwrap());
        assert!(list_layer(&[0x1f, 0x8b, 1, 2, 3][..]).is_err());
    }
}
