//! `run IMAGE -- true` benchmark (not a test), split into its phases, measured in one run:
//!
//! * pull of an already stored image (manifest check against a local registry),
//! * rootfs build, cold (unpack + `mkfs.ext4 -d`) vs cached (cache hit), and their ratio,
//! * boot of a VM on a fresh qcow2 overlay of the cached rootfs until ready,
//! * `exec true` of the image process through the agent, then stop + remove.
//!
//! Run: `cargo bench -p vm-rs --bench run_image` (BENCH_N=5 rounds by default). Needs the
//! `vmrs setup` assets and Debian's `docker-registry`.

#[path = "../tests/support/oci_layout.rs"]
mod oci_layout;
#[path = "../tests/support/registry.rs"]
mod registry;

use std::time::{Duration, Instant};
use vm_rs::oci::PullOptions;
use vm_rs::{ImageStore, VmConfig, VmManager};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Kills every VMM recorded under the bench's home, also when a step panics.
struct KillAll(std::path::PathBuf);

impl Drop for KillAll {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(self.0.join("vms")) else {
            return;
        };
        for e in rd.flatten() {
            let Ok(b) = std::fs::read(e.path().join("state.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) else {
                continue;
            };
            if let (Some(pid), Some(st)) = (v["handle"]["pid"].as_u64(), v["handle"]["start_time"].as_u64()) {
                if let Ok(p) = vm_rs::process::VmmProcess::attach(pid as u32, st) {
                    let _ = p.kill();
                }
            }
        }
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let reg = registry::Registry::start();
    let layout = tempfile::tempdir().expect("tmp");
    let (layer, _) = oci_layout::busybox_layer(oci_layout::Comp::Gzip);
    oci_layout::single_image_layout(
        layout.path(),
        "v1",
        &[layer],
        serde_json::json!({"Cmd": ["sh", "-c", "true"], "Env": ["PATH=/bin"]}),
    );
    reg.push_layout(layout.path(), "v1", "bench/busybox", false);
    let reference = format!("{}/bench/busybox:v1", reg.host());
    let home = tempfile::Builder::new()
        .prefix("vmrs-rb")
        .tempdir_in("/tmp")
        .expect("home");
    let _guard = KillAll(home.path().to_path_buf());
    let store = ImageStore::open(home.path().join("images")).await.expect("store");
    store
        .pull(&reference, &PullOptions::default())
        .await
        .expect("pull");
    let assets = vm_rs::paths::assets_dir();
    let mgr = VmManager::with_home(home.path()).await.expect("manager");

    let (mut pull, mut cold, mut cached, mut boot, mut exec, mut total) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for i in 0..n {
        let t0 = Instant::now();
        let t = Instant::now();
        store
            .pull(&reference, &PullOptions::default())
            .await
            .expect("pull (stored)");
        pull.push(ms(t));
        // Cold: drop the cache so the rootfs is unpacked and built again.
        let _ = std::fs::remove_dir_all(vm_rs::rootfs::cache_dir(home.path()));
        let t = Instant::now();
        let rootfs = vm_rs::rootfs::build_rootfs(&store, home.path(), &reference)
            .await
            .expect("build");
        cold.push(ms(t));
        assert!(rootfs.built);
        let t = Instant::now();
        let hit = vm_rs::rootfs::build_rootfs(&store, home.path(), &reference)
            .await
            .expect("cached");
        cached.push(ms(t));
        assert!(!hit.built);

        let name = format!("rb{i}");
        let cfg = VmConfig::builder(&name)
            .kernel(assets.join("vmlinuz"))
            .initramfs(assets.join("initramfs.img"))
            .memory_mib(256)
            .build()
            .expect("config");
        let t = Instant::now();
        mgr.start_with_rootfs(cfg, &hit.path).await.expect("start");
        mgr.wait_ready(&name, Duration::from_secs(120))
            .await
            .expect("ready");
        boot.push(ms(t));
        let t = Instant::now();
        let out = mgr
            .exec(&name, hit.process.command(None).expect("command"))
            .await
            .expect("exec");
        exec.push(ms(t));
        assert!(out.status.success());
        mgr.stop(&name, Duration::from_secs(30)).await.expect("stop");
        mgr.remove(&name, true).await.expect("rm");
        total.push(ms(t0));
    }
    let (c, h) = (median(cold), median(cached));
    println!("run_image (n={n}, medians in ms)");
    println!("  pull (stored image)  {:>9.1}", median(pull));
    println!("  rootfs cold          {c:>9.1}");
    println!("  rootfs cached        {h:>9.3}");
    println!("  boot to ready        {:>9.1}", median(boot));
    println!("  exec image process   {:>9.1}", median(exec));
    println!("  round total          {:>9.1}", median(total));
    println!("  cold/cached rootfs ratio: {:.0}x", c / h);
}
