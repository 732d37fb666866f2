//! Snapshot benchmark (not a test), one run, the same guest for everything:
//!
//! * the baseline: cold boot to exec-ready (`start`, `wait_ready`, a first `exec true`
//!   succeeds), median over N;
//! * restore to exec-ready (`restore` from a snapshot of a ready VM, a first `exec true`),
//!   median over N, and its ratio to the baseline (target <= 0.05 under TCG);
//! * CLONES VMs restored from one snapshot at once: time until all answer exec, and their summed
//!   PSS against CLONES cold-booted VMs (target <= 0.4).
//!
//! Run: `cargo bench -p vm-rs --bench snapshot` (BENCH_N=10, BENCH_CLONES=16 by default;
//! BENCH_CLONES=0 skips the PSS part). Needs `vmrs setup` assets whose initramfs carries the
//! agent.

use std::time::{Duration, Instant};
use vm_rs::agent::ExecCommand;
use vm_rs::manager::{RestoreOptions, SnapshotOptions};
use vm_rs::{VmConfig, VmManager};

const READY: Duration = Duration::from_secs(300);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Kills every VMM recorded under the home, even when a step panics.
struct Home(tempfile::TempDir);

impl Drop for Home {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(self.0.path().join("vms")) else {
            return;
        };
        for e in rd.flatten() {
            vm_rs::process::kill_owned_by(&e.path());
        }
    }
}

fn config(name: &str) -> VmConfig {
    let assets = vm_rs::paths::assets_dir();
    VmConfig::builder(name)
        .kernel(assets.join("vmlinuz"))
        .initramfs(assets.join("initramfs.img"))
        .memory_mib(256)
        .build()
        .expect("config")
}

async fn exec_true(mgr: &VmManager, name: &str) {
    let out = mgr
        .exec(name, ExecCommand::new(["true"]))
        .await
        .unwrap_or_else(|e| panic!("exec in {name}: {e}"));
    assert!(out.status.success());
}

async fn cold(mgr: &VmManager, name: &str) -> f64 {
    let t = Instant::now();
    mgr.start(config(name)).await.expect("start");
    mgr.wait_ready(name, READY).await.expect("ready");
    exec_true(mgr, name).await;
    t.elapsed().as_secs_f64()
}

/// Summed proportional set size (kB) of the VMMs of `names`.
async fn pss_kb(mgr: &VmManager, names: &[String]) -> u64 {
    let mut total = 0;
    for n in names {
        let Some(h) = mgr.handle(n).await.expect("handle") else {
            continue;
        };
        let rollup = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", h.pid)).unwrap_or_default();
        total += rollup
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

#[tokio::main]
async fn main() {
    let n = env_usize("BENCH_N", 10);
    let clones = env_usize("BENCH_CLONES", 16);
    let home = Home(
        tempfile::Builder::new()
            .prefix("vmrs-bench")
            .tempdir_in("/tmp")
            .expect("home"),
    );
    let mgr = VmManager::with_home(home.0.path()).await.expect("manager");

    let mut cold_s = Vec::new();
    for i in 0..n {
        let name = format!("cold{i}");
        cold_s.push(cold(&mgr, &name).await);
        mgr.remove(&name, true).await.expect("rm");
    }

    mgr.start(config("base")).await.expect("start");
    mgr.wait_ready("base", READY).await.expect("ready");
    exec_true(&mgr, "base").await;
    let t = Instant::now();
    let snap = mgr
        .snapshot("base", "bench", SnapshotOptions::default())
        .await
        .expect("snapshot");
    let snapshot_s = t.elapsed().as_secs_f64();

    let mut restore_s = Vec::new();
    for i in 0..n {
        let name = format!("warm{i}");
        let t = Instant::now();
        mgr.restore("bench", &name, RestoreOptions::default())
            .await
            .expect("restore");
        exec_true(&mgr, &name).await;
        restore_s.push(t.elapsed().as_secs_f64());
        mgr.remove(&name, true).await.expect("rm");
    }
    let (c, r) = (median(cold_s), median(restore_s));
    println!(
        "snapshot: {snapshot_s:.3} s ({} MiB on disk)",
        snap.disk_usage >> 20
    );
    println!("cold boot to exec-ready:  median {c:.3} s (N={n})");
    println!("restore to exec-ready:    median {r:.3} s (N={n})");
    println!("ratio restore/cold:       {:.4} (target <= 0.05)", r / c);

    if clones > 0 {
        let t = Instant::now();
        let vms = mgr
            .clone_snapshot("bench", clones, "clone", RestoreOptions::default())
            .await
            .expect("clone");
        let names: Vec<String> = vms.iter().map(|v| v.name.clone()).collect();
        futures::future::join_all(names.iter().map(|n| exec_true(&mgr, n))).await;
        let all_s = t.elapsed().as_secs_f64();
        // let every guest settle the same way before measuring
        tokio::time::sleep(Duration::from_secs(2)).await;
        let clone_pss = pss_kb(&mgr, &names).await;
        for n in &names {
            mgr.remove(n, true).await.expect("rm");
        }
        mgr.remove("base", true).await.expect("rm");
        let cold_names: Vec<String> = (0..clones).map(|i| format!("coldpss{i}")).collect();
        let t = Instant::now();
        for n in &cold_names {
            mgr.start(config(n)).await.expect("start");
        }
        for n in &cold_names {
            mgr.wait_ready(n, READY).await.expect("ready");
            exec_true(&mgr, n).await;
        }
        let cold_all_s = t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cold_pss = pss_kb(&mgr, &cold_names).await;
        for n in &cold_names {
            mgr.remove(n, true).await.expect("rm");
        }
        println!("{clones} clones ready for exec: {all_s:.3} s (cold: {cold_all_s:.3} s)");
        println!(
            "summed PSS: {clones} clones {} MiB, {clones} cold {} MiB, ratio {:.3} (target <= 0.4)",
            clone_pss >> 10,
            cold_pss >> 10,
            clone_pss as f64 / cold_pss as f64
        );
    }
    mgr.remove_snapshot("bench", true).await.expect("rm snapshot");
}
