//! The compose-app ecosystem, both ways (issue 11, `../shared/FORMAT.md`).
//!
//! Apps shaped as Foundries' publishers make them (composectl, with and
//! without a bundle index; the legacy publisher, with its media types, no
//! bundle index and no layers-meta) are built here entry by entry: the app
//! manifest as Go's `json.MarshalIndent` writes it (3-space indent, a
//! descriptor's `size` before its `digest`), the bundle as Go's tar of the
//! app directory (modes kept, a symlink, a hard link, a 0600 file), links
//! in the bundle index with the digest of empty content, the layer index
//! pushed as a manifest under composectl's tag. Debian's registry refuses a
//! manifest carrying `manifests` (its CVE-2021-41190 fix), so these apps
//! are served by the test's own registry (`common::hostile`), with images
//! mirrored from a real one. They pull, install and run offline.
//!
//! The other way, a reader written here to composectl's rules reads what
//! `stowage publish` writes. And registry credentials come from a Docker
//! credential helper the test writes.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use serde::Serialize as _;
use serde_json::{Value, json};

use crate::common::docker_device::{Device, LocalImages, app_state, lenient_config};
use crate::common::hostile::HostileRegistry;
use crate::common::*;

const EMPTY_SHA256: &str =
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG_HASH: &str = "io.compose-spec.config-hash";

/// Go's `json.MarshalIndent(v, "", "   ")`, for values whose keys are in
/// Go's field order already.
fn go_json_indent(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"   ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    value.serialize(&mut ser).unwrap();
    out
}

/// A distribution.Descriptor as Go writes it: mediaType, size, digest.
fn go_descriptor(media_type: &str, digest: &str, size: usize) -> Value {
    json!({"mediaType": media_type, "size": size, "digest": digest})
}

/// One entry of a bundle, as Go's archive/tar gets it from docker's
/// `TarWithOptions`: name without `./`, directories with a trailing `/`.
enum Entry<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
}

/// The bundle tar.gz and composectl's bundle index of it (every
/// non-directory entry; links hash their empty body).
fn go_bundle(entries: &[Entry]) -> (Vec<u8>, BTreeMap<String, String>) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut index = BTreeMap::new();
    for entry in entries {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let (name, body): (&str, &[u8]) = match entry {
            Entry::Dir(name, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                (name, b"")
            }
            Entry::File(name, mode, body) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                (name, body)
            }
            Entry::Symlink(name, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_link_name(target).unwrap();
                (name, b"")
            }
            Entry::HardLink(name, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_link_name(target).unwrap();
                (name, b"")
            }
        };
        h.set_size(body.len() as u64);
        tar.append_data(&mut h, name, body).unwrap();
        if !matches!(entry, Entry::Dir(..)) {
            index.insert(name.to_string(), sha256_digest(body));
        }
    }
    // Go's gzip.Writer: no time, no name, OS "unknown".
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    (gz.finish().unwrap(), index)
}

/// How the app is shaped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    /// composectl: octet-stream bundle with a bundle index, empty OCI
    /// config, layers-meta at layers[1], a layer index pushed as a manifest.
    Composectl,
    /// composectl with `APP_BUNDLE_INDEX_OFF=1`, and the layer index named
    /// in `manifests` but not in the registry.
    ComposectlNoIndex,
    /// The legacy publisher: `application/tar+gzip` bundle, an image-config
    /// media type with empty content, no bundle index, no layers-meta.
    Legacy,
}

/// An image pushed to a real registry and mirrored into the test's own.
struct Mirrored {
    pinned: String,
    /// (digest, size) of each layer.
    layers: Vec<(String, u64)>,
}

fn mirror_image(hostile: &HostileRegistry, source: &Registry, local: &str, repo: &str) -> Mirrored {
    push_image(local, &format!("{}/{repo}:1", source.host()));
    let digest = hostile
        .mirror_from(&source.host(), repo, "1")
        .expect("mirror the image");
    let (_, bytes) = hostile.manifest(repo, &digest).expect("mirrored manifest");
    let manifest: Value = serde_json::from_slice(&bytes).unwrap();
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect();
    Mirrored {
        pinned: format!("{}/{repo}@{digest}", hostile.host()),
        layers,
    }
}

/// Publishes an app of `shape` into `hostile` as `REPO:v1`, the way its
/// publisher would; returns its pinned reference and the layer index's
/// digest (when it has one).
fn publish_foundries_app(
    hostile: &HostileRegistry,
    repo: &str,
    shape: Shape,
    images: &[(&str, &Mirrored)],
) -> (String, Option<String>) {
    // The compose file as composectl pins it: yaml.v3's layout, the
    // service's config-hash label.
    let mut compose = String::from("services:\n");
    for (service, image) in images {
        let svc = json!({
            "command": ["sh", "-c", "cat /app/conf/link /app/conf/secret && sleep 3600"],
            "image": image.pinned,
            "network_mode": "none",
            "volumes": ["./conf:/app/conf:ro"],
        });
        let hash = stowage::app::compose_file::service_config_hash(svc.as_object().unwrap());
        compose.push_str(&format!(
            "    {service}:\n        command:\n            - sh\n            - -c\n            - cat /app/conf/link /app/conf/secret && sleep 3600\n        image: {}\n        labels:\n            {CONFIG_HASH}: {hash}\n        network_mode: none\n        volumes:\n            - ./conf:/app/conf:ro\n",
            image.pinned
        ));
    }
    let (bundle, index) = go_bundle(&[
        Entry::Dir("conf/", 0o750),
        Entry::File("conf/app.conf", 0o644, b"port=80\n"),
        Entry::HardLink("conf/hard", "conf/app.conf"),
        Entry::Symlink("conf/link", "app.conf"),
        Entry::File("conf/secret", 0o600, b"s3cret\n"),
        Entry::File("docker-compose.yml", 0o644, compose.as_bytes()),
        Entry::File("run.sh", 0o755, b"#!/bin/sh\nexec \"$@\"\n"),
    ]);
    assert_eq!(index["conf/link"], EMPTY_SHA256);
    assert_eq!(index["conf/hard"], EMPTY_SHA256);
    let bundle_digest = hostile.add_blob(repo, bundle.clone()).to_string();
    let arch = device::machine_arch();

    // Layers of every image, de-duplicated and sorted by digest.
    let mut layers: BTreeMap<String, u64> = BTreeMap::new();
    for (_, image) in images {
        layers.extend(image.layers.iter().cloned());
    }
    let layer_index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "platform": {"architecture": arch, "os": ""},
        "layers": layers.iter().map(|(d, s)| go_descriptor(
            "application/vnd.docker.image.rootfs.diff.tar.gzip", d, *s as usize)).collect::<Vec<_>>(),
        "annotations": {"compose-app-layers": "v1"},
    });
    let layer_index_bytes = serde_json::to_vec(&layer_index).unwrap();
    let layer_index_digest = sha256_digest(&layer_index_bytes);
    let mut layer_index_desc =
        go_descriptor(OCI_INDEX, &layer_index_digest, layer_index_bytes.len());
    layer_index_desc["platform"] = json!({"architecture": arch, "os": ""});

    let mut bundle_desc = go_descriptor(
        if shape == Shape::Legacy {
            "application/tar+gzip"
        } else {
            "application/octet-stream"
        },
        &bundle_digest,
        bundle.len(),
    );
    let mut app_layers = Vec::new();
    if shape == Shape::Composectl {
        let index_bytes = serde_json::to_vec(&index).unwrap();
        let index_digest = hostile.add_blob(repo, index_bytes.clone());
        bundle_desc["annotations"] = json!({
            "org.foundries.app.bundle.index.digest": index_digest.to_string(),
            "org.foundries.app.bundle.index.size": index_bytes.len().to_string(),
        });
    }
    app_layers.push(bundle_desc);
    if shape != Shape::Legacy {
        // Figures as composectl's CI measures them (only some of the keys).
        let meta = json!({ arch: {
            "fs_block_size": 4096,
            "layers": layers.iter().map(|(d, s)| (d.clone(), json!({
                "size": s * 3, "usage": s * 3 + 8192, "archive_size": s,
            }))).collect::<serde_json::Map<_, _>>(),
        }});
        let meta_bytes = serde_json::to_vec(&meta).unwrap();
        let meta_digest = hostile.add_blob(repo, meta_bytes.clone()).to_string();
        let mut meta_desc = go_descriptor("application/json", &meta_digest, meta_bytes.len());
        meta_desc["annotations"] = json!({"layers-meta": "v1"});
        app_layers.push(meta_desc);
    }
    let config = if shape == Shape::Legacy {
        let digest = hostile.add_blob(repo, Vec::new()).to_string();
        go_descriptor("application/vnd.oci.image.config.v1+json", &digest, 0)
    } else {
        let digest = hostile.add_blob(repo, b"{}".to_vec()).to_string();
        go_descriptor("application/vnd.oci.empty.v1+json", &digest, 2)
    };
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config,
        "layers": app_layers,
        "annotations": {"compose-app": "v1"},
    });
    if shape != Shape::Legacy {
        manifest["artifactType"] = json!("application/vnd.fio+compose-app");
    }
    manifest["manifests"] = json!([layer_index_desc]);
    let pushed_index = shape == Shape::Composectl;
    if pushed_index {
        let tag = format!("layers-{arch}{}", &layer_index_digest[7..14]);
        hostile.add_manifest(repo, Some(&tag), OCI_INDEX, layer_index_bytes);
    }
    let manifest_bytes = go_json_indent(&manifest);
    assert!(
        String::from_utf8_lossy(&manifest_bytes).contains("\n   \"schemaVersion\": 2,"),
        "Go's layout"
    );
    let digest = hostile.add_manifest(repo, Some("v1"), OCI_MANIFEST, manifest_bytes);
    (
        format!("{}/{repo}@{digest}", hostile.host()),
        pushed_index.then_some(layer_index_digest),
    )
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Pulls `shape` from the test's registry, then with the registry gone
/// installs and runs it, and checks the bundle's links and modes.
fn a_foundries_app_runs_offline(shape: Shape) {
    let source = Registry::start();
    let hostile = HostileRegistry::start();
    let name = unique("fio");
    let mut local = LocalImages::default();
    let base = format!("{name}-base:1");
    local.busybox(&base);
    let web_local = format!("{name}-web:1");
    local.build(&web_local, &base, &[("/srv/web.bin", noise(7, 100_000))]);
    let web = mirror_image(&hostile, &source, &web_local, &format!("{name}/web"));
    let db = mirror_image(&hostile, &source, &base, &format!("{name}/db"));
    let (app, layer_index) =
        publish_foundries_app(&hostile, &name, shape, &[("web", &web), ("db", &db)]);

    let work = temp_dir("foundries-");
    let dockerd = PrivateDockerd::start(&work.path().join("docker"));
    let device = Device {
        root: work.path().join("root"),
        registry: hostile.host(),
        docker_host: dockerd.host(),
        config: lenient_config(work.path()),
    };
    let check = device.json(&["check", &app]);
    let estimated = check["apps"][0]["layers_estimated"].as_u64().unwrap();
    let notes = check["notes"].to_string();
    if shape == Shape::Legacy {
        let mut distinct: Vec<&String> =
            web.layers.iter().chain(&db.layers).map(|l| &l.0).collect();
        distinct.sort();
        distinct.dedup();
        assert_eq!(estimated, distinct.len() as u64, "no layers-meta: {check}");
        assert!(notes.contains("estimate"), "{check}");
    } else {
        assert_eq!(estimated, 0, "{check}");
    }
    hostile.clear_requests();
    device.ok(&["pull", &app]);
    let requests = hostile.requests();
    if let Some(index) = &layer_index {
        // Read through /manifests/, as it was pushed, never as a blob.
        assert!(
            requests
                .iter()
                .any(|r| r.path.ends_with(&format!("/manifests/{index}")) && r.status == 200),
            "{requests:?}"
        );
        assert!(
            !requests
                .iter()
                .any(|r| r.path.ends_with(&format!("/blobs/{index}"))),
            "{requests:?}"
        );
    }
    drop(hostile); // offline from here

    let report = device.json(&["install", &name]);
    let dir = Path::new(report["dir"].as_str().unwrap()).to_path_buf();
    assert_eq!(std::fs::read(dir.join("conf/link")).unwrap(), b"port=80\n");
    assert!(
        std::fs::symlink_metadata(dir.join("conf/link"))
            .unwrap()
            .is_symlink()
    );
    assert_eq!(std::fs::read(dir.join("conf/hard")).unwrap(), b"port=80\n");
    assert_eq!(mode_of(&dir.join("conf/secret")), 0o600, "kept");
    assert_eq!(mode_of(&dir.join("conf")), 0o750, "kept");
    assert_eq!(mode_of(&dir.join("run.sh")), 0o755);

    device.ok(&["run", &name]);
    let ps = device.json(&["ps"]);
    let state = app_state(&ps, &name);
    assert_eq!(state["state"], "running", "{ps}");
    // The bind mount of files inside the app directory, through its link.
    let web_container = service_container(&mut dockerd.docker(), &name, "web");
    let logs = run_ok(dockerd.docker().args(["logs", &web_container]));
    assert!(
        logs.contains("port=80") && logs.contains("s3cret"),
        "{logs}"
    );
    // Every container carries the service hash composectl's ps matches.
    let labels = run_ok(dockerd.docker().args([
        "ps",
        "--format",
        &format!("{{{{.Label \"{CONFIG_HASH}\"}}}}"),
    ]));
    assert_eq!(
        labels.lines().filter(|l| l.len() == 64).count(),
        2,
        "{labels}"
    );
    device.ok(&["stop", &name]);
}

#[test]
fn a_composectl_app_with_a_bundle_index_and_a_layer_index_runs_offline() {
    a_foundries_app_runs_offline(Shape::Composectl);
}

#[test]
fn a_composectl_app_without_a_bundle_index_runs_offline() {
    a_foundries_app_runs_offline(Shape::ComposectlNoIndex);
}

#[test]
fn a_legacy_app_runs_offline_and_its_check_says_the_usage_is_an_estimate() {
    a_foundries_app_runs_offline(Shape::Legacy);
}

/// What composectl checks of an app before it installs it, written from
/// its rules: the compose file is the bundle's top-level
/// `docker-compose.yml`, layers-meta is `layers[1]`, every service carries
/// its config-hash label, the bundle index vouches for every regular file,
/// and each `manifests[]` entry is fetched through `/manifests/`.
fn composectl_reads(registry: &Registry, repo: &str, tag: &str) -> Value {
    let (bytes, media_type) = registry.get_manifest(repo, tag);
    assert_eq!(media_type, OCI_MANIFEST);
    assert!(bytes.len() < 50 * 1024);
    let manifest: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(manifest["annotations"]["compose-app"], "v1");
    let bundle = &manifest["layers"][0];
    assert_eq!(bundle["mediaType"], "application/octet-stream");
    let meta = &manifest["layers"][1];
    assert_eq!(meta["annotations"]["layers-meta"], "v1", "{manifest}");
    let meta: Value =
        serde_json::from_slice(&registry.get_blob(repo, meta["digest"].as_str().unwrap())).unwrap();
    assert!(meta[device::machine_arch()]["layers"].is_object(), "{meta}");
    for entry in manifest["manifests"].as_array().into_iter().flatten() {
        let digest = entry["digest"].as_str().unwrap();
        let (index, _) = registry.get_manifest(repo, digest);
        assert_eq!(sha256_digest(&index), digest);
    }
    let bundle_digest = bundle["digest"].as_str().unwrap();
    let bytes = registry.get_blob(repo, bundle_digest);
    assert_eq!(sha256_digest(&bytes), bundle_digest);
    let mut files = BTreeMap::new();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut body).unwrap();
        files.insert(path, body);
    }
    let index_digest = bundle["annotations"]["org.foundries.app.bundle.index.digest"]
        .as_str()
        .unwrap();
    let index: BTreeMap<String, String> =
        serde_json::from_slice(&registry.get_blob(repo, index_digest)).unwrap();
    for (path, body) in &files {
        assert_eq!(index.get(path), Some(&sha256_digest(body)), "{path}");
    }
    let compose = files
        .get("docker-compose.yml")
        .unwrap_or_else(|| panic!("no docker-compose.yml in {:?}", files.keys()));
    // Decoded as Go's yaml.v3 decodes it.
    let compose: Value = serde_saphyr::from_str_with_options(
        std::str::from_utf8(compose).unwrap(),
        stowage::app::compose_file::yaml_options(),
    )
    .unwrap();
    for (service, def) in compose["services"].as_object().unwrap() {
        let hash = def["labels"][CONFIG_HASH].as_str().unwrap_or_default();
        assert!(
            hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "service {service}: {def}"
        );
    }
    compose
}

#[test]
fn what_stowage_publishes_reads_as_composectl_reads_it() {
    let registry = Registry::start();
    let name = unique("fio-pub");
    let base = format!("{name}-base:1");
    let _base = busybox_image(&base);
    let image = format!("{}/{name}/base:1", registry.host());
    push_image(&base, &image);
    // A project whose compose file is compose.yaml, published with -f from
    // elsewhere: the project directory is the file's.
    let project = temp_dir("fio-project-");
    let app_dir = project.path().join("deploy");
    std::fs::create_dir_all(app_dir.join("conf")).unwrap();
    std::fs::write(app_dir.join("conf/app.conf"), "x=1\n").unwrap();
    let original = format!(
        "services:\n  web:\n    image: {image}\n    build: ./web\n    labels:\n      - team=edge\n    environment:\n      FLAG: yes\n  db:\n    image: {image}\n    command: [\"sleep\", \"3600\"]\n"
    );
    std::fs::write(app_dir.join("compose.yaml"), &original).unwrap();
    let cache = temp_dir("fio-cache-");
    let out = run_ok(
        stowage()
            .current_dir(project.path())
            .args(["publish", "-f", "deploy/compose.yaml"])
            .args(["--insecure-registry", &registry.host()])
            .arg("--cache-dir")
            .arg(cache.path())
            .arg(format!("{}/{name}/app:v1", registry.host())),
    );
    assert!(
        out.lines().last().unwrap_or("").contains("@sha256:"),
        "{out}"
    );
    assert!(!out.contains("refuses the optional"), "{out}");

    let compose = composectl_reads(&registry, &format!("{name}/app"), "v1");
    let (bytes, _) = registry.get_manifest(&format!("{name}/app"), "v1");
    let manifest: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(manifest.get("manifests").is_none(), "{manifest}");
    let web = &compose["services"]["web"];
    assert_eq!(web["labels"]["team"], "edge", "{web}");
    assert_eq!(
        web["environment"]["FLAG"], "yes",
        "a string stays a string: {web}"
    );
    assert!(web.get("build").is_none(), "{web}");

    // The hash is composectl's: yaml.v3 of the service as pinned, before
    // the label (its list of labels as written).
    let doc: Value =
        serde_saphyr::from_str_with_options(&original, stowage::app::compose_file::yaml_options())
            .unwrap();
    let mut svc = doc["services"]["web"].as_object().unwrap().clone();
    svc.remove("build");
    svc.insert("image".into(), web["image"].clone());
    assert_eq!(
        web["labels"][CONFIG_HASH].as_str().unwrap(),
        stowage::app::compose_file::service_config_hash(&svc)
    );
}

#[test]
fn several_compose_files_are_refused_naming_the_way_to_merge_them() {
    let dir = temp_dir("fio-two-");
    std::fs::write(dir.path().join("a.yml"), "services: {}\n").unwrap();
    std::fs::write(dir.path().join("b.yml"), "services: {}\n").unwrap();
    let out = run_fails(stowage().current_dir(dir.path()).args([
        "publish",
        "-f",
        "a.yml",
        "-f",
        "b.yml",
        "127.0.0.1:1/x/app:v1",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("docker-compose -f a.yml -f b.yml config > docker-compose.yml"),
        "{err}"
    );
}

/// Writes `docker-credential-NAME` into `bin`: it logs the server it is
/// asked for and answers with `answer` (or fails with `fail`).
fn write_helper(bin: &Path, name: &str, log: &Path, answer: Result<(&str, &str), &str>) {
    let script = match answer {
        Ok((user, secret)) => format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 3\nread -r server\necho \"$server\" >> '{}'\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{secret}\"}}' \"$server\"\n",
            log.display()
        ),
        Err(message) => format!(
            "#!/bin/sh\nread -r server\necho \"$server\" >> '{}'\necho '{message}'\nexit 1\n",
            log.display()
        ),
    };
    let path = bin.join(format!("docker-credential-{name}"));
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn credential_helpers_are_consulted_as_docker_consults_them() {
    let registry = Registry::start_with(RegistryOptions {
        htpasswd: Some(("ci".into(), "s3cret".into())),
        tls: false,
    });
    let host = registry.host();
    let name = unique("helper");
    let base = format!("{name}-base:1");
    let _base = busybox_image(&base);
    let image = format!("{host}/{name}/base:1");
    push_image(&base, &image);
    let app = temp_dir("helper-app-");
    write_app(
        app.path(),
        &format!("services:\n  db:\n    image: {image}\n"),
    );

    let bin = temp_dir("helper-bin-");
    let log = bin.path().join("asked");
    write_helper(bin.path(), "good", &log, Ok(("ci", "s3cret")));
    write_helper(bin.path(), "wrong", &log, Ok(("ci", "nope")));
    write_helper(
        bin.path(),
        "empty",
        &log,
        Err("credentials not found in native keychain"),
    );
    write_helper(bin.path(), "broken", &log, Err("the keyring is locked"));
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let publish = |config: Value, tag: &str| {
        let dir = temp_dir("helper-cfg-");
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let mut cmd = stowage();
        cmd.env("DOCKER_CONFIG", dir.path())
            .env("PATH", &path)
            .args(["publish", "--dir"])
            .arg(app.path())
            .args(["--insecure-registry", &host])
            .arg("--cache-dir")
            .arg(app.path().join(".cache"))
            .arg(format!("{host}/{name}/app:{tag}"));
        (run_output(&mut cmd), dir)
    };

    // credsStore: the helper is asked for this host, on its stdin.
    let (out, _d) = publish(json!({"credsStore": "good"}), "v1");
    assert!(out.status.success(), "{}", say(&out));
    let asked = std::fs::read_to_string(&log).unwrap();
    assert!(asked.lines().all(|l| l == host), "{asked}");
    assert!(!asked.is_empty());

    // credHelpers for this host wins over credsStore and auths.
    let config: Value = serde_json::from_str(&format!(
        r#"{{"credsStore":"good","credHelpers":{{"{host}":"wrong"}},"auths":{{"{host}":{{"auth":"Y2k6czNjcmV0"}}}}}}"#
    ))
    .unwrap();
    let (out, _d) = publish(config, "v2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("refused the credentials"),
        "{}",
        say(&out)
    );

    // A helper with nothing stored: no credentials, as docker says.
    let (out, _d) = publish(json!({"credsStore": "empty"}), "v3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("requires credentials"),
        "{}",
        say(&out)
    );

    // A failing or missing helper is named.
    let (out, _d) = publish(json!({"credsStore": "broken"}), "v4");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("docker-credential-broken")
            && err.contains("the keyring is locked"),
        "{}",
        say(&out)
    );
    let (out, _d) = publish(json!({"credsStore": "absent"}), "v5");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("docker-credential-absent"),
        "{}",
        say(&out)
    );

    // A registry that asks for nothing never runs the helper.
    let open = Registry::start();
    std::fs::write(&log, "").unwrap();
    let open_image = format!("{}/{name}/base:1", open.host());
    push_image(&base, &open_image);
    let open_app = temp_dir("helper-open-");
    write_app(
        open_app.path(),
        &format!("services:\n  db:\n    image: {open_image}\n"),
    );
    let dir = temp_dir("helper-cfg-");
    std::fs::write(dir.path().join("config.json"), r#"{"credsStore":"broken"}"#).unwrap();
    run_ok(
        stowage()
            .env("DOCKER_CONFIG", dir.path())
            .env("PATH", &path)
            .args(["publish", "--dir"])
            .arg(open_app.path())
            .args(["--insecure-registry", &open.host()])
            .arg("--cache-dir")
            .arg(open_app.path().join(".cache"))
            .arg(format!("{}/{name}/app:v1", open.host())),
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "");
}

/// `docker-compose config` of the project in `dir` with `files`, as YAML
/// decoded, without what publishing changes on purpose (images pinned and
/// then pointed at local tags, `build` dropped, the config-hash label), and
/// with the directory's path replaced by `<dir>`.
fn effective_config(dir: &Path, files: &[&str]) -> Value {
    let mut cmd = std::process::Command::new("docker-compose");
    cmd.current_dir(dir)
        .env_remove("GREETING")
        .env_remove("FROM_DOTENV")
        .env_remove("WEB_IMAGE");
    for f in files {
        cmd.args(["-f", f]);
    }
    let text = run_ok(cmd.arg("config"));
    let text = text.replace(&dir.display().to_string(), "<dir>");
    let mut config: Value = serde_saphyr::from_str(&text).unwrap();
    for (_, def) in config["services"].as_object_mut().unwrap() {
        let def = def.as_object_mut().unwrap();
        def.remove("image");
        def.remove("build");
        if let Some(labels) = def.get_mut("labels").and_then(Value::as_object_mut) {
            labels.remove(CONFIG_HASH);
            if labels.is_empty() {
                def.remove("labels");
            }
        }
    }
    config
}

#[test]
fn compose_conventions_survive_publish_and_run_as_compose_runs_them() {
    let mut registry = Registry::start();
    let host = registry.host();
    let name = unique("conv");
    let base = format!("{name}-base:1");
    let _base = busybox_image(&base);
    let image = format!("{host}/{name}/base:1");
    push_image(&base, &image);

    // .env and env_file, ${VAR:-default}, build+image, configs and secrets
    // from files, a bind mount of a file of the app, depends_on with a
    // condition, extends from another file, a service behind a profile.
    let project = temp_dir("conv-project-");
    let p = project.path();
    std::fs::create_dir_all(p.join("web")).unwrap();
    std::fs::create_dir_all(p.join("data")).unwrap();
    std::fs::write(p.join(".env"), "FROM_DOTENV=dotenv\n").unwrap();
    std::fs::write(p.join("web.env"), "GREETING_FILE=from-env-file\n").unwrap();
    std::fs::write(p.join("app.conf"), "conf\n").unwrap();
    std::fs::write(p.join("token.txt"), "tok\n").unwrap();
    std::fs::write(p.join("data/file.txt"), "data\n").unwrap();
    std::fs::write(p.join("web/Dockerfile"), "FROM scratch\n").unwrap();
    std::fs::write(
        p.join("common.yml"),
        format!("services:\n  base:\n    image: {image}\n    command: [\"sleep\", \"3600\"]\n    network_mode: none\n"),
    )
    .unwrap();
    std::fs::write(
        p.join("docker-compose.yml"),
        format!(
            r#"services:
  web:
    image: ${{WEB_IMAGE:-{image}}}
    build: ./web
    env_file: web.env
    environment:
      GREETING: ${{GREETING:-hello}}
      FROM_DOTENV: ${{FROM_DOTENV}}
    command: ["sh", "-c", "cat /run/secrets/token /data/file.txt && echo $$GREETING $$FROM_DOTENV $$GREETING_FILE && sleep 3600"]
    configs:
      - source: appconf
        target: /etc/app.conf
    secrets:
      - token
    volumes:
      - ./data/file.txt:/data/file.txt:ro
    depends_on:
      db:
        condition: service_healthy
    network_mode: none
  db:
    extends:
      file: common.yml
      service: base
    healthcheck:
      test: ["CMD", "true"]
      interval: 1s
  debug:
    image: {image}
    profiles: ["debug"]
    command: ["sleep", "3600"]
    network_mode: none
configs:
  appconf:
    file: ./app.conf
secrets:
  token:
    file: ./token.txt
"#
        ),
    )
    .unwrap();
    let cache = temp_dir("conv-cache-");
    let out = run_ok(
        stowage()
            .env_remove("GREETING")
            .env_remove("WEB_IMAGE")
            .args(["publish", "-f"])
            .arg(p.join("docker-compose.yml"))
            .args(["--insecure-registry", &host])
            .arg("--cache-dir")
            .arg(cache.path())
            .arg(format!("{host}/{name}:v1")),
    );
    let app = out.lines().last().unwrap_or("").trim().to_string();
    assert!(app.contains("@sha256:"), "{out}");

    let work = temp_dir("conv-device-");
    let dockerd = PrivateDockerd::start(&work.path().join("docker"));
    let device = Device {
        root: work.path().join("root"),
        registry: host.clone(),
        docker_host: dockerd.host(),
        config: lenient_config(work.path()),
    };
    device.ok(&["pull", &app]);
    registry.stop();
    let report = device.json(&["install", &name]);
    let dir = Path::new(report["dir"].as_str().unwrap()).to_path_buf();

    // The same effective configuration as the original project's.
    let original = effective_config(p, &["docker-compose.yml"]);
    let installed = effective_config(&dir, &["docker-compose.yml", ".stowage-images.yml"]);
    assert_eq!(installed, original);

    // And it runs so: the profiled service stays down, the app runs.
    device.ok(&["run", &name]);
    let ps = device.json(&["ps"]);
    let state = app_state(&ps, &name);
    assert_eq!(state["state"], "running", "{ps}");
    let web = service_container(&mut dockerd.docker(), &name, "web");
    let logs = run_ok(dockerd.docker().args(["logs", &web]));
    assert!(
        logs.contains("tok")
            && logs.contains("data")
            && logs.contains("hello dotenv from-env-file"),
        "{logs}"
    );
    device.ok(&["stop", &name]);
}

#[test]
fn a_service_with_only_build_is_refused_clearly() {
    let dir = temp_dir("conv-build-");
    std::fs::write(
        dir.path().join("docker-compose.yml"),
        "services:\n  web:\n    build: ./web\n",
    )
    .unwrap();
    let out = run_fails(
        stowage()
            .args(["publish", "--dry-run", "--dir"])
            .arg(dir.path())
            .arg("127.0.0.1:1/x/app:v1"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("service web") && err.contains("build-only services cannot be published"),
        "{err}"
    );
}
