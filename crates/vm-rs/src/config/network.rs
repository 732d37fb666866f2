//! Network attachments of a VM: the data a caller fills in and `config.json` stores. The
//! networking subsystem ([`crate::net`]) turns these into backend arguments, guest kernel
//! command-line fragments and host devices; the CLI forms (`--net`, `-p`) are parsed in
//! [`crate::net::spec`].
//!
//! Four kinds of attachment exist:
//!
//! | kind | root? | what the guest sees | reachable from the host |
//! |------|-------|---------------------|-------------------------|
//! | [`User`](NetworkAttachment::User) | no | QEMU's user-mode NAT, `10.0.2.15/24`, gateway `10.0.2.2`, DNS `10.0.2.3` | through published ports (QEMU `hostfwd`) |
//! | [`Tap`](NetworkAttachment::Tap) | yes | a point-to-point link to a TAP device on the host | at the guest address |
//! | [`Bridge`](NetworkAttachment::Bridge) | yes | a TAP enslaved to a host bridge, optional NAT to the outside | at the guest address; published ports via [`crate::net::PortForwarder`] |
//! | [`Switch`](NetworkAttachment::Switch) | no | a port on a vm-rs userspace switch shared with other VMs | no (VM to VM only) |

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A host port published to a guest port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// Host address to bind; `None` means `127.0.0.1` (published ports are local unless an
    /// address is given, like `-p 0.0.0.0:8080:80`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
    /// Host port.
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
    /// Protocol (default TCP).
    #[serde(default)]
    pub protocol: Protocol,
}

impl PortForward {
    /// A TCP forward from `127.0.0.1:host_port` to guest port `guest_port`.
    pub fn tcp(host_port: u16, guest_port: u16) -> Self {
        Self {
            host_ip: None,
            host_port,
            guest_port,
            protocol: Protocol::Tcp,
        }
    }

    /// The host address actually bound (`127.0.0.1` unless given).
    pub fn bind_ip(&self) -> IpAddr {
        self.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }
}

impl std::fmt::Display for PortForward {
    /// The CLI form, `HOST_IP:HOST_PORT:GUEST_PORT/PROTO` (as `vmrs ps` shows it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.bind_ip() {
            IpAddr::V6(ip) => write!(f, "[{ip}]")?,
            IpAddr::V4(ip) => write!(f, "{ip}")?,
        }
        write!(f, ":{}->{}/{}", self.host_port, self.guest_port, self.protocol)
    }
}

/// A MAC address. Serialized as `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Whether this is a group (multicast or broadcast) address: bit 0 of the first octet.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// Whether the locally-administered bit (bit 1 of the first octet) is set.
    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// The octets.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            o[0], o[1], o[2], o[3], o[4], o[5]
        )
    }
}

/// A string that is not a MAC address, IPv4 CIDR or guest address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}")]
pub struct AddrParseError {
    /// What was expected ("mac address", "ipv4 cidr", "guest address").
    pub what: &'static str,
    /// The rejected text.
    pub value: String,
}

impl std::str::FromStr for MacAddr {
    type Err = AddrParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || AddrParseError {
            what: "mac address",
            value: s.to_string(),
        };
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for slot in out.iter_mut() {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *slot = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An IPv4 address with a prefix length, `10.0.2.15/24`. Serialized as that string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0-32.
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// `addr/prefix_len`; `None` when the prefix is longer than 32.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Option<Self> {
        (prefix_len <= 32).then_some(Self { addr, prefix_len })
    }

    /// The netmask as a `u32` (host order).
    pub fn mask(&self) -> u32 {
        if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The same prefix with the host bits cleared.
    pub fn network_cidr(&self) -> Ipv4Cidr {
        Ipv4Cidr {
            addr: self.network(),
            prefix_len: self.prefix_len,
        }
    }

    /// Whether `ip` lies inside this prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// The broadcast address of the prefix.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = AddrParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || AddrParseError {
            what: "ipv4 cidr",
            value: s.to_string(),
        };
        let (a, p) = s.split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| err())?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let prefix_len: u8 = p.parse().map_err(|_| err())?;
        Ipv4Cidr::new(addr, prefix_len).ok_or_else(err)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How the guest gets its address on one NIC. Serialized as `"auto"`, `"dhcp"` or a CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GuestAddress {
    /// A static address vm-rs picks: `10.0.2.15/24` on user-mode networks, otherwise one
    /// derived from the VM name inside the network's subnet (see [`crate::net::derive_ip`]).
    #[default]
    Auto,
    /// The guest asks a DHCP server (QEMU's on user-mode networks; on bridges one must exist).
    Dhcp,
    /// This address.
    Static(Ipv4Cidr),
}

impl std::fmt::Display for GuestAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestAddress::Auto => f.write_str("auto"),
            GuestAddress::Dhcp => f.write_str("dhcp"),
            GuestAddress::Static(c) => c.fmt(f),
        }
    }
}

impl std::str::FromStr for GuestAddress {
    type Err = AddrParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" | "" => Ok(GuestAddress::Auto),
            "dhcp" => Ok(GuestAddress::Dhcp),
            other => other
                .parse()
                .map(GuestAddress::Static)
                .map_err(|_| AddrParseError {
                    what: "guest address",
                    value: s.to_string(),
                }),
        }
    }
}

impl Serialize for GuestAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GuestAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn is_auto(a: &GuestAddress) -> bool {
    *a == GuestAddress::Auto
}

/// The stack behind a user-mode NIC ([`NetworkAttachment::User`]).
///
/// Both give the guest the same network: `10.0.2.0/24` by default, the host's loopback at
/// `.2`, the host's resolver at `.3`, published ports forwarded to the guest address. They
/// differ in who runs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UserNat {
    /// The VMM's own where it has one (QEMU's slirp, VZ's NAT), else `slirp4netns`
    /// (Cloud Hypervisor, Firecracker). A started VM records which one it got.
    #[default]
    Auto,
    /// The VMM's own user-mode network.
    Vmm,
    /// A `slirp4netns` sidecar (root): the VMM runs in a network namespace of the VM's own
    /// whose TAP is bridged to the TAP `slirp4netns` serves; the sidecar runs sandboxed
    /// (`--enable-sandbox --enable-seccomp`, in a private mount namespace) and publishes the
    /// ports on the host. Works for every backend that takes TAP NICs.
    Slirp4netns,
}

impl UserNat {
    fn is_auto(&self) -> bool {
        *self == UserNat::Auto
    }

    /// As the CLI spells it (`via=`).
    pub fn as_str(self) -> &'static str {
        match self {
            UserNat::Auto => "auto",
            UserNat::Vmm => "vmm",
            UserNat::Slirp4netns => "slirp4netns",
        }
    }
}

impl std::str::FromStr for UserNat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(UserNat::Auto),
            "vmm" => Ok(UserNat::Vmm),
            "slirp4netns" => Ok(UserNat::Slirp4netns),
            other => Err(format!(
                "unknown user-mode stack {other:?} (expected auto, vmm or slirp4netns)"
            )),
        }
    }
}

/// How one guest NIC is connected. Stored in `config.json` with a `type` tag
/// (`"user"`, `"tap"`, `"bridge"`, `"switch"`); unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum NetworkAttachment {
    /// User-mode NAT inside the VMM (rootless): the guest reaches the outside through QEMU's
    /// slirp stack (host loopback at `10.0.2.2`), the host reaches the guest through
    /// published ports.
    User {
        /// Published ports (QEMU `hostfwd`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        port_forwards: Vec<PortForward>,
        /// Guest MAC; derived from the VM name when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<MacAddr>,
        /// Guest addressing (default: static `10.0.2.15/24`).
        #[serde(default, skip_serializing_if = "is_auto")]
        address: GuestAddress,
        /// Which stack does the NAT (default: the VMM's own where it has one, else
        /// `slirp4netns`).
        #[serde(default, skip_serializing_if = "UserNat::is_auto")]
        via: UserNat,
    },
    /// A TAP device on the host (root): a point-to-point link between host and guest.
    Tap {
        /// TAP name; default `vmrs` + a hash of the VM name and NIC index (created and deleted
        /// by vm-rs). An existing TAP not created by vm-rs is used as is and never deleted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ifname: Option<String>,
        /// Address given to the host side of the TAP (also the guest's gateway).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host_address: Option<Ipv4Cidr>,
        /// Guest addressing (default: the next address after `host_address`).
        #[serde(default, skip_serializing_if = "is_auto")]
        address: GuestAddress,
        /// DNS servers given to the guest.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        dns: Vec<Ipv4Addr>,
        /// Guest MAC; derived from the VM name when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<MacAddr>,
        /// Network namespace (a path like `/var/run/netns/NAME`) the TAP lives in; the VMM
        /// must then run in it too. Default: the caller's namespace.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<PathBuf>,
    },
    /// A TAP enslaved to a host bridge (root). vm-rs creates the bridge when it is missing
    /// (and deletes it with its last VM), gives it `gateway`, and masquerades the subnet when
    /// `nat` is set.
    Bridge {
        /// Bridge name (at most 15 bytes), e.g. `vmrsbr0`.
        bridge: String,
        /// Bridge address and subnet, e.g. `10.88.0.1/24`; the guest's gateway.
        gateway: Ipv4Cidr,
        /// Masquerade traffic from the subnet leaving through other interfaces (nftables).
        #[serde(default)]
        nat: bool,
        /// Guest addressing (default: derived from the VM name inside the subnet).
        #[serde(default, skip_serializing_if = "is_auto")]
        address: GuestAddress,
        /// DNS servers given to the guest.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        dns: Vec<Ipv4Addr>,
        /// Published ports, served by a [`crate::net::PortForwarder`] from the host to the
        /// guest address (TCP only).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        port_forwards: Vec<PortForward>,
        /// Guest MAC; derived from the VM name when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<MacAddr>,
        /// Network namespace path the bridge and TAP live in (see [`NetworkAttachment::Tap`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<PathBuf>,
    },
    /// A port on a vm-rs userspace switch network (rootless, VM to VM). VMs on the same
    /// `network` share one L2 segment; different networks are isolated.
    Switch {
        /// Switch network name (same rules as VM names).
        network: String,
        /// Subnet of the network used to derive addresses (default `10.213.0.0/16`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subnet: Option<Ipv4Cidr>,
        /// Guest addressing (default: derived from the VM name inside the subnet).
        #[serde(default, skip_serializing_if = "is_auto")]
        address: GuestAddress,
        /// Guest MAC; derived from the VM name when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<MacAddr>,
    },
}

impl NetworkAttachment {
    /// User-mode NAT with these published ports.
    pub fn user(port_forwards: Vec<PortForward>) -> Self {
        NetworkAttachment::User {
            port_forwards,
            mac: None,
            address: GuestAddress::Auto,
            via: UserNat::Auto,
        }
    }

    /// A port on switch network `network`.
    pub fn switch(network: impl Into<String>) -> Self {
        NetworkAttachment::Switch {
            network: network.into(),
            subnet: None,
            address: GuestAddress::Auto,
            mac: None,
        }
    }

    /// The kind as the CLI and `vmrs ps` name it.
    pub fn kind(&self) -> &'static str {
        match self {
            NetworkAttachment::User { .. } => "user",
            NetworkAttachment::Tap { .. } => "tap",
            NetworkAttachment::Bridge { .. } => "bridge",
            NetworkAttachment::Switch { .. } => "switch",
        }
    }

    /// Published ports of this attachment.
    pub fn port_forwards(&self) -> &[PortForward] {
        match self {
            NetworkAttachment::User { port_forwards, .. }
            | NetworkAttachment::Bridge { port_forwards, .. } => port_forwards,
            _ => &[],
        }
    }

    /// How the guest's address is given.
    pub fn address(&self) -> &GuestAddress {
        match self {
            NetworkAttachment::User { address, .. }
            | NetworkAttachment::Tap { address, .. }
            | NetworkAttachment::Bridge { address, .. }
            | NetworkAttachment::Switch { address, .. } => address,
        }
    }

    /// The MAC given in the configuration, if any.
    pub fn mac(&self) -> Option<MacAddr> {
        match self {
            NetworkAttachment::User { mac, .. }
            | NetworkAttachment::Tap { mac, .. }
            | NetworkAttachment::Bridge { mac, .. }
            | NetworkAttachment::Switch { mac, .. } => *mac,
        }
    }

    /// The network namespace host devices live in, if one is configured.
    pub fn netns(&self) -> Option<&std::path::Path> {
        match self {
            NetworkAttachment::Tap { netns, .. } | NetworkAttachment::Bridge { netns, .. } => {
                netns.as_deref()
            }
            _ => None,
        }
    }

    /// Whether the attachment needs host devices (and so root): TAP and bridge.
    pub fn needs_host_devices(&self) -> bool {
        matches!(
            self,
            NetworkAttachment::Tap { .. } | NetworkAttachment::Bridge { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let m: MacAddr = "52:54:00:AB:cd:0f".parse().expect("mac");
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert!(!m.is_multicast());
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(MacAddr::BROADCAST.is_multicast());
    }

    #[test]
    fn cidr_math() {
        let c: Ipv4Cidr = "10.88.0.1/24".parse().expect("cidr");
        assert_eq!(c.network(), Ipv4Addr::new(10, 88, 0, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 88, 0, 255));
        assert!(c.contains(Ipv4Addr::new(10, 88, 0, 77)));
        assert!(!c.contains(Ipv4Addr::new(10, 88, 1, 1)));
        assert!("10.0.0.1/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0.1".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0.1/+1".parse::<Ipv4Cidr>().is_err());
        let z: Ipv4Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(z.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }

    #[test]
    fn attachments_serialize_with_type_tag_and_reject_unknown_keys() {
        let a = NetworkAttachment::User {
            port_forwards: vec![PortForward::tcp(8080, 80)],
            mac: None,
            address: GuestAddress::Auto,
            via: crate::config::UserNat::Auto,
        };
        let j = serde_json::to_string(&a).expect("json");
        assert_eq!(
            j,
            r#"{"type":"user","port_forwards":[{"host_port":8080,"guest_port":80,"protocol":"tcp"}]}"#
        );
        let back: NetworkAttachment = serde_json::from_str(&j).expect("parse");
        assert_eq!(back, a);
        assert!(serde_json::from_str::<NetworkAttachment>(r#"{"type":"user","bogus":1}"#).is_err());
        let s: NetworkAttachment = serde_json::from_str(
            r#"{"type":"bridge","bridge":"vmrsbr0","gateway":"10.88.0.1/24","nat":true,"address":"dhcp"}"#,
        )
        .expect("bridge");
        assert!(matches!(
            s,
            NetworkAttachment::Bridge {
                nat: true,
                address: GuestAddress::Dhcp,
                ..
            }
        ));
        let sw: NetworkAttachment =
            serde_json::from_str(r#"{"type":"switch","network":"blue","address":"10.1.0.5/24"}"#)
                .expect("switch");
        assert_eq!(sw.kind(), "switch");
    }
}
