//! stowage: storage-aware over-the-air updates of Docker Compose apps.
//!
//! Dependencies point one way: `format` <- `registry`/`store` <- `space` <-
//! `docker`/`compose` <- `update` <- the CLI. Library code never prints; the
//! CLI decides how progress and results are shown.

pub mod digest;

pub use digest::Digest;
pub mod compose;
pub mod docker;
