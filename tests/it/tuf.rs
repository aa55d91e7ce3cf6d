//! Signed targets (TUF): a release engineer's repository made with `stowage
//! tuf`, published to the real registry and to an export, verified by
//! devices running the agent and `update oci:DIR`, and each attack of TUF's
//! threat model that applies to stowage tried against a running device:
//! refused (exit 101), the running app untouched, no blob downloaded.
//!
//! The attacker writes to the registry with stowage's own registry client
//! and signs with tough's schema (what someone holding a stolen key would
//! do); the release engineer only uses the CLI.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::process::{Command, Output};

use crate::common::device::index_refs;
use crate::common::*;
use serde::Serialize;
use serde_json::Value;
use stowage::oci::reference::ImageRef;
use stowage::oci::registry::{RegistryClient, RegistryOptions};
use stowage::update::tuf::repo::{Destination, RepoDir, upload};
use stowage::update::tuf::transport::{RepoFile, push_file};
use tough::schema::{Hashes, Metafile, Role, Signature, Signed, Snapshot, Targets, Timestamp};
use tough::sign::Sign;

const HARDWARE: &str = "rpi4";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn client(host: &str) -> RegistryClient {
    RegistryClient::new(RegistryOptions {
        insecure: vec![host.to_string()],
        ..Default::default()
    })
    .unwrap()
}

/// The release engineer: keys in files, a repository directory, the CLI.
struct Release {
    dir: tempfile::TempDir,
    keys: tempfile::TempDir,
    host: String,
    /// REGISTRY/REPO where devices read the metadata.
    repo: String,
}

impl Release {
    fn new(host: &str, name: &str) -> Release {
        let release = Release {
            dir: temp_dir("tuf-repo-"),
            keys: temp_dir("tuf-keys-"),
            host: host.to_string(),
            repo: format!("{host}/fleet-{name}/tuf"),
        };
        for key in [
            "root-a",
            "root-b",
            "targets-a",
            "targets-b",
            "targets-c",
            "snapshot",
            "timestamp",
            "evil",
        ] {
            release.ok(&["key", "gen", release.key(key).to_str().unwrap()]);
        }
        // Two targets keys of which both must sign, held in separate files.
        release.ok(&[
            "init",
            release.path(),
            "--root-key",
            release.public("root-a").to_str().unwrap(),
            "--targets-key",
            release.public("targets-a").to_str().unwrap(),
            "--targets-key",
            release.public("targets-b").to_str().unwrap(),
            "--targets-threshold",
            "2",
            "--snapshot-key",
            release.public("snapshot").to_str().unwrap(),
            "--timestamp-key",
            release.public("timestamp").to_str().unwrap(),
        ]);
        release.sign("root", &["root-a"]);
        release
    }

    fn path(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    fn key(&self, name: &str) -> PathBuf {
        self.keys.path().join(name)
    }

    fn public(&self, name: &str) -> PathBuf {
        self.keys.path().join(format!("{name}.pub.json"))
    }

    fn tuf(&self, args: &[&str]) -> Output {
        run_output(
            stowage()
                .args(["--insecure-registry", &self.host, "tuf"])
                .args(args),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.tuf(args);
        assert!(out.status.success(), "stowage tuf {args:?}: {}", say(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn sign(&self, role: &str, keys: &[&str]) {
        for key in keys {
            // One invocation per key file: each holder signs on their own.
            self.ok(&[
                "sign",
                self.path(),
                "--role",
                role,
                "--key",
                self.key(key).to_str().unwrap(),
            ]);
        }
    }

    fn add_target(&self, name: &str, app: &str) {
        self.ok(&["add-target", self.path(), name, app, "--hardware", HARDWARE]);
    }

    fn publish_args(&self) -> Vec<String> {
        vec![
            "publish".into(),
            self.path().into(),
            "--key".into(),
            self.key("snapshot").display().to_string(),
            "--key".into(),
            self.key("timestamp").display().to_string(),
        ]
    }

    fn publish(&self) {
        let mut args = self.publish_args();
        args.extend(["--to".to_string(), self.repo.clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&args);
    }

    /// Each published role's version.
    fn versions(&self) -> HashMap<String, u64> {
        let out = self.ok(&["--json", "show", self.path()]);
        let report: Value = serde_json::from_str(&out).unwrap();
        report["roles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["role"].as_str().unwrap().to_string(),
                    r["version"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    fn metadata(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("metadata").join(file)).unwrap()
    }

    /// Puts the repository directory's files back in the registry (after
    /// an attack overwrote some).
    fn restore(&self) {
        let files = RepoDir::new(self.dir.path()).files().unwrap();
        let to = Destination::Registry(self.repo.parse().unwrap());
        runtime()
            .block_on(upload(&client(&self.host), &files, &to))
            .unwrap();
    }

    /// What an attacker with write access to the registry does: `bytes`
    /// under the name of repository file `file`.
    fn attacker_pushes(&self, file: &str, bytes: &[u8]) {
        let file = RepoFile::metadata(file)
            .or_else(|| RepoFile::target(file))
            .unwrap();
        let repo: ImageRef = self.repo.parse().unwrap();
        runtime()
            .block_on(push_file(&client(&self.host), &repo, &file, bytes))
            .unwrap();
    }

    /// Signs `role` with the key files `keys` as tough does (an attacker
    /// holding those keys); the bytes a repository file would hold.
    fn forge<T: Role + Serialize>(&self, role: T, keys: &[&str]) -> Vec<u8> {
        let data = role.canonical_form().unwrap();
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let mut signatures = Vec::new();
        for key in keys {
            let pem = pem::parse(std::fs::read(self.key(key)).unwrap()).unwrap();
            let pair = tough::sign::parse_keypair(pem.contents()).unwrap();
            let sig = runtime().block_on(pair.sign(&data, &rng)).unwrap();
            signatures.push(Signature {
                keyid: pair.tuf_key().key_id().unwrap(),
                sig: sig.into(),
            });
        }
        let mut bytes = serde_json::to_vec_pretty(&Signed {
            signed: role,
            signatures,
        })
        .unwrap();
        bytes.push(b'\n');
        bytes
    }

    fn forge_snapshot(&self, version: u64, targets: &[u8], targets_version: u64) -> Vec<u8> {
        let mut snapshot = Snapshot::new("1.0.0".into(), nz(version), in_a_day());
        snapshot
            .meta
            .insert("targets.json".into(), metafile(targets, targets_version));
        self.forge(snapshot, &["snapshot"])
    }

    fn forge_timestamp(
        &self,
        version: u64,
        snapshot: &[u8],
        snapshot_version: u64,
        expires: jiff::Timestamp,
    ) -> Vec<u8> {
        let mut timestamp = Timestamp::new("1.0.0".into(), nz(version), expires);
        timestamp
            .meta
            .insert("snapshot.json".into(), metafile(snapshot, snapshot_version));
        self.forge(timestamp, &["timestamp"])
    }

    /// The targets metadata with target `name` naming `app`, one version
    /// on, signed by `keys`; pushed with a snapshot and a timestamp signed
    /// by the (stolen) online keys.
    fn attacker_publishes_targets(&self, name: &str, app: &str, keys: &[&str]) {
        let v = self.versions();
        let current: Signed<Targets> =
            serde_json::from_slice(&self.metadata(&format!("{}.targets.json", v["targets"])))
                .unwrap();
        let mut targets = current.signed;
        targets.version = nz(v["targets"] + 1);
        let content = serde_json::to_vec(&serde_json::json!({ "apps": [app] })).unwrap();
        let sha = sha256_digest(&content);
        let hex = sha.trim_start_matches("sha256:");
        let entry = targets
            .targets
            .get_mut(&tough::TargetName::new(name).unwrap())
            .unwrap();
        entry.length = content.len() as u64;
        entry.hashes.sha256 = hex::decode(hex).unwrap().into();
        let targets_version = v["targets"] + 1;
        let targets = self.forge(targets, keys);
        let snapshot = self.forge_snapshot(v["snapshot"] + 1, &targets, targets_version);
        let timestamp =
            self.forge_timestamp(v["timestamp"] + 1, &snapshot, v["snapshot"] + 1, in_a_day());
        self.attacker_pushes(&format!("{hex}.{name}"), &content);
        self.attacker_pushes(&format!("{targets_version}.targets.json"), &targets);
        self.attacker_pushes(&format!("{}.snapshot.json", v["snapshot"] + 1), &snapshot);
        self.attacker_pushes("timestamp.json", &timestamp);
    }
}

fn nz(v: u64) -> NonZeroU64 {
    NonZeroU64::new(v).unwrap()
}

fn in_a_day() -> jiff::Timestamp {
    jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + 86_400).unwrap()
}

fn metafile(bytes: &[u8], version: u64) -> Metafile {
    let sha = sha256_digest(bytes);
    Metafile {
        length: Some(bytes.len() as u64),
        hashes: Some(Hashes {
            sha256: hex::decode(sha.trim_start_matches("sha256:"))
                .unwrap()
                .into(),
            _extra: HashMap::new(),
        }),
        version: nz(version),
        _extra: HashMap::new(),
    }
}

/// A device provisioned with the repository's first root.
struct TrustedDevice {
    root: tempfile::TempDir,
    etc: tempfile::TempDir,
    host: String,
}

impl TrustedDevice {
    fn provision(release: &Release) -> TrustedDevice {
        let etc = temp_dir("etc-stowage-");
        std::fs::write(
            etc.path().join("root.json"),
            release.metadata("1.root.json"),
        )
        .unwrap();
        TrustedDevice {
            root: temp_dir("root-"),
            etc,
            host: release.host.clone(),
        }
    }

    fn trusted_root(&self) -> PathBuf {
        self.etc.path().join("root.json")
    }

    fn stowage(&self, args: &[&str]) -> Command {
        let mut cmd = stowage_on(self.root.path(), &self.host, &[]);
        cmd.env("STOWAGE_TRUSTED_ROOT", self.trusted_root())
            .env("STOWAGE_HARDWARE", HARDWARE)
            .args(args);
        cmd
    }

    fn agent(&self, target: &str) -> Output {
        run_output(&mut self.stowage(&[
            "agent",
            "--target",
            target,
            "--once",
            "--interval",
            "1s",
            "--verify-timeout",
            "60",
        ]))
    }

    fn status(&self) -> Value {
        serde_json::from_str(&run_ok(&mut self.stowage(&["--json", "status"]))).unwrap()
    }
}

/// An app `name` in two versions whose `web` images differ by a layer;
/// returns their pinned references.
fn two_versions(registry: &Registry, name: &str) -> (String, String) {
    let host = registry.host();
    let base_local = format!("{name}-base:1");
    let _base = busybox_image(&base_local);
    let base = format!("{host}/{name}/base:1");
    push_image(&base_local, &base);
    let mut refs = Vec::new();
    for v in ["1", "2"] {
        let local = format!("{name}-web:{v}");
        let _web = build_image(
            &local,
            &base_local,
            &[(&format!("/v{v}.txt"), vec![b'a' + v.len() as u8; 200_000])],
            "",
        );
        let web = format!("{host}/{name}/web:{v}");
        push_image(&local, &web);
        let compose = format!(
            "services:\n  web:\n    image: {web}\n    command: [\"sleep\", \"3600\"]\n  db:\n    image: {base}\n    command: [\"sleep\", \"3600\"]\n"
        );
        refs.push(publish_compose_app(
            registry,
            name,
            &format!("v{v}"),
            &compose,
        ));
    }
    (refs[0].clone(), refs[1].clone())
}

/// The agent refused for trust, said `reason`, downloaded no blob, and the
/// running app is what it was.
fn assert_refused(
    device: &TrustedDevice,
    out: &Output,
    reason: &str,
    registry: &Registry,
    mark: u64,
    app: &str,
    running: &[String],
) {
    assert_eq!(out.status.code(), Some(101), "{}", say(out));
    let status = device.status();
    assert_eq!(status["last_result"], "untrusted", "{status}");
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(error.contains(reason), "expected {reason:?} in: {error}");
    assert_eq!(
        registry.blob_gets_since(mark, "/"),
        0,
        "a blob was downloaded"
    );
    assert_eq!(running_images(app), running, "the running app changed");
}

fn assert_last_error_has(device: &TrustedDevice, what: &str) {
    let status = device.status();
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(error.contains(what), "expected {what:?} in: {error}");
}

#[test]
fn a_signed_target_updates_a_device_and_each_attack_is_refused() {
    ensure_dockerd();
    let registry = Registry::start();
    let name = unique("tuf");
    let host = registry.host();
    let _cleanup = AppCleanup::for_app(&host, &name);
    let (v1, v2) = two_versions(&registry, &name);
    let release = Release::new(&host, &name);
    release.add_target("prod", &v1);
    release.sign("targets", &["targets-a", "targets-b"]);
    release.publish();
    let target = format!("{}:prod", release.repo);

    // Provisioned with the first root, the device verifies and applies it.
    let device = TrustedDevice::provision(&release);
    let out = device.agent(&target);
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));
    let status = device.status();
    assert_eq!(status["last_result"], "committed", "{status}");
    assert_eq!(status["apps"][&name], v1.as_str(), "{status}");
    let roles: Vec<(String, u64)> = status["trust"]["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["role"].as_str().unwrap().to_string(),
                r["version"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64)> = ["root", "timestamp", "snapshot", "targets"]
        .iter()
        .map(|r| (r.to_string(), 1))
        .collect();
    assert_eq!(roles, expected, "{status}");
    assert!(
        status["trust"]["roles"][1]["expires"].as_str().is_some(),
        "{status}"
    );
    let running = running_images(&name);
    assert_eq!(running.len(), 2, "{running:?}");
    // An attack: what the attacker does to the registry, then a poll that
    // must be refused for `reason` with nothing downloaded and the app as it ran.
    let attack = |attacker: &dyn Fn(), reason: &str| {
        let mark = registry.log_mark();
        attacker();
        let out = device.agent(&target);
        assert_refused(&device, &out, reason, &registry, mark, &name, &running);
    };

    // Nothing changed: the poll asks for the next root and the timestamp,
    // one request each, and nothing else.
    let mark = registry.log_mark();
    let out = device.agent(&target);
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));
    assert_eq!(device.status()["last_result"], "unchanged");
    let gets = registry.gets_since(mark);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(gets[0].ends_with("/manifests/2.root.json"), "{gets:?}");
    assert!(gets[1].ends_with("/manifests/timestamp.json"), "{gets:?}");

    // A new snapshot and timestamp: the device moves on to them.
    release.publish();
    let out = device.agent(&target);
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));
    let gen2 = release.versions();
    assert_eq!((gen2["snapshot"], gen2["timestamp"]), (2, 2));

    // Rollback of the timestamp: version 1 replayed.
    let old_timestamp = {
        let mut t: Signed<Timestamp> =
            serde_json::from_slice(&release.metadata("timestamp.json")).unwrap();
        t.signed.version = nz(1);
        // The genuine version 1 is gone from the directory; one signed by
        // the real key is what a replay would bring.
        t.signed.meta.insert(
            "snapshot.json".into(),
            metafile(&release.metadata("1.snapshot.json"), 1),
        );
        release.forge(t.signed, &["timestamp"])
    };
    attack(
        &|| {
            release.attacker_pushes("timestamp.json", &old_timestamp);
        },
        "timestamp metadata of",
    );
    assert_last_error_has(&device, "(rollback)");
    release.restore();

    // Rollback of the snapshot: a newer timestamp (stolen timestamp key)
    // naming snapshot 1 again.
    let timestamp = release.forge_timestamp(3, &release.metadata("1.snapshot.json"), 1, in_a_day());
    attack(
        &|| {
            release.attacker_pushes("timestamp.json", &timestamp);
        },
        "snapshot metadata of",
    );
    assert_last_error_has(&device, "(rollback)");
    release.restore();

    // Freeze: a timestamp signed with the real key but expired.
    let frozen = release.forge_timestamp(
        3,
        &release.metadata("2.snapshot.json"),
        2,
        "2001-01-01T00:00:00Z".parse().unwrap(),
    );
    attack(
        &|| {
            release.attacker_pushes("timestamp.json", &frozen);
        },
        "timestamp metadata of",
    );
    assert_last_error_has(&device, "expired");
    release.restore();

    // Endless data: a timestamp of 5 MiB is refused before a byte of it is read.
    attack(
        &|| {
            release.attacker_pushes("timestamp.json", &vec![b' '; 5 << 20]);
        },
        "(endless data)",
    );
    release.restore();

    // Arbitrary software: targets naming v2 signed by a key the root does
    // not know (with the snapshot and timestamp keys stolen too).
    attack(
        &|| {
            release.attacker_publishes_targets("prod", &v2, &["evil"]);
        },
        "0 valid signature(s) of the 2",
    );
    release.restore();

    // A compromised key below the threshold: targets-a alone.
    attack(
        &|| {
            release.attacker_publishes_targets("prod", &v2, &["targets-a"]);
        },
        "1 valid signature(s) of the 2",
    );
    release.restore();

    // Mix-and-match: the release engineer publishes snapshot 3, and the
    // attacker serves snapshot 2's bytes under its name.
    release.publish();
    attack(
        &|| {
            release.attacker_pushes("3.snapshot.json", &release.metadata("2.snapshot.json"));
        },
        "does not match the signed metadata",
    );
    release.restore();
    let out = device.agent(&target);
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));

    // A threshold not met: the release engineer's own publish refuses
    // targets signed by one of the two keys.
    release.add_target("prod", &v2);
    release.sign("targets", &["targets-a"]);
    let mut args = release.publish_args();
    args.extend(["--to".to_string(), release.repo.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = release.tuf(&args);
    assert!(!out.status.success(), "{}", say(&out));
    assert!(
        say(&out).contains("not signed by enough targets keys"),
        "{}",
        say(&out)
    );

    // Key rotation the device follows: the root key and a targets key
    // replaced; root 2 signed by the old and the new root keys; v2 signed by
    // the remaining and the new targets keys.
    release.ok(&[
        "rotate",
        release.path(),
        "--role",
        "root",
        "--add-key",
        release.public("root-b").to_str().unwrap(),
        "--remove-key",
        release.public("root-a").to_str().unwrap(),
    ]);
    release.ok(&[
        "rotate",
        release.path(),
        "--role",
        "targets",
        "--add-key",
        release.public("targets-c").to_str().unwrap(),
        "--remove-key",
        release.public("targets-a").to_str().unwrap(),
    ]);
    release.sign("root", &["root-a", "root-b"]);
    release.sign("targets", &["targets-b", "targets-c"]);
    release.publish();
    let mark = registry.log_mark();
    let out = device.agent(&target);
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));
    let status = device.status();
    assert_eq!(status["last_result"], "committed", "{status}");
    assert_eq!(status["apps"][&name], v2.as_str(), "{status}");
    assert_eq!(status["trust"]["roles"][0]["version"], 2, "{status}");
    assert!(registry.blob_gets_since(mark, "/") > 0, "v2 was downloaded");
    let running = running_images(&name);
    // An attack: what the attacker does to the registry, then a poll that
    // must be refused for `reason` with nothing downloaded and the app as it ran.
    let attack = |attacker: &dyn Fn(), reason: &str| {
        let mark = registry.log_mark();
        attacker();
        let out = device.agent(&target);
        assert_refused(&device, &out, reason, &registry, mark, &name, &running);
    };
    assert_ne!(running, Vec::<String>::new());
    // `update` verifies the same signed target as the agent does.
    let out = run_output(&mut device.stowage(&["update", &target, "--verify-timeout", "60"]));
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));
    assert_eq!(running_images(&name), running);

    // The rotated-out targets key no longer signs anything the device takes.
    attack(
        &|| {
            release.attacker_publishes_targets("prod", &v1, &["targets-a", "targets-b"]);
        },
        "1 valid signature(s) of the 2",
    );
    release.restore();

    // Rollback of the targets: a new snapshot (stolen snapshot key) naming
    // the targets version before the current one.
    let v = release.versions();
    let older = v["targets"] - 1;
    let old_targets = release.metadata(&format!("{older}.targets.json"));
    let snapshot = release.forge_snapshot(v["snapshot"] + 1, &old_targets, older);
    let timestamp =
        release.forge_timestamp(v["timestamp"] + 1, &snapshot, v["snapshot"] + 1, in_a_day());
    attack(
        &|| {
            release.attacker_pushes(&format!("{}.snapshot.json", v["snapshot"] + 1), &snapshot);
            release.attacker_pushes("timestamp.json", &timestamp);
        },
        "targets",
    );
    assert_last_error_has(&device, "(rollback)");
    release.restore();

    // Rollback of the root: the genuine root 2 served as root 3. (Last:
    // the registry keeps the forged tag.)
    attack(
        &|| {
            release.attacker_pushes("3.root.json", &release.metadata("2.root.json"));
        },
        "root metadata of",
    );
    assert_last_error_has(&device, "(rollback)");
}

#[test]
fn a_signed_target_on_an_export_updates_an_offline_device() {
    ensure_dockerd();
    let mut registry = Registry::start();
    let name = unique("tufx");
    let host = registry.host();
    let _cleanup = AppCleanup::for_app(&host, &name);
    let (v1, _) = two_versions(&registry, &name);
    let release = Release::new(&host, &name);
    release.add_target("prod", &v1);
    release.sign("targets", &["targets-a", "targets-b"]);

    // The apps go onto the medium with `export`, the metadata with `publish`.
    let staging = temp_dir("staging-");
    run_ok(&mut stowage_on(staging.path(), &host, &["pull", &v1]));
    let medium = temp_dir("usb-");
    run_ok(&mut stowage_on(
        staging.path(),
        &host,
        &["export", &name, medium.path().to_str().unwrap()],
    ));
    let mut args = release.publish_args();
    args.extend([
        "--to".to_string(),
        format!("oci:{}", medium.path().display()),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    release.ok(&args);

    // No network: the registry is gone.
    registry.stop();
    let device = TrustedDevice::provision(&release);
    let from = format!("oci:{}", medium.path().display());

    // A medium whose timestamp is not the signed one is refused first.
    let timestamp = medium.path().join("tuf/metadata/timestamp.json");
    let genuine = std::fs::read(&timestamp).unwrap();
    let mut forged: Value = serde_json::from_slice(&genuine).unwrap();
    forged["signed"]["version"] = 7.into();
    std::fs::write(&timestamp, serde_json::to_vec(&forged).unwrap()).unwrap();
    let out = run_output(&mut device.stowage(&["update", &from, "--verify-timeout", "60"]));
    assert_eq!(out.status.code(), Some(101), "{}", say(&out));
    assert!(say(&out).contains("signature"), "{}", say(&out));
    assert!(running_images(&name).is_empty());
    let index = device.root.path().join("store").join("index.json");
    assert!(
        !index.exists() || index_refs(device.root.path()).is_empty(),
        "nothing was imported"
    );
    std::fs::write(&timestamp, &genuine).unwrap();

    let out = run_output(&mut device.stowage(&["update", &from, "--verify-timeout", "60"]));
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));
    let running = running_images(&name);
    assert_eq!(running.len(), 2, "{running:?}");
    let status = device.status();
    assert_eq!(status["trust"]["roles"][2]["version"], 1, "{status}");

    // The same medium again, after a rollback on it is impossible: the
    // device trusts timestamp 1; a medium without metadata is refused.
    let bare = temp_dir("usb-bare-");
    run_ok(&mut stowage_on(
        staging.path(),
        &host,
        &["export", &name, bare.path().to_str().unwrap()],
    ));
    let out =
        run_output(&mut device.stowage(&["update", &format!("oci:{}", bare.path().display())]));
    assert_eq!(out.status.code(), Some(101), "{}", say(&out));
    assert!(say(&out).contains("not signed"), "{}", say(&out));
    assert_eq!(running_images(&name), running);
}

/// The python-tuf reference client (`scripts/setup.sh` installs it in a
/// venv; `STOWAGE_PYTHON_TUF` names its python).
fn python_tuf() -> PathBuf {
    let python = std::env::var_os("STOWAGE_PYTHON_TUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/stowage-test/python-tuf/bin/python"));
    assert!(
        python.exists(),
        "python-tuf is not installed at {} (run scripts/setup.sh, or set STOWAGE_PYTHON_TUF)",
        python.display()
    );
    python
}

const PYTHON_CLIENT: &str = r#"
import json, os, sys, urllib.parse
from tuf.ngclient import Updater, FetcherInterface
from tuf.api.exceptions import DownloadHTTPError

class Files(FetcherInterface):
    def _fetch(self, url):
        path = urllib.parse.urlparse(url).path
        if not os.path.exists(path):
            raise DownloadHTTPError("not found", 404)
        with open(path, "rb") as f:
            return iter([f.read()])

repo, work, name = sys.argv[1], sys.argv[2], sys.argv[3]
meta, targets = os.path.join(work, "meta"), os.path.join(work, "targets")
os.makedirs(meta)
os.makedirs(targets)
with open(os.path.join(repo, "metadata", "1.root.json"), "rb") as f:
    root = f.read()
updater = Updater(
    metadata_dir=meta,
    metadata_base_url="file://" + repo + "/metadata/",
    target_dir=targets,
    target_base_url="file://" + repo + "/targets/",
    fetcher=Files(),
    bootstrap=root,
)
updater.refresh()
info = updater.get_targetinfo(name)
if info is None:
    sys.exit("no target " + name)
path = updater.download_target(info)
print(json.dumps({"custom": info.custom, "content": json.load(open(path)), "root": updater._trusted_set.root.version}))
"#;

#[test]
fn python_tuf_verifies_the_repository() {
    let python = python_tuf();
    let registry = Registry::start();
    let name = unique("tufpy");
    let host = registry.host();
    // A target needs its apps to resolve: a small published app.
    let base_local = format!("{name}-base:1");
    let _base = busybox_image(&base_local);
    let base = format!("{host}/{name}/base:1");
    push_image(&base_local, &base);
    let app = publish_compose_app(
        &registry,
        &name,
        "v1",
        &format!("services:\n  db:\n    image: {base}\n    command: [\"sleep\", \"3600\"]\n"),
    );
    let release = Release::new(&host, &name);
    release.add_target("prod", &app);
    release.sign("targets", &["targets-a", "targets-b"]);
    release.ok(&release
        .publish_args()
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    // A rotation too, so that the reference client follows a root chain.
    release.ok(&[
        "rotate",
        release.path(),
        "--role",
        "root",
        "--add-key",
        release.public("root-b").to_str().unwrap(),
        "--remove-key",
        release.public("root-a").to_str().unwrap(),
    ]);
    release.sign("root", &["root-a", "root-b"]);
    release.sign("targets", &["targets-a", "targets-b"]);
    release.ok(&release
        .publish_args()
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());

    let work = temp_dir("python-tuf-");
    let out = run_output(
        Command::new(&python)
            .arg("-c")
            .arg(PYTHON_CLIENT)
            .arg(release.path())
            .arg(work.path().join("client"))
            .arg("prod"),
    );
    assert!(out.status.success(), "python-tuf: {}", say(&out));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["root"], 2, "{result}");
    assert_eq!(
        result["custom"]["stowage"]["hardware"], HARDWARE,
        "{result}"
    );
    assert_eq!(result["content"]["apps"][0], app.as_str(), "{result}");

    // And it refuses what stowage refuses: a target file changed on disk.
    let targets = std::path::Path::new(release.path()).join("targets");
    for entry in std::fs::read_dir(&targets).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&path, bytes).unwrap();
    }
    let out = run_output(
        Command::new(&python)
            .arg("-c")
            .arg(PYTHON_CLIENT)
            .arg(release.path())
            .arg(work.path().join("client2"))
            .arg("prod"),
    );
    assert!(
        !out.status.success(),
        "python-tuf took a changed target: {}",
        say(&out)
    );
}

#[test]
fn without_a_trusted_root_the_agent_warns_and_with_one_unsigned_updates_are_refused() {
    let registry = Registry::start();
    let host = registry.host();
    let root = temp_dir("root-");
    let target = format!("{host}/nothing/target:prod");
    let out = run_output(&mut stowage_on(
        root.path(),
        &host,
        &[
            "agent",
            "--target",
            &target,
            "--once",
            "--docker-host",
            "unix:///nonexistent.sock",
        ],
    ));
    assert!(
        say(&out).contains("no trusted root is configured"),
        "{}",
        say(&out)
    );
    // With a root, app references on the command line are not signed.
    let etc = temp_dir("etc-");
    std::fs::write(etc.path().join("root.json"), b"{}").unwrap();
    let out = run_output(
        stowage_on(
            root.path(),
            &host,
            &[
                "update",
                &format!("{host}/apps/x:1"),
                &format!("{host}/apps/y:1"),
            ],
        )
        .env("STOWAGE_TRUSTED_ROOT", etc.path().join("root.json")),
    );
    assert_eq!(out.status.code(), Some(101), "{}", say(&out));
    assert!(say(&out).contains("is not signed"), "{}", say(&out));
    // One reference is a signed target's: a repository without metadata
    // is refused, and so is a root that is not one.
    let release = Release::new(&host, "unsigned");
    let signed_root = release.dir.path().join("staged").join("root.json");
    let out = run_output(
        stowage_on(root.path(), &host, &["update", &format!("{host}/apps/x:1")])
            .env("STOWAGE_TRUSTED_ROOT", &signed_root),
    );
    assert_eq!(out.status.code(), Some(101), "{}", say(&out));
    assert!(
        say(&out).contains("it has no 1.root.json")
            || say(&out).contains("it has no timestamp.json"),
        "{}",
        say(&out)
    );
    let out = run_output(
        stowage_on(root.path(), &host, &["update", &format!("{host}/apps/x:1")])
            .env("STOWAGE_TRUSTED_ROOT", etc.path().join("root.json")),
    );
    assert_eq!(out.status.code(), Some(101), "{}", say(&out));
    assert!(say(&out).contains("trusted root"), "{}", say(&out));
}

#[test]
fn release_engineer_mistakes_are_refused_and_change_nothing() {
    let registry = Registry::start();
    let host = registry.host();
    let name = unique("tufme");
    let release = Release::new(&host, &name);
    let show = || release.ok(&["--json", "show", release.path()]);
    let refused = |args: &[&str], says: &str| {
        let before = show();
        let out = release.tuf(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", say(&out));
        assert!(
            say(&out).contains(says),
            "{args:?}: expected {says:?} in {}",
            say(&out)
        );
        assert_eq!(show(), before, "{args:?} changed the repository");
    };

    // A key is never overwritten.
    let key = release.key("targets-a");
    let bytes = std::fs::read(&key).unwrap();
    refused(
        &["key", "gen", key.to_str().unwrap()],
        "is never overwritten",
    );
    assert_eq!(std::fs::read(&key).unwrap(), bytes);

    // A second init, a threshold above the number of keys.
    let public = |k: &str| release.public(k).display().to_string();
    let init = |dir: &str, threshold: &str| -> Vec<String> {
        [
            "init",
            dir,
            "--root-key",
            &public("root-a"),
            "--targets-key",
            &public("targets-a"),
            "--targets-threshold",
            threshold,
            "--snapshot-key",
            &public("snapshot"),
            "--timestamp-key",
            &public("timestamp"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args = init(release.path(), "1");
    refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "already holds a repository",
    );
    let other = temp_dir("tuf-other-");
    let args = init(other.path().to_str().unwrap(), "2");
    let out = release.tuf(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(1), "{}", say(&out));
    assert!(say(&out).contains("threshold must be 1-1"), "{}", say(&out));

    // A key of another role signs nothing.
    let snapshot_key = release.key("snapshot").display().to_string();
    refused(
        &[
            "sign",
            release.path(),
            "--role",
            "root",
            "--key",
            &snapshot_key,
        ],
        "is not a root key",
    );
    // A bad target name; removing a key the role does not have.
    refused(
        &["add-target", release.path(), "../prod", "x/y@sha256:00"],
        "target name",
    );
    refused(
        &[
            "rotate",
            release.path(),
            "--role",
            "targets",
            "--remove-key",
            "abcd",
        ],
        "is not a targets key",
    );
    // Nothing is published without signed targets.
    let mut args = release.publish_args();
    args.extend(["--to".to_string(), release.repo.clone()]);
    let out = release.tuf(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(1), "{}", say(&out));
    assert!(say(&out).contains("no targets yet"), "{}", say(&out));
    assert_eq!(
        registry
            .gets_since(0)
            .iter()
            .filter(|g| g.contains("/manifests/"))
            .count(),
        0
    );
}
