//! The serial log's cap with a real guest (issue 16, invariant 7): a guest writing far more
//! than the cap to its console leaves a log no larger than the cap plus the documented slack,
//! with the marker; readiness, `logs` and `exec` keep working, and once the VM stops the log
//! ends with the guest's last output (its power-off).

mod support;
use support::*;
use vm_rs::console::capture::{CAPPED_MARKER, MAX_SLACK, TAIL_MARKER};

const CAP: u64 = 64 << 10;
/// What the guest writes: 16 times the cap.
const FLOOD: u64 = 16 * CAP;

#[test]
fn a_guest_flooding_its_console_cannot_grow_the_log_past_its_cap() {
    let home = Home::new();
    home.vmrs()
        .args(["run", "-d", "--name", "flood", "--log-max", "64k"])
        .assert()
        .success();
    let log = home.0.path().join("vms/flood/serial.log");
    let flood = format!("yes vmrs-flood-line | head -c {FLOOD} > /dev/ttyS0; echo flooded");
    let out = home
        .vmrs()
        .args(["exec", "flood", "sh", "-c", &flood])
        .output()
        .expect("exec");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "flooded");
    let len = std::fs::metadata(&log).expect("log").len();
    assert!(
        len <= CAP + 512,
        "while running the log holds the head and a marker: {len}"
    );
    let logs = home.vmrs().args(["logs", "flood"]).output().expect("logs");
    let text = String::from_utf8_lossy(&logs.stdout).into_owned();
    assert!(text.contains("VMRS_READY 10.0.2.15"), "the boot log is kept");
    assert!(
        text.contains(CAPPED_MARKER),
        "marker: {}",
        &text[text.len().saturating_sub(300)..]
    );
    // still usable: exec answers, and a second flood does not grow the log either
    let out = home
        .vmrs()
        .args(["exec", "flood", "echo", "alive"])
        .output()
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alive", "{out:?}");
    home.vmrs()
        .args(["stop", "--timeout", "60", "flood"])
        .assert()
        .success();
    let bytes = std::fs::read(&log).expect("log");
    let text = String::from_utf8_lossy(&bytes);
    eprintln!(
        "guest wrote {FLOOD} bytes; log is {} bytes (cap {CAP})",
        bytes.len()
    );
    assert!(bytes.len() as u64 <= CAP + MAX_SLACK, "{}", bytes.len());
    assert_eq!(text.matches(CAPPED_MARKER).count(), 1);
    assert_eq!(text.matches(TAIL_MARKER).count(), 1);
    let tail = &text[text.find(TAIL_MARKER).expect("tail marker")..];
    assert!(tail.contains("vmrs-flood-line"), "the tail holds the flood's end");
    assert!(
        tail.contains("reboot: Power down"),
        "and the guest's power-off: {tail:.300}"
    );
    assert_eq!(row(&home.ps(), "flood")["state"], "stopped");
    let sock = home.0.path().join("vms/flood/serial.sock");
    assert!(!sock.exists(), "the sidecar finished and removed its socket");
}

#[test]
fn a_cap_too_small_for_a_boot_log_is_refused() {
    let home = Home::new();
    let out = home
        .vmrs()
        .args(["run", "-d", "--name", "tiny", "--log-max", "1k"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("serial log cap"),
        "{out:?}"
    );
    assert!(!home.0.path().join("vms/tiny").exists());
}
