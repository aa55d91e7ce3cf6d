//! The compose file of an app directory: finding it, reading its services
//! and images with compose's variable interpolation, and writing the pinned
//! copy that goes into the bundle.
//!
//! Only `image` values are interpolated (from the environment, then `.env`,
//! as compose does); the rest of the file is carried as it is, minus `build`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Compose file names in the order compose looks for them.
pub const COMPOSE_FILE_NAMES: &[&str] = &[
    "docker-compose.yml",
    "docker-compose.yaml",
    "compose.yml",
    "compose.yaml",
];

/// A compose file larger than this is refused (FORMAT.md's bundle limit).
pub const COMPOSE_FILE_CAP: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ComposeFileError {
    #[error("no compose file in {0} (looked for docker-compose.yml, compose.yml, compose.yaml)")]
    NotFound(PathBuf),
    #[error("cannot read the compose file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the compose file {path} is over the 1 MiB limit")]
    TooLarge { path: PathBuf },
    #[error("the compose file {path} is not valid YAML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("the compose file {path} defines no services")]
    NoServices { path: PathBuf },
    #[error("service {service} in {path} has no image: build-only services cannot be published")]
    NoImage { path: PathBuf, service: String },
    #[error(
        "service {service} in {path}: the image uses variable {variable}, which is not set in the environment or .env"
    )]
    Unresolved {
        path: PathBuf,
        service: String,
        variable: String,
    },
    #[error("service {service} in {path}: {message}")]
    BadInterpolation {
        path: PathBuf,
        service: String,
        message: String,
    },
    #[error("cannot write YAML for {path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// How compose files are decoded: as Go's yaml.v3 decodes them (compose and
/// composectl are Go), so that `yes`, `on` and the like stay strings (only
/// `true`/`false` in their three spellings are booleans) and `0755` is the
/// octal number it is there. A publish that rewrote `FLAG: yes` as
/// `FLAG: true` would change what the service runs with.
pub fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.legacy_octal_numbers = true;
    options
}

/// A parsed compose file.
#[derive(Debug, Clone)]
pub struct ComposeFile {
    pub path: PathBuf,
    document: Value,
}

impl ComposeFile {
    /// The compose file of `dir`, or `explicit` when given.
    pub fn locate(dir: &Path, explicit: Option<&Path>) -> Result<PathBuf, ComposeFileError> {
        if let Some(p) = explicit {
            return Ok(if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            });
        }
        COMPOSE_FILE_NAMES
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| ComposeFileError::NotFound(dir.to_path_buf()))
    }

    pub fn load(path: &Path) -> Result<ComposeFile, ComposeFileError> {
        let read_error = |source| ComposeFileError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_error)?;
        if meta.len() > COMPOSE_FILE_CAP {
            return Err(ComposeFileError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        ComposeFile::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<ComposeFile, ComposeFileError> {
        let document: Value =
            serde_saphyr::from_str_with_options(text, yaml_options()).map_err(|e| {
                ComposeFileError::Syntax {
                    path: path.to_path_buf(),
                    message: e.to_string().lines().next().unwrap_or("").to_string(),
                }
            })?;
        let file = ComposeFile {
            path: path.to_path_buf(),
            document,
        };
        if file.services().is_empty() {
            return Err(ComposeFileError::NoServices {
                path: path.to_path_buf(),
            });
        }
        Ok(file)
    }

    fn services(&self) -> serde_json::Map<String, Value> {
        self.document
            .get("services")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    }

    /// The image a service without one gets through `extends` (a service
    /// of this file, or of another file beside it), as compose resolves it;
    /// chains are followed a few steps deep.
    fn extended_image(&self, def: &Value, depth: usize) -> Option<String> {
        if depth > 8 {
            return None;
        }
        let (file, service) = match def.get("extends")? {
            Value::String(service) => (None, service.clone()),
            Value::Object(m) => (
                m.get("file").and_then(Value::as_str).map(str::to_string),
                m.get("service")?.as_str()?.to_string(),
            ),
            _ => return None,
        };
        let other;
        let source = match file {
            None => self,
            Some(file) => {
                let dir = self.path.parent().unwrap_or(Path::new("."));
                other = ComposeFile::load(&dir.join(file)).ok()?;
                &other
            }
        };
        let base = source.services().get(&service)?.clone();
        match base.get("image").and_then(Value::as_str) {
            Some(image) => Some(image.to_string()),
            None => source.extended_image(&base, depth + 1),
        }
    }

    /// Services `compose up` leaves alone unless their profile is enabled:
    /// those with a non-empty `profiles` list. stowage enables none, so an
    /// app runs when every other service does.
    pub fn profiled_services(&self) -> std::collections::BTreeSet<String> {
        self.services()
            .into_iter()
            .filter(|(_, def)| {
                def.get("profiles")
                    .and_then(Value::as_array)
                    .is_some_and(|p| !p.is_empty())
            })
            .map(|(name, _)| name)
            .collect()
    }

    /// Service name -> image, interpolated with `lookup`.
    pub fn images(
        &self,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<BTreeMap<String, String>, ComposeFileError> {
        let mut images = BTreeMap::new();
        for (service, def) in self.services() {
            let extended = match def.get("image") {
                Some(_) => None,
                None => self.extended_image(&def, 0),
            };
            let raw = def
                .get("image")
                .and_then(Value::as_str)
                .or(extended.as_deref())
                .ok_or_else(|| ComposeFileError::NoImage {
                    path: self.path.clone(),
                    service: service.clone(),
                })?;
            let image = interpolate(raw, lookup).map_err(|e| match e {
                Interpolation::Unresolved(variable) => ComposeFileError::Unresolved {
                    path: self.path.clone(),
                    service: service.clone(),
                    variable,
                },
                Interpolation::Invalid(message) => ComposeFileError::BadInterpolation {
                    path: self.path.clone(),
                    service: service.clone(),
                    message,
                },
            })?;
            images.insert(service, image);
        }
        Ok(images)
    }

    /// The file with every service's image replaced by its pinned reference,
    /// `build` sections removed and every service labelled with its
    /// `io.compose-spec.config-hash`, as YAML.
    ///
    /// The hash is composectl's: the sha256, in hex, of what Go's yaml.v3
    /// writes for the service's map once pinned and without `build`, before
    /// the label is added ([`super::goyaml`]). The labels become a map (a
    /// list of `KEY=VALUE` is converted, as compose's loader does).
    pub fn pinned(&self, pins: &BTreeMap<String, String>) -> Result<Vec<u8>, ComposeFileError> {
        let mut document = self.document.clone();
        if let Some(services) = document.get_mut("services").and_then(Value::as_object_mut) {
            for (name, def) in services.iter_mut() {
                if let Some(def) = def.as_object_mut() {
                    def.remove("build");
                    if let Some(pin) = pins.get(name) {
                        def.insert("image".into(), Value::String(pin.clone()));
                    }
                    let hash = service_config_hash(def);
                    let mut labels = labels_map(def.get("labels"));
                    labels.insert(CONFIG_HASH_LABEL.into(), Value::String(hash));
                    def.insert("labels".into(), Value::Object(labels));
                }
            }
        }
        // Written as composectl writes it (yaml.v3's `Marshal` of the whole
        // file): the same bytes for the same project and pins, and every
        // string a YAML 1.1 reader (docker-compose 1.x) could take for
        // something else (`yes`, `80:80`, `2024-01-01`) quoted.
        Ok(super::goyaml::marshal(&document).into_bytes())
    }
}

/// The label composectl's `ps` and aktualizr-lite match containers by.
pub const CONFIG_HASH_LABEL: &str = "io.compose-spec.config-hash";

/// composectl's service hash: sha256 (hex) of yaml.v3's `Marshal` of the
/// service's map.
pub fn service_config_hash(service: &serde_json::Map<String, Value>) -> String {
    let yaml = super::goyaml::marshal(&Value::Object(service.clone()));
    crate::Digest::of(yaml.as_bytes()).hex().to_string()
}

/// A service's `labels`, map or `KEY=VALUE` list, as a map of strings.
fn labels_map(labels: Option<&Value>) -> serde_json::Map<String, Value> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    match labels {
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(text(v))))
            .collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                let item = text(item);
                match item.split_once('=') {
                    Some((k, v)) => (k.to_string(), Value::String(v.to_string())),
                    None => (item, Value::String(String::new())),
                }
            })
            .collect(),
        _ => serde_json::Map::new(),
    }
}

/// Variables from a `.env` file: `KEY=VALUE` lines, `#` comments, optional
/// `export ` prefix and matching quotes around the value.
pub fn read_dotenv(dir: &Path) -> BTreeMap<String, String> {
    let Ok(text) = std::fs::read_to_string(dir.join(".env")) else {
        return BTreeMap::new();
    };
    let mut vars = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            let v = if v.len() >= 2
                && ((v.starts_with('"') && v.ends_with('"'))
                    || (v.starts_with('\'') && v.ends_with('\'')))
            {
                &v[1..v.len() - 1]
            } else {
                v
            };
            vars.insert(k.trim().to_string(), v.to_string());
        }
    }
    vars
}

#[derive(Debug, PartialEq, Eq)]
pub enum Interpolation {
    Unresolved(String),
    Invalid(String),
}

/// Compose's interpolation: `$VAR`, `${VAR}`, `${VAR:-default}`,
/// `${VAR-default}`, `${VAR:?message}`, `${VAR?message}` and `$$`. Unlike
/// compose, an unset variable without a default is an error: a silently
/// empty image name would publish the wrong thing.
pub fn interpolate(
    s: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Interpolation> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| Interpolation::Invalid(format!("unclosed ${{ in {s:?}")))?;
            let expr = &r[..end];
            rest = &r[end + 1..];
            out.push_str(&expand(expr, lookup)?);
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if end == 0 {
                return Err(Interpolation::Invalid(format!(
                    "a lone $ in {s:?} (write $$)"
                )));
            }
            let name = &rest[..end];
            rest = &rest[end..];
            out.push_str(&lookup(name).ok_or_else(|| Interpolation::Unresolved(name.to_string()))?);
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn expand(expr: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, Interpolation> {
    let name_end = expr
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(expr.len());
    let (name, op) = expr.split_at(name_end);
    if name.is_empty() {
        return Err(Interpolation::Invalid(format!(
            "${{{expr}}} names no variable"
        )));
    }
    let value = lookup(name);
    let (colon, op) = match op.strip_prefix(':') {
        Some(o) => (true, o),
        None => (false, op),
    };
    let missing = match &value {
        None => true,
        Some(v) => colon && v.is_empty(),
    };
    match op.chars().next() {
        None if !colon => value.ok_or_else(|| Interpolation::Unresolved(name.to_string())),
        Some('-') => Ok(if missing {
            op[1..].to_string()
        } else {
            value.unwrap_or_default()
        }),
        Some('?') if missing => Err(Interpolation::Unresolved(format!("{name} ({})", &op[1..]))),
        Some('?') => Ok(value.unwrap_or_default()),
        _ => Err(Interpolation::Invalid(format!(
            "unsupported expression ${{{expr}}}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TAG" => Some("v2".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn interpolates_like_compose() {
        assert_eq!(interpolate("reg/app:${TAG}", &env).unwrap(), "reg/app:v2");
        assert_eq!(interpolate("reg/app:$TAG", &env).unwrap(), "reg/app:v2");
        assert_eq!(
            interpolate("reg/app:${NOPE:-v1}", &env).unwrap(),
            "reg/app:v1"
        );
        assert_eq!(
            interpolate("reg/app:${EMPTY:-v1}", &env).unwrap(),
            "reg/app:v1"
        );
        assert_eq!(
            interpolate("reg/app:${EMPTY-v1}x", &env).unwrap(),
            "reg/app:x"
        );
        assert_eq!(interpolate("a$$b", &env).unwrap(), "a$b");
    }

    #[test]
    fn an_unset_variable_is_named() {
        assert_eq!(
            interpolate("reg/app:${VERSION}", &env),
            Err(Interpolation::Unresolved("VERSION".into()))
        );
    }

    #[test]
    fn pins_images_and_drops_build() {
        let file = ComposeFile::parse(
            Path::new("c.yml"),
            "services:\n  web:\n    image: reg/web:${TAG}\n    build: .\n    ports: ['80:80']\n",
        )
        .unwrap();
        assert_eq!(file.images(&env).unwrap()["web"], "reg/web:v2");
        let pinned = file
            .pinned(&BTreeMap::from([(
                "web".to_string(),
                "reg/web@sha256:abc".to_string(),
            )]))
            .unwrap();
        let text = String::from_utf8(pinned).unwrap();
        assert!(text.contains("reg/web@sha256:abc"), "{text}");
        assert!(!text.contains("build"), "{text}");
        assert!(text.contains("80:80"), "{text}");
    }

    #[test]
    fn refuses_syntax_errors_and_empty_services() {
        assert!(matches!(
            ComposeFile::parse(Path::new("c.yml"), "services: [unclosed"),
            Err(ComposeFileError::Syntax { .. })
        ));
        assert!(matches!(
            ComposeFile::parse(Path::new("c.yml"), "services: {}\n"),
            Err(ComposeFileError::NoServices { .. })
        ));
    }
}
