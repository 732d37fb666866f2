//! Image config blobs: parse any bytes. A config that parses has sorted, unique ports and
//! sorted volumes, survives the JSON round trip the store uses to persist it, and its argv and
//! env pairs are consistent with its fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_rs::oci::config::ImageConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(c) = ImageConfig::parse(data) else {
        return;
    };
    assert!(
        c.exposed_ports.windows(2).all(|w| w[0] < w[1]),
        "ports not sorted/unique"
    );
    assert!(
        c.volumes.windows(2).all(|w| w[0] < w[1]),
        "volumes not sorted/unique"
    );
    let argv = c.argv();
    assert_eq!(argv.len(), c.entrypoint.len() + c.cmd.len());
    let pairs = c.env_pairs();
    assert_eq!(pairs.len(), c.env.len());
    for ((k, v), e) in pairs.iter().zip(&c.env) {
        assert!(!k.contains('='), "env key {k:?} contains '='");
        if e.contains('=') {
            assert_eq!(format!("{k}={v}"), *e);
        } else {
            assert_eq!((k.as_str(), v.as_str()), (e.as_str(), ""));
        }
    }
    let json = match serde_json::to_vec(&c) {
        Ok(j) => j,
        Err(e) => panic!("config does not serialize: {e}"),
    };
    let back: ImageConfig = match serde_json::from_slice(&json) {
        Ok(b) => b,
        Err(e) => panic!("serialized config does not parse: {e}"),
    };
    assert_eq!(back, c);
});
