//! Manifests and indexes from a registry or an OCI layout: parse any bytes (the first byte
//! picks the HTTP content type that came with them). A document that parses stays within the
//! entry limit, every layer has a known compression, descriptors survive a JSON round trip,
//! and platform selection picks an entry of the index.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_rs::oci::digest::Digest;
use vm_rs::oci::manifest::{self, Compression, Descriptor, Manifest, MAX_ENTRIES};
use vm_rs::oci::platform::Platform;

const CONTENT_TYPES: [Option<&str>; 5] = [
    None,
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json"),
];

fn round_trip(d: &Descriptor) {
    let json = match serde_json::to_vec(d) {
        Ok(j) => j,
        Err(e) => panic!("descriptor does not serialize: {e}"),
    };
    let back: Descriptor = match serde_json::from_slice(&json) {
        Ok(b) => b,
        Err(e) => panic!("serialized descriptor does not parse: {e}"),
    };
    assert_eq!(&back, d);
    let digest = d.digest.to_string();
    assert_eq!(Digest::parse(&digest).ok().as_ref(), Some(&d.digest));
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[sel as usize % CONTENT_TYPES.len()];
    match manifest::parse(bytes, content_type) {
        Ok(Manifest::Index { manifests, .. }) => {
            assert!(manifests.len() <= MAX_ENTRIES);
            manifests.iter().for_each(round_trip);
            for p in manifests.iter().filter_map(|m| m.platform.as_ref()) {
                if let Some(picked) = manifest::select_platform(&manifests, p) {
                    assert!(manifests.iter().any(|m| std::ptr::eq(m, picked)));
                    assert!(picked.platform.as_ref().is_some_and(|pp| p.matches(pp)));
                }
            }
            let _ = manifest::select_platform(&manifests, &Platform::host());
        }
        Ok(Manifest::Image(m)) => {
            assert!(m.layers.len() <= MAX_ENTRIES);
            for l in &m.layers {
                assert!(
                    Compression::from_media_type(&l.media_type).is_some(),
                    "accepted layer with media type {:?}",
                    l.media_type
                );
                round_trip(l);
            }
            round_trip(&m.config);
        }
        Err(_) => {}
    }
});
