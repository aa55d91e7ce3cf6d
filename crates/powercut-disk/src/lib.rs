//! A disk that can lose power, for tests.
//!
//! A FUSE file system serving one file, `disk.img`, over a backing file (the
//! "platter"). It models a disk with a volatile write cache:
//!
//! - a write is acknowledged at once and held in memory (reads see it);
//! - an `fsync` of `disk.img` (which is what the loop driver turns a block
//!   layer flush, and a FUA write, into) writes everything held to the
//!   backing file: from then on it is durable;
//! - a [`Disk::cut`] (or writing `cut MODE SEED` to the control file `ctl`)
//!   drops what is not durable in one of the [`CutMode`]s, and the disk is
//!   dead from then on: writes are acknowledged and dropped, flushes do
//!   nothing, reads see the durable contents. Power comes back by mounting
//!   the backing file again ([`Disk::mount`]), as a new boot.
//!
//! The backing file itself is never fsynced: the host does not lose power,
//! only the disk modelled here does.
//!
//! Attach a loop device to `disk.img` with direct I/O off (`losetup
//! --direct-io=off`), so that the loop driver writes through the FUSE file
//! and turns flushes into `fsync` of it.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, WriteFlags,
};

/// The unit in which a cut tears writes.
pub const SECTOR: u64 = 4096;
/// The unit in which the last sector written before a torn cut is torn.
const HARDWARE_SECTOR: u64 = 512;

const ROOT: INodeNo = INodeNo::ROOT;
const IMAGE: INodeNo = INodeNo(2);
const CONTROL: INodeNo = INodeNo(3);
/// The name of the image file in the mount.
pub const IMAGE_NAME: &str = "disk.img";
/// The name of the control file in the mount.
pub const CONTROL_NAME: &str = "ctl";

/// What a cut keeps of the writes made since the last flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMode {
    /// Nothing: every write since the last flush is lost.
    All,
    /// A random subset of the writes, each kept or lost whole (a cache that
    /// wrote some of its lines back, in any order).
    Subset,
    /// Each 4 KiB sector of every write kept or lost on its own, so that a
    /// write of many sectors is torn; one sector is torn within, at a
    /// 512-byte boundary (cut while the drive wrote it).
    Torn,
}

impl CutMode {
    pub const ALL: [CutMode; 3] = [CutMode::All, CutMode::Subset, CutMode::Torn];

    pub fn name(self) -> &'static str {
        match self {
            CutMode::All => "lose-all",
            CutMode::Subset => "random-subset",
            CutMode::Torn => "torn-sectors",
        }
    }

    pub fn parse(text: &str) -> Option<CutMode> {
        CutMode::ALL.into_iter().find(|m| m.name() == text)
    }
}

impl fmt::Display for CutMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a disk has seen since it was mounted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub writes: u64,
    pub bytes_written: u64,
    pub fsyncs: u64,
    /// Writes not yet durable (since the last fsync).
    pub pending_writes: u64,
    pub pending_bytes: u64,
    pub dead: bool,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "writes {} ({} bytes), fsyncs {}, pending {} writes ({} bytes){}",
            self.writes,
            self.bytes_written,
            self.fsyncs,
            self.pending_writes,
            self.pending_bytes,
            if self.dead { ", dead" } else { "" }
        )
    }
}

/// What a cut dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutReport {
    pub mode: CutMode,
    pub seed: u64,
    /// Writes since the last flush, and their bytes.
    pub pending_writes: u64,
    pub pending_bytes: u64,
    /// Of those, the bytes that reached the platter anyway.
    pub kept_bytes: u64,
    /// Flushes the disk saw before the cut.
    pub fsyncs: u64,
}

impl fmt::Display for CutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cut ({} seed {}): {} writes ({} bytes) not flushed, {} bytes of them kept, {} lost; {} flushes before",
            self.mode,
            self.seed,
            self.pending_writes,
            self.pending_bytes,
            self.kept_bytes,
            self.pending_bytes - self.kept_bytes,
            self.fsyncs
        )
    }
}

struct PendingWrite {
    offset: u64,
    data: Vec<u8>,
}

struct State {
    platter: File,
    size: u64,
    /// The current contents of every sector written since the last flush.
    cache: BTreeMap<u64, Vec<u8>>,
    /// The writes since the last flush, in order.
    log: Vec<PendingWrite>,
    pending_bytes: u64,
    dead: bool,
    stats: Stats,
    last_cut: Option<CutReport>,
}

impl State {
    fn read(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let end = (offset + len).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        read_full(&self.platter, &mut out, offset)?;
        if !self.dead {
            let first = offset / SECTOR;
            let last = (end - 1) / SECTOR;
            for (&sector, data) in self.cache.range(first..=last) {
                let start = sector * SECTOR;
                let from = start.max(offset);
                let to = (start + SECTOR).min(end);
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
            }
        }
        Ok(out)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.stats.writes += 1;
        self.stats.bytes_written += data.len() as u64;
        if self.dead || data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        for sector in offset / SECTOR..=(end - 1) / SECTOR {
            let start = sector * SECTOR;
            if !self.cache.contains_key(&sector) {
                let mut current = vec![0u8; SECTOR as usize];
                read_full(&self.platter, &mut current, start)?;
                self.cache.insert(sector, current);
            }
            let cached = self.cache.get_mut(&sector).expect("inserted above");
            let from = start.max(offset);
            let to = (start + SECTOR).min(end);
            cached[(from - start) as usize..(to - start) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
        }
        self.log.push(PendingWrite {
            offset,
            data: data.to_vec(),
        });
        self.pending_bytes += data.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stats.fsyncs += 1;
        if self.dead {
            return Ok(());
        }
        for (&sector, data) in &self.cache {
            let start = sector * SECTOR;
            let len = (self.size.saturating_sub(start)).min(SECTOR) as usize;
            self.platter.write_all_at(&data[..len], start)?;
        }
        self.cache.clear();
        self.log.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    fn cut(&mut self, mode: CutMode, seed: u64) -> io::Result<CutReport> {
        let mut report = CutReport {
            mode,
            seed,
            pending_writes: self.log.len() as u64,
            pending_bytes: self.pending_bytes,
            kept_bytes: 0,
            fsyncs: self.stats.fsyncs,
        };
        if self.dead {
            report.pending_writes = 0;
            report.pending_bytes = 0;
            return Ok(report);
        }
        let mut rng = SplitMix64(seed);
        let log = std::mem::take(&mut self.log);
        match mode {
            CutMode::All => {}
            CutMode::Subset => {
                for w in &log {
                    if rng.next() & 1 == 1 {
                        self.put(w.offset, &w.data)?;
                        report.kept_bytes += w.data.len() as u64;
                    }
                }
            }
            CutMode::Torn => {
                // Every write cut into the 4 KiB sectors it covers.
                let mut pieces = Vec::new();
                for w in &log {
                    let end = w.offset + w.data.len() as u64;
                    let mut at = w.offset;
                    while at < end {
                        let next = ((at / SECTOR + 1) * SECTOR).min(end);
                        pieces.push((
                            at,
                            &w.data[(at - w.offset) as usize..(next - w.offset) as usize],
                        ));
                        at = next;
                    }
                }
                let torn = if pieces.is_empty() {
                    None
                } else {
                    Some(rng.next() as usize % pieces.len())
                };
                for (i, (at, bytes)) in pieces.into_iter().enumerate() {
                    if Some(i) == torn {
                        let keep = (rng.next() % (SECTOR / HARDWARE_SECTOR)) * HARDWARE_SECTOR;
                        let keep = (keep as usize).min(bytes.len());
                        self.put(at, &bytes[..keep])?;
                        report.kept_bytes += keep as u64;
                    } else if rng.next() & 1 == 1 {
                        self.put(at, bytes)?;
                        report.kept_bytes += bytes.len() as u64;
                    }
                }
            }
        }
        self.cache.clear();
        self.pending_bytes = 0;
        self.dead = true;
        self.last_cut = Some(report.clone());
        Ok(report)
    }

    fn put(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let len = (self.size.saturating_sub(offset) as usize).min(data.len());
        self.platter.write_all_at(&data[..len], offset)
    }

    fn stats(&self) -> Stats {
        Stats {
            pending_writes: self.log.len() as u64,
            pending_bytes: self.pending_bytes,
            dead: self.dead,
            ..self.stats
        }
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            // Past the platter's end reads as zeros.
            buf[done..].fill(0);
            return Ok(());
        }
        done += n;
    }
    Ok(())
}

/// SplitMix64: the cut's decisions, the same for the same seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[derive(Clone)]
struct Shared(Arc<Mutex<State>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The FUSE side: `/disk.img` and `/ctl`.
struct DiskFs {
    state: Shared,
    mounted_at: SystemTime,
}

const TTL: Duration = Duration::from_secs(1);

impl DiskFs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT => (FileType::Directory, 0o700, 0, 2),
            IMAGE => (FileType::RegularFile, 0o600, self.state.lock().size, 1),
            CONTROL => (FileType::RegularFile, 0o600, 0, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: SECTOR as u32,
            flags: 0,
        })
    }

    fn control(&self, text: &str) -> Result<(), Errno> {
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["cut", mode, seed] => {
                let mode = CutMode::parse(mode).ok_or(Errno::EINVAL)?;
                let seed = seed.parse().map_err(|_| Errno::EINVAL)?;
                self.state
                    .lock()
                    .cut(mode, seed)
                    .map(|_| ())
                    .map_err(|_| Errno::EIO)
            }
            ["flush"] => self.state.lock().flush().map_err(|_| Errno::EIO),
            _ => Err(Errno::EINVAL),
        }
    }
}

impl Filesystem for DiskFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ino = match (parent, name.to_str()) {
            (ROOT, Some(IMAGE_NAME)) => IMAGE,
            (ROOT, Some(CONTROL_NAME)) => CONTROL,
            _ => return reply.error(Errno::ENOENT),
        };
        match self.attr(ino) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The image's size is fixed (a disk does not grow); writing to the
        // control file truncates it first, which changes nothing.
        if ino == IMAGE && size.is_some_and(|s| s != self.state.lock().size) {
            return reply.error(Errno::EPERM);
        }
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            // No page cache on the FUSE side for the control file, so that
            // every write to it reaches this process at once.
            CONTROL => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            IMAGE => reply.opened(FileHandle(0), FopenFlags::empty()),
            _ => reply.error(Errno::EISDIR),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match ino {
            IMAGE => match self.state.lock().read(offset, u64::from(size)) {
                Ok(data) => reply.data(&data),
                Err(_) => reply.error(Errno::EIO),
            },
            CONTROL => {
                let state = self.state.lock();
                let mut text = format!("{}\n", state.stats());
                if let Some(cut) = &state.last_cut {
                    text.push_str(&format!("{cut}\n"));
                }
                let bytes = text.as_bytes();
                let start = (offset as usize).min(bytes.len());
                let end = (start + size as usize).min(bytes.len());
                reply.data(&bytes[start..end]);
            }
            _ => reply.error(Errno::EISDIR),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match ino {
            IMAGE => {
                let mut state = self.state.lock();
                if offset + data.len() as u64 > state.size {
                    return reply.error(Errno::ENOSPC);
                }
                match state.write(offset, data) {
                    Ok(()) => reply.written(data.len() as u32),
                    Err(_) => reply.error(Errno::EIO),
                }
            }
            CONTROL => match std::str::from_utf8(data)
                .map_err(|_| Errno::EINVAL)
                .and_then(|t| self.control(t))
            {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(e),
            },
            _ => reply.error(Errno::EISDIR),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): not a durability point.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino != IMAGE {
            return reply.ok();
        }
        match self.state.lock().flush() {
            Ok(()) => reply.ok(),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (IMAGE, FileType::RegularFile, IMAGE_NAME),
            (CONTROL, FileType::RegularFile, CONTROL_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted power-cut disk. Dropping it unmounts the FUSE file system
/// (the loop device and everything above it must be gone first).
pub struct Disk {
    state: Shared,
    mount_point: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl Disk {
    /// Mounts a disk whose platter is `platter` (an existing file; its size
    /// is the disk's) on `mount_point` (an empty directory): a power-on.
    pub fn mount(platter: &Path, mount_point: &Path) -> io::Result<Disk> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(platter)?;
        let size = file.metadata()?.len();
        let state = Shared(Arc::new(Mutex::new(State {
            platter: file,
            size,
            cache: BTreeMap::new(),
            log: Vec::new(),
            pending_bytes: 0,
            dead: false,
            stats: Stats::default(),
            last_cut: None,
        })));
        let fs = DiskFs {
            state: state.clone(),
            mounted_at: SystemTime::now(),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("powercut-disk".into()),
            MountOption::Subtype("powercut".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        let session = fuser::spawn_mount(fs, mount_point, &config)?;
        Ok(Disk {
            state,
            mount_point: mount_point.to_path_buf(),
            session: Some(session),
        })
    }

    /// `MOUNT_POINT/disk.img`, the file to attach a loop device to.
    pub fn image(&self) -> PathBuf {
        self.mount_point.join(IMAGE_NAME)
    }

    /// `MOUNT_POINT/ctl`.
    pub fn control_file(&self) -> PathBuf {
        self.mount_point.join(CONTROL_NAME)
    }

    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// Cuts the power: drops what is not durable (as `mode` says, decided
    /// by `seed`); the disk is dead from then on.
    pub fn cut(&self, mode: CutMode, seed: u64) -> io::Result<CutReport> {
        self.state.lock().cut(mode, seed)
    }

    pub fn stats(&self) -> Stats {
        self.state.lock().stats()
    }

    /// Serves until someone unmounts the file system (`umount MOUNT_POINT`).
    pub fn wait(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(session) => session.join(),
            None => Ok(()),
        }
    }

    /// Unmounts the FUSE file system and waits for its thread.
    pub fn unmount(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(session) => session.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(size: u64) -> (tempfile_free::Dir, State) {
        let dir = tempfile_free::Dir::new();
        let path = dir.0.join("platter");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        (
            dir,
            State {
                platter: file,
                size,
                cache: BTreeMap::new(),
                log: Vec::new(),
                pending_bytes: 0,
                dead: false,
                stats: Stats::default(),
                last_cut: None,
            },
        )
    }

    /// A temp dir without a dev-dependency.
    mod tempfile_free {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU64, Ordering};
                static N: AtomicU64 = AtomicU64::new(0);
                let path = std::env::temp_dir().join(format!(
                    "powercut-unit-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn platter(s: &State) -> Vec<u8> {
        let mut out = vec![0u8; s.size as usize];
        read_full(&s.platter, &mut out, 0).unwrap();
        out
    }

    #[test]
    fn reads_see_unflushed_writes_and_a_flush_makes_them_durable() {
        let (_d, mut s) = state(3 * SECTOR);
        s.write(100, &[7u8; 5000]).unwrap();
        assert_eq!(s.read(98, 4).unwrap(), vec![0, 0, 7, 7]);
        assert_eq!(platter(&s)[100], 0, "not durable before the flush");
        s.flush().unwrap();
        let p = platter(&s);
        assert!(p[100..5100].iter().all(|b| *b == 7));
        assert_eq!(p[99], 0);
        assert_eq!(p[5100], 0);
        assert_eq!(s.stats().pending_writes, 0);
    }

    #[test]
    fn a_lose_all_cut_keeps_only_what_was_flushed_and_the_disk_stays_dead() {
        let (_d, mut s) = state(2 * SECTOR);
        s.write(0, &[1u8; 10]).unwrap();
        s.flush().unwrap();
        s.write(0, &[2u8; 10]).unwrap();
        let report = s.cut(CutMode::All, 1).unwrap();
        assert_eq!(report.pending_bytes, 10);
        assert_eq!(report.kept_bytes, 0);
        s.write(0, &[3u8; 10]).unwrap();
        s.flush().unwrap();
        assert_eq!(&platter(&s)[..10], &[1u8; 10]);
        assert_eq!(s.read(0, 10).unwrap(), vec![1u8; 10]);
    }

    #[test]
    fn a_subset_cut_keeps_whole_writes_only() {
        for seed in 0..20 {
            let (_d, mut s) = state(64 * SECTOR);
            for i in 0..32u8 {
                s.write(u64::from(i) * 2 * SECTOR, &vec![i + 1; 2 * SECTOR as usize])
                    .unwrap();
            }
            let report = s.cut(CutMode::Subset, seed).unwrap();
            let p = platter(&s);
            let mut kept = 0;
            for i in 0..32u8 {
                let chunk =
                    &p[i as usize * 2 * SECTOR as usize..(i as usize + 1) * 2 * SECTOR as usize];
                assert!(
                    chunk.iter().all(|b| *b == i + 1) || chunk.iter().all(|b| *b == 0),
                    "seed {seed}: write {i} torn"
                );
                if chunk[0] != 0 {
                    kept += chunk.len() as u64;
                }
            }
            assert_eq!(kept, report.kept_bytes);
            assert!(report.kept_bytes < report.pending_bytes, "seed {seed}");
        }
    }

    #[test]
    fn a_torn_cut_tears_writes_at_sector_boundaries_and_one_sector_within() {
        let (_d, mut s) = state(64 * SECTOR);
        s.write(0, &vec![9u8; 64 * SECTOR as usize]).unwrap();
        let report = s.cut(CutMode::Torn, 42).unwrap();
        let p = platter(&s);
        let mut whole = 0;
        let mut torn = 0;
        for sector in p.chunks(SECTOR as usize) {
            if sector.iter().all(|b| *b == 9) {
                whole += 1;
            } else if sector.iter().all(|b| *b == 0) {
            } else {
                let new = sector.iter().take_while(|b| **b == 9).count();
                assert_eq!(new as u64 % HARDWARE_SECTOR, 0);
                assert!(sector[new..].iter().all(|b| *b == 0));
                torn += 1;
            }
        }
        assert!(whole > 0 && whole < 64, "{whole} whole sectors");
        assert!(torn <= 1);
        assert_eq!(report.pending_writes, 1);
    }

    #[test]
    fn the_same_seed_cuts_the_same_way() {
        let run = |seed| {
            let (_d, mut s) = state(16 * SECTOR);
            for i in 0..16u8 {
                s.write(u64::from(i) * SECTOR + 7, &[i + 1; 300]).unwrap();
            }
            s.cut(CutMode::Torn, seed).unwrap();
            platter(&s)
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }
}
