//! Shared test helpers, one module per area.
#![allow(dead_code)]

pub mod ch_flows;
pub mod ch_peer;
pub mod pvh_guest;

/// The Debian kernel of the guest assets, if they are set up (`VMRS_ASSETS`, the shared test
/// cache under the target dir, or the default assets dir).
pub fn guest_kernel() -> Option<std::path::PathBuf> {
    [
        std::env::var_os("VMRS_ASSETS")
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from),
        Some(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmrs-assets")),
        Some(vm_rs::paths::assets_dir()),
    ]
    .into_iter()
    .flatten()
    .map(|d| d.join("vmlinuz"))
    .find(|k| k.is_file())
}
