//! Publishing (`stowage publish`): turn a compose project into a compose app in a
//! registry. Every image is pinned by digest, every layer of every published
//! architecture is analysed once (cached by digest), and the app manifest is
//! pushed last: until then the app does not exist, so a failure half way
//! leaves at most unreferenced blobs behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::io::AsyncReadExt as _;

use crate::Digest;
use crate::app::bundle;
use crate::app::compose_file::{ComposeFile, read_dotenv};
use crate::app::layer;
use crate::oci::format::{
    self, AppManifest, ArchLayers, Descriptor, ImageConfig, ImageIndex, ImageManifest, LayerMeta,
    LayersMeta,
};
use crate::oci::media;
use crate::oci::reference::ImageRef;
use crate::oci::registry::{BlobBody, BlobPush, RegistryClient};
use crate::progress::Progress;

pub struct Publish {
    /// The app directory (holding the compose file).
    pub app_dir: PathBuf,
    /// The compose file, relative to `app_dir`, when not the default name.
    pub compose_file: Option<PathBuf>,
    /// Architectures to publish; empty means every one all images provide.
    pub archs: Vec<String>,
    /// A file mapping image names to digests, instead of asking registries.
    pub pinned_images: Option<PathBuf>,
    pub dry_run: bool,
    /// Where to push: `REGISTRY/REPO:TAG`.
    pub target: ImageRef,
    /// Where analysed layer metadata is cached, keyed by layer digest.
    pub cache_dir: PathBuf,
    /// How many layers are downloaded and analysed at once.
    pub jobs: usize,
    /// Repositories of the target's registry that may hold the app's blobs
    /// already (an app promoted from a staging repository): a blob found
    /// there is mounted into the target rather than uploaded.
    pub mount_from: Vec<ImageRef>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArchSummary {
    pub layers: usize,
    pub download_size: u64,
    pub size: u64,
    pub usage: u64,
    pub inodes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PushedBlob {
    pub what: String,
    pub digest: Digest,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    /// `REGISTRY/REPO@sha256:...`
    pub reference: String,
    pub digest: Digest,
    pub tag: Option<String>,
    pub dry_run: bool,
    pub services: BTreeMap<String, String>,
    pub architectures: BTreeMap<String, ArchSummary>,
    pub pushed: Vec<PushedBlob>,
    /// How many of the `pushed` blobs were mounted from another repository
    /// of the registry (`--mount-from`) rather than uploaded.
    pub mounted: usize,
    /// Whether the app manifest lists layer indexes in `manifests`: never,
    /// as composectl by default (FORMAT.md); kept for scripts that read it.
    pub layer_indexes_referenced: bool,
    #[serde(skip)]
    pub manifest: Vec<u8>,
}

/// One service's image as resolved in its registry.
struct ResolvedImage {
    service: String,
    image: ImageRef,
    /// Digest of what the reference points at (index or single manifest).
    digest: Digest,
    /// The image manifest for each architecture it provides.
    per_arch: BTreeMap<String, Descriptor>,
}

/// The compose file and its images, resolved in their registries.
struct Resolved {
    compose_path: PathBuf,
    compose: ComposeFile,
    images: Vec<ResolvedImage>,
    archs: Vec<String>,
}

/// Every architecture's layers, analysed.
struct Analysed {
    meta: LayersMeta,
    summaries: BTreeMap<String, ArchSummary>,
}

/// The app as it will be pushed: its blobs, then its manifest.
struct Artifact {
    services: BTreeMap<String, String>,
    blobs: Vec<(String, Vec<u8>)>,
    manifest: AppManifest,
}

impl Publish {
    /// Resolves, analyses, assembles, then pushes the blobs and, last, the
    /// app manifest (nothing with `dry_run`).
    pub async fn run(
        self,
        client: &RegistryClient,
        progress: &dyn Progress,
    ) -> Result<PublishReport> {
        let resolved = self.resolve(client, progress).await?;
        let analysed = self.analyse(client, &resolved, progress).await?;
        let artifact = self.assemble(&resolved, analysed.meta)?;
        self.push(client, artifact, analysed.summaries, progress)
            .await
    }

    /// Pins every service image by digest and chooses the architectures.
    async fn resolve(&self, client: &RegistryClient, progress: &dyn Progress) -> Result<Resolved> {
        let compose_path = ComposeFile::locate(&self.app_dir, self.compose_file.as_deref())?;
        let compose = ComposeFile::load(&compose_path)?;
        let dotenv = read_dotenv(&self.app_dir);
        let lookup = |name: &str| {
            std::env::var(name)
                .ok()
                .or_else(|| dotenv.get(name).cloned())
        };
        let images = compose.images(&lookup)?;
        let pins = match &self.pinned_images {
            Some(path) => read_pinned_images(path)?,
            None => BTreeMap::new(),
        };

        let mut resolved = Vec::new();
        for (service, image) in &images {
            let image: ImageRef = image
                .parse()
                .with_context(|| format!("service {service} in {}", compose_path.display()))?;
            progress.step(format!("resolving {service}: {image}"));
            resolved.push(resolve_image(client, service, image, &pins).await?);
        }
        let archs = choose_archs(&resolved, &self.archs)?;
        Ok(Resolved {
            compose_path,
            compose,
            images: resolved,
            archs,
        })
    }

    /// Analyses every layer of every architecture (cached by digest).
    async fn analyse(
        &self,
        client: &RegistryClient,
        resolved: &Resolved,
        progress: &dyn Progress,
    ) -> Result<Analysed> {
        let cache = Arc::new(LayerCache::new(&self.cache_dir));
        let mut meta: LayersMeta = BTreeMap::new();
        let mut summaries = BTreeMap::new();
        for arch in &resolved.archs {
            let layers = self
                .analyse_arch(client, &resolved.images, arch, &cache, progress)
                .await?;
            let summary = ArchSummary {
                layers: layers.len(),
                download_size: layers.values().map(|l| l.archive_size).sum(),
                size: layers.values().map(|l| l.size).sum(),
                usage: layers.values().map(|l| l.usage).sum(),
                inodes: layers.values().filter_map(|l| l.inodes).sum(),
            };
            summaries.insert(arch.clone(), summary);
            meta.insert(
                arch.clone(),
                ArchLayers {
                    fs_block_size: format::DEFAULT_BLOCK_SIZE,
                    layers,
                },
            );
        }

        Ok(Analysed { meta, summaries })
    }

    /// The bundle, its index, the layers-meta and the app manifest naming
    /// them (layers-meta at `layers[1]`, where Foundries' readers look; no
    /// `manifests` list of layer indexes, which composectl leaves out by
    /// default and registries from distribution 2.8 on refuse).
    fn assemble(&self, resolved: &Resolved, meta: LayersMeta) -> Result<Artifact> {
        let pinned: BTreeMap<String, String> = resolved
            .images
            .iter()
            .map(|r| {
                (
                    r.service.clone(),
                    format!("{}@{}", r.image.name(), r.digest),
                )
            })
            .collect();
        let pinned_compose = resolved.compose.pinned(&pinned)?;
        // The bundle carries the pinned file as docker-compose.yml, in place
        // of the app directory's own compose file whatever its name.
        let compose_name = resolved
            .compose_path
            .strip_prefix(&self.app_dir)
            .ok()
            .map(|rel| rel.to_string_lossy().into_owned());
        let bundle = bundle::create_bundle(&self.app_dir, compose_name.as_deref(), &pinned_compose)
            .with_context(|| format!("cannot bundle {}", self.app_dir.display()))?;
        let bundle_index = bundle::index_json(&bundle.index)?;
        let meta_bytes = format::to_json(&meta)?;

        let mut bundle_desc = Descriptor::new(
            media::BUNDLE,
            bundle.digest.clone(),
            bundle.bytes.len() as u64,
        );
        bundle_desc.annotations.insert(
            format::BUNDLE_INDEX_DIGEST.into(),
            Digest::of(&bundle_index).to_string(),
        );
        bundle_desc.annotations.insert(
            format::BUNDLE_INDEX_SIZE.into(),
            bundle_index.len().to_string(),
        );
        let mut meta_desc = Descriptor::of(media::LAYERS_META, &meta_bytes);
        meta_desc
            .annotations
            .insert(format::LAYERS_META_ANNOTATION.into(), "v1".into());
        let manifest = AppManifest {
            schema_version: 2,
            media_type: media::OCI_MANIFEST.into(),
            artifact_type: Some(media::APP_ARTIFACT.into()),
            config: Descriptor::of(media::EMPTY, format::EMPTY_CONFIG),
            layers: vec![bundle_desc, meta_desc],
            manifests: Vec::new(),
            annotations: BTreeMap::from([(format::APP_ANNOTATION.into(), "v1".into())]),
        };
        format::check_cap(
            "the app manifest",
            manifest.to_bytes()?.len() as u64,
            format::APP_MANIFEST_CAP,
        )?;

        let blobs: Vec<(String, Vec<u8>)> = vec![
            ("config".into(), format::EMPTY_CONFIG.to_vec()),
            ("bundle".into(), bundle.bytes),
            ("bundle index".into(), bundle_index),
            ("layers-meta".into(), meta_bytes),
        ];
        Ok(Artifact {
            services: pinned,
            blobs,
            manifest,
        })
    }

    /// Pushes the blobs, then the app manifest; with `dry_run`, only says
    /// what would be pushed.
    async fn push(
        &self,
        client: &RegistryClient,
        artifact: Artifact,
        summaries: BTreeMap<String, ArchSummary>,
        progress: &dyn Progress,
    ) -> Result<PublishReport> {
        let mut pushed = Vec::new();
        let mut mounted = 0;
        let Artifact {
            services,
            blobs,
            manifest,
        } = artifact;
        let manifest_bytes = manifest.to_bytes()?;
        for (what, bytes) in blobs {
            let blob_digest = Digest::of(&bytes);
            let size = bytes.len() as u64;
            if !self.dry_run {
                progress.step(format!("pushing {what} {blob_digest} ({size} bytes)"));
                let outcome = client
                    .push_blob_mounting(&self.target, &blob_digest, bytes.into(), &self.mount_from)
                    .await
                    .with_context(|| format!("cannot push the app's {what}"))?;
                if let BlobPush::Mounted { from } = outcome {
                    progress.step(format!("mounted {what} {blob_digest} from {from}"));
                    mounted += 1;
                }
            }
            pushed.push(PushedBlob {
                what,
                digest: blob_digest,
                size,
            });
        }
        if !self.dry_run {
            progress.step(format!("pushing the app manifest to {}", self.target));
            client
                .push_manifest(&self.target, media::OCI_MANIFEST, &manifest_bytes)
                .await
                .context("cannot push the app manifest")?;
        }
        let digest = Digest::of(&manifest_bytes);
        pushed.push(PushedBlob {
            what: "app manifest".into(),
            digest: digest.clone(),
            size: manifest_bytes.len() as u64,
        });
        Ok(PublishReport {
            reference: format!("{}@{}", self.target.name(), digest),
            digest,
            tag: self.target.tag.clone(),
            dry_run: self.dry_run,
            services,
            architectures: summaries,
            pushed,
            mounted,
            layer_indexes_referenced: !manifest.manifests.is_empty(),
            manifest: manifest_bytes,
        })
    }

    /// Every layer of every service image for `arch`, analysed and checked
    /// against the image configs' diff_ids.
    async fn analyse_arch(
        &self,
        client: &RegistryClient,
        resolved: &[ResolvedImage],
        arch: &str,
        cache: &Arc<LayerCache>,
        progress: &dyn Progress,
    ) -> Result<BTreeMap<Digest, LayerMeta>> {
        // (layer descriptor, image it came from, diff_id its config expects)
        let mut wanted: BTreeMap<Digest, (Descriptor, ImageRef, Digest)> = BTreeMap::new();
        for image in resolved {
            let manifest_desc = &image.per_arch[arch];
            let at = image.image.pinned(&manifest_desc.digest);
            let fetched = client
                .get_manifest(
                    &at,
                    &[media::OCI_MANIFEST, media::DOCKER_MANIFEST],
                    format::MANIFEST_CAP,
                )
                .await
                .with_context(|| {
                    format!("service {}: image {} ({arch})", image.service, image.image)
                })?;
            let manifest: ImageManifest =
                format::parse_json(&fetched.bytes, &format!("manifest of {at}"))?;
            let config_bytes = client
                .get_blob(
                    &at,
                    &manifest.config.digest,
                    manifest.config.size,
                    format::MANIFEST_CAP,
                )
                .await
                .with_context(|| format!("the config of image {at}"))?;
            let config: ImageConfig =
                format::parse_json(&config_bytes, &format!("config of {at}"))?;
            if config.rootfs.diff_ids.len() != manifest.layers.len() {
                bail!(
                    "image {at} ({arch}) has {} layers but its config lists {} diff_ids",
                    manifest.layers.len(),
                    config.rootfs.diff_ids.len()
                );
            }
            for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
                if !media::is_layer(&layer.media_type) {
                    bail!(
                        "image {at} has a layer {} of media type {:?}, which is not an image layer",
                        layer.digest,
                        layer.media_type
                    );
                }
                if let Some((_, other, expected)) = wanted.get(&layer.digest)
                    && expected != diff_id
                {
                    bail!(
                        "layer {} has diff_id {expected} in image {other} but {diff_id} in image {at}",
                        layer.digest
                    );
                }
                wanted
                    .entry(layer.digest.clone())
                    .or_insert_with(|| (layer.clone(), at.clone(), diff_id.clone()));
            }
        }

        let jobs = self.jobs.max(1);
        let analysed: Vec<(Digest, LayerMeta)> = futures_util::stream::iter(wanted.values().cloned())
            .map(|(layer, image, diff_id)| {
                let cache = Arc::clone(cache);
                async move {
                    let meta = analyse_layer(client, &image, &layer, &cache, progress).await?;
                    if meta.diff_id.as_ref() != Some(&diff_id) {
                        bail!(
                            "layer {} of image {image} ({arch}): its uncompressed digest is {} but the image config says diff_id {diff_id}",
                            layer.digest,
                            meta.diff_id.map(|d| d.to_string()).unwrap_or_default()
                        );
                    }
                    Ok((layer.digest.clone(), meta))
                }
            })
            .buffer_unordered(jobs)
            .try_collect()
            .await?;
        Ok(analysed.into_iter().collect())
    }
}

/// Resolves a service's image to a digest and finds the manifest for each
/// architecture it provides.
async fn resolve_image(
    client: &RegistryClient,
    service: &str,
    image: ImageRef,
    pins: &BTreeMap<String, Digest>,
) -> Result<ResolvedImage> {
    let what = || format!("service {service}: image {image}");
    let by = match (&image.digest, pins.get(&image.to_string())) {
        (Some(_), _) => image.clone(),
        (None, Some(d)) => image.pinned(d),
        (None, None) => image.clone(),
    };
    let fetched = client
        .get_manifest(&by, media::IMAGE_MANIFESTS, format::MANIFEST_CAP)
        .await
        .with_context(what)?;
    let mut per_arch = BTreeMap::new();
    if media::is_index(&fetched.media_type) {
        let index: ImageIndex = format::parse_json(&fetched.bytes, &what())?;
        for entry in index.manifests {
            let Some(platform) = &entry.platform else {
                continue;
            };
            if platform.os != "linux" || !media::is_image_manifest(&entry.media_type) {
                continue;
            }
            per_arch
                .entry(platform.architecture.clone())
                .or_insert(entry);
        }
    } else {
        let manifest: ImageManifest = format::parse_json(&fetched.bytes, &what())?;
        let config_bytes = client
            .get_blob(
                &by,
                &manifest.config.digest,
                manifest.config.size,
                format::MANIFEST_CAP,
            )
            .await
            .with_context(what)?;
        let config: ImageConfig = format::parse_json(&config_bytes, &what())?;
        if config.os != "linux" && !config.os.is_empty() {
            bail!("{}: the image is for {}, not linux", what(), config.os);
        }
        per_arch.insert(
            config.architecture.clone(),
            Descriptor::new(
                &fetched.media_type,
                fetched.digest.clone(),
                fetched.bytes.len() as u64,
            ),
        );
    }
    Ok(ResolvedImage {
        service: service.to_string(),
        image,
        digest: fetched.digest,
        per_arch,
    })
}

fn choose_archs(resolved: &[ResolvedImage], requested: &[String]) -> Result<Vec<String>> {
    if !requested.is_empty() {
        for arch in requested {
            for r in resolved {
                if !r.per_arch.contains_key(arch) {
                    bail!(
                        "service {}: image {} has no linux/{arch} manifest (it has: {})",
                        r.service,
                        r.image,
                        r.per_arch.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
            }
        }
        let mut archs = requested.to_vec();
        archs.sort();
        archs.dedup();
        return Ok(archs);
    }
    let mut common: Option<BTreeSet<String>> = None;
    for r in resolved {
        let here: BTreeSet<String> = r.per_arch.keys().cloned().collect();
        common = Some(match common {
            None => here,
            Some(c) => c.intersection(&here).cloned().collect(),
        });
    }
    let archs: Vec<String> = common.unwrap_or_default().into_iter().collect();
    if archs.is_empty() {
        let each = resolved
            .iter()
            .map(|r| {
                format!(
                    "{} has {}",
                    r.service,
                    r.per_arch.keys().cloned().collect::<Vec<_>>().join("/")
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        bail!("no architecture is provided by every service image ({each})");
    }
    Ok(archs)
}

/// `--pinned-images`: a JSON or YAML map from image name (as written in the
/// compose file, after interpolation) to `sha256:` digest.
fn read_pinned_images(path: &Path) -> Result<BTreeMap<String, Digest>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the pinned images file {}", path.display()))?;
    let raw: BTreeMap<String, String> = serde_saphyr::from_str(&text).map_err(|e| {
        anyhow!(
            "the pinned images file {} is not a map of image to digest: {e}",
            path.display()
        )
    })?;
    let mut pins = BTreeMap::new();
    for (name, digest) in raw {
        let image: ImageRef = name.parse()?;
        let digest: Digest = digest
            .parse()
            .with_context(|| format!("pinned image {name} in {}", path.display()))?;
        pins.insert(image.to_string(), digest);
    }
    Ok(pins)
}

/// Analysed layer metadata on disk, keyed by the compressed layer digest.
/// A damaged entry is ignored and the layer analysed again.
struct LayerCache {
    dir: PathBuf,
}

impl LayerCache {
    fn new(dir: &Path) -> LayerCache {
        LayerCache {
            dir: dir.join("layers"),
        }
    }

    fn get(&self, digest: &Digest) -> Option<LayerMeta> {
        let bytes = std::fs::read(self.dir.join(format!("{}.json", digest.hex()))).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn put(&self, digest: &Digest, meta: &LayerMeta) {
        // A cache entry that cannot be written only costs a re-analysis.
        let Ok(bytes) = format::to_json(meta) else {
            return;
        };
        let _ = std::fs::create_dir_all(&self.dir);
        let _ =
            crate::fsutil::write_atomic(&self.dir.join(format!("{}.json", digest.hex())), &bytes);
    }
}

/// Downloads a layer and analyses it as it streams, or takes the cached
/// analysis. The analysis runs on a blocking thread fed through a small
/// channel, so memory stays bounded whatever the layer's size.
async fn analyse_layer(
    client: &RegistryClient,
    image: &ImageRef,
    layer: &Descriptor,
    cache: &LayerCache,
    progress: &dyn Progress,
) -> Result<LayerMeta> {
    if let Some(meta) = cache.get(&layer.digest)
        && meta.archive_size == layer.size
    {
        return Ok(meta);
    }
    progress.step(format!(
        "analysing layer {} ({} bytes)",
        layer.digest, layer.size
    ));
    let BlobBody::Full(response) = client
        .fetch_blob(image, &layer.digest, layer.size, 0)
        .await?
    else {
        bail!(
            "registry {} answered a whole-blob request for {} with part of it",
            image.registry,
            layer.digest
        );
    };
    // The analysis reads the body on a blocking thread through the bridge;
    // one byte past the declared size is enough to refuse a longer blob.
    let body = tokio_util::io::StreamReader::new(
        response
            .bytes_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other)),
    );
    let reader = tokio_util::io::SyncIoBridge::new(body.take(layer.size + 1));
    let stats = tokio::task::spawn_blocking(move || layer::analyze_layer(reader))
        .await
        .context("the layer analysis thread failed")?;
    let stats = stats.with_context(|| format!("layer {} of image {image}", layer.digest))?;
    if stats.archive_digest != layer.digest || stats.archive_size != layer.size {
        bail!(
            "registry {} sent {} bytes with digest {} for layer {} ({} bytes declared)",
            image.registry,
            stats.archive_size,
            stats.archive_digest,
            layer.digest,
            layer.size
        );
    }
    let meta = LayerMeta {
        size: stats.size,
        usage: stats.usage(),
        archive_size: stats.archive_size,
        diff_id: Some(stats.diff_id.clone()),
        tar_size: Some(stats.tar_size),
        entries: Some(stats.entries),
        inodes: Some(stats.inodes),
        usage_by_block_size: Some(stats.usage_by_block_size.clone()),
    };
    cache.put(&layer.digest, &meta);
    Ok(meta)
}
