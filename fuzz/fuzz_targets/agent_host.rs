//! Agent frames, host side: a fake guest agent sends the fuzzer's bytes on the agent socket
//! (a hello answer, then frames for the first stream) and hangs up; the real client shakes
//! hands and runs a copy out of the guest into a sandbox, an exec or a ping. Nothing may panic
//! or hang, and a copy never creates, changes or links anything outside its destination, the
//! guest's paths and symlinks notwithstanding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use vm_rs::agent::{AgentClient, ExecCommand};
use vmrs_fuzz::{runtime, Sandbox, HANG};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, guest_bytes)) = data.split_first() else {
        return;
    };
    let sandbox = Sandbox::new();
    let rt = runtime();
    rt.block_on(async {
        let Ok((host, mut guest)) = UnixStream::pair() else {
            panic!("socketpair failed");
        };
        // Everything the guest says is queued before the host starts; then the guest stops
        // talking but keeps reading, so the host's requests do not fail with EPIPE.
        if guest.write_all(guest_bytes).await.is_err() || guest.shutdown().await.is_err() {
            panic!("cannot queue the guest's bytes");
        }
        let root = sandbox.root();
        let session = async {
            let Ok(client) = AgentClient::from_stream(host).await else {
                return;
            };
            match mode % 4 {
                0 | 1 => {
                    let _ = client.copy_from("/src", &root).await;
                }
                2 => {
                    let _ = client
                        .exec(ExecCommand::new(["true"]).stdin(b"in".to_vec()))
                        .await;
                }
                _ => {
                    let _ = client.ping().await;
                }
            }
        };
        if tokio::time::timeout(HANG, session).await.is_err() {
            panic!("agent client hung");
        }
        drop(guest);
    });
    sandbox.check();
});
