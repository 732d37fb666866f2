//! Cloud Hypervisor event-monitor records (`--event-monitor path=...`: pretty-printed JSON
//! objects separated by blank lines): the streaming parser gives the same records however the
//! bytes are split into reads, and never keeps more than one bounded record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_rs::driver::cloud_hypervisor::events::EventParser;
use vmrs_fuzz::chunks;

fuzz_target!(|data: &[u8]| {
    let Some((&ncuts, rest)) = data.split_first() else {
        return;
    };
    let ncuts = (ncuts as usize % 16).min(rest.len());
    let (cuts, stream) = rest.split_at(ncuts);
    let whole = EventParser::new().feed(stream);
    let mut p = EventParser::new();
    let mut pieces = Vec::new();
    for c in chunks(stream, cuts) {
        pieces.extend(p.feed(c));
    }
    assert_eq!(pieces, whole, "records depend on how reads were split");
    // A record is only reported at its blank line: at most one per "\n\n".
    let separators = stream.windows(2).filter(|w| w == b"\n\n").count();
    assert!(whole.len() <= separators);
});
