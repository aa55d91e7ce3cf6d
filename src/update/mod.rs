//! Moving the device from one set of apps to another: fetching the blobs
//! (`pull` from a registry, `export` to and import from removable media),
//! the journaled update transaction (`transaction`), the device it drives
//! (`device`), the target a fleet follows (`target`) and the agent that polls
//! it (`agent`).

pub mod agent;
pub mod device;
pub mod export;
pub mod pull;
pub mod reconcile;
pub mod target;
pub mod transaction;
pub mod tuf;
