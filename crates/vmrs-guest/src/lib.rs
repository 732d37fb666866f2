//! The library half of `vmrs-init`, the PID 1 of vm-rs guests (the boot sequence itself is the
//! `vmrs-init` binary, `main.rs`).
//!
//! * [`cmdline`] — the `vmrs.*` kernel command line parameters.
//! * [`dhcp`] — obtaining and applying a DHCP lease through busybox `udhcpc`.
//! * [`agent`] — the guest side of the host agent protocol (`vmrs-proto`).
//! * [`reaper`] — PID 1's zombie reaper, shared with the agent's exec.
//! * [`sys`] — thin wrappers over the system calls PID 1 needs.
//! * [`tty`] — pseudo-terminals for the agent's terminal execs.
//!
//! It is a library so the parsers of untrusted input (command line, DHCP lease text, agent
//! frames) can be fuzzed from the `fuzz/` crate; nothing here is a stable API.

pub mod agent;
pub mod cmdline;
pub mod dhcp;
pub mod reaper;
pub mod sys;
pub mod tty;

/// Print `vmrs-init: <msg>` on the console.
pub fn log(msg: &str) {
    sys::console(&format!("vmrs-init: {msg}"));
}
