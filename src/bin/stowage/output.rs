//! How results and progress look: tables and bars for a person, JSON for a
//! script. Results go to stdout, progress and logs to stderr, except that
//! `--json` progress goes to stdout as JSON lines, ahead of the result.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;

use stowage::Digest;
use stowage::commands::inspect::AppDescription;
use stowage::commands::publish::PublishReport;
use stowage::progress::{Event, NoProgress, Progress};

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
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Steps as plain lines on stderr, for logs and pipes.
struct PlainSteps;

impl Progress for PlainSteps {
    fn emit(&self, event: Event) {
        match event {
            Event::Step { message } => eprintln!("{message}"),
            Event::BlobDone { digest, size } => {
                eprintln!("fetched {} ({})", digest.short(), human_bytes(size))
            }
            _ => {}
        }
    }
}

/// indicatif bars on a terminal: one per blob in flight.
#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
}

impl Progress for Bars {
    fn emit(&self, event: Event) {
        match event {
            Event::Step { message } => {
                let _ = self.multi.println(message);
            }
            Event::BlobStarted { digest, size, offset } => {
                let bar = self.multi.add(ProgressBar::new(size));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(digest.short().to_string());
                bar.set_position(offset);
                if let Ok(mut bars) = self.bars.lock() {
                    bars.insert(digest, bar);
                }
            }
            Event::BlobProgress { digest, done, .. } => {
                if let Ok(bars) = self.bars.lock()
                    && let Some(bar) = bars.get(&digest)
                {
                    bar.set_position(done);
                }
            }
            Event::BlobDone { digest, .. } => {
                if let Ok(mut bars) = self.bars.lock()
                    && let Some(bar) = bars.remove(&digest)
                {
                    bar.finish_and_clear();
                }
            }
        }
    }
}

#[allow(dead_code)]
pub fn quiet() -> Box<dyn Progress> {
    Box::new(NoProgress)
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub fn publish(report: &PublishReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for (service, image) in &report.services {
        println!("service {service}: {image}");
    }
    for (arch, s) in &report.architectures {
        println!(
            "{arch}: {} layers, download {}, unpacked {}, disk usage {} (4 KiB blocks), {} inodes",
            s.layers,
            human_bytes(s.download_size),
            human_bytes(s.size),
            human_bytes(s.usage),
            s.inodes
        );
    }
    if report.dry_run {
        println!("dry run: nothing pushed; would push:");
        for blob in &report.pushed {
            println!("  {} {} ({} bytes)", blob.what, blob.digest, blob.size);
        }
        println!("{}", String::from_utf8_lossy(&report.manifest));
    }
    println!("{}", report.reference);
    Ok(())
}

pub fn inspect(app: &AppDescription, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(app)?);
        return Ok(());
    }
    println!("app:      {}", app.reference);
    println!("bundle:   {} ({})", app.compose_file, human_bytes(app.bundle_size));
    println!("services:");
    for (service, image) in &app.services {
        println!("  {service:<16} {image}");
    }
    println!("architectures:");
    println!("  {:<8} {:>7} {:>12} {:>12}", "ARCH", "LAYERS", "DOWNLOAD", "DISK USAGE");
    for (arch, f) in &app.architectures {
        println!(
            "  {arch:<8} {:>7} {:>12} {:>12}",
            f.layers,
            human_bytes(f.download_size),
            human_bytes(f.usage)
        );
    }
    println!("compose file ({}):", app.compose_file);
    for line in app.compose.lines() {
        println!("  {line}");
    }
    Ok(())
}
