//! The layout of a VM's directory (`$VMRS_HOME/vms/<name>/`): [`VmDir`] owns the name of every
//! file and socket in it, so the manager, the drivers, networking and the image root disk agree
//! on one list (and cleanup can find everything a VMM left).
//!
//! | file | written by | what |
//! |------|------------|------|
//! | `config.json` | manager | what was asked for ([`crate::VmConfig`]) |
//! | `state.json` | manager | the state record (versioned) |
//! | `start.json` | manager | what other subsystems added at start (for `vmrs start`) |
//! | `live.json` | manager | what verbs changed in the running VMM |
//! | `exit-request.json` | manager | a stop/kill some process asked for |
//! | `start.lock`, `vm.lock` | manager | held while a start is in progress; held by every verb |
//! | `serial.sock`, `console.json` | manager, serial-log sidecar | the console QEMU writes, capped into `serial.log` |
//! | `serial.log` | VMM | the guest's serial console |
//! | `vmm.log` | VMM | the VMM's own stdout/stderr |
//! | `agent.sock` | VMM | host end of the guest agent's channel |
//! | `root.qcow2` | manager | the per-VM overlay of an image root filesystem |
//! | `memory` | QEMU | guest RAM (a shared file, so a snapshot can copy it; removed when the VMM exits) |
//! | `devices.json` | manager | the devices the VMM was started with (what a snapshot records) |
//! | `disk-<id>.qcow2` | manager | a restored VM's overlay over a snapshot's frozen disk |
//! | `origin.json` | manager | the snapshot a restored VM came from |
//! | `net.json`, `net<N>.sock` | networking | host network state; switch-port sockets |
//! | `virtiofsd.json`, `virtiofsd.log`, `fs<N>.sock` | shared directories | the virtiofsd sidecars (pid + start time), their output, their vhost-user sockets |
//! | `qmp.sock`, `qmp-events.sock` | QEMU | QMP monitors (commands, events) |
//! | `ch-api.sock`, `ch-events.json`, `ch.log`, `ch-quit-requested`, `vmlinux` | Cloud Hypervisor | API, event monitor, log, quit marker, unpacked kernel |

use std::path::{Path, PathBuf};

/// A VM's directory and the names in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDir {
    path: PathBuf,
}

impl VmDir {
    /// The VM's configuration.
    pub const CONFIG: &'static str = "config.json";
    /// The state record.
    pub const STATE: &'static str = "state.json";
    /// Start options, for restarts.
    pub const START: &'static str = "start.json";
    /// Live changes made by verbs.
    pub const LIVE: &'static str = "live.json";
    /// A requested stop or kill.
    pub const EXIT_REQUEST: &'static str = "exit-request.json";
    /// Held while a start is in progress.
    pub const START_LOCK: &'static str = "start.lock";
    /// Held by every verb on the VM (they serialize across processes).
    pub const VM_LOCK: &'static str = "vm.lock";
    /// The serial-log sidecar's record.
    pub const CONSOLE_RECORD: &'static str = "console.json";
    /// The socket QEMU writes the console to (served by the serial-log sidecar).
    pub const SERIAL_SOCKET: &'static str = "serial.sock";
    /// Guest serial console.
    pub const SERIAL_LOG: &'static str = "serial.log";
    /// VMM stdout/stderr.
    pub const VMM_LOG: &'static str = "vmm.log";
    /// Host end of the guest agent channel.
    pub const AGENT_SOCKET: &'static str = "agent.sock";
    /// Root overlay of an image VM.
    pub const ROOT_OVERLAY: &'static str = "root.qcow2";
    /// Output of an image VM's main process (the guest's `vmrs.log` port; `vmrs logs`).
    pub const PROCESS_LOG: &'static str = "process.log";
    /// An image VM's main process, run again by a later start (`vmrs start`).
    pub const MAIN: &'static str = "main.json";
    /// Guest RAM of a QEMU VM (`memory-backend-file`, `share=on`).
    pub const MEMORY: &'static str = "memory";
    /// The devices the running VMM was started with.
    pub const DEVICES: &'static str = "devices.json";
    /// The snapshot a restored VM came from.
    pub const ORIGIN: &'static str = "origin.json";
    /// Host network state.
    pub const NET_STATE: &'static str = "net.json";
    /// The virtiofsd sidecars of the VM's shared directories (see [`crate::virtiofs`]).
    pub const VIRTIOFSD_RECORD: &'static str = "virtiofsd.json";
    /// What the virtiofsd sidecars print.
    pub const VIRTIOFSD_LOG: &'static str = "virtiofsd.log";
    /// The `vhost-device-vsock` sidecar of a QEMU VM with a vsock agent (see [`crate::vsock`]).
    pub const VSOCK_RECORD: &'static str = "vsock.json";
    /// What the vsock sidecar prints.
    pub const VSOCK_LOG: &'static str = "vsock.log";
    /// The vsock sidecar's vhost-user socket (QEMU connects to it).
    pub const VSOCK_VHOST_SOCKET: &'static str = "vsock-vhost.sock";
    /// QEMU's QMP command socket.
    pub const QMP_SOCKET: &'static str = "qmp.sock";
    /// QEMU's QMP event socket.
    pub const QMP_EVENTS_SOCKET: &'static str = "qmp-events.sock";
    /// Cloud Hypervisor's API socket.
    pub const CH_API_SOCKET: &'static str = "ch-api.sock";
    /// Cloud Hypervisor's event monitor file.
    pub const CH_EVENTS: &'static str = "ch-events.json";
    /// Cloud Hypervisor's log.
    pub const CH_LOG: &'static str = "ch.log";
    /// Written before the Cloud Hypervisor driver asks the VMM to exit.
    pub const CH_QUIT_MARKER: &'static str = "ch-quit-requested";
    /// Which backend the VM was started on and why.
    pub const BACKEND_CHOICE: &'static str = "backend.json";
    /// Firecracker's API socket.
    pub const FC_API_SOCKET: &'static str = "fc-api.sock";
    /// Firecracker's log (its `--log-path`).
    pub const FC_LOG: &'static str = "fc.log";
    /// Written before the Firecracker driver kills the VMM on request.
    pub const FC_QUIT_MARKER: &'static str = "fc-quit-requested";
    /// A bzImage unpacked to an ELF for Cloud Hypervisor.
    pub const VMLINUX: &'static str = "vmlinux";

    /// Sockets a VMM creates in the directory (removed once it is gone).
    pub const VMM_SOCKETS: &'static [&'static str] = &[
        Self::QMP_SOCKET,
        Self::QMP_EVENTS_SOCKET,
        Self::CH_API_SOCKET,
        Self::FC_API_SOCKET,
        Self::AGENT_SOCKET,
    ];

    /// The directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        VmDir { path: path.into() }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The socket of switch port / NIC `index` (`net<index>.sock`).
    pub fn nic_socket(&self, index: usize) -> PathBuf {
        self.path.join(format!("net{index}.sock"))
    }

    /// A restored VM's overlay over the snapshot disk `id` (`disk-<id>.qcow2`).
    pub fn disk_overlay(&self, id: &str) -> PathBuf {
        self.path.join(format!("disk-{id}.qcow2"))
    }

    /// The vhost-user socket of shared directory `index` (`fs<index>.sock`), served by its
    /// virtiofsd.
    pub fn fs_socket(&self, index: usize) -> PathBuf {
        self.path.join(format!("fs{index}.sock"))
    }

    /// Remove the sockets a VMM that is gone left behind, and its guest RAM file (missing ones
    /// are fine).
    pub fn remove_vmm_sockets(&self) {
        for s in Self::VMM_SOCKETS {
            let _ = std::fs::remove_file(self.file(s));
        }
        let _ = std::fs::remove_file(self.file(Self::MEMORY));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_sockets_fit() {
        let names = [
            VmDir::CONFIG,
            VmDir::STATE,
            VmDir::START,
            VmDir::LIVE,
            VmDir::EXIT_REQUEST,
            VmDir::START_LOCK,
            VmDir::VM_LOCK,
            VmDir::CONSOLE_RECORD,
            VmDir::SERIAL_SOCKET,
            VmDir::SERIAL_LOG,
            VmDir::VMM_LOG,
            VmDir::AGENT_SOCKET,
            VmDir::ROOT_OVERLAY,
            VmDir::PROCESS_LOG,
            VmDir::NET_STATE,
            VmDir::QMP_SOCKET,
            VmDir::QMP_EVENTS_SOCKET,
            VmDir::CH_API_SOCKET,
            VmDir::CH_EVENTS,
            VmDir::CH_LOG,
            VmDir::CH_QUIT_MARKER,
            VmDir::BACKEND_CHOICE,
            VmDir::FC_API_SOCKET,
            VmDir::FC_LOG,
            VmDir::FC_QUIT_MARKER,
            VmDir::VMLINUX,
            VmDir::MEMORY,
            VmDir::DEVICES,
            VmDir::ORIGIN,
            VmDir::VIRTIOFSD_RECORD,
            VmDir::VIRTIOFSD_LOG,
            VmDir::VSOCK_RECORD,
            VmDir::VSOCK_LOG,
            VmDir::VSOCK_VHOST_SOCKET,
        ];
        let set: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(set.len(), names.len());
        let d = VmDir::new("/v");
        assert_eq!(d.nic_socket(3), Path::new("/v/net3.sock"));
        assert_eq!(d.fs_socket(2), Path::new("/v/fs2.sock"));
        assert_eq!(d.file(VmDir::STATE), Path::new("/v/state.json"));
    }

    #[test]
    fn vmm_sockets_are_removed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let d = VmDir::new(tmp.path());
        std::fs::write(d.file(VmDir::QMP_SOCKET), b"").expect("w");
        std::fs::write(d.file(VmDir::STATE), b"{}").expect("w");
        d.remove_vmm_sockets();
        assert!(!d.file(VmDir::QMP_SOCKET).exists());
        assert!(d.file(VmDir::STATE).exists());
    }
}
