//! The QEMU command line for a VM: `-M microvm,acpi=on` with virtio-mmio devices, the serial
//! console written to a file, two QMP monitors (one for commands, one held open for events), and
//! every [`DeviceSet`] device rendered in QEMU 7.2's syntax.
//!
//! All QEMU option syntax of vm-rs lives in this file: one escaper ([`escape_opt`], commas are
//! doubled), one disk renderer ([`disk_args`], a JSON `-blockdev`, so no file name is ever parsed
//! as options or as a `json:`/protocol prefix), one NIC renderer ([`nic_args`]) and the agent
//! port ([`agent_args`]). Kept pure functions of their inputs so they can be unit-tested and
//! reused by the benchmark that compares vm-rs against running the same command line by hand.

use crate::config::{Accel, CacheMode, VmConfig};
use crate::devices::{AgentChannel, DeviceSet, Disk, MemoryBackend, Nic, SharedFs};
use crate::net::NicBackend;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// Unix socket paths are limited to 108 bytes (including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// QEMU id of the guest RAM backend object.
const MEMORY_ID: &str = "vmrs-mem";

/// Files and sockets of one QEMU instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuPaths {
    /// QMP socket for commands.
    pub qmp: PathBuf,
    /// QMP socket held open by the manager for events.
    pub qmp_events: PathBuf,
    /// Serial console log.
    pub serial_log: PathBuf,
    /// When set, QEMU writes the console to this Unix socket (a capped log's sidecar listens,
    /// see [`crate::console::capture`]) instead of straight to `serial_log`.
    pub serial_socket: Option<PathBuf>,
}

impl QemuPaths {
    /// Standard layout inside a VM directory.
    pub fn in_dir(vm_dir: &Path, serial_log: PathBuf) -> Self {
        Self {
            qmp: vm_dir.join(crate::vm_dir::VmDir::QMP_SOCKET),
            qmp_events: vm_dir.join(crate::vm_dir::VmDir::QMP_EVENTS_SOCKET),
            serial_log,
            serial_socket: None,
        }
    }
}

/// Everything that shapes the command line.
#[derive(Debug, Clone)]
pub struct QemuArgsInput<'a> {
    /// The VM.
    pub config: &'a VmConfig,
    /// Resolved accelerator (never `Auto`).
    pub accel: Accel,
    /// Sockets and logs.
    pub paths: &'a QemuPaths,
    /// The VM's devices.
    pub devices: &'a DeviceSet,
    /// Kernel parameters for the guest init from other subsystems (e.g. `vmrs.ip=`).
    pub guest_params: &'a [String],
    /// Host TSC frequency in kHz (TCG guests are told it; [`crate::host::cpu_khz`]).
    pub tsc_khz: Option<u64>,
}

/// Escape a value for QEMU's `key=value,key=value` option syntax (commas are doubled).
pub fn escape_opt(value: impl AsRef<OsStr>) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let value = value.as_ref().as_bytes();
    let mut out = Vec::with_capacity(value.len());
    for &b in value {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// `prefix` + escaped `value` + `suffix`.
fn opt(prefix: &str, value: impl AsRef<OsStr>, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(escape_opt(value));
    s.push(suffix);
    s
}

// The TSC hint: under TCG the guest's TSC runs at the host TSC rate, but the microvm machine has
// no PIT speaker gate, HPET or ACPI PM timer to calibrate it against; on a busy host the quick
// PIT calibration fails too, and without `tsc_early_khz=` a Debian kernel then hangs after
// "tsc: Marking TSC unstable" waiting for timer ticks that never arrive. The caller passes
// `crate::host::cpu_khz()`.

/// Kernel command line for the VM.
pub fn kernel_cmdline(input: &QemuArgsInput<'_>) -> String {
    let mut parts: Vec<String> = vec!["console=ttyS0".into(), "reboot=t".into(), "panic=-1".into()];
    if input.accel == Accel::Tcg {
        parts.push(format!("tsc_early_khz={}", input.tsc_khz.unwrap_or(2_000_000)));
    }
    parts.push(format!("vmrs.name={}", input.config.name));
    parts.extend(input.guest_params.iter().cloned());
    if !input.config.cmdline.trim().is_empty() {
        parts.push(input.config.cmdline.trim().to_string());
    }
    parts.join(" ")
}

/// `-blockdev` + `-device virtio-blk-device` for one disk. The blockdev is JSON, so the path
/// needs no escaping and is never read as options; the format is always explicit. Read-only
/// and the cache mode map to `read-only`, `cache.direct` and `cache.no-flush`. A qcow2 image's
/// backing file is opened from its header (see the storage module's checks of user images).
pub fn disk_args(disk: &Disk) -> Vec<OsString> {
    let (direct, no_flush) = match disk.cache {
        CacheMode::Writeback => (false, false),
        CacheMode::None => (true, false),
        CacheMode::Unsafe => (false, true),
    };
    let cache = serde_json::json!({"direct": direct, "no-flush": no_flush});
    // JSON carries text: paths that are not UTF-8 are refused by config validation.
    let filename = disk.path.to_string_lossy();
    let blockdev = serde_json::json!({
        "driver": disk.format.to_string(),
        "node-name": disk.id,
        "read-only": disk.read_only,
        "cache": cache,
        "file": {
            "driver": "file",
            "filename": filename,
            "read-only": disk.read_only,
            "cache": cache,
        },
    });
    let mut device = opt("virtio-blk-device,drive=", &disk.id, "");
    if let Some(serial) = &disk.serial {
        device.push(opt(",serial=", serial, ""));
    }
    vec![
        "-blockdev".into(),
        blockdev.to_string().into(),
        "-device".into(),
        device,
    ]
}

/// `-netdev ... -device virtio-net-device,...` for one NIC.
pub fn nic_args(nic: &Nic) -> Vec<OsString> {
    let id = nic.id();
    let netdev: OsString = match &nic.backend {
        NicBackend::User {
            net,
            host,
            dns,
            guest,
            port_forwards,
        } => {
            let mut s = format!(
                "user,id={id},net={},host={host},dns={dns},dhcpstart={guest},ipv6=off",
                net.network_cidr()
            );
            for pf in port_forwards {
                s.push_str(&format!(
                    ",hostfwd={}:{}:{}-{guest}:{}",
                    pf.protocol,
                    pf.bind_ip(),
                    pf.host_port,
                    pf.guest_port
                ));
            }
            s.into()
        }
        NicBackend::Tap { ifname, .. } => opt(
            &format!("tap,id={id},ifname="),
            ifname,
            ",script=no,downscript=no",
        ),
        NicBackend::Switch { local, remote, .. } => {
            let mut s = opt(&format!("dgram,id={id},local.type=unix,local.path="), local, "");
            s.push(opt(",remote.type=unix,remote.path=", remote, ""));
            s
        }
    };
    vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        format!("virtio-net-device,netdev={id},mac={}", nic.mac).into(),
    ]
}

/// The guest agent's channel. virtio-serial: a port with QEMU listening on the channel's
/// socket. vsock: `vhost-user-vsock-device` (virtio-mmio, for microvm) on the
/// `vhost-device-vsock` sidecar's vhost-user socket (QEMU is the client; the sidecar serves
/// the hybrid socket, see [`crate::vsock`]); needs guest RAM in a shared backend. Either way a
/// `process_log` gets the `vmrs.log` virtio-serial port.
pub fn agent_args(agent: &AgentChannel) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["-device".into(), "virtio-serial-device,id=vmrs-vser0".into()];
    let process_log = match agent {
        AgentChannel::VirtioSerial { socket, process_log } => {
            args.extend([
                "-chardev".into(),
                opt("socket,id=vmrs-agent0,path=", socket, ",server=on,wait=off"),
                "-device".into(),
                format!(
                    "virtserialport,bus=vmrs-vser0.0,chardev=vmrs-agent0,name={}",
                    vmrs_proto::PORT_NAME
                )
                .into(),
            ]);
            process_log
        }
        // the guest's CID is the sidecar's (QEMU reads the device config over vhost-user)
        AgentChannel::Vsock {
            vhost_user,
            process_log,
            ..
        } => {
            if let Some(vhost) = vhost_user {
                args.extend([
                    "-chardev".into(),
                    opt("socket,id=vmrs-vsock0,path=", vhost, ""),
                    "-device".into(),
                    "vhost-user-vsock-device,chardev=vmrs-vsock0".into(),
                ]);
            }
            process_log
        }
    };
    if let Some(log) = process_log {
        args.extend([
            "-chardev".into(),
            opt("file,id=vmrs-log0,path=", log, ",append=on"),
            "-device".into(),
            format!(
                "virtserialport,bus=vmrs-vser0.0,chardev=vmrs-log0,name={}",
                vmrs_proto::LOG_PORT_NAME
            )
            .into(),
        ]);
    }
    args
}

/// `-chardev socket` to the share's virtiofsd + `-device vhost-user-fs-device` (the virtio-mmio
/// flavour, for microvm) for shared directory `index`. QEMU is the vhost-user client; the
/// daemon listens (see [`crate::virtiofs`]). Needs guest RAM in a shared backend.
pub fn shared_fs_args(index: usize, fs: &SharedFs) -> Vec<OsString> {
    vec![
        "-chardev".into(),
        opt(&format!("socket,id=vmrs-fs{index},path="), &fs.socket, ""),
        "-device".into(),
        opt(
            &format!("vhost-user-fs-device,chardev=vmrs-fs{index},queue-size=1024,tag="),
            &fs.tag,
            "",
        ),
    ]
}

/// `-object memory-backend-...` for guest RAM (nothing for anonymous memory); the machine is
/// pointed at it with `memory-backend=` (see [`build`]).
fn memory_args(memory: &MemoryBackend, mib: u64) -> Vec<OsString> {
    let share = |shared: bool| if shared { "on" } else { "off" };
    match memory {
        MemoryBackend::Anonymous => Vec::new(),
        MemoryBackend::Memfd { shared } => vec![
            "-object".into(),
            format!(
                "memory-backend-memfd,id={MEMORY_ID},size={mib}M,share={}",
                share(*shared)
            )
            .into(),
        ],
        MemoryBackend::File { path, shared } => vec![
            "-object".into(),
            opt(
                &format!(
                    "memory-backend-file,id={MEMORY_ID},size={mib}M,share={},mem-path=",
                    share(*shared)
                ),
                path,
                "",
            ),
        ],
    }
}

/// `-incoming defer`: QEMU starts with its vCPUs stopped and waits for a migration stream
/// (`migrate-incoming`), how a snapshot is restored.
pub fn incoming_args() -> Vec<OsString> {
    vec!["-incoming".into(), "defer".into()]
}

/// Build the argument vector (without the program name).
pub fn build(input: &QemuArgsInput<'_>) -> Vec<OsString> {
    let cfg = input.config;
    let devices = input.devices;
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(OsString::from(s));
    push("-name");
    push(&format!("guest={},debug-threads=on", cfg.name));
    push("-M");
    if devices.memory == MemoryBackend::Anonymous {
        push("microvm,acpi=on,x-option-roms=off,rtc=on");
    } else {
        push(&format!(
            "microvm,acpi=on,x-option-roms=off,rtc=on,memory-backend={MEMORY_ID}"
        ));
    }
    push("-accel");
    match input.accel {
        Accel::Kvm => {
            push("kvm");
            push("-cpu");
            push("host");
        }
        Accel::Hvf => {
            push("hvf");
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
    a.extend(memory_args(&devices.memory, cfg.memory_mib));
    a.push("-kernel".into());
    a.push(cfg.kernel.clone().into_os_string());
    if let Some(initrd) = &cfg.initramfs {
        a.push("-initrd".into());
        a.push(initrd.clone().into_os_string());
    }
    a.push("-append".into());
    a.push(kernel_cmdline(input).into());
    a.push("-chardev".into());
    a.push(match &input.paths.serial_socket {
        // a client socket: connected before the guest runs, and should the other end go away,
        // QEMU drops console output rather than blocking the guest
        Some(sock) => opt("socket,id=serial0,path=", sock, ""),
        None => opt("file,id=serial0,path=", &input.paths.serial_log, ""),
    });
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
    for disk in &devices.disks {
        a.extend(disk_args(disk));
    }
    for nic in &devices.nics {
        a.extend(nic_args(nic));
    }
    if let Some(agent) = &devices.agent {
        a.extend(agent_args(agent));
    }
    if !devices.shared_dirs.is_empty() {
        // microvm's virtio-mmio transports default to the legacy (v1) interface, which
        // libvhost-user daemons (the C virtiofsd) refuse: "virtio legacy devices aren't
        // supported by libvhost-user"
        a.extend(["-global".into(), "virtio-mmio.force-legacy=false".into()]);
    }
    for (i, fs) in devices.shared_dirs.iter().enumerate() {
        a.extend(shared_fs_args(i, fs));
    }
    if devices.entropy {
        a.extend([
            "-object".into(),
            "rng-random,id=vmrs-rng0,filename=/dev/urandom".into(),
            "-device".into(),
            "virtio-rng-device,rng=vmrs-rng0".into(),
        ]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, DiskFormat, NetworkAttachment, PortForward};

    fn input_for<'a>(
        cfg: &'a VmConfig,
        paths: &'a QemuPaths,
        devices: &'a DeviceSet,
        accel: Accel,
    ) -> QemuArgsInput<'a> {
        QemuArgsInput {
            config: cfg,
            accel,
            paths,
            devices,
            guest_params: &[],
            tsc_khz: Some(2_600_000),
        }
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|s| s.into_string().expect("utf8")).collect()
    }

    #[test]
    fn tcg_command_line() {
        let cfg = VmConfig::builder("t1")
            .kernel("/k/vmlinuz")
            .initramfs("/k/initrd")
            .cpus(2)
            .memory_mib(300)
            .cmdline("foo=bar")
            .build_unchecked();
        let disk = DiskConfig {
            read_only: true,
            format: DiskFormat::Qcow2,
            ..DiskConfig::new("/d/a,b.img")
        };
        let devices = DeviceSet {
            disks: vec![Disk::from_config(0, &disk)],
            ..DeviceSet::default()
        };
        let paths = QemuPaths::in_dir(Path::new("/vms/t1"), "/vms/t1/serial.log".into());
        let args = strings(build(&input_for(&cfg, &paths, &devices, Accel::Tcg)));
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
        let mut captured = paths.clone();
        captured.serial_socket = Some("/vms/t1/serial.sock".into());
        let args = strings(build(&input_for(&cfg, &captured, &devices, Accel::Tcg)));
        assert!(args.contains(&"socket,id=serial0,path=/vms/t1/serial.sock".to_string()));
        assert!(!args.iter().any(|a| a.contains("serial.log")), "{args:?}");
        let bd = &args[args.iter().position(|a| a == "-blockdev").expect("blockdev") + 1];
        let bd: serde_json::Value = serde_json::from_str(bd).expect("json");
        assert_eq!(bd["driver"], "qcow2");
        assert_eq!(bd["read-only"], true);
        assert_eq!(bd["file"]["filename"], "/d/a,b.img");
        assert!(args.contains(&"virtio-blk-device,drive=disk0".to_string()));
        assert!(args.iter().any(|a| a.ends_with("path=/vms/t1/qmp.sock")));
        assert!(args.iter().any(|a| a.ends_with("path=/vms/t1/qmp-events.sock")));
        assert!(!joined.contains("virtio-rng"), "no entropy device unless asked");
    }

    #[test]
    fn kvm_gets_host_cpu_and_no_tsc_hint() {
        let cfg = VmConfig::builder("t2").kernel("/k").build_unchecked();
        let paths = QemuPaths::in_dir(Path::new("/v"), "/v/s".into());
        let devices = DeviceSet::default();
        let input = input_for(&cfg, &paths, &devices, Accel::Kvm);
        assert!(strings(build(&input)).join(" ").contains("-accel kvm -cpu host"));
        let input = input_for(&cfg, &paths, &devices, Accel::Hvf);
        assert!(strings(build(&input)).join(" ").contains("-accel hvf -cpu host"));
        assert!(!kernel_cmdline(&input).contains("tsc_early_khz"));
    }

    #[test]
    fn commas_in_every_path_are_escaped() {
        let cfg = VmConfig::builder("t3").kernel("/k").build_unchecked();
        let paths = QemuPaths::in_dir(Path::new("/v,x"), "/v,x/serial.log".into());
        let sw = crate::net::plan(
            "t3",
            Path::new("/v,x"),
            Path::new("/h,y"),
            &[NetworkAttachment::switch("lab")],
        )
        .expect("plan");
        let devices = DeviceSet {
            disks: vec![Disk {
                serial: Some("a,b".into()),
                ..Disk::from_config(0, &DiskConfig::new("/d,1/img"))
            }],
            nics: sw.iter().map(Nic::from).collect(),
            agent: Some(AgentChannel::VirtioSerial {
                socket: "/v,x/agent.sock".into(),
                process_log: Some("/v,x/process.log".into()),
            }),
            memory: MemoryBackend::File {
                path: "/m,1/ram".into(),
                shared: true,
            },
            ..DeviceSet::default()
        };
        let args = strings(build(&input_for(&cfg, &paths, &devices, Accel::Tcg)));
        for a in &args {
            if a.starts_with('{') {
                continue; // JSON blockdev: no option syntax
            }
            for path in ["/v,x", "/h,y", "/m,1", "a,b"] {
                assert!(
                    !a.contains(path) || a.contains(&path.replace(',', ",,")),
                    "unescaped {path} in {a}"
                );
            }
        }
        assert!(args.contains(&"virtio-blk-device,drive=disk0,serial=a,,b".to_string()));
        assert!(args.iter().any(|a| a.contains("chardev=vmrs-agent0")));
        assert!(args
            .iter()
            .any(|a| a == "file,id=vmrs-log0,path=/v,,x/process.log,append=on"));
        assert!(args
            .iter()
            .any(|a| a == "memory-backend-file,id=vmrs-mem,size=256M,share=on,mem-path=/m,,1/ram"));
        assert!(args.iter().any(|a| a.ends_with("memory-backend=vmrs-mem")));
    }

    #[test]
    fn user_nic_and_entropy() {
        let nics = crate::net::plan(
            "vm",
            Path::new("/d/vms/vm"),
            Path::new("/d"),
            &[NetworkAttachment::user(vec![PortForward::tcp(8080, 80)])],
        )
        .expect("plan");
        let args = strings(nic_args(&Nic::from(&nics[0])));
        assert_eq!(args[0], "-netdev");
        assert_eq!(
            args[1],
            "user,id=net0,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,dhcpstart=10.0.2.15,ipv6=off,\
             hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80"
        );
        assert_eq!(
            args[3],
            format!(
                "virtio-net-device,netdev=net0,mac={}",
                crate::net::derive_mac("vm", 0)
            )
        );
        let cfg = VmConfig::builder("t4").kernel("/k").build_unchecked();
        let paths = QemuPaths::in_dir(Path::new("/v"), "/v/s".into());
        let devices = DeviceSet {
            entropy: true,
            memory: MemoryBackend::Memfd { shared: true },
            ..DeviceSet::default()
        };
        let joined = strings(build(&input_for(&cfg, &paths, &devices, Accel::Tcg))).join(" ");
        assert!(
            joined.contains("-device virtio-rng-device,rng=vmrs-rng0"),
            "{joined}"
        );
        assert!(joined.contains("memory-backend-memfd,id=vmrs-mem,size=256M,share=on"));
    }

    #[test]
    fn shared_dirs_are_vhost_user_fs_devices_on_shared_memory() {
        let cfg = VmConfig::builder("t5").kernel("/k").build_unchecked();
        let paths = QemuPaths::in_dir(Path::new("/v"), "/v/s".into());
        let devices = DeviceSet {
            shared_dirs: vec![SharedFs {
                tag: "a,b".into(),
                host_path: "/srv".into(),
                read_only: true,
                socket: "/v,x/fs0.sock".into(),
            }],
            memory: MemoryBackend::Memfd { shared: true },
            ..DeviceSet::default()
        };
        let args = strings(build(&input_for(&cfg, &paths, &devices, Accel::Tcg)));
        let joined = args.join(" ");
        assert!(joined.contains("microvm,acpi=on,x-option-roms=off,rtc=on,memory-backend=vmrs-mem"));
        assert!(joined.contains("-global virtio-mmio.force-legacy=false"));
        assert!(
            args.contains(&"socket,id=vmrs-fs0,path=/v,,x/fs0.sock".to_string()),
            "{args:?}"
        );
        assert!(args.contains(&"vhost-user-fs-device,chardev=vmrs-fs0,queue-size=1024,tag=a,,b".to_string()));
    }
}
