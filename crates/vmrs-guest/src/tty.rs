//! Pseudo-terminals for `ExecTty` (protocol version 2): allocate a pair with its window size,
//! make the slave the controlling terminal of a new session in the child, resize, and write to
//! the master when it is non-blocking.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use vmrs_proto::WinSize;

fn winsize(size: WinSize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new pseudo-terminal pair `(master, slave)` of `size`, both close-on-exec (the child gets
/// the slave as its stdio through `dup2`, which clears the flag on the copies).
pub fn open(size: WinSize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let ws = winsize(size);
    // SAFETY: out-pointers to two live ints; a null name buffer and termios are allowed, and
    // `ws` outlives the call.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty returned two open descriptors that nothing else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    cloexec(master.as_raw_fd())?;
    cloexec(slave.as_raw_fd())?;
    Ok((master, slave))
}

/// Tell the terminal its new size (the kernel sends `SIGWINCH` to its foreground group).
pub fn resize(master: &OwnedFd, size: WinSize) -> io::Result<()> {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads one winsize from a live struct.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In the child between fork and exec: start a session whose controlling terminal is fd 0.
///
/// # Safety
/// Only to be called between fork and exec (it calls async-signal-safe functions only).
pub unsafe fn become_session_leader() -> io::Result<()> {
    // SAFETY: setsid and ioctl are async-signal-safe; fd 0 is the terminal's slave.
    unsafe {
        if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Write all of `data` to `fd`, waiting for room when it is non-blocking.
pub fn write_all(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: the pointer and length describe the live `data` slice.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n > 0 {
            data = &data[n as usize..];
            continue;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) => {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 1000) };
            }
            _ if n == 0 => return Err(io::ErrorKind::WriteZero.into()),
            _ => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_has_its_size_and_resizes() {
        let (master, slave) = open(WinSize { rows: 31, cols: 97 }).unwrap();
        let get = |fd: &OwnedFd| {
            let mut ws = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCGWINSZ writes one winsize into a live struct.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
            assert_eq!(r, 0);
            (ws.ws_row, ws.ws_col)
        };
        assert_eq!(get(&slave), (31, 97));
        resize(&master, WinSize { rows: 10, cols: 20 }).unwrap();
        assert_eq!(get(&slave), (10, 20));
        write_all(master.as_raw_fd(), b"hi\n").unwrap();
    }
}
