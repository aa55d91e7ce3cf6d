//! stowage: storage-aware over-the-air updates of Docker Compose apps.
//!
//! The layers, each a folder, point one way (`docs/architecture.md`):
//!
//! - [`fsutil`], [`config`], [`progress`]: leaves every layer may use
//!   (durable writes and locks; settings; progress events).
//! - [`oci`]: digests, references, media types, the app's wire format and
//!   the registry client.
//! - [`store`]: the device's blob store, an OCI image layout.
//! - [`app`]: an app as published and as stored: fetching it, its bundle,
//!   its compose file, the analysis of its layers.
//! - [`plan`]: volumes and the fit check.
//! - [`engine`]: Docker and compose: installing, running, cleaning.
//! - [`update`]: pull, export and import, the update transaction, the agent.
//! - [`commands`]: one thin verb each, for the CLI in `src/bin/stowage`.
//!
//! Library code never prints; the CLI decides how progress and results are
//! shown.

pub mod app;
pub mod commands;
pub mod config;
pub mod engine;
pub mod fsutil;
pub mod oci;
pub mod plan;
pub mod progress;
pub mod store;
pub mod update;

pub use oci::digest::Digest;
