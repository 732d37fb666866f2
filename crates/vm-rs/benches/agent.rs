//! Agent benchmark (not a test): boots one guest through `VmManager` with the agent port and
//! measures, in the same run:
//!
//! * ping round trip (the baseline: one frame each way through virtio-serial),
//! * `exec true` round trip (spawn + exit in the guest) and its ratio to ping,
//! * exec stdout throughput (`dd if=/dev/zero bs=64k count=256`: 16 MiB),
//! * copy throughput into and out of the guest (16 MiB file) and their ratio to exec stdout.
//!
//! Run: `cargo bench -p vm-rs --bench agent` (BENCH_N=20 round trips by default). Needs
//! `vmrs setup` assets whose initramfs carries the agent.

use std::path::PathBuf;
use std::time::{Duration, Instant};
use vm_rs::agent::{AgentClient, ExecCommand};
use vm_rs::{VmConfig, VmManager};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

struct KillOnDrop(Option<(u32, u64)>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some((pid, start)) = self.0 {
            if let Ok(p) = vm_rs::process::VmmProcess::attach(pid, start) {
                let _ = p.kill();
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let assets = vm_rs::paths::assets_dir();
    let home = tempfile::Builder::new()
        .prefix("vmrs-bench")
        .tempdir_in("/tmp")
        .expect("home");
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let cfg = VmConfig::builder("agentbench")
        .kernel(assets.join("vmlinuz"))
        .initramfs(assets.join("initramfs.img"))
        .memory_mib(256)
        .build()
        .expect("config");
    let sock = mgr.vm_dir("agentbench").join("agent.sock");
    let info = mgr.start(cfg).await.expect("start");
    // Kill QEMU even if a step below panics.
    let _guard = KillOnDrop(
        mgr.handle("agentbench")
            .await
            .ok()
            .flatten()
            .map(|h| (h.pid, h.start_time)),
    );
    let _ = info;
    let run = async {
        mgr.wait_ready("agentbench", Duration::from_secs(120))
            .await
            .expect("ready");
        let agent = AgentClient::connect_timeout(&sock, Duration::from_secs(60))
            .await
            .expect("agent");

        let mut ping = Vec::new();
        let mut exec = Vec::new();
        for _ in 0..n {
            ping.push(agent.ping().await.expect("ping").as_secs_f64() * 1e3);
            let t = Instant::now();
            let out = agent.exec(ExecCommand::new(["true"])).await.expect("exec");
            assert!(out.status.success());
            exec.push(t.elapsed().as_secs_f64() * 1e3);
        }

        const SIZE: usize = 16 << 20;
        let t = Instant::now();
        let out = agent
            .exec(ExecCommand::new(["dd", "if=/dev/zero", "bs=65536", "count=256"]))
            .await
            .expect("exec big");
        let stdout_s = t.elapsed().as_secs_f64();
        assert_eq!(out.stdout.len(), SIZE);

        let tmp = tempfile::tempdir().expect("tmp");
        let src: PathBuf = tmp.path().join("blob");
        std::fs::write(&src, vec![7u8; SIZE]).expect("write blob");
        let t = Instant::now();
        agent.copy_to(&src, "/tmp/blob").await.expect("copy_to");
        let copy_in_s = t.elapsed().as_secs_f64();
        let back = tmp.path().join("back");
        let t = Instant::now();
        agent.copy_from("/tmp/blob", &back).await.expect("copy_from");
        let copy_out_s = t.elapsed().as_secs_f64();
        assert_eq!(std::fs::metadata(&back).expect("back").len(), SIZE as u64);

        let mb = SIZE as f64 / (1 << 20) as f64;
        let (p, e) = (median(ping), median(exec));
        println!("agent bench (TCG guest, {n} round trips)");
        println!("  ping round trip     median {p:8.2} ms");
        println!(
            "  exec true           median {e:8.2} ms   ratio exec/ping {:.2}",
            e / p
        );
        println!("  exec stdout         {:8.1} MiB/s", mb / stdout_s);
        println!(
            "  copy into guest     {:8.1} MiB/s   ratio to exec stdout {:.2}",
            mb / copy_in_s,
            stdout_s / copy_in_s
        );
        println!(
            "  copy out of guest   {:8.1} MiB/s   ratio to exec stdout {:.2}",
            mb / copy_out_s,
            stdout_s / copy_out_s
        );
    };
    run.await;
    let _ = mgr.kill("agentbench").await;
}
