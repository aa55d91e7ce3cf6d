//! A device whose disk can lose power: the power-cut harness.
//!
//! [`PowerCutMachine`] keeps a platter file (the disk's durable contents)
//! in a temp dir. [`PowerCutMachine::boot`] powers it on: the platter is
//! served by the power-cut disk (`crates/powercut-disk`, a FUSE file system
//! run in this process) as `disk.img`, a loop device is attached to that
//! file with direct I/O off (so the loop driver writes through the FUSE
//! file and turns every block-layer flush and FUA write into an `fsync` of
//! it, the one moment the disk makes writes durable), and the ext4 on it is
//! mounted. A private dockerd and stowage then keep their data there:
//! `VOLUME/docker` and `VOLUME/stowage`.
//!
//! [`PowerCutMachine::cut`] is the power cut: the disk drops what was not
//! flushed (in the mode asked) and goes dead, then everything that used
//! the volume is killed with SIGKILL (the operation under test, the
//! engine's containers, shims, containerd, dockerd, anything else with a
//! file open there), everything mounted on it is unmounted, the loop
//! device detached and the FUSE file system unmounted. What survives is the
//! platter, which [`PowerCutMachine::e2fsck`] checks as a boot would, and
//! the next [`PowerCutMachine::boot`] mounts again.
//!
//! A clean shutdown ([`PowerCutMachine::shutdown`]) stops the engine with
//! SIGTERM and flushes the disk. Dropping a machine tears down whatever is
//! up, in the same order, so a failing test leaves no mount, loop device or
//! process behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use powercut_disk::{CutMode, CutReport, Disk};

use super::dockerd::{PrivateDockerd, mount_points, processes};
use super::volumes::unmount;
use super::{run_ok, run_output, send_signal, temp_dir, wait_until};

/// One boot: the disk served, the loop device, the mounted ext4, the engine.
struct Boot {
    disk: Option<Disk>,
    loop_device: Option<String>,
    mounted: bool,
    dockerd: Option<PrivateDockerd>,
}

pub struct PowerCutMachine {
    dir: tempfile::TempDir,
    /// Where the volume is mounted: the same path for every machine of a
    /// test (one on at a time), as a device's paths are the same at every
    /// boot (stowage records absolute paths).
    volume: PathBuf,
    boot: Option<Boot>,
    /// `commit=` of the ext4 mount: how often the journal commits (and so
    /// flushes) on its own.
    commit_secs: u32,
}

/// What `e2fsck -fy` said of the platter after a cut.
pub struct E2fsck {
    /// 0: clean; 1: errors fixed; 2: fixed, reboot; 4 and above: left
    /// uncorrected, or e2fsck could not run.
    pub code: i32,
    pub output: String,
}

impl E2fsck {
    pub fn usable(&self) -> bool {
        matches!(self.code, 0..=2)
    }
}

impl PowerCutMachine {
    /// A machine with a fresh ext4 disk of `size_mib` MiB (made on the
    /// platter directly, before the disk is ever served), mounted on
    /// `volume` (an empty directory) when on.
    pub fn new(size_mib: u64, volume: &Path) -> PowerCutMachine {
        let dir = temp_dir("stowage-powercut-");
        let platter = dir.path().join("platter");
        let file = std::fs::File::create(&platter).expect("create the platter");
        file.set_len(size_mib * 1024 * 1024)
            .expect("size the platter");
        drop(file);
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-E", "nodiscard"])
                .arg(&platter),
        );
        std::fs::create_dir(dir.path().join("fuse")).expect("create a mount point");
        PowerCutMachine {
            dir,
            volume: volume.to_path_buf(),
            boot: None,
            commit_secs: 30,
        }
    }

    /// A machine whose disk starts as a copy of `platter` (a golden image
    /// made by another machine's clean shutdown), mounted on `volume`.
    pub fn from_platter(platter: &Path, volume: &Path) -> PowerCutMachine {
        let dir = temp_dir("stowage-powercut-");
        run_ok(
            Command::new("cp")
                .args(["--sparse=always"])
                .arg(platter)
                .arg(dir.path().join("platter")),
        );
        std::fs::create_dir(dir.path().join("fuse")).expect("create a mount point");
        PowerCutMachine {
            dir,
            volume: volume.to_path_buf(),
            boot: None,
            commit_secs: 30,
        }
    }

    pub fn platter(&self) -> PathBuf {
        self.dir.path().join("platter")
    }

    /// The ext4 volume's mount point.
    pub fn volume(&self) -> PathBuf {
        self.volume.clone()
    }

    /// stowage's root on the volume.
    pub fn root(&self) -> PathBuf {
        self.volume().join("stowage")
    }

    /// The engine's data root on the volume.
    pub fn data_root(&self) -> PathBuf {
        self.volume().join("docker")
    }

    /// Powers on: serves the platter, attaches a loop device, mounts ext4.
    /// The engine is started apart ([`PowerCutMachine::start_engine`]), so
    /// that an engine that does not come up can be reported.
    pub fn boot(&mut self) {
        assert!(self.boot.is_none(), "the machine is already on");
        assert!(
            !mount_points().contains(&self.volume),
            "{} is in use by another machine",
            self.volume.display()
        );
        let fuse = self.dir.path().join("fuse");
        let disk = Disk::mount(&self.platter(), &fuse)
            .unwrap_or_else(|e| panic!("serve the power-cut disk on {}: {e}", fuse.display()));
        let image = disk.image();
        let mut boot = Boot {
            disk: Some(disk),
            loop_device: None,
            mounted: false,
            dockerd: None,
        };
        // Loop devices are shared by the machine: a parallel attach can take
        // the device this one found, so try again.
        let mut last = String::new();
        for attempt in 0..10 {
            let out = run_output(
                Command::new("losetup")
                    .args(["--find", "--show", "--direct-io=off"])
                    .arg(&image),
            );
            if out.status.success() {
                boot.loop_device = Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
                break;
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
        }
        let Some(device) = boot.loop_device.clone() else {
            self.boot = Some(boot);
            panic!("losetup {}: {last}", image.display());
        };
        let out = run_output(
            Command::new("mount")
                .args(["-t", "ext4", "-o"])
                .arg(format!("commit={}", self.commit_secs))
                .arg(&device)
                .arg(self.volume()),
        );
        self.boot = Some(boot);
        assert!(
            out.status.success(),
            "mount {device}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(boot) = &mut self.boot {
            boot.mounted = true;
        }
    }

    /// Starts a private dockerd whose data root is on the volume; says why
    /// when it does not come up.
    pub fn start_engine(&mut self) -> Result<(), String> {
        let data_root = self.data_root();
        let boot = self.boot.as_mut().expect("the machine is on");
        assert!(boot.dockerd.is_none(), "the engine already runs");
        boot.dockerd = Some(PrivateDockerd::try_start(&data_root)?);
        Ok(())
    }

    pub fn engine(&self) -> &PrivateDockerd {
        self.boot
            .as_ref()
            .and_then(|b| b.dockerd.as_ref())
            .expect("the engine runs")
    }

    /// Stops the engine (SIGTERM; a clean stop).
    pub fn stop_engine(&mut self) {
        if let Some(boot) = &mut self.boot
            && let Some(mut dockerd) = boot.dockerd.take()
        {
            dockerd.stop();
        }
    }

    /// What the disk has seen since this boot.
    pub fn disk_stats(&self) -> powercut_disk::Stats {
        self.boot
            .as_ref()
            .and_then(|b| b.disk.as_ref())
            .map(|d| d.stats())
            .unwrap_or_default()
    }

    /// The power cut: the disk drops what was not flushed and goes dead;
    /// then `operation` (a process group of its own: the stowage command
    /// under test and what it started) and everything else that used the
    /// volume are killed, and the machine is torn down to its platter.
    pub fn cut(&mut self, mode: CutMode, seed: u64, operation: Option<&mut Child>) -> CutReport {
        let boot = self.boot.as_mut().expect("the machine is on");
        let report = boot
            .disk
            .as_ref()
            .expect("the disk is served")
            .cut(mode, seed)
            .unwrap_or_else(|e| panic!("cut the power: {e}"));
        if let Some(child) = operation {
            // SAFETY: kill(2) has no memory-safety preconditions; the group
            // is the child's own.
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = child.wait();
        }
        if let Some(dockerd) = &mut boot.dockerd {
            dockerd.kill_now();
        }
        self.power_off();
        report
    }

    /// A clean shutdown: the engine stopped, the file system unmounted
    /// (which flushes it), the loop device detached.
    pub fn shutdown(&mut self) {
        self.stop_engine();
        self.power_off();
    }

    /// Tears down whatever is up, in order: the engine, every process with
    /// a file on the volume, every mount on it, the volume, the loop
    /// device, the disk.
    fn power_off(&mut self) {
        let Some(mut boot) = self.boot.take() else {
            return;
        };
        if let Some(mut dockerd) = boot.dockerd.take() {
            dockerd.stop();
        }
        let volume = self.volume();
        if boot.mounted {
            kill_users(&volume);
            let mut under: Vec<PathBuf> = mount_points()
                .into_iter()
                .filter(|m| m.starts_with(&volume) && *m != volume)
                .collect();
            under.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
            for m in under {
                unmount(&m);
            }
            let unmounted = wait_until(Duration::from_secs(20), || {
                if run_output(Command::new("umount").arg(&volume))
                    .status
                    .success()
                {
                    return true;
                }
                kill_users(&volume);
                false
            });
            if !unmounted {
                // Never hang a test: detach it, the loop device goes with it.
                unmount(&volume);
            }
            boot.mounted = false;
        }
        if let Some(device) = boot.loop_device.take() {
            let detached = wait_until(Duration::from_secs(20), || {
                run_output(Command::new("losetup").args(["-d", &device]))
                    .status
                    .success()
                    || !Path::new(&format!(
                        "/sys/block/{}/loop",
                        device.trim_start_matches("/dev/")
                    ))
                    .exists()
            });
            assert!(detached, "losetup -d {device} did not succeed");
            // The loop driver releases its backing file asynchronously.
            wait_until(Duration::from_secs(20), || {
                let backing = std::fs::read_to_string(format!(
                    "/sys/block/{}/loop/backing_file",
                    device.trim_start_matches("/dev/")
                ))
                .unwrap_or_default();
                !backing.contains(&*self.dir.path().to_string_lossy())
            });
        }
        if let Some(disk) = boot.disk.take() {
            let _ = disk.unmount();
        }
    }

    /// `e2fsck -fy` of the platter, as a boot does after a cut.
    pub fn e2fsck(&self) -> E2fsck {
        assert!(self.boot.is_none(), "e2fsck runs on a machine that is off");
        let out = run_output(Command::new("e2fsck").arg("-fy").arg(self.platter()));
        E2fsck {
            code: out.status.code().unwrap_or(-1),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// The engine's data root is moved aside (`docker.torn-N`) so that a
    /// fresh engine starts: the documented recovery when the engine's own
    /// metadata is torn beyond what it repairs at start.
    pub fn move_data_root_aside(&self, n: usize) -> PathBuf {
        let aside = self.volume().join(format!("docker.torn-{n}"));
        std::fs::rename(self.data_root(), &aside)
            .unwrap_or_else(|e| panic!("move {} aside: {e}", self.data_root().display()));
        aside
    }
}

impl Drop for PowerCutMachine {
    fn drop(&mut self) {
        self.power_off();
    }
}

/// SIGKILLs every process with its working directory, root, executable or
/// an open file under `dir`; waits until they are gone.
fn kill_users(dir: &Path) {
    let users: Vec<u32> = processes()
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|pid| uses(*pid, dir))
        .collect();
    for pid in &users {
        send_signal(*pid, libc::SIGKILL);
    }
    wait_until(Duration::from_secs(10), || {
        users
            .iter()
            .all(|pid| !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(*pid))
    });
}

fn uses(pid: u32, dir: &Path) -> bool {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let under = |link: &Path| std::fs::read_link(link).is_ok_and(|t| t.starts_with(dir));
    if ["cwd", "root", "exe"].iter().any(|l| under(&base.join(l))) {
        return true;
    }
    std::fs::read_dir(base.join("fd"))
        .map(|fds| fds.flatten().any(|fd| under(&fd.path())))
        .unwrap_or(false)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(true)
}
