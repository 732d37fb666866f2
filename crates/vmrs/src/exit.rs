//! Exit codes and error printing.
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | success (also `stop` of a VM that is already stopped) |
//! | 1    | any other error (or, for `run`, the VM failed; for `run -d` and `run IMAGE`, a stop signal ended it) |
//! | 2    | usage error (bad flags or arguments, a flag value that is not one of its choices) |
//! | 3    | no such VM or image |
//! | 4    | conflict: the name is taken, a host port is in use, or the VM's state does not allow the operation |
//! | 5    | invalid configuration or input, or something the chosen backend or host does not support |
//! | 6    | hypervisor/backend error (QEMU missing or refusing to boot, QMP error, registry error) |
//! | 7    | timed out |
//!
//! `exec` and `run IMAGE` exit with the guest command's own code instead. The code of an error
//! comes from the [`ErrorKind`] of the first vm-rs error in its chain, which already looks
//! through the wrappers below it (a TAP failure deep in a start is a network error, not a
//! "start failed").

use vm_rs::ErrorKind;

/// The documented exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// 0: success.
    Success = 0,
    /// 1: any other error.
    Failure = 1,
    /// 2: bad flags or arguments.
    Usage = 2,
    /// 3: no such VM or image.
    NotFound = 3,
    /// 4: name taken, host port in use, or the state does not allow the operation.
    Conflict = 4,
    /// 5: invalid configuration or input (also: not supported by the backend).
    Invalid = 5,
    /// 6: hypervisor or backend error.
    Backend = 6,
    /// 7: timed out.
    Timeout = 7,
}

impl ExitCode {
    /// The process exit status.
    pub fn code(self) -> i32 {
        self as i32
    }
}

impl From<ErrorKind> for ExitCode {
    fn from(k: ErrorKind) -> Self {
        match k {
            ErrorKind::NotFound => ExitCode::NotFound,
            ErrorKind::Conflict => ExitCode::Conflict,
            ErrorKind::Invalid | ErrorKind::Unsupported => ExitCode::Invalid,
            ErrorKind::Backend => ExitCode::Backend,
            ErrorKind::Timeout => ExitCode::Timeout,
            _ => ExitCode::Failure,
        }
    }
}

/// Print `error: ...` and each cause on its own line.
///
/// A failed write is ignored rather than a panic: after SIGHUP the terminal may be gone.
pub fn print_error(err: &anyhow::Error) {
    use std::io::Write;
    let mut out = std::io::stderr().lock();
    let _ = writeln!(out, "error: {err}");
    for cause in err.chain().skip(1) {
        let _ = writeln!(out, "  caused by: {cause}");
    }
}

/// The kind of an error chain: the first cause that has one decides (a vm-rs error answers
/// for everything below it; `anyhow` context has none); `Other` when no cause has one.
pub fn kind_of(err: &anyhow::Error) -> ErrorKind {
    err.chain()
        .find_map(|cause| match cause.downcast_ref::<CliError>() {
            Some(c) => Some(c.kind()),
            None => ErrorKind::of(cause),
        })
        .unwrap_or(ErrorKind::Other)
}

/// Map an error to its documented exit code.
pub fn code_for(err: &anyhow::Error) -> ExitCode {
    kind_of(err).into()
}

/// Errors raised by the CLI itself.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad input the library never saw.
    #[error("{0}")]
    Invalid(String),
    /// Something does not exist.
    #[error("{0}")]
    NotFound(String),
    /// `rm` of a live VM without `-f`.
    #[error("cannot remove vm {name:?}: it is {state}; stop it first (`vmrs stop {name}`) or use `vmrs rm -f {name}`")]
    RemoveLive {
        /// VM name.
        name: String,
        /// Its state.
        state: &'static str,
    },
    /// A stop signal (SIGINT, SIGTERM, SIGHUP) ended the wait; the VM was stopped or killed.
    #[error("interrupted by {signal}")]
    Interrupted {
        /// The signal's name.
        signal: &'static str,
    },
}

impl CliError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CliError::Invalid(_) => ErrorKind::Invalid,
            CliError::NotFound(_) => ErrorKind::NotFound,
            CliError::RemoveLive { .. } => ErrorKind::Conflict,
            CliError::Interrupted { .. } => ErrorKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_rs::manager::ManagerError;

    #[test]
    fn the_deepest_known_kind_is_not_hidden_by_context() {
        let e = anyhow::Error::new(ManagerError::Network {
            name: "a".into(),
            source: vm_rs::net::HostError::MixedNamespaces,
        })
        .context("cannot start vm \"a\"");
        assert_eq!(code_for(&e), ExitCode::Invalid);
        let e = anyhow::Error::new(std::io::Error::other("x")).context("y");
        assert_eq!(code_for(&e), ExitCode::Failure);
        let e = anyhow::Error::new(CliError::RemoveLive {
            name: "a".into(),
            state: "running",
        });
        assert_eq!(code_for(&e).code(), 4);
    }
}
