//! Storage-lean installs and updates, on real loop-mounted ext4 volumes
//! with a private dockerd whose data root is on them:
//! - the install's peak extra disk on Docker's volume, sampled while it runs,
//!   is what the fit check predicted, within 5%;
//! - an update sized to fit at its modelled peak, but not at the sum of all
//!   it writes, is accepted and succeeds; the same update with a few MiB
//!   less room is refused (exit 100) and changes nothing.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::docker_device::*;
use crate::common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Text that gzip shrinks to a few percent: the engine's temporary copy of
/// such a layer is far smaller when it is handed the blob.
fn compressible(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut n = seed;
    while out.len() < len {
        out.extend_from_slice(format!("line {n} of a log that repeats itself\n").as_bytes());
        n += 1;
    }
    out.truncate(len);
    out
}

/// An app of two services on a base of their own: web with an
/// incompressible and a compressible layer, worker with an incompressible
/// one. Returns its pinned reference.
fn publish_lean_app(
    registry: &Registry,
    local: &mut LocalImages,
    name: &str,
    seed: u64,
    noise_bytes: usize,
) -> String {
    let host = registry.host();
    let base = format!("{name}-base:1");
    local.0.push(busybox_image_of_its_own(&base));
    let web_local = format!("{name}-web:1");
    local.build(
        &web_local,
        &base,
        &[
            ("/srv/web.bin", noise(seed, noise_bytes)),
            ("/srv/web.log", compressible(seed, 12 * MIB as usize)),
        ],
    );
    let worker_local = format!("{name}-worker:1");
    local.build(
        &worker_local,
        &base,
        &[("/opt/job.bin", noise(seed + 1, noise_bytes))],
    );
    let [web, worker] = ["web", "worker"].map(|s| format!("{host}/{name}/{s}:1"));
    push_image(&web_local, &web);
    push_image(&worker_local, &worker);
    publish(
        registry,
        &format!(
            "services:\n  web:\n    image: {web}\n    network_mode: none\n  worker:\n    image: {worker}\n    network_mode: none\n"
        ),
        &format!("{host}/{name}/lean:1"),
    )
}

/// The fit report's volume holding `path`.
fn volume_of<'a>(fit: &'a Value, path: &std::path::Path) -> &'a Value {
    let path = path.to_string_lossy();
    fit["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| {
            v["paths"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p.as_str().unwrap().starts_with(path.as_ref()))
        })
        .unwrap_or_else(|| panic!("no volume holds {path}: {fit}"))
}

/// Samples the used bytes of the volume at `path` until stopped; the most seen.
fn sample_used(path: std::path::PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::SeqCst) {
            peak = peak.max(fs_stats(&path).used_bytes());
            std::thread::sleep(Duration::from_micros(500));
        }
        peak.max(fs_stats(&path).used_bytes())
    })
}

#[test]
fn the_install_peak_on_dockers_volume_is_what_the_check_predicted() {
    let seed = test_seed();
    let mut registry = Registry::start();
    let name = unique("leanpeak");
    let mut local = LocalImages::default();
    let app = publish_lean_app(&registry, &mut local, &name, seed, 16 * MIB as usize);

    let work = temp_dir("lean-peak-");
    let volume = LoopVolume::new(512);
    let dockerd = PrivateDockerd::start(&volume.path().join("docker"));
    let device = Device {
        root: work.path().join("root"),
        registry: registry.host(),
        docker_host: dockerd.host(),
        config: lenient_config(work.path()),
    };
    device.ok(&["pull", &app]);
    registry.stop();

    let before = volume.synced_stats().used_bytes();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_used(volume.path().to_path_buf(), stop.clone());
    let out = device
        .stowage(&["--json", "install", &app])
        .stdout(Stdio::piped())
        .output()
        .expect("run stowage install");
    stop.store(true, Ordering::SeqCst);
    let peak = sampler.join().expect("sampler") - before;
    assert!(out.status.success(), "{}", say(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("install JSON");
    let docker_volume = volume_of(&report["check"], &volume.path().join("docker"));
    let predicted = docker_volume["required"].as_u64().unwrap();
    let after = volume.synced_stats().used_bytes() - before;
    eprintln!(
        "Docker's volume: predicted peak {predicted} ({} at {}), measured peak {peak}, at the end {after}; sum of parts {}",
        docker_volume["peak_step"],
        docker_volume["required_parts"],
        docker_volume["sum_of_parts"]
    );
    assert_eq!(docker_volume["peak_step"], "install", "{docker_volume}");
    let off = (peak as f64 - predicted as f64).abs() / predicted as f64;
    assert!(
        off <= 0.05,
        "measured peak {peak} is {:.1}% off the predicted {predicted}",
        off * 100.0
    );
    // The engine holds the images, and no intermediate image is left.
    let images = engine_images(&dockerd);
    assert_eq!(images.iter().filter(|i| i.contains("stowage")).count(), 2, "{images:?}");
    let left = run_ok(dockerd.docker().args([
        "images",
        "-aq",
        "--filter",
        "label=org.stowage.intermediate",
    ]));
    assert_eq!(left.trim(), "");
}

/// Makes `path`'s volume have `available` bytes above the policy's reserve
/// by (re)writing `filler`.
fn leave_available(volume: &LoopVolume, filler: &std::path::Path, reserve: u64, available: u64) {
    let _ = std::fs::remove_file(filler);
    let free = volume.synced_stats().available_bytes();
    let fill = free
        .checked_sub(reserve + available)
        .unwrap_or_else(|| panic!("only {free} bytes free, {available} wanted"));
    run_ok(
        Command::new("fallocate")
            .args(["-l", &fill.to_string()])
            .arg(filler),
    );
    volume.synced_stats();
}

#[test]
fn an_update_that_fits_only_at_its_modelled_peak_succeeds_and_one_just_over_is_refused() {
    let seed = test_seed();
    let mut registry = Registry::start();
    let name = unique("leanfit");
    let mut local = LocalImages::default();
    let app = publish_lean_app(&registry, &mut local, &name, seed, 12 * MIB as usize);

    // Store, apps and Docker on one volume.
    let volume = LoopVolume::new(512);
    let dockerd = PrivateDockerd::start(&volume.path().join("docker"));
    let config = volume.path().join("stowage.toml");
    std::fs::write(&config, "watermark = 99\n").unwrap();
    let device = Device {
        root: volume.path().join("root"),
        registry: registry.host(),
        docker_host: dockerd.host(),
        config: Some(config),
    };
    let check = device.json(&["check", &app]);
    let v = volume_of(&check, volume.path());
    let (peak, sum) = (
        v["required"].as_u64().unwrap(),
        v["sum_of_parts"].as_u64().unwrap(),
    );
    let reserve = v["reserved"].as_u64().unwrap();
    eprintln!("modelled peak {peak} at {}, sum of parts {sum}: {v}", v["peak_step"]);
    assert!(
        sum >= peak + 8 * MIB,
        "the test needs a gap between the peak and the sum: {v}"
    );
    let filler = volume.path().join("filler");

    // A few MiB short of the peak: refused before anything is written.
    leave_available(&volume, &filler, reserve, peak - 3 * MIB);
    let out = run_output(&mut device.stowage(&["update", &app]));
    assert_eq!(out.status.code(), Some(100), "{}", say(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("during the install"), "{said}");
    assert!(engine_images(&dockerd).is_empty());

    // Room for the peak (and 2 MiB), not for the sum: accepted, and it runs.
    leave_available(&volume, &filler, reserve, peak + 2 * MIB);
    let out = run_output(&mut device.stowage(&["update", &app]));
    assert!(out.status.success(), "{}", say(&out));
    let ps = device.json(&["ps"]);
    assert_eq!(app_state(&ps, "lean")["state"], "running", "{ps}");
    device.ok(&["stop", "--all"]);
}
