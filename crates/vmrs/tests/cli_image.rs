//! `vmrs pull/images/image inspect/image unpack/rmi` against a real local registry.

#![allow(clippy::unwrap_used)]

#[path = "../../vm-rs/tests/support/oci_layout.rs"]
mod oci_layout;
#[path = "../../vm-rs/tests/support/registry.rs"]
mod registry;
#[path = "../../vm-rs/tests/support/registry_auth.rs"]
mod registry_auth;

use assert_cmd::Command;
use oci_layout::{busybox_layer, Comp};
use registry::{Registry, RegistryOptions};

fn vmrs(home: &std::path::Path) -> Command {
    let mut c = Command::cargo_bin("vmrs").unwrap();
    c.arg("--home")
        .arg(home)
        .env_remove("VMRS_HOME")
        .env("DOCKER_CONFIG", home.join("docker"));
    c
}

#[test]
fn pull_list_inspect_unpack_remove() {
    let reg = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let (layer, busybox) = busybox_layer(Comp::Gzip);
    let digest = oci_layout::single_image_layout(
        layout.path(),
        "v1",
        &[layer],
        serde_json::json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}),
    );
    reg.push_layout(layout.path(), "v1", "cli/busybox", false);
    let home = tempfile::tempdir().unwrap();
    let reference = format!("{}/cli/busybox:v1", reg.host());

    let out = vmrs(home.path())
        .args(["pull", "-q", &reference])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
    assert!(home.path().join("images/refs.json").is_file());

    let out = vmrs(home.path()).args(["images", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["reference"], reference.as_str());
    assert_eq!(list[0]["manifest"], digest.as_str());
    let out = vmrs(home.path()).args(["images"]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&reference) && table.contains(&digest[7..19]),
        "{table}"
    );

    let out = vmrs(home.path())
        .args(["image", "inspect", &reference])
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["config"]["cmd"][0], "/bin/sh");
    assert_eq!(info["config"]["env"][0], "PATH=/bin");

    let root = tempfile::tempdir().unwrap();
    vmrs(home.path())
        .args(["image", "unpack", &reference])
        .arg(root.path())
        .assert()
        .success();
    assert_eq!(std::fs::read(root.path().join("bin/busybox")).unwrap(), busybox);

    // Unknown image: exit code 3; bad reference: 5.
    vmrs(home.path())
        .args(["image", "inspect", "nope:1"])
        .assert()
        .code(3);
    vmrs(home.path())
        .args(["pull", "Not A Reference"])
        .assert()
        .code(5);

    vmrs(home.path())
        .args(["rmi", "--prune", &reference])
        .assert()
        .success();
    let out = vmrs(home.path()).args(["images", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(list.as_array().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(home.path().join("images/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn concurrent_pulls_from_several_processes_share_the_store() {
    let reg = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let (layer, busybox) = busybox_layer(Comp::Zstd);
    oci_layout::single_image_layout(layout.path(), "v1", &[layer], serde_json::json!({}));
    reg.push_layout(layout.path(), "v1", "cli/race", false);
    let home = tempfile::tempdir().unwrap();
    let reference = format!("{}/cli/race:v1", reg.host());
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_vmrs"))
            .arg("--home")
            .arg(home.path())
            .env("DOCKER_CONFIG", home.path().join("docker"))
            .args(["pull", "-q", &reference])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b, c) = (spawn(), spawn(), spawn());
    for child in [a, b, c] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // One record, every blob intact, nothing left half-written.
    let out = vmrs(home.path()).args(["images", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    for e in std::fs::read_dir(home.path().join("images/blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let bytes = std::fs::read(e.path()).unwrap();
        assert_eq!(&oci_layout::sha(&bytes)[7..], e.file_name().to_str().unwrap());
    }
    assert_eq!(
        std::fs::read_dir(home.path().join("images/ingest"))
            .unwrap()
            .count(),
        0
    );
    let root = tempfile::tempdir().unwrap();
    vmrs(home.path())
        .args(["image", "unpack", &reference])
        .arg(root.path())
        .assert()
        .success();
    assert_eq!(std::fs::read(root.path().join("bin/busybox")).unwrap(), busybox);
}

#[test]
fn pull_from_tls_registry_with_registry_ca() {
    let pki = registry_auth::TestPki::new();
    let reg = Registry::start_with(RegistryOptions {
        tls: Some((pki.server_cert.clone(), pki.server_key.clone())),
        ..RegistryOptions::default()
    });
    let layout = tempfile::tempdir().unwrap();
    let (layer, _) = busybox_layer(Comp::Gzip);
    let digest = oci_layout::single_image_layout(
        layout.path(),
        "v1",
        &[layer],
        serde_json::json!({"Cmd": ["/bin/sh"]}),
    );
    reg.push_layout(layout.path(), "v1", "cli/tls", false);
    let home = tempfile::tempdir().unwrap();
    let reference = format!("{}/cli/tls:v1", reg.host());
    // A CA file that cannot be read is refused before any connection.
    let out = vmrs(home.path())
        .args(["pull", "-q", "--registry-ca"])
        .arg(format!(
            "{}={}",
            reg.host(),
            home.path().join("none.pem").display()
        ))
        .arg(&reference)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a missing CA file was accepted");
    let ca = format!("{}={}", reg.host(), pki.ca_cert.display());
    let out = vmrs(home.path())
        .args(["pull", "-q", "--registry-ca", &ca, &reference])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
    vmrs(home.path())
        .args(["pull", "-q", "--registry-ca", "no-equals-sign", &reference])
        .assert()
        .failure();
}
