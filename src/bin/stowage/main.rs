//! The `stowage` command line: parses flags into the library's command
//! options (`args`), runs them, and renders the results for a person or,
//! with `--json`, for a script (`output`). Exit codes come from the
//! outcome's or the error's type: 0 success, 1 failure, 2 usage error, 100
//! the update does not fit.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use stowage::commands::{
    Context, agent, check, df, export, fsck, inspect, install, ls, prune, ps, publish, pull,
    reconcile, rm, run, status, stop, target, tuf, update,
};
use stowage::engine::layers::DamageFound;
use stowage::plan::DoesNotFit;
use stowage::update::transaction::UpdateEvent;
use stowage::update::tuf::TrustError;

mod args;
mod output;

use args::{Cli, Command, TargetCommand, TufCommand, TufKeyCommand, selection};

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
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code of a failed command: 100 when the update does not fit, 101
/// when a target is refused for trust, 1 for any other error.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.is::<DoesNotFit>() {
        DoesNotFit::EXIT_CODE
    } else if e.is::<TrustError>() {
        TrustError::EXIT_CODE
    } else {
        1
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
    let ctx = Context::resolve(&cli.globals())?;
    let json = cli.json;
    // Commands that stream progress as JSON lines with --json; the others
    // print one JSON document on stdout and keep their progress on stderr.
    let json_lines = json
        && matches!(
            cli.command,
            Command::Pull(_) | Command::Update(_) | Command::Agent(_)
        );
    let progress = output::progress(json_lines, std::io::stderr().is_terminal());
    let progress = progress.as_ref();
    match cli.command {
        Command::Publish(args) => {
            let options = publish::PublishOptions {
                app_dir: args.dir,
                compose_files: args.file,
                archs: args.arch,
                pinned_images: args.pinned_images,
                dry_run: args.dry_run,
                target: args.target,
                cache_dir: args.cache_dir,
                jobs: args.jobs,
                mount_from: args.mount_from,
            };
            output::publish(&options.run(&ctx, progress).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect(args) => {
            output::inspect(&inspect::run(&ctx, &args.app).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => {
            let options = check::CheckOptions {
                apps: args.apps,
                fit: args.fit.into(),
            };
            let report = options.run(&ctx).await?;
            output::check(&report, json)?;
            Ok(if report.fit.fits {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(DoesNotFit::EXIT_CODE)
            })
        }
        Command::Pull(args) => {
            let options = pull::PullOptions {
                apps: args.apps,
                fit: args.fit.into(),
                jobs: args.jobs,
            };
            match options.run(&ctx, progress).await {
                Ok(pull::Pulled::Registry(report)) => output::pull(&report, json)?,
                Ok(pull::Pulled::Export(report)) => output::import(&report, json)?,
                Err(e) => return refused_or(e, json, output::pull_refused),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls => {
            output::ls(&ls::run(&ctx).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm(args) => {
            let options = rm::RmOptions {
                app: args.app,
                docker_host: args.docker.docker_host,
            };
            output::rm(&options.run(&ctx).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Prune(args) => {
            let options = prune::PruneOptions {
                dry_run: args.dry_run,
                docker_host: args.docker.docker_host,
            };
            let report = options.run(&ctx).await?;
            output::prune(&report.blobs, Some(&report.docker), json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Fsck(args) => {
            let options = fsck::FsckOptions {
                quick: args.quick,
                deep: args.deep,
                repair: args.repair,
                fit: args.fit.into(),
            };
            let report = options.run(&ctx, progress).await?;
            output::fsck(&report.store, &report.installed, &report.engine, json)?;
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(DamageFound::EXIT_CODE)
            })
        }
        Command::Install(args) => {
            let options = install::InstallOptions {
                app: args.app,
                fit: args.fit.into(),
            };
            match options.run(&ctx, progress).await {
                Ok(report) => output::install(&report, json)?,
                Err(e) => return refused_or(e, json, output::check),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let options = run::RunOptions {
                apps: selection(args.all, args.apps),
                fit: args.fit.into(),
            };
            match options.run(&ctx, progress).await {
                Ok(report) => output::run(&report, json)?,
                Err(e) => return refused_or(e, json, output::check),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stop(args) => {
            let options = stop::StopOptions {
                apps: selection(args.all, args.apps),
                docker_host: args.docker.docker_host,
            };
            output::stop(&options.run(&ctx, progress).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ps(args) => {
            output::ps(&ps::run(&ctx, args.docker_host.as_deref()).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Df(args) => {
            let options = df::DfOptions {
                arch: args.arch,
                docker_host: args.docker.docker_host,
            };
            output::df(&options.run(&ctx).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Export(args) => {
            let mut apps = args.args;
            let Some(dir) = apps.pop() else {
                anyhow::bail!("name the apps to export, then the directory");
            };
            let options = export::ExportOptions {
                apps,
                dir: dir.into(),
                arch: args.arch,
            };
            output::export(&options.run(&ctx, progress).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Update(args) => {
            let options = update::UpdateOptions {
                apps: args.apps,
                fit: args.fit.into(),
                jobs: args.jobs,
                verify_timeout: std::time::Duration::from_secs(args.verify_timeout),
                make_room: args.make_room,
            };
            let outcome = options.run(&ctx, progress, events(json)).await?;
            output::update_outcome(outcome, json)
        }
        Command::Agent(args) => {
            let options = agent::AgentOptions {
                target: args.target,
                interval: parse_duration(&args.interval)?,
                verify_timeout: std::time::Duration::from_secs(args.verify_timeout),
                once: args.once,
                cycle_timeout: parse_duration(&args.cycle_timeout)?,
                restart_limit: args.restart_limit,
                fit: args.fit.into(),
            };
            let status = options.run(&ctx, progress, events(json)).await?;
            output::agent(&status, json)?;
            Ok(ExitCode::from(status.last_result.exit_code()))
        }
        Command::Status(args) => {
            output::status(&status::run(&ctx, args.docker_host.as_deref()).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reconcile(args) => {
            let options = reconcile::ReconcileOptions {
                restart_limit: args.restart_limit,
                fit: args.fit.into(),
            };
            let report = options.run(&ctx, progress).await?;
            output::reconcile(&report, json)?;
            Ok(if report.is_healthy() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Target(TargetCommand::Publish { at, apps }) => {
            output::target(&target::publish(&ctx, &at, &apps).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Target(TargetCommand::Show { at }) => {
            output::target(&target::show(&ctx, &at).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tuf(command) => run_tuf(&ctx, command, json).await,
    }
}

async fn run_tuf(
    ctx: &stowage::commands::Context,
    command: TufCommand,
    json: bool,
) -> Result<ExitCode> {
    match command {
        TufCommand::Key(TufKeyCommand::Gen { file }) => {
            output::tuf_key(&tuf::key_gen(&file)?, json)?
        }
        TufCommand::Init {
            dir,
            root_keys,
            root_threshold,
            targets_keys,
            targets_threshold,
            snapshot_keys,
            timestamp_keys,
            expires,
        } => {
            let options = tuf::InitOptions {
                dir,
                root_keys,
                root_threshold,
                targets_keys,
                targets_threshold,
                snapshot_keys,
                timestamp_keys,
                expires,
            };
            output::tuf_repo(&options.run()?, json)?
        }
        TufCommand::Rotate {
            dir,
            role,
            add,
            remove,
            threshold,
            expires,
        } => {
            let options = tuf::RotateOptions {
                dir,
                role,
                add,
                remove,
                threshold,
                expires,
            };
            output::tuf_repo(&options.run()?, json)?
        }
        TufCommand::AddTarget {
            dir,
            name,
            apps,
            hardware,
            min_stowage_version,
            expires,
        } => {
            let options = tuf::AddTargetOptions {
                dir,
                name,
                apps,
                hardware,
                min_stowage_version,
                expires,
            };
            output::tuf_target(&options.run(ctx).await?, json)?
        }
        TufCommand::RemoveTarget { dir, name } => {
            output::tuf_repo(&tuf::remove_target(&dir, &name)?, json)?
        }
        TufCommand::Sign {
            dir,
            role,
            keys,
            expires,
        } => output::tuf_repo(
            &tuf::sign(&dir, &role, &keys, expires.as_deref()).await?,
            json,
        )?,
        TufCommand::Publish {
            dir,
            keys,
            to,
            snapshot_expires,
            timestamp_expires,
        } => {
            let options = tuf::PublishOptions {
                dir,
                keys,
                to,
                snapshot_expires,
                timestamp_expires,
                timestamp_only: false,
            };
            output::tuf_publish(&options.run(ctx).await?, json)?
        }
        TufCommand::Timestamp {
            dir,
            keys,
            to,
            expires,
        } => {
            let options = tuf::PublishOptions {
                dir,
                keys,
                to,
                snapshot_expires: None,
                timestamp_expires: expires,
                timestamp_only: true,
            };
            output::tuf_publish(&options.run(ctx).await?, json)?
        }
        TufCommand::Show { dir } => output::tuf_repo(&tuf::show(&dir)?, json)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the update transaction's events go: JSON lines, or a line of text each.
fn events(json: bool) -> &'static (dyn Fn(&UpdateEvent) + Send + Sync) {
    if json {
        &|e| output::print_json_line(e)
    } else {
        &|e| output::update_event(e)
    }
}

/// Exit 100 with the check's table (rendered by `show`) when `error` is an
/// update that does not fit; any other error goes on.
fn refused_or(
    error: anyhow::Error,
    json: bool,
    show: fn(&stowage::plan::CheckReport, bool) -> Result<()>,
) -> Result<ExitCode> {
    match error.downcast::<DoesNotFit>() {
        Ok(refused) => {
            show(&refused.report, json)?;
            eprintln!(
                "stowage: error: the update does not fit: {}",
                refused.report.fit.shortfall()
            );
            Ok(ExitCode::from(DoesNotFit::EXIT_CODE))
        }
        Err(e) => Err(e),
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
