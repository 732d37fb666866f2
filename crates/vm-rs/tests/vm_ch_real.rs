//! The Cloud Hypervisor driver against the real `cloud-hypervisor` binary, booting the tiny PVH
//! guest from `support::pvh_guest`. The binary is found like the driver finds it
//! (`VMRS_CLOUD_HYPERVISOR`, then `PATH`); when it is absent every test prints
//! `skipped: cloud-hypervisor not found` and returns.
//!
//! The same scenarios run against the protocol peer in `ch_driver`.

mod support;

use std::path::PathBuf;
use support::ch_flows::{self, block_on, Fixture};
use vm_rs::driver::{DriverError, VmDriver};

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

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let binary = vm_rs::driver::cloud_hypervisor::find_binary(None).ok();
    let mut flows = ch_flows::shared();
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
