//! The torture group: `stowage pull`, `install`/`run` and `update` killed
//! with SIGKILL at random moments, in loops, and power cuts that lose the
//! writes not yet flushed (`power_cut`, on the power-cut disk). Long and machine-hungry, so CI
//! runs it as a step of its own after the main suite (`cargo test --test
//! torture`). Same harness as the main suite; every loop prints its seed and
//! replays with `STOWAGE_TEST_SEED=N`.

#[path = "../common/mod.rs"]
mod common;

mod install_kill;
mod power_cut;
mod pull_kill;
mod update_kill;
