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
        serde_json::json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin", "GREETING=from-image"], "WorkingDir": "/etc"}),
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

    // -d: the command (with the image's env) starts as the VM's main process and the VM stays
    // up for exec while it runs; the cached rootfs is reused.
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "runbg", &reference, "--"])
        .args([
            "sh",
            "-c",
            "echo started-with-$PATH > /etc/marker; exec busybox sleep 600",
        ])
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
    // exec gets the image's context (working dir, env) unless told otherwise; the host name is
    // the VM's and /etc/hosts (which the image lacks) maps it.
    let out = home
        .vmrs()
        .args([
            "exec",
            "runbg",
            "--",
            "sh",
            "-c",
            "echo $GREETING $(pwd) $(cat /proc/sys/kernel/hostname)",
        ])
        .output()
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-image /etc runbg\n");
    let out = home
        .vmrs()
        .args([
            "exec",
            "-w",
            "/",
            "-e",
            "GREETING=mine",
            "runbg",
            "--",
            "sh",
            "-c",
            "echo $GREETING $(pwd)",
        ])
        .output()
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "mine /\n");
    let out = home
        .vmrs()
        .args(["exec", "runbg", "cat", "/etc/hosts"])
        .output()
        .expect("exec");
    let hosts = String::from_utf8_lossy(&out.stdout);
    assert!(
        hosts.contains("127.0.0.1\tlocalhost") && hosts.contains("\trunbg\n"),
        "{hosts}"
    );
    // The root disk has room by default (>= 1 GiB free).
    let out = home
        .vmrs()
        .args(["exec", "runbg", "busybox", "df", "-k", "/"])
        .output()
        .expect("df");
    let df = String::from_utf8_lossy(&out.stdout);
    let avail_kib: u64 = df
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("df: {df}"));
    assert!(avail_kib >= 1 << 20, "only {avail_kib} KiB free: {df}");
    // inspect names the image and the root disk.
    let info = home.json(&["inspect", "runbg"]);
    assert_eq!(info[0]["image"]["reference"], reference.as_str(), "{info}");
    assert!(
        info[0]["image"]["manifest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{info}"
    );
    assert!(
        info[0]["root_disk"]
            .as_str()
            .is_some_and(|d| d.ends_with("/root.qcow2")),
        "{info}"
    );
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

    // -i: piped input streams to the image's command (without -i it would read /dev/null).
    let out = home
        .vmrs()
        .args([
            "run", "-i", "--rm", "--name", "runin", &reference, "--", "busybox", "sort", "-r",
        ])
        .write_stdin("a\nb\n")
        .output()
        .expect("run -i");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "b\na\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
    let out = home
        .vmrs()
        .args([
            "run",
            "--rm",
            "--name",
            "runnf",
            &reference,
            "--",
            "no-such-program",
        ])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(127),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!home.0.path().join("vms/runnf").exists(), "--rm removed it");

    // A stop signal during the command's run is forwarded to it (docker's sig-proxy): the
    // command dies of it, then the VM stops and --rm still removes it.
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmrs"))
        .env("VMRS_HOME", home.0.path())
        .env("VMRS_ASSETS", assets_dir())
        .env("DOCKER_CONFIG", home.0.path().join("docker"))
        .env_remove("RUST_LOG")
        .args([
            "run",
            "--rm",
            "--name",
            "runsig",
            "--stop-timeout",
            "30",
            &reference,
            "--",
        ])
        .args(["sh", "-c", "echo up; sleep 600"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("read");
    assert_eq!(line, "up\n");
    let t0 = std::time::Instant::now();
    // SAFETY: kill(2) of the child this test spawned.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if t0.elapsed() > std::time::Duration::from_secs(45) {
            let _ = child.kill();
            panic!("run IMAGE did not end after SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut err).expect("stderr");
    eprintln!("run IMAGE after SIGTERM: {status} in {:?}", t0.elapsed());
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{err}");
    assert!(!home.0.path().join("vms/runsig").exists(), "--rm removed it");
}

#[test]
fn an_image_vms_process_exit_stops_it_with_its_code_and_restart_policies_apply() {
    let reg = Registry::start();
    let layout = tempfile::tempdir().expect("tmp");
    let (layer, _) = busybox_layer(Comp::Gzip);
    oci_layout::single_image_layout(
        layout.path(),
        "v1",
        &[layer],
        serde_json::json!({"Cmd": ["/bin/sh", "-c", "echo from-cmd; exit 3"], "Env": ["PATH=/bin"]}),
    );
    reg.push_layout(layout.path(), "v1", "run/exits", false);
    let reference = format!("{}/run/exits:v1", reg.host());
    let home = Home(
        tempfile::Builder::new()
            .prefix("vmrs-x")
            .tempdir_in("/tmp")
            .expect("tmp"),
    );

    // The image's own cmd exits 3: the VM stops and says so.
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "ex3", &reference])
        .output()
        .expect("run -d");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = home.vmrs().args(["wait", "ex3"]).output().expect("wait");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3\n");
    assert_eq!(out.status.code(), Some(3));
    let rows = home.ps();
    let r = row(&rows, "ex3");
    assert_eq!(r["state"], "stopped", "{r}");
    assert_eq!(r["exit_code"], 3, "{r}");
    let out = home.vmrs().args(["ps", "-a"]).output().expect("ps");
    assert!(String::from_utf8_lossy(&out.stdout).contains("exited (3)"));
    let info = home.json(&["inspect", "ex3"]);
    assert_eq!(info[0]["exit_code"], 3, "{info}");
    // logs: the process's output, apart from the console.
    let out = home.vmrs().args(["logs", "ex3"]).output().expect("logs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-cmd\n");
    let out = home
        .vmrs()
        .args(["logs", "--console", "ex3"])
        .output()
        .expect("logs");
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(console.contains("main process exited: code=3"), "{console}");
    assert!(!console.contains("from-cmd"), "{console}");
    // start of the stopped VM runs its process again (docker start): it exits 3 again and
    // the VM stops again with that code.
    let out = home.vmrs().args(["start", "ex3"]).output().expect("start");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = home.vmrs().args(["wait", "ex3"]).output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = row(&home.ps(), "ex3").clone();
    assert_eq!(
        (r["state"].as_str(), r["exit_code"].as_i64()),
        (Some("stopped"), Some(3)),
        "{r}"
    );
    let out = home.vmrs().args(["logs", "ex3"]).output().expect("logs");
    assert!(
        String::from_utf8_lossy(&out.stdout).ends_with("from-cmd\n"),
        "{out:?}"
    );
    let out = home
        .vmrs()
        .args(["logs", "--console", "ex3"])
        .output()
        .expect("logs");
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(console.contains("main process exited: code=3"), "{console}");

    // --restart on-failure:2: run three times, then the VM stops with the last code.
    let out = home
        .vmrs()
        .args([
            "run",
            "-d",
            "--restart",
            "on-failure:2",
            "--name",
            "rs",
            &reference,
            "--",
        ])
        .args(["sh", "-c", "echo try; exit 5"])
        .output()
        .expect("run -d");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = home.vmrs().args(["wait", "rs"]).output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = home.vmrs().args(["logs", "rs"]).output().expect("logs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "try\ntry\ntry\n");
    // A process that succeeds is not restarted on-failure; exit 0 is recorded as such.
    let out = home
        .vmrs()
        .args([
            "run",
            "-d",
            "--restart",
            "on-failure",
            "--name",
            "ok",
            &reference,
            "--",
        ])
        .args(["sh", "-c", "echo once"])
        .output()
        .expect("run -d");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = home.vmrs().args(["wait", "ok"]).output().expect("wait");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(row(&home.ps(), "ok")["exit_code"], 0);
    let out = home.vmrs().args(["logs", "ok"]).output().expect("logs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "once\n");

    // --rootfs-size: the VM's root disk (not the shared cache) is that large.
    let cache: Vec<_> = std::fs::read_dir(home.0.path().join("rootfs"))
        .expect("cache")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ext4"))
        .map(|e| (e.path(), e.metadata().expect("stat").len()))
        .collect();
    assert_eq!(cache.len(), 1);
    let out = home
        .vmrs()
        .args([
            "run",
            "--rm",
            "--rootfs-size",
            "3G",
            "--name",
            "big",
            &reference,
            "--",
        ])
        .args(["busybox", "df", "-k", "/"])
        .output()
        .expect("run --rootfs-size");
    let df = String::from_utf8_lossy(&out.stdout);
    let size_kib: u64 = df
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("df: {df} {}", String::from_utf8_lossy(&out.stderr)));
    assert!(size_kib > 2900 * 1024 && size_kib <= 3 << 20, "{df}");
    assert_eq!(
        std::fs::metadata(&cache[0].0).expect("cache").len(),
        cache[0].1,
        "the cache is untouched"
    );
    let out = home
        .vmrs()
        .args([
            "run",
            "--rm",
            "--rootfs-size",
            "1m",
            "--name",
            "tiny",
            &reference,
            "--",
            "true",
        ])
        .output()
        .expect("run --rootfs-size 1m");
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot hold"));
    assert!(!home.0.path().join("vms/tiny").exists(), "nothing left behind");

    // A restarted VM starts without the old exit code.
    let out = home.vmrs().args(["start", "ex3"]).output().expect("start");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = home.ps();
    let r = row(&r, "ex3");
    assert_eq!(r["state"], "ready", "{r}");
    assert!(r.get("exit_code").is_none(), "a live VM shows no exit code: {r}");
    for n in ["ex3", "rs", "ok"] {
        let out = home.vmrs().args(["rm", "-f", n]).output().expect("rm");
        assert!(out.status.success());
    }
}

/// `du -s -B1 PATH` in bytes.
fn du(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("du")
        .args(["-s", "-B1"])
        .arg(path)
        .output()
        .expect("du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("du {}: {out:?}", path.display()))
}

fn caches(home: &Home) -> Vec<String> {
    std::fs::read_dir(home.0.path().join("rootfs"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".ext4"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn root_caches_go_with_their_image_unless_a_vm_uses_them_and_system_df_matches_du() {
    let reg = Registry::start();
    let layout = tempfile::tempdir().expect("tmp");
    let (layer, _) = busybox_layer(Comp::Gzip);
    oci_layout::single_image_layout(
        layout.path(),
        "v1",
        &[layer],
        serde_json::json!({"Env": ["PATH=/bin"]}),
    );
    reg.push_layout(layout.path(), "v1", "run/cache", false);
    let reference = format!("{}/run/cache:v1", reg.host());
    let home = Home(
        tempfile::Builder::new()
            .prefix("vmrs-g")
            .tempdir_in("/tmp")
            .expect("tmp"),
    );
    let ok = |args: &[&str]| {
        let out = home.vmrs().args(args).output().expect("vmrs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // A VM uses the cache: removing the image keeps it.
    ok(&[
        "run", "-d", "--name", "user", &reference, "--", "busybox", "sleep", "600",
    ]);
    let digest = ok(&["image", "inspect", &reference]);
    let digest: serde_json::Value = serde_json::from_str(&digest).expect("json");
    let hex = digest["digest"]
        .as_str()
        .expect("digest")
        .trim_start_matches("sha256:")
        .to_string();
    assert_eq!(
        caches(&home),
        [format!("{hex}.ext4")],
        "the cache is named by the manifest"
    );
    ok(&["rmi", &reference]);
    ok(&["image", "gc"]);
    assert_eq!(caches(&home).len(), 1, "the VM's overlay is backed by it");

    // system df: what each part takes, as du counts it.
    let rows = home.json(&["system", "df", "--json"]);
    let row = |kind: &str| {
        rows.as_array()
            .expect("rows")
            .iter()
            .find(|r| r["type"] == kind)
            .unwrap_or_else(|| panic!("{kind} in {rows}"))
            .clone()
    };
    let cache_row = row("rootfs-caches");
    assert_eq!(cache_row["count"], 1);
    assert_eq!(
        cache_row["bytes"].as_u64(),
        Some(du(&home.0.path().join("rootfs")))
    );
    assert_eq!(cache_row["reclaimable"], 0, "in use");
    let images = row("images");
    assert_eq!(images["count"], 0);
    let store = std::path::PathBuf::from(images["path"].as_str().expect("path"));
    assert_eq!(images["bytes"].as_u64(), Some(du(&store)));
    assert_eq!(row("vms")["count"], 1);
    let out = home.vmrs().args(["system", "df"]).output().expect("df");
    assert!(String::from_utf8_lossy(&out.stdout).contains("rootfs-caches"));

    // Once the VM is gone, gc removes the cache.
    ok(&["rm", "-f", "user"]);
    let rows = home.json(&["system", "df", "--json"]);
    let vms = rows
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["type"] == "vms")
        .expect("vms")
        .clone();
    assert_eq!(vms["bytes"].as_u64(), Some(du(&home.0.path().join("vms"))));
    let cache_row = rows
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["type"] == "rootfs-caches")
        .expect("c")
        .clone();
    let file = home.0.path().join("rootfs").join(&caches(&home)[0]);
    assert_eq!(
        cache_row["reclaimable"].as_u64(),
        Some(du(&file)),
        "nothing uses it now"
    );
    ok(&["system", "prune"]);
    assert!(caches(&home).is_empty(), "{:?}", caches(&home));

    // rmi alone removes an unused cache of the image it removes.
    ok(&["run", "--rm", &reference, "--", "busybox", "true"]);
    assert_eq!(caches(&home).len(), 1);
    ok(&["rmi", &reference]);
    assert!(caches(&home).is_empty(), "{:?}", caches(&home));
}
