//! The one test harness of the two test binaries, `tests/it` (the main suite, a module
//! per area) and `tests/torture` (kill loops, run as a CI step of its own); each
//! includes it as `#[path = "../common/mod.rs"] mod common;`.
//!
//! It starts REAL services on loopback (a `docker-registry` per test, a private
//! `dockerd` when a test needs its own data root), builds test images locally (no
//! network: a busybox rootfs via `docker import`, more layers via `docker build`), and
//! makes real file systems (loop-mounted ext4, size-limited tmpfs).
//!
//! Promises: every helper is safe to call from many tests at once, in one process and
//! across test binaries (unique names, temp dirs, free ports); every service it starts is
//! stopped by pid and every mount undone when its handle drops. A helper that cannot do
//! its job panics with the command, its exit status and its stderr, so a failing test
//! says why. Every `stowage` it starts is kept off the machine's own settings and state
//! ([`sandbox`]); every image it makes is a guard that removes it ([`LocalImage`]); a
//! randomised test takes its seed from [`test_seed`], which prints it for a replay.
#![allow(dead_code, unused_imports)]

mod apps;
pub mod device;
pub mod docker_device;
mod dockerd;
pub mod engines;
pub mod hostile;
mod images;
pub mod powercut;
mod registry;
mod sandbox;
pub mod seed;
pub mod token_server;
mod volumes;

pub use apps::{AppCleanup, publish_compose_app, running_images, say, stowage_on};
pub use dockerd::{DaemonSpec, PrivateDockerd, ensure_dockerd};
pub use engines::{ComposeSetup, ComposeVersion, Engine};
pub use images::{
    LocalImage, build_from_context, build_image, busybox_image, busybox_image_of_its_own,
    many_files_image, push_image, push_multiarch, remove_image, skopeo_inspect_raw, tag_image,
};
pub use registry::{HttpResponse, Registry, RegistryOptions, write_docker_config};
pub use sandbox::sandbox;
pub use seed::{Rng, noise, seed_of, test_seed};
pub use volumes::{FsStats, LoopVolume, TmpfsVolume, fs_stats};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The `stowage` binary built for this test run, kept off the machine's own
/// settings and state (see [`sandbox`]): an empty config file of its own
/// (never `/etc/stowage/config.toml`), an empty Docker config, a fresh cache
/// directory and, unless the test gives `--root`, a fresh root.
///
/// The machine's own disk is shared with everything else on it (CI machines
/// have been seen with 53 to 80 GB free of 252 GB, under the default 80 %
/// watermark's reserve), so tests that do not test the policy let an update
/// fill it up to 99 %; tests of the policy pass `--watermark` themselves, on
/// volumes of their own.
pub fn stowage() -> Command {
    stowage_with_config(&sandbox().empty_config())
}

/// Like [`stowage`], with `--config config` (a test's own config file).
pub fn stowage_with_config(config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stowage"));
    sandbox().isolate(&mut cmd);
    cmd.env("STOWAGE_WATERMARK", "99")
        .arg("--config")
        .arg(config);
    cmd
}

/// A name no other test (in this process or another) uses at the same time: lowercase,
/// valid as a repository path component, an image tag, a compose project and app name.
/// It carries the run's mark (`STOWAGE_TEST_RUN`, set by `.ci/run`), so that whatever
/// a run leaves on the machine can be told from another's.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let prefix: String = prefix
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "{prefix}-{}{:x}-{n}-{:x}",
        run_mark(),
        std::process::id(),
        (nanos >> 10) & 0xffff
    )
}

/// `STOWAGE_TEST_RUN` (up to 8 lowercase letters and digits) and a dash, or nothing.
fn run_mark() -> &'static str {
    static MARK: OnceLock<String> = OnceLock::new();
    MARK.get_or_init(|| {
        let mark: String = std::env::var("STOWAGE_TEST_RUN")
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            .take(8)
            .collect();
        if mark.is_empty() {
            mark
        } else {
            format!("{mark}-")
        }
    })
}

/// `sha256:<hex>` of `bytes`, the form registries use.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Runs `cmd`, panics unless it exits 0 (showing its stdout and stderr), returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run_output(cmd);
    if !out.status.success() {
        panic!("{}", describe_failure(cmd, &out, "failed"));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`run_ok`], returning stdout as bytes (for binary output such as `docker save`).
/// The containers of compose project `project` that `docker` (a `docker`
/// command for the engine to ask) lists: each running service with its image,
/// and a line for every other container (stopped, or a second one of a service).
pub fn compose_containers(
    docker: &mut Command,
    project: &str,
) -> (std::collections::BTreeMap<String, String>, Vec<String>) {
    let out = run_ok(docker.args([
        "ps",
        "-a",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
        "--format",
        "{{.Label \"com.docker.compose.service\"}} {{.Image}} {{.State}}",
    ]));
    let mut running = std::collections::BTreeMap::new();
    let mut others = Vec::new();
    for line in out.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            [service, image, "running"] => {
                if let Some(other) = running.insert(service.to_string(), image.to_string()) {
                    others.push(format!("a second {service} running {other}"));
                }
            }
            _ => others.push(line.to_string()),
        }
    }
    (running, others)
}

/// The ID of the container of `service` in compose project `project`.
pub fn service_container(docker: &mut Command, project: &str, service: &str) -> String {
    run_ok(docker.args([
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
        "--filter",
        &format!("label=com.docker.compose.service={service}"),
    ]))
    .trim()
    .to_string()
}

pub fn run_ok_bytes(cmd: &mut Command) -> Vec<u8> {
    let out = run_output(cmd);
    if !out.status.success() {
        panic!("{}", describe_failure(cmd, &out, "failed"));
    }
    out.stdout
}

/// Runs `cmd` with `input` on its standard input; otherwise like [`run_ok`].
pub fn run_ok_with_stdin(cmd: &mut Command, input: &[u8]) -> String {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let input = input.to_vec();
    // Feed stdin from another thread so a child that writes a lot cannot deadlock us.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("could not wait for {cmd:?}: {e}"));
    let _ = feeder.join();
    if !out.status.success() {
        panic!("{}", describe_failure(cmd, &out, "failed"));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` and returns its output whatever its exit status; panics only when it
/// cannot be started.
pub fn run_output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"))
}

/// Runs `cmd`, panics unless it exits NON-zero, returns its output for further checks
/// (a clear message on stderr, a specific exit code).
pub fn run_fails(cmd: &mut Command) -> Output {
    let out = run_output(cmd);
    if out.status.success() {
        panic!(
            "{}",
            describe_failure(cmd, &out, "succeeded but should have failed")
        );
    }
    out
}

fn describe_failure(cmd: &Command, out: &Output, what: &str) -> String {
    format!(
        "{cmd:?} {what} ({})\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Writes an app directory: `dir/docker-compose.yml` with `compose_yaml`.
pub fn write_app(dir: &Path, compose_yaml: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let file = dir.join("docker-compose.yml");
    std::fs::write(&file, compose_yaml).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    file
}

/// A fresh temporary directory, removed when the handle drops.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("create a temp dir: {e}"))
}

/// Polls `ready` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `lines` lines of a log file, for failure messages.
pub fn tail_file(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Sends `signal` to `pid` (a process this harness started).
pub(crate) fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Locks a mutex, taking the data even when another test panicked while holding it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
