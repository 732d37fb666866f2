//! Boots the real initramfs under QEMU (TCG) with raw QEMU arguments: readiness marker, static
//! network from the kernel command line, graceful power-off on the ACPI power button.

mod support;

use std::time::Duration;

use support::qemu::RawQemu;

const BOOT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn boots_ready_and_powers_off_on_acpi_button() {
    let assets = support::guest::assets().await;
    let mut vm = RawQemu::boot::<&str>(&assets, "vmrs.hostname=smoke", &[]);
    assert!(
        vm.wait_line("VMRS_READY 127.0.0.1", BOOT).await,
        "no marker:\n{}",
        vm.log()
    );
    let log = vm.log();
    assert!(log.contains("Power Button"), "button module not loaded:\n{log}");
    assert!(
        !log.contains("vmrs-init: loading"),
        "module load failures:\n{log}"
    );
    // The guest stays up on its own (nothing but the power button may stop it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        vm.child.try_wait().expect("try_wait").is_none(),
        "guest stopped by itself:\n{}",
        vm.log()
    );
    assert!(!vm.log().contains("shutting down"), "{}", vm.log());
    // The init opens the power button before it announces readiness, so pressing it works
    // right after the marker too (the static network test presses it immediately).
    let reply = vm.qmp("system_powerdown").await;
    assert!(reply.contains("return"), "{reply}");
    let status = vm.wait_exit(Duration::from_secs(60)).await;
    let log = vm.log();
    assert!(status.is_some(), "qemu did not exit after power button:\n{log}");
    let shut = log.find("vmrs-init: shutting down").expect("shutdown line");
    let off = log.find("vmrs-init: power off").expect("power off line");
    assert!(shut < off);
}

#[tokio::test]
async fn static_network_from_cmdline() {
    let assets = support::guest::assets().await;
    let extra: Vec<String> = [
        "-device",
        "virtio-net-device,netdev=n0",
        "-netdev",
        "user,id=n0,restrict=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vm = RawQemu::boot(
        &assets,
        "vmrs.ip=10.0.2.15/24 vmrs.gw=10.0.2.2 vmrs.dns=10.0.2.3",
        &extra,
    );
    assert!(
        vm.wait_line("VMRS_READY 10.0.2.15", BOOT).await,
        "no marker:\n{}",
        vm.log()
    );
    let log = vm.log();
    assert!(!log.contains("vmrs-init: /bin/ip"), "ip command failed:\n{log}");
    assert!(vm.qmp("system_powerdown").await.contains("return"));
    assert!(
        vm.wait_exit(Duration::from_secs(60)).await.is_some(),
        "{}",
        vm.log()
    );
}
