//! A small token server, as the Docker token authentication spec describes one, for a
//! harness registry configured with `auth: token` ([`super::Registry::start_with_token`]).
//!
//! It answers `GET /token?service=...&scope=...&scope=...` on 127.0.0.1: it checks the
//! request's Basic credentials against its users, grants each requested scope only as
//! far as that user's rules allow (a token server may grant part of what is asked),
//! and signs an RS256 JWT with a key and self-signed certificate `openssl` makes in the
//! server's temp dir. The JWT header carries the certificate in `x5c`, which
//! distribution 2.8 verifies against the registry's `rootcertbundle` (that
//! certificate). Signing shells out to `openssl dgst -sha256 -sign`.
//!
//! Every request is logged (user, scopes asked, scopes granted) for tests to inspect.

use super::{lock, run_ok, temp_dir, unique};
use base64::Engine as _;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

/// The registry's `service` and the tokens' `aud`.
pub const SERVICE: &str = "stowage-test-registry";
/// The tokens' `iss`, as the registry's `issuer` expects.
pub const ISSUER: &str = "stowage-test-token-server";

/// A user of the token server: password, and the actions granted on each repository.
#[derive(Clone, Debug)]
pub struct TokenUser {
    pub password: String,
    /// repository name -> actions ("pull", "push").
    pub grants: BTreeMap<String, Vec<String>>,
}

impl TokenUser {
    pub fn new(password: &str, grants: &[(&str, &str)]) -> TokenUser {
        TokenUser {
            password: password.into(),
            grants: grants
                .iter()
                .map(|(repo, actions)| {
                    (
                        repo.to_string(),
                        actions.split(',').map(str::to_string).collect(),
                    )
                })
                .collect(),
        }
    }
}

/// One token request as the server saw it.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// The Basic user, `None` when the request had no credentials.
    pub user: Option<String>,
    /// The `scope` parameters, in order.
    pub scopes: Vec<String>,
    /// `repository:NAME:ACTIONS` for each scope granted (in part or whole).
    pub granted: Vec<String>,
    /// The HTTP status answered.
    pub status: u16,
}

struct Shared {
    users: BTreeMap<String, TokenUser>,
    key: PathBuf,
    cert_der_b64: String,
    log: Mutex<Vec<TokenRequest>>,
    stop: AtomicBool,
}

/// A running token server. Dropping it stops its thread.
pub struct TokenServer {
    dir: tempfile::TempDir,
    port: u16,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    pub fn start(users: &[(&str, TokenUser)]) -> TokenServer {
        let dir = temp_dir("stowage-token-");
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        run_ok(
            Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args(["-subj", "/CN=stowage-test-token-server", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&cert),
        );
        let der = std::process::Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .expect("run openssl x509");
        assert!(der.status.success(), "openssl x509 -outform DER failed");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the token server");
        let port = listener.local_addr().expect("local address").port();
        let shared = Arc::new(Shared {
            users: users
                .iter()
                .map(|(name, user)| (name.to_string(), user.clone()))
                .collect(),
            key,
            cert_der_b64: base64::engine::general_purpose::STANDARD.encode(&der.stdout),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let serving = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if serving.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    serve(&serving, stream);
                }
            }
        });
        TokenServer {
            dir,
            port,
            shared,
            thread: Some(thread),
        }
    }

    /// The registry's `realm`.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The certificate the registry trusts (`rootcertbundle`).
    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        lock(&self.shared.log).clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(shared: &Shared, mut stream: TcpStream) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut authorization = None;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(value.trim().to_string());
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: Vec<(String, String)> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .collect();
    let user = authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        });
    let known = user.as_ref().and_then(|(name, password)| {
        shared
            .users
            .get(name)
            .filter(|u| &u.password == password)
            .map(|u| (name.clone(), u))
    });
    let service_ok = params.iter().any(|(k, v)| k == "service" && v == SERVICE);
    let mut entry = TokenRequest {
        user: user.as_ref().map(|(u, _)| u.clone()),
        scopes: scopes.clone(),
        granted: Vec::new(),
        status: 200,
    };
    let (status, body) = match known {
        _ if path != "/token" || !service_ok => (404, "{}".to_string()),
        None => (401, r#"{"details":"bad credentials"}"#.to_string()),
        Some((name, granted_user)) => {
            let mut access = Vec::new();
            for scope in &scopes {
                let mut parts = scope.splitn(3, ':');
                let (Some("repository"), Some(repo), Some(actions)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let allowed = granted_user.grants.get(repo).cloned().unwrap_or_default();
                let actions: Vec<&str> = actions
                    .split(',')
                    .filter(|a| allowed.iter().any(|g| g == a))
                    .collect();
                if actions.is_empty() {
                    continue;
                }
                entry
                    .granted
                    .push(format!("repository:{repo}:{}", actions.join(",")));
                access.push(serde_json::json!({
                    "type": "repository", "name": repo, "actions": actions
                }));
            }
            let token = sign(shared, &name, access);
            (
                200,
                serde_json::json!({"token": token, "access_token": token, "expires_in": 300})
                    .to_string(),
            )
        }
    };
    entry.status = status;
    lock(&shared.log).push(entry);
    let reason = if status == 200 { "OK" } else { "Error" };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

/// An RS256 JWT for `user` with `access`, its certificate in `x5c`.
fn sign(shared: &Shared, user: &str, access: Vec<serde_json::Value>) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [shared.cert_der_b64]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": user, "aud": SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now,
        "jti": unique("jti"), "access": access,
    });
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = openssl_sign(&shared.key, input.as_bytes());
    format!("{input}.{}", b64(&signature))
}

fn openssl_sign(key: &Path, input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl dgst");
    child
        .stdin
        .take()
        .expect("openssl stdin")
        .write_all(input)
        .expect("write to openssl");
    let out = child.wait_with_output().expect("wait for openssl");
    assert!(
        out.status.success(),
        "openssl dgst -sign failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
