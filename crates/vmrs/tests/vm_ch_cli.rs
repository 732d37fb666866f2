//! `vmrs` on the Cloud Hypervisor backend with the real binary and the tiny PVH guest:
//! run -d, snapshot create, pause, resume, resize, device add/remove, counters, vmm-info, stop, rm.
//! Prints `skipped: cloud-hypervisor not found` when the binary is absent.

#[allow(dead_code)]
#[path = "../../vm-rs/tests/support/pvh_guest.rs"]
mod pvh_guest;

use assert_cmd::Command;
use std::path::Path;

/// Kills whatever VMM is recorded under the home when the test ends.
struct Home(tempfile::TempDir);

impl Drop for Home {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(self.0.path().join("vms")) else {
            return;
        };
        for e in rd.flatten() {
            let Ok(bytes) = std::fs::read(e.path().join("state.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
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

fn vmrs(home: &Path) -> Command {
    let mut c = Command::cargo_bin("vmrs").expect("vmrs binary");
    c.env("VMRS_HOME", home)
        .timeout(std::time::Duration::from_secs(60));
    c
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn ch_cli_verbs() {
    let Ok(binary) = vm_rs::driver::cloud_hypervisor::find_binary(None) else {
        println!("skipped: cloud-hypervisor not found");
        return;
    };
    let home = Home(
        tempfile::Builder::new()
            .prefix("vmrs-c")
            .tempdir_in("/tmp")
            .expect("tmp"),
    );
    let h = home.0.path();
    let guest = pvh_guest::write(h);
    let run = |args: &[&str]| {
        vmrs(h)
            .env("VMRS_CLOUD_HYPERVISOR", &binary)
            .args(args)
            .output()
            .expect("run vmrs")
    };

    let out = run(&[
        "run",
        "-d",
        "--backend",
        "cloud-hypervisor",
        "--memory",
        "128",
        "--name",
        "c1",
        // the backend takes no network attachments from the config yet
        "--net",
        "none",
        "--kernel",
    ]
    .iter()
    .copied()
    .chain([guest.to_str().expect("utf-8")])
    .collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out), "c1");

    let out = run(&["vmm-info", "c1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(info["state"], "Running");

    // The manager pauses the VM for Cloud Hypervisor's `vm.snapshot`; on a host whose KVM
    // cannot save vCPU state that fails with a clear error (backend error, exit 6) and the VM
    // runs on; else the snapshot exists whole and the VM is left paused.
    let out = run(&["snapshot", "create", "c1", "s1"]);
    match out.status.code() {
        Some(0) => {
            assert!(h.join("snapshots/s1/config.json").is_file());
            assert!(h.join("snapshots/s1/snapshot.json").is_file());
        }
        Some(6) => {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("snapshots need hardware KVM"), "{err}");
            assert!(!h.join("snapshots/s1").exists());
            assert!(run(&["pause", "c1"]).status.success());
        }
        other => panic!(
            "snapshot exit {other:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
    assert!(run(&["resume", "c1"]).status.success());

    let out = run(&["resize", "c1", "--cpus", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(run(&["resize", "c1"]).status.code(), Some(5));

    let img = h.join("d.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(4 << 20))
        .expect("img");
    let out = run(&["device", "add-disk", "c1", img.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = stdout(&out);
    assert!(!id.is_empty());
    let out = run(&["counters", "c1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("counters json");
    assert!(run(&["device", "remove", "c1", &id]).status.success());
    let out = run(&["device", "remove", "c1", "no-such-device"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));

    let out = run(&["stop", "--timeout", "1", "c1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(run(&["counters", "c1"]).status.code(), Some(1), "not running");
    assert!(run(&["rm", "c1"]).status.success());
}
