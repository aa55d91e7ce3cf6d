//! The `stowage` command line: parses flags into the library's command
//! options, runs them, and renders the results for a person or, with
//! `--json`, for a script. Exit codes: 0 success, 1 failure, 2 usage error,
//! 100 the update does not fit.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use stowage::commands::admin;
use stowage::commands::check::{self, DockerView};
use stowage::commands::inspect::InspectOptions;
use stowage::commands::publish::PublishOptions;
use stowage::commands::pull::{DoesNotFit, PullOptions};
use stowage::config::{self, ConfigFile, CredentialStore};
use stowage::docker::DockerEngine;
use stowage::format::Arch;
use stowage::reference::ImageRef;
use stowage::registry::{RegistryClient, RegistryOptions};
use stowage::space::Policy;
use stowage::store::Store;

mod output;

/// The exit code of an update that does not fit.
const DOES_NOT_FIT: u8 = 100;

/// The device-side settings of the fit check.
struct Fit {
    arch: String,
    policy: Policy,
    docker: DockerView,
    notes: Vec<String>,
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
    /// Verify every stored blob and move corrupt ones aside
    Fsck(FsckArgs),
}

#[derive(Args, Clone)]
struct FitArgs {
    /// An update may fill each volume up to this percentage (20-99) [default: 80]
    #[arg(long, value_name = "PCT")]
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
    /// Blobs downloaded at once
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    #[arg(value_name = "REF", required = true)]
    apps: Vec<String>,
}

#[derive(Args)]
struct RmArgs {
    /// An app name (all its versions), reference or digest
    #[arg(value_name = "NAME|REF")]
    app: String,
}

#[derive(Args)]
struct PruneArgs {
    /// Say what would be removed, remove nothing
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct FsckArgs {
    /// Check sizes only, do not hash
    #[arg(long)]
    quick: bool,
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
    /// Layers downloaded and analysed at once
    #[arg(long, default_value_t = 4)]
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
    async fn fit(&self, args: &FitArgs) -> Result<Fit> {
        let arch = match args.arch.clone().or_else(|| self.config.arch.clone()) {
            Some(a) => Arch::parse(&a),
            None => {
                Arch::detect().context("cannot tell this machine's architecture; give --arch")?
            }
        };
        let watermark = args.watermark.or(self.config.watermark).unwrap_or(80);
        let reserve = match args.reserve.clone().or_else(|| self.config.reserve.clone()) {
            Some(r) => config::parse_size(&r)
                .map_err(anyhow::Error::msg)
                .context("--reserve")?,
            None => 0,
        };
        let policy = Policy::new(watermark, reserve)?;
        let host = args
            .docker_host
            .clone()
            .or_else(|| self.config.docker_host.clone());
        let engine = DockerEngine::connect(host.as_deref()).await.ok();
        let (docker, note) = DockerView::probe(engine.as_ref()).await;
        Ok(Fit {
            arch: arch.to_string(),
            policy,
            docker,
            notes: note.into_iter().collect(),
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
        Ok(code) => code,
        Err(e) => {
            eprintln!("stowage: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("STOWAGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let globals = Globals::resolve(&cli)?;
    // Commands that stream progress as JSON lines with --json; the others
    // print one JSON document on stdout and keep their progress on stderr.
    let json_lines = globals.json && matches!(cli.command, Command::Pull(_));
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
            let fit = globals.fit(&args.fit).await?;
            let store = globals.store()?;
            let client = globals.registry_client()?;
            let mut apps = Vec::new();
            for r in &args.apps {
                let reference: ImageRef = r.parse()?;
                apps.push(stowage::app::fetch_app(&client, &reference, &fit.arch).await?);
            }
            let paths = check::Paths::under(&globals.root);
            let plan = check::plan_update(&apps, &store, &paths, &fit.docker, fit.policy)?;
            let mut report = check::summarise(&apps, &plan, &fit.docker);
            report.fit.notes.extend(fit.notes);
            output::check(&report, globals.json)?;
            if !report.fit.fits {
                return Ok(ExitCode::from(DOES_NOT_FIT));
            }
        }
        Command::Pull(args) => {
            let fit = globals.fit(&args.fit).await?;
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
                jobs: args.jobs.or(globals.config.jobs).unwrap_or(4),
            };
            match options
                .run(&client, &store, &fit.docker, progress.as_ref())
                .await
            {
                Ok(mut report) => {
                    report.check.fit.notes.extend(fit.notes);
                    output::pull(&report, globals.json)?;
                }
                Err(e) => match e.downcast::<DoesNotFit>() {
                    Ok(refused) => {
                        let mut report = *refused.report;
                        report.fit.notes.extend(fit.notes);
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
            let report = admin::rm(&globals.store()?, &args.app)?;
            output::rm(&report, globals.json)?;
        }
        Command::Prune(args) => {
            let report = admin::prune(&globals.store()?, args.dry_run)?;
            output::prune(&report, globals.json)?;
        }
        Command::Fsck(args) => {
            let report = admin::fsck(&globals.store()?, args.quick)?;
            let clean = report.is_clean();
            output::fsck(&report, globals.json)?;
            if !clean {
                return Ok(ExitCode::from(1));
            }
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

fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("stowage");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/stowage"),
        None => PathBuf::from("/var/cache/stowage"),
    }
}
