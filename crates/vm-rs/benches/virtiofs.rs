//! virtio-fs benchmark (not a test): one guest through `VmManager` gets the same data twice —
//! as a shared directory (virtiofsd, `cache=auto`) and as an ext4 image on a virtio-blk disk
//! (the baseline, built with `mkfs.ext4 -d` from the same directory) — and measures, in the
//! same run:
//!
//! * sequential read of a 200 MiB file (`dd bs=1M` to `/dev/null`),
//! * a metadata walk: `find` + `stat` over a 10,000-file tree,
//!
//! each with the guest's page cache dropped first (the host's stays warm for both), as the
//! median of `BENCH_N` runs (default 3), and prints the virtio-fs / virtio-blk ratios
//! (throughput ratio: > 1 means virtio-fs is faster).
//!
//! Run: `cargo bench -p vm-rs --bench virtiofs`. Needs `vmrs setup` assets whose initramfs
//! carries the agent and `virtiofs` module, virtiofsd, and `mkfs.ext4`.

use std::time::{Duration, Instant};
use vm_rs::agent::ExecCommand;
use vm_rs::config::DiskConfig;
use vm_rs::{SharedDir, VmConfig, VmManager};

const BIG_MIB: usize = 200;
const FILES: usize = 10_000;
const PER_DIR: usize = 100;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Kills the VM's processes even if a step below panics.
struct KillOnDrop(std::path::PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        vm_rs::process::kill_owned_by(&self.0);
    }
}

/// Seconds one guest shell command takes, timed from the host (the agent's round trip, a few
/// ms, is the same for both sides).
async fn timed(mgr: &VmManager, script: &str) -> f64 {
    let t = Instant::now();
    let out = mgr
        .exec("fsbench", ExecCommand::new(["sh", "-c", script]))
        .await
        .expect("exec");
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let assets = vm_rs::paths::assets_dir();
    let work = tempfile::Builder::new()
        .prefix("vmrs-fsb")
        .tempdir_in("/tmp")
        .expect("work dir");
    let data = work.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let mut block = vec![0u8; 1 << 20];
    let mut big = std::fs::File::create(data.join("big")).expect("big");
    for i in 0..BIG_MIB {
        // not all zeroes: nothing on the way can shortcut it
        block.iter_mut().enumerate().for_each(|(j, b)| *b = (i ^ j) as u8);
        std::io::Write::write_all(&mut big, &block).expect("write big");
    }
    drop(big);
    for i in 0..FILES {
        let dir = data.join(format!("tree/d{:03}", i / PER_DIR));
        if i % PER_DIR == 0 {
            std::fs::create_dir_all(&dir).expect("mkdir tree");
        }
        std::fs::write(dir.join(format!("f{i:05}")), format!("file {i}\n")).expect("write file");
    }
    // the baseline: the same tree in an ext4 image
    let image = work.path().join("data.ext4");
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d"])
        .arg(&data)
        .arg(&image)
        .arg(format!("{}M", BIG_MIB + 160))
        .status()
        .expect("mkfs.ext4");
    assert!(status.success(), "mkfs.ext4 failed");

    let home = work.path().join("home");
    let mgr = VmManager::with_home(&home).await.expect("manager");
    let cfg = VmConfig::builder("fsbench")
        .kernel(assets.join("vmlinuz"))
        .initramfs(assets.join("initramfs.img"))
        .memory_mib(512)
        .disk(DiskConfig {
            read_only: true,
            ..DiskConfig::new(&image)
        })
        .shared_dir(SharedDir {
            read_only: true,
            ..SharedDir::new(&data, "/fs", "vmrs0")
        })
        .build()
        .expect("config");
    let _guard = KillOnDrop(mgr.vm_dir("fsbench"));
    mgr.start(cfg).await.expect("start");
    mgr.wait_ready("fsbench", Duration::from_secs(180))
        .await
        .expect("ready");
    timed(&mgr, "mkdir -p /blk && mount -t ext4 -o ro /dev/vda /blk").await;

    let drop_caches = "sync; echo 3 > /proc/sys/vm/drop_caches";
    let read = |dir: &str| format!("{drop_caches}; dd if={dir}/big of=/dev/null bs=1M 2>/dev/null");
    let walk = |dir: &str| {
        format!("{drop_caches}; find {dir}/tree -type f | xargs stat -c %s | wc -l | grep -qx {FILES}")
    };
    let (mut fs_read, mut blk_read, mut fs_walk, mut blk_walk) = (vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        blk_read.push(timed(&mgr, &read("/blk")).await);
        fs_read.push(timed(&mgr, &read("/fs")).await);
        blk_walk.push(timed(&mgr, &walk("/blk")).await);
        fs_walk.push(timed(&mgr, &walk("/fs")).await);
    }
    let (fr, br, fw, bw) = (
        median(fs_read),
        median(blk_read),
        median(fs_walk),
        median(blk_walk),
    );
    let mib = BIG_MIB as f64;
    println!("virtio-fs bench (TCG guest, median of {n}; guest page cache dropped before each run)");
    println!(
        "  sequential read {BIG_MIB} MiB   virtio-fs {:7.1} MiB/s   virtio-blk {:7.1} MiB/s   ratio {:.2} (target >= 0.5)",
        mib / fr,
        mib / br,
        br / fr
    );
    println!(
        "  find + stat {FILES} files  virtio-fs {:7.2} s        virtio-blk {:7.2} s        ratio {:.2} (target >= 0.3)",
        fw,
        bw,
        bw / fw
    );
    let _ = mgr.kill("fsbench").await;
    let _ = mgr.remove("fsbench", true).await;
}
