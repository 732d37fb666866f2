//! Host-side plumbing of an interactive exec (`docker exec -i`/`-t`), shared by the CLI and
//! anything else that attaches a local stream or terminal to a guest process:
//!
//! - [`pump_stdin`] forwards a reader to an [`ExecStdin`] as bytes arrive (one frame per read,
//!   nothing is collected first) and closes the process's stdin at end of input;
//! - [`RawTerminal`] puts a host terminal in raw mode and restores the saved mode when dropped
//!   (every return, error and unwinding path of its owner);
//! - [`terminal_size`] reads a terminal's window size for [`ExecCommand::tty`] and
//!   [`ExecControl::resize`].
//!
//! With a terminal, the guest's line discipline does the work a local one would: the host's
//! is raw, so ^C, ^Z and ^D are plain bytes that reach the guest's terminal, which turns them
//! into signals for its foreground process group.
//!
//! [`ExecCommand::tty`]: super::ExecCommand::tty
//! [`ExecControl::resize`]: super::ExecControl::resize

use super::{AgentError, ExecStdin, WinSize};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Forward everything `reader` yields to `stdin` as it arrives, then close it (the process
/// reads end of input). Returns the number of bytes forwarded. A read error ends the input as
/// end of file would and is returned after closing.
pub async fn pump_stdin<R>(mut reader: R, mut stdin: ExecStdin) -> Result<u64, AgentError>
where
    R: AsyncRead + Unpin,
{
    let mut buf = vec![0u8; super::CHUNK];
    let mut total = 0u64;
    let failed = loop {
        match reader.read(&mut buf).await {
            Ok(0) => break None,
            Ok(n) => {
                stdin.write(&buf[..n]).await?;
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Some(e),
        }
    };
    stdin.close().await?;
    match failed {
        Some(source) => Err(AgentError::HostCopy {
            path: "<stdin>".into(),
            source,
        }),
        None => Ok(total),
    }
}

/// The window size of the terminal `fd`, `None` when it is not a terminal.
pub fn terminal_size(fd: impl AsFd) -> Option<WinSize> {
    let ws = rustix::termios::tcgetwinsize(fd).ok()?;
    Some(WinSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// A host terminal in raw mode (no echo, no line editing, no signals from ^C, no output
/// processing); the mode it had is restored on drop.
#[derive(Debug)]
pub struct RawTerminal {
    fd: OwnedFd,
    saved: rustix::termios::Termios,
}

/// Why a terminal could not be put in raw mode.
#[derive(Debug, thiserror::Error)]
#[error("cannot put the terminal in raw mode")]
pub struct RawModeError(#[source] std::io::Error);

impl RawModeError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::of_io(&self.0)
    }
}

impl RawTerminal {
    /// Put the terminal `fd` in raw mode (a duplicate of `fd` is kept to restore it).
    pub fn enter(fd: BorrowedFd<'_>) -> Result<RawTerminal, RawModeError> {
        use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};
        let saved = tcgetattr(fd).map_err(|e| RawModeError(e.into()))?;
        let fd = fd.try_clone_to_owned().map_err(RawModeError)?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(&fd, OptionalActions::Now, &raw).map_err(|e| RawModeError(e.into()))?;
        Ok(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use rustix::termios::{tcsetattr, OptionalActions};
        // Flush: output still queued in raw mode is written before the mode changes back.
        let _ = tcsetattr(&self.fd, OptionalActions::Drain, &self.saved);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    fn pty() -> (OwnedFd, OwnedFd) {
        let (mut m, mut s) = (-1, -1);
        let ws = libc::winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: out-pointers to live ints; null name and termios are allowed.
        let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(r, 0);
        // SAFETY: openpty returned two descriptors nobody else owns.
        unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
    }

    #[test]
    fn raw_mode_is_restored_on_drop_and_sizes_are_read() {
        let (_master, slave) = pty();
        assert_eq!(terminal_size(&slave), Some(WinSize { rows: 33, cols: 101 }));
        let before = rustix::termios::tcgetattr(&slave).unwrap();
        assert!(before
            .local_modes
            .contains(rustix::termios::LocalModes::ECHO | rustix::termios::LocalModes::ICANON));
        {
            let _raw = RawTerminal::enter(slave.as_fd()).unwrap();
            let now = rustix::termios::tcgetattr(&slave).unwrap();
            assert!(!now.local_modes.contains(rustix::termios::LocalModes::ECHO));
            assert!(!now.local_modes.contains(rustix::termios::LocalModes::ICANON));
            assert!(!now.local_modes.contains(rustix::termios::LocalModes::ISIG));
        }
        let after = rustix::termios::tcgetattr(&slave).unwrap();
        assert_eq!(after.local_modes, before.local_modes);
        assert_eq!(after.input_modes, before.input_modes);
        assert_eq!(after.output_modes, before.output_modes);
    }

    #[test]
    fn not_a_terminal() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(terminal_size(&f), None);
        assert!(RawTerminal::enter(f.as_fd()).is_err());
        let _ = f.as_raw_fd();
    }
}
