//! Docker Compose, driven through its command line.
//!
//! This module owns starting and stopping an app's project with compose,
//! whichever compose the device has: the `docker compose` plugin (v2) or the
//! standalone `docker-compose` (v1), detected once. It promises that compose
//! never pulls: before `up`, every service's image is looked up in the engine,
//! and a missing one stops `up` with an error naming the service and image
//! (v1 has no `--pull never`). Service state is read from the Engine API by
//! the `com.docker.compose.project` label, which both versions set.
//!
//! Digest-pinned images (`REGISTRY/REPO@sha256:...`) cannot be recorded by
//! `docker load`; stowage loads them as [`crate::engine::docker::local_tag_for`] and
//! starts the project with an override file ([`image_override`]) that points
//! each service at that tag. The bundled compose file stays untouched, so it
//! still matches the bundle index.
//!
//! Errors carry compose's stderr and name the project and directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use bollard::query_parameters::ListContainersOptionsBuilder;
use serde::Deserialize;

use crate::engine::docker::{DockerEngine, DockerError, is_not_found};

/// The label compose (v1 and v2) puts on every container of a project.
pub const PROJECT_LABEL: &str = "com.docker.compose.project";
pub const SERVICE_LABEL: &str = "com.docker.compose.service";
const ONEOFF_LABEL: &str = "com.docker.compose.oneoff";

#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error(
        "neither `docker compose` (v2) nor `docker-compose` (v1) is installed; install one of them"
    )]
    NotInstalled,
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed for project {project} in {dir}: {stderr}")]
    Failed {
        command: String,
        project: String,
        dir: PathBuf,
        stderr: String,
    },
    #[error(
        "service {service} of project {project} needs image {image}, which Docker does not have; install the app first (stowage never lets compose pull)"
    )]
    ImageMissing {
        project: String,
        service: String,
        image: String,
    },
    #[error("service {service} of project {project} names no image, and stowage never builds one")]
    NoImage { project: String, service: String },
    #[error("cannot read the configuration compose resolved for project {project}: {reason}")]
    BadConfig { project: String, reason: String },
    #[error("cannot read compose file {path}: {reason}")]
    BadComposeFile { path: PathBuf, reason: String },
    #[error(transparent)]
    Docker(#[from] DockerError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComposeFlavour {
    /// `docker compose`, the CLI plugin.
    V2Plugin,
    /// `docker-compose`, the Python tool.
    V1Standalone,
}

/// The compose found on this machine.
#[derive(Debug, Clone)]
pub struct Compose {
    flavour: ComposeFlavour,
    version: String,
    docker_host: Option<String>,
}

/// One container of a project, as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceState {
    pub service: String,
    pub container: String,
    /// created, running, paused, restarting, removing, exited or dead.
    pub state: String,
    /// healthy, unhealthy or starting, when the service has a healthcheck.
    pub health: Option<String>,
    /// The exit code once the container stopped.
    pub exit_code: Option<i64>,
}

impl Compose {
    /// Finds `docker compose` (preferred) or `docker-compose`.
    pub async fn detect() -> Result<Compose, ComposeError> {
        for flavour in [ComposeFlavour::V2Plugin, ComposeFlavour::V1Standalone] {
            let mut probe = Compose {
                flavour,
                version: String::new(),
                docker_host: None,
            }
            .command();
            probe.args(["version", "--short"]);
            let Ok(output) = probe.output().await else {
                continue;
            };
            if output.status.success() {
                let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
                return Ok(Compose {
                    flavour,
                    version,
                    docker_host: None,
                });
            }
        }
        Err(ComposeError::NotInstalled)
    }

    /// Runs compose against this engine address (set as `DOCKER_HOST`)
    /// rather than the one in the environment.
    pub fn with_docker_host(mut self, host: &str) -> Compose {
        self.docker_host = Some(host.to_string());
        self
    }

    pub fn flavour(&self) -> ComposeFlavour {
        self.flavour
    }

    /// What `compose version --short` printed, e.g. "1.29.2".
    pub fn version(&self) -> &str {
        &self.version
    }

    fn command(&self) -> tokio::process::Command {
        let mut command = match self.flavour {
            ComposeFlavour::V2Plugin => {
                let mut c = tokio::process::Command::new("docker");
                c.arg("compose");
                c
            }
            ComposeFlavour::V1Standalone => tokio::process::Command::new("docker-compose"),
        };
        if let Some(host) = &self.docker_host {
            command.env("DOCKER_HOST", host);
        }
        command.stdin(Stdio::null()).kill_on_drop(true);
        // Compose dies with stowage, even when stowage is killed by SIGKILL
        // (kill_on_drop cannot run then): an orphaned `up` would race the
        // next run's `up` for the same containers.
        // SAFETY: prctl(2) is async-signal-safe and nothing is allocated
        // between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        command
    }

    fn project_command(
        &self,
        project_dir: &Path,
        project_name: &str,
        files: &[PathBuf],
    ) -> tokio::process::Command {
        let mut command = self.command();
        command.current_dir(project_dir);
        command.args(["--project-name", project_name]);
        for file in files {
            command.arg("--file").arg(file);
        }
        command
    }

    fn describe(&self, args: &[&str]) -> String {
        let program = match self.flavour {
            ComposeFlavour::V2Plugin => "docker compose",
            ComposeFlavour::V1Standalone => "docker-compose",
        };
        format!("{program} {}", args.join(" "))
    }

    async fn run(
        &self,
        project_dir: &Path,
        project_name: &str,
        files: &[PathBuf],
        args: &[&str],
    ) -> Result<Vec<u8>, ComposeError> {
        let mut command = self.project_command(project_dir, project_name, files);
        command.args(args);
        let output = command
            .output()
            .await
            .map_err(|source| ComposeError::Spawn {
                command: self.describe(args),
                source,
            })?;
        if !output.status.success() {
            return Err(ComposeError::Failed {
                command: self.describe(args),
                project: project_name.to_string(),
                dir: project_dir.to_path_buf(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(output.stdout)
    }

    /// Every service and the image it runs, as compose resolves the files
    /// (overrides merged, variables substituted).
    pub async fn service_images(
        &self,
        project_dir: &Path,
        project_name: &str,
        files: &[PathBuf],
    ) -> Result<BTreeMap<String, Option<String>>, ComposeError> {
        let resolved = self
            .run(project_dir, project_name, files, &["config"])
            .await?;
        parse_service_images(&String::from_utf8_lossy(&resolved)).map_err(|reason| {
            ComposeError::BadConfig {
                project: project_name.to_string(),
                reason,
            }
        })
    }

    /// `up -d --remove-orphans`, after checking that the engine holds every
    /// service's image, so that compose never pulls or builds.
    pub async fn up(
        &self,
        engine: &DockerEngine,
        project_dir: &Path,
        project_name: &str,
        files: &[PathBuf],
    ) -> Result<(), ComposeError> {
        for (service, image) in self
            .service_images(project_dir, project_name, files)
            .await?
        {
            let image = image.ok_or_else(|| ComposeError::NoImage {
                project: project_name.to_string(),
                service: service.clone(),
            })?;
            if engine.image_exists(&image).await?.is_none() {
                return Err(ComposeError::ImageMissing {
                    project: project_name.to_string(),
                    service,
                    image,
                });
            }
        }
        let mut args = vec!["up", "--detach", "--remove-orphans", "--no-build"];
        if self.flavour == ComposeFlavour::V2Plugin {
            args.extend(["--pull", "never"]);
        }
        self.run(project_dir, project_name, files, &args).await?;
        Ok(())
    }

    /// `down --remove-orphans`: stops and removes the project's containers
    /// and networks; images stay.
    pub async fn down(
        &self,
        project_dir: &Path,
        project_name: &str,
        files: &[PathBuf],
    ) -> Result<(), ComposeError> {
        self.run(
            project_dir,
            project_name,
            files,
            &["down", "--remove-orphans"],
        )
        .await?;
        Ok(())
    }
}

/// The state of every container of a project, read from the engine (so it
/// works for v1 and v2 alike, and without the compose files). One-off
/// containers (`compose run`) are left out. Sorted by service, then container.
pub async fn ps(
    engine: &DockerEngine,
    project_name: &str,
) -> Result<Vec<ServiceState>, ComposeError> {
    let filters = std::collections::HashMap::from([(
        "label".to_string(),
        vec![format!("{PROJECT_LABEL}={project_name}")],
    )]);
    let containers = engine
        .client()
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .map_err(|source| DockerError::Api {
            host: engine.host().to_string(),
            action: format!("list the containers of project {project_name}"),
            source,
        })?;
    let mut states = Vec::new();
    for container in containers {
        let labels = container.labels.unwrap_or_default();
        if labels
            .get(ONEOFF_LABEL)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            continue;
        }
        let Some(id) = container.id else { continue };
        let inspect = match engine.client().inspect_container(&id, None).await {
            Ok(inspect) => inspect,
            // Removed since the listing.
            Err(e) if is_not_found(&e) => continue,
            Err(source) => {
                return Err(DockerError::Api {
                    host: engine.host().to_string(),
                    action: format!("inspect container {id}"),
                    source,
                }
                .into());
            }
        };
        let state = inspect.state.unwrap_or_default();
        let status = state
            .status
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty())
            .or(container.state.map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown".into());
        let health = state
            .health
            .and_then(|h| h.status)
            .map(|h| h.to_string())
            .filter(|h| !h.is_empty() && h != "none");
        let exit_code = if status == "running" || status == "created" {
            None
        } else {
            state.exit_code
        };
        states.push(ServiceState {
            service: labels.get(SERVICE_LABEL).cloned().unwrap_or_default(),
            container: inspect
                .name
                .map(|n| n.trim_start_matches('/').to_string())
                .unwrap_or(id),
            state: status,
            health,
            exit_code,
        });
    }
    states.sort_by(|a, b| (&a.service, &a.container).cmp(&(&b.service, &b.container)));
    Ok(states)
}

fn parse_service_images(resolved: &str) -> Result<BTreeMap<String, Option<String>>, String> {
    #[derive(Deserialize)]
    struct Project {
        #[serde(default)]
        services: BTreeMap<String, Service>,
    }
    #[derive(Deserialize)]
    struct Service {
        image: Option<String>,
    }
    let project: Project = serde_saphyr::from_str(resolved).map_err(|e| e.to_string())?;
    Ok(project
        .services
        .into_iter()
        .map(|(name, service)| (name, service.image))
        .collect())
}

/// The text of a compose override file that runs each service on the given
/// image (service name -> local tag). It repeats the main file's `version`
/// key, if any, because compose v1 refuses to merge files of different
/// versions.
pub fn image_override(
    main_compose_file: &str,
    images: &BTreeMap<String, String>,
) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Main {
        version: Option<serde_json::Value>,
    }
    let main: Main = serde_saphyr::from_str(main_compose_file).map_err(|e| e.to_string())?;
    let mut text = String::new();
    text.push_str("# Written by stowage: runs each service on the image it loaded.\n");
    match main.version {
        Some(serde_json::Value::String(v)) => {
            text.push_str(&format!("version: {}\n", json_quote(&v)))
        }
        Some(serde_json::Value::Number(v)) => {
            text.push_str(&format!("version: {}\n", json_quote(&v.to_string())))
        }
        Some(_) => return Err("its version key is neither a string nor a number".into()),
        None => {}
    }
    text.push_str("services:\n");
    for (service, image) in images {
        text.push_str(&format!(
            "  {}:\n    image: {}\n",
            json_quote(service),
            json_quote(image)
        ));
    }
    Ok(text)
}

/// A YAML double-quoted scalar (JSON strings are valid YAML).
fn json_quote(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Reads a compose file from disk and writes its override beside it,
/// durably (write, fsync, rename, fsync of the directory).
pub fn write_image_override(
    main_compose_path: &Path,
    override_path: &Path,
    images: &BTreeMap<String, String>,
) -> Result<(), ComposeError> {
    let bad = |path: &Path, reason: String| ComposeError::BadComposeFile {
        path: path.to_path_buf(),
        reason,
    };
    let main = std::fs::read_to_string(main_compose_path)
        .map_err(|e| bad(main_compose_path, e.to_string()))?;
    let text = image_override(&main, images).map_err(|reason| bad(main_compose_path, reason))?;
    let dir = override_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut temp = override_path.as_os_str().to_owned();
        temp.push(".tmp");
        let temp = PathBuf::from(temp);
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, override_path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| bad(override_path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_config_gives_every_service_image() {
        let resolved = r#"
services:
  web:
    image: registry.local/web:stowage-sha256-aaaa
    ports:
    - 8080:80/tcp
  worker:
    build:
      context: .
version: '3.8'
"#;
        let images = parse_service_images(resolved).unwrap();
        assert_eq!(
            images.get("web").cloned().flatten().as_deref(),
            Some("registry.local/web:stowage-sha256-aaaa")
        );
        assert_eq!(images.get("worker"), Some(&None));
    }

    #[test]
    fn override_repeats_the_main_version_and_maps_each_service() {
        let images = BTreeMap::from([
            (
                "web".to_string(),
                "r.local/web:stowage-sha256-ab".to_string(),
            ),
            ("db".to_string(), "r.local/db:stowage-sha256-cd".to_string()),
        ]);
        let text = image_override("version: '3.8'\nservices: {}\n", &images).unwrap();
        assert!(text.contains("version: \"3.8\"\n"), "{text}");
        let parsed = parse_service_images(&text).unwrap();
        assert_eq!(
            parsed.get("db").cloned().flatten().as_deref(),
            Some("r.local/db:stowage-sha256-cd")
        );
        assert_eq!(parsed.len(), 2);

        let text = image_override("services:\n  web:\n    image: x\n", &images).unwrap();
        assert!(!text.contains("version"));
        assert!(image_override("version: [1]\n", &images).is_err());
    }
}
