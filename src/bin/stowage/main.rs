//! The `stowage` command line: parses flags into the library's command
//! options, runs them, and renders the results for a person or, with
//! `--json`, for a script. Exit codes: 0 success, 1 failure, 2 usage error,
//! 100 the update does not fit.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use stowage::app::stored as admin;
use stowage::commands::inspect::InspectOptions;
use stowage::commands::publish::PublishOptions;
use stowage::config::{self, ConfigFile, CredentialStore};
use stowage::engine::compose::Compose;
use stowage::engine::docker::{DockerEngine, LoadOptions};
use stowage::engine::install::{self, Device, InstallOptions};
use stowage::engine::installed::Installed;
use stowage::engine::run::{self as run_cmd, Selection};
use stowage::oci::format::Arch;
use stowage::oci::reference::ImageRef;
use stowage::oci::registry::{RegistryClient, RegistryOptions};
use stowage::plan::DoesNotFit;
use stowage::plan::space::Policy;
use stowage::plan::{self, DockerView};
use stowage::store::Store;
use stowage::update::device as update_cmd;
use stowage::update::export::LayoutRef;
use stowage::update::pull::PullOptions;

mod output;

/// The exit code of an update that does not fit.
const DOES_NOT_FIT: u8 = 100;

/// The file under the root that remembers the layers of Docker's images.
const DOCKER_LAYER_CACHE: &str = "docker-layers.json";
/// Downloads at once, by default and at most: each holds a connection and a
/// file open, and a device's registry link gains nothing from more.
const DEFAULT_JOBS: usize = 4;
const JOBS: std::ops::RangeInclusive<usize> = 1..=64;

fn jobs_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(*JOBS.start() as u64..=*JOBS.end() as u64)
}

/// The device-side settings of the fit check.
struct Fit {
    arch: String,
    policy: Policy,
}

#[derive(Parser)]
#[command(
    name = "stowage",
    version,
    about = "Storage-aware over-the-air updates of Docker Compose apps",
    long_about = "stowage publishes Docker Compose apps to OCI registries with the layer \
metadata a device needs, and on the device refuses before downloading any byte an update \
that does not fit, then pulls, installs, runs and prunes it without ever filling the disk."
)]
struct Cli {
    /// Where stowage keeps its blob store and apps [env: STOWAGE_ROOT] [default: /var/lib/stowage]
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Talk plain HTTP to this registry (repeatable) [env: STOWAGE_INSECURE_REGISTRIES, comma separated]
    #[arg(long = "insecure-registry", global = true, value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    /// Trust the CA certificates in this PEM file for HTTPS registries
    #[arg(long, global = true, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Config file whose keys mirror these flags [default: /etc/stowage/config.toml]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Machine-readable output: one JSON document, or JSON lines for progress
    #[arg(long, global = true)]
    json: bool,
    /// More detail in logs (-v, -vv)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish a compose project as an app: pin images, analyse layers, push
    Publish(PublishArgs),
    /// Show an app in a registry: services, images, download size, disk usage
    Inspect(InspectArgs),
    /// Plan an update and say, per volume, whether it fits (exit 100 when not)
    Check(CheckArgs),
    /// Check, then download the apps' missing blobs into the store
    Pull(PullArgs),
    /// List the apps in the store
    Ls,
    /// Forget an app (its blobs go at the next prune)
    Rm(RmArgs),
    /// Remove every blob and partial download no stored app needs
    Prune(PruneArgs),
    /// Verify every stored blob and every installed app (--repair reloads lost images)
    Fsck(FsckArgs),
    /// Load a stored app's images into Docker and extract its bundle (no network)
    Install(InstallArgs),
    /// Install when needed, then start apps with compose (up -d --remove-orphans)
    Run(RunArgs),
    /// Stop apps (compose down); their images stay
    Stop(StopArgs),
    /// Show each installed app's services and their state
    Ps(DockerArgs),
    /// Disk used per app and per store, and free space per volume
    Df(DfArgs),
    /// Take the device to exactly these apps in one transaction, rolling back on failure
    Update(UpdateArgs),
    /// Poll a target and apply it with the update transaction (a daemon)
    Agent(AgentArgs),
    /// Show what the agent last did
    Status,
    /// Write stored apps and all their blobs into DIR for an offline update (oci:DIR)
    Export(ExportArgs),
    /// Targets: the set of apps a device should run
    #[command(subcommand)]
    Target(TargetCommand),
}

#[derive(Args)]
struct UpdateArgs {
    #[command(flatten)]
    fit: FitArgs,
    /// Blobs downloaded at once (1-64)
    #[arg(long, value_name = "N", value_parser = jobs_parser())]
    jobs: Option<usize>,
    /// Seconds the new apps have to be running and healthy
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    verify_timeout: u64,
    /// Every app the device should run (REGISTRY/REPO:TAG or @sha256:...); running apps not named are stopped
    #[arg(value_name = "REF", required = true)]
    apps: Vec<String>,
}

#[derive(Args)]
struct ExportArgs {
    /// The device architecture [default: from the kernel]
    #[arg(long, value_name = "ARCH")]
    arch: Option<String>,
    /// Stored apps (names, references or digests), then the directory to
    /// write (a stowage store; apply it with `stowage update oci:DIR`)
    #[arg(value_name = "NAME|REF... DIR", required = true, num_args = 2..)]
    args: Vec<String>,
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    fit: FitArgs,
    /// The target to follow: REGISTRY/REPO:TAG
    #[arg(long, value_name = "REF")]
    target: String,
    /// Time between polls, e.g. 30s, 5m, 1h
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    interval: String,
    /// Seconds the new apps have to be running and healthy
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    verify_timeout: u64,
    /// Poll once and exit (the exit code says how it went)
    #[arg(long)]
    once: bool,
}

#[derive(Subcommand)]
enum TargetCommand {
    /// Publish a target naming the apps (pinned by digest) at REGISTRY/REPO:TAG
    Publish {
        #[arg(value_name = "REGISTRY/REPO:TAG")]
        at: String,
        #[arg(value_name = "APP_REF", required = true)]
        apps: Vec<String>,
    },
    /// Show a target's apps
    Show {
        #[arg(value_name = "REF")]
        at: String,
    },
}

#[derive(Args, Clone)]
struct DockerArgs {
    /// The Docker engine [default: DOCKER_HOST or the local socket]
    #[arg(long, value_name = "URL")]
    docker_host: Option<String>,
}

#[derive(Args)]
struct InstallArgs {
    #[command(flatten)]
    fit: FitArgs,
    /// A stored app: its name, reference or digest
    #[arg(value_name = "NAME|REF")]
    app: String,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    fit: FitArgs,
    /// Every installed app
    #[arg(long, conflicts_with = "apps")]
    all: bool,
    /// Stored apps: names, references or digests
    #[arg(value_name = "NAME", required_unless_present = "all")]
    apps: Vec<String>,
}

#[derive(Args)]
struct StopArgs {
    #[command(flatten)]
    docker: DockerArgs,
    /// Every installed app
    #[arg(long, conflicts_with = "apps")]
    all: bool,
    #[arg(value_name = "NAME", required_unless_present = "all")]
    apps: Vec<String>,
}

#[derive(Args)]
struct DfArgs {
    #[command(flatten)]
    docker: DockerArgs,
    /// The device architecture [default: from the kernel]
    #[arg(long, value_name = "ARCH")]
    arch: Option<String>,
}

#[derive(Args, Clone)]
struct FitArgs {
    /// An update may fill each volume up to this percentage (20-99) [default: 80]
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u8).range(20..=99))]
    watermark: Option<u8>,
    /// Bytes always kept free on each volume, e.g. 512M [default: 0]
    #[arg(long, value_name = "SIZE")]
    reserve: Option<String>,
    /// The device architecture (amd64, arm64, arm/v7) [default: from the kernel]
    #[arg(long, value_name = "ARCH")]
    arch: Option<String>,
    /// The Docker engine to ask what it holds [default: DOCKER_HOST or the local socket]
    #[arg(long, value_name = "URL")]
    docker_host: Option<String>,
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    fit: FitArgs,
    /// The apps: REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:...
    #[arg(value_name = "REF", required = true)]
    apps: Vec<String>,
}

#[derive(Args)]
struct PullArgs {
    #[command(flatten)]
    fit: FitArgs,
    /// Blobs downloaded at once (1-64)
    #[arg(long, value_name = "N", value_parser = jobs_parser())]
    jobs: Option<usize>,
    #[arg(value_name = "REF", required = true)]
    apps: Vec<String>,
}

#[derive(Args)]
struct RmArgs {
    #[command(flatten)]
    docker: DockerArgs,
    /// An app name (all its versions), reference or digest
    #[arg(value_name = "NAME|REF")]
    app: String,
}

#[derive(Args)]
struct PruneArgs {
    /// Say what would be removed, remove nothing
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    docker: DockerArgs,
}

#[derive(Args)]
struct FsckArgs {
    /// Check sizes only, do not hash
    #[arg(long)]
    quick: bool,
    /// Reload from the blob store the images of installed apps that Docker lost
    #[arg(long)]
    repair: bool,
    #[command(flatten)]
    fit: FitArgs,
}

#[derive(Args)]
struct PublishArgs {
    /// The compose file (default: docker-compose.yml, compose.yml or compose.yaml in the app directory)
    #[arg(short = 'f', long = "file", value_name = "COMPOSE_FILE")]
    file: Option<PathBuf>,
    /// The app directory
    #[arg(long, default_value = ".", value_name = "DIR")]
    dir: PathBuf,
    /// Architectures to publish, comma separated (default: all that every image provides)
    #[arg(long, value_delimiter = ',', value_name = "ARCH,...")]
    arch: Vec<String>,
    /// A YAML or JSON map of image name to digest, used instead of asking registries
    #[arg(long, value_name = "FILE")]
    pinned_images: Option<PathBuf>,
    /// Show what would be pushed, push nothing
    #[arg(long)]
    dry_run: bool,
    /// Layers downloaded and analysed at once (1-64)
    #[arg(long, default_value_t = DEFAULT_JOBS, value_name = "N", value_parser = jobs_parser())]
    jobs: usize,
    /// Where analysed layers are cached [default: ~/.cache/stowage]
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Where to push the app
    #[arg(value_name = "REGISTRY/REPO:TAG")]
    target: String,
}

#[derive(Args)]
struct InspectArgs {
    /// The app: REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:...
    #[arg(value_name = "REF")]
    app: String,
}

/// Settings every command shares, from flags, environment and config file.
struct Globals {
    root: PathBuf,
    json: bool,
    config: ConfigFile,
    registry: RegistryOptions,
}

impl Globals {
    fn resolve(cli: &Cli) -> Result<Globals> {
        let config = ConfigFile::load(cli.config.as_deref())?;
        let root = cli
            .root
            .clone()
            .or_else(|| std::env::var_os("STOWAGE_ROOT").map(PathBuf::from))
            .or_else(|| config.root.clone())
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_ROOT));
        let mut insecure = cli.insecure_registry.clone();
        if let Ok(env) = std::env::var("STOWAGE_INSECURE_REGISTRIES") {
            insecure.extend(
                env.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            );
        }
        insecure.extend(config.insecure_registries.iter().cloned());
        let ca_files = cli
            .ca_file
            .clone()
            .or_else(|| config.ca_file.clone())
            .into_iter()
            .collect();
        let registry = RegistryOptions {
            insecure,
            ca_files,
            credentials: CredentialStore::from_docker_config()?,
        };
        Ok(Globals {
            root,
            json: cli.json,
            config,
            registry,
        })
    }

    fn store(&self) -> Result<Store> {
        Store::open(&self.root)
            .with_context(|| format!("cannot open the store at {}", self.root.display()))
    }

    /// The architecture, fit policy and Docker view for a device command.
    /// Downloads at once: the flag, else the config file's `jobs`, else 4.
    fn jobs(&self, flag: Option<usize>) -> Result<usize> {
        match flag.or(self.config.jobs) {
            None => Ok(DEFAULT_JOBS),
            Some(n) if JOBS.contains(&n) => Ok(n),
            Some(n) => bail!("jobs = {n} in the config file: give 1-64 downloads at once"),
        }
    }

    fn fit(&self, args: &FitArgs) -> Result<Fit> {
        let arch = match args.arch.clone().or_else(|| self.config.arch.clone()) {
            Some(a) => Arch::parse(&a),
            None => {
                Arch::detect().context("cannot tell this machine's architecture; give --arch")?
            }
        };
        let watermark = match args.watermark {
            Some(w) => w,
            None => match std::env::var("STOWAGE_WATERMARK") {
                Ok(v) => v.trim().parse().map_err(|_| {
                    anyhow::anyhow!("STOWAGE_WATERMARK={v:?} is not a percentage (20-99)")
                })?,
                Err(_) => self.config.watermark.unwrap_or(80),
            },
        };
        let reserve = match args.reserve.clone().or_else(|| self.config.reserve.clone()) {
            Some(r) => config::parse_size(&r)
                .map_err(anyhow::Error::msg)
                .context("--reserve")?,
            None => 0,
        };
        let policy = Policy::new(watermark, reserve)?;
        Ok(Fit {
            arch: arch.to_string(),
            policy,
        })
    }

    /// What Docker holds, for the fit check, and a note when it cannot be asked.
    async fn docker_view(&self, args: &FitArgs) -> (DockerView, Option<String>) {
        let engine = self.engine(&args.docker_host).await.ok();
        stowage::engine::docker::probe_view(engine.as_ref()).await
    }

    fn docker_host(&self, flag: &Option<String>) -> Option<String> {
        flag.clone().or_else(|| self.config.docker_host.clone())
    }

    async fn engine(&self, flag: &Option<String>) -> Result<DockerEngine> {
        Ok(DockerEngine::connect(self.docker_host(flag).as_deref())
            .await?
            .with_layer_cache(self.root.join(DOCKER_LAYER_CACHE)))
    }

    async fn compose(&self, flag: &Option<String>) -> Result<Compose> {
        let compose = Compose::detect().await?;
        Ok(match self.docker_host(flag) {
            Some(host) => compose.with_docker_host(&host),
            None => compose,
        })
    }

    /// What install needs from the fit settings.
    async fn install_options(&self, args: &FitArgs) -> Result<InstallOptions> {
        let fit = self.fit(args)?;
        Ok(InstallOptions {
            architecture: fit.arch,
            policy: fit.policy,
            load: LoadOptions::default(),
        })
    }

    /// The device as the update transaction drives it.
    async fn live_device<'a>(
        &self,
        args: &FitArgs,
        client: &'a RegistryClient,
        progress: &'a dyn stowage::progress::Progress,
        jobs: Option<usize>,
    ) -> Result<update_cmd::LiveDevice<'a>> {
        let fit = self.fit(args)?;
        let json = self.json;
        let events: &'a (dyn Fn(&stowage::update::transaction::UpdateEvent) + Send + Sync) = if json
        {
            &|e| output::print_json_line(e)
        } else {
            &|e| output::update_event(e)
        };
        Ok(update_cmd::LiveDevice {
            root: self.root.clone(),
            store: self.store()?,
            engine: self.engine(&args.docker_host).await?,
            compose: self.compose(&args.docker_host).await?,
            client,
            architecture: fit.arch.clone(),
            policy: fit.policy,
            jobs: self.jobs(jobs)?,
            install: InstallOptions {
                architecture: fit.arch,
                policy: fit.policy,
                load: LoadOptions::default(),
            },
            progress,
            layout: None,
            events,
        })
    }

    fn registry_client(&self) -> Result<RegistryClient> {
        Ok(RegistryClient::new(self.registry.clone())?)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stowage: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(_) if output::stdout_failed() => ExitCode::from(1),
        Ok(code) => code,
        Err(e) => {
            eprintln!("stowage: error: {}", error_text(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes in one line, each cause said once: error types
/// that already quote their cause in their own message are not repeated.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("STOWAGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Under systemd, stderr goes to journald, which stamps every line itself
    // and shows colour codes as raw bytes: plain lines without a time there.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !journald && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logger = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = if journald {
        logger.without_time().try_init()
    } else {
        logger.try_init()
    };
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let globals = Globals::resolve(&cli)?;
    // Commands that stream progress as JSON lines with --json; the others
    // print one JSON document on stdout and keep their progress on stderr.
    let json_lines = globals.json
        && matches!(
            cli.command,
            Command::Pull(_) | Command::Update(_) | Command::Agent(_)
        );
    let progress = output::progress(json_lines, std::io::stderr().is_terminal());
    match cli.command {
        Command::Publish(args) => {
            let target: ImageRef = args.target.parse()?;
            let cache_dir = args
                .cache_dir
                .or_else(|| globals.config.cache_dir.clone())
                .unwrap_or_else(default_cache_dir);
            let options = PublishOptions {
                app_dir: args.dir,
                compose_file: args.file,
                archs: args.arch,
                pinned_images: args.pinned_images,
                dry_run: args.dry_run,
                target,
                cache_dir,
                jobs: args.jobs,
            };
            let client = globals.registry_client()?;
            let report = options.run(&client, progress.as_ref()).await?;
            output::publish(&report, globals.json)?;
        }
        Command::Check(args) => {
            let fit = globals.fit(&args.fit)?;
            let store = globals.store()?;
            let client = globals.registry_client()?;
            let references = args
                .apps
                .iter()
                .map(|r| r.parse())
                .collect::<Result<Vec<ImageRef>, _>>()?;
            // Docker and the registry are asked at once: the check's time is
            // mostly their round trips.
            let ((docker, note), apps) = tokio::join!(
                globals.docker_view(&args.fit),
                stowage::app::fetch_apps(
                    &client,
                    &references,
                    &fit.arch,
                    stowage::app::Depth::Plan
                )
            );
            let apps = apps?;
            let paths = plan::Paths::under(&globals.root);
            let (_, mut report) = plan::check_update(&apps, &store, &paths, &docker, fit.policy)?;
            report.fit.notes.extend(note);
            output::check(&report, globals.json)?;
            if !report.fit.fits {
                return Ok(ExitCode::from(DOES_NOT_FIT));
            }
        }
        Command::Pull(args) if args.apps.iter().any(|a| a.starts_with("oci:")) => {
            let fit = globals.fit(&args.fit)?;
            let (docker, _) = globals.docker_view(&args.fit).await;
            let store = globals.store()?;
            let [one] = args.apps.as_slice() else {
                anyhow::bail!(
                    "a pull from oci:DIR takes that one argument (oci:DIR or oci:DIR:NAME)"
                );
            };
            let from = LayoutRef::parse(one).context("oci:DIR[:NAME] expected")?;
            match stowage::update::export::import(
                &store,
                &from,
                &fit.arch,
                fit.policy,
                &docker,
                progress.as_ref(),
            )
            .await
            {
                Ok(report) => output::import(&report, globals.json)?,
                Err(e) => return refused_or(e, globals.json),
            }
        }
        Command::Pull(args) => {
            let fit = globals.fit(&args.fit)?;
            let store = globals.store()?;
            let client = globals.registry_client()?;
            let options = PullOptions {
                apps: args
                    .apps
                    .iter()
                    .map(|r| r.parse())
                    .collect::<Result<_, _>>()?,
                architecture: fit.arch.clone(),
                policy: fit.policy,
                jobs: globals.jobs(args.jobs)?,
            };
            match options
                .run(
                    &client,
                    &store,
                    globals.docker_view(&args.fit),
                    progress.as_ref(),
                )
                .await
            {
                Ok(report) => output::pull(&report, globals.json)?,
                Err(e) => match e.downcast::<DoesNotFit>() {
                    Ok(refused) => {
                        let report = *refused.report;
                        output::pull_refused(&report, globals.json)?;
                        eprintln!(
                            "stowage: error: the update does not fit: {}",
                            report.fit.shortfall()
                        );
                        return Ok(ExitCode::from(DOES_NOT_FIT));
                    }
                    Err(e) => return Err(e),
                },
            }
        }
        Command::Ls => {
            let apps = admin::ls(&globals.store()?)?;
            output::ls(&apps, globals.json)?;
        }
        Command::Rm(args) => {
            let store = globals.store()?;
            // An installed app is uninstalled first (refused while it has
            // containers), so that prune may then free its images too.
            let state = Installed::load(&globals.root)?;
            let installed: Vec<String> = stowage::app::stored::find_apps(&store, &args.app)?
                .into_iter()
                .filter(|a| {
                    state
                        .apps
                        .get(&a.name)
                        .is_some_and(|r| r.reference == a.reference)
                })
                .map(|a| a.name)
                .collect();
            if !installed.is_empty() {
                let engine = globals.engine(&args.docker.docker_host).await?;
                let device = Device {
                    root: &globals.root,
                    store: &store,
                    engine: &engine,
                };
                for name in &installed {
                    run_cmd::uninstall(device, name).await?;
                }
            }
            let report = admin::rm(&store, &args.app)?;
            output::rm(&report, globals.json)?;
        }
        Command::Prune(args) => {
            let report = admin::prune(&globals.store()?, args.dry_run)?;
            let docker = match globals.engine(&args.docker.docker_host).await {
                Ok(engine) => Some(
                    stowage::engine::prune::prune_docker(&globals.root, &engine, args.dry_run)
                        .await
                        .map_err(|e| format!("{e:#}")),
                ),
                Err(e) => Some(Err(format!(
                    "Docker is not reachable, its images were left alone: {e:#}"
                ))),
            };
            output::prune(&report, docker.as_ref(), globals.json)?;
        }
        Command::Fsck(args) => {
            let store = if args.repair {
                Store::open_for_repair(&globals.root)?
            } else {
                globals.store()?
            };
            let report = admin::fsck(&store, args.quick)?;
            let mut clean = report.is_clean();
            let state = Installed::load(&globals.root)?;
            let mut installed_checks = Vec::new();
            if !state.apps.is_empty() {
                match globals.engine(&args.fit.docker_host).await {
                    Ok(engine) => {
                        let options = globals.install_options(&args.fit).await?;
                        let device = Device {
                            root: &globals.root,
                            store: &store,
                            engine: &engine,
                        };
                        installed_checks = install::verify_installed(
                            device,
                            args.repair,
                            &options,
                            progress.as_ref(),
                        )
                        .await?;
                    }
                    // The store's verdict still stands; the apps cannot be checked.
                    Err(e) => {
                        installed_checks = state
                            .apps
                            .iter()
                            .map(|(name, app)| install::InstalledCheck {
                                name: name.clone(),
                                reference: app.reference.clone(),
                                missing_images: Vec::new(),
                                directory_damaged: false,
                                repaired: false,
                                error: Some(format!("{e:#}")),
                            })
                            .collect();
                    }
                }
                clean &= installed_checks.iter().all(|c| c.is_healthy());
            }
            output::fsck(&report, &installed_checks, globals.json)?;
            if !clean {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Install(args) => {
            let store = globals.store()?;
            let engine = globals.engine(&args.fit.docker_host).await?;
            let options = globals.install_options(&args.fit).await?;
            let device = Device {
                root: &globals.root,
                store: &store,
                engine: &engine,
            };
            match install::install(device, &args.app, &options, progress.as_ref()).await {
                Ok(report) => output::install(&report, globals.json)?,
                Err(e) => return refused_or(e, globals.json),
            }
        }
        Command::Run(args) => {
            let store = globals.store()?;
            let engine = globals.engine(&args.fit.docker_host).await?;
            let compose = globals.compose(&args.fit.docker_host).await?;
            let options = globals.install_options(&args.fit).await?;
            let device = Device {
                root: &globals.root,
                store: &store,
                engine: &engine,
            };
            let selection = selection(args.all, args.apps);
            match run_cmd::run(device, &compose, &selection, &options, progress.as_ref()).await {
                Ok(report) => output::run(&report, globals.json)?,
                Err(e) => return refused_or(e, globals.json),
            }
        }
        Command::Stop(args) => {
            let store = globals.store()?;
            let engine = globals.engine(&args.docker.docker_host).await?;
            let compose = globals.compose(&args.docker.docker_host).await?;
            let device = Device {
                root: &globals.root,
                store: &store,
                engine: &engine,
            };
            let selection = selection(args.all, args.apps);
            let report = run_cmd::stop(device, &compose, &selection, progress.as_ref()).await?;
            output::stop(&report, globals.json)?;
        }
        Command::Ps(args) => {
            let store = globals.store()?;
            let engine = globals.engine(&args.docker_host).await?;
            let device = Device {
                root: &globals.root,
                store: &store,
                engine: &engine,
            };
            let apps = run_cmd::ps(device).await?;
            output::ps(&apps, globals.json)?;
        }
        Command::Df(args) => {
            let store = globals.store()?;
            let engine = globals.engine(&args.docker.docker_host).await.ok();
            let arch = match args.arch.clone().or_else(|| globals.config.arch.clone()) {
                Some(a) => Arch::parse(&a),
                None => Arch::detect()
                    .context("cannot tell this machine's architecture; give --arch")?,
            };
            let report = stowage::commands::df::df(
                &globals.root,
                &store,
                engine.as_ref(),
                &arch.to_string(),
            )
            .await?;
            output::df(&report, globals.json)?;
        }
        Command::Export(args) => {
            let store = globals.store()?;
            let arch = match args.arch.clone().or_else(|| globals.config.arch.clone()) {
                Some(a) => Arch::parse(&a),
                None => Arch::detect()
                    .context("cannot tell this machine's architecture; give --arch")?,
            };
            let Some((dir, apps)) = args.args.split_last() else {
                anyhow::bail!("name the apps to export, then the directory");
            };
            let report = stowage::update::export::export(
                &store,
                apps,
                std::path::Path::new(dir),
                &arch.to_string(),
                progress.as_ref(),
            )
            .await?;
            output::export(&report, globals.json)?;
        }
        Command::Update(args) => {
            let client = globals.registry_client()?;
            let layout = match args.apps.as_slice() {
                [one] => LayoutRef::parse(one),
                many if many.iter().any(|a| a.starts_with("oci:")) => {
                    anyhow::bail!(
                        "an update from oci:DIR takes that one argument (oci:DIR or oci:DIR:NAME)"
                    )
                }
                _ => None,
            };
            let to = match &layout {
                Some(layout) => layout
                    .apps(&layout.open()?)?
                    .into_iter()
                    .map(|a| (a.name, a.reference))
                    .collect(),
                None => {
                    let refs = args
                        .apps
                        .iter()
                        .map(|r| r.parse())
                        .collect::<Result<Vec<ImageRef>, _>>()?;
                    update_cmd::app_set(&client, &refs).await?
                }
            };
            let mut device = globals
                .live_device(&args.fit, &client, progress.as_ref(), args.jobs)
                .await?;
            device.layout = layout;
            let options = stowage::update::transaction::UpdateOptions {
                verify_timeout: std::time::Duration::from_secs(args.verify_timeout),
            };
            let files = stowage::update::transaction::StateFiles::under(&globals.root);
            let _lock = stowage::update::transaction::lock_updates(&globals.root)?;
            let outcome =
                stowage::update::transaction::update(&device, &files, to, &options).await?;
            return output::update_outcome(outcome, globals.json);
        }
        Command::Agent(args) => {
            let client = globals.registry_client()?;
            let device = globals
                .live_device(&args.fit, &client, progress.as_ref(), None)
                .await?;
            let interval = parse_duration(&args.interval)?;
            let options = stowage::update::agent::AgentOptions {
                target: args.target.parse()?,
                interval,
                update: stowage::update::transaction::UpdateOptions {
                    verify_timeout: std::time::Duration::from_secs(args.verify_timeout),
                },
                once: args.once,
            };
            let _lock = stowage::update::transaction::lock_updates(&globals.root)?;
            let status =
                stowage::update::agent::run_agent(&device, &client, &globals.root, &options)
                    .await?;
            output::status(&status, globals.json)?;
            return Ok(match status.last_result.as_str() {
                "committed" | "unchanged" => ExitCode::SUCCESS,
                "refused" | "waiting_for_space" => ExitCode::from(DOES_NOT_FIT),
                _ => ExitCode::from(1),
            });
        }
        Command::Status => match stowage::update::agent::read_status(&globals.root)? {
            Some(mut status) => {
                // What runs now, even when a `stowage update` ran after the agent.
                status.apps = stowage::update::transaction::StateFiles::under(&globals.root)
                    .device()?
                    .running;
                output::status(&status, globals.json)?
            }
            None => {
                let state =
                    stowage::update::transaction::StateFiles::under(&globals.root).device()?;
                output::device_state(&state, globals.json)?;
            }
        },
        Command::Target(TargetCommand::Publish { at, apps }) => {
            let client = globals.registry_client()?;
            let refs = apps
                .iter()
                .map(|r| r.parse())
                .collect::<Result<Vec<ImageRef>, _>>()?;
            let target =
                stowage::update::target::publish_target(&client, &at.parse()?, &refs).await?;
            output::target(&target, globals.json)?;
        }
        Command::Target(TargetCommand::Show { at }) => {
            let client = globals.registry_client()?;
            let target = stowage::update::target::fetch_target(&client, &at.parse()?).await?;
            output::target(&target, globals.json)?;
        }
        Command::Inspect(args) => {
            let app: ImageRef = args.app.parse()?;
            let client = globals.registry_client()?;
            let description = InspectOptions { app }
                .run(&client)
                .await
                .context("cannot inspect the app")?;
            output::inspect(&description, globals.json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit 100 with the check's table when `error` is an update that does not
/// fit; any other error goes on.
fn refused_or(error: anyhow::Error, json: bool) -> Result<ExitCode> {
    match error.downcast::<DoesNotFit>() {
        Ok(refused) => {
            output::check(&refused.report, json)?;
            eprintln!(
                "stowage: error: the update does not fit: {}",
                refused.report.fit.shortfall()
            );
            Ok(ExitCode::from(DOES_NOT_FIT))
        }
        Err(e) => Err(e),
    }
}

/// `--all`, or the apps named.
fn selection(all: bool, apps: Vec<String>) -> Selection {
    if all {
        Selection::All
    } else {
        Selection::Named(apps)
    }
}

/// `30s`, `5m`, `1h` or a number of seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a duration (try 30s, 5m or 1h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => anyhow::bail!("{s:?} has an unknown unit (use s, m or h)"),
    };
    if secs == 0 {
        anyhow::bail!("the interval must be at least one second");
    }
    Ok(std::time::Duration::from_secs(secs))
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
