//! Streaming analysis of one image layer: what it downloads, what it unpacks
//! to, and what it costs on disk once Docker holds it.
//!
//! [`analyze_layer`] reads a layer blob exactly once, as a stream, through a
//! fixed set of buffers: memory stays small however large the layer is (the
//! only thing that grows is one small record per *directory* of the layer).
//! It detects the compression from the magic bytes (gzip, zstd or a plain
//! tar), hashes the bytes as they were downloaded (`archive_digest`) and as
//! Docker sees them (`diff_id`), and walks the tar to predict the layer's
//! footprint in Docker's overlay2 store.
//!
//! Errors: a blob that is neither gzip, zstd nor tar, or whose tar is
//! malformed, is [`LayerError::NotATar`]; a corrupt compressed stream and a
//! failing reader are told apart, so that the caller can say which it was.
//!
//! # The disk usage model
//!
//! `usage_by_block_size` predicts how many bytes of an ext4 volume the layer
//! takes once `docker load`/`docker pull` has unpacked it with the overlay2
//! driver (native diff: the tar is unpacked straight into the layer's `diff/`
//! directory). It was calibrated against a real dockerd 20.10 loading an
//! image into a fresh ext4 data root (see `tests/it/usage_accuracy.rs`). It counts
//! allocated blocks, because that is what `statvfs` and a full disk see:
//!
//! - **Regular files**: `ceil(size / bs) * bs`; an empty file takes none.
//!   ext4's `inline_data` feature is off by default, so even tiny files take a
//!   whole block. A file needing more than the four extents the inode holds
//!   (one extent covers at most 32768 blocks) gets extent-tree blocks too.
//! - **Directories**: ext4 stores one dirent per name, `rec_len =
//!   round_up(8 + name_len, 4)`, plus `.` and `..` (12 bytes each), in blocks
//!   whose last 12 bytes are the `metadata_csum` tail. A directory whose
//!   entries fit one block takes one. A larger one is turned into an htree:
//!   one index block plus leaf blocks that hash-ordered splits leave about
//!   ln 2 (69%) full on average, two leaves at least. The expectation is
//!   counted (not rounded per directory), which is what matters for a layer
//!   of many directories.
//! - **Symlinks**: a target shorter than 60 bytes lives in the inode (a
//!   "fast" symlink); a longer one takes a block.
//! - **Hard links, devices, fifos and whiteouts** take no block. overlay2
//!   turns a `.wh.NAME` whiteout into a 0/0 character device `NAME` (an inode
//!   and a dirent) and `.wh..wh..opq` into an xattr on the directory (which
//!   fits inside the 256-byte inode: nothing).
//! - **overlay2's own files per layer**: the layer directory with `link`,
//!   `lower`, an empty `work/` and the `l/<id>` symlink (its 72-byte target
//!   is too long to be fast), and the layer database directory
//!   `image/overlay2/layerdb/sha256/<chain id>/` with `cache-id`, `diff`,
//!   `size`, `parent` and `tar-split.json.gz`, one block each except the
//!   tar-split, measured at about 56 bytes per tar entry plus 300. The layer is
//!   counted as having a parent (a base layer saves `lower`, `parent` and
//!   `work/`: three blocks), so the prediction errs on the safe side. The
//!   dirents these add to the shared `overlay2/`, `overlay2/l/` and
//!   `layerdb/sha256/` directories are counted as bytes.
//!
//! Inodes follow the same walk: one per directory (also the ones a tar only
//! implies), file, symlink, device, fifo and whiteout; hard links share one;
//! plus the overlay2 and layer database files above.
//!
//! Not counted: the image config in `imagedb` (one per image, not per layer;
//! the caller adds it), and xattrs too large to fit in the inode.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::Digest;

/// The block sizes every layer's usage is predicted for.
pub const BLOCK_SIZES: [u64; 4] = [1024, 4096, 16384, 65536];

/// The block size `usage` is given for (FORMAT.md's `fs_block_size`).
pub const USAGE_BLOCK_SIZE: u64 = 4096;

/// Reads from the blob and from the decompressor go through buffers this size.
const READ_BUFFER: usize = 256 * 1024;

/// Bytes of a directory block left for dirents: the last 12 bytes hold the
/// `metadata_csum` tail (`ext4_dir_entry_tail`).
const DIR_BLOCK_TAIL: u64 = 12;
/// `.` and `..`, 12 bytes each.
const DOT_DIRENTS: u64 = 24;
/// Average fill of htree leaf blocks after hash-ordered splits.
const HTREE_LEAF_FILL: f64 = std::f64::consts::LN_2;
/// Longest symlink target that ext4 keeps inside the inode.
const FAST_SYMLINK_MAX: u64 = 59;
/// Blocks one ext4 extent covers at most.
const EXTENT_MAX_BLOCKS: u64 = 32768;
/// Extents that fit in the inode itself.
const INODE_EXTENTS: u64 = 4;

/// `tar-split.json.gz` bytes per tar entry, and a constant, as measured on
/// dockerd 20.10 (52 to 59 bytes per entry across layers of 200 to 8000
/// entries with short and long names).
const TAR_SPLIT_BYTES_PER_ENTRY: u64 = 56;
const TAR_SPLIT_BYTES_BASE: u64 = 300;
/// One-block files overlay2 and the layer database write per layer:
/// `link`, `lower`, `cache-id`, `diff`, `size`, `parent`.
const OVERHEAD_SMALL_FILES: u64 = 6;
/// Directories overlay2 and the layer database make per layer, besides
/// `diff/`: the layer directory, `work/`, the layer database directory.
const OVERHEAD_DIRS: u64 = 3;
/// The `l/<26 chars>` symlink to `../<64 hex>/diff`: a slow symlink.
const OVERHEAD_SYMLINKS: u64 = 1;
/// Dirents added to shared directories: `overlay2/<64 hex>` (72 bytes),
/// `overlay2/l/<26 chars>` (36), `layerdb/sha256/<64 hex>` (72).
const OVERHEAD_SHARED_DIRENT_BYTES: u64 = 72 + 36 + 72;
/// Inodes overlay2 and the layer database add per layer: the layer dir,
/// `diff/`, `work/`, `link`, `lower`, the `l/` symlink, the layer database
/// dir, `cache-id`, `diff`, `size`, `parent`, `tar-split.json.gz`.
const OVERHEAD_INODES: u64 = 12;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";

/// How a layer blob is compressed, as told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    Zstd,
    /// A plain tar.
    None,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::None => "uncompressed",
        })
    }
}

/// What a layer downloads, unpacks to and costs on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// Digest of the blob as stored in the registry.
    pub archive_digest: Digest,
    /// Bytes of the blob as stored in the registry (what is downloaded).
    pub archive_size: u64,
    /// Digest of the uncompressed tar (the image config's `rootfs.diff_ids`).
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar.
    pub tar_size: u64,
    /// Bytes of regular files' content.
    pub size: u64,
    /// Tar entries (files, directories, links, ...), extension headers not counted.
    pub entries: u64,
    /// Inodes the layer takes once unpacked, overlay2's own files included.
    pub inodes: u64,
    /// Predicted disk bytes in Docker's overlay2 store for each of [`BLOCK_SIZES`].
    pub usage_by_block_size: BTreeMap<u64, u64>,
    pub compression: Compression,
}

impl LayerStats {
    /// Predicted disk bytes for [`USAGE_BLOCK_SIZE`] (FORMAT.md's `usage`).
    pub fn usage(&self) -> u64 {
        crate::oci::format::usage_for_block_size(&self.usage_by_block_size, USAGE_BLOCK_SIZE)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer is not a tar archive: {0}")]
    NotATar(String),
    #[error("layer's {compression} stream is corrupt: {source}")]
    Corrupt {
        compression: Compression,
        #[source]
        source: io::Error,
    },
    #[error("could not read the layer: {0}")]
    Read(#[source] io::Error),
}

/// Reads `blob` once and returns what it downloads, unpacks to and costs.
pub fn analyze_layer(blob: impl Read) -> Result<LayerStats, LayerError> {
    let failures = Failures::default();
    let mut source = Hashing::new(blob, failures.source.clone(), true);
    let magic = read_magic(&mut source).map_err(LayerError::Read)?;
    let compression = match magic.as_slice() {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    };
    let raw = BufReader::with_capacity(READ_BUFFER, io::Cursor::new(magic).chain(source));

    // For a plain tar the archive and the tar are the same bytes: hash once.
    let hash_tar = compression != Compression::None;
    let decoded = match compression {
        Compression::Gzip => Decoded::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(raw))),
        Compression::Zstd => {
            Decoded::Zstd(zstd::stream::read::Decoder::with_buffer(raw).map_err(LayerError::Read)?)
        }
        Compression::None => Decoded::Plain(raw),
    };
    let tar_stream = BufReader::with_capacity(
        READ_BUFFER,
        Hashing::new(decoded, failures.below_tar.clone(), hash_tar),
    );

    let mut archive = tar::Archive::new(tar_stream);
    let mut walk = Walk::default();
    let walked = walk_entries(&mut archive, &mut walk);
    let drained = walked.and_then(|()| {
        // The digests cover every byte, also padding after the end of the tar
        // and after the end of the compressed stream.
        let mut tar_stream = archive.into_inner();
        io::copy(&mut tar_stream, &mut io::sink())?;
        let hashing = tar_stream.into_inner();
        let (tar_hash, tar_size, decoded) = (hashing.hasher, hashing.len, hashing.inner);
        let mut raw = decoded.into_raw();
        io::copy(&mut raw, &mut io::sink())?;
        let (_, source) = raw.into_inner().into_inner();
        Ok((tar_hash, tar_size, source.hasher, source.len))
    });
    let (tar_hash, tar_size, archive_hash, archive_size) =
        drained.map_err(|e| failures.classify(e, compression))?;
    if tar_size == 0 {
        return Err(LayerError::NotATar("the layer is empty".into()));
    }

    // The source is always hashed (`Hashing::new(.., true)` above).
    let archive_digest = Digest::from_hasher(archive_hash.unwrap_or_default());
    let diff_id = match tar_hash {
        Some(hasher) => Digest::from_hasher(hasher),
        None => archive_digest.clone(),
    };
    let (inodes, usage_by_block_size) = walk.footprint();
    Ok(LayerStats {
        archive_digest,
        archive_size,
        diff_id,
        tar_size,
        size: walk.file_bytes,
        entries: walk.entries,
        inodes,
        usage_by_block_size,
        compression,
    })
}

/// The first four bytes (fewer for a shorter blob), however the source
/// splits its reads.
fn read_magic(source: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut magic = Vec::with_capacity(4);
    source.take(4).read_to_end(&mut magic)?;
    Ok(magic)
}

fn walk_entries<R: Read>(archive: &mut tar::Archive<R>, walk: &mut Walk) -> io::Result<()> {
    for entry in archive.entries()? {
        let entry = entry?;
        let kind = entry.header().entry_type();
        let path = entry.path_bytes();
        let link_len = entry.link_name_bytes().map_or(0, |l| l.len() as u64);
        walk.add(&path, kind, entry.size(), link_len);
    }
    Ok(())
}

/// A tar walked while it streams elsewhere: the running counts, so that a
/// caller can stop a layer as soon as it takes more than it may, and, at
/// the end, the same footprint [`analyze_layer`] predicts.
pub struct TarWalk {
    walk: Walk,
}

impl TarWalk {
    /// Tar entries so far.
    pub fn entries(&self) -> u64 {
        self.walk.entries
    }

    /// Bytes of regular files' content so far: a lower bound of the usage
    /// on any block size (the header of a file is read before its content).
    pub fn file_bytes(&self) -> u64 {
        self.walk.file_bytes
    }

    /// Inodes so far, overlay2's own files included.
    pub fn inodes(&self) -> u64 {
        self.walk.inodes.saturating_add(OVERHEAD_INODES)
    }

    /// Inodes and usage per block size in [`BLOCK_SIZES`] of what was walked.
    pub fn footprint(&self) -> (u64, BTreeMap<u64, u64>) {
        self.walk.footprint()
    }
}

/// Walks the uncompressed tar `reader` yields, calling `after_entry` with
/// the running counts after each entry's header (before its content is
/// read); an error from it stops the walk. Returns the counts and the
/// reader, positioned after the tar's end-of-archive blocks.
pub fn walk_tar<R: Read>(
    reader: R,
    mut after_entry: impl FnMut(&TarWalk) -> io::Result<()>,
) -> io::Result<(TarWalk, R)> {
    let mut archive = tar::Archive::new(reader);
    let mut walked = TarWalk {
        walk: Walk::default(),
    };
    for entry in archive.entries()? {
        let entry = entry?;
        let kind = entry.header().entry_type();
        let path = entry.path_bytes();
        let link_len = entry.link_name_bytes().map_or(0, |l| l.len() as u64);
        walked.walk.add(&path, kind, entry.size(), link_len);
        after_entry(&walked)?;
    }
    Ok((walked, archive.into_inner()))
}

/// Which stage of the pipeline failed, to tell a bad source from a corrupt
/// stream from a malformed tar.
#[derive(Default)]
struct Failures {
    source: std::rc::Rc<std::cell::Cell<bool>>,
    below_tar: std::rc::Rc<std::cell::Cell<bool>>,
}

impl Failures {
    fn classify(&self, error: io::Error, compression: Compression) -> LayerError {
        if self.source.get() {
            LayerError::Read(error)
        } else if self.below_tar.get() {
            LayerError::Corrupt {
                compression,
                source: error,
            }
        } else {
            LayerError::NotATar(error.to_string())
        }
    }
}

/// Hashes and counts what passes through, and records a failure of the
/// reader below.
struct Hashing<R> {
    inner: R,
    hasher: Option<Sha256>,
    len: u64,
    failed: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R> Hashing<R> {
    fn new(inner: R, failed: std::rc::Rc<std::cell::Cell<bool>>, hash: bool) -> Self {
        Hashing {
            inner,
            hasher: hash.then(Sha256::new),
            len: 0,
            failed,
        }
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                if let Some(hasher) = &mut self.hasher {
                    hasher.update(&buf[..n]);
                }
                self.len += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.failed.set(true);
                Err(e)
            }
        }
    }
}

type Raw<R> = BufReader<io::Chain<io::Cursor<Vec<u8>>, Hashing<R>>>;

enum Decoded<R: Read> {
    Gzip(Box<flate2::bufread::MultiGzDecoder<Raw<R>>>),
    Zstd(zstd::stream::read::Decoder<'static, Raw<R>>),
    Plain(Raw<R>),
}

impl<R: Read> Decoded<R> {
    fn into_raw(self) -> Raw<R> {
        match self {
            Decoded::Gzip(d) => d.into_inner(),
            Decoded::Zstd(d) => d.finish(),
            Decoded::Plain(r) => r,
        }
    }
}

impl<R: Read> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Gzip(d) => d.read(buf),
            Decoded::Zstd(d) => d.read(buf),
            Decoded::Plain(r) => r.read(buf),
        }
    }
}

/// Counts gathered while walking the tar.
#[derive(Default)]
struct Walk {
    entries: u64,
    file_bytes: u64,
    /// Inodes of the layer's own content (overlay2's files come later).
    inodes: u64,
    /// Per block size in [`BLOCK_SIZES`]: blocks of files, slow symlinks and
    /// extent trees.
    data_blocks: [u64; 4],
    /// Directory path (normalised, "" for the layer root) to the bytes of
    /// its children's dirents.
    dirs: HashMap<Vec<u8>, u64>,
}

impl Walk {
    fn add(&mut self, raw_path: &[u8], kind: tar::EntryType, size: u64, link_len: u64) {
        use tar::EntryType as T;
        if kind.is_pax_global_extensions() {
            return;
        }
        self.entries += 1;
        let path = normalise(raw_path);
        let path: &[u8] = &path;
        if path.is_empty() {
            // "./": the layer root, which overlay2 makes itself.
            self.dirs.entry(Vec::new()).or_default();
            return;
        }
        let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], path),
        };

        if name.starts_with(WHITEOUT_PREFIX) {
            if name == WHITEOUT_OPAQUE {
                // Becomes an xattr on the directory.
                self.ensure_dir(parent);
            } else if parent.is_empty() && name.starts_with(WHITEOUT_META_PREFIX) {
                // AUFS metadata: Docker skips it.
            } else {
                // A 0/0 character device under the whited-out name.
                self.ensure_dir(parent);
                self.add_dirent(parent, name.len() - WHITEOUT_PREFIX.len());
                self.inodes += 1;
            }
            return;
        }

        match kind {
            T::Directory => {
                self.ensure_dir(path);
            }
            T::Link => {
                self.ensure_dir(parent);
                self.add_dirent(parent, name.len());
            }
            T::Symlink => {
                self.ensure_dir(parent);
                self.add_dirent(parent, name.len());
                self.inodes += 1;
                if link_len > FAST_SYMLINK_MAX {
                    for (blocks, bs) in self.data_blocks.iter_mut().zip(BLOCK_SIZES) {
                        *blocks = blocks.saturating_add((link_len + 1).div_ceil(bs));
                    }
                }
            }
            T::Char | T::Block | T::Fifo => {
                self.ensure_dir(parent);
                self.add_dirent(parent, name.len());
                self.inodes += 1;
            }
            // Regular files, and whatever else Docker writes out as one.
            _ => {
                self.ensure_dir(parent);
                self.add_dirent(parent, name.len());
                self.inodes += 1;
                self.file_bytes = self.file_bytes.saturating_add(size);
                for (blocks, bs) in self.data_blocks.iter_mut().zip(BLOCK_SIZES) {
                    *blocks = blocks.saturating_add(file_blocks(size, bs));
                }
            }
        }
    }

    /// Records `dir` and any parent the tar only implies (Docker creates
    /// them), each with an inode and a dirent in its own parent.
    fn ensure_dir(&mut self, dir: &[u8]) {
        if self.dirs.contains_key(dir) {
            return;
        }
        if dir.is_empty() {
            self.dirs.insert(Vec::new(), 0);
            return;
        }
        let (parent, name) = match dir.iter().rposition(|&b| b == b'/') {
            Some(i) => (&dir[..i], &dir[i + 1..]),
            None => (&dir[..0], dir),
        };
        self.ensure_dir(parent);
        self.add_dirent(parent, name.len());
        self.dirs.insert(dir.to_vec(), 0);
        self.inodes += 1;
    }

    fn add_dirent(&mut self, parent: &[u8], name_len: usize) {
        if let Some(bytes) = self.dirs.get_mut(parent) {
            *bytes = bytes.saturating_add(dirent_bytes(name_len as u64));
        }
    }

    /// Inodes and usage per block size, overlay2's own files included.
    fn footprint(&self) -> (u64, BTreeMap<u64, u64>) {
        let mut dirs = self.dirs.values().copied().collect::<Vec<_>>();
        if !self.dirs.contains_key(&[][..]) {
            dirs.push(0); // `diff/` exists even for an empty layer
        }
        let tar_split = TAR_SPLIT_BYTES_PER_ENTRY
            .saturating_mul(self.entries)
            .saturating_add(TAR_SPLIT_BYTES_BASE);
        let usage = BLOCK_SIZES
            .iter()
            .zip(self.data_blocks)
            .map(|(&bs, data_blocks)| {
                let dir_blocks: f64 = dirs.iter().map(|&bytes| dir_blocks(bytes, bs)).sum();
                let shared = OVERHEAD_SHARED_DIRENT_BYTES as f64
                    / ((bs - DIR_BLOCK_TAIL) as f64 * HTREE_LEAF_FILL);
                let overhead_blocks = OVERHEAD_SMALL_FILES
                    + OVERHEAD_DIRS
                    + OVERHEAD_SYMLINKS
                    + file_blocks(tar_split, bs);
                let blocks =
                    data_blocks.saturating_add(overhead_blocks) as f64 + dir_blocks + shared;
                (bs, (blocks.ceil() as u64).saturating_mul(bs))
            })
            .collect();
        (self.inodes.saturating_add(OVERHEAD_INODES), usage)
    }
}

/// Strips `./`, leading and trailing `/` and empty or `.` components.
fn normalise(path: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let clean = |c: &[u8]| !c.is_empty() && c != b".";
    if path.split(|&b| b == b'/').all(clean) {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out = Vec::with_capacity(path.len());
    for component in path.split(|&b| b == b'/').filter(|c| clean(c)) {
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(component);
    }
    std::borrow::Cow::Owned(out)
}

fn dirent_bytes(name_len: u64) -> u64 {
    (8 + name_len).next_multiple_of(4)
}

/// Blocks a regular file of `size` bytes takes, extent-tree blocks included.
fn file_blocks(size: u64, bs: u64) -> u64 {
    let blocks = size.div_ceil(bs);
    let extents = blocks.div_ceil(EXTENT_MAX_BLOCKS);
    let index_blocks = if extents > INODE_EXTENTS {
        // An extent leaf block holds (bs - 12) / 12 extents.
        extents.div_ceil((bs - 12) / 12)
    } else {
        0
    };
    blocks + index_blocks
}

/// Expected blocks of a directory whose children's dirents take `bytes`.
fn dir_blocks(children: u64, bs: u64) -> f64 {
    let usable = bs - DIR_BLOCK_TAIL;
    if DOT_DIRENTS + children <= usable {
        return 1.0;
    }
    let leaves = (children as f64 / (usable as f64 * HTREE_LEAF_FILL)).max(2.0);
    1.0 + leaves
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A small layer as `docker build` would make it.
    fn sample_tar() -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let dir = |path: &str| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_cksum();
            (h, path.to_string())
        };
        let (h, p) = dir("app/");
        builder.append_data(&mut h.clone(), p, io::empty()).unwrap();
        let (h, p) = dir("app/lib/");
        builder.append_data(&mut h.clone(), p, io::empty()).unwrap();
        for (path, size) in [
            ("app/a.txt", 10usize),
            ("app/lib/b.bin", 5000),
            ("app/empty", 0),
        ] {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(size as u64);
            h.set_cksum();
            builder
                .append_data(&mut h, path, &vec![7u8; size][..])
                .unwrap();
        }
        let mut link = |kind, path: &str, target: &str| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(0);
            builder.append_link(&mut h, path, target).unwrap();
        };
        link(tar::EntryType::Symlink, "app/short", "a.txt");
        link(tar::EntryType::Symlink, "app/long", &"x".repeat(80));
        link(tar::EntryType::Link, "app/hard", "app/a.txt");
        let mut whiteout = tar::Header::new_ustar();
        whiteout.set_size(0);
        whiteout.set_cksum();
        builder
            .append_data(&mut whiteout.clone(), "app/.wh.gone", io::empty())
            .unwrap();
        builder
            .append_data(&mut whiteout, "app/lib/.wh..wh..opq", io::empty())
            .unwrap();
        builder.into_inner().unwrap()
    }

    #[test]
    fn counts_files_entries_and_inodes_of_a_layer() {
        let tar = sample_tar();
        let stats = analyze_layer(&tar[..]).unwrap();
        assert_eq!(stats.compression, Compression::None);
        assert_eq!(stats.size, 5010);
        assert_eq!(stats.entries, 10);
        // app, lib, 3 files, 2 symlinks, 1 whiteout device; the hard link and
        // the opaque marker take none; plus overlay2's own.
        assert_eq!(stats.inodes, 8 + OVERHEAD_INODES);
        assert_eq!(stats.tar_size, tar.len() as u64);
        assert_eq!(stats.archive_size, tar.len() as u64);
        assert_eq!(stats.diff_id, Digest::of(&tar));
        assert_eq!(stats.archive_digest, stats.diff_id);
    }

    #[test]
    fn usage_counts_whole_blocks_for_each_block_size() {
        let stats = analyze_layer(&sample_tar()[..]).unwrap();
        // Content at 4096: a.txt 1 block, b.bin 2, long symlink 1; dirs: root,
        // app, lib 1 each; overhead 10 blocks + 1 tar-split block; shared
        // dirents add a fraction of a block.
        assert_eq!(stats.usage(), (4 + 3 + 11 + 1) * 4096);
        // At 1024: 1 + 5 + 1 + 3 dirs + 10 + ceil(860/1024)=1, + shared.
        assert_eq!(stats.usage_by_block_size[&1024], (7 + 3 + 11 + 1) * 1024);
        let sizes: Vec<u64> = stats.usage_by_block_size.keys().copied().collect();
        assert_eq!(sizes, BLOCK_SIZES);
        let values: Vec<u64> = stats.usage_by_block_size.values().copied().collect();
        assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");
    }

    #[test]
    fn compressed_layers_give_the_same_figures_as_their_tar() {
        let tar = sample_tar();
        let plain = analyze_layer(&tar[..]).unwrap();

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&tar[..], 3).unwrap();

        for (blob, compression) in [(gz, Compression::Gzip), (zst, Compression::Zstd)] {
            let stats = analyze_layer(&blob[..]).unwrap();
            assert_eq!(stats.compression, compression);
            assert_eq!(stats.archive_digest, Digest::of(&blob));
            assert_eq!(stats.archive_size, blob.len() as u64);
            assert_eq!(
                LayerStats {
                    archive_digest: plain.archive_digest.clone(),
                    archive_size: plain.archive_size,
                    compression: Compression::None,
                    ..stats
                },
                plain
            );
        }
    }

    #[test]
    fn what_is_not_a_tar_is_refused_clearly() {
        let mut text = b"this is a text file, not a layer\n".repeat(40);
        for blob in [
            Vec::new(),
            std::mem::take(&mut text),
            b"BZh91AY&SY".repeat(100),
        ] {
            let err = analyze_layer(&blob[..]).unwrap_err();
            assert!(
                err.to_string().starts_with("layer is not a tar archive"),
                "{err}"
            );
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&b"plain text in a gzip stream\n".repeat(50))
            .unwrap();
        let err = analyze_layer(&gz.finish().unwrap()[..]).unwrap_err();
        assert!(matches!(err, LayerError::NotATar(_)), "{err}");
    }

    #[test]
    fn a_corrupt_gzip_stream_is_told_apart_from_a_bad_tar() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&sample_tar()).unwrap();
        let mut blob = gz.finish().unwrap();
        let mid = blob.len() / 2;
        blob[mid..].iter_mut().for_each(|b| *b ^= 0x5a);
        let err = analyze_layer(&blob[..]).unwrap_err();
        assert!(matches!(err, LayerError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn a_failing_reader_is_reported_as_such() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("connection reset"))
            }
        }
        let tar = sample_tar();
        let err = analyze_layer((&tar[..1024]).chain(Broken)).unwrap_err();
        assert!(matches!(err, LayerError::Read(_)), "{err}");
        assert!(err.to_string().contains("connection reset"), "{err}");
    }

    #[test]
    fn implied_directories_and_big_directories_are_counted() {
        let mut builder = tar::Builder::new(Vec::new());
        for i in 0..600 {
            let mut h = tar::Header::new_ustar();
            h.set_size(0);
            h.set_cksum();
            let path = format!("deep/er/dir/file-with-a-longish-name-{i:04}");
            builder.append_data(&mut h, path, io::empty()).unwrap();
        }
        let stats = analyze_layer(&builder.into_inner().unwrap()[..]).unwrap();
        // 600 files + 3 implied directories.
        assert_eq!(stats.inodes, 603 + OVERHEAD_INODES);
        // 600 dirents of 40 bytes (29-byte names): an htree of
        // 1 + 24000/(4084*ln2) = 9.5 blocks.
        let expected_dir = dir_blocks(600 * 40, 4096);
        assert!((9.4..9.6).contains(&expected_dir), "{expected_dir}");
        // root, deep, er: 3 blocks; no data; overhead 10 + tar-split 9 blocks.
        let blocks = (3.0 + expected_dir + 19.0 + 0.07f64).ceil() as u64;
        assert_eq!(stats.usage(), blocks * 4096);
    }

    #[test]
    fn usage_for_an_unlisted_block_size_never_underestimates() {
        let map = BTreeMap::from([(1024, 100), (4096, 200), (16384, 400), (65536, 900)]);
        use crate::oci::format::{fallback_usage, usage_for_block_size};
        assert_eq!(usage_for_block_size(&map, 4096), 200);
        assert_eq!(usage_for_block_size(&map, 2048), 200);
        assert_eq!(usage_for_block_size(&map, 512), 100);
        assert_eq!(usage_for_block_size(&map, 131072), 1800);
        assert_eq!(usage_for_block_size(&BTreeMap::new(), 4096), 0);
        assert_eq!(fallback_usage(1000), 5000);
        assert_eq!(fallback_usage(u64::MAX), u64::MAX);
    }

    #[test]
    fn large_files_get_extent_tree_blocks() {
        // 5 extents of 32768 blocks: more than the inode's 4.
        assert_eq!(file_blocks(5 * 32768 * 4096, 4096), 5 * 32768 + 1);
        assert_eq!(file_blocks(4 * 32768 * 4096, 4096), 4 * 32768);
        assert_eq!(file_blocks(0, 4096), 0);
        assert_eq!(file_blocks(1, 4096), 1);
    }

    #[test]
    fn paths_are_normalised() {
        assert_eq!(&*normalise(b"./a//b/./c/"), b"a/b/c");
        assert_eq!(&*normalise(b"a/b"), b"a/b");
        assert_eq!(&*normalise(b"./"), b"");
    }
}
