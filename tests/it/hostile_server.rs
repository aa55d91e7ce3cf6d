//! The hostile registry used by the pull tests does what each behaviour says,
//! as seen by `curl`: statuses, headers, byte counts, and its own log.

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use crate::common::Registry;
use crate::common::hostile::{Behaviour, HostileRegistry};
use stowage::Digest;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// What curl saw of one answer.
struct Seen {
    exit_code: i32,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn curl_at(host: &str, path: &str, args: &[&str]) -> Seen {
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("headers");
    let body = dir.path().join("body");
    let output = Command::new("curl")
        .arg("-sS")
        .arg("--max-time")
        .arg("30")
        .arg("-D")
        .arg(&headers)
        .arg("-o")
        .arg(&body)
        .args(args)
        .arg(format!("http://{host}{path}"))
        .output()
        .unwrap();
    let head = std::fs::read_to_string(&headers).unwrap_or_default();
    // The last header block is the final answer.
    let block = head
        .split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .last()
        .unwrap_or("");
    let mut lines = block.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Seen {
        exit_code: output.status.code().unwrap_or(-1),
        status,
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

fn curl(registry: &HostileRegistry, path: &str, args: &[&str]) -> Seen {
    curl_at(&registry.host(), path, args)
}

/// Bytes that differ from position to position, so an offset error shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn blob_path(repo: &str, digest: &Digest) -> String {
    format!("/v2/{repo}/blobs/{digest}")
}

#[test]
fn an_honest_registry_serves_a_blob_whole_from_an_offset_and_by_head() {
    let registry = HostileRegistry::start();
    let blob = pattern(1000);
    let digest = registry.add_blob("apps/shop", blob.clone());
    let path = blob_path("apps/shop", &digest);

    let base = curl(&registry, "/v2/", &[]);
    assert_eq!(base.status, 200);

    let whole = curl(&registry, &path, &[]);
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body, blob);
    assert_eq!(whole.header("Content-Length"), Some("1000"));
    assert_eq!(
        whole.header("Docker-Content-Digest"),
        Some(digest.to_string().as_str())
    );

    let rest = curl(&registry, &path, &["-H", "Range: bytes=400-"]);
    assert_eq!(rest.status, 206);
    assert_eq!(rest.header("Content-Range"), Some("bytes 400-999/1000"));
    assert_eq!(rest.body, blob[400..]);

    let middle = curl(&registry, &path, &["-H", "Range: bytes=10-19"]);
    assert_eq!(middle.status, 206);
    assert_eq!(middle.header("Content-Range"), Some("bytes 10-19/1000"));
    assert_eq!(middle.body, blob[10..20]);

    let past_end = curl(&registry, &path, &["-H", "Range: bytes=1000-"]);
    assert_eq!(past_end.status, 416);
    assert_eq!(past_end.header("Content-Range"), Some("bytes */1000"));

    let head = curl(&registry, &path, &["-I"]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("Content-Length"), Some("1000"));

    let other_repo = curl(&registry, &blob_path("apps/other", &digest), &[]);
    assert_eq!(other_repo.status, 404);

    let log = registry.idle().requests();
    let summary: Vec<(&str, u16, Option<&str>, u64)> = log
        .iter()
        .map(|r| {
            (
                r.method.as_str(),
                r.status,
                r.range.as_deref(),
                r.bytes_sent,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("GET", 200, None, 2),
            ("GET", 200, None, 1000),
            ("GET", 206, Some("bytes=400-"), 600),
            ("GET", 206, Some("bytes=10-19"), 10),
            ("GET", 416, Some("bytes=1000-"), 0),
            ("HEAD", 200, None, 0),
            ("GET", 404, None, log[6].bytes_sent),
        ]
    );
    assert_eq!(log[1].path, path);
    assert_eq!(log[1].digest.as_ref(), Some(&digest));
    assert_eq!(log[6].digest, None, "a 404 is about no content");
    assert_eq!(registry.idle().bytes_sent_for(&digest), 1000 + 600 + 10);
}

#[test]
fn one_connection_carries_several_requests() {
    let registry = HostileRegistry::start();
    let first = registry.add_blob("r", pattern(3000));
    let second = registry.add_blob("r", b"second".to_vec());
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new("curl")
        .args(["-sS", "-w", "%{num_connects} "])
        .arg("-o")
        .arg(dir.path().join("1"))
        .arg(format!(
            "http://{}{}",
            registry.host(),
            blob_path("r", &first)
        ))
        .arg("-o")
        .arg(dir.path().join("2"))
        .arg(format!(
            "http://{}{}",
            registry.host(),
            blob_path("r", &second)
        ))
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), "1 0 ");
    assert_eq!(std::fs::read(dir.path().join("1")).unwrap(), pattern(3000));
    assert_eq!(std::fs::read(dir.path().join("2")).unwrap(), b"second");
}

#[test]
fn manifests_are_served_by_tag_and_by_digest_with_their_media_type() {
    let registry = HostileRegistry::start();
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
    let digest = registry.add_manifest("apps/shop", Some("v1"), OCI_MANIFEST, manifest.to_vec());
    assert_eq!(digest, Digest::of(manifest));
    assert_eq!(registry.tag("apps/shop", "v1"), Some(digest.clone()));

    for reference in ["v1".to_string(), digest.to_string()] {
        let path = format!("/v2/apps/shop/manifests/{reference}");
        let got = curl(
            &registry,
            &path,
            &["-H", &format!("Accept: {OCI_MANIFEST}")],
        );
        assert_eq!(got.status, 200, "{reference}");
        assert_eq!(got.body, manifest);
        assert_eq!(got.header("Content-Type"), Some(OCI_MANIFEST));
        assert_eq!(
            got.header("Docker-Content-Digest"),
            Some(digest.to_string().as_str())
        );
        let head = curl(&registry, &path, &["-I"]);
        assert_eq!(head.status, 200);
        assert_eq!(
            head.header("Content-Length"),
            Some(manifest.len().to_string().as_str())
        );
    }
    assert_eq!(
        curl(&registry, "/v2/apps/shop/manifests/v2", &[]).status,
        404
    );

    let log = registry.idle().requests();
    assert_eq!(
        log[0].digest.as_ref(),
        Some(&digest),
        "tag resolved in the log"
    );
    assert_eq!(log[0].accept.as_deref(), Some(OCI_MANIFEST));
    assert_eq!(
        registry.idle().bytes_sent_for(&digest),
        2 * manifest.len() as u64,
        "two GETs, HEADs send no body"
    );
}

#[test]
fn send_more_sends_extra_bytes_that_content_length_counts() {
    let registry = HostileRegistry::start();
    let blob = pattern(1000);
    let digest = registry.add_blob("r", blob.clone());
    registry.set_blob_behaviour(&digest, Behaviour::SendMore(17));
    let path = blob_path("r", &digest);

    let whole = curl(&registry, &path, &[]);
    assert_eq!(whole.exit_code, 0);
    assert_eq!(whole.status, 200);
    assert_eq!(whole.header("Content-Length"), Some("1017"));
    assert_eq!(whole.body.len(), 1017);
    assert_eq!(whole.body[..1000], blob[..]);

    let rest = curl(&registry, &path, &["-H", "Range: bytes=500-"]);
    assert_eq!(rest.status, 206);
    assert_eq!(rest.header("Content-Range"), Some("bytes 500-999/1000"));
    assert_eq!(rest.body.len(), 517);
    assert_eq!(rest.body[..500], blob[500..]);
    assert_eq!(registry.idle().bytes_sent_for(&digest), 1017 + 517);
}

#[test]
fn send_fewer_closes_the_connection_short_every_time() {
    let registry = HostileRegistry::start();
    let blob = pattern(1000);
    let digest = registry.add_blob("r", blob.clone());
    registry.set_blob_behaviour(&digest, Behaviour::SendFewer(300));
    let path = blob_path("r", &digest);

    for _ in 0..2 {
        let cut = curl(&registry, &path, &[]);
        assert_eq!(cut.exit_code, 18, "curl: partial file");
        assert_eq!(cut.status, 200);
        assert_eq!(cut.header("Content-Length"), Some("1000"));
        assert_eq!(cut.body, blob[..300]);
    }
    let log = registry.idle().requests();
    assert!(
        log.iter()
            .all(|r| r.content_length == 1000 && r.bytes_sent == 300)
    );
    assert_eq!(registry.idle().bytes_sent_for(&digest), 600);
}

#[test]
fn wrong_bytes_keep_the_length_but_not_the_digest() {
    let registry = HostileRegistry::start();
    let blob = pattern(1000);
    let digest = registry.add_blob("r", blob.clone());
    registry.set_blob_behaviour(&digest, Behaviour::WrongBytes);
    let path = blob_path("r", &digest);

    let whole = curl(&registry, &path, &[]);
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body.len(), 1000);
    assert_ne!(Digest::of(&whole.body), digest);
    assert_eq!(whole.body[..999], blob[..999]);

    let rest = curl(&registry, &path, &["-H", "Range: bytes=900-"]);
    assert_eq!(rest.status, 206);
    assert_eq!(rest.body.len(), 100);
    assert_ne!(rest.body, blob[900..], "wrong in every range N-");
}

#[test]
fn ignore_range_answers_200_with_the_whole_blob() {
    let registry = HostileRegistry::start();
    let blob = pattern(1000);
    let digest = registry.add_blob("r", blob.clone());
    registry.set_blob_behaviour(&digest, Behaviour::IgnoreRange);

    let got = curl(
        &registry,
        &blob_path("r", &digest),
        &["-H", "Range: bytes=400-"],
    );
    assert_eq!(got.status, 200);
    assert_eq!(got.header("Content-Range"), None);
    assert_eq!(got.body, blob);
}

#[test]
fn bad_content_range_starts_where_it_was_not_asked() {
    let registry = HostileRegistry::start();
    let blob = pattern(1000);
    let digest = registry.add_blob("r", blob.clone());
    registry.set_blob_behaviour(&digest, Behaviour::BadContentRange);
    let path = blob_path("r", &digest);

    let from_400 = curl(&registry, &path, &["-H", "Range: bytes=400-"]);
    assert_eq!(from_400.status, 206);
    assert_eq!(from_400.header("Content-Range"), Some("bytes 0-999/1000"));
    assert_eq!(from_400.body, blob);

    let from_0 = curl(&registry, &path, &["-H", "Range: bytes=0-"]);
    assert_eq!(from_0.status, 206);
    assert_eq!(from_0.header("Content-Range"), Some("bytes 1-999/1000"));
    assert_eq!(from_0.body, blob[1..]);

    let plain = curl(&registry, &path, &[]);
    assert_eq!(plain.status, 200);
    assert_eq!(plain.body, blob);
}

#[test]
fn drop_after_cuts_the_first_attempt_and_a_resume_then_completes() {
    let registry = HostileRegistry::start();
    let blob = pattern(1000);
    let digest = registry.add_blob("r", blob.clone());
    registry.set_blob_behaviour(
        &digest,
        Behaviour::DropAfter {
            bytes: 300,
            times: 1,
        },
    );
    let path = blob_path("r", &digest);

    let head = curl(&registry, &path, &["-I"]);
    assert_eq!(head.status, 200, "a HEAD does not use up the drop");

    let first = curl(&registry, &path, &[]);
    assert_eq!(first.exit_code, 18);
    assert_eq!(first.body, blob[..300]);

    let resumed = curl(&registry, &path, &["-H", "Range: bytes=300-"]);
    assert_eq!(resumed.exit_code, 0);
    assert_eq!(resumed.status, 206);
    assert_eq!(resumed.header("Content-Range"), Some("bytes 300-999/1000"));
    let mut joined = first.body.clone();
    joined.extend_from_slice(&resumed.body);
    assert_eq!(joined, blob);
    assert_eq!(
        registry.idle().bytes_sent_for(&digest),
        1000,
        "the blob went over the wire exactly once"
    );

    let again = curl(&registry, &path, &[]);
    assert_eq!(again.body, blob, "honest once the drops are used up");
}

#[test]
fn slow_paces_the_body_in_slices_and_honest_sends_it_at_once() {
    let registry = HostileRegistry::start();
    let blob = pattern(2000);
    let digest = registry.add_blob("r", blob.clone());
    let path = blob_path("r", &digest);

    assert_eq!(curl(&registry, &path, &[]).body, blob);
    registry.set_blob_behaviour(&digest, Behaviour::Slow(10_000));
    assert_eq!(curl(&registry, &path, &[]).body, blob);
    // 10,000 bytes a second go out in slices of a twentieth: 500 bytes.
    let writes: Vec<u64> = registry
        .idle()
        .requests()
        .iter()
        .map(|r| r.body_writes)
        .collect();
    assert_eq!(writes, [1, 4]);
}

#[test]
fn a_slow_download_can_be_killed_half_way_and_the_log_shows_where() {
    let registry = HostileRegistry::start();
    let blob = pattern(20_000);
    let digest = registry.add_blob("r", blob);
    registry.set_blob_behaviour(&digest, Behaviour::Slow(20_000));

    let mut download = Command::new("curl")
        .args(["-sS", "-o", "/dev/null"])
        .arg(format!(
            "http://{}{}",
            registry.host(),
            blob_path("r", &digest)
        ))
        .spawn()
        .unwrap();
    assert!(registry.wait_for_bytes_sent(&digest, 3000, Duration::from_secs(10)));
    assert!(
        registry.requests().is_empty(),
        "the answer is still going when the count passes 3000"
    );
    download.kill().unwrap();
    download.wait().unwrap();

    assert!(
        registry.wait_until_idle(Duration::from_secs(10)),
        "the server never noticed"
    );
    let cut = registry.requests().pop().expect("the cut answer is logged");
    assert_eq!(cut.content_length, 20_000);
    assert!(
        (3000..20_000).contains(&cut.bytes_sent),
        "{} bytes",
        cut.bytes_sent
    );
    assert_eq!(registry.bytes_sent_for(&digest), cut.bytes_sent);
}

#[test]
fn huge_manifest_is_padded_to_the_size_asked() {
    let registry = HostileRegistry::start();
    let manifest = br#"{"schemaVersion":2,"layers":[]}"#;
    let digest = registry.add_manifest("r", Some("big"), OCI_MANIFEST, manifest.to_vec());
    registry.set_manifest_behaviour(&digest, Behaviour::Huge(10 << 20));

    let got = curl(&registry, "/v2/r/manifests/big", &[]);
    assert_eq!(got.status, 200);
    assert_eq!(got.header("Content-Length"), Some("10485760"));
    assert_eq!(got.body.len(), 10 << 20);
    assert!(got.body.starts_with(manifest));
    assert!(
        got.body[manifest.len()..].iter().all(|&b| b == b' '),
        "padded with spaces, so still JSON"
    );
    assert_eq!(
        got.header("Docker-Content-Digest"),
        Some(Digest::of(&got.body).to_string().as_str())
    );
    assert_eq!(registry.idle().bytes_sent_for(&digest), 10 << 20);
}

#[test]
fn wrong_media_type_changes_only_the_content_type() {
    let registry = HostileRegistry::start();
    let manifest = br#"{"schemaVersion":2}"#;
    let digest = registry.add_manifest("r", None, OCI_MANIFEST, manifest.to_vec());
    registry.set_manifest_behaviour(&digest, Behaviour::WrongMediaType("text/html".into()));

    let got = curl(&registry, &format!("/v2/r/manifests/{digest}"), &[]);
    assert_eq!(got.status, 200);
    assert_eq!(got.header("Content-Type"), Some("text/html"));
    assert_eq!(got.body, manifest);
}

#[test]
fn wrong_digest_serves_a_body_that_does_not_match_the_digest_claimed() {
    let registry = HostileRegistry::start();
    let manifest = br#"{"schemaVersion":2}"#;
    let digest = registry.add_manifest("r", Some("v1"), OCI_MANIFEST, manifest.to_vec());
    registry.set_manifest_behaviour(&digest, Behaviour::WrongDigest);

    for reference in ["v1".to_string(), digest.to_string()] {
        let got = curl(&registry, &format!("/v2/r/manifests/{reference}"), &[]);
        assert_eq!(got.status, 200);
        assert_eq!(
            got.header("Docker-Content-Digest"),
            Some(digest.to_string().as_str())
        );
        assert_ne!(Digest::of(&got.body), digest);
        serde_json::from_slice::<serde_json::Value>(&got.body).expect("still JSON");
    }
}

#[test]
fn pushes_are_accepted_like_a_real_registry_does() {
    let registry = HostileRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let blob = pattern(5000);
    let digest = Digest::of(&blob);
    std::fs::write(dir.path().join("blob"), &blob).unwrap();

    let started = curl(&registry, "/v2/apps/shop/blobs/uploads/", &["-X", "POST"]);
    assert_eq!(started.status, 202);
    let location = started.header("Location").unwrap().to_string();
    let blob_file = dir.path().join("blob");
    let blob_arg = format!("@{}", blob_file.display());

    let wrong = curl(
        &registry,
        &format!("{location}?digest={}", Digest::of(b"other")),
        &["-X", "PUT", "--data-binary", &blob_arg],
    );
    assert_eq!(wrong.status, 400, "bytes that do not match are refused");

    let started = curl(&registry, "/v2/apps/shop/blobs/uploads/", &["-X", "POST"]);
    let location = started.header("Location").unwrap().to_string();
    let put = curl(
        &registry,
        &format!(
            "{location}?digest={}",
            digest.to_string().replace(':', "%3A")
        ),
        &["-X", "PUT", "--data-binary", &blob_arg],
    );
    assert_eq!(put.status, 201);
    assert_eq!(registry.blob(&digest), Some(blob.clone()));
    assert_eq!(
        curl(&registry, &blob_path("apps/shop", &digest), &[]).body,
        blob
    );

    // A chunked body (curl -T -) is read as well.
    let manifest = format!(r#"{{"schemaVersion":2,"layers":[{{"digest":"{digest}"}}]}}"#);
    std::fs::write(dir.path().join("manifest"), &manifest).unwrap();
    let pushed = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-H", &format!("Content-Type: {OCI_MANIFEST}")])
        .args(["-H", "Transfer-Encoding: chunked", "-T", "-"])
        .arg(format!(
            "http://{}/v2/apps/shop/manifests/v7",
            registry.host()
        ))
        .stdin(std::fs::File::open(dir.path().join("manifest")).unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&pushed.stdout), "201");
    let manifest_digest = Digest::of(manifest.as_bytes());
    assert_eq!(
        registry.tag("apps/shop", "v7"),
        Some(manifest_digest.clone())
    );
    assert_eq!(
        registry.manifest("apps/shop", &manifest_digest),
        Some((OCI_MANIFEST.to_string(), manifest.into_bytes()))
    );
}

/// An app laid out as `stowage publish` lays it out, in `source`.
struct PublishedApp {
    app: Digest,
    everything: Vec<Digest>,
    image_layer_elsewhere: Digest,
}

fn publish_app_layout(source: &HostileRegistry, repo: &str) -> PublishedApp {
    let bundle = source.add_blob(repo, pattern(700));
    let bundle_index = source.add_blob(repo, br#"{"docker-compose.yml":"sha256:00"}"#.to_vec());
    let layers_meta = source.add_blob(repo, br#"{"amd64":{"layers":{}}}"#.to_vec());
    let config = source.add_blob(repo, b"{}".to_vec());
    let image_layer_here = source.add_blob(repo, pattern(300));
    let image_layer_elsewhere = Digest::of(b"a layer only the image repository holds");
    let layer_index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","platform":{{"architecture":"amd64"}},
        "layers":[{{"digest":"{image_layer_elsewhere}","size":39}},{{"digest":"{image_layer_here}","size":300}}],
        "annotations":{{"compose-app-layers":"v1"}}}}"#
    );
    let layer_index = source.add_manifest(repo, None, OCI_INDEX, layer_index.into_bytes());
    let app = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
        "config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{config}","size":2}},
        "layers":[{{"mediaType":"application/octet-stream","digest":"{bundle}","size":700,
                    "annotations":{{"org.foundries.app.bundle.index.digest":"{bundle_index}"}}}},
                  {{"mediaType":"application/json","digest":"{layers_meta}","size":23,
                    "annotations":{{"layers-meta":"v1"}}}}],
        "manifests":[{{"mediaType":"{OCI_INDEX}","digest":"{layer_index}","size":1}}],
        "annotations":{{"compose-app":"v1"}}}}"#
    );
    let app = source.add_manifest(repo, Some("v1"), OCI_MANIFEST, app.into_bytes());
    PublishedApp {
        everything: vec![
            app.clone(),
            bundle,
            bundle_index,
            layers_meta,
            config,
            image_layer_here,
            layer_index,
        ],
        app,
        image_layer_elsewhere,
    }
}

#[test]
fn mirror_copies_an_app_and_everything_it_names() {
    let source = HostileRegistry::start();
    let published = publish_app_layout(&source, "apps/shop");
    let mirror = HostileRegistry::start();

    let app = mirror
        .mirror_from(&source.host(), "apps/shop", "v1")
        .unwrap();
    assert_eq!(app, published.app);
    assert_eq!(mirror.tag("apps/shop", "v1"), Some(published.app.clone()));
    for digest in &published.everything {
        let copied = mirror
            .blob(digest)
            .or_else(|| mirror.manifest("apps/shop", digest).map(|(_, b)| b));
        assert!(copied.is_some(), "{digest} was not mirrored");
    }
    assert_eq!(mirror.blob(&published.image_layer_elsewhere), None);
    let (media_type, _) = mirror.manifest("apps/shop", &published.app).unwrap();
    assert_eq!(media_type, OCI_MANIFEST);

    // The mirror serves what it copied, and may now lie about it.
    let bundle = &published.everything[1];
    mirror.set_blob_behaviour(bundle, Behaviour::WrongBytes);
    let got = curl(&mirror, &blob_path("apps/shop", bundle), &[]);
    assert_ne!(Digest::of(&got.body), *bundle);
}

#[test]
fn mirror_refuses_a_source_that_lacks_or_corrupts_what_the_app_names() {
    let source = HostileRegistry::start();
    let published = publish_app_layout(&source, "apps/shop");
    let bundle = published.everything[1].clone();

    source.set_blob_behaviour(&bundle, Behaviour::WrongBytes);
    let error = HostileRegistry::start()
        .mirror_from(&source.host(), "apps/shop", "v1")
        .unwrap_err();
    assert!(error.to_string().contains(&bundle.to_string()), "{error}");

    source.set_manifest_behaviour(&published.app, Behaviour::WrongDigest);
    let error = HostileRegistry::start()
        .mirror_from(&source.host(), "apps/shop", &published.app.to_string())
        .unwrap_err();
    assert!(error.to_string().contains("digest"), "{error}");

    let error = HostileRegistry::start()
        .mirror_from(&source.host(), "apps/shop", "v404")
        .unwrap_err();
    assert!(error.to_string().contains("404"), "{error}");
}

#[test]
fn mirror_copies_an_image_index_from_the_real_docker_registry() {
    let real = Registry::start();
    let config = real.upload_blob("library/web", br#"{"architecture":"amd64","os":"linux"}"#);
    let layer = real.upload_blob("library/web", &pattern(4096));
    // Pretty-printed on purpose: the registry must keep the exact bytes.
    let image = format!(
        "{{\n  \"schemaVersion\": 2,\n  \"mediaType\": \"{OCI_MANIFEST}\",\n  \"config\": {{\"mediaType\": \"application/vnd.oci.image.config.v1+json\", \"digest\": \"{config}\", \"size\": 38}},\n  \"layers\": [{{\"mediaType\": \"application/vnd.oci.image.layer.v1.tar\", \"digest\": \"{layer}\", \"size\": 4096}}]\n}}\n"
    );
    let image_digest = Digest::of(image.as_bytes());
    real.put_manifest(
        "library/web",
        &image_digest.to_string(),
        OCI_MANIFEST,
        image.as_bytes(),
    );
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{image_digest}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        image.len()
    );
    real.put_manifest("library/web", "1.0", OCI_INDEX, index.as_bytes());
    let (config, layer): (Digest, Digest) = (config.parse().unwrap(), layer.parse().unwrap());

    let mirror = HostileRegistry::start();
    let index_digest = mirror
        .mirror_from(&real.host(), "library/web", "1.0")
        .unwrap();
    assert_eq!(index_digest, Digest::of(index.as_bytes()));
    assert_eq!(
        mirror.manifest("library/web", &index_digest),
        Some((OCI_INDEX.to_string(), index.into_bytes()))
    );
    assert_eq!(
        mirror.manifest("library/web", &image_digest),
        Some((OCI_MANIFEST.to_string(), image.into_bytes()))
    );
    assert_eq!(mirror.blob(&layer), Some(pattern(4096)));
    assert!(mirror.blob(&config).is_some());

    let served = curl(&mirror, "/v2/library/web/manifests/1.0", &[]);
    assert_eq!(
        served.header("Docker-Content-Digest"),
        Some(index_digest.to_string().as_str())
    );
}

#[test]
fn dropping_the_registry_stops_it_listening() {
    let registry = HostileRegistry::start();
    let host = registry.host();
    assert_eq!(curl_at(&host, "/v2/", &[]).status, 200);
    drop(registry);
    assert!(TcpStream::connect(&host).is_err());
}

/// stowage's own registry client, pointed at the hostile registry, gets what
/// a real registry would give it, and the errors each lie deserves.
#[tokio::test]
async fn stowage_registry_client_reads_and_writes_it_like_a_real_registry() {
    use stowage::oci::reference::ImageRef;
    use stowage::oci::registry::{BlobBody, RegistryClient, RegistryError, RegistryOptions};

    let registry = HostileRegistry::start();
    let client = RegistryClient::new(RegistryOptions {
        insecure: vec![registry.host()],
        ..RegistryOptions::default()
    })
    .unwrap();
    let image: ImageRef = format!("{}/apps/shop:v1", registry.host()).parse().unwrap();

    let blob = pattern(1000);
    let digest = Digest::of(&blob);
    client
        .push_blob(&image, &digest, bytes::Bytes::from(blob.clone()))
        .await
        .unwrap();
    let manifest = format!(r#"{{"schemaVersion":2,"layers":[{{"digest":"{digest}"}}]}}"#);
    let manifest_digest = client
        .push_manifest(&image, OCI_MANIFEST, manifest.as_bytes())
        .await
        .unwrap();

    let fetched = client
        .get_manifest(&image, &[OCI_MANIFEST], 4096)
        .await
        .unwrap();
    assert_eq!(fetched.digest, manifest_digest);
    assert_eq!(fetched.media_type, OCI_MANIFEST);
    assert_eq!(
        client.get_blob(&image, &digest, 1000, 4096).await.unwrap(),
        blob
    );

    // A resume is answered with exactly the rest.
    let BlobBody::Partial(rest) = client.fetch_blob(&image, &digest, 1000, 600).await.unwrap()
    else {
        panic!("a resume at 600 was not answered with a 206");
    };
    assert_eq!(rest.bytes().await.unwrap(), blob[600..]);

    registry.set_blob_behaviour(&digest, Behaviour::BadContentRange);
    let refused = client.fetch_blob(&image, &digest, 1000, 600).await;
    assert!(matches!(refused, Err(RegistryError::BadRange { .. })));

    registry.set_blob_behaviour(&digest, Behaviour::SendMore(1));
    let refused = client.get_blob(&image, &digest, 1000, 4096).await;
    assert!(matches!(refused, Err(RegistryError::SizeMismatch { .. })));

    registry.set_manifest_behaviour(
        &manifest_digest,
        Behaviour::WrongMediaType("text/html".into()),
    );
    let refused = client.get_manifest(&image, &[OCI_MANIFEST], 4096).await;
    assert!(matches!(refused, Err(RegistryError::MediaType { .. })));

    registry.set_manifest_behaviour(&manifest_digest, Behaviour::Huge(1 << 20));
    let refused = client
        .get_manifest(&image, &[OCI_MANIFEST], 50 * 1024)
        .await;
    assert!(matches!(refused, Err(RegistryError::TooLarge { .. })));

    registry.set_manifest_behaviour(&manifest_digest, Behaviour::WrongDigest);
    let pinned = image.pinned(&manifest_digest);
    let refused = client.get_manifest(&pinned, &[OCI_MANIFEST], 4096).await;
    assert!(matches!(refused, Err(RegistryError::DigestMismatch { .. })));
}
