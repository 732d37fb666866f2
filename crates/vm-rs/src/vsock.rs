//! The `vhost-device-vsock` sidecar: vsock for QEMU guests, on the hybrid-vsock convention.
//!
//! QEMU 7.2 has no hybrid-vsock device of its own (its `vhost-vsock` needs the host kernel's
//! vhost_vsock and a global CID). rust-vmm's `vhost-device-vsock` is a vhost-user backend:
//! QEMU's `vhost-user-vsock-device` connects to its vhost-user socket and the daemon maps
//! guest RAM (so the VM's memory backend must be shared), and host programs reach guest ports
//! through its Unix socket with `CONNECT <port>\n` — the same convention as Cloud Hypervisor
//! and Firecracker ([`crate::agent::hybrid`]). Each VM gets its own daemon:
//!
//! ```text
//! vhost-device-vsock --vm guest-cid=3,socket=<vm dir>/vsock-vhost.sock,uds-path=<vm dir>/agent.sock
//! ```
//!
//! Like the virtiofsd sidecars ([`crate::virtiofs`]) it is started before QEMU, recorded in
//! `vsock.json` by pid + start time, and killed when the VM ends or is removed. When it dies
//! while the VM runs, agent connections fail (connect refused: an [`crate::agent::AgentError`])
//! rather than hang; the VM itself keeps running.

use crate::devices::AgentChannel;
use crate::process::{ProcessError, VmmProcess};
use crate::vm_dir::VmDir;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable naming the daemon binary.
pub const ENV: &str = "VMRS_VHOST_DEVICE_VSOCK";
/// The daemon's name on `PATH`.
pub const BINARY: &str = "vhost-device-vsock";
/// The guest's context id (each VM has its own device and daemon, so one number serves all).
pub const GUEST_CID: u32 = 3;
/// Version of `vsock.json`.
pub const RECORD_VERSION: u32 = 1;
/// How long the daemon may take to create its vhost-user socket.
const SOCKET_WAIT: Duration = Duration::from_secs(5);

/// Errors starting the sidecar.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VsockError {
    /// No daemon binary.
    #[error("{BINARY} not found (searched {searched}); install it with scripts/setup.sh")]
    NotFound {
        /// Where we looked.
        searched: String,
    },
    /// A file of the sidecar could not be written.
    #[error("vsock sidecar file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The daemon could not be started.
    #[error("cannot start {BINARY}")]
    Spawn(#[source] ProcessError),
    /// The daemon exited or did not create its socket in time.
    #[error("{BINARY} did not come up: {detail}")]
    Exited {
        /// Its status and words.
        detail: String,
    },
}

impl VsockError {
    /// What kind of failure this is.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            VsockError::NotFound { .. } => crate::ErrorKind::NotFound,
            VsockError::Io { source, .. } => crate::ErrorKind::of_io(source),
            _ => crate::ErrorKind::Backend,
        }
    }
}

/// `vsock.json`: the VM's sidecar.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The daemon's pid.
    pub pid: u32,
    /// Its start time (clock ticks since boot): with `pid`, its identity.
    pub start_time: u64,
}

impl VsockRecord {
    /// Whether the recorded process still runs (a reused pid is not it).
    pub fn is_alive(&self) -> bool {
        crate::process::is_same_process_alive(self.pid, self.start_time)
    }
}

/// The recorded sidecar of the VM in `vm_dir`, if any.
pub fn load(vm_dir: &Path) -> Option<VsockRecord> {
    std::fs::read(VmDir::new(vm_dir).file(VmDir::VSOCK_RECORD))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Find the daemon: `$VMRS_VHOST_DEVICE_VSOCK`, `PATH`, then cargo's bin directory.
pub fn find() -> Result<PathBuf, VsockError> {
    std::env::var_os(ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| crate::host::find_on_path(BINARY))
        .or_else(|| {
            let cargo_home = std::env::var_os("CARGO_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
            Some(cargo_home.join("bin").join(BINARY)).filter(|p| crate::host::is_executable(p))
        })
        .ok_or_else(|| VsockError::NotFound {
            searched: format!("{ENV}, PATH and cargo's bin directory"),
        })
}

/// The daemon's `--vm` argument for `cid`, `vhost` and `uds`. Paths with a comma are refused
/// (the daemon splits the option at commas).
pub fn vm_arg(cid: u32, vhost: &Path, uds: &Path) -> Result<String, VsockError> {
    let s = |p: &Path| {
        p.to_str()
            .filter(|s| !s.contains(','))
            .map(str::to_owned)
            .ok_or_else(|| VsockError::Io {
                path: p.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "vsock socket paths must be UTF-8 without commas",
                ),
            })
    };
    Ok(format!(
        "guest-cid={cid},socket={},uds-path={}",
        s(vhost)?,
        s(uds)?
    ))
}

/// Start the sidecar for `agent` when it is a vsock channel with a vhost-user socket (QEMU),
/// record it, and wait for its socket. Nothing to do for other channels.
pub async fn start(vm_dir: &Path, agent: Option<&AgentChannel>) -> Result<(), VsockError> {
    let Some(AgentChannel::Vsock {
        cid,
        socket,
        vhost_user: Some(vhost),
        ..
    }) = agent
    else {
        return Ok(());
    };
    let binary = find()?;
    let arg = vm_arg(*cid, vhost, socket)?;
    let dir = VmDir::new(vm_dir);
    let record_path = dir.file(VmDir::VSOCK_RECORD);
    let log_path = dir.file(VmDir::VSOCK_LOG);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VsockError::Io { path, source }
    };
    for s in [vhost, socket] {
        let _ = std::fs::remove_file(s);
    }
    let log = crate::paths::private_file()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(&log_path))?;
    let mut cmd = tokio::process::Command::new(&binary);
    cmd.arg("--vm")
        .arg(&arg)
        .current_dir(vm_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io(&log_path))?)
        .stderr(log);
    let mut process = VmmProcess::spawn_owned(cmd, vm_dir).map_err(VsockError::Spawn)?;
    let record = VsockRecord {
        version: RECORD_VERSION,
        pid: process.pid(),
        start_time: process.start_time(),
    };
    let written = serde_json::to_vec_pretty(&record)
        .map_err(std::io::Error::from)
        .and_then(|json| crate::fsutil::write_atomic(&record_path, &json));
    if let Err(e) = written {
        let _ = process.kill();
        return Err(io(&record_path)(e));
    }
    let deadline = std::time::Instant::now() + SOCKET_WAIT;
    while !vhost.exists() {
        if !process.is_alive() || std::time::Instant::now() >= deadline {
            let status = if process.is_alive() {
                "no vhost-user socket".to_string()
            } else {
                process.wait().await.map(|e| e.to_string()).unwrap_or_default()
            };
            stop(vm_dir);
            let words = std::fs::read_to_string(&log_path).unwrap_or_default();
            let words = &words[words.len().saturating_sub(2048)..];
            return Err(VsockError::Exited {
                detail: format!("{status}: {}", words.trim()),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Kill the VM's recorded sidecar if it still runs and remove its sockets and record.
/// Returns the pid killed.
pub fn stop(vm_dir: &Path) -> Option<u32> {
    let dir = VmDir::new(vm_dir);
    let killed = load(vm_dir).and_then(|r| {
        let p = VmmProcess::attach(r.pid, r.start_time).ok()?;
        p.kill().ok()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while r.is_alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        Some(r.pid)
    });
    let _ = std::fs::remove_file(dir.file(VmDir::VSOCK_VHOST_SOCKET));
    let _ = std::fs::remove_file(dir.file(VmDir::VSOCK_RECORD));
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_arg_refuses_commas() {
        assert_eq!(
            vm_arg(3, Path::new("/v/vh.sock"), Path::new("/v/agent.sock")).unwrap(),
            "guest-cid=3,socket=/v/vh.sock,uds-path=/v/agent.sock"
        );
        assert!(vm_arg(3, Path::new("/v,x/vh.sock"), Path::new("/v/a.sock")).is_err());
    }
}
