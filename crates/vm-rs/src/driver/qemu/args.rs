//! The QEMU command line for a VM: `-M microvm,acpi=on` with virtio-mmio devices, the serial
//! console written to a file, and two QMP monitors (one for commands, one held open for events).
//!
//! Kept a pure function of its inputs so it can be unit-tested and reused by the benchmark that
//! compares vm-rs against running the same command line by hand.

use crate::config::{Accel, CacheMode, DiskFormat, VmConfig};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Unix socket paths are limited to 108 bytes (including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Files and sockets of one QEMU instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuPaths {
    /// QMP socket for commands.
    pub qmp: PathBuf,
    /// QMP socket held open by the manager for events.
    pub qmp_events: PathBuf,
    /// Serial console log.
    pub serial_log: PathBuf,
}

impl QemuPaths {
    /// Standard layout inside a VM directory.
    pub fn in_dir(vm_dir: &Path, serial_log: PathBuf) -> Self {
        Self {
            qmp: vm_dir.join("qmp.sock"),
            qmp_events: vm_dir.join("qmp-events.sock"),
            serial_log,
        }
    }
}

/// Everything that shapes the command line besides the config.
#[derive(Debug, Clone)]
pub struct QemuArgsInput<'a> {
    /// The VM.
    pub config: &'a VmConfig,
    /// Resolved accelerator (never `Auto`).
    pub accel: Accel,
    /// Sockets and logs.
    pub paths: &'a QemuPaths,
    /// Extra device arguments (network, agent channel, shared dirs) from other subsystems.
    pub extra_args: &'a [OsString],
    /// Extra kernel command line parameters from other subsystems (e.g. `vmrs.ip=`).
    pub extra_cmdline: &'a [String],
    /// Host TSC frequency in kHz (TCG guests are told it; see [`tsc_khz`]).
    pub tsc_khz: Option<u64>,
}

/// Escape a value for QEMU's `key=value,key=value` option syntax (commas are doubled).
pub fn escape_opt(value: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::with_capacity(value.as_os_str().len());
    for &b in value.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

fn opt(prefix: &str, path: &Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(escape_opt(path));
    s.push(suffix);
    s
}

/// The host's TSC frequency in kHz, read from `/proc/cpuinfo`.
///
/// Under TCG the guest's TSC runs at the host TSC rate, but the microvm machine has no PIT
/// speaker gate, HPET or ACPI PM timer to calibrate it against; on a busy host the quick PIT
/// calibration fails too, and without `tsc_early_khz=` a Debian kernel then hangs after
/// "tsc: Marking TSC unstable" waiting for timer ticks that never arrive.
pub fn tsc_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    crate::guest::parse_cpu_khz(&text)
}

/// Kernel command line for the VM.
pub fn kernel_cmdline(input: &QemuArgsInput<'_>) -> String {
    let mut parts: Vec<String> = vec!["console=ttyS0".into(), "reboot=t".into(), "panic=-1".into()];
    if input.accel == Accel::Tcg {
        parts.push(format!("tsc_early_khz={}", input.tsc_khz.unwrap_or(2_000_000)));
    }
    parts.push(format!("vmrs.name={}", input.config.name));
    parts.extend(input.extra_cmdline.iter().cloned());
    if !input.config.cmdline.trim().is_empty() {
        parts.push(input.config.cmdline.trim().to_string());
    }
    parts.join(" ")
}

/// Build the argument vector (without the program name).
pub fn build(input: &QemuArgsInput<'_>) -> Vec<OsString> {
    let cfg = input.config;
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(OsString::from(s));
    push("-name");
    push(&format!("guest={},debug-threads=on", cfg.name));
    push("-M");
    push("microvm,acpi=on,x-option-roms=off,rtc=on");
    push("-accel");
    match input.accel {
        Accel::Kvm => {
            push("kvm");
            push("-cpu");
            push("host");
        }
        _ => {
            push("tcg");
            push("-cpu");
            push("max");
        }
    }
    push("-smp");
    push(&cfg.cpus.to_string());
    push("-m");
    push(&format!("{}M", cfg.memory_mib));
    for s in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
        push(s);
    }
    a.push("-kernel".into());
    a.push(cfg.kernel.clone().into_os_string());
    if let Some(initrd) = &cfg.initramfs {
        a.push("-initrd".into());
        a.push(initrd.clone().into_os_string());
    }
    a.push("-append".into());
    a.push(kernel_cmdline(input).into());
    a.push("-chardev".into());
    a.push(opt("file,id=serial0,path=", &input.paths.serial_log, ""));
    a.push("-serial".into());
    a.push("chardev:serial0".into());
    a.push("-chardev".into());
    a.push(opt(
        "socket,id=qmp0,server=on,wait=off,path=",
        &input.paths.qmp,
        "",
    ));
    a.push("-mon".into());
    a.push("chardev=qmp0,mode=control".into());
    a.push("-chardev".into());
    a.push(opt(
        "socket,id=qmp1,server=on,wait=off,path=",
        &input.paths.qmp_events,
        "",
    ));
    a.push("-mon".into());
    a.push("chardev=qmp1,mode=control".into());
    for (i, disk) in cfg.disks.iter().enumerate() {
        let format = match disk.format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        };
        let cache = match disk.cache {
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
            CacheMode::Unsafe => "unsafe",
        };
        let ro = if disk.read_only { ",readonly=on" } else { "" };
        a.push("-drive".into());
        a.push(opt(
            &format!("id=disk{i},if=none,format={format},cache={cache}{ro},file="),
            &disk.path,
            "",
        ));
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=disk{i}").into());
    }
    a.extend(input.extra_args.iter().cloned());
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;

    fn input_for<'a>(cfg: &'a VmConfig, paths: &'a QemuPaths, accel: Accel) -> QemuArgsInput<'a> {
        QemuArgsInput {
            config: cfg,
            accel,
            paths,
            extra_args: &[],
            extra_cmdline: &[],
            tsc_khz: Some(2_600_000),
        }
    }

    #[test]
    fn tcg_command_line() {
        let cfg = VmConfig::builder("t1")
            .kernel("/k/vmlinuz")
            .initramfs("/k/initrd")
            .cpus(2)
            .memory_mib(300)
            .cmdline("foo=bar")
            .disk(DiskConfig {
                read_only: true,
                format: DiskFormat::Qcow2,
                ..DiskConfig::new("/d/a,b.img")
            })
            .build_unchecked();
        let paths = QemuPaths::in_dir(Path::new("/vms/t1"), "/vms/t1/serial.log".into());
        let args: Vec<String> = build(&input_for(&cfg, &paths, Accel::Tcg))
            .into_iter()
            .map(|s| s.into_string().expect("utf8"))
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-M microvm,acpi=on"), "{joined}");
        assert!(joined.contains("-accel tcg -cpu max"));
        assert!(joined.contains("-smp 2 -m 300M"));
        let append = &args[args.iter().position(|a| a == "-append").expect("append") + 1];
        assert_eq!(
            append,
            "console=ttyS0 reboot=t panic=-1 tsc_early_khz=2600000 vmrs.name=t1 foo=bar"
        );
        assert!(args.contains(&"file,id=serial0,path=/vms/t1/serial.log".to_string()));
        assert!(args.contains(
            &"id=disk0,if=none,format=qcow2,cache=writeback,readonly=on,file=/d/a,,b.img".to_string()
        ));
        assert!(args.contains(&"virtio-blk-device,drive=disk0".to_string()));
        assert!(args.iter().any(|a| a.ends_with("path=/vms/t1/qmp.sock")));
        assert!(args.iter().any(|a| a.ends_with("path=/vms/t1/qmp-events.sock")));
    }

    #[test]
    fn kvm_gets_host_cpu_and_no_tsc_hint() {
        let cfg = VmConfig::builder("t2").kernel("/k").build_unchecked();
        let paths = QemuPaths::in_dir(Path::new("/v"), "/v/s".into());
        let input = input_for(&cfg, &paths, Accel::Kvm);
        let joined: Vec<String> = build(&input)
            .into_iter()
            .map(|s| s.into_string().expect("utf8"))
            .collect();
        assert!(joined.join(" ").contains("-accel kvm -cpu host"));
        assert!(!kernel_cmdline(&input).contains("tsc_early_khz"));
    }
}
