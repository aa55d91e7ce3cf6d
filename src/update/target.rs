//! Targets: the set of apps a device should run, as a small OCI artifact at
//! a tag. `stowage target publish` writes one; the agent polls it.
//!
//! The artifact is an OCI image manifest (artifactType
//! `application/vnd.stowage.target.v1`, empty config) whose single layer is
//! the JSON `{"apps": ["REGISTRY/REPO@sha256:...", ...]}`. App references are
//! pinned by digest when the target is published, so a target's digest names
//! exactly one set of app versions.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::oci::format::{self, Descriptor};
use crate::oci::media;
use crate::oci::reference::{AppRef, ImageRef};
use crate::oci::registry::RegistryClient;
use crate::update::transaction::AppSet;

pub const TARGET_ARTIFACT: &str = "application/vnd.stowage.target.v1";
pub const TARGET_MEDIA_TYPE: &str = "application/vnd.stowage.target.v1+json";
pub const TARGET_ANNOTATION: &str = "stowage-target";
/// Targets are small: a few app references.
const TARGET_CAP: u64 = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetContent {
    pub apps: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub reference: String,
    pub digest: Digest,
    /// App name -> pinned reference.
    pub apps: AppSet,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TargetManifest {
    schema_version: u32,
    media_type: &'static str,
    artifact_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
    annotations: BTreeMap<String, String>,
}

/// Publishes a target naming `apps` (each resolved to its digest) at `at`.
pub async fn publish_target(
    client: &RegistryClient,
    at: &ImageRef,
    apps: &[ImageRef],
) -> Result<Target> {
    let pinned = pin_apps(client, apps).await?;
    let content = format::to_json(&TargetContent { apps: pinned })?;
    let layer = Descriptor::of(TARGET_MEDIA_TYPE, &content);
    let config = Descriptor::of(media::EMPTY, format::EMPTY_CONFIG);
    client
        .push_blob(at, &config.digest, format::EMPTY_CONFIG.to_vec().into())
        .await?;
    client.push_blob(at, &layer.digest, content.into()).await?;
    let manifest = format::to_json(&TargetManifest {
        schema_version: 2,
        media_type: media::OCI_MANIFEST,
        artifact_type: TARGET_ARTIFACT,
        config,
        layers: vec![layer],
        annotations: BTreeMap::from([(TARGET_ANNOTATION.to_string(), "v1".to_string())]),
    })?;
    client
        .push_manifest(at, media::OCI_MANIFEST, &manifest)
        .await?;
    fetch_target(client, at).await
}

/// Reads the target at `at`.
pub async fn fetch_target(client: &RegistryClient, at: &ImageRef) -> Result<Target> {
    let fetched = client
        .get_manifest(at, &[media::OCI_MANIFEST], TARGET_CAP)
        .await
        .with_context(|| format!("cannot fetch target {at}"))?;
    #[derive(Deserialize)]
    struct Manifest {
        layers: Vec<Descriptor>,
        #[serde(default)]
        annotations: BTreeMap<String, String>,
    }
    let manifest: Manifest = format::parse_json(&fetched.bytes, &format!("target {at}"))?;
    if manifest
        .annotations
        .get(TARGET_ANNOTATION)
        .map(String::as_str)
        != Some("v1")
    {
        bail!("{at} is not a stowage target (no {TARGET_ANNOTATION}: v1 annotation)");
    }
    let layer = manifest
        .layers
        .iter()
        .find(|l| l.media_type == TARGET_MEDIA_TYPE)
        .with_context(|| format!("target {at} has no {TARGET_MEDIA_TYPE} layer"))?;
    let pinned = at.pinned(&fetched.digest);
    let bytes = client
        .get_blob(&pinned, &layer.digest, layer.size, TARGET_CAP)
        .await?;
    let content: TargetContent = format::parse_json(&bytes, &format!("target {at}"))?;
    Ok(Target {
        reference: pinned.to_string(),
        digest: fetched.digest,
        apps: apps_of(content, &format!("target {at}"))?,
    })
}

/// The apps a target's content names, by name; `what` names the target in
/// errors. Every app must be pinned by digest, and named once.
pub fn apps_of(content: TargetContent, what: &str) -> Result<AppSet> {
    let mut apps = AppSet::new();
    for app in content.apps {
        let reference: AppRef = app
            .parse()
            .with_context(|| format!("{what} names app {app}"))?;
        let name = reference.name()?;
        if let Some(other) = apps.insert(name.clone(), reference.clone()) {
            bail!("{what} names two versions of app {name}: {other} and {reference}");
        }
    }
    Ok(apps)
}

/// Each app of `apps` resolved to its digest: the pinned references a
/// target names.
pub async fn pin_apps(client: &RegistryClient, apps: &[ImageRef]) -> Result<Vec<String>> {
    let mut pinned = Vec::new();
    for app in apps {
        let fetched = client
            .get_manifest(app, &[media::OCI_MANIFEST], format::APP_MANIFEST_CAP)
            .await
            .with_context(|| format!("cannot resolve app {app}"))?;
        format::AppManifest::parse(&fetched.bytes, &app.to_string())?;
        pinned.push(app.pinned(&fetched.digest).to_string());
    }
    Ok(pinned)
}
