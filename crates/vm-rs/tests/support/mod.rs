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
pub mod hybrid_vsock;
pub mod net_guest;
pub mod netns;
pub mod oci_layout;
pub mod pvh_guest;
pub mod qemu;
pub mod registry;
pub mod registry_auth;

pub use hybrid_vsock::serve_hybrid_vsock;
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

/// Run `script` with `sh -c` in `vm` through the agent; its trimmed stdout (the exit must be 0).
pub async fn sh(mgr: &vm_rs::VmManager, vm: &str, script: &str) -> String {
    let out = mgr
        .exec(vm, vm_rs::agent::ExecCommand::new(["sh", "-c", script]))
        .await
        .unwrap_or_else(|e| panic!("exec in {vm}: {e:?}"));
    assert!(
        out.status.success(),
        "{vm}: {script}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
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

/// Through the manager, on a backend without user-mode networking of its own (Cloud
/// Hypervisor, Firecracker): `config` (whose one network is the default user-mode NIC with
/// `published` published) gets `slirp4netns`: recorded as such, the VMM runs in the VM's own
/// namespace, where its TAP and the sidecar's share a bridge; the port is open on the host;
/// stop leaves no sidecar, namespace or open port.
pub async fn manager_user_network(config: vm_rs::VmConfig, published: u16) {
    use vm_rs::config::{NetworkAttachment, UserNat};
    let home = TestHome::new();
    let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager");
    let name = config.name.clone();
    mgr.start(config).await.expect("start");
    mgr.wait_ready(&name, Duration::from_secs(20))
        .await
        .expect("ready");
    let dir = mgr.vm_dir(&name);
    let recorded: vm_rs::VmConfig =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config")).expect("json");
    assert!(
        matches!(
            recorded.networks.as_slice(),
            [NetworkAttachment::User {
                via: UserNat::Slirp4netns,
                ..
            }]
        ),
        "{:?}",
        recorded.networks
    );
    let net = vm_rs::net::NetState::load(&dir)
        .expect("net.json")
        .expect("state");
    let sidecar = net.slirp.first().cloned().expect("slirp4netns record");
    assert!(sidecar.is_alive());
    let ns_file = dir.join("netns");
    assert_eq!(net.netns.as_deref(), Some(ns_file.as_path()));
    let handle = mgr.handle(&name).await.expect("handle").expect("live");
    use std::os::unix::fs::MetadataExt;
    let vmm_ns = std::fs::metadata(format!("/proc/{}/ns/net", handle.pid)).expect("vmm ns");
    let file_ns = std::fs::metadata(&ns_file).expect("ns file");
    assert_eq!(
        (vmm_ns.dev(), vmm_ns.ino()),
        (file_ns.dev(), file_ns.ino()),
        "vmm not in the vm's namespace"
    );
    let mine = std::fs::metadata("/proc/self/ns/net").expect("own ns");
    assert_ne!(mine.ino(), vmm_ns.ino());
    // inside: the VM's TAP and the sidecar's on one bridge
    let tap = match &net.nics[0].backend {
        vm_rs::net::NicBackend::Tap { ifname, .. } => ifname.clone(),
        other => panic!("{other:?}"),
    };
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns_file.display()))
        .args(["ip", "-o", "link", "show", "master", vm_rs::net::slirp::BRIDGE])
        .output()
        .expect("ip");
    let links = String::from_utf8_lossy(&out.stdout);
    assert!(
        links.contains(&format!(" {tap}:")) && links.contains(&format!(" {}:", vm_rs::net::slirp::SLIRP_TAP)),
        "{links}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::net::TcpStream::connect(("127.0.0.1", published))
        .await
        .expect("published port is open");
    // a new manager (as in a new process) stops it and removes what the network made
    let restart_config = recorded.clone();
    drop(mgr);
    let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager 2");
    mgr.stop(&name, Duration::from_secs(1)).await.expect("stop");
    assert!(!sidecar.is_alive(), "slirp4netns still running");
    assert!(!ns_file.exists(), "namespace file left");
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", published))
        .await
        .is_err());
    mgr.remove(&name, false).await.expect("rm");
    // kill -9 of the VMM: the VM fails, and its network goes with it
    let mut second = restart_config;
    second.name = format!("{name}-2");
    second.serial_log = None;
    let name = second.name.clone();
    mgr.start(second).await.expect("start 2");
    mgr.wait_ready(&name, Duration::from_secs(20))
        .await
        .expect("ready 2");
    let dir = mgr.vm_dir(&name);
    let sidecar = vm_rs::net::NetState::load(&dir)
        .expect("net.json")
        .and_then(|n| n.slirp.first().cloned())
        .expect("slirp4netns record");
    let handle = mgr.handle(&name).await.expect("handle").expect("live");
    vm_rs::process::VmmProcess::attach(handle.pid, handle.start_time)
        .expect("attach")
        .kill()
        .expect("kill -9");
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        let st = mgr.state(&name).await.expect("state");
        if !st.is_live() || Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(matches!(st, vm_rs::VmState::Failed { .. }), "{st:?}");
    let gone = wait_until(Duration::from_secs(10), || !sidecar.is_alive()).await;
    assert!(gone, "slirp4netns outlived its vmm");
    assert!(!dir.join("netns").exists(), "namespace file left after the crash");
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", published))
        .await
        .is_err());
    // kill -9 of the sidecar while the VM runs: the VM runs on (without a network), and
    // `rm --force` still takes everything
    let mut third = recorded.clone();
    third.name = format!("{name}-3");
    third.serial_log = None;
    let name = third.name.clone();
    mgr.start(third).await.expect("start 3");
    mgr.wait_ready(&name, Duration::from_secs(20))
        .await
        .expect("ready 3");
    let dir = mgr.vm_dir(&name);
    let sidecar = vm_rs::net::NetState::load(&dir)
        .expect("net.json")
        .and_then(|n| n.slirp.first().cloned())
        .expect("slirp4netns record");
    let handle = mgr.handle(&name).await.expect("handle").expect("live");
    vm_rs::process::VmmProcess::attach(sidecar.pid, sidecar.start_time)
        .expect("attach sidecar")
        .kill()
        .expect("kill -9 sidecar");
    assert!(wait_until(Duration::from_secs(10), || !sidecar.is_alive()).await);
    assert!(mgr.state(&name).await.expect("state").is_live());
    mgr.remove(&name, true).await.expect("rm --force");
    assert!(!alive(handle.pid, handle.start_time), "vmm left");
    assert!(!dir.exists(), "vm directory left");
}

/// A free TCP port on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
