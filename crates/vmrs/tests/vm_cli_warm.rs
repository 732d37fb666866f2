//! Image warm start: `vmrs run IMAGE -- CMD` saves a ready-state snapshot on its first run and
//! restores it on later runs, against a real local registry and real TCG guests.

#[path = "../../vm-rs/tests/support/oci_layout.rs"]
mod oci_layout;
#[path = "../../vm-rs/tests/support/registry.rs"]
mod registry;
mod support;

use oci_layout::{busybox_layer, Comp};
use registry::Registry;
use serde_json::Value;
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::Path;
use support::*;

/// Push a busybox image with this env to `repo:tag`; returns the reference.
fn push(reg: &Registry, repo: &str, tag: &str, greeting: &str) -> String {
    let layout = tempfile::tempdir().expect("tmp");
    let (layer, _) = busybox_layer(Comp::Gzip);
    oci_layout::single_image_layout(
        layout.path(),
        tag,
        &[layer],
        serde_json::json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin", format!("GREETING={greeting}")], "WorkingDir": "/etc"}),
    );
    reg.push_layout(layout.path(), tag, repo, false);
    format!("{}/{repo}:{tag}", reg.host())
}

fn home() -> Home {
    Home(
        tempfile::Builder::new()
            .prefix("vmrs-w")
            .tempdir_in("/tmp")
            .expect("tmp"),
    )
}

struct Run {
    stdout: String,
    stderr: String,
    code: Option<i32>,
    /// The `--json` start line.
    start: Value,
}

fn run(home: &Home, name: &str, extra: &[&str], reference: &str, cmd: &str) -> Run {
    let out = home
        .vmrs()
        .args(["--verbose", "run", "--rm", "--json", "--name", name])
        .args(extra)
        .args([reference, "--", "sh", "-c", cmd])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let start = stderr
        .lines()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v.get("start").is_some())
        })
        .unwrap_or_else(|| panic!("no start line in stderr: {stderr}"));
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr,
        code: out.status.code(),
        start,
    }
}

/// Warm-start entries (snapshot dirs named image-warm-*) and their files' sha256.
fn entries(home: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(home.join("snapshots")) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("image-warm-") {
            continue;
        }
        let mut files = BTreeMap::new();
        for f in std::fs::read_dir(e.path()).expect("entry").flatten() {
            let bytes = std::fs::read(f.path()).expect("read");
            files.insert(
                f.file_name().to_string_lossy().to_string(),
                hex::encode(sha2::Sha256::digest(&bytes)),
            );
        }
        out.insert(name, files);
    }
    out
}

fn df_row(home: &Home, kind: &str) -> Value {
    let rows = home.json(&["system", "df", "--json"]);
    rows.as_array()
        .expect("rows")
        .iter()
        .find(|r| r["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} row: {rows}"))
        .clone()
}

#[test]
fn second_run_restores_with_the_images_env_and_the_commands_code() {
    let reg = Registry::start();
    let reference = push(&reg, "warm/busybox", "v1", "first");
    let home = home();
    let cmd = "echo \"$GREETING in $(pwd)\"; echo side >&2; touch /made-by-cmd; exit 7";

    let cold = run(&home, "w1", &[], &reference, cmd);
    assert_eq!(cold.start["start"], "booted", "{}", cold.stderr);
    assert_eq!(cold.start["saved"], true, "{}", cold.stderr);
    assert_eq!(cold.stdout, "first in /etc\n", "{}", cold.stderr);
    assert_eq!(cold.code, Some(7));
    let before = entries(home.0.path());
    assert_eq!(before.len(), 1, "{before:?}");
    let entry = before.keys().next().expect("entry").clone();
    assert_eq!(cold.start["cache"], entry.as_str());

    let warm = run(
        &home,
        "w2",
        &[],
        &reference,
        &format!("test -e /made-by-cmd && echo leaked; {cmd}"),
    );
    assert_eq!(warm.start["start"], "restored", "{}", warm.stderr);
    assert!(warm.stderr.contains("warm start"), "{}", warm.stderr);
    assert_eq!(warm.stdout, "first in /etc\n", "{}", warm.stderr);
    assert!(warm.stderr.contains("side"), "{}", warm.stderr);
    assert_eq!(warm.code, Some(7));
    // the restore wrote nothing of the entry
    assert_eq!(entries(home.0.path()), before);

    // opted out: boots, and saves nothing
    let opt_out = run(&home, "w3", &["--no-snapshot-cache"], &reference, "exit 0");
    assert_eq!(opt_out.start["start"], "booted", "{}", opt_out.stderr);
    assert_eq!(opt_out.start["saved"], false);
    assert_eq!(opt_out.code, Some(0));
    assert!(
        opt_out.stderr.contains("--no-snapshot-cache"),
        "{}",
        opt_out.stderr
    );

    let row = df_row(&home, "warm-cache");
    assert_eq!(row["count"], 1, "{row}");
    assert!(row["reclaimable"].as_u64().expect("bytes") > 0, "{row}");

    // the tag moves to a different image: the old entry is not used, a new one is saved
    let moved = push(&reg, "warm/busybox", "v1", "second");
    assert_eq!(moved, reference);
    home.vmrs().args(["pull", &reference]).assert().success();
    let after_move = run(&home, "w4", &[], &reference, "echo $GREETING");
    assert_eq!(after_move.start["start"], "booted", "{}", after_move.stderr);
    assert_eq!(after_move.stdout, "second\n");
    let now = entries(home.0.path());
    assert_eq!(now.len(), 2, "{now:?}");
    assert_ne!(after_move.start["cache"], entry.as_str());
    let again = run(&home, "w5", &[], &reference, "echo $GREETING");
    assert_eq!(again.start["start"], "restored", "{}", again.stderr);
    assert_eq!(again.stdout, "second\n");

    // prune removes the entries (no VM was restored from them: --rm removed those)
    home.vmrs().args(["system", "prune"]).assert().success();
    assert!(entries(home.0.path()).is_empty());
    assert_eq!(df_row(&home, "warm-cache")["count"], 0);
}

#[test]
fn two_first_runs_at_once_both_succeed_and_leave_one_entry() {
    let reg = Registry::start();
    let reference = push(&reg, "warm/race", "v1", "race");
    let home = home();
    home.vmrs().args(["pull", &reference]).assert().success();
    let runs: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = ["r1", "r2"]
            .iter()
            .map(|n| {
                let (home, reference) = (&home, &reference);
                s.spawn(move || run(home, n, &[], reference, "echo $GREETING; exit 4"))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for r in &runs {
        assert_eq!(r.stdout, "race\n", "{}", r.stderr);
        assert_eq!(r.code, Some(4));
    }
    let e = entries(home.0.path());
    assert_eq!(e.len(), 1, "{e:?}");
    // no temporary directory left, and the entry restores
    let leftovers: Vec<_> = std::fs::read_dir(home.0.path().join("snapshots"))
        .expect("snapshots")
        .flatten()
        .map(|d| d.file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with("image-warm-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let warm = run(&home, "r3", &[], &reference, "echo $GREETING");
    assert_eq!(warm.start["start"], "restored", "{}", warm.stderr);
    assert_eq!(warm.stdout, "race\n");
}

/// kill -9 of `vmrs run` the moment its first run starts saving the warm entry: no half entry
/// is ever listed or restored, the VM it left can be resumed and used, and the next run of the
/// image works — restoring the entry if the kill came after it was published whole, else
/// booting and saving it.
#[test]
fn kill_9_while_the_first_run_saves_leaves_no_half_entry() {
    let reg = Registry::start();
    let reference = push(&reg, "warm/kill", "v1", "killed");
    let home = home();
    home.vmrs().args(["pull", &reference]).assert().success();
    let snaps = home.0.path().join("snapshots");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmrs"))
        .env("VMRS_HOME", home.0.path())
        .env("VMRS_ASSETS", assets_dir())
        .env("DOCKER_CONFIG", home.0.path().join("docker"))
        .env_remove("RUST_LOG")
        .args([
            "run", "--rm", "--name", "k1", &reference, "--", "sh", "-c", "echo hi",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn vmrs run");
    // a tight poll: the save takes a fraction of a second
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let saving = loop {
        let tmp = std::fs::read_dir(&snaps).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        });
        if tmp || std::time::Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            break tmp;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(saving, "the first run never started saving its warm entry");
    let published = entries(home.0.path());
    assert!(published.len() <= 1, "{published:?}");
    // the VM the killed run left is listed; paused by the save, it resumes and runs commands
    let rows = home.ps();
    let state = row(&rows, "k1")["state"].as_str().expect("state").to_string();
    if state == "paused" {
        home.vmrs().args(["resume", "k1"]).assert().success();
    }
    let out = home
        .vmrs()
        .args(["exec", "k1", "--", "echo", "alive"])
        .output()
        .expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "alive\n",
        "state {state}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "killed with {} entries published, the vm {state}",
        published.len()
    );
    home.vmrs().args(["rm", "-f", "k1"]).assert().success();
    let next = run(&home, "k2", &[], &reference, "echo $GREETING");
    assert_eq!(next.stdout, "killed\n", "{}", next.stderr);
    assert_eq!(next.code, Some(0));
    if published.is_empty() {
        assert_eq!(next.start["start"], "booted", "{}", next.stderr);
        assert_eq!(next.start["saved"], true, "{}", next.stderr);
    } else {
        assert_eq!(next.start["start"], "restored", "{}", next.stderr);
    }
    assert_eq!(entries(home.0.path()).len(), 1);
    // the killed save's temporary directory is collected
    let leftovers: Vec<_> = std::fs::read_dir(&snaps)
        .expect("snapshots")
        .flatten()
        .map(|d| d.file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with("image-warm-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
