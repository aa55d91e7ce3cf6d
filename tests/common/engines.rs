//! The engines and composes of the test matrix: Docker 20.10 (Debian 12's
//! `docker.io`, the machine's own `dockerd`) and 26.1 (Debian 13's, which
//! `scripts/setup.sh` fetches and unpacks under `target/engines/root`), and
//! compose v1 (Debian 12's `docker-compose` 1.29, on the PATH) and v2
//! (Debian 13's 2.26 CLI plugin, put where the docker CLI finds plugins:
//! `$DOCKER_CONFIG/cli-plugins/docker-compose`).
//!
//! Promises: nothing on the machine is replaced; the 26.1 engine runs only as
//! a [`super::PrivateDockerd`] of its own, and compose v2 is seen only by the
//! commands given a [`ComposeSetup`]'s Docker config. An engine that is not
//! unpacked is a failure that says to run `scripts/setup.sh`, never a skip.

use std::path::{Path, PathBuf};

/// A Docker engine of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Debian 12's dockerd 20.10 (API 1.41), the machine's own binary.
    Docker20,
    /// Debian 13's dockerd 26.1 (API 1.45), unpacked by `scripts/setup.sh`.
    Docker26,
}

impl Engine {
    pub const ALL: [Engine; 2] = [Engine::Docker20, Engine::Docker26];

    /// The `dockerd` to run.
    pub fn dockerd(self) -> PathBuf {
        match self {
            Engine::Docker20 => PathBuf::from("dockerd"),
            Engine::Docker26 => engines_root().join("usr/sbin/dockerd"),
        }
    }

    /// Directories put first on that dockerd's PATH (its own `docker-proxy`).
    pub fn path_dirs(self) -> Vec<PathBuf> {
        match self {
            Engine::Docker20 => Vec::new(),
            Engine::Docker26 => vec![engines_root().join("usr/sbin")],
        }
    }

    /// How its server version starts.
    pub fn version_prefix(self) -> &'static str {
        match self {
            Engine::Docker20 => "20.10.",
            Engine::Docker26 => "26.1.",
        }
    }

    /// The API version it speaks (stowage negotiates down to it).
    pub fn api_version(self) -> &'static str {
        match self {
            Engine::Docker20 => "1.41",
            Engine::Docker26 => "1.45",
        }
    }
}

/// A compose of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComposeVersion {
    /// `docker-compose` 1.29 (Python), Debian 12's, on the PATH.
    V1,
    /// `docker compose` 2.26 (the CLI plugin), Debian 13's.
    V2,
}

impl ComposeVersion {
    pub const ALL: [ComposeVersion; 2] = [ComposeVersion::V1, ComposeVersion::V2];

    /// The name compose gives the first container of `service` in `project`.
    pub fn container_name(self, project: &str, service: &str) -> String {
        match self {
            ComposeVersion::V1 => format!("{project}_{service}_1"),
            ComposeVersion::V2 => format!("{project}-{service}-1"),
        }
    }

    /// How `compose version --short` starts.
    pub fn version_prefix(self) -> &'static str {
        match self {
            ComposeVersion::V1 => "1.29.",
            ComposeVersion::V2 => "2.26.",
        }
    }
}

/// Where `scripts/setup.sh` unpacked Debian 13's packages:
/// `$STOWAGE_TEST_ENGINES/root`, else `target/engines/root` of this checkout.
pub fn engines_root() -> PathBuf {
    let base = std::env::var_os("STOWAGE_TEST_ENGINES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/engines"));
    let root = base.join("root");
    if !root.join(".stowage-engines").is_file() {
        panic!(
            "the test matrix's Docker 26.1 and compose v2 are not unpacked in {}: run `bash scripts/setup.sh` (as root; it fetches them once)",
            root.display()
        );
    }
    root
}

/// A Docker config directory for commands that run compose: with the v2
/// plugin under `cli-plugins/` or without it (so `docker compose` is
/// unknown and stowage falls back to v1's `docker-compose`). Removed when
/// dropped.
pub struct ComposeSetup {
    pub version: ComposeVersion,
    dir: tempfile::TempDir,
}

impl ComposeSetup {
    pub fn new(version: ComposeVersion) -> ComposeSetup {
        let dir = super::temp_dir("docker-config-");
        std::fs::write(dir.path().join("config.json"), "{}\n")
            .unwrap_or_else(|e| panic!("write the Docker config: {e}"));
        if version == ComposeVersion::V2 {
            let plugins = dir.path().join("cli-plugins");
            std::fs::create_dir(&plugins).unwrap_or_else(|e| panic!("create cli-plugins: {e}"));
            let plugin = engines_root().join("usr/libexec/docker/cli-plugins/docker-compose");
            std::os::unix::fs::symlink(&plugin, plugins.join("docker-compose"))
                .unwrap_or_else(|e| panic!("link {}: {e}", plugin.display()));
        }
        ComposeSetup { version, dir }
    }

    /// The directory, for `DOCKER_CONFIG`.
    pub fn docker_config(&self) -> &Path {
        self.dir.path()
    }
}
