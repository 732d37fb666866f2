//! The CLI forms of network attachments and published ports.
//!
//! * `-p [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp]` — an IPv6 host address is written in
//!   brackets, `-p [::1]:8080:80`. Without an address the port is published on `127.0.0.1`.
//! * `--net SPEC`, where SPEC is `KIND[=VALUE][,KEY=VALUE|FLAG]...`:
//!   - `user[,ip=dhcp|A.B.C.D/P][,mac=M]` — user-mode NAT (the default);
//!   - `tap[=IFNAME][,host=A.B.C.D/P][,ip=..][,dns=A.B.C.D[+A.B.C.D]][,mac=M][,netns=PATH]`;
//!   - `bridge=NAME,gateway=A.B.C.D/P[,nat][,ip=..][,dns=..][,mac=M][,netns=PATH]`;
//!   - `switch=NETWORK[,subnet=A.B.C.D/P][,ip=..][,mac=M]`;
//!   - `none` — no NIC (parsed as `None`).
//!
//! Published ports attach to the first user-mode or bridge NIC ([`attach_port_forwards`]).

use super::NetError;
use crate::config::{GuestAddress, NetworkAttachment, PortForward, Protocol};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

fn port_err(spec: &str, reason: impl Into<String>) -> NetError {
    NetError::InvalidSpec {
        what: "port spec",
        spec: spec.to_string(),
        reason: reason.into(),
    }
}

fn net_err(spec: &str, reason: impl Into<String>) -> NetError {
    NetError::InvalidSpec {
        what: "network spec",
        spec: spec.to_string(),
        reason: reason.into(),
    }
}

fn parse_port(spec: &str, s: &str) -> Result<u16, NetError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(port_err(spec, format!("{s:?} is not a port number")));
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(port_err(spec, format!("{s:?} is not a port in 1-65535"))),
        Ok(p) => Ok(p),
    }
}

/// Parse `-p [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp]`.
pub fn parse_publish(spec: &str) -> Result<PortForward, NetError> {
    let (rest, protocol) = match spec.rsplit_once('/') {
        Some((r, "tcp")) => (r, Protocol::Tcp),
        Some((r, "udp")) => (r, Protocol::Udp),
        Some((_, p)) => return Err(port_err(spec, format!("unknown protocol {p:?}"))),
        None => (spec, Protocol::Tcp),
    };
    let (host_ip, ports) = if let Some(after) = rest.strip_prefix('[') {
        let (ip, ports) = after
            .split_once("]:")
            .ok_or_else(|| port_err(spec, "unterminated '[' in host address"))?;
        let ip: std::net::Ipv6Addr = ip
            .parse()
            .map_err(|_| port_err(spec, format!("{ip:?} is not an ipv6 address")))?;
        (Some(IpAddr::V6(ip)), ports)
    } else {
        match rest.matches(':').count() {
            1 => (None, rest),
            2 => {
                let (ip, ports) = rest
                    .split_once(':')
                    .ok_or_else(|| port_err(spec, "expected HOST_PORT:GUEST_PORT"))?;
                let ip: Ipv4Addr = ip
                    .parse()
                    .map_err(|_| port_err(spec, format!("{ip:?} is not an ipv4 address")))?;
                (Some(IpAddr::V4(ip)), ports)
            }
            _ => return Err(port_err(spec, "expected [HOST_IP:]HOST_PORT:GUEST_PORT")),
        }
    };
    let (h, g) = ports
        .split_once(':')
        .ok_or_else(|| port_err(spec, "expected HOST_PORT:GUEST_PORT"))?;
    Ok(PortForward {
        host_ip,
        host_port: parse_port(spec, h)?,
        guest_port: parse_port(spec, g)?,
        protocol,
    })
}

fn parse_value<T: std::str::FromStr>(spec: &str, key: &str, v: &str) -> Result<T, NetError> {
    v.parse()
        .map_err(|_| net_err(spec, format!("invalid value {v:?} for {key}")))
}

/// Parse a `--net` spec; `Ok(None)` for `none`.
pub fn parse_network(spec: &str) -> Result<Option<NetworkAttachment>, NetError> {
    let mut parts = spec.split(',');
    let head = parts.next().unwrap_or_default();
    let (kind, value) = match head.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (head, None),
    };
    let mut opts: Vec<(&str, Option<&str>)> = Vec::new();
    for p in parts {
        if p.is_empty() {
            return Err(net_err(spec, "empty option"));
        }
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        };
        if opts.iter().any(|(seen, _)| *seen == k) {
            return Err(net_err(spec, format!("option {k:?} given twice")));
        }
        opts.push((k, v));
    }
    let mut mac = None;
    let mut address = GuestAddress::Auto;
    let mut dns = Vec::new();
    let mut netns = None;
    let mut host = None;
    let mut gateway = None;
    let mut nat = false;
    let mut subnet = None;
    let mut via = crate::config::UserNat::Auto;
    let allowed: &[&str] = match kind {
        "none" => &[],
        "user" => &["ip", "mac", "via"],
        "tap" => &["host", "ip", "dns", "mac", "netns"],
        "bridge" => &["gateway", "nat", "ip", "dns", "mac", "netns"],
        "switch" => &["subnet", "ip", "mac"],
        other => {
            return Err(net_err(
                spec,
                format!("unknown network kind {other:?} (expected user, tap, bridge, switch or none)"),
            ))
        }
    };
    for (k, v) in opts {
        if !allowed.contains(&k) {
            return Err(net_err(spec, format!("option {k:?} does not apply to {kind}")));
        }
        let need = || {
            v.filter(|s| !s.is_empty())
                .ok_or_else(|| net_err(spec, format!("option {k:?} needs a value")))
        };
        match k {
            "nat" => {
                if v.is_some() {
                    return Err(net_err(spec, "nat takes no value"));
                }
                nat = true;
            }
            "ip" => address = parse_value(spec, k, need()?)?,
            "mac" => mac = Some(parse_value(spec, k, need()?)?),
            "host" => host = Some(parse_value(spec, k, need()?)?),
            "gateway" => gateway = Some(parse_value(spec, k, need()?)?),
            "subnet" => subnet = Some(parse_value(spec, k, need()?)?),
            "netns" => netns = Some(PathBuf::from(need()?)),
            "via" => via = need()?.parse().map_err(|e: String| net_err(spec, e))?,
            "dns" => {
                for d in need()?.split('+') {
                    dns.push(parse_value::<Ipv4Addr>(spec, k, d)?);
                }
            }
            _ => return Err(net_err(spec, format!("unknown option {k:?}"))),
        }
    }
    let value = value.filter(|v| !v.is_empty());
    let attachment = match kind {
        "none" => {
            if value.is_some() {
                return Err(net_err(spec, "none takes no value"));
            }
            return Ok(None);
        }
        "user" => {
            if value.is_some() {
                return Err(net_err(spec, "user takes no value"));
            }
            NetworkAttachment::User {
                port_forwards: Vec::new(),
                mac,
                address,
                via,
            }
        }
        "tap" => NetworkAttachment::Tap {
            ifname: value.map(str::to_string),
            host_address: host,
            address,
            dns,
            mac,
            netns,
        },
        "bridge" => NetworkAttachment::Bridge {
            bridge: value
                .ok_or_else(|| net_err(spec, "bridge needs a name: bridge=NAME"))?
                .to_string(),
            gateway: gateway.ok_or_else(|| net_err(spec, "bridge needs gateway=A.B.C.D/P"))?,
            nat,
            address,
            dns,
            port_forwards: Vec::new(),
            mac,
            netns,
        },
        _ => NetworkAttachment::Switch {
            network: value
                .ok_or_else(|| net_err(spec, "switch needs a network name: switch=NAME"))?
                .to_string(),
            subnet,
            address,
            mac,
        },
    };
    super::validate(std::slice::from_ref(&attachment))?;
    Ok(Some(attachment))
}

/// Add published ports to the first user-mode or bridge attachment. Fails when there is none
/// and `forwards` is not empty.
pub fn attach_port_forwards(
    attachments: &mut [NetworkAttachment],
    forwards: Vec<PortForward>,
) -> Result<(), NetError> {
    if forwards.is_empty() {
        return Ok(());
    }
    for a in attachments.iter_mut() {
        match a {
            NetworkAttachment::User { port_forwards, .. }
            | NetworkAttachment::Bridge { port_forwards, .. } => {
                port_forwards.extend(forwards);
                return super::validate(attachments);
            }
            _ => {}
        }
    }
    Err(NetError::InvalidSpec {
        what: "port spec",
        spec: forwards
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        reason: "published ports need a user-mode or bridge network".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_forms() {
        let p = parse_publish("8080:80").expect("p");
        assert_eq!(p, PortForward::tcp(8080, 80));
        let p = parse_publish("0.0.0.0:5353:53/udp").expect("p");
        assert_eq!(p.host_ip, Some("0.0.0.0".parse().expect("ip")));
        assert_eq!(p.protocol, Protocol::Udp);
        let p = parse_publish("[::1]:8443:443/tcp").expect("p");
        assert_eq!(p.host_ip, Some("::1".parse().expect("ip")));
        for bad in [
            "",
            "80",
            "a:80",
            "8080:80/sctp",
            "0:80",
            "65536:80",
            "1.2.3:80:80",
            "[::1:80:80",
            "1:2:3:4",
            "+80:80",
            "8080:",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn network_forms() {
        assert_eq!(parse_network("none").expect("none"), None);
        assert_eq!(
            parse_network("user").expect("user"),
            Some(NetworkAttachment::user(vec![]))
        );
        let b = parse_network("bridge=vmrsbr0,gateway=10.88.0.1/24,nat,dns=1.1.1.1+9.9.9.9")
            .expect("bridge")
            .expect("some");
        match b {
            NetworkAttachment::Bridge { nat, dns, .. } => {
                assert!(nat);
                assert_eq!(dns.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        let s = parse_network("switch=blue,ip=10.5.0.2/24")
            .expect("sw")
            .expect("some");
        assert_eq!(s.kind(), "switch");
        let t = parse_network("tap=tap7,host=10.77.0.1/30,netns=/var/run/netns/x")
            .expect("tap")
            .expect("some");
        assert_eq!(t.netns(), Some(std::path::Path::new("/var/run/netns/x")));
        for bad in [
            "bogus",
            "user=x",
            "bridge",
            "bridge=br0",
            "switch",
            "switch=.x",
            "user,nat",
            "tap,ip=1.2.3.4",
            "bridge=br0,gateway=10.0.0.1/24,nat=1",
            "user,mac=zz",
            "user,,mac=02:00:00:00:00:01",
            "user,ip=dhcp,ip=dhcp",
            "tap=way-too-long-name-x",
        ] {
            assert!(parse_network(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_attach_to_first_user_or_bridge() {
        let mut nets = vec![NetworkAttachment::switch("a"), NetworkAttachment::user(vec![])];
        attach_port_forwards(&mut nets, vec![PortForward::tcp(1, 2)]).expect("attach");
        assert_eq!(nets[1].port_forwards().len(), 1);
        let mut only_switch = vec![NetworkAttachment::switch("a")];
        assert!(attach_port_forwards(&mut only_switch, vec![PortForward::tcp(1, 2)]).is_err());
    }
}
