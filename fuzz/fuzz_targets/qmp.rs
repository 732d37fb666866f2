//! QMP replies and events: a fake QEMU sends the fuzzer's bytes on the QMP socket (greeting,
//! replies, events, then it hangs up), and the real client connects, runs a command and reads
//! events until the connection ends. Nothing may panic or hang, and every event QEMU sent after
//! the greeting and before the first line that is not JSON is delivered exactly once, in order,
//! whether it arrived between a command and its reply or later.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use vm_rs::driver::qemu::qmp::{Qmp, QmpEvent};
use vmrs_fuzz::{runtime, Peer, HANG};

/// What the client should deliver: events of the lines after the greeting, up to the first
/// line serde_json rejects (the client stops reading there).
fn expected_events(data: &[u8]) -> Vec<QmpEvent> {
    let mut lines = data.split_inclusive(|&b| b == b'\n');
    lines.next();
    let mut out = Vec::new();
    for line in lines {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            break;
        };
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            out.push(QmpEvent {
                name: name.to_string(),
                data: v.get("data").cloned().unwrap_or_else(|| json!({})),
            });
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let rt = runtime();
    rt.block_on(async {
        let peer = Peer::bind();
        let session = async {
            let Ok(mut qmp) = Qmp::connect(peer.path(), HANG).await else {
                return None;
            };
            let _ = qmp.execute("query-status", None).await;
            let mut events = Vec::new();
            while let Ok(ev) = qmp.next_event().await {
                events.push(ev);
            }
            Some(events)
        };
        let got = tokio::select! {
            got = tokio::time::timeout(HANG, session) => match got {
                Ok(g) => g,
                Err(_) => panic!("QMP client hung on {:?}", String::from_utf8_lossy(data)),
            },
            () = peer.serve(vec![data.to_vec()]) => None,
        };
        if let Some(events) = got {
            assert_eq!(
                events,
                expected_events(data),
                "events lost, duplicated or reordered"
            );
        }
    });
});
