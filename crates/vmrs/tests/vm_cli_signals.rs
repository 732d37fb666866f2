//! How a foreground `vmrs run` ends, and how long verbs take on a frozen VMM, with real QEMU
//! guests (issue 16, invariants 3 and 4): SIGINT, SIGTERM and a closed terminal (SIGHUP) stop
//! the VM within `--stop-timeout` and `--rm` removes it; `-d --rm` is refused; with the VMM
//! stopped by `SIGSTOP`, `ps` and `inspect` answer at once (the VM listed as unresponsive),
//! `pause` fails with a timeout and `stop --timeout 2` kills it on time.

mod support;
use serde_json::Value;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// Seconds `--stop-timeout` gives the guest in these tests.
const STOP_TIMEOUT: u64 = 30;

/// Poll `cond` every 100 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// `vmrs` as a plain process (to signal it, or give it a terminal), with `home`'s environment.
fn vmrs_command(home: &Home) -> Command {
    let mut c = Command::new(assert_cmd::cargo::cargo_bin("vmrs"));
    c.env("VMRS_HOME", home.0.path())
        .env("VMRS_ASSETS", assets_dir())
        .env("DOCKER_CONFIG", home.0.path().join("docker"))
        .env_remove("RUST_LOG");
    c
}

/// The VM's row in `ps -a --json`, if listed.
fn find(home: &Home, name: &str) -> Option<Value> {
    home.ps().into_iter().find(|r| r["name"] == name)
}

fn wait_ready(home: &Home, name: &str, child: &mut Child) -> u32 {
    let ready = wait_until(Duration::from_secs(180), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("vmrs run {name} exited early: {status}");
        }
        find(home, name).is_some_and(|r| r["state"] == "ready")
    });
    assert!(ready, "{name} never got ready: {:?}", find(home, name));
    find(home, name).expect("row")["pid"].as_u64().expect("pid") as u32
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z") && !s.contains(") X"))
        .unwrap_or(false)
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid this test spawned and a valid signal number.
    let r = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig})");
}

/// Wait for `child` to exit, at most `timeout`; its exit status and how long it took.
fn wait_exit(child: &mut Child, timeout: Duration) -> (std::process::ExitStatus, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return (st, t0.elapsed());
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            panic!("vmrs run did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the child on drop (a failed assertion must not leave a foreground run behind).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sigint_and_sigterm_stop_a_foreground_run_and_rm_removes_it() {
    let home = Home::new();
    for (sig, name, rm) in [
        (libc::SIGINT, "sig-int", true),
        (libc::SIGTERM, "sig-term", true),
        (libc::SIGTERM, "sig-keep", false),
    ] {
        let mut cmd = vmrs_command(&home);
        cmd.args(["run", "--name", name, "--stop-timeout", &STOP_TIMEOUT.to_string()]);
        if rm {
            cmd.arg("--rm");
        }
        let mut child = ChildGuard(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"),
        );
        let vmm = wait_ready(&home, name, &mut child.0);
        signal(child.0.id(), sig);
        let (status, took) = wait_exit(&mut child.0, Duration::from_secs(STOP_TIMEOUT + 15));
        let mut err = String::new();
        std::io::Read::read_to_string(child.0.stderr.as_mut().expect("stderr"), &mut err).expect("read");
        eprintln!("{name}: exited {status} after {took:?}");
        assert!(status.success(), "{name}: {status}: {err}");
        assert!(
            took < Duration::from_secs(STOP_TIMEOUT + 5),
            "{name}: took {took:?}"
        );
        assert!(!alive(vmm), "{name}: qemu {vmm} still runs");
        match find(&home, name) {
            None => assert!(rm, "{name} was removed without --rm"),
            Some(r) => {
                assert!(!rm, "{name} still listed despite --rm: {r}");
                assert_eq!(r["state"], "stopped", "{r}");
            }
        }
    }
}

#[test]
fn a_second_signal_kills_without_waiting_for_the_graceful_stop() {
    let home = Home::new();
    let mut child = ChildGuard(
        vmrs_command(&home)
            .args(["run", "--name", "sig-twice", "--rm", "--stop-timeout", "30"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    let vmm = wait_ready(&home, "sig-twice", &mut child.0);
    // A frozen QEMU cannot answer the power button: the graceful stop would wait for QMP's
    // deadline (5 s) before forcing; the second signal kills at once.
    signal(vmm, libc::SIGSTOP);
    signal(child.0.id(), libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    signal(child.0.id(), libc::SIGINT);
    let (status, took) = wait_exit(&mut child.0, Duration::from_secs(STOP_TIMEOUT + 15));
    eprintln!("sig-twice: exited {status} {took:?} after the second signal");
    assert!(status.success(), "{status}");
    assert!(t0.elapsed() < Duration::from_secs(3), "took {took:?}");
    assert!(!alive(vmm), "qemu {vmm} still runs");
    assert!(find(&home, "sig-twice").is_none(), "removed by --rm");
}

#[test]
fn closing_the_terminal_stops_a_foreground_run_and_rm_removes_it() {
    let home = Home::new();
    let mut master = -1;
    let mut slave = -1;
    // SAFETY: openpty writes two new descriptors into the pointers; no name, termios or size.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty");
    // SAFETY: both descriptors were just returned by openpty and are owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // openpty does not set close-on-exec: an inherited master (in vmrs, or the QEMU it
        // starts) would keep the terminal open after the test closes it.
        // SAFETY: fcntl on a descriptor this test owns.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        assert_eq!(r, 0, "FD_CLOEXEC");
    }
    let mut cmd = vmrs_command(&home);
    cmd.args([
        "run",
        "--name",
        "sig-hup",
        "--rm",
        "--stop-timeout",
        &STOP_TIMEOUT.to_string(),
    ])
    .stdin(Stdio::from(slave.try_clone().expect("dup")))
    .stdout(Stdio::from(slave.try_clone().expect("dup")))
    .stderr(Stdio::from(slave.try_clone().expect("dup")));
    // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // A session of its own whose controlling terminal is the pty: closing the master
            // then hangs up vmrs as closing a terminal window does.
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = ChildGuard(cmd.spawn().expect("spawn"));
    drop(cmd);
    drop(slave);
    // Drain the terminal (a full pty would block vmrs's console output) until told to hang up.
    let hang_up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let hang_up = hang_up.clone();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            while !hang_up.load(std::sync::atomic::Ordering::SeqCst) {
                let mut pfd = libc::pollfd {
                    fd: master.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 50) } > 0 {
                    // SAFETY: reading into a buffer of the given length from an open fd.
                    let n = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if n <= 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..n as usize]);
                }
            }
            drop(master); // the terminal goes away
            out
        })
    };
    let vmm = wait_ready(&home, "sig-hup", &mut child.0);
    hang_up.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = reader.join().expect("reader");
    assert!(
        String::from_utf8_lossy(&seen).contains("VMRS_READY"),
        "the console reached the terminal"
    );
    let (status, took) = wait_exit(&mut child.0, Duration::from_secs(STOP_TIMEOUT + 15));
    eprintln!("sig-hup: exited {status} after {took:?}");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(STOP_TIMEOUT + 5), "took {took:?}");
    assert!(!alive(vmm), "qemu {vmm} still runs");
    assert!(find(&home, "sig-hup").is_none(), "removed by --rm");
}

#[test]
fn detach_with_rm_is_a_usage_error_that_creates_nothing() {
    let home = Home::new();
    let out = home
        .vmrs()
        .args(["run", "-d", "--rm", "--name", "drm"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rm"), "{out:?}");
    assert!(!home.0.path().join("vms").join("drm").exists());
}

#[test]
fn verbs_on_a_frozen_vmm_end_within_their_bounds() {
    let home = Home::new();
    home.vmrs()
        .args(["run", "-d", "--name", "frz"])
        .assert()
        .success();
    let vmm = find(&home, "frz").expect("row")["pid"].as_u64().expect("pid") as u32;
    signal(vmm, libc::SIGSTOP);
    let timed = |args: &[&str]| {
        let t0 = Instant::now();
        let out = home.vmrs().args(args).output().expect("run");
        let took = t0.elapsed();
        eprintln!("{args:?}: {:?} in {took:?}", out.status.code());
        (out, took)
    };
    let (out, took) = timed(&["ps", "-a", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert!(took < Duration::from_secs(1), "ps took {took:?}");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    let r = row(&rows, "frz");
    assert_eq!(r["unresponsive"], true, "{r}");
    assert_eq!(r["state"], "ready", "the recorded state is kept: {r}");
    let (out, took) = timed(&["ps"]);
    assert!(took < Duration::from_secs(1), "ps took {took:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ready (unresponsive)"),
        "{out:?}"
    );
    let (out, took) = timed(&["inspect", "frz"]);
    assert!(out.status.success(), "{out:?}");
    assert!(took < Duration::from_secs(1), "inspect took {took:?}");
    // pause needs an answer from QEMU: an error within QMP_TIMEOUT (5 s), no hang — a
    // timeout (exit 7) or, once the frozen QEMU's connection queue is full, a refused
    // connection (backend error, exit 6)
    let (out, took) = timed(&["pause", "frz"]);
    assert!(matches!(out.status.code(), Some(6 | 7)), "{out:?}");
    assert!(took < Duration::from_secs(8), "pause took {took:?}");
    // stop --timeout 2: power button and quit unanswered, then killed
    let (out, took) = timed(&["stop", "--timeout", "2", "frz"]);
    assert!(out.status.success(), "{out:?}");
    assert!(took < Duration::from_secs(2 + 4), "stop took {took:?}");
    assert!(!alive(vmm), "qemu {vmm} still runs");
    assert_eq!(find(&home, "frz").expect("row")["state"], "stopped");
}
