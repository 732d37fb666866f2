//! `vmrs` networking flags against real guests: published ports shown by `ps` and bound on the
//! host, switch networks listed by `vmrs network` and stopped with their last VM, bad specs
//! rejected with exit code 5.

use assert_cmd::Command;
use serde_json::Value;
use std::time::Duration;

fn assets_dir() -> std::path::PathBuf {
    std::env::var_os("VMRS_ASSETS")
        .map(Into::into)
        .unwrap_or_else(|| dirs::data_dir().expect("data dir").join("vmrs").join("assets"))
}

/// An isolated VMRS_HOME whose VMMs and switch sidecars are killed on drop.
struct Home(tempfile::TempDir);

impl Home {
    fn new() -> Self {
        Home(
            tempfile::Builder::new()
                .prefix("vmrs-n")
                .tempdir_in("/tmp")
                .expect("tmp"),
        )
    }
    fn vmrs(&self) -> Command {
        let mut c = Command::cargo_bin("vmrs").expect("binary");
        c.env("VMRS_HOME", self.0.path())
            .env("VMRS_ASSETS", assets_dir())
            .env_remove("RUST_LOG");
        c.timeout(Duration::from_secs(180));
        c
    }
    fn json(&self, args: &[&str]) -> Value {
        let out = self.vmrs().args(args).output().expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let vms = self.0.path().join("vms");
        if let Ok(rd) = std::fs::read_dir(vms) {
            for e in rd.flatten() {
                let Ok(b) = std::fs::read(e.path().join("state.json")) else {
                    continue;
                };
                let Ok(v) = serde_json::from_slice::<Value>(&b) else {
                    continue;
                };
                if let (Some(pid), Some(st)) =
                    (v["handle"]["pid"].as_u64(), v["handle"]["start_time"].as_u64())
                {
                    if let Ok(p) = vm_rs::process::VmmProcess::attach(pid as u32, st) {
                        let _ = p.kill();
                    }
                }
            }
        }
        let nets = vm_rs::net::networks_dir(self.0.path());
        for n in vm_rs::net::sidecar::networks(&nets) {
            if let Some(r) = vm_rs::net::sidecar::switch_record(&nets, &n) {
                if let Ok(p) = vm_rs::process::VmmProcess::attach(r.pid, r.start_time) {
                    let _ = p.kill();
                }
            }
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn published_port_is_listed_and_bound() {
    let home = Home::new();
    let port = free_port();
    let spec = format!("{port}:80");
    home.vmrs()
        .args(["run", "-d", "--name", "web", "-p", &spec])
        .assert()
        .success();
    let rows = home.json(&["ps", "--json"]);
    let row = rows
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "web"))
        .expect("web in ps");
    assert_eq!(row["ip"], "10.0.2.15");
    assert_eq!(row["ports"][0], format!("127.0.0.1:{port}->80/tcp"));
    let table = home.vmrs().args(["ps"]).output().expect("ps");
    assert!(String::from_utf8_lossy(&table.stdout).contains(&format!("127.0.0.1:{port}->80/tcp")));
    // QEMU listens on the published port
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    home.vmrs().args(["rm", "-f", "web"]).assert().success();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn switch_network_lives_with_its_vms() {
    let home = Home::new();
    home.vmrs()
        .args(["run", "-d", "--name", "s1", "--net", "switch=lab"])
        .assert()
        .success();
    let nets = home.json(&["network", "ls", "--json"]);
    assert_eq!(nets[0]["name"], "lab");
    assert_eq!(nets[0]["running"], true);
    assert_eq!(nets[0]["members"][0], "s1");
    let pid = nets[0]["switch_pid"].as_u64().expect("pid");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    // the switch outlives the CLI process that started it: inspect reads its counters
    std::thread::sleep(Duration::from_millis(1500));
    let ports = home.json(&["network", "inspect", "lab"]);
    assert!(ports.is_array());
    home.vmrs().args(["rm", "-f", "s1"]).assert().success();
    let nets = home.json(&["network", "ls", "--json"]);
    assert_eq!(nets.as_array().map(Vec::len), Some(0), "{nets}");
    home.vmrs().args(["network", "inspect", "lab"]).assert().code(3);
}

#[test]
fn bad_network_specs_exit_with_code_5() {
    let home = Home::new();
    for args in [
        &["run", "-d", "--name", "x", "--net", "bogus"][..],
        &["run", "-d", "--name", "x", "-p", "99999:80"][..],
        &["run", "-d", "--name", "x", "--net", "none", "-p", "8080:80"][..],
        &["run", "-d", "--name", "x", "--net", "bridge=br0"][..],
    ] {
        home.vmrs().args(args).assert().code(5);
    }
    assert!(home
        .json(&["ps", "-a", "--json"])
        .as_array()
        .is_some_and(Vec::is_empty));
}
