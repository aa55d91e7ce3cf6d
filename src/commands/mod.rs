//! One module per verb, each an options struct with a `run` that takes the
//! [`Context`] and returns a typed report; the CLI parses flags into the
//! options, calls `run` and renders the report. Commands never import each
//! other: what they share is the context below, built once from the global
//! flags, the environment and the config file.

pub mod agent;
pub mod check;
pub mod df;
pub mod export;
pub mod fsck;
pub mod inspect;
pub mod install;
pub mod ls;
pub mod prune;
pub mod ps;
pub mod publish;
pub mod pull;
pub mod reconcile;
pub mod rm;
pub mod run;
pub mod status;
pub mod stop;
pub mod target;
pub mod tuf;
pub mod update;

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::config::{self, ConfigFile, CredentialStore};
use crate::engine::compose::{Compose, ComposeChoice};
use crate::engine::docker::{DockerEngine, LoadOptions, probe_view};
use crate::engine::install::{Device, InstallOptions};
use crate::oci::format::Arch;
use crate::oci::reference::ImageRef;
use crate::oci::registry::{Deadlines, RegistryClient, RegistryOptions};
use crate::plan::DockerView;
use crate::plan::space::Policy;
use crate::progress::Progress;
use crate::store::Store;
use crate::update::device::LiveDevice;
use crate::update::transaction::UpdateEvent;
use crate::update::tuf::client::{Trust, state_dir as tuf_state_dir};

/// The file under the root that remembers the layers of Docker's images.
const DOCKER_LAYER_CACHE: &str = "docker-layers.json";

/// Downloads at once, by default: each holds a connection and a file open,
/// and a device's registry link gains nothing from more.
pub const DEFAULT_JOBS: usize = 4;
/// Downloads at once that `--jobs` and the config file's `jobs` accept.
pub const JOBS: RangeInclusive<usize> = 1..=64;

/// The global settings, as the CLI read them (flags and environment).
#[derive(Debug, Clone, Default)]
pub struct GlobalOptions {
    pub root: Option<PathBuf>,
    pub insecure_registries: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub config: Option<PathBuf>,
    /// Seconds a metadata request to a registry may take, whole.
    pub registry_timeout: Option<f64>,
    /// Bytes a second a blob download must keep up ("1K").
    pub min_transfer_rate: Option<String>,
    /// Seconds over which that rate is measured.
    pub transfer_window: Option<f64>,
    /// The TUF root installed at provisioning.
    pub trusted_root: Option<PathBuf>,
    /// The device's hardware or group tag.
    pub hardware: Option<String>,
    /// Which compose runs apps (`--compose`, `STOWAGE_COMPOSE`).
    pub compose: Option<ComposeChoice>,
}

/// The device-side settings of a command that plans or touches Docker.
#[derive(Debug, Clone, Default)]
pub struct FitOptions {
    pub watermark: Option<u8>,
    pub reserve: Option<String>,
    pub arch: Option<String>,
    pub docker_host: Option<String>,
    pub load_path: Option<crate::config::LoadPath>,
}

/// The fit check's settings, resolved.
#[derive(Debug, Clone)]
pub struct Fit {
    pub arch: String,
    pub policy: Policy,
}

/// Settings every command shares, from flags, environment and config file.
pub struct Context {
    pub root: PathBuf,
    pub config: ConfigFile,
    pub registry: RegistryOptions,
    /// The TUF root installed at provisioning, when targets must be signed.
    pub trusted_root: Option<PathBuf>,
    /// The device's hardware or group tag.
    pub hardware: Option<String>,
    /// Which compose runs apps: the flag, else the config file's, else auto.
    pub compose: ComposeChoice,
}

impl Context {
    pub fn resolve(options: &GlobalOptions) -> Result<Context> {
        let config = ConfigFile::load(options.config.as_deref())?;
        let root = options
            .root
            .clone()
            .or_else(|| config.root.clone())
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_ROOT));
        let mut insecure = options.insecure_registries.clone();
        insecure.extend(config.insecure_registries.iter().cloned());
        let ca_files = options
            .ca_file
            .clone()
            .or_else(|| config.ca_file.clone())
            .into_iter()
            .collect();
        let registry = RegistryOptions {
            insecure,
            ca_files,
            credentials: CredentialStore::from_docker_config()?,
            deadlines: deadlines(options, &config)?,
        };
        let trusted_root = options
            .trusted_root
            .clone()
            .or_else(|| config.trusted_root.clone());
        let hardware = options.hardware.clone().or_else(|| config.hardware.clone());
        let compose = match options.compose {
            Some(choice) => choice,
            None => match &config.compose {
                Some(text) => text
                    .parse()
                    .map_err(anyhow::Error::msg)
                    .context("the config file's `compose`")?,
                None => ComposeChoice::Auto,
            },
        };
        Ok(Context {
            root,
            config,
            registry,
            trusted_root,
            hardware,
            compose,
        })
    }

    pub fn store(&self) -> Result<Store> {
        Store::open(&self.root)
            .with_context(|| format!("cannot open the store at {}", self.root.display()))
    }

    /// The device's trust settings: `None` without a trusted root, when
    /// targets are applied unsigned (as before signing existed).
    pub fn trust(&self) -> Option<Trust> {
        self.trusted_root.as_ref().map(|root_file| Trust {
            root_file: root_file.clone(),
            state_dir: tuf_state_dir(&self.root),
            hardware: self.hardware.clone(),
        })
    }

    pub fn registry_client(&self) -> Result<RegistryClient> {
        Ok(RegistryClient::new(self.registry.clone())?)
    }

    /// Downloads at once: the flag, else the config file's `jobs`, else 4.
    pub fn jobs(&self, flag: Option<usize>) -> Result<usize> {
        match flag.or(self.config.jobs) {
            None => Ok(DEFAULT_JOBS),
            Some(n) if JOBS.contains(&n) => Ok(n),
            Some(n) => bail!("jobs = {n} in the config file: give 1-64 downloads at once"),
        }
    }

    /// The device architecture: the flag, else the config file's, else the kernel's.
    pub fn arch(&self, flag: Option<&str>) -> Result<String> {
        let arch = match flag
            .map(str::to_string)
            .or_else(|| self.config.arch.clone())
        {
            Some(a) => Arch::parse(&a),
            None => {
                Arch::detect().context("cannot tell this machine's architecture; give --arch")?
            }
        };
        Ok(arch.to_string())
    }

    /// The architecture and the fit policy (watermark: the flag or
    /// `STOWAGE_WATERMARK`, else the config file's, else 80).
    pub fn fit(&self, options: &FitOptions) -> Result<Fit> {
        let arch = self.arch(options.arch.as_deref())?;
        let watermark = options.watermark.or(self.config.watermark).unwrap_or(80);
        let reserve = match options
            .reserve
            .clone()
            .or_else(|| self.config.reserve.clone())
        {
            Some(r) => config::parse_size(&r)
                .map_err(anyhow::Error::msg)
                .context("--reserve")?,
            None => 0,
        };
        Ok(Fit {
            arch,
            policy: Policy::new(watermark, reserve)?.with_load_path(
                options
                    .load_path
                    .or(self.config.load_path)
                    .unwrap_or_default(),
            ),
        })
    }

    fn docker_host(&self, flag: Option<&str>) -> Option<String> {
        flag.map(str::to_string)
            .or_else(|| self.config.docker_host.clone())
    }

    /// The engine at the flag's host, else the config file's, else
    /// `DOCKER_HOST` or the local socket.
    pub async fn engine(&self, docker_host: Option<&str>) -> Result<DockerEngine> {
        Ok(
            DockerEngine::connect(self.docker_host(docker_host).as_deref())
                .await?
                .with_layer_cache(self.root.join(DOCKER_LAYER_CACHE)),
        )
    }

    /// What Docker holds, for the fit check, and a note when it cannot be asked.
    pub async fn docker_view(&self, docker_host: Option<&str>) -> (DockerView, Option<String>) {
        let engine = self.engine(docker_host).await.ok();
        probe_view(engine.as_ref()).await
    }

    pub async fn compose(&self, docker_host: Option<&str>) -> Result<Compose> {
        let compose = Compose::detect_choice(self.compose).await?;
        Ok(match self.docker_host(docker_host) {
            Some(host) => compose.with_docker_host(&host),
            None => compose,
        })
    }

    /// What install needs from the fit settings.
    pub fn install_options(&self, options: &FitOptions) -> Result<InstallOptions> {
        let fit = self.fit(options)?;
        Ok(InstallOptions {
            architecture: fit.arch,
            policy: fit.policy,
            load: LoadOptions::default(),
        })
    }

    /// The device as install, run and stop see it.
    pub fn device<'a>(&'a self, store: &'a Store, engine: &'a DockerEngine) -> Device<'a> {
        Device {
            root: &self.root,
            store,
            engine,
        }
    }

    /// The device as the update transaction drives it.
    pub async fn live_device<'a>(
        &self,
        fit: &FitOptions,
        client: &'a RegistryClient,
        progress: &'a dyn Progress,
        jobs: Option<usize>,
        events: &'a (dyn Fn(&UpdateEvent) + Send + Sync),
    ) -> Result<LiveDevice<'a>> {
        let install = self.install_options(fit)?;
        Ok(LiveDevice {
            root: self.root.clone(),
            store: self.store()?,
            engine: self.engine(fit.docker_host.as_deref()).await?,
            compose: self.compose(fit.docker_host.as_deref()).await?,
            client,
            architecture: install.architecture.clone(),
            policy: install.policy,
            jobs: self.jobs(jobs)?,
            install,
            progress,
            layout: None,
            events,
            wear: Default::default(),
        })
    }

    /// Where analysed layers are cached: the flag, else the config file's
    /// `cache_dir`, else `$XDG_CACHE_HOME/stowage`, `~/.cache/stowage`, or
    /// `/var/cache/stowage` without a home.
    pub fn cache_dir(&self, flag: Option<PathBuf>) -> PathBuf {
        flag.or_else(|| self.config.cache_dir.clone())
            .unwrap_or_else(default_cache_dir)
    }
}

pub use crate::fsutil::blocking;

/// How long registries may take: the flag (or its variable), else the
/// config file, else [`Deadlines::default`].
fn deadlines(options: &GlobalOptions, config: &ConfigFile) -> Result<Deadlines> {
    let mut deadlines = Deadlines::default();
    let seconds = |key: &str, value: Option<f64>| -> Result<Option<Duration>> {
        match value {
            None => Ok(None),
            Some(v) if v.is_finite() && v > 0.0 => Ok(Duration::try_from_secs_f64(v).ok()),
            Some(v) => bail!("{key} = {v} must be a positive number of seconds"),
        }
    };
    let timeout = options.registry_timeout.or(config.registry_timeout);
    if let Some(d) = seconds("registry_timeout", timeout)? {
        deadlines.request = d;
    }
    let window = options.transfer_window.or(config.transfer_window);
    if let Some(d) = seconds("transfer_window", window)? {
        deadlines.rate_window = d;
    }
    let rate = options
        .min_transfer_rate
        .clone()
        .or_else(|| config.min_transfer_rate.clone());
    if let Some(rate) = rate {
        deadlines.min_rate =
            config::parse_size(&rate).map_err(|e| anyhow::anyhow!("min_transfer_rate: {e}"))?;
    }
    Ok(deadlines)
}

/// Parses references given on the command line.
pub fn parse_refs(refs: &[String]) -> Result<Vec<ImageRef>> {
    Ok(refs
        .iter()
        .map(|r| r.parse())
        .collect::<Result<Vec<ImageRef>, _>>()?)
}

fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("stowage");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/stowage"),
        None => PathBuf::from("/var/cache/stowage"),
    }
}
