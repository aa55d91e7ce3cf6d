//! Loading images into the real dockerd from blob files, and running them
//! with the real docker-compose. Images are built locally (never pulled),
//! copied out as a store would hold them (`skopeo copy` into an OCI layout,
//! compressed), removed from Docker, then loaded back through `load_image`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;

use crate::common::docker_device::LocalImages;
use crate::common::{
    AppCleanup, LocalImage, busybox_image_of_its_own, noise, run_ok, test_seed, unique,
};
use stowage::Digest;
use stowage::engine::compose::{Compose, ComposeError, ps, write_image_override};
use stowage::engine::docker::{
    DockerEngine, DockerError, ImageToLoad, LayerSource, layers_to_send, local_tag_for,
};
use stowage::plan::held::{intermediate_config_len, load_temp_bytes, sent_compressed};

fn docker(args: &[&str]) -> String {
    run_ok(Command::new("docker").args(args)).trim().to_string()
}

/// Removes, when the test ends however it ends, every compose project and
/// image tag the test made (containers first, then images newest first).
#[derive(Default)]
struct Cleanup {
    projects: Vec<AppCleanup>,
    images: LocalImages,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.projects.clear();
    }
}

/// A fresh base image: busybox plus a file that makes its layer unique to
/// this test, so that parallel tests never share layers.
fn build_base(tag: &str, cleanup: &mut Cleanup) {
    cleanup.images.0.push(busybox_image_of_its_own(tag));
}

/// `FROM base` plus one COPY layer per file given (absolute paths).
fn build_app(base: &str, tag: &str, files: &[(&str, Vec<u8>)], cleanup: &mut Cleanup) {
    cleanup.images.build(tag, base, files);
}

/// An image as the blob store would hold it: an OCI layout written by skopeo.
struct StoredImage {
    manifest_digest: Digest,
    config: Vec<u8>,
    config_digest: Digest,
    layers: Vec<LayerSource>,
}

fn export(image: &str, layout: &Path, compression: &str) -> StoredImage {
    run_ok(Command::new("skopeo").args([
        "copy",
        "-q",
        "--dest-compress",
        "--dest-compress-format",
        compression,
        &format!("docker-daemon:{image}"),
        &format!("oci:{}:img", layout.display()),
    ]));
    let blob = |digest: &str| layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&manifest_digest)).unwrap()).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config = std::fs::read(blob(config_digest)).unwrap();
    let config_json: serde_json::Value = serde_json::from_slice(&config).unwrap();
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(config_json["rootfs"]["diff_ids"].as_array().unwrap())
        .map(|(layer, diff_id)| LayerSource {
            diff_id: diff_id.as_str().unwrap().parse().unwrap(),
            blob_path: blob(layer["digest"].as_str().unwrap()),
            media_type: layer["mediaType"].as_str().unwrap().to_string(),
            tar_size: None,
        })
        .collect();
    StoredImage {
        manifest_digest: manifest_digest.parse().unwrap(),
        config_digest: config_digest.parse().unwrap(),
        config,
        layers,
    }
}

fn uncompressed_size(layer: &LayerSource) -> u64 {
    let file = std::fs::File::open(&layer.blob_path).unwrap();
    let mut reader: Box<dyn std::io::Read> = if layer.media_type.ends_with("zstd") {
        Box::new(zstd::stream::read::Decoder::new(file).unwrap())
    } else {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    };
    std::io::copy(&mut reader, &mut std::io::sink()).unwrap()
}

fn to_load(stored: &StoredImage, tag: &str) -> ImageToLoad {
    ImageToLoad {
        config: stored.config.clone(),
        config_digest: stored.config_digest.clone(),
        repo_tags: vec![tag.to_string()],
        layers: stored.layers.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_load_from_compressed_blobs_run_and_share_their_base() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let seed = test_seed();
    let name = unique("stowage-test-load");
    let base = format!("{name}/base:1");
    let (app1, app2) = (format!("{name}/app1:1"), format!("{name}/app2:1"));
    build_base(&base, &mut cleanup);
    build_app(
        &base,
        &app1,
        &[
            ("/one.bin", noise(seed, 2_000_000)),
            ("/two.txt", b"two".to_vec()),
        ],
        &mut cleanup,
    );
    build_app(
        &base,
        &app2,
        &[("/three.txt", name.clone().into_bytes())],
        &mut cleanup,
    );
    let stored1 = export(&app1, &dir.path().join("oci1"), "gzip");
    let mut stored2 = export(&app2, &dir.path().join("oci2"), "zstd");
    // The second image's tar sizes are known, as stowage's layers-meta gives them.
    for layer in &mut stored2.layers {
        layer.tar_size = Some(uncompressed_size(layer));
    }
    docker(&["rmi", &app1, &app2, &base]);

    let engine = DockerEngine::connect(None).await.unwrap();
    let loaded1 = format!("{name}/loaded1:v1");
    let loaded2 = format!("{name}/loaded2:v1");
    cleanup.images.0.push(LocalImage::adopt(&loaded1));
    cleanup.images.0.push(LocalImage::adopt(&loaded2));

    let report = engine
        .load_image(&to_load(&stored1, &loaded1))
        .await
        .unwrap();
    assert_eq!((report.layers_sent, report.layers_skipped), (3, 0));
    // Uncompressed: the 2 MB of random bytes cannot shrink.
    assert!(report.bytes_sent > 2_000_000, "{report:?}");
    let image = engine.image_exists(&loaded1).await.unwrap().unwrap();
    assert_eq!(image.id, stored1.config_digest);
    docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        &loaded1,
        "cat",
        "/two.txt",
    ]);

    let held = engine.held_layers().await.unwrap();
    let diff_ids2: Vec<Digest> = stored2.layers.iter().map(|l| l.diff_id.clone()).collect();
    assert_eq!(
        held.held_prefix_len(&diff_ids2),
        1,
        "the shared base is held"
    );

    let report = engine
        .load_image(&to_load(&stored2, &loaded2))
        .await
        .unwrap();
    assert_eq!((report.layers_sent, report.layers_skipped), (1, 1));
    assert!(report.bytes_sent < 100_000, "{report:?}");
    assert_eq!(
        engine.image_exists(&loaded2).await.unwrap().unwrap().id,
        stored2.config_digest
    );
    assert_eq!(
        docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            &loaded2,
            "cat",
            "/three.txt"
        ]),
        name
    );

    // Loading an image the engine holds entirely sends no layer at all.
    let again = format!("{name}/loaded1:again");
    cleanup.images.0.push(LocalImage::adopt(&again));
    let report = engine.load_image(&to_load(&stored1, &again)).await.unwrap();
    assert_eq!((report.layers_sent, report.layers_skipped), (0, 3));
    assert_eq!(
        engine.image_exists(&again).await.unwrap().unwrap().id,
        stored1.config_digest
    );

    // Images are listed, measured and removed (never forced).
    let listed = engine.list_images().await.unwrap();
    assert!(listed.iter().any(|i| i.repo_tags.contains(&loaded2)));
    let usage = engine.image_disk_usage().await.unwrap();
    assert!(usage.total_bytes >= 2_000_000);
    assert!(usage.images.iter().any(|i| i.id == stored2.config_digest));
    engine.remove_image(&loaded2).await.unwrap();
    assert!(engine.image_exists(&loaded2).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_that_does_not_match_its_diff_id_fails_the_load_and_leaves_no_image() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let seed = test_seed();
    let name = unique("stowage-test-corrupt");
    let base = format!("{name}/base:1");
    let app = format!("{name}/app:1");
    build_base(&base, &mut cleanup);
    build_app(
        &base,
        &app,
        &[("/big.bin", noise(seed, 3_000_000))],
        &mut cleanup,
    );
    let mut stored = export(&app, &dir.path().join("oci"), "gzip");
    docker(&["rmi", &app, &base]);

    // The store's blob for the top layer holds other bytes: a valid gzip'd
    // tar, but not the one the config names.
    let other = dir.path().join("other.tar.gz");
    {
        let file = std::fs::File::create(&other).unwrap();
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        let bytes = noise(seed, 3_000_000);
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "big.bin", &bytes[..]).unwrap();
        tar.into_inner().unwrap().finish().unwrap();
    }
    stored.layers[1].blob_path = other;

    let engine = DockerEngine::connect(None).await.unwrap();
    let tag = format!("{name}/loaded:v1");
    cleanup.images.0.push(LocalImage::adopt(&tag));
    let error = engine
        .load_image(&to_load(&stored, &tag))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, DockerError::LayerDigestMismatch { diff_id, .. } if *diff_id == stored.layers[1].diff_id),
        "{error}"
    );
    assert!(
        error.to_string().contains("does not match its diff_id"),
        "{error}"
    );
    assert!(engine.image_exists(&tag).await.unwrap().is_none());
    assert!(
        engine
            .image_exists(&stored.config_digest.to_string())
            .await
            .unwrap()
            .is_none()
    );

    // With the right layers but a config the engine refuses (an image for
    // another operating system), the engine's error, sent inside its 200
    // answer, fails the load.
    stored.layers[1].blob_path = export_path_of_top_layer(&dir.path().join("oci"));
    let mut config: serde_json::Value = serde_json::from_slice(&stored.config).unwrap();
    config["os"] = "windows".into();
    let config = serde_json::to_vec(&config).unwrap();
    let refused = ImageToLoad {
        config_digest: Digest::of(&config),
        config,
        ..to_load(&stored, &tag)
    };
    let error = engine.load_image(&refused).await.unwrap_err();
    assert!(
        matches!(&error, DockerError::LoadRefused { message, .. } if message.contains("windows")),
        "{error}"
    );
    assert!(engine.image_exists(&tag).await.unwrap().is_none());
}

/// The blob of the last layer in an exported layout.
fn export_path_of_top_layer(layout: &Path) -> PathBuf {
    let blob = |digest: &str| layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    blob(layers[layers.len() - 1]["digest"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_temporary_copy_is_what_load_temp_bytes_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let seed = test_seed();
    let name = unique("stowage-test-temp");
    let base = format!("{name}/base:1");
    let app = format!("{name}/app:1");
    build_base(&base, &mut cleanup);
    build_app(
        &base,
        &app,
        &[("/big.bin", noise(seed, 40_000_000))],
        &mut cleanup,
    );
    let mut stored = export(&app, &dir.path().join("oci"), "gzip");
    for layer in &mut stored.layers {
        layer.tar_size = Some(uncompressed_size(layer));
    }
    docker(&["rmi", &app, &base]);

    let engine = DockerEngine::connect(None).await.unwrap();
    let tmp = engine.info().await.unwrap().data_root.join("tmp");
    let tag = format!("{name}/loaded:v1");
    cleanup.images.0.push(LocalImage::adopt(&tag));

    // What the space check would plan: the layers to send and their sizes.
    let held = engine.held_layers().await.unwrap();
    let to_send = layers_to_send(&held, &stored.layers).to_vec();
    assert_eq!(to_send.len(), 2);

    // Watch the engine's import directories while the load runs; keep the
    // largest size any one of them reached.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if let Ok(entries) = std::fs::read_dir(&tmp) {
                    for entry in entries.flatten() {
                        if entry
                            .file_name()
                            .to_string_lossy()
                            .starts_with("docker-import-")
                        {
                            peak = peak.max(disk_usage(&entry.path()));
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak
        })
    };
    let report = engine.load_image(&to_load(&stored, &tag)).await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let peak = watcher.join().unwrap();
    assert_eq!(report.layers_sent, 2);

    // One layer per load: the first under an intermediate config, the last
    // under the image's own; each copy is the layer's file as sent (the
    // blob for a gzip layer, else the tar).
    let sent = |l: &LayerSource| {
        if sent_compressed(&l.media_type) {
            std::fs::metadata(&l.blob_path).unwrap().len()
        } else {
            l.tar_size.unwrap()
        }
    };
    let predicted = load_temp_bytes(&[sent(&to_send[0])], intermediate_config_len(1), 4096).max(
        load_temp_bytes(&[sent(&to_send[1])], stored.config.len() as u64, 4096),
    );
    eprintln!("engine temporary copy: peak {peak} bytes, predicted {predicted}; load {report:?}");
    // No intermediate image is left behind.
    let label = format!("label=org.stowage.intermediate={}", stored.config_digest);
    assert_eq!(docker(&["images", "-aq", "--filter", &label]), "");
    // The watcher may miss the last directory blocks; the layers dominate.
    assert!(
        peak <= predicted && peak as f64 >= predicted as f64 * 0.98,
        "peak {peak}, predicted {predicted}"
    );
}

/// Bytes a directory tree takes on disk (allocated blocks).
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir()
        && let Ok(entries) = std::fs::read_dir(path)
    {
        for entry in entries.flatten() {
            total += disk_usage(&entry.path());
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_pinned_compose_app_runs_on_the_loaded_image_without_a_registry() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let name = unique("stowage-test-compose");
    let base = format!("{name}/base:1");
    let app = format!("{name}/app:1");
    build_base(&base, &mut cleanup);
    build_app(
        &base,
        &app,
        &[("/hello.txt", b"hello".to_vec())],
        &mut cleanup,
    );
    let stored = export(&app, &dir.path().join("oci"), "gzip");
    docker(&["rmi", &app, &base]);

    // The bundled compose file pins the image by digest at a registry that
    // does not exist: any pull would fail.
    let pinned = format!(
        "registry.invalid:5000/{name}/app@{}",
        stored.manifest_digest
    );
    let project_dir = dir.path().join("app");
    std::fs::create_dir_all(&project_dir).unwrap();
    let compose_file = project_dir.join("docker-compose.yml");
    std::fs::write(
        &compose_file,
        format!(
            "version: '3.8'\nservices:\n  web:\n    image: {pinned}\n    command: [\"sleep\", \"600\"]\n"
        ),
    )
    .unwrap();
    let local = local_tag_for(&pinned).unwrap();
    let override_file = project_dir.join("docker-compose.stowage.yml");
    write_image_override(
        &compose_file,
        &override_file,
        &BTreeMap::from([("web".to_string(), local.clone())]),
    )
    .unwrap();
    let files = vec![compose_file.clone(), override_file.clone()];
    let project = name.replace(['-'], "");
    cleanup.projects.push(AppCleanup {
        project: project.clone(),
        repo_prefix: format!("registry.invalid:5000/{name}/"),
    });
    cleanup.images.0.push(LocalImage::adopt(&local));

    let engine = DockerEngine::connect(None).await.unwrap();
    let compose = Compose::detect().await.unwrap();

    // Before the image is loaded, up refuses instead of letting compose pull.
    let error = compose
        .up(&engine, &project_dir, &project, &files)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ComposeError::ImageMissing { service, image, .. } if service == "web" && *image == local),
        "{error}"
    );

    engine.load_image(&to_load(&stored, &local)).await.unwrap();
    compose
        .up(&engine, &project_dir, &project, &files)
        .await
        .unwrap();
    let states = ps(&engine, &project).await.unwrap();
    assert_eq!(states.len(), 1, "{states:?}");
    assert_eq!(states[0].service, "web");
    assert_eq!(states[0].state, "running");
    assert_eq!(states[0].health, None);
    let image = engine.image_exists(&local).await.unwrap().unwrap();
    assert_eq!(
        engine.containers_using(&image.id).await.unwrap(),
        vec![states[0].container.clone()]
    );

    compose.down(&project_dir, &project, &files).await.unwrap();
    assert!(ps(&engine, &project).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_engine_that_is_not_there_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("no-docker.sock");
    let host = format!("unix://{}", socket.display());
    let error = DockerEngine::connect(Some(&host)).await.err().unwrap();
    assert!(
        error.to_string().contains(&socket.display().to_string()),
        "{error}"
    );

    // A socket nobody answers on.
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    drop(_listener);
    let error = DockerEngine::connect(Some(&host)).await.err().unwrap();
    assert!(error.to_string().contains(&host), "{error}");
}

#[tokio::test]
async fn the_engine_is_reached_at_the_api_version_it_speaks() {
    let engine = DockerEngine::connect(None).await.unwrap();
    engine.ping().await.unwrap();
    let info = engine.info().await.unwrap();
    let served = docker(&["version", "--format", "{{.Server.APIVersion}}"]);
    assert_eq!(info.api_version, served);
    assert_eq!(
        info.data_root,
        PathBuf::from(docker(&["info", "--format", "{{.DockerRootDir}}"]))
    );
    assert_eq!(
        info.storage_driver,
        docker(&["info", "--format", "{{.Driver}}"])
    );
}

#[tokio::test]
async fn the_cached_image_layers_follow_the_engine_as_images_come_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let seed = test_seed();
    let base = format!("{}:1", unique("stowage-cache-base"));
    build_base(&base, &mut cleanup);
    let app = format!("{}:1", unique("stowage-cache-app"));
    build_app(
        &base,
        &app,
        &[("/data.bin", noise(seed, 100_000))],
        &mut cleanup,
    );
    let diff_ids: Vec<Digest> = docker(&["inspect", "--format", "{{json .RootFS.Layers}}", &app])
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|d| d.trim_matches('"').parse().unwrap())
        .collect();
    assert_eq!(diff_ids.len(), 2);
    let app_id = docker(&["inspect", "--format", "{{.Id}}", &app]);
    let cache = dir.path().join("docker-layers.json");
    let cached = || -> BTreeMap<String, Vec<Digest>> {
        serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap()
    };
    let connect = || async {
        DockerEngine::connect(None)
            .await
            .unwrap()
            .with_layer_cache(cache.clone())
    };

    let held_len = |engine: DockerEngine, diff_ids: Vec<Digest>| async move {
        let held = engine.held_layers().await.unwrap();
        held.held_prefix_len(&diff_ids)
    };

    // A first look inspects every image and keeps what it learnt.
    assert_eq!(held_len(connect().await, diff_ids.clone()).await, 2);
    assert_eq!(cached().get(&app_id), Some(&diff_ids));

    // A later run reads the cache instead of inspecting: an entry planted
    // for the image is what it then believes.
    let planted: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
    let mut edited = cached();
    edited.insert(app_id.clone(), vec![planted.clone()]);
    std::fs::write(&cache, serde_json::to_vec(&edited).unwrap()).unwrap();
    let engine = connect().await;
    let held = engine.held_layers().await.unwrap();
    assert_eq!(held.held_prefix_len(std::slice::from_ref(&planted)), 1);

    // The image goes (and the builder's intermediate images with it): so do
    // its entry and its top layer; the base stays.
    docker(&["rmi", &app]);
    assert_eq!(held_len(engine.clone(), vec![planted]).await, 0);
    assert_eq!(held_len(engine, diff_ids.clone()).await, 1);
    assert!(!cached().contains_key(&app_id), "{:?}", cached().keys());

    // A cache file that cannot be read is an empty cache, not an error.
    std::fs::write(&cache, b"not json").unwrap();
    assert_eq!(held_len(connect().await, diff_ids.clone()).await, 1);
    assert!(cached().values().any(|l| l.first() == diff_ids.first()));
}
