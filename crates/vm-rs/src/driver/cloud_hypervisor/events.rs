//! Cloud Hypervisor's event monitor (`--event-monitor path=FILE`) and how its records map to
//! [`VmmEvent`]s.
//!
//! The VMM appends one pretty-printed JSON object per event, each followed by a blank line:
//!
//! ```text
//! {
//!   "timestamp": { "secs": 0, "nanos": 81234 },
//!   "source": "vm",
//!   "event": "paused",
//!   "properties": null
//! }
//!
//! ```
//!
//! Pretty-printed JSON never contains an empty line, so `"\n\n"` separates records.
//! [`EventParser`] splits a byte stream at those separators (records may arrive in pieces) and
//! skips anything that is not an event object; a record longer than [`MAX_RECORD`] is dropped.
//!
//! ## Failure detection
//!
//! Cloud Hypervisor exits with status 0 whether the guest powered off, the VMM was asked to
//! shut down, or a vCPU hit an internal error: all three end with `vm shutdown`, `vm deleted`,
//! `vmm shutdown`. Worse, its event-monitor thread is not joined at exit, so the last records
//! can be lost. The driver therefore explains an exit from what it knows besides the exit
//! status, in this order:
//!
//! 1. the VMM's own log, where a vCPU failure leaves a `VCPU generated error` line (with its
//!    `Caused by:` chain) before the VMM starts shutting down: a failure;
//! 2. a `guest panic` event (pvpanic): a failure;
//! 3. evidence of an orderly exit — a `vmm shutdown` record, the VMM having removed its API
//!    socket, or its `Cloud Hypervisor exited successfully` log line — is a shutdown: asked for
//!    when the driver's quit marker file exists (written before `vmm.shutdown`), else the
//!    guest's own power-off;
//! 4. no evidence at all: the VMM was killed or crashed.

use crate::driver::VmmEvent;
use std::path::Path;

/// Longest event record kept while looking for its end.
pub const MAX_RECORD: usize = 64 * 1024;

/// One event-monitor record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ChEvent {
    /// Emitting component (`vmm`, `vm`, `guest`, `virtio-device`, ...).
    pub source: String,
    /// What happened (`booted`, `paused`, `shutdown`, ...).
    pub event: String,
    /// Extra key/value data.
    #[serde(default)]
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

impl ChEvent {
    /// Whether this is `source`/`event`.
    pub fn is(&self, source: &str, event: &str) -> bool {
        self.source == source && self.event == event
    }
}

/// Incremental splitter/decoder for the event-monitor stream.
#[derive(Debug, Default, Clone)]
pub struct EventParser {
    buf: Vec<u8>,
    overflow: bool,
}

impl EventParser {
    /// A parser at a record boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed bytes; returns the complete records among them (in order).
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<ChEvent> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' && self.buf.last() == Some(&b'\n') {
                if !self.overflow {
                    if let Ok(ev) = serde_json::from_slice::<ChEvent>(&self.buf) {
                        out.push(ev);
                    }
                }
                self.buf.clear();
                self.overflow = false;
                continue;
            }
            if self.overflow {
                // Keep only the last byte, to spot the separator.
                self.buf.clear();
                self.buf.push(b);
                continue;
            }
            self.buf.push(b);
            if self.buf.len() > MAX_RECORD {
                self.overflow = true;
                self.buf.clear();
                self.buf.push(b);
            }
        }
        out
    }
}

/// Read all records of an event file (missing file: none).
pub fn read_all(path: &Path) -> std::io::Result<Vec<ChEvent>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(EventParser::new().feed(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The first line of the VMM log that reports a vCPU failure, if any (bounded read of the
/// last 1 MiB).
pub fn vcpu_error_in_log(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(1 << 20);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut bytes = Vec::new();
    f.take(1 << 20).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines = text.lines();
    let first = lines.find(|l| l.contains("VCPU generated error") || l.contains("Error running vCPU"))?;
    // Log lines read "cloud-hypervisor: <time>: <thread> ERROR:<file>:<line> -- <message>".
    let mut msg = first
        .split_once(" -- ")
        .map_or(first, |(_, m)| m)
        .trim()
        .to_string();
    // An error chain follows as "Caused by:" and indented causes, then a backtrace.
    let mut causes = lines
        .skip_while(|l| l.trim() != "Caused by:")
        .skip(1)
        .take_while(|l| l.starts_with(' ') && !l.trim().is_empty())
        .map(str::trim)
        .filter(|l| !l.starts_with("Stack backtrace"))
        .take(4)
        .peekable();
    if causes.peek().is_some() {
        msg.push_str(": ");
        msg.push_str(&causes.collect::<Vec<_>>().join(": "));
    }
    Some(msg.chars().take(300).collect())
}

/// Map a record to a lifecycle event, given how a `vmm shutdown` should be explained.
pub fn map_event(ev: &ChEvent, explain_exit: impl FnOnce() -> VmmEvent) -> Option<VmmEvent> {
    match (ev.source.as_str(), ev.event.as_str()) {
        ("vm", "paused") => Some(VmmEvent::Paused),
        ("vm", "resumed") => Some(VmmEvent::Resumed),
        ("guest", "panic") => Some(VmmEvent::Error {
            reason: "guest panicked".into(),
        }),
        ("vmm", "shutdown") => Some(explain_exit()),
        _ => None,
    }
}

/// Explain why the VMM shut down: `quit_requested` is whether the driver asked it to exit,
/// `vmm_log` its log file.
pub fn explain_shutdown(quit_requested: bool, vmm_log: &Path) -> VmmEvent {
    if let Some(line) = vcpu_error_in_log(vmm_log) {
        return VmmEvent::Error {
            reason: format!("vcpu failed: {line}"),
        };
    }
    if quit_requested {
        VmmEvent::Shutdown {
            guest: false,
            reason: "vmm shutdown requested".into(),
        }
    } else {
        VmmEvent::Shutdown {
            guest: true,
            reason: "guest powered off".into(),
        }
    }
}

/// Whether the VMM log ends with Cloud Hypervisor's orderly-exit line (logged at info level).
pub fn clean_exit_in_log(log: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log) else {
        return false;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(4096))).is_err() {
        return false;
    }
    let mut tail = Vec::new();
    if f.take(4096).read_to_end(&mut tail).is_err() {
        return false;
    }
    String::from_utf8_lossy(&tail).contains("Cloud Hypervisor exited successfully")
}

/// Why a VMM that is no longer running went away (see the module docs for the order of
/// evidence). `orderly_exit` is evidence from outside the event file (API socket removed,
/// orderly-exit log line).
pub fn exit_reason(events: &[ChEvent], quit_requested: bool, vmm_log: &Path, orderly_exit: bool) -> VmmEvent {
    if let Some(line) = vcpu_error_in_log(vmm_log) {
        return VmmEvent::Error {
            reason: format!("vcpu failed: {line}"),
        };
    }
    if events.iter().any(|e| e.is("guest", "panic")) {
        return VmmEvent::Error {
            reason: "guest panicked".into(),
        };
    }
    if orderly_exit || events.iter().any(|e| e.is("vmm", "shutdown")) {
        explain_shutdown(quit_requested, vmm_log)
    } else {
        VmmEvent::Error {
            reason: "exited without shutting down (killed or crashed)".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE: &str = "{\n  \"timestamp\": {\n    \"secs\": 0,\n    \"nanos\": 5\n  },\n  \"source\": \"vm\",\n  \"event\": \"paused\",\n  \"properties\": null\n}\n\n{\n  \"timestamp\": {\n    \"secs\": 1,\n    \"nanos\": 0\n  },\n  \"source\": \"virtio-device\",\n  \"event\": \"activated\",\n  \"properties\": {\n    \"id\": \"_disk0\"\n  }\n}\n\n";

    #[test]
    fn parses_pretty_records() {
        let evs = EventParser::new().feed(SAMPLE.as_bytes());
        assert_eq!(evs.len(), 2);
        assert!(evs[0].is("vm", "paused"));
        assert_eq!(
            evs[1]
                .properties
                .as_ref()
                .and_then(|p| p.get("id"))
                .map(String::as_str),
            Some("_disk0")
        );
        assert_eq!(map_event(&evs[0], || unreachable!()), Some(VmmEvent::Paused));
        assert_eq!(map_event(&evs[1], || unreachable!()), None);
    }

    #[test]
    fn exit_explanations() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("ch.log");
        let shut = ChEvent {
            source: "vmm".into(),
            event: "shutdown".into(),
            properties: None,
        };
        assert!(matches!(
            exit_reason(&[], false, &log, false),
            VmmEvent::Error { .. }
        ));
        // the final records can be lost: other evidence of an orderly exit counts too
        assert!(matches!(
            exit_reason(&[], true, &log, true),
            VmmEvent::Shutdown { guest: false, .. }
        ));
        assert!(matches!(
            exit_reason(std::slice::from_ref(&shut), true, &log, false),
            VmmEvent::Shutdown { guest: false, .. }
        ));
        assert!(matches!(
            exit_reason(std::slice::from_ref(&shut), false, &log, false),
            VmmEvent::Shutdown { guest: true, .. }
        ));
        assert!(!clean_exit_in_log(&log));
        std::fs::write(&log, "cloud-hypervisor: 2.5s: <main> INFO:cloud-hypervisor/src/main.rs:1011 -- Cloud Hypervisor exited successfully\n")
            .expect("write");
        assert!(clean_exit_in_log(&log));
        std::fs::write(
            &log,
            "cloud-hypervisor:  33.9s: <vcpu0> ERROR:vmm/src/cpu.rs:1487 -- VCPU generated error: VcpuRun(Failed to run vcpu\nCaused by:\n    Unexpected exit reason on vcpu run: InternalError\nStack backtrace:\n   0: <unknown>\n",
        )
        .expect("write");
        // a vcpu failure wins even without any records
        match exit_reason(&[], true, &log, true) {
            VmmEvent::Error { reason } => assert_eq!(
                reason,
                "vcpu failed: VCPU generated error: VcpuRun(Failed to run vcpu: Unexpected exit reason on vcpu run: InternalError"
            ),
            other => panic!("expected error, got {other:?}"),
        }
    }

    proptest! {
        #[test]
        fn split_anywhere(cut in 0usize..SAMPLE.len()) {
            let mut p = EventParser::new();
            let mut evs = p.feed(&SAMPLE.as_bytes()[..cut]);
            evs.extend(p.feed(&SAMPLE.as_bytes()[cut..]));
            prop_assert_eq!(evs.len(), 2);
        }

        #[test]
        fn garbage_is_bounded(data in proptest::collection::vec(any::<u8>(), 0..3000), big in 0usize..3) {
            let mut p = EventParser::new();
            let _ = p.feed(&data);
            let _ = p.feed(&vec![b'x'; big * MAX_RECORD]);
            prop_assert!(p.buf.len() <= MAX_RECORD + 1);
            let evs = p.feed(b"\n\n{\"source\":\"vm\",\"event\":\"resumed\"}\n\n");
            prop_assert!(evs.iter().any(|e| e.is("vm", "resumed")));
        }
    }
}
