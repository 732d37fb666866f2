//! Issue 16 through the CLI. Invariant 6: file and socket modes do not depend on the caller's
//! umask — `vmrs run` runs as a child with umask 000 in a data dir it creates; then every
//! directory under the data dir must be 0700 and every file and socket 0600. Invariant 5: a
//! `--disk` whose image names a host file is refused (exit 5) unless the spec says
//! `backing=allow`; invariant 7: an over-long kernel command line is refused before anything
//! starts.

#[path = "../../vm-rs/tests/support/oci_layout.rs"]
mod oci_layout;
#[path = "../../vm-rs/tests/support/registry.rs"]
mod registry;
mod support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::*;

/// Kills what the test started under a data dir that is not a `Home` itself.
struct Guard(PathBuf);

impl Drop for Guard {
    fn drop(&mut self) {
        kill_recorded(&self.0);
    }
}

fn vmrs_umask0(home: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("vmrs"));
    cmd.args(args)
        .env("VMRS_HOME", home)
        .env("VMRS_ASSETS", assets_dir())
        .env("DOCKER_CONFIG", home.join("docker"))
        .env_remove("RUST_LOG");
    // SAFETY: runs in the forked child before exec and only calls umask(2), which is
    // async-signal-safe and cannot fail.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    cmd.output().expect("run vmrs")
}

/// Every path under `root` (itself included) with its type and permission bits.
fn walk(root: &Path, out: &mut Vec<(PathBuf, std::fs::FileType, u32)>) {
    let meta = std::fs::symlink_metadata(root).expect("stat");
    out.push((
        root.to_path_buf(),
        meta.file_type(),
        meta.permissions().mode() & 0o7777,
    ));
    if meta.is_dir() {
        for e in std::fs::read_dir(root).expect("read_dir").flatten() {
            walk(&e.path(), out);
        }
    }
}

#[test]
fn modes_under_umask_000_are_private() {
    let tmp = Home::new();
    let home = tmp.0.path().join("h");
    let _guard = Guard(home.clone());
    let out = vmrs_umask0(&home, &["run", "-d", "--name", "modes", "--net", "none"]);
    assert!(
        out.status.success(),
        "run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The image store too: pull a small image under the same umask.
    let reg = registry::Registry::start();
    let layout = tempfile::tempdir().expect("tempdir");
    let layer = oci_layout::LayerBuilder::new()
        .file("hello", b"hi\n", 0o644)
        .finish(oci_layout::Comp::Gzip);
    oci_layout::single_image_layout(layout.path(), "v1", &[layer], serde_json::json!({}));
    reg.push_layout(layout.path(), "v1", "modes/img", false);
    let reference = format!("{}/modes/img:v1", reg.host());
    let out = vmrs_umask0(&home, &["pull", "-q", &reference]);
    assert!(
        out.status.success(),
        "pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut entries = Vec::new();
    walk(&home, &mut entries);
    let mut sockets = 0;
    let mut bad = Vec::new();
    for (path, kind, mode) in &entries {
        let want = if kind.is_dir() { 0o700 } else { 0o600 };
        if kind.is_socket() {
            sockets += 1;
        }
        if *mode != want {
            bad.push(format!("{:o} (want {want:o}) {}", mode, path.display()));
        }
    }
    assert!(bad.is_empty(), "modes depend on the umask:\n{}", bad.join("\n"));
    // The VM's directory, its records, logs and the VMM's sockets were all looked at.
    let vm = home.join("vms/modes");
    for name in [
        "config.json",
        "state.json",
        "serial.log",
        "vmm.log",
        "qmp.sock",
        "agent.sock",
    ] {
        assert!(
            entries.iter().any(|(p, _, _)| *p == vm.join(name)),
            "{name} missing from {}",
            vm.display()
        );
    }
    assert!(sockets >= 3, "expected the QMP and agent sockets, saw {sockets}");
    assert!(
        entries
            .iter()
            .any(|(p, _, _)| p.starts_with(home.join("images/blobs"))),
        "no blobs looked at"
    );

    let rm = vmrs_umask0(&home, &["rm", "-f", "modes"]);
    assert!(rm.status.success(), "{}", String::from_utf8_lossy(&rm.stderr));
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn disk_naming_a_host_file_needs_backing_allow() {
    let home = Home::new();
    let evil = home.0.path().join("evil.qcow2");
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
    let spec = format!("{evil_s},format=qcow2,ro");
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "evil", "--net", "none", "--disk", &spec])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/etc/shadow") && err.contains("backing=allow"),
        "{err}"
    );
    assert!(!home.0.path().join("vms/evil").exists());

    // Too long a kernel command line: exit 5, nothing created.
    let long = format!("x={}", "a".repeat(2100));
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "long", "--net", "none", "--cmdline", &long])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("kernel command line"));
    assert!(!home.0.path().join("vms/long").exists());

    let allowed = format!("{spec},backing=allow");
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "evil", "--net", "none", "--disk", &allowed])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The chain is shown when the VM starts.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/etc/shadow"), "chain not shown: {err}");
    home.vmrs().args(["rm", "-f", "evil"]).assert().success();
}
