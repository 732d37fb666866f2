//! Thin wrappers over the system calls PID 1 needs (libc only, no panics).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Write a whole line to the console (fd 1), ignoring errors: the console is best effort.
pub fn console(line: &str) {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: the pointer and length describe the live `buf` slice.
        let n = unsafe { libc::write(1, buf[off..].as_ptr().cast(), buf.len() - off) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if n == 0 {
            return;
        }
        off += n as usize;
    }
}

/// Print a line the host parses (`VMRS_READY`, `VMRS_FAILED`) as one kernel log record, so it
/// reaches the console whole.
///
/// A line written to the console's tty is queued in the UART driver and sent byte by byte,
/// while the kernel prints its own messages synchronously: a message printed meanwhile lands
/// in the middle of the line (seen on this machine: `VMRS_READY 127.0.0.1[    1.56] clocksource:
/// ...`, which the host cannot read, so the VM never became ready). A record written to
/// `/dev/kmsg` is printed by the kernel's console code like its own messages, one record at a
/// time. Level 0 (emerg) prints at any console log level (`quiet`, `loglevel=1`); the console
/// shows it after the usual timestamp, `[    1.466664] VMRS_READY 10.0.2.15`, which the host
/// accepts. Without `/dev/kmsg` the line goes to the console as before.
pub fn announce(line: &str) {
    let record = format!("<0>{line}\n");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .and_then(|mut f| io::Write::write(&mut f, record.as_bytes()));
    if !matches!(written, Ok(n) if n == record.len()) {
        console(line);
    }
}

/// Wait until everything written to the console has been transmitted (the serial port's
/// buffer would otherwise be lost when the machine powers off right after a write).
pub fn drain_console() {
    // SAFETY: tcdrain on fd 1; it fails harmlessly when fd 1 is not a terminal.
    unsafe { libc::tcdrain(1) };
}

/// `mount(2)`.
pub fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    check(unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) })?;
    Ok(())
}

/// `umount2(2)`.
pub fn umount(target: &str, flags: libc::c_int) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: `t` is a valid NUL-terminated string.
    check(unsafe { libc::umount2(t.as_ptr(), flags) })?;
    Ok(())
}

/// `finit_module(2)` with empty parameters.
pub fn finit_module(file: &std::fs::File) -> io::Result<()> {
    let params = c"";
    // SAFETY: the fd is open for the duration of the call and `params` is a valid C string.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A listening `AF_VSOCK` stream socket on `port` of any local CID (close-on-exec, blocking).
pub fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor this function owns from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value before the fields are set.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: `fd` is a bound socket.
    check(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
    Ok(fd)
}

/// `accept4(2)` one connection (close-on-exec).
pub fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed; the result is checked before use.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `chroot(2)`.
pub fn chroot(path: &str) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: `p` is a valid NUL-terminated string.
    check(unsafe { libc::chroot(p.as_ptr()) })?;
    Ok(())
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// `kill(2)`.
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: plain system call with integer arguments.
    check(unsafe { libc::kill(pid, sig) })?;
    Ok(())
}

/// `sync(2)`.
pub fn sync() {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::sync() }
}

/// `reboot(2)`: only returns on failure.
pub fn reboot(cmd: libc::c_int) -> io::Error {
    // SAFETY: plain system call; on success it does not return.
    unsafe { libc::reboot(cmd) };
    io::Error::last_os_error()
}

/// What `waitpid(-1, WNOHANG)` found.
#[derive(Debug)]
pub enum Reaped {
    /// A child exited (pid, raw status).
    Child(libc::pid_t, libc::c_int),
    /// Children exist but none has exited.
    None,
    /// There are no children.
    NoChildren,
}

/// Reap one exited child without blocking.
pub fn reap_one() -> Reaped {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    match pid {
        0 => Reaped::None,
        p if p > 0 => Reaped::Child(p, status),
        _ => {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                Reaped::None
            } else {
                Reaped::NoChildren
            }
        }
    }
}

/// Block `signals` for this thread and return a signalfd that reports them.
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: `set` is a valid sigset_t; invalid numbers just fail.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    // SAFETY: `set` is valid; the old-set pointer may be null.
    check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) })?;
    // SAFETY: -1 asks for a new fd; `set` is valid.
    let fd = check(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
    // SAFETY: `fd` was just returned by signalfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Read one pending signal number from a signalfd, if any.
pub fn read_signal(fd: RawFd) -> Option<u32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: `info` is a writable buffer of `size` bytes.
    let n = unsafe { libc::read(fd, (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
    (n == size as isize).then_some(info.ssi_signo)
}

/// `poll(2)` over `fds` for readability; returns the indexes that are readable.
pub fn poll_readable(fds: &[RawFd], timeout_ms: libc::c_int) -> Vec<usize> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structures.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if n <= 0 {
        return Vec::new();
    }
    pfds.iter()
        .enumerate()
        .filter(|(_, p)| p.revents != 0)
        .map(|(i, _)| i)
        .collect()
}

/// `BLKGETSIZE64`: a block device's size in bytes (`_IOR(0x12, 114, size_t)`).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `EXT4_IOC_RESIZE_FS`: grow a mounted ext4 file system to a block count
/// (`_IOW('f', 16, __u64)`).
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Grow the ext4 file system mounted at `mountpoint` to fill its device `dev` (online, as
/// `resize2fs` does for a mounted file system). Returns the (data) block counts before and after.
pub fn grow_ext4(dev: &str, mountpoint: &str) -> io::Result<(u64, u64)> {
    let devf = std::fs::File::open(dev)?;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into a live variable.
    check(unsafe { libc::ioctl(devf.as_raw_fd(), BLKGETSIZE64 as _, &mut size) })?;
    let blocks = |path: &str| -> io::Result<(u64, u64)> {
        let p = cstr(path)?;
        // SAFETY: statvfs is plain old data; all zeroes is a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: statvfs fills the live struct from a valid C string path.
        check(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
        Ok((st.f_blocks as u64, st.f_frsize.max(1) as u64))
    };
    let (before, bsize) = blocks(mountpoint)?;
    let dir = std::fs::File::open(mountpoint)?;
    let mut count: u64 = size / bsize;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 from a live variable; the fd is the mounted
    // file system's root directory.
    check(unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS as _, &mut count) })?;
    let (after, _) = blocks(mountpoint)?;
    Ok((before, after))
}

/// Set the wall clock (`CLOCK_REALTIME`) to `ns` nanoseconds since the Unix epoch.
pub fn set_realtime(ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec for the duration of the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mix `bytes` into the kernel's entropy pool, credited in full, then reseed its CRNG, so
/// what `getrandom` returns from now on differs from what a twin restored from the same
/// snapshot gets.
pub fn add_entropy_and_reseed(bytes: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    if !bytes.is_empty() {
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        let mut info = Vec::with_capacity(8 + bytes.len());
        let bits = (bytes.len() * 8) as libc::c_int;
        info.extend_from_slice(&bits.to_ne_bytes());
        info.extend_from_slice(&(bytes.len() as libc::c_int).to_ne_bytes());
        info.extend_from_slice(bytes);
        // SAFETY: `info` holds a rand_pool_info header followed by `buf_size` bytes, alive for
        // the call; the fd is open.
        if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is open.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct ifreq`: the interface name, then the union (a `sockaddr` is all we use).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    addr: libc::sockaddr,
    _rest: [u8; 8],
}

impl IfReq {
    fn new(ifname: &str, addr: libc::sockaddr) -> io::Result<Self> {
        let mut name = [0u8; libc::IFNAMSIZ];
        if ifname.is_empty() || ifname.len() >= name.len() || ifname.contains('\0') {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        name[..ifname.len()].copy_from_slice(ifname.as_bytes());
        Ok(IfReq {
            name,
            addr,
            _rest: [0; 8],
        })
    }
}

/// A `sockaddr_in` for `addr` (port 0), as the `sockaddr` the ioctls take.
fn inet(addr: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_ioctl(sock: &OwnedFd, request: libc::c_ulong, req: &IfReq) -> io::Result<()> {
    // SAFETY: `req` is a valid ifreq-sized buffer for the duration of the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *const IfReq) }).map(drop)
}

/// Give interface `ifname` the MAC `mac` while it is up (virtio-net tells the device through
/// its control queue, so the host side filters for the new address).
pub fn set_mac(ifname: &str, mac: [u8; 6]) -> io::Result<()> {
    let mut sa = libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data: [0; 14],
    };
    for (d, m) in sa.sa_data.iter_mut().zip(mac) {
        *d = m as libc::c_char;
    }
    let sock = inet_socket()?;
    ifreq_ioctl(&sock, libc::SIOCSIFHWADDR, &IfReq::new(ifname, sa)?)
}

/// Make `address/prefix_len` the (primary) IPv4 address of `ifname`, replacing the one it has
/// (`SIOCSIFADDR` then `SIOCSIFNETMASK`, as `ifconfig` does; the kernel drops the old
/// address's routes).
pub fn set_ipv4(ifname: &str, address: [u8; 4], prefix_len: u8) -> io::Result<()> {
    if prefix_len > 32 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0);
    let sock = inet_socket()?;
    ifreq_ioctl(&sock, libc::SIOCSIFADDR, &IfReq::new(ifname, inet(address))?)?;
    ifreq_ioctl(
        &sock,
        libc::SIOCSIFNETMASK,
        &IfReq::new(ifname, inet(mask.to_be_bytes()))?,
    )
}

/// A default route through `gateway` (an existing one is left as it is).
pub fn add_default_route(gateway: [u8; 4]) -> io::Result<()> {
    // SAFETY: rtentry is plain data; all-zero is its "nothing set" value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = inet([0; 4]);
    rt.rt_genmask = inet([0; 4]);
    rt.rt_gateway = inet(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    let sock = inet_socket()?;
    // SAFETY: `rt` is a valid rtentry for the duration of the call.
    match check(unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCADDRT as _,
            &rt as *const libc::rtentry,
        )
    }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}
