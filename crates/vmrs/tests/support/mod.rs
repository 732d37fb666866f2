//! Shared helpers for the CLI tests: an isolated data dir whose VMMs and switch sidecars are
//! killed on drop (even when the test fails), and the `vmrs` command pointed at it.
#![allow(dead_code)]

use assert_cmd::Command;
use serde_json::Value;

/// The guest assets `vmrs setup` wrote for the default data dir (tests use their own VMRS_HOME).
pub fn assets_dir() -> std::path::PathBuf {
    std::env::var_os("VMRS_ASSETS")
        .map(Into::into)
        .unwrap_or_else(|| dirs::data_dir().expect("data dir").join("vmrs").join("assets"))
}

/// An isolated VMRS_HOME (short path under /tmp: Unix socket paths are limited to 108 bytes).
pub struct Home(pub tempfile::TempDir);

impl Home {
    pub fn new() -> Self {
        Home(
            tempfile::Builder::new()
                .prefix("vmrs-c")
                .tempdir_in("/tmp")
                .expect("tmp"),
        )
    }

    /// `vmrs` with this home, the shared guest assets and an empty docker config.
    pub fn vmrs(&self) -> Command {
        let mut c = Command::cargo_bin("vmrs").expect("binary");
        c.env("VMRS_HOME", self.0.path())
            .env("VMRS_ASSETS", assets_dir())
            .env("DOCKER_CONFIG", self.0.path().join("docker"))
            .env_remove("RUST_LOG");
        c.timeout(std::time::Duration::from_secs(300));
        c
    }

    /// Run `vmrs ARGS`, require success and parse stdout as JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.vmrs().args(args).output().expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    }

    /// `vmrs ps -a --json` rows.
    pub fn ps(&self) -> Vec<Value> {
        serde_json::from_value(self.json(&["ps", "-a", "--json"])).expect("ps rows")
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        kill_recorded(self.0.path());
    }
}

/// Kill every VMM and switch sidecar recorded under the data dir `home`.
pub fn kill_recorded(home: &std::path::Path) {
    {
        if let Ok(rd) = std::fs::read_dir(home.join("vms")) {
            for e in rd.flatten() {
                // whatever the VM directory owns, recorded or not
                vm_rs::process::kill_owned_by(&e.path());
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
                // the serial log's sidecar ends with its VMM, or a minute after a start that
                // never launched one: do not leave it waiting
                let console = std::fs::read(e.path().join(vm_rs::console::capture::RECORD))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
                if let Some(c) = console {
                    if let (Some(pid), Some(st)) = (c["pid"].as_u64(), c["start_time"].as_u64()) {
                        if let Ok(p) = vm_rs::process::VmmProcess::attach(pid as u32, st) {
                            let _ = p.kill();
                        }
                    }
                }
            }
        }
        let nets = vm_rs::net::networks_dir(home);
        for n in vm_rs::net::sidecar::networks(&nets) {
            if let Some(r) = vm_rs::net::sidecar::switch_record(&nets, &n) {
                if let Ok(p) = vm_rs::process::VmmProcess::attach(r.pid, r.start_time) {
                    let _ = p.kill();
                }
            }
        }
    }
}

/// The `ps --json` row for `name`.
pub fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in ps: {rows:?}"))
}

/// Poll `cond` every 50 ms until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
