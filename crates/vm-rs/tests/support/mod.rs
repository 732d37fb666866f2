//! Shared helpers for integration tests, one module per area.

#![allow(dead_code, clippy::unwrap_used)]

pub mod fault_proxy;
pub mod oci_layout;
pub mod registry;
