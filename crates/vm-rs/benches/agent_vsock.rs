//! Agent transport benchmark (not a test): vsock against virtio-serial in the same run. Boots
//! two guests through `VmManager` on QEMU — one with the agent on virtio-serial (the
//! baseline), one on vsock (`vhost-user-vsock-device` + `vhost-device-vsock`, hybrid socket)
//! — and measures, interleaving the two so both see the same host load:
//!
//! * `exec true` round trip (median of BENCH_N, default 30),
//! * exec stdout throughput (`dd if=/dev/zero bs=64k count=512`: 32 MiB, median of 5),
//!
//! and prints vsock/serial ratios (target: latency ratio <= 1.1, throughput ratio >= 1).
//!
//! Run: `cargo bench -p vm-rs --bench agent_vsock`. Needs `vmrs setup` assets whose
//! initramfs carries this checkout's init, and `vhost-device-vsock` (scripts/setup.sh).

use std::time::{Duration, Instant};
use vm_rs::agent::ExecCommand;
use vm_rs::devices::AgentTransport;
use vm_rs::{BackendKind, VmConfig, VmManager};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

const STDOUT_BYTES: usize = 32 << 20;

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let assets = vm_rs::paths::assets_dir();
    let home = tempfile::Builder::new()
        .prefix("vmrs-bench")
        .tempdir_in("/tmp")
        .expect("home");
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let vms = [
        ("serial", AgentTransport::VirtioSerial),
        ("vsock", AgentTransport::Vsock),
    ];
    for (name, t) in vms {
        let cfg = VmConfig::builder(name)
            .kernel(assets.join("vmlinuz"))
            .initramfs(assets.join("initramfs.img"))
            .memory_mib(256)
            .backend(BackendKind::Qemu)
            .agent_transport(t)
            .build()
            .expect("config");
        mgr.start(cfg).await.expect("start");
    }
    for (name, _) in vms {
        mgr.wait_ready(name, Duration::from_secs(180))
            .await
            .expect("ready");
        // connect and warm up
        for _ in 0..3 {
            mgr.exec(name, ExecCommand::new(["true"])).await.expect("warm up");
        }
    }
    let mut lat: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..n {
        for (i, (name, _)) in vms.iter().enumerate() {
            let t = Instant::now();
            let out = mgr
                .exec(name, ExecCommand::new(["true"]))
                .await
                .expect("exec true");
            assert!(out.status.success());
            lat[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut tput: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let dd = ["dd", "if=/dev/zero", "bs=64k", "count=512", "status=none"];
    for _ in 0..5 {
        for (i, (name, _)) in vms.iter().enumerate() {
            let t = Instant::now();
            let out = mgr.exec(name, ExecCommand::new(dd)).await.expect("exec dd");
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(out.stdout.len(), STDOUT_BYTES, "all of dd's output arrived");
            tput[i].push(STDOUT_BYTES as f64 / (1 << 20) as f64 / secs);
        }
    }
    let (ls, lv) = (median(lat[0].clone()), median(lat[1].clone()));
    let (ts, tv) = (median(tput[0].clone()), median(tput[1].clone()));
    println!(
        "exec true round trip (median of {n}): serial {ls:.2} ms, vsock {lv:.2} ms, vsock/serial {:.3}x",
        lv / ls
    );
    println!(
        "exec stdout 32 MiB (median of 5): serial {ts:.1} MiB/s, vsock {tv:.1} MiB/s, vsock/serial {:.3}x",
        tv / ts
    );
    for (name, _) in vms {
        let _ = mgr.kill(name).await;
        let _ = mgr.remove(name, true).await;
    }
}
