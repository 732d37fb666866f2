//! End to end through a real containerd (Debian's, started by the test with its own config,
//! root, state and socket): `ctr run` with runtime `io.containerd.vmrs.v1` boots a vm-rs VM
//! per container. Everything the test starts is killed by [`Guard`] even when it fails.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn task_survives_a_containerd_restart() {
    let mut g = Guard::start();
    import(&g);
    let out = g.ctr(
        &["run", "-d", "--runtime", RUNTIME, IMAGE, "r1", "sleep", "1000"],
        b"",
    );
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), g.log());
    g.restart_containerd();
    let ls = text(&g.ctr(&["task", "ls"], b"").stdout);
    assert!(ls.contains("r1") && ls.contains("RUNNING"), "{ls}\n{}", g.log());
    let out = g.ctr(&["task", "kill", "-s", "KILL", "r1"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(wait_until(Duration::from_secs(20), || text(
        &g.ctr(&["task", "ls"], b"").stdout
    )
    .contains("STOPPED")));
    let out = g.ctr(&["task", "delete", "r1"], b"");
    assert!(
        text(&out.stderr).contains("exit code 137"),
        "{}",
        text(&out.stderr)
    );
    let out = g.ctr(&["container", "delete", "r1"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(wait_until(Duration::from_secs(20), || g
        .our_processes("qemu")
        .is_empty()));
    assert!(
        wait_until(Duration::from_secs(20), || g.our_mounts().is_empty()),
        "{:?}",
        g.our_mounts()
    );
}

#[test]
fn ctr_runs_containers_in_vms() {
    let g = Guard::start();
    import(&g);

    // run --rm: output and the command's exit code
    let out = g.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "t1",
            "sh",
            "-c",
            "echo hello-from-vm; echo to-err >&2; exit 7",
        ],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "stdout {} stderr {}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        g.log()
    );
    assert!(
        text(&out.stdout).contains("hello-from-vm"),
        "{}",
        text(&out.stdout)
    );
    assert!(text(&out.stderr).contains("to-err"), "{}", text(&out.stderr));

    // piped stdin reaches the process
    let out = g.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "t2",
            "tr",
            "a-z",
            "A-Z",
        ],
        b"piped data\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "PIPED DATA\n");

    // -t gives the process a terminal (ctr needs one itself: `script` provides it)
    let ctr_cmd = format!(
        "ctr -a {} -n {NS} run -t --rm --runtime {RUNTIME} {IMAGE} t6 sh -c 'test -t 0 && test -t 1 && echo on-a-tty'",
        g.sock().display()
    );
    let out = Command::new("timeout")
        .args(["90", "script", "-qec", &ctr_cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script runs");
    assert!(
        text(&out.stdout).contains("on-a-tty"),
        "{} {}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // detached: ps, exec, kill -s TERM (143), delete
    let out = g.ctr(
        &["run", "-d", "--runtime", RUNTIME, IMAGE, "t3", "sleep", "1000"],
        b"",
    );
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), g.log());
    let out = g.ctr(&["task", "ps", "t3"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).lines().count() >= 2, "{}", text(&out.stdout));
    let out = g.ctr(
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "t3",
            "sh",
            "-c",
            "echo exec-out; exit 3",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("exec-out"));
    let out = g.ctr(&["task", "kill", "-s", "TERM", "t3"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(wait_until(Duration::from_secs(20), || text(
        &g.ctr(&["task", "ls"], b"").stdout
    )
    .contains("STOPPED")));
    let out = g.ctr(&["task", "delete", "t3"], b"");
    // ctr 1.6 reports the exit code of a deleted task as a warning, exiting 0
    assert!(
        text(&out.stderr).contains("exit code 143"),
        "{}",
        text(&out.stderr)
    );
    let out = g.ctr(&["container", "delete", "t3"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(g.our_processes("qemu").is_empty(), "a VMM is left after delete");

    // kill -9 of the shim: containerd's cleanup (the shim's `delete`) leaves nothing
    let out = g.ctr(
        &["run", "-d", "--runtime", RUNTIME, IMAGE, "t4", "sleep", "1000"],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!g.our_processes("qemu").is_empty(), "no VMM runs for t4");
    let shims: Vec<i32> = g
        .our_processes("containerd-shim-vmrs-v1")
        .into_iter()
        .filter(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).replace('\0', " ").contains(" t4 ")
        })
        .collect();
    let shims = if shims.is_empty() {
        g.our_processes("containerd-shim-vmrs-v1")
    } else {
        shims
    };
    assert!(!shims.is_empty(), "no shim process found");
    for p in shims {
        // SAFETY: kill(2) of the shim this test's containerd started.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let _ = g.ctr(&["task", "delete", "-f", "t4"], b"");
    let out = g.ctr(&["container", "delete", "t4"], b"");
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), g.log());
    assert!(
        wait_until(Duration::from_secs(20), || g.our_processes("qemu").is_empty()),
        "a VMM is left after the shim was killed"
    );
    assert!(
        wait_until(Duration::from_secs(20), || g.our_mounts().is_empty()),
        "mounts left: {:?}\n{}",
        g.our_mounts(),
        g.log()
    );

    // a bad process spec: a clear error, no hung task, nothing left
    let start = Instant::now();
    let out = g.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--cwd",
            "relative/dir",
            IMAGE,
            "t5",
            "true",
        ],
        b"",
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cwd"), "{}", text(&out.stderr));
    assert!(start.elapsed() < Duration::from_secs(60));
    let _ = g.ctr(&["container", "delete", "t5"], b"");
    assert!(g.our_processes("qemu").is_empty());
    assert!(g.our_mounts().is_empty(), "mounts left: {:?}", g.our_mounts());
}
