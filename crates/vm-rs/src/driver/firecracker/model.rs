//! Request and response bodies of Firecracker's API, written from its published OpenAPI
//! description (`src/firecracker/swagger/firecracker.yaml`, `definitions:`), for the endpoints
//! the driver uses. Field names, optionality and enums follow the document; optional fields
//! are left out of the JSON when unset, so the VMM applies its documented defaults.
//!
//! Firecracker decodes every body with serde's `deny_unknown_fields`: a misspelt field is a
//! `400` there, so these types are the only way the driver builds a body (no `json!`).

use serde::{Deserialize, Serialize};

/// `MachineConfiguration` (`PUT /machine-config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// Number of vCPUs (1..=32; 1 or an even number with SMT).
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (x86 only; default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking for diff snapshots (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
}

/// `BootSource` (`PUT /boot-source`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel (an ELF vmlinux; see [`crate::driver::vmlinux`]).
    pub kernel_image_path: String,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Host path of the initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// `Drive.cache_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes are ignored (the VMM's default).
    Unsafe,
    /// Flushes reach the host file.
    Writeback,
}

/// `Drive` (`PUT /drives/{drive_id}`), a virtio-block device backed by a host file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Must equal the `{drive_id}` of the path (alphanumerics and `_` only).
    pub drive_id: String,
    /// Whether the kernel mounts it as root (`root=` on the command line otherwise).
    pub is_root_device: bool,
    /// Host path of the image (raw).
    pub path_on_host: String,
    /// Read-only.
    pub is_read_only: bool,
    /// Caching strategy (default `Unsafe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
}

/// `NetworkInterface` (`PUT /network-interfaces/{iface_id}`), backed by a host TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Must equal the `{iface_id}` of the path.
    pub iface_id: String,
    /// The host TAP device (which must exist, in the VMM's network namespace).
    pub host_dev_name: String,
    /// Guest MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// `EntropyDevice` (`PUT /entropy`): a virtio-rng device (no fields needed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {}

/// `Vsock` (`PUT /vsock`): the guest's vsock device, proxied to Unix sockets on the host
/// (host-initiated: connect to `uds_path`, send `CONNECT <port>\n`; guest-initiated: the VMM
/// connects to `<uds_path>_<port>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Guest context id (>= 3).
    pub guest_cid: u32,
    /// The host-side Unix socket.
    pub uds_path: String,
}

/// `InstanceActionInfo.action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Boot the configured microVM.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the emulated i8042 keyboard (x86): a Linux guest reboots, which
    /// ends Firecracker.
    SendCtrlAltDel,
}

/// `InstanceActionInfo` (`PUT /actions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// `Vm.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// vCPUs stopped.
    Paused,
    /// vCPUs run again.
    Resumed,
}

/// `Vm` (`PATCH /vm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Wanted state.
    pub state: VmState,
}

/// `SnapshotCreateParams.snapshot_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    Full,
    /// Memory dirtied since the last snapshot.
    Diff,
}

/// `SnapshotCreateParams` (`PUT /snapshot/create`; the VM must be paused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// File for the guest memory.
    pub mem_file_path: String,
    /// File for the microVM state.
    pub snapshot_path: String,
    /// Full or diff (default full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// `MemoryBackend.backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// `backend_path` is the memory file.
    File,
    /// `backend_path` is a Unix socket of a userfaultfd page server.
    Uffd,
}

/// `MemoryBackend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// Kind of backend.
    pub backend_type: MemoryBackendType,
    /// File or socket path.
    pub backend_path: String,
}

/// `NetworkOverride`: another TAP for an interface of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// Interface of the snapshot.
    pub iface_id: String,
    /// Its new host TAP device.
    pub host_dev_name: String,
}

/// `SnapshotLoadParams` (`PUT /snapshot/load`; only in a VMM that has configured nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// File with the microVM state.
    pub snapshot_path: String,
    /// Where guest memory comes from (exclusive with the deprecated `mem_file_path`).
    pub mem_backend: MemoryBackend,
    /// Resume the VM once loaded (default false: it stays paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    /// TAP devices replacing the snapshot's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
}

/// `InstanceInfo` (`GET /`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Application name.
    pub app_name: String,
    /// Instance id.
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// The VMM's version.
    pub vmm_version: String,
}

/// `Error`: every error answer's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, in the VMM's words.
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_fields_are_left_out_and_enums_use_the_document_spelling() {
        let m = MachineConfiguration {
            vcpu_count: 2,
            mem_size_mib: 128,
            smt: None,
            track_dirty_pages: None,
        };
        assert_eq!(
            serde_json::to_value(m).expect("json"),
            serde_json::json!({"vcpu_count": 2, "mem_size_mib": 128})
        );
        let a = InstanceActionInfo {
            action_type: ActionType::SendCtrlAltDel,
        };
        assert_eq!(
            serde_json::to_string(&a).expect("json"),
            r#"{"action_type":"SendCtrlAltDel"}"#
        );
        let vm = Vm {
            state: VmState::Resumed,
        };
        assert_eq!(
            serde_json::to_string(&vm).expect("json"),
            r#"{"state":"Resumed"}"#
        );
        let load = SnapshotLoadParams {
            snapshot_path: "/s/vmstate".into(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: "/s/memory".into(),
            },
            resume_vm: Some(true),
            network_overrides: vec![],
        };
        assert_eq!(
            serde_json::to_value(&load).expect("json"),
            serde_json::json!({"snapshot_path": "/s/vmstate", "resume_vm": true,
                "mem_backend": {"backend_type": "File", "backend_path": "/s/memory"}})
        );
    }

    #[test]
    fn unknown_fields_are_refused_as_the_vmm_does() {
        let r: Result<Drive, _> = serde_json::from_str(
            r#"{"drive_id":"a","is_root_device":false,"path_on_host":"/x","is_read_only":false,"serial":"s"}"#,
        );
        assert!(r.is_err());
    }
}
