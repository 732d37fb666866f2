//! [`VmManager`]: the verbs (start, stop, kill, pause, resume, state, list, remove, wait_ready),
//! per-VM directories and state records, and reattaching to VMs started by other processes.
// (filled in by the foundation work)

/// Placeholder until the manager lands.
#[derive(Debug)]
pub struct VmManager;
/// Placeholder.
#[derive(Debug)]
pub struct VmInfo;
/// Placeholder.
#[derive(Debug, thiserror::Error)]
#[error("manager")]
pub struct ManagerError;
