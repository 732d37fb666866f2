//! `vmrs setup` end to end: real `apt-get download`, JSON output, idempotent second run, clear
//! error for a missing init.

use assert_cmd::Command;
use std::path::PathBuf;

fn init_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VMRS_GUEST_INIT").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let status = std::process::Command::new("bash")
        .arg(root.join("scripts/build-guest.sh"))
        .current_dir(&root)
        .status()
        .expect("run build-guest.sh");
    assert!(status.success());
    root.join("target/x86_64-unknown-linux-gnu/release/vmrs-init")
}

#[test]
fn setup_downloads_builds_and_is_idempotent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("assets");
    let init = init_binary();
    let out = Command::cargo_bin("vmrs")
        .expect("vmrs binary")
        .args(["setup", "--json", "--dir"])
        .arg(&dir)
        .arg("--init")
        .arg(&init)
        .output()
        .expect("run vmrs setup");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("downloading linux-image-cloud-amd64"), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json on stdout");
    let kernel = PathBuf::from(json["kernel"].as_str().expect("kernel"));
    assert!(kernel.is_absolute() && kernel.is_file());
    assert!(json["kernel_version"]
        .as_str()
        .expect("kver")
        .ends_with("cloud-amd64"));
    let modules: Vec<&str> = json["modules"]
        .as_array()
        .expect("modules")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    assert!(modules.contains(&"virtio_net") && modules.contains(&"button"));

    let again = Command::cargo_bin("vmrs")
        .expect("vmrs binary")
        .args(["setup", "--dir"])
        .arg(&dir)
        .arg("--init")
        .arg(&init)
        .output()
        .expect("run vmrs setup");
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("up to date"));
}

#[test]
fn setup_with_missing_init_fails_clearly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = Command::cargo_bin("vmrs")
        .expect("vmrs binary")
        .args(["setup", "--dir"])
        .arg(tmp.path().join("assets"))
        .args(["--init", "/nonexistent/vmrs-init"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("vmrs-init not found"), "{stderr}");
    assert!(!tmp.path().join("assets").exists());
}
