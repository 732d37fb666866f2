//! Shared test helpers, one module per area.
#![allow(dead_code)]

pub mod ch_flows;
pub mod ch_peer;
pub mod pvh_guest;
