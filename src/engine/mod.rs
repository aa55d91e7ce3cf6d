//! The Docker side of the device: the engine's client and the image archives
//! stowage streams into it (`docker`), compose (`compose`), the record of what
//! stowage installed (`record`), installing an app from the blob store
//! (`install`), running and stopping apps (`run`), and cleaning Docker's side
//! (`prune`).

pub mod compose;
pub mod docker;
pub mod install;
pub mod layers;
pub mod prune;
pub mod record;
pub mod repair;
pub mod run;
