//! The guest's kernel command line (`vmrs.*` parameters; the user can add to it): every value
//! kept passes the validation the boot code relies on (host names and root devices are used in
//! system calls and paths), and parsing is deterministic and ignores other parameters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmrs_guest::cmdline::parse;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let c = parse(text);
    if let Some((addr, prefix)) = c.ip {
        assert!(prefix <= if addr.is_ipv4() { 32 } else { 128 });
    }
    if let Some(h) = &c.hostname {
        assert!(!h.is_empty() && h.len() <= 64 && !h.starts_with('-'));
        assert!(h
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
    }
    if let Some(r) = &c.root {
        assert!(r.len() < 128);
        let serial = r.strip_prefix("serial:").is_some_and(|s| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
        assert!(
            serial || (r.starts_with("/dev/") && !r.contains("..")),
            "root {r:?} kept"
        );
    }
    if let Some(t) = &c.rootfstype {
        assert!(!t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
    if text.split_ascii_whitespace().any(|w| w == "vmrs.ip=dhcp") {
        assert!(c.dhcp, "vmrs.ip=dhcp not seen");
    }
    // Words without the `vmrs.` prefix change nothing.
    let only_ours: Vec<&str> = text
        .split_ascii_whitespace()
        .filter(|w| w.starts_with("vmrs."))
        .collect();
    assert_eq!(parse(&only_ours.join(" ")), c);
});
