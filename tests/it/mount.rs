//! Cross-repository blob mounts under token authentication (issue 11): a real
//! `docker-registry` configured with `auth: token`, trusting the tokens a token
//! server in the harness signs (`common::token_server`). An app published to a
//! staging repository is published again to a production one with
//! `--mount-from`: its blobs are mounted with one token for both repositories,
//! or, when the token server grants no pull on the source, uploaded.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{Value, json};

use crate::common::token_server::{TokenServer, TokenUser};
use crate::common::*;

/// The app's blobs: config, bundle, bundle index, layers-meta.
const APP_BLOBS: u64 = 4;

struct Setup {
    name: String,
    images: Registry,
    tokens: TokenServer,
    registry: Registry,
    app: tempfile::TempDir,
    _base: LocalImage,
}

/// An open registry holding the service's image, a token server whose users are
/// `ci` (pull and push on `NAME/staging`, `NAME/prod` and `NAME/prod2`, pull on
/// `NAME/empty`, which stays empty) and `promoter` (pull and
/// push on `NAME/prod` only), a registry trusting its tokens, and an app.
fn setup(prefix: &str) -> Setup {
    let name = unique(prefix);
    let staging = format!("{name}/staging");
    let prod = format!("{name}/prod");
    let tokens = TokenServer::start(&[
        (
            "ci",
            TokenUser::new(
                "ci-pass",
                &[
                    (&staging, "pull,push"),
                    (&prod, "pull,push"),
                    (&format!("{name}/prod2"), "pull,push"),
                    (&format!("{name}/empty"), "pull"),
                ],
            ),
        ),
        (
            "promoter",
            TokenUser::new("promoter-pass", &[(&prod, "pull,push")]),
        ),
    ]);
    let registry = Registry::start_with_token(&tokens);
    let images = Registry::start();
    let base = format!("{name}-base:1");
    let base_image = busybox_image(&base);
    let image = format!("{}/{name}/base:1", images.host());
    push_image(&base, &image);
    let app = temp_dir("mount-app-");
    write_app(
        app.path(),
        &format!("services:\n  db:\n    image: {image}\n"),
    );
    std::fs::write(app.path().join("settings.ini"), "mode=prod\n").unwrap();
    Setup {
        name,
        images,
        tokens,
        registry,
        app,
        _base: base_image,
    }
}

/// A Docker config directory with `config`.
fn docker_config(config: &Value) -> tempfile::TempDir {
    let dir = temp_dir("mount-cfg-");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn basic_auth(s: &Setup, user: &str, password: &str) -> Value {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    json!({ "auths": { s.registry.host(): { "auth": auth } } })
}

/// `stowage publish --json` of the app to `NAME/REPO:v1`, with `extra` args.
fn publish(s: &Setup, docker: &Path, path: Option<&str>, repo: &str, extra: &[&str]) -> Output {
    let mut cmd = stowage();
    cmd.env("DOCKER_CONFIG", docker);
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    cmd.args(["publish", "--json", "--dir"])
        .arg(s.app.path())
        .args([
            "--insecure-registry",
            &format!("{},{}", s.registry.host(), s.images.host()),
        ])
        .arg("--cache-dir")
        .arg(s.app.path().join(".cache"))
        .args(extra)
        .arg(format!("{}/{}/{repo}:v1", s.registry.host(), s.name));
    run_output(&mut cmd)
}

fn report(out: &Output) -> Value {
    assert!(out.status.success(), "{}", say(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", say(out)))
}

/// The registry's upload sessions directory of a repository: distribution makes
/// it for every upload and never for a mount.
fn uploads_dir(s: &Setup, repo: &str) -> PathBuf {
    s.registry
        .storage_dir()
        .join("docker/registry/v2/repositories")
        .join(&s.name)
        .join(repo)
        .join("_uploads")
}

/// The requests of `method` whose path contains `part`, with the registry's
/// answer `status`, from its log.
fn logged(s: &Setup, method: &str, part: &str, status: u16) -> usize {
    let log = std::fs::read_to_string(s.registry.log_file()).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("response completed"))
        .filter(|l| l.contains(&format!("http.request.method={method}")))
        .filter(|l| l.contains(&format!("http.response.status={status}")))
        .filter(|l| l.contains(part))
        .count()
}

/// The requests whose URI contains `part` that the registry refused with `why`
/// (a 401 is logged as "error authorizing context: WHY"), from its log.
fn refusals(s: &Setup, why: &str, part: &str) -> usize {
    let log = std::fs::read_to_string(s.registry.log_file()).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains(&format!("error authorizing context: {why}")))
        .filter(|l| l.contains(part))
        .count()
}

/// `stowage inspect` of the app in `repo` as `user` works (its blobs are there).
fn inspect_as(s: &Setup, docker: &Path, repo: &str) -> Value {
    let mut cmd = stowage();
    cmd.env("DOCKER_CONFIG", docker).args([
        "inspect",
        "--json",
        "--insecure-registry",
        &s.registry.host(),
        &format!("{}/{}/{repo}:v1", s.registry.host(), s.name),
    ]);
    serde_json::from_str(&run_ok(&mut cmd)).unwrap()
}

#[test]
fn publish_mounts_blobs_from_another_repository_with_one_token_for_both() {
    let s = setup("mount");
    let ci = docker_config(&basic_auth(&s, "ci", "ci-pass"));
    let staged = report(&publish(&s, ci.path(), None, "staging", &[]));
    assert_eq!(staged["mounted"], 0, "{staged}");
    assert!(uploads_dir(&s, "staging").is_dir(), "staging was uploaded");

    let from = format!("{}/{}/staging", s.registry.host(), s.name);
    let out = publish(&s, ci.path(), None, "prod", &["--mount-from", &from]);
    let prod = report(&out);
    assert_eq!(prod["mounted"], APP_BLOBS, "{prod}");
    assert_eq!(prod["digest"], staged["digest"]);
    // The existing fields keep their meaning: every blob and the manifest.
    assert_eq!(
        prod["pushed"].as_array().unwrap().len() as u64,
        APP_BLOBS + 1
    );

    // One token request asked for both repositories, and got both.
    let want = vec![
        format!("repository:{}/prod:pull,push", s.name),
        format!("repository:{}/staging:pull", s.name),
    ];
    let asked: Vec<_> = s
        .tokens
        .requests()
        .into_iter()
        .filter(|r| r.scopes.len() > 1)
        .collect();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].scopes, want);
    assert_eq!(asked[0].granted, want);
    assert_eq!(asked[0].user.as_deref(), Some("ci"));

    // The registry mounted every blob and received none: no upload session was
    // ever opened in prod, no blob PUT there.
    let mount_part = format!("/v2/{}/prod/blobs/uploads/?", s.name);
    assert_eq!(logged(&s, "POST", &mount_part, 201), APP_BLOBS as usize);
    assert_eq!(logged(&s, "PUT", &mount_part.replace('?', ""), 201), 0);
    assert!(!uploads_dir(&s, "prod").exists());
    assert_eq!(inspect_as(&s, ci.path(), "prod")["digest"], prod["digest"]);

    // A source that lacks the blobs (the registry answers 202 and opens an
    // upload, which stowage cancels) is passed over for the next one.
    let empty = format!("{}/{}/empty", s.registry.host(), s.name);
    let out = publish(
        &s,
        ci.path(),
        None,
        "prod2",
        &["--mount-from", &format!("{empty},{from}")],
    );
    assert_eq!(report(&out)["mounted"], APP_BLOBS, "{}", say(&out));
    let prod2 = format!("/v2/{}/prod2/blobs/uploads/", s.name);
    assert_eq!(logged(&s, "POST", &prod2, 202), APP_BLOBS as usize);
    assert_eq!(logged(&s, "POST", &prod2, 201), APP_BLOBS as usize);
    assert_eq!(logged(&s, "PUT", &prod2, 201), 0);
}

#[test]
fn a_token_without_pull_on_the_source_falls_back_to_uploading() {
    let s = setup("mount-denied");
    let ci = docker_config(&basic_auth(&s, "ci", "ci-pass"));
    report(&publish(&s, ci.path(), None, "staging", &[]));

    let promoter = docker_config(&basic_auth(&s, "promoter", "promoter-pass"));
    let from = format!("{}/{}/staging", s.registry.host(), s.name);
    let out = publish(&s, promoter.path(), None, "prod", &["--mount-from", &from]);
    let prod = report(&out);
    assert_eq!(prod["mounted"], 0, "{prod}");
    // Said once, naming both repositories; the source is not tried again.
    let err = String::from_utf8_lossy(&out.stderr);
    let warning = format!(
        "refused to mount blobs from {}/staging into {}/prod",
        s.name, s.name
    );
    assert_eq!(err.matches(&warning).count(), 1, "{err}");
    assert!(err.contains("uploading instead"), "{err}");

    // The token server was asked for both and granted only the target.
    let asked: Vec<_> = s
        .tokens
        .requests()
        .into_iter()
        .filter(|r| r.scopes.len() > 1)
        .collect();
    assert!(!asked.is_empty());
    for r in &asked {
        assert_eq!(r.user.as_deref(), Some("promoter"));
        assert_eq!(
            r.granted,
            vec![format!("repository:{}/prod:pull,push", s.name)]
        );
    }
    let prod_uploads = format!("/v2/{}/prod/blobs/uploads/", s.name);
    // The mount was asked once with the token, refused for its scope, and
    // not asked again for the other blobs.
    assert_eq!(refusals(&s, "insufficient scope", "mount="), 1);
    assert_eq!(logged(&s, "POST", "mount=", 201), 0);
    assert_eq!(logged(&s, "PUT", &prod_uploads, 201), APP_BLOBS as usize);
    assert!(uploads_dir(&s, "prod").is_dir());
    assert_eq!(
        inspect_as(&s, promoter.path(), "prod")["digest"],
        prod["digest"]
    );
}

/// Writes `docker-credential-NAME` into `bin`, answering `user`/`secret`.
fn write_helper(bin: &Path, name: &str, user: &str, secret: &str) {
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = get ] || exit 3\nread -r server\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{secret}\"}}' \"$server\"\n"
    );
    let path = bin.join(format!("docker-credential-{name}"));
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn credentials_from_a_credential_helper_get_tokens_for_mounts() {
    let s = setup("mount-helper");
    let bin = temp_dir("mount-bin-");
    write_helper(bin.path(), "factory", "ci", "ci-pass");
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let helper = docker_config(&json!({ "credHelpers": { s.registry.host(): "factory" } }));
    report(&publish(&s, helper.path(), Some(&path), "staging", &[]));
    let from = format!("{}/{}/staging", s.registry.host(), s.name);
    let out = publish(
        &s,
        helper.path(),
        Some(&path),
        "prod",
        &["--mount-from", &from],
    );
    assert_eq!(report(&out)["mounted"], APP_BLOBS, "{}", say(&out));
    let requests = s.tokens.requests();
    assert!(!requests.is_empty());
    assert!(
        requests.iter().all(|r| r.user.as_deref() == Some("ci")),
        "{requests:?}"
    );
}

#[test]
fn mount_from_another_registry_is_refused_before_anything_is_pushed() {
    let mut cmd = stowage();
    cmd.args([
        "publish",
        "--dry-run",
        "--mount-from",
        "127.0.0.1:2/x/staging",
        "127.0.0.1:1/x/prod:v1",
    ]);
    let out = run_output(&mut cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("mounted only within one registry")
            && err.contains("127.0.0.1:2"),
        "{}",
        say(&out)
    );
}
