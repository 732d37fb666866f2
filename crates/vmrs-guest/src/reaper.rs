//! Child bookkeeping for PID 1: every zombie in the guest is reaped by the main loop
//! ([`reap`]); processes started by the agent register first ([`spawn_registered`]) so their
//! exit status is handed to whoever waits for it instead of being thrown away.
//!
//! The registry lock is held across spawn + registration and across the reaping loop, so a
//! child cannot be reaped between being spawned and being registered.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, MutexGuard};

use crate::sys;

static CHILDREN: Mutex<Option<HashMap<libc::pid_t, Sender<libc::c_int>>>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<HashMap<libc::pid_t, Sender<libc::c_int>>>> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Spawn `cmd` and register it; the receiver gets its raw wait status when it is reaped.
pub fn spawn_registered(cmd: &mut Command) -> std::io::Result<(Child, Receiver<libc::c_int>)> {
    let mut guard = lock();
    let child = cmd.spawn()?;
    let (tx, rx) = channel();
    guard
        .get_or_insert_with(HashMap::new)
        .insert(child.id() as libc::pid_t, tx);
    Ok((child, rx))
}

/// Reap every exited child; registered ones get their status.
pub fn reap() {
    let mut guard = lock();
    while let sys::Reaped::Child(pid, status) = sys::reap_one() {
        if let Some(tx) = guard.as_mut().and_then(|m| m.remove(&pid)) {
            let _ = tx.send(status);
        }
    }
}
