//! The image config: what the image says about how to run it.
//!
//! Parsed from the config blob (OCI `application/vnd.oci.image.config.v1+json` or Docker's
//! `application/vnd.docker.container.image.v1+json`, which share the fields used here) into
//! [`ImageConfig`], a typed view consumed when an image is run as a VM.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::digest::Digest;

/// Largest config blob accepted, in bytes.
pub const MAX_CONFIG_BYTES: usize = 8 << 20;

/// Transport protocol of an exposed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// TCP (the default when the image does not say).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// A port the image declares it listens on (`EXPOSE 80/tcp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExposedPort {
    /// Port number.
    pub port: u16,
    /// Protocol.
    pub protocol: PortProtocol,
}

/// How the image wants to be run, plus its platform and layer digests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// CPU architecture (`amd64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// Architecture variant (`v8`), if any.
    pub variant: Option<String>,
    /// Creation time as written in the image (RFC 3339), if any.
    pub created: Option<String>,
    /// `ENTRYPOINT`: the program and its leading arguments (may be empty).
    pub entrypoint: Vec<String>,
    /// `CMD`: default arguments (or the program, when there is no entrypoint).
    pub cmd: Vec<String>,
    /// `ENV`, as `KEY=value` strings in image order.
    pub env: Vec<String>,
    /// `WORKDIR`, if set.
    pub working_dir: Option<String>,
    /// `USER` (`name`, `uid`, `uid:gid`, `name:group`), if set.
    pub user: Option<String>,
    /// `EXPOSE`d ports, sorted.
    pub exposed_ports: Vec<ExposedPort>,
    /// `LABEL`s.
    pub labels: BTreeMap<String, String>,
    /// `STOPSIGNAL`, if set.
    pub stop_signal: Option<String>,
    /// `VOLUME`s, sorted.
    pub volumes: Vec<String>,
    /// Digests of the uncompressed layers, bottom first (`rootfs.diff_ids`).
    pub diff_ids: Vec<Digest>,
}

/// Why a config blob was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Larger than [`MAX_CONFIG_BYTES`].
    #[error("image config is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON of the expected shape.
    #[error("image config is not valid json of the expected shape")]
    Json(#[source] serde_json::Error),
}

impl ConfigError {
    /// What kind of failure this is (see [`crate::error`]): always invalid input.
    pub fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::Invalid
    }
}

#[derive(Deserialize, Default)]
struct RawConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    config: Option<RawRunConfig>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawRunConfig {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    stop_signal: Option<String>,
    #[serde(default)]
    volumes: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Deserialize, Default)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<Digest>,
}

impl ImageConfig {
    /// Parses a config blob. Ports that do not parse (`"abc/tcp"`) are dropped.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                size: bytes.len(),
                max: MAX_CONFIG_BYTES,
            });
        }
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(ConfigError::Json)?;
        let run = raw.config.unwrap_or_default();
        let mut exposed_ports: Vec<ExposedPort> = run
            .exposed_ports
            .unwrap_or_default()
            .keys()
            .filter_map(|k| parse_port(k))
            .collect();
        exposed_ports.sort();
        exposed_ports.dedup();
        Ok(Self {
            architecture: raw.architecture,
            os: raw.os,
            variant: raw.variant.filter(|v| !v.is_empty()),
            created: raw.created,
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.filter(|w| !w.is_empty()),
            user: run.user.filter(|u| !u.is_empty()),
            exposed_ports,
            labels: run.labels.unwrap_or_default(),
            stop_signal: run.stop_signal.filter(|s| !s.is_empty()),
            volumes: run.volumes.unwrap_or_default().into_keys().collect(),
            diff_ids: raw.rootfs.unwrap_or_default().diff_ids,
        })
    }

    /// The command line the image runs by default: entrypoint followed by cmd.
    pub fn argv(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }

    /// `env` split into `(key, value)` pairs (entries without `=` get an empty value).
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (e.clone(), String::new()),
            })
            .collect()
    }
}

fn parse_port(key: &str) -> Option<ExposedPort> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "tcp" => PortProtocol::Tcp,
        "udp" => PortProtocol::Udp,
        "sctp" => PortProtocol::Sctp,
        _ => return None,
    };
    Some(ExposedPort {
        port: port.parse().ok()?,
        protocol,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_run_config() {
        let d = Digest::of(b"layer");
        let json = serde_json::json!({
            "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
            "config": {
                "User": "1000:1000", "Env": ["PATH=/bin", "EMPTY"],
                "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "WorkingDir": "/srv",
                "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "bogus/tcp": {}, "8080": {}},
                "Labels": {"a": "b"}, "StopSignal": "SIGTERM", "Volumes": {"/data": {}}
            },
            "rootfs": {"type": "layers", "diff_ids": [d.to_string()]}
        });
        let c = ImageConfig::parse(json.to_string().as_bytes()).unwrap();
        assert_eq!(c.argv(), ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(c.env_pairs()[1], ("EMPTY".to_owned(), String::new()));
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.working_dir.as_deref(), Some("/srv"));
        let ports: Vec<(u16, PortProtocol)> = c.exposed_ports.iter().map(|p| (p.port, p.protocol)).collect();
        assert_eq!(
            ports,
            [
                (53, PortProtocol::Udp),
                (80, PortProtocol::Tcp),
                (8080, PortProtocol::Tcp)
            ]
        );
        assert_eq!(c.labels["a"], "b");
        assert_eq!(c.volumes, ["/data"]);
        assert_eq!(c.diff_ids, [d]);
    }

    #[test]
    fn tolerates_missing_and_null_fields() {
        let c = ImageConfig::parse(br#"{"config":{"Env":null,"Cmd":null}}"#).unwrap();
        assert!(c.argv().is_empty());
        assert!(ImageConfig::parse(b"42").is_err());
    }
}
