//! One module per verb. Each command is an options struct with a `run`
//! method; the CLI only parses flags into it, and tests call it directly.

pub mod inspect;
pub mod publish;
