//! Agent frames (`vmrs-proto`), as both sides decode them: the frames and the error found do
//! not depend on how the bytes arrive; every frame decoded re-encodes to exactly the bytes it
//! came from (the encoding is canonical), and decoding what was encoded gives it back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmrs_fuzz::chunks;
use vmrs_proto::{Decoder, Frame, Message, ProtoError, HEADER_LEN};

/// Frames until more bytes are needed or the first error.
fn drain(d: &mut Decoder, out: &mut Vec<Frame>) -> Option<ProtoError> {
    loop {
        match d.next_frame() {
            Ok(Some(f)) => out.push(f),
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ncuts, rest)) = data.split_first() else {
        return;
    };
    let ncuts = (ncuts as usize % 16).min(rest.len());
    let (cuts, stream) = rest.split_at(ncuts);

    let mut whole = Decoder::new();
    whole.push(stream);
    let mut frames = Vec::new();
    let error = drain(&mut whole, &mut frames);
    if error.is_some() {
        // Poisoned: it keeps answering with the same error.
        assert_eq!(whole.next_frame().err(), error);
    }

    let mut split = Decoder::new();
    let mut frames2 = Vec::new();
    let mut error2 = None;
    for c in chunks(stream, cuts) {
        split.push(c);
        error2 = drain(&mut split, &mut frames2);
        if error2.is_some() {
            break;
        }
    }
    assert_eq!(frames2, frames, "frames depend on how reads were split");
    assert_eq!(error2, error);

    let mut at = 0;
    for f in &frames {
        let encoded = match f.message.encode(f.stream) {
            Ok(e) => e,
            Err(e) => panic!("a decoded frame does not encode: {e}"),
        };
        assert_eq!(
            &stream[at..at + encoded.len()],
            &encoded[..],
            "encoding is not canonical"
        );
        at += encoded.len();
        let back = Message::decode(encoded[4], &encoded[HEADER_LEN..]);
        assert_eq!(back.as_ref(), Ok(&f.message));
    }
    if error.is_none() {
        assert_eq!(whole.buffered(), stream.len() - at);
    }
});
