//! Exit codes and error printing.
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | success |
//! | 1    | any other error (or, for `run` in the foreground, the VM failed) |
//! | 2    | usage error (bad flags or arguments) |
//! | 3    | no such VM or image |
//! | 4    | conflict: the name is taken, or the VM's state does not allow the operation |
//! | 5    | invalid configuration or input |
//! | 6    | hypervisor/backend error (QEMU missing, failed to boot, QMP error) |
//! | 7    | timed out |

use vm_rs::manager::ManagerError;

/// Any other error.
pub const GENERAL: i32 = 1;
/// No such VM or image.
pub const NOT_FOUND: i32 = 3;
/// Name taken or invalid state.
pub const CONFLICT: i32 = 4;
/// Invalid configuration or input.
pub const INVALID: i32 = 5;
/// Backend error.
pub const BACKEND: i32 = 6;
/// Timeout.
pub const TIMEOUT: i32 = 7;

/// Print `error: ...` and each cause on its own line.
pub fn print_error(err: &anyhow::Error) {
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

/// Map an error to its documented exit code.
pub fn code_for(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(m) = cause.downcast_ref::<ManagerError>() {
            return match m {
                ManagerError::NotFound { .. } => NOT_FOUND,
                ManagerError::AlreadyExists { .. } | ManagerError::State(_) => CONFLICT,
                ManagerError::Config(_) | ManagerError::InvalidRequest { .. } => INVALID,
                ManagerError::Driver { .. } | ManagerError::Process { .. } => BACKEND,
                ManagerError::Timeout { .. } => TIMEOUT,
                ManagerError::NotRunning { .. } => GENERAL,
                _ => GENERAL,
            };
        }
        if cause.downcast_ref::<vm_rs::config::ConfigError>().is_some()
            || cause.downcast_ref::<vm_rs::net::NetError>().is_some()
        {
            return INVALID;
        }
        if let Some(code) = oci_code(cause) {
            return code;
        }
        if let Some(c) = cause.downcast_ref::<CliError>() {
            return c.code();
        }
        if let Some(code) = crate::cmd::disk::exit_code(cause) {
            return code;
        }
    }
    GENERAL
}

/// Exit codes for image errors: unknown image → 3, bad reference/platform → 5.
fn oci_code(cause: &(dyn std::error::Error + 'static)) -> Option<i32> {
    use vm_rs::oci::{PullError, ReferenceError, StoreError};
    if let Some(e) = cause.downcast_ref::<StoreError>() {
        return match e {
            StoreError::NotFound { .. } => Some(NOT_FOUND),
            StoreError::Ambiguous { .. } | StoreError::Reference(_) => Some(INVALID),
            _ => None,
        };
    }
    if cause.downcast_ref::<ReferenceError>().is_some() {
        return Some(INVALID);
    }
    match cause.downcast_ref::<PullError>() {
        Some(PullError::NoMatchingPlatform { .. }) => Some(NOT_FOUND),
        Some(PullError::Reference(_)) => Some(INVALID),
        _ => None,
    }
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
}

impl CliError {
    fn code(&self) -> i32 {
        match self {
            CliError::Invalid(_) => INVALID,
            CliError::NotFound(_) => NOT_FOUND,
        }
    }
}
