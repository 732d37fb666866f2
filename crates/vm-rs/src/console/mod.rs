//! The guest serial console: readiness detection, following the log, and capping it.
//!
//! The guest's serial console ends up in `serial.log` in the VM directory, written by a process
//! that outlives the managing one: for QEMU a small sidecar that caps the log's size
//! ([`capture`]), for Cloud Hypervisor the VMM itself. Readiness is the guest printing a line
//!
//! ```text
//! VMRS_READY <ip>
//! ```
//!
//! on the console. [`ReadinessParser`] finds that line in an arbitrary byte stream: input may
//! arrive in pieces of any size (a marker split across reads is found), may hold garbage or
//! invalid UTF-8, and a marker must end its line and start it, or follow a kernel timestamp
//! (`[    1.466664] VMRS_READY 10.0.2.15`): our guest init writes the marker as a kernel log
//! record, because a line written to the console's tty can be split by a kernel message
//! printed while it is being sent, and the kernel prints a record after its timestamp, possibly
//! behind the unfinished line of another program. Lines longer than [`MAX_LINE`] are skipped
//! without buffering them.
//!
//! [`LogFollower`] tails the log with inotify (no sleep-polling) and yields bytes as they are
//! appended; the manager feeds them to the parser.

pub mod capture;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The readiness marker the guest prints, followed by a space and its address.
pub const READY_MARKER: &str = "VMRS_READY";

/// The line a guest init prints, followed by a space and the reason, when the guest cannot come
/// up as asked (a shared directory that does not mount): it then powers off, and the VM is
/// failed with that reason ([`failure_message`]).
pub const FAILED_MARKER: &str = "VMRS_FAILED";

/// The reason of the last failure marker line in `serial` (a marker starts its line or
/// follows a kernel timestamp, as a readiness marker does).
pub fn failure_message(serial: &str) -> Option<String> {
    let prefix = format!("{FAILED_MARKER} ");
    let line = serial.lines().rev().find_map(|l| {
        let l = l.trim_end_matches('\r');
        marker_starts(l.as_bytes())
            .find_map(|at| l.get(at..).and_then(|rest| rest.strip_prefix(prefix.as_str())))
    })?;
    Some(line.trim().chars().take(300).collect())
}

/// Where a marker may start in `line`: at 0, and right after each kernel timestamp
/// (`[` spaces digits `.` digits `] `) in it.
fn marker_starts(line: &[u8]) -> impl Iterator<Item = usize> + '_ {
    std::iter::once(0).chain(
        line.iter()
            .enumerate()
            .filter(|(_, b)| **b == b'[')
            .filter_map(|(i, _)| timestamp_len(&line[i..]).map(|n| i + n)),
    )
}

/// Length of the kernel timestamp `[    1.466664] ` at the start of `s`, if there is one.
fn timestamp_len(s: &[u8]) -> Option<usize> {
    let inner = s.strip_prefix(b"[")?;
    let close = inner.iter().position(|b| *b == b']')?;
    let stamp = &inner[..close];
    let digits = stamp.iter().skip_while(|b| **b == b' ');
    let (mut int, mut dot, mut frac) = (0, 0, 0);
    for b in digits {
        match b {
            b'0'..=b'9' if dot == 0 => int += 1,
            b'0'..=b'9' => frac += 1,
            b'.' if dot == 0 => dot = 1,
            _ => return None,
        }
    }
    if int == 0 || dot == 0 || frac == 0 || inner.get(close + 1) != Some(&b' ') {
        return None;
    }
    Some(1 + close + 2)
}

/// Longest console line the parser buffers; longer lines are discarded (they cannot be a marker).
pub const MAX_LINE: usize = 256;

/// Incremental scanner for the readiness line.
#[derive(Debug, Default, Clone)]
pub struct ReadinessParser {
    line: Vec<u8>,
    /// The current line exceeded [`MAX_LINE`]; skip until the next newline.
    overflow: bool,
}

impl ReadinessParser {
    /// A parser at the start of a line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed bytes; returns the address from the first complete marker line among them.
    /// Later bytes after a marker are kept for subsequent calls.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<IpAddr> {
        let mut found = None;
        for &b in bytes {
            if b == b'\n' {
                if !self.overflow && found.is_none() {
                    found = parse_marker_line(&self.line);
                }
                self.line.clear();
                self.overflow = false;
            } else if !self.overflow {
                if self.line.len() >= MAX_LINE {
                    self.overflow = true;
                    self.line.clear();
                } else {
                    self.line.push(b);
                }
            }
        }
        found
    }
}

/// Parse one console line (without its `\n`) as a readiness marker: the marker starts the line
/// or follows a kernel timestamp in it, and its address ends the line.
pub fn parse_marker_line(line: &[u8]) -> Option<IpAddr> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    marker_starts(line).find_map(|at| parse_marker(&line[at..]))
}

fn parse_marker(line: &[u8]) -> Option<IpAddr> {
    let rest = line.strip_prefix(READY_MARKER.as_bytes())?;
    let rest = rest.strip_prefix(b" ")?;
    let text = std::str::from_utf8(rest).ok()?;
    let text = text.trim_end_matches([' ', '\r']);
    text.parse::<IpAddr>().ok()
}

/// Scan a whole log file for a marker (used when reattaching to a VM that may already be ready).
pub fn scan_log(path: &Path) -> std::io::Result<Option<IpAddr>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let mut p = ReadinessParser::new();
            Ok(p.feed(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Follows a growing file and yields appended bytes, woken by file events (inotify on Linux,
/// kqueue on macOS: [`crate::host::watch`]).
#[derive(Debug)]
pub struct LogFollower {
    path: PathBuf,
    file: tokio::fs::File,
    events: crate::host::watch::FileWatch,
}

impl LogFollower {
    /// Start following `path` from `offset` (0 = from the beginning). The file must exist.
    pub async fn open(path: &Path, offset: u64) -> std::io::Result<Self> {
        use tokio::io::AsyncSeekExt;
        let events = crate::host::watch::FileWatch::open(path)?;
        let mut file = tokio::fs::File::open(path).await?;
        file.seek(std::io::SeekFrom::Start(offset)).await?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            events,
        })
    }

    /// Path being followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Next chunk of appended bytes; waits (event-driven) until there is some. Returns `None`
    /// when the file is deleted.
    pub async fn next_chunk(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        use crate::host::watch::Change;
        use tokio::io::AsyncReadExt;
        loop {
            let n = self.file.read(buf).await?;
            if n > 0 {
                return Ok(Some(n));
            }
            match self.events.next().await? {
                Change::Deleted => return Ok(None),
                Change::Modified => continue,
            }
        }
    }
}

/// The last `n` non-empty lines of a log file, for error messages; reads at most the last
/// 64 KiB, so a huge console log costs nothing. Missing or unreadable files give `""`.
pub fn tail_lines(path: &std::path::Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const MAX: u64 = 64 * 1024;
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(MAX))).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(MAX).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn tail_lines_reads_only_the_end() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("log");
        let mut text = "x".repeat(200 * 1024);
        text.push_str("\nA\n\nB\nC\n");
        std::fs::write(&p, &text).expect("w");
        assert_eq!(tail_lines(&p, 2), "B\nC");
        assert_eq!(tail_lines(&dir.path().join("none"), 3), "");
    }

    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn failure_marker_starts_its_line() {
        assert_eq!(failure_message("boot\nall good\n"), None);
        assert_eq!(failure_message("echo VMRS_FAILED x\n"), None);
        assert_eq!(
            failure_message(
                "a\r\nVMRS_FAILED cannot mount share vmrs0 at /data: EIO\r\nvmrs-init: power off\r\n"
            )
            .as_deref(),
            Some("cannot mount share vmrs0 at /data: EIO")
        );
    }

    #[test]
    fn a_marker_printed_as_a_kernel_record_counts() {
        // what the guest init writes through /dev/kmsg looks like this on the console
        let mut p = ReadinessParser::new();
        assert_eq!(
            p.feed(b"[    1.466664] VMRS_READY 10.0.2.15\r\n"),
            Some(ip("10.0.2.15"))
        );
        // ... also behind the unfinished line of a program writing to the tty
        let mut p = ReadinessParser::new();
        assert_eq!(
            p.feed(b"vmrs-init: loading modu[    1.466664] VMRS_READY 10.0.2.15\r\nles\r\n"),
            Some(ip("10.0.2.15"))
        );
        // a large uptime, no padding
        let mut p = ReadinessParser::new();
        assert_eq!(
            p.feed(b"[123456.000001] VMRS_READY fd00::2\n"),
            Some(ip("fd00::2"))
        );
        assert_eq!(
            failure_message("[    2.1] VMRS_FAILED cannot mount share vmrs0\r\n").as_deref(),
            Some("cannot mount share vmrs0")
        );
        assert_eq!(failure_message("[    2.1] echo VMRS_FAILED x\n"), None);
    }

    #[test]
    fn the_split_line_this_machine_printed_is_not_a_marker() {
        // A tty line cut by a kernel message (seen here; why the marker is a kernel record now):
        // the address does not end its line, so it cannot be read, and nothing is guessed.
        let mut p = ReadinessParser::new();
        assert_eq!(
            p.feed(b"VMRS_READY 127.0.0.1[    1.562077] clocksource: tsc: mask: 0xffffffffffffffff\n"),
            None
        );
    }

    #[test]
    fn whole_marker() {
        let mut p = ReadinessParser::new();
        assert_eq!(p.feed(b"boot...\nVMRS_READY 10.0.2.15\n"), Some(ip("10.0.2.15")));
    }

    #[test]
    fn crlf_and_ipv6() {
        let mut p = ReadinessParser::new();
        assert_eq!(p.feed(b"VMRS_READY fd00::2\r\n"), Some(ip("fd00::2")));
    }

    #[test]
    fn partial_line_waits_for_newline() {
        let mut p = ReadinessParser::new();
        assert_eq!(p.feed(b"VMRS_READY 127.0.0.1"), None);
        assert_eq!(p.feed(b"\n"), Some(ip("127.0.0.1")));
    }

    #[test]
    fn marker_inside_line_does_not_count() {
        let mut p = ReadinessParser::new();
        assert_eq!(p.feed(b"echo VMRS_READY 1.2.3.4\n"), None);
        assert_eq!(p.feed(b"[    x.0] VMRS_READY 1.2.3.4\n"), None);
        assert_eq!(p.feed(b"[    1.] VMRS_READY 1.2.3.4\n"), None);
        assert_eq!(p.feed(b"[    1.0]VMRS_READY 1.2.3.4\n"), None);
        assert_eq!(p.feed(b"[] VMRS_READY 1.2.3.4\n"), None);
        assert_eq!(p.feed(b"[    1.0] x VMRS_READY 1.2.3.4\n"), None);
        assert_eq!(p.feed(b"VMRS_READY 1.2.3.4 extra\n"), None);
        assert_eq!(p.feed(b"VMRS_READY not-an-ip\n"), None);
        assert_eq!(p.feed(b"VMRS_READY\n"), None);
        assert_eq!(p.feed(b"VMRS_READYX 1.2.3.4\n"), None);
    }

    #[test]
    fn garbage_and_long_lines() {
        let mut p = ReadinessParser::new();
        assert_eq!(p.feed(&[0xff, 0xfe, 0x00, b'\n']), None);
        let mut long = vec![b'x'; 10 * MAX_LINE];
        long.extend_from_slice(b"VMRS_READY 9.9.9.9\n");
        assert_eq!(
            p.feed(&long),
            None,
            "marker at the end of an overlong line must not count"
        );
        assert_eq!(p.feed(b"VMRS_READY 9.9.9.9\n"), Some(ip("9.9.9.9")));
    }

    proptest! {
        #[test]
        fn split_anywhere_finds_marker(prefix in proptest::collection::vec(any::<u8>(), 0..300),
                                       a in 0u8..=255, b in 0u8..=255, cut in 0usize..400) {
            let addr = format!("10.{a}.{b}.7");
            let mut stream = prefix.clone();
            stream.push(b'\n');
            stream.extend_from_slice(format!("VMRS_READY {addr}\n").as_bytes());
            let cut = cut.min(stream.len());
            let mut p = ReadinessParser::new();
            let first = p.feed(&stream[..cut]);
            let second = p.feed(&stream[cut..]);
            prop_assert_eq!(first.or(second), Some(addr.parse::<IpAddr>().unwrap()));
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut p = ReadinessParser::new();
            let _ = p.feed(&data);
            prop_assert!(p.line.len() <= MAX_LINE);
        }

        #[test]
        fn chunking_does_not_change_result(data in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'V'), any::<u8>()], 0..500),
                                            chunk in 1usize..17) {
            let mut whole = ReadinessParser::new();
            let mut full = data.clone();
            full.extend_from_slice(b"\nVMRS_READY 1.1.1.1\n");
            let expected = whole.feed(&full);
            let mut p = ReadinessParser::new();
            let mut got = None;
            for c in full.chunks(chunk) {
                if let Some(x) = p.feed(c) { got.get_or_insert(x); }
            }
            prop_assert_eq!(got, expected);
        }
    }
}
