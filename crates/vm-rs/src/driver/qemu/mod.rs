//! QEMU backend (skeleton; the QMP implementation lands next).
use super::*;

/// QEMU driver.
#[derive(Debug, Default)]
pub struct QemuDriver;
impl QemuDriver {
    /// New driver.
    pub fn new() -> Self {
        Self
    }
}

#[async_trait::async_trait]
impl VmDriver for QemuDriver {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }
    async fn boot(&self, _spec: &BootSpec<'_>) -> Result<Launched, DriverError> {
        Err(DriverError::Unsupported {
            backend: BackendKind::Qemu,
            op: "boot",
        })
    }
    async fn status(&self, _h: &VmHandle) -> Result<VmmStatus, DriverError> {
        Err(DriverError::Unsupported {
            backend: BackendKind::Qemu,
            op: "status",
        })
    }
    async fn pause(&self, _h: &VmHandle) -> Result<(), DriverError> {
        Err(DriverError::Unsupported {
            backend: BackendKind::Qemu,
            op: "pause",
        })
    }
    async fn resume(&self, _h: &VmHandle) -> Result<(), DriverError> {
        Err(DriverError::Unsupported {
            backend: BackendKind::Qemu,
            op: "resume",
        })
    }
    async fn request_shutdown(&self, _h: &VmHandle) -> Result<(), DriverError> {
        Err(DriverError::Unsupported {
            backend: BackendKind::Qemu,
            op: "shutdown",
        })
    }
    async fn quit(&self, _h: &VmHandle) -> Result<(), DriverError> {
        Err(DriverError::Unsupported {
            backend: BackendKind::Qemu,
            op: "quit",
        })
    }
}
