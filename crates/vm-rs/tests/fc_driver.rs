//! The Firecracker driver against the protocol peer (`support::fc_peer`), which stands in for
//! the `firecracker` binary on machines where it is not installed (CI). This binary is its own
//! peer: started with `--api-sock` it serves the API instead of running tests.
//!
//! The same scenarios run against the real binary in `vm_fc_real`.

mod support;

use std::path::PathBuf;
use support::ch_flows::block_on;
use support::fc_flows;

fn me() -> PathBuf {
    std::env::current_exe().expect("current exe")
}

fn main() {
    support::fc_peer::run_if_invoked();
    // The manager finds its VMM like users do: through VMRS_FIRECRACKER. Set before any
    // thread starts.
    std::env::set_var(vm_rs::driver::firecracker::BINARY_ENV, me());
    let args = libtest_mimic::Arguments::from_args();
    let mut flows = fc_flows::shared();
    flows.extend(fc_flows::manager());
    let trials = flows
        .into_iter()
        .map(|(name, flow)| {
            libtest_mimic::Trial::test(format!("peer::{name}"), move || {
                block_on(flow(me()));
                Ok(())
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
