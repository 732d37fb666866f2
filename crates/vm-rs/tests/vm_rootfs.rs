//! Root filesystem mode: the init mounts a block device given as `vmrs.root=`, switches root to
//! it and keeps serving the agent, which applies user, working dir and environment per exec.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::qemu::RawQemu;
use vm_rs::agent::{AgentClient, ExecCommand, ImageProcess};

/// A tiny image tree: busybox, users, a marker, a directory owned by uid 1000.
fn image_tree(root: &Path, busybox: &Path) {
    for d in ["bin", "etc", "srv", "home/app", "root", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy(busybox, root.join("bin/busybox")).expect("copy busybox");
    std::fs::set_permissions(root.join("bin/busybox"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod busybox");
    for applet in [
        "sh", "id", "pwd", "cat", "echo", "stat", "sync", "ls", "touch", "whoami",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("symlink");
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n").expect("group");
    std::fs::write(root.join("etc/os-release"), "ID=vmrs-test-image\n").expect("os-release");
    std::os::unix::fs::chown(root.join("srv"), Some(1000), Some(1000)).expect("chown");
    std::os::unix::fs::chown(root.join("home/app"), Some(1000), Some(1000)).expect("chown");
    std::fs::set_permissions(root.join("srv"), std::fs::Permissions::from_mode(0o750)).expect("chmod");
}

#[tokio::test]
async fn switches_root_and_applies_user_cwd_env() {
    let assets = support::guest::assets().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    image_tree(&tree, &assets.busybox);
    let img = dir.path().join("root.ext4");
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "vmrs-root", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("32M")
        .status()
        .expect("run mkfs.ext4");
    assert!(status.success());

    let sock = dir.path().join("agent.sock");
    let mut extra = vm_rs::driver::qemu::args::agent_args(&vm_rs::devices::AgentChannel::VirtioSerial {
        socket: sock.clone(),
        process_log: None,
    });
    // A scratch disk next to the root disk: the root is found by its serial, not its order.
    let scratch = dir.path().join("scratch.img");
    std::fs::write(&scratch, vec![0u8; 1 << 20]).expect("scratch");
    for (file, id, serial) in [(&scratch, "scratch", "scratch"), (&img, "root", "vmrs-root")] {
        extra.push("-drive".into());
        extra.push(format!("file={},if=none,format=raw,id={id}", file.display()).into());
        extra.push("-device".into());
        extra.push(format!("virtio-blk-device,drive={id},serial={serial}").into());
    }
    let mut vm = RawQemu::boot(&assets, "vmrs.root=serial:vmrs-root vmrs.rootfstype=ext4", &extra);
    let agent = match AgentClient::connect_timeout(&sock, Duration::from_secs(120)).await {
        Ok(a) => a,
        Err(e) => panic!("agent: {e:?}\n{}", vm.log()),
    };

    let out = agent
        .exec(ExecCommand::new(["cat", "/etc/os-release", "/proc/mounts"]))
        .await
        .expect("exec");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("ID=vmrs-test-image"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("/dev/vd") && l.contains(" / ext4 ")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("tmpfs /tmp tmpfs ")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("proc /proc proc ")), "{text}");

    // The image config as `vmrs run IMAGE` applies it: entrypoint + cmd, env, workdir, user.
    let image = ImageProcess {
        entrypoint: vec!["sh".into(), "-c".into()],
        cmd: vec!["id -u; id -g; pwd; echo $HOME; echo $FOO; stat -c '%u:%g %a' /srv; touch mine && stat -c %u mine".into()],
        env: vec!["FOO=bar baz".into()],
        working_dir: Some("/srv".into()),
        user: Some("app".into()),
    };
    let out = agent
        .exec(image.command(None).expect("image command"))
        .await
        .expect("exec as app");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1000\n1000\n/srv\n/home/app\nbar baz\n1000:1000 750\n1000\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `-- CMD` replaces the image's cmd, keeping its entrypoint and config.
    let out = agent
        .exec(
            image
                .command(Some(&["echo $FOO from $(pwd) as $(id -un)".to_string()]))
                .expect("override"),
        )
        .await
        .expect("exec override");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bar baz from /srv as app\n");

    // Writes land on the disk.
    let out = agent
        .exec(ExecCommand::new([
            "sh",
            "-c",
            "echo persisted > /written-in-guest && sync",
        ]))
        .await
        .expect("write");
    assert!(out.status.success());
    agent.shutdown().await.expect("shutdown");
    assert!(
        vm.wait_exit(Duration::from_secs(60)).await.is_some(),
        "{}",
        vm.log()
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /written-in-guest"])
        .arg(&img)
        .output()
        .expect("debugfs");
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "persisted\n");
    // The root was remounted read-only at shutdown: the filesystem is clean.
    let fsck = Command::new("e2fsck")
        .args(["-n", "-f"])
        .arg(&img)
        .output()
        .expect("e2fsck");
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
}
