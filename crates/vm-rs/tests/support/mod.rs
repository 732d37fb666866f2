//! Shared helpers for integration tests (one module per area).
#![allow(dead_code)]

pub mod guest;
pub mod qemu;
