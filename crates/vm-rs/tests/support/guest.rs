//! Guest assets for tests: builds the static init once and runs `vm_rs::guest::setup` into a
//! shared cache dir (`$VMRS_ASSETS`, else `target/tmp/vmrs-assets`). Setup takes a lock, so
//! test binaries running in parallel share one download.

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

/// The shared assets dir used by tests.
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("VMRS_ASSETS").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmrs-assets"),
    }
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
