//! Hostile input must not harm the device: a crafted bundle, lying
//! layers-meta, a crafted offline medium, a registry that stalls. Each
//! attack is pushed to the test registry (or written as a medium) and the
//! device is shown to refuse it with a sentence naming what is at fault,
//! with no file outside its root and the app directory changed (content,
//! mode, owner), and nothing left in `ingest/` or the apps directory.
//!
//! Installs here use the machine's dockerd: every attack is refused before
//! an image is loaded, and what an honest install loads is removed by
//! [`AppCleanup`].

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::common::device as support;
use crate::common::hostile;
use crate::common::*;
use serde_json::Value;

/// What a file is, for [`snapshot`]: kind, content or link target, mode, uid, gid.
type FileState = (char, Vec<u8>, u32, u32, u32);

/// Every entry under `dir` (itself included), not following links.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, FileState> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let (kind, content) = if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
            ('d', Vec::new())
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).unwrap_or_default();
            ('l', target.into_os_string().into_encoded_bytes())
        } else {
            ('f', std::fs::read(&path).unwrap_or_default())
        };
        out.insert(
            path,
            (
                kind,
                content,
                meta.permissions().mode(),
                meta.uid(),
                meta.gid(),
            ),
        );
    }
    out
}

/// Files a victim of a write through a link would lose: a shell profile
/// and a directory, owned by someone else, beside the device's root.
fn plant_victims(work: &Path) -> PathBuf {
    let victim = work.join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("profile"), b"# the user's shell profile\n").unwrap();
    std::fs::set_permissions(
        victim.join("profile"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::chown(victim.join("profile"), Some(1234), Some(4321)).unwrap();
    std::fs::create_dir(victim.join("dir")).unwrap();
    std::fs::set_permissions(victim.join("dir"), std::fs::Permissions::from_mode(0o755)).unwrap();
    victim
}

/// One bundle entry: name, kind, link target, content.
type Entry = (String, tar::EntryType, String, Vec<u8>);

fn file(name: &str, content: impl Into<Vec<u8>>) -> Entry {
    (
        name.to_string(),
        tar::EntryType::Regular,
        String::new(),
        content.into(),
    )
}

fn symlink(name: &str, target: &str) -> Entry {
    (
        name.to_string(),
        tar::EntryType::Symlink,
        target.to_string(),
        Vec::new(),
    )
}

fn directory(name: &str) -> Entry {
    (
        format!("{name}/"),
        tar::EntryType::Directory,
        String::new(),
        Vec::new(),
    )
}

/// A bundle (tar.gz, raw headers as a hostile publisher writes them) and
/// its index.
fn hostile_bundle(entries: &[Entry]) -> (Vec<u8>, Vec<u8>) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut index = serde_json::Map::new();
    for (name, kind, link, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_mode(if *kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_size(data.len() as u64);
        header.set_cksum();
        tar.append(&header, data.as_slice()).unwrap();
        if *kind == tar::EntryType::Regular {
            index.insert(name.clone(), Value::String(sha256_digest(data)));
        }
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar.into_inner().unwrap()).unwrap();
    (
        gz.finish().unwrap(),
        serde_json::to_vec(&Value::Object(index)).unwrap(),
    )
}

/// An honest app of one busybox service on the test registry, whose
/// manifest crafted apps are made from.
struct Template {
    registry: Registry,
    name: String,
    repo: String,
    manifest: Value,
    media_type: String,
    /// The pinned compose file the honest bundle carries.
    compose: String,
    _image: LocalImage,
}

impl Template {
    /// Publishes app `HOST/NAME/app:good` from a directory holding `files`
    /// beside its compose file.
    fn publish(prefix: &str, files: &[(&str, Vec<u8>)]) -> Template {
        let registry = Registry::start();
        let name = unique(prefix);
        let host = registry.host();
        let base = format!("{name}-base:1");
        let image = busybox_image(&base);
        let svc = format!("{host}/{name}/svc:1");
        push_image(&base, &svc);
        let dir = temp_dir("security-app-");
        write_app(
            dir.path(),
            &format!("services:\n  svc:\n    image: {svc}\n    network_mode: none\n"),
        );
        for (path, bytes) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        let cache = temp_dir("security-cache-");
        run_ok(
            stowage()
                .arg("publish")
                .arg("--dir")
                .arg(dir.path())
                .arg("--cache-dir")
                .arg(cache.path())
                .args(["--insecure-registry", &host])
                .arg(format!("{host}/{name}/app:good")),
        );
        let repo = format!("{name}/app");
        let (bytes, media_type) = registry.get_manifest(&repo, "good");
        let manifest: Value = serde_json::from_slice(&bytes).unwrap();
        let bundle = registry.get_blob(&repo, manifest["layers"][0]["digest"].as_str().unwrap());
        let mut compose = String::new();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bundle.as_slice()));
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.path().unwrap().to_string_lossy() == "docker-compose.yml" {
                std::io::Read::read_to_string(&mut entry, &mut compose).unwrap();
            }
        }
        assert!(compose.contains("@sha256:"), "{compose}");
        Template {
            registry,
            name,
            repo,
            manifest,
            media_type,
            compose,
            _image: image,
        }
    }

    fn host(&self) -> String {
        self.registry.host()
    }

    fn good(&self) -> String {
        let (bytes, _) = self.registry.get_manifest(&self.repo, "good");
        format!("{}/{}@{}", self.host(), self.repo, sha256_digest(&bytes))
    }

    /// Pushes the app with this bundle instead (tagged `tag`); returns its
    /// reference by digest.
    fn with_bundle(&self, tag: &str, entries: &[Entry]) -> String {
        let (bundle, index) = hostile_bundle(entries);
        let bundle_digest = self.registry.upload_blob(&self.repo, &bundle);
        let index_digest = self.registry.upload_blob(&self.repo, &index);
        let mut manifest = self.manifest.clone();
        manifest["layers"][0]["digest"] = Value::String(bundle_digest);
        manifest["layers"][0]["size"] = Value::from(bundle.len());
        let annotations = &mut manifest["layers"][0]["annotations"];
        annotations["org.foundries.app.bundle.index.digest"] = Value::String(index_digest);
        annotations["org.foundries.app.bundle.index.size"] = Value::String(index.len().to_string());
        let digest = self.registry.put_manifest(
            &self.repo,
            tag,
            &self.media_type,
            &serde_json::to_vec(&manifest).unwrap(),
        );
        format!("{}/{}@{digest}", self.host(), self.repo)
    }

    fn cleanup(&self) -> AppCleanup {
        AppCleanup::for_app(&self.host(), &self.name)
    }
}

/// A device root in `work/root`, on the machine's dockerd.
struct Device {
    root: PathBuf,
    host: String,
}

impl Device {
    fn stowage(&self, args: &[&str]) -> Command {
        let mut cmd = stowage_on(&self.root, &self.host, args);
        cmd.env_remove("DOCKER_HOST").env_remove("STOWAGE_ROOT");
        cmd
    }

    fn names_in(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join(dir))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// The command failed with exit 1 and said every one of `what`.
fn refused_saying(out: &Output, what: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", say(out));
    for w in what {
        assert!(stderr.contains(w), "the error names {w:?}:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `d0/d1/.../d11` and, at its bottom, `l` linking up to the bundle's root:
/// a link that stays inside, and the means to leave through it.
fn deep_link() -> (Vec<Entry>, String) {
    let deep = (0..12)
        .map(|i| format!("d{i}"))
        .collect::<Vec<_>>()
        .join("/");
    let up = [".."; 12].join("/");
    (
        vec![directory(&deep), symlink(&format!("{deep}/l"), &up)],
        format!("{deep}/l"),
    )
}

#[test]
fn a_bundle_aiming_stowage_writes_outside_the_app_directory_is_refused_and_nothing_changes() {
    let app = Template::publish("sec-bundle", &[]);
    let _cleanup = app.cleanup();
    let work = temp_dir("security-bundle-");
    let victim = plant_victims(work.path());
    let before = snapshot(&victim);
    let device = Device {
        root: work.path().join("root"),
        host: app.host(),
    };
    let compose = || file("docker-compose.yml", app.compose.clone());
    let (deep, l) = deep_link();
    // From the app directory (ROOT/apps/APP), `l/../../..` is the test's
    // work directory, beside the device's root.
    let to_victim = format!("{l}/../../../victim");

    let cases: Vec<(&str, Vec<Entry>, Vec<&str>)> = vec![
        // The temporary name the override was written under, as a link to
        // the verified compose file.
        (
            "tmp-to-compose",
            vec![
                compose(),
                symlink(".stowage-images.yml.tmp", "docker-compose.yml"),
            ],
            vec![".stowage-images.yml.tmp", "stowage keeps"],
        ),
        // The override's own name, as a link to a shell profile reached
        // through links whose text stays inside.
        (
            "override-to-profile",
            [
                vec![compose()],
                deep.clone(),
                vec![
                    symlink("x", &to_victim),
                    symlink(".stowage-images.yml", "x/profile"),
                ],
            ]
            .concat(),
            vec![".stowage-"],
        ),
        // The bundle marker, as a file of the bundle.
        (
            "marker",
            vec![compose(), file(".stowage-bundle", "sha256:0\n")],
            vec![".stowage-bundle", "stowage keeps"],
        ),
        // A link whose text stays inside but which, followed on disk
        // through the deep link, leaves the directory.
        (
            "through-a-link",
            [
                vec![compose()],
                deep.clone(),
                vec![symlink("x", &to_victim)],
            ]
            .concat(),
            vec!["x", "through the link", &l],
        ),
        (
            "through-a-link-first",
            [vec![compose(), symlink("x", &to_victim)], deep.clone()].concat(),
            vec!["through the link"],
        ),
    ];
    for (tag, entries, said) in cases {
        let reference = app.with_bundle(tag, &entries);
        run_ok(&mut device.stowage(&["pull", &reference]));
        let out = run_output(&mut device.stowage(&["install", &reference]));
        refused_saying(&out, &said);
        assert_eq!(
            device.names_in("apps"),
            Vec::<String>::new(),
            "{tag}: nothing left in the apps directory"
        );
        assert_eq!(device.names_in("ingest"), Vec::<String>::new(), "{tag}");
        assert!(
            !device.root.join("state/installed.json").exists(),
            "{tag}: nothing recorded"
        );
        assert_eq!(snapshot(&victim), before, "{tag}: a file outside changed");
        run_ok(&mut device.stowage(&["rm", &reference]));
    }

    // The honest app still installs, and its directory holds what stowage
    // wrote as plain files.
    run_ok(&mut device.stowage(&["pull", &app.good()]));
    run_ok(&mut device.stowage(&["install", &app.good()]));
    let dir = device.root.join("apps").join("app");
    for name in [
        ".stowage-images.yml",
        ".stowage-bundle",
        "docker-compose.yml",
    ] {
        let meta = std::fs::symlink_metadata(dir.join(name)).unwrap();
        assert!(meta.is_file(), "{name}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("docker-compose.yml")).unwrap(),
        app.compose
    );
    assert_eq!(snapshot(&victim), before);
}

#[test]
fn an_install_killed_while_it_extracts_leaves_nothing_behind_once_run_again() {
    // Tens of MB of bundle, in files that are each fsynced: the extraction
    // takes long enough to be caught in the act.
    let files: Vec<(String, Vec<u8>)> = (0..48)
        .map(|i| (format!("data/part{i:02}.bin"), noise(i, 1 << 20)))
        .collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let app = Template::publish("sec-kill", &files);
    let _cleanup = app.cleanup();
    let work = temp_dir("security-kill-");
    let device = Device {
        root: work.path().join("root"),
        host: app.host(),
    };
    let reference = app.good();
    run_ok(&mut device.stowage(&["pull", &reference]));
    let apps = device.root.join("apps");

    let mut caught = false;
    for _attempt in 0..5 {
        let mut install = device.stowage(&["install", &reference]);
        let mut child = install
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The staging directory holding a file: extraction is under way.
        let extracting = || {
            std::fs::read_dir(&apps).ok().and_then(|entries| {
                entries.flatten().find_map(|e| {
                    let data = e.path().join("data");
                    let started = e.file_name().to_string_lossy().starts_with('.')
                        && std::fs::read_dir(&data).is_ok_and(|mut d| d.next().is_some());
                    started.then(|| e.path())
                })
            })
        };
        let mut staging = None;
        while staging.is_none() {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            staging = extracting();
            std::thread::yield_now();
        }
        send_kill(&mut child);
        if staging.as_ref().is_some_and(|s| s.exists()) {
            caught = true;
            break;
        }
        // Too late: it finished. Start from nothing and try again.
        let _ = std::fs::remove_dir_all(&apps);
        let _ = std::fs::remove_file(device.root.join("state/installed.json"));
    }
    assert!(caught, "install was never caught extracting");

    let out = run_ok(&mut device.stowage(&["install", &reference]));
    assert_eq!(device.names_in("apps"), ["app"], "{out}");
    let data = std::fs::read_dir(apps.join("app/data")).unwrap().count();
    assert_eq!(data, 48);
}

fn send_kill(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

// ---- Lying layers-meta ----

/// Hashes what is written through it (the diff_id of a tar being gzip'd).
struct Hashing<W> {
    inner: W,
    hasher: sha2::Sha256,
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A layer's gzip'd blob and its diff_id, made by streaming: `zeros` is
/// one file of that many zero bytes, `empty_files` that many empty files.
fn crafted_layer(zeros: u64, empty_files: usize) -> (Vec<u8>, String) {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(Hashing {
        inner: gz,
        hasher: <sha2::Sha256 as sha2::Digest>::new(),
    });
    let header = |size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        h
    };
    if zeros > 0 {
        tar.append_data(
            &mut header(zeros),
            "zeros.bin",
            std::io::Read::take(std::io::repeat(0), zeros),
        )
        .unwrap();
    }
    for i in 0..empty_files {
        tar.append_data(&mut header(0), format!("e/{i}"), std::io::empty())
            .unwrap();
    }
    let hashing = tar.into_inner().unwrap();
    let diff_id = format!(
        "sha256:{}",
        hex::encode(sha2::Digest::finalize(hashing.hasher))
    );
    (hashing.inner.finish().unwrap(), diff_id)
}

/// Pushes an image of these layers as `HOST/REPO:1` (Docker v2 manifest).
fn push_crafted_image(registry: &Registry, repo: &str, layers: &[(Vec<u8>, String)]) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["sleep", "3600"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>()},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = registry.upload_blob(repo, &config);
    let layer_descriptors: Vec<Value> = layers
        .iter()
        .map(|(blob, _)| {
            serde_json::json!({
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": blob.len(),
                "digest": registry.upload_blob(repo, blob),
            })
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": config.len(),
            "digest": config_digest,
        },
        "layers": layer_descriptors,
    });
    registry.put_manifest(
        repo,
        "1",
        "application/vnd.docker.distribution.manifest.v2+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
}

/// An app of one crafted image, published honestly; its layers-meta is
/// then rewritten by each case.
struct MetaApp<'a> {
    registry: &'a Registry,
    repo: String,
    manifest: Value,
    media_type: String,
    /// The honest layers-meta.
    meta: Value,
    /// The image's layer blob digests.
    layers: Vec<String>,
}

impl<'a> MetaApp<'a> {
    /// Publishes `HOST/NAME/APP:honest`, its image `HOST/NAME/APP-svc:1`.
    fn publish(
        registry: &'a Registry,
        name: &str,
        app: &str,
        layers: &[(Vec<u8>, String)],
    ) -> MetaApp<'a> {
        let host = registry.host();
        let image_repo = format!("{name}/{app}-svc");
        push_crafted_image(registry, &image_repo, layers);
        let dir = temp_dir("security-meta-app-");
        write_app(
            dir.path(),
            &format!(
                "services:\n  svc:\n    image: {host}/{image_repo}:1\n    network_mode: none\n"
            ),
        );
        let cache = temp_dir("security-meta-cache-");
        run_ok(
            stowage()
                .arg("publish")
                .arg("--dir")
                .arg(dir.path())
                .arg("--cache-dir")
                .arg(cache.path())
                .args(["--insecure-registry", &host])
                .arg(format!("{host}/{name}/{app}:honest")),
        );
        let repo = format!("{name}/{app}");
        let (bytes, media_type) = registry.get_manifest(&repo, "honest");
        let manifest: Value = serde_json::from_slice(&bytes).unwrap();
        let meta_digest = manifest["layers"][1]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let meta: Value = serde_json::from_slice(&registry.get_blob(&repo, &meta_digest)).unwrap();
        let layers = layers.iter().map(|(blob, _)| sha256_digest(blob)).collect();
        MetaApp {
            registry,
            repo,
            manifest,
            media_type,
            meta,
            layers,
        }
    }

    /// Pushes the app with its layers-meta changed by `lie` (given each
    /// architecture's `layers` map); returns its reference by digest.
    fn lying(&self, tag: &str, lie: impl Fn(&mut serde_json::Map<String, Value>)) -> String {
        let mut meta = self.meta.clone();
        for (_, arch) in meta.as_object_mut().unwrap() {
            lie(arch["layers"].as_object_mut().unwrap());
        }
        let bytes = serde_json::to_vec(&meta).unwrap();
        let digest = self.registry.upload_blob(&self.repo, &bytes);
        let mut manifest = self.manifest.clone();
        manifest["layers"][1]["digest"] = Value::String(digest);
        manifest["layers"][1]["size"] = Value::from(bytes.len());
        let digest = self.registry.put_manifest(
            &self.repo,
            tag,
            &self.media_type,
            &serde_json::to_vec(&manifest).unwrap(),
        );
        format!("{}/{}@{digest}", self.registry.host(), self.repo)
    }
}

/// The lowest free bytes (`f_bavail`) and free inodes of a volume, sampled
/// on a thread until [`Sampler::finish`]: what a test asserts is the
/// minimum it saw, not when it saw it.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64, u64)>>,
}

impl Sampler {
    fn start(path: &Path) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let path = path.to_path_buf();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut bytes, mut inodes, mut samples) = (u64::MAX, u64::MAX, 0);
            loop {
                let stats = fs_stats(&path);
                bytes = bytes.min(stats.available_bytes());
                inodes = inodes.min(stats.inodes_free);
                samples += 1;
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return (bytes, inodes, samples);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// The lowest free bytes and inodes seen.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (bytes, inodes, samples) = self.thread.take().unwrap().join().unwrap();
        assert!(samples > 1, "the sampler ran");
        (bytes, inodes)
    }
}

#[test]
fn layers_meta_that_lies_cannot_fill_dockers_volume() {
    const MIB: u64 = 1 << 20;
    let registry = Registry::start();
    let host = registry.host();
    let name = unique("sec-meta");
    // One big file of zeros: a tiny download, 400 MiB on disk.
    let big = MetaApp::publish(&registry, &name, "big", &[crafted_layer(400 * MIB, 0)]);
    // 40,000 empty files: no blocks, but inodes; and a small layer.
    let many = MetaApp::publish(
        &registry,
        &name,
        "many",
        &[crafted_layer(0, 40_000), crafted_layer(4096, 0)],
    );
    let zeros = big.layers[0].clone();
    let (files, small) = (many.layers[0].clone(), many.layers[1].clone());

    // Docker's volume: 512 MiB with 30,000 inodes, of which the policy keeps
    // 200 MiB free: it cannot hold the 400 MiB unpacked layer (the engine's
    // temporary copy is the tiny gzip blob: install hands it over as stored).
    let volume = LoopVolume::with_options(512, 4096, Some(30_000));
    let dockerd = PrivateDockerd::start(&volume.path().join("docker"));
    let total = volume.stats().total_bytes();
    let reserve = (200 * MIB).max(total / 100);
    let work = temp_dir("security-meta-");
    let mut roots = 0;
    let mut fresh_root = || {
        roots += 1;
        work.path().join(format!("root{roots}"))
    };
    let stowage_in = |root: &Path, args: &[&str]| {
        let mut cmd = stowage_on(root, &host, args);
        cmd.env("DOCKER_HOST", dockerd.host())
            .env_remove("STOWAGE_ROOT");
        cmd
    };
    let images = || {
        run_ok(dockerd.docker().args(["images", "-q"]))
            .lines()
            .count()
    };

    let set = |layers: &mut serde_json::Map<String, Value>, digest: &str, key: &str, v: u64| {
        let layer = layers[digest].as_object_mut().unwrap();
        layer.insert(key.into(), Value::from(v));
        if key == "usage" {
            layer.insert(
                "usage_by_block_size".into(),
                serde_json::json!({"1024": v, "4096": v, "16384": v, "65536": v}),
            );
        }
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "usage",
            big.lying("usage", |l| set(l, &zeros, "usage", 4096)),
            vec![&zeros, "bytes"],
        ),
        (
            "missing",
            big.lying("missing", |l| {
                l.remove(&zeros);
            }),
            vec![&zeros, "bytes"],
        ),
        (
            "inodes",
            many.lying("inodes", |l| set(l, &files, "inodes", 1)),
            vec![&files, "inodes"],
        ),
    ];
    for (case, reference, said) in cases {
        let root = fresh_root();
        run_ok(&mut stowage_in(&root, &["pull", &reference]));
        // The check believes it fits.
        run_ok(&mut stowage_in(
            &root,
            &["check", "--reserve", "200M", &reference],
        ));
        let sampler = Sampler::start(volume.path());
        let out = run_output(&mut stowage_in(
            &root,
            &["install", "--reserve", "200M", &reference],
        ));
        let (lowest, lowest_inodes) = sampler.finish();
        refused_saying(&out, &said);
        assert!(
            lowest >= reserve,
            "{case}: Docker's volume fell to {lowest} bytes free, below the reserve of {reserve}"
        );
        assert!(
            lowest_inodes > 10_000,
            "{case}: {lowest_inodes} inodes left"
        );
        assert_eq!(images(), 0, "{case}: nothing loaded");
        let ingest: Vec<_> = std::fs::read_dir(root.join("ingest"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(ingest.is_empty(), "{case}: {ingest:?}");
        let apps: Vec<String> = std::fs::read_dir(root.join("apps"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(apps.is_empty(), "{case}: {apps:?}");

        // What install measured is kept with the blob: the check now
        // counts the truth, and says it does not fit.
        let out = run_output(&mut stowage_in(
            &root,
            &["check", "--reserve", "200M", &reference],
        ));
        assert_eq!(out.status.code(), Some(100), "{case}: {}", say(&out));
    }

    // Figures so large that their sum wraps round: refused by the check,
    // naming the layer, before anything is downloaded.
    let huge = 1u64 << 63;
    let reference = many.lying("wrap", |l| {
        for digest in [&files, &small] {
            for key in ["usage", "tar_size", "inodes", "size"] {
                set(l, digest, key, huge);
            }
        }
    });
    let root = fresh_root();
    let out = run_output(&mut stowage_in(&root, &["pull", &reference]));
    assert_eq!(out.status.code(), Some(100), "{}", say(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&files) && stderr.contains("more than the whole volume"),
        "{stderr}"
    );
    assert!(!root.join("store/blobs/sha256").join(&files[7..]).exists());
    assert_eq!(images(), 0);
}

// ---- A crafted offline medium ----

/// Runs `cmd`, killing it if it has not ended within `limit` (a medium
/// that makes stowage wait forever must fail the test, not hang it).
fn run_within(cmd: &mut Command, limit: std::time::Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{cmd:?} still ran after {limit:?}: {}", say(&out));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_crafted_medium_is_refused_without_filling_the_store_or_touching_the_medium() {
    // Bytes that do not compress, so that the layer has a real size.
    let app = Template::publish("sec-medium", &[]);
    let host = app.host();
    let work = temp_dir("security-medium-");
    let online = work.path().join("online");
    run_ok(&mut stowage_on(&online, &host, &["pull", &app.good()]));
    let medium = work.path().join("usb");
    run_ok(&mut stowage_on(
        &online,
        &host,
        &["export", &app.good(), medium.to_str().unwrap()],
    ));
    let blobs = medium.join("store/blobs/sha256");
    // The largest blob: the image's layer.
    let (layer, layer_size) = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .map(|e| (e.path(), e.metadata().unwrap().len()))
        .max_by_key(|(_, size)| *size)
        .unwrap();
    let original = std::fs::read(&layer).unwrap();

    // A device whose store is on a 64 MiB volume.
    let volume = LoopVolume::new(64);
    let reserve = volume.stats().total_bytes() / 100;
    let mut roots = 0;
    let mut pull = |what: &str| {
        roots += 1;
        let root = volume.path().join(format!("root{roots}"));
        let sampler = Sampler::start(volume.path());
        let out = run_within(
            &mut stowage_on(
                &root,
                &host,
                &["pull", &format!("oci:{}", medium.display())],
            ),
            std::time::Duration::from_secs(120),
        );
        let (lowest, _) = sampler.finish();
        assert!(
            lowest >= reserve,
            "{what}: the store's volume fell to {lowest} bytes free"
        );
        let ingest: Vec<_> = std::fs::read_dir(root.join("ingest"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(ingest.is_empty(), "{what}: left in ingest/: {ingest:?}");
        (root, out)
    };

    // The layer replaced by a sparse file of 3 GiB: refused before a byte
    // is written, nothing preallocated left behind.
    std::fs::remove_file(&layer).unwrap();
    std::fs::File::create(&layer)
        .unwrap()
        .set_len(3 << 30)
        .unwrap();
    let (_, out) = pull("sparse");
    refused_saying(&out, &["descriptor says", &layer_size.to_string()]);

    // The layer as a fifo: refused, not waited on.
    std::fs::remove_file(&layer).unwrap();
    let fifo = std::ffi::CString::new(layer.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let (_, out) = pull("fifo");
    let blob = format!("sha256:{}", layer.file_name().unwrap().to_string_lossy());
    refused_saying(&out, &[&blob, "not a regular file"]);

    // The layer as a link to a file of the right content elsewhere, and
    // the blob directory as a link: refused.
    std::fs::remove_file(&layer).unwrap();
    let elsewhere = work.path().join("elsewhere");
    std::fs::write(&elsewhere, &original).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &layer).unwrap();
    let (_, out) = pull("blob link");
    refused_saying(&out, &[&blob, "not a regular file"]);
    std::fs::remove_file(&layer).unwrap();
    std::fs::write(&layer, &original).unwrap();

    // Directories stowage would have made on the medium, as links to a
    // directory of someone else's: the medium is opened read-only, so
    // they are neither followed nor changed, and the pull works.
    let victim = plant_victims(work.path());
    let before = snapshot(&victim);
    for name in ["corrupt", "ingest"] {
        let _ = std::fs::remove_dir_all(medium.join(name));
        std::os::unix::fs::symlink(victim.join("dir"), medium.join(name)).unwrap();
    }
    let medium_before = snapshot(&medium);
    let (root, out) = pull("links beside the layout");
    assert!(out.status.success(), "{}", say(&out));
    assert!(
        std::fs::read_dir(root.join("store/blobs/sha256"))
            .unwrap()
            .count()
            > 0
    );
    assert_eq!(
        snapshot(&victim),
        before,
        "nothing outside the medium changed"
    );
    assert_eq!(snapshot(&medium), medium_before, "the medium is unchanged");

    // A link inside the layout itself is refused.
    let moved = work.path().join("moved-blobs");
    std::fs::rename(&blobs, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &blobs).unwrap();
    let (_, out) = pull("layout link");
    refused_saying(&out, &["symlink"]);
}

// ---- A slow registry ----

#[test]
fn a_slow_registry_cannot_stall_the_device() {
    use hostile::{Behaviour, HostileRegistry};
    let registry = HostileRegistry::start();
    let host = registry.host();
    let name = unique("sec-slow");
    let reference = support::publish_app(&host, &name, "v1", &[("web", 1 << 20)]);
    let app_manifest: stowage::Digest = reference.rsplit('@').next().unwrap().parse().unwrap();
    let web = registry.tag(&format!("{name}/web"), "1").unwrap();
    let (_, bytes) = registry.manifest(&format!("{name}/web"), &web).unwrap();
    let manifest: Value = serde_json::from_slice(&bytes).unwrap();
    let (layer, _) = support::image_layers_in(&manifest).last().cloned().unwrap();
    let layer: stowage::Digest = layer.parse().unwrap();
    let work = temp_dir("security-slow-");
    // Limits short enough for a test; a hang guard of its own.
    let device = |root: &Path, args: &[&str]| {
        let mut cmd = support::device(root, &host);
        cmd.env("STOWAGE_REGISTRY_TIMEOUT", "1")
            .env("STOWAGE_MIN_TRANSFER_RATE", "1M")
            .env("STOWAGE_TRANSFER_WINDOW", "0.3")
            .args(args);
        cmd
    };
    let guard = std::time::Duration::from_secs(90);

    // The app manifest dribbles out at 20 bytes a second: the check gives
    // up on it, naming the registry and the manifest.
    registry.set_manifest_behaviour(&app_manifest, Behaviour::Slow(20));
    let root = work.path().join("check");
    let out = run_within(&mut device(&root, &["check", &reference]), guard);
    refused_saying(&out, &[&host, "did not answer", "manifest"]);
    registry.set_manifest_behaviour(&app_manifest, Behaviour::Honest);

    // The layer comes at 20 kB/s, under the 1 MB/s asked for: the pull
    // stops, keeps what arrived for later, and says why.
    registry.set_blob_behaviour(&layer, Behaviour::Slow(20_000));
    let root = work.path().join("pull");
    let out = run_within(&mut device(&root, &["pull", &reference]), guard);
    refused_saying(&out, &[&layer.to_string(), "under the minimum"]);
    assert!(!support::blob_files(&root).contains_key(layer.hex()));
    let partial = support::ingest_files(&root)
        .into_iter()
        .find(|f| f.file_name().is_some_and(|n| n == layer.hex()))
        .expect("the partial download is kept");
    let kept = std::fs::metadata(&partial).unwrap().len();
    // Once the registry is fast again, the next pull resumes it.
    registry.set_blob_behaviour(&layer, Behaviour::Honest);
    registry.clear_requests();
    run_ok(&mut device(&root, &["pull", &reference]));
    assert!(support::blob_files(&root).contains_key(layer.hex()));
    let resumed = registry
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.digest.as_ref() == Some(&layer))
        .map(|r| r.range)
        .collect::<Vec<_>>();
    // (The log may still get the cut-off answer of the slow pull's last
    // attempt, which the registry ends only when it next writes.)
    if kept > 0 {
        assert!(
            resumed.contains(&Some(format!("bytes={kept}-"))),
            "resumed where it stopped: {resumed:?}"
        );
        assert!(
            !resumed.contains(&None),
            "never from the start: {resumed:?}"
        );
    }
    support::assert_fsck_clean(&root, &host);

    // The agent's cycle has a deadline of its own: a pull slow enough to
    // pass the minimum rate still cannot hold a cycle for ever.
    let target = format!("{host}/{name}/target:prod");
    run_ok(
        stowage()
            .args(["--insecure-registry", &host, "target", "publish", &target])
            .arg(&reference),
    );
    registry.set_blob_behaviour(&layer, Behaviour::Slow(40_000));
    let root = work.path().join("agent");
    let mut agent = support::device(&root, &host);
    agent.env("STOWAGE_MIN_TRANSFER_RATE", "1K").args([
        "agent",
        "--target",
        &target,
        "--once",
        "--cycle-timeout",
        "2s",
        "--interval",
        "1s",
    ]);
    let out = run_within(&mut agent, guard);
    assert_ne!(out.status.code(), Some(0), "{}", say(&out));
    let status: Value = serde_json::from_str(&run_ok(
        support::device(&root, &host).args(["--json", "status"]),
    ))
    .unwrap();
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("cycle deadline"), "{status}");
    assert!(!support::blob_files(&root).contains_key(layer.hex()));
}
