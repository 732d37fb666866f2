//! Where vm-rs keeps its data.
//!
//! The data dir is `$VMRS_HOME` when set, else `$XDG_DATA_HOME/vmrs` (usually
//! `~/.local/share/vmrs`). Inside it:
//!
//! ```text
//! vms/<name>/      one directory per VM (config.json, state.json, serial.log, vmm.log, sockets)
//! assets/          guest assets (kernel, modules, busybox, vmrs-init, initramfs); VMRS_ASSETS overrides
//! images/          OCI content store
//! ```

use std::path::PathBuf;

/// The data dir: `VMRS_HOME`, else the XDG data dir + `vmrs`, else `/var/lib/vmrs`.
pub fn data_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("VMRS_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    dirs::data_dir()
        .map(|d| d.join("vmrs"))
        .unwrap_or_else(|| PathBuf::from("/var/lib/vmrs"))
}

/// Guest assets dir: `VMRS_ASSETS`, else `<data dir>/assets`.
pub fn assets_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMRS_ASSETS").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    data_dir().join("assets")
}

/// Directory holding one subdirectory per VM.
pub fn vms_dir(home: &std::path::Path) -> PathBuf {
    home.join("vms")
}
