//! `vmrs run IMAGE -- sh -c true` warm vs cold (not a test), one run, the same image and machine:
//!
//! * cold: `run --rm --no-snapshot-cache IMAGE -- true` (boot to ready, exec, stop, remove);
//! * warm: `run --rm IMAGE -- true` once the warm-start entry exists (restore, exec, stop,
//!   remove);
//!
//! each the median wall time of the whole command over N runs (alternating, so drift in machine
//! load hits both alike), and their ratio (target <= 0.1 under TCG).
//!
//! Run: `cargo bench -p vmrs --bench warm` (BENCH_N=5 by default; BENCH_PROFILE=1 prints
//! each run's debug log, with timestamps, to see where the time goes). Needs the `vmrs setup`
//! assets (or VMRS_ASSETS) and Debian's `docker-registry`.

#[path = "../../vm-rs/tests/support/oci_layout.rs"]
mod oci_layout;
#[path = "../../vm-rs/tests/support/registry.rs"]
mod registry;

use std::process::Command;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
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
        serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}),
    );
    reg.push_layout(layout.path(), "v1", "bench/warm", false);
    let reference = format!("{}/bench/warm:v1", reg.host());
    let home = tempfile::Builder::new()
        .prefix("vmrs-wb")
        .tempdir_in("/tmp")
        .expect("home");
    let assets = std::env::var_os("VMRS_ASSETS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dirs::data_dir().expect("data dir").join("vmrs").join("assets"));
    let profile = std::env::var_os("BENCH_PROFILE").is_some();
    let run = |extra: &[&str]| -> f64 {
        let t = Instant::now();
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmrs"));
        if profile {
            c.env("RUST_LOG", "debug");
        } else {
            c.env_remove("RUST_LOG");
        }
        let out = c
            .env("VMRS_HOME", home.path())
            .env("VMRS_ASSETS", &assets)
            .env("DOCKER_CONFIG", home.path().join("docker"))
            .args(["run", "--rm"])
            .args(extra)
            .args([reference.as_str(), "--", "sh", "-c", "true"])
            .output()
            .expect("vmrs run");
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        assert!(
            out.status.success(),
            "vmrs run {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if profile {
            eprintln!(
                "--- vmrs run {extra:?}: {ms:.0} ms\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ms
    };
    // pull, rootfs build and the warm-start entry: neither side pays for them below
    let first = run(&[]);
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..n {
        cold.push(run(&["--no-snapshot-cache"]));
        warm.push(run(&[]));
    }
    let (c, w) = (median(cold), median(warm));
    println!("vmrs run IMAGE -- sh -c true (the test image has no `true` applet link), median of {n} runs (first run, pulling and saving: {first:.0} ms)");
    println!("  cold (--no-snapshot-cache)  {c:8.0} ms");
    println!("  warm (restored)             {w:8.0} ms");
    println!("  ratio warm/cold             {:8.3}  (target <= 0.1)", w / c);
}
