//! A real containerd (Debian's) started by a test with its own config, root, state and socket,
//! and OCI image archives built by the test. Everything the test starts is killed and unmounted
//! by [`Guard`] even when it fails.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const RUNTIME: &str = "io.containerd.vmrs.v1";
pub const IMAGE: &str = "docker.io/library/vmrs-shim-test:latest";
pub const NS: &str = "vmrstest";
/// The namespace of the CRI plugin.
pub const CRI_NS: &str = "k8s.io";
/// The CRI runtime handler naming this shim in the test's config.
pub const HANDLER: &str = "vmrs";
/// The image the CRI plugin runs as each pod's sandbox: busybox sleeping.
pub const PAUSE_IMAGE: &str = "docker.io/library/vmrs-shim-pause:latest";

fn assets_dir() -> PathBuf {
    std::env::var_os("VMRS_ASSETS")
        .map(Into::into)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".local/share/vmrs/assets")
        })
}

/// containerd plus whatever it and the shim started; all of it killed and unmounted on drop.
pub struct Guard {
    pub dir: tempfile::TempDir,
    containerd: Child,
}

impl Guard {
    pub fn start() -> Guard {
        Self::start_with(false)
    }

    /// With `cri`, the CRI plugin is on: runtime handler [`HANDLER`] is this shim, the sandbox
    /// image is [`PAUSE_IMAGE`], and its gRPC socket is [`Guard::sock`].
    pub fn start_with(cri: bool) -> Guard {
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in("/tmp")
            .expect("tmp");
        let d = dir.path();
        // top-level keys first: in TOML a key after a table header belongs to that table (a
        // `root` after the CRI tables would leave containerd on /var/lib/containerd)
        let mut config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
        );
        if !cri {
            config.push_str("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n");
        }
        config.push_str(&format!(
            "[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  level = \"debug\"\n",
            sock = d.join("c.sock").display(),
        ));
        if cri {
            config.push_str(&format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{PAUSE_IMAGE}\"\n  [plugins.\"io.containerd.grpc.v1.cri\".cni]\n    bin_dir = \"{cni}/bin\"\n    conf_dir = \"{cni}/conf\"\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n    default_runtime_name = \"{HANDLER}\"\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{HANDLER}]\n    runtime_type = \"{RUNTIME}\"\n",
                cni = d.join("cni").display(),
            ));
        }
        std::fs::write(d.join("config.toml"), config).expect("config");
        let containerd = Self::spawn_containerd(d);
        let g = Guard { dir, containerd };
        g.wait_listening();
        g
    }

    pub fn spawn_containerd(d: &Path) -> Child {
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

    pub fn wait_listening(&self) {
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
    pub fn restart_containerd(&mut self) {
        // SAFETY: kill(2) of our own child, not yet waited for.
        unsafe { libc::kill(self.containerd.id() as i32, libc::SIGTERM) };
        let _ = self.containerd.wait();
        let _ = std::fs::remove_file(self.sock());
        self.containerd = Self::spawn_containerd(self.dir.path());
        self.wait_listening();
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr -a SOCK -n NS ARGS` with `stdin`, bounded in time.
    pub fn ctr(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.ctr_in(NS, args, stdin)
    }

    /// `ctr -a SOCK -n NS ARGS` in namespace `ns`.
    pub fn ctr_in(&self, ns: &str, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new("ctr")
            .arg("-a")
            .arg(self.sock())
            .args(["-n", ns])
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
    pub fn our_processes(&self, needle: &str) -> Vec<i32> {
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

    pub fn our_mounts(&self) -> Vec<String> {
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

pub fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// An OCI image archive: busybox (static) with its applet links, as `ctr image import` reads it.
pub fn image_tar(path: &Path) {
    image_tar_named(path, IMAGE, &["sh"]);
}

/// [`image_tar`] with another name and `Cmd`.
pub fn image_tar_named(path: &Path, name: &str, cmd: &[&str]) {
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
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd},
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
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "latest"}}]
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

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    f()
}

pub fn import(g: &Guard) {
    let tar = g.dir.path().join("image.tar");
    image_tar(&tar);
    let out = g.ctr(&["image", "import", &tar.to_string_lossy()], b"");
    assert!(out.status.success(), "import: {}\n{}", text(&out.stderr), g.log());
}

/// Import [`IMAGE`] and [`PAUSE_IMAGE`] into the CRI plugin's namespace.
pub fn import_cri(g: &Guard) {
    for (file, name, cmd) in [
        ("image.tar", IMAGE, &["sh"][..]),
        ("pause.tar", PAUSE_IMAGE, &["sleep", "1000000"][..]),
    ] {
        let tar = g.dir.path().join(file);
        image_tar_named(&tar, name, cmd);
        let out = g.ctr_in(CRI_NS, &["image", "import", &tar.to_string_lossy()], b"");
        assert!(out.status.success(), "import: {}\n{}", text(&out.stderr), g.log());
    }
}
