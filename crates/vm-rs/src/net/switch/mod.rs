//! The userspace L2 switch: [`NetworkSwitch`] (the forwarding logic, no I/O) and
//! [`server`] (the socket loop the `vmrs-net switch` sidecar runs).
//!
//! ## Forwarding
//!
//! A [`NetworkSwitch`] is a learning Ethernet switch whose ports each belong to one *network*;
//! frames never cross networks (each network has its own MAC table and flood domain). For a
//! frame arriving on port `p` of network `n`:
//!
//! 1. It is checked: at least [`MIN_FRAME`] bytes (destination, source, EtherType), at most
//!    the configured maximum, and a unicast, non-zero source MAC. Bad frames are counted in
//!    the port's `rx_errors` and dropped; they never reach another port.
//! 2. The source MAC is learned: `(n, src) -> (p, now)`. The table is bounded; when full, new
//!    addresses are not learned (their replies are flooded instead).
//! 3. Broadcast/multicast destinations, and unicast ones not in the table or whose entry is
//!    older than the ageing time, are flooded to every other port of `n`. A known destination
//!    goes to its port only, or is filtered when that is the ingress port.
//!
//! Each port has a bounded egress queue; a frame for a full queue is dropped and counted in
//! `tx_dropped` (tail drop), so one stuck VM cannot make the switch grow without bound.

pub mod server;

use crate::config::MacAddr;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Smallest frame accepted: destination MAC, source MAC and EtherType.
pub const MIN_FRAME: usize = 14;

/// Errors of the switch logic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SwitchError {
    /// The switch already has its maximum number of ports.
    #[error("switch is full ({max} ports)")]
    TooManyPorts {
        /// The configured maximum.
        max: usize,
    },
    /// No port with that id.
    #[error("no port {port}")]
    NoSuchPort {
        /// The port id.
        port: usize,
    },
}

/// Why a frame was dropped at ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Shorter than [`MIN_FRAME`].
    #[error("frame of {len} bytes is shorter than an ethernet header")]
    TooShort {
        /// Length received.
        len: usize,
    },
    /// Longer than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLong {
        /// Length received.
        len: usize,
        /// Maximum.
        max: usize,
    },
    /// Source MAC is a group address or all zeros.
    #[error("invalid source mac {src}")]
    BadSource {
        /// The source address.
        src: MacAddr,
    },
}

/// Tunables of a [`NetworkSwitch`]. Defaults in parentheses.
#[derive(Debug, Clone)]
pub struct SwitchConfig {
    /// Maximum number of ports (64).
    pub max_ports: usize,
    /// Maximum MAC table entries across all networks (4096).
    pub max_mac_entries: usize,
    /// How long a learned address stays valid without being seen (300 s, like 802.1D).
    pub ageing: Duration,
    /// Frames queued per egress port before tail drop (256).
    pub queue_len: usize,
    /// Largest frame accepted (65535).
    pub max_frame: usize,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        Self {
            max_ports: 64,
            max_mac_entries: 4096,
            ageing: Duration::from_secs(300),
            queue_len: 256,
            max_frame: 65535,
        }
    }
}

/// Traffic counters of one port. `rx` is into the switch from the port, `tx` is out to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortCounters {
    /// Frames received and accepted.
    pub rx_frames: u64,
    /// Bytes received and accepted.
    pub rx_bytes: u64,
    /// Frames rejected at ingress (malformed).
    pub rx_errors: u64,
    /// Frames queued for the port.
    pub tx_frames: u64,
    /// Bytes queued for the port.
    pub tx_bytes: u64,
    /// Frames dropped because the port's queue was full (or its socket would not take them).
    pub tx_dropped: u64,
}

/// Identifier of a port (stable until the port is removed; then reused).
pub type PortId = usize;

#[derive(Debug)]
struct Port {
    network: u32,
    counters: PortCounters,
    queue: VecDeque<Bytes>,
}

/// What [`NetworkSwitch::ingress`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Sent to one known port.
    Unicast(PortId),
    /// Sent to every other port of the network (how many).
    Flooded(usize),
    /// Destination is the ingress port itself; nothing sent.
    Filtered,
}

/// A learning Ethernet switch with isolated networks, MAC ageing, bounded egress queues and
/// per-port counters. Pure logic: the caller moves frames in with [`ingress`](Self::ingress)
/// and out with [`pop`](Self::pop). See the [module docs](self).
#[derive(Debug)]
pub struct NetworkSwitch {
    config: SwitchConfig,
    ports: Vec<Option<Port>>,
    networks: HashMap<String, u32>,
    table: HashMap<(u32, [u8; 6]), (PortId, Instant)>,
    /// Ports per network, kept for fast flooding.
    members: HashMap<u32, Vec<PortId>>,
}

impl NetworkSwitch {
    /// An empty switch.
    pub fn new(config: SwitchConfig) -> Self {
        Self {
            config,
            ports: Vec::new(),
            networks: HashMap::new(),
            table: HashMap::new(),
            members: HashMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SwitchConfig {
        &self.config
    }

    /// Add a port on `network` (created on first use).
    pub fn add_port(&mut self, network: &str) -> Result<PortId, SwitchError> {
        if self.port_count() >= self.config.max_ports {
            return Err(SwitchError::TooManyPorts {
                max: self.config.max_ports,
            });
        }
        let next = u32::try_from(self.networks.len()).unwrap_or(u32::MAX);
        let net = *self.networks.entry(network.to_string()).or_insert(next);
        let port = Port {
            network: net,
            counters: PortCounters::default(),
            queue: VecDeque::new(),
        };
        let id = match self.ports.iter().position(Option::is_none) {
            Some(free) => {
                self.ports[free] = Some(port);
                free
            }
            None => {
                self.ports.push(Some(port));
                self.ports.len() - 1
            }
        };
        self.members.entry(net).or_default().push(id);
        Ok(id)
    }

    /// Remove a port, forgetting the addresses learned on it and its queued frames.
    pub fn remove_port(&mut self, id: PortId) -> Result<PortCounters, SwitchError> {
        let port = self
            .ports
            .get_mut(id)
            .and_then(Option::take)
            .ok_or(SwitchError::NoSuchPort { port: id })?;
        self.table.retain(|_, (p, _)| *p != id);
        if let Some(m) = self.members.get_mut(&port.network) {
            m.retain(|p| *p != id);
        }
        Ok(port.counters)
    }

    /// Number of ports.
    pub fn port_count(&self) -> usize {
        self.ports.iter().filter(|p| p.is_some()).count()
    }

    /// Counters of a port.
    pub fn counters(&self, id: PortId) -> Option<PortCounters> {
        self.port(id).map(|p| p.counters)
    }

    /// Number of learned addresses (including expired ones not yet purged by [`age`](Self::age)).
    pub fn mac_entries(&self) -> usize {
        self.table.len()
    }

    /// The port `mac` was last seen on in the network of port `on`, if still valid at `now`.
    pub fn lookup(&self, on: PortId, mac: MacAddr, now: Instant) -> Option<PortId> {
        let net = self.port(on)?.network;
        self.table
            .get(&(net, mac.0))
            .filter(|(_, seen)| now.saturating_duration_since(*seen) < self.config.ageing)
            .map(|(p, _)| *p)
    }

    /// Drop table entries not seen for the ageing time.
    pub fn age(&mut self, now: Instant) {
        let ageing = self.config.ageing;
        self.table
            .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < ageing);
    }

    fn port(&self, id: PortId) -> Option<&Port> {
        self.ports.get(id).and_then(Option::as_ref)
    }

    /// Accept `frame` arriving on port `from` at time `now`: learn its source, queue it for
    /// its destination port(s). Copies the frame once (shared by all flood targets).
    pub fn ingress(&mut self, from: PortId, frame: &[u8], now: Instant) -> Result<Delivery, IngressError> {
        let max = self.config.max_frame;
        let net = {
            let port = self
                .ports
                .get_mut(from)
                .and_then(Option::as_mut)
                .ok_or(IngressError::NoSuchPort { port: from })?;
            let check = check_frame(frame, max);
            if let Err(e) = check {
                port.counters.rx_errors += 1;
                return Err(IngressError::Frame(e));
            }
            port.counters.rx_frames += 1;
            port.counters.rx_bytes += frame.len() as u64;
            port.network
        };
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[0..6]);
        let mut src = [0u8; 6];
        src.copy_from_slice(&frame[6..12]);

        // learn
        let table_full = self.table.len() >= self.config.max_mac_entries;
        match self.table.get_mut(&(net, src)) {
            Some(entry) => *entry = (from, now),
            None if !table_full => {
                self.table.insert((net, src), (from, now));
            }
            None => {}
        }

        let dst_mac = MacAddr(dst);
        if !dst_mac.is_multicast() {
            let known = self
                .table
                .get(&(net, dst))
                .filter(|(_, seen)| now.saturating_duration_since(*seen) < self.config.ageing)
                .map(|(p, _)| *p);
            if let Some(to) = known {
                if to == from {
                    return Ok(Delivery::Filtered);
                }
                let data = Bytes::copy_from_slice(frame);
                self.enqueue(to, data);
                return Ok(Delivery::Unicast(to));
            }
        }
        // flood
        let data = Bytes::copy_from_slice(frame);
        let mut n = 0;
        // take the member list out while enqueueing (no allocation per frame)
        let members = self.members.remove(&net).unwrap_or_default();
        for &to in &members {
            if to != from {
                self.enqueue(to, data.clone());
                n += 1;
            }
        }
        self.members.insert(net, members);
        Ok(Delivery::Flooded(n))
    }

    fn enqueue(&mut self, to: PortId, data: Bytes) {
        let limit = self.config.queue_len;
        if let Some(port) = self.ports.get_mut(to).and_then(Option::as_mut) {
            if port.queue.len() >= limit {
                port.counters.tx_dropped += 1;
            } else {
                port.counters.tx_frames += 1;
                port.counters.tx_bytes += data.len() as u64;
                port.queue.push_back(data);
            }
        }
    }

    /// Take the next frame queued for port `id`.
    pub fn pop(&mut self, id: PortId) -> Option<Bytes> {
        self.ports
            .get_mut(id)
            .and_then(Option::as_mut)
            .and_then(|p| p.queue.pop_front())
    }

    /// Put a frame back at the head of port `id`'s queue (its socket would not take it yet).
    pub fn unpop(&mut self, id: PortId, frame: Bytes) {
        if let Some(p) = self.ports.get_mut(id).and_then(Option::as_mut) {
            p.queue.push_front(frame);
        }
    }

    /// Frames queued for port `id`.
    pub fn queued(&self, id: PortId) -> usize {
        self.port(id).map(|p| p.queue.len()).unwrap_or(0)
    }

    /// Count a frame for port `id` as dropped after it was dequeued (its socket refused it).
    pub fn count_tx_drop(&mut self, id: PortId) {
        if let Some(p) = self.ports.get_mut(id).and_then(Option::as_mut) {
            p.counters.tx_dropped += 1;
        }
    }

    /// Ids of all ports.
    pub fn port_ids(&self) -> Vec<PortId> {
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|_| i))
            .collect()
    }
}

/// Why [`NetworkSwitch::ingress`] refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IngressError {
    /// No port with that id.
    #[error("no port {port}")]
    NoSuchPort {
        /// The port id.
        port: PortId,
    },
    /// The frame is malformed.
    #[error("malformed frame")]
    Frame(#[source] FrameError),
}

/// Check an Ethernet frame's length and source address.
pub fn check_frame(frame: &[u8], max: usize) -> Result<(), FrameError> {
    if frame.len() < MIN_FRAME {
        return Err(FrameError::TooShort { len: frame.len() });
    }
    if frame.len() > max {
        return Err(FrameError::TooLong {
            len: frame.len(),
            max,
        });
    }
    let mut src = [0u8; 6];
    src.copy_from_slice(&frame[6..12]);
    let src = MacAddr(src);
    if src.is_multicast() || src.0 == [0; 6] {
        return Err(FrameError::BadSource { src });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(last: u8) -> [u8; 6] {
        [0x02, 0, 0, 0, 0, last]
    }

    fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
        let mut f = Vec::with_capacity(len);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(len.max(14), 0xab);
        f
    }

    fn drain(sw: &mut NetworkSwitch, p: PortId) -> Vec<Bytes> {
        std::iter::from_fn(|| sw.pop(p)).collect()
    }

    #[test]
    fn unknown_unicast_floods_then_learned_address_is_unicast() {
        let mut sw = NetworkSwitch::new(SwitchConfig::default());
        let a = sw.add_port("n").expect("port");
        let b = sw.add_port("n").expect("port");
        let c = sw.add_port("n").expect("port");
        let now = Instant::now();
        // a -> b, b unknown: flood to b and c
        assert_eq!(
            sw.ingress(a, &frame(mac(2), mac(1), 60), now),
            Ok(Delivery::Flooded(2))
        );
        assert_eq!(drain(&mut sw, b).len(), 1);
        assert_eq!(drain(&mut sw, c).len(), 1);
        assert!(drain(&mut sw, a).is_empty());
        // b replies to a: a was learned, unicast
        let reply = frame(mac(1), mac(2), 60);
        assert_eq!(sw.ingress(b, &reply, now), Ok(Delivery::Unicast(a)));
        assert_eq!(drain(&mut sw, a), vec![Bytes::from(reply)]);
        assert!(drain(&mut sw, c).is_empty());
        // now a -> b is unicast too
        assert_eq!(
            sw.ingress(a, &frame(mac(2), mac(1), 60), now),
            Ok(Delivery::Unicast(b))
        );
        assert!(drain(&mut sw, c).is_empty());
        assert_eq!(sw.lookup(c, MacAddr(mac(2)), now), Some(b));
        let ca = sw.counters(a).expect("counters");
        assert_eq!((ca.rx_frames, ca.tx_frames, ca.rx_bytes), (2, 1, 120));
    }

    #[test]
    fn broadcast_and_multicast_flood_to_all_other_ports() {
        let mut sw = NetworkSwitch::new(SwitchConfig::default());
        let ports: Vec<_> = (0..4).map(|_| sw.add_port("n").expect("port")).collect();
        let now = Instant::now();
        // learn everyone first so flooding is due to the group bit, not ignorance
        for (i, p) in ports.iter().enumerate() {
            sw.ingress(*p, &frame(MacAddr::BROADCAST.0, mac(i as u8 + 1), 60), now)
                .expect("ok");
        }
        for p in &ports {
            drain(&mut sw, *p);
        }
        let mcast = [0x01, 0x00, 0x5e, 0, 0, 1];
        assert_eq!(
            sw.ingress(ports[0], &frame(mcast, mac(1), 60), now),
            Ok(Delivery::Flooded(3))
        );
        assert!(drain(&mut sw, ports[0]).is_empty());
        for p in &ports[1..] {
            assert_eq!(drain(&mut sw, *p).len(), 1);
        }
    }

    #[test]
    fn learned_addresses_age_out() {
        let cfg = SwitchConfig {
            ageing: Duration::from_secs(10),
            ..SwitchConfig::default()
        };
        let mut sw = NetworkSwitch::new(cfg);
        let a = sw.add_port("n").expect("port");
        let b = sw.add_port("n").expect("port");
        let c = sw.add_port("n").expect("port");
        let t0 = Instant::now();
        sw.ingress(a, &frame(MacAddr::BROADCAST.0, mac(1), 60), t0)
            .expect("ok");
        assert_eq!(sw.lookup(b, MacAddr(mac(1)), t0), Some(a));
        let t1 = t0 + Duration::from_secs(9);
        assert_eq!(
            sw.ingress(b, &frame(mac(1), mac(2), 60), t1),
            Ok(Delivery::Unicast(a))
        );
        let t2 = t0 + Duration::from_secs(11);
        assert_eq!(sw.lookup(b, MacAddr(mac(1)), t2), None);
        // expired: flooded again
        assert_eq!(
            sw.ingress(c, &frame(mac(1), mac(3), 60), t2),
            Ok(Delivery::Flooded(2))
        );
        assert_eq!(sw.mac_entries(), 3);
        sw.age(t0 + Duration::from_secs(19));
        // mac(1) seen at t0 and mac(2) at t1 expired; mac(3) seen at t2 stays
        assert_eq!(sw.mac_entries(), 1);
    }

    #[test]
    fn networks_are_isolated() {
        let mut sw = NetworkSwitch::new(SwitchConfig::default());
        let a1 = sw.add_port("red").expect("port");
        let a2 = sw.add_port("red").expect("port");
        let b1 = sw.add_port("blue").expect("port");
        let b2 = sw.add_port("blue").expect("port");
        let now = Instant::now();
        assert_eq!(
            sw.ingress(a1, &frame(MacAddr::BROADCAST.0, mac(1), 60), now),
            Ok(Delivery::Flooded(1))
        );
        assert_eq!(drain(&mut sw, a2).len(), 1);
        assert!(drain(&mut sw, b1).is_empty() && drain(&mut sw, b2).is_empty());
        // same MAC learned in blue is a separate entry, and a red address is unknown in blue
        assert_eq!(
            sw.ingress(b1, &frame(mac(1), mac(9), 60), now),
            Ok(Delivery::Flooded(1))
        );
        assert_eq!(drain(&mut sw, b2).len(), 1);
        assert!(drain(&mut sw, a1).is_empty());
        assert_eq!(sw.lookup(b2, MacAddr(mac(1)), now), None);
        assert_eq!(sw.lookup(a2, MacAddr(mac(1)), now), Some(a1));
    }

    #[test]
    fn malformed_frames_are_counted_and_dropped() {
        let mut sw = NetworkSwitch::new(SwitchConfig {
            max_frame: 1518,
            ..SwitchConfig::default()
        });
        let a = sw.add_port("n").expect("port");
        let b = sw.add_port("n").expect("port");
        let now = Instant::now();
        for len in 0..MIN_FRAME {
            let f = vec![0x02u8; len];
            assert!(matches!(
                sw.ingress(a, &f, now),
                Err(IngressError::Frame(FrameError::TooShort { .. }))
            ));
        }
        assert!(matches!(
            sw.ingress(a, &frame(mac(2), mac(1), 1519), now),
            Err(IngressError::Frame(FrameError::TooLong { .. }))
        ));
        // multicast or zero source
        assert!(matches!(
            sw.ingress(a, &frame(mac(2), MacAddr::BROADCAST.0, 60), now),
            Err(IngressError::Frame(FrameError::BadSource { .. }))
        ));
        assert!(matches!(
            sw.ingress(a, &frame(mac(2), [0; 6], 60), now),
            Err(IngressError::Frame(FrameError::BadSource { .. }))
        ));
        assert!(drain(&mut sw, b).is_empty());
        assert_eq!(sw.mac_entries(), 0);
        let c = sw.counters(a).expect("counters");
        assert_eq!((c.rx_errors, c.rx_frames), (MIN_FRAME as u64 + 3, 0));
        // a minimal 14-byte frame is fine
        assert_eq!(
            sw.ingress(a, &frame(mac(2), mac(1), 14), now),
            Ok(Delivery::Flooded(1))
        );
        assert_eq!(
            sw.ingress(99, &frame(mac(2), mac(1), 14), now),
            Err(IngressError::NoSuchPort { port: 99 })
        );
    }

    #[test]
    fn queues_are_bounded_and_ports_bounded() {
        let mut sw = NetworkSwitch::new(SwitchConfig {
            queue_len: 4,
            max_ports: 2,
            ..SwitchConfig::default()
        });
        let a = sw.add_port("n").expect("port");
        let b = sw.add_port("n").expect("port");
        assert_eq!(sw.add_port("n"), Err(SwitchError::TooManyPorts { max: 2 }));
        let now = Instant::now();
        for _ in 0..10 {
            sw.ingress(a, &frame(mac(2), mac(1), 60), now).expect("ok");
        }
        assert_eq!(sw.queued(b), 4);
        let cb = sw.counters(b).expect("counters");
        assert_eq!((cb.tx_frames, cb.tx_dropped), (4, 6));
        // removing a port forgets what was learned on it and frees the slot
        sw.remove_port(a).expect("remove");
        assert_eq!(sw.lookup(b, MacAddr(mac(1)), now), None);
        let a2 = sw.add_port("n").expect("port");
        assert_eq!(a2, a);
        assert_eq!(sw.counters(a2), Some(PortCounters::default()));
    }

    #[test]
    fn mac_table_is_bounded() {
        let mut sw = NetworkSwitch::new(SwitchConfig {
            max_mac_entries: 8,
            ..SwitchConfig::default()
        });
        let a = sw.add_port("n").expect("port");
        let _b = sw.add_port("n").expect("port");
        let now = Instant::now();
        for i in 0..100u8 {
            sw.ingress(a, &frame(MacAddr::BROADCAST.0, mac(i + 1), 60), now)
                .expect("ok");
        }
        assert_eq!(sw.mac_entries(), 8);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_or_cross_networks(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut sw = NetworkSwitch::new(SwitchConfig::default());
            let a = sw.add_port("x").expect("port");
            let b = sw.add_port("x").expect("port");
            let other = sw.add_port("y").expect("port");
            let _ = sw.ingress(a, &data, Instant::now());
            proptest::prop_assert_eq!(sw.queued(other), 0);
            proptest::prop_assert!(sw.queued(b) <= 1);
        }
    }
}
