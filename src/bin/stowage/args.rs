//! The command line's flags, parsed in one place: each verb's arguments and
//! their conversion into the library's command options (`stowage::commands`).
//! Environment variables are clap `env` arguments, so `--help` shows them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use stowage::commands::{FitOptions, GlobalOptions, JOBS};
use stowage::engine::compose::ComposeChoice;
use stowage::engine::run::Selection;
use stowage::update::reconcile::DEFAULT_RESTART_LIMIT;

/// Downloads at once, by default.
const DEFAULT_JOBS: usize = stowage::commands::DEFAULT_JOBS;

pub fn jobs_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(*JOBS.start() as u64..=*JOBS.end() as u64)
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
pub struct Cli {
    /// Where stowage keeps its blob store and apps [default: /var/lib/stowage]
    #[arg(long, global = true, value_name = "DIR", env = "STOWAGE_ROOT")]
    pub root: Option<PathBuf>,
    /// Talk plain HTTP to this registry (repeatable; the variable is comma separated)
    #[arg(
        long = "insecure-registry",
        global = true,
        value_name = "HOST[:PORT]",
        env = "STOWAGE_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registry: Vec<String>,
    /// Trust the CA certificates in this PEM file for HTTPS registries
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Seconds a metadata request to a registry may take, whole [default: 60]
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        env = "STOWAGE_REGISTRY_TIMEOUT"
    )]
    pub registry_timeout: Option<f64>,
    /// Bytes a second a blob download must keep up, or it is cut off and resumed [default: 1K]
    #[arg(
        long,
        global = true,
        value_name = "SIZE",
        env = "STOWAGE_MIN_TRANSFER_RATE"
    )]
    pub min_transfer_rate: Option<String>,
    /// Seconds over which that rate is measured [default: 60]
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        env = "STOWAGE_TRANSFER_WINDOW"
    )]
    pub transfer_window: Option<f64>,
    /// The TUF root installed at provisioning: the agent and `update` apply only targets it verifies
    #[arg(long, global = true, value_name = "FILE", env = "STOWAGE_TRUSTED_ROOT")]
    pub trusted_root: Option<PathBuf>,
    /// This device's hardware or group tag: a signed target for another tag is refused
    #[arg(long, global = true, value_name = "TAG", env = "STOWAGE_HARDWARE")]
    pub hardware: Option<String>,
    /// Which compose runs apps: auto (`docker compose` when the docker CLI has
    /// the plugin, else `docker-compose`), plugin (v2) or standalone (v1)
    #[arg(
        long,
        global = true,
        value_name = "auto|plugin|standalone",
        env = "STOWAGE_COMPOSE"
    )]
    pub compose: Option<ComposeChoice>,
    /// Config file whose keys mirror these flags [default: /etc/stowage/config.toml]
    #[arg(long, global = true, value_name = "FILE", env = "STOWAGE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Machine-readable output: one JSON document, or JSON lines for progress
    #[arg(long, global = true)]
    pub json: bool,
    /// More detail in logs (-v, -vv)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    Status(DockerArgs),
    /// Start again, with no network, every app the device should run and does not
    Reconcile(ReconcileArgs),
    /// Write stored apps and all their blobs into DIR for an offline update (oci:DIR)
    Export(ExportArgs),
    /// Targets: the set of apps a device should run
    #[command(subcommand)]
    Target(TargetCommand),
    /// Signed targets (TUF): keys, root, targets, signing, publishing
    #[command(subcommand)]
    Tuf(TufCommand),
}

#[derive(Subcommand)]
pub enum TufCommand {
    /// Keys: `key gen FILE` writes an ed25519 private key (0600) and FILE.pub.json
    #[command(subcommand)]
    Key(TufKeyCommand),
    /// Stage root version 1 of a new repository in DIR; sign it with `sign --role root`
    Init {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// A root key (public .pub.json or private file; repeatable)
        #[arg(long = "root-key", value_name = "FILE", required = true)]
        root_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1, value_name = "N")]
        root_threshold: u64,
        /// A targets key (repeatable)
        #[arg(long = "targets-key", value_name = "FILE", required = true)]
        targets_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1, value_name = "N")]
        targets_threshold: u64,
        #[arg(long = "snapshot-key", value_name = "FILE", required = true)]
        snapshot_keys: Vec<PathBuf>,
        #[arg(long = "timestamp-key", value_name = "FILE", required = true)]
        timestamp_keys: Vec<PathBuf>,
        /// When the root expires: 365d, 12h, or an RFC 3339 time
        #[arg(long, value_name = "WHEN")]
        expires: Option<String>,
    },
    /// Stage the next root with a role's keys or threshold changed (sign it with old and new root keys)
    Rotate {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// root, targets, snapshot or timestamp
        #[arg(long, value_name = "ROLE")]
        role: String,
        /// A key to add (public or private file; repeatable)
        #[arg(long = "add-key", value_name = "FILE")]
        add: Vec<PathBuf>,
        /// A key to remove (key id or key file; repeatable)
        #[arg(long = "remove-key", value_name = "KEYID|FILE")]
        remove: Vec<String>,
        #[arg(long, value_name = "N")]
        threshold: Option<u64>,
        #[arg(long, value_name = "WHEN")]
        expires: Option<String>,
    },
    /// Stage a target NAME naming the apps (each resolved to its digest)
    AddTarget {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(value_name = "APP_REF", required = true)]
        apps: Vec<String>,
        /// The hardware or group tag of the devices it is for
        #[arg(long, value_name = "TAG")]
        hardware: Option<String>,
        /// The oldest stowage that may apply it
        #[arg(long, value_name = "VERSION")]
        min_stowage_version: Option<String>,
        /// When the targets metadata expires
        #[arg(long, value_name = "WHEN")]
        expires: Option<String>,
    },
    /// Stage the targets without NAME
    RemoveTarget {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Add signatures to the staged root or targets, one key file or more
    Sign {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// root or targets
        #[arg(long, value_name = "ROLE")]
        role: String,
        /// A private key file (repeatable)
        #[arg(long = "key", value_name = "FILE", required = true)]
        keys: Vec<PathBuf>,
        /// A new expiry for the role (drops the signatures it had)
        #[arg(long, value_name = "WHEN")]
        expires: Option<String>,
    },
    /// Take the staged roles, sign a new snapshot and timestamp, verify, and copy to each --to
    Publish {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The snapshot and timestamp private keys (repeatable)
        #[arg(long = "key", value_name = "FILE", required = true)]
        keys: Vec<PathBuf>,
        /// A registry repository (REGISTRY/REPO) or an export (oci:DIR); repeatable
        #[arg(long, value_name = "DEST")]
        to: Vec<String>,
        #[arg(long, value_name = "WHEN")]
        snapshot_expires: Option<String>,
        #[arg(long, value_name = "WHEN")]
        timestamp_expires: Option<String>,
    },
    /// Sign a new timestamp (run on a schedule) and copy it to each --to
    Timestamp {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The timestamp private key (repeatable)
        #[arg(long = "key", value_name = "FILE", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long, value_name = "DEST")]
        to: Vec<String>,
        /// When it expires [default: 1d]
        #[arg(long, value_name = "WHEN")]
        expires: Option<String>,
    },
    /// Show the repository's roles (versions, expiry, signatures), staged roles and targets
    Show {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum TufKeyCommand {
    /// Write a new ed25519 private key to FILE and its public key to FILE.pub.json
    Gen {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Args)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub fit: FitArgs,
    /// Blobs downloaded at once (1-64)
    #[arg(long, value_name = "N", value_parser = jobs_parser())]
    pub jobs: Option<usize>,
    /// Seconds the new apps have to be running and healthy
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub verify_timeout: u64,
    /// When the update does not fit, what it may free first, in order of
    /// harm: none; prune (stale partial downloads, then blobs and images no
    /// app needs); drop-rollback (also the rollback copy) [default: the
    /// config file's make_room, else none]
    #[arg(long, value_name = "POLICY", env = "STOWAGE_MAKE_ROOM")]
    pub make_room: Option<stowage::config::MakeRoom>,
    /// Every app the device should run (REGISTRY/REPO:TAG or @sha256:...); running apps not named are stopped
    #[arg(value_name = "REF", required = true)]
    pub apps: Vec<String>,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The device architecture [default: from the kernel]
    #[arg(long, value_name = "ARCH")]
    pub arch: Option<String>,
    /// Stored apps (names, references or digests), then the directory to
    /// write (a stowage store; apply it with `stowage update oci:DIR`)
    #[arg(value_name = "NAME|REF... DIR", required = true, num_args = 2..)]
    pub args: Vec<String>,
}

#[derive(Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub fit: FitArgs,
    /// The target to follow: REGISTRY/REPO:TAG
    #[arg(long, value_name = "REF")]
    pub target: String,
    /// Time between polls, e.g. 30s, 5m, 1h
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    pub interval: String,
    /// Seconds the new apps have to be running and healthy
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub verify_timeout: u64,
    /// Poll once and exit (the exit code says how it went)
    #[arg(long)]
    pub once: bool,
    /// How long one poll may spend fetching, checking and pulling the
    /// target before it gives up (what it downloaded is kept), e.g. 1h
    #[arg(long, default_value = "1h", value_name = "DURATION")]
    pub cycle_timeout: String,
    /// Tries an app that keeps going down gets before it is left down (failed)
    #[arg(long, default_value_t = DEFAULT_RESTART_LIMIT, value_name = "N")]
    pub restart_limit: u32,
}

#[derive(Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub fit: FitArgs,
    /// Tries an app that keeps going down gets before it is left down (failed)
    #[arg(long, default_value_t = DEFAULT_RESTART_LIMIT, value_name = "N")]
    pub restart_limit: u32,
}

#[derive(Subcommand)]
pub enum TargetCommand {
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
pub struct DockerArgs {
    /// The Docker engine [default: DOCKER_HOST or the local socket]
    #[arg(long, value_name = "URL")]
    pub docker_host: Option<String>,
}

#[derive(Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub fit: FitArgs,
    /// A stored app: its name, reference or digest
    #[arg(value_name = "NAME|REF")]
    pub app: String,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub fit: FitArgs,
    /// Every installed app
    #[arg(long, conflicts_with = "apps")]
    pub all: bool,
    /// Stored apps: names, references or digests
    #[arg(value_name = "NAME", required_unless_present = "all")]
    pub apps: Vec<String>,
}

#[derive(Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub docker: DockerArgs,
    /// Every installed app
    #[arg(long, conflicts_with = "apps")]
    pub all: bool,
    #[arg(value_name = "NAME", required_unless_present = "all")]
    pub apps: Vec<String>,
}

#[derive(Args)]
pub struct DfArgs {
    #[command(flatten)]
    pub docker: DockerArgs,
    /// The device architecture [default: from the kernel]
    #[arg(long, value_name = "ARCH")]
    pub arch: Option<String>,
}

#[derive(Args, Clone)]
pub struct FitArgs {
    /// An update may fill each volume up to this percentage (20-99) [default: 80]
    #[arg(
        long,
        value_name = "PCT",
        env = "STOWAGE_WATERMARK",
        value_parser = clap::value_parser!(u8).range(20..=99)
    )]
    pub watermark: Option<u8>,
    /// Bytes always kept free on each volume, e.g. 512M [default: 0]
    #[arg(long, value_name = "SIZE")]
    pub reserve: Option<String>,
    /// The device architecture (amd64, arm64, arm/v7) [default: from the kernel]
    #[arg(long, value_name = "ARCH")]
    pub arch: Option<String>,
    /// The Docker engine to ask what it holds [default: DOCKER_HOST or the local socket]
    #[arg(long, value_name = "URL")]
    pub docker_host: Option<String>,
    /// How install hands images to Docker: lean (one layer per load, the
    /// least temporary disk) or whole (whole images, faster, up to twice the
    /// temporary disk, when that fits) [default: the config file's
    /// load_path, else lean]
    #[arg(long, value_name = "PATH", env = "STOWAGE_LOAD_PATH")]
    pub load_path: Option<stowage::config::LoadPath>,
}

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub fit: FitArgs,
    /// The apps: REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:...
    #[arg(value_name = "REF", required = true)]
    pub apps: Vec<String>,
}

#[derive(Args)]
pub struct PullArgs {
    #[command(flatten)]
    pub fit: FitArgs,
    /// Blobs downloaded at once (1-64)
    #[arg(long, value_name = "N", value_parser = jobs_parser())]
    pub jobs: Option<usize>,
    #[arg(value_name = "REF", required = true)]
    pub apps: Vec<String>,
}

#[derive(Args)]
pub struct RmArgs {
    #[command(flatten)]
    pub docker: DockerArgs,
    /// An app name (all its versions), reference or digest
    #[arg(value_name = "NAME|REF")]
    pub app: String,
}

#[derive(Args)]
pub struct PruneArgs {
    /// Say what would be removed, remove nothing
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub docker: DockerArgs,
}

#[derive(Args)]
pub struct FsckArgs {
    /// Check the stored blobs by size only, do not hash
    #[arg(long)]
    pub quick: bool,
    /// Also hash every file of the installed apps' layers in Docker (reads them all)
    #[arg(long)]
    pub deep: bool,
    /// Restore from the blob store, with no network, the images of installed apps that Docker lost or damaged
    #[arg(long)]
    pub repair: bool,
    #[command(flatten)]
    pub fit: FitArgs,
}

#[derive(Args)]
pub struct PublishArgs {
    /// The compose file (default: docker-compose.yml, compose.yml or compose.yaml in the app directory); one only
    #[arg(short = 'f', long = "file", value_name = "COMPOSE_FILE")]
    pub file: Vec<PathBuf>,
    /// The app directory [default: the compose file's directory with -f, else .]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Architectures to publish, comma separated (default: all that every image provides)
    #[arg(long, value_delimiter = ',', value_name = "ARCH,...")]
    pub arch: Vec<String>,
    /// A YAML or JSON map of image name to digest, used instead of asking registries
    #[arg(long, value_name = "FILE")]
    pub pinned_images: Option<PathBuf>,
    /// Show what would be pushed, push nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Layers downloaded and analysed at once (1-64)
    #[arg(long, default_value_t = DEFAULT_JOBS, value_name = "N", value_parser = jobs_parser())]
    pub jobs: usize,
    /// Where analysed layers are cached [default: ~/.cache/stowage]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Repositories of the target's registry that may hold the app's blobs (as when promoting an app): mount them from there instead of uploading, comma separated
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "REGISTRY/REPO,...",
        env = "STOWAGE_MOUNT_FROM"
    )]
    pub mount_from: Vec<String>,
    /// Where to push the app
    #[arg(value_name = "REGISTRY/REPO:TAG")]
    pub target: String,
}

#[derive(Args)]
pub struct InspectArgs {
    /// The app: REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:...
    #[arg(value_name = "REF")]
    pub app: String,
}

impl Cli {
    pub fn globals(&self) -> GlobalOptions {
        GlobalOptions {
            root: self.root.clone(),
            insecure_registries: self.insecure_registry.clone(),
            ca_file: self.ca_file.clone(),
            config: self.config.clone(),
            registry_timeout: self.registry_timeout,
            min_transfer_rate: self.min_transfer_rate.clone(),
            transfer_window: self.transfer_window,
            trusted_root: self.trusted_root.clone(),
            hardware: self.hardware.clone(),
            compose: self.compose,
        }
    }
}

impl From<FitArgs> for FitOptions {
    fn from(args: FitArgs) -> FitOptions {
        FitOptions {
            watermark: args.watermark,
            reserve: args.reserve,
            arch: args.arch,
            docker_host: args.docker_host,
            load_path: args.load_path,
        }
    }
}

/// `--all`, or the apps named.
pub fn selection(all: bool, apps: Vec<String>) -> Selection {
    if all {
        Selection::All
    } else {
        Selection::Named(apps)
    }
}
