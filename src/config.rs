//! Settings shared by every command: the config file
//! (`/etc/stowage/config.toml` or `--config`), whose keys mirror the global
//! flags, and registry credentials read from the Docker config.
//!
//! Precedence, highest first: command-line flag, environment variable, config
//! file, built-in default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/stowage/config.toml";
pub const DEFAULT_ROOT: &str = "/var/lib/stowage";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the config file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("the Docker config {path} is not valid JSON: {message}")]
    DockerConfig { path: PathBuf, message: String },
    #[error("the Docker credential helper {program} failed for {host}: {message}")]
    CredentialHelper {
        program: String,
        host: String,
        message: String,
    },
}

/// The config file's keys. Every key is optional and mirrors a flag.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub root: Option<PathBuf>,
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub arch: Option<String>,
    pub docker_host: Option<String>,
    pub watermark: Option<u8>,
    pub reserve: Option<String>,
    pub jobs: Option<usize>,
    pub cache_dir: Option<PathBuf>,
    /// Seconds a metadata request to a registry may take, whole.
    pub registry_timeout: Option<f64>,
    /// Bytes a second a blob download must keep up, e.g. "1K".
    pub min_transfer_rate: Option<String>,
    /// Seconds over which that rate is measured.
    pub transfer_window: Option<f64>,
    /// The TUF root installed at provisioning: targets must be signed.
    pub trusted_root: Option<PathBuf>,
    /// The device's hardware or group tag, matched against signed targets.
    pub hardware: Option<String>,
    /// Which compose runs apps: "auto", "plugin" (`docker compose`) or
    /// "standalone" (`docker-compose`).
    pub compose: Option<String>,
    /// What an update may free when it does not fit: "none", "prune" or
    /// "drop-rollback" (see `--make-room`).
    pub make_room: Option<MakeRoom>,
    /// How install hands images to the engine: "lean" or "whole" (see
    /// `--load-path`).
    pub load_path: Option<LoadPath>,
}

impl ConfigFile {
    /// Loads `path`; a missing default config file is not an error, a missing
    /// file named explicitly is.
    pub fn load(path: Option<&Path>) -> Result<ConfigFile, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ConfigFile::default());
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path,
            message: e.to_string(),
        })
    }
}

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <hidden>)", self.username)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Credentials per registry host from `$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json`, as the docker CLI finds them: the host's entry
/// in `credHelpers`, else `credsStore`, names a helper program
/// `docker-credential-NAME` (run as `docker-credential-NAME get` with the
/// host on its standard input, answering `{"Username", "Secret"}` as JSON);
/// without either, the `auths` entry. A helper's answer is kept for the
/// process's life, so it runs once per registry.
#[derive(Debug, Clone, Default)]
pub struct CredentialStore {
    by_host: BTreeMap<String, Credentials>,
    creds_store: Option<String>,
    cred_helpers: BTreeMap<String, String>,
    asked: std::sync::Arc<tokio::sync::Mutex<BTreeMap<String, Option<Credentials>>>>,
}

/// How long a credential helper may take (a cloud helper may make a
/// network request of its own).
const HELPER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl CredentialStore {
    pub fn from_docker_config() -> Result<CredentialStore, ConfigError> {
        let dir = match std::env::var_os("DOCKER_CONFIG") {
            Some(d) => PathBuf::from(d),
            None => match std::env::var_os("HOME") {
                Some(h) => PathBuf::from(h).join(".docker"),
                None => return Ok(CredentialStore::default()),
            },
        };
        let path = dir.join("config.json");
        match std::fs::read(&path) {
            Ok(bytes) => CredentialStore::parse(&bytes, &path),
            Err(_) => Ok(CredentialStore::default()),
        }
    }

    fn parse(bytes: &[u8], path: &Path) -> Result<CredentialStore, ConfigError> {
        let invalid = |message: String| ConfigError::DockerConfig {
            path: path.to_path_buf(),
            message,
        };
        let config: DockerConfigJson =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        let mut by_host = BTreeMap::new();
        for (key, auth) in config.auths {
            let creds = match (auth.auth, auth.username, auth.password) {
                (Some(encoded), _, _) if !encoded.is_empty() => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(encoded.trim())
                        .map_err(|e| invalid(format!("auth of {key}: {e}")))?;
                    let text = String::from_utf8(decoded)
                        .map_err(|_| invalid(format!("auth of {key} is not UTF-8")))?;
                    let (u, p) = text
                        .split_once(':')
                        .ok_or_else(|| invalid(format!("auth of {key} lacks a ':'")))?;
                    Credentials {
                        username: u.to_string(),
                        password: p.to_string(),
                    }
                }
                (_, Some(username), Some(password)) => Credentials { username, password },
                _ => continue,
            };
            by_host.insert(normalise_host(&key), creds);
        }
        Ok(CredentialStore {
            by_host,
            creds_store: config.creds_store.filter(|s| !s.is_empty()),
            cred_helpers: config
                .cred_helpers
                .into_iter()
                .map(|(k, v)| (normalise_host(&k), v))
                .collect(),
            asked: Default::default(),
        })
    }

    /// The helper the docker CLI would use for `host`, if any.
    pub fn helper_for(&self, host: &str) -> Option<&str> {
        self.cred_helpers
            .get(&normalise_host(host))
            .or(self.creds_store.as_ref())
            .map(String::as_str)
    }

    /// The credentials for `host`: from its helper when the Docker config
    /// names one (none when the helper has none), else from `auths`.
    pub async fn lookup(&self, host: &str) -> Result<Option<Credentials>, ConfigError> {
        let Some(helper) = self.helper_for(host) else {
            return Ok(self.get(host).cloned());
        };
        let mut asked = self.asked.lock().await;
        if let Some(answer) = asked.get(host) {
            return Ok(answer.clone());
        }
        let answer = run_helper(helper, host).await?;
        asked.insert(host.to_string(), answer.clone());
        Ok(answer)
    }

    /// The `auths` entry for `host`.
    pub fn get(&self, host: &str) -> Option<&Credentials> {
        self.by_host.get(&normalise_host(host)).or_else(|| {
            // Docker Hub credentials are stored under its legacy index URL.
            if host == "registry-1.docker.io" || host == "docker.io" {
                self.by_host.get("index.docker.io")
            } else {
                None
            }
        })
    }
}

/// Runs `docker-credential-HELPER get` for `host`, as the docker CLI does.
async fn run_helper(helper: &str, host: &str) -> Result<Option<Credentials>, ConfigError> {
    use tokio::io::AsyncWriteExt as _;
    let program = format!("docker-credential-{helper}");
    let failed = |message: String| ConfigError::CredentialHelper {
        program: program.clone(),
        host: host.to_string(),
        message,
    };
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            failed(format!(
                "cannot run it ({e}); install it in PATH or remove credsStore/credHelpers from the Docker config"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(host.as_bytes())
            .await
            .map_err(|e| failed(format!("cannot write to it: {e}")))?;
    }
    let output = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| failed(format!("no answer in {} s", HELPER_TIMEOUT.as_secs())))?
        .map_err(|e| failed(e.to_string()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // The helpers' protocol: this message means "none stored".
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let said = format!("{} {}", stdout.trim(), stderr.trim());
        return Err(failed(format!("{} ({})", output.status, said.trim())));
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let answer: Answer = serde_json::from_slice(&output.stdout)
        .map_err(|e| failed(format!("its answer is not the expected JSON: {e}")))?;
    if answer.username == "<token>" {
        return Err(failed(
            "it gave an identity token, which stowage does not support yet (a user name and password or access token are)".into(),
        ));
    }
    if answer.username.is_empty() && answer.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials {
        username: answer.username,
        password: answer.secret,
    }))
}

/// `https://host:port/v1/` and `host:port` name the same registry.
fn normalise_host(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    k.split('/').next().unwrap_or(k).to_string()
}

/// Parses a size such as `512M`, `2G`, `1.5GiB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 512M or 2G)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?} has an unknown unit (use K, M, G or T)")),
    };
    Ok((value * mult as f64).round() as u64)
}

/// How much an update may free to make room (`--make-room`,
/// `STOWAGE_MAKE_ROOM`, the agent's `make_room`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum MakeRoom {
    /// Free nothing: a refusal lists the plan and stops.
    #[default]
    None,
    /// Free stale partial downloads and what no app needs.
    Prune,
    /// Also the rollback copy, and the images of dropped apps if needed.
    DropRollback,
}

impl MakeRoom {
    pub const NAMES: [&'static str; 3] = ["none", "prune", "drop-rollback"];
}

impl std::fmt::Display for MakeRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MakeRoom::None => "none",
            MakeRoom::Prune => "prune",
            MakeRoom::DropRollback => "drop-rollback",
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown make-room policy {0:?}: it is one of none, prune, drop-rollback")]
pub struct UnknownMakeRoom(String);

impl std::str::FromStr for MakeRoom {
    type Err = UnknownMakeRoom;
    fn from_str(s: &str) -> Result<MakeRoom, UnknownMakeRoom> {
        match s {
            "none" => Ok(MakeRoom::None),
            "prune" => Ok(MakeRoom::Prune),
            "drop-rollback" => Ok(MakeRoom::DropRollback),
            other => Err(UnknownMakeRoom(other.to_string())),
        }
    }
}

/// How install hands images to the engine (`--load-path`,
/// `STOWAGE_LOAD_PATH`, the config file's `load_path`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadPath {
    /// One layer per load, two images at once held to the one-at-a-time
    /// peak: the least temporary disk.
    #[default]
    #[serde(alias = "layers")]
    Lean,
    /// Whole images, inflated, two at once, when their larger peak fits:
    /// faster, with up to twice the temporary disk.
    Whole,
}

impl std::fmt::Display for LoadPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoadPath::Lean => "lean",
            LoadPath::Whole => "whole",
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown load path {0:?}: it is lean or whole")]
pub struct UnknownLoadPath(String);

impl std::str::FromStr for LoadPath {
    type Err = UnknownLoadPath;
    fn from_str(s: &str) -> Result<LoadPath, UnknownLoadPath> {
        match s {
            // "layers": the name of the lean way before it was the default.
            "lean" | "layers" => Ok(LoadPath::Lean),
            "whole" => Ok(LoadPath::Whole),
            other => Err(UnknownLoadPath(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_config_auths() {
        let json = br#"{"auths":{"https://reg.example:5000/v1/":{"auth":"dXNlcjpwYXNz"},"other":{"username":"a","password":"b"}}}"#;
        let store = CredentialStore::parse(json, Path::new("x")).unwrap();
        assert_eq!(store.get("reg.example:5000").unwrap().password, "pass");
        assert_eq!(store.get("other").unwrap().username, "a");
        assert!(store.get("nowhere").is_none());
    }

    #[test]
    fn the_helper_docker_would_use_is_chosen() {
        let json = br#"{"auths":{"a.example":{"auth":"dXNlcjpwYXNz"}},"credsStore":"desktop","credHelpers":{"https://ecr.example/":"ecr-login"}}"#;
        let store = CredentialStore::parse(json, Path::new("x")).unwrap();
        assert_eq!(store.helper_for("ecr.example"), Some("ecr-login"));
        assert_eq!(store.helper_for("a.example"), Some("desktop"));
        let json = br#"{"auths":{"a.example":{"auth":"dXNlcjpwYXNz"}},"credHelpers":{"ecr.example":"ecr-login"}}"#;
        let store = CredentialStore::parse(json, Path::new("x")).unwrap();
        assert_eq!(store.helper_for("a.example"), None);
    }

    #[test]
    fn load_path_is_lean_or_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        for (text, want) in [
            ("load_path = \"whole\"\n", Some(LoadPath::Whole)),
            ("load_path = \"lean\"\n", Some(LoadPath::Lean)),
            // The lean way's name before it was the default.
            ("load_path = \"layers\"\n", Some(LoadPath::Lean)),
            ("", None),
        ] {
            std::fs::write(&path, text).unwrap();
            assert_eq!(
                ConfigFile::load(Some(&path)).unwrap().load_path,
                want,
                "{text}"
            );
        }
        std::fs::write(&path, "load_path = \"fast\"\n").unwrap();
        let e = ConfigFile::load(Some(&path)).unwrap_err().to_string();
        assert!(e.contains("load_path") || e.contains("fast"), "{e}");
        for name in ["lean", "whole"] {
            assert_eq!(name.parse::<LoadPath>().unwrap().to_string(), name);
        }
        assert_eq!("layers".parse::<LoadPath>().unwrap(), LoadPath::Lean);
        assert!("fast".parse::<LoadPath>().is_err());
    }

    #[test]
    fn make_room_is_a_policy_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "make_room = \"drop-rollback\"\n").unwrap();
        let config = ConfigFile::load(Some(&path)).unwrap();
        assert_eq!(config.make_room, Some(MakeRoom::DropRollback));
        std::fs::write(&path, "make_room = \"everything\"\n").unwrap();
        let e = ConfigFile::load(Some(&path)).unwrap_err().to_string();
        assert!(e.contains("make_room") || e.contains("everything"), "{e}");
        for name in MakeRoom::NAMES {
            assert_eq!(name.parse::<MakeRoom>().unwrap().to_string(), name);
        }
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("ten").is_err());
    }
}
