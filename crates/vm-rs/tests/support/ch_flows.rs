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

    /// Boot spec for `config`.
    pub fn spec<'a>(&'a self, config: &'a VmConfig) -> BootSpec<'a> {
        BootSpec {
            config,
            vm_dir: &self.vm_dir,
            serial_log: self.serial(),
            vmm_log: self.vm_dir.join("vmm.log"),
            extra_cmdline: Vec::new(),
            extra_args: Vec::new(),
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
    match fx.driver.remove_device(h, "no-such-device").await {
        Err(DriverError::Command { message, .. }) => assert!(message.starts_with("404"), "{message}"),
        other => panic!("expected 404, got {other:?}"),
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
        ("bad_disk_is_clear_error", |b| {
            Box::pin(bad_disk_is_clear_error(b))
        }),
        ("bad_kernel_is_clear_error", |b| {
            Box::pin(bad_kernel_is_clear_error(b))
        }),
        ("resize_and_hotplug", |b| Box::pin(resize_and_hotplug(b))),
    ]
}
