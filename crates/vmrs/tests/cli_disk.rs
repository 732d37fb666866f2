//! `vmrs disk|seed|keygen|download` through the real binary.

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::Path;

fn vmrs(home: &Path) -> Command {
    let mut c = Command::cargo_bin("vmrs").expect("binary");
    c.env("VMRS_HOME", home);
    c
}

fn json_out(cmd: &mut Command) -> Value {
    let out = cmd.assert().success().get_output().stdout.clone();
    serde_json::from_slice(&out).expect("json")
}

fn sha256sum(p: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

#[test]
fn disk_create_clone_info_resize() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let v = json_out(vmrs(dir.path()).args([
        "disk",
        "create",
        base.to_str().expect("utf8"),
        "--size",
        "16M",
        "--json",
    ]));
    assert_eq!(v["size"], 16 << 20);
    assert_eq!(v["format"], "raw");
    assert_eq!(std::fs::metadata(&base).expect("stat").len(), 16 << 20);

    // Creating again is refused.
    vmrs(dir.path())
        .args(["disk", "create", base.to_str().expect("utf8"), "--size", "1M"])
        .assert()
        .code(4)
        .stderr(predicate::str::contains("already exists"));
    vmrs(dir.path())
        .args(["disk", "create", "x.img", "--size", "ten"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("invalid size"));

    let copy = dir.path().join("copy.raw");
    let v = json_out(vmrs(dir.path()).args([
        "disk",
        "clone",
        base.to_str().expect("utf8"),
        copy.to_str().expect("utf8"),
        "--json",
    ]));
    assert!(["reflink", "sparse-copy"].contains(&v["method"].as_str().expect("method")));

    let ov = dir.path().join("vm.qcow2");
    let v = json_out(vmrs(dir.path()).args([
        "disk",
        "clone",
        "--overlay",
        base.to_str().expect("utf8"),
        ov.to_str().expect("utf8"),
        "--json",
    ]));
    assert_eq!(v["method"], "qcow2-overlay");
    vmrs(dir.path())
        .args(["disk", "resize", ov.to_str().expect("utf8"), "--size", "1G"])
        .assert()
        .success();
    let info = json_out(vmrs(dir.path()).args(["disk", "info", ov.to_str().expect("utf8"), "--json"]));
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 1u64 << 30);
    assert!(info["backing-filename"]
        .as_str()
        .is_some_and(|b| b.ends_with("base.raw")));
    vmrs(dir.path())
        .args(["disk", "resize", ov.to_str().expect("utf8"), "--size", "1M"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("refusing to shrink"));
}

#[test]
fn seed_create_and_keygen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    let k = json_out(vmrs(dir.path()).args(["keygen", keys.to_str().expect("utf8"), "--json"]));
    let pubkey = k["public_openssh"].as_str().expect("pub").to_string();
    assert!(pubkey.starts_with("ssh-ed25519 "));
    // keygen is idempotent: same key the second time.
    let k2 = json_out(vmrs(dir.path()).args(["keygen", keys.to_str().expect("utf8"), "--json"]));
    assert_eq!(k2["public_openssh"], pubkey.as_str());

    let hello = dir.path().join("hello.txt");
    std::fs::write(&hello, "hi\n").expect("write");
    let seed = dir.path().join("seed.img");
    let v = json_out(vmrs(dir.path()).args([
        "seed",
        "create",
        seed.to_str().expect("utf8"),
        "--hostname",
        "vm-1",
        "--ssh-key",
        keys.join("id_ed25519.pub").to_str().expect("utf8"),
        "--user",
        "ops",
        "--net",
        "eth0=10.1.0.2/24,gw=10.1.0.1,dns=10.1.0.1",
        "--runcmd",
        r#"["touch", "/tmp/ok"]"#,
        "--write-file",
        &format!("{}:/etc/hello:644", hello.display()),
        "--mount",
        "share0:/mnt/share:virtiofs",
        "--json",
    ]));
    assert_eq!(v["label"], "cidata");
    let ud = v["user_data"].as_str().expect("user_data");
    assert!(ud.contains(&pubkey));
    assert!(ud.contains(r#"["touch", "/tmp/ok"]"#));
    assert!(v["network_config"]
        .as_str()
        .is_some_and(|n| n.contains("10.1.0.2/24")));
    let out = std::process::Command::new("blkid")
        .args(["-o", "value", "-s", "LABEL"])
        .arg(&seed)
        .output()
        .expect("blkid");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cidata");

    // Hostile hostname: refused, clear message, no image.
    let bad = dir.path().join("bad.img");
    vmrs(dir.path())
        .args([
            "seed",
            "create",
            bad.to_str().expect("utf8"),
            "--hostname",
            "x\nruncmd: [reboot]",
        ])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("invalid hostname"));
    assert!(!bad.exists());
    vmrs(dir.path())
        .args([
            "seed",
            "create",
            bad.to_str().expect("utf8"),
            "--hostname",
            "ok",
            "--runcmd",
            "rm -rf /",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("JSON array"));
}

#[test]
fn catalog_lists_builtins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = json_out(vmrs(dir.path()).args(["disk", "catalog", "--json"]));
    let names: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(names.contains(&"ubuntu-24.04") && names.contains(&"ubuntu-22.04"));
    std::fs::write(
        dir.path().join("image-catalog.json"),
        r#"{"images":[{"name":"x","url":"http://127.0.0.1/x","sha256":"00","bogus":1}]}"#,
    )
    .expect("write");
    vmrs(dir.path())
        .args(["disk", "catalog"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("unknown field"));
}

/// Serve `files` (path → body) on 127.0.0.1, one request per connection, from a thread.
/// Returns the base URL.
fn serve_files(files: Vec<(&'static str, Vec<u8>)>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (status, body) = match files.iter().find(|(p, _)| *p == path) {
                Some((_, b)) => ("200 OK", b.clone()),
                None => ("404 Not Found", Vec::new()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    format!("http://{addr}")
}

fn serve(body: Vec<u8>) -> String {
    format!("{}/file.bin", serve_files(vec![("/file.bin", body)]))
}

#[test]
fn download_verifies_checksum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.bin");
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &body).expect("write");
    let digest = sha256sum(&src);
    let url = serve(body.clone());
    let dest = dir.path().join("out.bin");
    let v = json_out(vmrs(dir.path()).args([
        "download",
        &url,
        dest.to_str().expect("utf8"),
        "--sha256",
        &digest,
        "--json",
    ]));
    assert_eq!(v["sha256"], digest.as_str());
    assert_eq!(std::fs::read(&dest).expect("read"), body);

    let bad = dir.path().join("bad.bin");
    vmrs(dir.path())
        .args([
            "download",
            &url,
            bad.to_str().expect("utf8"),
            "--sha256",
            &"0".repeat(64),
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("sha256 mismatch"));
    assert!(!bad.exists());
}

#[test]
fn disk_pull_and_prepare_from_a_user_catalog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("tiny.raw");
    let body: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    std::fs::write(&src, &body).expect("write");
    let digest = sha256sum(&src);
    let base = serve_files(vec![
        ("/tiny.raw", body.clone()),
        ("/SHA256SUMS", format!("{digest} *tiny.raw\n").into_bytes()),
    ]);
    std::fs::write(
        dir.path().join("image-catalog.json"),
        format!(
            r#"{{"images":[{{"name":"tiny","url":"{base}/tiny.raw","format":"raw","sha256sums_url":"{base}/SHA256SUMS"}}]}}"#
        ),
    )
    .expect("catalog");

    let v = json_out(vmrs(dir.path()).args(["disk", "pull", "tiny", "--json"]));
    assert_eq!(v["sha256"], digest.as_str());
    assert_eq!(v["cached"], false);
    let path = std::path::PathBuf::from(v["path"].as_str().expect("path"));
    assert!(path.starts_with(dir.path().join("disk-images/tiny").join(&digest)));
    assert_eq!(std::fs::read(&path).expect("read"), body);
    let v = json_out(vmrs(dir.path()).args(["disk", "pull", "tiny", "--json"]));
    assert_eq!(v["cached"], true);

    let vm = dir.path().join("vm.qcow2");
    let v = json_out(vmrs(dir.path()).args([
        "disk",
        "prepare",
        "tiny",
        vm.to_str().expect("utf8"),
        "--size",
        "64M",
        "--json",
    ]));
    assert_eq!(v["mode"], "overlay");
    assert_eq!(v["disk"]["format"], "qcow2");
    let info = json_out(vmrs(dir.path()).args(["disk", "info", vm.to_str().expect("utf8"), "--json"]));
    assert_eq!(info["virtual-size"], 64u64 << 20);

    vmrs(dir.path())
        .args(["disk", "pull", "no-such-image"])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("no image named"));
    vmrs(dir.path())
        .args(["disk", "prepare", "ubuntu-24.04-kernel", "x.img"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("not a disk image"));
}
