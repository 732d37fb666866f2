//! The Cloud Hypervisor driver against the real `cloud-hypervisor` binary, booting the tiny PVH
//! guest from `support::pvh_guest`. The binary is found like the driver finds it
//! (`VMRS_CLOUD_HYPERVISOR`, then `PATH`); when it is absent every test prints
//! `skipped: cloud-hypervisor not found` and returns.
//!
//! The same scenarios run against the protocol peer in `ch_driver`. Verified: all pass against
//! a Cloud Hypervisor v53.0 built by hand (outside the tree) on a host with software KVM,
//! including `resize_and_hotplug`, whose unknown-device removal v53 answers with 500.

mod support;

use std::path::PathBuf;
use support::ch_flows::{self, block_on, Fixture};
use vm_rs::driver::{DriverError, VmDriver, VmmEvent};

/// Snapshot on this kind of host: the VM pauses, and the snapshot fails with a clear error
/// (software KVM cannot save nested vCPU state), or succeeds on hardware KVM.
async fn snapshot_or_clear_error(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let vmm = fx.boot().await;
    let h = vmm.handle();
    fx.wait_ready().await;
    fx.driver.pause(h).await.expect("pause");
    let snap = fx.tmp.path().join("snap");
    match fx.driver.snapshot(h, &snap).await {
        Ok(()) => assert!(snap.join("config.json").is_file()),
        Err(DriverError::Command { command, message }) => {
            assert_eq!(command, "vm.snapshot");
            assert!(message.contains("GetNestedState"), "{message}");
            assert!(message.contains("snapshots need hardware KVM"), "{message}");
            assert!(!message.contains("Stack backtrace"), "{message}");
        }
        Err(other) => panic!("unexpected snapshot error: {other:?}"),
    }
    // The VM is still usable afterwards.
    fx.driver.resume(h).await.expect("resume");
}

/// The Debian kernel from the guest assets. On this kind of host (software KVM) a vCPU hits an
/// internal error and Cloud Hypervisor exits with status 0 all the same: the driver must
/// report a failure, from the event stream and from `exit_reason`. On hardware KVM the kernel
/// boots instead, which the serial console shows.
async fn vcpu_failure_is_detected(bin: PathBuf) {
    let kernel = support::guest::assets().await.kernel;
    let fx = Fixture::new(&bin);
    let mut cfg = fx.config();
    cfg.kernel = kernel;
    cfg.memory_mib = 512;
    let mut vmm = ch_flows::Vmm(Some(fx.driver.boot(&fx.spec(&cfg)).await.expect("boot")));
    let h = vmm.handle().clone();
    let mut events = fx.driver.events(&h).await.expect("events");
    let serial = fx.serial();
    let process = &mut vmm.0.as_mut().expect("launched").process;
    let exit = tokio::time::timeout(std::time::Duration::from_secs(150), async {
        loop {
            tokio::select! {
                status = process.wait() => return Some(status.expect("wait")),
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                    let text = std::fs::read_to_string(&serial).unwrap_or_default();
                    if text.contains("Linux version") {
                        return None;
                    }
                }
            }
        }
    })
    .await
    .expect("the kernel neither booted nor failed within 150 s");
    let Some(status) = exit else {
        println!("the Debian kernel boots on this host (hardware KVM): no vCPU failure to detect");
        return;
    };
    assert_eq!(
        status,
        vm_rs::process::ExitInfo::Code(0),
        "cloud-hypervisor exits 0 on a vCPU failure"
    );
    let mut last = None;
    while let Ok(Some(ev)) = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        futures::StreamExt::next(&mut events),
    )
    .await
    {
        last = Some(ev);
    }
    match last {
        Some(VmmEvent::Error { reason }) => assert!(reason.starts_with("vcpu failed: "), "{reason}"),
        other => panic!("event stream should end with a vcpu error, got {other:?}"),
    }
    match fx.driver.exit_reason(&h).await.expect("exit reason") {
        Some(VmmEvent::Error { reason }) => {
            assert!(reason.contains("VCPU generated error"), "{reason}");
            assert!(!reason.contains("backtrace"), "{reason}");
        }
        other => panic!("expected a vcpu failure, got {other:?}"),
    }
}

/// The same vCPU failure through the manager: the VM ends failed, with the vCPU error as the
/// reason (not "stopped", which the exit status 0 alone would suggest).
async fn manager_vcpu_failure_is_failed(bin: PathBuf) {
    let _ = bin;
    let assets = support::guest::assets().await;
    let home = support::TestHome::new();
    let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager");
    let cfg = vm_rs::VmConfig::builder("vcpu")
        .kernel(&assets.kernel)
        .initramfs(&assets.initramfs)
        .memory_mib(512)
        .backend(vm_rs::BackendKind::CloudHypervisor)
        .build()
        .expect("config");
    let info = mgr.start(cfg).await.expect("start");
    let mut rx = mgr.subscribe("vcpu").await.expect("subscribe");
    let end = tokio::time::timeout(std::time::Duration::from_secs(150), async {
        loop {
            let st = rx.borrow_and_update().clone();
            if !st.is_live() || st.ip().is_some() {
                return st;
            }
            if rx.changed().await.is_err() {
                return mgr.state("vcpu").await.expect("state");
            }
        }
    })
    .await
    .expect("the kernel neither became ready nor failed within 150 s");
    match end {
        vm_rs::VmState::Failed { reason } => {
            assert!(reason.contains("vcpu failed: VCPU generated error"), "{reason}")
        }
        vm_rs::VmState::Ready { .. } => {
            let serial = std::fs::read_to_string(&info.serial_log).unwrap_or_default();
            assert!(serial.contains("Linux version"), "{serial}");
            println!("the Debian kernel boots on this host (hardware KVM): no vCPU failure to detect");
        }
        other => panic!("expected failed (software KVM) or ready (hardware KVM), got {other}"),
    }
}

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let binary = vm_rs::driver::cloud_hypervisor::find_binary(None).ok();
    let mut flows = ch_flows::shared();
    flows.extend(ch_flows::manager());
    flows.push(("manager_vcpu_failure_is_failed", |b| {
        Box::pin(manager_vcpu_failure_is_failed(b))
    }));
    flows.push(("vcpu_failure_is_detected", |b| {
        Box::pin(vcpu_failure_is_detected(b))
    }));
    flows.push(("snapshot_or_clear_error", |b| {
        Box::pin(snapshot_or_clear_error(b))
    }));
    let trials = flows
        .into_iter()
        .map(|(name, flow)| {
            let binary = binary.clone();
            libtest_mimic::Trial::test(format!("real::{name}"), move || {
                match binary {
                    Some(bin) => block_on(flow(bin)),
                    None => println!("skipped: cloud-hypervisor not found"),
                }
                Ok(())
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
