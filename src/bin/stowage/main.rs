//! The `stowage` command line: parses flags into the library's command
//! options, runs them, and renders the results for a person or, with
//! `--json`, for a script. Exit codes: 0 success, 1 failure, 2 usage error,
//! 100 the update does not fit.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use stowage::commands::inspect::InspectOptions;
use stowage::commands::publish::PublishOptions;
use stowage::config::{self, ConfigFile, CredentialStore};
use stowage::reference::ImageRef;
use stowage::registry::{RegistryClient, RegistryOptions};

mod output;

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
    #[allow(dead_code)]
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
            insecure.extend(env.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from));
        }
        insecure.extend(config.insecure_registries.iter().cloned());
        let ca_files = cli.ca_file.clone().or_else(|| config.ca_file.clone()).into_iter().collect();
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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
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
    let progress = output::progress(globals.json, std::io::stderr().is_terminal());
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
