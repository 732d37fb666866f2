//! The VM lifecycle state machine: [`VmState`], the one transition table
//! ([`valid_transition`]) and the operation predicates built on it.
//!
//! ```text
//!   starting ──► running ──► ready{ip}
//!      │            │  ▲         │  ▲
//!      │            ▼  │         ▼  │
//!      │           paused ◄──────┘  │ (resume returns to ready when the VM was ready)
//!      ▼                            
//!   stopped / failed{reason}  ◄── any live state
//!      │
//!      └──► starting (start again)
//! ```

use serde::{Deserialize, Serialize};

/// Where a VM is in its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum VmState {
    /// The VMM process is being launched.
    Starting,
    /// The VMM runs the guest; the guest has not reported readiness yet.
    Running,
    /// The guest printed `VMRS_READY <ip>`.
    Ready {
        /// Address the guest reported.
        ip: String,
    },
    /// vCPUs are stopped.
    Paused,
    /// The VM is off (graceful stop, kill, or guest power-off).
    Stopped,
    /// The VMM died or the VM could not start.
    Failed {
        /// What happened.
        reason: String,
    },
}

/// The operations that change state; used in error messages and predicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Start (or restart) the VM.
    Start,
    /// Pause vCPUs.
    Pause,
    /// Resume vCPUs.
    Resume,
    /// Graceful stop.
    Stop,
    /// Immediate kill.
    Kill,
    /// Remove the VM's record and files.
    Remove,
    /// Take a snapshot.
    Snapshot,
    /// Run a command through the guest agent.
    Exec,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Start => "start",
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Stop => "stop",
            Operation::Kill => "kill",
            Operation::Remove => "remove",
            Operation::Snapshot => "snapshot",
            Operation::Exec => "exec",
        })
    }
}

/// Discriminant of [`VmState`] without data, for the transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateKind {
    /// [`VmState::Starting`]
    Starting,
    /// [`VmState::Running`]
    Running,
    /// [`VmState::Ready`]
    Ready,
    /// [`VmState::Paused`]
    Paused,
    /// [`VmState::Stopped`]
    Stopped,
    /// [`VmState::Failed`]
    Failed,
}

impl VmState {
    /// The state without its data.
    pub fn kind(&self) -> StateKind {
        match self {
            VmState::Starting => StateKind::Starting,
            VmState::Running => StateKind::Running,
            VmState::Ready { .. } => StateKind::Ready,
            VmState::Paused => StateKind::Paused,
            VmState::Stopped => StateKind::Stopped,
            VmState::Failed { .. } => StateKind::Failed,
        }
    }

    /// Short lower-case name (`ready`, `failed`, ...).
    pub fn name(&self) -> &'static str {
        match self.kind() {
            StateKind::Starting => "starting",
            StateKind::Running => "running",
            StateKind::Ready => "ready",
            StateKind::Paused => "paused",
            StateKind::Stopped => "stopped",
            StateKind::Failed => "failed",
        }
    }

    /// True while a VMM process exists for the VM.
    pub fn is_live(&self) -> bool {
        !matches!(self.kind(), StateKind::Stopped | StateKind::Failed)
    }

    /// Address from the readiness marker, when ready.
    pub fn ip(&self) -> Option<&str> {
        match self {
            VmState::Ready { ip } => Some(ip),
            _ => None,
        }
    }

    /// Whether `op` is allowed from this state.
    pub fn can(&self, op: Operation) -> bool {
        use StateKind::*;
        let k = self.kind();
        match op {
            Operation::Start => matches!(k, Stopped | Failed),
            Operation::Pause => matches!(k, Running | Ready),
            Operation::Resume => k == Paused,
            Operation::Stop | Operation::Kill => self.is_live(),
            Operation::Remove => !self.is_live(),
            Operation::Snapshot => matches!(k, Running | Ready | Paused),
            Operation::Exec => k == Ready,
        }
    }

    /// `Ok(())` if `op` is allowed, else the typed error.
    pub fn check(&self, vm: &str, op: Operation) -> Result<(), StateError> {
        if self.can(op) {
            Ok(())
        } else {
            Err(StateError::InvalidOperation {
                vm: vm.to_string(),
                op,
                state: self.name(),
            })
        }
    }

    /// Whether the state machine allows moving from `self` to `to`.
    pub fn can_transition_to(&self, to: &VmState) -> bool {
        valid_transition(self.kind(), to.kind())
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmState::Ready { ip } => write!(f, "ready ({ip})"),
            VmState::Failed { reason } => write!(f, "failed: {reason}"),
            other => f.write_str(other.name()),
        }
    }
}

/// The one transition table. Self-transitions are allowed only for `Ready` (the address may be
/// re-reported) and `Failed` (a reason may be refined).
pub fn valid_transition(from: StateKind, to: StateKind) -> bool {
    use StateKind::*;
    matches!(
        (from, to),
        (Starting, Running)
            | (Starting, Ready)
            | (Starting, Stopped)
            | (Starting, Failed)
            | (Running, Ready)
            | (Running, Paused)
            | (Running, Stopped)
            | (Running, Failed)
            | (Ready, Ready)
            | (Ready, Paused)
            | (Ready, Stopped)
            | (Ready, Failed)
            | (Paused, Running)
            | (Paused, Ready)
            | (Paused, Stopped)
            | (Paused, Failed)
            | (Stopped, Starting)
            | (Failed, Starting)
            | (Failed, Failed)
    )
}

/// An operation was asked of a VM in a state that does not allow it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateError {
    /// e.g. pausing a stopped VM.
    #[error("cannot {op} vm {vm:?}: it is {state}")]
    InvalidOperation {
        /// VM name.
        vm: String,
        /// Operation asked for.
        op: Operation,
        /// Current state name.
        state: &'static str,
    },
}

impl StateError {
    /// What kind of failure this is (see [`crate::error`]): a state conflict.
    pub fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::Conflict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_of_stopped_vm_is_typed_error() {
        let err = VmState::Stopped.check("a", Operation::Pause).unwrap_err();
        assert_eq!(
            err,
            StateError::InvalidOperation {
                vm: "a".into(),
                op: Operation::Pause,
                state: "stopped"
            }
        );
        assert_eq!(err.to_string(), "cannot pause vm \"a\": it is stopped");
    }

    #[test]
    fn predicates_agree_with_table() {
        let ready = VmState::Ready {
            ip: "10.0.0.2".into(),
        };
        assert!(ready.can(Operation::Pause));
        assert!(valid_transition(StateKind::Ready, StateKind::Paused));
        assert!(VmState::Paused.can(Operation::Resume));
        assert!(valid_transition(StateKind::Paused, StateKind::Ready));
        assert!(!VmState::Running.can(Operation::Resume));
        assert!(!valid_transition(StateKind::Stopped, StateKind::Paused));
        assert!(!valid_transition(StateKind::Stopped, StateKind::Running));
        assert!(VmState::Stopped.can(Operation::Remove));
        assert!(!ready.can(Operation::Remove));
        // every predicate that moves a live VM to another state has a table entry
        for s in [VmState::Running, ready.clone(), VmState::Paused] {
            assert!(s.can_transition_to(&VmState::Stopped));
            assert!(s.can_transition_to(&VmState::Failed { reason: "x".into() }));
        }
    }

    #[test]
    fn serde_shape_is_tagged() {
        let json = serde_json::to_value(VmState::Ready { ip: "1.2.3.4".into() }).expect("json");
        assert_eq!(json, serde_json::json!({"state": "ready", "ip": "1.2.3.4"}));
        let back: VmState =
            serde_json::from_value(serde_json::json!({"state":"failed","reason":"x"})).expect("back");
        assert_eq!(back, VmState::Failed { reason: "x".into() });
    }
}
