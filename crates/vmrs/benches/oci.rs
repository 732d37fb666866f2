//! Image pull and unpack benchmark, each against a baseline measured in the same run.
//!
//! * pull: `vmrs pull` vs `skopeo copy docker://… oci:…` of the same multi-layer image
//!   (≥ 50 MB, 6 gzip layers) from a local `docker-registry`, cold store / empty target each
//!   run. Target ratio ≤ 0.8.
//! * unpack: `vmrs image unpack` (all layers, whiteout-aware, confined, diff_ids verified) vs
//!   GNU `tar -xf` of each layer blob in order into an empty directory. Target ratio ≤ 1.0.
//!
//! Run with `cargo bench -p vmrs --bench oci` (`VMRS_BENCH_RUNS`, default 5). Prints medians
//! and ratios; it asserts nothing about time.

#![allow(clippy::unwrap_used)]

#[path = "../../vm-rs/tests/support/oci_layout.rs"]
mod oci_layout;
#[path = "../../vm-rs/tests/support/registry.rs"]
mod registry;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use oci_layout::{Comp, LayerBuilder};

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

fn noise(seed: u64, len: usize, text: bool) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if text {
                b"abcdefghijklmnopqrstuvwxyz0123456789 \n"[(x % 38) as usize]
            } else {
                x as u8
            }
        })
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// CPU time (user + system) used by finished children so far.
fn children_cpu() -> Duration {
    // SAFETY: getrusage writes one `rusage` into the zeroed struct we own.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

thread_local! {
    static CPU: std::cell::RefCell<Vec<(String, Duration)>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn run(cmd: &mut Command) -> Duration {
    let cpu0 = children_cpu();
    let t = Instant::now();
    let out = cmd.output().unwrap();
    let d = t.elapsed();
    let name = cmd
        .get_program()
        .to_string_lossy()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    CPU.with(|c| c.borrow_mut().push((name, children_cpu() - cpu0)));
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

fn vmrs(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmrs"));
    c.arg("--home")
        .arg(home)
        .env("DOCKER_CONFIG", home.join("docker"));
    c
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for tool in ["docker-registry", "skopeo", "tar"] {
        if !have(tool) {
            println!("bench oci: {tool} not installed (scripts/apt-packages.txt); skipped");
            return;
        }
    }
    let runs: usize = std::env::var("VMRS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);

    let reg = registry::Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let mut layers = Vec::new();
    for l in 0..6u64 {
        let mut b = LayerBuilder::new().dir(&format!("layer{l}"), 0o755);
        for f in 0..100u64 {
            b = b.file(
                &format!("layer{l}/bin{f}"),
                &noise(l * 1000 + f, 64 << 10, false),
                0o644,
            );
            b = b.file(
                &format!("layer{l}/txt{f}"),
                &noise(l * 1000 + f + 500, 64 << 10, true),
                0o644,
            );
        }
        layers.push(b.finish(Comp::Gzip));
    }
    let total: usize = layers.iter().map(|l| l.blob.len()).sum();
    oci_layout::single_image_layout(layout.path(), "v1", &layers, serde_json::json!({}));
    reg.push_layout(layout.path(), "v1", "bench/img", false);
    let reference = format!("{}/bench/img:v1", reg.host());
    println!(
        "image: {} layers, {:.1} MB compressed, {} runs each",
        layers.len(),
        total as f64 / 1e6,
        runs
    );

    // Pull, alternating which tool goes first.
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let home = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let mut a = vmrs(home.path());
        a.args(["pull", "-q", &reference]);
        let mut b = Command::new("skopeo");
        b.args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("oci:{}:v1", dest.path().join("layout").display()));
        if i % 2 == 0 {
            ours.push(run(&mut a));
            base.push(run(&mut b));
        } else {
            base.push(run(&mut b));
            ours.push(run(&mut a));
        }
    }
    let (po, pb) = (median(ours), median(base));
    print_cpu("pull");
    println!(
        "pull:   vmrs {:>8.1} ms   skopeo copy {:>8.1} ms   ratio {:.2} (target <= 0.8)",
        po.as_secs_f64() * 1e3,
        pb.as_secs_f64() * 1e3,
        po.as_secs_f64() / pb.as_secs_f64()
    );

    // Unpack the same layers.
    let home = tempfile::tempdir().unwrap();
    run(vmrs(home.path()).args(["pull", "-q", &reference]));
    let blobs: Vec<_> = layers
        .iter()
        .map(|l| home.path().join("images/blobs/sha256").join(&l.digest[7..]))
        .collect();
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let scratch = tempfile::tempdir_in(home.path()).unwrap();
        let (da, db) = (scratch.path().join("a"), scratch.path().join("b"));
        std::fs::create_dir_all(&db).unwrap();
        let unpack_ours = || run(vmrs(home.path()).args(["image", "unpack", &reference]).arg(&da));
        let unpack_tar = || {
            let t = Instant::now();
            for blob in &blobs {
                run(Command::new("tar").arg("-xf").arg(blob).arg("-C").arg(&db));
            }
            t.elapsed()
        };
        if i % 2 == 0 {
            ours.push(unpack_ours());
            base.push(unpack_tar());
        } else {
            base.push(unpack_tar());
            ours.push(unpack_ours());
        }
    }
    let (uo, ub) = (median(ours), median(base));
    print_cpu("unpack");
    println!(
        "unpack: vmrs {:>8.1} ms   GNU tar -x  {:>8.1} ms   ratio {:.2} (target <= 1.0)",
        uo.as_secs_f64() * 1e3,
        ub.as_secs_f64() * 1e3,
        uo.as_secs_f64() / ub.as_secs_f64()
    );
}

/// Median CPU time per program since the last call.
fn print_cpu(phase: &str) {
    let all = CPU.with(|c| std::mem::take(&mut *c.borrow_mut()));
    let mut names: Vec<&String> = all.iter().map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    for n in names {
        let v: Vec<Duration> = all.iter().filter(|(m, _)| m == n).map(|(_, d)| *d).collect();
        println!(
            "  {phase} cpu (user+sys, median per call) {n}: {:.1} ms",
            median(v).as_secs_f64() * 1e3
        );
    }
}
