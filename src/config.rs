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
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Credentials per registry host from `$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json`. Credential helpers are not consulted.
#[derive(Debug, Clone, Default)]
pub struct CredentialStore {
    by_host: BTreeMap<String, Credentials>,
}

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
        Ok(CredentialStore { by_host })
    }

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
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("ten").is_err());
    }
}
