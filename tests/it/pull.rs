//! `stowage check`, `pull`, `ls`, `rm`, `prune` and `fsck` on a device, end
//! to end: apps published with `stowage publish` to a real `docker-registry`,
//! a device root on a small loop-mounted ext4 volume where space matters,
//! skopeo reading the store, and the machine's dockerd asked what it holds.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::device::*;
use crate::common::*;
use serde_json::{Value, json};
use stowage::Digest;
use stowage::store::Store;

const MIB: usize = 1024 * 1024;

/// `check --json` figures of the volume holding the store.
struct StoreVolume {
    free: u64,
    /// `free` plus what the cache of Docker's image layers takes: the cache
    /// follows the machine's dockerd, whose images other tests change.
    free_beside_cache: u64,
    required: u64,
    blobs: u64,
}

/// Read right after the command that reported, before another one runs.
fn store_volume(root: &Path, report: &Value) -> StoreVolume {
    use std::os::unix::fs::MetadataExt;
    let v = volume_with(report, &format!("{}/store (blobs)", root.display()));
    let free = v["free"].as_u64().unwrap();
    let cache = std::fs::metadata(root.join("docker-layers.json")).map_or(0, |m| m.blocks() * 512);
    StoreVolume {
        free,
        free_beside_cache: free + cache,
        required: v["required"].as_u64().unwrap(),
        blobs: v["required_parts"]["blobs"].as_u64().unwrap_or(0),
    }
}

fn check_json(root: &Path, host: &str, reference: &str, reserve: u64) -> (i32, Value) {
    let out = run_output(device(root, host).args([
        "--json",
        "check",
        "--watermark",
        "99",
        "--reserve",
        &reserve.to_string(),
        reference,
    ]));
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 100,
        "check exited {code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, json_of(&out.stdout))
}

#[test]
fn an_update_that_does_not_fit_is_refused_before_any_byte_and_one_that_just_fits_is_pulled() {
    let registry = Registry::start();
    let name = unique("fit");
    let reference = publish_app(
        &registry.host(),
        &name,
        "v1",
        &[("web", 6 * MIB), ("api", 5 * MIB), ("db", 0)],
    );
    let volume = LoopVolume::new(48);
    let root = volume.path().join("stowage");
    let host = registry.host();

    // The plan with no reserve: what the store's volume has and needs.
    let (code, report) = check_json(&root, &host, &reference, 0);
    assert_eq!(code, 0, "{report:#}");
    let before = store_volume(&root, &report);
    assert!(
        before.blobs > 11 * MIB as u64 && before.blobs < 13 * MIB as u64,
        "the blobs of an app of 11 MiB of layers: {report:#}"
    );
    assert!(before.required > before.blobs, "the bundle counts too");
    let app = &report["apps"][0];
    assert_eq!(app["architecture"], machine_arch());
    assert_eq!(app["layers_missing"], app["layers"]);

    // Keep back all but 256 KiB less than it needs: refused, exit 100.
    let margin = 256 * 1024;
    let too_much = before.free - before.required + margin;
    let (code, refused) = check_json(&root, &host, &reference, too_much);
    assert_eq!(code, 100, "{refused:#}");
    assert_eq!(refused["fits"], false);
    let short = volume_with(&refused, &format!("{}/store (blobs)", root.display()));
    assert_eq!(short["fits"], false);
    assert_eq!(short["reserved"].as_u64().unwrap(), too_much);
    assert_eq!(short["required"].as_u64().unwrap(), before.required);
    assert_eq!(
        short["available"].as_u64().unwrap(),
        short["free"].as_u64().unwrap() - too_much,
        "available = free - reserve: {short:#}"
    );
    assert_eq!(
        store_volume(&root, &refused).free_beside_cache,
        before.free_beside_cache,
        "a check writes nothing but the cache"
    );

    // The person's table names the short volume; a pull is refused the same
    // way and writes nothing: no blob, no partial download.
    let out = run_output(device(&root, &host).args([
        "check",
        "--watermark",
        "99",
        "--reserve",
        &too_much.to_string(),
        &reference,
    ]));
    assert_eq!(out.status.code(), Some(100));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&root.join("store").display().to_string()) && table.contains("DOES NOT FIT"),
        "the table names the store's volume as short:\n{table}"
    );
    let out = run_output(device(&root, &host).args([
        "pull",
        "--watermark",
        "99",
        "--reserve",
        &too_much.to_string(),
        &reference,
    ]));
    assert_eq!(
        out.status.code(),
        Some(100),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&root.join("store").display().to_string()),
        "pull names the short volume:\n{said}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not fit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(blob_files(&root).is_empty(), "{:?}", blob_files(&root));
    assert!(ingest_files(&root).is_empty(), "{:?}", ingest_files(&root));
    // --json: the same figures, as one document.
    let out = run_output(device(&root, &host).args([
        "--json",
        "pull",
        "--watermark",
        "99",
        "--reserve",
        &too_much.to_string(),
        &reference,
    ]));
    assert_eq!(out.status.code(), Some(100));
    // JSON lines: progress events, then the refusal with the plan.
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string();
    let refusal = json_of(last.as_bytes());
    assert_eq!(refusal["event"], "does_not_fit", "{refusal:#}");
    let pull_report = &refusal["report"];
    let figures = store_volume(&root, pull_report);
    assert_eq!(figures.required, before.required);
    // (A pull's lock file, holding its pid, may take one block.)
    let (_, now) = check_json(&root, &host, &reference, 0);
    assert_eq!(
        figures.free_beside_cache,
        store_volume(&root, &now).free_beside_cache
    );
    assert!(
        before.free_beside_cache - figures.free_beside_cache <= 4096,
        "{} -> {}",
        before.free_beside_cache,
        figures.free_beside_cache
    );
    assert!(blob_files(&root).is_empty());

    // Keep back all but 256 KiB more than it needs: it fits, and is pulled.
    let just_enough = before.free - before.required - margin;
    let (code, fits) = check_json(&root, &host, &reference, just_enough);
    assert_eq!(code, 0, "{fits:#}");
    run_ok(device(&root, &host).args([
        "pull",
        "--watermark",
        "99",
        "--reserve",
        &just_enough.to_string(),
        &reference,
    ]));
    assert!(ingest_files(&root).is_empty(), "{:?}", ingest_files(&root));
    assert_fsck_clean(&root, &host);
    let stored: u64 = blob_files(&root).values().sum();
    assert!(stored >= 11 * MIB as u64, "{stored}");

    // What is stored is credited: nothing left to download.
    let (code, after) = check_json(&root, &host, &reference, 0);
    assert_eq!(code, 0);
    assert_eq!(store_volume(&root, &after).blobs, 0, "{after:#}");
    assert_eq!(after["apps"][0]["layers_missing"], 0);
    assert_eq!(after["apps"][0]["download_bytes"], 0);

    // A partial download is credited for what it holds: forget the app,
    // prune, and leave half of the largest layer in the ingest area.
    let (largest, size) = blob_files(&root)
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .unwrap();
    let bytes = std::fs::read(root.join("store/blobs/sha256").join(&largest)).unwrap();
    run_ok(device(&root, &host).args(["rm", &reference]));
    run_ok(device(&root, &host).arg("prune"));
    assert!(blob_files(&root).is_empty(), "{:?}", blob_files(&root));
    let (_, empty) = check_json(&root, &host, &reference, 0);
    let all = store_volume(&root, &empty).blobs;
    let half = size as usize / 2;
    {
        let store = Store::open(&root).unwrap();
        let digest: Digest = format!("sha256:{largest}").parse().unwrap();
        let mut ingest = store.ingest(&digest, size).unwrap();
        ingest.write_all(&bytes[..half]).unwrap();
    }
    let (_, partial) = check_json(&root, &host, &reference, 0);
    let credited = all - store_volume(&root, &partial).blobs;
    assert!(
        credited >= (half as u64 / 4096) * 4096 && credited <= half as u64 + 8192,
        "half of a {size}-byte layer ({half} bytes) is credited, not {credited}"
    );
    // And the pull resumes it: the store ends complete and verified.
    run_ok(device(&root, &host).args(["pull", &reference]));
    assert!(ingest_files(&root).is_empty(), "{:?}", ingest_files(&root));
    assert_eq!(blob_files(&root)[&largest], size);
    assert_fsck_clean(&root, &host);
}

#[test]
fn skopeo_reads_every_pulled_image_from_the_store() {
    let registry = Registry::start();
    let host = registry.host();
    let name = unique("skopeo");
    let reference = publish_app(&host, &name, "v1", &[("web", 300 * 1024), ("db", 0)]);
    let root_dir = temp_dir("stowage-root-");
    let root = root_dir.path().join("root");
    // --json: progress and result as JSON lines, the last one the report.
    let out = run_ok(device(&root, &host).args(["--json", "pull", &reference]));
    let events: Vec<Value> = out.lines().map(|l| json_of(l.as_bytes())).collect();
    assert!(events.len() > 1, "{out}");
    let last = events.last().unwrap();
    assert_eq!(last["event"], "pulled", "{last:#}");
    assert_eq!(last["report"]["apps"][0], reference);
    assert!(last["report"]["fetched_bytes"].as_u64().unwrap() >= 300 * 1024);
    assert!(
        events.iter().any(|e| e["event"] == "blob_done"),
        "each blob's end is reported: {out}"
    );
    // The transfer is announced first: as many blobs, and bytes, as end.
    let transfer = events
        .iter()
        .find(|e| e["event"] == "transfer")
        .unwrap_or_else(|| panic!("no transfer event: {out}"));
    let done: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "blob_done")
        .collect();
    assert_eq!(transfer["blobs"].as_u64(), Some(done.len() as u64), "{out}");
    assert_eq!(
        transfer["bytes"].as_u64(),
        Some(done.iter().map(|e| e["size"].as_u64().unwrap()).sum()),
        "{out}"
    );
    assert_eq!(
        transfer["bytes"].as_u64(),
        last["report"]["fetched_bytes"].as_u64()
    );

    let refs = index_refs(&root);
    assert!(refs.contains_key(&reference), "the app is named: {refs:?}");
    let images: Vec<&String> = refs
        .keys()
        .filter(|r| r.starts_with(&format!("{host}/{name}/")) && *r != &reference)
        .collect();
    assert_eq!(images.len(), 2, "one ref per service image: {refs:?}");
    for image in images {
        let (media_type, digest) = &refs[image];
        assert_eq!(media_type, "application/vnd.oci.image.manifest.v1+json");
        let layout = format!("oci:{}:{image}", root.join("store").display());
        let raw = run_ok_bytes(Command::new("skopeo").args(["inspect", "--raw", &layout]));
        assert_eq!(&sha256_digest(&raw), digest, "skopeo reads the exact bytes");
        // The pin is the registry's manifest: this one, or the Docker
        // manifest this OCI form was made from.
        let manifest: Value = serde_json::from_slice(&raw).unwrap();
        let pinned = image.rsplit('@').next().unwrap();
        let source = manifest["annotations"]["org.stowage.source.manifest.digest"]
            .as_str()
            .unwrap_or(digest);
        assert_eq!(source, pinned, "{image}: {manifest:#}");
        let seen: Value =
            serde_json::from_str(&run_ok(Command::new("skopeo").args(["inspect", &layout])))
                .unwrap();
        assert_eq!(seen["Architecture"], machine_arch(), "{seen:#}");
        // Copying it out reads, and verifies, every layer blob.
        let out = temp_dir("stowage-copy-");
        run_ok(Command::new("skopeo").args([
            "copy",
            "--quiet",
            &layout,
            &format!("dir:{}", out.path().display()),
        ]));
    }
}

#[test]
fn ls_rm_prune_and_fsck_look_after_the_store() {
    let registry = Registry::start();
    let host = registry.host();
    let name = unique("admin");
    let shop = publish_app(
        &host,
        &format!("{name}-shop"),
        "v1",
        &[("web", MIB), ("db", 0)],
    );
    let blog = publish_app(
        &host,
        &format!("{name}-blog"),
        "v1",
        &[("cms", 2 * MIB), ("db", 0)],
    );
    let root_dir = temp_dir("stowage-root-");
    let root = root_dir.path().join("root");
    run_ok(device(&root, &host).args(["pull", &shop, &blog]));

    // A pull leaves nothing a prune would take: the manifests the registry
    // served, which the apps' compose files pin, are kept beside their OCI
    // forms.
    let dry =
        json_of(run_ok(device(&root, &host).args(["--json", "prune", "--dry-run"])).as_bytes());
    assert_eq!(dry["removed_blobs"], json!([]), "{dry:#}");

    // ls: both apps, fetched, with their sizes.
    let listed = json_of(run_ok(device(&root, &host).args(["--json", "ls"])).as_bytes());
    let rows = listed.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{listed:#}");
    let row = |reference: &str| -> Value {
        rows.iter()
            .find(|r| r["reference"] == reference)
            .cloned()
            .unwrap_or_else(|| panic!("{reference} not listed: {listed:#}"))
    };
    let blog_row = row(&blog);
    assert_eq!(blog_row["state"], "fetched");
    assert_eq!(blog_row["name"], format!("{name}-blog"));
    assert!(blog_row["stored_bytes"].as_u64().unwrap() > 2 * MIB as u64);
    assert_eq!(row(&shop)["state"], "fetched");
    let text = run_ok(device(&root, &host).arg("ls"));
    assert!(text.contains(&shop) && text.contains(&blog), "{text}");

    // rm forgets the shop; its blobs stay until a prune.
    let before_rm = blob_files(&root);
    run_ok(device(&root, &host).args(["rm", &shop]));
    let listed = json_of(run_ok(device(&root, &host).args(["--json", "ls"])).as_bytes());
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed:#}");
    assert_eq!(listed[0]["reference"], blog);
    assert_eq!(blob_files(&root), before_rm, "rm deletes no blob");
    let out = run_fails(device(&root, &host).args(["rm", &shop]));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no stored app"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // prune --dry-run names what would go and deletes nothing; prune then
    // deletes exactly that, and the blog stays whole.
    let dry =
        json_of(run_ok(device(&root, &host).args(["--json", "prune", "--dry-run"])).as_bytes());
    assert_eq!(dry["dry_run"], true);
    let doomed: Vec<(String, u64)> = dry["removed_blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["digest"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("sha256:")
                    .to_string(),
                b["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        doomed.len() >= 4,
        "the shop's manifest, bundle, web layer...: {dry:#}"
    );
    let freed: u64 = doomed.iter().map(|(_, n)| n).sum();
    assert_eq!(dry["freed_bytes"].as_u64().unwrap(), freed);
    assert!(freed > MIB as u64, "the shop's 1 MiB layer goes: {dry:#}");
    assert_eq!(blob_files(&root), before_rm, "a dry run deletes nothing");
    let pruned = json_of(run_ok(device(&root, &host).args(["--json", "prune"])).as_bytes());
    assert_eq!(pruned["dry_run"], false);
    assert_eq!(pruned["freed_bytes"].as_u64().unwrap(), freed);
    let after = blob_files(&root);
    for (hex, size) in &doomed {
        assert!(!after.contains_key(hex), "{hex} was pruned");
        assert_eq!(before_rm[hex], *size, "the report gives each blob's size");
    }
    assert_eq!(after.len(), before_rm.len() - doomed.len());
    // The blog alone is left: its size is every stored blob's, each counted
    // once though its two images share their base layer.
    let listed = json_of(run_ok(device(&root, &host).args(["--json", "ls"])).as_bytes());
    assert_eq!(
        listed[0]["stored_bytes"].as_u64().unwrap(),
        after.values().sum::<u64>(),
        "{listed:#}"
    );
    assert_fsck_clean(&root, &host);
    let text = run_ok(device(&root, &host).arg("prune"));
    assert!(text.contains("removed 0 blobs"), "{text}");
    // What the prune left is all the blog needs: nothing to fetch again.
    let (code, blog_check) = check_json(&root, &host, &blog, 0);
    assert_eq!(code, 0);
    assert_eq!(store_volume(&root, &blog_check).blobs, 0, "{blog_check:#}");

    // A flipped byte in the blog's largest layer: fsck names it, moves it
    // aside and fails; ls shows the blog partial; a pull fetches it again.
    let (victim, _) = after.iter().max_by_key(|(_, n)| **n).unwrap();
    let path = root.join("store/blobs/sha256").join(victim);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let out = run_fails(device(&root, &host).arg("fsck"));
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(victim.as_str()),
        "fsck names the blob:\n{said}"
    );
    assert!(!path.exists(), "the corrupt blob left blobs/sha256");
    let aside: Vec<_> = std::fs::read_dir(root.join("corrupt"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let listed = json_of(run_ok(device(&root, &host).args(["--json", "ls"])).as_bytes());
    assert_eq!(listed[0]["state"], "partial", "{listed:#}");
    assert!(
        listed[0]["missing_blobs"]
            .to_string()
            .contains(victim.as_str()),
        "{listed:#}"
    );
    run_ok(device(&root, &host).args(["pull", &blog]));
    assert_eq!(
        sha256_digest(&std::fs::read(&path).unwrap()),
        format!("sha256:{victim}")
    );
    assert_fsck_clean(&root, &host);
    let listed = json_of(run_ok(device(&root, &host).args(["--json", "ls"])).as_bytes());
    assert_eq!(listed[0]["state"], "fetched", "{listed:#}");
}

#[test]
fn two_pulls_of_one_app_at_once_both_succeed_and_leave_one_consistent_store() {
    let registry = Registry::start();
    let host = registry.host();
    let name = unique("twice");
    let reference = publish_app(&host, &name, "v1", &[("web", 4 * MIB), ("api", 3 * MIB)]);
    let root_dir = temp_dir("stowage-root-");
    let root = root_dir.path().join("root");
    let start = || {
        device(&root, &host)
            .args(["pull", &reference])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(), start());
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "both pulls succeed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(ingest_files(&root).is_empty(), "{:?}", ingest_files(&root));
    assert_fsck_clean(&root, &host);
    let listed = json_of(run_ok(device(&root, &host).args(["--json", "ls"])).as_bytes());
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed:#}");
    assert_eq!(listed[0]["state"], "fetched");
    let refs = index_refs(&root);
    assert_eq!(refs.len(), 3, "the app and its two images, once: {refs:?}");
}

#[test]
fn an_app_without_the_device_architecture_is_refused_naming_it() {
    let registry = Registry::start();
    let host = registry.host();
    let name = unique("arch");
    let reference = publish_app(&host, &name, "v1", &[("web", 64 * 1024)]);
    let root_dir = temp_dir("stowage-root-");
    let root = root_dir.path().join("root");
    let other = if machine_arch() == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    for verb in ["check", "pull"] {
        let out = run_fails(device(&root, &host).args([verb, "--arch", other, &reference]));
        assert_eq!(out.status.code(), Some(1), "{verb}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains(&format!("not published for {other}"))
                && said.contains(&name)
                && said.contains(machine_arch()),
            "{verb} names the app, the missing and the present architecture:\n{said}"
        );
    }
    assert!(blob_files(&root).is_empty());
    // With no --arch the kernel's architecture is used, and it is there.
    let report =
        json_of(run_ok(device(&root, &host).args(["--json", "check", &reference])).as_bytes());
    assert_eq!(report["apps"][0]["architecture"], machine_arch());
    // With Docker out of reach the check says so and counts every layer.
    let report = json_of(
        run_ok(device(&root, &host).args([
            "--json",
            "check",
            "--docker-host",
            "unix:///nonexistent/docker.sock",
            &reference,
        ]))
        .as_bytes(),
    );
    assert_eq!(report["docker_reachable"], false, "{report:#}");
    assert!(
        report["notes"].to_string().contains("not reachable"),
        "{report:#}"
    );
    run_ok(device(&root, &host).args(["pull", &reference]));
    assert_fsck_clean(&root, &host);
    // rm by the app's name forgets it.
    run_ok(device(&root, &host).args(["rm", &name]));
    let listed = json_of(run_ok(device(&root, &host).args(["--json", "ls"])).as_bytes());
    assert_eq!(listed, Value::Array(vec![]));
}

#[test]
fn out_of_range_settings_are_refused_by_name_before_anything_is_fetched() {
    let dir = temp_dir("stowage-flags-");
    let root = dir.path().join("root");
    // Nothing listens on port 1: a command that got past its settings would
    // fail on the registry instead, with another message.
    let app = "127.0.0.1:1/nobody/app:1";
    let usage = |args: &[&str], says: &str| {
        let out = run_output(stowage().arg("--root").arg(&root).args(args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    };
    usage(&["pull", "--jobs", "0", app], "--jobs");
    usage(&["pull", "--jobs", "65", app], "--jobs");
    usage(&["update", "--jobs", "0", app], "--jobs");
    usage(&["check", "--watermark", "10", app], "--watermark");
    usage(&["check", "--watermark", "100", app], "--watermark");
    usage(&["publish", "--jobs", "0", app], "--jobs");

    // The same limits hold in the config file, named as its keys.
    let config = dir.path().join("stowage.toml");
    std::fs::write(&config, "jobs = 0\n").unwrap();
    let out = run_output(
        stowage_with_config(&config)
            .arg("--root")
            .arg(&root)
            .args(["pull", app]),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("jobs = 0 in the config file"), "{stderr}");
    assert!(blob_files(&root).is_empty());
}

#[test]
fn a_result_written_into_a_closed_pipe_ends_quietly_and_a_full_one_fails() {
    let dir = temp_dir("stowage-pipe-");
    let root = dir.path().join("root");
    run_ok(stowage().arg("--root").arg(&root).arg("ls"));
    let ls_into = |stdout: Stdio| {
        stowage()
            .arg("--root")
            .arg(&root)
            .arg("ls")
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    // `stowage ls | head -0`: the reader is gone before the table is written.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = ls_into(writer.into());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A result that cannot be written for another reason is an error.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = ls_into(full.into());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot write the result"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
