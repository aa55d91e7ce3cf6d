//! After a reboot the device runs what it should: the agent (at every poll)
//! and `stowage reconcile` (at boot) start again, with no network, the apps
//! whose services the engine's restart left exited; a container killed by
//! hand is started at the next poll; a service that keeps exiting gets a
//! bounded number of tries and is then reported failed, while the others
//! keep running. Against the real registry, a private dockerd that is
//! restarted as a reboot would, and the real docker-compose.

use std::process::Output;

use crate::common::docker_device::*;
use crate::common::*;
use serde_json::Value;

/// The states of `app`'s services, by service, as `stowage ps` reads them.
fn services(device: &Device, app: &str) -> Vec<(String, String)> {
    let ps = device.json(&["ps"]);
    app_state(&ps, app)["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap().to_string(),
                s["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn live_state(status: &Value, app: &str) -> String {
    status["live_apps"]
        .as_array()
        .unwrap_or_else(|| panic!("no live_apps: {status}"))
        .iter()
        .find(|a| a["name"] == app)
        .unwrap_or_else(|| panic!("{app} not in {status}"))["state"]
        .as_str()
        .unwrap()
        .to_string()
}

fn agent_once(device: &Device, target: &str) -> Output {
    run_output(&mut device.stowage(&[
        "agent",
        "--target",
        target,
        "--once",
        "--interval",
        "1s",
        "--verify-timeout",
        "60",
        "--restart-limit",
        "2",
    ]))
}

/// The reconciliation's action for `app` in the agent's last status.
fn action(status: &Value, app: &str) -> String {
    status["reconcile"]["apps"]
        .as_array()
        .unwrap_or_else(|| panic!("no reconcile report: {status}"))
        .iter()
        .find(|a| a["name"] == app)
        .unwrap_or_else(|| panic!("{app} not reconciled: {status}"))["action"]["action"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn after_an_engine_restart_the_apps_run_again_offline_and_a_crash_loop_is_bounded() {
    let mut registry = Registry::start();
    let host = registry.host();
    let name = unique("reboot");
    let mut local = LocalImages::default();
    let base = format!("{name}-base:1");
    local.busybox(&base);
    let image = format!("{host}/{name}/base:1");
    push_image(&base, &image);
    // `flaky` runs the first time, and exits at once ever after: what a
    // service that cannot start after a reboot looks like.
    let shop = publish(
        &registry,
        &format!(
            "services:\n  web:\n    image: {image}\n    network_mode: none\n    command: [\"sleep\", \"3600\"]\n  flaky:\n    image: {image}\n    network_mode: none\n    command: [\"sh\", \"-c\", \"test -e /tmp/ran && exit 3; touch /tmp/ran; exec sleep 3600\"]\n"
        ),
        &format!("{host}/{name}/shop:1"),
    );
    let blog = publish(
        &registry,
        &format!(
            "services:\n  db:\n    image: {image}\n    network_mode: none\n    command: [\"sleep\", \"3600\"]\n"
        ),
        &format!("{host}/{name}/blog:1"),
    );
    let target = format!("{host}/{name}/fleet:prod");
    run_ok(
        stowage()
            .args(["--insecure-registry", &host, "target", "publish", &target])
            .args([&shop, &blog]),
    );

    let work = temp_dir("reboot-");
    let data_root = work.path().join("docker");
    let dockerd = PrivateDockerd::start(&data_root);
    let mut device = Device {
        root: work.path().join("root"),
        registry: host.clone(),
        docker_host: dockerd.host(),
        config: lenient_config(work.path()),
    };
    let first = agent_once(&device, &target);
    assert!(first.status.success(), "{first:?}");
    for app in ["shop", "blog"] {
        assert!(
            services(&device, app).iter().all(|(_, s)| s == "running"),
            "{app}: {:?}",
            services(&device, app)
        );
    }

    // The reboot: the registry is gone, the engine restarts, and the
    // services, with no restart policy, are left exited.
    registry.stop();
    drop(dockerd);
    let dockerd = PrivateDockerd::start(&data_root);
    device.docker_host = dockerd.host();
    for app in ["shop", "blog"] {
        assert!(
            services(&device, app).iter().all(|(_, s)| s == "exited"),
            "{app}: {:?}",
            services(&device, app)
        );
    }
    let status = device.json(&["status"]);
    assert_eq!(live_state(&status, "blog"), "degraded", "{status}");

    // The boot unit's one-shot: both apps are started again from the store
    // and the engine; shop's flaky service exits again at once.
    let boot = run_output(&mut device.stowage(&["--json", "reconcile", "--restart-limit", "2"]));
    let report: Value =
        serde_json::from_slice(&boot.stdout).unwrap_or_else(|e| panic!("{e}: {boot:?}"));
    assert_eq!(
        action(&serde_json::json!({"reconcile": report}), "blog"),
        "started"
    );
    assert!(
        services(&device, "blog")
            .iter()
            .all(|(_, s)| s == "running"),
        "{:?}",
        services(&device, "blog")
    );
    let shop_services = services(&device, "shop");
    assert!(
        shop_services.contains(&("web".into(), "running".into())),
        "{shop_services:?}"
    );
    assert!(
        shop_services.contains(&("flaky".into(), "exited".into())),
        "{shop_services:?}"
    );
    let status = device.json(&["status"]);
    assert_eq!(live_state(&status, "blog"), "running", "{status}");
    assert_eq!(status["last_restart"]["app"], "shop", "{status}");
    assert!(
        status["last_restart"]["why"][0]
            .as_str()
            .unwrap()
            .contains("flaky: exited"),
        "{status}"
    );

    // A container killed by hand is started at the next poll, with the
    // registry still down (the poll itself fails, the reconciliation not).
    let blog_container = run_ok(dockerd.docker().args([
        "ps",
        "-q",
        "--filter",
        "label=com.docker.compose.project=blog",
    ]));
    run_ok(dockerd.docker().args(["kill", blog_container.trim()]));
    assert!(
        services(&device, "blog").iter().all(|(_, s)| s == "exited"),
        "{:?}",
        services(&device, "blog")
    );
    let poll = agent_once(&device, &target);
    assert!(!poll.status.success(), "the registry is down: {poll:?}");
    let status = device.json(&["status"]);
    assert_eq!(action(&status, "blog"), "started", "{status}");
    assert_eq!(action(&status, "shop"), "started", "second try: {status}");
    assert_eq!(live_state(&status, "blog"), "running", "{status}");

    // Its two tries spent, the crash loop is reported failed and left down;
    // the agent does not start it again, and web keeps running.
    for poll in 0..2 {
        agent_once(&device, &target);
        let status = device.json(&["status"]);
        assert_eq!(action(&status, "shop"), "gave_up", "poll {poll}: {status}");
        assert_eq!(live_state(&status, "shop"), "failed", "{status}");
        assert_eq!(live_state(&status, "blog"), "running", "{status}");
    }
    let shop_services = services(&device, "shop");
    assert!(
        shop_services.contains(&("web".into(), "running".into())),
        "{shop_services:?}"
    );
    let text = device.ok(&["status"]);
    assert!(text.contains("failed"), "{text}");
    assert!(text.contains("last restart: shop"), "{text}");
    let failed = run_output(&mut device.stowage(&["reconcile", "--restart-limit", "2"]));
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
}
