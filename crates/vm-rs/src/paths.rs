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

//!
//! Everything vm-rs creates here is private to its owner whatever the caller's umask: directories
//! 0700 ([`create_private_dir_all`]), records, logs and locks 0600 ([`private_file`]), and the
//! VMMs and sidecars run with umask 0177 ([`crate::process::VmmProcess::spawn`]) so the sockets
//! and files they create are 0600 too (vm-rs creates every directory they write into).

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every directory vm-rs creates in its data dir.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of every file vm-rs creates in its data dir.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Create `path` and missing parents with mode 0700 (a umask can only take bits away, so the
/// caller's does not widen it). Directories that already exist are left alone: the data dir may
/// be one the user chose; use [`make_private`] on directories vm-rs owns.
pub fn create_private_dir_all(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(path)
}

/// Clear the group and other bits of a directory vm-rs owns (one created by an older version
/// or under a wider mode).
pub fn make_private(path: &Path) -> std::io::Result<()> {
    restrict(path, PRIVATE_DIR_MODE)
}

/// Create the single directory `path` (failing with `AlreadyExists` if it exists), mode 0700.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(PRIVATE_DIR_MODE).create(path)
}

/// `OpenOptions` that create files with mode 0600; add `read`/`write`/`append`/`truncate`.
pub fn private_file() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.mode(PRIVATE_FILE_MODE);
    o
}

/// Clear group and other bits beyond `mode` on an existing path.
fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    let current = meta.permissions().mode() & 0o7777;
    if current & !mode != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(current & mode))?;
    }
    Ok(())
}

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
