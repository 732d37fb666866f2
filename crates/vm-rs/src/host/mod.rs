//! Facts about the host, in one place, and the platform facade: whatever differs between
//! Linux and macOS hosts sits behind a function here, so callers write no `cfg`.
//!
//! * [`kvm`] — whether KVM is usable (Linux only; elsewhere it never is).
//! * [`proc`] — process start times, environments, exit handles (pidfd / kqueue).
//! * [`watch`] — file change events (inotify / kqueue).
//! * [`fs`] — confined opens (`openat2` / a portable walk), `O_PATH`, modes, write-back.
//! * [`codec`] — zstd and xz decoders (C libraries on Linux, pure Rust elsewhere).
//! * [`find_on_path`], [`cpu_khz`], [`enter_net_namespace`].
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

/// The host CPU's clock in kHz (`cpu MHz` of `/proc/cpuinfo`), used as the TSC frequency hint
/// for software-emulated guests (`tsc_early_khz=`, see `driver::qemu::args`).
pub fn cpu_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_khz(&text)
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
