//! The `vmrs` binary against real QEMU guests: every invocation is a new process, so these tests
//! also cover reattaching (start detached in one process, list/pause/stop from others).

use assert_cmd::Command;
use serde_json::Value;
use std::path::Path;

/// The guest assets `vmrs setup` wrote for the default data dir (tests use their own VMRS_HOME).
fn assets_dir() -> std::path::PathBuf {
    std::env::var_os("VMRS_ASSETS")
        .map(Into::into)
        .unwrap_or_else(|| dirs::data_dir().expect("data dir").join("vmrs").join("assets"))
}

/// An isolated VMRS_HOME whose VMMs are killed on drop, even when the test fails.
struct Home(tempfile::TempDir);

impl Home {
    fn new() -> Self {
        Home(
            tempfile::Builder::new()
                .prefix("vmrs-c")
                .tempdir_in("/tmp")
                .expect("tmp"),
        )
    }
    fn vmrs(&self) -> Command {
        let mut c = Command::cargo_bin("vmrs").expect("binary");
        c.env("VMRS_HOME", self.0.path())
            .env("VMRS_ASSETS", assets_dir())
            .env_remove("RUST_LOG");
        c.timeout(std::time::Duration::from_secs(180));
        c
    }
    fn ps(&self) -> Vec<Value> {
        let out = self.vmrs().args(["ps", "-a", "--json"]).output().expect("ps");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("json")
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(self.0.path().join("vms")) else {
            return;
        };
        for e in rd.flatten() {
            let Ok(b) = std::fs::read(e.path().join("state.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<Value>(&b) else {
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

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in ps: {rows:?}"))
}

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
    home.vmrs()
        .args(["run", "-d", "--accel", "warp"])
        .assert()
        .code(5);
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
            if line.starts_with("VMRS_READY") {
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
