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
//! by guards, whatever the outcome.
//!
//! The helpers below are private to this file for now; the shared test
//! harness will replace them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stowage::app::layer::{self, Compression, LayerStats};

const BLOCK_SIZE: u64 = 4096;

#[test]
fn predicted_usage_matches_the_growth_of_a_fresh_docker_store() {
    let started = Instant::now();
    let id = unique_id();
    let work = tempfile::Builder::new()
        .prefix("stowage-usage-")
        .tempdir()
        .expect("temp dir");

    // An image of busybox plus a COPY of a generated tree of 1,400 files.
    let files = generate_tree(&work.path().join("ctx/tree"));
    assert!(files > 1000, "only {files} files generated");
    println!("{files} files generated at {:?}", started.elapsed());
    let images = BuiltImages::build(&id, work.path());
    println!("image built at {:?}", started.elapsed());
    let save = work.path().join("image.tar");
    run(Command::new("docker")
        .args(["save", "-o"])
        .arg(&save)
        .arg(&images.app));

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
    let volume = LoopVolume::create(&id, work.path(), BLOCK_SIZE);
    println!("volume made at {:?}", started.elapsed());
    let daemon = PrivateDockerd::start(&id, &volume.mount);
    println!("private dockerd up at {:?}", started.elapsed());
    let before = volume.used();
    run(Command::new("docker")
        .arg("-H")
        .arg(daemon.host())
        .args(["load", "-i"])
        .arg(&save));
    let after = volume.used();
    println!("image loaded at {:?}", started.elapsed());

    let real_bytes = after.bytes - before.bytes;
    let real_inodes = after.inodes - before.inodes;
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
    drop(images);
}

fn relative_error(predicted: u64, real: u64) -> f64 {
    (predicted as f64 - real as f64) / real as f64
}

fn unique_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("stwu{}x{:x}", std::process::id(), nanos)
}

/// Runs a command to success, or fails the test with its output.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A small deterministic generator, so every run builds the same tree.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A tree like an application's: nested directories of files from empty to
/// a few MB, one directory of 500 entries (an htree), symlinks short and
/// long, and a hard link. Returns the number of regular files.
fn generate_tree(root: &Path) -> usize {
    let mut rng = XorShift(0x5eed_cafe_f00d_1234);
    let sizes = [
        0u64, 1, 100, 1000, 4095, 4096, 4097, 10_000, 50_000, 200_000, 700_000,
    ];
    let mut files = 0;
    // Incompressible content, cut at random offsets from one pool.
    let pool: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
    let write = |path: PathBuf, size: u64, rng: &mut XorShift| {
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

/// The busybox base image and the app image, on the machine's dockerd;
/// removed on drop.
struct BuiltImages {
    base: String,
    app: String,
}

impl BuiltImages {
    fn build(id: &str, work: &Path) -> BuiltImages {
        let images = BuiltImages {
            base: format!("{id}-base:1"),
            app: format!("{id}-app:1"),
        };
        let mut rootfs = tar::Builder::new(Vec::new());
        rootfs
            .append_path_with_name("/bin/busybox", "bin/busybox")
            .expect("busybox");
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_mode(0o777);
        rootfs
            .append_link(&mut link, "bin/sh", "busybox")
            .expect("sh link");
        let rootfs = rootfs.into_inner().expect("rootfs tar");
        let mut import = Command::new("docker")
            .args(["import", "-", &images.base])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("docker import");
        import
            .stdin
            .take()
            .expect("stdin")
            .write_all(&rootfs)
            .expect("feed docker import");
        assert!(import.wait().expect("docker import").success());

        let ctx = work.join("ctx");
        fs::write(
            ctx.join("Dockerfile"),
            format!("FROM {}\nCOPY tree /tree\n", images.base),
        )
        .expect("Dockerfile");
        run(Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", &images.app])
            .arg(&ctx));
        images
    }
}

impl Drop for BuiltImages {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.app, &self.base])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
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

struct Used {
    bytes: u64,
    inodes: u64,
}

/// A fresh ext4 file system in a sparse file, loop-mounted; unmounted on drop.
struct LoopVolume {
    mount: PathBuf,
}

impl LoopVolume {
    fn create(id: &str, work: &Path, block_size: u64) -> LoopVolume {
        let image = work.join(format!("{id}.ext4"));
        fs::File::create(&image)
            .and_then(|f| f.set_len(2 << 30))
            .expect("volume file");
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", &block_size.to_string()])
            .arg(&image));
        let mount = work.join("mnt");
        fs::create_dir_all(&mount).expect("mount point");
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount));
        LoopVolume { mount }
    }

    /// Blocks and inodes in use, after everything written has reached the disk.
    fn used(&self) -> Used {
        let dir = fs::File::open(&self.mount).expect("open mount");
        rustix::fs::syncfs(&dir).expect("syncfs");
        let st = rustix::fs::statvfs(&self.mount).expect("statvfs");
        Used {
            bytes: (st.f_blocks - st.f_bfree) * st.f_frsize,
            inodes: st.f_files - st.f_ffree,
        }
    }
}

impl Drop for LoopVolume {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.mount)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// A dockerd of our own, with its data root on `data_volume`; stopped by pid
/// on drop, with the containerd it started.
struct PrivateDockerd {
    child: Child,
    socket: PathBuf,
    exec_root: PathBuf,
}

impl PrivateDockerd {
    fn start(id: &str, data_volume: &Path) -> PrivateDockerd {
        // Socket and exec root live in /tmp: unix socket paths are short.
        let socket = PathBuf::from(format!("/tmp/{id}.sock"));
        let exec_root = PathBuf::from(format!("/tmp/{id}-x"));
        let log = fs::File::create(data_volume.with_file_name("dockerd.log")).expect("log");
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(data_volume.join("docker"))
            .arg("--exec-root")
            .arg(&exec_root)
            .arg("--pidfile")
            .arg(data_volume.with_file_name("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
                "--storage-driver=overlay2",
            ])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let daemon = PrivateDockerd {
            child,
            socket,
            exec_root,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = Command::new("docker")
                .arg("-H")
                .arg(daemon.host())
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if up {
                return daemon;
            }
            assert!(Instant::now() < deadline, "private dockerd did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        let containerd_pid = fs::read_to_string(self.exec_root.join("containerd/containerd.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        let pid = self.child.id() as i32;
        let _ = Command::new("kill").arg(pid.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = containerd_pid {
            // dockerd stops the containerd it started; this covers a dockerd
            // that had to be killed.
            let _ = Command::new("kill")
                .arg(pid.to_string())
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_dir_all(&self.exec_root);
    }
}
