//! End to end through a real containerd (Debian's, started by the test with its own config,
//! root, state and socket): `ctr run` with runtime `io.containerd.vmrs.v1` boots a vm-rs VM
//! per container. Everything the test starts is killed by [`Guard`] even when it fails.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const RUNTIME: &str = "io.containerd.vmrs.v1";
const IMAGE: &str = "docker.io/library/vmrs-shim-test:latest";
const NS: &str = "vmrstest";

fn assets_dir() -> PathBuf {
    std::env::var_os("VMRS_ASSETS")
        .map(Into::into)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".local/share/vmrs/assets")
        })
}

/// containerd plus whatever it and the shim started; all of it killed and unmounted on drop.
struct Guard {
    dir: tempfile::TempDir,
    containerd: Child,
}

impl Guard {
    fn start() -> Guard {
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in("/tmp")
            .expect("tmp");
        let d = dir.path();
        let config = format!(
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  level = \"debug\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
        );
        std::fs::write(d.join("config.toml"), config).expect("config");
        let containerd = Self::spawn_containerd(d);
        let g = Guard { dir, containerd };
        g.wait_listening();
        g
    }

    fn spawn_containerd(d: &Path) -> Child {
        let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-vmrs-v1"));
        let path = format!(
            "{}:{}",
            shim.parent().expect("bin dir").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("containerd.log"))
            .expect("log");
        Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env("VMRS_SHIM_HOME", d.join("vmrs"))
            .env("VMRS_ASSETS", assets_dir())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("containerd runs")
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.sock().exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not listen:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop containerd (SIGTERM, as a service manager does; the shims keep running) and start it
    /// again with the same config.
    fn restart_containerd(&mut self) {
        // SAFETY: kill(2) of our own child, not yet waited for.
        unsafe { libc::kill(self.containerd.id() as i32, libc::SIGTERM) };
        let _ = self.containerd.wait();
        let _ = std::fs::remove_file(self.sock());
        self.containerd = Self::spawn_containerd(self.dir.path());
        self.wait_listening();
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr -a SOCK -n NS ARGS` with `stdin`, bounded in time.
    fn ctr(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new("ctr")
            .arg("-a")
            .arg(self.sock())
            .args(["-n", NS])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ctr runs");
        let mut input = child.stdin.take().expect("stdin");
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(90);
        let killer = std::thread::spawn(move || {
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    return false;
                }
            }
            // SAFETY: kill(2) on the pid of our own child, which has not been waited for.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            true
        });
        let out = child.wait_with_output().expect("ctr output");
        let _ = writer.join();
        drop(killer);
        out
    }

    /// Processes whose command line mentions this test's directory.
    fn our_processes(&self, needle: &str) -> Vec<i32> {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&dir) && cmd.contains(needle) && pid != std::process::id() as i32 {
                pids.push(pid);
            }
        }
        pids
    }

    fn our_mounts(&self) -> Vec<String> {
        let dir = self.dir.path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&dir))
            .collect()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.containerd.kill();
        let _ = self.containerd.wait();
        for pid in self.our_processes("") {
            // SAFETY: kill(2); the pid's command line names this test's private directory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let mut mounts = self.our_mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// An OCI image archive: busybox (static) with its applet links, as `ctr image import` reads it.
fn image_tar(path: &Path) {
    let busybox = std::fs::read("/usr/bin/busybox").expect("busybox-static");
    let mut layer = tar::Builder::new(Vec::new());
    let dir = |p: &str, l: &mut tar::Builder<Vec<u8>>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        l.append_data(&mut h, p, std::io::empty()).expect("dir");
    };
    for d in ["bin", "tmp", "proc", "sys", "dev", "etc", "root"] {
        dir(d, &mut layer);
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    layer
        .append_data(&mut h, "bin/busybox", busybox.as_slice())
        .expect("busybox");
    for app in ["sh", "cat", "echo", "sleep", "true", "ls", "tr"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        layer
            .append_link(&mut h, format!("bin/{app}"), "busybox")
            .expect("link");
    }
    let layer = layer.into_inner().expect("layer");
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha(&layer))]}
    })
    .to_string();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha(config.as_bytes())), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{}", sha(&layer)), "size": layer.len()}]
    })
    .to_string();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", sha(manifest.as_bytes())), "size": manifest.len(),
            "annotations": {"io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "latest"}}]
    })
    .to_string();
    let mut out = tar::Builder::new(std::fs::File::create(path).expect("tar"));
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        out.append_data(&mut h, name, data).expect("entry");
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", index.as_bytes());
    for blob in [layer.as_slice(), config.as_bytes(), manifest.as_bytes()] {
        add(&format!("blobs/sha256/{}", sha(blob)), blob);
    }
    out.finish().expect("tar");
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    f()
}

fn import(g: &Guard) {
    let tar = g.dir.path().join("image.tar");
    image_tar(&tar);
    let out = g.ctr(&["image", "import", &tar.to_string_lossy()], b"");
    assert!(out.status.success(), "import: {}\n{}", text(&out.stderr), g.log());
}

#[test]
fn task_survives_a_containerd_restart() {
    let mut g = Guard::start();
    import(&g);
    let out = g.ctr(
        &["run", "-d", "--runtime", RUNTIME, IMAGE, "r1", "sleep", "1000"],
        b"",
    );
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), g.log());
    g.restart_containerd();
    let ls = text(&g.ctr(&["task", "ls"], b"").stdout);
    assert!(ls.contains("r1") && ls.contains("RUNNING"), "{ls}\n{}", g.log());
    let out = g.ctr(&["task", "kill", "-s", "KILL", "r1"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(wait_until(Duration::from_secs(20), || text(
        &g.ctr(&["task", "ls"], b"").stdout
    )
    .contains("STOPPED")));
    let out = g.ctr(&["task", "delete", "r1"], b"");
    assert!(
        text(&out.stderr).contains("exit code 137"),
        "{}",
        text(&out.stderr)
    );
    let out = g.ctr(&["container", "delete", "r1"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(wait_until(Duration::from_secs(20), || g
        .our_processes("qemu")
        .is_empty()));
    assert!(
        wait_until(Duration::from_secs(20), || g.our_mounts().is_empty()),
        "{:?}",
        g.our_mounts()
    );
}

#[test]
fn ctr_runs_containers_in_vms() {
    let g = Guard::start();
    import(&g);

    // run --rm: output and the command's exit code
    let out = g.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "t1",
            "sh",
            "-c",
            "echo hello-from-vm; echo to-err >&2; exit 7",
        ],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "stdout {} stderr {}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        g.log()
    );
    assert!(
        text(&out.stdout).contains("hello-from-vm"),
        "{}",
        text(&out.stdout)
    );
    assert!(text(&out.stderr).contains("to-err"), "{}", text(&out.stderr));

    // piped stdin reaches the process
    let out = g.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "t2",
            "tr",
            "a-z",
            "A-Z",
        ],
        b"piped data\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "PIPED DATA\n");

    // -t gives the process a terminal (ctr needs one itself: `script` provides it)
    let ctr_cmd = format!(
        "ctr -a {} -n {NS} run -t --rm --runtime {RUNTIME} {IMAGE} t6 sh -c 'test -t 0 && test -t 1 && echo on-a-tty'",
        g.sock().display()
    );
    let out = Command::new("timeout")
        .args(["90", "script", "-qec", &ctr_cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script runs");
    assert!(
        text(&out.stdout).contains("on-a-tty"),
        "{} {}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // detached: ps, exec, kill -s TERM (143), delete
    let out = g.ctr(
        &["run", "-d", "--runtime", RUNTIME, IMAGE, "t3", "sleep", "1000"],
        b"",
    );
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), g.log());
    let out = g.ctr(&["task", "ps", "t3"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).lines().count() >= 2, "{}", text(&out.stdout));
    let out = g.ctr(
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "t3",
            "sh",
            "-c",
            "echo exec-out; exit 3",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("exec-out"));
    let out = g.ctr(&["task", "kill", "-s", "TERM", "t3"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(wait_until(Duration::from_secs(20), || text(
        &g.ctr(&["task", "ls"], b"").stdout
    )
    .contains("STOPPED")));
    let out = g.ctr(&["task", "delete", "t3"], b"");
    // ctr 1.6 reports the exit code of a deleted task as a warning, exiting 0
    assert!(
        text(&out.stderr).contains("exit code 143"),
        "{}",
        text(&out.stderr)
    );
    let out = g.ctr(&["container", "delete", "t3"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(g.our_processes("qemu").is_empty(), "a VMM is left after delete");

    // kill -9 of the shim: containerd's cleanup (the shim's `delete`) leaves nothing
    let out = g.ctr(
        &["run", "-d", "--runtime", RUNTIME, IMAGE, "t4", "sleep", "1000"],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!g.our_processes("qemu").is_empty(), "no VMM runs for t4");
    let shims: Vec<i32> = g
        .our_processes("containerd-shim-vmrs-v1")
        .into_iter()
        .filter(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).replace('\0', " ").contains(" t4 ")
        })
        .collect();
    let shims = if shims.is_empty() {
        g.our_processes("containerd-shim-vmrs-v1")
    } else {
        shims
    };
    assert!(!shims.is_empty(), "no shim process found");
    for p in shims {
        // SAFETY: kill(2) of the shim this test's containerd started.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let _ = g.ctr(&["task", "delete", "-f", "t4"], b"");
    let out = g.ctr(&["container", "delete", "t4"], b"");
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), g.log());
    assert!(
        wait_until(Duration::from_secs(20), || g.our_processes("qemu").is_empty()),
        "a VMM is left after the shim was killed"
    );
    assert!(
        wait_until(Duration::from_secs(20), || g.our_mounts().is_empty()),
        "mounts left: {:?}\n{}",
        g.our_mounts(),
        g.log()
    );

    // a bad process spec: a clear error, no hung task, nothing left
    let start = Instant::now();
    let out = g.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--cwd",
            "relative/dir",
            IMAGE,
            "t5",
            "true",
        ],
        b"",
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cwd"), "{}", text(&out.stderr));
    assert!(start.elapsed() < Duration::from_secs(60));
    let _ = g.ctr(&["container", "delete", "t5"], b"");
    assert!(g.our_processes("qemu").is_empty());
    assert!(g.our_mounts().is_empty(), "mounts left: {:?}", g.our_mounts());
}
