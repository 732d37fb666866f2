//! Driver- and manager-level scenarios for the Firecracker backend, run both against the real
//! binary (`vm_fc_real`, when it is installed) and against the protocol peer (`fc_driver`,
//! always).
//!
//! Every scenario boots the tiny PVH guest from [`super::pvh_guest`] in its own temporary VM
//! directory; [`Vmm`] kills the VMM when the scenario ends, passing or failing.

use std::path::{Path, PathBuf};
use std::time::Duration;
use vm_rs::config::{DiskConfig, VmConfig};
use vm_rs::driver::firecracker::FirecrackerDriver;
use vm_rs::driver::http::{ApiClient, Method};
use vm_rs::driver::{BootSpec, DriverError, VmDriver, VmHandle, VmmEvent, VmmStatus};
use vm_rs::process::VmmProcess;

pub use super::ch_flows::{wait_state, Flow, Vmm};
pub use super::wait_until;

/// A temporary VM directory, the guest image and a driver for `binary`.
pub struct Fixture {
    /// Keeps the directory alive.
    pub tmp: tempfile::TempDir,
    /// The VM directory.
    pub vm_dir: PathBuf,
    /// The PVH guest ELF.
    pub guest: PathBuf,
    /// The binary.
    pub binary: PathBuf,
    /// Driver under test.
    pub driver: FirecrackerDriver,
}

impl Fixture {
    /// New fixture; the temp dir is short so socket paths stay under the limit.
    pub fn new(binary: &Path) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("vmrs-fc")
            .tempdir_in("/tmp")
            .expect("tmp");
        let vm_dir = tmp.path().join("vm");
        std::fs::create_dir(&vm_dir).expect("vm dir");
        let guest = super::pvh_guest::write(tmp.path());
        Self {
            vm_dir,
            guest,
            binary: binary.to_path_buf(),
            driver: FirecrackerDriver::with_binary(binary),
            tmp,
        }
    }

    /// A config booting the guest.
    pub fn config(&self) -> VmConfig {
        VmConfig::builder("fctest")
            .kernel(&self.guest)
            .memory_mib(128)
            .build_unchecked()
    }

    /// Serial log path.
    pub fn serial(&self) -> PathBuf {
        self.vm_dir.join("serial.log")
    }

    /// The API socket of the VM directory.
    pub fn api_socket(&self) -> PathBuf {
        self.vm_dir.join(vm_rs::driver::firecracker::API_SOCKET)
    }

    /// Boot spec for `config`, with the devices the manager would give it.
    pub fn spec<'a>(&'a self, config: &'a VmConfig) -> BootSpec<'a> {
        let devices = vm_rs::manager::plan_devices(
            config,
            &self.vm_dir,
            self.tmp.path(),
            &vm_rs::manager::StartOptions::default(),
            &self.driver,
        )
        .expect("devices");
        BootSpec {
            config,
            vm_dir: &self.vm_dir,
            serial_log: self.serial(),
            vmm_log: self.vm_dir.join("vmm.log"),
            devices,
            guest_params: Vec::new(),
        }
    }

    /// Boot the default config.
    pub async fn boot(&self) -> Vmm {
        let cfg = self.config();
        Vmm(Some(self.driver.boot(&self.spec(&cfg)).await.expect("boot")))
    }

    /// Wait for the readiness marker on the serial console.
    pub async fn wait_ready(&self) -> std::net::IpAddr {
        let serial = self.serial();
        let mut ip = None;
        let ok = wait_until(Duration::from_secs(20), || {
            ip = vm_rs::console::scan_log(&serial).ok().flatten();
            ip.is_some()
        })
        .await;
        assert!(ok, "no VMRS_READY on the serial console");
        ip.expect("ip")
    }

    /// A bare VMM with nothing configured (as the driver starts it, before any call), and a
    /// client for its API.
    pub async fn bare(&self) -> (BareVmm, ApiClient) {
        let log = self.vm_dir.join("bare.log");
        std::fs::write(&log, b"").expect("log");
        let sock = self.vm_dir.join("bare.sock");
        let child = std::process::Command::new(&self.binary)
            .arg("--api-sock")
            .arg(&sock)
            .arg("--log-path")
            .arg(&log)
            .arg("--level")
            .arg("Info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        let api = ApiClient::new(&sock, Duration::from_secs(5)).for_vmm("firecracker");
        let up = wait_until(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        })
        .await;
        assert!(up, "the api socket never came up");
        (BareVmm(child), api)
    }
}

/// A VMM started by [`Fixture::bare`], killed on drop.
pub struct BareVmm(pub std::process::Child);

impl Drop for BareVmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `fault_message` of an error answer.
pub fn fault(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body).expect("json error body")["fault_message"]
        .as_str()
        .expect("fault_message")
        .to_string()
}

/// Boot → ready: the guest prints its marker through the capped serial log, the VMM says
/// running, and its configuration is what the driver sent.
pub async fn boot_ready(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let vmm = fx.boot().await;
    assert_eq!(fx.wait_ready().await.to_string(), "10.0.0.2");
    let h = vmm.handle();
    assert_eq!(fx.driver.status(h).await.expect("status"), VmmStatus::Running);
    let info = fx.driver.info(h).await.expect("info");
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["machine-config"]["mem_size_mib"], 128);
    assert_eq!(info["config"]["machine-config"]["vcpu_count"], 1);
    assert!(info["config"]["boot-source"]["boot_args"]
        .as_str()
        .expect("boot args")
        .starts_with("console=ttyS0 reboot=k panic=1"));
    // the console went through the sidecar: its record is there
    assert!(fx.vm_dir.join("console.json").is_file());
    assert_eq!(h.backend, vm_rs::BackendKind::Firecracker);
}

/// Pause/resume over `PATCH /vm` (pausing twice is fine in Firecracker).
pub async fn pause_resume(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let vmm = fx.boot().await;
    let h = vmm.handle();
    fx.driver.pause(h).await.expect("pause");
    assert_eq!(fx.driver.status(h).await.expect("status"), VmmStatus::Paused);
    fx.driver.pause(h).await.expect("pause again");
    fx.driver.resume(h).await.expect("resume");
    assert_eq!(fx.driver.status(h).await.expect("status"), VmmStatus::Running);
}

/// After `InstanceStart`, the pre-boot calls are refused with the VMM's reason.
pub async fn preboot_calls_after_start_are_refused(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let vmm = fx.boot().await;
    let api = ApiClient::new(&vmm.handle().api_socket, Duration::from_secs(5));
    for (path, body) in [
        ("/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 256}"#),
        (
            "/boot-source",
            &*format!(r#"{{"kernel_image_path": "{}"}}"#, fx.guest.display()),
        ),
        ("/actions", r#"{"action_type": "InstanceStart"}"#),
    ] {
        let r = api
            .request(Method::Put, path, Some(body.as_bytes()))
            .await
            .expect("request");
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(
            fault(&r.body),
            "The requested operation is not supported after starting the microVM.",
            "{path}"
        );
    }
    // and the VM runs on
    assert_eq!(
        fx.driver.status(vmm.handle()).await.expect("status"),
        VmmStatus::Running
    );
}

/// Bodies the VMM refuses: unknown, mistyped and missing fields, mismatched ids, bad ids,
/// empty bodies, unknown paths, runtime calls before the start.
pub async fn bad_bodies_are_refused(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let (_vmm, api) = fx.bare().await;
    let img = fx.tmp.path().join("d.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 20))
        .expect("img");
    let drive = |id: &str, extra: &str| {
        format!(
            r#"{{"drive_id": "{id}", "is_root_device": false, "path_on_host": "{}", "is_read_only": false{extra}}}"#,
            img.display()
        )
    };
    let cases: Vec<(Method, &str, Option<String>, &str)> = vec![
        (
            Method::Put,
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 128, "turbo": true}"#.into()),
            "unknown field `turbo`",
        ),
        (
            Method::Put,
            "/machine-config",
            Some(r#"{"vcpu_count": "two", "mem_size_mib": 128}"#.into()),
            "invalid type",
        ),
        (
            Method::Put,
            "/machine-config",
            Some(r#"{"vcpu_count": 1}"#.into()),
            "missing field `mem_size_mib`",
        ),
        (
            Method::Put,
            "/drives/disk0",
            Some(drive("disk1", "")),
            "does not match",
        ),
        (
            Method::Put,
            "/drives/disk-0",
            Some(drive("disk-0", "")),
            "alphanumeric characters and underscores",
        ),
        (
            Method::Put,
            "/drives/disk0",
            Some(drive("disk0", r#", "serial": "x""#)),
            "unknown field `serial`",
        ),
        (
            Method::Put,
            "/drives/disk0",
            Some(drive("disk0", r#", "cache_type": "None""#)),
            "unknown variant `None`",
        ),
        (
            Method::Put,
            "/actions",
            Some(r#"{"action_type": "Reboot"}"#.into()),
            "unknown variant `Reboot`",
        ),
        (Method::Put, "/actions", None, "Empty PUT request."),
        (
            Method::Put,
            "/frobnicate",
            Some("{}".into()),
            "Invalid request method and/or path",
        ),
        (
            Method::Patch,
            "/vm",
            Some(r#"{"state": "Paused"}"#.into()),
            "not supported before starting the microVM",
        ),
        (
            Method::Put,
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#.into()),
            "not supported before starting the microVM",
        ),
        (
            Method::Put,
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#.into()),
            "without kernel configuration",
        ),
        (
            Method::Put,
            "/boot-source",
            Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#.into()),
            "kernel file cannot be opened",
        ),
    ];
    for (method, path, body, want) in cases {
        let r = api
            .request(method, path, body.as_deref().map(str::as_bytes))
            .await
            .expect("request");
        assert_eq!(r.status, 400, "{method:?} {path} {body:?}");
        let msg = fault(&r.body);
        assert!(msg.contains(want), "{method:?} {path} {body:?}: {msg}");
    }
    // a good body is accepted, and the VMM still answers
    let r = api
        .request(Method::Put, "/drives/disk0", Some(drive("disk0", "").as_bytes()))
        .await
        .expect("request");
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    // with a drive configured, a snapshot can no longer be loaded into this VMM
    let load = format!(
        r#"{{"snapshot_path": "{0}", "mem_backend": {{"backend_type": "File", "backend_path": "{0}"}}}}"#,
        img.display()
    );
    let r = api
        .request(Method::Put, "/snapshot/load", Some(load.as_bytes()))
        .await
        .expect("request");
    assert_eq!(r.status, 400);
    assert!(
        fault(&r.body).contains("not allowed after configuring boot-specific resources"),
        "{}",
        fault(&r.body)
    );
    let r = api.request(Method::Get, "/", None).await.expect("request");
    assert_eq!(r.status, 200);
    let info: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(info["state"], "Not started");
}

/// Graceful stop: Ctrl-Alt-Del is accepted (the tiny guest has no keyboard driver and keeps
/// running), then the VMM is killed on request; its exit reads as asked for.
pub async fn stop(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let mut vmm = fx.boot().await;
    fx.wait_ready().await;
    let h = vmm.handle().clone();
    fx.driver.request_shutdown(&h).await.expect("ctrl-alt-del");
    assert_eq!(fx.driver.status(&h).await.expect("status"), VmmStatus::Running);
    fx.driver.quit(&h).await.expect("quit");
    vmm.wait_exit().await;
    assert!(matches!(
        fx.driver.exit_reason(&h).await.expect("reason"),
        Some(VmmEvent::Shutdown { guest: false, .. })
    ));
    assert!(matches!(
        fx.driver.status(&h).await,
        Err(DriverError::Connect { .. })
    ));
    // the console sidecar finished the log and went away with the VMM
    assert!(vm_rs::console::capture::wait_done(&fx.vm_dir, Duration::from_secs(10)).await);
}

/// Kill -9 from outside: the log has no exit record, which is a failure.
pub async fn kill_is_failure(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let mut vmm = fx.boot().await;
    let h = vmm.handle().clone();
    VmmProcess::attach(h.pid, h.start_time)
        .expect("attach")
        .kill()
        .expect("kill");
    vmm.wait_exit().await;
    match fx.driver.exit_reason(&h).await.expect("reason") {
        Some(VmmEvent::Error { reason }) => assert!(reason.contains("killed or crashed"), "{reason}"),
        other => panic!("expected error, got {other:?}"),
    }
}

/// The guest resets itself (i8042): Firecracker exits 0 by itself, and the exit reads as the
/// guest's own shutdown.
pub async fn guest_reset(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let mut cfg = fx.config();
    cfg.kernel = super::pvh_guest::write_reset(fx.tmp.path());
    let mut vmm = Vmm(Some(fx.driver.boot(&fx.spec(&cfg)).await.expect("boot")));
    vmm.wait_exit().await;
    assert!(vm_rs::console::capture::wait_done(&fx.vm_dir, Duration::from_secs(10)).await);
    assert_eq!(fx.wait_ready().await.to_string(), "10.0.0.2");
    let h = vmm.handle().clone();
    assert!(
        matches!(
            fx.driver.exit_reason(&h).await.expect("reason"),
            Some(VmmEvent::Shutdown { guest: true, .. })
        ),
        "{}",
        std::fs::read_to_string(fx.vm_dir.join("fc.log")).unwrap_or_default()
    );
}

/// The serial console goes through the capped log: a cap smaller than the guest's output
/// keeps the head, a marker and the tail, and never more than the cap allows.
pub async fn serial_log_is_capped(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let mut cfg = fx.config();
    cfg.kernel = super::pvh_guest::write_reset(fx.tmp.path());
    cfg.serial_log_max = Some(8);
    let mut vmm = Vmm(Some(fx.driver.boot(&fx.spec(&cfg)).await.expect("boot")));
    vmm.wait_exit().await;
    assert!(vm_rs::console::capture::wait_done(&fx.vm_dir, Duration::from_secs(10)).await);
    let log = std::fs::read_to_string(fx.serial()).expect("serial log");
    assert!(log.starts_with("VMRS_REA"), "{log}");
    assert!(log.contains(vm_rs::console::capture::CAPPED_MARKER), "{log}");
    assert!(log.len() as u64 <= 8 + vm_rs::console::capture::MAX_SLACK);
}

/// Reattach: a new driver (as in a new process) drives the VM from the persisted handle.
pub async fn reattach(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let vmm = fx.boot().await;
    let json = serde_json::to_string(vmm.handle()).expect("persist");
    let handle: VmHandle = serde_json::from_str(&json).expect("load");
    let driver = vm_rs::driver::driver_for(vm_rs::BackendKind::Firecracker).expect("driver");
    let mut process = VmmProcess::attach(handle.pid, handle.start_time).expect("attach");
    assert_eq!(driver.status(&handle).await.expect("status"), VmmStatus::Running);
    driver.pause(&handle).await.expect("pause");
    assert_eq!(
        fx.driver.status(vmm.handle()).await.expect("status"),
        VmmStatus::Paused
    );
    driver.resume(&handle).await.expect("resume");
    driver.quit(&handle).await.expect("quit");
    let exited = tokio::time::timeout(Duration::from_secs(20), process.wait()).await;
    assert!(exited.is_ok(), "vmm did not exit after quit");
    assert!(matches!(
        driver.exit_reason(&handle).await.expect("reason"),
        Some(VmmEvent::Shutdown { guest: false, .. })
    ));
}

/// A disk the VMM cannot open: a clear error naming the call, and neither the VMM nor the
/// console sidecar left running.
pub async fn bad_disk_is_clear_error(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let mut cfg = fx.config();
    cfg.disks.push(DiskConfig::new(fx.tmp.path().join("missing.img")));
    let err = fx.driver.boot(&fx.spec(&cfg)).await.expect_err("boot must fail");
    match &err {
        DriverError::Command { command, message } => {
            assert_eq!(command, "PUT /drives/disk0");
            assert!(
                message.starts_with("400 bad request: Drive config error"),
                "{message}"
            );
        }
        other => panic!("expected an api error, got {other:?}"),
    }
    assert!(std::os::unix::net::UnixStream::connect(fx.api_socket()).is_err());
    assert!(vm_rs::console::capture::wait_done(&fx.vm_dir, Duration::from_secs(10)).await);
    assert!(
        !fx.vm_dir.join("console.json").exists(),
        "console sidecar record left behind"
    );
}

/// A kernel that is neither ELF nor bzImage is refused before any VMM starts.
pub async fn bad_kernel_is_clear_error(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let junk = fx.tmp.path().join("junk");
    std::fs::write(&junk, b"not a kernel at all, just text").expect("write");
    let mut cfg = fx.config();
    cfg.kernel = junk;
    let err = fx.driver.boot(&fx.spec(&cfg)).await.expect_err("boot must fail");
    assert!(err.to_string().contains("not a bzImage or ELF kernel"), "{err}");
    assert!(!fx.api_socket().exists());
}

/// Snapshot: refused while running, made once paused; restore loads it into a new VMM that
/// runs; a directory without a snapshot is a clear error.
pub async fn snapshot_restore(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let vmm = fx.boot().await;
    let h = vmm.handle();
    fx.wait_ready().await;
    let snap = fx.tmp.path().join("snap");
    match fx.driver.snapshot(h, &snap).await {
        Err(DriverError::Command { command, message }) => {
            assert_eq!(command, "PUT /snapshot/create");
            assert!(message.contains("unavailable while running"), "{message}");
        }
        other => panic!("snapshot of a running vm should fail, got {other:?}"),
    }
    fx.driver.pause(h).await.expect("pause");
    fx.driver.snapshot(h, &snap).await.expect("snapshot");
    assert!(snap.join("vmstate").is_file() && snap.join("memory").is_file());
    fx.driver.quit(h).await.expect("quit");

    let fx2 = Fixture::new(&bin);
    let cfg = fx2.config();
    let restored = Vmm(Some(
        fx2.driver.restore(&fx2.spec(&cfg), &snap).await.expect("restore"),
    ));
    assert_eq!(
        fx2.driver.status(restored.handle()).await.expect("status"),
        VmmStatus::Running
    );
    let info = fx2.driver.info(restored.handle()).await.expect("info");
    assert_eq!(info["config"]["machine-config"]["mem_size_mib"], 128);
    let missing = fx2
        .driver
        .restore(&fx2.spec(&cfg), &fx2.tmp.path().join("nothing"))
        .await;
    assert!(matches!(missing, Err(DriverError::Io { .. })), "{missing:?}");
}

/// Every driver scenario shared by the peer and the real binary, by name.
/// A VM asked for the guest agent gets Firecracker's vsock device (`PUT /vsock`), whose
/// hybrid-vsock socket (the VM's `agent.sock`) the host agent client connects to; no agent
/// listens in the PVH test guest, so the handshake fails clearly instead of hanging.
pub async fn agent_vsock_device(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let mut cfg = fx.config();
    cfg.agent_transport = Some(vm_rs::devices::AgentTransport::Vsock);
    let vmm = Vmm(Some(fx.driver.boot(&fx.spec(&cfg)).await.expect("boot")));
    let info = fx.driver.info(vmm.handle()).await.expect("info");
    let socket = fx.vm_dir.join("agent.sock");
    assert_eq!(info["config"]["vsock"]["guest_cid"], 3, "{info}");
    assert_eq!(
        info["config"]["vsock"]["uds_path"],
        socket.to_string_lossy().as_ref(),
        "{info}"
    );
    let mut stream = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("the VMM serves the hybrid-vsock socket");
    let r = vm_rs::agent::hybrid::connect(
        &mut stream,
        vmrs_proto::VSOCK_PORT,
        std::time::Duration::from_secs(10),
    )
    .await;
    assert!(r.is_err(), "no agent listens in this guest: {r:?}");
}

pub fn shared() -> Vec<(&'static str, Flow)> {
    vec![
        ("agent_vsock_device", |b| Box::pin(agent_vsock_device(b))),
        ("boot_ready", |b| Box::pin(boot_ready(b))),
        ("pause_resume", |b| Box::pin(pause_resume(b))),
        ("preboot_calls_after_start_are_refused", |b| {
            Box::pin(preboot_calls_after_start_are_refused(b))
        }),
        ("bad_bodies_are_refused", |b| Box::pin(bad_bodies_are_refused(b))),
        ("stop", |b| Box::pin(stop(b))),
        ("kill_is_failure", |b| Box::pin(kill_is_failure(b))),
        ("guest_reset", |b| Box::pin(guest_reset(b))),
        ("serial_log_is_capped", |b| Box::pin(serial_log_is_capped(b))),
        ("reattach", |b| Box::pin(reattach(b))),
        ("bad_disk_is_clear_error", |b| {
            Box::pin(bad_disk_is_clear_error(b))
        }),
        ("bad_kernel_is_clear_error", |b| {
            Box::pin(bad_kernel_is_clear_error(b))
        }),
        ("snapshot_restore", |b| Box::pin(snapshot_restore(b))),
    ]
}

/// Through the manager: the default user-mode network with a published port runs through
/// slirp4netns (see [`super::manager_user_network`]).
pub async fn manager_user_network(bin: PathBuf) {
    let _ = bin;
    let home = super::TestHome::new();
    let guest = super::pvh_guest::write(home.path());
    let port = super::free_tcp_port();
    let mut config = manager_config("net", &guest);
    config.networks = vec![vm_rs::config::NetworkAttachment::user(vec![
        vm_rs::config::PortForward::tcp(port, 80),
    ])];
    super::manager_user_network(config, port).await;
}

/// A manager-level config booting the PVH guest on Firecracker.
fn manager_config(name: &str, guest: &Path) -> VmConfig {
    VmConfig::builder(name)
        .kernel(guest)
        .memory_mib(128)
        .backend(vm_rs::BackendKind::Firecracker)
        .build()
        .expect("valid config")
}

/// Through the manager: boot → ready, pause/resume, stop (Ctrl-Alt-Del, then the kill the
/// tiny guest needs), and `inspect` says why this backend runs the VM.
pub async fn manager_lifecycle(bin: PathBuf) {
    let _ = bin;
    let home = super::TestHome::new();
    let guest = super::pvh_guest::write(home.path());
    let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager");
    mgr.start(manager_config("life", &guest)).await.expect("start");
    let ip = mgr
        .wait_ready("life", Duration::from_secs(20))
        .await
        .expect("ready");
    assert_eq!(ip.to_string(), "10.0.0.2");
    let info = mgr.inspect("life").await.expect("inspect");
    assert_eq!(info.backend, vm_rs::BackendKind::Firecracker);
    assert_eq!(info.backend_reason.as_deref(), Some("firecracker: asked for"));
    let handle = mgr.handle("life").await.expect("handle").expect("live");
    mgr.pause("life").await.expect("pause");
    assert_eq!(mgr.state("life").await.expect("state"), vm_rs::VmState::Paused);
    mgr.resume("life").await.expect("resume");
    let st = mgr.stop("life", Duration::from_secs(1)).await.expect("stop");
    assert_eq!(st, vm_rs::VmState::Stopped);
    assert!(!super::alive(handle.pid, handle.start_time), "vmm still running");
    mgr.remove("life", false).await.expect("rm");
}

/// Through the manager: the VMM killed with SIGKILL from outside makes the VM failed.
pub async fn manager_kill9_failed(bin: PathBuf) {
    let _ = bin;
    let home = super::TestHome::new();
    let guest = super::pvh_guest::write(home.path());
    let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager");
    mgr.start(manager_config("k9", &guest)).await.expect("start");
    mgr.wait_ready("k9", Duration::from_secs(20))
        .await
        .expect("ready");
    let handle = mgr.handle("k9").await.expect("handle").expect("live");
    VmmProcess::attach(handle.pid, handle.start_time)
        .expect("attach")
        .kill()
        .expect("kill -9");
    match wait_state(&mgr, "k9", |s| !s.is_live()).await {
        vm_rs::VmState::Failed { reason } => assert!(reason.contains("killed or crashed"), "{reason}"),
        other => panic!("expected failed, got {other}"),
    }
}

/// Through the manager: a guest that resets itself leaves the VM stopped, not failed.
pub async fn manager_guest_reset(bin: PathBuf) {
    let _ = bin;
    let home = super::TestHome::new();
    let guest = super::pvh_guest::write_reset(home.path());
    let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager");
    mgr.start(manager_config("rst", &guest)).await.expect("start");
    let st = wait_state(&mgr, "rst", |s| !s.is_live()).await;
    assert_eq!(st, vm_rs::VmState::Stopped);
}

/// Through the manager: a new manager (as in a new process) reattaches to the running VM and
/// drives it.
pub async fn manager_reattach(bin: PathBuf) {
    let _ = bin;
    let home = super::TestHome::new();
    let guest = super::pvh_guest::write(home.path());
    {
        let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager");
        mgr.start(manager_config("re", &guest)).await.expect("start");
        mgr.wait_ready("re", Duration::from_secs(20))
            .await
            .expect("ready");
    }
    let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager 2");
    assert!(matches!(
        mgr.state("re").await.expect("state"),
        vm_rs::VmState::Ready { .. }
    ));
    mgr.pause("re").await.expect("pause after reattach");
    let handle = mgr.handle("re").await.expect("handle").expect("live");
    let driver = vm_rs::driver::driver_for(vm_rs::BackendKind::Firecracker).expect("driver");
    assert_eq!(driver.status(&handle).await.expect("status"), VmmStatus::Paused);
    mgr.resume("re").await.expect("resume");
    assert_eq!(
        mgr.stop("re", Duration::from_secs(1)).await.expect("stop"),
        vm_rs::VmState::Stopped
    );
}

/// Through the manager: what Firecracker lacks (user-mode NAT of its own, shared directories,
/// qcow2) is refused before anything is created, with the reason; so is the default user-mode
/// network when slirp4netns is missing.
pub async fn manager_refuses_what_firecracker_lacks(bin: PathBuf) {
    let _ = bin;
    let home = super::TestHome::new();
    let guest = super::pvh_guest::write(home.path());
    let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager");
    // the VMM's own user-mode network, asked for by name (the default gets slirp4netns)
    let mut user = manager_config("nat", &guest);
    user.networks = vec![vm_rs::config::NetworkAttachment::User {
        port_forwards: vec![],
        mac: None,
        address: vm_rs::config::GuestAddress::Auto,
        via: vm_rs::config::UserNat::Vmm,
    }];
    let mut share = manager_config("share", &guest);
    share.shared_dirs = vec![vm_rs::config::SharedDir::new(home.path(), "/mnt", "share")];
    let qcow = home.path().join("d.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("1M")
        .status()
        .expect("qemu-img");
    assert!(made.success());
    let mut q = manager_config("qcow", &guest);
    q.disks = vec![DiskConfig::parse(&format!("{},format=qcow2", qcow.display())).expect("disk")];
    for (cfg, want) in [
        (user, "user-mode networking"),
        (share, "shared directories"),
        (q, "qcow2 disks"),
    ] {
        let name = cfg.name.clone();
        let err = mgr.start(cfg).await.expect_err("must be refused");
        let mut msg = err.to_string();
        let mut src = std::error::Error::source(&err);
        while let Some(e) = src {
            msg.push_str(": ");
            msg.push_str(&e.to_string());
            src = e.source();
        }
        assert!(
            msg.contains(&format!("the firecracker backend does not support {want}")),
            "{msg}"
        );
        assert_eq!(err.kind(), vm_rs::ErrorKind::Unsupported, "{msg}");
        assert!(
            !home.path().join("vms").join(&name).exists(),
            "{name} left a directory"
        );
    }
    // no slirp4netns: the default network is refused up front too, naming what is missing
    // (each flow runs in a process of its own under nextest, so the variable stays here)
    std::env::set_var("VMRS_SLIRP4NETNS", home.path().join("no-such-slirp4netns"));
    let mut nat = manager_config("noslirp", &guest);
    nat.networks = vec![vm_rs::config::NetworkAttachment::user(vec![])];
    let err = mgr.start(nat).await.expect_err("refused without slirp4netns");
    std::env::remove_var("VMRS_SLIRP4NETNS");
    let mut msg = err.to_string();
    let mut src = std::error::Error::source(&err);
    while let Some(e) = src {
        msg.push_str(": ");
        msg.push_str(&e.to_string());
        src = e.source();
    }
    assert!(msg.contains("slirp4netns, which was not found"), "{msg}");
    assert_eq!(err.kind(), vm_rs::ErrorKind::NotFound, "{msg}");
    assert!(!home.path().join("vms").join("noslirp").exists());
    assert!(mgr.list().await.expect("list").is_empty());
}

/// The manager-level scenarios (the VMM binary comes from `VMRS_FIRECRACKER`).
pub fn manager() -> Vec<(&'static str, Flow)> {
    vec![
        ("manager_lifecycle", |b| Box::pin(manager_lifecycle(b))),
        ("manager_kill9_failed", |b| Box::pin(manager_kill9_failed(b))),
        ("manager_user_network", |b| Box::pin(manager_user_network(b))),
        ("manager_guest_reset", |b| Box::pin(manager_guest_reset(b))),
        ("manager_reattach", |b| Box::pin(manager_reattach(b))),
        ("manager_refuses_what_firecracker_lacks", |b| {
            Box::pin(manager_refuses_what_firecracker_lacks(b))
        }),
    ]
}
