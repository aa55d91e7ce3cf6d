//! stowage: storage-aware over-the-air updates of Docker Compose apps.
//!
//! Dependencies point one way: `format` <- `registry`/`store` <- `space` <-
//! `docker`/`compose` <- `update` <- the CLI. Library code never prints; the
//! CLI decides how progress and results are shown.

pub mod bundle;
pub mod digest;
pub mod layer;

pub use digest::Digest;
