//! A real Docker registry (Debian's `docker-registry`, distribution v2) started by the test on
//! 127.0.0.1:<free port> with its own config and storage in a temp dir. The guard kills it
//! on drop, also when the test fails.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Polls `cond` every 50 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET; returns the status code.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A running registry.
pub struct Registry {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    /// `user:password` when started with htpasswd auth (or for the token server).
    pub creds: Option<(String, String)>,
    data: PathBuf,
}

/// Token authentication (`auth: token`, the Docker token spec): the registry sends clients to
/// `realm` and accepts JWTs signed by a key whose certificate chains to `root_cert`.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub root_cert: PathBuf,
}

/// How to start a registry beyond the defaults (plain HTTP, no auth, its own storage).
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// htpasswd basic auth for one user.
    pub basic: Option<(String, String)>,
    /// `(certificate chain PEM, key PEM)`: serve HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Bearer-token auth.
    pub token: Option<TokenAuth>,
    /// Storage `redirect` middleware: blob GETs answer 307 to `<baseurl><storage path>`.
    pub redirect_baseurl: Option<String>,
    /// Serve this storage directory (e.g. another registry's `data_dir()`) instead of a new one.
    pub data: Option<PathBuf>,
}

impl Registry {
    /// Starts a registry without auth.
    pub fn start() -> Self {
        Self::start_with(RegistryOptions::default())
    }

    /// Starts a registry with htpasswd basic auth for one user (bcrypt via `htpasswd -B`).
    pub fn start_with_auth(user: &str, password: &str) -> Self {
        Self::start_with(RegistryOptions {
            basic: Some((user.to_owned(), password.to_owned())),
            ..RegistryOptions::default()
        })
    }

    /// Starts a registry configured by `opts`.
    pub fn start_with(opts: RegistryOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let data = opts.data.clone().unwrap_or_else(|| dir.path().join("data"));
        std::fs::create_dir_all(&data).unwrap();
        let creds = opts.basic.clone();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            data.display()
        );
        if let Some((cert, key)) = &opts.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        if let Some(base) = &opts.redirect_baseurl {
            config.push_str(&format!(
                "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: {base}\n"
            ));
        }
        if let Some(t) = &opts.token {
            config.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                t.realm,
                t.service,
                t.issuer,
                t.root_cert.display()
            ));
        }
        if let Some((user, password)) = &creds {
            let htpasswd = dir.path().join("htpasswd");
            let status = Command::new("htpasswd")
                .args(["-B", "-b", "-c"])
                .arg(&htpasswd)
                .args([user, password])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("htpasswd (apache2-utils) is installed");
            assert!(status.success(), "htpasswd failed");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: vmrs-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        use std::os::unix::process::CommandExt;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("docker-registry is installed");
        let mut reg = Self {
            child,
            addr,
            dir,
            creds,
            data,
        };
        // A TLS listener answers a plain request with 400.
        let up = wait_until(Duration::from_secs(20), || {
            if let Ok(Some(status)) = reg.child.try_wait() {
                panic!("registry exited early: {status}: {}", reg.log());
            }
            matches!(http_status(addr, "/v2/"), Some(200 | 400 | 401))
        });
        assert!(up, "registry did not come up: {}", reg.log());
        reg
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Pushes an OCI layout (`oci:<dir>:<tag>`) as `<host>/<repo>:<tag>` with skopeo.
    pub fn push_layout(&self, layout: &Path, tag: &str, repo: &str, all: bool) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests"]);
        if all {
            cmd.arg("--all");
        }
        if let Some((u, p)) = &self.creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()));
        cmd.arg(format!("docker://{}/{repo}:{tag}", self.host()));
        let out = cmd.output().expect("skopeo is installed");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The storage directory (to check what the registry holds).
    pub fn data_dir(&self) -> PathBuf {
        self.data.clone()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // The registry runs in its own process group; kill the whole group.
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) with a negative pid signals the process group we created; no memory
        // is touched.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
