//! What the device-side tests (`it::pull`, `it::pull_hostile`,
//! `torture::pull_kill`) share: an app built from locally made images and
//! published with `stowage publish`, a `stowage` command aimed at one device
//! root, and looks into the store's files.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::*;

/// Builds one image per service (a shared busybox base, plus one layer of
/// `size` noise bytes when `size > 0`), pushes them to the registry at
/// `host` as `NAME/SERVICE:1`, writes a compose file naming them, publishes
/// it as `HOST/NAME:TAG` (so that the app's name is NAME) and returns the
/// app reference stowage printed (`HOST/NAME@sha256:...`).
pub fn publish_app(host: &str, name: &str, tag: &str, services: &[(&str, usize)]) -> String {
    let base = format!("{name}-base:1");
    let _base = busybox_image(&base);
    let mut compose = String::from("services:\n");
    for (service, size) in services {
        let local = format!("{name}-{service}:1");
        let image = if *size > 0 {
            let bytes = noise(seed_of(&format!("{name}/{service}")), *size);
            build_image(
                &local,
                &base,
                &[(&format!("/data/{service}.bin"), bytes)],
                "",
            )
        } else {
            tag_image(&base, &local)
        };
        let remote = format!("{host}/{name}/{service}:1");
        push_image(&local, &remote);
        drop(image);
        compose.push_str(&format!("  {service}:\n    image: {remote}\n"));
    }
    let dir = temp_dir("stowage-app-");
    write_app(dir.path(), &compose);
    let cache = temp_dir("stowage-cache-");
    let out = run_ok(
        stowage()
            .arg("publish")
            .arg("--dir")
            .arg(dir.path())
            .arg("--cache-dir")
            .arg(cache.path())
            .args(["--insecure-registry", host])
            .arg(format!("{host}/{name}:{tag}")),
    );
    let reference = out.lines().last().unwrap_or("").trim().to_string();
    assert!(
        reference.starts_with(&format!("{host}/{name}@sha256:")),
        "publish printed {out}"
    );
    reference
}

/// `stowage --root ROOT --insecure-registry HOST ...` (the harness's
/// `stowage()` sets the watermark to 99%, so that how full the machine's
/// disk is does not decide a test; policy tests give their own flags).
pub fn device(root: &Path, host: &str) -> Command {
    let mut cmd = stowage();
    cmd.arg("--root")
        .arg(root)
        .args(["--insecure-registry", host]);
    cmd
}

/// The committed blobs of the store under `root`: hex digest -> size.
pub fn blob_files(root: &Path) -> BTreeMap<String, u64> {
    let dir = root.join("store/blobs/sha256");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .map(|e| {
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            (e.file_name().to_string_lossy().into_owned(), size)
        })
        .collect()
}

/// Every file in the ingest area (partial downloads and their checkpoints).
pub fn ingest_files(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root.join("ingest")) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    files
}

/// The refs of the store's `index.json`: ref name -> (media type, digest).
pub fn index_refs(root: &Path) -> BTreeMap<String, (String, String)> {
    let bytes = std::fs::read(root.join("store/index.json")).expect("read index.json");
    let index: Value = serde_json::from_slice(&bytes).expect("index.json is JSON");
    index["manifests"]
        .as_array()
        .expect("index.json lists manifests")
        .iter()
        .map(|m| {
            (
                m["annotations"]["org.opencontainers.image.ref.name"]
                    .as_str()
                    .expect("every entry is named")
                    .to_string(),
                (
                    m["mediaType"].as_str().unwrap_or("").to_string(),
                    m["digest"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

/// Parses a command's stdout as one JSON document.
pub fn json_of(stdout: &[u8]) -> Value {
    serde_json::from_slice(stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}):\n{}",
            String::from_utf8_lossy(stdout)
        )
    })
}

/// The volume of a check report whose paths include `path` (as the report
/// names it, e.g. `ROOT/store (blobs)`).
pub fn volume_with<'a>(report: &'a Value, path: &str) -> &'a Value {
    report["volumes"]
        .as_array()
        .expect("a check report lists volumes")
        .iter()
        .find(|v| {
            v["paths"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p.as_str() == Some(path)))
        })
        .unwrap_or_else(|| panic!("no volume holds {path} in {report:#}"))
}

/// `stowage fsck` on `root` exits 0 and reports the store clean.
pub fn assert_fsck_clean(root: &Path, host: &str) {
    let out = run_ok(device(root, host).args(["--json", "fsck"]));
    let report = json_of(out.as_bytes());
    assert_eq!(report["clean"], true, "fsck: {report:#}");
}

/// The layers of the image manifest `repo@digest` in a registry answering
/// plain HTTP at `host`: (digest, size).
pub fn image_layers_in(manifest: &Value) -> Vec<(String, u64)> {
    manifest["layers"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| {
                    (
                        l["digest"].as_str().unwrap_or("").to_string(),
                        l["size"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `uname -m` as stowage names the architecture.
pub fn machine_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => panic!("no test image for {other}"),
    }
}
