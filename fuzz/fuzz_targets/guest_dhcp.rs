//! DHCP leases in the guest: `udhcpc`'s script output (untrusted text: DHCP options come from
//! the network) is parsed; a lease found has an address and router that appear in the last
//! `lease ` line, and a prefix length a netmask can have.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmrs_guest::dhcp::parse_lease;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(lease) = parse_lease(text) else {
        return;
    };
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("lease "))
        .unwrap_or_else(|| panic!("a lease without a lease line"));
    assert!(lease.prefix <= 32);
    assert!(
        line.contains(&format!("ip={}", lease.ip)),
        "ip not from the lease line"
    );
    if let Some(r) = lease.router {
        assert!(line.contains(&r.to_string()));
    }
    for d in &lease.dns {
        assert!(line.contains(&d.to_string()));
    }
});
