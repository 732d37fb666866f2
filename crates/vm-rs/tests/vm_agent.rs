//! The guest agent end to end: a real guest under QEMU (TCG) with the agent port, driven by
//! `vm_rs::agent::AgentClient`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use support::qemu::RawQemu;
use vm_rs::agent::{AgentClient, AgentError, ExecCommand, ExecEvent, ExitStatus, WinSize};

/// The QEMU arguments of an agent port whose host end is `sock`.
fn agent_args(sock: &std::path::Path) -> Vec<std::ffi::OsString> {
    vm_rs::driver::qemu::args::agent_args(&vm_rs::devices::AgentChannel::VirtioSerial {
        socket: sock.to_path_buf(),
        process_log: None,
    })
}

const BOOT: Duration = Duration::from_secs(120);

/// Boot a guest whose agent socket lives in the VM's temp dir.
async fn boot_with_agent() -> (RawQemu, AgentClient) {
    let assets = support::guest::assets().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("agent.sock");
    let vm = RawQemu::boot_in(dir, &assets, "", &agent_args(&sock));
    let agent = AgentClient::connect_timeout(&sock, BOOT).await;
    let agent = match agent {
        Ok(a) => a,
        Err(e) => panic!("agent connect: {e:?}\n{}", vm.log()),
    };
    (vm, agent)
}

#[tokio::test]
async fn exec_streams_status_env_stdin_and_signals() {
    let assets = support::guest::assets().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let sock = tmp.path().join("agent.sock");
    let vm = RawQemu::boot(&assets, "", &agent_args(&sock));
    let agent = match AgentClient::connect_timeout(&sock, BOOT).await {
        Ok(a) => a,
        Err(e) => panic!("agent connect: {e:?}\n{}", vm.log()),
    };
    assert!(agent.agent_version().starts_with("vmrs-init"));
    agent.ping().await.expect("ping");

    // Exit code and separated streams.
    let out = agent
        .exec(ExecCommand::new(["sh", "-c", "echo hi; echo oops >&2; exit 3"]))
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.stderr, b"oops\n");
    assert_eq!(out.status, ExitStatus::Exited(3));

    // Environment, working directory, user.
    let out = agent
        .exec(
            ExecCommand::new(["sh", "-c", "echo $GREETING; pwd; id -u; id -g"])
                .env("GREETING", "hello world")
                .cwd("/proc")
                .user("1000:1001"),
        )
        .await
        .expect("exec env");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello world\n/proc\n1000\n1001\n"
    );
    assert!(out.status.success());

    // stdin piped.
    let out = agent
        .exec(ExecCommand::new(["sh", "-c", "tr a-z A-Z; echo done"]).stdin(b"abc\nxyz\n".to_vec()))
        .await
        .expect("exec stdin");
    assert_eq!(out.stdout, b"ABC\nXYZ\ndone\n");

    // Interactive stdin and a signal.
    let mut p = agent
        .spawn(ExecCommand {
            interactive_stdin: true,
            ..ExecCommand::new(["sh", "-c", "read line; echo got $line; sleep 600"])
        })
        .await
        .expect("spawn");
    p.write_stdin(b"ping\n").await.expect("stdin");
    match p.next_event().await {
        Some(Ok(ExecEvent::Stdout(d))) => assert_eq!(d, b"got ping\n"),
        other => panic!("unexpected {other:?}"),
    }
    p.signal(9).await.expect("signal");
    let out = p.wait_with_output().await.expect("wait");
    assert_eq!(out.status, ExitStatus::Signaled(9));

    // The workload does not inherit PID 1's blocked signals: SIGTERM ends it.
    let out = agent
        .exec(ExecCommand::new(["sh", "-c", "kill -TERM $$; echo survived"]))
        .await
        .expect("exec sigterm");
    assert_eq!(
        out.status,
        ExitStatus::Signaled(15),
        "stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A program that does not exist.
    match agent.exec(ExecCommand::new(["/no/such/program"])).await {
        Err(e @ AgentError::Spawn { .. }) => {
            assert!(e.to_string().contains("No such file"), "{e}");
            assert_eq!(e.shell_code(), Some(127));
        }
        other => panic!("expected a spawn error, got {other:?}"),
    }
    // Not executable, and a missing working directory (not "command not found").
    let e = agent
        .exec(ExecCommand::new(["/etc/passwd"]))
        .await
        .expect_err("not executable");
    assert_eq!(e.shell_code(), Some(126), "{e:?}");
    let e = agent
        .exec(ExecCommand::new(["true"]).cwd("/no/such/dir"))
        .await
        .expect_err("no cwd");
    assert!(
        matches!(e, AgentError::Exec { .. }) && e.to_string().contains("/no/such/dir"),
        "{e:?}"
    );

    // A terminal: its size, a resize, and the output as stdout.
    let mut p = agent
        .spawn(
            ExecCommand::new(["sh", "-c", "stty size; tty; read l; stty size; exit 4"])
                .tty(WinSize { rows: 12, cols: 34 }),
        )
        .await
        .expect("tty exec");
    let mut seen = String::new();
    let control = p.control();
    let mut stdin = p.take_stdin().expect("a terminal takes input");
    let mut resized = false;
    let status = loop {
        match p.next_event().await.expect("event").expect("ok") {
            ExecEvent::Stdout(d) => seen.push_str(&String::from_utf8_lossy(&d)),
            ExecEvent::Stderr(d) => panic!("a terminal has no separate stderr: {d:?}"),
            ExecEvent::Exit(s) => break s,
        }
        if !resized && seen.contains("/dev/pts/") {
            resized = true;
            control
                .resize(WinSize { rows: 50, cols: 60 })
                .await
                .expect("resize");
            stdin.write(b"go\n").await.expect("stdin");
        }
    };
    assert_eq!(status, ExitStatus::Exited(4), "{seen}");
    assert!(seen.starts_with("12 34\r\n/dev/pts/"), "{seen:?}");
    assert!(seen.ends_with("50 60\r\n"), "{seen:?}");
    // Its handles share the connection (closed further down).
    drop((p, stdin, control));

    // Large output arrives intact (10 MiB+).
    let out = agent
        .exec(ExecCommand::new(["seq", "1", "1500000"]))
        .await
        .expect("big exec");
    let expected: String = (1..=1_500_000).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() >= 10 * 1024 * 1024);
    assert_eq!(out.stdout.len(), expected.len());
    assert!(out.stdout == expected.as_bytes());

    // Concurrent execs on one connection keep their streams apart.
    let mut tasks = Vec::new();
    for i in 0..6 {
        let a = agent.clone();
        tasks.push(tokio::spawn(async move {
            a.exec(ExecCommand::new([
                "sh".to_string(),
                "-c".to_string(),
                format!("for j in 1 2 3 4 5; do echo {i}-$j; echo e{i} >&2; done; exit {i}"),
            ]))
            .await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t.await.expect("join").expect("concurrent exec");
        let want: String = (1..=5).map(|j| format!("{i}-{j}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&out.stdout), want);
        assert_eq!(out.stderr, format!("e{i}\n").repeat(5).into_bytes());
        assert_eq!(out.status, ExitStatus::Exited(i as i32));
    }

    // Processes of a closed connection are killed; detached ones live on.
    let victim = agent
        .spawn(ExecCommand::new(["sleep", "600"]))
        .await
        .expect("spawn victim");
    let victim_pid = victim.pid();
    drop(victim);
    let detached = agent
        .spawn(ExecCommand {
            detach: true,
            ..ExecCommand::new(["sh", "-c", "sleep 2; echo survived > /tmp/detached"])
        })
        .await
        .expect("detached");
    assert!(detached.pid() > 1);
    // Process handles share the connection: drop them so it really closes.
    drop(detached);

    // A new connection after this one closes works (the guest notices the disconnect).
    drop(agent);
    let agent = AgentClient::connect_timeout(&sock, Duration::from_secs(30))
        .await
        .expect("reconnect");
    let out = agent
        .exec(ExecCommand::new(["echo", "again"]))
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"again\n");
    let out = agent
        .exec(ExecCommand::new([
            "sh".to_string(),
            "-c".to_string(),
            format!("sleep 3; kill -0 {victim_pid} 2>/dev/null && echo alive; cat /tmp/detached"),
        ]))
        .await
        .expect("check");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "survived\n");

    // Garbage from a host: the guest answers with an error on stream 0, ignores the rest of
    // that connection, and serves the next one normally.
    drop(agent);
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = tokio::net::UnixStream::connect(&sock).await.expect("raw connect");
        raw.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
            .await
            .expect("write garbage");
        let mut dec = vm_rs::agent::proto::Decoder::new();
        let mut buf = [0u8; 4096];
        let frame = loop {
            if let Some(f) = dec.next_frame().expect("guest frames are valid") {
                break f;
            }
            let n = tokio::time::timeout(Duration::from_secs(30), raw.read(&mut buf))
                .await
                .expect("guest answers")
                .expect("read");
            assert!(n > 0, "guest closed");
            dec.push(&buf[..n]);
        };
        assert_eq!(frame.stream, 0);
        assert!(matches!(
            frame.message,
            vm_rs::agent::proto::Message::Error { .. }
        ));
    }
    let agent = AgentClient::connect_timeout(&sock, Duration::from_secs(30))
        .await
        .expect("connect after garbage");
    agent.ping().await.expect("ping after garbage");

    // Orderly shutdown through the agent.
    let mut vm = vm;
    agent.shutdown().await.expect("shutdown");
    assert!(
        vm.wait_exit(Duration::from_secs(60)).await.is_some(),
        "{}",
        vm.log()
    );
    assert!(vm.log().contains("vmrs-init: power off"));
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o7777
}

#[tokio::test]
async fn copy_round_trip_keeps_modes() {
    let (mut vm, agent) = boot_with_agent().await;
    let host = tempfile::tempdir().expect("tempdir");
    let src = host.path().join("tree");
    std::fs::create_dir_all(src.join("sub/deeper")).expect("mkdir");
    std::fs::write(src.join("plain.txt"), b"plain\n").expect("write");
    std::fs::write(src.join("sub/script.sh"), b"#!/bin/sh\necho run\n").expect("write");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("sub/deeper/big.bin"), &big).expect("write");
    std::os::unix::fs::symlink("plain.txt", src.join("link")).expect("symlink");
    std::fs::set_permissions(src.join("plain.txt"), std::fs::Permissions::from_mode(0o640)).expect("chmod");
    std::fs::set_permissions(src.join("sub/script.sh"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::set_permissions(src.join("sub/deeper"), std::fs::Permissions::from_mode(0o700)).expect("chmod");

    agent.copy_to(&src, "/tmp").await.expect("copy_to");
    let out = agent
        .exec(ExecCommand::new([
            "sh",
            "-c",
            "cd /tmp/tree && stat -c '%a %n' plain.txt sub/script.sh sub/deeper && readlink link && sub/script.sh && sha256sum sub/deeper/big.bin",
        ]))
        .await
        .expect("inspect");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("640 plain.txt\n755 sub/script.sh\n700 sub/deeper\nplain.txt\nrun\n"),
        "{text}"
    );
    use sha2::Digest;
    assert!(text.contains(&hex::encode(sha2::Sha256::digest(&big))), "{text}");

    // And back out to a fresh host dir.
    let back = host.path().join("back");
    std::fs::create_dir(&back).expect("mkdir");
    agent.copy_from("/tmp/tree", &back).await.expect("copy_from");
    let b = back.join("tree");
    assert_eq!(std::fs::read(b.join("plain.txt")).expect("read"), b"plain\n");
    assert_eq!(std::fs::read(b.join("sub/deeper/big.bin")).expect("read"), big);
    assert_eq!(mode(&b.join("plain.txt")), 0o640);
    assert_eq!(mode(&b.join("sub/script.sh")), 0o755);
    assert_eq!(mode(&b.join("sub/deeper")), 0o700);
    assert_eq!(
        std::fs::read_link(b.join("link")).expect("readlink"),
        Path::new("plain.txt")
    );

    // A single file to an explicit name; a missing source is an error.
    agent
        .copy_from("/etc/passwd", &host.path().join("pw"))
        .await
        .expect("copy file");
    assert!(std::fs::read_to_string(host.path().join("pw"))
        .expect("read")
        .starts_with("root:"));
    assert!(matches!(
        agent.copy_from("/does/not/exist", &host.path().join("x")).await,
        Err(AgentError::GuestCopy { .. })
    ));
    assert!(matches!(
        agent.copy_to(&src, "/does/not/exist/dir").await,
        Err(AgentError::GuestCopy { .. })
    ));
    // The connection stays usable after failed copies.
    agent.ping().await.expect("ping after failed copies");

    // Hostile paths from inside the guest: a symlink pointing out of the tree is copied as a
    // link, never followed on the host.
    agent
        .exec(ExecCommand::new([
            "sh",
            "-c",
            "mkdir -p /tmp/evil && ln -s /etc /tmp/evil/etc && ln -s ../../ /tmp/evil/up",
        ]))
        .await
        .expect("setup evil");
    let evil_dest = host.path().join("evil-out");
    std::fs::create_dir(&evil_dest).expect("mkdir");
    agent.copy_from("/tmp/evil", &evil_dest).await.expect("copy evil");
    assert_eq!(
        std::fs::read_link(evil_dest.join("evil/etc")).expect("link"),
        Path::new("/etc")
    );
    assert!(std::fs::symlink_metadata(evil_dest.join("evil/etc"))
        .expect("stat")
        .file_type()
        .is_symlink());

    agent.shutdown().await.expect("shutdown");
    assert!(vm.wait_exit(Duration::from_secs(60)).await.is_some());
}

#[tokio::test]
async fn agent_through_vm_manager() {
    // Make sure the shared assets carry this checkout's init before the manager boots them.
    support::guest::assets().await;
    let home = support::TestHome::new();
    let mgr = vm_rs::VmManager::with_home(home.path()).await.expect("manager");
    // The manager adds the agent port itself.
    mgr.start(support::test_config("ag")).await.expect("start");
    mgr.wait_ready("ag", support::BOOT_TIMEOUT).await.expect("ready");

    // stdout and stderr separated, stdin piped, the exit code reported.
    let out = mgr
        .exec(
            "ag",
            ExecCommand::new(["sh", "-c", "echo from-manager; cat >&2; exit 7"]).stdin(&b"in-put"[..]),
        )
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"from-manager\n");
    assert_eq!(out.stderr, b"in-put");
    assert_eq!(out.status.code(), Some(7));

    // Streaming: events arrive per stream, then the exit status.
    let mut p = mgr
        .exec_streaming(
            "ag",
            ExecCommand::new(["sh", "-c", "echo a; echo b >&2; kill -9 $$"]),
        )
        .await
        .expect("spawn");
    let (mut so, mut se, mut status) = (Vec::new(), Vec::new(), None);
    while let Some(ev) = p.next_event().await {
        match ev.expect("event") {
            ExecEvent::Stdout(d) => so.extend(d),
            ExecEvent::Stderr(d) => se.extend(d),
            ExecEvent::Exit(s) => status = Some(s),
        }
    }
    assert_eq!((so.as_slice(), se.as_slice()), (&b"a\n"[..], &b"b\n"[..]));
    assert_eq!(status.map(|s| s.shell_code()), Some(128 + 9));

    // Copy a tree in and back out; modes survive both ways.
    let host = tempfile::tempdir().expect("tempdir");
    let src = host.path().join("tree");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    std::fs::write(src.join("sub/run.sh"), b"#!/bin/sh\necho ran\n").expect("write");
    std::fs::write(src.join("secret"), b"s3cret").expect("write");
    std::fs::set_permissions(src.join("sub/run.sh"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(src.join("secret"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::set_permissions(src.join("sub"), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    mgr.copy_to("ag", &src, "/tmp").await.expect("copy_to");
    let out = mgr
        .exec(
            "ag",
            ExecCommand::new(["sh", "-c", "/tmp/tree/sub/run.sh && echo x >> /tmp/tree/secret"]),
        )
        .await
        .expect("run copied script");
    assert_eq!(out.stdout, b"ran\n");
    let back = host.path().join("back");
    mgr.copy_from("ag", "/tmp/tree", &back).await.expect("copy_from");
    assert_eq!(std::fs::read(back.join("secret")).expect("read"), b"s3cretx\n");
    assert_eq!(mode(&back.join("secret")), 0o600);
    assert_eq!(mode(&back.join("sub")), 0o711);
    assert_eq!(mode(&back.join("sub/run.sh")), 0o755);

    let st = mgr.stop("ag", Duration::from_secs(60)).await.expect("stop");
    assert_eq!(st, vm_rs::VmState::Stopped);
    // Exec is refused once the VM is no longer ready, with a typed state error.
    let err = mgr
        .exec("ag", ExecCommand::new(["true"]))
        .await
        .expect_err("exec on a stopped vm");
    assert!(matches!(err, vm_rs::ManagerError::State(_)), "{err:?}");
    mgr.remove("ag", false).await.expect("rm");
}
