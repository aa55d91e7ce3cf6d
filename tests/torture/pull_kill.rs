//! `stowage pull` against the worst a device sees: another process filling
//! the volume while a pull runs, and the pull killed (SIGKILL, as a power
//! cut kills it) at random moments. The app comes from a slow registry so
//! that every moment of a download can be hit; the store must end complete
//! and verified, and no blob may be fetched twice in full.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::device::*;
use crate::common::hostile::{Behaviour, HostileRegistry};
use crate::common::*;
use serde_json::Value;
use stowage::Digest;

const MIB: usize = 1024 * 1024;

/// An app published to a hostile registry whose service layers (not the
/// shared busybox base) are served at `rate` bytes a second each.
struct SlowApp {
    registry: HostileRegistry,
    reference: String,
    /// The big layers: digest and size.
    layers: Vec<(Digest, u64)>,
}

impl SlowApp {
    fn publish(name: &str, services: &[(&str, usize)], rate: u64) -> SlowApp {
        let registry = HostileRegistry::start();
        let reference = publish_app(&registry.host(), name, "v1", services);
        let mut layers = Vec::new();
        for (service, _) in services {
            let repo = format!("{name}/{service}");
            let digest = registry.tag(&repo, "1").unwrap();
            let (_, bytes) = registry.manifest(&repo, &digest).unwrap();
            let manifest: Value = serde_json::from_slice(&bytes).unwrap();
            let (layer, size) = image_layers_in(&manifest).last().cloned().unwrap();
            let layer: Digest = layer.parse().unwrap();
            registry.set_blob_behaviour(&layer, Behaviour::Slow(rate));
            layers.push((layer, size));
        }
        registry.clear_requests();
        SlowApp {
            registry,
            reference,
            layers,
        }
    }

    fn start_pull(&self, root: &Path) -> Child {
        device(root, &self.registry.host())
            .args(["pull", &self.reference])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits until the registry has finished every answer, those to a
    /// killed pull included (it notices a dead socket at its next write),
    /// and returns what it sent per layer.
    fn settle(&self) -> Vec<u64> {
        assert!(
            self.registry.wait_until_idle(Duration::from_secs(60)),
            "the registry still writes to a killed pull after a minute: {:?}",
            self.registry.requests().last()
        );
        self.sent()
    }

    fn sent(&self) -> Vec<u64> {
        self.layers
            .iter()
            .map(|(d, _)| self.registry.bytes_sent_for(d))
            .collect()
    }
}

fn kill(child: &mut Child) {
    // SAFETY: kill(2) on a child this test started and has not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
    }
    let _ = child.wait();
}

fn finish(child: Child) -> std::process::Output {
    child.wait_with_output().unwrap()
}

#[test]
fn a_volume_filled_during_a_pull_does_not_break_it_and_a_killed_pull_resumes_once_space_is_freed() {
    // Two 16 MiB layers at 4 MiB/s each: a pull of about four seconds.
    let rate = 4 * MIB as u64;
    let app = SlowApp::publish(
        &unique("fill"),
        &[("web", 16 * MIB), ("api", 16 * MIB)],
        rate,
    );
    let host = app.registry.host();
    let volume = LoopVolume::new(128);
    let root = volume.path().join("stowage");
    let (web, web_size) = app.layers[0].clone();

    // Another writer fills the volume a quarter of the way into the pull:
    // the space was reserved, so the pull completes and the writer is the
    // one told there is no room.
    let mut pull = app.start_pull(&root);
    assert!(
        app.registry
            .wait_for_bytes_sent(&web, web_size / 4, Duration::from_secs(30))
    );
    let filler = volume.path().join("filler");
    let dd = run_output(
        Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", filler.display()))
            .args(["bs=1M", "status=none"]),
    );
    assert!(!dd.status.success(), "the volume filled up");
    assert!(
        String::from_utf8_lossy(&dd.stderr).contains("No space left"),
        "{}",
        String::from_utf8_lossy(&dd.stderr)
    );
    assert!(
        pull.try_wait().unwrap().is_none(),
        "the pull was still downloading when the volume filled"
    );
    let out = finish(pull);
    assert!(
        out.status.success(),
        "the pull completes on a full volume: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(volume.stats().available_bytes() < MIB as u64);
    assert!(ingest_files(&root).is_empty(), "{:?}", ingest_files(&root));
    assert_fsck_clean(&root, &host);
    let listed = json_of(run_ok(device(&root, &host).args(["--json", "ls"])).as_bytes());
    assert_eq!(listed[0]["state"], "fetched");

    // Again on a fresh store, killed after the volume filled: what it had
    // reserved stays its own. On the full volume a retry is refused before
    // it writes (the app still needs room for its bundle); once the space is
    // freed it completes, resuming the partial layers.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
    app.registry.clear_requests();
    let mut pull = app.start_pull(&root);
    assert!(
        app.registry
            .wait_for_bytes_sent(&web, web_size / 4, Duration::from_secs(30))
    );
    let dd = run_output(
        Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", filler.display()))
            .args(["bs=1M", "status=none"]),
    );
    assert!(!dd.status.success());
    kill(&mut pull);
    let before = app.settle();
    assert!(
        before
            .iter()
            .zip(&app.layers)
            .all(|(n, (_, size))| n < size),
        "killed half way: {before:?}"
    );
    assert_fsck_clean(&root, &host);
    let out = run_output(device(&root, &host).args(["pull", &app.reference]));
    assert_eq!(
        out.status.code(),
        Some(100),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(app.sent(), before, "a refused pull downloads nothing");
    std::fs::remove_file(&filler).unwrap();
    let started = Instant::now();
    run_ok(device(&root, &host).args(["pull", &app.reference]));
    let took = started.elapsed();
    for ((digest, size), sent) in app.layers.iter().zip(app.sent()) {
        assert!(
            sent <= size + 512 * 1024,
            "layer {digest} of {size} bytes: {sent} sent in all, resumed not restarted"
        );
        assert!(blob_files(&root).contains_key(digest.hex()));
    }
    assert!(ingest_files(&root).is_empty(), "{:?}", ingest_files(&root));
    assert_fsck_clean(&root, &host);
    eprintln!(
        "resumed after freeing space in {took:?}; sent per layer {:?}",
        app.sent()
    );
}

/// How many times the pull is killed.
const KILLS: usize = 50;

#[test]
fn pulls_killed_at_random_moments_end_in_a_complete_verified_store_with_nothing_fetched_twice() {
    // Three 16 MiB layers at 256 KiB/s each: 64 seconds of downloading to
    // spread the kills over, more than 50 runs of at most a second each can
    // use up (at 512 KiB/s, 32 s: a seed whose waits averaged over 0.65 s
    // finished the pull after 48 kills). The registry paces in slices of
    // rate/20; the final pull goes unpaced.
    let rate = MIB as u64 / 4;
    let slice = rate / 20;
    let app = SlowApp::publish(
        &unique("kill"),
        &[("web", 16 * MIB), ("api", 16 * MIB), ("worker", 16 * MIB)],
        rate,
    );
    let host = app.registry.host();
    let scratch = temp_dir("stowage-kill-");
    let root = scratch.path().join("root");

    let mut rng = Rng::new(test_seed());
    // Per layer: the runs killed while it was being downloaded.
    let mut interrupted = vec![0u64; app.layers.len()];
    let started = Instant::now();
    let mut kills = 0;
    while kills < KILLS {
        let before = app.sent();
        let mut pull = app.start_pull(&root);
        std::thread::sleep(Duration::from_millis(rng.range(200..1000)));
        if pull.try_wait().unwrap().is_some() {
            break; // finished before the kill: nothing left to interrupt
        }
        kill(&mut pull);
        kills += 1;
        let after = app.settle();
        for (i, (digest, _)) in app.layers.iter().enumerate() {
            if after[i] > before[i] && !blob_files(&root).contains_key(digest.hex()) {
                interrupted[i] += 1;
            }
        }
        // Every run ends with a verified store: what is visible is whole.
        assert_fsck_clean(&root, &host);
    }
    let killing = started.elapsed();
    for (digest, _) in &app.layers {
        app.registry.set_blob_behaviour(digest, Behaviour::Honest);
    }
    run_ok(device(&root, &host).args(["pull", &app.reference]));
    assert!(ingest_files(&root).is_empty(), "{:?}", ingest_files(&root));
    assert_fsck_clean(&root, &host);
    let listed = json_of(run_ok(device(&root, &host).args(["--json", "ls"])).as_bytes());
    assert_eq!(listed[0]["state"], "fetched", "{listed:#}");

    // A killed download loses at most what was in flight: the slice being
    // paced out and what the client had read but not yet written. Bound it
    // by two slices per interruption, and never a second whole blob.
    let sent = app.sent();
    for (i, (digest, size)) in app.layers.iter().enumerate() {
        let waste = sent[i] - size;
        eprintln!(
            "layer {digest}: {size} bytes, {} sent, {waste} re-sent over {} interrupted runs",
            sent[i], interrupted[i]
        );
        assert!(sent[i] >= *size);
        assert!(
            waste <= interrupted[i] * 2 * slice,
            "layer {digest}: {waste} bytes re-sent over {} interruptions",
            interrupted[i]
        );
        assert!(sent[i] < 2 * size, "layer {digest} fetched twice");
    }
    assert_eq!(
        kills, KILLS,
        "the pull finished after only {kills} kills; slow the registry down"
    );
    eprintln!("{kills} kills in {killing:?}; interrupted runs per layer {interrupted:?}");
}

#[test]
fn a_prune_waits_for_a_pull_in_progress_and_removes_nothing_it_fetched() {
    // One 4 MiB layer at 128 KiB/s: the pull outlasts the prune's patience.
    let app = SlowApp::publish(&unique("prune"), &[("web", 4 * MIB)], 128 * 1024);
    let host = app.registry.host();
    let scratch = temp_dir("stowage-prune-");
    let root = scratch.path().join("root");
    let mut pull = app.start_pull(&root);
    assert!(
        app.registry
            .wait_for_bytes_sent(&app.layers[0].0, 1, Duration::from_secs(30))
    );
    // The metadata blobs are written while the layer downloads (a blocking
    // task each), so they may land after its first byte: wait for them, with
    // the slow layer still far from done.
    assert!(
        wait_until(Duration::from_secs(30), || !blob_files(&root).is_empty()),
        "the metadata is stored while the layer downloads"
    );
    let blobs_before = blob_files(&root);
    let out = run_output(device(&root, &host).args(["prune"]));
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("another stowage process holds") && said.contains(&pull.id().to_string()),
        "the prune names the pull's process: {said}"
    );
    assert!(pull.try_wait().unwrap().is_none(), "the pull goes on");
    let blobs_after = blob_files(&root);
    for (hex, size) in &blobs_before {
        assert_eq!(blobs_after.get(hex), Some(size), "the prune removed {hex}");
    }
    let partial = root.join("ingest").join(app.layers[0].0.hex());
    assert!(partial.exists(), "{:?}", ingest_files(&root));
    kill(&mut pull);
    // Once the pull is gone, its partial download is stale and prune may go.
    let pruned = json_of(run_ok(device(&root, &host).args(["--json", "prune"])).as_bytes());
    assert!(
        pruned["stale_ingests"]
            .to_string()
            .contains(app.layers[0].0.hex()),
        "{pruned:#}"
    );
    assert_fsck_clean(&root, &host);
}
