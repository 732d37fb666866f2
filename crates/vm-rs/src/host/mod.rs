//! Facts about the host, in one place, and the platform facade: whatever differs between
//! Linux and macOS hosts sits behind a function here, so callers write no `cfg`.
//!
//! * [`kvm`] — whether KVM is usable (Linux only; elsewhere it never is).
//! * [`proc`] — process start times, environments, exit handles (pidfd / kqueue).
//! * [`watch`] — file change events (inotify / kqueue).
//! * [`fs`] — confined opens (`openat2` / a portable walk), `O_PATH`, modes, write-back.
//! * [`codec`] — zstd and xz decoders (C libraries on Linux, pure Rust elsewhere).
//! * [`find_on_path`], [`cpu_khz`], [`enter_net_namespace`], [`hvf_usable`].
//!
//! Drivers and the manager ask here; no backend reaches into another backend's module for
//! them. Networking's host devices (netlink, TAP) are Linux-only and stay in
//! `crate::net::host`, which answers "unsupported" for them on other hosts.

pub mod codec;
pub mod fs;
pub mod kvm;
pub mod proc;
pub mod watch;

use std::path::{Path, PathBuf};

/// Whether `path` is a regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Find an executable called `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// Move the calling thread into the network namespace open at `fd` (`setns(2)` with
/// `CLONE_NEWNET`). Async-signal-safe (it may run between fork and exec). Hosts without
/// network namespaces answer [`std::io::ErrorKind::Unsupported`].
pub fn enter_net_namespace(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setns(2) with a namespace fd and CLONE_NEWNET only changes the network
        // namespace of the calling thread; it touches no memory. A bad fd is an error return.
        if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

/// Flags for a `sendmsg` on a socket whose peer may be gone: no SIGPIPE for the caller, an
/// `EPIPE` error instead (`MSG_NOSIGNAL` on Linux; macOS has no such flag, and a Rust binary
/// ignores SIGPIPE there anyway).
pub fn send_nosignal() -> rustix::net::SendFlags {
    #[cfg(target_os = "linux")]
    {
        rustix::net::SendFlags::NOSIGNAL
    }
    #[cfg(not(target_os = "linux"))]
    {
        rustix::net::SendFlags::empty()
    }
}

/// Whether QEMU can use Apple's Hypervisor.framework (`-accel hvf`) here: `None` on hosts
/// that have no such thing (anything but macOS), else `Ok` or why not.
pub fn hvf_usable() -> Option<Result<(), String>> {
    #[cfg(target_os = "macos")]
    {
        Some(macos_hvf())
    }
    #[cfg(not(target_os = "macos"))]
    {
        None
    }
}

#[cfg(target_os = "macos")]
fn macos_hvf() -> Result<(), String> {
    if cfg!(target_arch = "aarch64") {
        return Err("QEMU's hvf runs guests of the host's own architecture (arm64), and vm-rs's QEMU guests are x86_64".into());
    }
    let mut value: libc::c_int = 0;
    let mut size = std::mem::size_of::<libc::c_int>();
    // SAFETY: the name is a NUL-terminated literal; `value` is writable for `size` bytes.
    let r = unsafe {
        libc::sysctlbyname(
            c"kern.hv_support".as_ptr(),
            std::ptr::addr_of_mut!(value).cast(),
            &mut size,
            std::ptr::null_mut(),
            0,
        )
    };
    match (r, value) {
        (0, 1) => Ok(()),
        (0, _) => Err("this Mac's CPU has no hardware virtualization (kern.hv_support = 0)".into()),
        _ => Err(format!(
            "cannot read kern.hv_support: {}",
            std::io::Error::last_os_error()
        )),
    }
}

/// The host CPU's clock in kHz, used as the TSC frequency hint for software-emulated guests
/// (`tsc_early_khz=`, see `driver::qemu::args`): `cpu MHz` of `/proc/cpuinfo` on Linux,
/// `hw.cpufrequency` on (Intel) Macs.
pub fn cpu_khz() -> Option<u64> {
    #[cfg(target_os = "macos")]
    {
        sysctl_u64(c"hw.cpufrequency").map(|hz| hz / 1000)
    }
    #[cfg(not(target_os = "macos"))]
    {
        let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        parse_cpu_khz(&text)
    }
}

/// Total host memory in MiB: `MemTotal` of `/proc/meminfo` on Linux, `hw.memsize` on macOS.
pub fn memory_mib() -> Option<u64> {
    #[cfg(target_os = "macos")]
    {
        sysctl_u64(c"hw.memsize").map(|b| b >> 20)
    }
    #[cfg(not(target_os = "macos"))]
    {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024)
    }
}

/// A 64-bit integer sysctl by name.
#[cfg(target_os = "macos")]
fn sysctl_u64(name: &std::ffi::CStr) -> Option<u64> {
    let mut value: u64 = 0;
    let mut size = std::mem::size_of::<u64>();
    // SAFETY: `name` is NUL-terminated; `value` is writable for `size` bytes.
    let r = unsafe {
        libc::sysctlbyname(
            name.as_ptr(),
            std::ptr::addr_of_mut!(value).cast(),
            &mut size,
            std::ptr::null_mut(),
            0,
        )
    };
    (r == 0 && size == std::mem::size_of::<u64>()).then_some(value)
}

/// The `cpu MHz` of `/proc/cpuinfo` text, in kHz.
pub fn parse_cpu_khz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    // Bounded above, so the cast cannot truncate.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    (mhz.is_finite() && mhz > 1.0 && mhz < 100_000.0).then(|| (mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_khz_parses_cpuinfo() {
        assert_eq!(
            parse_cpu_khz("processor\t: 0\ncpu MHz\t\t: 2599.998\n"),
            Some(2_599_998)
        );
        assert_eq!(parse_cpu_khz("cpu MHz : nan\n"), None);
        assert_eq!(parse_cpu_khz("nothing"), None);
    }

    #[test]
    fn path_lookup_finds_executables_only() {
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("no-such-program-vmrs").is_none());
        let dir = tempfile::tempdir().expect("tmp");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").expect("write");
        assert!(!is_executable(&plain));
        assert!(!is_executable(dir.path()), "a directory is not a program");
    }
}
