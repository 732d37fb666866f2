//! Why QEMU refused to start: its own words from the VMM log, classified.
//!
//! QEMU reports a bad command line, an unloadable kernel or an unusable host resource on
//! stderr (our `vmm.log`) and exits — sometimes before its QMP socket exists, sometimes just
//! after it accepted our connection (kernel loading happens after the monitors are set up, so
//! the QMP greeting is cut off by a connection reset). Either way the boot path waits for the
//! process to end and reports the log's last lines, never the broken socket.
//!
//! One refusal is singled out: `Could not set up host forwarding rule 'tcp:ADDR:PORT-...'`
//! (a published port of a user-mode network). QEMU does not say why; when binding that address
//! ourselves, after QEMU has exited, fails with "address in use", another program holds the
//! port and the error is [`DriverError::HostPortInUse`], a conflict naming the port.

use crate::config::Protocol;
use crate::driver::DriverError;
use crate::process::{ExitInfo, VmmProcess};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

/// How long a QEMU that broke its QMP connection during boot may take to exit.
pub const EXIT_GRACE: Duration = Duration::from_secs(3);

/// How many lines of the VMM log an error carries.
const LOG_LINES: usize = 5;

/// Wait up to `grace` for `process` to exit; its exit status when it did.
pub async fn exited_within(process: &mut VmmProcess, grace: Duration) -> Option<ExitInfo> {
    tokio::time::timeout(grace, process.wait())
        .await
        .ok()
        .map(|r| r.unwrap_or(ExitInfo::Unknown))
}

/// The error for a QEMU that exited during boot with `exit`, from what it wrote to `vmm_log`.
pub fn refusal(program: &Path, vmm_log: &Path, exit: ExitInfo) -> DriverError {
    let program = program.display().to_string();
    let tail = super::tail_lines(vmm_log, LOG_LINES);
    if let Some((protocol, addr)) = tail.lines().rev().find_map(hostfwd_failure) {
        if port_in_use(protocol, addr) {
            let vmm_message = tail
                .lines()
                .rev()
                .find(|l| hostfwd_failure(l).is_some())
                .map(vmm_words)
                .unwrap_or_default()
                .to_string();
            return DriverError::HostPortInUse {
                addr,
                protocol,
                program,
                vmm_message,
            };
        }
    }
    let detail = if tail.is_empty() {
        format!("{exit}, nothing in {}", vmm_log.display())
    } else {
        tail
    };
    DriverError::BootFailed { program, detail }
}

/// QEMU prefixes a message with its program name and the option it concerns
/// (`qemu-system-x86_64: -netdev user,...: Could not ...`); the words are after the last `": "`
/// that is followed by a capital letter or the end of the prefix list.
fn vmm_words(line: &str) -> &str {
    line.match_indices(": ")
        .map(|(i, _)| &line[i + 2..])
        .find(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
        .unwrap_or(line)
}

/// `Could not set up host forwarding rule 'tcp:127.0.0.1:8080-10.0.2.15:80'` → the host side.
fn hostfwd_failure(line: &str) -> Option<(Protocol, SocketAddr)> {
    const MARK: &str = "Could not set up host forwarding rule '";
    let rule = &line[line.find(MARK)? + MARK.len()..];
    let rule = &rule[..rule.find('\'')?];
    let (proto, rest) = rule.split_once(':')?;
    let protocol = match proto {
        "tcp" | "" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    // host side is `[ADDR]:PORT`, then `-GUEST`; an IPv6 address is in brackets
    let (host, _guest) = if let Some(v6) = rest.strip_prefix('[') {
        let close = v6.find(']')?;
        let port_and_guest = v6[close + 1..].strip_prefix(':')?;
        let (port, guest) = port_and_guest.split_once('-')?;
        ((v6[..close].parse::<IpAddr>().ok()?, port), guest)
    } else {
        let (host, guest) = rest.split_once('-')?;
        let (addr, port) = host.rsplit_once(':')?;
        let ip = if addr.is_empty() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            addr.parse().ok()?
        };
        ((ip, port), guest)
    };
    let port: u16 = host.1.parse().ok()?;
    Some((protocol, SocketAddr::new(host.0, port)))
}

/// Whether binding `addr` fails because something else holds it.
fn port_in_use(protocol: Protocol, addr: SocketAddr) -> bool {
    let r = match protocol {
        Protocol::Tcp => std::net::TcpListener::bind(addr).map(drop),
        Protocol::Udp => std::net::UdpSocket::bind(addr).map(drop),
    };
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "qemu-system-x86_64: -netdev user,id=net0,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:18080-10.0.2.15:80: Could not set up host forwarding rule 'tcp:127.0.0.1:18080-10.0.2.15:80'";

    #[test]
    fn hostfwd_rules_name_the_host_side() {
        assert_eq!(
            hostfwd_failure(LINE),
            Some((Protocol::Tcp, "127.0.0.1:18080".parse().expect("addr")))
        );
        assert_eq!(
            hostfwd_failure("x: Could not set up host forwarding rule 'udp::5353-:53'"),
            Some((Protocol::Udp, "0.0.0.0:5353".parse().expect("addr")))
        );
        assert_eq!(
            hostfwd_failure("x: Could not set up host forwarding rule 'tcp:[::1]:8080-:80'"),
            Some((Protocol::Tcp, "[::1]:8080".parse().expect("addr")))
        );
        for bad in [
            "qemu: invalid kernel header",
            "Could not set up host forwarding rule 'tcp:1.2.3.4:99999-:80'",
            "Could not set up host forwarding rule 'sctp::1-:2'",
            "Could not set up host forwarding rule 'tcp:[::1:80-:80'",
            "Could not set up host forwarding rule 'tcp:1.2.3.4:80",
            "Could not set up host forwarding rule '",
        ] {
            assert_eq!(hostfwd_failure(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_vmm_words_skip_the_option_prefix() {
        assert_eq!(
            vmm_words(LINE),
            "Could not set up host forwarding rule 'tcp:127.0.0.1:18080-10.0.2.15:80'"
        );
        assert_eq!(vmm_words("plain text"), "plain text");
    }

    #[test]
    fn a_held_port_is_in_use_and_a_free_one_is_not() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        assert!(port_in_use(Protocol::Tcp, addr));
        drop(held);
        assert!(!port_in_use(Protocol::Tcp, addr));
    }

    #[test]
    fn a_refusal_with_a_held_port_is_a_conflict() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("vmm.log");
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = held.local_addr().expect("addr").port();
        std::fs::write(
            &log,
            format!("qemu-system-x86_64: -netdev user,id=net0: Could not set up host forwarding rule 'tcp:127.0.0.1:{port}-10.0.2.15:80'\n"),
        )
        .expect("write");
        let e = refusal(Path::new("qemu"), &log, ExitInfo::Code(1));
        assert!(
            matches!(e, DriverError::HostPortInUse { addr, .. } if addr.port() == port),
            "{e}"
        );
        assert_eq!(e.kind(), crate::ErrorKind::Conflict);
        drop(held);
        let e = refusal(Path::new("qemu"), &log, ExitInfo::Code(1));
        assert!(matches!(e, DriverError::BootFailed { .. }), "{e}");
        std::fs::write(&log, "").expect("write");
        let e = refusal(Path::new("qemu"), &log, ExitInfo::Code(1));
        assert!(e.to_string().contains("exit status 1"), "{e}");
    }
}
