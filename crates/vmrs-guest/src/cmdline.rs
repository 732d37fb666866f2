//! Parsing the `vmrs.*` parameters of the kernel command line (`/proc/cmdline`).
//!
//! | parameter            | meaning                                              |
//! |----------------------|------------------------------------------------------|
//! | `vmrs.ip=A.B.C.D/P`  | static address + prefix for `eth0` (IPv6 also works) |
//! | `vmrs.ip=dhcp`       | address, gateway and DNS from DHCP (see `dhcp`)      |
//! | `vmrs.gw=A.B.C.D`    | default gateway                                      |
//! | `vmrs.dns=A[,B...]`  | name servers written to `/etc/resolv.conf`           |
//! | `vmrs.ip.ethN=A.B.C.D/P` or `=dhcp` | the same for NIC `ethN` (N 1..=15; no gateway) |
//! | `vmrs.dns.ethN=A[,B...]` | name servers of that NIC (added after eth0's)    |
//! | `vmrs.hostname=NAME` | host name                                            |
//! | `vmrs.shell=1`       | start a shell on the console                         |
//! | `vmrs.root=/dev/vda` | mount this block device and switch root to it        |
//! | `vmrs.root=serial:S` | the same, for the virtio disk whose serial is `S`    |
//! | `vmrs.rootfstype=T`  | its filesystem type (default: try ext4, then erofs)  |
//! | `vmrs.rootflags=ro`  | mount it read-only                                   |
//! | `vmrs.mount=TAG:PATH[:ro]` | mount the virtio-fs share `TAG` at `PATH` (repeatable) |
//!
//! Invalid values are reported and ignored (the guest still boots); unknown `vmrs.*` keys too.
//! The exception is `vmrs.mount=`: the host asked for a share, so one that cannot be parsed is
//! a fatal problem ([`Config::fatal`]) and the boot fails rather than run without it. Its `TAG`
//! and `PATH` are percent-encoded (`%20` a space, `%3A` a colon, `%25` a percent sign).

use std::net::IpAddr;

/// The parsed `vmrs.*` configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// Address and prefix length for eth0.
    pub ip: Option<(IpAddr, u8)>,
    /// Default gateway.
    pub gw: Option<IpAddr>,
    /// Name servers.
    pub dns: Vec<IpAddr>,
    /// Host name.
    pub hostname: Option<String>,
    /// Start a console shell.
    pub shell: bool,
    /// Root block device to switch to.
    pub root: Option<String>,
    /// Its filesystem type.
    pub rootfstype: Option<String>,
    /// Mount the root read-only.
    pub root_ro: bool,
    /// Configure eth0 by DHCP (`vmrs.ip=dhcp`).
    pub dhcp: bool,
    /// virtio-fs shares to mount, in order.
    pub mounts: Vec<Mount>,
    /// NICs after eth0 (`vmrs.ip.ethN=`, `vmrs.dns.ethN=`), by index.
    pub nics: Vec<Nic>,
    /// Problems found while parsing (reported on the console).
    pub warnings: Vec<String>,
    /// Problems that must fail the boot (a share that was asked for but cannot be parsed).
    pub fatal: Vec<String>,
}

/// The addressing of one NIC after eth0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nic {
    /// `ethN`'s N (1..=15).
    pub index: u8,
    /// Static address and prefix length.
    pub ip: Option<(IpAddr, u8)>,
    /// Configure it by DHCP (no default route from it).
    pub dhcp: bool,
    /// Its name servers.
    pub dns: Vec<IpAddr>,
}

impl Config {
    fn nic(&mut self, index: u8) -> &mut Nic {
        let at = match self.nics.iter().position(|n| n.index == index) {
            Some(i) => i,
            None => {
                self.nics.push(Nic {
                    index,
                    ..Nic::default()
                });
                self.nics.sort_by_key(|n| n.index);
                self.nics.iter().position(|n| n.index == index).unwrap_or(0)
            }
        };
        &mut self.nics[at]
    }
}

/// `ethN` with N in 1..=15 (eth0 has the keys without a suffix).
fn nic_index(suffix: &str) -> Option<u8> {
    let n = suffix.strip_prefix("eth")?;
    if n.starts_with('0') || n.is_empty() || n.len() > 2 {
        return None;
    }
    n.parse().ok().filter(|i| (1..=15).contains(i))
}

fn parse_dns(value: &str, into: &mut Vec<IpAddr>, warnings: &mut Vec<String>) {
    for v in value.split(',').filter(|v| !v.is_empty()) {
        match v.parse() {
            Ok(a) => into.push(a),
            Err(_) => warnings.push(format!("ignoring invalid vmrs.dns entry {v}")),
        }
    }
}

/// One `vmrs.mount=` share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The virtio-fs tag.
    pub tag: String,
    /// Where to mount it: absolute, normalised, not `/`.
    pub path: String,
    /// Mount it read-only.
    pub read_only: bool,
}

/// Decode `%XX` escapes; `None` on a malformed escape or a result that is not UTF-8 or holds
/// a NUL.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let text = String::from_utf8(out).ok()?;
    (!text.contains('\0')).then_some(text)
}

/// Parse the value of `vmrs.mount=`.
pub fn parse_mount(value: &str) -> Option<Mount> {
    let mut parts = value.split(':');
    let tag = percent_decode(parts.next()?)?;
    let path = percent_decode(parts.next()?)?;
    let read_only = match parts.next() {
        None => false,
        Some("ro") => true,
        Some("rw") => false,
        Some(_) => return None,
    };
    if parts.next().is_some() || tag.is_empty() || tag.len() > 36 {
        return None;
    }
    let normal = path.starts_with('/')
        && path
            .split('/')
            .skip(1)
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !normal || path == "/" || path.chars().any(char::is_control) {
        return None;
    }
    Some(Mount { tag, path, read_only })
}

fn parse_cidr(v: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = v.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((addr, prefix))
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && !h.starts_with('-')
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Parse a kernel command line.
pub fn parse(cmdline: &str) -> Config {
    let mut cfg = Config::default();
    for word in cmdline.split_ascii_whitespace() {
        let Some(rest) = word.strip_prefix("vmrs.") else {
            continue;
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        match key {
            "ip" if value == "dhcp" => cfg.dhcp = true,
            "ip" => match parse_cidr(value) {
                Some(c) => cfg.ip = Some(c),
                None => cfg.warnings.push(format!("ignoring invalid vmrs.ip={value}")),
            },
            "gw" => match value.parse() {
                Ok(a) => cfg.gw = Some(a),
                Err(_) => cfg.warnings.push(format!("ignoring invalid vmrs.gw={value}")),
            },
            "dns" => parse_dns(value, &mut cfg.dns, &mut cfg.warnings),
            k if k.starts_with("ip.") || k.starts_with("dns.") => {
                let (what, suffix) = k.split_once('.').unwrap_or((k, ""));
                let Some(index) = nic_index(suffix) else {
                    cfg.warnings.push(format!("ignoring vmrs.{k}: no such interface"));
                    continue;
                };
                match what {
                    "ip" if value == "dhcp" => cfg.nic(index).dhcp = true,
                    "ip" => match parse_cidr(value) {
                        Some(c) => cfg.nic(index).ip = Some(c),
                        None => cfg.warnings.push(format!("ignoring invalid vmrs.{k}={value}")),
                    },
                    _ => {
                        let mut dns = Vec::new();
                        parse_dns(value, &mut dns, &mut cfg.warnings);
                        cfg.nic(index).dns.extend(dns);
                    }
                }
            }
            "hostname" => {
                if valid_hostname(value) {
                    cfg.hostname = Some(value.to_string());
                } else {
                    cfg.warnings
                        .push(format!("ignoring invalid vmrs.hostname={value}"));
                }
            }
            "shell" => cfg.shell = matches!(value, "" | "1" | "yes" | "true"),
            "root" => {
                let serial_ok = value.strip_prefix("serial:").is_some_and(|sn| {
                    !sn.is_empty()
                        && sn
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                });
                let path_ok = value.starts_with("/dev/") && !value.contains("..");
                if (serial_ok || path_ok) && value.len() < 128 {
                    cfg.root = Some(value.to_string());
                } else {
                    cfg.warnings.push(format!("ignoring invalid vmrs.root={value}"));
                }
            }
            "rootfstype" => {
                if !value.is_empty() && value.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    cfg.rootfstype = Some(value.to_string());
                } else {
                    cfg.warnings
                        .push(format!("ignoring invalid vmrs.rootfstype={value}"));
                }
            }
            "rootflags" => cfg.root_ro = value.split(',').any(|f| f == "ro"),
            "mount" => match parse_mount(value) {
                Some(m) => cfg.mounts.push(m),
                None => cfg.fatal.push(format!("invalid vmrs.mount={value}")),
            },
            _ => {}
        }
    }
    cfg
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn full_network_config() {
        let c = parse(
            "console=ttyS0 reboot=t panic=-1 vmrs.ip=10.0.2.15/24 vmrs.gw=10.0.2.2 \
             vmrs.dns=10.0.2.3,1.1.1.1 vmrs.hostname=web-1\n",
        );
        assert_eq!(c.ip, Some(("10.0.2.15".parse().unwrap(), 24)));
        assert_eq!(c.gw, Some("10.0.2.2".parse().unwrap()));
        assert_eq!(c.dns.len(), 2);
        assert_eq!(c.hostname.as_deref(), Some("web-1"));
        assert!(!c.shell);
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn further_nics() {
        let c = parse(
            "vmrs.ip=10.0.0.2/24 vmrs.ip.eth2=dhcp vmrs.ip.eth1=10.77.0.9/16 vmrs.dns.eth1=10.77.0.1 \
             vmrs.ip.eth0=1.2.3.4/8 vmrs.ip.eth16=1.1.1.1/8 vmrs.ip.eth01=1.1.1.1/8 vmrs.ip.wlan0=dhcp \
             vmrs.ip.eth3=1.1.1.1 vmrs.dns.eth1=bad",
        );
        assert_eq!(c.ip, Some(("10.0.0.2".parse().unwrap(), 24)));
        assert_eq!(
            c.nics,
            vec![
                Nic {
                    index: 1,
                    ip: Some(("10.77.0.9".parse().unwrap(), 16)),
                    dhcp: false,
                    dns: vec!["10.77.0.1".parse().unwrap()],
                },
                Nic {
                    index: 2,
                    ip: None,
                    dhcp: true,
                    dns: vec![],
                },
            ]
        );
        // eth0 by suffix, eth16, eth01, wlan0: no such interface; eth3 without a prefix; bad dns
        assert_eq!(c.warnings.len(), 6, "{:?}", c.warnings);
    }

    #[test]
    fn nothing_configured() {
        let c = parse("console=ttyS0 quiet");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn invalid_values_are_ignored_with_warnings() {
        let c = parse(
            "vmrs.ip=10.0.2.15 vmrs.ip=300.1.1.1/24 vmrs.ip=10.0.0.1/33 vmrs.gw=x \
             vmrs.dns=1.1.1.1,bad vmrs.hostname=-x vmrs.hostname=a;rm",
        );
        assert_eq!(c.ip, None);
        assert_eq!(c.gw, None);
        assert_eq!(c.dns, vec!["1.1.1.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.hostname, None);
        assert_eq!(c.warnings.len(), 7);
    }

    #[test]
    fn ipv6_and_shell() {
        let c = parse("vmrs.ip=fd00::2/64 vmrs.shell=1 vmrs.unknown=3");
        assert_eq!(c.ip, Some(("fd00::2".parse().unwrap(), 64)));
        assert!(c.shell);
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn root_options() {
        let c = parse("vmrs.root=/dev/vda vmrs.rootfstype=erofs vmrs.rootflags=ro");
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        assert_eq!(c.rootfstype.as_deref(), Some("erofs"));
        assert!(c.root_ro);
        let c = parse(
            "vmrs.root=vda vmrs.root=/dev/../etc vmrs.rootfstype=a/b vmrs.root=serial: vmrs.root=serial:a/b",
        );
        assert_eq!(c.root, None);
        assert_eq!(c.rootfstype, None);
        assert_eq!(c.warnings.len(), 5);
        let c = parse("vmrs.root=serial:vmrs-root");
        assert_eq!(c.root.as_deref(), Some("serial:vmrs-root"));
    }

    #[test]
    fn mounts() {
        let c = parse("vmrs.mount=vmrs0:/data vmrs.mount=t%3A1:/mnt/my%20dir%3Ax%25y:ro");
        assert_eq!(
            c.mounts,
            vec![
                Mount {
                    tag: "vmrs0".into(),
                    path: "/data".into(),
                    read_only: false
                },
                Mount {
                    tag: "t:1".into(),
                    path: "/mnt/my dir:x%y".into(),
                    read_only: true
                },
            ]
        );
        assert!(c.fatal.is_empty());
        for bad in [
            "vmrs.mount=",
            "vmrs.mount=t",
            "vmrs.mount=t:relative",
            "vmrs.mount=t:/",
            "vmrs.mount=t:/a/../etc",
            "vmrs.mount=t:/a/./b",
            "vmrs.mount=t:/a//b",
            "vmrs.mount=t:/a:rx",
            "vmrs.mount=t:/a:ro:x",
            "vmrs.mount=:/a",
            "vmrs.mount=t:/a%2",
            "vmrs.mount=t:/a%zz",
            "vmrs.mount=t:/a%00b",
            "vmrs.mount=t:/a%0Ab",
            "vmrs.mount=t:/a%FF",
        ] {
            let c = parse(bad);
            assert!(c.mounts.is_empty(), "{bad}");
            assert_eq!(c.fatal.len(), 1, "{bad}");
        }
    }

    #[test]
    fn last_value_wins() {
        let c = parse("vmrs.ip=10.0.0.1/8 vmrs.ip=10.0.0.2/16");
        assert_eq!(c.ip, Some(("10.0.0.2".parse().unwrap(), 16)));
    }
}
