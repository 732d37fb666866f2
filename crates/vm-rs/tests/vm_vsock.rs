//! The guest agent over vsock on QEMU, end to end: a real guest (TCG) through `VmManager`, its
//! `vhost-user-vsock-device` served by a real `vhost-device-vsock` sidecar, the host speaking
//! the hybrid-vsock convention (`CONNECT 1024\n`).
//!
//! * exec (stdout, stderr, exit code) and cp both ways over vsock;
//! * a new `VmManager` reattaching execs over vsock again (the transport is recorded);
//! * killing the sidecar mid-VM: the next exec is a clear agent error, not a hang, and stop
//!   and remove leave nothing behind.

mod support;

use std::time::Duration;
use support::*;
use vm_rs::agent::{ExecCommand, ExitStatus};
use vm_rs::devices::{AgentChannel, AgentTransport, DeviceSet};
use vm_rs::{BackendKind, ManagerError, VmConfig, VmManager};

async fn config(name: &str) -> VmConfig {
    let assets = support::guest::assets().await;
    VmConfig::builder(name)
        .kernel(&assets.kernel)
        .initramfs(&assets.initramfs)
        .memory_mib(256)
        .backend(BackendKind::Qemu)
        .agent_transport(AgentTransport::Vsock)
        .build()
        .expect("config")
}

fn devices(home: &TestHome, vm: &str) -> DeviceSet {
    let p = home.path().join("vms").join(vm).join("devices.json");
    serde_json::from_slice(&std::fs::read(p).expect("devices.json")).expect("parse")
}

fn sidecar(home: &TestHome, vm: &str) -> Option<vm_rs::vsock::VsockRecord> {
    vm_rs::vsock::load(&home.path().join("vms").join(vm))
}

async fn start_ready(home: &TestHome, mgr: &VmManager, name: &str) {
    mgr.start(config(name).await).await.expect("start");
    if let Err(e) = mgr.wait_ready(name, BOOT_TIMEOUT).await {
        let log = std::fs::read_to_string(home.path().join("vms").join(name).join("serial.log"))
            .unwrap_or_default();
        panic!("not ready: {e:?}\n{log}");
    }
}

#[tokio::test]
async fn exec_cp_and_reattach_over_vsock() {
    let home = TestHome::new();
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    start_ready(&home, &mgr, "vs1").await;
    match devices(&home, "vs1").agent {
        Some(AgentChannel::Vsock { port, vhost_user, .. }) => {
            assert_eq!(port, vm_rs::agent::proto::VSOCK_PORT);
            assert!(vhost_user.is_some(), "qemu needs the vhost-user sidecar");
        }
        other => panic!("expected a vsock agent channel, got {other:?}"),
    }
    let rec = sidecar(&home, "vs1").expect("vsock.json");
    assert!(rec.is_alive(), "sidecar runs");

    let out = mgr
        .exec(
            "vs1",
            ExecCommand::new(["sh", "-c", "echo hi; echo oops >&2; exit 3"]),
        )
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.stderr, b"oops\n");
    assert_eq!(out.status, ExitStatus::Exited(3));
    // the guest really has a vsock device (not a virtio-serial agent port in disguise)
    let out = mgr
        .exec(
            "vs1",
            ExecCommand::new([
                "sh",
                "-c",
                "ls /sys/class/virtio-ports; cat /sys/bus/virtio/devices/*/device",
            ]),
        )
        .await
        .expect("exec");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("0x0013"),
        "virtio-vsock device id 19 in the guest: {text}"
    );

    // cp both directions, 3 MiB of random bytes
    let tmp = tempfile::tempdir().expect("tmp");
    let mut data = vec![0u8; 3 << 20];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").expect("urandom"),
        &mut data,
    )
    .expect("read");
    let src = tmp.path().join("blob.bin");
    std::fs::write(&src, &data).expect("write");
    mgr.copy_to("vs1", &src, "/tmp").await.expect("copy in");
    let out = mgr
        .exec("vs1", ExecCommand::new(["wc", "-c", "/tmp/blob.bin"]))
        .await
        .expect("wc");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{} ", data.len())));
    let back = tmp.path().join("back");
    std::fs::create_dir(&back).expect("mkdir");
    mgr.copy_from("vs1", "/tmp/blob.bin", &back)
        .await
        .expect("copy out");
    assert_eq!(std::fs::read(back.join("blob.bin")).expect("read back"), data);

    // a new manager (a new process, as far as the records go) execs over vsock again
    drop(mgr);
    let mgr2 = VmManager::with_home(home.path()).await.expect("manager 2");
    let out = mgr2
        .exec("vs1", ExecCommand::new(["echo", "again"]))
        .await
        .expect("exec after reattach");
    assert_eq!(out.stdout, b"again\n");

    mgr2.stop("vs1", Duration::from_secs(30)).await.expect("stop");
    assert!(
        wait_until(Duration::from_secs(5), || !rec.is_alive()).await,
        "the sidecar ends with its vm"
    );
    mgr2.remove("vs1", false).await.expect("remove");
}

#[tokio::test]
async fn killed_sidecar_is_a_clear_agent_error_and_cleans_up() {
    let home = TestHome::new();
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    start_ready(&home, &mgr, "vs2").await;
    mgr.exec("vs2", ExecCommand::new(["true"]))
        .await
        .expect("exec before");
    let rec = sidecar(&home, "vs2").expect("vsock.json");
    assert!(rec.is_alive());
    std::process::Command::new("kill")
        .args(["-9", &rec.pid.to_string()])
        .status()
        .expect("kill");
    assert!(wait_until(Duration::from_secs(5), || !rec.is_alive()).await);

    let started = std::time::Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        mgr.exec("vs2", ExecCommand::new(["echo", "x"])),
    )
    .await
    .expect("exec after the sidecar died must not hang")
    .expect_err("exec after the sidecar died must fail");
    assert!(matches!(err, ManagerError::Agent { .. }), "agent error: {err:?}");
    let chain = format!("{:#}", anyhow_chain(&err));
    assert!(chain.contains("agent"), "{chain}");
    eprintln!("error after {:?}: {chain}", started.elapsed());

    // the vm is still there and is stopped and removed cleanly, leaving no process behind
    mgr.kill("vs2").await.expect("kill vm");
    mgr.remove("vs2", false).await.expect("remove");
    let dir = home.path().join("vms").join("vs2");
    assert!(!dir.exists(), "vm dir removed");
    assert!(!rec.is_alive());
}

fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `run IMAGE -- CMD` over vsock: an image from a real local registry, its rootfs booted on
/// QEMU with the agent on vsock, the image's process with `-- CMD` overriding its cmd.
#[tokio::test]
async fn image_process_with_a_cmd_override_over_vsock() {
    use support::oci_layout::{self, busybox_layer, Comp};
    use support::registry::Registry;
    let reg = Registry::start();
    let layout = tempfile::tempdir().expect("tmp");
    let (layer, _) = busybox_layer(Comp::Gzip);
    let run = serde_json::json!({
        "Entrypoint": ["sh", "-c"], "Cmd": ["echo default"],
        "Env": ["PATH=/bin", "GREETING=image-env"], "WorkingDir": "/etc"
    });
    oci_layout::single_image_layout(layout.path(), "v1", std::slice::from_ref(&layer), run);
    reg.push_layout(layout.path(), "v1", "test/busybox", false);
    let home = TestHome::new();
    let store = vm_rs::ImageStore::open(home.path().join("images"))
        .await
        .expect("store");
    let reference = format!("{}/test/busybox:v1", reg.host());
    store
        .pull(&reference, &vm_rs::oci::PullOptions::default())
        .await
        .expect("pull");
    let rootfs = vm_rs::rootfs::build_rootfs(&store, home.path(), &reference)
        .await
        .expect("rootfs");
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    mgr.start_with_rootfs(config("vs3").await, &rootfs.path)
        .await
        .expect("start");
    mgr.wait_ready("vs3", BOOT_TIMEOUT).await.expect("ready");
    assert!(matches!(
        devices(&home, "vs3").agent,
        Some(AgentChannel::Vsock { .. })
    ));
    let cmd = rootfs
        .process
        .command(Some(&["echo $GREETING from $(pwd); exit 4".to_string()]))
        .expect("override");
    let out = mgr.exec("vs3", cmd).await.expect("image process");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "image-env from /etc\n");
    assert_eq!(out.status.code(), Some(4));
    mgr.kill("vs3").await.expect("kill");
    mgr.remove("vs3", false).await.expect("remove");
}
