//! Docker engines for tests: the machine's default dockerd (started when it does not
//! answer, and left running for later tests), and private dockerds, each with its own
//! data root, exec root and socket, stopped by pid when their handle drops.

use super::engines::Engine;
use super::volumes::unmount;
use super::{
    run_ok, run_ok_bytes, run_ok_with_stdin, run_output, send_signal, tail_file, wait_until,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

fn default_docker_answers() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .env_remove("DOCKER_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Makes sure the default dockerd (/var/run/docker.sock) answers; starts it, as
/// `scripts/setup.sh` does, when it does not. Checked once per process.
pub fn ensure_dockerd() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        if default_docker_answers() {
            return;
        }
        let log = if Path::new("/var/log").is_dir() {
            PathBuf::from("/var/log/stowage-dockerd.log")
        } else {
            PathBuf::from("/tmp/stowage-dockerd.log")
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let err = file.try_clone().expect("clone log handle");
        use std::os::unix::process::CommandExt as _;
        // Its own process group: it outlives this test process and its signals.
        let spawned = Command::new("dockerd")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .process_group(0)
            .spawn();
        if let Err(e) = spawned {
            panic!("dockerd does not answer and could not be started: {e}");
        }
        // Another test process may have started one at the same moment: any dockerd
        // that answers will do.
        if !wait_until(Duration::from_secs(60), default_docker_answers) {
            panic!(
                "dockerd did not answer within 60 s: {}",
                tail_file(&log, 30)
            );
        }
    });
}

/// Which dockerd a [`PrivateDockerd`] runs, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonSpec {
    pub engine: Engine,
    /// Docker 26's containerd image store (`features.containerd-snapshotter`
    /// in daemon.json; its storage driver is then containerd's `overlayfs`).
    pub containerd_snapshotter: bool,
}

impl Default for DaemonSpec {
    fn default() -> DaemonSpec {
        DaemonSpec {
            engine: Engine::Docker20,
            containerd_snapshotter: false,
        }
    }
}

impl From<Engine> for DaemonSpec {
    fn from(engine: Engine) -> DaemonSpec {
        DaemonSpec {
            engine,
            containerd_snapshotter: false,
        }
    }
}

/// A second dockerd with its own data root (for example on a LoopVolume), exec root,
/// pidfile, config file and socket; no bridge, no iptables, so it touches neither the
/// machine's dockerd nor another test's. Dropping it stops it (SIGTERM, then SIGKILL)
/// and unmounts what it left under its directories and on its data root. The data
/// root's contents stay (they belong to the caller).
pub struct PrivateDockerd {
    run_dir: tempfile::TempDir,
    data_root: PathBuf,
    child: Option<Child>,
    spec: DaemonSpec,
}

impl PrivateDockerd {
    /// The machine's dockerd (20.10), privately.
    pub fn start(data_root: &Path) -> PrivateDockerd {
        PrivateDockerd::start_with(data_root, DaemonSpec::default())
    }

    /// The dockerd `spec` names, privately.
    pub fn start_with(data_root: &Path, spec: impl Into<DaemonSpec>) -> PrivateDockerd {
        PrivateDockerd::try_start_with(data_root, spec).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The machine's dockerd, or why it did not come up (for tests of an
    /// engine that cannot start on the data root it is given).
    pub fn try_start(data_root: &Path) -> Result<PrivateDockerd, String> {
        PrivateDockerd::try_start_with(data_root, DaemonSpec::default())
    }

    /// [`PrivateDockerd::start_with`], saying why it did not come up.
    pub fn try_start_with(
        data_root: &Path,
        spec: impl Into<DaemonSpec>,
    ) -> Result<PrivateDockerd, String> {
        let spec = spec.into();
        std::fs::create_dir_all(data_root)
            .unwrap_or_else(|e| panic!("create data root {}: {e}", data_root.display()));
        // Short paths: the socket and containerd's sockets live under it (108-byte
        // limit), so the temp dir only when its path is short, else /tmp.
        let tmp = std::env::temp_dir();
        let parent = if tmp.as_os_str().len() <= 40 {
            tmp
        } else {
            PathBuf::from("/tmp")
        };
        let run_dir = tempfile::Builder::new()
            .prefix("sd")
            .tempdir_in(parent)
            .expect("create dockerd run dir");
        let run = run_dir.path();
        let daemon_json = if spec.containerd_snapshotter {
            "{\"features\": {\"containerd-snapshotter\": true}}\n"
        } else {
            "{}\n"
        };
        std::fs::write(run.join("daemon.json"), daemon_json).expect("write daemon.json");
        let log = run.join("dockerd.log");
        let file = std::fs::File::create(&log).expect("create dockerd log");
        let err = file.try_clone().expect("clone log handle");
        let mut command = Command::new(spec.engine.dockerd());
        let dirs = spec.engine.path_dirs();
        if !dirs.is_empty() {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let joined =
                std::env::join_paths(dirs.iter().cloned().chain(std::env::split_paths(&path)))
                    .expect("join PATH");
            command.env("PATH", joined);
        }
        // The graph driver; the containerd store names its own (overlayfs).
        if !spec.containerd_snapshotter {
            command.arg("--storage-driver=overlay2");
        }
        let child = command
            .arg("--config-file")
            .arg(run.join("daemon.json"))
            .arg("--data-root")
            .arg(data_root)
            .arg("--exec-root")
            .arg(run.join("x"))
            .arg("--pidfile")
            .arg(run.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", run.join("docker.sock").display()))
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
                "--log-level=warn",
            ])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("could not run {:?}: {e}", spec.engine.dockerd()));
        let host = format!("unix://{}", run.join("docker.sock").display());
        let mut dockerd = PrivateDockerd {
            run_dir,
            data_root: data_root.to_path_buf(),
            child: Some(child),
            spec,
        };
        let mut exited = None;
        let ready = wait_until(Duration::from_secs(60), || {
            if let Some(child) = &mut dockerd.child
                && let Ok(Some(status)) = child.try_wait()
            {
                exited = Some(status);
                return true;
            }
            run_output(Command::new("docker").args([
                "-H",
                &host,
                "info",
                "--format",
                "{{.ServerVersion}}",
            ]))
            .status
            .success()
        });
        if let Some(status) = exited {
            dockerd.child = None;
            dockerd.kill_own_containerd();
            dockerd.unmount_leftovers();
            return Err(format!(
                "private dockerd exited ({status}): {}",
                tail_file(&log, 30)
            ));
        }
        if !ready {
            return Err(format!(
                "private dockerd did not answer within 60 s: {}",
                tail_file(&log, 30)
            ));
        }
        Ok(dockerd)
    }

    pub fn spec(&self) -> DaemonSpec {
        self.spec
    }

    /// The server version the engine reports (e.g. "26.1.5+dfsg1").
    pub fn server_version(&self) -> String {
        run_ok(
            self.docker()
                .args(["version", "--format", "{{.Server.Version}}"]),
        )
        .trim()
        .to_string()
    }

    /// The power goes off under this engine: SIGKILL to every container's
    /// first process (which takes its PID namespace with it), to the shims,
    /// to containerd and to dockerd, with no shutdown of any kind; then
    /// what it had mounted is unmounted, as [`Drop`] does.
    pub fn kill_now(&mut self) {
        let run = self.run_dir.path().to_string_lossy().into_owned();
        // The shims of this engine name its containerd's socket, under our
        // run directory; their children are the containers' first processes.
        let shims: Vec<u32> = processes()
            .into_iter()
            .filter(|(_, cmdline)| cmdline.contains("containerd-shim") && cmdline.contains(&run))
            .map(|(pid, _)| pid)
            .collect();
        for (pid, _) in processes() {
            if parent_of(pid).is_some_and(|p| shims.contains(&p)) {
                send_signal(pid, libc::SIGKILL);
            }
        }
        for pid in &shims {
            send_signal(*pid, libc::SIGKILL);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Its containerd, and anything else started with our run directory.
        for (pid, cmdline) in processes() {
            if cmdline.contains(&run) {
                send_signal(pid, libc::SIGKILL);
            }
        }
        self.stop();
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir.path().join("docker.sock")
    }

    /// Copies image `tag` from the default dockerd into this one (`docker save | load`).
    pub fn load_from_default(&self, tag: &str) {
        ensure_dockerd();
        let archive = run_ok_bytes(Command::new("docker").args(["save", tag]));
        run_ok_with_stdin(self.docker().args(["load", "-q"]), &archive);
    }

    /// "unix:///.../docker.sock", for `DOCKER_HOST`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    pub fn data_root(&self) -> &Path {
        &self.data_root
    }

    pub fn log_file(&self) -> PathBuf {
        self.run_dir.path().join("dockerd.log")
    }

    /// `docker -H unix://SOCK`.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.env_remove("DOCKER_CONTEXT").arg("-H").arg(self.host());
        cmd
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops the engine (SIGTERM, then SIGKILL after 40 s) and unmounts what
    /// it left mounted. Again after a stop it only cleans up.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(child.id(), libc::SIGTERM);
            // dockerd stops its containers (up to its 15 s shutdown timeout) and containerd.
            let stopped = wait_until(Duration::from_secs(40), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !stopped {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        self.kill_own_containerd();
        self.unmount_leftovers();
    }

    /// A containerd it started and could not stop: ours by its pidfile in our dir.
    fn kill_own_containerd(&self) {
        let containerd_pid = self.run_dir.path().join("x/containerd/containerd.pid");
        if let Ok(text) = std::fs::read_to_string(&containerd_pid)
            && let Ok(pid) = text.trim().parse::<u32>()
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours =
                String::from_utf8_lossy(&cmdline).contains(&*self.run_dir.path().to_string_lossy());
            if ours {
                send_signal(pid, libc::SIGKILL);
            }
        }
    }

    /// Unmounts what it left mounted under its directories and data root.
    fn unmount_leftovers(&self) {
        // Under its directories, and the data root itself: dockerd bind-mounts
        // a data root that is not a mount point onto itself, and only a clean
        // shutdown undoes that.
        let mut leftovers: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(self.run_dir.path()) || m.starts_with(&self.data_root))
            .collect();
        // Deepest first.
        leftovers.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in leftovers {
            unmount(&m);
        }
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every process but this one: pid and command line (NULs as spaces).
pub(crate) fn processes() -> Vec<(u32, String)> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (pid, text)
        })
        .collect()
}

/// The parent of `pid`, from `/proc/PID/stat` (the field after the command's
/// closing parenthesis and the state).
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every mount point of this process's mount namespace.
pub(crate) fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|escaped| PathBuf::from(unescape_mount_path(escaped)))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\NNN` octal.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let n = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(n);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
