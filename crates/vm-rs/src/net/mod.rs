//! Networking: everything between a VM's [`NetworkAttachment`]s and working packets.
//!
//! This module owns
//!
//! * **planning** — [`plan`] resolves each attachment into a [`NicPlan`]: the guest MAC
//!   ([`derive_mac`]: locally administered, derived from the VM name and NIC index unless
//!   given), the guest address ([`derive_ip`]), the host device or socket it uses ([`NicBackend`],
//!   which becomes a typed [`crate::devices::Nic`] each driver renders) and the guest kernel
//!   command line ([`NicPlan::guest_cmdline`]);
//! * **host devices** — [`host`]: TAP devices, bridges, addresses and NAT through netlink
//!   (nftables for the masquerade rule), optionally inside a network namespace ([`netns`]),
//!   created on start, removed on stop and reconciled after a crash;
//! * **the userspace switch** — [`switch`]: [`NetworkSwitch`], a learning L2 switch, served by
//!   a `vmrs-net switch` sidecar process per switch network ([`sidecar`]);
//! * **port forwarding** — [`PortForwarder`], a tokio TCP relay used for published ports of
//!   bridge networks (QEMU `hostfwd` covers user-mode networks);
//! * **CLI specs** — [`spec`]: `--net KIND[=VALUE][,k=v...]` and `-p [IP:]HOST:GUEST[/PROTO]`.
//!
//! ## Guest side
//!
//! The guest init reads its addressing from the kernel command line. For the first NIC
//! (`eth0`): `vmrs.ip=A.B.C.D/P` (or `vmrs.ip=dhcp`), `vmrs.gw=A.B.C.D`, `vmrs.dns=A.B.C.D[,..]`.
//! For further NICs the same keys carry the interface: `vmrs.ip.eth1=...`, `vmrs.dns.eth1=...`
//! (no gateway: the default route stays on `eth0`).
//!
//! ## QEMU wiring (microvm, virtio-mmio; rendered by `driver::qemu::args::nic_args`)
//!
//! | attachment | `-netdev` |
//! |------------|-----------|
//! | user   | `user,id=netN,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80` |
//! | tap, bridge | `tap,id=netN,ifname=vmrsXXXXXXXXXX,script=no,downscript=no` |
//! | switch | `dgram,id=netN,local.type=unix,local.path=<vm dir>/netN.sock,remote.type=unix,remote.path=<networks dir>/<net>/switch.sock` |
//!
//! each followed by `-device virtio-net-device,netdev=netN,mac=..`.

pub mod forward;
pub mod host;
pub mod netns;
pub mod sidecar;
pub mod slirp;
pub mod spec;
pub mod switch;

pub use forward::{ForwardError, ForwardStats, PortForwarder};
pub use host::{HostError, NetState};
pub use switch::{NetworkSwitch, PortCounters, SwitchConfig};

use crate::config::{GuestAddress, Ipv4Cidr, MacAddr, NetworkAttachment, PortForward, Protocol};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// Longest interface name Linux accepts (`IFNAMSIZ - 1`).
pub const MAX_IFNAME: usize = 15;
/// Longest Unix socket path (`sun_path` minus the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Prefix of every host interface vm-rs creates (TAPs `vmrs<hash>`; bridges it creates carry
/// an interface alias starting with [`host::ALIAS_PREFIX`] instead, since users name them).
pub const IFNAME_PREFIX: &str = "vmrs";
/// Default subnet of switch networks.
pub const DEFAULT_SWITCH_SUBNET: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(10, 213, 0, 0),
    prefix_len: 16,
};
/// QEMU user-mode defaults: network, gateway (host), DNS and the first DHCP address.
pub const USER_NET: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(10, 0, 2, 0),
    prefix_len: 24,
};

/// Errors turning attachments into a plan (bad specs and configurations).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A `--net` or `-p` specification could not be parsed.
    #[error("invalid {what} {spec:?}: {reason}")]
    InvalidSpec {
        /// "network spec" or "port spec".
        what: &'static str,
        /// The text given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// An interface, bridge or network name is not acceptable.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// "interface", "bridge", "network".
        what: &'static str,
        /// The name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// Two published ports use the same host address and port.
    #[error("host port {port}/{protocol} on {ip} is published twice")]
    DuplicatePort {
        /// Host address.
        ip: IpAddr,
        /// Host port.
        port: u16,
        /// Protocol.
        protocol: Protocol,
    },
    /// The attachment asks for something this kind of network cannot do.
    #[error("nic {index} ({kind}): {what} is not supported")]
    Unsupported {
        /// NIC index.
        index: usize,
        /// Attachment kind.
        kind: &'static str,
        /// The feature.
        what: String,
    },
    /// No guest address can be worked out.
    #[error("nic {index} ({kind}): {reason}")]
    Address {
        /// NIC index.
        index: usize,
        /// Attachment kind.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A Unix socket path would exceed the kernel's limit.
    #[error("socket path {} is longer than {MAX_SOCKET_PATH} bytes", path.display())]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
    },
}

impl NetError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            NetError::Unsupported { .. } => K::Unsupported,
            NetError::DuplicatePort { .. } => K::Conflict,
            NetError::InvalidSpec { .. }
            | NetError::InvalidName { .. }
            | NetError::Address { .. }
            | NetError::SocketPathTooLong { .. } => K::Invalid,
        }
    }
}

/// A locally administered unicast MAC derived from the VM name and NIC index. The same name
/// and index always give the same address, so a restarted VM keeps its DHCP lease and ARP
/// entries.
pub fn derive_mac(vm_name: &str, index: usize) -> MacAddr {
    let h = hash(&["mac", vm_name, &index.to_string()]);
    let mut m = [0u8; 6];
    m.copy_from_slice(&h[..6]);
    // locally administered (bit 1), unicast (bit 0 clear)
    m[0] = (m[0] & 0xfc) | 0x02;
    MacAddr(m)
}

/// An address inside `subnet` derived from `vm_name` (and `index`), avoiding the network
/// address, the broadcast address, the first host address (conventionally the gateway) and
/// `avoid`. `None` when the subnet has no room (prefix longer than 30).
pub fn derive_ip(subnet: Ipv4Cidr, vm_name: &str, index: usize, avoid: Option<Ipv4Addr>) -> Option<Ipv4Cidr> {
    if subnet.prefix_len > 30 {
        return None;
    }
    let host_bits = 32 - u32::from(subnet.prefix_len);
    let size: u64 = 1u64 << host_bits;
    // usable: 2 ..= size-2 (0 network, 1 gateway, size-1 broadcast)
    let usable = size - 3;
    let h = hash(&["ip", vm_name, &index.to_string()]);
    let mut n = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]) % usable;
    let base = u32::from(subnet.network());
    loop {
        let host = u32::try_from(n + 2).ok()?;
        let ip = Ipv4Addr::from(base | host);
        if Some(ip) != avoid {
            return Ipv4Cidr::new(ip, subnet.prefix_len);
        }
        n = (n + 1) % usable;
    }
}

/// Name of the TAP vm-rs creates for NIC `index` of `vm_name`: `vmrs` + 10 hex digits.
pub fn tap_name(vm_name: &str, index: usize) -> String {
    let h = hash(&["tap", vm_name, &index.to_string()]);
    format!("{IFNAME_PREFIX}{}", hex::encode(&h[..5]))
}

fn hash(parts: &[&str]) -> [u8; 32] {
    let mut d = Sha256::new();
    d.update(b"vm-rs/net");
    for p in parts {
        d.update([0u8]);
        d.update(p.as_bytes());
    }
    d.finalize().into()
}

/// Check an interface name: 1-15 bytes of `[A-Za-z0-9_.-]`, not `.`/`..`.
pub fn validate_ifname(what: &'static str, name: &str) -> Result<(), NetError> {
    let bad = |reason| NetError::InvalidName {
        what,
        name: name.to_string(),
        reason,
    };
    if name.is_empty() || name.len() > MAX_IFNAME {
        return Err(bad("must be 1 to 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(bad("reserved name"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(bad("only letters, digits, '_', '.' and '-' are allowed"));
    }
    Ok(())
}

/// Check a switch network name (same rules as VM names).
pub fn validate_network_name(name: &str) -> Result<(), NetError> {
    crate::config::validate_name(name).map_err(|_| NetError::InvalidName {
        what: "network",
        name: name.to_string(),
        reason: "1-63 characters of [A-Za-z0-9_.-], not starting with '-' or '.'",
    })
}

/// How the guest configures one NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum GuestIpConfig {
    /// Ask DHCP.
    Dhcp,
    /// Static address, optional gateway, DNS servers.
    Static {
        /// Address and prefix.
        address: Ipv4Cidr,
        /// Default gateway.
        #[serde(default)]
        gateway: Option<Ipv4Addr>,
        /// DNS servers.
        #[serde(default)]
        dns: Vec<Ipv4Addr>,
    },
}

impl GuestIpConfig {
    /// The static address, if any.
    pub fn address(&self) -> Option<Ipv4Cidr> {
        match self {
            GuestIpConfig::Static { address, .. } => Some(*address),
            GuestIpConfig::Dhcp => None,
        }
    }
}

/// The host side of one NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum NicBackend {
    /// QEMU user-mode NAT.
    User {
        /// Guest network.
        net: Ipv4Cidr,
        /// Host (gateway) address inside it.
        host: Ipv4Addr,
        /// DNS address inside it.
        dns: Ipv4Addr,
        /// Address published ports are forwarded to.
        guest: Ipv4Addr,
        /// Published ports.
        port_forwards: Vec<PortForward>,
    },
    /// A TAP device (possibly enslaved to a bridge).
    Tap {
        /// TAP name.
        ifname: String,
        /// Bridge it is attached to.
        #[serde(default)]
        bridge: Option<String>,
        /// A user-mode NIC served by `slirp4netns` ([`slirp`]): the TAP and the bridge live in
        /// the VM's own network namespace.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slirp: Option<slirp::SlirpNic>,
    },
    /// A port on a switch network.
    Switch {
        /// Network name.
        network: String,
        /// QEMU's own datagram socket.
        local: PathBuf,
        /// The switch's socket.
        remote: PathBuf,
    },
}

/// One NIC, resolved: everything needed to start the VMM and configure the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicPlan {
    /// Position (`eth<index>` in the guest, `net<index>` in QEMU).
    pub index: usize,
    /// Guest MAC.
    pub mac: MacAddr,
    /// Host side.
    pub backend: NicBackend,
    /// Guest addressing.
    pub guest: GuestIpConfig,
}

impl NicPlan {
    /// Kernel command-line words telling the guest init how to configure this NIC (see the
    /// module docs for the keys).
    pub fn guest_cmdline(&self) -> Vec<String> {
        let suffix = if self.index == 0 {
            String::new()
        } else {
            format!(".eth{}", self.index)
        };
        match &self.guest {
            GuestIpConfig::Dhcp => vec![format!("vmrs.ip{suffix}=dhcp")],
            GuestIpConfig::Static {
                address,
                gateway,
                dns,
            } => {
                let mut v = vec![format!("vmrs.ip{suffix}={address}")];
                if let (Some(gw), 0) = (gateway, self.index) {
                    v.push(format!("vmrs.gw={gw}"));
                }
                if !dns.is_empty() {
                    let list: Vec<String> = dns.iter().map(|d| d.to_string()).collect();
                    v.push(format!("vmrs.dns{suffix}={}", list.join(",")));
                }
                v
            }
        }
    }
}

/// Where host-wide networking state lives: `<data dir>/networks` (one directory per switch
/// network, holding its socket and sidecar record).
pub fn networks_dir(home: &Path) -> PathBuf {
    home.join("networks")
}

fn check_socket_path(path: &Path) -> Result<(), NetError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(NetError::SocketPathTooLong {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Check a VM's attachments: names, addresses, duplicate published ports, unsupported
/// combinations. [`plan`] calls this; the manager may call it earlier to fail fast.
pub fn validate(attachments: &[NetworkAttachment]) -> Result<(), NetError> {
    let mut seen = std::collections::HashSet::new();
    let mut slirp_nics = 0;
    for (index, a) in attachments.iter().enumerate() {
        for pf in a.port_forwards() {
            if !seen.insert((pf.bind_ip(), pf.host_port, pf.protocol)) {
                return Err(NetError::DuplicatePort {
                    ip: pf.bind_ip(),
                    port: pf.host_port,
                    protocol: pf.protocol,
                });
            }
            if pf.host_port == 0 || pf.guest_port == 0 {
                return Err(NetError::Unsupported {
                    index,
                    kind: a.kind(),
                    what: "port 0".into(),
                });
            }
        }
        if let Some(m) = a.mac() {
            if m.is_multicast() {
                return Err(NetError::Address {
                    index,
                    kind: a.kind(),
                    reason: format!("mac {m} is a multicast address"),
                });
            }
        }
        match a {
            NetworkAttachment::User {
                port_forwards, via, ..
            } => {
                if port_forwards.iter().any(|p| p.bind_ip().is_ipv6()) {
                    return Err(NetError::Unsupported {
                        index,
                        kind: a.kind(),
                        what: "publishing on an ipv6 host address".into(),
                    });
                }
                if *via == crate::config::UserNat::Slirp4netns {
                    slirp_nics += 1;
                    if slirp_nics > 1 {
                        return Err(NetError::Unsupported {
                            index,
                            kind: a.kind(),
                            what: "a second slirp4netns user-mode network".into(),
                        });
                    }
                    if let Some(host) = attachments.iter().position(NetworkAttachment::needs_host_devices) {
                        return Err(NetError::Unsupported {
                            index,
                            kind: a.kind(),
                            what: format!(
                                "slirp4netns beside a {} network (nic {host}): the vmm runs in the slirp4netns network's own namespace",
                                attachments[host].kind()
                            ),
                        });
                    }
                }
            }
            NetworkAttachment::Tap { ifname, .. } => {
                if let Some(n) = ifname {
                    validate_ifname("interface", n)?;
                }
            }
            NetworkAttachment::Bridge {
                bridge,
                gateway,
                port_forwards,
                ..
            } => {
                validate_ifname("bridge", bridge)?;
                if gateway.prefix_len > 30 || gateway.addr == gateway.network() {
                    return Err(NetError::Address {
                        index,
                        kind: a.kind(),
                        reason: format!("gateway {gateway} is not a host address of a /30 or larger subnet"),
                    });
                }
                if port_forwards.iter().any(|p| p.protocol == Protocol::Udp) {
                    return Err(NetError::Unsupported {
                        index,
                        kind: a.kind(),
                        what: "udp port publishing".into(),
                    });
                }
            }
            NetworkAttachment::Switch { network, .. } => validate_network_name(network)?,
        }
    }
    Ok(())
}

/// Resolve NIC `index` of `vm_name`. `vm_dir` holds the VM's sockets; `home` is the vm-rs
/// data dir (switch sockets live under [`networks_dir`]). Pure: creates nothing.
pub fn plan_nic(
    attachment: &NetworkAttachment,
    index: usize,
    vm_name: &str,
    vm_dir: &Path,
    home: &Path,
) -> Result<NicPlan, NetError> {
    let mac = attachment.mac().unwrap_or_else(|| derive_mac(vm_name, index));
    let kind = attachment.kind();
    let addr_err = |reason: String| NetError::Address { index, kind, reason };
    let (backend, guest) = match attachment {
        NetworkAttachment::User {
            port_forwards,
            address,
            via,
            ..
        } => {
            let (net, guest_addr) = match address {
                GuestAddress::Static(c) => {
                    if c.prefix_len > 28 {
                        return Err(addr_err(format!(
                            "user-mode network {c} is too small (at most /28)"
                        )));
                    }
                    (c.network_cidr(), c.addr)
                }
                _ => (USER_NET, Ipv4Addr::new(10, 0, 2, 15)),
            };
            let base = u32::from(net.network());
            let host = Ipv4Addr::from(base + 2);
            let dns = Ipv4Addr::from(base + 3);
            if guest_addr == host || guest_addr == dns || guest_addr == net.network() {
                return Err(addr_err(format!(
                    "{guest_addr} collides with the gateway or dns of {net}"
                )));
            }
            let guest = match address {
                GuestAddress::Dhcp => GuestIpConfig::Dhcp,
                _ => GuestIpConfig::Static {
                    address: Ipv4Cidr {
                        addr: guest_addr,
                        prefix_len: net.prefix_len,
                    },
                    gateway: Some(host),
                    dns: vec![dns],
                },
            };
            if *via == crate::config::UserNat::Slirp4netns {
                check_socket_path(&vm_dir.join(slirp::API_SOCKET))?;
            }
            let backend = match via {
                crate::config::UserNat::Slirp4netns => NicBackend::Tap {
                    ifname: tap_name(vm_name, index),
                    bridge: Some(slirp::BRIDGE.to_string()),
                    slirp: Some(slirp::SlirpNic {
                        net,
                        guest: guest_addr,
                        port_forwards: port_forwards.clone(),
                    }),
                },
                _ => NicBackend::User {
                    net,
                    host,
                    dns,
                    guest: guest_addr,
                    port_forwards: port_forwards.clone(),
                },
            };
            (backend, guest)
        }
        NetworkAttachment::Tap {
            ifname,
            host_address,
            address,
            dns,
            ..
        } => {
            let ifname = ifname.clone().unwrap_or_else(|| tap_name(vm_name, index));
            let guest = match (address, host_address) {
                (GuestAddress::Dhcp, _) => GuestIpConfig::Dhcp,
                (GuestAddress::Static(c), h) => GuestIpConfig::Static {
                    address: *c,
                    gateway: h.map(|h| h.addr),
                    dns: dns.clone(),
                },
                (GuestAddress::Auto, Some(h)) => {
                    let next = Ipv4Addr::from(u32::from(h.addr).wrapping_add(1));
                    if !h.contains(next) || next == h.broadcast() {
                        return Err(addr_err(format!(
                            "no room for a guest address after {h}; give one"
                        )));
                    }
                    GuestIpConfig::Static {
                        address: Ipv4Cidr {
                            addr: next,
                            prefix_len: h.prefix_len,
                        },
                        gateway: Some(h.addr),
                        dns: dns.clone(),
                    }
                }
                (GuestAddress::Auto, None) => {
                    return Err(addr_err(
                        "needs a host address (host=) or a guest address (ip=)".into(),
                    ))
                }
            };
            (
                NicBackend::Tap {
                    ifname,
                    bridge: None,
                    slirp: None,
                },
                guest,
            )
        }
        NetworkAttachment::Bridge {
            bridge,
            gateway,
            address,
            dns,
            ..
        } => {
            let guest = match address {
                GuestAddress::Dhcp => GuestIpConfig::Dhcp,
                GuestAddress::Static(c) => GuestIpConfig::Static {
                    address: *c,
                    gateway: Some(gateway.addr),
                    dns: dns.clone(),
                },
                GuestAddress::Auto => GuestIpConfig::Static {
                    address: derive_ip(*gateway, vm_name, index, Some(gateway.addr))
                        .ok_or_else(|| addr_err(format!("subnet {gateway} is too small")))?,
                    gateway: Some(gateway.addr),
                    dns: dns.clone(),
                },
            };
            (
                NicBackend::Tap {
                    ifname: tap_name(vm_name, index),
                    bridge: Some(bridge.clone()),
                    slirp: None,
                },
                guest,
            )
        }
        NetworkAttachment::Switch {
            network,
            subnet,
            address,
            ..
        } => {
            let subnet = subnet.unwrap_or(DEFAULT_SWITCH_SUBNET);
            let guest = match address {
                GuestAddress::Dhcp => GuestIpConfig::Dhcp,
                GuestAddress::Static(c) => GuestIpConfig::Static {
                    address: *c,
                    gateway: None,
                    dns: Vec::new(),
                },
                GuestAddress::Auto => GuestIpConfig::Static {
                    address: derive_ip(subnet, vm_name, index, None)
                        .ok_or_else(|| addr_err(format!("subnet {subnet} is too small")))?,
                    gateway: None,
                    dns: Vec::new(),
                },
            };
            let local = crate::vm_dir::VmDir::new(vm_dir).nic_socket(index);
            let remote = sidecar::switch_socket(&networks_dir(home), network);
            check_socket_path(&local)?;
            check_socket_path(&remote)?;
            (
                NicBackend::Switch {
                    network: network.clone(),
                    local,
                    remote,
                },
                guest,
            )
        }
    };
    Ok(NicPlan {
        index,
        mac,
        backend,
        guest,
    })
}

/// The network namespace the VMM must run in: the one of the VM's TAP/bridge attachments
/// (all of them use the same, see [`host::prepare`]).
pub fn vmm_netns(attachments: &[NetworkAttachment]) -> Option<&Path> {
    attachments
        .iter()
        .filter(|a| a.needs_host_devices())
        .find_map(|a| a.netns())
}

/// The attachments as a backend with `caps` runs them: a user-mode NIC left to
/// [`UserNat::Auto`](crate::config::UserNat::Auto) gets the VMM's own stack where the backend
/// has one, else `slirp4netns` ([`slirp`]) where it takes TAP NICs in a network namespace
/// (else it stays as it is, and the capability check refuses it).
pub fn resolve_user_nat(
    attachments: &[NetworkAttachment],
    caps: &crate::devices::Capabilities,
) -> Vec<NetworkAttachment> {
    use crate::config::UserNat;
    attachments
        .iter()
        .map(|a| match a {
            NetworkAttachment::User {
                port_forwards,
                mac,
                address,
                via: UserNat::Auto,
            } => NetworkAttachment::User {
                port_forwards: port_forwards.clone(),
                mac: *mac,
                address: *address,
                via: if caps.nic_user {
                    UserNat::Vmm
                } else if caps.nic_tap && caps.netns {
                    UserNat::Slirp4netns
                } else {
                    UserNat::Auto
                },
            },
            other => other.clone(),
        })
        .collect()
}

/// Whether any of the attachments is a user-mode NIC served by `slirp4netns`.
pub fn uses_slirp(attachments: &[NetworkAttachment]) -> bool {
    attachments.iter().any(|a| {
        matches!(
            a,
            NetworkAttachment::User {
                via: crate::config::UserNat::Slirp4netns,
                ..
            }
        )
    })
}

/// Resolve all NICs of a VM (after [`validate`]).
pub fn plan(
    vm_name: &str,
    vm_dir: &Path,
    home: &Path,
    attachments: &[NetworkAttachment],
) -> Result<Vec<NicPlan>, NetError> {
    validate(attachments)?;
    attachments
        .iter()
        .enumerate()
        .map(|(i, a)| plan_nic(a, i, vm_name, vm_dir, home))
        .collect()
}

/// The guest kernel command-line words for NIC `index` of `vm_name` (shorthand for
/// [`plan_nic`] + [`NicPlan::guest_cmdline`]).
pub fn guest_cmdline(
    attachment: &NetworkAttachment,
    index: usize,
    vm_name: &str,
    vm_dir: &Path,
    home: &Path,
) -> Result<Vec<String>, NetError> {
    Ok(plan_nic(attachment, index, vm_name, vm_dir, home)?.guest_cmdline())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_macs_are_stable_local_unicast_and_distinct() {
        let a = derive_mac("web-1", 0);
        assert_eq!(a, derive_mac("web-1", 0));
        assert!(a.is_local() && !a.is_multicast());
        assert_ne!(a, derive_mac("web-1", 1));
        assert_ne!(a, derive_mac("web-2", 0));
    }

    #[test]
    fn derived_ips_stay_inside_and_avoid_reserved() {
        for name in ["a", "b", "c", "d", "e", "f", "g", "h"] {
            let s: Ipv4Cidr = "10.88.0.1/30".parse().expect("cidr");
            let ip = derive_ip(s, name, 0, Some(s.addr)).expect("room");
            assert_eq!(ip.addr, Ipv4Addr::new(10, 88, 0, 2));
            let s: Ipv4Cidr = "10.88.0.1/24".parse().expect("cidr");
            let ip = derive_ip(s, name, 0, Some(s.addr)).expect("room");
            assert!(s.contains(ip.addr));
            assert_ne!(ip.addr, s.network());
            assert_ne!(ip.addr, s.broadcast());
            assert_ne!(ip.addr, s.addr);
        }
        assert!(derive_ip("10.0.0.0/31".parse().expect("cidr"), "a", 0, None).is_none());
    }

    #[test]
    fn tap_names_fit_ifnamsiz() {
        let n = tap_name("a-very-long-vm-name-that-goes-on-and-on", 3);
        assert!(n.len() <= MAX_IFNAME && n.starts_with(IFNAME_PREFIX));
        assert!(validate_ifname("interface", &n).is_ok());
        assert!(validate_ifname("interface", "sixteen-chars-xx").is_err());
        assert!(validate_ifname("interface", "a/b").is_err());
    }

    #[test]
    fn user_mode_args_and_cmdline() {
        let a = NetworkAttachment::user(vec![
            PortForward::tcp(8080, 80),
            PortForward {
                host_ip: Some("0.0.0.0".parse().expect("ip")),
                host_port: 5353,
                guest_port: 53,
                protocol: Protocol::Udp,
            },
        ]);
        let p = plan_nic(&a, 0, "vm", Path::new("/d/vms/vm"), Path::new("/d")).expect("plan");
        assert_eq!(p.mac, derive_mac("vm", 0));
        match &p.backend {
            NicBackend::User {
                net,
                host,
                dns,
                guest,
                port_forwards,
            } => {
                assert_eq!(net.network_cidr().to_string(), "10.0.2.0/24");
                assert_eq!(host.to_string(), "10.0.2.2");
                assert_eq!(dns.to_string(), "10.0.2.3");
                assert_eq!(guest.to_string(), "10.0.2.15");
                assert_eq!(port_forwards.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p.guest_cmdline(),
            vec!["vmrs.ip=10.0.2.15/24", "vmrs.gw=10.0.2.2", "vmrs.dns=10.0.2.3"]
        );
        // slirp4netns: a TAP on the namespace's bridge, the same guest addressing as QEMU's
        let slirp = NetworkAttachment::User {
            port_forwards: vec![PortForward::tcp(8080, 80)],
            mac: None,
            address: GuestAddress::Auto,
            via: crate::config::UserNat::Slirp4netns,
        };
        let p = plan_nic(&slirp, 0, "vm", Path::new("/d/vms/vm"), Path::new("/d")).expect("plan");
        match &p.backend {
            NicBackend::Tap {
                ifname,
                bridge: Some(b),
                slirp: Some(s),
            } => {
                assert_eq!(ifname, &tap_name("vm", 0));
                assert_eq!(b, slirp::BRIDGE);
                assert_eq!(s.guest, Ipv4Addr::new(10, 0, 2, 15));
                assert_eq!(s.port_forwards, vec![PortForward::tcp(8080, 80)]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p.guest_cmdline(),
            vec!["vmrs.ip=10.0.2.15/24", "vmrs.gw=10.0.2.2", "vmrs.dns=10.0.2.3"]
        );
        let deep = Path::new("/d").join("x".repeat(100));
        assert!(matches!(
            plan_nic(&slirp, 0, "vm", &deep, Path::new("/d")),
            Err(NetError::SocketPathTooLong { .. })
        ));
        // one slirp4netns NIC per VM, and none beside host TAPs (the VMM has one namespace)
        assert!(validate(&[slirp.clone(), slirp.clone()]).is_err());
        let tap = NetworkAttachment::Tap {
            ifname: None,
            host_address: Some("10.9.0.1/30".parse().expect("cidr")),
            address: GuestAddress::Auto,
            dns: vec![],
            mac: None,
            netns: None,
        };
        assert!(validate(&[slirp.clone(), tap]).is_err());
        assert!(validate(&[slirp.clone(), NetworkAttachment::switch("lab")]).is_ok());
        // auto: the VMM's own where the backend has one, else slirp4netns
        let auto = NetworkAttachment::user(vec![]);
        let qemu = crate::driver::VmDriver::capabilities(&crate::driver::qemu::QemuDriver::new());
        assert!(matches!(
            resolve_user_nat(std::slice::from_ref(&auto), &qemu).as_slice(),
            [NetworkAttachment::User {
                via: crate::config::UserNat::Vmm,
                ..
            }]
        ));
        let mut no_user = qemu.clone();
        no_user.nic_user = false;
        assert!(matches!(
            resolve_user_nat(std::slice::from_ref(&auto), &no_user).as_slice(),
            [NetworkAttachment::User {
                via: crate::config::UserNat::Slirp4netns,
                ..
            }]
        ));
        no_user.netns = false;
        assert!(matches!(
            resolve_user_nat(std::slice::from_ref(&auto), &no_user).as_slice(),
            [NetworkAttachment::User {
                via: crate::config::UserNat::Auto,
                ..
            }]
        ));
        let dhcp = NetworkAttachment::User {
            port_forwards: vec![],
            mac: None,
            address: GuestAddress::Dhcp,
            via: crate::config::UserNat::Auto,
        };
        let p = plan_nic(&dhcp, 1, "vm", Path::new("/d/vms/vm"), Path::new("/d")).expect("plan");
        assert_eq!(p.guest_cmdline(), vec!["vmrs.ip.eth1=dhcp"]);
    }

    #[test]
    fn switch_and_bridge_plans() {
        let sw = NetworkAttachment::switch("blue");
        let p = plan_nic(&sw, 0, "vm", Path::new("/d/vms/vm"), Path::new("/d")).expect("plan");
        assert_eq!(
            p.backend,
            NicBackend::Switch {
                network: "blue".into(),
                local: "/d/vms/vm/net0.sock".into(),
                remote: "/d/networks/blue/switch.sock".into(),
            }
        );
        let ip = p.guest.address().expect("static");
        assert!(DEFAULT_SWITCH_SUBNET.contains(ip.addr));
        let br = NetworkAttachment::Bridge {
            bridge: "vmrsbr0".into(),
            gateway: "10.88.0.1/24".parse().expect("cidr"),
            nat: true,
            address: GuestAddress::Auto,
            dns: vec![],
            port_forwards: vec![],
            mac: None,
            netns: None,
        };
        let p = plan_nic(&br, 0, "vm", Path::new("/d/vms/vm"), Path::new("/d")).expect("plan");
        assert!(
            matches!(&p.backend, NicBackend::Tap { ifname, bridge: Some(b), .. } if *ifname == tap_name("vm", 0) && b == "vmrsbr0"),
            "{:?}",
            p.backend
        );
        let cl = p.guest_cmdline();
        assert!(cl[0].starts_with("vmrs.ip=10.88.0."));
        assert_eq!(cl[1], "vmrs.gw=10.88.0.1");
        let long = Path::new("/d").join("x".repeat(120));
        assert!(matches!(
            plan_nic(&sw, 0, "vm", &long, Path::new("/d")),
            Err(NetError::SocketPathTooLong { .. })
        ));
    }

    #[test]
    fn validation_rejects_bad_combinations() {
        let dup = vec![
            NetworkAttachment::user(vec![PortForward::tcp(8080, 80)]),
            NetworkAttachment::user(vec![PortForward::tcp(8080, 81)]),
        ];
        assert!(matches!(validate(&dup), Err(NetError::DuplicatePort { .. })));
        assert!(validate(&[NetworkAttachment::switch("-bad")]).is_err());
        let tap = NetworkAttachment::Tap {
            ifname: None,
            host_address: None,
            address: GuestAddress::Auto,
            dns: vec![],
            mac: None,
            netns: None,
        };
        assert!(matches!(
            plan("vm", Path::new("/d/vms/vm"), Path::new("/d"), &[tap]),
            Err(NetError::Address { .. })
        ));
    }
}
