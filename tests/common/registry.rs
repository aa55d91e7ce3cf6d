//! A real `docker-registry` (distribution 2.8) per test, on 127.0.0.1 with a free port,
//! with a config this harness writes (never the packaged one), storage in a temp dir and
//! delete enabled. Optionally with htpasswd authentication and/or TLS from a CA the
//! harness makes. Also a small HTTP client (curl) for the registry API.
//!
//! Every started registry is listed in a process-wide table by host, so that
//! `push_image` and `skopeo_inspect_raw` find its credentials and CA from the
//! reference alone.

use super::token_server::TokenServer;
use super::{lock, run_ok, run_output, tail_file, temp_dir};
use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// How a registry is protected.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// `(user, password)`: the registry requires HTTP basic authentication.
    pub htpasswd: Option<(String, String)>,
    /// Serve HTTPS with a certificate signed by a CA the harness makes.
    pub tls: bool,
}

/// What a client needs to talk to one of the harness's registries.
#[derive(Clone, Debug)]
pub(crate) struct RegistryAccess {
    pub credentials: Option<(String, String)>,
    /// A directory holding only `ca.crt` (the form skopeo's `--cert-dir` expects).
    pub cert_dir: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

fn access_table() -> &'static Mutex<HashMap<String, RegistryAccess>> {
    static TABLE: OnceLock<Mutex<HashMap<String, RegistryAccess>>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The access details of the harness registry at `host` ("127.0.0.1:PORT"), if any.
pub(crate) fn access_for(host: &str) -> Option<RegistryAccess> {
    lock(access_table()).get(host).cloned()
}

/// Ports handed out in this process and not yet released: a stopped registry keeps its
/// port so that `restart` gets it back.
fn reserved_ports() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A port that was free a moment ago and that this process has not handed out before.
pub(crate) fn free_port() -> u16 {
    let mut reserved = lock(reserved_ports());
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local address").port();
        if reserved.insert(port) {
            return port;
        }
    }
    panic!("no free port found on 127.0.0.1");
}

pub(crate) fn release_port(port: u16) {
    lock(reserved_ports()).remove(&port);
}

/// A running (or stopped) registry. Dropping it kills the process and deletes its storage.
pub struct Registry {
    dir: tempfile::TempDir,
    port: u16,
    options: RegistryOptions,
    /// `auth: token` with this realm and root certificate (from a [`TokenServer`]).
    token: Option<(String, PathBuf)>,
    child: Option<Child>,
}

impl Registry {
    /// A registry without authentication, plain HTTP.
    pub fn start() -> Registry {
        Registry::start_with(RegistryOptions::default())
    }

    /// A registry protected as `options` says. Returns once `/v2/` answers.
    pub fn start_with(options: RegistryOptions) -> Registry {
        Registry::start_full(options, None)
    }

    /// A plain-HTTP registry with token authentication: it trusts the tokens `server`
    /// signs and sends clients to it for them.
    pub fn start_with_token(server: &TokenServer) -> Registry {
        Registry::start_full(
            RegistryOptions::default(),
            Some((server.realm(), server.cert_file())),
        )
    }

    fn start_full(options: RegistryOptions, token: Option<(String, PathBuf)>) -> Registry {
        let dir = temp_dir("stowage-registry-");
        std::fs::create_dir_all(dir.path().join("storage")).expect("create registry storage");
        let mut registry = Registry {
            dir,
            port: 0,
            options,
            token,
            child: None,
        };
        if let Some((user, password)) = &registry.options.htpasswd {
            let line = run_ok(Command::new("htpasswd").args(["-Bbn", user, password]));
            std::fs::write(registry.htpasswd_file(), format!("{}\n", line.trim()))
                .expect("write htpasswd file");
        }
        if registry.options.tls {
            make_certificates(registry.dir.path());
        }
        // A port picked as free can be taken by another process before the registry
        // binds it; then pick another.
        let mut last_error = String::new();
        for _ in 0..5 {
            registry.port = free_port();
            registry.write_config();
            match registry.spawn() {
                Ok(()) => {
                    lock(access_table()).insert(registry.host(), registry.access());
                    return registry;
                }
                Err(e) => {
                    release_port(registry.port);
                    last_error = e;
                    if !last_error.contains("address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("docker-registry did not start: {last_error}");
    }

    /// "127.0.0.1:PORT", the host part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// "127.0.0.1:PORT/REPO:TAG".
    pub fn image_ref(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.host())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// "http://127.0.0.1:PORT" or "https://127.0.0.1:PORT".
    pub fn url(&self) -> String {
        let scheme = if self.options.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    /// The CA certificate that signed the registry's certificate (TLS registries only).
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.options
            .tls
            .then(|| self.dir.path().join("certs.d").join("ca.crt"))
    }

    /// A directory holding only `ca.crt`, for tools taking a `--cert-dir` (TLS only).
    pub fn cert_dir(&self) -> Option<PathBuf> {
        self.options.tls.then(|| self.dir.path().join("certs.d"))
    }

    pub fn credentials(&self) -> Option<(String, String)> {
        self.options.htpasswd.clone()
    }

    /// Where the registry keeps its blobs and manifests (kept across stop/restart).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Where the registry's log ends now: pass it to [`Registry::blob_gets_since`]
    /// to count only what happens after this moment (not, say, a publish's reads).
    pub fn log_mark(&self) -> u64 {
        std::fs::metadata(self.log_file()).map_or(0, |m| m.len())
    }

    /// The GETs of blobs whose request path contains `part` that the registry
    /// answered since `mark` (from [`Registry::log_mark`]), from its log.
    pub fn blob_gets_since(&self, mark: u64, part: &str) -> usize {
        let log = std::fs::read(self.log_file()).unwrap_or_default();
        let after = log.get(mark as usize..).unwrap_or_default();
        String::from_utf8_lossy(after)
            .lines()
            .filter(|l| l.contains("response completed") && l.contains("http.request.method=GET"))
            .filter(|l| l.contains("/blobs/sha256:") && l.contains(part))
            .count()
    }

    /// The request paths of the GETs the registry answered since `mark`
    /// (from [`Registry::log_mark`]), in order: each a round trip.
    pub fn gets_since(&self, mark: u64) -> Vec<String> {
        let log = std::fs::read(self.log_file()).unwrap_or_default();
        let after = log.get(mark as usize..).unwrap_or_default();
        String::from_utf8_lossy(after)
            .lines()
            .filter(|l| l.contains("response completed") && l.contains("http.request.method=GET"))
            .filter_map(|l| {
                let uri = l.split("http.request.uri=").nth(1)?;
                let uri = uri.trim_start_matches('"');
                Some(uri.split(['"', ' ']).next().unwrap_or(uri).to_string())
            })
            .collect()
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the registry (by pid), keeping its storage and port for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the registry again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            panic!("docker-registry did not restart on {}: {e}", self.host());
        }
    }

    /// `curl` preset for this registry: silent with errors shown, the CA and the
    /// credentials when the registry has them. Add the method, headers and URL.
    pub fn curl(&self) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "60"]);
        if let Some(ca) = self.ca_file() {
            cmd.arg("--cacert").arg(ca);
        }
        if let Some((user, password)) = &self.options.htpasswd {
            cmd.arg("-u").arg(format!("{user}:{password}"));
        }
        cmd
    }

    /// One HTTP request to the registry API; `path` starts with "/v2/" (or is a full URL
    /// the registry returned, like an upload `Location`). Panics when the registry cannot
    /// be reached; any HTTP status is returned.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpResponse {
        let scratch = temp_dir("stowage-http-");
        let header_file = scratch.path().join("headers");
        let body_file = scratch.path().join("body");
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.url())
        };
        let mut cmd = self.curl();
        if method == "HEAD" {
            cmd.arg("--head");
        } else {
            cmd.args(["-X", method]);
        }
        cmd.arg("-D").arg(&header_file);
        cmd.arg("-o").arg(&body_file);
        cmd.args(["-H", "Expect:"]);
        for (name, value) in headers {
            cmd.arg("-H").arg(format!("{name}: {value}"));
        }
        if let Some(body) = body {
            let request_file = scratch.path().join("request");
            std::fs::write(&request_file, body).expect("write request body");
            cmd.arg("--data-binary")
                .arg(format!("@{}", request_file.display()));
        }
        cmd.arg(&url);
        run_ok(&mut cmd);
        let header_text = std::fs::read_to_string(&header_file).unwrap_or_default();
        // With redirects or 100-continue there can be several header blocks; the last
        // one belongs to the final response.
        let block = header_text
            .split("\r\n\r\n")
            .filter(|b| b.starts_with("HTTP/"))
            .last()
            .unwrap_or("");
        let mut lines = block.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status from {method} {url}: {header_text:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let body = std::fs::read(&body_file).unwrap_or_default();
        HttpResponse {
            status,
            headers,
            body,
        }
    }

    /// The raw bytes and media type of a manifest or index.
    pub fn get_manifest(&self, repo: &str, reference: &str) -> (Vec<u8>, String) {
        let accept = [
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        ]
        .join(", ");
        let resp = self.request(
            "GET",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Accept", &accept)],
            None,
        );
        resp.expect_status(200, &format!("GET manifest {repo}:{reference}"));
        let media_type = resp.header("content-type").unwrap_or("").to_string();
        (resp.body, media_type)
    }

    pub fn get_blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        // The filesystem driver serves blobs itself, without a redirect.
        let resp = self.request("GET", &format!("/v2/{repo}/blobs/{digest}"), &[], None);
        resp.expect_status(200, &format!("GET blob {repo}@{digest}"));
        resp.body
    }

    pub fn blob_exists(&self, repo: &str, digest: &str) -> bool {
        self.request("HEAD", &format!("/v2/{repo}/blobs/{digest}"), &[], None)
            .status
            == 200
    }

    /// Uploads `bytes` as a blob of `repo` (POST then PUT); returns its digest.
    pub fn upload_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = super::sha256_digest(bytes);
        if self.blob_exists(repo, &digest) {
            return digest;
        }
        let start = self.request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], None);
        start.expect_status(202, &format!("start upload to {repo}"));
        let location = start
            .header("location")
            .unwrap_or_else(|| panic!("upload to {repo}: no Location header"))
            .to_string();
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = self.request(
            "PUT",
            &format!("{location}{separator}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            Some(bytes),
        );
        put.expect_status(201, &format!("finish upload of {digest} to {repo}"));
        digest
    }

    /// Makes blob `digest` of repository `from` available in `repo` (cross-repo mount).
    pub fn mount_blob(&self, repo: &str, from: &str, digest: &str) {
        if self.blob_exists(repo, digest) {
            return;
        }
        let resp = self.request(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/?mount={digest}&from={from}"),
            &[],
            None,
        );
        if resp.status != 201 {
            // The registry declined the mount: copy the bytes.
            let bytes = self.get_blob(from, digest);
            self.upload_blob(repo, &bytes);
        }
    }

    /// Pushes a manifest or index with its exact bytes; returns its digest.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let resp = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Content-Type", media_type)],
            Some(bytes),
        );
        resp.expect_status(201, &format!("PUT manifest {repo}:{reference}"));
        let digest = super::sha256_digest(bytes);
        if let Some(reported) = resp.header("docker-content-digest") {
            assert_eq!(reported, digest, "registry digest of {repo}:{reference}");
        }
        digest
    }

    fn htpasswd_file(&self) -> PathBuf {
        self.dir.path().join("htpasswd")
    }

    fn access(&self) -> RegistryAccess {
        RegistryAccess {
            credentials: self.options.htpasswd.clone(),
            cert_dir: self.cert_dir(),
            ca_file: self.ca_file(),
        }
    }

    fn write_config(&self) {
        let dir = self.dir.path();
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: {secret}\n",
            storage = self.storage_dir().display(),
            port = self.port,
            secret = super::unique("secret"),
        );
        if self.options.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.join("server.crt").display(),
                dir.join("server.key").display()
            ));
        }
        if self.options.htpasswd.is_some() {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: stowage-test\n    path: {}\n",
                self.htpasswd_file().display()
            ));
        }
        if let Some((realm, cert)) = &self.token {
            config.push_str(&format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                super::token_server::SERVICE,
                super::token_server::ISSUER,
                cert.display()
            ));
        }
        std::fs::write(dir.join("config.yml"), config).expect("write registry config");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log_path = self.log_file();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("open {}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("could not run docker-registry: {e}"))?;
        let mut exited = None;
        let mut ready = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut child = child;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                break;
            }
            if matches!(self.probe(), 200 | 401) {
                ready = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
        if let Some(status) = exited {
            self.child = None;
            return Err(format!(
                "docker-registry exited ({status}): {}",
                tail_file(&log_path, 20)
            ));
        }
        if !ready {
            self.stop();
            return Err(format!(
                "docker-registry did not answer on {} within 30 s: {}",
                self.host(),
                tail_file(&log_path, 20)
            ));
        }
        Ok(())
    }

    /// The HTTP status of `GET /v2/` without credentials, 0 when nothing answers.
    fn probe(&self) -> u16 {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
        ]);
        if let Some(ca) = self.ca_file() {
            cmd.arg("--cacert").arg(ca);
        }
        cmd.arg(format!("{}/v2/", self.url()));
        let out = run_output(&mut cmd);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        lock(access_table()).remove(&self.host());
        release_port(self.port);
    }
}

/// A response from [`Registry::request`]. Header names are lowercase.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn expect_status(&self, status: u16, what: &str) {
        assert_eq!(
            self.status,
            status,
            "{what}: HTTP {} {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
    }
}

/// Makes `ca.crt`/`ca.key` and a server certificate for 127.0.0.1 and localhost in `dir`
/// (`server.crt`, `server.key`), and `certs.d/ca.crt`.
fn make_certificates(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-nodes", "-days", "3"])
            .args(ec)
            .args(["-subj", "/CN=stowage test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(dir.join("ca.key"))
            .arg("-out")
            .arg(dir.join("ca.crt")),
    );
    run_ok(
        Command::new("openssl")
            .args(["req", "-nodes"])
            .args(ec)
            .args(["-subj", "/CN=localhost"])
            .arg("-keyout")
            .arg(dir.join("server.key"))
            .arg("-out")
            .arg(dir.join("server.csr")),
    );
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n",
    )
    .expect("write certificate extensions");
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "3", "-set_serial", "1"])
            .arg("-in")
            .arg(dir.join("server.csr"))
            .arg("-CA")
            .arg(dir.join("ca.crt"))
            .arg("-CAkey")
            .arg(dir.join("ca.key"))
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(dir.join("server.crt")),
    );
    let certs = dir.join("certs.d");
    std::fs::create_dir_all(&certs).expect("create certs.d");
    std::fs::copy(dir.join("ca.crt"), certs.join("ca.crt")).expect("copy ca.crt");
}

/// Writes `dir/config.json` in the Docker config format with credentials for `host`;
/// point `DOCKER_CONFIG` at `dir`. Returns the file's path.
pub fn write_docker_config(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = serde_json::json!({ "auths": { host: { "auth": auth } } });
    std::fs::create_dir_all(dir).expect("create docker config dir");
    let file = dir.join("config.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&config).expect("json"))
        .expect("write docker config");
    file
}
