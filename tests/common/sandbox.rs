//! What keeps every `stowage` a test starts off the machine's own settings
//! and state: one directory per test process (under the temp dir) holding an
//! empty home, an empty Docker config, an empty config file, and the fresh
//! cache and root directories handed to each command.
//!
//! Promises: a command from [`super::stowage`] never reads
//! `/etc/stowage/config.toml` (it is given `--config`), `~/.docker`,
//! `~/.cache/stowage` or `STOWAGE_*` settings of the environment, and never
//! writes under `/var/lib/stowage` (a test that forgets `--root` gets a fresh
//! root of its own). The directory of a process that is gone is removed by
//! the next process that starts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

const PREFIX: &str = "stowage-test-sandbox-";

pub struct Sandbox {
    dir: PathBuf,
}

/// The sandbox of this test process, made on first use.
pub fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let tmp = std::env::temp_dir();
        remove_sandboxes_of_dead_processes(&tmp);
        let dir = tmp.join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["home", "docker-config"] {
            std::fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.join(sub).display()));
        }
        std::fs::write(dir.join("config.toml"), "")
            .unwrap_or_else(|e| panic!("write the sandbox's config file: {e}"));
        Sandbox { dir }
    })
}

impl Sandbox {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// An empty config file (every key at its default).
    pub fn empty_config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// A path no command of this process has been given before (not created).
    pub fn fresh(&self, what: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        self.dir
            .join(format!("{what}-{}", N.fetch_add(1, Ordering::Relaxed)))
    }

    /// Points `cmd`'s home, caches, Docker config and stowage settings at
    /// this sandbox, removing the environment's `STOWAGE_*` settings (the
    /// command's `--config` wins over `STOWAGE_CONFIG` anyway).
    pub fn isolate(&self, cmd: &mut Command) {
        for var in [
            "STOWAGE_CONFIG",
            "STOWAGE_ROOT",
            "STOWAGE_INSECURE_REGISTRIES",
            "STOWAGE_WATERMARK",
            "STOWAGE_LOG",
            "STOWAGE_REGISTRY_TIMEOUT",
            "STOWAGE_MIN_TRANSFER_RATE",
            "STOWAGE_TRANSFER_WINDOW",
            "STOWAGE_TRUSTED_ROOT",
            "STOWAGE_HARDWARE",
            "STOWAGE_COMPOSE",
            "XDG_CONFIG_HOME",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("HOME", self.dir.join("home"))
            .env("XDG_CACHE_HOME", self.fresh("cache"))
            .env("DOCKER_CONFIG", self.dir.join("docker-config"))
            .env("STOWAGE_ROOT", self.fresh("root"));
    }
}

fn remove_sandboxes_of_dead_processes(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
