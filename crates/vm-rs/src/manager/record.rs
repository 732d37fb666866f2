//! The persisted per-VM records: `config.json` (what was asked for) and `state.json` (what is
//! happening), written atomically (temp file → fsync → rename → fsync dir).
//!
//! `state.json` carries a `version`; readers accept unknown fields so older binaries can read
//! newer records and vice versa.

use crate::config::{BackendKind, VmConfig};
use crate::driver::VmHandle;
use crate::state::VmState;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Current `state.json` format version.
pub const RECORD_VERSION: u32 = 1;

/// File names inside a VM directory.
pub mod files {
    /// The VM's configuration.
    pub const CONFIG: &str = "config.json";
    /// The VM's state record.
    pub const STATE: &str = "state.json";
    /// Guest serial console.
    pub const SERIAL_LOG: &str = "serial.log";
    /// VMM stdout/stderr.
    pub const VMM_LOG: &str = "vmm.log";
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
    pub ip: Option<String>,
    /// Unix time the VM was created.
    pub created_at: u64,
    /// Unix time of the last start.
    #[serde(default)]
    pub started_at: Option<u64>,
    /// Unix time the VM last stopped or failed.
    #[serde(default)]
    pub finished_at: Option<u64>,
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

/// Write `value` as pretty JSON to `path` atomically.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), RecordError> {
    let io = |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io)?;
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| io(std::io::Error::other(e)))?;
    tmp.write_all(&bytes).map_err(io)?;
    tmp.write_all(b"\n").map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
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
                ip: "10.0.2.15".into(),
            },
            backend: BackendKind::Qemu,
            handle: None,
            ip: Some("10.0.2.15".into()),
            created_at: 1,
            started_at: Some(2),
            finished_at: None,
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
