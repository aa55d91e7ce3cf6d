//! One module per verb. Each command is an options struct or a function with
//! a `run`-like entry point; the CLI only parses flags into it, and tests
//! call it directly.

pub mod admin;
pub mod check;
pub mod df;
pub mod export;
pub mod inspect;
pub mod install;
pub mod publish;
pub mod pull;
pub mod run;
pub mod update;
