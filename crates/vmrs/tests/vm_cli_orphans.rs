//! Issue 16, invariants 1 and 2 through the CLI with real guests: a VMM no record names is
//! found from its VM directory, shown truthfully and killed; verbs on one VM serialise (`rm -f`
//! racing a start leaves nothing); a damaged record shows as `damaged` beside healthy VMs and
//! `rm -f` removes it and kills its VMM.

mod support;

use serde_json::Value;
use std::path::Path;
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

fn vm_dir(home: &Home, name: &str) -> std::path::PathBuf {
    home.0.path().join("vms").join(name)
}

fn state_json(home: &Home, name: &str) -> Value {
    let b = std::fs::read(vm_dir(home, name).join("state.json")).expect("state.json");
    serde_json::from_slice(&b).expect("state json")
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !matches!(
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.trim_start().chars().next()),
                Some('Z' | 'X')
            )
        })
        .unwrap_or(false)
}

/// Rewrite `name`'s record as its starter left it had it been killed right after spawning the
/// VMM: `starting`, no VMM recorded (no process holds its locks: the CLI that started it exited).
fn forget_the_vmm(home: &Home, name: &str) -> u64 {
    let mut rec = state_json(home, name);
    let pid = rec["handle"]["pid"].as_u64().expect("recorded pid");
    rec["state"] = serde_json::to_value(vm_rs::VmState::Starting).expect("state");
    rec["handle"] = Value::Null;
    std::fs::write(vm_dir(home, name).join("state.json"), rec.to_string()).expect("write");
    pid
}

/// Live processes running in the VM directory `dir` (QEMU runs with it as its working
/// directory), found without the manager's own bookkeeping.
fn owned(dir: &Path) -> Vec<u32> {
    let deleted = format!("{} (deleted)", dir.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) else {
            continue;
        };
        if (cwd == dir || cwd.as_os_str() == deleted.as_str()) && alive(u64::from(pid)) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_vmm_no_record_names_is_found_from_its_directory_shown_and_killed() {
    let home = Home::new();
    ok(&home, &["run", "-d", "--name", "seen"]);
    ok(&home, &["run", "-d", "--name", "removed"]);
    let seen = forget_the_vmm(&home, "seen");
    let removed = forget_the_vmm(&home, "removed");
    assert!(alive(seen) && alive(removed));

    // ps finds the starter gone and the VMM alive: the VM is failed, says why, and the VMM
    // that nothing tracked any more is killed.
    let rows = home.ps();
    let r = row(&rows, "seen");
    assert_eq!(r["state"], "failed", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("pid {seen}")) && reason.contains("killed"),
        "{reason}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !alive(seen)),
        "vmm {seen} still runs"
    );
    assert!(owned(&vm_dir(&home, "seen")).is_empty());
    ok(&home, &["rm", "seen"]);

    // rm -f straight away: the VMM goes with the directory.
    ok(&home, &["rm", "-f", "removed"]);
    assert!(!vm_dir(&home, "removed").exists());
    assert!(
        wait_until(Duration::from_secs(10), || !alive(removed)),
        "vmm {removed} still runs"
    );
    assert!(home.ps().is_empty());
}

#[test]
fn a_damaged_record_is_listed_beside_healthy_vms_and_rm_f_kills_its_vmm() {
    let home = Home::new();
    ok(&home, &["run", "-d", "--name", "healthy"]);
    ok(&home, &["run", "-d", "--name", "broken"]);
    let broken = state_json(&home, "broken")["handle"]["pid"]
        .as_u64()
        .expect("pid");
    // truncated mid-write by something outside vm-rs
    let path = vm_dir(&home, "broken").join("state.json");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
    // a directory with garbage config and no state record at all
    let husk = vm_dir(&home, "husk");
    std::fs::create_dir(&husk).expect("mkdir");
    std::fs::write(husk.join("config.json"), b"\x00\x01garbage").expect("write");

    let rows = home.ps();
    assert_eq!(row(&rows, "healthy")["state"], "ready", "{rows:?}");
    let b = row(&rows, "broken");
    assert_eq!(b["state"], "damaged", "{b}");
    assert!(
        b["reason"].as_str().unwrap_or_default().contains("state.json"),
        "{b}"
    );
    assert_eq!(b["pid"].as_u64(), Some(broken), "the VMM its directory owns: {b}");
    assert_eq!(row(&rows, "husk")["state"], "damaged", "{rows:?}");
    // shown without -a too (it needs attention), and in the table
    let table = ok(&home, &["ps"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("broken") && l.contains("damaged")),
        "{table}"
    );
    let inspected = home.json(&["inspect", "broken"]);
    assert_eq!(inspected[0]["state"], "damaged", "{inspected}");

    // plain rm refuses while its VMM runs; rm -f removes it and kills the VMM
    let out = home.vmrs().args(["rm", "broken"]).output().expect("rm");
    assert!(!out.status.success());
    assert!(alive(broken));
    ok(&home, &["rm", "-f", "broken"]);
    assert!(
        wait_until(Duration::from_secs(10), || !alive(broken)),
        "vmm {broken} still runs"
    );
    assert!(!vm_dir(&home, "broken").exists());
    ok(&home, &["rm", "husk"]);
    assert!(!husk.exists());
    let rows = home.ps();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(row(&rows, "healthy")["state"], "ready");
    ok(&home, &["rm", "-f", "healthy"]);
}

/// A damaged record whose VMM still runs keeps its network: a new manager (here `ps`) must
/// not reconcile its switch membership away (which would stop the switch under a running
/// guest); `rm -f` then removes the VM and the switch with it.
#[test]
fn a_damaged_vm_with_a_live_vmm_keeps_its_switch_until_removed() {
    let home = Home::new();
    ok(&home, &["run", "-d", "--name", "hurt", "--net", "switch=dmg"]);
    let nets = home.json(&["network", "ls", "--json"]);
    let switch = nets[0]["switch_pid"].as_u64().expect("switch pid");
    let path = vm_dir(&home, "hurt").join("state.json");
    std::fs::write(&path, b"{\"truncated").expect("damage");
    for _ in 0..2 {
        let rows = home.ps();
        assert_eq!(row(&rows, "hurt")["state"], "damaged", "{rows:?}");
    }
    let nets = home.json(&["network", "ls", "--json"]);
    assert_eq!(nets[0]["members"][0], "hurt", "{nets}");
    assert_eq!(nets[0]["running"], true, "{nets}");
    assert!(alive(switch), "the switch of a running guest was stopped");
    ok(&home, &["rm", "-f", "hurt"]);
    assert!(
        wait_until(Duration::from_secs(10), || !alive(switch)),
        "switch {switch} outlived its last VM"
    );
    let nets = home.json(&["network", "ls", "--json"]);
    assert_eq!(nets.as_array().map(Vec::len), Some(0), "{nets}");
}

#[test]
fn rm_f_racing_a_start_leaves_no_vmm_and_no_directory() {
    let home = Home::new();
    let dir = vm_dir(&home, "race");
    for delay_ms in [0u64, 100, 300, 700] {
        let run = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmrs"))
            .env("VMRS_HOME", home.0.path())
            .env("VMRS_ASSETS", support::assets_dir())
            .args(["run", "-d", "--name", "race"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn run");
        let mut run = run;
        std::thread::sleep(Duration::from_millis(delay_ms));
        // rm -f may find nothing yet (not created), else it waits for the start and removes
        let _ = home.vmrs().args(["rm", "-f", "race"]).output().expect("rm");
        let _ = run.wait();
        // Whatever won, nothing runs that no record tracks, and the VM can be removed.
        if dir.exists() {
            let rows = home.ps();
            let r = row(&rows, "race");
            let pid = r["pid"].as_u64();
            let procs = owned(&dir);
            assert!(
                procs.iter().all(|p| Some(u64::from(*p)) == pid),
                "delay {delay_ms}: untracked processes {procs:?} for {r}"
            );
            ok(&home, &["rm", "-f", "race"]);
        }
        assert!(!dir.exists(), "delay {delay_ms}");
        assert!(
            wait_until(Duration::from_secs(10), || owned(&dir).is_empty()),
            "delay {delay_ms}: {:?} outlived the vm",
            owned(&dir)
        );
    }
}
