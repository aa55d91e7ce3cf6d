//! The OCI side, with nothing of the device in it: digests, image
//! references, media types and the wire format of an app (`../shared/FORMAT.md`),
//! and the distribution protocol's client.

pub mod digest;
pub mod format;
pub mod media;
pub mod reference;
pub mod registry;
