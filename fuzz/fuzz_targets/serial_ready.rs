//! The serial console readiness parser (`VMRS_READY <ip>` on its own line): the address found
//! does not depend on how the console bytes arrive, and it is exactly what the line parser
//! says of the first complete, not over-long marker line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_rs::console::{parse_marker_line, ReadinessParser, MAX_LINE};
use vmrs_fuzz::chunks;

fuzz_target!(|data: &[u8]| {
    let Some((&ncuts, rest)) = data.split_first() else {
        return;
    };
    let ncuts = (ncuts as usize % 16).min(rest.len());
    let (cuts, stream) = rest.split_at(ncuts);
    let whole = ReadinessParser::new().feed(stream);
    let mut p = ReadinessParser::new();
    let mut first = None;
    for c in chunks(stream, cuts) {
        let found = p.feed(c);
        if first.is_none() {
            first = found;
        }
    }
    assert_eq!(first, whole, "readiness depends on how reads were split");
    // The model: complete lines (those followed by '\n'), skipping over-long ones.
    let mut lines: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    lines.pop();
    let model = lines
        .iter()
        .filter(|l| l.len() <= MAX_LINE)
        .find_map(|l| parse_marker_line(l));
    assert_eq!(whole, model);
});
