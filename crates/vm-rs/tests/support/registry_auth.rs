//! What a registry test needs around a real registry: certificates the test makes (a CA and a
//! server certificate for 127.0.0.1, a token-signing certificate) with the `openssl` tool, a
//! token server issuing JWTs per the Docker token spec, and a plain file server that redirect
//! targets point at. The servers run on threads on 127.0.0.1 and stop when dropped.

#![allow(dead_code, clippy::unwrap_used)]

use base64::Engine;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A CA and a server certificate it signed for `IP:127.0.0.1` / `DNS:localhost`.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let (ca_key, ca_cert) = (p("ca.key"), p("ca.pem"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            s(&ca_key),
            "-out",
            s(&ca_cert),
            "-days",
            "2",
            "-subj",
            "/CN=vmrs test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        let (key, csr, cert, ext) = (p("server.key"), p("server.csr"), p("server.pem"), p("ext.cnf"));
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            s(&key),
            "-out",
            s(&csr),
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            s(&ca_cert),
            "-CAkey",
            s(&ca_key),
            "-CAcreateserial",
            "-out",
            s(&cert),
            "-days",
            "2",
            "-extfile",
            s(&ext),
        ]);
        Self {
            dir,
            ca_cert,
            server_cert: cert,
            server_key: key,
        }
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One parsed HTTP/1.x request head.
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut r = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    Some(Request {
        method,
        target,
        headers,
    })
}

fn respond(mut stream: &TcpStream, status: &str, content_type: &str, body: &[u8]) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(body);
}

/// Accepts connections on a thread until dropped; each is handled by `handle`.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(handle: impl Fn(TcpStream) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = Arc::new(handle);
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        let h = handle.clone();
                        std::thread::spawn(move || h(stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A Docker token server: `GET /token?service=S&scope=repository:NAME:ACTIONS` with HTTP basic
/// credentials answers `{"token": JWT}`, the JWT signed (RS256, `openssl dgst`) by a key whose
/// self-signed certificate travels in the `x5c` header and is the registry's `rootcertbundle`.
pub struct TokenServer {
    server: Server,
    dir: tempfile::TempDir,
    /// The certificate the registry trusts for tokens.
    pub cert: PathBuf,
    pub service: String,
    pub issuer: String,
    /// Token requests answered with a token.
    pub issued: Arc<AtomicUsize>,
    /// Token requests refused (no or wrong credentials).
    pub refused: Arc<AtomicUsize>,
}

impl TokenServer {
    pub fn start(user: &str, password: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("token.key");
        let cert = dir.path().join("token.pem");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            s(&key),
            "-out",
            s(&cert),
            "-days",
            "2",
            "-subj",
            "/CN=vmrs test token issuer",
        ]);
        let der_out = Command::new("openssl")
            .args(["x509", "-in", s(&cert), "-outform", "DER"])
            .output()
            .unwrap();
        assert!(der_out.status.success());
        let x5c = base64::engine::general_purpose::STANDARD.encode(&der_out.stdout);
        let service = "vmrs-test-registry".to_owned();
        let issuer = "vmrs-test-issuer".to_owned();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let issued = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let (svc, iss, iss_n, ref_n) = (service.clone(), issuer.clone(), issued.clone(), refused.clone());
        let user = user.to_owned();
        let server = Server::start(move |stream| {
            let Some(req) = read_request(&stream) else {
                return;
            };
            let auth = req
                .headers
                .iter()
                .find(|(k, _)| k == "authorization")
                .map(|(_, v)| v.as_str());
            if auth != Some(expected.as_str()) {
                ref_n.fetch_add(1, Ordering::SeqCst);
                respond(
                    &stream,
                    "401 Unauthorized",
                    "application/json",
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
                );
                return;
            }
            let query = req.target.split_once('?').map_or("", |(_, q)| q);
            let mut access = Vec::new();
            for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
                if k != "scope" {
                    continue;
                }
                let scope = percent_decode(v);
                // repository:NAME:ACTIONS (NAME may hold '/', not ':')
                let mut it = scope.splitn(3, ':');
                if let (Some(kind), Some(name), Some(actions)) = (it.next(), it.next(), it.next()) {
                    access.push(serde_json::json!({
                        "type": kind,
                        "name": name,
                        "actions": actions.split(',').collect::<Vec<_>>(),
                    }));
                }
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
            let claims = serde_json::json!({
                "iss": iss, "sub": user, "aud": svc, "exp": now + 300, "nbf": now - 10,
                "iat": now, "jti": format!("{now}-{}", iss_n.load(Ordering::SeqCst)),
                "access": access,
            });
            let signing_input = format!(
                "{}.{}",
                b64url(header.to_string().as_bytes()),
                b64url(claims.to_string().as_bytes())
            );
            let mut child = Command::new("openssl")
                .args(["dgst", "-sha256", "-sign", s(&key)])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(signing_input.as_bytes())
                .unwrap();
            let sig = child.wait_with_output().unwrap();
            assert!(sig.status.success());
            let token = format!("{signing_input}.{}", b64url(&sig.stdout));
            iss_n.fetch_add(1, Ordering::SeqCst);
            let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300});
            respond(&stream, "200 OK", "application/json", body.to_string().as_bytes());
        });
        Self {
            server,
            dir,
            cert,
            service,
            issuer,
            issued,
            refused,
        }
    }

    /// The `realm` URL.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.server.addr)
    }
}

/// Serves the files under `root` by path (GET and HEAD), as the object store behind a
/// registry's `redirect` middleware would. With `corrupt`, every body has its first byte flipped.
pub struct BlobServer {
    server: Server,
    /// GETs served.
    pub served: Arc<AtomicUsize>,
}

impl BlobServer {
    pub fn start(root: PathBuf, corrupt: bool) -> Self {
        let served = Arc::new(AtomicUsize::new(0));
        let n = served.clone();
        let server = Server::start(move |stream| {
            let Some(req) = read_request(&stream) else {
                return;
            };
            let path = req.target.split('?').next().unwrap_or("");
            let rel = percent_decode(path.trim_start_matches('/'));
            if rel.split('/').any(|c| c == "..") {
                respond(&stream, "400 Bad Request", "text/plain", b"");
                return;
            }
            let mut bytes = Vec::new();
            if std::fs::File::open(root.join(&rel))
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .is_err()
            {
                respond(&stream, "404 Not Found", "text/plain", b"");
                return;
            }
            if corrupt {
                if let Some(b) = bytes.first_mut() {
                    *b ^= 0xff;
                }
            }
            if req.method == "HEAD" {
                let mut s = &stream;
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    bytes.len()
                );
                return;
            }
            n.fetch_add(1, Ordering::SeqCst);
            respond(&stream, "200 OK", "application/octet-stream", &bytes);
        });
        Self { server, served }
    }

    /// `http://127.0.0.1:<port>/`
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.server.addr)
    }
}
