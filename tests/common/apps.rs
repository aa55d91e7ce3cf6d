//! Helpers for tests that run apps on the machine's dockerd: the device
//! command, what runs, and a guard that removes what a test started.

use std::path::Path;
use std::process::{Command, Output};

use super::{Registry, run_ok, stowage, temp_dir, write_app};

/// Removes an app's containers, its compose network and every image
/// stowage loaded for it (tags under `repo_prefix`), whatever the test did.
pub struct AppCleanup {
    pub project: String,
    pub repo_prefix: String,
}

impl AppCleanup {
    /// For app `name` (its compose project) whose images are in the
    /// repositories `HOST/NAME/...` of the registry at `registry_host`.
    pub fn for_app(registry_host: &str, name: &str) -> AppCleanup {
        AppCleanup {
            project: name.to_string(),
            repo_prefix: format!("{registry_host}/{name}/"),
        }
    }
}

impl Drop for AppCleanup {
    fn drop(&mut self) {
        let ids = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=com.docker.compose.project={}", self.project),
            ])
            .output();
        if let Ok(out) = ids {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &format!("{}_default", self.project)])
            .output();
        if let Ok(out) = Command::new("docker")
            .args(["images", "--format", "{{.Repository}}:{{.Tag}}"])
            .output()
        {
            for image in String::from_utf8_lossy(&out.stdout).lines() {
                if image.starts_with(&self.repo_prefix) {
                    let _ = Command::new("docker").args(["rmi", image]).output();
                }
            }
        }
    }
}

/// `stowage --root ROOT --insecure-registry HOST ARGS...`
pub fn stowage_on(root: &Path, registry_host: &str, args: &[&str]) -> Command {
    let mut cmd = stowage();
    cmd.arg("--root")
        .arg(root)
        .args(["--insecure-registry", registry_host])
        .args(args);
    cmd
}

/// `IMAGE STATE` of every container of compose project `project`, sorted.
pub fn running_images(project: &str) -> Vec<String> {
    let out = run_ok(Command::new("docker").args([
        "ps",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
        "--format",
        "{{.Image}} {{.State}}",
    ]));
    let mut images: Vec<String> = out.lines().map(str::to_string).collect();
    images.sort();
    images
}

/// A command's exit code, stdout and stderr, for an assertion message.
pub fn say(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Publishes `compose` (a docker-compose.yml) as version `version` of app
/// `name` at `HOST/apps/NAME:VERSION`; returns its pinned reference.
pub fn publish_compose_app(
    registry: &Registry,
    name: &str,
    version: &str,
    compose: &str,
) -> String {
    let app = temp_dir("app-");
    write_app(app.path(), compose);
    let mut cmd = stowage();
    cmd.args(["publish", "--dir"])
        .arg(app.path())
        .args(["--insecure-registry", &registry.host()])
        .arg(format!("{}/apps/{name}:{version}", registry.host()));
    run_ok(&mut cmd)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string()
}
