//! `stowage pull`: check, reserve, download, verify, name.
//!
//! Order matters for safety: the fit check runs first and nothing is written
//! when the update does not fit; then the space of every missing layer is
//! preallocated, so another writer filling the disk makes the pull fail at
//! once rather than half way; then layers are downloaded in parallel into
//! ingests, resumed with Range requests after a dropped connection or a
//! crash, and committed only once their size and digest are verified; the
//! app and its images are named in `index.json` last. The store lock is held
//! shared throughout, so a prune (exclusive) never removes what a pull in
//! progress has fetched.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::app::{App, Depth, LayerNeed, fetch_apps};
use crate::oci::media;
use crate::oci::reference::ImageRef;
use crate::oci::registry::{BlobBody, RegistryClient, RegistryError};
use crate::plan::space::Policy;
use crate::plan::{CheckReport, DockerView, Paths, check_update, refuse_unless_fits};
use crate::progress::{Event, Progress};
use crate::store::copy::{BlobSource, Body, CopyError, Opened, SourceError, copy_blob};
use crate::store::{Ingest, LockMode, Store, StoreError};

/// How many times a layer download is resumed after the connection broke.
const RESUME_ATTEMPTS: u32 = 3;

/// How many reservations or metadata blobs are written at once.
const STORE_WRITES: usize = 8;

pub struct PullOptions {
    pub apps: Vec<ImageRef>,
    pub architecture: String,
    pub policy: Policy,
    pub jobs: usize,
}

#[derive(Debug, Serialize)]
pub struct PullReport {
    pub check: CheckReport,
    pub fetched_blobs: usize,
    pub fetched_bytes: u64,
    pub apps: Vec<String>,
}

impl PullOptions {
    /// Pulls the apps. `docker` says what the engine holds; it is awaited
    /// while the apps' metadata is fetched (both are mostly round trips),
    /// and the note it may carry ends up in the report.
    pub async fn run(
        self,
        client: &RegistryClient,
        store: &Store,
        docker: impl Future<Output = (DockerView, Option<String>)>,
        progress: &dyn Progress,
    ) -> Result<PullReport> {
        let _lock = store.lock_async(LockMode::Shared).await?;
        for reference in &self.apps {
            progress.step(format!("fetching metadata of {reference}"));
        }
        let ((docker, note), apps) = tokio::join!(
            docker,
            fetch_apps(client, &self.apps, &self.architecture, Depth::Everything)
        );
        let apps = apps?;
        let paths = Paths::under(store.root());
        let (plan, mut check) = check_update(&apps, store, &paths, &docker, self.policy)?;
        check.fit.notes.extend(note);
        let check = refuse_unless_fits(check)?;

        // Reserve before downloading: every missing layer's declared size.
        // Reservations, then metadata blobs, are written a few at a time:
        // each ends with an fsync, and concurrent fsyncs on one file system
        // share the journal's commits. Every one is waited for, so none is
        // still being written when an error is returned.
        // A layer another pull is writing is not waited for here: two pulls
        // that each hold one layer and wait for the other's would wait for
        // each other until the lock timeout. It is waited for after this
        // pull's own layers are committed and their locks released.
        let reservations: Vec<Result<(LayerNeed, Option<Ingest>)>> =
            futures_util::stream::iter(plan.missing_layers.iter().cloned())
                .map(|layer| {
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || reserve(&store, layer, false))
                })
                .buffered(STORE_WRITES)
                .map(|joined| joined.context("a reservation task failed")?)
                .collect()
                .await;
        let mut ingests = Vec::new();
        let mut busy = Vec::new();
        for reservation in reservations {
            match reservation? {
                (layer, Some(ingest)) => ingests.push((layer, ingest)),
                (layer, None) => busy.push(layer),
            }
        }
        // The refs are written last; hold their room until then, so that a
        // volume filled by someone else meanwhile cannot fail the pull at
        // its very end.
        let index_bytes = std::fs::metadata(store.layout_dir().join("index.json"))
            .map(|m| m.len())
            .unwrap_or(0);
        let new_refs: u64 = apps.iter().map(|a| a.images.len() as u64 + 1).sum();
        let end_reserve = EndReserve::take(
            store.root(),
            2 * (index_bytes + 512 * new_refs) + END_RESERVE_SLACK,
        )?;

        // The metadata blobs are written while the layers download: the
        // layers' space is reserved already, and the check counted these.
        let mut seen = std::collections::HashSet::new();
        let mut meta: Vec<(crate::Digest, Vec<u8>)> = apps
            .iter()
            .flat_map(|app| app.meta_blobs.iter())
            .filter(|blob| seen.insert(blob.descriptor.digest.clone()))
            .map(|blob| (blob.descriptor.digest.clone(), blob.bytes.clone()))
            .collect();
        for app in &apps {
            for (_, digest, bytes) in oci_forms(app)? {
                if seen.insert(digest.clone()) {
                    meta.push((digest, bytes));
                }
            }
        }
        let meta_writes = futures_util::stream::iter(meta)
            .map(|(digest, bytes)| {
                let store = store.clone();
                tokio::task::spawn_blocking(move || Ok(store.put_bytes(&digest, &bytes)?))
            })
            .buffered(STORE_WRITES)
            .map(|joined| joined.context("a metadata write task failed")?)
            .collect::<Vec<Result<()>>>();

        // Largest first: with a few downloads at once, the last one to end
        // is then a small one, and the pull is not left waiting on a single
        // big layer.
        ingests.sort_by_key(|(layer, _)| std::cmp::Reverse(layer.descriptor.size));
        let fetched_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let fetched_blobs = ingests.len();
        if fetched_blobs + busy.len() > 0 {
            progress.emit(Event::Transfer {
                blobs: fetched_blobs + busy.len(),
                bytes: ingests
                    .iter()
                    .map(|(l, _)| l.descriptor.size)
                    .chain(busy.iter().map(|l| l.descriptor.size))
                    .sum(),
            });
        }
        let downloads = futures_util::stream::iter(ingests)
            .map(|(layer, ingest)| {
                let fetched_bytes = Arc::clone(&fetched_bytes);
                async move {
                    let n = download_layer(client, &layer, ingest, progress).await?;
                    fetched_bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    Ok::<_, anyhow::Error>(())
                }
            })
            .buffer_unordered(self.jobs.max(1))
            .try_collect::<Vec<()>>();
        // Both run to their end (no write is left going when this returns);
        // a failed download is the error worth reporting first.
        let (meta_written, downloaded) = tokio::join!(meta_writes, downloads);
        downloaded?;
        meta_written.into_iter().collect::<Result<Vec<()>>>()?;
        // The layers another pull was writing: stored by it meanwhile, or
        // (should it have stopped) resumed here.
        for layer in busy {
            let store = store.clone();
            let (layer, ingest) = tokio::task::spawn_blocking(move || reserve(&store, layer, true))
                .await
                .context("a reservation task failed")??;
            if let Some(ingest) = ingest {
                let n = download_layer(client, &layer, ingest, progress).await?;
                fetched_bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        }

        end_reserve.release();
        for app in &apps {
            name_app(store, app)?;
            progress.step(format!("stored {} ({})", app.name, app.reference));
        }
        Ok(PullReport {
            check,
            fetched_blobs,
            fetched_bytes: fetched_bytes.load(std::sync::atomic::Ordering::Relaxed),
            apps: apps.iter().map(|a| a.reference.to_string()).collect(),
        })
    }
}

/// Opens the ingest of one missing layer and preallocates its declared size.
/// Without `wait`, `None` when another process is writing it.
fn reserve(store: &Store, layer: LayerNeed, wait: bool) -> Result<(LayerNeed, Option<Ingest>)> {
    let (digest, size) = (&layer.descriptor.digest, layer.descriptor.size);
    let ingest = if wait {
        Some(store.ingest(digest, size)?)
    } else {
        store.try_ingest(digest, size)?
    };
    let Some(mut ingest) = ingest else {
        return Ok((layer, None));
    };
    if !ingest.is_stored() {
        ingest.preallocate().with_context(|| {
            format!(
                "cannot reserve {} bytes for layer {}",
                layer.descriptor.size, layer.descriptor.digest
            )
        })?;
    }
    Ok((layer, Some(ingest)))
}

/// Names the app and each of its images in `index.json`, images first: the
/// app's name appearing means all it needs is stored.
///
/// An image the registry served as a Docker v2 manifest is named by its OCI
/// form (same config and layer blobs, OCI media types, the original digest
/// in an annotation): OCI tools such as skopeo read only OCI manifests from
/// an image layout, and the blobs Docker needs are the same either way.
pub fn name_app(store: &Store, app: &App) -> Result<()> {
    let oci = oci_forms(app)?;
    for image in &app.images {
        if let Some((_, digest, bytes)) = oci.iter().find(|(pinned, _, _)| pinned == &image.pinned)
        {
            store.put_bytes(digest, bytes)?;
            store.set_ref(
                &image.pinned,
                media::OCI_MANIFEST,
                digest,
                bytes.len() as u64,
            )?;
            continue;
        }
        store.set_ref(
            &image.pinned,
            &image.manifest.media_type,
            &image.manifest.digest,
            image.manifest.size,
        )?;
    }
    store.set_ref(
        &app.ref_name(),
        crate::oci::media::OCI_MANIFEST,
        &app.digest,
        app.meta_blobs[0].descriptor.size,
    )?;
    Ok(())
}

/// The OCI forms of the app's images that the registry served as Docker v2
/// manifests: (pinned reference, digest, bytes).
fn oci_forms(app: &App) -> Result<Vec<(String, crate::Digest, Vec<u8>)>> {
    let mut forms = Vec::new();
    for image in &app.images {
        if image.manifest.media_type != media::DOCKER_MANIFEST {
            continue;
        }
        let original = app
            .meta_blobs
            .iter()
            .find(|b| b.descriptor.digest == image.manifest.digest)
            .ok_or_else(|| anyhow!("the manifest of {} was not fetched", image.pinned))?;
        let bytes = oci_form(&original.bytes, &image.manifest.digest)
            .with_context(|| format!("the manifest of {}", image.pinned))?;
        forms.push((image.pinned.clone(), crate::Digest::of(&bytes), bytes));
    }
    Ok(forms)
}

/// Room held for the end of a pull beyond the index itself: its temporary
/// copy's directory entry, the lock file, a directory block or two.
const END_RESERVE_SLACK: u64 = 64 * 1024;

/// Disk space held by a pull, in `ROOT/reserve.<pid>`, for the writes it
/// makes last. Released (deleted) just before those writes; a file left by a
/// pull that was killed is removed by the next one.
struct EndReserve {
    path: std::path::PathBuf,
}

impl EndReserve {
    fn take(root: &std::path::Path, bytes: u64) -> Result<EndReserve> {
        remove_stale_reserves(root);
        let path = root.join(format!("reserve.{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let reserve = EndReserve { path };
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, bytes).or_else(
            |e| match e {
                rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS => Ok(()),
                e => Err(anyhow!(
                    "cannot reserve {bytes} bytes in {} for the store's index: {}",
                    reserve.path.display(),
                    std::io::Error::from(e)
                )),
            },
        )?;
        Ok(reserve)
    }

    fn release(self) {}
}

impl Drop for EndReserve {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes `ROOT/reserve.<pid>` files whose process is gone.
fn remove_stale_reserves(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("reserve."))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

use crate::oci::format::SOURCE_MANIFEST_ANNOTATION;

/// The OCI image manifest equivalent to Docker v2 manifest `bytes`: the same
/// config and layer blobs under their OCI media types. Deterministic (keys
/// sorted), so two pulls make the same bytes.
pub fn oci_form(bytes: &[u8], source: &crate::Digest) -> Result<Vec<u8>> {
    let manifest: serde_json::Value =
        serde_json::from_slice(bytes).context("a Docker manifest that is not JSON")?;
    let descriptor = |d: &serde_json::Value, media_type: &str| -> Result<serde_json::Value> {
        let digest = d["digest"]
            .as_str()
            .ok_or_else(|| anyhow!("a descriptor without a digest"))?;
        let size = d["size"]
            .as_u64()
            .ok_or_else(|| anyhow!("descriptor {digest} has no size"))?;
        Ok(serde_json::json!({"mediaType": media_type, "digest": digest, "size": size}))
    };
    let config = descriptor(&manifest["config"], media::OCI_CONFIG)?;
    let mut layers = Vec::new();
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        let docker_type = layer["mediaType"].as_str().unwrap_or("");
        let oci_type = match docker_type {
            media::DOCKER_LAYER_GZIP | media::OCI_LAYER_GZIP => media::OCI_LAYER_GZIP,
            "application/vnd.docker.image.rootfs.diff.tar" | media::OCI_LAYER => media::OCI_LAYER,
            media::OCI_LAYER_ZSTD => media::OCI_LAYER_ZSTD,
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            }
            other => bail!("layer media type {other:?} has no OCI equivalent"),
        };
        layers.push(descriptor(layer, oci_type)?);
    }
    let oci = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": config,
        "layers": layers,
        "annotations": {SOURCE_MANIFEST_ANNOTATION: source.to_string()},
    });
    Ok(serde_json::to_vec(&oci)?)
}

/// Downloads one layer into its ingest with the store's resume-and-commit
/// loop. Returns the bytes transferred.
async fn download_layer(
    client: &RegistryClient,
    layer: &LayerNeed,
    ingest: Ingest,
    progress: &dyn Progress,
) -> Result<u64> {
    let mut source = RegistrySource { client, layer };
    let registry = &layer.source.registry;
    let digest = &layer.descriptor.digest;
    let size = layer.descriptor.size;
    copy_blob(ingest, &mut source, RESUME_ATTEMPTS, progress)
        .await
        .map_err(|e| match e {
            CopyError::Store(
                e @ (StoreError::DigestMismatch { .. }
                | StoreError::SizeMismatch { .. }
                | StoreError::Incomplete { .. }),
            ) => anyhow!("registry {registry} sent a corrupt layer: {e}"),
            CopyError::Store(StoreError::BeyondDeclaredSize { .. }) => anyhow!(
                "registry {registry} sent more than the {size} bytes declared for layer {digest}; the blob was refused"
            ),
            other => other.into(),
        })
}

/// A layer as its registry serves it, from an offset with a Range request.
struct RegistrySource<'a> {
    client: &'a RegistryClient,
    layer: &'a LayerNeed,
}

impl BlobSource for RegistrySource<'_> {
    async fn open(&mut self, offset: u64) -> Result<Opened, SourceError> {
        let layer = self.layer;
        let body = self
            .client
            .fetch_blob(
                &layer.source,
                &layer.descriptor.digest,
                layer.descriptor.size,
                offset,
            )
            .await
            .map_err(|e| match e {
                RegistryError::Unreachable { .. } | RegistryError::Deadline { .. } => {
                    SourceError::Transient(e.into())
                }
                other => SourceError::Fatal(other.into()),
            })?;
        let what = format!("layer {}", layer.descriptor.digest);
        let stream = |r: reqwest::Response| -> Body {
            Box::pin(self.client.blob_stream(r, &layer.source.registry, &what))
        };
        Ok(match body {
            BlobBody::Partial(r) => Opened::At(stream(r)),
            // The registry ignored the Range: the ingest starts again from zero.
            BlobBody::Full(r) => Opened::FromStart(stream(r)),
        })
    }

    fn name(&self) -> String {
        format!("registry {}", self.layer.source.registry)
    }
}

/// Checks that every reference names an app (not an image) before anything.
pub fn require_pinned_or_tagged(reference: &ImageRef) -> Result<()> {
    if reference.tag.is_none() && reference.digest.is_none() {
        bail!(
            "{reference} names no tag or digest; give REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:..."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
        "config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":925,"digest":"sha256:99cf11b408f168c4a1b3c9abf02e0cbf2e90ccda38e3401c71c084913b272b8f"},
        "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":1084598,"digest":"sha256:8c24ea7f9809ef23be16c9e1d5f5eb792563d446ebd54c1ac362f44a96779391"}]}"#;

    #[test]
    fn a_docker_manifest_has_a_deterministic_oci_form_naming_the_same_blobs() {
        let source = crate::Digest::of(DOCKER.as_bytes());
        let form = oci_form(DOCKER.as_bytes(), &source).unwrap();
        assert_eq!(form, oci_form(DOCKER.as_bytes(), &source).unwrap());
        let v: serde_json::Value = serde_json::from_slice(&form).unwrap();
        assert_eq!(v["mediaType"], media::OCI_MANIFEST);
        assert_eq!(v["config"]["mediaType"], media::OCI_CONFIG);
        assert_eq!(v["config"]["size"], 925);
        assert_eq!(v["layers"][0]["mediaType"], media::OCI_LAYER_GZIP);
        assert_eq!(
            v["layers"][0]["digest"],
            "sha256:8c24ea7f9809ef23be16c9e1d5f5eb792563d446ebd54c1ac362f44a96779391"
        );
        assert_eq!(
            v["annotations"][SOURCE_MANIFEST_ANNOTATION],
            source.to_string()
        );
    }

    #[test]
    fn a_layer_type_without_an_oci_equivalent_is_refused_by_name() {
        let odd = DOCKER.replace(
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/x-odd",
        );
        let e = oci_form(odd.as_bytes(), &crate::Digest::of(odd.as_bytes())).unwrap_err();
        assert!(e.to_string().contains("application/x-odd"), "{e}");
    }
}
