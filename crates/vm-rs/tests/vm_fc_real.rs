//! The Firecracker driver against the real `firecracker` binary, booting the tiny PVH guest
//! from `support::pvh_guest`. The binary is found like the driver finds it
//! (`VMRS_FIRECRACKER`, then `PATH`); when it is absent every test prints
//! `skipped: firecracker not found` and returns.
//!
//! The same scenarios run against the protocol peer in `fc_driver`. Verified with a
//! Firecracker v1.17.0-dev built by hand (x86_64-unknown-linux-gnu, outside the tree) on a
//! host whose KVM is a software implementation: the PVH guest boots, and snapshot / restore
//! work, so every scenario is shared.

mod support;

use support::ch_flows::block_on;
use support::fc_flows;

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let binary = vm_rs::driver::firecracker::find_binary(None).ok();
    let mut flows = fc_flows::shared();
    flows.extend(fc_flows::manager());
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
