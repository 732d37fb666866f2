//! Exit codes from real failures, the VMM's own words when it refuses to start, and docker's
//! habits (`exec NAME CMD...`, `ps -q`, `logs --tail`, `-m 512m`, `version`, completions,
//! idempotent `stop`, `rm` of a running VM), all through the real `vmrs` binary.

mod support;
use serde_json::Value;
use support::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// No VM directory is left behind by a start that failed.
fn no_vms(home: &Home) {
    let n = std::fs::read_dir(home.0.path().join("vms"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(n, 0, "a failed start left a vm directory");
}

#[test]
fn a_taken_host_port_is_a_conflict_naming_the_port() {
    let home = Home::new();
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "pc", "-p", &format!("{port}:80")])
        .output()
        .expect("run");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains(&format!("host port 127.0.0.1:{port}/tcp is already in use")),
        "{err}"
    );
    // QEMU's own words, not a broken socket
    assert!(err.contains("Could not set up host forwarding rule"), "{err}");
    assert!(!err.contains("QMP"), "{err}");
    no_vms(&home);
    drop(held);
}

#[test]
fn a_kernel_qemu_cannot_load_shows_qemus_words() {
    let home = Home::new();
    let bogus = home.0.path().join("not-a-kernel");
    // shorter than the smallest real-mode setup QEMU expects (2.5 KiB)
    std::fs::write(&bogus, "this is not a kernel\n".repeat(20)).expect("write");
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "bk", "--kernel"])
        .arg(&bogus)
        .output()
        .expect("run");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("invalid kernel header"), "{err}");
    assert!(
        !err.contains("Connection reset") && !err.contains("QMP socket"),
        "{err}"
    );
    no_vms(&home);
}

#[test]
fn every_exit_code_from_a_real_failure() {
    let home = Home::new();
    let code = |args: &[&str]| {
        let out = home.vmrs().args(args).output().expect("run");
        (out.status.code(), stderr(&out))
    };
    // 2: usage (unknown command, a value outside a flag's choices, the retired -v)
    assert_eq!(code(&["frobnicate"]).0, Some(2));
    let (c, err) = code(&["run", "-d", "--accel", "warp"]);
    assert_eq!(c, Some(2), "{err}");
    assert!(
        err.contains("kvm") && err.contains("tcg"),
        "the choices are listed: {err}"
    );
    assert_eq!(code(&["run", "-d", "--backend", "vmware"]).0, Some(2));
    assert_eq!(code(&["run", "-d", "-m", "lots"]).0, Some(2));
    assert_eq!(code(&["-v", "ps"]).0, Some(2));
    // 3: no such VM
    assert_eq!(code(&["logs", "nosuchvm"]).0, Some(3));
    assert_eq!(code(&["exec", "nosuchvm", "true"]).0, Some(3));
    // 5: invalid input — also when found deep in a start (host network setup used to exit 1)
    let (c, err) = code(&["run", "-d", "--name", "n", "--net", "tap=vmrst0"]);
    assert_eq!(c, Some(5), "{err}");
    assert!(err.contains("network setup failed"), "{err}");
    assert_eq!(code(&["run", "-d", "--name", "x/y"]).0, Some(5));
    // 6: backend (the VMM binary cannot be run)
    let out = home
        .vmrs()
        .env("VMRS_QEMU", home.0.path().join("no-such-qemu"))
        .args(["run", "-d", "--name", "q"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    // 1: anything else (the data dir is a file)
    let file = home.0.path().join("plain-file");
    std::fs::write(&file, b"").expect("write");
    let out = home
        .vmrs()
        .env("VMRS_HOME", &file)
        .arg("ps")
        .output()
        .expect("ps");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // 4 (a taken host port, a running VM's rm) and 6 (QEMU refusing a kernel) have their own
    // tests here; 7 (readiness timeout) is in vm_cli.rs.
    no_vms(&home);
}

#[test]
fn docker_habits_on_a_running_vm() {
    let home = Home::new();
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "h", "-m", "320m"])
        .output()
        .expect("run");
    assert!(out.status.success(), "run: {}", stderr(&out));

    // ps -q: names only; -m with a unit
    let out = home.vmrs().args(["ps", "-q"]).output().expect("ps");
    assert_eq!(stdout(&out), "h\n");
    assert_eq!(row(&home.ps(), "h")["memory_mib"], 320);

    // exec without `--`: flags after the name are the command's
    let out = home
        .vmrs()
        .args(["exec", "h", "sh", "-c", "echo -n out; echo -n err >&2; exit 3"])
        .output()
        .expect("exec");
    assert_eq!(stdout(&out), "out");
    assert_eq!(stderr(&out), "err");
    assert_eq!(out.status.code(), Some(3));
    let out = home
        .vmrs()
        .args(["exec", "-e", "K=v", "h", "--", "sh", "-c", "echo $K"])
        .output()
        .expect("exec --");
    assert_eq!(stdout(&out), "v\n", "{}", stderr(&out));

    // logs --tail N: the last N lines of the whole log. The guest kernel may still print after
    // ready (a link coming up), so each check is taken between two equal full reads: a line
    // written in between retries the check instead of failing it.
    let read = |args: &[&str]| {
        stdout(
            &home
                .vmrs()
                .arg("logs")
                .args(args)
                .arg("h")
                .output()
                .expect("logs"),
        )
    };
    let consistent = |args: &[&str]| {
        for _ in 0..50 {
            let before = read(&[]);
            let part = read(args);
            if read(&[]) == before {
                return (before, part);
            }
        }
        panic!("the console log never stopped growing");
    };
    let (all, tail) = consistent(&["--tail", "3"]);
    let lines: Vec<&str> = all.lines().collect();
    assert!(lines.len() > 3, "{all}");
    assert_eq!(tail.lines().collect::<Vec<_>>(), lines[lines.len() - 3..]);
    let (all, one) = consistent(&["-n", "1"]);
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(one.lines().collect::<Vec<_>>(), [lines[lines.len() - 1]]);

    // rm of a running VM: a conflict that says what to do
    let out = home.vmrs().args(["rm", "h"]).output().expect("rm");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("stop it first") && err.contains("vmrs rm -f h"),
        "{err}"
    );
    assert_eq!(row(&home.ps(), "h")["state"], "ready");

    // stop twice: the second is a no-op, exit 0
    home.vmrs()
        .args(["stop", "--timeout", "60", "h"])
        .assert()
        .success();
    let out = home.vmrs().args(["stop", "h"]).output().expect("stop");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "h\n");
    assert_eq!(row(&home.ps(), "h")["state"], "stopped");
    // a stopped VM is not listed by ps -q, only by ps -a -q
    assert_eq!(stdout(&home.vmrs().args(["ps", "-q"]).output().expect("ps")), "");
    assert_eq!(
        stdout(&home.vmrs().args(["ps", "-aq"]).output().expect("ps")),
        "h\n"
    );
    home.vmrs().args(["rm", "h"]).assert().success();
}

#[test]
fn version_and_completion_scripts_the_shells_accept() {
    let home = Home::new();
    let out = home.vmrs().arg("version").output().expect("version");
    assert!(out.status.success());
    assert!(
        stdout(&out).starts_with(&format!("vmrs {}\n", env!("CARGO_PKG_VERSION"))),
        "{}",
        stdout(&out)
    );
    let v: Value = home.json(&["version", "--json"]);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["agent_protocol"].as_u64().is_some_and(|p| p >= 1), "{v}");
    // QEMU is installed on every machine that runs these tests
    assert!(
        v["qemu"]
            .as_str()
            .is_some_and(|p| p.ends_with("qemu-system-x86_64")),
        "{v}"
    );

    for (shell, check) in [("bash", "bash"), ("zsh", "zsh"), ("fish", "fish")] {
        let out = home
            .vmrs()
            .args(["completion", shell])
            .output()
            .expect("completion");
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = home.0.path().join(format!("vmrs.{shell}"));
        std::fs::write(&script, &out.stdout).expect("write");
        let text = stdout(&out);
        assert!(
            text.contains("exec") && text.contains("completion"),
            "{shell}: subcommands listed"
        );
        // `-n`: parse only, do not run (bash, zsh and fish all have it)
        let status = std::process::Command::new(check)
            .arg("-n")
            .arg(&script)
            .status()
            .unwrap_or_else(|e| panic!("{check} (scripts/apt-packages.txt installs it): {e}"));
        assert!(status.success(), "{shell} rejects its completion script");
    }
    home.vmrs().args(["completion", "tcsh"]).assert().code(2);
}

/// `--restart` restarts an image's main process: without an IMAGE, or in the foreground, there
/// is nothing it could apply to, so it is refused (never silently ignored) before anything is
/// pulled or started.
#[test]
fn restart_without_a_detached_image_is_refused() {
    let home = Home::new();
    for args in [
        &["run", "-d", "--restart", "always", "--name", "rs"][..],
        &[
            "run",
            "--restart",
            "on-failure:2",
            "--name",
            "rs",
            "127.0.0.1:9/none:latest",
            "--",
            "true",
        ][..],
    ] {
        let out = home.vmrs().args(args).output().expect("run");
        assert_eq!(out.status.code(), Some(5), "{args:?}: {out:?}");
        assert!(stderr(&out).contains("--restart"), "{args:?}: {}", stderr(&out));
    }
    no_vms(&home);
}
