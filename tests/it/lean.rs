//! Storage-lean installs and updates, on real loop-mounted ext4 volumes
//! with a private dockerd whose data root is on them:
//! - the install's peak extra disk on Docker's volume, sampled while it runs,
//!   is what the fit check predicted, within 5%, on both paths: layer by
//!   layer, two images at once within the one-at-a-time peak (the default),
//!   and whole images (`load_path = "whole"` in the config file, with room
//!   to spare);
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
                .any(|p| p.as_str().unwrap().starts_with(&*path))
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

    // Whole images (asked for in the config file, with room to spare), and
    // the default, layer by layer. Each on a volume and engine of its own.
    let work = temp_dir("lean-peak-");
    let mut devices = Vec::new();
    for whole in [true, false] {
        let volume = LoopVolume::new(512);
        let dockerd = PrivateDockerd::start(&volume.path().join("docker"));
        let config = work.path().join(format!("stowage-{whole}.toml"));
        let load_path = if whole { "whole" } else { "lean" };
        std::fs::write(
            &config,
            format!("watermark = 99\nload_path = \"{load_path}\"\n"),
        )
        .unwrap();
        let device = Device {
            root: work.path().join(format!("root-{whole}")),
            registry: registry.host(),
            docker_host: dockerd.host(),
            config: Some(config),
        };
        device.ok(&["pull", &app]);
        devices.push((whole, volume, dockerd, device));
    }
    registry.stop();

    let mut peaks = Vec::new();
    for (whole, volume, dockerd, device) in &devices {
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
            "whole {whole}: Docker's volume: predicted peak {predicted} ({} at {}), measured peak {peak}, at the end {after}; sum of parts {}; notes {}",
            docker_volume["peak_step"],
            docker_volume["required_parts"],
            docker_volume["sum_of_parts"],
            report["check"]["notes"]
        );
        let loaded_whole = report["check"]["notes"]
            .to_string()
            .contains("loaded whole");
        assert_eq!(loaded_whole, *whole, "{}", report["check"]["notes"]);
        // The lean way hands the noise layers inflated (their copy is no
        // larger), the rest as the peak allows.
        let inflated_some = report["check"]["notes"]
            .to_string()
            .contains("go to the engine inflated");
        assert_eq!(inflated_some, !*whole, "{}", report["check"]["notes"]);
        assert_eq!(docker_volume["peak_step"], "install", "{docker_volume}");
        let off = (peak as f64 - predicted as f64).abs() / predicted as f64;
        assert!(
            off <= 0.05,
            "whole {whole}: measured peak {peak} is {:.1}% off the predicted {predicted}",
            off * 100.0
        );
        peaks.push(predicted);
        // The engine holds the images, and no intermediate image is left.
        let images = engine_images(dockerd);
        assert_eq!(
            images.iter().filter(|i| i.contains("stowage")).count(),
            2,
            "{images:?}"
        );
        assert_no_intermediate_images(dockerd, "after the install");
    }
    // Whole images never need less (their copies are the tars).
    assert!(peaks[0] >= peaks[1], "{peaks:?}");
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
    let registry = Registry::start();
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
    // The figures of the default path, layer by layer.
    let check: Value =
        serde_json::from_str(&run_ok(&mut device.stowage(&["--json", "check", &app])))
            .expect("check JSON");
    let v = volume_of(&check, volume.path());
    let (peak, sum) = (
        v["required"].as_u64().unwrap(),
        v["sum_of_parts"].as_u64().unwrap(),
    );
    let reserve = v["reserved"].as_u64().unwrap();
    eprintln!(
        "modelled peak {peak} at {}, sum of parts {sum}: {v}",
        v["peak_step"]
    );
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

    // Flash wear: what the update wrote, on the one volume.
    let status = device.json(&["status"]);
    let writes = &status["last_update_writes"];
    eprintln!("the update wrote {writes}");
    let part = |name: &str| v["required_parts"][name].as_u64().unwrap() as f64;
    let figure = |name: &str| writes[name].as_u64().unwrap() as f64;
    assert!(figure("store_bytes") >= 0.9 * part("blobs"), "{writes}");
    assert!(figure("engine_bytes") >= part("docker_layers"), "{writes}");
    assert!(figure("engine_temp_bytes") > 0.0, "{writes}");
    assert_eq!(writes["volumes"].as_array().unwrap().len(), 1, "{writes}");
    let text = device.ok(&["status"]);
    assert!(text.contains("last update wrote:"), "{text}");
    assert!(text.contains("rollback copy: none"), "{text}");
    device.ok(&["stop", "--all"]);
}

#[test]
fn a_disk_filled_by_another_process_during_the_install_fails_cleanly_and_the_next_try_succeeds() {
    let seed = test_seed();
    let registry = Registry::start();
    let name = unique("leanfull");
    let host = registry.host();
    let mut local = LocalImages::default();
    let base = format!("{name}-base:1");
    local.0.push(busybox_image_of_its_own(&base));
    let base_remote = format!("{host}/{name}/base:1");
    push_image(&base, &base_remote);
    let compose = |web: &str| {
        format!(
            "services:\n  web:\n    image: {web}\n    network_mode: none\n  db:\n    image: {base_remote}\n    network_mode: none\n    command: [\"sleep\", \"3600\"]\n"
        )
    };
    let mut versions = Vec::new();
    for (v, bytes) in [(1u64, 1_000_000usize), (2, 48 * MIB as usize)] {
        let web_local = format!("{name}-web:{v}");
        local.build(
            &web_local,
            &base,
            &[(&format!("/srv/web{v}.bin"), noise(seed + v, bytes))],
        );
        let web = format!("{host}/{name}/web:{v}");
        push_image(&web_local, &web);
        versions.push(publish(
            &registry,
            &compose(&web),
            &format!("{host}/{name}/full:{v}"),
        ));
    }

    let work = temp_dir("lean-full-");
    let volume = LoopVolume::new(512);
    let data_root = volume.path().join("docker");
    let dockerd = PrivateDockerd::start(&data_root);
    let device = Device {
        root: work.path().join("root"),
        registry: host.clone(),
        docker_host: dockerd.host(),
        config: lenient_config(work.path()),
    };
    device.ok(&["update", &versions[0]]);
    device.ok(&["pull", &versions[1]]);
    drop(registry);
    let running_before = running_containers(&dockerd);
    assert_eq!(running_before.len(), 2, "{running_before:?}");
    let images_before = engine_image_ids(&dockerd);

    // Once the engine starts writing the new layer's temporary copy (the
    // check has passed), another process takes every free block.
    let filler = volume.path().join("filler");
    let stop = Arc::new(AtomicBool::new(false));
    let filled = {
        let (stop, tmp, filler) = (stop.clone(), data_root.join("tmp"), filler.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let importing = std::fs::read_dir(&tmp).is_ok_and(|entries| {
                    entries.flatten().any(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with("docker-import-")
                    })
                });
                if importing {
                    fill_up(&filler);
                    return true;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            false
        })
    };
    let out = run_output(&mut device.stowage(&["update", &versions[1]]));
    stop.store(true, Ordering::SeqCst);
    assert!(filled.join().unwrap(), "the engine never started the load");
    assert!(!out.status.success(), "{}", say(&out));
    assert_ne!(
        out.status.code(),
        Some(100),
        "the check passed: {}",
        say(&out)
    );

    // The old app runs on; nothing of the new image is left in the engine.
    assert_eq!(running_containers(&dockerd), running_before);
    assert_eq!(engine_image_ids(&dockerd), images_before);
    assert_no_intermediate_images(&dockerd, "an intermediate image is left");
    let dangling = run_ok(
        dockerd
            .docker()
            .args(["images", "-aq", "--filter", "dangling=true"]),
    );
    assert_eq!(dangling.trim(), "", "a partial image is left");

    // Space is back: the next try succeeds.
    std::fs::remove_file(&filler).unwrap();
    device.ok(&["update", &versions[1]]);
    let ps = device.json(&["ps"]);
    assert_eq!(app_state(&ps, "full")["state"], "running", "{ps}");
    device.ok(&["stop", "--all"]);
}

/// Names and images of the running containers, sorted.
fn running_containers(dockerd: &PrivateDockerd) -> Vec<String> {
    let out = run_ok(
        dockerd
            .docker()
            .args(["ps", "--format", "{{.Names}} {{.Image}}"]),
    );
    let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// Every image in the engine, intermediate ones included, by ID.
fn engine_image_ids(dockerd: &PrivateDockerd) -> Vec<String> {
    let out = run_ok(dockerd.docker().args(["images", "-aq", "--no-trunc"]));
    let mut ids: Vec<String> = out.lines().map(str::to_string).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Takes every free block of the volume holding `path` (root's reserve too)
/// into the file `path`, 4 MiB at a time, as another process might.
fn fill_up(path: &std::path::Path) {
    let file = std::fs::File::create(path).expect("create the filler");
    let mut offset = 0u64;
    let mut chunk = 4 * MIB;
    while chunk >= 4096 {
        match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), offset, chunk) {
            Ok(()) => offset += chunk,
            Err(_) => chunk /= 2,
        }
    }
}
