//! Shared helpers for integration tests: guest assets, isolated data dirs with a guard that
//! kills every VMM the test started (even when the test fails), and `wait_until`.
#![allow(dead_code)]

pub mod ch_flows;
pub mod ch_peer;
pub mod fault_proxy;
pub mod fc_flows;
pub mod fc_peer;
pub mod guest;
pub mod http_peer;
pub mod net_guest;
pub mod netns;
pub mod oci_layout;
pub mod pvh_guest;
pub mod qemu;
pub mod registry;
pub mod registry_auth;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Kernel and initramfs for test guests: `VMRS_TEST_KERNEL`/`VMRS_TEST_INITRAMFS` when set,
/// else the assets dir written by `vmrs setup` (`VMRS_ASSETS`, else the default data dir).
pub fn guest_assets() -> (PathBuf, PathBuf) {
    if let (Some(k), Some(i)) = (
        std::env::var_os("VMRS_TEST_KERNEL"),
        std::env::var_os("VMRS_TEST_INITRAMFS"),
    ) {
        return (k.into(), i.into());
    }
    let dir = std::env::var_os("VMRS_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dirs::data_dir().expect("data dir").join("vmrs").join("assets"));
    let kernel = dir.join("vmlinuz");
    let initramfs = dir.join("initramfs.img");
    assert!(
        kernel.is_file() && initramfs.is_file(),
        "guest assets missing in {}: run `scripts/setup.sh` (or `vmrs setup`) first",
        dir.display()
    );
    (kernel, initramfs)
}

/// An isolated `VMRS_HOME` for one test. Dropping it kills every VMM recorded under it.
pub struct TestHome {
    pub dir: tempfile::TempDir,
}

impl TestHome {
    pub fn new() -> Self {
        // short path: Unix socket paths are limited to 108 bytes
        let dir = tempfile::Builder::new()
            .prefix("vmrs-t")
            .tempdir_in("/tmp")
            .expect("tempdir");
        TestHome { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Every VMM pid recorded as live under this home.
    pub fn recorded_pids(&self) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.path().join("vms")) else {
            return out;
        };
        for e in rd.flatten() {
            let Ok(bytes) = std::fs::read(e.path().join("state.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            if let (Some(pid), Some(st)) = (v["handle"]["pid"].as_u64(), v["handle"]["start_time"].as_u64()) {
                out.push((pid as u32, st));
            }
        }
        out
    }
}

impl Drop for TestHome {
    fn drop(&mut self) {
        for (pid, start) in self.recorded_pids() {
            if let Ok(p) = vm_rs::process::VmmProcess::attach(pid, start) {
                let _ = p.kill();
            }
        }
        // and every sidecar a VM directory owns (virtiofsd, forwarders)
        if let Ok(rd) = std::fs::read_dir(self.path().join("vms")) {
            for e in rd.flatten() {
                vm_rs::process::kill_owned_by(&e.path());
            }
        }
    }
}

/// Poll `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until<F: FnMut() -> bool>(timeout: Duration, mut cond: F) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Is any process alive with this pid and start time?
pub fn alive(pid: u32, start: u64) -> bool {
    vm_rs::process::is_same_process_alive(pid, start)
}

/// A test VM config using the shared guest assets and TCG (this host's KVM is not usable).
pub fn test_config(name: &str) -> vm_rs::VmConfig {
    let (kernel, initramfs) = guest_assets();
    vm_rs::VmConfig::builder(name)
        .kernel(kernel)
        .initramfs(initramfs)
        .memory_mib(256)
        .build()
        .expect("valid test config")
}

/// Generous boot timeout for TCG guests on a loaded 2-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// The hybrid-vsock socket of a VM, as Cloud Hypervisor and Firecracker serve it (for the peers): a host connection says
/// `CONNECT <port>\n`; this peer runs no guest, so nothing listens on any guest port and the
/// connection is closed after the request (what the binary does when the guest refuses).
pub fn serve_hybrid_vsock(socket: &str) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = std::os::unix::net::UnixListener::bind(socket)?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{BufRead, Read};
                let mut line = String::new();
                let _ = std::io::BufReader::new((&conn).take(64)).read_line(&mut line);
                // no guest listener: the connection ends without "OK <port>"
            });
        }
    });
    Ok(())
}
