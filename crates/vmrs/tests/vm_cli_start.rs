//! `vmrs start NAME`: a stopped VM boots again with the configuration, disks and networks it
//! was created with, keeping what the guest wrote to its disk; starting a live VM is a
//! conflict (exit 4); a VM that fails to start again is `failed` with the reason.

mod support;

use std::net::TcpStream;
use std::time::Duration;
use support::{row, Home};

fn ok(home: &Home, args: &[&str]) -> String {
    let out = home.vmrs().args(args).output().expect("run vmrs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[test]
fn start_boots_a_stopped_vm_again_with_its_disks_and_networks() {
    let home = Home::new();
    let disk = home.0.path().join("data.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).expect("disk");
    let port = free_port();
    let publish = format!("{port}:7000");
    let disk_spec = format!("{},format=raw", disk.display());
    ok(
        &home,
        &[
            "run", "-d", "--name", "again", "--disk", &disk_spec, "-p", &publish,
        ],
    );
    let config_before = home.json(&["inspect", "again"]);
    // The guest writes a marker to its data disk.
    ok(
        &home,
        &[
            "exec",
            "again",
            "--",
            "sh",
            "-c",
            "echo written-before-stop | dd of=/dev/vda conv=fsync 2>/dev/null",
        ],
    );
    // Starting a live VM is a conflict.
    let out = home.vmrs().args(["start", "again"]).output().expect("start");
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    ok(&home, &["stop", "again"]);
    assert_eq!(row(&home.ps(), "again")["state"], "stopped");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port still published while stopped"
    );

    assert_eq!(ok(&home, &["start", "again"]).trim(), "again");
    let rows = home.ps();
    let r = row(&rows, "again");
    assert_eq!(r["state"], "ready", "{r}");
    let config_after = home.json(&["inspect", "again"]);
    assert_eq!(config_before[0]["config"], config_after[0]["config"]);
    // Same disk, contents kept.
    let out = ok(&home, &["exec", "again", "--", "head", "-c", "19", "/dev/vda"]);
    assert_eq!(out, "written-before-stop");
    // Same network: the published port is forwarded into the guest again.
    let mut listener = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmrs"))
        .env("VMRS_HOME", home.0.path())
        .env("VMRS_ASSETS", support::assets_dir())
        .args([
            "exec",
            "again",
            "--",
            "sh",
            "-c",
            "echo from-guest | nc -l -p 7000",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("listen");
    let got = support_wait_for_port(port);
    let _ = listener.kill();
    let _ = listener.wait();
    assert_eq!(got.trim(), "from-guest");

    ok(&home, &["rm", "-f", "again"]);
    let out = home.vmrs().args(["start", "again"]).output().expect("start");
    assert_eq!(out.status.code(), Some(3), "start of a removed vm: not found");
}

/// Connect to the published port until the guest's listener answers; returns what it sent.
fn support_wait_for_port(port: u16) -> String {
    use std::io::Read;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            if !buf.is_empty() {
                return buf;
            }
        }
        assert!(std::time::Instant::now() < deadline, "guest port never answered");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_restart_that_cannot_happen_says_why() {
    let home = Home::new();
    let assets = support::assets_dir();
    let kernel = home.0.path().join("vmlinuz");
    std::fs::copy(assets.join("vmlinuz"), &kernel).expect("kernel");
    let disk = home.0.path().join("gone.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let disk_spec = format!("{},format=raw", disk.display());
    let kernel_arg = kernel.display().to_string();
    let initrd_arg = assets.join("initramfs.img").display().to_string();
    ok(
        &home,
        &[
            "run",
            "-d",
            "--name",
            "frail",
            "--kernel",
            &kernel_arg,
            "--initrd",
            &initrd_arg,
            "--disk",
            &disk_spec,
        ],
    );
    ok(&home, &["stop", "frail"]);

    // A disk that is gone: refused as invalid before anything starts; the VM stays stopped.
    std::fs::remove_file(&disk).expect("remove disk");
    let out = home.vmrs().args(["start", "frail"]).output().expect("start");
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("gone.img"));
    assert_eq!(row(&home.ps(), "frail")["state"], "stopped");

    // A kernel QEMU refuses: the start fails in the VMM and the VM is failed, with the reason.
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    std::fs::write(&kernel, vec![0x5a; 64 << 10]).expect("garbage kernel");
    let out = home.vmrs().args(["start", "frail"]).output().expect("start");
    assert!(!out.status.success());
    let rows = home.ps();
    let r = row(&rows, "frail");
    assert_eq!(r["state"], "failed", "{r}");
    assert!(
        r["reason"].as_str().unwrap_or_default().contains("start failed"),
        "{r}"
    );
    // It can still be removed.
    ok(&home, &["rm", "frail"]);
    assert!(home.ps().is_empty());
}
