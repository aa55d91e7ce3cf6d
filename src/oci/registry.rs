//! The OCI distribution protocol, as much of it as stowage speaks: resolve
//! and fetch manifests, fetch blobs (whole or resumed with a Range request),
//! push blobs and manifests; Basic and Bearer token authentication with
//! credentials from the Docker config; HTTPS with extra CA files, or plain
//! HTTP to registries named insecure.
//!
//! Nothing a registry sends is trusted: manifests are read with a byte cap,
//! their media type must be one the caller accepts and their digest must
//! match the reference; a resumed blob is accepted only as a 206 whose
//! `Content-Range` starts exactly where we asked. Byte counting and digest
//! checks of blob bodies happen where they are written (the store's ingest).
//!
//! Nor is a registry trusted to answer in time ([`Deadlines`]): besides a
//! 60 s limit on any one read, every metadata request (a manifest, a token,
//! a small blob) has a deadline for its whole answer, and a blob download
//! must keep up a minimum rate over each window of time, or it is cut off
//! (to be resumed by the next attempt or the next pull).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderValue, LOCATION,
    RANGE, WWW_AUTHENTICATE,
};
use reqwest::{Client, RequestBuilder, Response, StatusCode};

use crate::Digest;
use crate::config::{CredentialStore, Credentials};
use crate::oci::reference::ImageRef;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot reach registry {host}: {message}")]
    Unreachable { host: String, message: String },
    #[error(
        "registry {host} requires credentials and the Docker config has none for it (run `docker login {host}`)"
    )]
    NoCredentials { host: String },
    #[error("{0}")]
    CredentialHelper(String),
    #[error("registry {host} refused the credentials of user {user:?}")]
    Unauthorized { host: String, user: String },
    #[error("{what} does not exist in registry {host}")]
    NotFound { host: String, what: String },
    #[error("registry {host} answered {status} to {what}: {body}")]
    Status {
        host: String,
        what: String,
        status: u16,
        body: String,
    },
    #[error("{what} from registry {host} is larger than the {cap}-byte limit")]
    TooLarge {
        host: String,
        what: String,
        cap: u64,
    },
    #[error("{what} from registry {host} has digest {actual}, not the expected {expected}")]
    DigestMismatch {
        host: String,
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what} from registry {host} has media type {got:?}, expected one of {expected:?}")]
    MediaType {
        host: String,
        what: String,
        got: String,
        expected: Vec<String>,
    },
    #[error("registry {host} sent {what} with {got} bytes where {expected} were declared")]
    SizeMismatch {
        host: String,
        what: String,
        expected: u64,
        got: u64,
    },
    #[error(
        "registry {host} answered a resume of {what} at byte {offset} with Content-Range {got:?}"
    )]
    BadRange {
        host: String,
        what: String,
        offset: u64,
        got: String,
    },
    #[error(
        "registry {host} did not answer {what} within {}; it is too slow or stalled (the limit is `registry_timeout` in the config file)",
        human_duration(*limit)
    )]
    Deadline {
        host: String,
        what: String,
        limit: Duration,
    },
    #[error("cannot use the CA file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("registry {host} sent a malformed answer to {what}: {message}")]
    Protocol {
        host: String,
        what: String,
        message: String,
    },
}

/// How to reach registries: which are plain HTTP, which CAs to trust, whose
/// credentials to use, and how long they may take.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    pub insecure: Vec<String>,
    pub ca_files: Vec<PathBuf>,
    pub credentials: CredentialStore,
    pub deadlines: Deadlines,
}

/// How long a registry may take, so that a slow or stalled one cannot hold
/// a device (and its agent) forever.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deadlines {
    /// A metadata request (a manifest, a token, a HEAD, a small blob), from
    /// its start to the last byte of the answer. A small blob gets this
    /// plus its size at `min_rate`.
    pub request: Duration,
    /// Bytes per second a blob download must keep up...
    pub min_rate: u64,
    /// ...over each window this long, or it is cut off.
    pub rate_window: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            request: Duration::from_secs(60),
            min_rate: 1024,
            rate_window: Duration::from_secs(60),
        }
    }
}

impl Deadlines {
    /// The deadline of a whole small blob of `size` bytes.
    fn small_blob(&self, size: u64) -> Duration {
        let transfer = size as f64 / self.min_rate.max(1) as f64;
        self.request
            .saturating_add(Duration::try_from_secs_f64(transfer).unwrap_or(Duration::MAX))
    }
}

/// `1.5 s`, `60 s`, for messages.
fn human_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs.fract() == 0.0 {
        format!("{secs:.0} s")
    } else {
        format!("{secs:.1} s")
    }
}

/// A manifest as fetched: its exact bytes, media type and digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

/// What became of a blob pushed with [`RegistryClient::push_blob_mounting`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobPush {
    /// The repository had it already.
    Present,
    /// Mounted from another repository of the same registry (named here).
    Mounted { from: String },
    /// Uploaded.
    Uploaded,
}

/// The answer to a cross-repository mount.
enum Mount {
    Mounted,
    /// The source does not have the blob (the registry opened an upload).
    Absent,
    /// The token did not grant all the scopes the mount needs.
    Refused,
}

/// The answer to a blob request.
pub enum BlobBody {
    /// The whole blob from byte 0 (also the answer to a resume the registry
    /// declined with a 200: the caller must start again from zero).
    Full(Response),
    /// The rest of the blob from the requested offset.
    Partial(Response),
}

pub struct RegistryClient {
    /// For registries reached over plain HTTP. It trusts no certificate,
    /// so building it loads none: a device that talks only to a local or
    /// insecure registry never pays for reading the system's CA bundle.
    plain: Client,
    /// For HTTPS, built on first use with the system's roots and `ca_files`.
    tls: OnceLock<Result<Client, String>>,
    ca_certs: Vec<reqwest::Certificate>,
    options: RegistryOptions,
    /// Authorization header values by (host, scope).
    auth: Mutex<HashMap<(String, String), HeaderValue>>,
    /// (host, target repository, source repository) whose mounts the
    /// registry refused for want of scope: not asked again by this client.
    refused_mounts: Mutex<HashSet<(String, String, String)>>,
}

fn client_builder() -> reqwest::ClientBuilder {
    Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("stowage/", env!("CARGO_PKG_VERSION")))
}

impl RegistryClient {
    pub fn new(options: RegistryOptions) -> Result<RegistryClient, RegistryError> {
        let mut ca_certs = Vec::new();
        for path in &options.ca_files {
            let ca_error = |message: String| RegistryError::CaFile {
                path: path.clone(),
                message,
            };
            let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("it holds no PEM certificate".into()));
            }
            ca_certs.extend(certs);
        }
        // A redirect from a plain-HTTP registry to HTTPS storage is not
        // followed by this client: `send` repeats the request with the TLS one.
        let plain = client_builder()
            .tls_certs_only(Vec::new())
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.url().scheme() != "http" {
                    attempt.stop()
                } else if attempt.previous().len() >= 10 {
                    attempt.error("too many redirects")
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .map_err(|e| RegistryError::Unreachable {
                host: "(any)".into(),
                message: format!("cannot set up the HTTP client: {e}"),
            })?;
        Ok(RegistryClient {
            plain,
            tls: OnceLock::new(),
            ca_certs,
            options,
            auth: Mutex::new(HashMap::new()),
            refused_mounts: Mutex::new(HashSet::new()),
        })
    }

    /// The client for HTTPS, built the first time it is needed.
    fn tls(&self, host: &str) -> Result<&Client, RegistryError> {
        self.tls
            .get_or_init(|| {
                client_builder()
                    .tls_certs_merge(self.ca_certs.iter().cloned())
                    .build()
                    .map_err(|e| format!("cannot set up the HTTPS client: {e}"))
            })
            .as_ref()
            .map_err(|message| RegistryError::Unreachable {
                host: host.to_string(),
                message: message.clone(),
            })
    }

    /// The client for a URL of this scheme.
    fn client_for(&self, url_is_https: bool, host: &str) -> Result<&Client, RegistryError> {
        if url_is_https {
            self.tls(host)
        } else {
            Ok(&self.plain)
        }
    }

    fn is_insecure(&self, image: &ImageRef) -> bool {
        let host = image.api_host();
        self.options
            .insecure
            .iter()
            .any(|h| h == host || h == &image.registry)
    }

    fn base(&self, image: &ImageRef) -> String {
        let scheme = if self.is_insecure(image) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}/v2/{}", image.api_host(), image.repository)
    }

    /// The credentials for the image's registry, from the Docker config's
    /// `auths` or its credential helper.
    async fn credentials(&self, image: &ImageRef) -> Result<Option<Credentials>, RegistryError> {
        let store = &self.options.credentials;
        let host = if store.helper_for(&image.registry).is_some()
            || store.get(&image.registry).is_some()
        {
            image.registry.as_str()
        } else {
            image.api_host()
        };
        store
            .lookup(host)
            .await
            .map_err(|e| RegistryError::CredentialHelper(e.to_string()))
    }

    /// Sends a request built by `make`, authenticating on a 401 challenge and
    /// sending it once more. `make` is called again for the retry.
    async fn send(
        &self,
        image: &ImageRef,
        push: bool,
        what: &str,
        deadline: Option<Duration>,
        make: impl Fn(&Client) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let actions = if push { "pull,push" } else { "pull" };
        let scopes = [format!("repository:{}:{actions}", image.repository)];
        self.send_scoped(image, &scopes, false, what, deadline, make)
            .await
    }

    /// [`Self::send`] with a token for all of `scopes` (one token request
    /// with a `scope` parameter each, as the docker CLI asks when it mounts a
    /// blob from another repository). With `keep_refusal`, a second 401 (a
    /// token that grants only part of the scopes) is returned to the caller
    /// rather than turned into an error.
    async fn send_scoped(
        &self,
        image: &ImageRef,
        scopes: &[String],
        keep_refusal: bool,
        what: &str,
        deadline: Option<Duration>,
        make: impl Fn(&Client) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let host = image.registry.clone();
        let key = (host.clone(), scopes.join(" "));
        let cached = self.auth.lock().ok().and_then(|m| m.get(&key).cloned());
        let send_once = |authorization: Option<HeaderValue>| {
            let host = &host;
            let make = &make;
            async move {
                let client = self.client_for(!self.is_insecure(image), host)?;
                let with_auth = |client: &Client| {
                    let request = match &authorization {
                        Some(h) => make(client).header(AUTHORIZATION, h.clone()),
                        None => make(client),
                    };
                    match deadline {
                        Some(limit) => request.timeout(limit),
                        None => request,
                    }
                };
                let failed = |e| transport(host, what, deadline, e);
                let response = with_auth(client).send().await.map_err(failed)?;
                // A plain-HTTP registry sending the blob to HTTPS storage:
                // the same request again, through the client that speaks TLS.
                if std::ptr::eq(client, &self.plain)
                    && response.status().is_redirection()
                    && response
                        .headers()
                        .get(reqwest::header::LOCATION)
                        .and_then(|l| l.to_str().ok())
                        .is_some_and(|l| l.starts_with("https:"))
                {
                    return with_auth(self.tls(host)?).send().await.map_err(failed);
                }
                Ok(response)
            }
        };
        let response = send_once(cached).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let challenge = response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let header = self.authenticate(image, scopes, &challenge, what).await?;
        if let Ok(mut m) = self.auth.lock() {
            m.insert(key, header.clone());
        }
        let response = send_once(Some(header)).await?;
        if response.status() == StatusCode::UNAUTHORIZED && !keep_refusal {
            return Err(self.refused(image).await);
        }
        Ok(response)
    }

    async fn refused(&self, image: &ImageRef) -> RegistryError {
        match self.credentials(image).await.ok().flatten() {
            Some(c) => RegistryError::Unauthorized {
                host: image.registry.clone(),
                user: c.username.clone(),
            },
            None => RegistryError::NoCredentials {
                host: image.registry.clone(),
            },
        }
    }

    async fn authenticate(
        &self,
        image: &ImageRef,
        scopes: &[String],
        challenge: &str,
        what: &str,
    ) -> Result<HeaderValue, RegistryError> {
        let host = image.registry.clone();
        let creds = self.credentials(image).await?;
        let basic = creds.as_ref().map(|c| {
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", c.username, c.password))
        });
        let scheme = challenge.split_whitespace().next().unwrap_or("");
        if scheme.eq_ignore_ascii_case("basic") || scheme.is_empty() {
            let basic = basic.ok_or(RegistryError::NoCredentials { host: host.clone() })?;
            return header_value(&format!("Basic {basic}"), &host, what);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(RegistryError::Protocol {
                host,
                what: what.to_string(),
                message: format!("unsupported authentication scheme {scheme:?}"),
            });
        }
        let params = parse_challenge(challenge);
        let realm = params.get("realm").ok_or_else(|| RegistryError::Protocol {
            host: host.clone(),
            what: what.to_string(),
            message: "a Bearer challenge without a realm".into(),
        })?;
        let mut token_url = reqwest::Url::parse(realm).map_err(|e| RegistryError::Protocol {
            host: host.clone(),
            what: what.to_string(),
            message: format!("a Bearer realm that is not a URL ({e})"),
        })?;
        for scope in scopes {
            token_url.query_pairs_mut().append_pair("scope", scope);
        }
        if let Some(service) = params.get("service") {
            token_url.query_pairs_mut().append_pair("service", service);
        }
        let client = self.client_for(token_url.scheme() == "https", &host)?;
        let limit = self.options.deadlines.request;
        let mut request = client.get(token_url).timeout(limit);
        if let Some(b) = &basic {
            request = request.header(AUTHORIZATION, format!("Basic {b}"));
        }
        let response = request
            .send()
            .await
            .map_err(|e| transport(&host, "the token request", Some(limit), e))?;
        if response.status() == StatusCode::UNAUTHORIZED
            || response.status() == StatusCode::FORBIDDEN
        {
            return Err(self.refused(image).await);
        }
        if !response.status().is_success() {
            return Err(status_error(&host, "the token request", response).await);
        }
        let body =
            read_capped_within(response, 1 << 20, &host, "the token answer", Some(limit)).await?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let token: Token = serde_json::from_slice(&body).map_err(|e| RegistryError::Protocol {
            host: host.clone(),
            what: "the token answer".into(),
            message: e.to_string(),
        })?;
        let token = token
            .token
            .or(token.access_token)
            .ok_or_else(|| RegistryError::Protocol {
                host: host.clone(),
                what: "the token answer".into(),
                message: "no token in it".into(),
            })?;
        header_value(&format!("Bearer {token}"), &host, what)
    }

    /// Fetches the manifest `image` names (by tag or digest), refusing a body
    /// over `cap` bytes, a media type not in `accept`, and a digest other than
    /// the one the reference pins.
    pub async fn get_manifest(
        &self,
        image: &ImageRef,
        accept: &[&str],
        cap: u64,
    ) -> Result<FetchedManifest, RegistryError> {
        let url = format!("{}/manifests/{}", self.base(image), image.reference_part());
        let what = format!("manifest {image}");
        let accept_header = accept.join(", ");
        let limit = Some(self.options.deadlines.request);
        let response = self
            .send(image, false, &what, limit, |c| {
                c.get(&url).header(ACCEPT, &accept_header)
            })
            .await?;
        let host = image.registry.clone();
        if response.status() == StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound { host, what });
        }
        if !response.status().is_success() {
            return Err(status_error(&host, &what, response).await);
        }
        let media_type = content_type(&response);
        if !accept.contains(&media_type.as_str()) {
            return Err(RegistryError::MediaType {
                host,
                what,
                got: media_type,
                expected: accept.iter().map(|s| s.to_string()).collect(),
            });
        }
        let bytes = read_capped_within(response, cap, &host, &what, limit).await?;
        let digest = Digest::of(&bytes);
        if let Some(expected) = &image.digest
            && expected != &digest
        {
            return Err(RegistryError::DigestMismatch {
                host,
                what,
                expected: expected.clone(),
                actual: digest,
            });
        }
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Fetches a small blob whole (configs, indexes, the bundle), checking its
    /// declared size against `cap` first and its bytes against the digest.
    pub async fn get_blob(
        &self,
        image: &ImageRef,
        digest: &Digest,
        size: u64,
        cap: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let host = image.registry.clone();
        let what = format!("blob {digest} of {}", image.name());
        if size > cap {
            return Err(RegistryError::TooLarge { host, what, cap });
        }
        let limit = Some(self.options.deadlines.small_blob(size));
        let BlobBody::Full(response) = self
            .fetch_blob_within(image, digest, size, 0, limit)
            .await?
        else {
            return Err(RegistryError::Protocol {
                host,
                what,
                message: "a partial answer to a request for the whole blob".into(),
            });
        };
        let bytes = read_capped_within(response, size, &host, &what, limit)
            .await
            .map_err(|e| match e {
                RegistryError::TooLarge { .. } => RegistryError::SizeMismatch {
                    host: host.clone(),
                    what: what.clone(),
                    expected: size,
                    got: size + 1,
                },
                other => other,
            })?;
        if bytes.len() as u64 != size {
            return Err(RegistryError::SizeMismatch {
                host,
                what,
                expected: size,
                got: bytes.len() as u64,
            });
        }
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(RegistryError::DigestMismatch {
                host,
                what,
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Starts a blob download at `offset`. A 206 is accepted only when its
    /// Content-Range starts at `offset` and ends at the blob's last byte; a
    /// 200 means the registry ignored the range and sends the whole blob.
    /// Its body is for [`RegistryClient::blob_stream`], which holds it to
    /// the minimum rate.
    pub async fn fetch_blob(
        &self,
        image: &ImageRef,
        digest: &Digest,
        size: u64,
        offset: u64,
    ) -> Result<BlobBody, RegistryError> {
        self.fetch_blob_within(image, digest, size, offset, None)
            .await
    }

    async fn fetch_blob_within(
        &self,
        image: &ImageRef,
        digest: &Digest,
        size: u64,
        offset: u64,
        deadline: Option<Duration>,
    ) -> Result<BlobBody, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base(image));
        let what = format!("blob {digest} of {}", image.name());
        let host = image.registry.clone();
        // The answer's headers, at least, come within the request deadline.
        let headers_by = deadline.unwrap_or(self.options.deadlines.request);
        let request = self.send(image, false, &what, deadline, |c| {
            let r = c.get(&url);
            if offset > 0 {
                r.header(RANGE, format!("bytes={offset}-"))
            } else {
                r
            }
        });
        let response = tokio::time::timeout(headers_by, request)
            .await
            .map_err(|_| RegistryError::Deadline {
                host: host.clone(),
                what: what.clone(),
                limit: headers_by,
            })??;
        match response.status() {
            StatusCode::OK => Ok(BlobBody::Full(response)),
            StatusCode::PARTIAL_CONTENT => {
                let got = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if content_range_is(&got, offset, size) {
                    Ok(BlobBody::Partial(response))
                } else {
                    Err(RegistryError::BadRange {
                        host,
                        what,
                        offset,
                        got,
                    })
                }
            }
            StatusCode::NOT_FOUND => Err(RegistryError::NotFound { host, what }),
            _ => Err(status_error(&host, &what, response).await),
        }
    }

    /// The body of a blob answer as a stream of its bytes, cut off with an
    /// error when fewer than [`Deadlines::min_rate`] bytes a second arrive
    /// over any [`Deadlines::rate_window`] (the caller resumes later).
    pub fn blob_stream(
        &self,
        response: Response,
        host: &str,
        what: &str,
    ) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
        rate_floored(
            Box::pin(response.bytes_stream()),
            self.options.deadlines,
            format!("registry {host} sent {what}"),
        )
    }

    pub async fn blob_exists(
        &self,
        image: &ImageRef,
        digest: &Digest,
    ) -> Result<bool, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base(image));
        let what = format!("blob {digest} of {}", image.name());
        let limit = Some(self.options.deadlines.request);
        let response = self
            .send(image, true, &what, limit, |c| c.head(&url))
            .await?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error(&image.registry, &what, response).await),
        }
    }

    /// Pushes a blob to `image`'s repository, unless it has it already:
    /// mounted from the first of `sources` (repositories of the same
    /// registry; others are ignored) that holds it, else uploaded. A mount
    /// asks for one token covering `repository:<target>:pull,push` and
    /// `repository:<source>:pull`; when the registry refuses the mount for
    /// want of scope (a token server may grant part of what is asked), the
    /// blob is uploaded instead, with a warning, and that source is not
    /// tried again by this client.
    pub async fn push_blob_mounting(
        &self,
        image: &ImageRef,
        digest: &Digest,
        bytes: bytes::Bytes,
        sources: &[ImageRef],
    ) -> Result<BlobPush, RegistryError> {
        if self.blob_exists(image, digest).await? {
            return Ok(BlobPush::Present);
        }
        for source in sources {
            if source.registry != image.registry || source.repository == image.repository {
                continue;
            }
            let key = (
                image.registry.clone(),
                image.repository.clone(),
                source.repository.clone(),
            );
            if self
                .refused_mounts
                .lock()
                .is_ok_and(|refused| refused.contains(&key))
            {
                continue;
            }
            match self.mount_blob(image, digest, source).await? {
                Mount::Mounted => {
                    return Ok(BlobPush::Mounted {
                        from: source.repository.clone(),
                    });
                }
                Mount::Absent => {}
                Mount::Refused => {
                    tracing::warn!(
                        "registry {} refused to mount blobs from {} into {}: the token lacks pull on {} or push on {}; uploading instead",
                        image.registry,
                        source.repository,
                        image.repository,
                        source.repository,
                        image.repository
                    );
                    if let Ok(mut refused) = self.refused_mounts.lock() {
                        refused.insert(key);
                    }
                }
            }
        }
        self.upload_blob(image, digest, bytes).await?;
        Ok(BlobPush::Uploaded)
    }

    /// `POST /v2/<target>/blobs/uploads/?mount=<digest>&from=<source>` with
    /// a token for both repositories. A 202 (the source lacks the blob) opens
    /// an upload, which is cancelled: the caller uploads in its own session.
    async fn mount_blob(
        &self,
        image: &ImageRef,
        digest: &Digest,
        source: &ImageRef,
    ) -> Result<Mount, RegistryError> {
        let what = format!(
            "the mount of blob {digest} from {} into {}",
            source.repository,
            image.name()
        );
        let mut url = reqwest::Url::parse(&format!("{}/blobs/uploads/", self.base(image)))
            .map_err(|e| RegistryError::Protocol {
                host: image.registry.clone(),
                what: what.clone(),
                message: e.to_string(),
            })?;
        url.query_pairs_mut()
            .append_pair("mount", &digest.to_string())
            .append_pair("from", &source.repository);
        let scopes = [
            format!("repository:{}:pull,push", image.repository),
            format!("repository:{}:pull", source.repository),
        ];
        let limit = Some(self.options.deadlines.request);
        let response = self
            .send_scoped(image, &scopes, true, &what, limit, |c| {
                c.post(url.clone()).header(CONTENT_LENGTH, 0)
            })
            .await?;
        match response.status() {
            StatusCode::CREATED => Ok(Mount::Mounted),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Ok(Mount::Refused),
            StatusCode::ACCEPTED => {
                let location = response
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| url.join(l).ok());
                if let Some(location) = location {
                    // Best effort: a registry purges abandoned uploads itself.
                    let _ = self
                        .send_scoped(image, &scopes[..1], true, &what, limit, |c| {
                            c.delete(location.clone())
                        })
                        .await;
                }
                Ok(Mount::Absent)
            }
            _ => Err(status_error(&image.registry, &what, response).await),
        }
    }

    /// Uploads a blob in one request, unless the repository already has it.
    pub async fn push_blob(
        &self,
        image: &ImageRef,
        digest: &Digest,
        bytes: bytes::Bytes,
    ) -> Result<(), RegistryError> {
        if self.blob_exists(image, digest).await? {
            return Ok(());
        }
        self.upload_blob(image, digest, bytes).await
    }

    /// Uploads a blob in one request (a POST, then a PUT of all of it).
    async fn upload_blob(
        &self,
        image: &ImageRef,
        digest: &Digest,
        bytes: bytes::Bytes,
    ) -> Result<(), RegistryError> {
        let host = image.registry.clone();
        let what = format!("the upload of blob {digest} to {}", image.name());
        let start_url = format!("{}/blobs/uploads/", self.base(image));
        let limit = Some(self.options.deadlines.request);
        let response = self
            .send(image, true, &what, limit, |c| {
                c.post(&start_url).header(CONTENT_LENGTH, 0)
            })
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(status_error(&host, &what, response).await);
        }
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Protocol {
                host: host.clone(),
                what: what.clone(),
                message: "no Location header".into(),
            })?;
        let mut upload = reqwest::Url::parse(&start_url)
            .and_then(|base| base.join(location))
            .map_err(|e| RegistryError::Protocol {
                host: host.clone(),
                what: what.clone(),
                message: format!("bad Location {location:?}: {e}"),
            })?;
        upload
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let response = self
            .send(image, true, &what, None, |c| {
                c.put(upload.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(bytes.clone())
            })
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(status_error(&host, &what, response).await);
        }
        Ok(())
    }

    /// Pushes manifest bytes as they are under the tag or digest of `image`.
    pub async fn push_manifest(
        &self,
        image: &ImageRef,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, RegistryError> {
        let url = format!("{}/manifests/{}", self.base(image), image.reference_part());
        let what = format!("the push of manifest {image}");
        let body = bytes::Bytes::copy_from_slice(bytes);
        let limit = Some(self.options.deadlines.request);
        let response = self
            .send(image, true, &what, limit, |c| {
                c.put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(status_error(&image.registry, &what, response).await);
        }
        Ok(Digest::of(bytes))
    }
}

fn unreachable(host: &str, e: reqwest::Error) -> RegistryError {
    // reqwest's Display hides the cause (refused, TLS, DNS): show the chain.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    RegistryError::Unreachable {
        host: host.to_string(),
        message,
    }
}

/// A request that failed on the way: past its deadline, or unreachable.
fn transport(
    host: &str,
    what: &str,
    deadline: Option<Duration>,
    e: reqwest::Error,
) -> RegistryError {
    match deadline {
        Some(limit) if e.is_timeout() => RegistryError::Deadline {
            host: host.to_string(),
            what: what.to_string(),
            limit,
        },
        _ => unreachable(host, e),
    }
}

fn header_value(s: &str, host: &str, what: &str) -> Result<HeaderValue, RegistryError> {
    HeaderValue::from_str(s).map_err(|_| RegistryError::Protocol {
        host: host.to_string(),
        what: what.to_string(),
        message: "credentials or token not usable in a header".into(),
    })
}

fn content_type(response: &Response) -> String {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
        .unwrap_or_default()
}

async fn status_error(host: &str, what: &str, response: Response) -> RegistryError {
    let status = response.status().as_u16();
    let body = read_capped(response, 4096, host, what)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    RegistryError::Status {
        host: host.to_string(),
        what: what.to_string(),
        status,
        body,
    }
}

/// Reads a whole response body, stopping as soon as it passes `cap` bytes.
pub async fn read_capped(
    response: Response,
    cap: u64,
    host: &str,
    what: &str,
) -> Result<Vec<u8>, RegistryError> {
    read_capped_within(response, cap, host, what, None).await
}

/// [`read_capped`] of an answer whose request had `deadline` (a timeout
/// while reading is then said as such).
async fn read_capped_within(
    mut response: Response,
    cap: u64,
    host: &str,
    what: &str,
    deadline: Option<Duration>,
) -> Result<Vec<u8>, RegistryError> {
    let too_large = || RegistryError::TooLarge {
        host: host.to_string(),
        what: what.to_string(),
        cap,
    };
    if response.content_length().is_some_and(|n| n > cap) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport(host, what, deadline, e))?
    {
        if body.len() as u64 + chunk.len() as u64 > cap {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `bytes START-END/TOTAL` with START = offset and END = size - 1.
fn content_range_is(header: &str, offset: u64, size: u64) -> bool {
    let Some(rest) = header.trim().strip_prefix("bytes ") else {
        return false;
    };
    let Some((range, total)) = rest.split_once('/') else {
        return false;
    };
    let Some((start, end)) = range.split_once('-') else {
        return false;
    };
    let total_ok = total == "*" || total.parse::<u64>().ok() == Some(size);
    start.parse::<u64>().ok() == Some(offset)
        && end.parse::<u64>().ok() == Some(size.saturating_sub(1))
        && total_ok
}

fn parse_challenge(challenge: &str) -> HashMap<String, String> {
    let rest = challenge.split_once(' ').map(|(_, r)| r).unwrap_or("");
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let value = if chars.peek() == Some(&'"') {
            chars.next();
            chars.by_ref().take_while(|c| *c != '"').collect()
        } else {
            chars.by_ref().take_while(|c| *c != ',').collect::<String>()
        };
        params.insert(key.trim().to_ascii_lowercase(), value);
    }
    params
}

/// `body`, failing once fewer than `min_rate * rate_window` bytes arrive in
/// one window (the stream ends after that error).
fn rate_floored<S>(
    body: S,
    deadlines: Deadlines,
    who: String,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static
where
    S: futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + Unpin + 'static,
{
    use futures_util::StreamExt as _;
    struct Floor<S> {
        body: S,
        window_end: tokio::time::Instant,
        got: u64,
        done: bool,
    }
    let window = deadlines.rate_window.max(Duration::from_millis(1));
    let need = (deadlines.min_rate as f64 * window.as_secs_f64()).ceil() as u64;
    let too_slow = move |got: u64| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "{who} {got} bytes in the last {}, under the minimum of {} bytes/s: the download stops here and resumes later (the limits are `min_transfer_rate` and `transfer_window` in the config file)",
                human_duration(window),
                deadlines.min_rate
            ),
        )
    };
    let start = Floor {
        body,
        window_end: tokio::time::Instant::now() + window,
        got: 0,
        done: false,
    };
    futures_util::stream::unfold(start, move |mut floor| {
        let too_slow = too_slow.clone();
        async move {
            if floor.done {
                return None;
            }
            loop {
                match tokio::time::timeout_at(floor.window_end, floor.body.next()).await {
                    Ok(Some(Ok(chunk))) => {
                        floor.got += chunk.len() as u64;
                        if tokio::time::Instant::now() >= floor.window_end {
                            if floor.got < need {
                                floor.done = true;
                                return Some((Err(too_slow(floor.got)), floor));
                            }
                            floor.window_end = tokio::time::Instant::now() + window;
                            floor.got = 0;
                        }
                        return Some((Ok(chunk), floor));
                    }
                    Ok(Some(Err(e))) => {
                        floor.done = true;
                        return Some((Err(std::io::Error::other(e)), floor));
                    }
                    Ok(None) => return None,
                    Err(_) => {
                        if floor.got < need {
                            floor.done = true;
                            return Some((Err(too_slow(floor.got)), floor));
                        }
                        floor.window_end += window;
                        floor.got = 0;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let p = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull");
    }

    #[test]
    fn content_range_must_start_where_asked_and_end_at_the_last_byte() {
        assert!(content_range_is("bytes 100-999/1000", 100, 1000));
        assert!(content_range_is("bytes 100-999/*", 100, 1000));
        assert!(!content_range_is("bytes 0-999/1000", 100, 1000));
        assert!(!content_range_is("bytes 100-1999/2000", 100, 1000));
        assert!(!content_range_is("", 100, 1000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_under_the_minimum_rate_is_cut_off_and_one_above_it_is_not() {
        use futures_util::StreamExt as _;
        let deadlines = Deadlines {
            request: Duration::from_secs(1),
            min_rate: 1000,
            rate_window: Duration::from_secs(10),
        };
        // 100 bytes a second, for a minimum of 1000: cut off after one window.
        let slow = futures_util::stream::unfold(0u32, |n| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some((
                Ok::<_, reqwest::Error>(bytes::Bytes::from(vec![0u8; 100])),
                n + 1,
            ))
        });
        let mut body = Box::pin(rate_floored(Box::pin(slow), deadlines, "r sent x".into()));
        let mut got = 0;
        let error = loop {
            match body.next().await {
                Some(Ok(chunk)) => got += chunk.len(),
                Some(Err(e)) => break e,
                None => panic!("the body ended"),
            }
        };
        assert!(
            error
                .to_string()
                .contains("under the minimum of 1000 bytes/s"),
            "{error}"
        );
        assert!(got <= 1000, "{got}");
        assert!(body.next().await.is_none(), "nothing after the error");

        // 2000 bytes a second for 60 s: all of it.
        let fast = futures_util::stream::unfold(0u32, |n| async move {
            if n == 60 {
                return None;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some((
                Ok::<_, reqwest::Error>(bytes::Bytes::from(vec![0u8; 2000])),
                n + 1,
            ))
        });
        let body = rate_floored(Box::pin(fast), deadlines, "r sent x".into());
        let chunks: Vec<_> = body.collect().await;
        assert_eq!(chunks.len(), 60);
        assert!(chunks.iter().all(|c| c.is_ok()));

        // A stall: nothing at all, cut off after one window.
        let stalled = futures_util::stream::pending::<reqwest::Result<bytes::Bytes>>();
        let mut body = Box::pin(rate_floored(
            Box::pin(stalled),
            deadlines,
            "r sent x".into(),
        ));
        assert!(matches!(body.next().await, Some(Err(_))));
    }
}
