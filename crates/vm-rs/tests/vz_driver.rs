//! The VZ driver on a Linux host, with the real `vmrs-vz` binary: what it refuses before it
//! starts anything, and how a `vmrs-vz` that cannot run the machine is reported. (The machine
//! itself only runs on macOS; see docs/macos.md.)

use std::path::{Path, PathBuf};
use vm_rs::devices::{DeviceSet, Disk, Nic};
use vm_rs::driver::vz::{VzDriver, CONTROL_SOCKET, PLAN_FILE};
use vm_rs::driver::{BootSpec, DriverError, VmDriver};
use vm_rs::VmConfig;

fn config(dir: &Path) -> VmConfig {
    let kernel = dir.join("Image");
    std::fs::write(&kernel, b"not really a kernel").expect("kernel");
    serde_json::from_value(serde_json::json!({
        "name": "vz-test",
        "kernel": kernel,
        "memory_mib": 512,
    }))
    .expect("config")
}

fn spec<'a>(config: &'a VmConfig, dir: &'a Path, devices: DeviceSet) -> BootSpec<'a> {
    BootSpec {
        config,
        vm_dir: dir,
        serial_log: dir.join("serial.log"),
        vmm_log: dir.join("vmm.log"),
        devices,
        guest_params: vec!["vmrs.name=vz-test".into()],
    }
}

fn stub() -> VzDriver {
    VzDriver::with_binary(PathBuf::from(env!("CARGO_BIN_EXE_vmrs-vz")))
}

#[tokio::test]
async fn a_plan_vz_cannot_run_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(dir.path());
    let devices = DeviceSet {
        disks: vec![Disk {
            id: "disk0".into(),
            path: dir.path().join("d.qcow2"),
            format: vm_rs::config::DiskFormat::Qcow2,
            read_only: false,
            cache: vm_rs::config::CacheMode::Writeback,
            serial: None,
        }],
        ..DeviceSet::default()
    };
    let err = stub()
        .boot(&spec(&cfg, dir.path(), devices))
        .await
        .expect_err("qcow2");
    assert!(
        matches!(err, DriverError::Unsupported { feature, .. } if feature.starts_with("qcow2")),
        "{err:?}"
    );
    assert_eq!(err.kind(), vm_rs::ErrorKind::Unsupported);
    // nothing was written or started
    assert!(!dir.path().join(PLAN_FILE).exists());
    assert!(!dir.path().join("vmm.log").exists());
    assert!(vm_rs::process::owned_by(dir.path()).is_empty());
}

#[tokio::test]
async fn published_ports_are_refused_with_the_port_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(dir.path());
    let devices = DeviceSet {
        nics: vec![Nic {
            index: 0,
            mac: vm_rs::config::MacAddr([0x52, 0x54, 0, 1, 2, 3]),
            backend: vm_rs::net::NicBackend::User {
                net: vm_rs::net::USER_NET,
                host: "10.0.2.2".parse().expect("ip"),
                dns: "10.0.2.3".parse().expect("ip"),
                guest: "10.0.2.15".parse().expect("ip"),
                port_forwards: vec![vm_rs::config::PortForward {
                    host_ip: None,
                    host_port: 8080,
                    guest_port: 80,
                    protocol: vm_rs::config::Protocol::Tcp,
                }],
            },
        }],
        ..DeviceSet::default()
    };
    let err = stub()
        .boot(&spec(&cfg, dir.path(), devices))
        .await
        .expect_err("-p");
    let msg = err.to_string();
    assert!(msg.contains("8080") && msg.contains("port forwarding"), "{msg}");
}

#[tokio::test]
async fn a_vmrs_vz_that_exits_is_a_boot_failure_with_its_words() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(dir.path());
    let err = stub()
        .boot(&spec(&cfg, dir.path(), DeviceSet::default()))
        .await
        .expect_err("vmrs-vz cannot run a machine here");
    match &err {
        DriverError::BootFailed { program, detail } => {
            assert!(program.ends_with("vmrs-vz"), "{program}");
            assert!(detail.contains("runs only on macOS"), "{detail}");
        }
        other => panic!("expected a boot failure, got {other:?}"),
    }
    // the plan it was given is on disk, complete, for the next vmrs-vz to read
    let plan: vm_rs::driver::vz::plan::VzPlan =
        serde_json::from_slice(&std::fs::read(dir.path().join(PLAN_FILE)).expect("plan")).expect("parse");
    assert_eq!(plan.name, "vz-test");
    assert_eq!(plan.memory_bytes, 512 << 20);
    assert!(plan.boot.cmdline.starts_with("console=hvc0"));
    assert!(!dir.path().join(CONTROL_SOCKET).exists());
    assert!(
        vm_rs::process::owned_by(dir.path()).is_empty(),
        "the failed vmrs-vz is gone"
    );
}

#[tokio::test]
async fn a_missing_vmrs_vz_is_binary_not_found() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(dir.path());
    let err = VzDriver::with_binary(dir.path().join("no-such-vmrs-vz"))
        .boot(&spec(&cfg, dir.path(), DeviceSet::default()))
        .await
        .expect_err("missing");
    assert!(matches!(err, DriverError::BinaryNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("docs/macos.md"), "{err}");
}

#[tokio::test]
async fn restoring_without_a_saved_state_is_not_found_and_starts_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).expect("mkdir");
    let cfg = config(dir.path());
    let err = stub()
        .restore(&spec(&cfg, dir.path(), DeviceSet::default()), &snap)
        .await
        .expect_err("no state");
    assert!(
        matches!(&err, DriverError::Io { path, source }
            if path.ends_with(vm_rs::driver::vz::SAVE_FILE) && source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
    assert!(!dir.path().join(PLAN_FILE).exists());
    // with a state file, vmrs-vz is started with it (and, here, says it cannot run)
    std::fs::write(snap.join(vm_rs::driver::vz::SAVE_FILE), b"state").expect("state");
    let err = stub()
        .restore(&spec(&cfg, dir.path(), DeviceSet::default()), &snap)
        .await
        .expect_err("not macOS");
    assert!(matches!(err, DriverError::BootFailed { .. }), "{err:?}");
}
