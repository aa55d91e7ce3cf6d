//! The harness proves itself: each service and helper every other test relies on is
//! exercised for real here, so that a broken harness fails in one obvious place.

use crate::common::*;
use std::process::Command;

/// A busybox image of the test's own, removed when the test ends.
fn busybox() -> LocalImage {
    busybox_image(&format!("stowage-test/{}:1", unique("busybox")))
}

fn http_status(registry: &Registry, extra: &[&str], url: &str) -> String {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
    ]);
    if let Some(ca) = registry.ca_file() {
        cmd.arg("--cacert").arg(ca);
    }
    cmd.args(extra).arg(url);
    String::from_utf8_lossy(&run_output(&mut cmd).stdout).into_owned()
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("valid JSON")
}

#[test]
fn the_stowage_binary_is_built_for_tests() {
    let out = run_output(stowage().arg("--help"));
    // Whatever the CLI answers, the binary exists and ran to an exit code.
    assert!(out.status.code().is_some());
}

#[test]
fn unique_names_differ_and_are_valid_repository_names() {
    let names: std::collections::HashSet<String> = (0..1000).map(|_| unique("App.X")).collect();
    assert_eq!(names.len(), 1000);
    for name in &names {
        assert!(name.starts_with("app-x-"), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{name}"
        );
    }
}

#[test]
fn registry_answers_and_keeps_its_content_across_stop_and_restart() {
    let busybox = busybox();
    let mut registry = Registry::start();
    let v2 = format!("{}/v2/", registry.url());
    assert_eq!(http_status(&registry, &[], &v2), "200");

    let dest = format!("{}/{}:v1", registry.host(), unique("survivor"));
    let digest = push_image(busybox.tag(), &dest);

    registry.stop();
    let down = run_output(Command::new("curl").args(["-sS", "--max-time", "5", &v2]));
    assert!(!down.status.success(), "a stopped registry must not answer");
    assert!(!registry.is_running());

    registry.restart();
    assert_eq!(http_status(&registry, &[], &v2), "200");
    let raw = skopeo_inspect_raw(&dest);
    assert_eq!(
        sha256_digest(&raw),
        digest,
        "the image survived the restart"
    );
}

#[test]
fn many_registries_start_in_parallel_on_distinct_ports() {
    let registries: Vec<Registry> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6).map(|_| s.spawn(Registry::start)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ports: std::collections::HashSet<u16> = registries.iter().map(|r| r.port()).collect();
    assert_eq!(ports.len(), registries.len());
    for r in &registries {
        assert_eq!(http_status(r, &[], &format!("{}/v2/", r.url())), "200");
    }
    let storage = registries[0].storage_dir();
    drop(registries);
    assert!(!storage.exists(), "dropping a registry removes its storage");
}

#[test]
fn built_image_pushed_is_visible_to_skopeo_with_one_layer_per_file() {
    let busybox = busybox();
    let tag = format!("stowage-test/{}:1", unique("built"));
    let built = build_image(
        &tag,
        busybox.tag(),
        &[
            ("/app/config.txt", b"hello\n".to_vec()),
            ("/app/data/blob.bin", vec![7u8; 100_000]),
        ],
        "ENV GREETING=hello\nCMD [\"cat\", \"/app/config.txt\"]",
    );
    let registry = Registry::start();
    let dest = format!("{}/{}:1", registry.host(), unique("built"));
    let digest = push_image(&tag, &dest);
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );

    let raw = skopeo_inspect_raw(&dest);
    assert_eq!(sha256_digest(&raw), digest);
    let manifest = json(&raw);
    assert_eq!(
        manifest["layers"].as_array().unwrap().len(),
        3,
        "busybox rootfs + two COPY layers: {manifest}"
    );
    let inspect = run_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{dest}"),
    ]));
    let inspect = json(inspect.as_bytes());
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Digest"], digest.as_str());
    drop(built);
}

#[test]
fn multiarch_index_has_exactly_amd64_and_arm64() {
    let busybox = busybox();
    let registry = Registry::start();
    let repo = unique("multi");
    push_image(busybox.tag(), &format!("{}/{repo}:amd64", registry.host()));
    let index_digest = push_multiarch(&registry, &repo, "latest", "amd64");

    let raw = skopeo_inspect_raw(&format!("{}/{repo}:latest", registry.host()));
    assert_eq!(sha256_digest(&raw), index_digest);
    let index = json(&raw);
    assert_eq!(
        index["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    let manifests = index["manifests"].as_array().unwrap();
    let archs: Vec<&str> = manifests
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(archs, ["amd64", "arm64"]);

    // Each platform's manifest is there, and its config names its architecture.
    let mut layer_counts = Vec::new();
    for (m, arch) in manifests.iter().zip(archs) {
        let digest = m["digest"].as_str().unwrap();
        let (bytes, _) = registry.get_manifest(&repo, digest);
        assert_eq!(sha256_digest(&bytes), digest);
        let manifest = json(&bytes);
        let config =
            json(&registry.get_blob(&repo, manifest["config"]["digest"].as_str().unwrap()));
        assert_eq!(config["architecture"], arch);
        let layers = manifest["layers"].as_array().unwrap().len();
        assert_eq!(
            config["rootfs"]["diff_ids"].as_array().unwrap().len(),
            layers
        );
        layer_counts.push(layers);
    }
    assert_eq!(
        layer_counts[1],
        layer_counts[0] + 1,
        "arm64 has one more layer"
    );

    // A client asking for arm64 resolves the index to the arm64 image.
    let arm = run_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--override-arch",
        "arm64",
        &format!("docker://{}/{repo}:latest", registry.host()),
    ]));
    assert_eq!(json(arm.as_bytes())["Architecture"], "arm64");

    // From another repository of the same registry, too.
    let other = unique("multi-other");
    let other_digest = push_multiarch(
        &registry,
        &other,
        "both",
        &format!("{}/{repo}:amd64", registry.host()),
    );
    assert_eq!(
        sha256_digest(&skopeo_inspect_raw(&format!(
            "{}/{other}:both",
            registry.host()
        ))),
        other_digest
    );
}

#[test]
fn htpasswd_registry_refuses_anonymous_and_wrong_credentials_and_accepts_good_ones() {
    let busybox = busybox();
    let registry = Registry::start_with(RegistryOptions {
        htpasswd: Some(("alice".into(), "s3cret".into())),
        tls: false,
    });
    let v2 = format!("{}/v2/", registry.url());
    assert_eq!(http_status(&registry, &[], &v2), "401");
    assert_eq!(http_status(&registry, &["-u", "alice:wrong"], &v2), "401");
    assert_eq!(http_status(&registry, &["-u", "alice:s3cret"], &v2), "200");

    // The harness's own tools find the credentials by host.
    let dest = format!("{}/{}:1", registry.host(), unique("private"));
    let digest = push_image(busybox.tag(), &dest);
    assert_eq!(sha256_digest(&skopeo_inspect_raw(&dest)), digest);

    // A Docker config with those credentials, as stowage will read it.
    let config_dir = temp_dir("stowage-docker-config-");
    write_docker_config(config_dir.path(), &registry.host(), "alice", "s3cret");
    let with_config = run_ok(
        Command::new("skopeo")
            .env("DOCKER_CONFIG", config_dir.path())
            .env("REGISTRY_AUTH_FILE", config_dir.path().join("config.json"))
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{dest}")),
    );
    assert_eq!(sha256_digest(with_config.as_bytes()), digest);
}

#[test]
fn tls_registry_serves_with_the_ca_file_and_is_refused_without_it() {
    let busybox = busybox();
    let registry = Registry::start_with(RegistryOptions {
        htpasswd: None,
        tls: true,
    });
    assert!(registry.url().starts_with("https://"));
    let ca = registry.ca_file().expect("a TLS registry has a CA file");
    let pem = std::fs::read_to_string(&ca).unwrap();
    assert!(pem.contains("BEGIN CERTIFICATE"));

    let v2 = format!("{}/v2/", registry.url());
    assert_eq!(http_status(&registry, &[], &v2), "200");
    let by_name = format!("https://localhost:{}/v2/", registry.port());
    assert_eq!(http_status(&registry, &[], &by_name), "200");
    let untrusted = run_output(Command::new("curl").args(["-sS", "--max-time", "10", &v2]));
    assert_eq!(
        untrusted.status.code(),
        Some(60),
        "curl without the CA must reject the certificate: {}",
        String::from_utf8_lossy(&untrusted.stderr)
    );

    let dest = format!("{}/{}:1", registry.host(), unique("tls"));
    let digest = push_image(busybox.tag(), &dest);
    assert_eq!(sha256_digest(&skopeo_inspect_raw(&dest)), digest);
}

#[test]
fn loop_volume_is_ext4_of_about_the_requested_size_and_goes_away() {
    let volume = LoopVolume::new(64);
    let stats = volume.stats();
    assert_eq!(stats.block_size, 4096);
    let total = stats.total_bytes();
    let asked = 64 * 1024 * 1024;
    assert!(
        total <= asked && total >= asked * 85 / 100,
        "statvfs says {total} bytes for a 64 MiB volume"
    );
    let fstype = run_ok(
        Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(volume.path()),
    );
    assert_eq!(fstype.trim(), "ext2/ext3");

    // Writing shows up in statvfs, and the volume really is that small.
    let before = volume.stats().used_bytes();
    std::fs::write(volume.path().join("ten-mib"), vec![1u8; 10 << 20]).unwrap();
    rustix::fs::sync();
    let grown = volume.stats().used_bytes() - before;
    assert!((10 << 20..11 << 20).contains(&grown), "grew {grown}");
    let too_big = std::fs::write(volume.path().join("too-big"), vec![1u8; 80 << 20]);
    assert!(too_big.is_err(), "80 MiB cannot fit a 64 MiB volume");

    let small_blocks = LoopVolume::with_options(32, 1024, Some(2000));
    assert_eq!(small_blocks.stats().block_size, 1024);
    // mkfs rounds the inode count to whole inode-table blocks per group.
    let inodes = small_blocks.stats().inodes;
    assert!(
        (1800..2200).contains(&inodes),
        "{inodes} inodes for 2000 asked"
    );

    let mount_point = volume.path().to_path_buf();
    drop(volume);
    assert!(!mount_point.exists(), "the mount point is removed");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*mount_point.to_string_lossy()));
}

#[test]
fn tmpfs_volume_has_the_requested_size() {
    let volume = TmpfsVolume::new(16);
    assert_eq!(volume.stats().total_bytes(), 16 << 20);
    let path = volume.path().to_path_buf();
    drop(volume);
    assert!(!path.exists());
}

#[test]
fn private_dockerd_answers_with_its_data_root_and_runs_containers() {
    let busybox = busybox();
    let volume = LoopVolume::new(512);
    let data_root = volume.path().join("docker");
    let dockerd = PrivateDockerd::start(&data_root);
    let root =
        run_ok(
            dockerd
                .docker()
                .args(["info", "--format", "{{.DockerRootDir}} {{.Driver}}"]),
        );
    assert_eq!(root.trim(), format!("{} overlay2", data_root.display()));
    assert!(dockerd.host().starts_with("unix:///"));

    // An image loaded into it lands on the volume, and a container runs.
    let used_before = volume.stats().used_bytes();
    dockerd.load_from_default(busybox.tag());
    assert!(volume.stats().used_bytes() > used_before + 1_000_000);
    let said = run_ok(dockerd.docker().args([
        "run",
        "--rm",
        "--network",
        "none",
        busybox.tag(),
        "echo",
        "hello from the private engine",
    ]));
    assert_eq!(said.trim(), "hello from the private engine");

    // It holds only what was loaded into it.
    let images = run_ok(dockerd.docker().args(["images", "-q"]));
    assert_eq!(images.lines().count(), 1);
    let pid = dockerd.pid().unwrap();
    drop(dockerd);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "dockerd stopped"
    );
    assert_eq!(mounts_under(&data_root), Vec::<String>::new());

    // One that dies without shutting down (SIGKILL) leaves no mount either.
    let killed = PrivateDockerd::start(&data_root);
    send_signal(killed.pid().unwrap(), libc::SIGKILL);
    drop(killed);
    assert_eq!(mounts_under(&data_root), Vec::<String>::new());
}

/// The mount points at or under `dir`, as /proc/self/mountinfo names them.
fn mounts_under(dir: &std::path::Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|m| *m == dir || m.starts_with(&format!("{dir}/")))
        .map(str::to_string)
        .collect()
}

#[test]
fn many_files_image_has_over_a_thousand_files_of_varied_sizes() {
    let busybox = busybox();
    let tag = format!("stowage-test/{}:1", unique("many"));
    let _many = many_files_image(&tag, busybox.tag(), 1200, 42);
    let listing = run_ok(Command::new("docker").args([
        "run",
        "--rm",
        "--network",
        "none",
        &tag,
        "find",
        "/data/many-42",
        "-type",
        "f",
        "-size",
        "+0",
    ]));
    let files = listing.lines().count();
    assert!(files > 1100 && files <= 1200, "{files} non-empty files");
    let dirs = run_ok(Command::new("docker").args([
        "run",
        "--rm",
        "--network",
        "none",
        &tag,
        "find",
        "/data/many-42",
        "-type",
        "d",
    ]));
    assert!(dirs.lines().count() > 20, "nested directories");
    let du = run_ok(Command::new("docker").args([
        "run",
        "--rm",
        "--network",
        "none",
        &tag,
        "du",
        "-sk",
        "/data/many-42",
    ]));
    let kib: u64 = du.split_whitespace().next().unwrap().parse().unwrap();
    assert!(kib > 5_000 && kib < 100_000, "{kib} KiB");
}
