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
use std::net::IpAddr;

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
        /// Address the guest reported (persisted as a string, `"10.0.2.15"`).
        ip: IpAddr,
    },
    /// vCPUs are stopped.
    Paused,
    /// The VM is off (graceful stop, kill, or guest power-off).
    Stopped,
    /// The VMM died, the guest kernel panicked, or the VM could not start.
    Failed {
        /// What happened.
        reason: String,
    },
}

/// The verbs of [`crate::VmManager`] that depend on the VM's state; used in error messages and
/// in [`VmState::can`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Change vCPUs or memory of the running VMM.
    Resize,
    /// Hot-plug a disk or NIC.
    AddDevice,
    /// Hot-unplug a device.
    RemoveDevice,
    /// Read device counters.
    Counters,
    /// Ask the VMM for its own description of the VM.
    VmmInfo,
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
            Operation::Resize => "resize",
            Operation::AddDevice => "add a device to",
            Operation::RemoveDevice => "remove a device from",
            Operation::Counters => "read counters of",
            Operation::VmmInfo => "query the vmm of",
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

impl StateKind {
    /// Every state, in lifecycle order.
    pub const ALL: [StateKind; 6] = [
        StateKind::Starting,
        StateKind::Running,
        StateKind::Ready,
        StateKind::Paused,
        StateKind::Stopped,
        StateKind::Failed,
    ];

    /// Short lower-case name (`ready`, `failed`, ...).
    pub fn name(self) -> &'static str {
        match self {
            StateKind::Starting => "starting",
            StateKind::Running => "running",
            StateKind::Ready => "ready",
            StateKind::Paused => "paused",
            StateKind::Stopped => "stopped",
            StateKind::Failed => "failed",
        }
    }
}

impl std::fmt::Display for StateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What takes a VM along an edge of the transition table: a verb, or something the VMM or the
/// guest did on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cause {
    /// A manager verb (a VMM event reporting the same change — someone else paused the VM
    /// through the VMM's socket — takes the same edge).
    Verb(Operation),
    /// The VMM was launched and answers on its control socket.
    Launched,
    /// The guest printed its readiness marker (again, with a new address, from `Ready`).
    GuestReady,
    /// The VMM went away without being asked: guest power-off, guest panic, VMM crash, a failed
    /// start, or a failure reason refined later.
    Exited,
}

use Cause::{Exited, GuestReady, Launched, Verb};

const NONE: &[Cause] = &[];
const STOP: &[Cause] = &[Verb(Operation::Stop), Verb(Operation::Kill), Exited];

/// The one transition table: what can take a VM from `from` to `to` (empty: the transition is
/// illegal). An exhaustive match over every pair, so a new state cannot be added without
/// deciding each of its edges. Everything else — [`valid_transition`], [`VmState::can`] — is
/// derived from it.
pub fn transition_causes(from: StateKind, to: StateKind) -> &'static [Cause] {
    use StateKind::*;
    match (from, to) {
        (Starting, Running) => &[Launched],
        (Starting, Ready) => &[GuestReady],
        (Starting, Stopped) => STOP,
        (Starting, Failed) => &[Exited],
        (Starting, Starting | Paused) => NONE,

        (Running, Ready) => &[GuestReady],
        (Running, Paused) => &[Verb(Operation::Pause)],
        (Running, Stopped) => STOP,
        (Running, Failed) => &[Exited],
        (Running, Starting | Running) => NONE,

        // the address may be re-reported
        (Ready, Ready) => &[GuestReady],
        (Ready, Paused) => &[Verb(Operation::Pause)],
        (Ready, Stopped) => STOP,
        (Ready, Failed) => &[Exited],
        (Ready, Starting | Running) => NONE,

        // resume returns to ready when the guest was ready before the pause
        (Paused, Running | Ready) => &[Verb(Operation::Resume)],
        (Paused, Stopped) => STOP,
        (Paused, Failed) => &[Exited],
        (Paused, Starting | Paused) => NONE,

        (Stopped, Starting) => &[Verb(Operation::Start)],
        (Stopped, Running | Ready | Paused | Stopped | Failed) => NONE,

        (Failed, Starting) => &[Verb(Operation::Start)],
        // a failure reason may be refined
        (Failed, Failed) => &[Exited],
        (Failed, Running | Ready | Paused | Stopped) => NONE,
    }
}

/// Whether anything may move a VM from `from` to `to` ([`transition_causes`] is not empty).
pub fn valid_transition(from: StateKind, to: StateKind) -> bool {
    !transition_causes(from, to).is_empty()
}

/// Whether the table has an edge out of `from` taken by `cause`.
fn has_edge(from: StateKind, cause: Cause) -> bool {
    StateKind::ALL
        .iter()
        .any(|&to| transition_causes(from, to).contains(&cause))
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
        self.kind().name()
    }

    /// True while a VMM process exists for the VM.
    pub fn is_live(&self) -> bool {
        !matches!(self.kind(), StateKind::Stopped | StateKind::Failed)
    }

    /// Address from the readiness marker, when ready.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            VmState::Ready { ip } => Some(*ip),
            _ => None,
        }
    }

    /// Whether `op` is allowed from this state, read off the transition table:
    ///
    /// * verbs that move the VM (start, pause, resume, stop, kill) need an edge out of this
    ///   state labelled with the verb;
    /// * verbs that talk to a running VMM and leave the state as it is (snapshot, resize,
    ///   devices, counters, vmm info) need a VMM whose vCPUs can be paused or resumed;
    /// * exec needs a state the guest's readiness marker leads to;
    /// * remove needs a VM at rest, one that could be started.
    pub fn can(&self, op: Operation) -> bool {
        let from = self.kind();
        match op {
            Operation::Start | Operation::Pause | Operation::Resume | Operation::Stop | Operation::Kill => {
                has_edge(from, Verb(op))
            }
            Operation::Snapshot
            | Operation::Resize
            | Operation::AddDevice
            | Operation::RemoveDevice
            | Operation::Counters
            | Operation::VmmInfo => {
                has_edge(from, Verb(Operation::Pause)) || has_edge(from, Verb(Operation::Resume))
            }
            Operation::Exec => StateKind::ALL
                .iter()
                .any(|&prev| transition_causes(prev, from).contains(&GuestReady)),
            Operation::Remove => has_edge(from, Verb(Operation::Start)),
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

/// An operation or state change the state machine does not allow.
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
    /// A change the transition table has no edge for (e.g. a pause that lost a race with the
    /// VM's exit: stopped → paused).
    #[error("vm {vm:?} cannot go from {from} to {to}")]
    IllegalTransition {
        /// VM name.
        vm: String,
        /// State it is in.
        from: StateKind,
        /// State asked for.
        to: StateKind,
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

    fn ready() -> VmState {
        VmState::Ready {
            ip: IpAddr::from([10, 0, 0, 2]),
        }
    }

    fn example(kind: StateKind) -> VmState {
        match kind {
            StateKind::Starting => VmState::Starting,
            StateKind::Running => VmState::Running,
            StateKind::Ready => ready(),
            StateKind::Paused => VmState::Paused,
            StateKind::Stopped => VmState::Stopped,
            StateKind::Failed => VmState::Failed { reason: "x".into() },
        }
    }

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

    /// Every verb in every state, written out once here as the expected answer (the library
    /// derives it from the table; this pins what the derivation must give).
    #[test]
    fn can_of_every_operation_in_every_state() {
        use Operation::*;
        use StateKind::*;
        let vmm_ops = [Snapshot, Resize, AddDevice, RemoveDevice, Counters, VmmInfo];
        for kind in StateKind::ALL {
            let s = example(kind);
            let live_vmm = matches!(kind, Running | Ready | Paused);
            assert_eq!(
                s.can(Start),
                matches!(kind, Stopped | Failed),
                "start from {kind}"
            );
            assert_eq!(
                s.can(Remove),
                matches!(kind, Stopped | Failed),
                "remove from {kind}"
            );
            assert_eq!(s.can(Pause), matches!(kind, Running | Ready), "pause from {kind}");
            assert_eq!(s.can(Resume), kind == Paused, "resume from {kind}");
            assert_eq!(s.can(Stop), s.is_live(), "stop from {kind}");
            assert_eq!(s.can(Kill), s.is_live(), "kill from {kind}");
            assert_eq!(s.can(Exec), kind == Ready, "exec from {kind}");
            for op in vmm_ops {
                assert_eq!(s.can(op), live_vmm, "{op} from {kind}");
            }
        }
    }

    #[test]
    fn table_edges() {
        use StateKind::*;
        let legal = [
            (Starting, Running),
            (Starting, Ready),
            (Starting, Stopped),
            (Starting, Failed),
            (Running, Ready),
            (Running, Paused),
            (Running, Stopped),
            (Running, Failed),
            (Ready, Ready),
            (Ready, Paused),
            (Ready, Stopped),
            (Ready, Failed),
            (Paused, Running),
            (Paused, Ready),
            (Paused, Stopped),
            (Paused, Failed),
            (Stopped, Starting),
            (Failed, Starting),
            (Failed, Failed),
        ];
        for from in StateKind::ALL {
            for to in StateKind::ALL {
                assert_eq!(
                    valid_transition(from, to),
                    legal.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        // every live state can end, and only a verb restarts a VM at rest
        for from in [Starting, Running, Ready, Paused] {
            assert!(transition_causes(from, Failed).contains(&Cause::Exited));
            assert!(transition_causes(from, Stopped).contains(&Cause::Verb(Operation::Kill)));
        }
        assert_eq!(
            transition_causes(Stopped, Starting),
            &[Cause::Verb(Operation::Start)]
        );
    }

    #[test]
    fn serde_shape_is_tagged_and_ip_is_a_string() {
        let json = serde_json::to_value(VmState::Ready {
            ip: IpAddr::from([10, 0, 2, 15]),
        })
        .expect("json");
        assert_eq!(json, serde_json::json!({"state": "ready", "ip": "10.0.2.15"}));
        // records written when the address was a free string still load
        let old: VmState = serde_json::from_str(r#"{"state":"ready","ip":"fd00::2"}"#).expect("old record");
        assert_eq!(old.ip(), Some("fd00::2".parse().expect("v6")));
        let back: VmState =
            serde_json::from_value(serde_json::json!({"state":"failed","reason":"x"})).expect("back");
        assert_eq!(back, VmState::Failed { reason: "x".into() });
    }
}
