//! `stowage publish` and `stowage inspect` against the real registry, dockerd
//! and skopeo.

use std::path::Path;
use std::process::Command;

use crate::common::*;
use serde_json::Value;

/// Two images sharing a busybox base, pushed to `registry`; returns their
/// names in the registry.
fn push_two_images(registry: &Registry, name: &str) -> (String, String) {
    let base = format!("{name}-base:1");
    let _base_image = busybox_image(&base);
    let web_local = format!("{name}-web:1");
    let _web_local_image = build_image(
        &web_local,
        &base,
        &[("index.html", b"<h1>hello</h1>".to_vec())],
        "",
    );
    let web = format!("{}/{name}/web:1", registry.host());
    let db = format!("{}/{name}/db:1", registry.host());
    push_image(&web_local, &web);
    push_image(&base, &db);
    (web, db)
}

fn publish(registry: &Registry, app_dir: &Path, target: &str, extra: &[&str]) -> Command {
    let mut cmd = stowage();
    cmd.arg("publish")
        .arg("--dir")
        .arg(app_dir)
        .args(["--insecure-registry", &registry.host()])
        .arg("--cache-dir")
        .arg(app_dir.join(".cache-not-bundled"))
        .args(extra)
        .arg(target);
    cmd
}

fn last_line(s: &str) -> String {
    s.lines().last().unwrap_or("").trim().to_string()
}

#[test]
fn published_app_has_the_exact_bytes_and_layout_of_the_format() {
    let registry = Registry::start();
    let name = unique("fmt");
    let (web, db) = push_two_images(&registry, &name);
    let app = temp_dir("app-");
    write_app(
        app.path(),
        &format!("services:\n  web:\n    image: {web}\n    build: ./web\n  db:\n    image: {db}\n"),
    );
    std::fs::write(
        app.path().join(".composeappignores"),
        ".cache-not-bundled\n",
    )
    .unwrap();
    let target = format!("{}/{name}/app:v1", registry.host());
    let out = run_ok(&mut publish(&registry, app.path(), &target, &[]));
    let reference = last_line(&out);
    assert!(
        reference.starts_with(&format!("{}/{name}/app@sha256:", registry.host())),
        "{out}"
    );

    // skopeo returns exactly the bytes stowage pushed: their digest is the reference's.
    let raw = skopeo_inspect_raw(&reference);
    assert_eq!(
        format!("{}/{name}/app@{}", registry.host(), sha256_digest(&raw)),
        reference
    );
    let manifest: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(manifest["annotations"]["compose-app"], "v1");
    assert_eq!(manifest["artifactType"], "application/vnd.fio+compose-app");
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );
    assert_eq!(
        manifest["config"]["digest"],
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    );
    let bundle = &manifest["layers"][0];
    assert_eq!(bundle["mediaType"], "application/octet-stream");
    let index_digest = bundle["annotations"]["org.foundries.app.bundle.index.digest"]
        .as_str()
        .unwrap();
    let bundle_index: Value =
        serde_json::from_slice(&registry.get_blob(&format!("{name}/app"), index_digest)).unwrap();
    assert!(
        bundle_index.get("docker-compose.yml").is_some(),
        "{bundle_index}"
    );
    assert!(
        bundle_index.get(".cache-not-bundled").is_none(),
        "ignored files stay out: {bundle_index}"
    );

    let meta_desc = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["annotations"]["layers-meta"] == "v1")
        .expect("a layers-meta layer");
    let meta: Value = serde_json::from_slice(&registry.get_blob(
        &format!("{name}/app"),
        meta_desc["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let amd64 = &meta["amd64"];
    assert_eq!(amd64["fs_block_size"], 4096);
    let layers = amd64["layers"].as_object().unwrap();
    // web = base + one COPY layer; db = base: three layers, the base once.
    assert_eq!(layers.len(), 2, "{meta}");
    for (digest, layer) in layers {
        assert!(digest.starts_with("sha256:"));
        for key in [
            "size",
            "usage",
            "archive_size",
            "tar_size",
            "entries",
            "inodes",
        ] {
            assert!(layer[key].as_u64().is_some(), "{key} missing in {layer}");
        }
        assert!(layer["diff_id"].as_str().unwrap().starts_with("sha256:"));
        let by_bs = layer["usage_by_block_size"].as_object().unwrap();
        let keys: Vec<&String> = by_bs.keys().collect();
        assert_eq!(keys, ["1024", "4096", "16384", "65536"]);
        assert_eq!(by_bs["4096"], layer["usage"]);
    }

    // layers-meta at layers[1], where Foundries' readers look; no
    // `manifests` list of layer indexes (composectl leaves it out by
    // default), and no layer index pushed at all.
    assert_eq!(manifest["layers"][1]["digest"], meta_desc["digest"]);
    assert!(manifest.get("manifests").is_none(), "{manifest}");
    let report_out = run_ok(&mut publish(
        &registry,
        app.path(),
        &target,
        &["--json", "--dry-run"],
    ));
    let report: Value = serde_json::from_str(&report_out).unwrap();
    let pushed: Vec<&str> = report["pushed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["what"].as_str().unwrap())
        .collect();
    assert_eq!(
        pushed,
        [
            "config",
            "bundle",
            "bundle index",
            "layers-meta",
            "app manifest"
        ],
        "{report}"
    );
    assert_eq!(report["layer_indexes_referenced"], false);

    // The pinned compose file names each image by digest and drops build.
    let mut inspect = stowage();
    inspect.args([
        "inspect",
        "--json",
        "--insecure-registry",
        &registry.host(),
        &reference,
    ]);
    let description: Value = serde_json::from_str(&run_ok(&mut inspect)).unwrap();
    assert!(
        description["services"]["web"]
            .as_str()
            .unwrap()
            .contains("/web@sha256:")
    );
    assert!(!description["compose"].as_str().unwrap().contains("build"));
    assert_eq!(description["architectures"]["amd64"]["layers"], 2);
}

#[test]
fn publishing_the_same_project_twice_gives_the_same_digest() {
    let registry = Registry::start();
    let name = unique("repro");
    let (web, db) = push_two_images(&registry, &name);
    let app = temp_dir("app-");
    write_app(
        app.path(),
        &format!("services:\n  web:\n    image: {web}\n  db:\n    image: {db}\n"),
    );
    std::fs::write(app.path().join("config.ini"), "a=1\n").unwrap();
    std::fs::write(
        app.path().join(".composeappignores"),
        ".cache-not-bundled\n",
    )
    .unwrap();
    let target = format!("{}/{name}/app:v1", registry.host());
    let first = last_line(&run_ok(&mut publish(&registry, app.path(), &target, &[])));
    // Every file rewritten with other times: mtimes must not change the bundle.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    for entry in std::fs::read_dir(app.path()).unwrap().flatten() {
        if entry.file_type().unwrap().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            std::fs::write(entry.path(), bytes).unwrap();
            let file = std::fs::File::options()
                .write(true)
                .open(entry.path())
                .unwrap();
            file.set_modified(later).unwrap();
        }
    }
    let second = last_line(&run_ok(&mut publish(&registry, app.path(), &target, &[])));
    assert_eq!(first, second);
}

#[test]
fn multi_architecture_images_give_layers_meta_per_architecture() {
    let registry = Registry::start();
    let name = unique("multi");
    let (web, db) = push_two_images(&registry, &name);
    let multi = format!("{}/{name}/multi", registry.host());
    push_multiarch(&registry, &format!("{name}/multi"), "1", &web);
    let app = temp_dir("app-");
    write_app(
        app.path(),
        &format!("services:\n  web:\n    image: {multi}:1\n"),
    );
    let target = format!("{}/{name}/app:v1", registry.host());
    let reference = last_line(&run_ok(&mut publish(&registry, app.path(), &target, &[])));
    let archs_of = |args: &[&str]| -> Vec<String> {
        let out = run_ok(&mut publish(
            &registry,
            app.path(),
            &target,
            &[&["--json", "--dry-run"], args].concat(),
        ));
        let report: Value = serde_json::from_str(&out).unwrap();
        report["architectures"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    assert!(reference.contains("@sha256:"));
    assert_eq!(archs_of(&[]), ["amd64", "arm64"]);
    // --arch arm64 alone publishes only arm64.
    assert_eq!(archs_of(&["--arch", "arm64"]), ["arm64"]);
    let arm_target = format!("{}/{name}/app:arm", registry.host());
    let out = run_ok(&mut publish(
        &registry,
        app.path(),
        &arm_target,
        &["--arch", "arm64"],
    ));
    let manifest: Value = serde_json::from_slice(&skopeo_inspect_raw(&last_line(&out))).unwrap();
    let meta_desc = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let meta: Value =
        serde_json::from_slice(&registry.get_blob(&format!("{name}/app"), &meta_desc)).unwrap();
    assert_eq!(
        meta.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["arm64"]
    );

    // A service whose image lacks the requested architecture is refused, naming it.
    write_app(
        app.path(),
        &format!("services:\n  web:\n    image: {multi}:1\n  db:\n    image: {db}\n"),
    );
    let target = format!("{}/{name}/app:bad", registry.host());
    let out = run_fails(&mut publish(
        &registry,
        app.path(),
        &target,
        &["--arch", "arm64"],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("service db") && err.contains("arm64"), "{err}");
    assert_no_manifest(&registry, &format!("{name}/app"), "bad");
}

fn assert_no_manifest(registry: &Registry, repo: &str, tag: &str) {
    let resp = registry.request("GET", &format!("/v2/{repo}/manifests/{tag}"), &[], None);
    assert_eq!(
        resp.status, 404,
        "an app manifest was pushed despite the error"
    );
}

#[test]
fn bad_inputs_give_clear_errors_and_push_no_app() {
    let registry = Registry::start();
    let name = unique("bad");
    let (web, _db) = push_two_images(&registry, &name);
    let app = temp_dir("app-");
    let repo = format!("{name}/app");
    let target = |tag: &str| format!("{}/{repo}:{tag}", registry.host());
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "missing-tag",
            format!("services:\n  web:\n    image: {web}-nope\n"),
            "does not exist",
        ),
        (
            "missing-repo",
            format!(
                "services:\n  web:\n    image: {}/{name}/nothing:1\n",
                registry.host()
            ),
            "does not exist",
        ),
        (
            "syntax",
            "services:\n  web: [unclosed\n".to_string(),
            "not valid YAML",
        ),
        ("no-services", "services: {}\n".to_string(), "no services"),
        (
            "unset-variable",
            "services:\n  web:\n    image: ${STOWAGE_TEST_UNSET_VARIABLE}/x:1\n".to_string(),
            "STOWAGE_TEST_UNSET_VARIABLE",
        ),
        (
            "registry-down",
            "services:\n  web:\n    image: 127.0.0.1:9/x/y:1\n".to_string(),
            "cannot reach registry 127.0.0.1:9",
        ),
    ];
    for (tag, compose, expected) in cases {
        write_app(app.path(), &compose);
        let out = run_fails(&mut publish(
            &registry,
            app.path(),
            &target(tag),
            &["--insecure-registry", "127.0.0.1:9"],
        ));
        assert_eq!(out.status.code(), Some(1), "{tag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(expected),
            "{tag}: expected {expected:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{tag}: {err}");
        assert_no_manifest(&registry, &repo, tag);
    }
}

/// Pushes an image whose single layer is `layer` and whose config claims
/// `diff_id`; returns its reference.
fn push_crafted_image(registry: &Registry, repo: &str, layer: &[u8], diff_id: &str) -> String {
    let layer_digest = registry.upload_blob(repo, layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "config": {}
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = registry.upload_blob(repo, &config_bytes);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}]
    });
    registry.put_manifest(
        repo,
        "1",
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    format!("{}/{repo}:1", registry.host())
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn tar_of_one_file() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(5);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, "hello.txt", &b"hello"[..])
        .unwrap();
    builder.into_inner().unwrap()
}

#[test]
fn a_layer_that_lies_about_its_content_is_refused() {
    let registry = Registry::start();
    let name = unique("lies");
    let app = temp_dir("app-");
    let tar = tar_of_one_file();

    // The config's diff_id does not match the layer's uncompressed digest.
    let wrong_diff = format!("sha256:{}", "0".repeat(64));
    let image = push_crafted_image(
        &registry,
        &format!("{name}/wrongdiff"),
        &gzip(&tar),
        &wrong_diff,
    );
    write_app(
        app.path(),
        &format!("services:\n  web:\n    image: {image}\n"),
    );
    let out = run_fails(&mut publish(
        &registry,
        app.path(),
        &format!("{}/{name}/app:a", registry.host()),
        &[],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("diff_id"), "{err}");
    assert_no_manifest(&registry, &format!("{name}/app"), "a");

    // A layer that is not a tar at all.
    let junk = gzip(b"this is not a tar archive, just some text that goes on and on");
    let image = push_crafted_image(
        &registry,
        &format!("{name}/junk"),
        &junk,
        &sha256_digest(b"x"),
    );
    write_app(
        app.path(),
        &format!("services:\n  web:\n    image: {image}\n"),
    );
    let out = run_fails(&mut publish(
        &registry,
        app.path(),
        &format!("{}/{name}/app:b", registry.host()),
        &[],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a tar"), "{err}");
    assert_no_manifest(&registry, &format!("{name}/app"), "b");
}

#[test]
fn authenticated_registry_uses_docker_config_credentials() {
    let mut registry = Registry::start_with(RegistryOptions {
        htpasswd: Some(("ci".into(), "s3cret".into())),
        tls: false,
    });
    let name = unique("auth");
    let base = format!("{name}-base:1");
    let _base_image = busybox_image(&base);
    let image = format!("{}/{name}/base:1", registry.host());
    push_image(&base, &image);
    let app = temp_dir("app-");
    write_app(
        app.path(),
        &format!("services:\n  db:\n    image: {image}\n"),
    );
    let target = format!("{}/{name}/app:v1", registry.host());

    let good = temp_dir("dockercfg-");
    write_docker_config(good.path(), &registry.host(), "ci", "s3cret");
    let out =
        run_ok(publish(&registry, app.path(), &target, &[]).env("DOCKER_CONFIG", good.path()));
    assert!(last_line(&out).contains("@sha256:"), "{out}");

    let bad = temp_dir("dockercfg-");
    write_docker_config(bad.path(), &registry.host(), "ci", "wrong");
    let out = run_fails(
        publish(
            &registry,
            app.path(),
            &format!("{}/{name}/app:v2", registry.host()),
            &[],
        )
        .env("DOCKER_CONFIG", bad.path()),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused the credentials") && err.contains("\"ci\""),
        "{err}"
    );

    let none = temp_dir("dockercfg-");
    let out = run_fails(
        publish(
            &registry,
            app.path(),
            &format!("{}/{name}/app:v3", registry.host()),
            &[],
        )
        .env("DOCKER_CONFIG", none.path()),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("requires credentials"), "{err}");
    registry.stop();
}

#[test]
fn https_registry_is_trusted_through_the_ca_file() {
    let registry = Registry::start_with(RegistryOptions {
        htpasswd: None,
        tls: true,
    });
    let ca = registry.ca_file().expect("a TLS registry has a CA file");
    let name = unique("tls");
    let base = format!("{name}-base:1");
    let _base_image = busybox_image(&base);
    let image = format!("{}/{name}/base:1", registry.host());
    push_image(&base, &image);
    let app = temp_dir("app-");
    write_app(
        app.path(),
        &format!("services:\n  db:\n    image: {image}\n"),
    );

    let mut cmd = stowage();
    cmd.args(["publish", "--dir"])
        .arg(app.path())
        .arg("--ca-file")
        .arg(&ca);
    cmd.arg(format!("{}/{name}/app:v1", registry.host()));
    assert!(last_line(&run_ok(&mut cmd)).contains("@sha256:"));

    // The same through the config file.
    let config = app.path().join("stowage.toml");
    std::fs::write(
        &config,
        format!("ca_file = {:?}\n", ca.display().to_string()),
    )
    .unwrap();
    let mut cmd = stowage_with_config(&config);
    cmd.args(["publish", "--dir"]).arg(app.path());
    cmd.arg(format!("{}/{name}/app:v2", registry.host()));
    assert!(last_line(&run_ok(&mut cmd)).contains("@sha256:"));

    // Without the CA, the certificate is not trusted.
    let mut cmd = stowage();
    cmd.args(["publish", "--dir"]).arg(app.path());
    cmd.arg(format!("{}/{name}/app:v3", registry.host()));
    let err = String::from_utf8_lossy(&run_fails(&mut cmd).stderr).to_string();
    assert!(
        err.contains("cannot reach registry") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
}

#[test]
fn dry_run_pushes_nothing() {
    let registry = Registry::start();
    let name = unique("dry");
    let (web, _) = push_two_images(&registry, &name);
    let app = temp_dir("app-");
    write_app(
        app.path(),
        &format!("services:\n  web:\n    image: {web}\n"),
    );
    let out = run_ok(&mut publish(
        &registry,
        app.path(),
        &format!("{}/{name}/app:v1", registry.host()),
        &["--dry-run"],
    ));
    assert!(out.contains("dry run"), "{out}");
    assert_no_manifest(&registry, &format!("{name}/app"), "v1");
}

/// The yardstick: the `usage` publish predicts is within 2% of the
/// real growth of a fresh Docker data root (overlay2 on ext4, 4096-byte
/// blocks) when the app's image, of over 1,000 files, is PULLED into it.
#[test]
fn predicted_usage_matches_a_real_docker_pull_within_two_percent() {
    let registry = Registry::start();
    let name = unique("usage");
    let base = format!("{name}-base:1");
    let base_image = busybox_image(&base);
    let local = format!("{name}-files:1");
    let local_image = many_files_image(&local, &base, 1200, 7);
    let image = format!("{}/{name}/files:1", registry.host());
    push_image(&local, &image);
    drop(local_image);
    let app = temp_dir("app-");
    write_app(
        app.path(),
        &format!("services:\n  files:\n    image: {image}\n"),
    );
    let reference = last_line(&run_ok(&mut publish(
        &registry,
        app.path(),
        &format!("{}/{name}/app:1", registry.host()),
        &[],
    )));
    let mut inspect = stowage();
    inspect.args([
        "inspect",
        "--json",
        "--insecure-registry",
        &registry.host(),
        &reference,
    ]);
    let description: Value = serde_json::from_str(&run_ok(&mut inspect)).unwrap();
    let predicted = description["architectures"]["amd64"]["usage"]
        .as_u64()
        .unwrap();

    let volume = LoopVolume::new(1024);
    let dockerd = PrivateDockerd::start(&volume.path().join("docker"));
    run_ok(&mut Command::new("sync"));
    let before = volume.stats().used_bytes();
    run_ok(dockerd.docker().args(["pull", &image]));
    run_ok(&mut Command::new("sync"));
    let after = volume.stats().used_bytes();
    let grown = after - before;
    let error = (predicted as f64 - grown as f64).abs() / grown as f64;
    eprintln!(
        "predicted usage {predicted} bytes, real growth {grown} bytes ({:.3}% off)",
        error * 100.0
    );
    assert!(error <= 0.02, "predicted {predicted}, grew {grown}");
    drop(dockerd);
    drop(base_image);
}
