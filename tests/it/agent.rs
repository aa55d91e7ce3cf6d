//! `stowage agent`: a device follows a target published with `stowage target
//! publish`, against the real registry, dockerd and docker-compose.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;
use serde_json::Value;

/// A two-service app: `web` from `web_image` (with `web_extra` compose
/// lines), `db` sleeping in the shared base.
fn two_services(web_image: &str, web_extra: &str, base: &str) -> String {
    format!(
        "services:\n  web:\n    image: {web_image}\n    command: [\"sleep\", \"3600\"]\n{web_extra}  db:\n    image: {base}\n    command: [\"sleep\", \"3600\"]\n"
    )
}

/// Publishes the target `at` naming `apps`; returns its digest.
fn publish_target(host: &str, at: &str, apps: &[&str]) -> String {
    let mut cmd = stowage();
    cmd.args([
        "--insecure-registry",
        host,
        "--json",
        "target",
        "publish",
        at,
    ])
    .args(apps);
    let target: Value = serde_json::from_str(&run_ok(&mut cmd)).unwrap();
    target["digest"].as_str().unwrap().to_string()
}

/// One poll of the agent. The test machine's disk is shared and may be
/// fuller than the default 80% watermark allows, so the policy is given.
fn agent_once(root: &Path, host: &str, target: &str, watermark: &str) -> Output {
    run_output(&mut agent_once_command(root, host, target, watermark))
}

fn agent_once_command(root: &Path, host: &str, target: &str, watermark: &str) -> Command {
    stowage_on(
        root,
        host,
        &[
            "agent",
            "--watermark",
            watermark,
            "--target",
            target,
            "--once",
            "--interval",
            "1s",
            "--verify-timeout",
            "60",
        ],
    )
}

fn status(root: &Path, host: &str) -> Value {
    serde_json::from_str(&run_ok(&mut stowage_on(root, host, &["--json", "status"]))).unwrap()
}

/// The digest of the last layer of the image at `reference`.
fn top_layer(reference: &str) -> String {
    let manifest: Value = serde_json::from_slice(&skopeo_inspect_raw(reference)).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    layers.last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every file under the root's blob store and ingest directory.
fn store_files(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root.join("store").join("blobs"), &mut files);
    walk(&root.join("ingest"), &mut files);
    files.sort();
    files
}

#[test]
fn the_agent_follows_its_target_and_rolls_back_an_unhealthy_version() {
    ensure_dockerd();
    let registry = Registry::start();
    let name = unique("agent");
    let host = registry.host();
    let _cleanup = AppCleanup::for_app(&host, &name);
    let base_local = format!("{name}-base:1");
    let base_image = busybox_image(&base_local);
    let base = format!("{host}/{name}/base:1");
    push_image(&base_local, &base);
    for v in ["1", "2"] {
        let local = format!("{name}-web:{v}");
        let web_image = build_image(
            &local,
            &base_local,
            &[(&format!("/v{v}.txt"), vec![b'a' + v.len() as u8; 300_000])],
            "",
        );
        push_image(&local, &format!("{host}/{name}/web:{v}"));
        drop(web_image);
    }
    drop(base_image);
    let web = |v: &str| format!("{host}/{name}/web:{v}");
    let v1 = publish_compose_app(&registry, &name, "v1", &two_services(&web("1"), "", &base));
    let v2 = publish_compose_app(&registry, &name, "v2", &two_services(&web("2"), "", &base));
    // v3's web never passes its healthcheck.
    let unhealthy = "    healthcheck:\n      test: [\"CMD\", \"false\"]\n      interval: 1s\n      timeout: 1s\n      retries: 1\n";
    let v3 = publish_compose_app(
        &registry,
        &name,
        "v3",
        &two_services(&web("2"), unhealthy, &base),
    );
    let target = format!("{host}/{name}/target:prod");
    let root = temp_dir("root-");

    // The target names version 1: one poll installs and runs it.
    let t1 = publish_target(&host, &target, &[&v1]);
    let out = agent_once(root.path(), &host, &target, "99");
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));
    let st = status(root.path(), &host);
    assert_eq!(st["last_result"], "committed", "{st}");
    assert_eq!(st["target_digest"], t1.as_str(), "{st}");
    assert_eq!(st["applied_digest"], t1.as_str(), "{st}");
    assert_eq!(st["apps"][&name], v1.as_str(), "{st}");
    assert_eq!(st["target"], target.as_str(), "{st}");
    let images = running_images(&name);
    assert_eq!(images.len(), 2, "{images:?}");
    assert!(images.iter().all(|i| i.ends_with(" running")), "{images:?}");

    // The same tag now names version 2: the next poll applies it.
    let t2 = publish_target(&host, &target, &[&v2]);
    assert_ne!(t1, t2);
    let before = registry.log_mark();
    // Run as the systemd unit runs it: stderr to journald, info logs.
    let out = run_output(
        agent_once_command(root.path(), &host, &target, "99")
            .env("JOURNAL_STREAM", "8:4242")
            .env("STOWAGE_LOG", "info"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));
    // journald gets plain lines: no colour codes, no second timestamp.
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.lines()
            .any(|l| l.starts_with(" INFO") && l.contains("applying target")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.starts_with("committed: running")),
        "{log}"
    );
    assert!(!log.contains('\u{1b}'), "{log}");
    let st = status(root.path(), &host);
    assert_eq!(st["last_result"], "committed", "{st}");
    assert_eq!(st["target_digest"], t2.as_str(), "{st}");
    assert_eq!(st["apps"][&name], v2.as_str(), "{st}");
    // The last check's figures: only web's new layer was missing.
    assert_eq!(st["last_check"]["apps"][0]["layers_missing"], 1, "{st}");
    assert!(
        registry.blob_gets_since(before, &format!("/{name}/web/")) > 0,
        "version 2's new layer was downloaded (the log counts downloads)"
    );
    let images = running_images(&name);
    assert_eq!(images.len(), 2, "{images:?}");
    assert!(images.iter().all(|i| i.ends_with(" running")), "{images:?}");

    // Polling an unchanged target downloads nothing and touches nothing.
    let before = registry.log_mark();
    let files_before = store_files(root.path());
    let out = agent_once(root.path(), &host, &target, "99");
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));
    let st = status(root.path(), &host);
    assert_eq!(st["last_result"], "unchanged", "{st}");
    assert_eq!(st["apps"][&name], v2.as_str(), "{st}");
    assert_eq!(
        registry.blob_gets_since(before, &format!("/{name}/web/")),
        0
    );
    assert_eq!(store_files(root.path()), files_before);
    assert_eq!(running_images(&name), images);

    // Version 3 never becomes healthy: rolled back to version 2, and the
    // status says which service failed.
    let t3 = publish_target(&host, &target, &[&v3]);
    let out = agent_once(root.path(), &host, &target, "99");
    assert_eq!(out.status.code(), Some(1), "{}", say(&out));
    let st = status(root.path(), &host);
    assert_eq!(st["last_result"], "rolled_back", "{st}");
    assert_eq!(st["target_digest"], t3.as_str(), "{st}");
    assert_eq!(st["applied_digest"], t2.as_str(), "{st}");
    assert_eq!(st["apps"][&name], v2.as_str(), "{st}");
    assert_eq!(st["consecutive_failures"], 1, "{st}");
    assert!(
        st["next_poll_in_secs"].as_u64().unwrap() > 1,
        "backs off after a failure: {st}"
    );
    let error = st["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("service web") && error.contains("unhealthy"),
        "{st}"
    );
    assert_eq!(running_images(&name), images);
    let out = run_ok(&mut stowage_on(root.path(), &host, &["fsck"]));
    assert!(out.contains("clean"), "{out}");
    assert!(!root.path().join("state/journal.json").exists());
}

#[test]
fn the_agent_waits_for_space_without_downloading_then_applies_the_update() {
    ensure_dockerd();
    let registry = Registry::start();
    let name = unique("agentspace");
    let host = registry.host();
    let _cleanup = AppCleanup::for_app(&host, &name);
    let base_local = format!("{name}-base:1");
    let base_image = busybox_image(&base_local);
    let base = format!("{host}/{name}/base:1");
    push_image(&base_local, &base);
    // Version 2's web adds 8 MB that does not compress, and that no other
    // test or earlier run has (the machine's dockerd would count it held).
    let web2_local = format!("{name}-web:2");
    let web2_image = build_image(
        &web2_local,
        &base_local,
        &[("/noise.bin", noise(seed_of(&name), 8 * 1024 * 1024))],
        "",
    );
    push_image(&web2_local, &format!("{host}/{name}/web:2"));
    drop(web2_image);
    drop(base_image);
    let v1 = publish_compose_app(&registry, &name, "v1", &two_services(&base, "", &base));
    let v2 = publish_compose_app(
        &registry,
        &name,
        "v2",
        &two_services(&format!("{host}/{name}/web:2"), "", &base),
    );
    let target = format!("{host}/{name}/target:prod");
    // From here on the registry's log shows the device's downloads only:
    // publishing v2 read its new layer to analyse it.
    let published = registry.log_mark();
    let new_layer = top_layer(&format!("{host}/{name}/web:2"));
    let downloads_of_new_layer = || registry.blob_gets_since(published, &new_layer);

    // The device's root is a small volume of its own.
    let volume = LoopVolume::new(64);
    let root = volume.path().join("root");
    publish_target(&host, &target, &[&v1]);
    let out = agent_once(&root, &host, &target, "95");
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));
    let images = running_images(&name);
    assert_eq!(images.len(), 2, "{images:?}");

    // Fill the volume so that, with 5% kept free (watermark 95), 3 MiB are
    // left: less than version 2's 8 MB layer.
    let stats = volume.stats();
    let kept_free = stats.total_bytes() / 20;
    let filler_bytes = stats
        .available_bytes()
        .saturating_sub(kept_free + 3 * 1024 * 1024);
    let filler = volume.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![1u8; 1024 * 1024];
        let mut left = filler_bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        f.sync_all().unwrap();
    }

    // Refused up front: exit 100, the running app untouched.
    let t2 = publish_target(&host, &target, &[&v2]);
    let out = agent_once(&root, &host, &target, "95");
    assert_eq!(out.status.code(), Some(100), "{}", say(&out));
    let st = status(&root, &host);
    assert_eq!(st["last_result"], "refused", "{st}");
    assert_eq!(st["refused_digest"], t2.as_str(), "{st}");
    assert_eq!(st["apps"][&name], v1.as_str(), "{st}");
    assert!(st["last_check"].is_object(), "{st}");
    assert_eq!(running_images(&name), images);

    // Polled again while nothing was freed: it waits, and downloads nothing.
    let files_before = store_files(&root);
    assert_eq!(downloads_of_new_layer(), 0);
    let out = agent_once(&root, &host, &target, "95");
    assert_eq!(out.status.code(), Some(100), "{}", say(&out));
    let st = status(&root, &host);
    assert_eq!(st["last_result"], "waiting_for_space", "{st}");
    assert_eq!(st["apps"][&name], v1.as_str(), "{st}");
    assert_eq!(store_files(&root), files_before);
    assert_eq!(downloads_of_new_layer(), 0);
    assert_eq!(running_images(&name), images);

    // Space freed: the next poll applies version 2.
    std::fs::remove_file(&filler).unwrap();
    let out = agent_once(&root, &host, &target, "95");
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));
    let st = status(&root, &host);
    assert_eq!(st["last_result"], "committed", "{st}");
    assert_eq!(st["apps"][&name], v2.as_str(), "{st}");
    assert!(st["refused_digest"].is_null(), "{st}");
    assert_eq!(downloads_of_new_layer(), 1);
    let images = running_images(&name);
    assert_eq!(images.len(), 2, "{images:?}");
    assert!(
        images.iter().any(|i| i.contains("/web:stowage-")),
        "{images:?}"
    );
    let out = run_ok(&mut stowage_on(&root, &host, &["fsck"]));
    assert!(out.contains("clean"), "{out}");
    // Stop the app before the volume holding its bundle is unmounted.
    drop(_cleanup);
}
