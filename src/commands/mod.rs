//! One module per verb. Each command is an options struct or a function with
//! a `run`-like entry point; the CLI only parses flags into it, and tests
//! call it directly. Commands never import each other.

pub mod df;
pub mod inspect;
pub mod publish;
