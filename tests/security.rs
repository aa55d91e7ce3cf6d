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

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;
use serde_json::Value;

/// Incompressible bytes, the same for the same seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

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

/// A local image tag removed again when the test ends.
struct LocalImage(String);

impl Drop for LocalImage {
    fn drop(&mut self) {
        remove_image(&self.0);
    }
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
        busybox_image(&base);
        let image = LocalImage(base.clone());
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
