//! `stowage update`: the whole update as one transaction, against the real
//! registry, dockerd and docker-compose.

use std::process::Output;

use crate::common::*;
use serde_json::Value;

fn events(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn has_event(events: &[Value], name: &str) -> bool {
    events.iter().any(|e| e["event"] == name)
}

/// Publishes version `version` of the app `name`: `web` runs `web_command`
/// from the web image of that version, `db` sleeps in the shared base.
fn publish_version(
    registry: &Registry,
    name: &str,
    version: &str,
    web_image: &str,
    web_command: &str,
) -> String {
    let base = format!("{}/{name}/base:1", registry.host());
    publish_compose_app(
        registry,
        name,
        version,
        &format!(
            "services:\n  web:\n    image: {web_image}\n    command: {web_command}\n  db:\n    image: {base}\n    command: [\"sleep\", \"3600\"]\n"
        ),
    )
}

#[test]
fn update_rolls_forward_shares_layers_and_rolls_back_offline() {
    ensure_dockerd();
    let mut registry = Registry::start();
    let name = unique("upd");
    let host = registry.host();
    let _cleanup = AppCleanup::for_app(&host, &name);
    let base_local = format!("{name}-base:1");
    let base_local_image = busybox_image(&base_local);
    push_image(&base_local, &format!("{host}/{name}/base:1"));
    for v in ["1", "2"] {
        let local = format!("{name}-web:{v}");
        let local_image = build_image(
            &local,
            &base_local,
            &[(&format!("v{v}.txt"), vec![b'x'; 200_000 * v.len()])],
            "",
        );
        push_image(&local, &format!("{host}/{name}/web:{v}"));
        drop(local_image);
    }
    drop(base_local_image);
    let sleep = "[\"sleep\", \"3600\"]";
    let v1 = publish_version(
        &registry,
        &name,
        "v1",
        &format!("{host}/{name}/web:1"),
        sleep,
    );
    let v2 = publish_version(
        &registry,
        &name,
        "v2",
        &format!("{host}/{name}/web:2"),
        sleep,
    );
    let v3 = publish_version(
        &registry,
        &name,
        "v3",
        &format!("{host}/{name}/web:2"),
        "[\"false\"]",
    );
    let root = temp_dir("root-");

    // Version 1 from nothing.
    let out = run_output(&mut stowage_on(
        root.path(),
        &host,
        &["--json", "update", "--verify-timeout", "60", &v1],
    ));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(has_event(&events(&out), "committed"));
    assert_eq!(
        running_images(&name).len(),
        2,
        "{:?}",
        running_images(&name)
    );

    // Version 2 shares the base: only web's new layer is downloaded.
    let out = run_output(&mut stowage_on(
        root.path(),
        &host,
        &["--json", "update", "--verify-timeout", "60", &v2],
    ));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let ev = events(&out);
    let check = ev
        .iter()
        .find(|e| e["event"] == "check")
        .expect("a check event");
    assert_eq!(check["report"]["apps"][0]["layers_missing"], 1, "{check}");
    let kinds: Vec<&str> = ev.iter().filter_map(|e| e["event"].as_str()).collect();
    let installed = kinds.iter().position(|k| *k == "installed").unwrap();
    let stopped = kinds.iter().position(|k| *k == "stopped").unwrap();
    assert!(
        installed < stopped,
        "v1 must run until v2 is installed: {kinds:?}"
    );
    assert!(
        has_event(&ev, "committed") && has_event(&ev, "pruned"),
        "{kinds:?}"
    );
    let images = running_images(&name);
    assert!(images.iter().all(|i| i.ends_with("running")), "{images:?}");
    assert!(
        images.iter().any(|i| i.contains("/web:stowage-")),
        "{images:?}"
    );

    // Both stores keep version 2 and the rollback copy of version 1.
    let state: Value = serde_json::from_str(&run_ok(&mut stowage_on(
        root.path(),
        &host,
        &["--json", "status"],
    )))
    .unwrap();
    assert_eq!(state["running"][&name], v2, "{state}");
    assert_eq!(state["previous"][&name], v1, "{state}");
    let listed: Value = serde_json::from_str(&run_ok(&mut stowage_on(
        root.path(),
        &host,
        &["--json", "ls"],
    )))
    .unwrap();
    let refs: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["reference"].as_str().unwrap())
        .collect();
    assert!(
        refs.contains(&v1.as_str()) && refs.contains(&v2.as_str()),
        "{refs:?}"
    );
    let out = run_ok(&mut stowage_on(root.path(), &host, &["fsck"]));
    assert!(out.contains("clean"), "{out}");

    // Version 3's web exits at once: fetched while the registry is up, then
    // applied with the registry stopped; it rolls back to version 2.
    run_ok(&mut stowage_on(root.path(), &host, &["pull", &v3]));
    registry.stop();
    let out = run_output(&mut stowage_on(
        root.path(),
        &host,
        &["--json", "update", "--verify-timeout", "30", &v3],
    ));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = events(&out);
    let rolled = ev
        .iter()
        .find(|e| e["event"] == "rolled_back")
        .expect("a rolled_back event");
    assert!(
        rolled["error"].as_str().unwrap().contains("exited"),
        "{rolled}"
    );
    let result = ev.iter().find(|e| e["event"] == "result").unwrap();
    assert_eq!(result["result"], "rolled_back");
    let state: Value = serde_json::from_str(&run_ok(&mut stowage_on(
        root.path(),
        &host,
        &["--json", "status"],
    )))
    .unwrap();
    assert_eq!(state["running"][&name], v2, "{state}");
    let images = running_images(&name);
    assert_eq!(images.len(), 2, "{images:?}");
    assert!(images.iter().all(|i| i.ends_with("running")), "{images:?}");
}

#[test]
fn an_update_that_does_not_fit_is_refused_and_the_running_app_is_untouched() {
    ensure_dockerd();
    let registry = Registry::start();
    let name = unique("nofit");
    let host = registry.host();
    let _cleanup = AppCleanup::for_app(&host, &name);
    let base_local = format!("{name}-base:1");
    let base_local_image = busybox_image(&base_local);
    push_image(&base_local, &format!("{host}/{name}/base:1"));
    drop(base_local_image);
    let sleep = "[\"sleep\", \"3600\"]";
    let v1 = publish_version(
        &registry,
        &name,
        "v1",
        &format!("{host}/{name}/base:1"),
        sleep,
    );
    let root = temp_dir("root-");
    run_ok(&mut stowage_on(
        root.path(),
        &host,
        &["update", "--verify-timeout", "60", &v1],
    ));
    let before = running_images(&name);

    // Asking to keep 100 TiB free cannot be met: refused with exit 100.
    let v1_again = publish_version(
        &registry,
        &name,
        "v1b",
        &format!("{host}/{name}/base:1"),
        "[\"sleep\", \"7200\"]",
    );
    let out = run_output(&mut stowage_on(
        root.path(),
        &host,
        &["update", "--reserve", "100T", &v1_again],
    ));
    assert_eq!(
        out.status.code(),
        Some(100),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("DOES NOT FIT"));
    assert_eq!(running_images(&name), before);
    let state: Value = serde_json::from_str(&run_ok(&mut stowage_on(
        root.path(),
        &host,
        &["--json", "status"],
    )))
    .unwrap();
    assert_eq!(state["running"][&name], v1);
}

#[test]
fn offline_update_from_an_export_with_the_registry_stopped() {
    ensure_dockerd();
    let mut registry = Registry::start();
    let name = unique("offline");
    let host = registry.host();
    let _cleanup = AppCleanup::for_app(&host, &name);
    let base_local = format!("{name}-base:1");
    let base_local_image = busybox_image(&base_local);
    push_image(&base_local, &format!("{host}/{name}/base:1"));
    drop(base_local_image);
    let v1 = publish_version(
        &registry,
        &name,
        "v1",
        &format!("{host}/{name}/base:1"),
        "[\"sleep\", \"3600\"]",
    );

    // Export on one root...
    let online = temp_dir("root-");
    run_ok(&mut stowage_on(online.path(), &host, &["pull", &v1]));
    let media = temp_dir("usb-");
    let usb = media.path().join("apps");
    let out = run_ok(&mut stowage_on(
        online.path(),
        &host,
        &["export", &name, usb.to_str().unwrap()],
    ));
    assert!(out.contains(&v1), "{out}");
    registry.stop();

    // ...pull from it into another with no registry...
    let other = temp_dir("root-");
    let source = format!("oci:{}", usb.display());
    run_ok(&mut stowage_on(other.path(), &host, &["pull", &source]));
    let listed: Value = serde_json::from_str(&run_ok(&mut stowage_on(
        other.path(),
        &host,
        &["--json", "ls"],
    )))
    .unwrap();
    assert_eq!(listed[0]["reference"], v1.as_str());
    assert_eq!(listed[0]["state"], "fetched");

    // ...and update a third one from it, which then runs the app.
    let device_root = temp_dir("root-");
    let out = run_output(&mut stowage_on(
        device_root.path(),
        &host,
        &[
            "update",
            "--verify-timeout",
            "60",
            &format!("{source}:{name}"),
        ],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images = running_images(&name);
    assert_eq!(images.len(), 2, "{images:?}");
    let out = run_ok(&mut stowage_on(device_root.path(), &host, &["fsck"]));
    assert!(out.contains("clean"), "{out}");

    // A directory that is not an export is refused clearly.
    let out = run_fails(&mut stowage_on(
        device_root.path(),
        &host,
        &["pull", &format!("oci:{}", media.path().display())],
    ));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a stowage export"));
}
