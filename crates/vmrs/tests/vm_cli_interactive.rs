//! Docker-grade `exec` and `run` with real TCG guests (issue 17): stdin streamed with `-i`
//! (and /dev/null without), exit codes of programs that cannot start or are killed, a closed
//! stdout pipe, signals forwarded, and `-t` sessions driven through a real pseudo-terminal
//! pair: echo, `stty size`, a resize, ^C inside, and the host terminal's mode restored.

mod support;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// `vmrs` as a plain process (to feed it slowly, signal it or give it a terminal).
fn vmrs_command(home: &Home) -> Command {
    let mut c = Command::new(assert_cmd::cargo::cargo_bin("vmrs"));
    c.env("VMRS_HOME", home.0.path())
        .env("VMRS_ASSETS", assets_dir())
        .env("DOCKER_CONFIG", home.0.path().join("docker"))
        .env_remove("RUST_LOG");
    c
}

/// Kills the child when the test ends, however it ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ChildGuard {
    fn wait_for_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.0.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < end, "vmrs did not end within {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn started(home: &Home, name: &str) {
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", name])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn exec_streams_stdin_with_i_and_has_docker_exit_codes() {
    let home = Home::new();
    started(&home, "ia");

    // -i: piped input reaches the command and its end closes the command's stdin.
    let out = home
        .vmrs()
        .args(["exec", "-i", "ia", "sort", "-r"])
        .write_stdin("a\nb\n")
        .output()
        .expect("exec -i");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "b\na\n");
    assert_eq!(out.status.code(), Some(0));
    // Without -i the command's stdin is /dev/null, whatever ours is.
    let out = home
        .vmrs()
        .args(["exec", "ia", "--", "sh", "-c", "cat; echo end"])
        .write_stdin("dropped\n")
        .output()
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "end\n");

    // A slow producer: the first line is answered before the second is written.
    let mut child = ChildGuard(
        vmrs_command(&home)
            .args([
                "exec",
                "-i",
                "ia",
                "--",
                "sh",
                "-c",
                "while read l; do echo got-$l; done; echo eof",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn"),
    );
    let mut stdin = child.0.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.0.stdout.take().expect("stdout"));
    stdin.write_all(b"1\n").expect("write 1");
    stdin.flush().expect("flush");
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read");
    assert_eq!(line, "got-1\n", "the first line came back while stdin stays open");
    stdin.write_all(b"2\n").expect("write 2");
    drop(stdin);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("rest");
    assert_eq!(rest, "got-2\neof\n");
    assert!(child.wait_for_exit(Duration::from_secs(60)).success());

    // Exit codes: not found 127, not executable 126, killed 128+9, and the command's own.
    for (cmd, code) in [
        (&["no-such-program"][..], 127),
        (&["/etc/passwd"][..], 126),
        (&["sh", "-c", "kill -KILL $$"][..], 137),
        (&["sh", "-c", "exit 42"][..], 42),
    ] {
        let out = home
            .vmrs()
            .args(["exec", "ia", "--"])
            .args(cmd)
            .output()
            .expect("exec");
        assert_eq!(
            out.status.code(),
            Some(code),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = home
        .vmrs()
        .args(["exec", "ia", "no-such-program"])
        .output()
        .expect("exec");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-program") && !err.contains("error:"),
        "{err}"
    );

    // `| head -1`: our stdout closes; vmrs ends quietly with the shell's code for SIGPIPE.
    let mut child = ChildGuard(
        vmrs_command(&home)
            .args(["exec", "ia", "--", "sh", "-c", "while :; do echo line; done"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    let mut stdout = BufReader::new(child.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read");
    assert_eq!(line, "line\n");
    drop(stdout);
    let status = child.wait_for_exit(Duration::from_secs(60));
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert_eq!(status.code(), Some(128 + libc::SIGPIPE), "{err}");
    assert_eq!(err, "", "a closed pipe is not an error");
    // ... and the guest's writer got SIGPIPE too.
    let stopped = wait_until(Duration::from_secs(60), || {
        let out = home
            .vmrs()
            .args([
                "exec",
                "ia",
                "--",
                "sh",
                "-c",
                "ps | grep -c 'do echo lin[e]' || true",
            ])
            .output()
            .expect("ps");
        String::from_utf8_lossy(&out.stdout) == "0\n"
    });
    assert!(stopped, "the guest's writer still runs");

    // SIGTERM on the host reaches the command, which decides how it ends.
    let mut child = ChildGuard(
        vmrs_command(&home)
            .args(["exec", "ia", "--", "sh", "-c"])
            .arg("trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 1; done")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn"),
    );
    let mut stdout = BufReader::new(child.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read");
    assert_eq!(line, "ready\n");
    // SAFETY: kill(2) of the child this test spawned.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("rest");
    assert_eq!(rest, "got-term\n");
    assert_eq!(child.wait_for_exit(Duration::from_secs(60)).code(), Some(9));

    // -t with piped input is refused (docker's "not a TTY").
    let out = home
        .vmrs()
        .args(["exec", "-it", "ia", "sh"])
        .write_stdin("x")
        .output()
        .expect("exec -it");
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a TTY"));

    let out = home.vmrs().args(["rm", "-f", "ia"]).output().expect("rm");
    assert!(out.status.success());
}

/// A pseudo-terminal pair standing in for the user's terminal emulator.
struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

impl Pty {
    fn open(rows: u16, cols: u16) -> Pty {
        let (mut master, mut slave) = (-1, -1);
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: out-pointers to two live ints; null name and termios are allowed.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &ws,
            )
        };
        assert_eq!(r, 0, "openpty");
        // SAFETY: both descriptors were just returned by openpty and are owned by nobody else.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        for fd in [&master, &slave] {
            // SAFETY: fcntl on a descriptor this test owns.
            let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            assert_eq!(r, 0);
        }
        Pty { master, slave }
    }

    /// Spawn `cmd` with the slave as its controlling terminal and stdio.
    fn spawn(&self, mut cmd: Command) -> ChildGuard {
        cmd.stdin(Stdio::from(self.slave.try_clone().expect("dup")))
            .stdout(Stdio::from(self.slave.try_clone().expect("dup")))
            .stderr(Stdio::from(self.slave.try_clone().expect("dup")));
        // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        ChildGuard(cmd.spawn().expect("spawn"))
    }

    fn resize(&self, rows: u16, cols: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a live struct.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0);
    }

    fn write(&self, data: &[u8]) {
        // SAFETY: the pointer and length describe `data`.
        let n = unsafe { libc::write(self.master.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        assert_eq!(n, data.len() as isize);
    }

    /// Read the terminal until `want` has appeared after what `seen` held (or 120 s pass).
    fn expect(&self, seen: &mut Vec<u8>, want: &str) {
        let start = seen.len();
        let end = Instant::now() + Duration::from_secs(120);
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen[start..]).contains(want) {
            assert!(
                Instant::now() < end,
                "{want:?} never appeared; terminal shows {:?}",
                String::from_utf8_lossy(&seen[start..])
            );
            let mut pfd = libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 100) } > 0 {
                // SAFETY: reading into a buffer of its length from an open fd.
                let n = unsafe { libc::read(self.master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    seen.extend_from_slice(&buf[..n as usize]);
                }
            }
        }
    }

    fn modes(
        &self,
    ) -> (
        rustix::termios::LocalModes,
        rustix::termios::InputModes,
        rustix::termios::OutputModes,
    ) {
        let t = rustix::termios::tcgetattr(self.slave.as_fd()).expect("tcgetattr");
        (t.local_modes, t.input_modes, t.output_modes)
    }
}

#[test]
fn exec_and_run_with_t_give_a_terminal_session() {
    let home = Home::new();
    started(&home, "it");
    let pty = Pty::open(30, 100);
    let before = pty.modes();
    let mut cmd = vmrs_command(&home);
    cmd.args(["exec", "-it", "it", "sh"]);
    let mut child = pty.spawn(cmd);
    let mut seen = Vec::new();
    pty.expect(&mut seen, "# ");
    // The host terminal is raw while the session runs: the echo comes from the guest.
    let raw = pty.modes();
    assert!(!raw.0.contains(rustix::termios::LocalModes::ECHO), "{raw:?}");
    pty.write(b"echo $((6*7))\r");
    pty.expect(&mut seen, "42");
    pty.write(b"stty size\r");
    pty.expect(&mut seen, "30 100");
    // A resize: the terminal emulator changes the size and the kernel sends SIGWINCH to the
    // foreground group (vmrs); here the test plays both parts.
    pty.resize(40, 120);
    // SAFETY: kill(2) of the child this test spawned.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGWINCH) }, 0);
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        pty.write(b"stty size\r");
        let mark = seen.len();
        pty.expect(&mut seen, "# ");
        if String::from_utf8_lossy(&seen[mark..]).contains("40 120") {
            break;
        }
        assert!(Instant::now() < end, "the resize never reached the guest");
    }
    // ^C is a byte for the guest's line discipline: it interrupts the foreground job only.
    pty.write(b"sleep 100\r");
    pty.expect(&mut seen, "sleep 100");
    std::thread::sleep(Duration::from_millis(500));
    pty.write(b"\x03");
    pty.expect(&mut seen, "# ");
    pty.write(b"echo status-$?\r");
    pty.expect(&mut seen, "status-130");
    pty.write(b"exit 7\r");
    let status = child.wait_for_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(7));
    assert_eq!(pty.modes(), before, "the host terminal's mode is restored");

    // `vmrs run -it --rm` of the built-in guest: a command on a terminal of our size.
    let pty = Pty::open(25, 91);
    let mut cmd = vmrs_command(&home);
    cmd.args([
        "run",
        "-it",
        "--rm",
        "--name",
        "itrun",
        "--",
        "sh",
        "-c",
        "stty size; tty; exit 3",
    ]);
    let mut child = pty.spawn(cmd);
    let mut seen = Vec::new();
    pty.expect(&mut seen, "25 91");
    pty.expect(&mut seen, "/dev/pts/");
    assert_eq!(child.wait_for_exit(Duration::from_secs(120)).code(), Some(3));
    assert!(!home.0.path().join("vms/itrun").exists(), "--rm removed it");

    let out = home.vmrs().args(["rm", "-f", "it"]).output().expect("rm");
    assert!(out.status.success());
}
