//! Inspecting (`stowage inspect`): what an app in a registry holds: its services and
//! pinned images, per-architecture download size and disk usage, and the
//! bundled compose file.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::Digest;
use crate::app::MetaSource;
use crate::app::bundle;
use crate::app::compose_file::ComposeFile;
use crate::oci::format::{self, AppManifest};
use crate::oci::media;
use crate::oci::reference::ImageRef;

pub struct Inspect {
    pub app: ImageRef,
}

#[derive(Debug, Serialize)]
pub struct ArchFootprint {
    pub layers: usize,
    pub download_size: u64,
    pub usage: u64,
    pub fs_block_size: u64,
}

#[derive(Debug, Serialize)]
pub struct AppDescription {
    pub reference: String,
    pub digest: Digest,
    pub manifest_size: u64,
    pub bundle_size: u64,
    pub services: BTreeMap<String, String>,
    pub architectures: BTreeMap<String, ArchFootprint>,
    pub compose_file: String,
    pub compose: String,
}

impl Inspect {
    pub async fn run(self, client: &impl MetaSource) -> Result<AppDescription> {
        let fetched = client
            .get_manifest(&self.app, &[media::OCI_MANIFEST], format::APP_MANIFEST_CAP)
            .await?;
        let what = format!("app {}", self.app);
        let manifest = AppManifest::parse(&fetched.bytes, &what)?;
        let pinned = self.app.pinned(&fetched.digest);
        let bundle_desc = manifest.bundle();
        let bundle_bytes = client
            .get_blob(
                &pinned,
                &bundle_desc.digest,
                bundle_desc.size,
                bundle::BundleLimits::default().bundle,
            )
            .await
            .with_context(|| format!("the bundle of {what}"))?;
        let (compose_name, compose_bytes) = bundle::read_compose_from_bundle(
            bundle_bytes.as_slice(),
            &bundle::BundleLimits::default(),
        )
        .with_context(|| format!("the bundle of {what}"))?;
        let compose_text = String::from_utf8_lossy(&compose_bytes).into_owned();
        let compose = ComposeFile::parse(Path::new(&compose_name), &compose_text)?;
        let services = compose.images(&|_| None)?;

        let mut architectures = BTreeMap::new();
        if let Some(meta_desc) = manifest.layers_meta() {
            let bytes = client
                .get_blob(
                    &pinned,
                    &meta_desc.digest,
                    meta_desc.size,
                    format::MANIFEST_CAP,
                )
                .await
                .with_context(|| format!("the layers-meta of {what}"))?;
            for (arch, layers) in format::parse_layers_meta(&bytes)? {
                architectures.insert(
                    arch,
                    ArchFootprint {
                        layers: layers.layers.len(),
                        download_size: layers.layers.values().map(|l| l.archive_size).sum(),
                        usage: layers.layers.values().map(|l| l.usage).sum(),
                        fs_block_size: layers.fs_block_size,
                    },
                );
            }
        }
        Ok(AppDescription {
            reference: format!("{}@{}", self.app.name(), fetched.digest),
            digest: fetched.digest,
            manifest_size: fetched.bytes.len() as u64,
            bundle_size: bundle_desc.size,
            services,
            architectures,
            compose_file: compose_name,
            compose: compose_text,
        })
    }
}
