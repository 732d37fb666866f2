//! The persisted per-VM records: `config.json` (what was asked for) and `state.json` (what is
//! happening), written atomically (temp file → fsync → rename → fsync dir).
//!
//! `state.json` carries a `version`; readers accept unknown fields so older binaries can read
//! newer records and vice versa.

use crate::config::{BackendKind, DiskConfig, VmConfig};
use crate::driver::{TapNetwork, VmHandle};
use crate::state::VmState;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Current `state.json` format version.
pub const RECORD_VERSION: u32 = 1;

/// File names inside a VM directory.
pub mod files {
    /// The VM's configuration.
    pub const CONFIG: &str = crate::vm_dir::VmDir::CONFIG;
    /// The VM's state record.
    pub const STATE: &str = crate::vm_dir::VmDir::STATE;
    /// Guest serial console.
    pub const SERIAL_LOG: &str = crate::vm_dir::VmDir::SERIAL_LOG;
    /// VMM stdout/stderr.
    pub const VMM_LOG: &str = crate::vm_dir::VmDir::VMM_LOG;
    /// What other subsystems added at start ([`super::super::StartOptions`]), for restarts.
    pub const START: &str = crate::vm_dir::VmDir::START;
    /// What verbs changed in the running VMM ([`super::LiveChanges`]).
    pub const LIVE: &str = crate::vm_dir::VmDir::LIVE;
    /// A stop or kill asked for by some process ([`super::ExitRequest`]).
    pub const EXIT_REQUEST: &str = crate::vm_dir::VmDir::EXIT_REQUEST;
    /// Which backend the VM was started on and why ([`super::BackendChoiceRecord`]).
    pub const BACKEND_CHOICE: &str = crate::vm_dir::VmDir::BACKEND_CHOICE;
}

/// A stop or kill one process asked for, so that every process watching the VM — not only the
/// one that asked — records the exit that follows as `stopped`. It names the VMM it was meant
/// for (pid + start time), so a request left from an earlier run never applies to a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRequest {
    /// VMM pid.
    pub pid: u32,
    /// VMM start time.
    pub start_time: u64,
    /// A kill (else a graceful stop).
    #[serde(default)]
    pub kill: bool,
}

impl ExitRequest {
    /// Whether the request was meant for the VMM `handle` names.
    pub fn is_for(&self, handle: &VmHandle) -> bool {
        self.pid == handle.pid && self.start_time == handle.start_time
    }
}

/// The exit request recorded for the VM in `dir`, if any (an unreadable one counts as none:
/// it only refines how an exit is explained).
pub fn load_exit_request(dir: &Path) -> Option<ExitRequest> {
    read_json(&dir.join(files::EXIT_REQUEST)).ok()
}

/// The state record of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Format version.
    pub version: u32,
    /// VM name.
    pub name: String,
    /// Lifecycle state.
    pub state: VmState,
    /// Backend running the VM.
    pub backend: BackendKind,
    /// How to reach the VMM while it runs.
    #[serde(default)]
    pub handle: Option<VmHandle>,
    /// Last address the guest reported (kept across pause/resume).
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// Unix time the VM was created.
    pub created_at: u64,
    /// Unix time of the last start.
    #[serde(default)]
    pub started_at: Option<u64>,
    /// Unix time the VM last stopped or failed.
    #[serde(default)]
    pub finished_at: Option<u64>,
    /// How the VM's main process ([`crate::VmManager::exec_main`]) ended, when the guest
    /// reported it before this run ended: its exit code, or 128 + signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// Which backend a VM was started on and why (`backend.json`, written at create; see
/// [`crate::driver::choose`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendChoiceRecord {
    /// The backend.
    pub backend: BackendKind,
    /// Why it was chosen.
    pub reason: String,
}

/// The backend choice recorded in `dir`, if any (older VMs have none; a damaged file reads
/// as none: it only explains).
pub fn load_backend_choice(dir: &Path) -> Option<BackendChoiceRecord> {
    let bytes = std::fs::read(dir.join(files::BACKEND_CHOICE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// What verbs changed in a running VMM — vCPUs and memory after a resize, hot-plugged
/// devices — kept in `live.json` while the VMM runs and dropped when it exits (the VMM's
/// devices go with it; a restart boots the saved `config.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveChanges {
    /// vCPUs after the last resize.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Memory (MiB) after the last resize.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Devices hot-plugged and not unplugged yet, in plug order.
    #[serde(default)]
    pub devices: Vec<PluggedDevice>,
}

/// A device hot-plugged into a running VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[non_exhaustive]
pub enum PluggedDevice {
    /// A disk ([`crate::VmManager::add_disk`]).
    Disk {
        /// The backend's device id.
        id: String,
        /// What was plugged.
        disk: DiskConfig,
    },
    /// A NIC ([`crate::VmManager::add_net`]).
    Net {
        /// The backend's device id.
        id: String,
        /// What was plugged.
        net: TapNetwork,
    },
}

impl PluggedDevice {
    /// The backend's device id (what [`crate::VmManager::remove_device`] takes).
    pub fn id(&self) -> &str {
        match self {
            PluggedDevice::Disk { id, .. } | PluggedDevice::Net { id, .. } => id,
        }
    }
}

/// Load a VM's live changes (none when the file is absent).
pub fn load_live(dir: &Path) -> Result<LiveChanges, RecordError> {
    let path = dir.join(files::LIVE);
    if !path.exists() {
        return Ok(LiveChanges::default());
    }
    read_json(&path)
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Errors reading or writing records.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// File I/O failed.
    #[error("cannot access {}", path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON of the expected shape.
    #[error("corrupt record {}", path.display())]
    Corrupt {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

impl RecordError {
    /// What kind of failure this is (see [`crate::error`]): always [`Other`](crate::ErrorKind::Other).
    pub fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::Other
    }
}

/// Write `value` as pretty JSON to `path` atomically (temp file, fsync, rename, fsync dir).
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), RecordError> {
    let io = |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| io(std::io::Error::other(e)))?;
    bytes.push(b'\n');
    crate::fsutil::write_atomic(path, &bytes).map_err(io)
}

/// Read JSON from `path`.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, RecordError> {
    let bytes = std::fs::read(path).map_err(|source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| RecordError::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

/// Read JSON from `path`, or `T::default()` when the file does not exist (records written by
/// older versions).
pub fn load_json_or_default<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, RecordError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        _ => read_json(path),
    }
}

/// Load a VM's config.
pub fn load_config(dir: &Path) -> Result<VmConfig, RecordError> {
    read_json(&dir.join(files::CONFIG))
}

/// Load a VM's state record.
pub fn load_record(dir: &Path) -> Result<VmRecord, RecordError> {
    read_json(&dir.join(files::STATE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_roundtrip_and_old_records_with_extra_fields() {
        let dir = tempfile::tempdir().expect("tmp");
        let rec = VmRecord {
            version: RECORD_VERSION,
            name: "a".into(),
            state: VmState::Ready {
                ip: IpAddr::from([10, 0, 2, 15]),
            },
            backend: BackendKind::Qemu,
            handle: None,
            ip: Some(IpAddr::from([10, 0, 2, 15])),
            created_at: 1,
            started_at: Some(2),
            finished_at: None,
            exit_code: None,
        };
        let path = dir.path().join(files::STATE);
        write_json_atomic(&path, &rec).expect("write");
        assert_eq!(load_record(dir.path()).expect("read"), rec);
        // no temp files left behind
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
        // a newer writer's extra fields are ignored
        let mut v = serde_json::to_value(&rec).expect("v");
        v["future_field"] = serde_json::json!(42);
        std::fs::write(&path, v.to_string()).expect("w");
        assert_eq!(load_record(dir.path()).expect("read"), rec);
        std::fs::write(&path, b"{garbage").expect("w");
        assert!(matches!(
            load_record(dir.path()),
            Err(RecordError::Corrupt { .. })
        ));
    }
}
