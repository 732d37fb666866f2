//! Process facts and handles, per host: a process's start time and liveness ([`stat`]), the
//! pids that exist ([`pids`]), a process's environment ([`environ`]), and a handle that pins
//! a process and becomes readable when it exits ([`open_handle`], [`send_signal`]).
//!
//! | | Linux | macOS |
//! |---|---|---|
//! | start time | `/proc/<pid>/stat` field 22 (clock ticks since boot) | `proc_pidinfo(PROC_PIDTBSDINFO)` start (µs since the epoch) |
//! | zombie | state `Z`/`X` | `pbi_status == SZOMB` |
//! | pids | `/proc` | `proc_listallpids` |
//! | environment | `/proc/<pid>/environ` | `sysctl(KERN_PROCARGS2)` |
//! | handle | pidfd (signals go through it: never to a reused pid) | kqueue with `EVFILT_PROC NOTE_EXIT` |
//!
//! A macOS handle does not pin the pid the way a pidfd does: [`send_signal`] first checks the
//! handle has not seen the exit, then signals the pid, so only a pid reused within that
//! instant could be hit. Callers check the start time when they attach, as on Linux.

use rustix::io::Errno;
use std::os::fd::OwnedFd;

/// What [`stat`] reports about a live (or zombie) process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Start time, in the host's unit (stable for the life of the process).
    pub start_time: u64,
    /// It has exited and waits to be reaped.
    pub zombie: bool,
}

/// The text of `/proc/<pid>/stat`, parsed: start time (field 22) and state (field 3).
pub fn parse_linux_stat(text: &str) -> Option<Stat> {
    // comm (field 2) may hold spaces and parentheses; fields resume after the last ')'.
    let rest = text.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    // rest starts at field 3 (state); starttime is field 22.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(Stat {
        start_time,
        zombie: matches!(state.chars().next(), Some('Z' | 'X')),
    })
}

/// The environment block (`NUL`-separated `KEY=value` strings) of a `KERN_PROCARGS2` buffer:
/// `argc` (a native `i32`), the executable path, padding `NUL`s, `argc` arguments, then the
/// environment up to an empty string.
pub fn parse_procargs2(buf: &[u8]) -> Option<Vec<u8>> {
    let argc = i32::from_ne_bytes(buf.get(..4)?.try_into().ok()?);
    let argc = usize::try_from(argc).ok()?;
    let mut rest = buf.get(4..)?;
    // executable path
    let end = rest.iter().position(|b| *b == 0)?;
    rest = &rest[end..];
    // padding
    let start = rest.iter().position(|b| *b != 0).unwrap_or(rest.len());
    rest = &rest[start..];
    let mut strings = rest.split(|b| *b == 0);
    for _ in 0..argc {
        strings.next()?;
    }
    let mut env = Vec::new();
    for s in strings.take_while(|s| !s.is_empty()) {
        env.extend_from_slice(s);
        env.push(0);
    }
    Some(env)
}

#[cfg(target_os = "linux")]
mod imp {
    use super::Stat;
    use rustix::io::Errno;
    use std::os::fd::OwnedFd;

    pub fn stat(pid: u32) -> std::io::Result<Option<Stat>> {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => super::parse_linux_stat(&s).map(Some).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed /proc/<pid>/stat")
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn pids() -> Vec<u32> {
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
            .collect()
    }

    pub fn environ(pid: u32) -> Option<Vec<u8>> {
        std::fs::read(format!("/proc/{pid}/environ")).ok()
    }

    pub fn open_handle(pid: rustix::process::Pid) -> Result<OwnedFd, Errno> {
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
    }

    pub fn send_signal(
        handle: &OwnedFd,
        _pid: rustix::process::Pid,
        signal: rustix::process::Signal,
    ) -> Result<(), Errno> {
        rustix::process::pidfd_send_signal(handle, signal)
    }
}

#[cfg(target_os = "macos")]
mod imp {
    use super::Stat;
    use rustix::io::Errno;
    use std::os::fd::OwnedFd;

    /// `SZOMB` of `<sys/proc.h>`.
    const SZOMB: u32 = 5;

    pub fn stat(pid: u32) -> std::io::Result<Option<Stat>> {
        let Ok(raw) = libc::c_int::try_from(pid) else {
            return Ok(None);
        };
        // SAFETY: proc_bsdinfo is plain old data; all-zero is a valid value.
        let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::proc_bsdinfo>();
        // SAFETY: `info` is a writable buffer of exactly `size` bytes that outlives the call.
        let n = unsafe {
            libc::proc_pidinfo(
                raw,
                libc::PROC_PIDTBSDINFO,
                0,
                std::ptr::addr_of_mut!(info).cast(),
                size as libc::c_int,
            )
        };
        if n <= 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESRCH) | Some(0) | None => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(Stat {
            start_time: info.pbi_start_tvsec * 1_000_000 + info.pbi_start_tvusec,
            zombie: info.pbi_status == SZOMB,
        }))
    }

    pub fn pids() -> Vec<u32> {
        // SAFETY: a null buffer asks for the number of pids only.
        let n = unsafe { libc::proc_listallpids(std::ptr::null_mut(), 0) };
        let Ok(n) = usize::try_from(n) else {
            return Vec::new();
        };
        // room for processes started meanwhile
        let mut buf: Vec<libc::pid_t> = vec![0; n + 64];
        let bytes = buf.len() * std::mem::size_of::<libc::pid_t>();
        // SAFETY: `buf` is writable for `bytes` bytes and outlives the call.
        let got = unsafe { libc::proc_listallpids(buf.as_mut_ptr().cast(), bytes as libc::c_int) };
        let got = usize::try_from(got).unwrap_or(0).min(buf.len());
        buf[..got].iter().filter_map(|p| u32::try_from(*p).ok()).collect()
    }

    pub fn environ(pid: u32) -> Option<Vec<u8>> {
        let pid = libc::c_int::try_from(pid).ok()?;
        let mut argmax: libc::c_int = 0;
        let mut size = std::mem::size_of::<libc::c_int>();
        let mut mib = [libc::CTL_KERN, libc::KERN_ARGMAX];
        // SAFETY: `argmax` is writable for `size` bytes; mib names a readable integer sysctl.
        let r = unsafe {
            libc::sysctl(
                mib.as_mut_ptr(),
                2,
                std::ptr::addr_of_mut!(argmax).cast(),
                &mut size,
                std::ptr::null_mut(),
                0,
            )
        };
        if r != 0 {
            return None;
        }
        let mut buf = vec![0u8; usize::try_from(argmax).ok()?];
        let mut size = buf.len();
        let mut mib = [libc::CTL_KERN, libc::KERN_PROCARGS2, pid];
        // SAFETY: `buf` is writable for `size` bytes and the kernel writes at most that many.
        let r = unsafe {
            libc::sysctl(
                mib.as_mut_ptr(),
                3,
                buf.as_mut_ptr().cast(),
                &mut size,
                std::ptr::null_mut(),
                0,
            )
        };
        if r != 0 {
            return None;
        }
        buf.truncate(size);
        super::parse_procargs2(&buf)
    }

    pub fn open_handle(pid: rustix::process::Pid) -> Result<OwnedFd, Errno> {
        use rustix::event::kqueue::{kevent, kqueue, Event, EventFilter, EventFlags, ProcessEvents};
        let kq = kqueue()?;
        let ev = Event::new(
            EventFilter::Proc {
                pid,
                flags: ProcessEvents::EXIT,
            },
            EventFlags::ADD | EventFlags::ONESHOT,
            std::ptr::null_mut(),
        );
        let mut none: Vec<Event> = Vec::new();
        // SAFETY: the change list names a process, not a file descriptor, so no descriptor's
        // lifetime is involved.
        unsafe { kevent(&kq, &[ev], &mut none, Some(std::time::Duration::ZERO)) }?;
        Ok(kq)
    }

    pub fn send_signal(
        handle: &OwnedFd,
        pid: rustix::process::Pid,
        signal: rustix::process::Signal,
    ) -> Result<(), Errno> {
        let mut fds = [rustix::event::PollFd::new(handle, rustix::event::PollFlags::IN)];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        if rustix::event::poll(&mut fds, Some(&zero))? > 0 {
            // the handle saw the exit: the pid is not ours any more
            return Err(Errno::SRCH);
        }
        rustix::process::kill_process(pid, signal)
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
mod imp {
    use super::Stat;
    use rustix::io::Errno;
    use std::os::fd::OwnedFd;

    pub fn stat(_pid: u32) -> std::io::Result<Option<Stat>> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
    pub fn pids() -> Vec<u32> {
        Vec::new()
    }
    pub fn environ(_pid: u32) -> Option<Vec<u8>> {
        None
    }
    pub fn open_handle(_pid: rustix::process::Pid) -> Result<OwnedFd, Errno> {
        Err(Errno::NOSYS)
    }
    pub fn send_signal(
        _handle: &OwnedFd,
        _pid: rustix::process::Pid,
        _signal: rustix::process::Signal,
    ) -> Result<(), Errno> {
        Err(Errno::NOSYS)
    }
}

/// Start time and state of `pid`; `None` when there is no such process.
pub fn stat(pid: u32) -> std::io::Result<Option<Stat>> {
    imp::stat(pid)
}

/// Every pid on the host (best effort: empty when they cannot be listed).
pub fn pids() -> Vec<u32> {
    imp::pids()
}

/// The environment of `pid` (`NUL`-separated `KEY=value`), when it can be read.
pub fn environ(pid: u32) -> Option<Vec<u8>> {
    imp::environ(pid)
}

/// Whether a process `pid` exists (zombies included).
pub fn exists(pid: u32) -> bool {
    matches!(stat(pid), Ok(Some(_)))
}

/// A handle on `pid` that becomes readable when it exits (pidfd, or a kqueue on macOS).
/// `ESRCH` when there is no such process.
pub fn open_handle(pid: u32) -> Result<OwnedFd, Errno> {
    let raw = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or(Errno::SRCH)?;
    imp::open_handle(raw)
}

/// Send `signal` to the process `handle` (from [`open_handle`] for `pid`) pins; `ESRCH` when
/// it has exited.
pub fn send_signal(handle: &OwnedFd, pid: u32, signal: rustix::process::Signal) -> Result<(), Errno> {
    let raw = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or(Errno::SRCH)?;
    imp::send_signal(handle, raw, signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_stat_lines_parse() {
        let line = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 987654 1 2";
        assert_eq!(
            parse_linux_stat(line),
            Some(Stat {
                start_time: 987_654,
                zombie: false
            })
        );
        let z = line.replace(") S ", ") Z ");
        assert!(parse_linux_stat(&z).expect("parse").zombie);
        assert_eq!(parse_linux_stat("1234 (x) S 1 2"), None);
        assert_eq!(parse_linux_stat("garbage"), None);
    }

    #[test]
    fn procargs2_buffers_give_the_environment() {
        let mut buf = 2i32.to_ne_bytes().to_vec();
        buf.extend_from_slice(b"/usr/bin/qemu\0\0\0\0qemu\0-m\0VMRS_OWNER=/v/a\0HOME=/h\0\0junk");
        assert_eq!(parse_procargs2(&buf).expect("env"), b"VMRS_OWNER=/v/a\0HOME=/h\0");
        // hostile buffers: short, negative argc, more argc than strings
        assert_eq!(parse_procargs2(b"\x01"), None);
        assert_eq!(parse_procargs2(&(-1i32).to_ne_bytes()), None);
        let mut short = 9i32.to_ne_bytes().to_vec();
        short.extend_from_slice(b"/x\0a\0b");
        assert_eq!(parse_procargs2(&short), None);
    }

    #[test]
    fn this_process_is_seen() {
        let me = std::process::id();
        let s = stat(me).expect("stat").expect("exists");
        assert!(!s.zombie);
        assert!(exists(me));
        assert!(pids().contains(&me));
        let env = environ(me).expect("environ");
        assert!(env.split(|b| *b == 0).any(|v| v.starts_with(b"PATH=")));
        assert!(open_handle(me).is_ok());
    }
}
