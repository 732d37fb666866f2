//! The protocol peers' hybrid-vsock socket (its own file so the `vmrs` crate's tests can use the
//! peers too).

/// The hybrid-vsock socket of a VM, as Cloud Hypervisor and Firecracker serve it (for the peers): a host connection says
/// `CONNECT <port>\n`; this peer runs no guest, so nothing listens on any guest port and the
/// connection is closed after the request (what the binary does when the guest refuses).
pub fn serve_hybrid_vsock(socket: &str) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = std::os::unix::net::UnixListener::bind(socket)?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{BufRead, Read};
                let mut line = String::new();
                let _ = std::io::BufReader::new((&conn).take(64)).read_line(&mut line);
                // no guest listener: the connection ends without "OK <port>"
            });
        }
    });
    Ok(())
}
