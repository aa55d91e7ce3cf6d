//! `stowage run` (install included) killed with SIGKILL at random moments on
//! a private dockerd: the app still ends up running, and the store verifies.

use std::time::{Duration, Instant};

use crate::common::docker_device::*;
use crate::common::*;

#[test]
fn killed_at_random_moments_during_install_and_run_the_app_still_ends_up_running() {
    let mut registry = Registry::start();
    let name = unique("kill");
    let host = registry.host();
    let mut local = LocalImages::default();
    let base = format!("{name}-base:1");
    local.busybox(&base);
    let web_local = format!("{name}-web:1");
    local.build(&web_local, &base, &[("/srv/web.bin", noise(7, 4_000_000))]);
    let worker_local = format!("{name}-worker:1");
    local.build(
        &worker_local,
        &base,
        &[("/opt/job.bin", noise(8, 2_000_000))],
    );
    let [web, worker, db] = ["web", "worker", "db"].map(|s| format!("{host}/{name}/{s}:1"));
    push_image(&web_local, &web);
    push_image(&worker_local, &worker);
    push_image(&base, &db);
    let app = publish(
        &registry,
        &three_service_compose(&web, &worker, &db),
        &format!("{host}/{name}/app:1"),
    );
    let work = temp_dir("install-kill-");
    let dockerd = PrivateDockerd::start(&work.path().join("docker"));
    let device = Device {
        root: work.path().join("root"),
        registry: host.clone(),
        docker_host: dockerd.host(),
        config: lenient_config(work.path()),
    };
    device.ok(&["pull", &app]);
    registry.stop();

    // Undo what runs did, by hand, as a user or a lost data root would.
    let reset = |what: u64| {
        let ids = run_ok(dockerd.docker().args(["ps", "-aq"]));
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            run_ok(dockerd.docker().args(["rm", "-f"]).args(&ids));
        }
        if what == 0 {
            let tags: Vec<String> = engine_images(&dockerd)
                .into_iter()
                .filter(|t| t.contains(":stowage-sha256-"))
                .collect();
            if !tags.is_empty() {
                run_ok(dockerd.docker().arg("rmi").args(&tags));
            }
        }
        if what == 1 {
            let _ = std::fs::remove_dir_all(device.root.join("apps/app"));
        }
    };
    let started = Instant::now();
    device.ok(&["run", "app"]);
    let full_run = started.elapsed();

    let mut rng = Rng::new(test_seed());
    const KILLS: usize = 30;
    let killing = Instant::now();
    for kills in 1..=KILLS {
        if kills % 2 == 1 {
            reset(rng.below(3));
        }
        let mut child = device
            .stowage(&["run", "app"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Half the kills land in the first second, where install extracts
        // and loads; the rest anywhere in a full run, compose's `up` included.
        let window = if rng.below(2) == 0 {
            1000
        } else {
            full_run.as_millis() as u64
        };
        let delay = Duration::from_millis(rng.below(window + 1));
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        if kills % 10 == 0 {
            device.ok(&["run", "app"]);
            assert_eq!(app_state(&device.json(&["ps"]), "app")["state"], "running");
        }
    }
    eprintln!(
        "killed `stowage run` {KILLS} times in {:?} (a full run from scratch takes {full_run:?})",
        killing.elapsed()
    );
    device.ok(&["run", "app"]);
    let ps = device.json(&["ps"]);
    let state = app_state(&ps, "app");
    assert_eq!(state["state"], "running", "{ps}");
    assert_eq!(state["services"].as_array().unwrap().len(), 3, "{ps}");
    device.ok(&["fsck"]);
    // No intermediate image of a killed layer-by-layer load is left.
    assert_no_intermediate_images(&dockerd, "after the killed installs");
}
