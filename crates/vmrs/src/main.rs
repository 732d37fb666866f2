//! `vmrs`: the command-line interface to vm-rs (placeholder).
fn main() {}
