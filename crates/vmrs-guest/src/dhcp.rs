//! DHCP for `vmrs.ip=dhcp`: busybox `udhcpc` obtains a lease on `eth0`, this module applies it.
//!
//! `udhcpc` reports a lease by running a script with the lease in its environment (`ip`,
//! `subnet`, `router`, `dns`). The script written here ([`SCRIPT`], fixed text, nothing
//! interpolated) only prints one line, `lease ip=.. subnet=.. router=.. dns=..`, on
//! `bound`/`renew`; [`parse_lease`] reads it back (untrusted text: every field is parsed,
//! anything malformed is dropped) and [`apply`] configures the interface with busybox `ip`;
//! the lease's name servers go to `/etc/resolv.conf` with the other `vmrs.dns` servers.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// Where the lease script is written.
pub const SCRIPT_PATH: &str = "/run/vmrs-udhcpc.sh";

/// The lease script given to `udhcpc -s`.
pub const SCRIPT: &str = "#!/bin/sh\ncase \"$1\" in bound|renew) echo \"lease ip=$ip subnet=$subnet router=$router dns=$dns\" ;; esac\nexit 0\n";

/// A DHCP lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Address.
    pub ip: Ipv4Addr,
    /// Prefix length from the subnet mask.
    pub prefix: u8,
    /// First router, if any.
    pub router: Option<Ipv4Addr>,
    /// Name servers.
    pub dns: Vec<Ipv4Addr>,
}

/// Prefix length of a contiguous netmask (`255.255.255.0` -> 24); `None` if not contiguous.
fn mask_to_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// Parse the script's output: the last `lease ...` line wins.
pub fn parse_lease(text: &str) -> Option<Lease> {
    let line = text.lines().rev().find(|l| l.starts_with("lease "))?;
    // values are space separated lists, so split on the known keys
    let mut fields: Vec<(&str, String)> = Vec::new();
    for word in line["lease ".len()..].split(' ') {
        match word.split_once('=') {
            Some((k, v)) if matches!(k, "ip" | "subnet" | "router" | "dns") => {
                fields.push((k, v.to_string()))
            }
            _ => {
                if let Some(last) = fields.last_mut() {
                    if !word.is_empty() {
                        last.1.push(' ');
                        last.1.push_str(word);
                    }
                }
            }
        }
    }
    let get = |k: &str| fields.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
    let ip: Ipv4Addr = get("ip")?.parse().ok()?;
    let prefix = get("subnet")
        .and_then(|s| s.parse().ok())
        .and_then(mask_to_prefix)
        .unwrap_or(24);
    let router = get("router")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok());
    let dns = get("dns")
        .map(|d| d.split_whitespace().filter_map(|a| a.parse().ok()).collect())
        .unwrap_or_default();
    Some(Lease {
        ip,
        prefix,
        router,
        dns,
    })
}

/// Ask for a lease on `ifname` (5 discovers, 2 s apart).
pub fn obtain(ifname: &str) -> Result<Lease, String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(SCRIPT_PATH, SCRIPT).map_err(|e| format!("writing {SCRIPT_PATH}: {e}"))?;
    std::fs::set_permissions(SCRIPT_PATH, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {SCRIPT_PATH}: {e}"))?;
    let _ = Command::new("/bin/ip")
        .args(["link", "set", ifname, "up"])
        .status();
    let out = Command::new("/bin/udhcpc")
        .args([
            "-i",
            ifname,
            "-f",
            "-q",
            "-n",
            "-t",
            "5",
            "-T",
            "2",
            "-s",
            SCRIPT_PATH,
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run udhcpc: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_lease(&text).ok_or_else(|| format!("no dhcp lease on {ifname} ({})", out.status))
}

/// Configure `ifname` with `lease`: address and default route.
pub fn apply(ifname: &str, lease: &Lease) -> Result<(), String> {
    let cidr = format!("{}/{}", lease.ip, lease.prefix);
    let run = |args: &[&str]| -> Result<(), String> {
        match Command::new("/bin/ip").args(args).stdin(Stdio::null()).status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("ip {}: {s}", args.join(" "))),
            Err(e) => Err(format!("cannot run ip: {e}")),
        }
    };
    run(&["addr", "add", &cidr, "dev", ifname])?;
    run(&["link", "set", ifname, "up"])?;
    if let Some(gw) = lease.router {
        run(&["route", "add", "default", "via", &gw.to_string()])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_slirp_lease() {
        let l = parse_lease(
            "udhcpc: started\nlease ip=10.0.2.15 subnet=255.255.255.0 router=10.0.2.2 dns=10.0.2.3 1.1.1.1\n",
        )
        .expect("lease");
        assert_eq!(l.ip, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(l.prefix, 24);
        assert_eq!(l.router, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(l.dns, vec![Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(1, 1, 1, 1)]);
    }

    #[test]
    fn tolerates_missing_and_garbage_fields() {
        let l = parse_lease("lease ip=192.168.1.9 subnet= router= dns=").expect("lease");
        assert_eq!((l.prefix, l.router, l.dns.len()), (24, None, 0));
        assert!(parse_lease("lease ip=not-an-ip subnet=255.0.0.0").is_none());
        assert!(parse_lease("nothing here").is_none());
        assert!(parse_lease("").is_none());
        let odd =
            parse_lease("lease ip=10.1.2.3 subnet=255.0.255.0 router=x dns=1.2.3.4 junk").expect("lease");
        assert_eq!(odd.prefix, 24, "non-contiguous mask falls back");
        assert_eq!(odd.router, None);
        assert_eq!(odd.dns, vec![Ipv4Addr::new(1, 2, 3, 4)]);
    }

    #[test]
    fn masks() {
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 240, 0)), Some(20));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(0, 0, 0, 0)), Some(0));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 0, 255, 0)), None);
    }
}
