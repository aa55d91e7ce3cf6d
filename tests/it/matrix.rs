//! The engine and compose matrix: the core flows (install, run, update with
//! rollback, repair, reconcile, prune) against Docker 20.10 and 26.1, each
//! with compose v1 and v2 (see `tests/common/engines.rs`), one test per pair
//! so a failure names it. The default pair (20.10, v1) is not repeated here:
//! the rest of the suite runs on it, these flows among them
//! (`it::install`, `it::update`, `it::reconcile`). Each test has a private dockerd of its engine and a Docker
//! config that has the compose v2 plugin or not; the registry is stopped
//! before the rollback, so everything from there on works offline.

use std::process::Output;

use serde_json::Value;

use crate::common::docker_device::*;
use crate::common::*;

/// A device as `docker_device::Device`, whose commands also get the Docker
/// config of the pair's compose (`DOCKER_CONFIG`, with or without the v2
/// plugin) instead of the sandbox's empty one.
struct MatrixDevice {
    device: Device,
    docker_config: std::path::PathBuf,
}

impl MatrixDevice {
    fn stowage(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = self.device.stowage(args);
        cmd.env("DOCKER_CONFIG", &self.docker_config);
        cmd
    }

    fn ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.stowage(args))
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.ok(&full);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }
}

fn events(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn has_event(events: &[Value], name: &str) -> bool {
    events.iter().any(|e| e["event"] == name)
}

/// Each service's (container name, state) as `stowage ps` reports them.
fn containers(device: &MatrixDevice, app: &str) -> Vec<(String, String, String)> {
    let ps = device.json(&["ps"]);
    let mut rows: Vec<(String, String, String)> = app_state(&ps, app)["services"]
        .as_array()
        .unwrap_or_else(|| panic!("no services for {app}: {ps}"))
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap_or_default().to_string(),
                s["container"].as_str().unwrap_or_default().to_string(),
                s["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    rows.sort();
    rows
}

/// The image (`REPO:TAG`) the container of `service` runs in the engine.
fn image_of(dockerd: &PrivateDockerd, container: &str) -> String {
    run_ok(
        dockerd
            .docker()
            .args(["inspect", "--format", "{{.Config.Image}}", container]),
    )
    .trim()
    .to_string()
}

fn core_flows(engine: Engine, compose: ComposeVersion) {
    let started = std::time::Instant::now();
    // Each phase's time, shown with a failure's output (not asserted).
    let phase = |what: &str| {
        eprintln!(
            "{engine:?}/{compose:?}: {what} at {:.1} s",
            started.elapsed().as_secs_f64()
        )
    };
    let mut registry = Registry::start();
    let host = registry.host();
    let name = unique("matrix");
    let mut local = LocalImages::default();
    let base = format!("{name}-base:1");
    local.busybox(&base);
    let [web1, web2] = ["1", "2"].map(|v| {
        let tag = format!("{name}-web:{v}");
        local.build(
            &tag,
            &base,
            &[(
                &format!("/srv/web-{v}.bin"),
                noise(u64::from(v.as_bytes()[0]), 150_000),
            )],
        );
        let remote = format!("{host}/{name}/web:{v}");
        push_image(&tag, &remote);
        remote
    });
    let db = format!("{host}/{name}/db:1");
    push_image(&base, &db);
    // SIGKILL stops: busybox's sleep as pid 1 ignores SIGTERM, and every
    // stop would wait compose's 10 s for nothing.
    let version = |web: &str, command: &str, tag: &str| {
        publish(
            &registry,
            &format!(
                "services:\n  web:\n    image: {web}\n    network_mode: none\n    stop_signal: SIGKILL\n    command: {command}\n  db:\n    image: {db}\n    network_mode: none\n    stop_signal: SIGKILL\n    command: [\"sleep\", \"3600\"]\n"
            ),
            &format!("{host}/{name}/shop:{tag}"),
        )
    };
    let sleep = "[\"sleep\", \"3600\"]";
    let v1 = version(&web1, sleep, "1");
    let v2 = version(&web2, sleep, "2");
    let v3 = version(&web2, "[\"false\"]", "3");

    phase("published");
    let work = temp_dir("matrix-");
    let dockerd = PrivateDockerd::start_with(&work.path().join("docker"), engine);
    let server = dockerd.server_version();
    assert!(
        server.starts_with(engine.version_prefix()),
        "{engine:?} runs {server}"
    );
    let api = run_ok(
        dockerd
            .docker()
            .args(["version", "--format", "{{.Server.APIVersion}}"]),
    );
    assert_eq!(api.trim(), engine.api_version(), "{engine:?}");
    let compose_setup = ComposeSetup::new(compose);
    let device = MatrixDevice {
        device: Device {
            root: work.path().join("root"),
            registry: host.clone(),
            docker_host: dockerd.host(),
            config: lenient_config(work.path()),
        },
        docker_config: compose_setup.docker_config().to_path_buf(),
    };
    phase("dockerd up");
    device.ok(&["pull", &v1, &v2]);

    phase("pulled");
    // Install: both images loaded, the shared base sent once.
    let report = device.json(&["install", &v1]);
    let images = report["images"].as_array().expect("images in the report");
    assert_eq!(images.len(), 2, "{report}");
    assert!(images.iter().all(|i| i["action"] == "loaded"), "{report}");
    let sent: u64 = images
        .iter()
        .map(|i| i["layers_sent"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(sent, 2, "the base and web's own layer: {report}");

    phase("installed");
    // Run: compose (the one of this pair, by its container names) starts both.
    device.ok(&["run", "shop"]);
    let expected = |state: &str| {
        vec![
            (
                "db".to_string(),
                compose.container_name("shop", "db"),
                state.to_string(),
            ),
            (
                "web".to_string(),
                compose.container_name("shop", "web"),
                state.to_string(),
            ),
        ]
    };
    assert_eq!(containers(&device, "shop"), expected("running"));
    let web_container = compose.container_name("shop", "web");
    assert!(
        image_of(&dockerd, &web_container).contains("/web:stowage-sha256-"),
        "{}",
        image_of(&dockerd, &web_container)
    );

    phase("running");
    // df reads the engine's disk use in its API version's dialect.
    let df = device.json(&["df"]);
    let docker_store = df["stores"]
        .as_array()
        .and_then(|stores| stores.iter().find(|s| s["store"] == "docker images"))
        .unwrap_or_else(|| panic!("no docker images in df: {df}"));
    assert!(
        docker_store["bytes"].as_u64().is_some_and(|b| b > 150_000),
        "{df}"
    );

    // Update to version 2 as one transaction: only web's new layer is loaded.
    let out = run_output(&mut device.stowage(&["--json", "update", "--verify-timeout", "60", &v2]));
    assert!(out.status.success(), "{}", say(&out));
    let ev = events(&out);
    assert!(
        has_event(&ev, "committed") && has_event(&ev, "pruned"),
        "{ev:?}"
    );
    assert_eq!(containers(&device, "shop"), expected("running"));
    let on_v2 = image_of(&dockerd, &web_container);

    phase("updated");
    // Version 3's web exits at once: pulled (the update's prune dropped
    // what no running app needs), then applied with the registry stopped,
    // it rolls back to version 2.
    device.ok(&["pull", &v3]);
    registry.stop();
    let out = run_output(&mut device.stowage(&["--json", "update", "--verify-timeout", "30", &v3]));
    assert_eq!(out.status.code(), Some(1), "{}", say(&out));
    let ev = events(&out);
    let rolled = ev
        .iter()
        .find(|e| e["event"] == "rolled_back")
        .unwrap_or_else(|| panic!("no rolled_back event: {ev:?}"));
    assert!(
        rolled["error"]
            .as_str()
            .unwrap_or_default()
            .contains("exited"),
        "{rolled}"
    );
    assert_eq!(containers(&device, "shop"), expected("running"));
    assert_eq!(image_of(&dockerd, &web_container), on_v2);
    let status = device.json(&["status"]);
    assert_eq!(status["running"]["shop"], v2, "{status}");

    phase("rolled back");
    // Reconcile: a container killed by hand is started again, offline.
    run_ok(dockerd.docker().args(["kill", &web_container]));
    let web_state = containers(&device, "shop")
        .into_iter()
        .find(|(s, _, _)| s == "web")
        .map(|(_, _, state)| state);
    assert_eq!(web_state.as_deref(), Some("exited"));
    let out = run_output(&mut device.stowage(&["--json", "reconcile"]));
    assert!(out.status.success(), "{}", say(&out));
    assert_eq!(containers(&device, "shop"), expected("running"));

    phase("reconciled");
    // Repair: an image Docker lost is reloaded from the blob store.
    device.ok(&["stop", "shop"]);
    assert!(
        device.json(&["ps"]).as_array().is_some_and(|apps| apps
            .iter()
            .all(|a| a["name"] != "shop" || a["state"] == "stopped")),
        "{}",
        device.json(&["ps"])
    );
    run_ok(dockerd.docker().args(["rmi", &on_v2]));
    let out = run_fails(&mut device.stowage(&["fsck"]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("--repair"),
        "{}",
        say(&out)
    );
    device.ok(&["fsck", "--repair"]);
    device.ok(&["fsck"]);
    assert!(engine_images(&dockerd).contains(&on_v2));
    device.ok(&["run", "shop"]);
    assert_eq!(containers(&device, "shop"), expected("running"));

    phase("repaired");
    // The user's choice of compose wins over what is found: the other one
    // runs the app (its container names say which), and one that is not
    // there is named in the error.
    device.ok(&["stop", "shop"]);
    let (other, choice) = match compose {
        ComposeVersion::V1 => (ComposeVersion::V2, "plugin"),
        ComposeVersion::V2 => (ComposeVersion::V1, "standalone"),
    };
    if compose == ComposeVersion::V2 {
        // From the environment on one engine, from the config file on the other.
        match engine {
            Engine::Docker20 => {
                run_ok(
                    device
                        .stowage(&["run", "shop"])
                        .env("STOWAGE_COMPOSE", choice),
                );
            }
            Engine::Docker26 => {
                let config = work.path().join("compose.toml");
                std::fs::write(&config, format!("watermark = 99\ncompose = \"{choice}\"\n"))
                    .unwrap();
                let chosen = MatrixDevice {
                    device: Device {
                        root: device.device.root.clone(),
                        registry: device.device.registry.clone(),
                        docker_host: device.device.docker_host.clone(),
                        config: Some(config),
                    },
                    docker_config: device.docker_config.clone(),
                };
                chosen.ok(&["run", "shop"]);
            }
        }
        let names: Vec<String> = containers(&device, "shop")
            .into_iter()
            .map(|(_, name, _)| name)
            .collect();
        assert_eq!(
            names,
            [
                other.container_name("shop", "db"),
                other.container_name("shop", "web")
            ]
        );
        device.ok(&["stop", "shop"]);
    } else {
        let out = run_fails(&mut device.stowage(&["--compose", choice, "run", "shop"]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("`docker compose` was chosen") && stderr.contains("does not work here"),
            "{}",
            say(&out)
        );
    }

    // Prune: once stopped and forgotten, every image stowage loaded goes,
    // and nothing else was there.
    let stored = device.json(&["ls"]);
    for app in stored.as_array().unwrap_or_else(|| panic!("ls: {stored}")) {
        device.ok(&["rm", app["reference"].as_str().unwrap_or_default()]);
    }
    let pruned = device.json(&["prune"]);
    assert!(
        pruned["docker"]["removed"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "{pruned}"
    );
    assert_eq!(engine_images(&dockerd), Vec::<String>::new());
    let left = run_ok(dockerd.docker().args(["ps", "-aq"]));
    assert!(left.trim().is_empty(), "containers left: {left}");
    phase("end");
}

#[test]
fn core_flows_on_docker_20_10_with_compose_v2() {
    core_flows(Engine::Docker20, ComposeVersion::V2);
}

#[test]
fn core_flows_on_docker_26_1_with_compose_v1() {
    core_flows(Engine::Docker26, ComposeVersion::V1);
}

#[test]
fn core_flows_on_docker_26_1_with_compose_v2() {
    core_flows(Engine::Docker26, ComposeVersion::V2);
}

/// Docker 26's containerd image store (`containerd-snapshotter`): an image
/// loaded there is named by its manifest, not its config digest, so stowage
/// cannot find what it loads. Install (and `run`, which installs) refuses it
/// up front, saying why and what to change, and writes nothing.
#[test]
fn the_containerd_image_store_is_refused_at_install_and_nothing_is_written() {
    let mut registry = Registry::start();
    let host = registry.host();
    let name = unique("snap");
    let mut local = LocalImages::default();
    let base = format!("{name}-base:1");
    local.busybox(&base);
    let web = format!("{host}/{name}/web:1");
    push_image(&base, &web);
    let app = publish(
        &registry,
        &format!(
            "services:\n  web:\n    image: {web}\n    network_mode: none\n    command: [\"sleep\", \"3600\"]\n"
        ),
        &format!("{host}/{name}/shop:1"),
    );
    let work = temp_dir("snap-");
    let dockerd = PrivateDockerd::start_with(
        &work.path().join("docker"),
        DaemonSpec {
            engine: Engine::Docker26,
            containerd_snapshotter: true,
        },
    );
    let info = run_ok(
        dockerd
            .docker()
            .args(["info", "--format", "{{json .DriverStatus}}"]),
    );
    assert!(info.contains("io.containerd.snapshotter.v1"), "{info}");
    let compose_setup = ComposeSetup::new(ComposeVersion::V2);
    let device = MatrixDevice {
        device: Device {
            root: work.path().join("root"),
            registry: host.clone(),
            docker_host: dockerd.host(),
            config: lenient_config(work.path()),
        },
        docker_config: compose_setup.docker_config().to_path_buf(),
    };
    device.ok(&["pull", &app]);
    registry.stop();
    for verb in ["install", "run"] {
        let target = if verb == "install" {
            app.as_str()
        } else {
            "shop"
        };
        let out = run_fails(&mut device.stowage(&[verb, target]));
        assert_eq!(out.status.code(), Some(1), "{}", say(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("containerd's image store")
                && stderr.contains("containerd-snapshotter")
                && stderr.contains("Docker 26.1.")
                && stderr.contains("nothing was installed"),
            "{verb}: {}",
            say(&out)
        );
        assert!(
            !work.path().join("root/apps/shop").exists(),
            "{verb} extracted the bundle"
        );
        assert_eq!(engine_images(&dockerd), Vec::<String>::new(), "{verb}");
    }
    assert!(
        device
            .json(&["ps"])
            .as_array()
            .is_some_and(|a| a.is_empty()),
        "{}",
        device.json(&["ps"])
    );
    // The app stays in the store, ready for an engine stowage can use.
    assert_fsck_clean_device(&device);
}

fn assert_fsck_clean_device(device: &MatrixDevice) {
    let report = device.json(&["fsck"]);
    assert_eq!(report["clean"], true, "fsck: {report:#}");
}
