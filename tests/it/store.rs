//! The device blob store, as pull, prune and fsck use it: crash safety,
//! modes, locking between processes, pruning, fsck, and interoperability
//! with skopeo through the OCI layout.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use crate::common::{TmpfsVolume, busybox_image, run_ok, temp_dir, unique, wait_until};

use serde_json::{Value, json};
use stowage::Digest;
use stowage::oci::format::SOURCE_MANIFEST_ANNOTATION;
use stowage::oci::media;
use stowage::store::{BLOB_MODE, DIR_MODE, LockMode, Store, StoreError};

/// Deterministic, non-repeating test content.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn put_json(store: &Store, doc: &Value) -> (Digest, u64) {
    let bytes = serde_json::to_vec(doc).unwrap();
    let digest = Digest::of(&bytes);
    store.put_bytes(&digest, &bytes).unwrap();
    (digest, bytes.len() as u64)
}

fn put_blob(store: &Store, bytes: &[u8]) -> (Digest, u64) {
    let digest = Digest::of(bytes);
    store.put_bytes(&digest, bytes).unwrap();
    (digest, bytes.len() as u64)
}

fn desc(media_type: &str, digest: &Digest, size: u64) -> Value {
    json!({"mediaType": media_type, "digest": digest.to_string(), "size": size})
}

// ---- A second process, for the tests that need one -------------------------

const CHILD_ROLE: &str = "STOWAGE_STORE_TEST_ROLE";

/// Not a test of its own: the body of the child process that other tests
/// start by running this test binary again with `CHILD_ROLE` set.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    let root = PathBuf::from(std::env::var("STOWAGE_STORE_TEST_ROOT").unwrap());
    let store = Store::open(&root).unwrap();
    match role.as_str() {
        "hold-exclusive-lock" => {
            let _lock = store.lock(LockMode::Exclusive).unwrap();
            println!("LOCKED");
            // Hold the lock until the parent kills us (or, should it die
            // first, until our stdin closes).
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
        }
        "crash-mid-download" => {
            let blob = content(7, 3_000_000);
            let digest = Digest::of(&blob);
            let mut ingest = store.ingest(&digest, blob.len() as u64).unwrap();
            ingest.preallocate().unwrap();
            ingest.write_all(&blob[..1_000_000]).unwrap();
            ingest.checkpoint().unwrap();
            ingest.write_all(&blob[1_000_000..1_800_000]).unwrap();
            // Die at once, like SIGKILL or a crash: no destructor runs.
            std::process::abort();
        }
        other => panic!("unknown child role {other}"),
    }
}

fn start_child(role: &str, root: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ROLE, role)
        .env("STOWAGE_STORE_TEST_ROOT", root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

// ---- Layout and modes --------------------------------------------------------

#[test]
fn a_new_store_is_an_oci_layout_with_private_directories() {
    let dir = temp_dir("stowage-store-layout-");
    let root = dir.path().join("root");
    let store = Store::open(&root).unwrap();

    let layout: Value =
        serde_json::from_slice(&fs::read(root.join("store/oci-layout")).unwrap()).unwrap();
    assert_eq!(layout, json!({"imageLayoutVersion": "1.0.0"}));
    let index: Value =
        serde_json::from_slice(&fs::read(root.join("store/index.json")).unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["manifests"], json!([]));
    for sub in [
        "",
        "store",
        "store/blobs",
        "store/blobs/sha256",
        "ingest",
        "corrupt",
    ] {
        assert_eq!(mode_of(&root.join(sub)), DIR_MODE, "mode of ROOT/{sub}");
    }

    // Reopening keeps what is there and repairs loosened modes.
    let (digest, _) = put_blob(&store, b"kept");
    fs::set_permissions(root.join("ingest"), fs::Permissions::from_mode(0o755)).unwrap();
    let store = Store::open(&root).unwrap();
    assert!(store.has(&digest));
    assert_eq!(mode_of(&root.join("ingest")), DIR_MODE);
}

#[test]
fn committed_blobs_are_read_only_and_read_back_by_digest() {
    let dir = temp_dir("stowage-store-readonly-");
    let store = Store::open(dir.path()).unwrap();
    let blob = content(1, 10_000);
    let (digest, size) = put_blob(&store, &blob);

    assert_eq!(mode_of(&store.blob_path(&digest)), BLOB_MODE);
    assert!(store.has(&digest));
    assert_eq!(store.size(&digest), Some(size));
    assert_eq!(store.read_capped(&digest, 10_000).unwrap(), blob);
    let err = store.read_capped(&digest, 9_999).unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    assert_eq!(store.list().unwrap(), vec![(digest.clone(), size)]);
    let usage = store.disk_usage().unwrap();
    assert_eq!((usage.blobs, usage.blob_bytes), (1, 10_000));
    assert!(usage.blob_allocated_bytes >= 10_000);

    // Storing it again is a no-op; a missing blob is named.
    store.put_bytes(&digest, &blob).unwrap();
    let missing = Digest::of(b"never stored");
    assert!(!store.has(&missing));
    let err = store.open_blob(&missing).unwrap_err();
    assert!(err.to_string().contains(&missing.to_string()), "{err}");
}

// ---- Crash safety ------------------------------------------------------------

#[test]
fn a_download_killed_midway_is_invisible_then_resumes_where_it_stopped() {
    let dir = temp_dir("stowage-store-crash-");
    let store = Store::open(dir.path()).unwrap();
    let blob = content(7, 3_000_000);
    let digest = Digest::of(&blob);

    let status = start_child("crash-mid-download", dir.path())
        .wait()
        .unwrap();
    assert!(!status.success(), "the child was meant to crash");

    // Nothing of the half-written blob is visible.
    assert!(!store.has(&digest));
    assert!(!store.blob_path(&digest).exists());
    assert!(store.list().unwrap().is_empty());
    let ingests = store.ingests().unwrap();
    assert_eq!(ingests.len(), 1);
    assert_eq!(ingests[0].digest, digest);
    assert_eq!(ingests[0].offset, 1_800_000);
    assert_eq!(ingests[0].expected, Some(3_000_000));
    assert_eq!(store.partial_bytes(&digest), 1_800_000);

    // The resume hashes only what followed the last checkpoint.
    let mut ingest = store.ingest(&digest, blob.len() as u64).unwrap();
    assert_eq!(ingest.offset(), 1_800_000);
    assert_eq!(ingest.rehashed_bytes(), 800_000);
    ingest.write_all(&blob[1_800_000..]).unwrap();
    ingest.commit().unwrap();

    assert_eq!(store.read_capped(&digest, 1 << 30).unwrap(), blob);
    assert!(store.ingests().unwrap().is_empty());
    let leftovers: Vec<_> = fs::read_dir(store.ingest_dir()).unwrap().collect();
    assert!(leftovers.is_empty(), "ingest area not empty: {leftovers:?}");
}

#[test]
fn a_write_beyond_the_declared_size_is_refused_whole() {
    let dir = temp_dir("stowage-store-beyond-");
    let store = Store::open(dir.path()).unwrap();
    let blob = content(2, 1000);
    let digest = Digest::of(&blob);

    let mut ingest = store.ingest(&digest, 1000).unwrap();
    ingest.write_all(&blob[..800]).unwrap();
    let err = ingest.write_all(&content(3, 300)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::BeyondDeclaredSize {
                declared: 1000,
                attempted: 1100,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&digest.to_string()));
    assert_eq!(ingest.offset(), 800);
    assert_eq!(store.partial_bytes(&digest), 800);

    // The ingest is still good: the right bytes complete it.
    ingest.write_all(&blob[800..]).unwrap();
    ingest.commit().unwrap();
    assert_eq!(store.size(&digest), Some(1000));

    // A registry that sends more than declared at once gets nothing written.
    let other = content(4, 100);
    let other_digest = Digest::of(&other);
    let mut ingest = store.ingest(&other_digest, 50).unwrap();
    assert!(ingest.write_all(&other).is_err());
    assert_eq!(store.partial_bytes(&other_digest), 0);
}

#[test]
fn wrong_bytes_are_rejected_and_nothing_is_committed() {
    let dir = temp_dir("stowage-store-wrong-");
    let store = Store::open(dir.path()).unwrap();
    let blob = content(5, 5000);
    let digest = Digest::of(&blob);
    let impostor = content(6, 5000);

    let mut ingest = store.ingest(&digest, 5000).unwrap();
    ingest.write_all(&impostor).unwrap();
    let err = ingest.commit().unwrap_err();
    let message = err.to_string();
    assert!(message.contains(&digest.to_string()), "{message}");
    assert!(
        message.contains(&Digest::of(&impostor).to_string()),
        "{message}"
    );
    assert!(!store.has(&digest));
    assert!(store.ingests().unwrap().is_empty());
    assert_eq!(fs::read_dir(store.ingest_dir()).unwrap().count(), 0);

    // Small blobs go through the same check.
    let err = store.put_bytes(&digest, &impostor).unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn an_incomplete_download_cannot_be_committed_but_is_kept_for_resume() {
    let dir = temp_dir("stowage-store-incomplete-");
    let store = Store::open(dir.path()).unwrap();
    let blob = content(8, 4000);
    let digest = Digest::of(&blob);

    let mut ingest = store.ingest(&digest, 4000).unwrap();
    ingest.write_all(&blob[..1500]).unwrap();
    let err = ingest.commit().unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Incomplete {
                expected: 4000,
                got: 1500,
                ..
            }
        ),
        "{err}"
    );
    assert!(!store.has(&digest));

    let mut ingest = store.ingest(&digest, 4000).unwrap();
    assert_eq!(ingest.offset(), 1500);
    ingest.write_all(&blob[1500..]).unwrap();
    ingest.commit().unwrap();
    assert!(store.has(&digest));
}

#[test]
fn a_registry_that_answers_200_to_a_range_request_starts_the_blob_over() {
    let dir = temp_dir("stowage-store-restart-");
    let store = Store::open(dir.path()).unwrap();
    let blob = content(9, 9000);
    let digest = Digest::of(&blob);

    let mut ingest = store.ingest(&digest, 9000).unwrap();
    ingest.write_all(&blob[..3000]).unwrap();
    drop(ingest);
    let mut ingest = store.ingest(&digest, 9000).unwrap();
    assert_eq!(ingest.offset(), 3000);
    // The whole body arrives instead of the rest: never append it.
    ingest.restart().unwrap();
    assert_eq!(ingest.offset(), 0);
    assert_eq!(store.partial_bytes(&digest), 0);
    ingest.write_all(&blob).unwrap();
    ingest.commit().unwrap();
    assert_eq!(store.read_capped(&digest, 9000).unwrap(), blob);
}

// ---- Space -------------------------------------------------------------------

#[test]
fn preallocation_reserves_the_declared_size_without_growing_the_file() {
    let dir = temp_dir("stowage-store-prealloc-");
    let store = Store::open(dir.path()).unwrap();
    let blob = content(10, 8 << 20);
    let digest = Digest::of(&blob);

    let mut ingest = store.ingest(&digest, blob.len() as u64).unwrap();
    ingest.write_all(&blob[..1 << 20]).unwrap();
    ingest.preallocate().unwrap();
    assert_eq!(store.partial_bytes(&digest), 1 << 20);
    assert!(store.partial_allocated_bytes(&digest) >= 8 << 20);
    ingest.write_all(&blob[1 << 20..]).unwrap();
    ingest.commit().unwrap();
    assert_eq!(store.size(&digest), Some(8 << 20));
}

#[test]
fn a_volume_too_small_fails_at_preallocation_naming_the_path() {
    let volume = TmpfsVolume::new(1);
    let store = Store::open(&volume.path().join("root")).unwrap();
    let digest = Digest::of(b"a blob of four mebibytes, declared");

    let mut ingest = store.ingest(&digest, 4 << 20).unwrap();
    let err = ingest.preallocate().unwrap_err();
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("no space left"), "{message}");
    assert!(
        message.contains(&store.ingest_dir().display().to_string()),
        "{message}"
    );
    assert_eq!(store.partial_bytes(&digest), 0);
}

#[test]
fn a_volume_that_fills_up_mid_write_leaves_a_consistent_partial_blob() {
    let volume = TmpfsVolume::new(1);
    let store = Store::open(&volume.path().join("root")).unwrap();
    let blob = content(11, 2 << 20);
    let digest = Digest::of(&blob);

    let mut ingest = store.ingest(&digest, blob.len() as u64).unwrap();
    let chunk = 64 * 1024;
    let err = blob
        .chunks(chunk)
        .try_for_each(|piece| ingest.write_all(piece))
        .unwrap_err();
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
    let written = ingest.offset();
    assert!(written > 0 && written < blob.len() as u64);
    assert_eq!(written % chunk as u64, 0, "a partial chunk was kept");
    assert_eq!(store.partial_bytes(&digest), written);
    drop(ingest);
    assert!(!store.has(&digest));
}

// ---- Concurrency -------------------------------------------------------------

#[test]
fn a_store_locked_by_another_process_is_refused_naming_its_pid() {
    let dir = temp_dir("stowage-store-lock-");
    let store = Store::open(dir.path()).unwrap();
    let mut child = start_child("hold-exclusive-lock", dir.path());
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let locked = stdout
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains("LOCKED"));
    assert!(locked, "the child never took the lock");

    let err = store
        .lock_with_timeout(LockMode::Shared, Duration::from_millis(300))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Locked { pid: Some(p), .. } if p == child.id()),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "another stowage process holds {} (pid {})",
            dir.path().display(),
            child.id()
        )),
        "{message}"
    );

    // The kernel releases a dead holder's lock, even after SIGKILL.
    child.kill().unwrap();
    child.wait().unwrap();
    let lock = store
        .lock_with_timeout(LockMode::Exclusive, Duration::from_secs(5))
        .unwrap();
    assert_eq!(lock.mode(), LockMode::Exclusive);
}

#[test]
fn a_prune_cannot_start_while_a_pull_holds_the_store() {
    let dir = temp_dir("stowage-store-pullprune-");
    let puller = Store::open(dir.path()).unwrap();
    let pruner = Store::open(dir.path()).unwrap();

    // The pull holds the store shared; a second pull may run beside it.
    let pull_lock = puller.lock(LockMode::Shared).unwrap();
    let _other_pull = puller
        .lock_with_timeout(LockMode::Shared, Duration::ZERO)
        .unwrap();
    let (layer, _) = put_blob(&puller, &content(12, 3000));
    let err = pruner
        .lock_with_timeout(LockMode::Exclusive, Duration::from_millis(200))
        .unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");

    // The pull names what it fetched, then lets go; the prune keeps it.
    let (manifest, size) = put_json(
        &puller,
        &json!({"schemaVersion": 2, "mediaType": media::OCI_MANIFEST,
                "config": desc("application/vnd.oci.empty.v1+json", &layer, 3000), "layers": []}),
    );
    puller
        .set_ref("app", media::OCI_MANIFEST, &manifest, size)
        .unwrap();
    drop(pull_lock);
    drop(_other_pull);
    let _prune_lock = pruner.lock(LockMode::Exclusive).unwrap();
    let report = pruner.prune(false, &HashSet::new()).unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    assert!(pruner.has(&layer) && pruner.has(&manifest));
}

#[test]
fn two_writers_of_one_blob_take_turns_and_the_second_finds_it_stored() {
    let dir = temp_dir("stowage-store-twowriters-");
    let first = Store::open(dir.path()).unwrap();
    let second = Store::open(dir.path()).unwrap();
    let blob = content(13, 500_000);
    let digest = Digest::of(&blob);
    let size = blob.len() as u64;

    let mut ingest = first.ingest(&digest, size).unwrap();
    ingest.write_all(&blob[..200_000]).unwrap();

    assert!(second.try_ingest(&digest, size).unwrap().is_none());
    let impatient = second
        .clone()
        .with_ingest_lock_timeout(Duration::from_millis(100));
    let err = impatient.ingest(&digest, size).unwrap_err();
    assert!(matches!(err, StoreError::IngestBusy { .. }), "{err}");
    assert!(matches!(
        second.abort(&digest),
        Err(StoreError::IngestBusy { .. })
    ));

    // A patient second writer waits for the first: it is seen holding the
    // ingest file open (to take its lock) and not done, before the first
    // commits; then it finds the blob stored and writes nothing.
    let ingest_file = first.ingest_dir().join(digest.hex());
    let waiting = std::thread::spawn(move || {
        let ingest = second.ingest(&digest, size).unwrap();
        let stored = ingest.is_stored();
        ingest.commit().unwrap();
        stored
    });
    assert!(
        wait_until(Duration::from_secs(60), || open_descriptors_of(
            &ingest_file
        ) == 2),
        "the second writer never opened the ingest the first one holds"
    );
    assert!(
        !waiting.is_finished(),
        "the second writer went on while the first held the ingest"
    );
    ingest.write_all(&blob[200_000..]).unwrap();
    ingest.commit().unwrap();
    assert!(
        waiting.join().unwrap(),
        "the waiter did not see the committed blob"
    );
    assert_eq!(
        first.read_capped(&Digest::of(&blob), 1 << 20).unwrap(),
        blob
    );
    assert!(first.ingests().unwrap().is_empty());
}

/// How many file descriptors of this process are open on `path`.
fn open_descriptors_of(path: &Path) -> usize {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|fd| fs::read_link(fd.path()).is_ok_and(|target| target == path))
        .count()
}

#[test]
fn apps_named_at_the_same_time_by_two_pulls_are_both_kept() {
    let dir = temp_dir("stowage-store-refs-");
    let store = Store::open(dir.path()).unwrap();
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let store = Store::open(dir.path()).unwrap();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let (digest, size) = put_json(
                    &store,
                    &json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX,
                            "manifests": [], "annotations": {"n": i.to_string()}}),
                );
                barrier.wait();
                for round in 0..5 {
                    store
                        .set_ref(&format!("app{i}:r{round}"), media::OCI_INDEX, &digest, size)
                        .unwrap();
                }
            })
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    let names: HashSet<_> = store.refs().unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names.len(), threads * 5);
}

#[test]
fn refs_name_only_stored_manifests_and_can_be_replaced_and_removed() {
    let dir = temp_dir("stowage-store-refnames-");
    let store = Store::open(dir.path()).unwrap();
    let (v1, s1) = put_json(&store, &json!({"schemaVersion": 2, "v": 1}));
    let (v2, s2) = put_json(&store, &json!({"schemaVersion": 2, "v": 2}));
    let missing = Digest::of(b"not here");

    let err = store
        .set_ref("app", media::OCI_MANIFEST, &missing, 8)
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    let err = store
        .set_ref("../escape", media::OCI_MANIFEST, &v1, s1)
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidRefName { .. }), "{err}");
    let err = store
        .set_ref("app", media::OCI_MANIFEST, &v1, s1 + 1)
        .unwrap_err();
    assert!(matches!(err, StoreError::SizeMismatch { .. }), "{err}");

    store.set_ref("app", media::OCI_MANIFEST, &v1, s1).unwrap();
    store
        .set_ref("other", media::OCI_MANIFEST, &v1, s1)
        .unwrap();
    store.set_ref("app", media::OCI_MANIFEST, &v2, s2).unwrap();
    let refs = store.refs().unwrap();
    assert_eq!(refs.len(), 2);
    assert_eq!(refs[0].name, "app");
    assert_eq!(refs[0].descriptor.digest, v2);
    assert_eq!(
        refs[0].descriptor.annotations["org.opencontainers.image.ref.name"],
        "app"
    );
    assert!(store.remove_ref("app").unwrap());
    assert!(!store.remove_ref("app").unwrap());
    assert_eq!(store.refs().unwrap().len(), 1);
    assert!(store.get_ref("other").unwrap().is_some());
}

// ---- Prune -------------------------------------------------------------------

/// A store holding one app (FORMAT.md shape, fetched for one architecture:
/// the other architecture's layer is missing), one image index, and garbage.
struct PopulatedStore {
    store: Store,
    _dir: tempfile::TempDir,
    app: Vec<Digest>,
    image: Vec<Digest>,
    image_config: Digest,
    extra_root: Digest,
    extra_root_config: Digest,
    garbage: Vec<Digest>,
    wanted_partial: Digest,
    stale_partial: Digest,
}

fn populated_store() -> PopulatedStore {
    let dir = temp_dir("stowage-store-prune-");
    let store = Store::open(dir.path()).unwrap();
    let layer_type = "application/vnd.oci.image.layer.v1.tar+gzip";

    // An image: index -> manifest -> config + two layers, the second missing.
    let (config, config_size) = put_json(&store, &json!({"architecture": "amd64"}));
    let (layer1, l1) = put_blob(&store, &content(20, 4000));
    let layer2 = Digest::of(&content(21, 5000));
    let (manifest, m_size) = put_json(
        &store,
        &json!({"schemaVersion": 2, "mediaType": media::OCI_MANIFEST,
                "config": desc("application/vnd.oci.image.config.v1+json", &config, config_size),
                "layers": [desc(layer_type, &layer1, l1), desc(layer_type, &layer2, 5000)]}),
    );
    let (index, i_size) = put_json(
        &store,
        &json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX,
                "manifests": [desc(media::OCI_MANIFEST, &manifest, m_size)]}),
    );

    // An app: bundle (+ its bundle index), layers-meta, and a layer index.
    let (bundle_index, _) = put_json(&store, &json!({"docker-compose.yml": layer1.to_string()}));
    let (bundle, b_size) = put_blob(&store, &content(22, 1234));
    let (meta, meta_size) = put_json(&store, &json!({"amd64": {"fs_block_size": 4096}}));
    let absent_arm_layer = Digest::of(b"arm64 layer, never fetched");
    let (layer_index, li_size) = put_json(
        &store,
        &json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX,
                "layers": [desc(layer_type, &layer1, l1), desc(layer_type, &absent_arm_layer, 9)],
                "annotations": {"compose-app-layers": "v1"}}),
    );
    let mut bundle_desc = desc("application/octet-stream", &bundle, b_size);
    bundle_desc["annotations"] = json!({
        "org.foundries.app.bundle.index.digest": bundle_index.to_string(),
        "org.foundries.app.bundle.index.size": "42"});
    let mut meta_desc = desc("application/json", &meta, meta_size);
    meta_desc["annotations"] = json!({"layers-meta": "v1"});
    let empty = Digest::of(b"{}");
    store.put_bytes(&empty, b"{}").unwrap();
    let (app, app_size) = put_json(
        &store,
        &json!({"schemaVersion": 2, "mediaType": media::OCI_MANIFEST,
                "artifactType": "application/vnd.fio+compose-app",
                "config": desc("application/vnd.oci.empty.v1+json", &empty, 2),
                "layers": [bundle_desc, meta_desc],
                "manifests": [desc(media::OCI_INDEX, &layer_index, li_size)],
                "annotations": {"compose-app": "v1"}}),
    );
    store
        .set_ref("app", media::OCI_MANIFEST, &app, app_size)
        .unwrap();
    store
        .set_ref("image", media::OCI_INDEX, &index, i_size)
        .unwrap();

    // A previous version kept for rollback, reachable only as an extra root.
    let (extra_root_config, xc_size) = put_json(&store, &json!({"architecture": "arm64"}));
    let (extra_root, _) = put_json(
        &store,
        &json!({"schemaVersion": 2, "mediaType": media::OCI_MANIFEST,
                "config": desc("application/vnd.oci.image.config.v1+json", &extra_root_config, xc_size),
                "layers": []}),
    );
    let garbage = vec![
        put_blob(&store, &content(30, 700)).0,
        put_blob(&store, &content(31, 800)).0,
    ];

    // A partial download of the missing layer (wanted) and of garbage.
    let mut partial = store.ingest(&layer2, 5000).unwrap();
    partial.write_all(&content(21, 5000)[..2000]).unwrap();
    drop(partial);
    let stale_partial = Digest::of(b"something no app wants");
    let mut partial = store.ingest(&stale_partial, 100).unwrap();
    partial.write_all(&[0; 60]).unwrap();
    drop(partial);

    PopulatedStore {
        store,
        _dir: dir,
        app: vec![
            app,
            empty,
            bundle,
            bundle_index,
            meta,
            layer_index,
            layer1.clone(),
        ],
        image: vec![index, manifest, config.clone(), layer1],
        image_config: config,
        extra_root,
        extra_root_config,
        garbage,
        wanted_partial: layer2,
        stale_partial,
    }
}

#[test]
fn prune_keeps_what_apps_reach_and_a_dry_run_deletes_nothing() {
    let s = populated_store();
    let store = &s.store;
    let blobs_before = store.list().unwrap();
    let extra: HashSet<Digest> = [s.extra_root.clone()].into();

    let dry = store.prune(true, &extra).unwrap();
    let would_remove: HashSet<_> = dry.removed.iter().map(|(d, _)| d.clone()).collect();
    assert_eq!(would_remove, s.garbage.iter().cloned().collect());
    assert_eq!(dry.freed_bytes, 1500);
    assert_eq!(
        dry.stale_ingests_removed,
        vec![(s.stale_partial.clone(), 60)]
    );
    assert_eq!(
        store.list().unwrap(),
        blobs_before,
        "a dry run deleted something"
    );
    assert_eq!(store.ingests().unwrap().len(), 2);

    let _lock = store.lock(LockMode::Exclusive).unwrap();
    let report = store.prune(false, &extra).unwrap();
    assert_eq!(report.removed, dry.removed);
    for digest in s.app.iter().chain(&s.image) {
        assert!(store.has(digest), "{digest} was pruned but an app needs it");
    }
    assert!(store.has(&s.extra_root) && store.has(&s.extra_root_config));
    assert!(s.garbage.iter().all(|d| !store.has(d)));
    let partials: Vec<_> = store
        .ingests()
        .unwrap()
        .into_iter()
        .map(|i| i.digest)
        .collect();
    assert_eq!(partials, vec![s.wanted_partial.clone()]);

    // Forgetting the image and the rollback copy frees what only they used.
    store.remove_ref("image").unwrap();
    let report = store.prune(false, &HashSet::new()).unwrap();
    let removed: HashSet<_> = report.removed.into_iter().map(|(d, _)| d).collect();
    let expected: HashSet<_> = [
        s.image[0].clone(),
        s.image[1].clone(),
        s.image_config.clone(),
        s.extra_root.clone(),
        s.extra_root_config.clone(),
    ]
    .into();
    assert_eq!(removed, expected);
    // The layer shared with the app stays; the missing layer's partial goes.
    assert!(store.has(&s.image[3]));
    assert!(store.ingests().unwrap().is_empty());
}

#[test]
fn prune_keeps_the_docker_manifest_an_oci_form_was_made_from() {
    let dir = temp_dir("stowage-store-prune-source-");
    let store = Store::open(dir.path()).unwrap();
    let (config, config_size) = put_json(&store, &json!({"architecture": "amd64"}));
    let (layer, layer_size) = put_blob(&store, &content(40, 3000));
    // The manifest the registry served, which the compose file pins (here
    // through an index, which is not stored: the device needs one platform).
    let (served, _) = put_json(
        &store,
        &json!({"schemaVersion": 2, "mediaType": media::DOCKER_MANIFEST,
                "config": desc("application/vnd.docker.container.image.v1+json", &config, config_size),
                "layers": [desc("application/vnd.docker.image.rootfs.diff.tar.gzip", &layer, layer_size)]}),
    );
    let (oci_form, oci_size) = put_json(
        &store,
        &json!({"schemaVersion": 2, "mediaType": media::OCI_MANIFEST,
                "config": desc("application/vnd.oci.image.config.v1+json", &config, config_size),
                "layers": [desc("application/vnd.oci.image.layer.v1.tar+gzip", &layer, layer_size)],
                "annotations": {SOURCE_MANIFEST_ANNOTATION: served.to_string()}}),
    );
    let index_pin = Digest::of(b"an index the device never stored");
    store
        .set_ref(
            &format!("registry.local/shop/web@{index_pin}"),
            media::OCI_MANIFEST,
            &oci_form,
            oci_size,
        )
        .unwrap();
    let _lock = store.lock(LockMode::Exclusive).unwrap();
    let report = store.prune(false, &HashSet::new()).unwrap();
    assert!(report.removed.is_empty(), "{:?}", report.removed);
    for digest in [&served, &oci_form, &config, &layer] {
        assert!(store.has(digest), "{digest} was pruned");
    }
}

#[test]
fn reachable_tolerates_an_app_fetched_in_part() {
    let s = populated_store();
    let reachable = s.store.reachable().unwrap();
    for digest in s.app.iter().chain(&s.image) {
        assert!(reachable.contains(digest));
    }
    assert!(reachable.contains(&s.wanted_partial));
    assert!(!reachable.contains(&s.extra_root));
    assert!(s.garbage.iter().all(|d| !reachable.contains(d)));
}

// ---- fsck ----------------------------------------------------------------------

fn tamper(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(path).unwrap();
    change(&mut bytes);
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o444)).unwrap();
}

#[test]
fn fsck_finds_a_flipped_byte_and_moves_the_blob_aside() {
    let s = populated_store();
    let store = &s.store;
    let clean = store.fsck(false).unwrap();
    assert!(clean.is_clean(), "{clean:?}");
    assert_eq!(clean.checked, store.list().unwrap().len());

    let victim = s.image[3].clone(); // a layer, same size after the flip
    tamper(&store.blob_path(&victim), |b| b[1234] ^= 0x01);
    let quick = store.fsck(true).unwrap();
    assert!(
        quick.corrupt.is_empty(),
        "a quick check only compares sizes"
    );

    let report = store.fsck(false).unwrap();
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    let found = &report.corrupt[0];
    assert_eq!(found.digest, victim);
    assert!(found.reason.contains("hashes to"), "{}", found.reason);
    assert!(found.moved_to.starts_with(store.corrupt_dir()));
    assert!(found.moved_to.exists());
    assert!(!store.has(&victim));
    assert!(store.fsck(false).unwrap().is_clean());
}

#[test]
fn quick_fsck_catches_a_truncated_blob_and_stray_files() {
    let s = populated_store();
    let store = &s.store;
    let victim = s.image[3].clone();
    tamper(&store.blob_path(&victim), |b| b.truncate(100));
    fs::write(
        store.blob_path(&victim).with_file_name("not-a-digest"),
        b"?",
    )
    .unwrap();

    let report = store.fsck(true).unwrap();
    assert_eq!(report.bytes_hashed, 0);
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    assert_eq!(report.corrupt[0].digest, victim);
    assert!(
        report.corrupt[0]
            .reason
            .contains("100 bytes, but referenced as 4000")
    );
    assert_eq!(report.moved_aside.len(), 1);
    assert!(report.moved_aside[0].moved_to.ends_with("not-a-digest"));
}

#[test]
fn fsck_moves_a_corrupt_manifest_aside_and_reports_the_ref_it_broke() {
    let s = populated_store();
    let store = &s.store;
    let app = s.app[0].clone();
    tamper(&store.blob_path(&app), |b| {
        let last = b.len() - 1;
        b[last] = b'x';
    });
    let err = store.prune(true, &HashSet::new()).unwrap_err();
    assert!(err.to_string().contains("stowage fsck"), "{err}");

    let report = store.fsck(true).unwrap();
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.corrupt[0].digest, app);
    assert_eq!(report.missing_ref_targets, vec![("app".to_string(), app)]);
}

#[test]
fn a_broken_index_is_refused_with_the_remedy_and_fsck_repairs_it() {
    let dir = temp_dir("stowage-store-brokenindex-");
    let store = Store::open(dir.path()).unwrap();
    let (kept, _) = put_blob(&store, b"a blob");
    let index = dir.path().join("store/index.json");
    fs::write(&index, b"{ not json").unwrap();

    let err = Store::open(dir.path()).unwrap_err();
    let message = err.to_string();
    assert!(message.contains(&index.display().to_string()), "{message}");
    assert!(message.contains("stowage fsck"), "{message}");

    let repair = Store::open_for_repair(dir.path()).unwrap();
    let report = repair.fsck(false).unwrap();
    assert_eq!(report.moved_aside.len(), 1);
    assert_eq!(report.moved_aside[0].path, index);
    assert_eq!(
        fs::read(&report.moved_aside[0].moved_to).unwrap(),
        b"{ not json"
    );
    let store = Store::open(dir.path()).unwrap();
    assert!(store.refs().unwrap().is_empty());
    assert!(store.has(&kept));
}

// ---- Scale -------------------------------------------------------------------

/// How fast lookups are is measured by `scripts/bench.sh` (check on a store
/// of 10,000 blobs); here, that a store that large answers every one right.
#[test]
fn a_store_of_ten_thousand_blobs_finds_each_by_digest_and_lists_them_all() {
    let dir = temp_dir("stowage-store-tenk-");
    let store = Store::open(dir.path()).unwrap();
    let mut digests = Vec::new();
    for i in 0..10_000u32 {
        let bytes = i.to_le_bytes();
        let digest = Digest::of(&bytes);
        // Written directly: 10,000 fsyncs would only slow the test.
        fs::write(store.blob_path(&digest), bytes).unwrap();
        digests.push(digest);
    }

    assert!(digests.iter().all(|d| store.has(d)));
    assert!(digests.iter().all(|d| store.size(d) == Some(4)));
    assert!(!store.has(&Digest::of(b"not among them")));
    let listed: HashSet<Digest> = store.list().unwrap().into_iter().map(|(d, _)| d).collect();
    assert_eq!(listed, digests.into_iter().collect());
}

// ---- Interoperability --------------------------------------------------------

#[test]
fn an_image_stored_through_the_api_is_read_by_skopeo() {
    let dir = temp_dir("stowage-store-skopeo-");
    let image = busybox_image(&format!("stowage-store-test/{}:v1", unique("skopeo")));
    let exported = dir.path().join("exported");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &format!("docker-daemon:{}", image.tag()),
        &format!("oci:{}:img", exported.display()),
    ]));

    // Copy the image blob by blob through the store's API, as a pull would.
    let root = dir.path().join("root");
    let store = Store::open(&root).unwrap();
    let exported_index: Value =
        serde_json::from_slice(&fs::read(exported.join("index.json")).unwrap()).unwrap();
    let top = &exported_index["manifests"][0];
    let manifest_digest: Digest = top["digest"].as_str().unwrap().parse().unwrap();
    let exported_blob = |d: &Digest| exported.join("blobs/sha256").join(d.hex());
    let manifest_bytes = fs::read(exported_blob(&manifest_digest)).unwrap();
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    let config: Digest = manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    store
        .put_bytes(&config, &fs::read(exported_blob(&config)).unwrap())
        .unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let digest: Digest = layer["digest"].as_str().unwrap().parse().unwrap();
        let size = layer["size"].as_u64().unwrap();
        let bytes = fs::read(exported_blob(&digest)).unwrap();
        let mut ingest = store.ingest(&digest, size).unwrap();
        ingest.preallocate().unwrap();
        for chunk in bytes.chunks(64 * 1024) {
            ingest.write_all(chunk).unwrap();
        }
        ingest.commit().unwrap();
    }
    store.put_bytes(&manifest_digest, &manifest_bytes).unwrap();
    let media_type = top["mediaType"].as_str().unwrap_or(media::OCI_MANIFEST);
    store
        .set_ref(
            "busybox",
            media_type,
            &manifest_digest,
            manifest_bytes.len() as u64,
        )
        .unwrap();

    let store_ref = format!("oci:{}:busybox", store.layout_dir().display());
    let inspected: Value = serde_json::from_str(&run_ok(
        Command::new("skopeo").args(["inspect", &store_ref]),
    ))
    .unwrap();
    assert_eq!(inspected["Digest"], manifest_digest.to_string());
    assert_eq!(inspected["Layers"].as_array().unwrap().len(), 1);

    let out = dir.path().join("out");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &store_ref,
        &format!("oci:{}:x", out.display()),
    ]));
    let copied: Value = serde_json::from_slice(&fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        copied["manifests"][0]["digest"],
        manifest_digest.to_string()
    );

    // The store is whole and nothing in it is garbage.
    assert!(store.fsck(false).unwrap().is_clean());
    assert!(
        store
            .prune(true, &HashSet::new())
            .unwrap()
            .removed
            .is_empty()
    );
}
