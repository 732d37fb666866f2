//! The Firecracker driver against the real `firecracker` binary, booting the tiny PVH guest
//! from `support::pvh_guest`. The binary is found like the driver finds it
//! (`VMRS_FIRECRACKER`, then `PATH`); when it is absent every test prints
//! `skipped: firecracker not found` and returns.
//!
//! The same scenarios run against the protocol peer in `fc_driver`.

mod support;

use std::path::PathBuf;
use support::ch_flows::block_on;
use support::fc_flows::{self, Fixture};
use vm_rs::driver::{DriverError, VmDriver};

/// Snapshot on this kind of host: refused while running; once paused it succeeds (hardware
/// KVM) or fails with the VMM's own reason; the VM is usable afterwards either way.
async fn snapshot_or_clear_error(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let vmm = fx.boot().await;
    let h = vmm.handle();
    fx.wait_ready().await;
    let snap = fx.tmp.path().join("snap");
    assert!(matches!(
        fx.driver.snapshot(h, &snap).await,
        Err(DriverError::Command { .. })
    ));
    fx.driver.pause(h).await.expect("pause");
    match fx.driver.snapshot(h, &snap).await {
        Ok(()) => assert!(snap.join("vmstate").is_file()),
        Err(DriverError::Command { command, message }) => {
            assert_eq!(command, "PUT /snapshot/create");
            assert!(
                message.starts_with("400 bad request: Create snapshot error"),
                "{message}"
            );
        }
        Err(other) => panic!("unexpected snapshot error: {other:?}"),
    }
    fx.driver.resume(h).await.expect("resume");
}

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let binary = vm_rs::driver::firecracker::find_binary(None).ok();
    let mut flows = fc_flows::shared();
    flows.extend(fc_flows::manager());
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
                    None => println!("skipped: firecracker not found"),
                }
                Ok(())
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
