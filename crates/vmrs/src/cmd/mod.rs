//! Subcommand implementations, one file per area.

pub mod disk;
