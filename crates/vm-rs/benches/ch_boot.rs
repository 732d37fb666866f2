//! Boot → ready latency of the tiny PVH guest through `VmManager`: Cloud Hypervisor against
//! QEMU (the baseline, measured in the same run), reported as medians and their ratio.
//!
//! `cargo bench -p vm-rs --bench ch_boot` (`VMRS_BENCH_ROUNDS`, default 10). Needs
//! `cloud-hypervisor` (`VMRS_CLOUD_HYPERVISOR` or `PATH`) and `qemu-system-x86_64`; says what is
//! missing and exits otherwise.

#[allow(dead_code)]
#[path = "../tests/support/pvh_guest.rs"]
mod pvh_guest;

use std::time::{Duration, Instant};
use vm_rs::{BackendKind, VmConfig, VmManager};

async fn boot_ready(mgr: &VmManager, name: &str, kernel: &std::path::Path, backend: BackendKind) -> Duration {
    let cfg = VmConfig::builder(name)
        .kernel(kernel)
        .memory_mib(128)
        .backend(backend)
        .build()
        .expect("config");
    let t = Instant::now();
    mgr.start(cfg).await.expect("start");
    mgr.wait_ready(name, Duration::from_secs(60))
        .await
        .expect("ready");
    let elapsed = t.elapsed();
    mgr.kill(name).await.expect("kill");
    mgr.remove(name, true).await.expect("rm");
    elapsed
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if vm_rs::driver::cloud_hypervisor::find_binary(None).is_err() {
        println!("ch_boot: cloud-hypervisor not found; nothing measured");
        return;
    }
    let rounds: usize = std::env::var("VMRS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let home = tempfile::Builder::new()
            .prefix("vmrs-b")
            .tempdir_in("/tmp")
            .expect("tmp");
        let kernel = pvh_guest::write(home.path());
        let mgr = VmManager::with_home(home.path()).await.expect("manager");
        let (mut ch, mut qemu) = (Vec::new(), Vec::new());
        for i in 0..rounds {
            // interleave so load changes hit both alike
            ch.push(boot_ready(&mgr, &format!("ch{i}"), &kernel, BackendKind::CloudHypervisor).await);
            qemu.push(boot_ready(&mgr, &format!("q{i}"), &kernel, BackendKind::Qemu).await);
        }
        let (c, q) = (median(ch), median(qemu));
        println!("boot -> ready, tiny PVH guest, median of {rounds}:");
        println!("  qemu (baseline)   {:8.1} ms", q.as_secs_f64() * 1e3);
        println!("  cloud-hypervisor  {:8.1} ms", c.as_secs_f64() * 1e3);
        println!("  ratio ch/qemu     {:8.3}", c.as_secs_f64() / q.as_secs_f64());
    });
}
