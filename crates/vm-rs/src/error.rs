//! What kind of failure an error is, across every module: [`ErrorKind`].
//!
//! Each public error enum has a `kind()` method. Wrappers look through to their cause (a
//! [`ManagerError::Network`](crate::ManagerError::Network) asks its
//! [`HostError`](crate::net::HostError)), so the kind of a failure deep in a start is the kind
//! of what actually went wrong, not of the layer that reported it. Callers that hold an error
//! chain of unknown types (a CLI with `anyhow`) use [`ErrorKind::of`].
//!
//! An I/O error has a kind too ([`ErrorKind::of_io`]): a missing file is
//! [`NotFound`](ErrorKind::NotFound), an address in use is a [`Conflict`](ErrorKind::Conflict).
//! Only errors about paths or addresses the caller chose are classified through it; I/O
//! failures on vm-rs's own bookkeeping files stay [`Other`](ErrorKind::Other).

use std::error::Error;

/// The kind of a failure, for choosing a reaction (exit code, retry, message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No such VM, image, file or device.
    NotFound,
    /// The name or resource is taken (a VM name, a host port), or the VM's state does not allow
    /// the operation.
    Conflict,
    /// The configuration or input is invalid.
    Invalid,
    /// The chosen backend (or this host) cannot do what was asked.
    Unsupported,
    /// The hypervisor or another program vm-rs drives failed (missing, refused to boot,
    /// protocol error).
    Backend,
    /// Something did not happen in time.
    Timeout,
    /// Anything else (I/O on vm-rs's own files, a failed background task, ...).
    Other,
}

impl ErrorKind {
    /// Kind of an I/O error: not found, in use / exists (conflict), timed out, unsupported,
    /// invalid input; anything else is [`Other`](Self::Other).
    pub fn of_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::NotFound => Self::NotFound,
            K::AlreadyExists | K::AddrInUse => Self::Conflict,
            K::TimedOut => Self::Timeout,
            K::Unsupported => Self::Unsupported,
            K::InvalidInput => Self::Invalid,
            _ => Self::Other,
        }
    }

    /// The kind of `err` when it is one of vm-rs's public error types (or an I/O error).
    /// Returns `None` for foreign errors; callers walking a chain try the next cause.
    pub fn of(err: &(dyn Error + 'static)) -> Option<Self> {
        macro_rules! try_types {
            ($($t:ty),* $(,)?) => {
                $(if let Some(e) = err.downcast_ref::<$t>() {
                    return Some(e.kind());
                })*
            };
        }
        try_types!(
            crate::manager::ManagerError,
            crate::manager::record::RecordError,
            crate::snapshot::SnapshotError,
            crate::driver::DriverError,
            crate::config::ConfigError,
            crate::state::StateError,
            crate::process::ProcessError,
            crate::net::NetError,
            crate::net::HostError,
            crate::net::ForwardError,
            crate::net::sidecar::SidecarError,
            crate::net::netns::NetnsError,
            crate::net::switch::server::ServeError,
            crate::agent::AgentError,
            crate::rootfs::RootfsError,
            crate::virtiofs::VirtiofsError,
            crate::oci::StoreError,
            crate::oci::PullError,
            crate::oci::pull::TransferError,
            crate::oci::ReferenceError,
            crate::oci::digest::DigestError,
            crate::oci::UnpackError,
            crate::oci::auth::AuthError,
            crate::oci::manifest::ManifestError,
            crate::oci::config::ConfigError,
            crate::storage::DiskError,
            crate::storage::CloneError,
            crate::storage::DownloadError,
            crate::storage::SeedError,
            crate::storage::SizeError,
            crate::storage::CatalogError,
            crate::storage::SshKeyError,
            crate::setup::SetupError,
            crate::guest::GuestError,
        );
        if let Some(e) = err.downcast_ref::<std::io::Error>() {
            return Some(Self::of_io(e));
        }
        None
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotFound => "not found",
            Self::Conflict => "conflict",
            Self::Invalid => "invalid",
            Self::Unsupported => "unsupported",
            Self::Backend => "backend",
            Self::Timeout => "timeout",
            Self::Other => "other",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::ManagerError;
    use crate::net::{HostError, NetError};

    #[test]
    fn wrappers_report_the_kind_of_their_cause() {
        let deep = ManagerError::Network {
            name: "a".into(),
            source: HostError::Config(NetError::InvalidName {
                what: "bridge",
                name: "x".into(),
                reason: "too long",
            }),
        };
        assert_eq!(deep.kind(), ErrorKind::Invalid);
        let io = ManagerError::Network {
            name: "a".into(),
            source: HostError::Io {
                op: "open /dev/net/tun".into(),
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            },
        };
        assert_eq!(io.kind(), ErrorKind::Conflict);
        assert_eq!(ErrorKind::of(&deep), Some(ErrorKind::Invalid));
    }

    #[test]
    fn foreign_errors_have_no_kind() {
        let e = std::fmt::Error;
        assert_eq!(ErrorKind::of(&e), None);
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(ErrorKind::of(&io), Some(ErrorKind::NotFound));
    }
}
