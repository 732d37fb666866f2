//! Hostile inputs to `VmManager::start` (issue 16, invariants 5 and 7): disk images that name
//! host files the user did not, kernel command lines over the kernel's limit, directories and
//! empty files where images belong. Each is refused with a typed configuration error before
//! anything starts, and no VM directory is left behind; the opt-in boots a real guest.

mod support;

use std::path::Path;
use std::process::Command;
use support::*;
use vm_rs::config::{BackingPolicy, ConfigError, DiskFormat};
use vm_rs::storage::image_refs::ImageRefError;
use vm_rs::{DiskConfig, ManagerError, VmManager};

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn no_vm_dirs(home: &Path) -> bool {
    std::fs::read_dir(home.join("vms")).map_or(true, |mut rd| rd.next().is_none())
}

fn config_err(r: Result<vm_rs::VmInfo, ManagerError>) -> ConfigError {
    match r {
        Err(ManagerError::Config(e)) => e,
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[tokio::test]
async fn qcow2_backed_by_host_file_is_refused_unless_allowed() {
    let home = TestHome::new();
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let disks = tempfile::tempdir().expect("tempdir");
    let evil = disks.path().join("evil.qcow2");
    let evil_s = evil.to_str().expect("utf8");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "/etc/shadow",
        "-F",
        "raw",
        evil_s,
        "1M",
    ]);

    let disk = DiskConfig {
        format: DiskFormat::Qcow2,
        read_only: true,
        ..DiskConfig::new(&evil)
    };
    let cfg = || {
        let mut c = test_config("evil");
        c.disks.push(disk.clone());
        c
    };
    let err = config_err(mgr.start(cfg()).await);
    let msg = err.to_string();
    assert!(
        matches!(err, ConfigError::DiskImage(ImageRefError::RefersElsewhere { .. })),
        "{err:?}"
    );
    assert!(
        msg.contains("/etc/shadow") && msg.contains("backing=allow"),
        "unclear error: {msg}"
    );
    assert!(no_vm_dirs(home.path()), "a refused start left a vm directory");

    // An external data file is a host reference too.
    let data = disks.path().join("data.raw");
    let with_data = disks.path().join("data.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", data.display()),
        with_data.to_str().expect("utf8"),
        "1M",
    ]);
    let mut c = test_config("data");
    c.disks.push(DiskConfig {
        format: DiskFormat::Qcow2,
        ..DiskConfig::new(&with_data)
    });
    let err = config_err(mgr.start(c).await);
    assert!(err.to_string().contains("external data file"), "{err}");

    // A disk declared qcow2 that is not one is refused; declared raw it is never probed.
    let raw = disks.path().join("plain.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).expect("write");
    let mut c = test_config("notqcow");
    c.disks.push(DiskConfig {
        format: DiskFormat::Qcow2,
        ..DiskConfig::new(&raw)
    });
    assert!(matches!(
        config_err(mgr.start(c).await),
        ConfigError::DiskImage(ImageRefError::BadHeader { .. })
    ));
    assert!(no_vm_dirs(home.path()));

    // With the opt-in the same image boots (QEMU reads /etc/shadow as the backing file).
    let mut allowed = cfg();
    allowed.disks[0].backing = BackingPolicy::Allow;
    mgr.start(allowed).await.expect("start with backing=allow");
    mgr.wait_ready("evil", BOOT_TIMEOUT).await.expect("ready");
    mgr.kill("evil").await.expect("kill");
    mgr.remove("evil", true).await.expect("rm");
}

#[tokio::test]
async fn overlays_vm_rs_creates_keep_working() {
    let disks = tempfile::tempdir().expect("tempdir");
    let base = disks.path().join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).expect("base");
    let overlay = disks.path().join("vm.qcow2");
    let disk = vm_rs::storage::create_overlay(&base, DiskFormat::Raw, &overlay)
        .await
        .expect("overlay");
    assert_eq!(disk.backing, BackingPolicy::Allow);
    let chain = vm_rs::storage::image_refs::check_disk(&disk).expect("allowed chain");
    let base_abs = std::fs::canonicalize(&base).expect("canonical");
    assert_eq!(chain[0].backing_file.as_deref(), base_abs.to_str());
    assert_eq!(chain[0].backing_format.as_deref(), Some("raw"));
    // The same file attached as a plain user disk is refused.
    let user = DiskConfig {
        format: DiskFormat::Qcow2,
        ..DiskConfig::new(&overlay)
    };
    assert!(vm_rs::storage::image_refs::check_disk(&user).is_err());
    // An overlay on a qcow2 base that names a host file itself is refused: the overlay would
    // come back allowed, and vm-rs never named /etc/shadow.
    let evil = disks.path().join("evil-base.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "/etc/shadow",
        "-F",
        "raw",
        evil.to_str().expect("utf8"),
        "1M",
    ]);
    assert!(matches!(
        vm_rs::storage::create_overlay(&evil, DiskFormat::Qcow2, &disks.path().join("on-evil.qcow2")).await,
        Err(vm_rs::storage::DiskError::Base(
            ImageRefError::RefersElsewhere { .. }
        ))
    ));
    assert!(!disks.path().join("on-evil.qcow2").exists());
    // A plain qcow2 qemu-img made names nothing.
    let plain = disks.path().join("plain.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", plain.to_str().expect("utf8"), "1M"]);
    let plain = DiskConfig {
        format: DiskFormat::Qcow2,
        ..DiskConfig::new(&plain)
    };
    assert!(vm_rs::storage::image_refs::check_disk(&plain)
        .expect("plain")
        .is_empty());
}

#[tokio::test]
async fn whole_kernel_command_line_is_checked_against_the_kernel_limit() {
    let home = TestHome::new();
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let (kernel, _) = guest_assets();
    // The shipped Debian kernel says so in its setup header (COMMAND_LINE_SIZE 2048 - NUL).
    assert_eq!(vm_rs::config::kernel_cmdline_limit(&kernel), 2047);

    // The user's words alone fit, ours on top do not: refused by the backend before QEMU runs.
    let mut c = test_config("longcmd");
    c.cmdline = format!("x={}", "a".repeat(2040));
    assert!(c.validate().is_ok(), "user part alone is within the limit");
    match config_err(mgr.start(c).await) {
        ConfigError::CmdlineTooLong { len, max } => {
            assert_eq!(max, 2047);
            assert!(len > 2047, "{len}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        no_vm_dirs(home.path()),
        "vm directory left after a refused command line"
    );

    // The user's words alone over the limit: refused at validation.
    let mut c = test_config("longer");
    c.cmdline = "b".repeat(3000);
    assert!(matches!(
        config_err(mgr.start(c).await),
        ConfigError::CmdlineTooLong { len: 3000, max: 2047 }
    ));
    assert!(no_vm_dirs(home.path()));
}

#[tokio::test]
async fn directories_and_empty_files_where_images_belong() {
    let home = TestHome::new();
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let dir = tempfile::tempdir().expect("tempdir");

    let mut c = test_config("kdir");
    c.kernel = dir.path().to_path_buf();
    let e = config_err(mgr.start(c).await);
    assert!(
        matches!(e, ConfigError::IsADirectory { what: "kernel", .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("is a directory"), "{e}");

    let mut c = test_config("idir");
    c.initramfs = Some(dir.path().to_path_buf());
    assert!(matches!(
        config_err(mgr.start(c).await),
        ConfigError::IsADirectory {
            what: "initramfs",
            ..
        }
    ));

    let mut c = test_config("ddir");
    c.disks.push(DiskConfig::new(dir.path()));
    assert!(matches!(
        config_err(mgr.start(c).await),
        ConfigError::IsADirectory { what: "disk", .. }
    ));

    let mut c = test_config("ddev");
    c.disks.push(DiskConfig::new("/dev/null"));
    assert!(matches!(
        config_err(mgr.start(c).await),
        ConfigError::NotAFile { what: "disk", .. }
    ));

    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").expect("empty");
    let mut c = test_config("dempty");
    c.disks.push(DiskConfig::new(&empty));
    let e = config_err(mgr.start(c).await);
    assert!(matches!(e, ConfigError::EmptyDisk { .. }), "{e:?}");
    assert!(no_vm_dirs(home.path()), "refused starts left vm directories");
}
