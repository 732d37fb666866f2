//! `vmrs-init`: PID 1 inside vm-rs guests.
//!
//! Boot sequence:
//! 1. mount `/proc`, `/sys`, `/dev` (devtmpfs), `/dev/pts`, `/dev/shm`, `/tmp`, `/run`;
//! 2. load the kernel modules listed in `/etc/vmrs/modules` (one `.ko` path per line, dependencies
//!    first) with `finit_module`; a missing file is logged and skipped, an already loaded module
//!    is fine;
//! 3. read the `vmrs.*` parameters from `/proc/cmdline` (see [`cmdline`]): host name, `lo` up,
//!    static address and default route on `eth0` (with busybox `ip`), `/etc/resolv.conf`, and
//!    (after the switch of step 4) `/etc/hosts` naming the host when the root has none;
//! 4. with `vmrs.root=/dev/vdX`: mount that disk (growing an ext4 file system online to fill
//!    the disk), move `/proc`, `/sys`, `/dev`, `/run` into it,
//!    give it a fresh `/tmp`, and switch root to it (this process stays PID 1; it needs nothing
//!    from the image);
//! 5. mount every `vmrs.mount=` virtio-fs share at its path (in the new root when there is
//!    one; read-only when asked). A share that cannot be mounted fails the boot: the init prints
//!    `VMRS_FAILED <reason>` and powers off, and the host records the VM as failed with that
//!    reason instead of waiting for a readiness that never comes;
//! 6. start the host agent ([`agent`]) on every `vmrs.agent*` virtio-serial port and on vsock
//!    port 1024 (`vmrs_proto::VSOCK_PORT`) when the guest has a vsock device;
//! 7. print `VMRS_READY <ip>` (`127.0.0.1` without network) as one kernel log record, so no
//!    kernel message can split it on the console ([`sys::announce`]);
//! 8. loop forever: reap zombies ([`reaper`]); on the ACPI power button (an `EV_KEY`/`KEY_POWER`
//!    press on any `/dev/input/event*`), SIGTERM/SIGUSR2/SIGPWR/SIGINT or an agent `Shutdown`,
//!    shut down: print `vmrs-init: shutting down`, SIGTERM then SIGKILL every process, sync,
//!    unmount, print `vmrs-init: power off` and power the machine off.
//!
//! PID 1 must never exit: failures are printed and boot continues where it can; a panic powers
//! the machine off.

use vmrs_guest::{agent, cmdline, dhcp, log, reaper, sys};

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MODULE_LIST: &str = "/etc/vmrs/modules";
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// `struct input_event` on 64-bit: timeval (16) + type (2) + code (2) + value (4).
const INPUT_EVENT_SIZE: usize = 24;

fn main() {
    std::panic::set_hook(Box::new(|info| {
        sys::console(&format!("vmrs-init: panic: {info}"));
        power_off();
    }));
    std::env::set_var("PATH", "/bin:/sbin:/usr/bin:/usr/sbin");
    std::env::set_var("HOME", "/root");

    let signals = match sys::block_signals(&[
        libc::SIGCHLD,
        libc::SIGTERM,
        libc::SIGUSR2,
        libc::SIGPWR,
        libc::SIGINT,
        libc::SIGHUP,
    ]) {
        Ok(fd) => Some(fd),
        Err(e) => {
            log(&format!("cannot set up signal handling: {e}"));
            None
        }
    };

    mount_basics();
    load_modules();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut cfg = cmdline::parse(&cmdline);
    for w in &cfg.warnings {
        log(w);
    }
    let ip = configure(&mut cfg);
    if let Some(dev) = &cfg.root {
        if let Err(e) = switch_root(dev, cfg.rootfstype.as_deref(), cfg.root_ro) {
            log(&format!("cannot switch to root {dev}: {e}"));
            power_off();
        }
    }
    if let Err(reason) = mount_shares(&cfg) {
        fail_boot(&reason);
    }
    write_resolv_conf(&cfg);
    write_hosts(&cfg);
    let (shutdown_rx, shutdown_tx) = match shutdown_pipe() {
        Ok(p) => (Some(p.0), Some(Arc::new(p.1))),
        Err(e) => {
            log(&format!("cannot create pipe: {e}"));
            (None, None)
        }
    };
    if let Some(tx) = &shutdown_tx {
        agent::start(tx.clone());
    }
    // Open the power button before announcing readiness, so a stop right after ready works.
    let inputs = open_input_devices(Duration::from_secs(2));
    sys::announce(&format!("VMRS_READY {ip}"));
    if cfg.shell {
        spawn_shell();
    }
    // `shutdown_tx` stays alive in this frame forever (supervise never returns), so the pipe
    // never reads as closed even when no agent thread holds a copy.
    let _keep_open = shutdown_tx;
    supervise(signals, shutdown_rx, inputs);
}

fn mount_basics() {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let mounts: [(&str, &str, &str, libc::c_ulong, &str); 7] = [
        ("proc", "/proc", "proc", nosuid_nodev | libc::MS_NOEXEC, ""),
        ("sysfs", "/sys", "sysfs", nosuid_nodev | libc::MS_NOEXEC, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "gid=5,mode=620,ptmxmode=666",
        ),
        ("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"),
    ];
    for (source, target, fstype, flags, data) in mounts {
        if let Err(e) = std::fs::create_dir_all(target) {
            log(&format!("cannot create {target}: {e}"));
        }
        match sys::mount(source, target, fstype, flags, data) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => log(&format!("mount {target} ({fstype}): {e}")),
        }
    }
}

fn load_modules() {
    let list = match std::fs::read_to_string(MODULE_LIST) {
        Ok(l) => l,
        Err(e) => {
            log(&format!("no module list {MODULE_LIST}: {e}"));
            return;
        }
    };
    for path in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                log(&format!("skipping module {path}: {e}"));
                continue;
            }
        };
        match sys::finit_module(&file) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => log(&format!("loading {path}: {e}")),
        }
    }
}

/// Run a program (argument vector) and wait for it; failures are logged.
fn run(program: &str, args: &[&str]) -> bool {
    match Command::new(program).args(args).stdin(Stdio::null()).status() {
        Ok(s) if s.success() => true,
        Ok(s) => {
            log(&format!("{program} {}: {s}", args.join(" ")));
            false
        }
        Err(e) => {
            log(&format!("cannot run {program}: {e}"));
            false
        }
    }
}

/// Configure host name, loopback, eth0 and the NICs after it; returns the address to
/// announce (eth0's).
fn configure(cfg: &mut cmdline::Config) -> String {
    let ip = configure_eth0(cfg);
    for nic in cfg.nics.clone() {
        let dev = format!("eth{}", nic.index);
        if !wait_for_interface(&dev) {
            log(&format!("{dev} did not appear; not configured"));
            continue;
        }
        if nic.dhcp {
            match dhcp::obtain(&dev).and_then(|mut l| {
                l.router = None; // the default route stays on eth0
                dhcp::apply(&dev, &l).map(|()| l)
            }) {
                Ok(lease) if nic.dns.is_empty() => cfg
                    .dns
                    .extend(lease.dns.iter().copied().map(std::net::IpAddr::V4)),
                Ok(_) => {}
                Err(e) => log(&format!("dhcp on {dev}: {e}")),
            }
        } else if let Some((addr, prefix)) = nic.ip {
            let cidr = format!("{addr}/{prefix}");
            let _ = run("/bin/ip", &["addr", "add", &cidr, "dev", &dev])
                && run("/bin/ip", &["link", "set", &dev, "up"]);
        }
        cfg.dns.extend(nic.dns.iter().copied());
    }
    ip
}

/// Wait up to 5 s for interface `dev`.
fn wait_for_interface(dev: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let path = format!("/sys/class/net/{dev}");
    while !std::path::Path::new(&path).exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn configure_eth0(cfg: &mut cmdline::Config) -> String {
    if let Some(h) = &cfg.hostname {
        if let Err(e) = sys::sethostname(h) {
            log(&format!("sethostname {h}: {e}"));
        }
    }
    run("/bin/ip", &["link", "set", "lo", "up"]);
    if cfg.ip.is_none() && !cfg.dhcp {
        return "127.0.0.1".into();
    }
    if !wait_for_interface("eth0") {
        log("eth0 did not appear; network not configured");
        return "127.0.0.1".into();
    }
    if cfg.dhcp {
        return match dhcp::obtain("eth0").and_then(|l| dhcp::apply("eth0", &l).map(|()| l)) {
            Ok(lease) => {
                // name servers from the lease unless vmrs.dns= named some
                if cfg.dns.is_empty() {
                    cfg.dns = lease.dns.iter().copied().map(std::net::IpAddr::V4).collect();
                }
                lease.ip.to_string()
            }
            Err(e) => {
                log(&format!("dhcp: {e}"));
                "127.0.0.1".into()
            }
        };
    }
    let Some((addr, prefix)) = cfg.ip else {
        return "127.0.0.1".into();
    };
    let cidr = format!("{addr}/{prefix}");
    let ok = run("/bin/ip", &["addr", "add", &cidr, "dev", "eth0"])
        && run("/bin/ip", &["link", "set", "eth0", "up"]);
    if !ok {
        return "127.0.0.1".into();
    }
    if let Some(gw) = cfg.gw {
        run("/bin/ip", &["route", "add", "default", "via", &gw.to_string()]);
    }
    addr.to_string()
}

fn write_resolv_conf(cfg: &cmdline::Config) {
    if cfg.dns.is_empty() {
        return;
    }
    let text: String = cfg.dns.iter().map(|d| format!("nameserver {d}\n")).collect();
    let _ = std::fs::create_dir_all("/etc");
    // An image may ship /etc/resolv.conf as a dangling symlink; replace it.
    let _ = std::fs::remove_file("/etc/resolv.conf");
    if let Err(e) = std::fs::write("/etc/resolv.conf", text) {
        log(&format!("writing /etc/resolv.conf: {e}"));
    }
}

/// `/etc/hosts` naming the host name, only where the root has none (an image's own file,
/// even a dangling link, is left alone).
fn write_hosts(cfg: &cmdline::Config) {
    let Some(name) = &cfg.hostname else {
        return;
    };
    if std::fs::symlink_metadata("/etc/hosts").is_ok() {
        return;
    }
    let text =
        format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{name}\n");
    let _ = std::fs::create_dir_all("/etc");
    if let Err(e) = std::fs::write("/etc/hosts", text) {
        log(&format!("writing /etc/hosts: {e}"));
    }
}

fn shutdown_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Mount `dev` on /newroot, move the API filesystems into it and make it `/`.
/// The `/dev/vdX` whose virtio serial (`/sys/block/vdX/serial`) is `serial`.
fn disk_by_serial(serial: &str) -> Option<String> {
    let dir = std::fs::read_dir("/sys/block").ok()?;
    dir.flatten().find_map(|e| {
        let found = std::fs::read_to_string(e.path().join("serial")).ok()?;
        (found.trim_end_matches(['\n', '\0']) == serial)
            .then(|| format!("/dev/{}", e.file_name().to_string_lossy()))
    })
}

/// Mount `root` (a `/dev/...` path or `serial:S`) on /newroot, move the API filesystems into it
/// and make it `/`.
fn switch_root(root: &str, fstype: Option<&str>, read_only: bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let dev = loop {
        let dev = match root.strip_prefix("serial:") {
            Some(serial) => disk_by_serial(serial),
            None => Some(root.to_string()),
        };
        match dev {
            Some(d) if std::path::Path::new(&d).exists() => break d,
            _ if Instant::now() > deadline => return Err("device did not appear".into()),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let dev = dev.as_str();
    std::fs::create_dir_all("/newroot").map_err(|e| format!("mkdir /newroot: {e}"))?;
    let flags = if read_only { libc::MS_RDONLY } else { 0 };
    let types: Vec<&str> = match fstype {
        Some(t) => vec![t],
        None => vec!["ext4", "erofs"],
    };
    let mut last = String::new();
    let mounted = types
        .iter()
        .any(|t| match sys::mount(dev, "/newroot", t, flags, "") {
            Ok(()) => true,
            Err(e) => {
                last = format!("mount {dev} as {t}: {e}");
                false
            }
        });
    if !mounted {
        return Err(last);
    }
    // The root disk may be larger than the file system built for the image (the host sizes
    // each VM's overlay): grow it to fill the disk. Nothing to do is not an error.
    if !read_only {
        match sys::grow_ext4(dev, "/newroot") {
            Ok((before, after)) if after > before => log(&format!(
                "grew the root file system from {before} to {after} blocks"
            )),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {} // not ext4
            Err(e) => log(&format!("cannot grow the root file system: {e}")),
        }
    }
    for dir in ["dev", "proc", "sys", "run"] {
        let target = format!("/newroot/{dir}");
        if let Err(e) = std::fs::create_dir_all(&target) {
            log(&format!("mkdir {target}: {e}"));
        }
        sys::mount(&format!("/{dir}"), &target, "", libc::MS_MOVE, "")
            .map_err(|e| format!("move /{dir}: {e}"))?;
    }
    let _ = sys::umount("/tmp", libc::MNT_DETACH);
    if std::fs::create_dir_all("/newroot/tmp").is_ok() {
        if let Err(e) = sys::mount(
            "tmpfs",
            "/newroot/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ) {
            log(&format!("mount /tmp: {e}"));
        }
    }
    std::env::set_current_dir("/newroot").map_err(|e| format!("chdir: {e}"))?;
    sys::mount(".", "/", "", libc::MS_MOVE, "").map_err(|e| format!("move root: {e}"))?;
    sys::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// The line the host reads as "this guest cannot come up" (`vm_rs::console::FAILED_MARKER`).
const FAILED_MARKER: &str = "VMRS_FAILED";

/// Report a boot failure to the host and power off.
fn fail_boot(reason: &str) -> ! {
    let one_line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    sys::announce(&format!("{FAILED_MARKER} {one_line}"));
    power_off();
}

/// How long a share's device may take to appear after the virtiofs module loaded.
const SHARE_WAIT: Duration = Duration::from_secs(5);

/// Mount the `vmrs.mount=` shares; the first one that fails is the error.
fn mount_shares(cfg: &cmdline::Config) -> Result<(), String> {
    if let Some(bad) = cfg.fatal.first() {
        return Err(bad.clone());
    }
    for m in &cfg.mounts {
        let what = format!("share {} at {}", m.tag, m.path);
        match std::fs::metadata(&m.path) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(format!("cannot mount {what}: {} is not a directory", m.path)),
            Err(_) => std::fs::create_dir_all(&m.path)
                .map_err(|e| format!("cannot create {} for {what}: {e}", m.path))?,
        }
        let flags = if m.read_only { libc::MS_RDONLY } else { 0 };
        let deadline = Instant::now() + SHARE_WAIT;
        loop {
            match sys::mount(&m.tag, &m.path, "virtiofs", flags, "") {
                Ok(()) => break,
                // the filesystem type is not there at all: the kernel has no virtiofs
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                    return Err(format!("cannot mount {what}: the kernel has no virtiofs ({e})"))
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(format!("cannot mount {what}: {e}")),
            }
        }
    }
    Ok(())
}

fn spawn_shell() {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("/bin/sh");
    // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 1);
            Ok(())
        });
    }
    if let Err(e) = cmd.spawn() {
        log(&format!("cannot start shell: {e}"));
    }
}

/// Open every input event device the kernel has registered (`/sys/class/input/event*`; the
/// power button is one of them), waiting up to `wait` for devtmpfs to create the nodes.
fn open_input_devices(wait: Duration) -> Vec<std::fs::File> {
    let Ok(dir) = std::fs::read_dir("/sys/class/input") else {
        return Vec::new();
    };
    let names: Vec<String> = dir
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("event"))
        .collect();
    let deadline = Instant::now() + wait;
    let mut files = Vec::new();
    for name in names {
        let path = format!("/dev/input/{name}");
        loop {
            match std::fs::File::open(&path) {
                Ok(f) => {
                    files.push(f);
                    break;
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => {
                    log(&format!("cannot open {path}: {e}"));
                    break;
                }
            }
        }
    }
    files
}

/// Whether a buffer of input events holds a power key press.
fn has_power_press(buf: &[u8]) -> bool {
    buf.chunks_exact(INPUT_EVENT_SIZE).any(|ev| {
        let ty = u16::from_ne_bytes([ev[16], ev[17]]);
        let code = u16::from_ne_bytes([ev[18], ev[19]]);
        let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
        ty == EV_KEY && code == KEY_POWER && value == 1
    })
}

/// PID 1's main loop: reap children, wait for a shutdown request.
fn supervise(
    signals: Option<OwnedFd>,
    mut shutdown_rx: Option<OwnedFd>,
    mut inputs: Vec<std::fs::File>,
) -> ! {
    let started = Instant::now();
    loop {
        let mut fds = Vec::new();
        if let Some(s) = &signals {
            fds.push(s.as_raw_fd());
        }
        let agent_index = shutdown_rx.as_ref().map(|r| {
            fds.push(r.as_raw_fd());
            fds.len() - 1
        });
        let first_input = fds.len();
        fds.extend(inputs.iter().map(|f| f.as_raw_fd()));
        // Input devices can appear shortly after boot: rescan now and then while there are none.
        let timeout = if inputs.is_empty() && started.elapsed() < Duration::from_secs(30) {
            200
        } else {
            5000
        };
        let ready = sys::poll_readable(&fds, timeout);
        let mut shutdown = false;
        for i in ready {
            if Some(i) == agent_index {
                let mut byte = [0u8; 1];
                let n = shutdown_rx
                    .as_ref()
                    // SAFETY: reads one byte into a live buffer from a pipe we own.
                    .map(|r| unsafe { libc::read(r.as_raw_fd(), byte.as_mut_ptr().cast(), 1) })
                    .unwrap_or(0);
                if n == 1 {
                    log("shutdown requested by the host agent");
                    shutdown = true;
                } else if n == 0 {
                    // Every writer is gone (cannot happen while main holds one): stop polling.
                    shutdown_rx = None;
                }
            } else if i < first_input {
                if let Some(s) = &signals {
                    while let Some(sig) = sys::read_signal(s.as_raw_fd()) {
                        match sig as libc::c_int {
                            libc::SIGCHLD => {}
                            libc::SIGHUP => {}
                            other => {
                                log(&format!("received signal {other}"));
                                shutdown = true;
                            }
                        }
                    }
                }
            } else if let Some(dev) = inputs.get_mut(i - first_input) {
                let mut buf = [0u8; INPUT_EVENT_SIZE * 16];
                match dev.read(&mut buf) {
                    Ok(n) if has_power_press(&buf[..n]) => {
                        log("power button pressed");
                        shutdown = true;
                    }
                    Ok(_) => {}
                    Err(_) => {}
                }
            }
        }
        reaper::reap();
        if shutdown {
            shut_down();
        }
        if inputs.is_empty() {
            inputs = open_input_devices(Duration::ZERO);
        }
    }
}

/// Stop everything and power off. Never returns.
fn shut_down() -> ! {
    sys::console("vmrs-init: shutting down");
    let _ = sys::kill(-1, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match sys::reap_one() {
            sys::Reaped::NoChildren => break,
            sys::Reaped::Child(..) => continue,
            sys::Reaped::None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            sys::Reaped::None => break,
        }
    }
    let _ = sys::kill(-1, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match sys::reap_one() {
            sys::Reaped::NoChildren => break,
            sys::Reaped::Child(..) => continue,
            sys::Reaped::None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            sys::Reaped::None => break,
        }
    }
    sys::sync();
    unmount_all();
    sys::sync();
    power_off();
}

fn unmount_all() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let targets: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|t| *t != "/")
        .map(|t| t.replace("\\040", " "))
        .collect();
    for t in targets.iter().rev() {
        if sys::umount(t, 0).is_err() {
            let _ = sys::umount(t, libc::MNT_DETACH);
        }
    }
    // The root itself cannot be unmounted; make it read-only so a disk root is clean.
    let _ = sys::mount("", "/", "", libc::MS_REMOUNT | libc::MS_RDONLY, "");
}

fn power_off() -> ! {
    sys::console("vmrs-init: power off");
    sys::drain_console();
    let err = sys::reboot(libc::RB_POWER_OFF);
    sys::console(&format!("vmrs-init: power off failed: {err}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e.extend_from_slice(&ty.to_ne_bytes());
        e.extend_from_slice(&code.to_ne_bytes());
        e.extend_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn power_press_detection() {
        let mut buf = event(0, 0, 0);
        assert!(!has_power_press(&buf));
        buf.extend(event(EV_KEY, KEY_POWER, 0));
        assert!(!has_power_press(&buf), "release is not a press");
        buf.extend(event(EV_KEY, 115, 1));
        assert!(!has_power_press(&buf));
        buf.extend(event(EV_KEY, KEY_POWER, 1));
        assert!(has_power_press(&buf));
        assert!(!has_power_press(&buf[..10]));
    }
}
