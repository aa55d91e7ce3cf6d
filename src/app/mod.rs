//! An app as a device sees it for one architecture: the app manifest, its
//! bundle and compose file, the layers-meta figures, and for each service the
//! image manifest, config and layers. Everything but the layers is metadata,
//! fetched into memory with caps so that the fit check can run before a
//! single byte is written to the store.

pub mod bundle;
pub mod compose_file;
pub mod goyaml;
pub mod inspect;
pub mod layer;
pub mod listing;
pub mod publish;
pub mod stored;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

use crate::Digest;
use crate::app::compose_file::ComposeFile;
use crate::oci::format::{
    self, AppManifest, ArchLayers, Descriptor, ImageConfig, ImageIndex, ImageManifest, LayerMeta,
};
use crate::oci::media;
use crate::oci::reference::ImageRef;
use crate::oci::registry::{FetchedManifest, RegistryClient};
use crate::store::Store;

/// A bundle larger than this is not read into memory by the check.
pub const BUNDLE_MEMORY_CAP: u64 = 64 * 1024 * 1024;

/// A metadata blob held in memory until it is committed to the store.
#[derive(Debug, Clone)]
pub struct MetaBlob {
    pub what: String,
    pub descriptor: Descriptor,
    pub bytes: Vec<u8>,
}

/// A layer an app needs, with where to fetch it and what it costs on disk.
#[derive(Debug, Clone)]
pub struct LayerNeed {
    pub descriptor: Descriptor,
    /// The repository to fetch it from.
    pub source: ImageRef,
    pub diff_id: Digest,
    /// The publisher's figures, when the app has layers-meta for the arch.
    pub meta: Option<LayerMeta>,
}

impl LayerNeed {
    /// Docker's disk usage for this layer on a volume of `block_size` blocks.
    pub fn usage(&self, block_size: u64) -> u64 {
        match &self.meta {
            Some(m) => m.usage_for_block_size(block_size),
            None => format::fallback_usage(self.descriptor.size),
        }
    }

    /// The bytes of the uncompressed layer tar Docker copies while loading.
    pub fn tar_size(&self) -> u64 {
        self.meta
            .as_ref()
            .and_then(|m| m.tar_size)
            .unwrap_or_else(|| self.usage(4096))
    }

    pub fn inodes(&self) -> u64 {
        self.meta.as_ref().and_then(|m| m.inodes).unwrap_or(0)
    }
}

/// One service's image for the device's architecture.
#[derive(Debug, Clone)]
pub struct ServiceImage {
    pub service: String,
    /// The image as the bundled compose file pins it.
    pub pinned: String,
    pub image: ImageRef,
    pub manifest: Descriptor,
    pub config: Descriptor,
    /// The image's layers in order, with their diff_ids.
    pub layers: Vec<(Descriptor, Digest)>,
}

/// Everything the device needs to know about one app for one architecture.
#[derive(Debug, Clone)]
pub struct App {
    /// `REGISTRY/REPO@sha256:...`
    pub reference: ImageRef,
    pub name: String,
    pub digest: Digest,
    pub architecture: String,
    pub manifest: AppManifest,
    pub compose_name: String,
    pub bundle: Vec<u8>,
    /// Metadata blobs, the app manifest first.
    pub meta_blobs: Vec<MetaBlob>,
    pub images: Vec<ServiceImage>,
    /// The app's layers, de-duplicated by digest.
    pub layers: Vec<LayerNeed>,
    /// Metadata blobs a plan-only fetch left out (see [`Depth::Plan`]):
    /// not in memory, but counted by the fit check all the same.
    pub unfetched: Vec<Descriptor>,
}

/// How much of an app [`fetch_app_to`] brings into memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Everything a pull stores.
    Everything,
    /// What the fit check needs. The app's config, bundle index and layer
    /// index are left out (their sizes are in the app manifest), and so are
    /// the image configs when the layers-meta gives every layer's diff_id
    /// (their sizes are in the image manifests): that spares a device a round
    /// trip to the registry, and requests the registry answers one by one.
    Plan,
}

impl App {
    /// The ref name of the app in the store's `index.json`.
    pub fn ref_name(&self) -> String {
        self.reference.to_string()
    }

    /// Bytes and inodes the extracted bundle takes on a volume with
    /// `block_size` blocks: every file rounded up to whole blocks, one block
    /// and one inode per directory.
    pub fn bundle_footprint(&self, block_size: u64) -> (u64, u64) {
        let mut bytes = block_size; // the app's own directory
        let mut inodes = 1;
        let decoder = flate2::read::GzDecoder::new(self.bundle.as_slice());
        let mut archive = tar::Archive::new(decoder);
        if let Ok(entries) = archive.entries() {
            for entry in entries.flatten() {
                let header = entry.header();
                inodes += 1;
                bytes = bytes.saturating_add(match header.entry_type() {
                    tar::EntryType::Directory => block_size,
                    _ => crate::oci::format::round_up(header.size().unwrap_or(0), block_size),
                });
            }
        }
        (bytes, inodes)
    }
}

/// Where app metadata comes from: a registry, or an OCI layout on this
/// device (the blob store itself, or an export on removable media).
#[allow(async_fn_in_trait)]
pub trait MetaSource {
    async fn get_manifest(
        &self,
        image: &ImageRef,
        accept: &[&str],
        cap: u64,
    ) -> Result<FetchedManifest>;
    async fn get_blob(
        &self,
        image: &ImageRef,
        digest: &Digest,
        size: u64,
        cap: u64,
    ) -> Result<Vec<u8>>;
}

impl MetaSource for RegistryClient {
    async fn get_manifest(
        &self,
        image: &ImageRef,
        accept: &[&str],
        cap: u64,
    ) -> Result<FetchedManifest> {
        Ok(RegistryClient::get_manifest(self, image, accept, cap).await?)
    }
    async fn get_blob(
        &self,
        image: &ImageRef,
        digest: &Digest,
        size: u64,
        cap: u64,
    ) -> Result<Vec<u8>> {
        Ok(RegistryClient::get_blob(self, image, digest, size, cap).await?)
    }
}

/// An OCI layout (a stowage store) as a metadata source. A reference is
/// looked up by its ref name in `index.json` first (the store names every
/// image by the pin the compose file uses), then by its digest. Blobs are
/// verified when read.
pub struct LayoutSource<'a> {
    pub store: &'a Store,
}

impl MetaSource for LayoutSource<'_> {
    async fn get_manifest(
        &self,
        image: &ImageRef,
        accept: &[&str],
        cap: u64,
    ) -> Result<FetchedManifest> {
        let named = self.store.get_ref(&image.to_string())?;
        let digest = match (&named, &image.digest) {
            (Some(d), _) => d.digest.clone(),
            (None, Some(d)) => d.clone(),
            (None, None) => bail!(
                "{image} is not in the store at {}",
                self.store.root().display()
            ),
        };
        if !self.store.has(&digest) {
            bail!(
                "{image} ({digest}) is not in the store at {}",
                self.store.root().display()
            );
        }
        let bytes = self.store.read_capped(&digest, cap)?;
        #[derive(serde::Deserialize)]
        struct Probe {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe = format::parse_json(&bytes, &format!("manifest {image}"))?;
        let media_type = match (
            named.map(|d| d.media_type),
            probe.media_type,
            probe.manifests,
        ) {
            (Some(m), _, _) => m,
            (None, Some(m), _) => m,
            (None, None, Some(_)) => media::OCI_INDEX.to_string(),
            (None, None, None) => media::OCI_MANIFEST.to_string(),
        };
        if !accept.contains(&media_type.as_str()) {
            bail!("{image} in the store is a {media_type}, not one of {accept:?}");
        }
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    async fn get_blob(
        &self,
        _image: &ImageRef,
        digest: &Digest,
        size: u64,
        cap: u64,
    ) -> Result<Vec<u8>> {
        if size > cap {
            bail!("blob {digest} is {size} bytes, over the {cap}-byte limit");
        }
        Ok(self.store.read_capped(digest, cap)?)
    }
}

/// The store first, then a registry: a reference pinned by digest whose
/// manifest the store holds is read from the store (its content cannot
/// differ), and so is every blob the store holds; the rest is asked of the
/// registry. So a pulled app is checked and inspected with no network.
pub struct StoreFirst<'a> {
    pub store: &'a Store,
    pub registry: &'a RegistryClient,
}

impl MetaSource for StoreFirst<'_> {
    async fn get_manifest(
        &self,
        image: &ImageRef,
        accept: &[&str],
        cap: u64,
    ) -> Result<FetchedManifest> {
        if let Some(digest) = &image.digest
            && self.store.has(digest)
        {
            match (LayoutSource { store: self.store })
                .get_manifest(image, accept, cap)
                .await
            {
                Ok(fetched) => return Ok(fetched),
                // A damaged copy: the registry's, and fsck to mend the store.
                Err(e) => tracing::warn!(
                    "{image} in the store cannot be read ({e:#}): asking its registry"
                ),
            }
        }
        Ok(self.registry.get_manifest(image, accept, cap).await?)
    }

    async fn get_blob(
        &self,
        image: &ImageRef,
        digest: &Digest,
        size: u64,
        cap: u64,
    ) -> Result<Vec<u8>> {
        if self.store.has(digest) {
            match (LayoutSource { store: self.store })
                .get_blob(image, digest, size, cap)
                .await
            {
                Ok(bytes) => return Ok(bytes),
                Err(e) => tracing::warn!(
                    "blob {digest} in the store cannot be read ({e:#}): asking the registry"
                ),
            }
        }
        Ok(self.registry.get_blob(image, digest, size, cap).await?)
    }
}

/// Fetches the metadata of several apps at once, in their order.
pub async fn fetch_apps(
    client: &impl MetaSource,
    references: &[ImageRef],
    platform: &str,
    depth: Depth,
) -> Result<Vec<App>> {
    futures_util::future::try_join_all(
        references
            .iter()
            .map(|reference| fetch_app_to(client, reference, platform, depth)),
    )
    .await
}

/// Fetches everything of an app's metadata for `architecture`.
pub async fn fetch_app(
    client: &impl MetaSource,
    reference: &ImageRef,
    platform: &str,
) -> Result<App> {
    fetch_app_to(client, reference, platform, Depth::Everything).await
}

/// Fetches an app's metadata for `architecture`, as deep as `depth` says.
pub async fn fetch_app_to(
    client: &impl MetaSource,
    reference: &ImageRef,
    platform: &str,
    depth: Depth,
) -> Result<App> {
    let arch = format::Arch::parse(platform);
    let architecture = arch.architecture.as_str();
    let fetched = client
        .get_manifest(reference, &[media::OCI_MANIFEST], format::APP_MANIFEST_CAP)
        .await
        .with_context(|| format!("cannot fetch app {reference}"))?;
    let pinned = reference.pinned(&fetched.digest);
    let what = format!("app {pinned}");
    let manifest = AppManifest::parse(&fetched.bytes, &what)?;
    let mut meta_blobs = vec![MetaBlob {
        what: "app manifest".into(),
        descriptor: Descriptor::new(
            media::OCI_MANIFEST,
            fetched.digest.clone(),
            fetched.bytes.len() as u64,
        ),
        bytes: fetched.bytes.clone(),
    }];

    // The app's own blobs, all at once: the check's time on a device is
    // mostly round trips.
    let config_desc = manifest.config.clone();
    let bundle_desc = manifest.bundle().clone();
    let index_desc = manifest.bundle_index(&what)?;
    let meta_desc = manifest.layers_meta().cloned();
    let layer_index_desc = manifest.layer_index_for(architecture).cloned();
    let blob = |d: Descriptor, cap: u64, part: String| {
        let (pinned, what) = (&pinned, &what);
        async move { fetch_part(client, pinned, what, &d, cap, &part).await }
    };
    let optional = |d: Option<Descriptor>, part: String| async move {
        match d {
            Some(d) => blob(d, format::MANIFEST_CAP, part).await.map(Some),
            None => Ok(None),
        }
    };
    // A layer index is pushed as a manifest (composectl, the legacy
    // publisher) and so is read through `/manifests/`. Nothing on the device
    // needs it, and composectl no longer writes one: one the source cannot
    // give is left out, not an error.
    let layer_index = |d: Option<Descriptor>| {
        let pinned = &pinned;
        async move {
            let d = d?;
            let at = pinned.pinned(&d.digest);
            match client
                .get_manifest(&at, &[media::OCI_INDEX], format::MANIFEST_CAP)
                .await
            {
                Ok(m) if m.bytes.len() as u64 == d.size => Some(m.bytes),
                Ok(_) => None,
                Err(e) => {
                    tracing::debug!("the layer index {} of {pinned}: {e:#}", d.digest);
                    None
                }
            }
        }
    };
    let bundle_and_images = fetch_bundle_and_images(
        client,
        &pinned,
        &what,
        &arch,
        depth,
        &bundle_desc,
        meta_desc.as_ref(),
    );
    // The app's config, bundle index and layer index say nothing about the
    // space an update needs: a plan counts them by their descriptors, and
    // only a pull (which stores and verifies them) asks for their bytes.
    let app_blobs = async {
        if depth == Depth::Plan {
            return Ok(None);
        }
        let (config, index, layer_index) = tokio::join!(
            blob(config_desc.clone(), format::MANIFEST_CAP, "config".into()),
            optional(index_desc.clone(), "bundle index".into()),
            layer_index(layer_index_desc.clone()),
        );
        anyhow::Ok(Some((config?, index?, layer_index)))
    };
    let (app_blobs, bundle_and_images) = tokio::join!(app_blobs, bundle_and_images);
    let app_blobs = app_blobs?;
    let BundleAndImages {
        bundle,
        meta_bytes,
        parsed_meta,
        known_diff_ids,
        compose_name,
        fetched_images,
    } = bundle_and_images?;
    let mut unfetched = Vec::new();
    let (config, index, layer_index_bytes) = match app_blobs {
        Some((config, index, layer_index)) => (Some(config), index, layer_index),
        None => {
            unfetched.push(config_desc.clone());
            unfetched.extend(index_desc.clone());
            (None, None, None)
        }
    };
    if let Some(bytes) = config {
        meta_blobs.push(MetaBlob {
            what: "app config".into(),
            descriptor: config_desc,
            bytes,
        });
    }
    meta_blobs.push(MetaBlob {
        what: "bundle".into(),
        descriptor: bundle_desc,
        bytes: bundle.clone(),
    });
    if let (Some(bytes), Some(descriptor)) = (index, index_desc) {
        format::parse_bundle_index(&bytes)?;
        meta_blobs.push(MetaBlob {
            what: "bundle index".into(),
            descriptor,
            bytes,
        });
    }

    let mut arch_meta: Option<ArchLayers> = None;
    // Said with an image's refusal of the architecture, when the
    // layers-meta lacks it too.
    let mut unpublished: Option<String> = None;
    if let (Some(meta_desc), Some(bytes), Some(parsed)) = (meta_desc, meta_bytes, parsed_meta) {
        // An architecture the layers-meta lacks is planned with FORMAT.md's
        // estimate for every layer (the check says so); whether the app
        // runs here at all is for its images to say.
        let mut all = parsed?;
        arch_meta = all.remove(architecture);
        if arch_meta.is_none() {
            unpublished = Some(format!(
                "{what} is not published for {architecture} (its layers-meta has: {})",
                all.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        meta_blobs.push(MetaBlob {
            what: "layers-meta".into(),
            descriptor: meta_desc,
            bytes,
        });
    }
    if let (Some(index_desc), Some(bytes)) = (layer_index_desc, layer_index_bytes) {
        meta_blobs.push(MetaBlob {
            what: format!("layer index {architecture}"),
            descriptor: index_desc,
            bytes,
        });
    }

    // An app not published for this architecture is refused as such, before
    // whatever its images' fetches ran into.
    let assembled = fetched_images
        .into_iter()
        .collect::<Result<Vec<_>>>()
        .and_then(|fetched| {
            assemble_images(
                fetched,
                &what,
                &arch,
                arch_meta.as_ref(),
                &known_diff_ids,
                &mut meta_blobs,
                &mut unfetched,
            )
        });
    let Assembled { images, layers } = match (assembled, unpublished) {
        (Ok(assembled), _) => assembled,
        (Err(e), Some(sentence)) => return Err(e.context(sentence)),
        (Err(e), None) => return Err(e),
    };
    // Several services may share blobs: keep each once.
    let mut seen = std::collections::HashSet::new();
    meta_blobs.retain(|b| seen.insert(b.descriptor.digest.clone()));
    unfetched.retain(|d| seen.insert(d.digest.clone()));

    Ok(App {
        name: pinned.short_name().to_string(),
        reference: pinned,
        digest: fetched.digest,
        architecture: architecture.to_string(),
        manifest,
        compose_name,
        bundle,
        meta_blobs,
        images,
        layers: layers.into_values().collect(),
        unfetched,
    })
}

/// One of the app's blobs, capped.
async fn fetch_part(
    client: &impl MetaSource,
    pinned: &ImageRef,
    what: &str,
    d: &Descriptor,
    cap: u64,
    part: &str,
) -> Result<Vec<u8>> {
    client
        .get_blob(pinned, &d.digest, d.size, cap)
        .await
        .with_context(|| format!("the {part} of {what}"))
}

/// The bundle and layers-meta, the compose file the bundle carries, and
/// what its services' images gave (each fetch run to its end).
struct BundleAndImages {
    bundle: Vec<u8>,
    meta_bytes: Option<Vec<u8>>,
    /// Parsed once here; a parse error is reported later, in reading order.
    parsed_meta: Option<Result<format::LayersMeta, format::FormatError>>,
    known_diff_ids: BTreeMap<Digest, Digest>,
    compose_name: String,
    fetched_images: Vec<Result<FetchedImage>>,
}

/// The services' images are known from the bundle's compose file alone:
/// their fetches start as soon as the bundle is in, while the app's other
/// blobs are still on their way.
async fn fetch_bundle_and_images(
    client: &impl MetaSource,
    pinned: &ImageRef,
    what: &str,
    arch: &format::Arch,
    depth: Depth,
    bundle_desc: &Descriptor,
    meta_desc: Option<&Descriptor>,
) -> Result<BundleAndImages> {
    let architecture = arch.architecture.as_str();
    let meta = async {
        match meta_desc {
            Some(d) => fetch_part(client, pinned, what, d, format::MANIFEST_CAP, "layers-meta")
                .await
                .map(Some),
            None => Ok(None),
        }
    };
    let (bundle, meta_bytes) = tokio::try_join!(
        fetch_part(
            client,
            pinned,
            what,
            bundle_desc,
            BUNDLE_MEMORY_CAP,
            "bundle"
        ),
        meta,
    )?;
    // Parsed once here; a parse error is reported below, in reading order.
    let parsed_meta = meta_bytes.as_deref().map(format::parse_layers_meta);
    // For a plan-only fetch: the diff_ids the publisher recorded.
    let known_diff_ids: BTreeMap<Digest, Digest> = match (&parsed_meta, depth) {
        (Some(Ok(all)), Depth::Plan) => all
            .get(architecture)
            .map(|arch| {
                arch.layers
                    .iter()
                    .filter_map(|(digest, meta)| Some((digest.clone(), meta.diff_id.clone()?)))
                    .collect()
            })
            .unwrap_or_default(),
        _ => BTreeMap::new(),
    };
    let (compose_name, compose_bytes) = crate::app::bundle::read_compose_from_bundle(
        bundle.as_slice(),
        &crate::app::bundle::BundleLimits::default(),
    )
    .with_context(|| format!("the bundle of {what}"))?;
    let compose_text = String::from_utf8(compose_bytes)
        .map_err(|_| anyhow!("the compose file in the bundle of {what} is not UTF-8"))?;
    let compose = ComposeFile::parse(Path::new(&compose_name), &compose_text)
        .with_context(|| format!("the bundle of {what}"))?;
    let services = compose.images(&|_| None)?;
    // Each service's manifest and config, all services at once: on a
    // device the check's time is mostly these round trips.
    let fetches = services.into_iter().map(|(service, pinned)| {
        fetch_service_image(client, what, arch, depth, &known_diff_ids, service, pinned)
    });
    // Every fetch runs to its end; their errors are looked at after the
    // app's own blobs, in the order a reader expects (see below).
    let fetched_images = futures_util::future::join_all(fetches).await;
    Ok(BundleAndImages {
        bundle,
        meta_bytes,
        parsed_meta,
        known_diff_ids,
        compose_name,
        fetched_images,
    })
}

/// The services' images and the app's layers (each once), checked against
/// their configs, the architecture and the layers-meta.
struct Assembled {
    images: Vec<ServiceImage>,
    layers: BTreeMap<Digest, LayerNeed>,
}

/// Checks each fetched image and gathers its layers, keeping its manifest
/// and config as metadata blobs (or as unfetched descriptors for a plan).
fn assemble_images(
    fetched_images: Vec<FetchedImage>,
    what: &str,
    arch: &format::Arch,
    arch_meta: Option<&ArchLayers>,
    known_diff_ids: &BTreeMap<Digest, Digest>,
    meta_blobs: &mut Vec<MetaBlob>,
    unfetched: &mut Vec<Descriptor>,
) -> Result<Assembled> {
    let architecture = arch.architecture.as_str();
    let mut images = Vec::new();
    let mut layers: BTreeMap<Digest, LayerNeed> = BTreeMap::new();
    for FetchedImage {
        service,
        pinned: pinned_image,
        image,
        manifest_blob,
        manifest: image_manifest,
        config: config_bytes,
    } in fetched_images
    {
        let diff_ids: Vec<Digest> = match &config_bytes {
            Some(bytes) => {
                let config: ImageConfig = format::parse_json(bytes, &format!("config of {image}"))?;
                if !config.architecture.is_empty() && config.architecture != arch.architecture {
                    bail!(
                        "service {service} of {what}: image {image} is for {}, not {architecture}",
                        config.architecture
                    );
                }
                if config.rootfs.diff_ids.len() != image_manifest.layers.len() {
                    bail!(
                        "image {image} (service {service}) has {} layers but its config lists {} diff_ids",
                        image_manifest.layers.len(),
                        config.rootfs.diff_ids.len()
                    );
                }
                config.rootfs.diff_ids
            }
            // A plan-only fetch: every layer's diff_id is in the layers-meta.
            None => image_manifest
                .layers
                .iter()
                .filter_map(|l| known_diff_ids.get(&l.digest).cloned())
                .collect(),
        };
        let mut image_layers = Vec::new();
        for (layer, diff_id) in image_manifest.layers.iter().zip(diff_ids) {
            if !media::is_layer(&layer.media_type) {
                bail!(
                    "image {image} has layer {} of media type {:?}, which is not an image layer",
                    layer.digest,
                    layer.media_type
                );
            }
            let meta = arch_meta.and_then(|m| m.layers.get(&layer.digest)).cloned();
            if let (Some(m), Some(d)) = (&meta, meta.as_ref().and_then(|m| m.diff_id.clone()))
                && d != diff_id
            {
                bail!(
                    "{what}: layers-meta says layer {} has diff_id {d}, image {image} says {diff_id} ({} bytes)",
                    layer.digest,
                    m.archive_size
                );
            }
            layers
                .entry(layer.digest.clone())
                .or_insert_with(|| LayerNeed {
                    descriptor: layer.clone(),
                    source: image.clone(),
                    diff_id: diff_id.clone(),
                    meta,
                });
            image_layers.push((layer.clone(), diff_id));
        }
        match config_bytes {
            Some(bytes) => meta_blobs.push(MetaBlob {
                what: format!("config of {image}"),
                descriptor: image_manifest.config.clone(),
                bytes,
            }),
            None => unfetched.push(image_manifest.config.clone()),
        }
        images.push(ServiceImage {
            service,
            pinned: pinned_image,
            image,
            manifest: manifest_blob.descriptor.clone(),
            config: image_manifest.config.clone(),
            layers: image_layers,
        });
        meta_blobs.push(manifest_blob);
    }
    Ok(Assembled { images, layers })
}

/// One service's image as [`fetch_app_to`] fetched it.
struct FetchedImage {
    service: String,
    pinned: String,
    image: ImageRef,
    manifest_blob: MetaBlob,
    manifest: ImageManifest,
    /// `None` when a plan-only fetch had every diff_id from the layers-meta.
    config: Option<Vec<u8>>,
}

/// Fetches the manifest of `service`'s image for `arch` and, unless a plan
/// has all its diff_ids in `known_diff_ids`, its config.
async fn fetch_service_image(
    client: &impl MetaSource,
    what: &str,
    arch: &format::Arch,
    depth: Depth,
    known_diff_ids: &BTreeMap<Digest, Digest>,
    service: String,
    pinned: String,
) -> Result<FetchedImage> {
    let image: ImageRef = pinned
        .parse()
        .with_context(|| format!("service {service} of {what}"))?;
    if image.digest.is_none() {
        bail!("service {service} of {what}: image {image} is not pinned by digest");
    }
    let (manifest_blob, manifest) = fetch_image_manifest(client, &image, arch)
        .await
        .with_context(|| format!("service {service} of {what}"))?;
    let needs_config = depth == Depth::Everything
        || !manifest
            .layers
            .iter()
            .all(|l| known_diff_ids.contains_key(&l.digest));
    let config = if needs_config {
        let bytes = client
            .get_blob(
                &image,
                &manifest.config.digest,
                manifest.config.size,
                format::MANIFEST_CAP,
            )
            .await
            .with_context(|| format!("the config of image {image} (service {service})"))?;
        Some(bytes)
    } else {
        None
    };
    Ok(FetchedImage {
        service,
        pinned,
        image,
        manifest_blob,
        manifest,
        config,
    })
}

/// The image manifest for `arch`, following an index when the pin names one.
async fn fetch_image_manifest(
    client: &impl MetaSource,
    image: &ImageRef,
    arch: &format::Arch,
) -> Result<(MetaBlob, ImageManifest)> {
    let top = client
        .get_manifest(image, media::IMAGE_MANIFESTS, format::MANIFEST_CAP)
        .await?;
    let (blob, bytes) = if media::is_index(&top.media_type) {
        let index: ImageIndex = format::parse_json(&top.bytes, &format!("index {image}"))?;
        let entry = index
            .manifests
            .iter()
            .find(|m| {
                m.platform.as_ref().is_some_and(|p| arch.matches(p))
                    && media::is_image_manifest(&m.media_type)
            })
            .ok_or_else(|| {
                let have: Vec<String> = index
                    .manifests
                    .iter()
                    .filter_map(|m| m.platform.as_ref().map(|p| p.architecture.clone()))
                    .collect();
                anyhow!(
                    "image {image} has no linux/{arch} manifest (it has: {})",
                    have.join(", ")
                )
            })?
            .clone();
        // The index itself is not stored: the pin's digest was verified on
        // fetch, and the device only ever needs its own platform's manifest.
        let at = image.pinned(&entry.digest);
        let m = client
            .get_manifest(
                &at,
                &[media::OCI_MANIFEST, media::DOCKER_MANIFEST],
                format::MANIFEST_CAP,
            )
            .await?;
        (
            MetaBlob {
                what: format!("manifest {at}"),
                descriptor: Descriptor::new(&m.media_type, m.digest, m.bytes.len() as u64),
                bytes: m.bytes.clone(),
            },
            m.bytes,
        )
    } else {
        (
            MetaBlob {
                what: format!("manifest {image}"),
                descriptor: Descriptor::new(
                    &top.media_type,
                    top.digest.clone(),
                    top.bytes.len() as u64,
                ),
                bytes: top.bytes.clone(),
            },
            top.bytes,
        )
    };
    let manifest: ImageManifest = format::parse_json(&bytes, &format!("manifest of {image}"))?;
    Ok((blob, manifest))
}
