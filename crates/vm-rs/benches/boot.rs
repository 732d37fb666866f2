//! Boot benchmark (not a test): boots the built-in guest N times through `VmManager` and N times
//! by running the very QEMU command line vm-rs generates by hand, alternating, and reports the
//! median boot-to-ready time of each and their ratio (target ≤ 1.05). A second phase measures
//! readiness detection latency: the time from the marker reaching the serial log (seen by a
//! spinning observer thread) to `wait_ready` returning (target ≤ 1 ms median). The observer is
//! itself a process competing for the CPU, so single samples can be negative (the manager saw
//! the marker first); the median is what is reported.
//!
//! Run: `cargo bench -p vm-rs --bench boot` (BENCH_N=5 by default). Needs `vmrs setup` assets.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vm_rs::config::Accel;
use vm_rs::console::{LogFollower, ReadinessParser};
use vm_rs::driver::qemu::{accel, args};
use vm_rs::{VmConfig, VmManager};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn config(name: &str, assets: &Path) -> VmConfig {
    VmConfig::builder(name)
        .kernel(assets.join("vmlinuz"))
        .initramfs(assets.join("initramfs.img"))
        .memory_mib(256)
        .build()
        .expect("config")
}

/// Raw QEMU with the same argument vector vm-rs builds; ready = marker seen via inotify.
async fn raw_boot(cfg: &VmConfig, dir: &Path, accel: Accel) -> Duration {
    let paths = args::QemuPaths::in_dir(dir, dir.join("serial.log"));
    std::fs::File::create(&paths.serial_log).expect("log");
    // The devices the manager gives this VM (agent port, entropy device).
    let home = dir.parent().expect("home");
    let devices = vm_rs::manager::plan_devices(
        cfg,
        dir,
        home,
        &vm_rs::manager::StartOptions::default(),
        &vm_rs::driver::qemu::QemuDriver::new(),
    )
    .expect("devices");
    let input = args::QemuArgsInput {
        config: cfg,
        accel,
        paths: &paths,
        devices: &devices,
        guest_params: &[],
        tsc_khz: vm_rs::host::cpu_khz(),
    };
    let argv = args::build(&input);
    let t0 = Instant::now();
    let mut child = std::process::Command::new("qemu-system-x86_64")
        .args(&argv)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu");
    let mut f = LogFollower::open(&paths.serial_log, 0).await.expect("follow");
    let mut p = ReadinessParser::new();
    let mut buf = vec![0u8; 8192];
    loop {
        let n = f.next_chunk(&mut buf).await.expect("read").expect("log");
        if p.feed(&buf[..n]).is_some() {
            break;
        }
    }
    let t = t0.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    t
}

async fn vmrs_boot(mgr: &VmManager, cfg: VmConfig) -> Duration {
    let name = cfg.name.clone();
    let t0 = Instant::now();
    mgr.start(cfg).await.expect("start");
    mgr.wait_ready(&name, Duration::from_secs(120))
        .await
        .expect("ready");
    let t = t0.elapsed();
    mgr.kill(&name).await.expect("kill");
    mgr.remove(&name, true).await.expect("rm");
    t
}

/// Spin on the serial log until the marker line is complete; returns when it was first seen.
fn spin_observer(path: PathBuf) -> std::thread::JoinHandle<Instant> {
    std::thread::spawn(move || {
        // cheap polling until the guest's init runs, then spin
        loop {
            let text = std::fs::read(&path).unwrap_or_default();
            if text.windows(9).any(|w| w == b"Run /init") {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        loop {
            let text = std::fs::read(&path).unwrap_or_default();
            let mut p = ReadinessParser::new();
            if p.feed(&text).is_some() {
                return Instant::now();
            }
            std::hint::spin_loop();
        }
    })
}

fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let assets = vm_rs::paths::assets_dir();
    if !assets.join("initramfs.img").is_file() {
        eprintln!(
            "boot bench: no guest assets in {} (run `vmrs setup`)",
            assets.display()
        );
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let home = tempfile::Builder::new().prefix("vmrs-b").tempdir_in("/tmp").expect("tmp");
        let mgr = VmManager::with_home(home.path()).await.expect("manager");
        let accel = accel::resolve(Accel::Auto).expect("accel").accel;
        let (mut raw, mut ours) = (Vec::new(), Vec::new());
        for i in 0..n {
            let rawdir = home.path().join(format!("raw{i}"));
            std::fs::create_dir_all(&rawdir).expect("dir");
            let cfg = config(&format!("raw{i}"), &assets);
            let (a, b) = if i % 2 == 0 {
                let a = raw_boot(&cfg, &rawdir, accel).await;
                (a, vmrs_boot(&mgr, config(&format!("b{i}"), &assets)).await)
            } else {
                let b = vmrs_boot(&mgr, config(&format!("b{i}"), &assets)).await;
                (raw_boot(&cfg, &rawdir, accel).await, b)
            };
            eprintln!("run {i}: raw qemu {:.3}s, vm-rs {:.3}s", a.as_secs_f64(), b.as_secs_f64());
            raw.push(a.as_secs_f64());
            ours.push(b.as_secs_f64());
        }
        // readiness detection latency
        let mut lat = Vec::new();
        for i in 0..n {
            let name = format!("lat{i}");
            let log = mgr.vm_dir(&name).join("serial.log");
            let cfg = config(&name, &assets);
            let started = mgr.start(cfg).await.expect("start");
            assert_eq!(started.serial_log, log);
            let obs = spin_observer(log);
            mgr.wait_ready(&name, Duration::from_secs(120)).await.expect("ready");
            let seen_ready = Instant::now();
            let seen_marker = obs.join().expect("observer");
            // signed: negative when the manager saw the marker before the spinning observer
            let l = if seen_ready >= seen_marker {
                seen_ready.duration_since(seen_marker).as_secs_f64() * 1e3
            } else {
                -(seen_marker.duration_since(seen_ready).as_secs_f64() * 1e3)
            };
            eprintln!("latency {i}: {l:.3} ms");
            lat.push(l);
            mgr.kill(&name).await.expect("kill");
            mgr.remove(&name, true).await.expect("rm");
        }
        let (mr, mo, ml) = (median(raw), median(ours), median(lat));
        println!("boot-to-ready median over {n} boots ({accel}): raw qemu {mr:.3}s, vm-rs {mo:.3}s, ratio {:.3} (target <= 1.05)", mo / mr);
        println!("readiness detection latency median: {ml:.3} ms (target <= 1 ms)");
        println!(
            "{}",
            serde_json::json!({"bench":"boot","n":n,"accel":accel.to_string(),"raw_median_s":mr,"vmrs_median_s":mo,"ratio":mo/mr,"ready_latency_median_ms":ml})
        );
    });
}
