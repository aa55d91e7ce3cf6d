//! Unit tests of the store's internals: resume paths and checkpoints. The
//! user-level stories live in `tests/it/store.rs`.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

static COUNTER: AtomicU64 = AtomicU64::new(0);

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "stowage-store-unit-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn resume_rehashes_only_what_came_after_the_checkpoint() {
    let dir = Scratch::new("ckpt");
    let store = Store::open(&dir.0).unwrap();
    let blob = content(3 * 1024 * 1024 + 17);
    let digest = Digest::of(&blob);

    let mut ingest = store.ingest(&digest, blob.len() as u64).unwrap();
    ingest.write_all(&blob[..2_000_001]).unwrap();
    ingest.checkpoint().unwrap();
    ingest.write_all(&blob[2_000_001..2_500_000]).unwrap();
    // As if killed: no checkpoint on the way out.
    ingest.vanish_without_checkpoint();

    let mut resumed = store.ingest(&digest, blob.len() as u64).unwrap();
    assert_eq!(resumed.offset(), 2_500_000);
    assert_eq!(resumed.rehashed_bytes(), 499_999);
    resumed.write_all(&blob[2_500_000..]).unwrap();
    resumed.commit().unwrap();
    assert_eq!(store.read_capped(&digest, 1 << 30).unwrap(), blob);
}

#[test]
fn resume_without_a_usable_checkpoint_rehashes_the_prefix_once() {
    let dir = Scratch::new("nockpt");
    let store = Store::open(&dir.0).unwrap();
    let blob = content(100_000);
    let digest = Digest::of(&blob);

    let mut ingest = store.ingest(&digest, blob.len() as u64).unwrap();
    ingest.write_all(&blob[..60_000]).unwrap();
    ingest.vanish_without_checkpoint();
    // A checkpoint that does not parse is ignored, not trusted.
    fs::write(
        store.ingest_dir().join(format!("{}.state", digest.hex())),
        b"{garbage",
    )
    .unwrap();

    let mut resumed = store.ingest(&digest, blob.len() as u64).unwrap();
    assert_eq!(resumed.offset(), 60_000);
    assert_eq!(resumed.rehashed_bytes(), 60_000);
    resumed.write_all(&blob[60_000..]).unwrap();
    resumed.commit().unwrap();
    assert!(store.has(&digest));
}

#[test]
fn a_checkpoint_past_the_end_of_the_data_is_not_trusted() {
    let dir = Scratch::new("short");
    let store = Store::open(&dir.0).unwrap();
    let blob = content(50_000);
    let digest = Digest::of(&blob);

    let mut ingest = store.ingest(&digest, blob.len() as u64).unwrap();
    ingest.write_all(&blob[..40_000]).unwrap();
    ingest.checkpoint().unwrap();
    ingest.vanish_without_checkpoint();
    // A power cut lost the tail although the checkpoint survived.
    let data = store.ingest_dir().join(digest.hex());
    fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(10_000)
        .unwrap();

    let mut resumed = store.ingest(&digest, blob.len() as u64).unwrap();
    assert_eq!(resumed.offset(), 10_000);
    assert_eq!(resumed.rehashed_bytes(), 10_000);
    resumed.write_all(&blob[10_000..]).unwrap();
    resumed.commit().unwrap();
}

#[test]
fn a_partial_file_longer_than_the_declared_size_starts_over() {
    let dir = Scratch::new("long");
    let store = Store::open(&dir.0).unwrap();
    let blob = content(1000);
    let digest = Digest::of(&blob);
    fs::write(store.ingest_dir().join(digest.hex()), content(5000)).unwrap();

    let ingest = store.ingest(&digest, blob.len() as u64).unwrap();
    assert_eq!(ingest.offset(), 0);
    assert_eq!(store.partial_bytes(&digest), 0);
}

#[test]
fn dropping_an_ingest_checkpoints_it() {
    let dir = Scratch::new("drop");
    let store = Store::open(&dir.0).unwrap();
    let blob = content(10_000);
    let digest = Digest::of(&blob);
    let mut ingest = store.ingest(&digest, blob.len() as u64).unwrap();
    ingest.write_all(&blob[..7_000]).unwrap();
    drop(ingest);
    let resumed = store.ingest(&digest, blob.len() as u64).unwrap();
    assert_eq!(resumed.offset(), 7_000);
    assert_eq!(resumed.rehashed_bytes(), 0);
}

#[test]
fn store_and_ingest_can_move_between_threads() {
    fn assert_send<T: Send + 'static>() {}
    fn assert_sync<T: Sync>() {}
    assert_send::<Store>();
    assert_sync::<Store>();
    assert_send::<Ingest>();
    assert_send::<StoreLock>();
}
