//! `vmrs snapshot create|ls|inspect|rm`, `vmrs run --from`, `vmrs clone` with real guests, and
//! a `snapshot create` killed with SIGKILL at any moment: no snapshot (or a whole one), no
//! temporary directory left, and a VM that can still be resumed.

mod support;

use std::time::Duration;
use support::{row, Home};

fn ok(home: &Home, args: &[&str]) -> String {
    let out = home.vmrs().args(args).output().expect("run vmrs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(home: &Home, args: &[&str], code: i32) -> String {
    let out = home.vmrs().args(args).output().expect("run vmrs");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    err
}

fn snapshot_dirs(home: &Home) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(home.0.path().join("snapshots"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn create_ls_inspect_run_from_clone_and_rm() {
    let home = Home::new();
    ok(&home, &["run", "-d", "--name", "src"]);
    ok(&home, &["exec", "src", "--", "sh", "-c", "echo kept > /tmp/f"]);
    let made = home.json(&["snapshot", "create", "src", "s1", "--leave-running", "--json"]);
    assert_eq!(made["name"], "s1");
    assert_eq!(made["source_vm"], "src");
    assert_eq!(made["version"], 1);
    assert_eq!(row(&home.ps(), "src")["state"], "ready");
    let ls = home.json(&["snapshot", "ls", "--json"]);
    assert_eq!(ls.as_array().map(Vec::len), Some(1), "{ls}");
    assert_eq!(ls[0]["name"], "s1");
    assert!(ls[0]["disk_usage"].as_u64().unwrap_or(0) > 0);
    let table = ok(&home, &["snapshot", "ls"]);
    assert!(
        table.lines().nth(1).is_some_and(|l| l.starts_with("s1 ")),
        "{table}"
    );
    assert_eq!(home.json(&["snapshot", "inspect", "s1"])["cpus"], 1);

    // run --from: a normal VM, ready for exec, with the snapshot's files and its own name
    let r = home.json(&["run", "-d", "--from", "s1", "--name", "r1", "--json"]);
    assert_eq!(r["state"]["state"], "ready", "{r}");
    assert_eq!(ok(&home, &["exec", "r1", "--", "cat", "/tmp/f"]), "kept\n");
    assert_eq!(ok(&home, &["exec", "r1", "--", "hostname"]), "r1\n");
    // a different memory size is refused (exit 5), nothing is created
    let err = fails(
        &home,
        &["run", "-d", "--from", "s1", "--name", "r2", "-m", "512"],
        5,
    );
    assert!(err.contains("memory"), "{err}");
    assert!(home.ps().iter().all(|v| v["name"] != "r2"));
    fails(&home, &["run", "-d", "--from", "nope"], 3);

    // clone: N VMs, all ready when it returns
    let vms = home.json(&["clone", "s1", "--count", "2", "--prefix", "cl", "--json"]);
    assert_eq!(vms.as_array().map(Vec::len), Some(2), "{vms}");
    for n in ["cl-1", "cl-2"] {
        assert_eq!(row(&home.ps(), n)["state"], "ready");
        assert_eq!(ok(&home, &["exec", n, "--", "hostname"]), format!("{n}\n"));
    }

    // in use: refused (exit 4) until the restored VMs are gone
    let err = fails(&home, &["snapshot", "rm", "s1"], 4);
    assert!(err.contains("r1"), "{err}");
    ok(&home, &["rm", "-f", "r1", "cl-1", "cl-2"]);
    assert_eq!(ok(&home, &["snapshot", "rm", "s1"]), "s1\n");
    assert_eq!(home.json(&["snapshot", "ls", "--json"]), serde_json::json!([]));
    fails(&home, &["snapshot", "rm", "s1"], 3);
    fails(&home, &["snapshot", "create", "nope", "s2"], 3);
    assert!(snapshot_dirs(&home).is_empty());
    ok(&home, &["rm", "-f", "src"]);
}

#[test]
fn a_killed_snapshot_leaves_no_snapshot_and_a_resumable_vm() {
    let home = Home::new();
    ok(&home, &["run", "-d", "--name", "k"]);
    let bin = assert_cmd::cargo::cargo_bin("vmrs");
    let mut completed = 0;
    for delay_ms in [0u64, 20, 60, 150, 300, 500, 800, 1500] {
        let mut child = std::process::Command::new(&bin)
            .args(["snapshot", "create", "k", "s"])
            .env("VMRS_HOME", home.0.path())
            .env("VMRS_ASSETS", support::assets_dir())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn snapshot");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // a new process cleans up after the dead one: a whole snapshot or none, no temp dir
        let ls = home.json(&["snapshot", "ls", "--json"]);
        let dirs = snapshot_dirs(&home);
        assert!(
            dirs.iter().all(|d| !d.starts_with('.')),
            "after {delay_ms} ms: temporary snapshot left: {dirs:?}"
        );
        match ls.as_array().map(Vec::as_slice) {
            Some([]) => assert!(dirs.is_empty(), "{dirs:?}"),
            Some([s]) => {
                assert_eq!(s["name"], "s");
                let dir = home.0.path().join("snapshots/s");
                for f in ["snapshot.json", "vmstate", "memory"] {
                    assert!(dir.join(f).is_file(), "after {delay_ms} ms: {f} missing");
                }
                completed += 1;
                ok(&home, &["snapshot", "rm", "s"]);
            }
            other => panic!("after {delay_ms} ms: {other:?}"),
        }
        // the VM is paused or ready, and runs on once resumed
        let state = row(&home.ps(), "k")["state"].clone();
        match state.as_str() {
            Some("paused") => {
                ok(&home, &["resume", "k"]);
            }
            Some("ready") => {}
            other => panic!("after {delay_ms} ms the vm is {other:?}"),
        }
        assert_eq!(ok(&home, &["exec", "k", "--", "echo", "alive"]), "alive\n");
    }
    // and an unhurried snapshot still works afterwards
    ok(&home, &["snapshot", "create", "k", "final", "--leave-running"]);
    ok(&home, &["run", "-d", "--from", "final", "--name", "k2"]);
    assert_eq!(ok(&home, &["exec", "k2", "--", "echo", "restored"]), "restored\n");
    eprintln!("{completed} of the killed snapshots had completed before the kill");
    ok(&home, &["rm", "-f", "k", "k2"]);
    ok(&home, &["snapshot", "rm", "final"]);
}
