//! Image references (`vmrs pull REF`, `vmrs run IMAGE`): parse any string; a reference that
//! parses has a canonical form that parses again to the same reference, and its parts agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_rs::oci::digest::Digest;
use vm_rs::oci::reference::ImageReference;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = ImageReference::parse(text) else {
        return;
    };
    let canonical = r.canonical();
    let again = match ImageReference::parse(&canonical) {
        Ok(a) => a,
        Err(e) => panic!("canonical form {canonical:?} of {text:?} does not parse: {e}"),
    };
    assert_eq!(again.canonical(), canonical, "canonical form is not stable");
    assert_eq!(again.registry(), r.registry());
    assert_eq!(again.repository(), r.repository());
    assert_eq!(again.tag(), r.tag());
    assert_eq!(again.digest(), r.digest());
    assert_eq!(r.to_string(), canonical);
    assert!(!r.repository().is_empty(), "empty repository from {text:?}");
    let _ = r.resolved_registry();
    let _ = r.is_loopback();
    // Pinning to a digest keeps the repository and drops the tag.
    let d = Digest::of(data);
    let pinned = r.with_digest(&d);
    assert_eq!(pinned.repository(), r.repository());
    assert_eq!(pinned.digest(), Some(d.clone()));
    let reparsed = match ImageReference::parse(&pinned.canonical()) {
        Ok(p) => p,
        Err(e) => panic!("pinned form {:?} does not parse: {e}", pinned.canonical()),
    };
    assert_eq!(reparsed.digest(), Some(d));
});
