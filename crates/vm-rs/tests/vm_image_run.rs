//! Running an OCI image as a microVM through the library: image from a real local registry →
//! cached ext4 rootfs → per-VM qcow2 overlays → the image's process through the agent.

mod support;

use sha2::{Digest as _, Sha256};
use std::time::Duration;
use support::oci_layout::{self, busybox_layer, Comp};
use support::registry::Registry;
use vm_rs::agent::ExecCommand;
use vm_rs::oci::PullOptions;
use vm_rs::{ImageStore, VmManager};

fn sha256_file(p: &std::path::Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).expect("read")))
}

#[tokio::test]
async fn two_vms_from_one_image_keep_their_writes_and_the_cache_unchanged() {
    support::guest::assets().await;
    let reg = Registry::start();
    let layout = tempfile::tempdir().expect("tmp");
    let (layer, _) = busybox_layer(Comp::Gzip);
    let run = serde_json::json!({
        "Entrypoint": ["sh", "-c"], "Cmd": ["echo $GREETING from $(pwd)"],
        "Env": ["PATH=/bin", "GREETING=image-env"], "WorkingDir": "/etc"
    });
    oci_layout::single_image_layout(layout.path(), "v1", std::slice::from_ref(&layer), run);
    reg.push_layout(layout.path(), "v1", "test/busybox", false);

    let home = support::TestHome::new();
    let store = ImageStore::open(home.path().join("images")).await.expect("store");
    let reference = format!("{}/test/busybox:v1", reg.host());
    store
        .pull(&reference, &PullOptions::default())
        .await
        .expect("pull");

    // Built once, then a cache hit.
    let rootfs = vm_rs::rootfs::build_rootfs(&store, home.path(), &reference)
        .await
        .expect("build rootfs");
    assert!(rootfs.built);
    assert_eq!(
        rootfs.path,
        home.path()
            .join("rootfs")
            .join(format!("{}.ext4", rootfs.manifest.hex()))
    );
    let again = vm_rs::rootfs::build_rootfs(&store, home.path(), &reference)
        .await
        .expect("cached rootfs");
    assert!(!again.built);
    let before = sha256_file(&rootfs.path);

    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    for name in ["img-a", "img-b"] {
        mgr.start_with_rootfs(support::test_config(name), &rootfs.path)
            .await
            .expect("start");
    }
    mgr.wait_all_ready(&["img-a", "img-b"], support::BOOT_TIMEOUT)
        .await
        .expect("ready");

    // The image's process: entrypoint + cmd, env and working dir from its config.
    let out = mgr
        .exec("img-a", rootfs.process.command(None).expect("command"))
        .await
        .expect("image process");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "image-env from /etc\n");
    // `-- CMD` overrides cmd.
    let out = mgr
        .exec(
            "img-a",
            rootfs
                .process
                .command(Some(&["echo hi; exit 3".to_string()]))
                .expect("override"),
        )
        .await
        .expect("override");
    assert_eq!(
        (out.stdout.as_slice(), out.status.code()),
        (&b"hi\n"[..], Some(3))
    );

    // One main process per boot: a second is refused, execs still run beside it.
    let main = ExecCommand::new(["busybox", "sleep", "600"]);
    mgr.exec_main("img-b", &main, vm_rs::agent::Restart::default())
        .await
        .expect("main process");
    let e = mgr
        .exec_main("img-b", &main, vm_rs::agent::Restart::default())
        .await
        .expect_err("a second main process");
    assert!(format!("{e:?}").contains("main process already"), "{e:?}");

    // Each VM writes its own file on its root; neither sees the other's.
    for name in ["img-a", "img-b"] {
        let out = mgr
            .exec(
                name,
                ExecCommand::new(["sh", "-c", &format!("echo {name} > /etc/{name}")]),
            )
            .await
            .expect("write");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    for (me, other) in [("img-a", "img-b"), ("img-b", "img-a")] {
        let out = mgr
            .exec(
                me,
                ExecCommand::new([
                    "sh",
                    "-c",
                    &format!("cat /etc/{me}; cat /etc/hostname; test -e /etc/{other} && echo LEAK"),
                ]),
            )
            .await
            .expect("read");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{me}\nvmrs-test\n"));
    }
    for name in ["img-a", "img-b"] {
        mgr.stop(name, Duration::from_secs(60)).await.expect("stop");
        mgr.remove(name, false).await.expect("rm");
    }
    assert_eq!(
        sha256_file(&rootfs.path),
        before,
        "the cached rootfs was modified"
    );
}
