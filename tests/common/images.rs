//! Test images, made locally (there is no network): a tiny busybox rootfs imported with
//! `docker import`, more layers with `docker build` (one `COPY` per layer, legacy
//! builder), an image of many files for usage-accuracy tests, pushes with skopeo, and a
//! two-architecture image index pushed through the registry API.
//!
//! File contents and timestamps are deterministic, so the same call gives the same
//! layers (same `diff_id`) in every run.

use super::registry::access_for;
use super::{Registry, Rng, ensure_dockerd, run_ok, run_ok_with_stdin, sha256_digest, temp_dir};
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

/// The timestamp of every file the harness puts into an image (2021-01-01T00:00:00Z).
const FIXED_MTIME: u64 = 1_609_459_200;

const BUSYBOX_APPLETS: &[&str] = &[
    "sh",
    "ash",
    "ls",
    "cat",
    "sleep",
    "echo",
    "true",
    "false",
    "wget",
    "env",
    "mkdir",
    "rm",
    "touch",
    "id",
    "ps",
    "head",
    "tail",
    "grep",
    "sed",
    "test",
    "[",
    "du",
    "df",
    "dd",
    "wc",
    "nc",
    "httpd",
    "hostname",
    "printf",
    "kill",
    "date",
    "uname",
    "find",
    "tar",
    "cp",
    "mv",
    "ln",
    "chmod",
    "stat",
    "sync",
    "yes",
    "sha256sum",
    "md5sum",
    "xargs",
    "seq",
];

/// The busybox rootfs as an uncompressed tar: `/bin/busybox`, applet symlinks, and the
/// few files and directories a container expects; and `/marker` holding `marker` when
/// given (which makes the layer, and so the image, one of a kind).
fn busybox_rootfs_tar(marker: Option<&str>) -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox")
        .unwrap_or_else(|e| panic!("read /bin/busybox (install busybox-static): {e}"));
    let mut tar = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(FIXED_MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for dir in [
        "bin", "dev", "etc", "proc", "root", "sys", "tmp", "usr", "usr/bin", "var", "var/tmp",
    ] {
        let mode = if dir.ends_with("tmp") { 0o1777 } else { 0o755 };
        let mut h = header(tar::EntryType::Directory, mode, 0);
        tar.append_data(&mut h, format!("{dir}/"), std::io::empty())
            .expect("tar dir");
    }
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    tar.append_data(&mut h, "bin/busybox", busybox.as_slice())
        .expect("tar busybox");
    let mut seen = HashSet::new();
    for applet in BUSYBOX_APPLETS {
        if !seen.insert(applet) {
            continue;
        }
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("tar symlink");
    }
    let files: [(&str, &str); 3] = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hostname", "stowage-test\n"),
    ];
    for (path, text) in files.into_iter().chain(marker.map(|m| ("marker", m))) {
        let mut h = header(tar::EntryType::Regular, 0o644, text.len() as u64);
        tar.append_data(&mut h, path, text.as_bytes())
            .expect("tar file");
    }
    tar.into_inner().expect("finish tar")
}

/// A tag this harness put on the default dockerd; removed when dropped, so a
/// test leaves no image behind whatever its outcome (and a later run never
/// finds an old one by name).
#[must_use = "the image is removed when this guard drops"]
#[derive(Debug)]
pub struct LocalImage {
    tag: String,
}

impl LocalImage {
    /// Takes charge of `tag`, put on the default dockerd by something else
    /// (a load, a `docker tag`): it is removed when the guard drops.
    pub fn adopt(tag: &str) -> LocalImage {
        LocalImage {
            tag: tag.to_string(),
        }
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl Drop for LocalImage {
    fn drop(&mut self) {
        remove_image(&self.tag);
    }
}

/// Imports the busybox rootfs as image `tag` (CMD `sleep 3600`) into the default dockerd.
/// Give every test its own tag: the guard removes it. Every such image has the same
/// layer; see [`busybox_image_of_its_own`] for one no other image shares.
pub fn busybox_image(tag: &str) -> LocalImage {
    import_busybox(tag, None)
}

/// Like [`busybox_image`], with a `/marker` file naming `tag`: a base layer that no
/// other test's image has, for tests that count which layers the engine holds.
pub fn busybox_image_of_its_own(tag: &str) -> LocalImage {
    import_busybox(tag, Some(tag))
}

fn import_busybox(tag: &str, marker: Option<&str>) -> LocalImage {
    ensure_dockerd();
    run_ok_with_stdin(
        Command::new("docker").args([
            "import",
            "--change",
            r#"CMD ["sleep","3600"]"#,
            "--change",
            "ENV PATH=/bin:/usr/bin",
            "-",
            tag,
        ]),
        &busybox_rootfs_tar(marker),
    );
    LocalImage {
        tag: tag.to_string(),
    }
}

/// Puts `tag` on the image `source` of the default dockerd.
pub fn tag_image(source: &str, tag: &str) -> LocalImage {
    run_ok(Command::new("docker").args(["tag", source, tag]));
    LocalImage {
        tag: tag.to_string(),
    }
}

/// Builds image `tag`: `FROM base`, one `COPY` (one layer) per file, then the lines of
/// `extra_dockerfile` (ENV, LABEL, HEALTHCHECK, CMD, `RUN` with busybox...). File paths
/// are absolute paths inside the image ("/app/config.txt").
pub fn build_image(
    tag: &str,
    base: &str,
    files: &[(&str, Vec<u8>)],
    extra_dockerfile: &str,
) -> LocalImage {
    let context = temp_dir("stowage-build-");
    let mut layers = Vec::new();
    for (i, (path, bytes)) in files.iter().enumerate() {
        let layer = format!("layer{i}");
        write_context_file(&context.path().join(&layer), path, bytes);
        layers.push(layer);
    }
    build_from_context(tag, base, context.path(), &layers, extra_dockerfile)
}

/// Builds image `tag` from `base` plus ONE layer holding `n_files` files of varied sizes
/// (empty to a few hundred KiB, some compressible, some not) in nested directories under
/// `/data/many-<seed>/`. The same seed gives the same layer.
pub fn many_files_image(tag: &str, base: &str, n_files: usize, seed: u64) -> LocalImage {
    let context = temp_dir("stowage-build-");
    let layer_dir = context.path().join("layer0");
    let mut rng = Rng::new(seed ^ 0x5354_4f57_4147_4500);
    let n_dirs = (n_files / 25).max(1);
    let dirs: Vec<String> = (0..n_dirs)
        .map(|d| match rng.below(3) {
            0 => format!("d{d:03}"),
            1 => format!("d{:03}/e{d:03}", d % 7),
            _ => format!("d{:03}/e{:03}/f{d:03}", d % 5, d % 11),
        })
        .collect();
    for i in 0..n_files {
        let size = match rng.below(100) {
            0..=4 => 0,
            5..=44 => rng.below(512),
            45..=74 => 512 + rng.below(3584),
            75..=94 => 4096 + rng.below(28 * 1024),
            95..=98 => 32 * 1024 + rng.below(96 * 1024),
            _ => 128 * 1024 + rng.below(384 * 1024),
        } as usize;
        let compressible = rng.below(2) == 0;
        let mut bytes = Vec::with_capacity(size);
        if compressible {
            let line = format!("file {i} of seed {seed}: the quick brown fox jumps over\n");
            while bytes.len() < size {
                bytes.extend_from_slice(line.as_bytes());
            }
            bytes.truncate(size);
        } else {
            while bytes.len() < size {
                bytes.extend_from_slice(&rng.next_u64().to_le_bytes());
            }
            bytes.truncate(size);
        }
        let dir = &dirs[rng.below(n_dirs as u64) as usize];
        let path = format!("/data/many-{seed}/{dir}/file{i:05}.bin");
        write_context_file(&layer_dir, &path, &bytes);
    }
    build_from_context(tag, base, context.path(), &["layer0".to_string()], "")
}

/// Removes a local image tag from the default dockerd (ignores a missing one).
pub fn remove_image(tag: &str) {
    let _ = Command::new("docker")
        .args(["image", "rm", "--force", tag])
        .output();
}

fn write_context_file(layer_dir: &Path, path: &str, bytes: &[u8]) {
    let rel = path.trim_start_matches('/');
    assert!(
        !rel.is_empty() && !rel.split('/').any(|c| c == ".." || c.is_empty()),
        "image file path {path:?} must be a clean absolute path"
    );
    let file = layer_dir.join(rel);
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent).expect("create context dir");
    }
    let mut f = std::fs::File::create(&file).expect("create context file");
    f.write_all(bytes).expect("write context file");
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(FIXED_MTIME))
        .expect("set mtime");
}

/// Builds image `tag` from `context`, a directory holding one subdirectory per
/// layer (`layers`, each copied to `/`), with `FROM base` and the lines of `extra`.
pub fn build_from_context(
    tag: &str,
    base: &str,
    context: &Path,
    layers: &[String],
    extra: &str,
) -> LocalImage {
    ensure_dockerd();
    let mut dockerfile = format!("FROM {base}\n");
    for layer in layers {
        dockerfile.push_str(&format!("COPY {layer}/ /\n"));
    }
    dockerfile.push_str(extra);
    dockerfile.push('\n');
    std::fs::write(context.join("Dockerfile"), dockerfile).expect("write Dockerfile");
    // The legacy builder: one layer per COPY, works with Debian's dockerd 20.10 and with
    // a client that has no buildx plugin.
    run_ok(
        Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "--network", "none", "-t", tag])
            .arg(context),
    );
    LocalImage {
        tag: tag.to_string(),
    }
}

/// Pushes local image `local_tag` from the default dockerd to `dest`
/// ("HOST/REPO:TAG" on a harness registry) with skopeo; returns the manifest digest.
pub fn push_image(local_tag: &str, dest: &str) -> String {
    ensure_dockerd();
    let source = if has_tag(local_tag) {
        local_tag.to_string()
    } else {
        format!("{local_tag}:latest")
    };
    let scratch = temp_dir("stowage-push-");
    let digest_file = scratch.path().join("digest");
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--retry-times", "2"]);
    add_registry_flags(&mut cmd, dest, "--dest");
    cmd.arg("--digestfile").arg(&digest_file);
    cmd.arg(format!("docker-daemon:{source}"));
    cmd.arg(format!("docker://{dest}"));
    run_ok(&mut cmd);
    let digest = std::fs::read_to_string(&digest_file).expect("read skopeo digest file");
    digest.trim().to_string()
}

/// The exact bytes of the manifest (or index) at `reference` ("HOST/REPO:TAG" or
/// "HOST/REPO@sha256:...") on a harness registry, as `skopeo inspect --raw` gives them.
pub fn skopeo_inspect_raw(reference: &str) -> Vec<u8> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["inspect", "--raw"]);
    add_registry_flags(&mut cmd, reference, "");
    cmd.arg(format!("docker://{reference}"));
    let out = super::run_output(&mut cmd);
    assert!(
        out.status.success(),
        "skopeo inspect --raw {reference} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Adds skopeo's TLS and credential flags for the harness registry named in `reference`.
/// `prefix` is "--dest", "--src" or "" (for `inspect`).
fn add_registry_flags(cmd: &mut Command, reference: &str, prefix: &str) {
    let host = reference.split('/').next().unwrap_or("");
    let access = access_for(host);
    let flag = |name: &str| {
        if prefix.is_empty() {
            format!("--{name}")
        } else {
            format!("{prefix}-{name}")
        }
    };
    match access.as_ref().and_then(|a| a.cert_dir.clone()) {
        Some(cert_dir) => {
            cmd.arg(flag("cert-dir")).arg(cert_dir);
        }
        None => {
            cmd.arg(format!("{}=false", flag("tls-verify")));
        }
    }
    if let Some((user, password)) = access.and_then(|a| a.credentials) {
        cmd.arg(flag("creds")).arg(format!("{user}:{password}"));
    }
}

fn has_tag(reference: &str) -> bool {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    last.contains(':') || last.contains('@')
}

/// Turns the single-architecture image at `amd64_tag_in_registry` (a tag of `repo`, or
/// "REPO:TAG" / "HOST/REPO:TAG" of another repository on the same registry) into an image
/// index at `repo:tag` with two manifests: that image as linux/amd64, and a linux/arm64
/// manifest whose config says `architecture: arm64` and which has one extra small layer
/// (so the two architectures differ in size). Pushed through the registry API; returns
/// the index digest. A Docker v2 manifest gives a Docker manifest list, an OCI manifest
/// an OCI index.
pub fn push_multiarch(
    registry: &Registry,
    repo: &str,
    tag: &str,
    amd64_tag_in_registry: &str,
) -> String {
    let host_prefix = format!("{}/", registry.host());
    let source = amd64_tag_in_registry
        .strip_prefix(&host_prefix)
        .unwrap_or(amd64_tag_in_registry);
    let (src_repo, src_ref) = if let Some((r, d)) = source.split_once('@') {
        (r.to_string(), d.to_string())
    } else if has_tag(source) && source.contains(':') {
        let (r, t) = source.rsplit_once(':').expect("has a tag");
        (r.to_string(), t.to_string())
    } else {
        (repo.to_string(), source.to_string())
    };

    let (amd64_bytes, _) = registry.get_manifest(&src_repo, &src_ref);
    let amd64: serde_json::Value =
        serde_json::from_slice(&amd64_bytes).expect("amd64 manifest is JSON");
    let manifest_type = amd64["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_string();
    let oci = match manifest_type.as_str() {
        "application/vnd.oci.image.manifest.v1+json" => true,
        "application/vnd.docker.distribution.manifest.v2+json" => false,
        other => panic!("{src_repo}:{src_ref} is a {other}, not a single image manifest"),
    };
    let amd64_digest = sha256_digest(&amd64_bytes);
    let config_desc = &amd64["config"];
    let config_digest = config_desc["digest"].as_str().expect("config digest");

    // Everything the amd64 manifest references must be in `repo`.
    if src_repo != repo {
        registry.mount_blob(repo, &src_repo, config_digest);
        for layer in amd64["layers"].as_array().expect("layers") {
            registry.mount_blob(repo, &src_repo, layer["digest"].as_str().expect("digest"));
        }
        registry.put_manifest(repo, &amd64_digest, &manifest_type, &amd64_bytes);
    }

    // The arm64 config: same image, other architecture, one more layer.
    let marker_tar = {
        let text = b"arm64\n";
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(FIXED_MTIME);
        tar.append_data(&mut h, "etc/", std::io::empty())
            .expect("tar dir");
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(text.len() as u64);
        h.set_mtime(FIXED_MTIME);
        tar.append_data(&mut h, "etc/stowage-arch", &text[..])
            .expect("tar file");
        tar.into_inner().expect("finish tar")
    };
    let marker_gz = {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&marker_tar).expect("gzip");
        gz.finish().expect("gzip")
    };
    let marker_digest = registry.upload_blob(repo, &marker_gz);

    let mut config: serde_json::Value =
        serde_json::from_slice(&registry.get_blob(repo, config_digest)).expect("config JSON");
    config["architecture"] = "arm64".into();
    if let Some(obj) = config.as_object_mut() {
        obj.remove("variant");
    }
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .expect("rootfs.diff_ids")
        .push(sha256_digest(&marker_tar).into());
    if let Some(history) = config["history"].as_array_mut() {
        history.push(serde_json::json!({
            "created": "2021-01-01T00:00:00Z",
            "created_by": "stowage test harness: arm64 marker layer",
        }));
    }
    let config_bytes = serde_json::to_vec(&config).expect("config JSON");
    let arm64_config_digest = registry.upload_blob(repo, &config_bytes);

    let mut arm64 = amd64.clone();
    arm64["config"]["digest"] = arm64_config_digest.into();
    arm64["config"]["size"] = config_bytes.len().into();
    let layer_type = if oci {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    } else {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    };
    arm64["layers"]
        .as_array_mut()
        .expect("layers")
        .push(serde_json::json!({
            "mediaType": layer_type,
            "size": marker_gz.len(),
            "digest": marker_digest,
        }));
    let arm64_bytes = serde_json::to_vec(&arm64).expect("manifest JSON");
    let arm64_digest = sha256_digest(&arm64_bytes);
    registry.put_manifest(repo, &arm64_digest, &manifest_type, &arm64_bytes);

    let index_type = if oci {
        "application/vnd.oci.image.index.v1+json"
    } else {
        "application/vnd.docker.distribution.manifest.list.v2+json"
    };
    let entry = |digest: &str, size: usize, arch: &str| {
        serde_json::json!({
            "mediaType": manifest_type,
            "digest": digest,
            "size": size,
            "platform": { "architecture": arch, "os": "linux" },
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [
            entry(&amd64_digest, amd64_bytes.len(), "amd64"),
            entry(&arm64_digest, arm64_bytes.len(), "arm64"),
        ],
    });
    let index_bytes = serde_json::to_vec(&index).expect("index JSON");
    registry.put_manifest(repo, tag, index_type, &index_bytes)
}
