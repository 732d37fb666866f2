//! Guest assets for tests: builds the static init once and runs `vm_rs::guest::setup` into the
//! shared assets dir (`$VMRS_ASSETS`, else the default), so the initramfs always carries the
//! init of this checkout. Setup takes a lock and replaces files atomically, so test binaries
//! running in parallel share one download and never see a half-written initramfs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use vm_rs::guest::{GuestAssets, SetupOptions};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The static init binary: `$VMRS_GUEST_INIT`, else built with `scripts/build-guest.sh`.
pub fn init_binary() -> PathBuf {
    static INIT: OnceLock<PathBuf> = OnceLock::new();
    INIT.get_or_init(|| {
        if let Some(p) = std::env::var_os("VMRS_GUEST_INIT").filter(|v| !v.is_empty()) {
            return PathBuf::from(p);
        }
        let root = workspace_root();
        let status = Command::new("bash")
            .arg(root.join("scripts/build-guest.sh"))
            .current_dir(&root)
            .status()
            .expect("run scripts/build-guest.sh");
        assert!(status.success(), "scripts/build-guest.sh failed: {status}");
        root.join(vm_rs::guest::BUILT_INIT_PATH)
    })
    .clone()
}

/// The shared assets dir used by tests: `$VMRS_ASSETS`, else the default assets dir (the same
/// one `vmrs setup` and [`super::guest_assets`] use).
pub fn assets_dir() -> PathBuf {
    vm_rs::paths::assets_dir()
}

/// Set up (or reuse) the shared guest assets.
pub async fn assets() -> GuestAssets {
    let opts = SetupOptions {
        dir: assets_dir(),
        init: Some(init_binary()),
        ..SetupOptions::default()
    };
    vm_rs::guest::setup(&opts).await.expect("guest asset setup")
}
