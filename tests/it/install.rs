//! `stowage install`, `run`, `stop`, `ps`, `df`, `prune` and `fsck --repair`
//! against the real registry, a private dockerd (its own data root, so what
//! it holds is exactly what the test put there) and the real docker-compose.
//! Every app is pulled while the registry runs, then the registry is stopped:
//! everything after works from the blob store alone.

use std::path::Path;
use std::process::Command;

use crate::common::docker_device::*;
use crate::common::*;
use serde_json::Value;

fn images_of(report: &Value) -> &Vec<Value> {
    report["images"].as_array().expect("images in the report")
}

fn sum(images: &[Value], key: &str) -> u64 {
    images.iter().map(|i| i[key].as_u64().unwrap_or(0)).sum()
}

#[test]
fn an_app_installs_and_runs_offline_shares_layers_restores_and_prunes_both_stores() {
    let mut registry = Registry::start();
    let name = unique("story");
    let host = registry.host();
    let mut local = LocalImages::default();
    let base = format!("{name}-base:1");
    local.busybox(&base);
    let web_local = format!("{name}-web:1");
    local.build(&web_local, &base, &[("/srv/web.bin", noise(1, 300_000))]);
    let worker_local = format!("{name}-worker:1");
    local.build(&worker_local, &base, &[("/opt/job.bin", noise(2, 200_000))]);
    let api_local = format!("{name}-api:1");
    local.build(&api_local, &base, &[("/srv/api.bin", noise(3, 100_000))]);
    let user_local = format!("{name}-user:1");
    local.build(&user_local, &base, &[("/user.txt", b"mine".to_vec())]);
    let [web, worker, db, api] =
        ["web", "worker", "db", "api"].map(|s| format!("{host}/{name}/{s}:1"));
    push_image(&web_local, &web);
    push_image(&worker_local, &worker);
    push_image(&base, &db);
    push_image(&api_local, &api);

    let shop = publish(
        &registry,
        &three_service_compose(&web, &worker, &db),
        &format!("{host}/{name}/shop:1"),
    );
    // A second app: the same web image, and an api on the same base.
    let admin = publish(
        &registry,
        &format!(
            "services:\n  web:\n    image: {web}\n    network_mode: none\n  api:\n    image: {api}\n    network_mode: none\n"
        ),
        &format!("{host}/{name}/admin:1"),
    );

    let work = temp_dir("install-story-");
    let dockerd = PrivateDockerd::start(&work.path().join("docker"));
    let device = Device {
        root: work.path().join("root"),
        registry: host.clone(),
        docker_host: dockerd.host(),
        config: lenient_config(work.path()),
    };
    device.ok(&["pull", &shop, &admin]);
    registry.stop();

    // Offline, a pulled app is still checked and inspected: its pinned
    // reference is read from the store.
    let check = device.json(&["check", &shop]);
    assert_eq!(check["fits"], true, "{check}");
    assert_eq!(check["apps"][0]["layers_missing"], 0, "{check}");
    let described = device.json(&["inspect", &shop]);
    assert_eq!(
        described["services"].as_object().map(|s| s.len()),
        Some(3),
        "{described}"
    );

    // Install: every image loaded, each distinct layer sent once.
    let report = device.json(&["install", "shop"]);
    let images = images_of(&report);
    assert_eq!(images.len(), 3, "{report}");
    assert!(images.iter().all(|i| i["action"] == "loaded"), "{report}");
    assert_eq!(sum(images, "layers_sent"), 3, "base, web, worker: {report}");
    assert_eq!(sum(images, "layers_skipped"), 2, "the base, held: {report}");
    assert!(
        Path::new(report["dir"].as_str().unwrap())
            .join("docker-compose.yml")
            .is_file()
    );

    // Run: all three containers run, and ps says so.
    device.ok(&["run", "shop"]);
    let ps = device.json(&["ps"]);
    let app = app_state(&ps, "shop");
    assert_eq!(app["state"], "running", "{ps}");
    let services = app["services"].as_array().unwrap();
    assert_eq!(services.len(), 3, "{ps}");
    assert!(services.iter().all(|s| s["state"] == "running"), "{ps}");
    let text = device.ok(&["ps"]);
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("shop") && l.contains("running"))
            .count(),
        3,
        "{text}"
    );
    let running = run_ok(dockerd.docker().args([
        "ps",
        "--filter",
        "label=com.docker.compose.project=shop",
        "--format",
        "{{.Names}}",
    ]));
    assert_eq!(running.lines().count(), 3, "{running}");

    // A second app sharing layers: web is there already, api sends only its own layer.
    let report = device.json(&["install", "admin"]);
    let images = images_of(&report);
    let web_row = images.iter().find(|i| i["services"][0] == "web").unwrap();
    assert_eq!(web_row["action"], "present", "{report}");
    assert_eq!(sum(images, "layers_sent"), 1, "{report}");
    assert_eq!(sum(images, "layers_skipped"), 1, "{report}");

    // A user's own image and container, which no prune may touch.
    let saved = run_ok_bytes(Command::new("docker").args(["save", &user_local]));
    run_ok_with_stdin(dockerd.docker().arg("load"), &saved);
    run_ok(
        dockerd
            .docker()
            .args(["create", "--name", &format!("{name}-mine"), &user_local]),
    );

    // Docker loses images (removed by hand): fsck says so, --repair reloads
    // them from the blob store with the registry still down.
    device.ok(&["stop", "shop"]);
    let tags: Vec<String> = engine_images(&dockerd)
        .into_iter()
        .filter(|t| t.contains("/worker:stowage-sha256-") || t.contains("/db:stowage-sha256-"))
        .collect();
    assert_eq!(tags.len(), 2, "{tags:?}");
    run_ok(dockerd.docker().arg("rmi").args(&tags));
    let out = run_fails(&mut device.stowage(&["fsck"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("shop") && stdout.contains("--repair"),
        "{stdout}"
    );
    device.ok(&["fsck", "--repair"]);
    device.ok(&["fsck"]);
    let now = engine_images(&dockerd);
    assert!(tags.iter().all(|t| now.contains(t)), "{now:?}");
    // And install restores too.
    run_ok(dockerd.docker().args(["rmi", &tags[0]]));
    let report = device.json(&["install", "shop"]);
    assert_eq!(
        images_of(&report)
            .iter()
            .filter(|i| i["action"] == "loaded")
            .count(),
        1,
        "{report}"
    );
    device.ok(&["run", "--all"]);
    assert_eq!(app_state(&device.json(&["ps"]), "shop")["state"], "running");

    // df: every store and volume, both apps.
    let df = device.json(&["df"]);
    let stores = df["stores"].as_array().unwrap();
    assert_eq!(stores.len(), 3, "{df}");
    for store in stores {
        assert!(store["bytes"].as_u64().unwrap() > 0, "{df}");
    }
    for volume in df["volumes"].as_array().unwrap() {
        let (size, free, used) = (
            volume["size"].as_u64().unwrap(),
            volume["free"].as_u64().unwrap(),
            volume["used"].as_u64().unwrap(),
        );
        assert!(size > 0 && free <= size && used <= size, "{df}");
    }
    let apps = df["apps"].as_array().unwrap();
    assert_eq!(apps.len(), 2, "{df}");
    for app in apps {
        assert_eq!(app["installed"], true, "{df}");
        assert!(app["store_bytes"].as_u64().unwrap() > 300_000, "{df}");
        assert!(app["docker_bytes"].as_u64().unwrap() > 300_000, "{df}");
    }
    let text = device.ok(&["df"]);
    assert!(
        text.contains("blob store") && text.contains("docker images"),
        "{text}"
    );

    // Forget admin; prune frees its own image in Docker and its blobs in the
    // store, keeps what shop needs, and leaves the user's image alone.
    assert_eq!(
        app_state(&device.json(&["ps"]), "admin")["state"],
        "running"
    );
    device.ok(&["stop", "admin"]);
    assert_eq!(
        app_state(&device.json(&["ps"]), "admin")["state"],
        "stopped"
    );
    device.ok(&["rm", "admin"]);
    let pruned = device.json(&["prune"]);
    let removed = pruned["docker"]["removed"].as_array().unwrap();
    assert_eq!(removed.len(), 1, "{pruned}");
    assert!(
        removed[0]["tags"][0].as_str().unwrap().contains("/api:"),
        "{pruned}"
    );
    assert!(
        pruned["docker"]["freed_bytes"].as_u64().unwrap() >= 100_000,
        "{pruned}"
    );
    assert!(
        pruned["freed_bytes"].as_u64().unwrap() > 100_000,
        "{pruned}"
    );
    let now = engine_images(&dockerd);
    assert!(now.iter().any(|t| t.contains("/web:stowage-")), "{now:?}");
    assert!(now.contains(&user_local), "{now:?}");
    assert_eq!(app_state(&device.json(&["ps"]), "shop")["state"], "running");

    // A running app's images are never pruned; a stopped, forgotten one's are.
    let refused = run_fails(&mut device.stowage(&["rm", "shop"]));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    device.ok(&["stop", "--all"]);
    device.ok(&["rm", "shop"]);
    let pruned = device.json(&["prune"]);
    assert_eq!(
        pruned["docker"]["removed"].as_array().unwrap().len(),
        3,
        "{pruned}"
    );
    assert_eq!(engine_images(&dockerd), vec![user_local.clone()]);
    run_ok(dockerd.docker().args(["inspect", &format!("{name}-mine")]));
    assert!(device.json(&["ps"]).as_array().unwrap().is_empty());
}

/// Free bytes of the volume holding `path`, as the check counts them.
fn volume_report<'a>(check: &'a Value, part: &str) -> &'a Value {
    check["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| {
            v["required_parts"]
                .get(part)
                .is_some_and(|n| n.as_u64() > Some(0))
        })
        .unwrap_or_else(|| panic!("no volume needs {part}: {check}"))
}

#[test]
fn install_refuses_what_the_docker_volume_cannot_hold_and_predicts_its_growth() {
    let mut registry = Registry::start();
    let name = unique("fit");
    let host = registry.host();
    let mut local = LocalImages::default();
    let base = format!("{name}-base:1");
    local.busybox(&base);
    let data_local = format!("{name}-data:1");
    // The data layer's files and sizes follow the seed.
    local
        .0
        .push(many_files_image(&data_local, &base, 1500, test_seed()));
    let data = format!("{host}/{name}/data:1");
    push_image(&data_local, &data);
    let app = publish(
        &registry,
        &format!("services:\n  data:\n    image: {data}\n    network_mode: none\n"),
        &format!("{host}/{name}/app:1"),
    );

    let docker_volume = LoopVolume::new(160);
    let store_volume = LoopVolume::new(96);
    let small_store = LoopVolume::new(16);
    let dockerd = PrivateDockerd::start(&docker_volume.path().join("docker"));
    let data_root = docker_volume.path().join("docker");

    // The store's volume is short, Docker's is not: the pull is refused,
    // naming the store, and neither volume is written.
    let cramped = Device {
        root: small_store.path().join("root"),
        registry: host.clone(),
        docker_host: dockerd.host(),
        config: None,
    };
    // The data layer's size follows the seed, so the store's volume is made
    // short by measure: a filler leaves it half of what the blobs need.
    let planned = run_output(&mut cramped.stowage(&["--json", "check", "--watermark", "80", &app]));
    assert!(
        matches!(planned.status.code(), Some(0 | 100)),
        "{planned:?}"
    );
    let planned: Value = serde_json::from_slice(&planned.stdout).unwrap();
    let store_part = volume_report(&planned, "blobs");
    let (required, available) = (
        store_part["required"].as_u64().unwrap(),
        store_part["available"].as_u64().unwrap(),
    );
    if available > required / 2 {
        run_ok(
            Command::new("fallocate")
                .args(["-l", &(available - required / 2).to_string()])
                .arg(small_store.path().join("filler")),
        );
    }
    // The default policy (keep 20% free), not the suite's relaxed one.
    let out = run_output(&mut cramped.stowage(&["pull", "--watermark", "80", &app]));
    assert_eq!(out.status.code(), Some(100), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&small_store.path().display().to_string()),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&data_root.display().to_string()),
        "{stderr}"
    );
    let blobs = std::fs::read_dir(cramped.root.join("store/blobs/sha256")).map_or(0, |d| d.count());
    assert_eq!(blobs, 0);
    assert!(engine_images(&dockerd).is_empty());

    let device = Device {
        root: store_volume.path().join("root"),
        registry: host.clone(),
        docker_host: dockerd.host(),
        config: None,
    };
    device.ok(&["pull", &app]);
    // What the check says Docker's volume needs, now that the blobs are stored.
    let check = device.json(&["check", &app]);
    registry.stop();
    let docker_part = volume_report(&check, "docker_layers");
    let required = docker_part["required"].as_u64().unwrap();
    let available = docker_part["available"].as_u64().unwrap();
    assert!(required < available, "{check}");

    // Docker's volume fills up after the pull: install is refused with exit
    // 100, naming Docker's data root, and writes nothing anywhere.
    let filler = docker_volume.path().join("filler");
    run_ok(
        Command::new("fallocate")
            .args(["-l", &(available - required / 2).to_string()])
            .arg(&filler),
    );
    let out = run_output(&mut device.stowage(&["install", "app"]));
    assert_eq!(out.status.code(), Some(100), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&data_root.display().to_string()),
        "{stderr}"
    );
    assert!(engine_images(&dockerd).is_empty());
    assert!(!device.root.join("apps/app").exists());
    assert!(!device.root.join("state/installed.json").exists());

    // With room again, install succeeds, and Docker's volume grows by what
    // the check predicted, within 5%.
    std::fs::remove_file(&filler).unwrap();
    run_ok(&mut Command::new("sync"));
    let before = docker_volume.stats().used_bytes();
    let report = device.json(&["install", "app"]);
    run_ok(&mut Command::new("sync"));
    let after = docker_volume.stats().used_bytes();
    let predicted =
        volume_report(&report["check"], "docker_layers")["required_parts"]["docker_layers"]
            .as_u64()
            .unwrap();
    let grown = after.saturating_sub(before);
    let error = (grown as f64 - predicted as f64).abs() / grown as f64;
    eprintln!(
        "docker data root grew {grown} bytes; the check predicted {predicted} ({:.2}% off)",
        error * 100.0
    );
    assert!(error <= 0.05, "grew {grown}, predicted {predicted}");
    assert!(images_of(&report).iter().all(|i| i["action"] == "loaded"));
}

/// A tar entry with a raw name: the tar crate refuses to write `..`, and a
/// hostile publisher would not.
fn raw_entry(
    tar: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: tar::EntryType,
    link: &str,
    data: &[u8],
) {
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    if !link.is_empty() {
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_cksum();
    tar.append(&header, data).unwrap();
}

/// One bundle entry: name, kind, link target, content.
type Entry<'a> = (&'a str, tar::EntryType, &'a str, Vec<u8>);

/// A bundle (tar.gz) and its index for these entries.
fn hostile_bundle(entries: &[Entry]) -> (Vec<u8>, Vec<u8>) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut index = serde_json::Map::new();
    for (name, kind, link, data) in entries {
        raw_entry(&mut tar, name, *kind, link, data);
        if *kind == tar::EntryType::Regular {
            index.insert(name.to_string(), Value::String(sha256_digest(data)));
        }
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar.into_inner().unwrap()).unwrap();
    (
        gz.finish().unwrap(),
        serde_json::to_vec(&Value::Object(index)).unwrap(),
    )
}

#[test]
fn a_bundle_that_escapes_its_directory_or_is_too_big_is_refused_and_nothing_is_extracted() {
    let registry = Registry::start();
    let name = unique("hostile");
    let host = registry.host();
    let mut local = LocalImages::default();
    let base = format!("{name}-base:1");
    local.busybox(&base);
    let svc = format!("{host}/{name}/svc:1");
    push_image(&base, &svc);
    let compose = format!("services:\n  svc:\n    image: {svc}\n    network_mode: none\n");
    publish(&registry, &compose, &format!("{host}/{name}/app:good"));
    let repo = format!("{name}/app");
    let (template, media_type) = registry.get_manifest(&repo, "good");
    let template: Value = serde_json::from_slice(&template).unwrap();

    // Each hostile bundle carries the good, pinned compose file.
    let (good, _) = registry.get_manifest(&repo, "good");
    let good: Value = serde_json::from_slice(&good).unwrap();
    let bundle = registry.get_blob(&repo, good["layers"][0]["digest"].as_str().unwrap());
    let mut pinned = String::new();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bundle.as_slice()));
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_string_lossy() == "docker-compose.yml" {
            std::io::Read::read_to_string(&mut entry, &mut pinned).unwrap();
        }
    }
    assert!(pinned.contains("@sha256:"), "{pinned}");

    use tar::EntryType::{Regular, Symlink};
    let big = format!("{pinned}#{}\n", "x".repeat(1 << 20));
    let cases: Vec<(&str, Vec<Entry>, &str)> = vec![
        (
            "escape",
            vec![
                (
                    "docker-compose.yml",
                    Regular,
                    "",
                    pinned.clone().into_bytes(),
                ),
                ("../escaped.txt", Regular, "", b"out".to_vec()),
            ],
            "'..'",
        ),
        (
            "symlink",
            vec![
                (
                    "docker-compose.yml",
                    Regular,
                    "",
                    pinned.clone().into_bytes(),
                ),
                ("conf/link", Symlink, "../../../outside", Vec::new()),
            ],
            "outside the bundle",
        ),
        (
            "bigcompose",
            vec![("docker-compose.yml", Regular, "", big.into_bytes())],
            "over the limit of 1048576",
        ),
    ];

    let work = temp_dir("install-hostile-");
    let device = Device {
        root: work.path().join("root"),
        registry: host.clone(),
        docker_host: "unix:///var/run/docker.sock".into(),
        config: lenient_config(work.path()),
    };
    for (tag, entries, reason) in cases {
        let (bundle, index) = hostile_bundle(&entries);
        let bundle_digest = registry.upload_blob(&repo, &bundle);
        let index_digest = registry.upload_blob(&repo, &index);
        let mut manifest = template.clone();
        manifest["layers"][0]["digest"] = Value::String(bundle_digest);
        manifest["layers"][0]["size"] = Value::from(bundle.len());
        let annotations = &mut manifest["layers"][0]["annotations"];
        annotations["org.foundries.app.bundle.index.digest"] = Value::String(index_digest);
        annotations["org.foundries.app.bundle.index.size"] = Value::String(index.len().to_string());
        let digest = registry.put_manifest(
            &repo,
            tag,
            &media_type,
            &serde_json::to_vec(&manifest).unwrap(),
        );
        let reference = format!("{host}/{repo}@{digest}");
        // The pull may refuse it already (the compose file is read there);
        // otherwise install must.
        let pulled = run_output(&mut device.stowage(&["pull", &reference]));
        let refused = if pulled.status.success() {
            run_fails(&mut device.stowage(&["install", &reference]))
        } else {
            pulled
        };
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(reason), "{tag}: {stderr}");
        let apps = device.root.join("apps");
        let leftovers: Vec<_> = std::fs::read_dir(&apps)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "{tag}: {leftovers:?}");
        assert!(
            !work.path().join("escaped.txt").exists() && !device.root.join("escaped.txt").exists()
        );
        assert!(!device.root.join("state/installed.json").exists(), "{tag}");
    }
}
