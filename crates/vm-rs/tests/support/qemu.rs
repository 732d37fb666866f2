//! A raw QEMU guest for tests that check the guest side alone (no VmManager): spawns
//! `qemu-system-x86_64 -M microvm,acpi=on` under TCG with a serial log and a QMP socket, and
//! kills it when dropped, so a failing test never leaves QEMU behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use vm_rs::guest::GuestAssets;

/// A running QEMU process; killed on drop.
pub struct RawQemu {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub serial: PathBuf,
    pub qmp: PathBuf,
}

impl RawQemu {
    /// Boot `assets` with `append` added to the kernel command line and `extra` QEMU arguments.
    pub fn boot<S: AsRef<std::ffi::OsStr>>(assets: &GuestAssets, append: &str, extra: &[S]) -> RawQemu {
        Self::boot_in(tempfile::tempdir().expect("tempdir"), assets, append, extra)
    }

    /// [`RawQemu::boot`] using `dir` (kept until the VM is dropped) for its files, so `extra`
    /// can point at sockets or disks inside it.
    pub fn boot_in<S: AsRef<std::ffi::OsStr>>(
        dir: tempfile::TempDir,
        assets: &GuestAssets,
        append: &str,
        extra: &[S],
    ) -> RawQemu {
        let serial = dir.path().join("serial.log");
        let qmp = dir.path().join("qmp.sock");
        let mut cmdline = format!("console=ttyS0 reboot=t panic=-1 {append}");
        if let Some(khz) = vm_rs::host::cpu_khz() {
            cmdline = format!("{cmdline} tsc_early_khz={khz}");
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "microvm,acpi=on", "-accel", "tcg", "-m", "256", "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-kernel")
            .arg(&assets.kernel)
            .arg("-initrd")
            .arg(&assets.initramfs)
            .arg("-append")
            .arg(cmdline)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("qemu.stderr")).expect("stderr file"),
            ));
        let child = cmd.spawn().expect("spawn qemu-system-x86_64");
        RawQemu {
            child,
            dir,
            serial,
            qmp,
        }
    }

    /// The serial log so far, followed by QEMU's stderr (for failure messages).
    pub fn log(&self) -> String {
        let serial = String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned();
        let stderr = std::fs::read_to_string(self.dir.path().join("qemu.stderr")).unwrap_or_default();
        if stderr.is_empty() {
            serial
        } else {
            format!("{serial}\n--- qemu stderr ---\n{stderr}")
        }
    }

    /// Wait until the serial log has a line equal to `line` (or QEMU exits / timeout).
    pub async fn wait_line(&mut self, line: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            // a whole line, or a kernel record's text after its timestamp (how the guest
            // init prints its markers)
            let stamped = format!("] {line}");
            if self.log().lines().any(|l| {
                let l = l.trim_end_matches('\r');
                l == line || (l.starts_with('[') && l.ends_with(&stamped))
            }) {
                return true;
            }
            if Instant::now() > deadline || self.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait for QEMU to exit; its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Send one QMP command (after capabilities negotiation) and return the reply line.
    pub async fn qmp(&self, command: &str) -> String {
        if !self.qmp.exists() {
            panic!("qmp socket gone (qemu exited?):\n{}", self.log());
        }
        qmp_command(&self.qmp, command).await
    }

    /// A path inside the test's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for RawQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn qmp_command(sock: &Path, command: &str) -> String {
    let stream = UnixStream::connect(sock).await.expect("connect qmp");
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let greeting = lines.next_line().await.expect("qmp greeting").expect("greeting");
    assert!(greeting.contains("QMP"), "{greeting}");
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .await
        .expect("write");
    loop {
        let l = lines.next_line().await.expect("read").expect("reply");
        if l.contains("\"return\"") {
            break;
        }
    }
    w.write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
        .await
        .expect("write");
    loop {
        let l = lines.next_line().await.expect("read").expect("reply");
        if l.contains("\"return\"") || l.contains("\"error\"") {
            return l;
        }
    }
}
