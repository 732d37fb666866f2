//! Subcommand implementations, one module per area.

pub mod setup;
