//! Docker Compose, driven through its command line.
//!
//! This module owns starting and stopping an app's project with compose,
//! whichever compose the device has: the `docker compose` plugin (v2) or the
//! standalone `docker-compose` (v1; trixie's package of that name is v2), found
//! once per command in that order, or the one the user chose
//! ([`ComposeChoice`]). What a version can do is told by the version it
//! reports, not by how it is called. Both name containers their own way
//! (`app_svc_1` for v1, `app-svc-1` for v2), so nothing here goes by container
//! names: a project's containers are found by their labels. It promises that compose
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
    #[error(
        "`{command}` was chosen (--compose, STOWAGE_COMPOSE or the config's `compose`) but it does not work here: {reason}"
    )]
    ChosenNotInstalled { command: String, reason: String },
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

/// Which compose to run: the first that answers of `docker compose` and
/// `docker-compose` (auto), or only the one named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComposeChoice {
    #[default]
    Auto,
    /// `docker compose` (also spelled `v2`).
    Plugin,
    /// `docker-compose` (also spelled `v1`).
    Standalone,
}

impl std::str::FromStr for ComposeChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<ComposeChoice, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(ComposeChoice::Auto),
            "plugin" | "v2" | "docker compose" => Ok(ComposeChoice::Plugin),
            "standalone" | "v1" | "docker-compose" => Ok(ComposeChoice::Standalone),
            other => Err(format!(
                "{other:?} is not a compose choice: give auto, plugin (v2, `docker compose`) or standalone (v1, `docker-compose`)"
            )),
        }
    }
}

impl std::fmt::Display for ComposeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ComposeChoice::Auto => "auto",
            ComposeChoice::Plugin => "plugin",
            ComposeChoice::Standalone => "standalone",
        })
    }
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
        Compose::detect_choice(ComposeChoice::Auto).await
    }

    /// Finds the compose `choice` names: with [`ComposeChoice::Auto`],
    /// `docker compose` when the docker CLI has the plugin, else
    /// `docker-compose`; otherwise exactly the one chosen, or an error that
    /// says why it does not answer.
    pub async fn detect_choice(choice: ComposeChoice) -> Result<Compose, ComposeError> {
        let flavours: &[ComposeFlavour] = match choice {
            ComposeChoice::Auto => &[ComposeFlavour::V2Plugin, ComposeFlavour::V1Standalone],
            ComposeChoice::Plugin => &[ComposeFlavour::V2Plugin],
            ComposeChoice::Standalone => &[ComposeFlavour::V1Standalone],
        };
        let mut why = String::new();
        for &flavour in flavours {
            let unprobed = Compose {
                flavour,
                version: String::new(),
                docker_host: None,
            };
            let mut probe = unprobed.command();
            probe.args(["version", "--short"]);
            match probe.output().await {
                Ok(output) if output.status.success() => {
                    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
                    return Ok(Compose {
                        flavour,
                        version,
                        docker_host: None,
                    });
                }
                Ok(output) => {
                    why = format!(
                        "`{}` exited with {}: {}",
                        unprobed.describe(&["version", "--short"]),
                        output.status,
                        String::from_utf8_lossy(&output.stderr).trim()
                    )
                }
                Err(e) => why = format!("cannot run it: {e}"),
            }
        }
        match choice {
            ComposeChoice::Auto => Err(ComposeError::NotInstalled),
            ComposeChoice::Plugin | ComposeChoice::Standalone => {
                Err(ComposeError::ChosenNotInstalled {
                    command: Compose {
                        flavour: flavours[0],
                        version: String::new(),
                        docker_host: None,
                    }
                    .describe(&[])
                    .trim()
                    .to_string(),
                    reason: why,
                })
            }
        }
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

    /// What `compose version --short` printed, e.g. "1.29.2" or "2.26.1-4"
    /// (some v2 builds print a leading "v").
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The major version it reports: 1 for the Python tool; 2 or more for
    /// the Go rewrite, whether a plugin or a standalone `docker-compose`
    /// (Debian 13's package of that name). An unreadable version counts as
    /// what its flavour usually is.
    pub fn major_version(&self) -> u32 {
        major_of(&self.version).unwrap_or(match self.flavour {
            ComposeFlavour::V2Plugin => 2,
            ComposeFlavour::V1Standalone => 1,
        })
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
        // v1 has no --pull; the check above is what keeps it from pulling.
        if self.major_version() >= 2 {
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

/// "1.29.2" -> 1, "v2.26.1" -> 2, "2.26.1-4" -> 2.
fn major_of(version: &str) -> Option<u32> {
    let version = version.trim();
    let version = version.strip_prefix('v').unwrap_or(version);
    version.split('.').next()?.parse().ok()
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
/// versions. Every value taken from the compose file is written as a YAML
/// double-quoted scalar with everything but printable ASCII escaped
/// ([`yaml_quote`]), so no value can end its scalar or start a line.
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
            text.push_str(&format!("version: {}\n", yaml_quote(&v)))
        }
        Some(serde_json::Value::Number(v)) => {
            text.push_str(&format!("version: {}\n", yaml_quote(&v.to_string())))
        }
        Some(_) => return Err("its version key is neither a string nor a number".into()),
        None => {}
    }
    text.push_str("services:\n");
    for (service, image) in images {
        text.push_str(&format!(
            "  {}:\n    image: {}\n",
            yaml_quote(service),
            yaml_quote(image)
        ));
    }
    Ok(text)
}

/// A YAML double-quoted scalar that YAML 1.1 (compose v1's PyYAML) and 1.2
/// read back as exactly `s`: printable ASCII as is, except `"` and `\`,
/// and every other character escaped (`\uXXXX`, `\UXXXXXXXX`), so the
/// scalar holds no line break, control or bidirectional character.
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// The largest compose file read to write its override (FORMAT.md's limit).
const COMPOSE_FILE_CAP: u64 = 1 << 20;

/// Reads a compose file and writes its override beside it (both in one
/// directory, the app's). Neither is followed if a link: the override is
/// created exclusively under a fresh name, never through a link, then
/// renamed into place, durably (write, fsync, rename, fsync of the
/// directory; see [`crate::fsutil::beneath`]).
pub fn write_image_override(
    main_compose_path: &Path,
    override_path: &Path,
    images: &BTreeMap<String, String>,
) -> Result<(), ComposeError> {
    use std::io::Read as _;
    let bad = |path: &Path, reason: String| ComposeError::BadComposeFile {
        path: path.to_path_buf(),
        reason,
    };
    let app_dir = override_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = |path: &Path| {
        path.file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| bad(path, "not a file name".into()))
    };
    let (compose_name, override_name) = (name(main_compose_path)?, name(override_path)?);
    let compose_dir = main_compose_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if compose_dir != app_dir {
        return Err(bad(
            override_path,
            format!(
                "the override must be beside {}",
                main_compose_path.display()
            ),
        ));
    }
    let dir =
        crate::fsutil::beneath::Dir::open(app_dir).map_err(|e| bad(app_dir, e.to_string()))?;
    let mut main = String::new();
    dir.open_file(&compose_name)
        .and_then(|f| f.take(COMPOSE_FILE_CAP + 1).read_to_string(&mut main))
        .map_err(|e| bad(main_compose_path, e.to_string()))?;
    if main.len() as u64 > COMPOSE_FILE_CAP {
        return Err(bad(
            main_compose_path,
            format!("it is over the limit of {COMPOSE_FILE_CAP} bytes"),
        ));
    }
    let text = image_override(&main, images).map_err(|reason| bad(main_compose_path, reason))?;
    dir.write_atomic(
        &override_name,
        text.as_bytes(),
        crate::fsutil::STATE_FILE_MODE,
    )
    .map_err(|e| bad(override_path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compose_choice_reads_its_names_and_the_version_its_major() {
        for (text, choice) in [
            ("auto", ComposeChoice::Auto),
            ("plugin", ComposeChoice::Plugin),
            ("V2", ComposeChoice::Plugin),
            ("docker compose", ComposeChoice::Plugin),
            ("standalone", ComposeChoice::Standalone),
            ("v1", ComposeChoice::Standalone),
            ("docker-compose", ComposeChoice::Standalone),
        ] {
            assert_eq!(text.parse::<ComposeChoice>(), Ok(choice), "{text}");
        }
        let err = "v3".parse::<ComposeChoice>().unwrap_err();
        assert!(err.contains("auto, plugin"), "{err}");
        assert_eq!(major_of("1.29.2"), Some(1));
        assert_eq!(major_of("2.26.1-4"), Some(2));
        assert_eq!(major_of("v2.27.0"), Some(2));
        assert_eq!(major_of("unknown"), None);
        let standalone_v2 = Compose {
            flavour: ComposeFlavour::V1Standalone,
            version: "2.26.1-4".into(),
            docker_host: None,
        };
        assert_eq!(standalone_v2.major_version(), 2);
    }

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

    #[test]
    fn values_from_the_compose_file_cannot_leave_their_scalar() {
        let hostile = [
            "$(id > /tmp/owned)",
            "3\"\nservices: {evil: {image: x}}\n#",
            "a\\\"b",
            "line\u{2028}sep\u{85}nel\u{7f}del\u{0}nul\u{feff}bom",
            "\u{1F600} and \t tab",
            "'single' # comment",
        ];
        let images = BTreeMap::from([("web".to_string(), "r.local/web:stowage-sha256-ab".into())]);
        for version in hostile {
            let main = format!("version: {}\nservices: {{}}\n", yaml_quote(version));
            let text = image_override(&main, &images).unwrap();
            assert!(
                text.bytes()
                    .all(|b| b == b'\n' || (b' '..=b'~').contains(&b)),
                "only printable ASCII and newlines: {text:?}"
            );
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Override {
                version: String,
                services: BTreeMap<String, BTreeMap<String, String>>,
            }
            let parsed: Override = serde_saphyr::from_str(&text).unwrap();
            assert_eq!(parsed.version, version, "{text}");
            assert_eq!(parsed.services.len(), 1, "{text}");
            assert_eq!(parsed.services["web"]["image"], images["web"]);
        }
        let service = "we\"b\n  x:";
        let text = image_override(
            "services: {}\n",
            &BTreeMap::from([(service.to_string(), "img".to_string())]),
        )
        .unwrap();
        let parsed = parse_service_images(&text).unwrap();
        assert_eq!(parsed.keys().collect::<Vec<_>>(), [service]);
    }

    #[test]
    fn the_override_is_never_written_through_a_link() {
        use std::os::unix::fs::symlink;
        let scratch = tempfile::tempdir().unwrap();
        let outside = scratch.path().join("profile");
        std::fs::write(&outside, b"# a shell profile\n").unwrap();
        let app = scratch.path().join("app");
        std::fs::create_dir(&app).unwrap();
        let compose = b"version: '3'\nservices:\n  web:\n    image: x\n";
        std::fs::write(app.join("docker-compose.yml"), compose).unwrap();
        let images = BTreeMap::from([("web".to_string(), "r.local/web:stowage-sha256-ab".into())]);

        // Links under the override's name, the temporary name the old
        // writer used, and every name a writer could pick.
        symlink(&outside, app.join(".stowage-images.yml")).unwrap();
        symlink("docker-compose.yml", app.join(".stowage-images.yml.tmp")).unwrap();
        write_image_override(
            &app.join("docker-compose.yml"),
            &app.join(".stowage-images.yml"),
            &images,
        )
        .unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"# a shell profile\n");
        assert_eq!(
            std::fs::read(app.join("docker-compose.yml")).unwrap(),
            compose
        );
        let written = std::fs::symlink_metadata(app.join(".stowage-images.yml")).unwrap();
        assert!(written.is_file(), "the link was replaced by a file");
        let text = std::fs::read_to_string(app.join(".stowage-images.yml")).unwrap();
        assert!(text.contains("stowage-sha256-ab"), "{text}");

        // A compose file that is a link is not read.
        let other = scratch.path().join("other.yml");
        std::fs::write(&other, compose).unwrap();
        std::fs::remove_file(app.join("docker-compose.yml")).unwrap();
        symlink(&other, app.join("docker-compose.yml")).unwrap();
        let err = write_image_override(
            &app.join("docker-compose.yml"),
            &app.join(".stowage-images.yml"),
            &images,
        )
        .unwrap_err();
        assert!(err.to_string().contains("docker-compose.yml"), "{err}");

        // Nor an app directory that is a link.
        let linked = scratch.path().join("linked");
        symlink(&app, &linked).unwrap();
        assert!(
            write_image_override(
                &linked.join("docker-compose.yml"),
                &linked.join(".stowage-images.yml"),
                &images
            )
            .is_err()
        );
    }
}
