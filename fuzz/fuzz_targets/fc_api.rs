//! Firecracker API replies: a fake VMM answers one REST call with the fuzzer's bytes (status
//! line, headers, body, then it hangs up) and the real driver makes that call (status from
//! `GET /`, info from `GET /vm/config`, pause and resume through `PATCH /vm`) through the HTTP
//! client on the API socket. Nothing may panic or hang. The error-body parser, the state
//! mapping and the exit classification from Firecracker's log are also run on the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_rs::driver::firecracker::{self, FirecrackerDriver};
use vm_rs::driver::{VmDriver, VmHandle};
use vm_rs::BackendKind;
use vmrs_fuzz::{runtime, Peer, HANG};

fn handle(api: &std::path::Path) -> VmHandle {
    VmHandle {
        name: "fuzz".into(),
        backend: BackendKind::Firecracker,
        pid: 0,
        start_time: 0,
        api_socket: api.to_path_buf(),
        event_socket: None,
        serial_log: api.with_file_name("serial.log"),
        accel: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, reply)) = data.split_first() else {
        return;
    };
    // The pure parsers on the same bytes.
    let msg = firecracker::error_message(u16::from(sel) + 300, reply);
    assert!(msg.chars().count() <= 1024 + 32, "error message not bounded");
    let text = String::from_utf8_lossy(reply);
    let _ = firecracker::map_state(&text);
    let _ = firecracker::classify_exit(&text, sel & 1 == 1);

    let rt = runtime();
    rt.block_on(async {
        let peer = Peer::bind();
        let driver = FirecrackerDriver::new();
        let h = handle(peer.path());
        let call = async {
            match sel % 4 {
                0 => drop(driver.status(&h).await),
                1 => drop(driver.info(&h).await),
                2 => drop(driver.pause(&h).await),
                _ => drop(driver.resume(&h).await),
            }
        };
        tokio::select! {
            r = tokio::time::timeout(HANG, call) => {
                if r.is_err() {
                    panic!("API client hung on {:?}", String::from_utf8_lossy(reply));
                }
            }
            () = peer.serve(vec![reply.to_vec()]) => {}
        }
    });
});
