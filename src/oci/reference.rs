//! Image and app references: `[REGISTRY/]REPO[:TAG][@sha256:DIGEST]`, with
//! Docker's normalisation (no registry means Docker Hub, a single-component
//! repository there lives under `library/`).

use std::fmt;
use std::str::FromStr;

use crate::Digest;

pub const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct InvalidReference {
    pub reference: String,
    pub reason: String,
}

impl ImageRef {
    /// The host name to talk to for this registry.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The tag or digest to ask the registry for (`latest` when neither).
    pub fn reference_part(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The same repository pinned at `digest` (the tag dropped).
    pub fn pinned(&self, digest: &Digest) -> ImageRef {
        ImageRef {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest.clone()),
        }
    }

    /// `REGISTRY/REPO` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The name as Docker shows it: Docker Hub's host, and its `library/`
    /// prefix for official images, left out (`nginx`, `team/app`,
    /// `registry.local:5000/app`). The engine reports tags in this form.
    pub fn familiar_name(&self) -> String {
        if self.registry != DOCKER_HUB {
            return self.name();
        }
        match self.repository.strip_prefix("library/") {
            Some(official) if !official.contains('/') => official.to_string(),
            _ => self.repository.clone(),
        }
    }

    /// The last path component of the repository: an app's default name.
    pub fn short_name(&self) -> &str {
        self.repository
            .rsplit('/')
            .next()
            .unwrap_or(&self.repository)
    }
}

impl FromStr for ImageRef {
    type Err = InvalidReference;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| InvalidReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() || s.len() > 512 {
            return Err(bad("it is empty or too long"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (
                rest,
                Some(d.parse::<Digest>().map_err(|e| bad(&e.to_string()))?),
            ),
            None => (s, None),
        };
        // A tag follows the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_string()),
            ),
            None => (rest, None),
        };
        if let Some(tag) = &tag
            && (tag.is_empty()
                || tag.len() > 128
                || tag.starts_with(['.', '-'])
                || !tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(bad("the tag has characters a tag may not have"));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let (host, port) = registry.split_once(':').unwrap_or((&registry, ""));
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
            || !port.chars().all(|c| c.is_ascii_digit())
        {
            return Err(bad("the registry is not a HOST[:PORT]"));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let valid_component = |c: &str| {
            !c.is_empty()
                && c.chars().all(|ch| {
                    ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '_' | '-')
                })
                && !c.starts_with(['.', '_', '-'])
                && !c.ends_with(['.', '_', '-'])
        };
        if repository.len() > 255 {
            return Err(bad("the repository name is longer than 255 characters"));
        }
        if !repository.split('/').all(valid_component) {
            return Err(bad(
                "the repository must be lowercase letters, digits and . _ - separated by /",
            ));
        }
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// An app's name on the device: the last component of its repository,
/// which is also its compose project and its directory's name.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct AppName(String);

impl AppName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for AppName {
    type Err = InvalidReference;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            });
        if !ok {
            return Err(InvalidReference {
                reference: s.to_string(),
                reason: "an app name is lowercase letters, digits and . _ - (128 at most)".into(),
            });
        }
        Ok(AppName(s.to_string()))
    }
}

impl TryFrom<String> for AppName {
    type Error = InvalidReference;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<AppName> for String {
    fn from(name: AppName) -> String {
        name.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// An app pinned by digest (`REGISTRY/REPO[:TAG]@sha256:...`): what a
/// device runs, and what its state files name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AppRef(ImageRef);

impl AppRef {
    pub fn image(&self) -> &ImageRef {
        &self.0
    }

    /// The app's default name: its repository's last component.
    pub fn name(&self) -> Result<AppName, InvalidReference> {
        self.0.short_name().parse()
    }
}

impl FromStr for AppRef {
    type Err = InvalidReference;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let image: ImageRef = s.parse()?;
        AppRef::try_from(image)
    }
}

impl TryFrom<ImageRef> for AppRef {
    type Error = InvalidReference;
    fn try_from(image: ImageRef) -> Result<Self, Self::Error> {
        if image.digest.is_none() {
            return Err(InvalidReference {
                reference: image.to_string(),
                reason: "an app to run must be pinned by digest (@sha256:...)".into(),
            });
        }
        Ok(AppRef(image))
    }
}

impl TryFrom<String> for AppRef {
    type Error = InvalidReference;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<AppRef> for String {
    fn from(app: AppRef) -> String {
        app.0.to_string()
    }
}

impl fmt::Display for AppRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_registry_repository_tag_and_digest() {
        let r: ImageRef = "127.0.0.1:5000/apps/shop:v3".parse().unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "apps/shop");
        assert_eq!(r.tag.as_deref(), Some("v3"));
        let pinned = format!("localhost/x@sha256:{}", "a".repeat(64));
        let r: ImageRef = pinned.parse().unwrap();
        assert_eq!(r.registry, "localhost");
        assert!(r.digest.is_some());
        assert_eq!(r.to_string(), pinned);
    }

    #[test]
    fn bare_names_mean_docker_hub_library() {
        let r: ImageRef = "busybox".parse().unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox");
        assert_eq!(r.api_host(), "registry-1.docker.io");
    }

    #[test]
    fn refuses_malformed_references() {
        for bad in [
            "",
            "Upper/Case",
            "reg.io/x@sha256:zz",
            "reg.io/x:",
            "reg.io/../x",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_familiar_name_is_the_one_the_engine_reports() {
        let name = |s: &str| s.parse::<ImageRef>().unwrap().familiar_name();
        assert_eq!(name("nginx:1"), "nginx");
        assert_eq!(name("docker.io/library/nginx:1"), "nginx");
        assert_eq!(name("team/app:1"), "team/app");
        assert_eq!(name("registry.local:5000/app:1"), "registry.local:5000/app");
        assert_eq!(name("localhost/library/app:1"), "localhost/library/app");
    }

    #[test]
    fn names_the_engine_would_refuse_are_refused() {
        for bad in [
            "Registry.local/App:1",
            "reg_istry.local/app:1",
            "registry.local:50x0/app:1",
            "registry.local/app-:1",
            "registry.local/app:-tag",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad:?} was accepted");
        }
    }
}
