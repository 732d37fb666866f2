//! New addresses for a VM restored onto a TAP, bridge or switch network.
//!
//! A snapshot's guest has the MAC and IPv4 address of the VM that was saved. On a user-mode
//! network that is fine (each QEMU has its own NAT), but clones sharing a bridge or a switch
//! would be twins there. So before a restore starts anything, every NIC on such a network gets
//!
//! * a MAC of the new VM's own ([`crate::net::derive_mac`] of its name), unless the
//!   configuration pins one;
//! * an address: on a bridge or switch whose address was derived, the new name's
//!   ([`crate::net::derive_ip`]) or, when another VM of this data dir has (or would take) that
//!   one, the next free address of the subnet — written into the restored VM's configuration,
//!   so a later cold start keeps it; an address the configuration pins (and a plain TAP's,
//!   the one after its host address) is kept.
//!
//! A pinned MAC or address another VM of this data dir has is refused before anything is
//! created ([`SnapshotError::AddressInUse`]), as is a subnet with no free address. Addresses
//! that restores in flight picked are held in the manager until their configuration is on
//! disk, so clones started together never pick one twice (two processes restoring at the same
//! moment are not coordinated). Once the VMM runs, the guest agent applies them
//! ([`vmrs_proto::Message::SetAddresses`]): the new MAC (virtio-net passes it to the device
//! through its control queue), the new address, the default route again.

use super::{record, Inner, ManagerError, VmManager};
use crate::config::{GuestAddress, Ipv4Cidr, MacAddr, NetworkAttachment, VmConfig};
use crate::net::GuestIpConfig;
use crate::snapshot::SnapshotError;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

/// The restored VM's configuration with its new addresses, what the guest must be told, and
/// the claim on the addresses picked (released when dropped: by then the configuration is on
/// disk or the VM is gone).
pub(super) struct Readdressed {
    pub config: VmConfig,
    pub nics: Vec<vmrs_proto::NicAddress>,
    /// The new address of `eth0` when it is one of them (what the VM is ready at).
    pub ip: Option<Ipv4Addr>,
    _claim: Claim,
}

struct Claim {
    inner: Arc<Inner>,
    keys: Vec<(String, Ipv4Addr)>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut c) = self.inner.claimed.lock() {
            for k in &self.keys {
                c.remove(k);
            }
        }
    }
}

/// Which addresses can collide with which: one bridge (in one namespace), one switch network,
/// or the TAPs of one namespace. `None` for user-mode NICs (each VMM has its own NAT).
pub(super) fn address_key(a: &NetworkAttachment) -> Option<String> {
    let ns =
        |n: &Option<std::path::PathBuf>| n.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
    match a {
        NetworkAttachment::User { .. } => None,
        NetworkAttachment::Tap { netns, .. } => Some(format!("tap:{}", ns(netns))),
        NetworkAttachment::Bridge { bridge, netns, .. } => Some(format!("bridge:{}:{bridge}", ns(netns))),
        NetworkAttachment::Switch { network, .. } => Some(format!("switch:{network}")),
    }
}

/// Whether a NIC on this attachment keeps its address across clones because the configuration
/// fixes it (a pinned address, a plain TAP's address after its host address).
pub(super) fn pins_address(a: &NetworkAttachment) -> bool {
    match a {
        NetworkAttachment::User { .. } => false,
        NetworkAttachment::Tap { .. } => true,
        _ => !matches!(a.address(), GuestAddress::Auto),
    }
}

/// The first address of `subnet` from [`crate::net::derive_ip`]'s pick for `name` on that
/// isn't `avoid` or `taken`, going up through the subnet's host addresses (the network, the
/// first host — the gateway by convention — and the broadcast address are never picked).
pub(super) fn free_ip(
    subnet: Ipv4Cidr,
    name: &str,
    index: usize,
    avoid: Option<Ipv4Addr>,
    taken: impl Fn(Ipv4Addr) -> bool,
) -> Option<Ipv4Cidr> {
    let first = crate::net::derive_ip(subnet, name, index, avoid)?;
    let base = u32::from(subnet.network());
    let usable = (1u64 << (32 - u32::from(subnet.prefix_len))) - 3;
    let start = u64::from(u32::from(first.addr) - base - 2);
    (0..usable).find_map(|k| {
        let host = u32::try_from((start + k) % usable + 2).ok()?;
        let ip = Ipv4Addr::from(base | host);
        (Some(ip) != avoid && !taken(ip))
            .then(|| Ipv4Cidr::new(ip, subnet.prefix_len))
            .flatten()
    })
}

impl VmManager {
    /// Give restored VM `name` (configuration `config`, from snapshot `snapshot`) addresses
    /// of its own on TAP, bridge and switch networks (see the module docs).
    pub(super) fn readdress(
        &self,
        snapshot: &str,
        mut config: VmConfig,
        name: &str,
        dir: &Path,
    ) -> Result<Readdressed, ManagerError> {
        let targets: Vec<usize> = (0..config.networks.len())
            .filter(|&i| address_key(&config.networks[i]).is_some())
            .collect();
        let mut claim = Claim {
            inner: self.inner.clone(),
            keys: Vec::new(),
        };
        if targets.is_empty() {
            return Ok(Readdressed {
                config,
                nics: Vec::new(),
                ip: None,
                _claim: claim,
            });
        }
        let home = self.home().to_path_buf();
        let in_use = |what: String| {
            ManagerError::Snapshot(SnapshotError::AddressInUse {
                name: snapshot.to_string(),
                what,
            })
        };
        let net_err = |e: crate::net::NetError| ManagerError::Network {
            name: name.to_string(),
            source: e.into(),
        };
        // held while the other VMs are read and until the picks are claimed
        let mut claimed = self
            .inner
            .claimed
            .lock()
            .map_err(|_| in_use("the address claims are poisoned".into()))?;
        let mut addrs: HashMap<(String, Ipv4Addr), String> = HashMap::new();
        let mut macs: HashMap<MacAddr, String> = HashMap::new();
        for other in self.names()?.into_iter().filter(|n| n != name) {
            let d = self.vm_dir(&other);
            let Ok(c) = record::load_config(&d) else {
                continue;
            };
            let Ok(plans) = crate::net::plan(&other, &d, &home, &c.networks) else {
                continue;
            };
            for (a, p) in c.networks.iter().zip(plans) {
                let Some(key) = address_key(a) else {
                    continue;
                };
                if let GuestIpConfig::Static { address, .. } = p.guest {
                    addrs.entry((key, address.addr)).or_insert_with(|| other.clone());
                }
                macs.entry(p.mac).or_insert_with(|| other.clone());
            }
        }
        for (k, ip) in claimed.iter() {
            addrs
                .entry((k.clone(), *ip))
                .or_insert_with(|| "a vm being restored".to_string());
        }
        for &i in &targets {
            let a = &mut config.networks[i];
            let key = address_key(a).unwrap_or_default();
            if let Some(vm) = a.mac().and_then(|m| macs.get(&m)) {
                return Err(in_use(format!(
                    "network {i} of its configuration pins mac {}, which vm {vm:?} has",
                    a.mac().unwrap_or(MacAddr::BROADCAST)
                )));
            }
            let taken = |ip: Ipv4Addr| addrs.contains_key(&(key.clone(), ip));
            let picked = match a {
                NetworkAttachment::Bridge {
                    gateway,
                    address: address @ GuestAddress::Auto,
                    ..
                } => Some((
                    address,
                    free_ip(*gateway, name, i, Some(gateway.addr), taken),
                    *gateway,
                )),
                NetworkAttachment::Switch {
                    subnet,
                    address: address @ GuestAddress::Auto,
                    ..
                } => {
                    let s = subnet.unwrap_or(crate::net::DEFAULT_SWITCH_SUBNET);
                    Some((address, free_ip(s, name, i, None, taken), s))
                }
                _ => None,
            };
            if let Some((address, ip, subnet)) = picked {
                let ip =
                    ip.ok_or_else(|| in_use(format!("no free address left in {subnet} (network {i})")))?;
                *address = GuestAddress::Static(ip);
            }
        }
        let plans = crate::net::plan(name, dir, &home, &config.networks).map_err(net_err)?;
        let mut nics = Vec::new();
        let mut ip = None;
        for &i in &targets {
            let (a, p) = (&config.networks[i], &plans[i]);
            let key = address_key(a).unwrap_or_default();
            let GuestIpConfig::Static { address, gateway, .. } = &p.guest else {
                return Err(ManagerError::Snapshot(SnapshotError::Refused {
                    name: snapshot.to_string(),
                    reason: format!(
                        "network {i} takes its address by dhcp, which a restored guest does not ask again"
                    ),
                }));
            };
            if let Some(vm) = addrs.get(&(key.clone(), address.addr)) {
                return Err(in_use(format!(
                    "network {i} of its configuration fixes address {}, which vm {vm:?} has",
                    address.addr
                )));
            }
            let index = u8::try_from(i).map_err(|_| in_use(format!("network {i}: too many nics")))?;
            nics.push(vmrs_proto::NicAddress {
                index,
                mac: p.mac.0,
                address: address.addr.octets(),
                prefix_len: address.prefix_len,
                gateway: gateway.filter(|_| i == 0).map(|g| g.octets()),
            });
            if i == 0 {
                ip = Some(address.addr);
            }
            claimed.insert((key.clone(), address.addr));
            claim.keys.push((key, address.addr));
        }
        drop(claimed);
        Ok(Readdressed {
            config,
            nics,
            ip,
            _claim: claim,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_addresses_start_at_the_derived_one_and_skip_what_is_taken() {
        let subnet = Ipv4Cidr::new(Ipv4Addr::new(10, 9, 0, 1), 29).expect("cidr");
        let gw = Some(subnet.addr);
        let first = free_ip(subnet, "clone-1", 0, gw, |_| false).expect("free");
        assert_eq!(Some(first), crate::net::derive_ip(subnet, "clone-1", 0, gw));
        // everything but one address taken: that one, whatever the start
        let last = Ipv4Addr::new(10, 9, 0, 4);
        let only = free_ip(subnet, "clone-1", 0, gw, |ip| ip != last).expect("free");
        assert_eq!(only.addr, last);
        assert_eq!(only.prefix_len, 29);
        // never the network, the gateway, the broadcast address
        let mut seen = std::collections::HashSet::new();
        let mut taken = std::collections::HashSet::new();
        while let Some(c) = free_ip(subnet, "clone-2", 0, gw, |ip| taken.contains(&ip)) {
            assert!(seen.insert(c.addr), "{} picked twice", c.addr);
            assert!(![0u8, 1, 7].contains(&c.addr.octets()[3]), "{} picked", c.addr);
            taken.insert(c.addr);
        }
        assert_eq!(seen.len(), 5, "a /29 has 5 addresses after the gateway");
    }

    #[test]
    fn keys_separate_networks_and_namespaces() {
        let bridge = |b: &str, ns: Option<&str>| NetworkAttachment::Bridge {
            bridge: b.into(),
            gateway: Ipv4Cidr::new(Ipv4Addr::new(10, 1, 0, 1), 24).expect("cidr"),
            nat: false,
            address: GuestAddress::Auto,
            dns: Vec::new(),
            port_forwards: Vec::new(),
            mac: None,
            netns: ns.map(Into::into),
        };
        assert_ne!(address_key(&bridge("a", None)), address_key(&bridge("b", None)));
        assert_ne!(
            address_key(&bridge("a", None)),
            address_key(&bridge("a", Some("/run/netns/x")))
        );
        assert_eq!(address_key(&bridge("a", None)), address_key(&bridge("a", None)));
        assert_eq!(address_key(&NetworkAttachment::user(Vec::new())), None);
        assert!(address_key(&NetworkAttachment::switch("s")).is_some());
        assert!(!pins_address(&bridge("a", None)));
        assert!(!pins_address(&NetworkAttachment::switch("s")));
    }
}
