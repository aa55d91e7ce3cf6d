//! Real, small file systems for space tests: a loop-mounted ext4 image (the block size
//! and inode count a test asks for) and a size-limited tmpfs. Each is mounted on a fresh
//! temp dir and unmounted (lazily when still busy) and deleted when its handle drops.

use super::{run_ok, run_output, temp_dir};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Figures of `statvfs(2)` for the file system holding a path.
#[derive(Clone, Copy, Debug)]
pub struct FsStats {
    /// `f_frsize`: the unit of the block counts.
    pub block_size: u64,
    pub blocks: u64,
    pub blocks_free: u64,
    /// Free blocks an unprivileged user may use (excludes the root reserve).
    pub blocks_available: u64,
    pub inodes: u64,
    pub inodes_free: u64,
}

impl FsStats {
    pub fn total_bytes(&self) -> u64 {
        self.blocks * self.block_size
    }
    pub fn free_bytes(&self) -> u64 {
        self.blocks_free * self.block_size
    }
    pub fn available_bytes(&self) -> u64 {
        self.blocks_available * self.block_size
    }
    pub fn used_bytes(&self) -> u64 {
        (self.blocks - self.blocks_free) * self.block_size
    }
    pub fn used_inodes(&self) -> u64 {
        self.inodes - self.inodes_free
    }
}

pub fn fs_stats(path: &Path) -> FsStats {
    let st =
        rustix::fs::statvfs(path).unwrap_or_else(|e| panic!("statvfs {}: {e}", path.display()));
    FsStats {
        block_size: st.f_frsize,
        blocks: st.f_blocks,
        blocks_free: st.f_bfree,
        blocks_available: st.f_bavail,
        inodes: st.f_files,
        inodes_free: st.f_ffree,
    }
}

/// An ext4 file system in a sparse image file, loop-mounted on a temp dir.
pub struct LoopVolume {
    dir: tempfile::TempDir,
    mount_point: PathBuf,
    mounted: bool,
}

impl LoopVolume {
    /// `size_mib` MiB of ext4 with 4096-byte blocks (mkfs defaults otherwise, including
    /// the 5% reserved for root).
    pub fn new(size_mib: u64) -> LoopVolume {
        LoopVolume::with_options(size_mib, 4096, None)
    }

    /// `size_mib` MiB of ext4 with `block_size`-byte blocks (1024, 2048 or 4096) and,
    /// when given, about `inodes` inodes (mkfs rounds to whole inode-table blocks per
    /// group; for inode-exhaustion tests).
    pub fn with_options(size_mib: u64, block_size: u32, inodes: Option<u64>) -> LoopVolume {
        let dir = temp_dir("stowage-loop-");
        let image = dir.path().join("image.ext4");
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).expect("create mount point");
        let file = std::fs::File::create(&image).expect("create image file");
        file.set_len(size_mib * 1024 * 1024)
            .expect("size the image file");
        drop(file);
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F", "-b", &block_size.to_string()]);
        if let Some(inodes) = inodes {
            mkfs.args(["-N", &inodes.to_string()]);
        }
        run_ok(mkfs.arg(&image));
        // Loop devices are shared by every process on the machine; a parallel mount can
        // take the device this one picked, so try again.
        let mut last = None;
        for attempt in 0..10 {
            let out = run_output(
                Command::new("mount")
                    .args(["-t", "ext4", "-o", "loop"])
                    .arg(&image)
                    .arg(&mount_point),
            );
            if out.status.success() {
                return LoopVolume {
                    dir,
                    mount_point,
                    mounted: true,
                };
            }
            last = Some(out);
            std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
        }
        let out = last.expect("at least one attempt");
        panic!(
            "mount -o loop {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mount_point
    }

    /// The sparse file holding the file system.
    pub fn image_file(&self) -> PathBuf {
        self.dir.path().join("image.ext4")
    }

    pub fn stats(&self) -> FsStats {
        fs_stats(&self.mount_point)
    }

    /// [`LoopVolume::stats`] once everything written to the volume has
    /// reached it (`syncfs`), so that allocated blocks are counted.
    pub fn synced_stats(&self) -> FsStats {
        let dir = std::fs::File::open(&self.mount_point)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.mount_point.display()));
        rustix::fs::syncfs(&dir)
            .unwrap_or_else(|e| panic!("syncfs {}: {e}", self.mount_point.display()));
        self.stats()
    }
}

impl Drop for LoopVolume {
    fn drop(&mut self) {
        if self.mounted {
            unmount(&self.mount_point);
            self.mounted = false;
        }
    }
}

/// A tmpfs limited to `size_mib` MiB, mounted on a temp dir.
pub struct TmpfsVolume {
    dir: tempfile::TempDir,
}

impl TmpfsVolume {
    pub fn new(size_mib: u64) -> TmpfsVolume {
        let dir = temp_dir("stowage-tmpfs-");
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m,mode=0755")])
                .arg("stowage-test")
                .arg(dir.path()),
        );
        TmpfsVolume { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn stats(&self) -> FsStats {
        fs_stats(self.dir.path())
    }
}

impl Drop for TmpfsVolume {
    fn drop(&mut self) {
        unmount(self.dir.path());
    }
}

/// Unmounts `path`; lazily when it is still busy, so a test's cleanup never hangs.
pub(crate) fn unmount(path: &Path) {
    let out = run_output(Command::new("umount").arg(path));
    if !out.status.success() {
        let _ = run_output(Command::new("umount").arg("-l").arg(path));
    }
}
