//! The predicted disk usage of an image's layers matches what a real dockerd
//! takes when it loads the image into a fresh overlay2 data root on ext4.
//!
//! The story: a publisher builds an image of over a thousand files, stowage
//! analyses its layers, and a device that loads the image into an empty
//! Docker store sees the store grow by what stowage predicted, within 2%.
//!
//! The image is built by the machine's dockerd from a busybox rootfs made
//! here (nothing is pulled); the measurement uses a private dockerd whose
//! data root is a fresh loop-mounted ext4 volume with 4096-byte blocks.
//! Everything started here is stopped, and everything mounted is unmounted,
//! by the harness's guards, whatever the outcome.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use stowage::app::layer::{self, Compression, LayerStats};

use crate::common::{
    LoopVolume, PrivateDockerd, Rng, build_from_context, busybox_image, noise, run_ok, temp_dir,
    unique,
};

const BLOCK_SIZE: u64 = 4096;

#[test]
fn predicted_usage_matches_the_growth_of_a_fresh_docker_store() {
    let started = Instant::now();
    let id = unique("usage");
    let work = temp_dir("stowage-usage-");

    // An image of busybox plus a COPY of a generated tree of 1,400 files.
    let files = generate_tree(&work.path().join("ctx/layer0/tree"));
    assert!(files > 1000, "only {files} files generated");
    println!("{files} files generated at {:?}", started.elapsed());
    let base = busybox_image(&format!("{id}-base:1"));
    let app = build_from_context(
        &format!("{id}-app:1"),
        base.tag(),
        &work.path().join("ctx"),
        &["layer0".to_string()],
        "",
    );
    println!("image built at {:?}", started.elapsed());
    let save = work.path().join("image.tar");
    run_ok(
        Command::new("docker")
            .args(["save", "-o"])
            .arg(&save)
            .arg(app.tag()),
    );

    // What stowage predicts, from the layers of the save archive.
    let saved = work.path().join("saved");
    tar::Archive::new(fs::File::open(&save).expect("open save"))
        .unpack(&saved)
        .expect("unpack save");
    let (config_path, layer_paths) = read_save_manifest(&saved);
    let config_len = fs::metadata(saved.join(&config_path))
        .expect("config")
        .len();
    let stats: Vec<LayerStats> = layer_paths
        .iter()
        .map(|p| {
            let file = fs::File::open(saved.join(p)).expect("open layer");
            layer::analyze_layer(file).expect("analyze layer")
        })
        .collect();
    println!("layers analysed at {:?}", started.elapsed());
    assert_eq!(stats.len(), 2, "busybox layer and COPY layer");
    for s in &stats {
        println!(
            "layer {}: tar {} bytes, {} entries, size {}, inodes {}, usage {:?}",
            s.diff_id.short(),
            s.tar_size,
            s.entries,
            s.size,
            s.inodes,
            s.usage_by_block_size
        );
    }
    let copy_layer = &stats[1];
    assert!(copy_layer.entries > 1000, "{}", copy_layer.entries);

    // The same layer gzip'd gives the same figures but its own archive digest.
    // (The system gzip: flate2's encoder is slow in a debug build.)
    let gz_path = work.path().join("layer.tar.gz");
    let status = Command::new("gzip")
        .args(["-1", "-c"])
        .arg(saved.join(&layer_paths[1]))
        .stdout(fs::File::create(&gz_path).expect("create gz"))
        .status()
        .expect("gzip");
    assert!(status.success());
    let gz_stats = layer::analyze_layer(fs::File::open(&gz_path).expect("gz")).expect("gz");
    assert_eq!(gz_stats.compression, Compression::Gzip);
    assert_eq!(gz_stats.archive_size, fs::metadata(&gz_path).unwrap().len());
    assert_ne!(gz_stats.archive_digest, copy_layer.archive_digest);
    println!("gzip'd layer analysed at {:?}", started.elapsed());
    assert_eq!(
        LayerStats {
            archive_digest: copy_layer.archive_digest.clone(),
            archive_size: copy_layer.archive_size,
            compression: Compression::None,
            ..gz_stats
        },
        *copy_layer
    );

    // What the Docker store really grows by.
    let volume = LoopVolume::with_options(2048, BLOCK_SIZE as u32, None);
    println!("volume made at {:?}", started.elapsed());
    let daemon = PrivateDockerd::start(&volume.path().join("docker"));
    println!("private dockerd up at {:?}", started.elapsed());
    let before = volume.synced_stats();
    run_ok(daemon.docker().args(["load", "-i"]).arg(&save));
    let after = volume.synced_stats();
    println!("image loaded at {:?}", started.elapsed());

    let real_bytes = after.used_bytes() - before.used_bytes();
    let real_inodes = after.used_inodes() - before.used_inodes();
    let predicted_bytes: u64 =
        stats.iter().map(LayerStats::usage).sum::<u64>() + config_len.next_multiple_of(BLOCK_SIZE);
    let predicted_inodes: u64 = stats.iter().map(|s| s.inodes).sum::<u64>() + 1;
    let byte_error = relative_error(predicted_bytes, real_bytes);
    let inode_error = relative_error(predicted_inodes, real_inodes);
    println!(
        "bytes: predicted {predicted_bytes}, real growth {real_bytes}, error {:+.3}%",
        byte_error * 100.0
    );
    println!(
        "inodes: predicted {predicted_inodes}, real growth {real_inodes}, error {:+.3}%",
        inode_error * 100.0
    );
    assert!(
        byte_error.abs() < 0.02,
        "usage off by {:.3}%",
        byte_error * 100.0
    );
    assert!(
        inode_error.abs() < 0.02,
        "inodes off by {:.3}%",
        inode_error * 100.0
    );
    drop(daemon);
    drop(volume);
    drop(app);
    drop(base);
}

fn relative_error(predicted: u64, real: u64) -> f64 {
    (predicted as f64 - real as f64) / real as f64
}

/// A tree like an application's: nested directories of files from empty to
/// a few MB, one directory of 500 entries (an htree), symlinks short and
/// long, and a hard link. Returns the number of regular files.
fn generate_tree(root: &Path) -> usize {
    let mut rng = Rng::new(0x5eed_cafe_f00d_1234);
    let sizes = [
        0u64, 1, 100, 1000, 4095, 4096, 4097, 10_000, 50_000, 200_000, 700_000,
    ];
    let mut files = 0;
    // Incompressible content, cut at random offsets from one pool.
    let pool: Vec<u8> = noise(rng.next_u64(), 1 << 20);
    let write = |path: PathBuf, size: u64, rng: &mut Rng| {
        let start = rng.below((pool.len() as u64 - size).max(1)) as usize;
        fs::write(path, &pool[start..start + size as usize]).expect("write file");
    };
    for a in 0..6 {
        for b in 0..8 {
            let dir = root.join(format!("dir{a}/sub{b}/leaf"));
            fs::create_dir_all(&dir).expect("mkdir");
            for c in 0..20 {
                let size = if c % 3 == 0 {
                    rng.below(70_000)
                } else {
                    sizes[rng.below(sizes.len() as u64) as usize]
                };
                let pad = "x".repeat(rng.below(30) as usize);
                write(dir.join(format!("file_{c:03}_{pad}.dat")), size, &mut rng);
                files += 1;
            }
        }
    }
    let big = root.join("bigdir");
    fs::create_dir_all(&big).expect("mkdir");
    let mut first_big_file = PathBuf::new();
    for c in 0..500 {
        let pad = "y".repeat(rng.below(40) as usize);
        let size = rng.below(9000);
        let path = big.join(format!("entry-{c:05}-{pad}"));
        if c == 0 {
            first_big_file = path.clone();
        }
        write(path, size, &mut rng);
        files += 1;
    }
    std::os::unix::fs::symlink("bigdir", root.join("short-link")).expect("symlink");
    std::os::unix::fs::symlink(format!("/{}", "l".repeat(80)), root.join("long-link"))
        .expect("symlink");
    fs::hard_link(&first_big_file, root.join("hard-link")).expect("hard link");
    files
}

/// The config path and the layer paths, in order, of a `docker save` archive.
fn read_save_manifest(saved: &Path) -> (String, Vec<String>) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(saved.join("manifest.json")).expect("manifest.json"))
            .expect("manifest.json is JSON");
    let image = &manifest[0];
    let config = image["Config"].as_str().expect("Config").to_string();
    let layers = image["Layers"]
        .as_array()
        .expect("Layers")
        .iter()
        .map(|l| l.as_str().expect("layer path").to_string())
        .collect();
    (config, layers)
}
