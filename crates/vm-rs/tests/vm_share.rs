//! Shared directories over virtio-fs, end to end: real QEMU guests (TCG) through `VmManager`,
//! each share served by a real virtiofsd, driven through the guest agent.
//!
//! * data both ways: host → guest, guest → host with the expected owner and mode, 50 MiB with
//!   the same sha256 in both directions;
//! * `:ro` enforced by the daemon, also after the guest remounts the share read-write;
//! * hostile entries in the share (symlinks to host files, absolute and relative, a device
//!   node of the host's disk) give the guest nothing of the host;
//! * a killed virtiofsd: every guest access to the share would hang for good, so the VM is failed
//!   with the reason and nothing of it is left;
//! * a share the guest cannot mount fails the VM with the guest's reason.

mod support;

use sha2::Digest;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;
use support::*;
use vm_rs::agent::{ExecCommand, ExecOutput};
use vm_rs::{ManagerError, SharedDir, VmConfig, VmManager, VmState};

/// Built-in guest with the init of this checkout (it mounts the shares).
async fn config(name: &str, shares: Vec<SharedDir>) -> VmConfig {
    let assets = support::guest::assets().await;
    let mut b = VmConfig::builder(name)
        .kernel(&assets.kernel)
        .initramfs(&assets.initramfs)
        .memory_mib(256);
    for s in shares {
        b = b.shared_dir(s);
    }
    b.build().expect("config")
}

async fn sh(mgr: &VmManager, vm: &str, script: &str) -> ExecOutput {
    mgr.exec(vm, ExecCommand::new(["sh", "-c", script]))
        .await
        .unwrap_or_else(|e| panic!("exec {script:?}: {e:?}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sha256_file(p: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(p).expect("read")))
}

/// The recorded daemons' pids and every process the VM directory owns.
fn owned(home: &TestHome, vm: &str) -> Vec<u32> {
    vm_rs::process::owned_by(&home.path().join("vms").join(vm))
        .iter()
        .map(|p| p.pid)
        .collect()
}

#[tokio::test]
async fn data_flows_both_ways_and_read_only_is_enforced_by_the_daemon() {
    let home = TestHome::new();
    let host = tempfile::tempdir().expect("tmp");
    let rw = host.path().join("rw dir"); // a space: the guest path and command line must cope
    let ro = host.path().join("ro");
    std::fs::create_dir_all(&rw).expect("mkdir");
    std::fs::create_dir_all(&ro).expect("mkdir");
    std::fs::write(rw.join("hello.txt"), b"hello from the host\n").expect("w");
    std::fs::write(ro.join("keep.txt"), b"unchanged\n").expect("w");
    // 50 MiB of random bytes, host -> guest
    let mut big = vec![0u8; 50 << 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut big))
        .expect("urandom");
    std::fs::write(rw.join("big.bin"), &big).expect("w");
    let big_sha = hex::encode(sha2::Sha256::digest(&big));
    drop(big);

    let mut ro_share = SharedDir::new(&ro, "/srv/ro", "vmrs1");
    ro_share.read_only = true;
    let cfg = config(
        "share1",
        vec![SharedDir::new(&rw, "/mnt/my data", "vmrs0"), ro_share],
    )
    .await;
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    mgr.start(cfg).await.expect("start");
    if let Err(e) = mgr.wait_ready("share1", BOOT_TIMEOUT).await {
        let log = std::fs::read_to_string(home.path().join("vms/share1/serial.log")).unwrap_or_default();
        panic!("not ready: {e:?}\n{log}");
    }
    let info = mgr.inspect("share1").await.expect("inspect");
    assert_eq!(info.mounts.len(), 2);
    assert!(info.mounts.iter().all(|m| m.serving), "{:?}", info.mounts);
    assert_eq!(info.mounts[1].spec(), format!("{}:/srv/ro:ro", ro.display()));

    // host -> guest, and the guest sees the mounts it was asked for
    let out = sh(
        &mgr,
        "share1",
        "cat '/mnt/my data/hello.txt'; grep virtiofs /proc/mounts",
    )
    .await;
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("hello from the host\n"), "{stdout}");
    assert!(stdout.contains("vmrs0 /mnt/my\\040data virtiofs rw"), "{stdout}");
    assert!(stdout.contains("vmrs1 /srv/ro virtiofs ro"), "{stdout}");

    // guest -> host: owner and mode as the guest set them
    let out = sh(
        &mgr,
        "share1",
        "cd '/mnt/my data' && umask 022 && echo from-guest > g.txt && chmod 0640 g.txt \
         && touch owned && chown 1234:5678 owned && mkdir -p sub/deeper && echo ok",
    )
    .await;
    assert_eq!(text(&out.stdout), "ok\n", "{}", text(&out.stderr));
    let g = std::fs::metadata(rw.join("g.txt")).expect("g.txt on the host");
    assert_eq!(std::fs::read(rw.join("g.txt")).expect("read"), b"from-guest\n");
    assert_eq!((g.uid(), g.gid()), (0, 0));
    assert_eq!(g.permissions().mode() & 0o7777, 0o640);
    let o = std::fs::metadata(rw.join("owned")).expect("owned");
    assert_eq!((o.uid(), o.gid()), (1234, 5678));
    assert!(rw.join("sub/deeper").is_dir());

    // 50 MiB both ways with the same digest
    let out = sh(
        &mgr,
        "share1",
        "cd '/mnt/my data' && sha256sum big.bin && dd if=/dev/urandom of=gbig.bin bs=1M count=50 2>/dev/null \
         && sha256sum gbig.bin",
    )
    .await;
    let sums = text(&out.stdout);
    let mut lines = sums.lines();
    assert_eq!(
        lines.next().and_then(|l| l.split_whitespace().next()),
        Some(big_sha.as_str()),
        "{sums}"
    );
    let guest_sha = lines
        .next()
        .and_then(|l| l.split_whitespace().next())
        .expect("gbig sum");
    assert_eq!(sha256_file(&rw.join("gbig.bin")), guest_sha);

    // read-only: refused by the mount, and still refused by the daemon after a remount rw
    let out = sh(&mgr, "share1", "echo x > /srv/ro/new.txt").await;
    assert!(!out.status.success());
    let out = sh(
        &mgr,
        "share1",
        "mount -o remount,rw /srv/ro; grep /srv/ro /proc/mounts; \
         echo x > /srv/ro/new.txt; echo write=$?; echo y >> /srv/ro/keep.txt; echo append=$?; \
         rm -f /srv/ro/keep.txt; echo rm=$?; mkdir /srv/ro/d; echo mkdir=$?; \
         chmod 777 /srv/ro/keep.txt; echo chmod=$?",
    )
    .await;
    let o = text(&out.stdout) + &text(&out.stderr);
    assert!(
        o.contains("vmrs1 /srv/ro virtiofs rw"),
        "the remount itself took: {o}"
    );
    for op in ["write", "append", "rm", "mkdir", "chmod"] {
        assert!(
            !o.contains(&format!("{op}=0")),
            "{op} succeeded on a read-only share: {o}"
        );
    }
    assert!(o.contains("Read-only file system"), "{o}");
    assert_eq!(std::fs::read(ro.join("keep.txt")).expect("keep"), b"unchanged\n");
    assert!(!ro.join("new.txt").exists() && !ro.join("d").exists());
    assert_eq!(
        std::fs::metadata(ro.join("keep.txt"))
            .expect("m")
            .permissions()
            .mode()
            & 0o777,
        0o644
    );

    // stop: the daemons end with the VM
    let daemons: Vec<u32> = info.mounts.iter().filter_map(|m| m.daemon_pid).collect();
    assert_eq!(daemons.len(), 2);
    assert_eq!(
        mgr.stop("share1", Duration::from_secs(30)).await.expect("stop"),
        VmState::Stopped
    );
    assert!(
        owned(&home, "share1").is_empty(),
        "left after stop: {:?}",
        owned(&home, "share1")
    );
    assert!(!home.path().join("vms/share1/fs0.sock").exists());
    mgr.remove("share1", false).await.expect("rm");
}

#[tokio::test]
async fn hostile_entries_in_a_share_give_the_guest_nothing_of_the_host() {
    let home = TestHome::new();
    let host = tempfile::tempdir().expect("tmp");
    let share = host.path().join("share");
    std::fs::create_dir(&share).expect("mkdir");
    // what must stay on the host: a secret outside the share, and /etc/shadow
    let secret = host.path().join("secret.txt");
    std::fs::write(&secret, b"HOST-SECRET-4711\n").expect("w");
    std::os::unix::fs::symlink("/etc/shadow", share.join("abs")).expect("symlink");
    std::os::unix::fs::symlink(&secret, share.join("abs-secret")).expect("symlink");
    std::os::unix::fs::symlink("../secret.txt", share.join("rel")).expect("symlink");
    std::os::unix::fs::symlink("../../../../../../../../etc/shadow", share.join("rel-shadow"))
        .expect("symlink");
    std::fs::create_dir(share.join("sub")).expect("mkdir");
    std::os::unix::fs::symlink("../../secret.txt", share.join("sub/up")).expect("symlink");
    // a block device node with the host root disk's numbers
    let root_dev = std::fs::metadata("/").expect("stat /").dev();
    let node = std::ffi::CString::new(share.join("disk").into_os_string().into_encoded_bytes()).expect("c");
    // SAFETY: `node` is a valid NUL-terminated path; mknod creates a file and touches no memory.
    let made = unsafe { libc::mknod(node.as_ptr(), libc::S_IFBLK | 0o666, root_dev) };
    assert_eq!(made, 0, "mknod: {}", std::io::Error::last_os_error());
    let host_shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let shadow_root = host_shadow
        .lines()
        .find(|l| l.starts_with("root:"))
        .unwrap_or("root:");

    let cfg = config("share2", vec![SharedDir::new(&share, "/data", "vmrs0")]).await;
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    mgr.start(cfg).await.expect("start");
    mgr.wait_ready("share2", BOOT_TIMEOUT).await.expect("ready");
    let out = sh(
        &mgr,
        "share2",
        "cd /data; for f in abs abs-secret rel rel-shadow sub/up; do echo \"== $f\"; cat $f 2>&1; done; \
         echo '== ..'; ls -a /data/.. 2>&1; cat /data/../secret.txt 2>&1; \
         echo '== disk'; dd if=/data/disk bs=512 count=1 2>&1 | od -A n -t x1 | head -2",
    )
    .await;
    let o = text(&out.stdout) + &text(&out.stderr);
    assert!(
        !o.contains("HOST-SECRET-4711"),
        "a host file outside the share leaked:\n{o}"
    );
    assert!(
        host_shadow.is_empty() || !o.contains(shadow_root),
        "the host's /etc/shadow leaked:\n{o}"
    );
    // the disk node is the guest's device (this guest has no such disk), not the host's
    let mut host_disk = vec![0u8; 512];
    let host_dev = std::fs::read_dir("/dev").expect("/dev").flatten().find(|e| {
        e.metadata()
            .is_ok_and(|m| m.rdev() == root_dev && m.file_type().is_block_device())
    });
    if let Some(d) = host_dev {
        if let Ok(mut f) = std::fs::File::open(d.path()) {
            let _ = std::io::Read::read_exact(&mut f, &mut host_disk);
        }
        let hex_line: String = host_disk[..16].iter().map(|b| format!(" {b:02x}")).collect();
        if host_disk.iter().any(|b| *b != 0) {
            let disk_part = o.split("== disk").nth(1).unwrap_or_default();
            assert!(
                !disk_part.contains(hex_line.trim()),
                "the host disk is readable:\n{o}"
            );
        }
    }
    mgr.kill("share2").await.expect("kill");
    assert!(owned(&home, "share2").is_empty());
    mgr.remove("share2", false).await.expect("rm");
}

#[tokio::test]
async fn a_killed_daemon_fails_the_vm_with_the_reason_and_nothing_outlives_it() {
    let home = TestHome::new();
    let host = tempfile::tempdir().expect("tmp");
    std::fs::write(host.path().join("f"), b"data\n").expect("w");
    let cfg = config("share3", vec![SharedDir::new(host.path(), "/data", "vmrs0")]).await;
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    mgr.start(cfg).await.expect("start");
    mgr.wait_ready("share3", BOOT_TIMEOUT).await.expect("ready");
    let out = sh(&mgr, "share3", "cat /data/f").await;
    assert_eq!(out.stdout, b"data\n");
    let info = mgr.inspect("share3").await.expect("inspect");
    let pid = info.mounts[0].daemon_pid.expect("daemon pid");
    assert!(info.mounts[0].serving);
    // kill -9 every process of the daemon (its sandboxed worker too)
    let mut victims = vec![pid];
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        victims.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
    }
    for v in &victims {
        // SAFETY: kill(2) on pids read from the daemon's record and its children list.
        unsafe { libc::kill(*v as i32, libc::SIGKILL) };
    }
    assert!(
        wait_until(Duration::from_secs(10), || victims.iter().all(|v| !Path::new(
            &format!("/proc/{v}/cmdline")
        )
        .exists()
            || std::fs::read(format!("/proc/{v}/cmdline"))
                .is_ok_and(|c| c.is_empty())))
        .await
    );
    // reported: a guest access would hang for good (a FUSE request the device took cannot be
    // interrupted), so the VM is failed with the reason, and nothing of it is left
    let mut rx = mgr.subscribe("share3").await.expect("subscribe");
    let failed = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| !s.is_live()))
        .await
        .expect("the vm did not end after its share's daemon died")
        .expect("state")
        .clone();
    match failed {
        VmState::Failed { reason } => {
            assert!(reason.contains("virtiofsd of shared directory"), "{reason}");
            assert!(reason.contains("tag vmrs0"), "{reason}");
        }
        other => panic!("expected failed, got {other:?}"),
    }
    assert!(owned(&home, "share3").is_empty(), "{:?}", owned(&home, "share3"));
    assert!(!home.path().join("vms/share3/virtiofsd.json").exists());
    let other = VmManager::with_home(home.path()).await.expect("manager 2");
    assert!(matches!(
        other.state("share3").await.expect("state"),
        VmState::Failed { reason } if reason.contains("virtiofsd")
    ));
    mgr.remove("share3", false).await.expect("rm");
}

#[tokio::test]
async fn a_share_the_guest_cannot_mount_fails_the_vm_with_the_reason() {
    let home = TestHome::new();
    let host = tempfile::tempdir().expect("tmp");
    // the built-in guest has this file: a share cannot be mounted over it
    let cfg = config(
        "share4",
        vec![SharedDir::new(host.path(), "/etc/vmrs/modules", "vmrs0")],
    )
    .await;
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    mgr.start(cfg).await.expect("start");
    match mgr.wait_ready("share4", BOOT_TIMEOUT).await {
        Err(ManagerError::NotRunning {
            state: VmState::Failed { reason },
            ..
        }) => {
            assert!(reason.contains("guest failed to boot"), "{reason}");
            assert!(
                reason.contains("/etc/vmrs/modules is not a directory"),
                "{reason}"
            );
        }
        other => panic!("expected a failed vm, got {other:?}"),
    }
    assert!(owned(&home, "share4").is_empty(), "{:?}", owned(&home, "share4"));
    mgr.remove("share4", false).await.expect("rm");
}

#[tokio::test]
async fn invalid_shares_are_refused_before_anything_starts() {
    let home = TestHome::new();
    let host = tempfile::tempdir().expect("tmp");
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let (kernel, initramfs) = guest_assets();
    let base = VmConfig::builder("share5")
        .kernel(kernel)
        .initramfs(initramfs)
        .build_unchecked();
    let cases: Vec<SharedDir> = vec![
        SharedDir::new(host.path().join("missing"), "/data", "vmrs0"),
        SharedDir::new(host.path(), "relative", "vmrs0"),
        SharedDir::new(host.path(), "/", "vmrs0"),
        SharedDir::new(host.path(), "/a/../etc", "vmrs0"),
        SharedDir::new(host.path(), "/a\nb", "vmrs0"),
        SharedDir::new(host.path(), "/data", "has space"),
        SharedDir::new(host.path(), "/data", ""),
        SharedDir::new(host.path(), "/data", "x".repeat(37)),
    ];
    for share in cases {
        let mut cfg = base.clone();
        cfg.shared_dirs.push(share.clone());
        match mgr.start(cfg).await {
            Err(e @ ManagerError::Config(_)) => assert_eq!(e.kind(), vm_rs::ErrorKind::Invalid),
            other => panic!("{share:?}: expected invalid, got {other:?}"),
        }
        assert!(!home.path().join("vms/share5").exists());
    }
    let mut cfg = base.clone();
    cfg.shared_dirs.push(SharedDir::new(host.path(), "/a", "t"));
    cfg.shared_dirs.push(SharedDir::new(host.path(), "/b", "t"));
    assert!(
        matches!(mgr.start(cfg).await, Err(ManagerError::Config(_))),
        "duplicate tag"
    );
    let mut cfg = base;
    cfg.shared_dirs.push(SharedDir::new(host.path(), "/a", "t1"));
    cfg.shared_dirs.push(SharedDir::new(host.path(), "/a/", "t2"));
    assert!(
        matches!(mgr.start(cfg).await, Err(ManagerError::Config(_))),
        "duplicate guest path"
    );
}

#[tokio::test]
async fn shares_are_mounted_in_an_image_root_too() {
    let assets = support::guest::assets().await;
    let home = TestHome::new();
    let work = tempfile::tempdir().expect("tmp");
    // a tiny image: busybox and no /data (the init creates the mount point in the new root)
    let tree = work.path().join("tree");
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(tree.join(d)).expect("mkdir");
    }
    std::fs::copy(&assets.busybox, tree.join("bin/busybox")).expect("busybox");
    std::fs::set_permissions(tree.join("bin/busybox"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    for applet in ["sh", "cat", "grep", "echo"] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).expect("symlink");
    }
    std::fs::write(tree.join("etc/os-release"), "ID=share-image\n").expect("os-release");
    let img = work.path().join("root.ext4");
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("32M")
        .status()
        .expect("mkfs.ext4");
    assert!(status.success());
    let share = work.path().join("share");
    std::fs::create_dir(&share).expect("mkdir");
    std::fs::write(share.join("f"), b"into the image root\n").expect("w");

    let cfg = config("share6", vec![SharedDir::new(&share, "/data", "vmrs0")]).await;
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    mgr.start_with_rootfs(cfg, &img).await.expect("start");
    if let Err(e) = mgr.wait_ready("share6", BOOT_TIMEOUT).await {
        let log = std::fs::read_to_string(home.path().join("vms/share6/serial.log")).unwrap_or_default();
        panic!("not ready: {e:?}\n{log}");
    }
    let out = sh(
        &mgr,
        "share6",
        "cat /etc/os-release /data/f; grep ' /data ' /proc/mounts; echo w > /data/back",
    )
    .await;
    let o = text(&out.stdout);
    assert!(
        o.starts_with("ID=share-image\ninto the image root\nvmrs0 /data virtiofs rw"),
        "{o}"
    );
    assert_eq!(std::fs::read(share.join("back")).expect("back"), b"w\n");
    mgr.kill("share6").await.expect("kill");
    assert!(owned(&home, "share6").is_empty());
    mgr.remove("share6", false).await.expect("rm");
}

/// Debian's old C virtiofsd (`VMRS_VIRTIOFSD`): it serves read-write shares, and a read-only
/// share on it is refused before anything starts (it has no read-only mode).
#[tokio::test]
async fn the_c_daemon_serves_read_write_shares_and_refuses_read_only_ones() {
    let c_daemon = Path::new(vm_rs::virtiofs::QEMU_FALLBACK);
    assert!(
        c_daemon.exists(),
        "qemu-system-common ships {}",
        c_daemon.display()
    );
    // this test binary's process only (nextest runs each test in its own process)
    std::env::set_var(vm_rs::virtiofs::ENV, c_daemon);
    let home = TestHome::new();
    let share = tempfile::tempdir().expect("tmp");
    std::fs::write(share.path().join("f"), b"c daemon\n").expect("w");
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let mut ro = SharedDir::new(share.path(), "/data", "vmrs0");
    ro.read_only = true;
    match mgr.start(config("share7", vec![ro]).await).await {
        Err(e @ ManagerError::Share { .. }) => {
            assert_eq!(e.kind(), vm_rs::ErrorKind::Unsupported);
            let chain = format!("{:?}", e);
            assert!(chain.contains("ReadOnlyUnsupported"), "{chain}");
        }
        other => panic!("expected the read-only share refused, got {other:?}"),
    }
    assert!(!home.path().join("vms/share7").exists());
    let cfg = config("share7", vec![SharedDir::new(share.path(), "/data", "vmrs0")]).await;
    mgr.start(cfg).await.expect("start");
    mgr.wait_ready("share7", BOOT_TIMEOUT).await.expect("ready");
    let out = sh(&mgr, "share7", "cat /data/f && echo back > /data/g").await;
    assert_eq!(out.stdout, b"c daemon\n");
    assert_eq!(std::fs::read(share.path().join("g")).expect("g"), b"back\n");
    mgr.kill("share7").await.expect("kill");
    assert!(owned(&home, "share7").is_empty());
    mgr.remove("share7", false).await.expect("rm");
}
