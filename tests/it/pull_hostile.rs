//! `stowage pull` from a registry that lies: more bytes than declared, fewer,
//! wrong ones, a whole blob where a range was asked, a range that starts
//! elsewhere, a 10 MiB manifest, a wrong media type, a wrong digest. Each is
//! refused with a sentence naming what is at fault, or survived; nothing
//! unverified is ever committed, no file outgrows its declared size, and
//! `stowage fsck` finds the store clean after every one.
//!
//! The app is published straight to the hostile registry (which is honest
//! while it is published), so every blob a pull fetches comes from it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use crate::common::device::*;
use crate::common::hostile::{Behaviour, HostileRegistry};
use crate::common::*;
use serde_json::Value;
use stowage::Digest;
use stowage::store::Store;

const MIB: usize = 1024 * 1024;

/// An app on the hostile registry: its reference, the service layer a test
/// misbehaves on, and every size a descriptor declares.
struct HostileApp {
    registry: HostileRegistry,
    reference: String,
    app_manifest: Digest,
    image_manifest: Digest,
    layer: Digest,
    layer_size: u64,
    declared: BTreeMap<String, u64>,
}

impl HostileApp {
    fn publish(name: &str, layer_bytes: usize) -> HostileApp {
        let registry = HostileRegistry::start();
        let host = registry.host();
        let reference = publish_app(&host, name, "v1", &[("web", layer_bytes), ("db", 0)]);
        let app_manifest: Digest = reference.rsplit('@').next().unwrap().parse().unwrap();
        let image_manifest = registry.tag(&format!("{name}/web"), "1").unwrap();
        let (_, bytes) = registry
            .manifest(&format!("{name}/web"), &image_manifest)
            .unwrap();
        let manifest: Value = serde_json::from_slice(&bytes).unwrap();
        let layers = image_layers_in(&manifest);
        let (layer, layer_size) = layers.last().cloned().unwrap();
        let mut declared = BTreeMap::new();
        for service in ["web", "db"] {
            let repo = format!("{name}/{service}");
            let digest = registry.tag(&repo, "1").unwrap();
            let (_, bytes) = registry.manifest(&repo, &digest).unwrap();
            let manifest: Value = serde_json::from_slice(&bytes).unwrap();
            for (d, n) in image_layers_in(&manifest) {
                declared.insert(d.trim_start_matches("sha256:").to_string(), n);
            }
        }
        HostileApp {
            registry,
            reference,
            app_manifest,
            image_manifest,
            layer: layer.parse().unwrap(),
            layer_size,
            declared,
        }
    }

    fn pull(&self, root: &Path) -> Output {
        run_output(device(root, &self.registry.host()).args(["pull", &self.reference]))
    }

    /// After any pull, whatever its outcome: every committed blob hashes to
    /// its name, no partial download is larger than its layer's declared
    /// size, and fsck finds the store clean.
    fn assert_nothing_unverified(&self, root: &Path) {
        for (hex, _) in blob_files(root) {
            let bytes = std::fs::read(root.join("store/blobs/sha256").join(&hex)).unwrap();
            assert_eq!(sha256_digest(&bytes), format!("sha256:{hex}"));
        }
        for file in ingest_files(root) {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".state") {
                continue;
            }
            let declared = self.declared.get(&name).copied().unwrap_or(0);
            let len = std::fs::metadata(&file).unwrap().len();
            assert!(
                len <= declared,
                "partial download {name} holds {len} bytes, over its declared {declared}"
            );
        }
        assert_fsck_clean(root, &self.registry.host());
    }

    fn layer_stored(&self, root: &Path) -> bool {
        blob_files(root).contains_key(self.layer.hex())
    }

    /// Leaves the first `n` true bytes of the layer as a partial download,
    /// as a pull cut off earlier would.
    fn leave_partial(&self, root: &Path, n: usize) {
        let bytes = self.registry.blob(&self.layer).unwrap();
        let store = Store::open(root).unwrap();
        let mut ingest = store.ingest(&self.layer, self.layer_size).unwrap();
        ingest.write_all(&bytes[..n]).unwrap();
    }

    /// The Range headers of this run's GETs of the layer, with their status.
    fn layer_gets(&self) -> Vec<(Option<String>, u16)> {
        self.registry
            .idle()
            .requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.digest.as_ref() == Some(&self.layer))
            .map(|r| (r.range, r.status))
            .collect()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn fails_saying(out: &Output, what: &[&str]) {
    assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
    let said = stderr(out);
    for w in what {
        assert!(said.contains(w), "the error names {w:?}:\n{said}");
    }
    assert!(!said.contains("panicked"), "{said}");
}

#[test]
fn lying_blob_answers_are_refused_or_survived_and_nothing_unverified_is_committed() {
    let app = HostileApp::publish(&unique("liar"), 2 * MIB);
    let host = app.registry.host();
    let size = app.layer_size;
    let digest = app.layer.to_string();
    let scratch = temp_dir("stowage-hostile-");
    let mut case = 0;
    let mut fresh_root = || {
        case += 1;
        scratch.path().join(format!("root{case}"))
    };

    // More bytes than declared: cut off, the blob refused, and a later
    // honest pull completes.
    let root = fresh_root();
    app.registry
        .set_blob_behaviour(&app.layer, Behaviour::SendMore(64 * 1024));
    fails_saying(
        &app.pull(&root),
        &["sent more than", &size.to_string(), &digest, &host],
    );
    assert!(!app.layer_stored(&root));
    app.assert_nothing_unverified(&root);
    // What it left is a stale partial download: prune removes it.
    let partial = root.join("ingest").join(app.layer.hex());
    assert!(partial.exists());
    let pruned = json_of(run_ok(device(&root, &host).args(["--json", "prune"])).as_bytes());
    let stale = pruned["stale_ingests"].to_string();
    assert!(stale.contains(&digest), "{pruned:#}");
    assert!(!partial.exists());
    app.registry
        .set_blob_behaviour(&app.layer, Behaviour::Honest);
    run_ok(device(&root, &host).args(["pull", &app.reference]));
    assert!(app.layer_stored(&root));
    app.assert_nothing_unverified(&root);

    // Fewer bytes than declared, every time: after its resumes the pull
    // gives up naming the layer; a later pull resumes from what arrived.
    let root = fresh_root();
    let cut = 100 * 1024;
    app.registry
        .set_blob_behaviour(&app.layer, Behaviour::SendFewer(cut));
    app.registry.clear_requests();
    let out = app.pull(&root);
    fails_saying(&out, &[&digest, &host]);
    let said = stderr(&out);
    assert!(
        said.contains("broke off") || said.contains("ended layer"),
        "{said}"
    );
    let gets = app.layer_gets();
    assert_eq!(gets.len(), 4, "one request and three resumes: {gets:?}");
    assert_eq!(gets[1].0.as_deref(), Some(&*format!("bytes={cut}-")));
    assert!(!app.layer_stored(&root));
    app.assert_nothing_unverified(&root);
    let had = 4 * cut;
    let partial = std::fs::metadata(root.join("ingest").join(app.layer.hex()))
        .unwrap()
        .len();
    assert_eq!(partial, had, "what arrived is kept for a resume");
    app.registry
        .set_blob_behaviour(&app.layer, Behaviour::Honest);
    app.registry.clear_requests();
    run_ok(device(&root, &host).args(["pull", &app.reference]));
    assert_eq!(
        app.layer_gets()[0].0.as_deref(),
        Some(&*format!("bytes={had}-"))
    );
    assert_eq!(app.registry.idle().bytes_sent_for(&app.layer), size - had);
    assert!(app.layer_stored(&root));
    assert!(ingest_files(&root).is_empty(), "{:?}", ingest_files(&root));
    app.assert_nothing_unverified(&root);

    // Wrong bytes of the right length: the digest does not match, the blob
    // is refused and its partial download deleted.
    let root = fresh_root();
    app.registry
        .set_blob_behaviour(&app.layer, Behaviour::WrongBytes);
    fails_saying(&app.pull(&root), &["corrupt layer", &digest, &host]);
    assert!(!app.layer_stored(&root));
    assert!(!root.join("ingest").join(app.layer.hex()).exists());
    app.assert_nothing_unverified(&root);

    // A 200 with the whole blob to a resume: started again from zero, never
    // appended.
    let root = fresh_root();
    let half = size as usize / 2;
    app.leave_partial(&root, half);
    app.registry
        .set_blob_behaviour(&app.layer, Behaviour::IgnoreRange);
    app.registry.clear_requests();
    run_ok(device(&root, &host).args(["pull", &app.reference]));
    assert_eq!(
        app.layer_gets(),
        vec![(Some(format!("bytes={half}-")), 200)],
        "one resume, answered whole"
    );
    assert!(app.layer_stored(&root));
    app.assert_nothing_unverified(&root);

    // A 206 whose Content-Range starts elsewhere: refused before a byte of
    // it is written; the partial download is untouched and an honest pull
    // resumes it.
    let root = fresh_root();
    app.leave_partial(&root, half);
    app.registry
        .set_blob_behaviour(&app.layer, Behaviour::BadContentRange);
    fails_saying(
        &app.pull(&root),
        &["Content-Range", &format!("byte {half}"), &digest, &host],
    );
    let partial = std::fs::metadata(root.join("ingest").join(app.layer.hex()))
        .unwrap()
        .len();
    assert_eq!(partial, half as u64);
    app.assert_nothing_unverified(&root);
    app.registry
        .set_blob_behaviour(&app.layer, Behaviour::Honest);
    app.registry.clear_requests();
    run_ok(device(&root, &host).args(["pull", &app.reference]));
    assert_eq!(
        app.registry.idle().bytes_sent_for(&app.layer),
        size - half as u64
    );
    app.assert_nothing_unverified(&root);

    // Connections dropped twice mid-blob: resumed within the same pull,
    // every byte sent once.
    let root = fresh_root();
    app.registry.set_blob_behaviour(
        &app.layer,
        Behaviour::DropAfter {
            bytes: 300 * 1024,
            times: 2,
        },
    );
    app.registry.clear_requests();
    run_ok(device(&root, &host).args(["pull", &app.reference]));
    let gets = app.layer_gets();
    assert_eq!(gets.len(), 3, "{gets:?}");
    assert_eq!(gets[2].0.as_deref(), Some("bytes=614400-"));
    assert_eq!(app.registry.idle().bytes_sent_for(&app.layer), size);
    assert!(app.layer_stored(&root));
    assert!(ingest_files(&root).is_empty());
    app.assert_nothing_unverified(&root);
    app.registry
        .set_blob_behaviour(&app.layer, Behaviour::Honest);
}

#[test]
fn lying_manifests_are_refused_before_anything_is_stored() {
    let app = HostileApp::publish(&unique("manifests"), 64 * 1024);
    let host = app.registry.host();
    let scratch = temp_dir("stowage-hostile-");
    let mut case = 0;
    let mut attempt = |target: &Digest, behaviour: Behaviour, what: &[&str]| {
        case += 1;
        let root = scratch.path().join(format!("root{case}"));
        app.registry
            .set_manifest_behaviour(target, behaviour.clone());
        let out = app.pull(&root);
        app.registry
            .set_manifest_behaviour(target, Behaviour::Honest);
        fails_saying(&out, what);
        assert!(
            blob_files(&root).is_empty(),
            "{behaviour:?}: nothing is stored: {:?}",
            blob_files(&root)
        );
        assert!(ingest_files(&root).is_empty());
        app.assert_nothing_unverified(&root);
    };
    let app_digest = app.app_manifest.clone();
    let image_digest = app.image_manifest.clone();
    // A 10 MiB app manifest, then image manifest: cut at their caps.
    attempt(
        &app_digest,
        Behaviour::Huge(10 * MIB as u64),
        &["larger than the 51200-byte limit", &host],
    );
    attempt(
        &image_digest,
        Behaviour::Huge(10 * MIB as u64),
        &["larger than the 4194304-byte limit", "web", &host],
    );
    // Wrong media types.
    attempt(
        &app_digest,
        Behaviour::WrongMediaType("text/html".into()),
        &["media type \"text/html\"", &host],
    );
    attempt(
        &image_digest,
        Behaviour::WrongMediaType("application/vnd.oci.image.layer.v1.tar".into()),
        &["media type", "web", &host],
    );
    // A body that is not what its digest says.
    attempt(
        &image_digest,
        Behaviour::WrongDigest,
        &["not the expected", &image_digest.to_string(), &host],
    );
    attempt(
        &app_digest,
        Behaviour::WrongDigest,
        &["not the expected", &app_digest.to_string()],
    );

    // And honest, the same pull completes.
    let root = scratch.path().join("honest");
    run_ok(device(&root, &host).args(["pull", &app.reference]));
    app.assert_nothing_unverified(&root);
}

#[test]
fn a_plain_http_registry_that_sends_a_blob_to_https_storage_is_followed_there() {
    // The layer lives "in storage" behind HTTPS (a TLS registry holding the
    // same bytes in the same repository); the plain registry redirects its
    // GETs there, as registries backed by object stores do.
    let name = unique("redirect");
    let app = HostileApp::publish(&name, MIB);
    let storage = Registry::start_with(RegistryOptions {
        tls: true,
        ..Default::default()
    });
    let repo = format!("{name}/web");
    let bytes = app.registry.blob(&app.layer).unwrap();
    assert_eq!(storage.upload_blob(&repo, &bytes), app.layer.to_string());
    app.registry
        .set_blob_behaviour(&app.layer, Behaviour::RedirectTo(storage.url()));
    let ca = storage.ca_file().unwrap();

    // Without the storage's CA the certificate is refused, by name.
    let scratch = temp_dir("stowage-redirect-");
    let root = scratch.path().join("root");
    let out = app.pull(&root);
    fails_saying(&out, &[&app.layer.to_string(), "certificate"]);
    assert!(!app.layer_stored(&root));
    app.assert_nothing_unverified(&root);

    // With it, the pull follows the redirect through the TLS client.
    let out = run_output(
        device(&root, &app.registry.host())
            .arg("--ca-file")
            .arg(&ca)
            .args(["pull", &app.reference]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(app.layer_stored(&root));
    assert!(
        app.layer_gets().iter().any(|(_, status)| *status == 307),
        "{:?}",
        app.layer_gets()
    );
    app.assert_nothing_unverified(&root);
}
