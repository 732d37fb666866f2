//! SSH key pairs for guest access: ed25519, generated in-process with the `ssh-key` crate (no
//! `ssh-keygen`), written in OpenSSH format — private key mode 0600, public key `.pub` beside
//! it — each via temp file → fsync → rename.

use super::fsutil;
use ssh_key::{rand_core::OsRng, Algorithm, LineEnding, PrivateKey, PublicKey};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Errors from generating or loading SSH keys.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SshKeyError {
    /// The private key file already exists (keys are never overwritten).
    #[error("{path} already exists")]
    Exists {
        /// The private key path.
        path: PathBuf,
    },
    /// Key generation or encoding failed.
    #[error("generate ed25519 key")]
    Key(#[source] ssh_key::Error),
    /// An existing public key file does not hold a valid key.
    #[error("{path} is not an OpenSSH public key")]
    BadPublicKey {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: ssh_key::Error,
    },
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The blocking task panicked or was cancelled.
    #[error("key task did not complete")]
    Join(#[source] tokio::task::JoinError),
}

impl SshKeyError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            SshKeyError::Exists { .. } => K::Conflict,
            SshKeyError::BadPublicKey { .. } => K::Invalid,
            SshKeyError::Io { source, .. } => K::of_io(source),
            SshKeyError::Key(_) | SshKeyError::Join(_) => K::Other,
        }
    }
}

/// A key pair on disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SshKeyPair {
    /// Private key file (OpenSSH format, mode 0600).
    pub private_key: PathBuf,
    /// Public key file (`<private>.pub`).
    pub public_key: PathBuf,
    /// The public key line, `ssh-ed25519 AAAA... comment`, ready for `authorized_keys`.
    pub public_openssh: String,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SshKeyError {
    let path = path.to_path_buf();
    move |source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            SshKeyError::Exists { path }
        } else {
            SshKeyError::Io { op, path, source }
        }
    }
}

/// The public key path for a private key path (`id_ed25519` → `id_ed25519.pub`).
pub fn public_key_path(private_key: &Path) -> PathBuf {
    let mut s = private_key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Generate a new ed25519 pair at `private_key` (+ `.pub`) with `comment`. Fails with
/// [`SshKeyError::Exists`] if the private key exists.
pub async fn generate_key_pair(private_key: &Path, comment: &str) -> Result<SshKeyPair, SshKeyError> {
    let (path, comment) = (private_key.to_path_buf(), comment.to_string());
    tokio::task::spawn_blocking(move || generate_blocking(&path, &comment))
        .await
        .map_err(SshKeyError::Join)?
}

fn generate_blocking(private_path: &Path, comment: &str) -> Result<SshKeyPair, SshKeyError> {
    if private_path.exists() {
        return Err(SshKeyError::Exists {
            path: private_path.to_path_buf(),
        });
    }
    let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(SshKeyError::Key)?;
    key.set_comment(comment);
    let private_pem = key.to_openssh(LineEnding::LF).map_err(SshKeyError::Key)?;
    let public = key.public_key().to_openssh().map_err(SshKeyError::Key)?;
    let public_path = public_key_path(private_path);

    // Public first: a crash in between leaves a stray .pub, never a private key without one.
    let mut tmp = fsutil::temp_beside(&public_path).map_err(io_err("create", &public_path))?;
    tmp.write_all(format!("{public}\n").as_bytes())
        .map_err(io_err("write", &public_path))?;
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io_err("chmod", &public_path))?;
    }
    fsutil::persist(tmp, &public_path, true).map_err(io_err("publish", &public_path))?;

    // NamedTempFile is created 0600, so the secret is never readable by others.
    let mut tmp = fsutil::temp_beside(private_path).map_err(io_err("create", private_path))?;
    tmp.write_all(private_pem.as_bytes())
        .map_err(io_err("write", private_path))?;
    fsutil::persist(tmp, private_path, false).map_err(io_err("publish", private_path))?;

    Ok(SshKeyPair {
        private_key: private_path.to_path_buf(),
        public_key: public_path,
        public_openssh: public,
    })
}

/// Load the pair at `private_key` if both files exist (the public key is parsed and checked),
/// else generate one.
pub async fn ensure_key_pair(private_key: &Path, comment: &str) -> Result<SshKeyPair, SshKeyError> {
    let public_path = public_key_path(private_key);
    if private_key.exists() && public_path.exists() {
        let text = tokio::fs::read_to_string(&public_path)
            .await
            .map_err(io_err("read", &public_path))?;
        let key = PublicKey::from_openssh(text.trim()).map_err(|source| SshKeyError::BadPublicKey {
            path: public_path.clone(),
            source,
        })?;
        return Ok(SshKeyPair {
            private_key: private_key.to_path_buf(),
            public_openssh: key.to_openssh().map_err(SshKeyError::Key)?,
            public_key: public_path,
        });
    }
    generate_key_pair(private_key, comment).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn generates_openssh_pair_with_private_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("id_ed25519");
        let pair = generate_key_pair(&p, "vmrs@test").await.expect("gen");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let private = PrivateKey::read_openssh_file(&p).expect("read private");
        assert_eq!(private.algorithm(), Algorithm::Ed25519);
        let public_text = std::fs::read_to_string(&pair.public_key).expect("read pub");
        assert!(public_text.starts_with("ssh-ed25519 "));
        assert!(public_text.trim_end().ends_with(" vmrs@test"));
        let public = PublicKey::from_openssh(public_text.trim()).expect("parse pub");
        assert_eq!(public.key_data(), private.public_key().key_data());

        assert!(matches!(
            generate_key_pair(&p, "x").await,
            Err(SshKeyError::Exists { .. })
        ));
        let again = ensure_key_pair(&p, "x").await.expect("ensure");
        assert_eq!(again.public_openssh, pair.public_openssh);
    }
}
