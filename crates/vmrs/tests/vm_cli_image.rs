//! `vmrs run IMAGE -- CMD` against a real local registry and a real TCG guest.

#[path = "../../vm-rs/tests/support/oci_layout.rs"]
mod oci_layout;
#[path = "../../vm-rs/tests/support/registry.rs"]
mod registry;
mod support;

use oci_layout::{busybox_layer, Comp};
use registry::Registry;
use support::*;

#[test]
fn run_image_prints_output_and_exits_with_the_commands_code() {
    let reg = Registry::start();
    let layout = tempfile::tempdir().expect("tmp");
    let (layer, _) = busybox_layer(Comp::Gzip);
    oci_layout::single_image_layout(
        layout.path(),
        "v1",
        &[layer],
        serde_json::json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}),
    );
    reg.push_layout(layout.path(), "v1", "run/busybox", false);
    let reference = format!("{}/run/busybox:v1", reg.host());
    let home = Home(
        tempfile::Builder::new()
            .prefix("vmrs-r")
            .tempdir_in("/tmp")
            .expect("tmp"),
    );

    let out = home
        .vmrs()
        .args(["run", "--rm", "--name", "runimg", &reference, "--"])
        .args(["sh", "-c", "echo hi; echo oops >&2; exit 3"])
        .output()
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("oops"));
    assert_eq!(out.status.code(), Some(3));
    // --rm removed the VM; the rootfs stays cached.
    assert!(!home.0.path().join("vms/runimg").exists());
    let cached: Vec<_> = std::fs::read_dir(home.0.path().join("rootfs"))
        .expect("rootfs cache")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ext4"))
        .collect();
    assert_eq!(cached.len(), 1);

    // -d: the image's process (here the image's own cmd, with its env) starts detached and the
    // VM stays up for exec; the cached rootfs is reused.
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "runbg", &reference, "--"])
        .args(["sh", "-c", "echo started-with-$PATH > /etc/marker"])
        .output()
        .expect("run -d");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "runbg\n");
    let out = home
        .vmrs()
        .args(["exec", "runbg", "--", "sh", "-c"])
        .arg("while ! test -e /etc/marker; do :; done; cat /etc/marker; exit 4")
        .output()
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "started-with-/bin\n");
    assert_eq!(out.status.code(), Some(4));
    let out = home.vmrs().args(["rm", "-f", "runbg"]).output().expect("rm");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read_dir(home.0.path().join("rootfs"))
            .expect("rootfs cache")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".ext4"))
            .count(),
        1
    );
}
