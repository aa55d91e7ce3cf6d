//! A hostile OCI distribution registry for tests: a minimal HTTP/1.1 server on
//! 127.0.0.1 (a free port, one thread per connection, keep-alive) that serves
//! the manifests and blobs a test hands it, and misbehaves on request, so that
//! `stowage pull` can be shown to refuse or survive every way a registry lies.
//!
//! ```ignore
//! let registry = HostileRegistry::start();
//! let layer = registry.add_blob("app", bytes);                  // -> Digest
//! let app = registry.add_manifest("app", Some("v1"), OCI_MANIFEST, manifest_bytes);
//! registry.set_blob_behaviour(&layer, Behaviour::DropAfter { bytes: 1000, times: 1 });
//! // ... run stowage against registry.host() as an insecure registry ...
//! assert_eq!(registry.bytes_sent_for(&layer), size);         // nothing fetched twice
//! ```
//!
//! Endpoints (reads are what behaviours act on; writes are always honest):
//! - `GET /v2/`: 200 `{}`.
//! - `GET|HEAD /v2/<repo>/manifests/<tag|digest>`: 200, `Content-Type` = the
//!   media type given to `add_manifest`, `Docker-Content-Digest`. The Accept
//!   header is logged, not obeyed: the manifest is served as stored.
//! - `GET|HEAD /v2/<repo>/blobs/<digest>`, with `Range: bytes=N-` or
//!   `bytes=N-M`: 206 with `Content-Range: bytes N-M/size`; 416 past the end;
//!   200 without a Range (or with one it cannot parse).
//! - Pushes, so that `stowage publish` can target it directly:
//!   `POST /v2/<repo>/blobs/uploads/` (202 + Location; or 201 when it carries
//!   `?digest=` and the body), `PATCH` of the upload, `PUT <upload>?digest=`
//!   (201; 400 when the bytes do not match), `PUT /v2/<repo>/manifests/<ref>`
//!   (201, stored under its Content-Type, tagged when `<ref>` is a tag).
//! - Anything else: 404 (unknown content) or 405 (unknown method).
//!
//! Unknown content is per repository, as in a real registry.
//!
//! Misbehaviour is set per content digest with [`Behaviour`], for blobs
//! (`set_blob_behaviour`) and manifests (`set_manifest_behaviour`, which acts
//! whether the manifest is asked for by tag or by digest); every behaviour
//! works on both. HEAD answers carry the same (lying) headers as GET, no body,
//! and do not count down `DropAfter`.
//!
//! Every request is logged ([`RequestLog`]) once its answer is finished or cut
//! off; `bytes_sent` counts body bytes the kernel accepted, not headers.
//! `bytes_sent_for(digest)` sums the body bytes of every GET of one content,
//! counting answers still in progress, and `wait_for_bytes_sent` waits for it
//! to pass a mark (to kill a client half way through a `Slow` blob).
//!
//! Public API, all on `HostileRegistry` (`&self`, safe from any thread):
//! `start()`, `host()`, `add_blob(repo, bytes) -> Digest`,
//! `add_manifest(repo, tag, media_type, bytes) -> Digest`,
//! `set_blob_behaviour(&digest, b)`, `set_manifest_behaviour(&digest, b)`,
//! `tag(repo, tag)`, `blob(&digest)`, `manifest(repo, &digest)`,
//! `requests()`, `clear_requests()`, `bytes_sent_for(&digest)`,
//! `wait_for_bytes_sent(&digest, bytes, timeout)`,
//! `mirror_from(source_host, repo, reference) -> io::Result<Digest>`.
//!
//! `mirror_from(source_host, repo, reference)` copies a manifest and, walking
//! it, everything it names from a real registry over plain HTTP (std::net, no
//! auth): `config`, `layers`, the blob named by a layer's
//! `org.foundries.app.bundle.index.digest` annotation, and `manifests`
//! entries (image manifests, indexes, the app's layer indexes), recursively.
//! The layers a layer index lists live in the images' repositories, not the
//! app's, so those are copied when the source repository has them and skipped
//! otherwise; mirror the images' repositories too when a test needs them.
//! Tag references are recreated as tags. Digests are checked on every copy.
//!
//! To serve a whole app with misbehaving image layers: mirror (or add) the
//! images into this registry, publish an app whose compose file names
//! `<registry.host()>/<repo>:<tag>`, pushing it here (or to a real registry
//! and `mirror_from` it), then set behaviours and pull.
//!
//! Dropping the `HostileRegistry` stops the listener; connections still open
//! end at their next request or, while pacing a `Slow` answer, at once.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use stowage::Digest;

/// How the registry answers GETs (and, for headers, HEADs) of one content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// A correct answer.
    Honest,
    /// The requested bytes followed by `extra` zero bytes. Content-Length
    /// counts them, so the lie is only against the descriptor's size; a 206
    /// still carries the honest Content-Range.
    SendMore(u64),
    /// Content-Length of the full answer, then only `n` body bytes, then the
    /// connection is closed. Every time.
    SendFewer(u64),
    /// The same length, but the last byte of the content is flipped (so it is
    /// wrong in every range `N-`, and the digest does not match).
    WrongBytes,
    /// 200 with the whole content even when a Range was asked.
    IgnoreRange,
    /// On a Range request: 206 whose Content-Range (and body) starts at 0
    /// (at 1 when 0 was asked) instead of where asked. Honest without Range.
    BadContentRange,
    /// The first `times` GETs send `bytes` body bytes (Content-Length says
    /// the full answer) and close; after that, honest. For resume tests.
    DropAfter { bytes: u64, times: u32 },
    /// Honest bytes, paced at about `bytes_per_sec` (in 20 slices a second).
    Slow(u64),
    /// The content padded with spaces (still valid JSON for a manifest) to
    /// `total` bytes. Docker-Content-Digest is that of the padded body.
    Huge(u64),
    /// Content-Type is this instead of the stored media type.
    WrongMediaType(String),
    /// The body is the content plus a trailing newline (still valid JSON),
    /// while Docker-Content-Digest claims the digest asked for.
    WrongDigest,
    /// 307 to this base URL plus the request's path, as a registry whose
    /// blobs live in other storage does (not a lie: the target serves them).
    RedirectTo(String),
}

/// One request and what the registry did with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLog {
    pub method: String,
    /// The request target without the query string.
    pub path: String,
    pub range: Option<String>,
    pub accept: Option<String>,
    /// The content the request was about (a tag resolved to its digest).
    pub digest: Option<Digest>,
    pub status: u16,
    /// What Content-Length announced.
    pub content_length: u64,
    /// Body bytes actually written (0 for HEAD).
    pub bytes_sent: u64,
    /// How many writes the body went out in (a `Slow` answer is paced out
    /// in slices of a twentieth of its rate, anything else in one).
    pub body_writes: u64,
}

struct Manifest {
    media_type: String,
    bytes: Arc<Vec<u8>>,
}

#[derive(Default)]
struct State {
    blobs: HashMap<Digest, Arc<Vec<u8>>>,
    /// Which repositories hold which blobs.
    blob_repos: HashSet<(String, Digest)>,
    manifests: HashMap<(String, Digest), Manifest>,
    tags: HashMap<(String, String), Digest>,
    blob_behaviours: HashMap<Digest, Behaviour>,
    manifest_behaviours: HashMap<Digest, Behaviour>,
    /// Upload sessions: id -> (repository, bytes so far).
    uploads: HashMap<String, (String, Vec<u8>)>,
    next_upload: u64,
    log: Vec<RequestLog>,
    /// Requests being answered (not yet in `log`).
    in_progress: u64,
    /// Body bytes of GETs written so far, answers in progress included.
    sent_by_digest: HashMap<Digest, u64>,
}

struct Shared {
    state: Mutex<State>,
    stopping: AtomicBool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking connection thread must not take the test's view away.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct HostileRegistry {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl HostileRegistry {
    /// Listens on 127.0.0.1 on a free port. Panics when it cannot bind.
    pub fn start() -> HostileRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("local address of the listener");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            stopping: AtomicBool::new(false),
        });
        let accept_shared = shared.clone();
        let acceptor = thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let conn_shared = accept_shared.clone();
                thread::spawn(move || serve_connection(stream, conn_shared));
            }
        });
        HostileRegistry {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `127.0.0.1:PORT`, the registry part of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Stores a blob in `repo` and returns its digest.
    pub fn add_blob(&self, repo: &str, bytes: impl Into<Vec<u8>>) -> Digest {
        let bytes = bytes.into();
        let digest = Digest::of(&bytes);
        let mut state = self.shared.state();
        state.blobs.insert(digest.clone(), Arc::new(bytes));
        state.blob_repos.insert((repo.to_string(), digest.clone()));
        digest
    }

    /// Stores a manifest's exact bytes in `repo` under `media_type`, tagged
    /// when `tag` is given, and returns its digest.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: impl Into<Vec<u8>>,
    ) -> Digest {
        let bytes = bytes.into();
        let digest = Digest::of(&bytes);
        let mut state = self.shared.state();
        state.manifests.insert(
            (repo.to_string(), digest.clone()),
            Manifest {
                media_type: media_type.to_string(),
                bytes: Arc::new(bytes),
            },
        );
        if let Some(tag) = tag {
            state
                .tags
                .insert((repo.to_string(), tag.to_string()), digest.clone());
        }
        digest
    }

    pub fn set_blob_behaviour(&self, digest: &Digest, behaviour: Behaviour) {
        self.shared
            .state()
            .blob_behaviours
            .insert(digest.clone(), behaviour);
    }

    /// Acts on the manifest whether it is asked for by tag or by digest.
    pub fn set_manifest_behaviour(&self, digest: &Digest, behaviour: Behaviour) {
        self.shared
            .state()
            .manifest_behaviours
            .insert(digest.clone(), behaviour);
    }

    /// The digest `repo:tag` points at.
    pub fn tag(&self, repo: &str, tag: &str) -> Option<Digest> {
        self.shared
            .state()
            .tags
            .get(&(repo.to_string(), tag.to_string()))
            .cloned()
    }

    /// A stored blob (whatever repository holds it).
    pub fn blob(&self, digest: &Digest) -> Option<Vec<u8>> {
        self.shared
            .state()
            .blobs
            .get(digest)
            .map(|b| b.as_ref().clone())
    }

    /// A stored manifest of `repo`: (media type, bytes).
    pub fn manifest(&self, repo: &str, digest: &Digest) -> Option<(String, Vec<u8>)> {
        self.shared
            .state()
            .manifests
            .get(&(repo.to_string(), digest.clone()))
            .map(|m| (m.media_type.clone(), m.bytes.as_ref().clone()))
    }

    /// Every request answered so far, in the order the answers finished.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.shared.state().log.clone()
    }

    /// Forgets the log and the byte counts.
    pub fn clear_requests(&self) {
        let mut state = self.shared.state();
        state.log.clear();
        state.sent_by_digest.clear();
    }

    /// Body bytes sent by GETs of this content (blob or manifest) so far,
    /// answers still in progress included. Equal to the size when the content
    /// was fetched once, resumed or not.
    pub fn bytes_sent_for(&self, digest: &Digest) -> u64 {
        self.shared
            .state()
            .sent_by_digest
            .get(digest)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until at least `bytes` of this content have been sent (to kill a
    /// client mid-download); false when `timeout` passes first.
    pub fn wait_for_bytes_sent(&self, digest: &Digest, bytes: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.bytes_sent_for(digest) >= bytes {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until no answer is in progress (every request so far is in
    /// [`HostileRegistry::requests`]), as after a client was killed mid-answer
    /// the registry notices at its next write; false when `timeout` passes first.
    pub fn wait_until_idle(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.shared.state().in_progress == 0 {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The registry once every answer in progress is finished: a client that
    /// has read a whole answer can be done before the registry has counted
    /// and logged it, so read counts and the log through this after a client
    /// ends (`registry.idle().bytes_sent_for(&digest)`). Panics after a minute.
    pub fn idle(&self) -> &HostileRegistry {
        assert!(
            self.wait_until_idle(Duration::from_secs(60)),
            "the registry is still answering after a minute"
        );
        self
    }

    /// Copies `repo`'s manifest `reference` (tag or digest) and everything it
    /// names from the registry at `source_host` (plain HTTP). Returns the
    /// root manifest's digest.
    pub fn mirror_from(
        &self,
        source_host: &str,
        repo: &str,
        reference: &str,
    ) -> io::Result<Digest> {
        let mut seen = HashSet::new();
        let digest = self.mirror_manifest(source_host, repo, reference, &mut seen)?;
        if reference.parse::<Digest>().is_err() {
            self.shared
                .state()
                .tags
                .insert((repo.to_string(), reference.to_string()), digest.clone());
        }
        Ok(digest)
    }

    fn mirror_manifest(
        &self,
        source: &str,
        repo: &str,
        reference: &str,
        seen: &mut HashSet<Digest>,
    ) -> io::Result<Digest> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let answer = http_get(source, &path, Some(MANIFEST_ACCEPT))?;
        if answer.status != 200 {
            return Err(mirror_error(format!(
                "GET {source}{path} answered {}",
                answer.status
            )));
        }
        let digest = Digest::of(&answer.body);
        if let Ok(asked) = reference.parse::<Digest>()
            && asked != digest
        {
            return Err(mirror_error(format!(
                "GET {source}{path} sent a body whose digest is {digest}"
            )));
        }
        if let Some(claimed) = answer.header("docker-content-digest")
            && claimed != digest.to_string()
        {
            return Err(mirror_error(format!(
                "GET {source}{path} claims digest {claimed} for a body whose digest is {digest}"
            )));
        }
        let media_type = answer
            .header("content-type")
            .map(|t| t.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let document: serde_json::Value = serde_json::from_slice(&answer.body)
            .map_err(|e| mirror_error(format!("manifest {source}{path} is not JSON: {e}")))?;
        self.add_manifest(repo, None, &media_type, answer.body);
        if !seen.insert(digest.clone()) {
            return Ok(digest);
        }

        let descriptor_digest = |d: &serde_json::Value| -> io::Result<Option<Digest>> {
            match d.get("digest").and_then(|v| v.as_str()) {
                None => Ok(None),
                Some(s) => s.parse().map(Some).map_err(|e| {
                    mirror_error(format!("manifest {source}{path} names a bad digest: {e}"))
                }),
            }
        };
        // A layer index lists image layers, which live in other repositories.
        let is_index = document.get("manifests").is_some()
            || media_type.contains("index")
            || media_type.contains("manifest.list");
        if let Some(config) = document.get("config")
            && let Some(d) = descriptor_digest(config)?
        {
            self.mirror_blob(source, repo, &d, true, seen)?;
        }
        for layer in array(&document, "layers") {
            if let Some(d) = descriptor_digest(layer)? {
                self.mirror_blob(source, repo, &d, !is_index, seen)?;
            }
            if let Some(index) = layer
                .get("annotations")
                .and_then(|a| a.get(stowage::oci::format::BUNDLE_INDEX_DIGEST))
                .and_then(|v| v.as_str())
            {
                let d: Digest = index.parse().map_err(|e| {
                    mirror_error(format!(
                        "manifest {source}{path} names a bad bundle index: {e}"
                    ))
                })?;
                self.mirror_blob(source, repo, &d, true, seen)?;
            }
        }
        for child in array(&document, "manifests") {
            if let Some(d) = descriptor_digest(child)? {
                self.mirror_manifest(source, repo, &d.to_string(), seen)?;
            }
        }
        Ok(digest)
    }

    fn mirror_blob(
        &self,
        source: &str,
        repo: &str,
        digest: &Digest,
        required: bool,
        seen: &mut HashSet<Digest>,
    ) -> io::Result<()> {
        if !seen.insert(digest.clone()) {
            return Ok(());
        }
        let path = format!("/v2/{repo}/blobs/{digest}");
        let answer = http_get(source, &path, None)?;
        if answer.status == 404 && !required {
            return Ok(());
        }
        if answer.status != 200 {
            return Err(mirror_error(format!(
                "GET {source}{path} answered {}",
                answer.status
            )));
        }
        let actual = Digest::of(&answer.body);
        if &actual != digest {
            return Err(mirror_error(format!(
                "GET {source}{path} sent a body whose digest is {actual}"
            )));
        }
        self.add_blob(repo, answer.body);
        Ok(())
    }
}

impl Drop for HostileRegistry {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

fn array<'a>(document: &'a serde_json::Value, key: &str) -> &'a [serde_json::Value] {
    document
        .get(key)
        .and_then(|v| v.as_array())
        .map(|v| v.as_slice())
        .unwrap_or(&[])
}

fn mirror_error(message: String) -> io::Error {
    io::Error::other(format!("mirroring: {message}"))
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A GET over HTTP/1.0, so that the server neither chunks nor keeps the
/// connection: the body is everything up to EOF (checked against
/// Content-Length when there is one).
fn http_get(host: &str, path: &str, accept: Option<&str>) -> io::Result<Answer> {
    let mut stream = TcpStream::connect(host)
        .map_err(|e| mirror_error(format!("cannot connect to {host}: {e}")))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(accept) = accept {
        request.push_str(&format!("Accept: {accept}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| mirror_error(format!("{host}{path}: bad status line {status_line:?}")))?;
    let headers = read_headers(&mut reader)?;
    let mut answer = Answer {
        status,
        headers,
        body: Vec::new(),
    };
    match answer.header("content-length") {
        Some(length) => {
            let length: usize = length.parse().map_err(|_| {
                mirror_error(format!("{host}{path}: bad Content-Length {length:?}"))
            })?;
            answer.body.resize(length, 0);
            reader.read_exact(&mut answer.body).map_err(|e| {
                mirror_error(format!(
                    "{host}{path}: body shorter than {length} bytes: {e}"
                ))
            })?;
        }
        None => {
            reader.read_to_end(&mut answer.body)?;
        }
    }
    Ok(answer)
}

/// Header lines up to the empty line, names lowercased.
fn read_headers(reader: &mut impl BufRead) -> io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line)?;
        total += n;
        if n == 0 || total > 64 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "headers cut short or too long",
            ));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            return Ok(headers);
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
}

// ---------------------------------------------------------------- the server

struct Request {
    method: String,
    path: String,
    query: String,
    http_1_0: bool,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name).then(|| percent_decode(v))
        })
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(hex) = std::str::from_utf8(&bytes[i + 1..i + 3])
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let request = match read_request(&mut reader, &mut writer) {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    let _ = write_simple(&mut writer, 400, "text/plain", b"bad request\n", true);
                }
                break;
            }
        };
        // HTTP/1.0 clients expect the connection to end with the answer.
        let close_asked = request.http_1_0
            || request
                .header("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let keep = handle(&shared, &request, &mut writer);
        if !keep || close_asked {
            break;
        }
    }
    let _ = writer.flush();
    let _ = writer.shutdown(Shutdown::Both);
}

fn read_request(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
) -> io::Result<Option<Request>> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), version) = (parts.next(), parts.next(), parts.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request line",
        ));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        http_1_0: version == Some("HTTP/1.0"),
        headers: read_headers(reader)?,
        body: Vec::new(),
    };
    // curl waits a second for this before it sends a body of over 1 KiB.
    if request
        .header("expect")
        .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
    {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let chunked = request
        .header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line)?;
            let size_hex = size_line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                read_headers(reader)?; // trailers
                break;
            }
            let start = request.body.len();
            request.body.resize(start + size, 0);
            reader.read_exact(&mut request.body[start..])?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else if let Some(length) = request.header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?;
        request.body.resize(length, 0);
        reader.read_exact(&mut request.body)?;
    }
    Ok(Some(request))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        206 => "Partial Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        _ => "Unknown",
    }
}

fn write_head(
    writer: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    content_length: u64,
    close: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    head.push_str("Docker-Distribution-API-Version: registry/2.0\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {content_length}\r\n"));
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    writer.write_all(head.as_bytes())
}

fn write_simple(
    writer: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    let headers = [("Content-Type".to_string(), content_type.to_string())];
    write_head(writer, status, &headers, body.len() as u64, close)?;
    writer.write_all(body)
}

fn error_body(code: &str, message: &str) -> Vec<u8> {
    format!(r#"{{"errors":[{{"code":"{code}","message":"{message}"}}]}}"#).into_bytes()
}

/// What a request was about, for the log.
enum Target {
    Base,
    Manifest { repo: String, reference: String },
    Blob { repo: String, digest: String },
    Upload { repo: String, id: Option<String> },
    Unknown,
}

fn route(path: &str) -> Target {
    if path == "/v2/" || path == "/v2" {
        return Target::Base;
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Target::Unknown;
    };
    if let Some(i) = rest.find("/blobs/uploads") {
        let id = rest[i + "/blobs/uploads".len()..].trim_matches('/');
        return Target::Upload {
            repo: rest[..i].to_string(),
            id: (!id.is_empty()).then(|| id.to_string()),
        };
    }
    if let Some(i) = rest.rfind("/manifests/") {
        return Target::Manifest {
            repo: rest[..i].to_string(),
            reference: rest[i + "/manifests/".len()..].to_string(),
        };
    }
    if let Some(i) = rest.rfind("/blobs/") {
        return Target::Blob {
            repo: rest[..i].to_string(),
            digest: rest[i + "/blobs/".len()..].to_string(),
        };
    }
    Target::Unknown
}

/// Answers one request and logs it; false when the connection must close.
fn handle(shared: &Shared, request: &Request, writer: &mut TcpStream) -> bool {
    let mut entry = RequestLog {
        method: request.method.clone(),
        path: request.path.clone(),
        range: request.header("range").map(str::to_string),
        accept: request.header("accept").map(str::to_string),
        digest: None,
        status: 0,
        content_length: 0,
        bytes_sent: 0,
        body_writes: 0,
    };
    shared.state().in_progress += 1;
    let keep = match (request.method.as_str(), route(&request.path)) {
        ("GET" | "HEAD", Target::Base) => {
            let answer = Answer {
                status: 200,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: b"{}".to_vec(),
            };
            send_plain(writer, request, answer, &mut entry)
        }
        ("GET" | "HEAD", Target::Manifest { repo, reference }) => {
            let found = {
                let state = shared.state();
                let digest = match reference.parse::<Digest>() {
                    Ok(d) => Some(d),
                    Err(_) => state.tags.get(&(repo.clone(), reference.clone())).cloned(),
                };
                digest.and_then(|d| {
                    state
                        .manifests
                        .get(&(repo.clone(), d.clone()))
                        .map(|m| (d, m.media_type.clone(), m.bytes.clone()))
                })
            };
            match found {
                Some((digest, media_type, bytes)) => {
                    entry.digest = Some(digest.clone());
                    let content = Content {
                        digest,
                        media_type,
                        bytes,
                        manifest: true,
                    };
                    send_content(shared, writer, request, content, &mut entry)
                }
                None => send_plain(
                    writer,
                    request,
                    not_found("MANIFEST_UNKNOWN", "manifest unknown"),
                    &mut entry,
                ),
            }
        }
        ("GET" | "HEAD", Target::Blob { repo, digest }) => {
            let found = digest.parse::<Digest>().ok().and_then(|d| {
                let state = shared.state();
                if !state.blob_repos.contains(&(repo.clone(), d.clone())) {
                    return None;
                }
                state.blobs.get(&d).map(|b| (d, b.clone()))
            });
            match found {
                Some((digest, bytes)) => {
                    entry.digest = Some(digest.clone());
                    let content = Content {
                        digest,
                        media_type: "application/octet-stream".into(),
                        bytes,
                        manifest: false,
                    };
                    send_content(shared, writer, request, content, &mut entry)
                }
                None => send_plain(
                    writer,
                    request,
                    not_found("BLOB_UNKNOWN", "blob unknown to registry"),
                    &mut entry,
                ),
            }
        }
        ("POST" | "PATCH" | "PUT", Target::Upload { repo, id }) => {
            let answer = upload(shared, request, &repo, id, &mut entry);
            send_plain(writer, request, answer, &mut entry)
        }
        ("PUT", Target::Manifest { repo, reference }) => {
            let answer = put_manifest(shared, request, &repo, &reference, &mut entry);
            send_plain(writer, request, answer, &mut entry)
        }
        (_, Target::Unknown) => send_plain(
            writer,
            request,
            not_found("NAME_UNKNOWN", "no such endpoint"),
            &mut entry,
        ),
        _ => {
            let answer = Answer {
                status: 405,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: error_body("UNSUPPORTED", "the operation is unsupported"),
            };
            send_plain(writer, request, answer, &mut entry)
        }
    };
    let mut state = shared.state();
    state.log.push(entry);
    state.in_progress -= 1;
    keep
}

fn not_found(code: &str, message: &str) -> Answer {
    Answer {
        status: 404,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: error_body(code, message),
    }
}

fn send_plain(
    writer: &mut TcpStream,
    request: &Request,
    answer: Answer,
    entry: &mut RequestLog,
) -> bool {
    entry.status = answer.status;
    entry.content_length = answer.body.len() as u64;
    if write_head(
        writer,
        answer.status,
        &answer.headers,
        answer.body.len() as u64,
        false,
    )
    .is_err()
    {
        return false;
    }
    if request.method == "HEAD" {
        return true;
    }
    match writer.write_all(&answer.body) {
        Ok(()) => {
            entry.bytes_sent = answer.body.len() as u64;
            entry.body_writes = u64::from(!answer.body.is_empty());
            true
        }
        Err(_) => false,
    }
}

fn upload(
    shared: &Shared,
    request: &Request,
    repo: &str,
    id: Option<String>,
    entry: &mut RequestLog,
) -> Answer {
    let mut state = shared.state();
    let id = match id {
        Some(id) => id,
        None => {
            state.next_upload += 1;
            let id = format!("upload-{}", state.next_upload);
            state
                .uploads
                .insert(id.clone(), (repo.to_string(), Vec::new()));
            id
        }
    };
    let Some((_, bytes)) = state.uploads.get_mut(&id) else {
        return not_found("BLOB_UPLOAD_UNKNOWN", "upload unknown");
    };
    bytes.extend_from_slice(&request.body);
    let location = format!("/v2/{repo}/blobs/uploads/{id}");
    let Some(expected) = request.query_param("digest") else {
        let received = bytes.len();
        return Answer {
            status: 202,
            headers: vec![
                ("Location".into(), location),
                ("Docker-Upload-UUID".into(), id),
                ("Range".into(), format!("0-{}", received.saturating_sub(1))),
            ],
            body: Vec::new(),
        };
    };
    let Some((_, bytes)) = state.uploads.remove(&id) else {
        return not_found("BLOB_UPLOAD_UNKNOWN", "upload unknown");
    };
    let digest = Digest::of(&bytes);
    entry.digest = Some(digest.clone());
    if expected != digest.to_string() {
        return Answer {
            status: 400,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: error_body(
                "DIGEST_INVALID",
                "provided digest did not match uploaded content",
            ),
        };
    }
    state.blobs.insert(digest.clone(), Arc::new(bytes));
    state.blob_repos.insert((repo.to_string(), digest.clone()));
    Answer {
        status: 201,
        headers: vec![
            ("Location".into(), format!("/v2/{repo}/blobs/{digest}")),
            ("Docker-Content-Digest".into(), digest.to_string()),
        ],
        body: Vec::new(),
    }
}

fn put_manifest(
    shared: &Shared,
    request: &Request,
    repo: &str,
    reference: &str,
    entry: &mut RequestLog,
) -> Answer {
    let digest = Digest::of(&request.body);
    entry.digest = Some(digest.clone());
    let as_digest = reference.parse::<Digest>();
    if let Ok(asked) = &as_digest
        && asked != &digest
    {
        return Answer {
            status: 400,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: error_body("DIGEST_INVALID", "manifest digest did not match"),
        };
    }
    let media_type = request
        .header("content-type")
        .map(|t| t.split(';').next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let mut state = shared.state();
    state.manifests.insert(
        (repo.to_string(), digest.clone()),
        Manifest {
            media_type,
            bytes: Arc::new(request.body.clone()),
        },
    );
    if as_digest.is_err() {
        state
            .tags
            .insert((repo.to_string(), reference.to_string()), digest.clone());
    }
    Answer {
        status: 201,
        headers: vec![
            ("Location".into(), format!("/v2/{repo}/manifests/{digest}")),
            ("Docker-Content-Digest".into(), digest.to_string()),
        ],
        body: Vec::new(),
    }
}

struct Content {
    digest: Digest,
    media_type: String,
    bytes: Arc<Vec<u8>>,
    manifest: bool,
}

/// Parses `bytes=N-` or `bytes=N-M` (inclusive M).
fn parse_range(header: &str) -> Option<(u64, Option<u64>)> {
    let spec = header.trim().strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => None,
        e => Some(e.parse().ok()?),
    };
    Some((start, end))
}

/// Answers a GET or HEAD of a blob or manifest, misbehaving as told.
fn send_content(
    shared: &Shared,
    writer: &mut TcpStream,
    request: &Request,
    content: Content,
    entry: &mut RequestLog,
) -> bool {
    let is_get = request.method == "GET";
    let behaviour = {
        let mut state = shared.state();
        let behaviours = if content.manifest {
            &mut state.manifest_behaviours
        } else {
            &mut state.blob_behaviours
        };
        match behaviours.get_mut(&content.digest) {
            Some(Behaviour::DropAfter { bytes, times }) if *times > 0 => {
                let now = Behaviour::DropAfter {
                    bytes: *bytes,
                    times: *times,
                };
                if is_get {
                    *times -= 1;
                }
                now
            }
            Some(Behaviour::DropAfter { .. }) | None => Behaviour::Honest,
            Some(other) => other.clone(),
        }
    };

    if let Behaviour::RedirectTo(base) = &behaviour {
        entry.status = 307;
        let location = vec![("Location".to_string(), format!("{base}{}", request.path))];
        return write_head(writer, 307, &location, 0, false).is_ok();
    }

    // The content as this answer presents it, and the digest it claims.
    let mut served: Arc<Vec<u8>> = content.bytes.clone();
    let mut claimed_digest = content.digest.clone();
    let mut content_type = content.media_type.clone();
    match &behaviour {
        Behaviour::Huge(total) => {
            let mut padded = served.as_ref().clone();
            if (padded.len() as u64) < *total {
                padded.resize(*total as usize, b' ');
            }
            claimed_digest = Digest::of(&padded);
            served = Arc::new(padded);
        }
        Behaviour::WrongDigest => {
            let mut longer = served.as_ref().clone();
            longer.push(b'\n');
            served = Arc::new(longer);
        }
        Behaviour::WrongBytes => {
            let mut flipped = served.as_ref().clone();
            if let Some(last) = flipped.last_mut() {
                *last ^= 0xff;
            }
            served = Arc::new(flipped);
        }
        Behaviour::WrongMediaType(t) => content_type = t.clone(),
        _ => {}
    }
    let total = served.len() as u64;

    let mut headers = vec![
        ("Content-Type".to_string(), content_type),
        (
            "Docker-Content-Digest".to_string(),
            claimed_digest.to_string(),
        ),
        ("Accept-Ranges".to_string(), "bytes".to_string()),
    ];
    let range = request.header("range").and_then(parse_range);
    let (status, start, end) = match range {
        None => (200, 0, total),
        Some(_) if behaviour == Behaviour::IgnoreRange => (200, 0, total),
        Some((asked, _)) if asked >= total => {
            headers.push(("Content-Range".into(), format!("bytes */{total}")));
            entry.status = 416;
            let ok = write_head(writer, 416, &headers, 0, false).is_ok();
            return ok;
        }
        Some((asked, last)) => {
            let end = last.map_or(total, |l| l.saturating_add(1).min(total));
            let start = if behaviour == Behaviour::BadContentRange {
                if asked == 0 { 1.min(end) } else { 0 }
            } else {
                asked
            };
            (206, start, end)
        }
    };
    if status == 206 {
        headers.push((
            "Content-Range".into(),
            format!("bytes {start}-{}/{total}", end.saturating_sub(1)),
        ));
    }
    let extra = match behaviour {
        Behaviour::SendMore(extra) => extra,
        _ => 0,
    };
    let content_length = end - start + extra;
    let cut_after = match behaviour {
        Behaviour::SendFewer(n) | Behaviour::DropAfter { bytes: n, .. } => {
            Some(n.min(content_length))
        }
        _ => None,
    };
    let pace = match behaviour {
        Behaviour::Slow(bytes_per_sec) => Some(bytes_per_sec.max(1)),
        _ => None,
    };
    entry.status = status;
    entry.content_length = content_length;
    if write_head(
        writer,
        status,
        &headers,
        content_length,
        // A cut is not announced: the connection just ends.
        false,
    )
    .is_err()
    {
        return false;
    }
    if !is_get {
        return true;
    }

    let body = &served[start as usize..end as usize];
    let zeros = vec![0u8; extra as usize];
    let limit = cut_after.unwrap_or(content_length);
    let slice = (pace.map_or(64 * 1024, |p| (p / 20).max(1))) as usize;
    let mut sent: u64 = 0;
    for part in [body, zeros.as_slice()] {
        let mut offset = 0usize;
        while offset < part.len() && sent < limit {
            if shared.stopping.load(Ordering::SeqCst) {
                entry.bytes_sent = sent;
                return false;
            }
            let n = slice.min(part.len() - offset).min((limit - sent) as usize);
            if writer.write_all(&part[offset..offset + n]).is_err() {
                entry.bytes_sent = sent;
                return false;
            }
            offset += n;
            sent += n as u64;
            entry.body_writes += 1;
            *shared
                .state()
                .sent_by_digest
                .entry(content.digest.clone())
                .or_default() += n as u64;
            if pace.is_some() && sent < limit {
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    entry.bytes_sent = sent;
    let _ = writer.flush();
    cut_after.is_none()
}
