//! Registry credentials: explicit, or from the Docker client config.
//!
//! Lookup order for a registry when the caller gives no [`Credentials`]:
//! 1. `credHelpers[<registry>]` in `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`):
//!    run `docker-credential-<helper> get` with the server URL on stdin;
//! 2. `auths[<registry>]`: `auth` (base64 `user:password`), `username`/`password`, or
//!    `registrytoken` (a bearer token);
//! 3. `credsStore`: the default helper, as in 1.
//!
//! A helper that is not installed, or that has nothing for the registry, means anonymous
//! access. Keys of `auths` may carry a scheme and path (`https://index.docker.io/v1/`); they
//! are compared by host. Docker Hub is known under several names, all tried.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Credentials {
    /// No credentials (anonymous token or none at all).
    #[default]
    Anonymous,
    /// HTTP basic: user name and password (also used to obtain bearer tokens).
    Basic {
        /// User name.
        username: String,
        /// Password or access token.
        password: String,
    },
    /// A ready bearer token.
    Bearer(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Self::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

impl Credentials {
    pub(crate) fn to_oci(&self) -> oci_client::secrets::RegistryAuth {
        use oci_client::secrets::RegistryAuth;
        match self {
            Self::Anonymous => RegistryAuth::Anonymous,
            Self::Basic { username, password } => RegistryAuth::Basic(username.clone(), password.clone()),
            Self::Bearer(t) => RegistryAuth::Bearer(t.clone()),
        }
    }
}

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The Docker config exists but cannot be read.
    #[error("cannot read docker config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The Docker config is not valid JSON.
    #[error("docker config {path} is invalid")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// An `auth` entry is not base64 `user:password`.
    #[error("auth entry for {registry} in {path} is malformed")]
    MalformedAuth {
        /// The registry key.
        registry: String,
        /// The file.
        path: PathBuf,
    },
    /// A credential helper ran but failed or answered nonsense.
    #[error("credential helper docker-credential-{helper} failed for {registry}: {detail}")]
    Helper {
        /// The helper name.
        helper: String,
        /// The registry.
        registry: String,
        /// What went wrong.
        detail: String,
    },
}

impl AuthError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            AuthError::Read { .. } => crate::ErrorKind::Other,
            AuthError::Parse { .. } | AuthError::MalformedAuth { .. } => crate::ErrorKind::Invalid,
            AuthError::Helper { .. } => crate::ErrorKind::Backend,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// Path of the Docker client config: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    dirs::home_dir().map(|h| h.join(".docker").join("config.json"))
}

fn is_docker_hub(host: &str) -> bool {
    matches!(host, "docker.io" | "index.docker.io" | "registry-1.docker.io")
}

/// Host part of an `auths` key (`https://index.docker.io/v1/` → `index.docker.io`).
fn key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

fn same_registry(key: &str, registry: &str) -> bool {
    let host = key_host(key);
    host == registry || (is_docker_hub(host) && is_docker_hub(registry))
}

/// Credentials for `registry` from the Docker config (see the module docs), `None` if none.
pub async fn docker_credentials(registry: &str) -> Result<Option<Credentials>, AuthError> {
    match docker_config_path() {
        Some(path) => docker_credentials_from(&path, registry).await,
        None => Ok(None),
    }
}

/// Credentials for `registry` from the Docker config file at `path`, `None` if none.
pub async fn docker_credentials_from(
    path: &std::path::Path,
    registry: &str,
) -> Result<Option<Credentials>, AuthError> {
    let path = path.to_owned();
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(AuthError::Read { path, source }),
    };
    let config: DockerConfig = serde_json::from_slice(&bytes).map_err(|source| AuthError::Parse {
        path: path.clone(),
        source,
    })?;
    let server = if is_docker_hub(registry) {
        "https://index.docker.io/v1/".to_owned()
    } else {
        registry.to_owned()
    };
    if let Some((_, helper)) = config
        .cred_helpers
        .iter()
        .find(|(k, _)| same_registry(k, registry))
    {
        return run_helper(helper, &server, registry).await;
    }
    if let Some((key, entry)) = config.auths.iter().find(|(k, _)| same_registry(k, registry)) {
        if let Some(token) = entry.registrytoken.as_ref().filter(|t| !t.is_empty()) {
            return Ok(Some(Credentials::Bearer(token.clone())));
        }
        if let Some(auth) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
            let malformed = || AuthError::MalformedAuth {
                registry: key.clone(),
                path: path.clone(),
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| malformed())?;
            let text = String::from_utf8(decoded).map_err(|_| malformed())?;
            let (u, p) = text.split_once(':').ok_or_else(malformed)?;
            return Ok(Some(Credentials::Basic {
                username: u.to_owned(),
                password: p.to_owned(),
            }));
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(Some(Credentials::Basic {
                username: u.clone(),
                password: p.clone(),
            }));
        }
    }
    if let Some(store) = config.creds_store.as_ref().filter(|s| !s.is_empty()) {
        return run_helper(store, &server, registry).await;
    }
    Ok(None)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperReply {
    username: String,
    secret: String,
}

async fn run_helper(helper: &str, server: &str, registry: &str) -> Result<Option<Credentials>, AuthError> {
    let fail = |detail: String| AuthError::Helper {
        helper: helper.to_owned(),
        registry: registry.to_owned(),
        detail,
    };
    if helper.is_empty()
        || !helper
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(fail("invalid helper name".to_owned()));
    }
    let program = format!("docker-credential-{helper}");
    let child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        // Not installed: behave as if there were no credentials.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fail(e.to_string())),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A helper may exit without reading (e.g. nothing stored): a broken pipe is not fatal,
        // its exit status and output decide.
        match stdin.write_all(server.as_bytes()).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => return Err(fail(e.to_string())),
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| fail("timed out".to_owned()))?
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        if msg.to_ascii_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(msg.trim().chars().take(200).collect()));
    }
    let reply: HelperReply = serde_json::from_slice(&out.stdout).map_err(|e| fail(e.to_string()))?;
    if reply.username == "<token>" {
        // An identity (refresh) token needs an OAuth exchange this client does not do.
        return Ok(None);
    }
    Ok(Some(Credentials::Basic {
        username: reply.username,
        password: reply.secret,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn registry_keys_match_by_host() {
        assert!(same_registry("https://index.docker.io/v1/", "docker.io"));
        assert!(same_registry("localhost:5000", "localhost:5000"));
        assert!(same_registry("http://localhost:5000/v2/", "localhost:5000"));
        assert!(!same_registry("ghcr.io", "docker.io"));
    }

    #[test]
    fn credentials_debug_redacts() {
        let c = Credentials::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
