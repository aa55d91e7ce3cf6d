//! Power cuts, with lost writes: the stowage root and a private dockerd's
//! data root live on one ext4 volume on the power-cut disk
//! (`tests/common/powercut.rs`), and the power is cut at random moments of
//! `stowage update` (pulling, inside the engine's load, stopping, starting,
//! around the commit), of `stowage prune` and of `stowage fsck --repair`.
//! After each cut the machine boots as a device would: `e2fsck -y`, mount,
//! the engine, the boot-time repair (`stowage fsck --repair`), then the
//! agent's recovery (the update's journal finished or rolled back, the apps
//! that should run started again). Then:
//!
//! - 0 blobs of the store fail verification (the repair found none
//!   corrupt, and nothing was moved aside), and a second `fsck` is clean;
//! - `installed.json`, `device.json` and the store's `index.json` parse;
//! - the device runs v1 or v2 of the app, every service running (each
//!   service checks every file of its image against a list of sha256 sums
//!   before it starts, so a layer the engine lost shows as a service down),
//!   no other container of it, no journal left, and the state names the
//!   version that runs.
//!
//! Where a cut leaves what stowage cannot repair through the engine, the
//! test says what happened, prints the one command that recovers it
//! (README, "Power cuts") and runs it; the same checks follow: a layer
//! database entry torn (every image on it answers 500), and an engine that
//! does not start (the command `stowage fsck` prints for it, else the data
//! root moved aside). Once per run the tag store is torn on purpose, so the
//! second path is always exercised.
//!
//! Every cut starts from a golden image of the disk (v1 running, made once
//! by clean shutdowns), so each is independent and replays alone.
//! `STOWAGE_POWER_CUTS` (default 20) is the number of cuts; the seed is
//! printed, and `STOWAGE_TEST_SEED=N` replays the run: the phases, the
//! moments, the cut modes and what each cut keeps of the unflushed writes
//! (timing on a shared machine still moves a cut's moment a little).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use powercut_disk::CutMode;
use serde_json::Value;

use crate::common::powercut::PowerCutMachine;
use crate::common::*;

/// The disk's size: the store, the engine's layers and their temporary
/// copies during a load fit several times over.
const DISK_MIB: u64 = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Pulling,
    Installing,
    Stopping,
    Starting,
    Commit,
    Prune,
    Repair,
    /// Not a phase of its own: a cut during `prune` after which the
    /// engine's tag store is found torn (as a cut while dockerd rewrote it
    /// leaves it), so that dockerd does not start: once per run, to test
    /// the diagnosis and the command it prints.
    TornTagStore,
}

impl Phase {
    const ALL: [Phase; 7] = [
        Phase::Installing,
        Phase::Pulling,
        Phase::Stopping,
        Phase::Starting,
        Phase::Commit,
        Phase::Prune,
        Phase::Repair,
    ];

    /// The journal phase after which the cut falls, for the update's phases.
    fn journal(self) -> Option<&'static str> {
        match self {
            Phase::Pulling => Some("pulling"),
            Phase::Installing => Some("installing"),
            Phase::Stopping => Some("stopping"),
            Phase::Starting => Some("starting"),
            Phase::Commit => Some("verifying"),
            Phase::Prune | Phase::Repair | Phase::TornTagStore => None,
        }
    }
}

/// One version of the app: its pinned reference and the image each of its
/// services runs (as stowage tags it in the engine).
#[derive(Clone, Debug)]
struct Version {
    label: &'static str,
    reference: String,
    images: BTreeMap<String, String>,
}

struct Lab {
    host: String,
    name: String,
    v1: Version,
    v2: Version,
    extra: String,
    extra_images: Vec<String>,
    logs: tempfile::TempDir,
    /// Where every machine mounts its volume (one is on at a time).
    volume: tempfile::TempDir,
}

#[derive(Default, Debug)]
struct Counts {
    cuts: usize,
    recovered: usize,
    on_v1: usize,
    on_v2: usize,
    engine_reset: usize,
    failed: usize,
    fs_fixed: usize,
    lost_bytes: u64,
    /// Installing cuts that ended on v1, then updated to v2 uninterrupted.
    retried: usize,
    /// Recoveries whose boot-time `fsck --repair` repaired an app.
    repaired: usize,
    /// Cuts after which the engine's layer metadata was torn, and of those
    /// how many stowage's fsck named.
    torn_layers: usize,
    torn_named: usize,
}

impl Lab {
    fn stowage(&self, machine: &PowerCutMachine, args: &[&str]) -> Command {
        let mut cmd = stowage();
        cmd.env("DOCKER_HOST", machine.engine().host())
            .arg("--root")
            .arg(machine.root())
            .args(["--insecure-registry", &self.host])
            .args(args);
        cmd
    }

    /// Like [`Lab::stowage`], for an engine at `host` (one that does not
    /// answer, to see what fsck says of its data root).
    fn stowage_on_host(&self, machine: &PowerCutMachine, host: &str, args: &[&str]) -> Command {
        let mut cmd = stowage();
        cmd.env("DOCKER_HOST", host)
            .arg("--root")
            .arg(machine.root())
            .args(["--insecure-registry", &self.host])
            .args(args);
        cmd
    }

    fn update(&self, machine: &PowerCutMachine, to: &Version) -> Command {
        self.stowage(
            machine,
            &["update", "--verify-timeout", "30", &to.reference],
        )
    }

    /// The agent started at boot: it finishes or rolls back an interrupted
    /// update, starts again what should run, then polls a target that does
    /// not exist (so it changes nothing more).
    fn agent(&self, machine: &PowerCutMachine) -> Output {
        let _ = std::fs::remove_file(machine.root().join("state/agent.json"));
        let target = format!("{}/{}/target:none", self.host, self.name);
        run_output(&mut self.stowage(
            machine,
            &["agent", "--target", &target, "--once", "--interval", "1s"],
        ))
    }

    /// Runs `args` to completion, panicking with its output unless it
    /// succeeds.
    fn ok(&self, machine: &PowerCutMachine, args: &[&str]) -> String {
        run_ok(&mut self.stowage(machine, args))
    }

    /// A machine booted from `golden`, with v1 running again (a clean
    /// shutdown stopped its containers).
    fn boot_from(&self, golden: &Path) -> PowerCutMachine {
        let mut machine = PowerCutMachine::from_platter(golden, self.volume.path());
        machine.boot();
        machine
            .start_engine()
            .unwrap_or_else(|e| panic!("the golden image's engine: {e}"));
        self.ok(&machine, &["reconcile"]);
        machine
    }

    /// A command spawned in a process group of its own (so the cut kills
    /// what it started with it), its output to a log file.
    fn spawn(&self, mut cmd: Command, label: &str) -> (Child, PathBuf) {
        let log = self.logs.path().join(format!("{label}.log"));
        let file = std::fs::File::create(&log).expect("create a log");
        let err = file.try_clone().expect("clone a log handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        (child, log)
    }

    /// service -> image of every running container of the app, and the
    /// containers of the app that do not run.
    fn containers(&self, machine: &PowerCutMachine) -> (BTreeMap<String, String>, Vec<String>) {
        compose_containers(&mut machine.engine().docker(), &self.name)
    }

    /// The checks after a recovery; the version that runs, or what is wrong.
    fn check(&self, machine: &PowerCutMachine) -> Result<&Version, String> {
        let root = machine.root();
        for file in [
            "state/installed.json",
            "state/device.json",
            "store/index.json",
        ] {
            let bytes = std::fs::read(root.join(file)).map_err(|e| format!("read {file}: {e}"))?;
            serde_json::from_slice::<Value>(&bytes)
                .map_err(|e| format!("{file} does not parse: {e}"))?;
        }
        if root.join("state/journal.json").exists() {
            return Err("the journal is left".into());
        }
        let (running, others) = self.containers(machine);
        let version = [&self.v1, &self.v2]
            .into_iter()
            .find(|v| v.images == running)
            .ok_or_else(|| {
                format!(
                    "the device runs neither v1 nor v2 completely: running {running:?}, other containers {others:?}\n{}",
                    self.service_logs(machine)
                )
            })?;
        if !others.is_empty() {
            return Err(format!(
                "containers left beside {}: {others:?}",
                version.label
            ));
        }
        let status: Value = serde_json::from_str(&self.ok(machine, &["--json", "status"]))
            .map_err(|e| e.to_string())?;
        let recorded = status
            .get("apps")
            .or_else(|| status.get("running"))
            .map(|a| a[&self.name].clone());
        if recorded != Some(Value::from(version.reference.as_str())) {
            return Err(format!(
                "the state names another version than the one running ({}): {status}",
                version.label
            ));
        }
        let out = run_output(&mut self.stowage(machine, &["--json", "fsck"]));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if !out.status.success() || report["clean"] != true {
            return Err(format!(
                "fsck after the recovery is not clean: {}",
                say(&out)
            ));
        }
        Ok(version)
    }

    fn service_logs(&self, machine: &PowerCutMachine) -> String {
        let out = run_output(machine.engine().docker().args([
            "ps",
            "-a",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
            "--format",
            "{{.Names}} {{.Status}}",
        ]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The engine's layer database entries (`image/overlay2/layerdb/sha256/*`)
/// whose `cache-id` (the layer's directory under `overlay2/`) is missing or
/// not an ID: what a cut while dockerd committed a layer leaves.
fn torn_layer_entries(data_root: &Path) -> Vec<PathBuf> {
    let dir = data_root.join("image/overlay2/layerdb/sha256");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut torn: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|entry| {
            let id = std::fs::read_to_string(entry.join("cache-id")).unwrap_or_default();
            id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit())
        })
        .collect();
    torn.sort();
    torn
}

/// The journal's phase, when there is a journal that parses.
fn journal_phase(root: &Path) -> Option<String> {
    let bytes = std::fs::read(root.join("state/journal.json")).ok()?;
    let journal: Value = serde_json::from_slice(&bytes).ok()?;
    journal["phase"].as_str().map(str::to_string)
}

/// Files of `n` random sizes under `/pc/SERVICE/`, plus `/pc/SERVICE.sums`
/// (their sha256 sums, for `sha256sum -c`), in one layer directory.
fn write_layer(layer: &Path, service: &str, n: usize, big: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut sums = String::new();
    for i in 0..n {
        let size = if i < big {
            300_000 + rng.below(400_000) as usize
        } else {
            rng.below(12_000) as usize
        };
        let rel = format!("pc/{service}/d{:02}/f{i:04}", i % 17);
        let bytes = noise(rng.next_u64(), size);
        let path = layer.join(&rel);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("create a layer dir");
        std::fs::write(&path, &bytes).expect("write a layer file");
        let digest = sha256_digest(&bytes);
        writeln!(sums, "{}  /{rel}", digest.trim_start_matches("sha256:")).expect("a string");
    }
    std::fs::write(layer.join(format!("pc/{service}.sums")), sums).expect("write the sums");
}

#[test]
fn power_cuts_at_random_moments_leave_one_whole_version_running() {
    ensure_dockerd();
    let seed = test_seed();
    let mut rng = Rng::new(seed);
    let wanted: usize = std::env::var("STOWAGE_POWER_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let started = Instant::now();
    let registry = Registry::start();
    let host = registry.host();
    let name = unique("pc");

    // Images: a shared busybox base; per version, web (a layer of 400
    // small files) and db (three files of about half a megabyte); an extra
    // app's job (100 files). Each service checks its files before it runs,
    // and stops at once on SIGTERM (a stop costs no grace period).
    let base = format!("{name}-base:1");
    let _base = busybox_image(&base);
    let mut images = BTreeMap::new();
    let build = |local: &str, service: &str, n: usize, big: usize, seed: u64| {
        let context = temp_dir("powercut-build-");
        write_layer(&context.path().join("layer0"), service, n, big, seed);
        build_from_context(local, &base, context.path(), &["layer0".to_string()], "")
    };
    for (service, n, big) in [("web", 400, 0), ("db", 3, 3)] {
        for v in ["1", "2"] {
            let local = format!("{name}-{service}:{v}");
            let image = build(
                &local,
                service,
                n,
                big,
                seed_of(&format!("{name}/{service}/{v}")),
            );
            let remote = format!("{host}/{name}/{service}:{v}");
            let digest = push_image(&local, &remote);
            drop(image);
            let tag = format!(
                "{host}/{name}/{service}:stowage-sha256-{}",
                digest.trim_start_matches("sha256:")
            );
            images.insert((service, v), (remote, tag));
        }
    }
    let job_local = format!("{name}-job:1");
    let job_image = build(&job_local, "job", 100, 0, seed_of(&format!("{name}/job")));
    let job_remote = format!("{host}/{name}/job:1");
    let job_digest = push_image(&job_local, &job_remote);
    drop(job_image);
    let service = |s: &str, image: &str| {
        format!(
            "  {s}:\n    image: {image}\n    network_mode: none\n    stop_grace_period: 1s\n    command: [\"sh\", \"-c\", \"busybox sha256sum -c -s /pc/{s}.sums || exit 1; trap 'exit 0' TERM; sleep 3600 & wait\"]\n"
        )
    };
    let publish = |app: &str, tag: &str, compose: String| {
        let dir = temp_dir("powercut-app-");
        write_app(dir.path(), &compose);
        let out = run_ok(
            stowage()
                .args(["publish", "--dir"])
                .arg(dir.path())
                .args(["--insecure-registry", &host])
                .arg(format!("{host}/apps/{app}:{tag}")),
        );
        out.lines().last().unwrap_or("").trim().to_string()
    };
    let version = |label: &'static str, v: &str| {
        let mut compose = String::from("services:\n");
        let mut running = BTreeMap::new();
        for s in ["web", "db"] {
            let (remote, tag) = &images[&(s, v)];
            compose.push_str(&service(s, remote));
            running.insert(s.to_string(), tag.clone());
        }
        Version {
            label,
            reference: publish(&name, label, compose),
            images: running,
        }
    };
    let v1 = version("v1", "1");
    let v2 = version("v2", "2");
    let extra_name = format!("{name}-extra");
    let extra = publish(
        &extra_name,
        "1",
        format!("services:\n{}", service("job", &job_remote)),
    );
    let lab = Lab {
        host: host.clone(),
        name: name.clone(),
        v1,
        v2,
        extra,
        extra_images: vec![format!(
            "{host}/{name}/job:stowage-sha256-{}",
            job_digest.trim_start_matches("sha256:")
        )],
        logs: temp_dir("powercut-logs-"),
        volume: temp_dir("powercut-volume-"),
    };

    // The golden images, each by a clean shutdown: v1 running; v1 running
    // and an extra app installed, then removed (prune has both stores to
    // clean); v1 running and the extra app installed, its image then lost
    // by the engine (fsck --repair has an image to load).
    let mut golden = PowerCutMachine::new(DISK_MIB, lab.volume.path());
    golden.boot();
    golden.start_engine().expect("a fresh engine starts");
    let out = run_output(&mut lab.update(&golden, &lab.v1));
    assert!(out.status.success(), "update to v1: {}", say(&out));
    assert_eq!(lab.check(&golden).map(|v| v.label), Ok("v1"));
    golden.shutdown();

    let mut prune_golden = lab.boot_from(&golden.platter());
    lab.ok(&prune_golden, &["pull", &lab.extra]);
    lab.ok(&prune_golden, &["install", &lab.extra]);
    lab.ok(&prune_golden, &["rm", &extra_name]);
    prune_golden.shutdown();

    let mut repair_golden = lab.boot_from(&golden.platter());
    lab.ok(&repair_golden, &["pull", &lab.extra]);
    lab.ok(&repair_golden, &["install", &lab.extra]);
    for image in &lab.extra_images {
        run_ok(repair_golden.engine().docker().args(["rmi", "-f", image]));
    }
    repair_golden.shutdown();

    // How long each phase takes uninterrupted (and that it works): the
    // update's phases from the journal, polled as it runs.
    let mut durations: BTreeMap<Phase, Duration> = BTreeMap::new();
    {
        let machine = lab.boot_from(&golden.platter());
        let (mut child, log) = lab.spawn(lab.update(&machine, &lab.v2), "calibrate-update");
        let begun = Instant::now();
        let mut seen: Vec<(String, Duration)> = Vec::new();
        let root = machine.root();
        wait_until(Duration::from_secs(300), || {
            if let Some(phase) = journal_phase(&root)
                && seen.last().is_none_or(|(p, _)| *p != phase)
            {
                seen.push((phase, begun.elapsed()));
            }
            matches!(child.try_wait(), Ok(Some(_)))
        });
        let status = child.wait().expect("wait for the update");
        let total = begun.elapsed();
        assert!(status.success(), "update to v2: {}", tail_file(&log, 40));
        assert_eq!(lab.check(&machine).map(|v| v.label), Ok("v2"));
        for phase in Phase::ALL {
            let Some(journal) = phase.journal() else {
                continue;
            };
            let at = seen.iter().position(|(p, _)| p == journal);
            let took = match at {
                Some(i) => {
                    let end = seen.get(i + 1).map(|(_, t)| *t).unwrap_or(total);
                    end.saturating_sub(seen[i].1)
                }
                None => Duration::from_millis(200),
            };
            // The commit follows the verification: a cut up to half a
            // second past it lands on the commit or just after.
            let took = if phase == Phase::Commit {
                took + Duration::from_millis(500)
            } else {
                took
            };
            durations.insert(phase, took.max(Duration::from_millis(50)));
        }
        println!("update v1 -> v2 uninterrupted: {total:?}, journal phases at {seen:?}");
    }
    for (phase, golden, args) in [
        (Phase::Prune, &prune_golden, vec!["prune"]),
        (Phase::Repair, &repair_golden, vec!["fsck", "--repair"]),
    ] {
        let machine = lab.boot_from(&golden.platter());
        let begun = Instant::now();
        lab.ok(&machine, &args);
        durations.insert(phase, begun.elapsed());
        lab.check(&machine)
            .unwrap_or_else(|e| panic!("{args:?} uninterrupted: {e}"));
    }
    println!(
        "set-up in {:?}; phase durations {durations:?}",
        started.elapsed()
    );

    let mut counts: BTreeMap<Phase, Counts> = BTreeMap::new();
    let mut modes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut resets = 0;
    let first = rng.below(Phase::ALL.len() as u64) as usize;
    for k in 0..=wanted {
        let phase = if k == wanted {
            Phase::TornTagStore
        } else {
            Phase::ALL[(first + k) % Phase::ALL.len()]
        };
        let mode = CutMode::ALL[rng.below(3) as usize];
        let cut_seed = rng.next_u64();
        let length = durations
            .get(&phase)
            .copied()
            .unwrap_or(durations[&Phase::Prune]);
        let delay = Duration::from_millis(rng.below(length.as_millis() as u64 + 1));
        let source = match phase {
            Phase::Prune | Phase::TornTagStore => &prune_golden,
            Phase::Repair => &repair_golden,
            _ => &golden,
        };
        let mut machine = lab.boot_from(&source.platter());
        let cmd = match phase {
            Phase::Prune | Phase::TornTagStore => lab.stowage(&machine, &["prune"]),
            Phase::Repair => lab.stowage(&machine, &["fsck", "--repair"]),
            _ => lab.update(&machine, &lab.v2),
        };
        let (mut child, log) = lab.spawn(cmd, &format!("cut-{k}"));
        let begun = Instant::now();
        // The update's phases: the cut falls `delay` after the journal
        // enters the phase (or when the update ends before that).
        if let Some(journal) = phase.journal() {
            let root = machine.root();
            wait_until(Duration::from_secs(300), || {
                journal_phase(&root).as_deref() == Some(journal)
                    || matches!(child.try_wait(), Ok(Some(_)))
            });
        }
        std::thread::sleep(delay);
        let at = begun.elapsed();
        let journal = journal_phase(&machine.root()).unwrap_or_else(|| "none".into());
        let finished = matches!(child.try_wait(), Ok(Some(_)));
        let disk = machine.disk_stats();
        let report = machine.cut(mode, cut_seed, Some(&mut child));
        let c = counts.entry(phase).or_default();
        c.cuts += 1;
        c.lost_bytes += report.pending_bytes - report.kept_bytes;
        *modes.entry(mode.name()).or_default() += 1;
        let what = format!(
            "cut {k} ({phase:?}, journal {journal}, {at:?} in{}): {report}; disk since boot: {disk}",
            if finished {
                ", the command had finished"
            } else {
                ""
            }
        );
        println!("{what}");

        let fsck = machine.e2fsck();
        if fsck.code != 0 {
            c.fs_fixed += 1;
        }
        if !fsck.usable() {
            c.failed += 1;
            failures.push(format!(
                "{what}\n  e2fsck -fy could not repair the file system (exit {}):\n{}",
                fsck.code, fsck.output
            ));
            continue;
        }
        machine.boot();
        if phase == Phase::TornTagStore {
            let tags = machine.data_root().join("image/overlay2/repositories.json");
            let bytes = std::fs::read(&tags).unwrap_or_default();
            std::fs::write(&tags, &bytes[..bytes.len() / 2])
                .unwrap_or_else(|e| panic!("tear {}: {e}", tags.display()));
            println!(
                "  the engine's tag store torn: {} of {} bytes left",
                bytes.len() / 2,
                bytes.len()
            );
        }
        let mut reset = false;
        let mut diagnosed = false;
        if let Err(why) = machine.start_engine() {
            // The engine's own metadata is torn: say so, ask stowage what
            // it sees in the data root, and run the one command it prints
            // (else the last resort the README gives).
            resets += 1;
            reset = true;
            c.engine_reset += 1;
            println!("  the engine does not start after the cut: {why}");
            let out = run_output(&mut lab.stowage_on_host(
                &machine,
                &format!("unix://{}/no-engine.sock", machine.volume().display()),
                &["--json", "fsck"],
            ));
            let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let found = report["engine"].as_array().cloned().unwrap_or_default();
            if found.is_empty() {
                println!(
                    "  stowage fsck names no cause ({}); last resort (README, \"Power cuts\"): systemctl stop docker && mv /var/lib/docker /var/lib/docker.torn && systemctl start docker && stowage fsck --repair && stowage reconcile",
                    say(&out)
                );
                machine.move_data_root_aside(resets);
            } else {
                diagnosed = true;
                for damage in &found {
                    println!(
                        "  stowage fsck: {}\n  recover with: {}",
                        damage["what"], damage["recover"]
                    );
                    // The command's first part; the engine's start and the
                    // repair follow as the command says.
                    if let Some(path) = damage["path"].as_str() {
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
            if let Err(why) = machine.start_engine() {
                c.failed += 1;
                failures.push(format!(
                    "{what}\n  a fresh engine does not start either: {why}"
                ));
                continue;
            }
        }
        // The engine's layer metadata torn by the cut (a layer database
        // entry whose cache-id was lost): the engine answers 500 `readlink
        // .../overlay2: invalid argument` for every image on that layer, and
        // stowage cannot repair it through the engine. Detected here, the
        // one command that recovers it printed, and run.
        let torn = torn_layer_entries(&machine.data_root());
        if !torn.is_empty() {
            c.torn_layers += 1;
            let paths: Vec<String> = torn.iter().map(|p| p.display().to_string()).collect();
            let out = run_output(&mut lab.stowage(&machine, &["fsck"]));
            let named = paths
                .iter()
                .any(|p| String::from_utf8_lossy(&out.stdout).contains(p.as_str()));
            if named {
                c.torn_named += 1;
            }
            let restarted = if named {
                // The command fsck prints: `rm -rf ENTRY... && stowage fsck
                // --repair` (the repair follows below).
                println!(
                    "  the engine's layer metadata is torn: {} (no cache-id); stowage fsck names it: {}",
                    paths.join(", "),
                    say(&out).replace('\n', " | ")
                );
                for path in &torn {
                    let _ = std::fs::remove_dir_all(path);
                }
                Ok(())
            } else {
                println!(
                    "  the engine's layer metadata is torn: {} (no cache-id); stowage fsck does not name it: {}\n  recover with: systemctl stop docker && rm -rf {} && systemctl start docker && stowage fsck --repair",
                    paths.join(", "),
                    say(&out).replace('\n', " | "),
                    paths.join(" ")
                );
                machine.stop_engine();
                for path in &torn {
                    let _ = std::fs::remove_dir_all(path);
                }
                machine.start_engine()
            };
            if let Err(why) = restarted {
                c.failed += 1;
                failures.push(format!(
                    "{what}\n  the engine does not start after the torn layer entries were removed: {why}"
                ));
                continue;
            }
        }
        // The boot-time repair, then the agent's recovery.
        let repair = run_output(&mut lab.stowage(&machine, &["--json", "fsck", "--repair"]));
        let report: Value = serde_json::from_slice(&repair.stdout).unwrap_or(Value::Null);
        let corrupt = report["corrupt"].as_array().map(Vec::len);
        let moved = report["moved_aside"].as_array().map(Vec::len);
        let repaired: Vec<String> = report["installed"]
            .as_array()
            .map(|apps| {
                apps.iter()
                    .filter(|a| a["repaired"] == true)
                    .map(|a| {
                        let damaged = a["damaged_images"].as_array().map_or(0, Vec::len);
                        let missing = a["missing_images"].as_array().map_or(0, Vec::len);
                        format!(
                            "{} ({damaged} damaged, {missing} missing images{})",
                            a["name"].as_str().unwrap_or("?"),
                            if a["directory_damaged"] == true {
                                ", directory damaged"
                            } else {
                                ""
                            }
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !repaired.is_empty() {
            c.repaired += 1;
            println!(
                "  the boot-time fsck --repair repaired {}",
                repaired.join(", ")
            );
        }
        let mut problems = Vec::new();
        if corrupt != Some(0) || moved != Some(0) {
            problems.push(format!(
                "the repair found blobs failing verification or files moved aside: {}",
                say(&repair)
            ));
        }
        if phase == Phase::TornTagStore && !(reset && diagnosed) {
            problems.push(format!(
                "the torn tag store: dockerd started anyway ({}), or fsck did not name it ({})",
                !reset, !diagnosed
            ));
        }
        if reset {
            let out = run_output(&mut lab.stowage(&machine, &["reconcile"]));
            if !out.status.success() {
                problems.push(format!("reconcile after the engine reset: {}", say(&out)));
            }
        }
        let agent = lab.agent(&machine);
        let status: Value = std::fs::read(machine.root().join("state/agent.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let polled = status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot fetch target"));
        if !polled {
            problems.push(format!(
                "the agent did not recover and go on to poll: {}\n  repair: {}",
                say(&agent),
                say(&repair)
            ));
        }
        match lab.check(&machine) {
            Ok(version) if problems.is_empty() => {
                c.recovered += 1;
                if version.label == "v1" {
                    c.on_v1 += 1;
                } else {
                    c.on_v2 += 1;
                }
                println!(
                    "  recovered: {} runs{}{}",
                    version.label,
                    if fsck.code != 0 {
                        "; e2fsck fixed the file system"
                    } else {
                        ""
                    },
                    if reset {
                        "; after the engine reset"
                    } else {
                        ""
                    }
                );
                // A cut inside the engine's load left the device on v1: the
                // next try of the update must work (in the case it
                // failed again the same way, on layers the engine lost).
                if phase == Phase::Installing && version.label == "v1" {
                    let out = run_output(&mut lab.update(&machine, &lab.v2));
                    match lab.check(&machine) {
                        Ok(v) if out.status.success() && v.label == "v2" => {
                            c.retried += 1;
                            println!("  then the update to v2 again: v2 runs");
                        }
                        other => {
                            c.failed += 1;
                            let text = format!(
                                "{what}\n  recovered on v1, but the update to v2 again: {}\n  then: {other:?}",
                                say(&out)
                            );
                            println!("  FAILED: {text}");
                            failures.push(text);
                        }
                    }
                }
            }
            result => {
                if let Err(e) = result {
                    problems.push(e);
                }
                c.failed += 1;
                let text = format!(
                    "{what}\n  {}\n  the cut command's log:\n{}\n  the engine's log:\n{}",
                    problems.join("\n  "),
                    tail_file(&log, 20),
                    tail_file(&machine.engine().log_file(), 20)
                );
                println!("  FAILED: {text}");
                failures.push(text);
            }
        }
    }

    let mut table = String::from(
        "phase        cuts  recovered  on v1  on v2  engine reset  e2fsck fixed  failed  lost bytes  v2 again  fsck repaired  torn layer (named)\n",
    );
    let mut total = Counts::default();
    for (phase, c) in &counts {
        writeln!(
            table,
            "{:<12} {:>4}  {:>9}  {:>5}  {:>5}  {:>12}  {:>12}  {:>6}  {:>10}  {:>8}  {:>13}  {:>14}",
            format!("{phase:?}"),
            c.cuts,
            c.recovered,
            c.on_v1,
            c.on_v2,
            c.engine_reset,
            c.fs_fixed,
            c.failed,
            c.lost_bytes,
            c.retried,
            c.repaired,
            format!("{} ({})", c.torn_layers, c.torn_named)
        )
        .expect("a string");
        total.cuts += c.cuts;
        total.recovered += c.recovered;
        total.failed += c.failed;
    }
    println!(
        "power cuts (seed {seed}): {} cuts, {} recovered, {} failed in {:?}; cut modes {modes:?}\n{table}",
        total.cuts,
        total.recovered,
        total.failed,
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} power cuts did not recover (seed {seed}):\n{}",
        failures.len(),
        total.cuts,
        failures.join("\n\n")
    );
    assert_eq!(total.cuts, wanted + 1);
}
