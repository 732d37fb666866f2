//! `vmrs run -v HOST:GUEST[:ro]` with real guests: relative host paths, `ps`/`inspect` showing
//! the mounts, `:ro`, bad volumes refused before anything starts, and no virtiofsd outliving its
//! VM — after `stop`/`rm`, and after a kill -9 of both the foreground CLI and QEMU.

mod support;

use serde_json::Value;
use std::time::Duration;
use support::{row, wait_until, Home};

fn ok(home: &Home, args: &[&str]) -> String {
    let out = home.vmrs().args(args).output().expect("run vmrs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn owned(home: &Home, name: &str) -> Vec<u32> {
    vm_rs::process::owned_by(&home.0.path().join("vms").join(name))
        .iter()
        .map(|p| p.pid)
        .collect()
}

#[test]
fn bad_volumes_are_refused_before_anything_starts() {
    let home = Home::new();
    for (spec, words) in [
        ("/nonexistent/vmrs-share:/data", "shared directory not found"),
        ("/tmp", "invalid volume"),
        ("/tmp:relative", "guest path must be absolute"),
        ("/tmp:/a:rx:y", "invalid volume"),
        ("/tmp:/", "shared_dirs.guest_path"),
    ] {
        let out = home
            .vmrs()
            .args(["run", "-d", "--name", "bad", "-v", spec])
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{spec}: {err}");
        assert!(err.contains(words), "{spec}: {err}");
        assert!(!home.0.path().join("vms/bad").exists(), "{spec}");
    }
}

#[test]
fn volumes_are_mounted_shown_and_leave_nothing_behind() {
    let home = Home::new();
    let work = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(work.path().join("data")).expect("mkdir");
    std::fs::write(work.path().join("data/f.txt"), b"shared\n").expect("w");
    // a relative host path, resolved against the CLI's working directory
    let out = home
        .vmrs()
        .current_dir(work.path())
        .args([
            "run",
            "-d",
            "--name",
            "c1",
            "-v",
            "./data/../data:/data:ro",
            "-v",
            ".:/work",
        ])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = home.ps();
    let r = row(&rows, "c1");
    assert_eq!(r["state"], "ready");
    let mounts = r["mounts"].as_array().expect("mounts");
    assert_eq!(mounts.len(), 2);
    let host = work.path().join("data");
    assert!(
        std::path::Path::new(mounts[0]["host_path"].as_str().expect("host")).is_absolute(),
        "{mounts:?}"
    );
    assert_eq!(
        std::fs::canonicalize(mounts[0]["host_path"].as_str().expect("host")).expect("canon"),
        std::fs::canonicalize(&host).expect("canon")
    );
    assert_eq!(mounts[0]["guest_path"], "/data");
    assert_eq!(mounts[0]["read_only"], true);
    assert_eq!(mounts[0]["serving"], true);
    let table = ok(&home, &["ps"]);
    assert!(
        table.lines().next().unwrap_or_default().ends_with("MOUNTS"),
        "{table}"
    );
    assert!(table.contains(":/data:ro"), "{table}");
    let inspect: Value = serde_json::from_str(&ok(&home, &["inspect", "c1"])).expect("json");
    assert_eq!(inspect[0]["mounts"][1]["guest_path"], "/work");

    assert_eq!(ok(&home, &["exec", "c1", "cat", "/data/f.txt"]), "shared\n");
    let w = home
        .vmrs()
        .args(["exec", "c1", "sh", "-c", "echo x > /data/new"])
        .output()
        .expect("exec");
    assert!(!w.status.success());
    ok(
        &home,
        &["exec", "c1", "sh", "-c", "echo from-guest > /work/g.txt"],
    );
    assert_eq!(
        std::fs::read(work.path().join("g.txt")).expect("g"),
        b"from-guest\n"
    );
    assert!(!host.join("new").exists());

    let daemons = owned(&home, "c1");
    assert!(daemons.len() >= 3, "qemu and two daemons: {daemons:?}");
    ok(&home, &["stop", "-t", "30", "c1"]);
    assert!(owned(&home, "c1").is_empty(), "{:?}", owned(&home, "c1"));
    ok(&home, &["rm", "c1"]);
    assert!(!home.0.path().join("vms/c1").exists());
}

#[test]
fn kill_9_of_the_cli_and_qemu_leaves_no_virtiofsd() {
    let home = Home::new();
    let share = tempfile::tempdir().expect("tmp");
    let bin = assert_cmd::cargo::cargo_bin("vmrs");
    // a foreground run: the CLI watches the VM
    let mut cli = std::process::Command::new(bin)
        .args(["run", "--name", "c2", "-v"])
        .arg(format!("{}:/data", share.path().display()))
        .env("VMRS_HOME", home.0.path())
        .env("VMRS_ASSETS", support::assets_dir())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn vmrs run");
    let ready = wait_until(Duration::from_secs(120), || {
        home.ps()
            .iter()
            .any(|r| r["name"] == "c2" && r["state"] == "ready")
    });
    if !ready {
        let _ = cli.kill();
        panic!("c2 not ready: {:?}", home.ps());
    }
    let rows = home.ps();
    let qemu = row(&rows, "c2")["pid"].as_u64().expect("pid") as i32;
    assert!(owned(&home, "c2").len() >= 2, "qemu and its daemon");
    // SAFETY: kill(2) of our own child and of the VMM `ps` reported.
    unsafe {
        libc::kill(cli.id() as i32, libc::SIGKILL);
        libc::kill(qemu, libc::SIGKILL);
    }
    let _ = cli.wait();
    // a new `vmrs ps` reconciles: the VM failed, nothing of it runs
    assert!(wait_until(Duration::from_secs(20), || {
        let rows = home.ps();
        row(&rows, "c2")["state"] == "failed" && owned(&home, "c2").is_empty()
    }));
    assert!(!home.0.path().join("vms/c2/virtiofsd.json").exists());
    ok(&home, &["rm", "c2"]);
}

#[test]
fn a_daemon_killed_while_nobody_watches_fails_the_vm_at_the_next_ps() {
    let home = Home::new();
    let share = tempfile::tempdir().expect("tmp");
    let spec = format!("{}:/data", share.path().display());
    ok(&home, &["run", "-d", "--name", "c3", "-v", &spec]);
    let rec: Value = serde_json::from_slice(
        &std::fs::read(home.0.path().join("vms/c3/virtiofsd.json")).expect("virtiofsd.json"),
    )
    .expect("json");
    let pid = rec["daemons"][0]["pid"].as_u64().expect("pid") as i32;
    // the recorded daemon and its sandboxed worker
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    // SAFETY: kill(2) of the daemon the VM's record names and of its children.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        for c in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
            libc::kill(c, libc::SIGKILL);
        }
    }
    assert!(wait_until(Duration::from_secs(10), || !std::path::Path::new(
        &format!("/proc/{pid}/exe")
    )
    .exists()));
    let rows = home.ps();
    let r = row(&rows, "c3");
    assert_eq!(r["state"], "failed", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("virtiofsd of shared directory"), "{reason}");
    assert!(owned(&home, "c3").is_empty(), "{:?}", owned(&home, "c3"));
    ok(&home, &["rm", "c3"]);
}
