//! A device whose stowage talks to a private dockerd (its own data root, so
//! what it holds is exactly what the test put there), and what the install
//! tests and the install kill loop share: local images, publishing a compose
//! app, and what the engine and `stowage ps` show.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::*;

/// Local images built on the default dockerd for a test, removed at the end
/// (the newest first, so that children go before their parents).
#[derive(Default)]
pub struct LocalImages(pub Vec<LocalImage>);

impl LocalImages {
    pub fn busybox(&mut self, tag: &str) {
        self.0.push(busybox_image(tag));
    }

    pub fn build(&mut self, tag: &str, base: &str, files: &[(&str, Vec<u8>)]) {
        self.0
            .push(build_image(tag, base, files, "CMD [\"sleep\", \"3600\"]"));
    }
}

impl Drop for LocalImages {
    fn drop(&mut self) {
        while let Some(image) = self.0.pop() {
            drop(image);
        }
    }
}

/// A device: a root for stowage and the engine it talks to.
pub struct Device {
    pub root: PathBuf,
    pub registry: String,
    pub docker_host: String,
    /// A config file, when the test sets fit policy.
    pub config: Option<PathBuf>,
}

impl Device {
    pub fn stowage(&self, args: &[&str]) -> Command {
        let mut cmd = match &self.config {
            Some(config) => stowage_with_config(config),
            None => stowage(),
        };
        cmd.env("DOCKER_HOST", &self.docker_host)
            .arg("--root")
            .arg(&self.root)
            .args(["--insecure-registry", &self.registry])
            .args(args);
        cmd
    }

    pub fn ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.stowage(args))
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.ok(&full);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }
}

/// A config that lets an update fill the shared test machine's disk up to
/// 99%: these tests are about Docker, not about the disk they run on.
pub fn lenient_config(dir: &Path) -> Option<PathBuf> {
    let path = dir.join("stowage.toml");
    std::fs::write(&path, "watermark = 99\n").unwrap();
    Some(path)
}

pub fn publish(registry: &Registry, compose: &str, target: &str) -> String {
    let dir = temp_dir("install-app-");
    let cache = temp_dir("install-cache-");
    write_app(dir.path(), compose);
    let out = run_ok(
        stowage()
            .arg("publish")
            .arg("--dir")
            .arg(dir.path())
            .args(["--insecure-registry", &registry.host()])
            .arg("--cache-dir")
            .arg(cache.path())
            .arg(target),
    );
    out.lines().last().unwrap_or("").trim().to_string()
}

/// Images in the private engine, as `REPO:TAG` lines.
pub fn engine_images(dockerd: &PrivateDockerd) -> Vec<String> {
    run_ok(
        dockerd
            .docker()
            .args(["images", "--format", "{{.Repository}}:{{.Tag}}"]),
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// Fails when the private engine holds an intermediate image of a
/// layer-by-layer load (`why` says what should have removed it).
pub fn assert_no_intermediate_images(dockerd: &PrivateDockerd, why: &str) {
    let left = run_ok(dockerd.docker().args([
        "images",
        "-aq",
        "--filter",
        "label=org.stowage.intermediate",
    ]));
    assert_eq!(left.trim(), "", "{why}");
}

pub fn app_state<'a>(ps: &'a Value, name: &str) -> &'a Value {
    ps.as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in ps: {ps}"))
}

/// Three services on one base: web and worker with a layer of their own
/// each, db the base alone. Services use no network, so the private dockerd
/// needs no bridge.
pub fn three_service_compose(web: &str, worker: &str, db: &str) -> String {
    format!(
        "services:\n  web:\n    image: {web}\n    network_mode: none\n  worker:\n    image: {worker}\n    network_mode: none\n  db:\n    image: {db}\n    network_mode: none\n    command: [\"sleep\", \"3600\"]\n"
    )
}
