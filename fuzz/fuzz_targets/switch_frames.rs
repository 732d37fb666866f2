//! Ethernet frames in the userspace switch: a random sequence of port changes, guest frames
//! (arbitrary bytes), clock steps and dequeues. Checked against a model: malformed frames are
//! counted and go nowhere; a unicast goes to the one port its destination was learned on in
//! the same network, a flood to every other port of that network and no other; queues stay
//! bounded and hand out exactly the frames queued for them, unchanged and in order; the MAC
//! table stays bounded.
#![no_main]

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_rs::config::MacAddr;
use vm_rs::net::switch::{check_frame, Delivery, IngressError, NetworkSwitch, PortId, SwitchConfig};

#[derive(Arbitrary, Debug)]
enum Op {
    AddPort {
        network: u8,
    },
    RemovePort {
        port: u8,
    },
    Ingress {
        port: u8,
        frame: Vec<u8>,
    },
    /// A frame from a small address space, so addresses repeat and get learned.
    Small {
        port: u8,
        dst: u8,
        src: u8,
        len: u8,
    },
    Pop {
        port: u8,
    },
    Tick {
        ms: u16,
    },
    Age,
}

fn mac(b: u8) -> [u8; 6] {
    // 0xff = broadcast; odd first octets are multicast; 0 is the (invalid) zero source.
    match b {
        0xff => [0xff; 6],
        0xfe => [0x01, 0, 0x5e, 0, 0, 1],
        0 => [0; 6],
        n => [0x52, 0x54, 0, 0, 0, n & 7],
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let config = SwitchConfig {
        max_ports: 6,
        max_mac_entries: 8,
        ageing: Duration::from_secs(5),
        queue_len: 4,
        max_frame: 256,
    };
    let mut sw = NetworkSwitch::new(config.clone());
    let mut now = Instant::now();
    // Model: each port's network and queue.
    let mut ports: HashMap<PortId, (u8, VecDeque<Vec<u8>>)> = HashMap::new();
    let mut ids: Vec<PortId> = Vec::new();
    for op in ops {
        match op {
            Op::AddPort { network } => {
                let network = network % 3;
                match sw.add_port(&format!("net{network}")) {
                    Ok(id) => {
                        assert!(!ports.contains_key(&id), "port id {id} handed out twice");
                        ports.insert(id, (network, VecDeque::new()));
                        ids.push(id);
                    }
                    Err(_) => assert_eq!(ports.len(), config.max_ports),
                }
            }
            Op::RemovePort { port } => {
                let Some(&id) = ids.get(port as usize % ids.len().max(1)) else {
                    continue;
                };
                let removed = sw.remove_port(id);
                assert_eq!(removed.is_ok(), ports.remove(&id).is_some());
                ids.retain(|&p| p != id);
            }
            Op::Ingress { port, frame } => ingress(&mut sw, &mut ports, &ids, port, &frame, now, &config),
            Op::Small { port, dst, src, len } => {
                let mut frame = Vec::new();
                frame.extend_from_slice(&mac(dst));
                frame.extend_from_slice(&mac(src));
                frame.extend_from_slice(&[0x08, 0x00]);
                frame.extend(std::iter::repeat_n(len, usize::from(len % 64)));
                ingress(&mut sw, &mut ports, &ids, port, &frame, now, &config);
            }
            Op::Pop { port } => {
                let Some(&id) = ids.get(port as usize % ids.len().max(1)) else {
                    continue;
                };
                let got = sw.pop(id).map(|b| b.to_vec());
                let want = ports.get_mut(&id).and_then(|(_, q)| q.pop_front());
                assert_eq!(got, want, "port {id} dequeued the wrong frame");
            }
            Op::Tick { ms } => now += Duration::from_millis(u64::from(ms)),
            Op::Age => sw.age(now),
        }
        assert!(sw.mac_entries() <= config.max_mac_entries);
        assert_eq!(sw.port_count(), ports.len());
        for (&id, (_, q)) in &ports {
            assert_eq!(sw.queued(id), q.len());
            assert!(q.len() <= config.queue_len);
        }
    }
});

fn ingress(
    sw: &mut NetworkSwitch,
    ports: &mut HashMap<PortId, (u8, VecDeque<Vec<u8>>)>,
    ids: &[PortId],
    port: u8,
    frame: &[u8],
    now: Instant,
    config: &SwitchConfig,
) {
    // Mostly existing ports, sometimes one that does not exist.
    let from = match ids.get(port as usize % (ids.len() + 1)) {
        Some(&id) => id,
        None => 1000 + port as usize,
    };
    let before = sw.counters(from);
    let result = sw.ingress(from, frame, now);
    let Some(net) = ports.get(&from).map(|(n, _)| *n) else {
        assert!(matches!(result, Err(IngressError::NoSuchPort { .. })));
        return;
    };
    let after = sw
        .counters(from)
        .unwrap_or_else(|| panic!("port {from} vanished"));
    let before = before.unwrap_or_else(|| panic!("port {from} had no counters"));
    if check_frame(frame, config.max_frame).is_err() {
        assert!(matches!(result, Err(IngressError::Frame(_))));
        assert_eq!(after.rx_errors, before.rx_errors + 1);
        return;
    }
    assert_eq!(after.rx_frames, before.rx_frames + 1);
    let mut dst = [0u8; 6];
    dst.copy_from_slice(&frame[..6]);
    let push = |q: &mut VecDeque<Vec<u8>>| {
        if q.len() < config.queue_len {
            q.push_back(frame.to_vec());
        }
    };
    match result {
        Ok(Delivery::Unicast(to)) => {
            assert_ne!(to, from, "unicast back to the sender");
            assert!(!MacAddr(dst).is_multicast(), "multicast sent as unicast");
            assert_eq!(sw.lookup(from, MacAddr(dst), now), Some(to));
            let (to_net, q) = ports
                .get_mut(&to)
                .unwrap_or_else(|| panic!("unicast to a missing port"));
            assert_eq!(*to_net, net, "unicast crossed networks");
            push(q);
        }
        Ok(Delivery::Flooded(n)) => {
            let mut count = 0;
            for (&id, (pnet, q)) in ports.iter_mut() {
                if id != from && *pnet == net {
                    push(q);
                    count += 1;
                }
            }
            assert_eq!(n, count, "flood reached the wrong number of ports");
        }
        Ok(Delivery::Filtered) => {
            assert_eq!(sw.lookup(from, MacAddr(dst), now), Some(from));
        }
        Err(e) => panic!("a valid frame was refused: {e}"),
    }
}
