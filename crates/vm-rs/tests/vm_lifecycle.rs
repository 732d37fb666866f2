//! Real QEMU guests (TCG) through VmManager: boot → ready, pause/resume, graceful stop, kill,
//! kill -9 from outside, bad input.

mod support;

use std::time::Duration;
use support::*;
use vm_rs::{ManagerError, VmManager, VmState};

#[tokio::test]
async fn boot_ready_pause_resume_stop() {
    let home = TestHome::new();
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let info = mgr.start(test_config("life")).await.expect("start");
    assert!(info.pid.is_some());
    let ip = mgr.wait_ready("life", BOOT_TIMEOUT).await.expect("ready");
    assert_eq!(ip.to_string(), "127.0.0.1");
    assert_eq!(
        mgr.state("life").await.expect("state"),
        VmState::Ready {
            ip: std::net::IpAddr::from([127, 0, 0, 1])
        }
    );

    // pause: QMP says paused and the state follows
    mgr.pause("life").await.expect("pause");
    assert_eq!(mgr.state("life").await.expect("state"), VmState::Paused);
    let handle = mgr.handle("life").await.expect("handle").expect("live");
    let driver = vm_rs::driver::driver_for(vm_rs::BackendKind::Qemu).expect("driver");
    assert_eq!(
        driver.status(&handle).await.expect("status"),
        vm_rs::driver::VmmStatus::Paused
    );
    // illegal: pause twice is a typed error
    assert!(matches!(mgr.pause("life").await, Err(ManagerError::State(_))));
    mgr.resume("life").await.expect("resume");
    assert_eq!(
        driver.status(&handle).await.expect("status"),
        vm_rs::driver::VmmStatus::Running
    );
    assert_eq!(
        mgr.state("life").await.expect("state"),
        VmState::Ready {
            ip: std::net::IpAddr::from([127, 0, 0, 1])
        }
    );

    // graceful stop: the guest powers itself off
    let st = mgr.stop("life", Duration::from_secs(60)).await.expect("stop");
    assert_eq!(st, VmState::Stopped);
    let serial = std::fs::read_to_string(home.path().join("vms/life/serial.log")).expect("serial");
    assert!(
        serial.contains("reboot: Power down"),
        "guest did not power itself off:\n{serial}"
    );
    assert!(!alive(handle.pid, handle.start_time), "qemu still running");
    assert!(matches!(mgr.pause("life").await, Err(ManagerError::State(_))));
    mgr.remove("life", false).await.expect("rm");
    assert!(!home.path().join("vms/life").exists());
}

#[tokio::test]
async fn kill_and_external_sigkill_mark_state() {
    let home = TestHome::new();
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    mgr.start(test_config("k1")).await.expect("start k1");
    mgr.start(test_config("k2")).await.expect("start k2");
    // kill through the API → stopped
    assert_eq!(mgr.kill("k1").await.expect("kill"), VmState::Stopped);

    // kill -9 from outside → failed with a reason, quickly
    let h = mgr.handle("k2").await.expect("handle").expect("live");
    let mut rx = mgr.subscribe("k2").await.expect("sub");
    let t0 = std::time::Instant::now();
    std::process::Command::new("kill")
        .args(["-9", &h.pid.to_string()])
        .status()
        .expect("kill -9");
    let st = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let s = rx.borrow_and_update().clone();
            if !s.is_live() {
                return s;
            }
            rx.changed().await.expect("changed");
        }
    })
    .await
    .expect("state changed");
    let elapsed = t0.elapsed();
    match st {
        VmState::Failed { reason } => assert!(reason.contains("signal 9"), "{reason}"),
        other => panic!("expected failed, got {other:?}"),
    }
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    // and a new manager (as a new process would) still reports it failed
    let mgr2 = VmManager::with_home(home.path()).await.expect("manager2");
    assert!(matches!(
        mgr2.state("k2").await.expect("state"),
        VmState::Failed { .. }
    ));
}

#[tokio::test]
async fn bad_input_leaves_nothing_behind() {
    let home = TestHome::new();
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let (kernel, initrd) = guest_assets();
    let cases = vec![
        vm_rs::VmConfig::builder("nokernel")
            .kernel("/nonexistent/vmlinuz")
            .build_unchecked(),
        vm_rs::VmConfig::builder("bad/name")
            .kernel(&kernel)
            .build_unchecked(),
        vm_rs::VmConfig::builder("zeromem")
            .kernel(&kernel)
            .initramfs(&initrd)
            .memory_mib(0)
            .build_unchecked(),
    ];
    for cfg in cases {
        let err = mgr.start(cfg.clone()).await.expect_err("must fail");
        assert!(matches!(err, ManagerError::Config(_)), "{err:?}");
        assert!(!home.path().join("vms").join(&cfg.name).exists());
    }
    assert!(home.recorded_pids().is_empty());
    assert!(mgr.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn concurrent_start_same_name_exactly_one_wins() {
    let home = TestHome::new();
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let mgr2 = VmManager::with_home(home.path()).await.expect("manager2");
    let (a, b) = tokio::join!(mgr.start(test_config("dup")), mgr2.start(test_config("dup")));
    let oks = [a.is_ok(), b.is_ok()].iter().filter(|x| **x).count();
    assert_eq!(oks, 1, "a={a:?} b={b:?}");
    let err = if let Err(e) = a {
        e
    } else {
        b.expect_err("one fails")
    };
    assert!(matches!(err, ManagerError::AlreadyExists { .. }), "{err:?}");
    assert_eq!(home.recorded_pids().len(), 1);
    mgr.kill("dup").await.expect("kill");
}

/// A guest whose kernel panics (no init to run) resets at once (`panic=-1`), which QEMU
/// (`-no-reboot`) reports as a guest-initiated shutdown: the VM is failed, naming the panic.
#[tokio::test]
async fn guest_kernel_panic_is_failed() {
    let home = TestHome::new();
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let (kernel, initramfs) = guest_assets();
    let cfg = vm_rs::VmConfig::builder("panics")
        .kernel(kernel)
        .initramfs(initramfs)
        .memory_mib(256)
        .cmdline("rdinit=/nonexistent")
        .build()
        .expect("config");
    mgr.start(cfg).await.expect("start");
    let err = mgr
        .wait_ready("panics", BOOT_TIMEOUT)
        .await
        .expect_err("never ready");
    let state = match err {
        ManagerError::NotRunning { state, .. } => state,
        other => panic!("expected the vm to end, got {other:?}"),
    };
    let serial = std::fs::read_to_string(home.path().join("vms/panics/serial.log")).expect("serial");
    assert!(
        serial.contains("Kernel panic - not syncing"),
        "no panic on the console:\n{serial}"
    );
    match &state {
        VmState::Failed { reason } => assert!(reason.starts_with("guest kernel panic: "), "{reason}"),
        other => panic!("a panicked guest must be failed, got {other}"),
    }
    // a new manager (a new process) reads the same verdict
    let mgr2 = VmManager::with_home(home.path()).await.expect("manager2");
    assert_eq!(mgr2.state("panics").await.expect("state"), state);
    mgr.remove("panics", false).await.expect("rm");
}
