//! stowage: storage-aware over-the-air updates of Docker Compose apps.
//!
//! Dependencies point one way: `format` <- `registry`/`store` <- `space` <-
//! `docker`/`compose` <- `update` <- the CLI. Library code never prints; the
//! CLI decides how progress and results are shown.

pub mod agent;
pub mod app;
pub mod bundle;
pub mod commands;
pub mod compose;
pub mod compose_file;
pub mod config;
pub mod digest;
pub mod docker;
pub mod format;
pub mod fsutil;
pub mod installed;
pub mod layer;
pub mod progress;
pub mod reference;
pub mod registry;
pub mod space;
pub mod store;
pub mod stored;
pub mod target;
pub mod update;

pub use digest::Digest;
