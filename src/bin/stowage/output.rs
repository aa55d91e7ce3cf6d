//! How results and progress look: tables and bars for a person, JSON for a
//! script. Results go to stdout, progress and logs to stderr, except that
//! `--json` progress goes to stdout as JSON lines, ahead of the result.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;

use stowage::Digest;
use stowage::app::inspect::AppDescription;
use stowage::app::publish::PublishReport;
use stowage::app::stored::RmReport;
use stowage::app::stored::StoredApp;
use stowage::commands::df::DfReport;
use stowage::engine::install::{ImageAction, InstallReport};
use stowage::engine::prune::DockerPruneReport;
use stowage::engine::repair::{EngineDamage, InstalledCheck};
use stowage::engine::run::{AppStatus, RunReport, StopReport};
use stowage::plan::CheckReport;
use stowage::progress::{Event, NoProgress, Progress};
use stowage::store::{FsckReport, PruneReport};
use stowage::update::pull::PullReport;

/// `println!` for results. A reader that went away (`stowage ls | head -1`)
/// costs the rest of the output, not the command: a pull or a prune piped
/// into a closed pipe still finishes its work. Other write errors are said
/// once on stderr.
macro_rules! out {
    ($($arg:tt)*) => {
        write_stdout_line(format_args!($($arg)*))
    };
}

/// Set when a result could not be written for another reason than a closed
/// pipe: the command then exits 1 (see [`stdout_failed`]).
static STDOUT_FAILED: AtomicBool = AtomicBool::new(false);

fn write_stdout_line(line: std::fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(line).and_then(|()| out.write_all(b"\n"))
        && e.kind() != std::io::ErrorKind::BrokenPipe
        && !STDOUT_FAILED.swap(true, Ordering::Relaxed)
    {
        eprintln!("stowage: error: cannot write the result to stdout: {e}");
    }
}

/// Whether some result was lost to a write error other than a closed pipe.
pub fn stdout_failed() -> bool {
    STDOUT_FAILED.load(Ordering::Relaxed)
}

pub fn progress(json: bool, terminal: bool) -> Box<dyn Progress> {
    if json {
        Box::new(JsonLines)
    } else if terminal {
        Box::new(Bars::default())
    } else {
        Box::new(PlainSteps)
    }
}

/// JSON lines on stdout, one per event.
struct JsonLines;

impl Progress for JsonLines {
    fn emit(&self, event: Event) {
        if matches!(event, Event::BlobProgress { .. }) {
            return;
        }
        print_json_line(&event);
    }
}

pub fn print_json_line<T: Serialize>(value: &T) {
    if let Ok(line) = serde_json::to_string(value) {
        out!("{line}");
    }
}

/// Steps as plain lines on stderr, for logs and pipes.
struct PlainSteps;

impl Progress for PlainSteps {
    fn emit(&self, event: Event) {
        match event {
            Event::Step { message } => eprintln!("{message}"),
            Event::Transfer { blobs, bytes } => {
                eprintln!("downloading {blobs} blobs ({})", human_bytes(bytes))
            }
            Event::BlobDone { digest, size } => {
                eprintln!("fetched {} ({})", digest.short(), human_bytes(size))
            }
            _ => {}
        }
    }
}

/// indicatif bars on a terminal: one per blob in flight, under a total of
/// bytes, rate and blobs when the command announced its transfer.
#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    state: Mutex<BarsState>,
}

#[derive(Default)]
struct BarsState {
    /// Each blob in flight, with the position its bar was last set to.
    blobs: HashMap<Digest, (ProgressBar, u64)>,
    total: Option<ProgressBar>,
    blobs_done: usize,
    blobs_total: usize,
}

impl BarsState {
    /// Moves a blob's bar, and the total by as much.
    fn move_blob(&mut self, digest: &Digest, position: u64) {
        let Some((bar, last)) = self.blobs.get_mut(digest) else {
            return;
        };
        bar.set_position(position);
        if let Some(total) = &self.total {
            // A registry that restarts a blob from zero moves it back.
            total.set_position((total.position() + position).saturating_sub(*last));
        }
        *last = position;
    }

    fn say_blobs(&self) {
        if let Some(total) = &self.total {
            total.set_message(format!("blobs {}/{}", self.blobs_done, self.blobs_total));
        }
    }
}

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Progress for Bars {
    fn emit(&self, event: Event) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        match event {
            Event::Step { message } => {
                let _ = self.multi.println(message);
            }
            Event::Transfer { blobs, bytes } => {
                let total = self.multi.insert(0, ProgressBar::new(bytes));
                total.set_style(bar_style(
                    "total        [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta} {msg}",
                ));
                state.total = Some(total);
                state.blobs_total = blobs;
                state.say_blobs();
            }
            Event::BlobStarted {
                digest,
                size,
                offset,
            } => {
                // A resumed blob keeps its bar.
                if !state.blobs.contains_key(&digest) {
                    let bar = self.multi.add(ProgressBar::new(size));
                    bar.set_style(bar_style(
                        "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
                    ));
                    bar.set_prefix(digest.short().to_string());
                    state.blobs.insert(digest.clone(), (bar, 0));
                }
                state.move_blob(&digest, offset);
            }
            Event::BlobProgress { digest, done, .. } => state.move_blob(&digest, done),
            Event::BlobDone { digest, size } => {
                state.move_blob(&digest, size);
                if let Some((bar, _)) = state.blobs.remove(&digest) {
                    bar.finish_and_clear();
                }
                state.blobs_done += 1;
                state.say_blobs();
                if state.blobs_done == state.blobs_total
                    && let Some(total) = state.total.take()
                {
                    total.finish_and_clear();
                }
            }
        }
    }
}

#[allow(dead_code)]
pub fn quiet() -> Box<dyn Progress> {
    Box::new(NoProgress)
}

pub use stowage::plan::space::human_bytes;

pub fn publish(report: &PublishReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for (service, image) in &report.services {
        out!("service {service}: {image}");
    }
    for (arch, s) in &report.architectures {
        out!(
            "{arch}: {} layers, download {}, unpacked {}, disk usage {} (4 KiB blocks), {} inodes",
            s.layers,
            human_bytes(s.download_size),
            human_bytes(s.size),
            human_bytes(s.usage),
            s.inodes
        );
    }
    if report.dry_run {
        out!("dry run: nothing pushed; would push:");
        for blob in &report.pushed {
            out!("  {} {} ({} bytes)", blob.what, blob.digest, blob.size);
        }
        out!("{}", String::from_utf8_lossy(&report.manifest));
    }
    out!("{}", report.reference);
    Ok(())
}

pub fn inspect(app: &AppDescription, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(app)?);
        return Ok(());
    }
    out!("app:      {}", app.reference);
    out!(
        "bundle:   {} ({})",
        app.compose_file,
        human_bytes(app.bundle_size)
    );
    out!("services:");
    for (service, image) in &app.services {
        out!("  {service:<16} {image}");
    }
    out!("architectures:");
    out!(
        "  {:<8} {:>7} {:>12} {:>12}",
        "ARCH",
        "LAYERS",
        "DOWNLOAD",
        "DISK USAGE"
    );
    for (arch, f) in &app.architectures {
        out!(
            "  {arch:<8} {:>7} {:>12} {:>12}",
            f.layers,
            human_bytes(f.download_size),
            human_bytes(f.usage)
        );
    }
    out!("compose file ({}):", app.compose_file);
    for line in app.compose.lines() {
        out!("  {line}");
    }
    Ok(())
}

pub fn check(report: &CheckReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for app in &report.apps {
        out!(
            "app {} ({}): {} layers, {} to download ({} layers)",
            app.name,
            app.architecture,
            app.layers,
            human_bytes(app.download_bytes),
            app.layers_missing
        );
    }
    out!(
        "policy: keep max({}%, {}) of each volume free",
        100 - report.fit.policy.watermark_pct as u32,
        human_bytes(report.fit.policy.reserve_bytes)
    );
    out!(
        "{:<7} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>19}  VERDICT",
        "VOLUME",
        "BLOCK",
        "SIZE",
        "FREE",
        "RESERVED",
        "AVAILABLE",
        "REQUIRED",
        "INODES REQ/FREE"
    );
    for (i, v) in report.fit.volumes.iter().enumerate() {
        out!(
            "{:<7} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>19}  {}",
            format!("#{}", i + 1),
            v.block_size,
            human_bytes(v.size),
            human_bytes(v.free),
            human_bytes(v.reserved),
            human_bytes(v.available),
            human_bytes(v.required),
            format!("{}/{}", v.inodes_required, v.inodes_free),
            if v.fits { "fits" } else { "DOES NOT FIT" }
        );
        out!("        paths:    {}", v.paths.join(", "));
        let parts: Vec<String> = v
            .required_parts
            .iter()
            .map(|(part, n)| format!("{} {}", part.label(), human_bytes(*n)))
            .collect();
        out!("        required: {}", parts.join(" + "));
        out!(
            "        peak:     {} during the {} (all it writes, freed or not: {})",
            human_bytes(v.required),
            v.peak_step.label(),
            human_bytes(v.sum_of_parts)
        );
        if !v.fits {
            out!("        {}", v.reason);
        }
    }
    for note in &report.fit.notes {
        out!("note: {note}");
    }
    if let Some(plan) = &report.make_room {
        out!("{}", plan.render().trim_end());
    }
    out!(
        "{}",
        if report.fit.fits {
            "the update fits"
        } else {
            "the update does NOT fit"
        }
    );
    Ok(())
}

/// A pull refused because the update does not fit: the plan's table, or
/// with `--json` one last JSON line (pull's output is JSON lines).
pub fn pull_refused(report: &CheckReport, json: bool) -> Result<()> {
    if json {
        print_json_line(&serde_json::json!({"event": "does_not_fit", "report": report}));
        return Ok(());
    }
    check(report, false)
}

pub fn pull(report: &PullReport, json: bool) -> Result<()> {
    if json {
        print_json_line(&serde_json::json!({"event": "pulled", "report": report}));
        return Ok(());
    }
    out!(
        "fetched {} blobs ({}); stored: {}",
        report.fetched_blobs,
        human_bytes(report.fetched_bytes),
        report.apps.join(", ")
    );
    Ok(())
}

pub fn ls(apps: &[StoredApp], json: bool) -> Result<()> {
    if json {
        let rows: Vec<_> = apps
            .iter()
            .map(|a| {
                serde_json::json!({
                    "name": a.name,
                    "reference": a.reference,
                    "state": if a.is_complete() { "fetched" } else { "partial" },
                    "stored_bytes": a.stored_bytes,
                    "missing_blobs": a.missing,
                    "services": a.images.iter().map(|i| (i.service.clone(), i.pinned.clone())).collect::<std::collections::BTreeMap<_, _>>(),
                })
            })
            .collect();
        out!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    out!("{:<20} {:<9} {:>10}  REFERENCE", "NAME", "STATE", "SIZE");
    for a in apps {
        out!(
            "{:<20} {:<9} {:>10}  {}",
            a.name,
            if a.is_complete() {
                "fetched"
            } else {
                "partial"
            },
            human_bytes(a.stored_bytes),
            a.reference
        );
    }
    Ok(())
}

pub fn rm(report: &RmReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for r in &report.forgotten {
        out!("forgot {r}");
    }
    out!("run `stowage prune` to free its blobs");
    Ok(())
}

pub fn prune(
    report: &PruneReport,
    docker: Option<&Result<DockerPruneReport, String>>,
    json: bool,
) -> Result<()> {
    if json {
        let docker_value = match docker {
            Some(Ok(d)) => serde_json::to_value(d)?,
            Some(Err(e)) => serde_json::json!({"error": e}),
            None => serde_json::Value::Null,
        };
        let value = serde_json::json!({
            "docker": docker_value,
            "dry_run": report.dry_run,
            "removed_blobs": report.removed.iter().map(|(d, n)| serde_json::json!({"digest": d, "size": n})).collect::<Vec<_>>(),
            "freed_bytes": report.freed_bytes,
            "stale_ingests": report.stale_ingests_removed.iter().map(|(d, n)| serde_json::json!({"digest": d, "size": n})).collect::<Vec<_>>(),
            "stale_ingest_bytes": report.stale_ingest_bytes,
            "kept_blobs": report.kept,
        });
        out!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for (d, n) in &report.removed {
        out!("{verb} blob {d} ({})", human_bytes(*n));
    }
    for (d, n) in &report.stale_ingests_removed {
        out!("{verb} partial download {d} ({})", human_bytes(*n));
    }
    out!(
        "blob store: {verb} {} blobs ({}) and {} partial downloads ({}); kept {} blobs",
        report.removed.len(),
        human_bytes(report.freed_bytes),
        report.stale_ingests_removed.len(),
        human_bytes(report.stale_ingest_bytes),
        report.kept
    );
    match docker {
        Some(Ok(d)) => {
            for image in &d.removed {
                out!(
                    "{verb} image {} {} ({})",
                    image.image_id.short(),
                    image.tags.join(", "),
                    human_bytes(image.bytes)
                );
            }
            for image in &d.kept_in_use {
                out!(
                    "kept image {} {}: used by container {}",
                    image.image_id.short(),
                    image.tags.join(", "),
                    image.containers.join(", ")
                );
            }
            out!(
                "docker images: {verb} {} images stowage loaded ({}); kept {} in use by containers",
                d.removed.len(),
                human_bytes(d.freed_bytes),
                d.kept_in_use.len()
            );
        }
        Some(Err(e)) => out!("docker images: not pruned: {e}"),
        None => {}
    }
    Ok(())
}

pub fn install(report: &InstallReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for image in &report.images {
        let what = match image.action {
            ImageAction::Loaded => format!(
                "loaded: {} of {} layers sent ({}), {} already held, {:.1} s",
                image.layers_sent,
                image.layers,
                human_bytes(image.bytes_sent),
                image.layers_skipped,
                image.seconds
            ),
            ImageAction::Present => "already in Docker".to_string(),
            ImageAction::Tagged => "already in Docker, tagged".to_string(),
        };
        out!(
            "{:<24} {}  {what}",
            image.services.join(","),
            image.tags.first().map_or("", String::as_str)
        );
    }
    out!(
        "installed {} ({}) in {}",
        report.name,
        report.reference,
        report.dir.display()
    );
    Ok(())
}

pub fn run(report: &RunReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for install in &report.installs {
        let loaded = install
            .images
            .iter()
            .filter(|i| i.action == ImageAction::Loaded)
            .count();
        if loaded > 0 || install.bundle_extracted {
            out!(
                "installed {}: {loaded} images loaded ({} layers sent)",
                install.name,
                install.layers_sent()
            );
        }
    }
    for name in &report.started {
        out!("started {name}");
    }
    Ok(())
}

pub fn stop(report: &StopReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for name in &report.stopped {
        out!("stopped {name}");
    }
    Ok(())
}

pub fn ps(apps: &[AppStatus], json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(apps)?);
        return Ok(());
    }
    out!(
        "{:<20} {:<9} {:<16} {:<12} {:<10} CONTAINER",
        "APP",
        "APP STATE",
        "SERVICE",
        "STATE",
        "HEALTH"
    );
    for app in apps {
        for service in &app.services {
            let state = match service.exit_code {
                Some(code) if service.state != "running" => format!("{} ({code})", service.state),
                _ => service.state.clone(),
            };
            out!(
                "{:<20} {:<9} {:<16} {:<12} {:<10} {}",
                app.name,
                app.state,
                service.service,
                state,
                service.health.as_deref().unwrap_or("-"),
                service.container
            );
        }
    }
    Ok(())
}

pub fn df(report: &DfReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    out!("{:<16} {:>10} {:>7}  DETAIL", "STORE", "SIZE", "ITEMS");
    for store in &report.stores {
        out!(
            "{:<16} {:>10} {:>7}  {} ({})",
            store.store,
            human_bytes(store.bytes),
            store.items,
            store.detail,
            store.path.display()
        );
    }
    out!("");
    out!(
        "{:<20} {:<9} {:>10} {:>10} {:>10}  REFERENCE",
        "APP",
        "INSTALLED",
        "STORE",
        "DOCKER",
        "DIRECTORY"
    );
    for app in &report.apps {
        out!(
            "{:<20} {:<9} {:>10} {:>10} {:>10}  {}",
            app.name,
            if app.installed { "yes" } else { "no" },
            human_bytes(app.store_bytes),
            human_bytes(app.docker_bytes),
            human_bytes(app.dir_bytes),
            app.reference
        );
    }
    out!("");
    out!(
        "{:>10} {:>10} {:>10} {:>6}  PATHS",
        "SIZE",
        "USED",
        "FREE",
        "BLOCK"
    );
    for volume in &report.volumes {
        out!(
            "{:>10} {:>10} {:>10} {:>6}  {}",
            human_bytes(volume.size),
            human_bytes(volume.used),
            human_bytes(volume.free),
            volume.block_size,
            volume
                .paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for note in &report.notes {
        out!("note: {note}");
    }
    Ok(())
}

pub fn fsck(
    report: &FsckReport,
    installed: &[InstalledCheck],
    engine: &[EngineDamage],
    json: bool,
) -> Result<()> {
    let installed_clean = installed.iter().all(|c| c.is_healthy());
    if json {
        let value = serde_json::json!({
            "installed": installed,
            "engine": engine,
            "quick": report.quick,
            "checked": report.checked,
            "bytes_hashed": report.bytes_hashed,
            "corrupt": report.corrupt.iter().map(|c| serde_json::json!({"digest": c.digest, "reason": c.reason, "moved_to": c.moved_to})).collect::<Vec<_>>(),
            "moved_aside": report.moved_aside.iter().map(|c| serde_json::json!({"path": c.path, "reason": c.reason, "moved_to": c.moved_to})).collect::<Vec<_>>(),
            "missing_ref_targets": report.missing_ref_targets.iter().map(|(n, d)| serde_json::json!({"ref": n, "digest": d})).collect::<Vec<_>>(),
            "clean": report.is_clean() && installed_clean,
        });
        out!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    for c in &report.corrupt {
        out!(
            "corrupt blob {}: {} (moved to {})",
            c.digest,
            c.reason,
            c.moved_to.display()
        );
    }
    for s in &report.moved_aside {
        out!(
            "moved aside {}: {} (to {})",
            s.path.display(),
            s.reason,
            s.moved_to.display()
        );
    }
    for (n, d) in &report.missing_ref_targets {
        out!("ref {n} points at missing {d}: pull the app again");
    }
    for c in installed {
        for image in &c.damaged_images {
            let services = image.services.join(", ");
            if let Some(e) = &image.engine_error {
                out!(
                    "app {}: image {} ({services}): the engine cannot describe it: {e}",
                    c.name,
                    image.tag
                );
            }
            for layer in &image.layers {
                out!(
                    "app {}: image {} ({services}): layer {} (blob {}): {}",
                    c.name,
                    image.tag,
                    layer.diff_id,
                    layer.blob,
                    layer.problem
                );
                for file in &layer.files {
                    out!("  {}: {}", file.path, file.problem);
                }
                if layer.files_damaged > layer.files.len() {
                    out!("  ... and {} more", layer.files_damaged - layer.files.len());
                }
            }
        }
        for why in &c.foreign {
            out!("app {}: {why}", c.name);
        }
        if let Some(why) = &c.layers_not_checked {
            out!("app {}: {why}", c.name);
        }
        if c.repaired {
            out!(
                "app {}: restored from the blob store ({} images missing, {} damaged{})",
                c.name,
                c.missing_images.len(),
                c.damaged_images.len(),
                if c.directory_damaged {
                    ", directory rebuilt"
                } else {
                    ""
                }
            );
        } else if c.error.is_none()
            && (!c.missing_images.is_empty() || !c.damaged_images.is_empty() || c.directory_damaged)
        {
            let mut what = Vec::new();
            if !c.missing_images.is_empty() {
                what.push(format!("Docker lacks {}", c.missing_images.join(", ")));
            }
            if !c.damaged_images.is_empty() {
                what.push(format!(
                    "Docker's copy of {} is damaged",
                    c.damaged_images
                        .iter()
                        .map(|i| i.tag.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if c.directory_damaged {
                what.push("its directory is damaged".into());
            }
            out!(
                "app {}: {}; run `stowage fsck --repair`",
                c.name,
                what.join(", ")
            );
        }
        if let Some(e) = &c.error {
            out!("app {}: cannot be restored: {e}", c.name);
        }
    }
    for damage in engine {
        out!("engine: {}", damage.what);
        out!("engine: recover with: {}", damage.recover);
    }
    if !installed.is_empty() {
        out!(
            "checked {} installed apps: {}",
            installed.len(),
            if installed_clean {
                "intact"
            } else {
                "problems found"
            }
        );
    }
    out!(
        "checked {} blobs{}: {}",
        report.checked,
        if report.quick { " (sizes only)" } else { "" },
        if report.is_clean() {
            "clean"
        } else {
            "problems found"
        }
    );
    Ok(())
}

pub fn update_event(event: &stowage::update::transaction::UpdateEvent) {
    use stowage::update::transaction::UpdateEvent as E;
    let line = match event {
        E::Started { from, to } => format!("update: {} -> {}", apps_text(from), apps_text(to)),
        E::Recovering { phase, .. } => {
            format!("recovering an update interrupted while {phase:?}").to_lowercase()
        }
        E::Check { .. } => "the update fits; apps pulled".to_string(),
        E::MakingRoom { plan } => format!(
            "the update does not fit: making room\n{}",
            plan.render().trim_end()
        ),
        E::Freed { what } => format!("freed {}", what.label()),
        E::Installed { app, reference } => format!("installed {app} ({reference})"),
        E::Stopped { app } => format!("stopped {app}"),
        E::AppStarted { app, .. } => format!("started {app}"),
        E::Verified { app } => format!("verified {app}: every service running"),
        E::Committed { running, writes } => match writes {
            Some(w) => format!(
                "committed: running {}; wrote {} (store {}, engine {})",
                apps_text(running),
                human_bytes(w.store_bytes.saturating_add(w.engine_bytes)),
                human_bytes(w.store_bytes),
                human_bytes(w.engine_bytes)
            ),
            None => format!("committed: running {}", apps_text(running)),
        },
        E::RolledBack { running, error } => {
            format!("ROLLED BACK to {}: {error}", apps_text(running))
        }
        E::Pruned { report } => format!(
            "pruned: {} blobs ({}), {} images ({})",
            report.blob_store.removed_blobs,
            human_bytes(report.blob_store.freed_bytes),
            report.docker.removed_images,
            human_bytes(report.docker.freed_bytes)
        ),
        E::NothingToDo { running } => {
            format!("nothing to do: already running {}", apps_text(running))
        }
    };
    eprintln!("{line}");
}

fn apps_text(apps: &stowage::update::transaction::AppSet) -> String {
    if apps.is_empty() {
        return "(no apps)".into();
    }
    apps.iter()
        .map(|(n, r)| format!("{n}={r}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The exit code of an update: 0 committed or unchanged, 100 refused for
/// space, 1 otherwise (rolled back or failed).
pub fn update_outcome(
    outcome: stowage::update::transaction::Outcome,
    json: bool,
) -> Result<std::process::ExitCode> {
    use stowage::update::transaction::Outcome;
    let code = outcome.exit_code();
    let (result, error) = match outcome {
        Outcome::Committed => ("committed", None),
        Outcome::Unchanged => ("unchanged", None),
        Outcome::RolledBack(e) => ("rolled_back", Some(e)),
        Outcome::Refused(report) => {
            check(&report, json)?;
            let refused = stowage::plan::DoesNotFit { report };
            ("refused", Some(anyhow::anyhow!("{refused}")))
        }
        Outcome::Failed(e) => ("failed", Some(e)),
    };
    let message = error.map(|e| format!("{e:#}"));
    if json {
        print_json_line(
            &serde_json::json!({"event": "result", "result": result, "error": message}),
        );
    } else if let Some(m) = &message {
        eprintln!("stowage: error: update {}: {m}", result.replace('_', " "));
    }
    Ok(std::process::ExitCode::from(code))
}

/// `stowage agent`'s status after its poll.
pub fn agent(status: &stowage::update::agent::AgentStatus, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(status)?);
        return Ok(());
    }
    agent_lines(status);
    if let Some(report) = &status.reconcile {
        reconcile_lines(report);
    }
    Ok(())
}

fn agent_lines(status: &stowage::update::agent::AgentStatus) {
    out!("target:       {}", status.target);
    if let Some(d) = &status.target_digest {
        out!("target digest: {d}");
    }
    out!("should run:   {}", apps_text(&status.apps));
    out!("last result:  {}", status.last_result);
    if let Some(e) = &status.last_error {
        out!("last error:   {e}");
    }
    if status.consecutive_failures > 0 {
        out!("failures in a row: {}", status.consecutive_failures);
    }
    if let Some(e) = &status.reconcile_error {
        out!("reconcile error: {e}");
    }
    out!("next poll in: {} s", status.next_poll_in_secs);
}

/// `stowage status`: the recorded target or device state, then what runs now.
pub fn status(report: &stowage::commands::status::StatusReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    if let Some(agent) = &report.agent {
        agent_lines(agent);
    }
    if let Some(state) = &report.device {
        out!(
            "no agent has run; should run: {}",
            apps_text(&state.running)
        );
        if state.previous.is_empty() {
            out!("rollback copy: none (the apps that run cannot be rolled back)");
        } else {
            out!("rollback copy: {}", apps_text(&state.previous));
        }
    }
    match &report.docker_error {
        Some(e) => out!("running now:  unknown ({e})"),
        None if report.live_apps.is_empty() => out!("running now:  no app is installed"),
        None => {
            out!("running now:");
            for app in &report.live_apps {
                let down: Vec<String> = app
                    .services
                    .iter()
                    .filter(|s| !s.is_up())
                    .map(|s| format!("{}: {}", s.service, s.why_down()))
                    .collect();
                let detail = if down.is_empty() {
                    format!("{} services up", app.services.len())
                } else {
                    down.join(", ")
                };
                out!("  {:<20} {:<9} {detail}", app.name, app.state);
            }
        }
    }
    if let Some(restart) = &report.last_restart {
        restart_line(restart);
    }
    if let Some(writes) = &report.last_update_writes {
        let volumes: Vec<String> = writes
            .volumes
            .iter()
            .map(|v| format!("{} on {}", human_bytes(v.bytes), v.paths.join(" and ")))
            .collect();
        out!(
            "last update wrote: {} (store {}, engine {} of which {} temporary copies)",
            volumes.join("; "),
            human_bytes(writes.store_bytes),
            human_bytes(writes.engine_bytes),
            human_bytes(writes.engine_temp_bytes)
        );
    }
    match &report.trust {
        None => out!("signed targets: off (no trusted root configured)"),
        Some(trust) => {
            out!(
                "signed targets: root {} (hardware tag {})",
                trust.trusted_root.display(),
                trust.hardware.as_deref().unwrap_or("none")
            );
            if trust.roles.is_empty() {
                out!("  nothing verified yet");
            }
            for role in &trust.roles {
                out!(
                    "  {:<10} version {:<6} expires {}",
                    role.role,
                    role.version,
                    role.expires
                );
            }
        }
    }
    Ok(())
}

fn restart_line(restart: &stowage::update::reconcile::Restart) {
    out!(
        "last restart: {} at {} (unix time), because {}",
        restart.app,
        restart.at,
        restart.why.join(", ")
    );
}

fn reconcile_lines(report: &stowage::update::reconcile::ReconcileReport) {
    use stowage::update::reconcile::Action;
    for app in &report.apps {
        let what = match &app.action {
            Action::Running => "running".to_string(),
            Action::Started { attempt, why } => {
                format!("started again (try {attempt}): {}", why.join(", "))
            }
            Action::Waiting {
                reconciliations_left,
            } => format!("down; next try in {reconciliations_left} reconciliations"),
            Action::GaveUp { attempts, why } => {
                format!(
                    "FAILED after {attempts} tries, left down: {}",
                    why.join(", ")
                )
            }
            Action::Error { error } => format!("cannot start it: {error}"),
        };
        out!("{:<20} {:<9} {what}", app.name, app.state);
    }
}

/// `stowage reconcile`: what it did with each app.
pub fn reconcile(report: &stowage::update::reconcile::ReconcileReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    if report.apps.is_empty() {
        out!("no app should run");
    }
    reconcile_lines(report);
    if let Some(restart) = &report.last_restart {
        restart_line(restart);
    }
    Ok(())
}

pub fn target(target: &stowage::update::target::Target, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(target)?);
        return Ok(());
    }
    for (name, reference) in &target.apps {
        out!("{name:<20} {reference}");
    }
    out!("{}", target.reference);
    Ok(())
}

pub fn export(report: &stowage::update::export::ExportReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    out!(
        "exported {} ({} blobs, {}) to {}; apply with `stowage update oci:{}`",
        report.apps.join(", "),
        report.blobs,
        human_bytes(report.bytes),
        report.dir.display(),
        report.dir.display()
    );
    Ok(())
}

pub fn import(report: &stowage::update::export::ImportReport, json: bool) -> Result<()> {
    if json {
        print_json_line(&serde_json::json!({"event": "pulled", "report": report}));
        return Ok(());
    }
    out!(
        "copied {} blobs ({}); stored: {}",
        report.imported_blobs,
        human_bytes(report.imported_bytes),
        report.apps.join(", ")
    );
    Ok(())
}

pub fn tuf_key(report: &stowage::update::tuf::repo::KeyReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    out!(
        "key {} written: private {} (keep it off devices), public {}",
        report.keyid,
        report.private_key.display(),
        report.public_key.display()
    );
    Ok(())
}

pub fn tuf_repo(report: &stowage::update::tuf::repo::RepoReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    out!("repository {}", report.dir.display());
    for (label, roles) in [("published", &report.roles), ("staged", &report.staged)] {
        for r in roles {
            let threshold = r
                .threshold
                .map_or_else(|| "?".to_string(), |t| t.to_string());
            out!(
                "{label:<10} {:<10} version {:<5} expires {}  signatures {}/{}",
                r.role,
                r.version,
                r.expires,
                r.signatures,
                threshold
            );
        }
    }
    for t in &report.targets {
        let hardware = t.custom.hardware.as_deref().unwrap_or("any");
        out!(
            "target     {:<20} hardware {hardware:<12} {}",
            t.name,
            t.apps.join(" ")
        );
    }
    Ok(())
}

pub fn tuf_target(report: &stowage::update::tuf::repo::TargetReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    out!(
        "staged target {} (sha256 {}): {}; sign it with `stowage tuf sign DIR --role targets --key FILE`",
        report.name,
        report.sha256,
        report.apps.join(" ")
    );
    Ok(())
}

pub fn tuf_publish(report: &stowage::commands::tuf::PublishReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    tuf_repo(&report.repository, false)?;
    if report.published_to.is_empty() {
        out!("signed; not copied anywhere (give --to REGISTRY/REPO or --to oci:DIR)");
    } else {
        out!(
            "published {} files to {}",
            report.files.len(),
            report.published_to.join(", ")
        );
    }
    Ok(())
}
