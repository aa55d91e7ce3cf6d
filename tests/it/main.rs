//! The integration suite: one test binary, one module per area, all on the
//! shared harness in `tests/common/` (real registries, dockerd, skopeo,
//! docker-compose, loop-mounted volumes). Run it with `cargo test --test it`;
//! the kill loops live in the separate `torture` binary.

#[path = "../common/mod.rs"]
mod common;

mod agent;
mod docker_fsck;
mod docker_load;
mod foundries;
mod harness;
mod hostile_server;
mod install;
mod lean;
mod make_room;
mod matrix;
mod mount;
mod publish;
mod pull;
mod pull_hostile;
mod reconcile;
mod security;
mod store;
mod tuf;
mod update;
mod usage_accuracy;
