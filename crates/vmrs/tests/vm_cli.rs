//! The `vmrs` binary against real QEMU guests: every invocation is a new process, so these tests
//! also cover reattaching (start detached in one process, list/pause/stop from others).

mod support;
use serde_json::Value;
use std::path::Path;
use support::*;

#[test]
fn run_detached_then_ps_pause_resume_stop_from_other_processes() {
    let home = Home::new();
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "c1"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "c1");

    let rows = home.ps();
    let r = row(&rows, "c1");
    assert_eq!(r["state"], "ready");
    // `vmrs run` attaches user-mode NAT by default: the guest announces its slirp address
    assert_eq!(r["ip"], "10.0.2.15");
    assert_eq!(r["backend"], "qemu");
    let pid = r["pid"].as_u64().expect("pid");
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    home.vmrs().args(["pause", "c1"]).assert().success();
    assert_eq!(row(&home.ps(), "c1")["state"], "paused");
    // pausing twice is a state conflict (exit code 4)
    home.vmrs().args(["pause", "c1"]).assert().code(4);
    home.vmrs().args(["resume", "c1"]).assert().success();
    assert_eq!(row(&home.ps(), "c1")["state"], "ready");

    let inspect = home.vmrs().args(["inspect", "c1"]).output().expect("inspect");
    let v: Value = serde_json::from_slice(&inspect.stdout).expect("inspect json");
    assert_eq!(v[0]["config"]["name"], "c1");

    home.vmrs()
        .args(["stop", "--timeout", "60", "c1"])
        .assert()
        .success();
    let rows = home.ps();
    assert_eq!(row(&rows, "c1")["state"], "stopped");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            // a zombie reaped by init later is fine; it must not be running
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
        }
    );
    let logs = home.vmrs().args(["logs", "c1"]).output().expect("logs");
    assert!(String::from_utf8_lossy(&logs.stdout).contains("VMRS_READY 10.0.2.15"));
    // live-only ps hides it, -a shows it
    let live = home.vmrs().args(["ps", "--json"]).output().expect("ps");
    assert_eq!(
        serde_json::from_slice::<Vec<Value>>(&live.stdout)
            .expect("json")
            .len(),
        0
    );
    home.vmrs().args(["rm", "c1"]).assert().success();
    assert!(home.ps().is_empty());
    home.vmrs().args(["rm", "c1"]).assert().code(3);
}

#[test]
fn bad_input_exits_with_codes_and_leaves_nothing() {
    let home = Home::new();
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "../x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid vm name"));
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "k", "--kernel", "/nonexistent/vmlinuz"])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("kernel not found"));
    home.vmrs()
        .args(["run", "-d", "--name", "m", "--memory", "0"])
        .assert()
        .code(5);
    // a value outside a flag's choices is a usage error
    home.vmrs()
        .args(["run", "-d", "--accel", "warp"])
        .assert()
        .code(2);
    home.vmrs().args(["stop", "nosuchvm"]).assert().code(3);
    home.vmrs().args(["frobnicate"]).assert().code(2);
    assert!(home.ps().is_empty());
    let vms = std::fs::read_dir(home.0.path().join("vms"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(vms, 0);
}

#[test]
fn foreground_run_streams_console_and_stops_on_sigint() {
    let home = Home::new();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmrs"))
        .args(["run", "--name", "fg"])
        .env("VMRS_HOME", home.0.path())
        .env("VMRS_ASSETS", assets_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if vm_rs::console::parse_marker_line(line.as_bytes()).is_some() {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(std::time::Duration::from_secs(120))
        .expect("console shows the marker");
    // Ctrl-C → graceful stop → exit 0
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    assert_eq!(row(&home.ps(), "fg")["state"], "stopped");
}

#[test]
fn exec_and_cp_on_a_detached_vm() {
    use std::os::unix::fs::PermissionsExt;
    let home = Home::new();
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "ex"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "run: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // stdout/stderr separated, stdin piped (-i), env and workdir applied, the exit code passed on.
    let out = home
        .vmrs()
        .args([
            "exec",
            "-i",
            "-e",
            "GREETING=hello there",
            "-w",
            "/tmp",
            "ex",
            "--",
        ])
        .args(["sh", "-c", "echo \"$GREETING from $(pwd)\"; cat >&2; exit 5"])
        .write_stdin("piped-in")
        .output()
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello there from /tmp\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "piped-in");
    assert_eq!(out.status.code(), Some(5));
    // Killed by a signal: 128 + signal.
    let out = home
        .vmrs()
        .args(["exec", "ex", "--", "sh", "-c", "kill -KILL $$"])
        .output()
        .expect("exec");
    assert_eq!(out.status.code(), Some(128 + 9));

    // cp round trip of a directory, modes kept.
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("data");
    std::fs::create_dir_all(src.join("bin")).expect("mkdir");
    std::fs::write(src.join("bin/tool"), b"#!/bin/sh\necho tool ran\n").expect("write");
    std::fs::write(src.join("note"), b"note\n").expect("write");
    std::fs::set_permissions(src.join("bin/tool"), std::fs::Permissions::from_mode(0o750)).expect("chmod");
    std::fs::set_permissions(src.join("note"), std::fs::Permissions::from_mode(0o604)).expect("chmod");
    let out = home
        .vmrs()
        .args(["cp"])
        .arg(&src)
        .arg("ex:/tmp")
        .output()
        .expect("cp in");
    assert!(
        out.status.success(),
        "cp in: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = home
        .vmrs()
        .args(["exec", "ex", "--", "/tmp/data/bin/tool"])
        .output()
        .expect("exec tool");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "tool ran\n");
    let back = tmp.path().join("back");
    let out = home
        .vmrs()
        .args(["cp", "ex:/tmp/data"])
        .arg(&back)
        .output()
        .expect("cp out");
    assert!(
        out.status.success(),
        "cp out: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(std::fs::read(back.join("note")).expect("read"), b"note\n");
    assert_eq!(mode(&back.join("note")), 0o604);
    assert_eq!(mode(&back.join("bin/tool")), 0o750);
    // Neither side a VM path: a usage error, code 5.
    let out = home.vmrs().args(["cp", "/a", "/b"]).output().expect("cp");
    assert_eq!(out.status.code(), Some(5));

    let out = home.vmrs().args(["rm", "-f", "ex"]).output().expect("rm");
    assert!(
        out.status.success(),
        "rm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ready_timeout_kills_the_vm_and_shows_its_console() {
    let home = Home::new();
    // a guest cannot reach its marker in well under a second under TCG
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "slow", "--ready-timeout", "0"])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not become ready"), "{stderr}");
    let rows = home.ps();
    assert_eq!(row(&rows, "slow")["state"], "stopped");
    assert!(row(&rows, "slow")["pid"].is_null());
}
