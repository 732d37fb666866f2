//! Driver-level scenarios for the Cloud Hypervisor backend, run both against the real binary
//! (`vm_ch_real`, when it is installed) and against the protocol peer (`ch_driver`, always).
//!
//! Every scenario boots the tiny PVH guest from [`super::pvh_guest`] in its own temporary VM
//! directory; [`Vmm`] kills the VMM when the scenario ends, passing or failing.

use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vm_rs::config::{DiskConfig, VmConfig};
use vm_rs::driver::cloud_hypervisor::CloudHypervisorDriver;
use vm_rs::driver::{BootSpec, DriverError, Launched, TapNetwork, VmDriver, VmHandle, VmmEvent, VmmStatus};
use vm_rs::process::VmmProcess;

pub use super::wait_until;

/// A scenario: takes the binary to run.
pub type Flow = fn(PathBuf) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// Run `fut` on a fresh multi-threaded runtime.
pub fn block_on<F: std::future::Future<Output = ()>>(fut: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(fut)
}

/// A temporary VM directory, the guest image and a driver for `binary`.
pub struct Fixture {
    /// Keeps the directory alive.
    pub tmp: tempfile::TempDir,
    /// The VM directory.
    pub vm_dir: PathBuf,
    /// The PVH guest ELF.
    pub guest: PathBuf,
    /// Driver under test.
    pub driver: CloudHypervisorDriver,
}

impl Fixture {
    /// New fixture; the temp dir is short so socket paths stay under the limit.
    pub fn new(binary: &Path) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("vmrs-ch")
            .tempdir_in("/tmp")
            .expect("tmp");
        let vm_dir = tmp.path().join("vm");
        std::fs::create_dir(&vm_dir).expect("vm dir");
        let guest = super::pvh_guest::write(tmp.path());
        Self {
            vm_dir,
            guest,
            driver: CloudHypervisorDriver::with_binary(binary),
            tmp,
        }
    }

    /// A config booting the guest.
    pub fn config(&self) -> VmConfig {
        VmConfig::builder("chtest")
            .kernel(&self.guest)
            .memory_mib(128)
            .build_unchecked()
    }

    /// Serial log path.
    pub fn serial(&self) -> PathBuf {
        self.vm_dir.join("serial.log")
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
        let launched = self.driver.boot(&self.spec(&cfg)).await.expect("boot");
        Vmm(Some(launched))
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
}

/// A launched VMM, killed on drop.
pub struct Vmm(pub Option<Launched>);

impl Vmm {
    /// The handle.
    pub fn handle(&self) -> &VmHandle {
        &self.0.as_ref().expect("launched").handle
    }

    /// Wait for the VMM to exit (bounded).
    pub async fn wait_exit(&mut self) {
        let p = &mut self.0.as_mut().expect("launched").process;
        tokio::time::timeout(Duration::from_secs(20), p.wait())
            .await
            .expect("vmm did not exit")
            .expect("wait");
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(l) = self.0.take() {
            let _ = l.process.kill();
        }
    }
}

async fn next_event(stream: &mut vm_rs::driver::EventStream) -> VmmEvent {
    tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("event timeout")
        .expect("event stream ended")
}

/// Boot → ready: the guest prints its marker, the VMM says running.
pub async fn boot_ready(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let vmm = fx.boot().await;
    assert_eq!(fx.wait_ready().await.to_string(), "10.0.0.2");
    assert_eq!(
        fx.driver.status(vmm.handle()).await.expect("status"),
        VmmStatus::Running
    );
    let info = fx.driver.info(vmm.handle()).await.expect("info");
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["memory"]["size"], 128u64 << 20);
}

/// A VM asked for the guest agent gets Cloud Hypervisor's vsock device, whose hybrid-vsock
/// socket (the VM's `agent.sock`) the host agent client connects to; with no agent listening
/// in this guest (the PVH test guest has none), the handshake fails with a clear error rather
/// than hanging.
pub async fn agent_vsock_device(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let mut cfg = fx.config();
    cfg.agent_transport = Some(vm_rs::devices::AgentTransport::Vsock);
    let vmm = Vmm(Some(fx.driver.boot(&fx.spec(&cfg)).await.expect("boot")));
    let info = fx.driver.info(vmm.handle()).await.expect("info");
    let socket = fx.vm_dir.join("agent.sock");
    assert_eq!(info["config"]["vsock"]["cid"], 3, "{info}");
    assert_eq!(
        info["config"]["vsock"]["socket"],
        socket.to_string_lossy().as_ref(),
        "{info}"
    );
    let mut stream = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("the VMM serves the hybrid-vsock socket");
    let t = std::time::Instant::now();
    let r = vm_rs::agent::hybrid::connect(
        &mut stream,
        vmrs_proto::VSOCK_PORT,
        std::time::Duration::from_secs(10),
    )
    .await;
    assert!(r.is_err(), "no agent listens in this guest: {r:?}");
    assert!(t.elapsed() < std::time::Duration::from_secs(11));
}

/// Pause/resume, the wrong-state error, and the matching events.
pub async fn pause_resume(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let vmm = fx.boot().await;
    let h = vmm.handle();
    let mut events = fx.driver.events(h).await.expect("events");
    fx.driver.pause(h).await.expect("pause");
    assert_eq!(fx.driver.status(h).await.expect("status"), VmmStatus::Paused);
    assert_eq!(next_event(&mut events).await, VmmEvent::Paused);
    match fx.driver.pause(h).await {
        Err(DriverError::Command { command, message }) => {
            assert_eq!(command, "vm.pause");
            assert!(message.contains("could not be paused"), "{message}");
        }
        other => panic!("second pause should fail, got {other:?}"),
    }
    fx.driver.resume(h).await.expect("resume");
    assert_eq!(fx.driver.status(h).await.expect("status"), VmmStatus::Running);
    assert_eq!(next_event(&mut events).await, VmmEvent::Resumed);
}

/// Graceful stop: the power button is accepted (the tiny guest has no ACPI driver and keeps
/// running), then the VMM is asked to quit; it exits and says it was asked to.
pub async fn stop(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let mut vmm = fx.boot().await;
    fx.wait_ready().await;
    let h = vmm.handle().clone();
    let mut events = fx.driver.events(&h).await.expect("events");
    fx.driver.request_shutdown(&h).await.expect("power button");
    assert_eq!(fx.driver.status(&h).await.expect("status"), VmmStatus::Running);
    fx.driver.quit(&h).await.expect("quit");
    vmm.wait_exit().await;
    match next_event(&mut events).await {
        VmmEvent::Shutdown { guest: false, .. } => {}
        other => panic!("expected requested shutdown, got {other:?}"),
    }
    assert!(matches!(
        fx.driver.exit_reason(&h).await.expect("reason"),
        Some(VmmEvent::Shutdown { guest: false, .. })
    ));
    assert!(matches!(
        fx.driver.status(&h).await,
        Err(DriverError::Connect { .. })
    ));
}

/// Kill -9 from outside: the VMM vanishes without a `vmm shutdown` record, which is a failure.
pub async fn kill_is_failure(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let mut vmm = fx.boot().await;
    let h = vmm.handle().clone();
    let mut events = fx.driver.events(&h).await.expect("events");
    let other = VmmProcess::attach(h.pid, h.start_time).expect("attach");
    other.kill().expect("kill");
    vmm.wait_exit().await;
    match next_event(&mut events).await {
        VmmEvent::Error { reason } => assert!(reason.contains("killed or crashed"), "{reason}"),
        other => panic!("expected error, got {other:?}"),
    }
    match fx.driver.exit_reason(&h).await.expect("reason") {
        Some(VmmEvent::Error { reason }) => assert!(reason.contains("killed or crashed"), "{reason}"),
        other => panic!("expected error, got {other:?}"),
    }
}

/// The guest powers itself off: the VMM exits by itself, and both the event stream (even when
/// subscribed after the exit) and `exit_reason` call it a guest shutdown, not a failure.
pub async fn guest_power_off(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let mut cfg = fx.config();
    cfg.kernel = super::pvh_guest::write_power_off(fx.tmp.path());
    let mut vmm = Vmm(Some(fx.driver.boot(&fx.spec(&cfg)).await.expect("boot")));
    vmm.wait_exit().await;
    assert_eq!(fx.wait_ready().await.to_string(), "10.0.0.2");
    let h = vmm.handle().clone();
    let mut events = fx.driver.events(&h).await.expect("events after exit");
    let mut last = None;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        last = Some(ev);
    }
    assert!(
        matches!(last, Some(VmmEvent::Shutdown { guest: true, .. })),
        "{last:?}"
    );
    assert!(matches!(
        fx.driver.exit_reason(&h).await.expect("reason"),
        Some(VmmEvent::Shutdown { guest: true, .. })
    ));
}

/// The serial console goes through the capped log (Cloud Hypervisor's `Tty` mode into the
/// capture sidecar, not its unbounded `File` mode): a cap smaller than the guest's output
/// keeps the head, a marker and the tail, and never more than the cap allows.
pub async fn serial_log_is_capped(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let mut cfg = fx.config();
    cfg.kernel = super::pvh_guest::write_power_off(fx.tmp.path());
    cfg.serial_log_max = Some(8);
    let mut vmm = Vmm(Some(fx.driver.boot(&fx.spec(&cfg)).await.expect("boot")));
    vmm.wait_exit().await;
    assert!(vm_rs::console::capture::wait_done(&fx.vm_dir, Duration::from_secs(10)).await);
    let log = std::fs::read_to_string(fx.serial()).expect("serial log");
    assert!(log.starts_with("VMRS_REA"), "{log}");
    assert!(log.contains(vm_rs::console::capture::CAPPED_MARKER), "{log}");
    assert!(
        log.len() as u64 <= 8 + vm_rs::console::capture::MAX_SLACK,
        "{log}"
    );
    // the log's end still shows how the guest ended
    assert!(log.contains("10.0.0.2"), "{log}");
}

/// Reattach: a new driver (as in a new process) drives the VM from the persisted handle.
pub async fn reattach(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let vmm = fx.boot().await;
    let json = serde_json::to_string(vmm.handle()).expect("persist");
    let handle: VmHandle = serde_json::from_str(&json).expect("load");
    let driver = vm_rs::driver::driver_for(vm_rs::BackendKind::CloudHypervisor).expect("driver");
    let process = VmmProcess::attach(handle.pid, handle.start_time).expect("attach");
    assert!(process.is_alive());
    assert_eq!(driver.status(&handle).await.expect("status"), VmmStatus::Running);
    driver.pause(&handle).await.expect("pause");
    assert_eq!(
        fx.driver.status(vmm.handle()).await.expect("status"),
        VmmStatus::Paused
    );
    driver.resume(&handle).await.expect("resume");
    driver.quit(&handle).await.expect("quit");
    let exited = tokio::time::timeout(Duration::from_secs(20), async {
        let mut p = process;
        p.wait().await
    })
    .await;
    assert!(exited.is_ok(), "vmm did not exit after quit");
}

/// A disk the VMM cannot open: a clear error naming the step, and no VMM left running.
pub async fn bad_disk_is_clear_error(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let mut cfg = fx.config();
    cfg.disks.push(DiskConfig::new(fx.tmp.path().join("missing.img")));
    let err = fx.driver.boot(&fx.spec(&cfg)).await.expect_err("boot must fail");
    match &err {
        DriverError::Command { command, message } => {
            assert!(command == "vm.boot" || command == "vm.create", "{command}");
            assert!(
                message.starts_with("500") || message.starts_with("400"),
                "{message}"
            );
        }
        other => panic!("expected an api error, got {other:?}"),
    }
    // The launched VMM was cleaned up: nothing serves the socket any more.
    assert!(std::os::unix::net::UnixStream::connect(fx.vm_dir.join("ch-api.sock")).is_err());
}

/// A kernel that is neither ELF nor bzImage is refused before any VMM starts.
pub async fn bad_kernel_is_clear_error(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let junk = fx.tmp.path().join("junk");
    std::fs::write(&junk, b"not a kernel at all, just text").expect("write");
    let mut cfg = fx.config();
    cfg.kernel = junk;
    let err = fx.driver.boot(&fx.spec(&cfg)).await.expect_err("boot must fail");
    let msg = err.to_string();
    assert!(msg.contains("not a bzImage or ELF kernel"), "{msg}");
    assert!(!fx.vm_dir.join("ch-api.sock").exists());
}

/// Resize, hot-plug a disk and a NIC, read counters, unplug.
pub async fn resize_and_hotplug(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let vmm = fx.boot().await;
    let h = vmm.handle();
    fx.driver.resize(h, Some(2), None).await.expect("resize cpus");
    fx.driver.resize(h, None, Some(256)).await.expect("resize memory");
    let info = fx.driver.info(h).await.expect("info");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2);
    assert_eq!(info["config"]["memory"]["size"], 256u64 << 20);
    let img = fx.tmp.path().join("data.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(8 << 20))
        .expect("disk image");
    let disk = fx
        .driver
        .add_disk(h, &DiskConfig::new(&img))
        .await
        .expect("add disk");
    assert!(!disk.is_empty());
    let again = fx.driver.add_disk(h, &DiskConfig::new(&img)).await;
    assert!(matches!(again, Err(DriverError::Command { .. })), "{again:?}");
    let net = fx
        .driver
        .add_net(h, &TapNetwork::default())
        .await
        .expect("add net");
    assert_ne!(net, disk);
    let counters = fx.driver.counters(h).await.expect("counters");
    let _ = counters; // Devices appear once the guest drives them; the call must decode.
    fx.driver.remove_device(h, &disk).await.expect("remove disk");
    fx.driver.remove_device(h, &net).await.expect("remove net");
    // v53 answers 500 (every failure but "no VM" is 500 there); releases after v53 answer 404
    match fx.driver.remove_device(h, "no-such-device").await {
        Err(DriverError::Command { message, .. }) => {
            assert!(
                message.starts_with("500 internal error: The device could not be removed from the VM")
                    || message.starts_with("404 not found: The device could not be removed from the VM"),
                "{message}"
            );
            assert!(message.contains("no-such-device"), "{message}");
        }
        other => panic!("expected an api error, got {other:?}"),
    }
}

/// Every scenario shared by the peer and the real binary, by name.
pub fn shared() -> Vec<(&'static str, Flow)> {
    vec![
        ("boot_ready", |b| Box::pin(boot_ready(b))),
        ("pause_resume", |b| Box::pin(pause_resume(b))),
        ("stop", |b| Box::pin(stop(b))),
        ("kill_is_failure", |b| Box::pin(kill_is_failure(b))),
        ("reattach", |b| Box::pin(reattach(b))),
        ("guest_power_off", |b| Box::pin(guest_power_off(b))),
        ("serial_log_is_capped", |b| Box::pin(serial_log_is_capped(b))),
        ("bad_disk_is_clear_error", |b| {
            Box::pin(bad_disk_is_clear_error(b))
        }),
        ("bad_kernel_is_clear_error", |b| {
            Box::pin(bad_kernel_is_clear_error(b))
        }),
        ("resize_and_hotplug", |b| Box::pin(resize_and_hotplug(b))),
        ("agent_vsock_device", |b| Box::pin(agent_vsock_device(b))),
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

/// A manager-level config booting the PVH guest on Cloud Hypervisor.
fn manager_config(name: &str, guest: &Path) -> VmConfig {
    VmConfig::builder(name)
        .kernel(guest)
        .memory_mib(128)
        .backend(vm_rs::BackendKind::CloudHypervisor)
        .build()
        .expect("valid config")
}

/// Wait (bounded) until the state of `name` satisfies `pred`.
pub async fn wait_state(
    mgr: &vm_rs::VmManager,
    name: &str,
    pred: impl Fn(&vm_rs::VmState) -> bool,
) -> vm_rs::VmState {
    let mut rx = mgr.subscribe(name).await.expect("subscribe");
    let fut = async {
        loop {
            let st = rx.borrow_and_update().clone();
            if pred(&st) {
                return st;
            }
            if rx.changed().await.is_err() {
                return mgr.state(name).await.expect("state");
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("state change")
}

/// Through the manager: boot → ready, pause/resume (and pausing twice is a typed error),
/// graceful stop (the tiny guest ignores the power button, so the VMM is asked to quit).
pub async fn manager_lifecycle(bin: PathBuf) {
    let _ = bin;
    let home = super::TestHome::new();
    let guest = super::pvh_guest::write(home.path());
    let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager");
    let info = mgr.start(manager_config("life", &guest)).await.expect("start");
    assert_eq!(info.backend, vm_rs::BackendKind::CloudHypervisor);
    let ip = mgr
        .wait_ready("life", Duration::from_secs(20))
        .await
        .expect("ready");
    assert_eq!(ip.to_string(), "10.0.0.2");
    mgr.pause("life").await.expect("pause");
    assert_eq!(mgr.state("life").await.expect("state"), vm_rs::VmState::Paused);
    let handle = mgr.handle("life").await.expect("handle").expect("live");
    let driver = vm_rs::driver::driver_for(vm_rs::BackendKind::CloudHypervisor).expect("driver");
    assert_eq!(driver.status(&handle).await.expect("status"), VmmStatus::Paused);
    assert!(matches!(
        mgr.pause("life").await,
        Err(vm_rs::ManagerError::State(_))
    ));
    mgr.resume("life").await.expect("resume");
    assert_eq!(
        mgr.state("life").await.expect("state"),
        vm_rs::VmState::Ready {
            ip: std::net::IpAddr::from([10, 0, 0, 2])
        }
    );
    assert_eq!(driver.status(&handle).await.expect("status"), VmmStatus::Running);
    let st = mgr.stop("life", Duration::from_secs(1)).await.expect("stop");
    assert_eq!(st, vm_rs::VmState::Stopped);
    assert!(!super::alive(handle.pid, handle.start_time), "vmm still running");
    mgr.remove("life", false).await.expect("rm");
}

/// Through the manager: kill stops the VM at once.
pub async fn manager_kill(bin: PathBuf) {
    let _ = bin;
    let home = super::TestHome::new();
    let guest = super::pvh_guest::write(home.path());
    let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager");
    mgr.start(manager_config("k", &guest)).await.expect("start");
    mgr.wait_ready("k", Duration::from_secs(20)).await.expect("ready");
    let handle = mgr.handle("k").await.expect("handle").expect("live");
    assert_eq!(mgr.kill("k").await.expect("kill"), vm_rs::VmState::Stopped);
    assert!(!super::alive(handle.pid, handle.start_time), "vmm still running");
}

/// Through the manager: a new manager (as in a new process) reattaches to the running VM, sees
/// it ready, and drives it over the API.
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
    assert_eq!(
        mgr.state("re").await.expect("state"),
        vm_rs::VmState::Ready {
            ip: std::net::IpAddr::from([10, 0, 0, 2])
        }
    );
    mgr.pause("re").await.expect("pause after reattach");
    let handle = mgr.handle("re").await.expect("handle").expect("live");
    let driver = vm_rs::driver::driver_for(vm_rs::BackendKind::CloudHypervisor).expect("driver");
    assert_eq!(driver.status(&handle).await.expect("status"), VmmStatus::Paused);
    mgr.resume("re").await.expect("resume");
    assert_eq!(
        mgr.stop("re", Duration::from_secs(1)).await.expect("stop"),
        vm_rs::VmState::Stopped
    );
}

/// Through the manager: a kernel Cloud Hypervisor cannot boot is a clear error and leaves no VM
/// behind.
pub async fn manager_bad_config(bin: PathBuf) {
    let _ = bin;
    let home = super::TestHome::new();
    let junk = home.path().join("junk-kernel");
    std::fs::write(&junk, vec![0x55u8; 4096]).expect("write");
    let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager");
    let err = mgr
        .start(manager_config("bad", &junk))
        .await
        .expect_err("must fail");
    let chain = {
        let mut s = err.to_string();
        let mut src = std::error::Error::source(&err);
        while let Some(e) = src {
            s.push_str(": ");
            s.push_str(&e.to_string());
            src = e.source();
        }
        s
    };
    assert!(chain.contains("not a bzImage or ELF kernel"), "{chain}");
    assert!(mgr.list().await.expect("list").is_empty());
    assert!(!home.path().join("vms/bad").exists());
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
    let st = wait_state(&mgr, "k9", |s| !s.is_live()).await;
    match st {
        vm_rs::VmState::Failed { reason } => assert!(reason.contains("killed or crashed"), "{reason}"),
        other => panic!("expected failed, got {other}"),
    }
}

/// Through the manager: a guest that powers itself off leaves the VM stopped, not failed.
pub async fn manager_guest_power_off(bin: PathBuf) {
    let _ = bin;
    let home = super::TestHome::new();
    let guest = super::pvh_guest::write_power_off(home.path());
    let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager");
    mgr.start(manager_config("off", &guest)).await.expect("start");
    let st = wait_state(&mgr, "off", |s| !s.is_live()).await;
    assert_eq!(st, vm_rs::VmState::Stopped);
}

/// The manager-level scenarios (the VMM binary comes from `VMRS_CLOUD_HYPERVISOR`).
pub fn manager() -> Vec<(&'static str, Flow)> {
    vec![
        ("manager_lifecycle", |b| Box::pin(manager_lifecycle(b))),
        ("manager_kill", |b| Box::pin(manager_kill(b))),
        ("manager_reattach", |b| Box::pin(manager_reattach(b))),
        ("manager_bad_config", |b| Box::pin(manager_bad_config(b))),
        ("manager_kill9_failed", |b| Box::pin(manager_kill9_failed(b))),
        ("manager_user_network", |b| Box::pin(manager_user_network(b))),
        ("manager_guest_power_off", |b| {
            Box::pin(manager_guest_power_off(b))
        }),
    ]
}
