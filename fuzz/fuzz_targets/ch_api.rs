//! Cloud Hypervisor API replies: a fake VMM answers one REST call with the fuzzer's bytes
//! (status line, headers, body, then it hangs up) and the real driver makes that call
//! (`vm.info` as status and as info, `vm.counters`, `vm.add-net`, `vm.pause`) through the
//! HTTP client on the API socket. Nothing may panic or hang; a reply the client accepts has a
//! sane status and a body that matches its `Content-Length`. The head parser and the error
//! body parser are also run on the bytes directly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_rs::driver::cloud_hypervisor::api::{self, ApiClient, Method, MAX_BODY};
use vm_rs::driver::cloud_hypervisor::CloudHypervisorDriver;
use vm_rs::driver::{TapNetwork, VmDriver, VmHandle};
use vm_rs::BackendKind;
use vmrs_fuzz::{runtime, Peer, HANG};

fn handle(api: &std::path::Path) -> VmHandle {
    VmHandle {
        name: "fuzz".into(),
        backend: BackendKind::CloudHypervisor,
        pid: 0,
        start_time: 0,
        api_socket: api.to_path_buf(),
        event_socket: None,
        serial_log: api.with_file_name("serial.log"),
        accel: None,
    }
}

fn content_length(head: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, reply)) = data.split_first() else {
        return;
    };
    // The pure parsers on the same bytes.
    let blank = reply.windows(4).position(|w| w == b"\r\n\r\n");
    if let Some(end) = blank {
        if let Ok(h) = api::parse_head(&reply[..end]) {
            assert!((100..=599).contains(&h.status));
            assert!(h.content_length.is_none_or(|n| n <= MAX_BODY));
        }
    }
    let msg = api::error_message(u16::from(sel) + 300, reply);
    assert!(msg.chars().count() <= 16 * 514 + 32, "error message not bounded");

    let rt = runtime();
    rt.block_on(async {
        let peer = Peer::bind();
        let driver = CloudHypervisorDriver::new();
        let h = handle(peer.path());
        let call = async {
            match sel % 6 {
                0 => drop(driver.status(&h).await),
                1 => drop(driver.info(&h).await),
                2 => drop(driver.counters(&h).await),
                3 => {
                    let net = TapNetwork {
                        tap: Some("vmrs-fuzz0".into()),
                        mac: None,
                    };
                    drop(driver.add_net(&h, &net).await)
                }
                4 => drop(driver.pause(&h).await),
                _ => {
                    let client = ApiClient::new(peer.path(), HANG);
                    if let Ok(resp) = client.raw(Method::Get, "vm.info", None).await {
                        assert!((100..=599).contains(&resp.status));
                        assert!(resp.body.len() <= MAX_BODY);
                        let end = blank.unwrap_or_else(|| panic!("response accepted without a head"));
                        if let Some(n) = content_length(&reply[..end]) {
                            assert_eq!(resp.body.len(), n, "body does not match content-length");
                            assert_eq!(resp.body, reply[end + 4..end + 4 + n]);
                        }
                    }
                }
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
