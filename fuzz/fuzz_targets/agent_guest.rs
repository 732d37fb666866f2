//! Agent frames, guest side: the bytes the host sends are decoded as `vmrs-init` decodes them
//! and the frames of a copy into the guest are applied, as the port thread does, to a
//! destination inside a sandbox. Nothing may panic, and nothing outside the destination is
//! created, changed or linked. The exec request's user spec is resolved against passwd/group
//! text taken from the input too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmrs_fuzz::Sandbox;
use vmrs_guest::agent::{copy_in_for_fuzzing, resolve_user};
use vmrs_proto::{Decoder, Message};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    if mode & 0x80 != 0 {
        // "user spec \0 passwd \0 group"
        let text = String::from_utf8_lossy(bytes);
        let mut parts = text.splitn(3, '\0');
        let spec = parts.next().unwrap_or_default();
        let passwd = parts.next().unwrap_or_default();
        let group = parts.next().unwrap_or_default();
        if let Ok(u) = resolve_user(spec, passwd, group) {
            if let Ok(n) = spec.split(':').next().unwrap_or_default().parse::<u32>() {
                assert_eq!(u.uid, n, "numeric uid not taken as given");
            }
        }
        return;
    }
    let mut decoder = Decoder::new();
    decoder.push(bytes);
    let mut messages = Vec::new();
    while let Ok(Some(frame)) = decoder.next_frame() {
        match frame.message {
            m @ (Message::Entry(_) | Message::Data { .. } | Message::End) => messages.push(m),
            _ => {}
        }
    }
    let sandbox = Sandbox::new();
    let root = sandbox.root();
    // Copy into the existing directory (the root lands inside it under a name) or onto a
    // path that does not exist yet.
    let (dest, name) = if mode & 1 == 0 {
        (root.clone(), b"copied".to_vec())
    } else {
        (root.join("new"), Vec::new())
    };
    let _ = copy_in_for_fuzzing(dest.as_os_str().as_encoded_bytes(), &name, messages);
    sandbox.check();
});
