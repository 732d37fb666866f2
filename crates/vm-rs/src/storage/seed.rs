//! cloud-init NoCloud seed images.
//!
//! cloud-init's NoCloud datasource looks for a filesystem labelled `cidata` holding three
//! files:
//!
//! * `meta-data` — `instance-id` (a new id makes cloud-init re-run per-instance modules) and
//!   `local-hostname`;
//! * `user-data` — a `#cloud-config` document: hostname, users and their SSH keys,
//!   `write_files`, `mounts` (fstab lines) and `runcmd`;
//! * `network-config` — netplan-style version 2 config (static addresses, routes, DNS).
//!
//! [`write_seed_image`] renders the three files from a [`SeedConfig`] and writes them into a
//! small FAT image (pure Rust, `fatfs`; no `genisoimage`/`mkfs.vfat`), which the VM gets as an
//! extra read-only disk.
//!
//! ## Hostile input
//! Every value is validated first ([`SeedConfig::validate`]): hostnames are RFC 1123, user names
//! are POSIX-portable, SSH keys must parse as OpenSSH public keys, addresses must parse as IP
//! networks, fstab fields may not contain whitespace, and no value may hold control characters.
//! Then the YAML is emitted with every string double-quoted and escaped (see `yaml.rs`), so even
//! a value that slipped through could not add keys. `runcmd` entries are argument vectors, which
//! cloud-init executes without a shell; file contents are base64-encoded.

use super::fsutil;
use super::yaml::{self, Yaml};
use base64::Engine;
use std::io::{Cursor, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Volume label cloud-init's NoCloud datasource looks for.
pub const SEED_LABEL: &str = "cidata";
/// Largest total file content a seed accepts.
pub const MAX_SEED_CONTENT: usize = 32 << 20;

/// Errors from building a seed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SeedError {
    /// A value failed validation.
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        /// Which field (`hostname`, `users[0].name`, ...).
        field: String,
        /// The rejected value (escaped by `Debug`).
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// The seed's files exceed [`MAX_SEED_CONTENT`].
    #[error("seed content is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// Total content size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Building the FAT image failed.
    #[error("build FAT image")]
    Fat(#[source] std::io::Error),
    /// Writing the image file failed.
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
    #[error("seed task did not complete")]
    Join(#[source] tokio::task::JoinError),
}

impl SeedError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            SeedError::Invalid { .. } | SeedError::TooLarge { .. } => K::Invalid,
            SeedError::Io { source, .. } => K::of_io(source),
            SeedError::Fat(_) | SeedError::Join(_) => K::Other,
        }
    }
}

fn invalid(field: impl Into<String>, value: &str, reason: &'static str) -> SeedError {
    SeedError::Invalid {
        field: field.into(),
        value: value.chars().take(200).collect(),
        reason,
    }
}

/// A user account created by cloud-init.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SeedUser {
    /// Login name: `[a-z_][a-z0-9_-]*`, at most 32 characters.
    pub name: String,
    /// OpenSSH public keys (`ssh-ed25519 AAAA... comment`).
    pub ssh_authorized_keys: Vec<String>,
    /// Grant passwordless sudo.
    pub sudo: bool,
    /// Login shell (absolute path), default the distribution's.
    pub shell: Option<String>,
    /// Supplementary groups.
    pub groups: Vec<String>,
}

impl SeedUser {
    /// A user with the given keys and passwordless sudo.
    pub fn new(name: impl Into<String>, keys: Vec<String>) -> Self {
        Self {
            name: name.into(),
            ssh_authorized_keys: keys,
            sudo: true,
            shell: None,
            groups: Vec::new(),
        }
    }
}

/// Static (or DHCP) configuration of one guest network interface (netplan v2 `ethernets`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SeedNic {
    /// Interface name in the guest (`eth0`, `enp0s3`); with `mac` set, the matched NIC is
    /// renamed to this.
    pub name: String,
    /// Match the interface by MAC address (`52:54:00:12:34:56`).
    pub mac: Option<String>,
    /// Use DHCPv4.
    pub dhcp4: bool,
    /// Static addresses with prefix length (`10.0.0.2/24`, `fd00::2/64`).
    pub addresses: Vec<String>,
    /// Default gateway.
    pub gateway: Option<IpAddr>,
    /// DNS servers.
    pub nameservers: Vec<IpAddr>,
}

/// A file written by cloud-init (`write_files`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SeedFile {
    /// Absolute path in the guest.
    pub path: String,
    /// Content (any bytes; stored base64-encoded).
    pub content: Vec<u8>,
    /// Mode bits, e.g. `0o644` (default cloud-init's `0644`).
    pub permissions: Option<u32>,
    /// `user:group` (default `root:root`).
    pub owner: Option<String>,
}

/// An fstab entry added by cloud-init (`mounts`), e.g. a virtio-fs share.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SeedMount {
    /// Device, label or virtio-fs tag (`/dev/vdb`, `LABEL=data`, `share0`).
    pub source: String,
    /// Absolute mount point.
    pub mount_point: String,
    /// Filesystem type (`ext4`, `virtiofs`, `auto`).
    pub fstype: String,
    /// Mount options (`defaults,nofail`).
    pub options: String,
}

/// Everything a NoCloud seed carries. Build with [`SeedConfig::new`] and push to the lists.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SeedConfig {
    /// Guest hostname (RFC 1123).
    pub hostname: String,
    /// cloud-init instance id; default `iid-<hostname>-<12 hex digits of the config's hash>`,
    /// so a changed configuration is a new instance to cloud-init.
    pub instance_id: Option<String>,
    /// Keys for the distribution's default user (`ubuntu`, `debian`, ...).
    pub ssh_authorized_keys: Vec<String>,
    /// Extra users. When non-empty the default user is kept (`- default` is emitted first).
    pub users: Vec<SeedUser>,
    /// Network interfaces; empty leaves the image's default (usually DHCP on the first NIC).
    pub network: Vec<SeedNic>,
    /// Files to write.
    pub write_files: Vec<SeedFile>,
    /// fstab entries.
    pub mounts: Vec<SeedMount>,
    /// Commands run once at first boot, each an argument vector (no shell).
    pub runcmd: Vec<Vec<String>>,
}

/// The three rendered documents of a seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    /// `meta-data`.
    pub meta_data: String,
    /// `user-data` (starts with `#cloud-config`).
    pub user_data: String,
    /// `network-config`, when the config has interfaces.
    pub network_config: Option<String>,
}

fn check_no_controls(field: &str, v: &str) -> Result<(), SeedError> {
    if v.chars().any(char::is_control) {
        return Err(invalid(field, v, "control characters are not allowed"));
    }
    Ok(())
}

/// RFC 1123 hostname: dot-separated labels of `[A-Za-z0-9-]`, 1-63 each, no leading or
/// trailing `-`, at most 253 characters.
pub fn validate_hostname(h: &str) -> Result<(), SeedError> {
    if h.is_empty() || h.len() > 253 {
        return Err(invalid("hostname", h, "must be 1-253 characters"));
    }
    for label in h.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(invalid("hostname", h, "labels must be 1-63 characters"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(invalid(
                "hostname",
                h,
                "only letters, digits, '-' and '.' are allowed",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid("hostname", h, "labels may not start or end with '-'"));
        }
    }
    Ok(())
}

fn validate_user_name(field: &str, n: &str) -> Result<(), SeedError> {
    let mut bytes = n.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    if !first_ok
        || n.len() > 32
        || !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(invalid(
            field,
            n,
            "must match [a-z_][a-z0-9_-]* and be at most 32 characters",
        ));
    }
    Ok(())
}

/// Check and normalize an OpenSSH public key line: it must parse, and its comment may not
/// hold control characters. Returns the canonical `algo base64 [comment]` form.
pub fn validate_ssh_public_key(field: &str, key: &str) -> Result<String, SeedError> {
    check_no_controls(field, key.trim_end_matches(['\n', '\r']))?;
    let parsed = ssh_key::PublicKey::from_openssh(key.trim())
        .map_err(|_| invalid(field, key, "not an OpenSSH public key"))?;
    parsed
        .to_openssh()
        .map_err(|_| invalid(field, key, "not an OpenSSH public key"))
}

fn validate_abs_path(field: &str, p: &str) -> Result<(), SeedError> {
    check_no_controls(field, p)?;
    if !p.starts_with('/') || p.len() > 4096 {
        return Err(invalid(field, p, "must be an absolute path"));
    }
    Ok(())
}

fn validate_fstab_field(field: &str, v: &str) -> Result<(), SeedError> {
    check_no_controls(field, v)?;
    if v.is_empty() || v.len() > 1024 || v.chars().any(|c| c.is_whitespace() || c == '#') {
        return Err(invalid(
            field,
            v,
            "must be non-empty without whitespace or '#' (one fstab field)",
        ));
    }
    Ok(())
}

fn validate_ifname(field: &str, n: &str) -> Result<(), SeedError> {
    if n.is_empty()
        || n.len() > 15
        || !n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(invalid(field, n, "must be 1-15 characters of [A-Za-z0-9_.-]"));
    }
    Ok(())
}

fn validate_mac(field: &str, m: &str) -> Result<(), SeedError> {
    let parts: Vec<&str> = m.split(':').collect();
    if parts.len() != 6
        || !parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(invalid(field, m, "must be six ':'-separated hex octets"));
    }
    Ok(())
}

fn validate_cidr(field: &str, a: &str) -> Result<(), SeedError> {
    let (ip, prefix) = a
        .split_once('/')
        .ok_or_else(|| invalid(field, a, "must be ADDRESS/PREFIX"))?;
    let ip: IpAddr = ip.parse().map_err(|_| invalid(field, a, "not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix.parse::<u8>() {
        Ok(p) if p <= max && !prefix.starts_with('+') => Ok(()),
        _ => Err(invalid(field, a, "prefix length out of range")),
    }
}

impl SeedConfig {
    /// A seed for `hostname` with nothing else set.
    pub fn new(hostname: impl Into<String>) -> Self {
        Self {
            hostname: hostname.into(),
            ..Self::default()
        }
    }

    /// Check every value (see the module docs). [`render`](Self::render) calls this.
    pub fn validate(&self) -> Result<(), SeedError> {
        validate_hostname(&self.hostname)?;
        if let Some(id) = &self.instance_id {
            check_no_controls("instance_id", id)?;
            if id.is_empty() || id.len() > 256 {
                return Err(invalid("instance_id", id, "must be 1-256 characters"));
            }
        }
        for (i, k) in self.ssh_authorized_keys.iter().enumerate() {
            validate_ssh_public_key(&format!("ssh_authorized_keys[{i}]"), k)?;
        }
        for (i, u) in self.users.iter().enumerate() {
            validate_user_name(&format!("users[{i}].name"), &u.name)?;
            for (j, k) in u.ssh_authorized_keys.iter().enumerate() {
                validate_ssh_public_key(&format!("users[{i}].ssh_authorized_keys[{j}]"), k)?;
            }
            if let Some(sh) = &u.shell {
                validate_abs_path(&format!("users[{i}].shell"), sh)?;
            }
            for (j, g) in u.groups.iter().enumerate() {
                validate_user_name(&format!("users[{i}].groups[{j}]"), g)?;
            }
        }
        for (i, n) in self.network.iter().enumerate() {
            validate_ifname(&format!("network[{i}].name"), &n.name)?;
            if let Some(mac) = &n.mac {
                validate_mac(&format!("network[{i}].mac"), mac)?;
            }
            for (j, a) in n.addresses.iter().enumerate() {
                validate_cidr(&format!("network[{i}].addresses[{j}]"), a)?;
            }
            if !n.dhcp4 && n.addresses.is_empty() {
                return Err(invalid(
                    format!("network[{i}]"),
                    &n.name,
                    "needs dhcp4 or at least one address",
                ));
            }
        }
        let mut total = 0usize;
        for (i, f) in self.write_files.iter().enumerate() {
            validate_abs_path(&format!("write_files[{i}].path"), &f.path)?;
            if let Some(mode) = f.permissions {
                if mode > 0o7777 {
                    return Err(invalid(
                        format!("write_files[{i}].permissions"),
                        &format!("{mode:o}"),
                        "must be at most 07777",
                    ));
                }
            }
            if let Some(owner) = &f.owner {
                let field = format!("write_files[{i}].owner");
                let (u, g) = owner.split_once(':').unwrap_or((owner.as_str(), ""));
                validate_user_name(&field, u)?;
                if !g.is_empty() {
                    validate_user_name(&field, g)?;
                }
            }
            total = total.saturating_add(f.content.len());
        }
        if total > MAX_SEED_CONTENT {
            return Err(SeedError::TooLarge {
                size: total,
                max: MAX_SEED_CONTENT,
            });
        }
        for (i, m) in self.mounts.iter().enumerate() {
            validate_fstab_field(&format!("mounts[{i}].source"), &m.source)?;
            validate_fstab_field(&format!("mounts[{i}].mount_point"), &m.mount_point)?;
            validate_abs_path(&format!("mounts[{i}].mount_point"), &m.mount_point)?;
            validate_fstab_field(&format!("mounts[{i}].fstype"), &m.fstype)?;
            validate_fstab_field(&format!("mounts[{i}].options"), &m.options)?;
        }
        for (i, argv) in self.runcmd.iter().enumerate() {
            if argv.is_empty() || argv[0].is_empty() {
                return Err(invalid(format!("runcmd[{i}]"), "", "empty command"));
            }
            for a in argv {
                check_no_controls(&format!("runcmd[{i}]"), a)?;
            }
        }
        Ok(())
    }

    /// Validate and render `meta-data`, `user-data` and `network-config`.
    pub fn render(&self) -> Result<SeedFiles, SeedError> {
        self.validate()?;
        let canon_keys = |keys: &[String], field: &str| -> Result<Vec<String>, SeedError> {
            keys.iter().map(|k| validate_ssh_public_key(field, k)).collect()
        };
        let mut user = vec![
            ("hostname", Yaml::from(self.hostname.as_str())),
            ("preserve_hostname", Yaml::Bool(false)),
        ];
        if !self.ssh_authorized_keys.is_empty() {
            let keys = canon_keys(&self.ssh_authorized_keys, "ssh_authorized_keys")?;
            user.push(("ssh_authorized_keys", Yaml::strs(keys)));
        }
        if !self.users.is_empty() {
            let mut users = vec![Yaml::from("default")];
            for u in &self.users {
                let mut m = vec![("name", Yaml::from(u.name.as_str()))];
                if !u.ssh_authorized_keys.is_empty() {
                    let keys = canon_keys(&u.ssh_authorized_keys, "users.ssh_authorized_keys")?;
                    m.push(("ssh_authorized_keys", Yaml::strs(keys)));
                }
                if u.sudo {
                    m.push(("sudo", Yaml::from("ALL=(ALL) NOPASSWD:ALL")));
                }
                if let Some(sh) = &u.shell {
                    m.push(("shell", Yaml::from(sh.as_str())));
                }
                if !u.groups.is_empty() {
                    m.push(("groups", Yaml::strs(&u.groups)));
                }
                m.push(("lock_passwd", Yaml::Bool(true)));
                users.push(Yaml::map(m));
            }
            user.push(("users", Yaml::Seq(users)));
        }
        if !self.write_files.is_empty() {
            let b64 = base64::engine::general_purpose::STANDARD;
            let files = self
                .write_files
                .iter()
                .map(|f| {
                    let mut m = vec![
                        ("path", Yaml::from(f.path.as_str())),
                        ("encoding", Yaml::from("b64")),
                        ("content", Yaml::from(b64.encode(&f.content))),
                    ];
                    if let Some(mode) = f.permissions {
                        m.push(("permissions", Yaml::from(format!("0{mode:o}"))));
                    }
                    if let Some(owner) = &f.owner {
                        m.push(("owner", Yaml::from(owner.as_str())));
                    }
                    Yaml::map(m)
                })
                .collect();
            user.push(("write_files", Yaml::Seq(files)));
        }
        if !self.mounts.is_empty() {
            let mounts = self
                .mounts
                .iter()
                .map(|m| {
                    Yaml::strs([
                        m.source.as_str(),
                        m.mount_point.as_str(),
                        m.fstype.as_str(),
                        m.options.as_str(),
                        "0",
                        "0",
                    ])
                })
                .collect();
            user.push(("mounts", Yaml::Seq(mounts)));
        }
        if !self.runcmd.is_empty() {
            user.push(("runcmd", Yaml::Seq(self.runcmd.iter().map(Yaml::strs).collect())));
        }
        let user_data = format!("#cloud-config\n{}", yaml::to_string(&Yaml::map(user)));

        let network_config = if self.network.is_empty() {
            None
        } else {
            let eths = self
                .network
                .iter()
                .map(|n| {
                    let mut m = Vec::new();
                    if let Some(mac) = &n.mac {
                        m.push((
                            "match",
                            Yaml::map([("macaddress", Yaml::from(mac.to_ascii_lowercase()))]),
                        ));
                        m.push(("set-name", Yaml::from(n.name.as_str())));
                    }
                    m.push(("dhcp4", Yaml::Bool(n.dhcp4)));
                    if !n.addresses.is_empty() {
                        m.push(("addresses", Yaml::strs(&n.addresses)));
                    }
                    if let Some(gw) = n.gateway {
                        m.push((
                            "routes",
                            Yaml::Seq(vec![Yaml::map([
                                // "0.0.0.0/0" rather than netplan's "default", which
                                // cloud-init before 23.x cannot parse for non-netplan
                                // renderers.
                                ("to", Yaml::from(if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" })),
                                ("via", Yaml::from(gw.to_string())),
                            ])]),
                        ));
                    }
                    if !n.nameservers.is_empty() {
                        m.push((
                            "nameservers",
                            Yaml::map([(
                                "addresses",
                                Yaml::strs(n.nameservers.iter().map(|a| a.to_string())),
                            )]),
                        ));
                    }
                    (n.name.clone(), Yaml::map(m))
                })
                .collect::<Vec<_>>();
            Some(yaml::to_string(&Yaml::map([
                ("version", Yaml::Int(2)),
                ("ethernets", Yaml::Map(eths)),
            ])))
        };
        // Default instance id: changes whenever the configuration does, so cloud-init re-runs
        // its once-per-instance modules when a VM's disk is given a new seed.
        let instance_id = self.instance_id.clone().unwrap_or_else(|| {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            h.update(user_data.as_bytes());
            h.update(network_config.as_deref().unwrap_or("").as_bytes());
            format!("iid-{}-{}", self.hostname, &hex::encode(h.finalize())[..12])
        });
        let meta = Yaml::map([
            ("instance-id", Yaml::from(instance_id)),
            ("local-hostname", Yaml::from(self.hostname.as_str())),
        ]);
        Ok(SeedFiles {
            meta_data: yaml::to_string(&meta),
            user_data,
            network_config,
        })
    }
}

/// Build the FAT image bytes holding `files`, labelled [`SEED_LABEL`].
pub fn build_seed_image(files: &SeedFiles) -> Result<Vec<u8>, SeedError> {
    let mut entries: Vec<(&str, &[u8])> = vec![
        ("meta-data", files.meta_data.as_bytes()),
        ("user-data", files.user_data.as_bytes()),
    ];
    if let Some(n) = &files.network_config {
        entries.push(("network-config", n.as_bytes()));
    }
    let content: usize = entries.iter().map(|(_, d)| d.len()).sum();
    // Room for FATs, directory and cluster slack; whole MiB, at least 2 MiB.
    let size = (content + content / 8 + (1 << 20)).div_ceil(1 << 20).max(2) << 20;
    let mut label = [b' '; 11];
    label[..SEED_LABEL.len()].copy_from_slice(SEED_LABEL.as_bytes());
    let mut disk = Cursor::new(vec![0u8; size]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(label)
            .volume_id(volume_id(files)),
    )
    .map_err(SeedError::Fat)?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(SeedError::Fat)?;
        {
            let root = fs.root_dir();
            for (name, data) in &entries {
                let mut f = root.create_file(name).map_err(SeedError::Fat)?;
                f.truncate().map_err(SeedError::Fat)?;
                f.write_all(data).map_err(SeedError::Fat)?;
                f.flush().map_err(SeedError::Fat)?;
            }
        }
        fs.unmount().map_err(SeedError::Fat)?;
    }
    Ok(disk.into_inner())
}

/// A stable volume serial derived from the content (same seed, same image bytes).
fn volume_id(files: &SeedFiles) -> u32 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(files.meta_data.as_bytes());
    h.update(files.user_data.as_bytes());
    if let Some(n) = &files.network_config {
        h.update(n.as_bytes());
    }
    let d = h.finalize();
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// Validate `config`, render it and write the `cidata` FAT image to `path` (temp → fsync →
/// rename; an existing file at `path` is replaced, so a VM's seed can be regenerated).
pub async fn write_seed_image(path: &Path, config: &SeedConfig) -> Result<SeedFiles, SeedError> {
    let files = config.render()?;
    let dest = path.to_path_buf();
    let files2 = files.clone();
    tokio::task::spawn_blocking(move || -> Result<(), SeedError> {
        let image = build_seed_image(&files2)?;
        let io = |op: &'static str| {
            let path = dest.clone();
            move |source| SeedError::Io { op, path, source }
        };
        let mut tmp = fsutil::temp_beside(&dest).map_err(io("create temp file for"))?;
        tmp.write_all(&image).map_err(io("write"))?;
        fsutil::persist(tmp, &dest, true).map_err(io("publish"))?;
        Ok(())
    })
    .await
    .map_err(SeedError::Join)??;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@host";

    #[test]
    fn hostnames() {
        for ok in ["a", "web-1", "a.b.c", "x".repeat(63).as_str()] {
            assert!(validate_hostname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            "a b",
            "a;rm -rf /",
            "a\nruncmd: [x]",
            "h\": x",
            "x".repeat(64).as_str(),
        ] {
            assert!(validate_hostname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_are_parsed_not_pasted() {
        assert_eq!(validate_ssh_public_key("k", KEY).expect("valid"), KEY);
        let hostile = format!("{KEY}\nruncmd: [[sh, -c, evil]]");
        assert!(validate_ssh_public_key("k", &hostile).is_err());
        assert!(validate_ssh_public_key("k", "ssh-ed25519 notbase64").is_err());
        assert!(validate_ssh_public_key("k", "\"; rm -rf /").is_err());
    }

    #[test]
    fn renders_expected_documents() {
        let mut c = SeedConfig::new("vm1");
        c.ssh_authorized_keys.push(KEY.into());
        c.network.push(SeedNic {
            name: "eth0".into(),
            addresses: vec!["10.0.0.2/24".into()],
            gateway: Some("10.0.0.1".parse().expect("ip")),
            ..Default::default()
        });
        c.runcmd.push(vec!["touch".into(), "/tmp/it's $(here)".into()]);
        let f = c.render().expect("render");
        assert!(
            f.meta_data.starts_with("\"instance-id\": \"iid-vm1-")
                && f.meta_data.ends_with("\"\n\"local-hostname\": \"vm1\"\n"),
            "{}",
            f.meta_data
        );
        // Same config, same id; another config, another id; an explicit id is kept.
        assert_eq!(c.render().expect("render").meta_data, f.meta_data);
        let mut c2 = c.clone();
        c2.runcmd.push(vec!["true".into()]);
        assert_ne!(c2.render().expect("render").meta_data, f.meta_data);
        c2.instance_id = Some("fixed".into());
        assert!(c2
            .render()
            .expect("render")
            .meta_data
            .starts_with("\"instance-id\": \"fixed\"\n"));
        assert!(f.user_data.starts_with("#cloud-config\n"));
        assert!(f
            .user_data
            .contains("\"runcmd\":\n  - [\"touch\", \"/tmp/it's $(here)\"]\n"));
        let net = f.network_config.expect("network");
        assert!(net.contains("\"addresses\": [\"10.0.0.2/24\"]"));
        assert!(net.starts_with("\"version\": 2\n\"ethernets\":\n  \"eth0\":\n"));
    }

    #[test]
    fn hostile_values_are_rejected() {
        let base = SeedConfig::new("ok");
        let mut c = base.clone();
        c.mounts.push(SeedMount {
            source: "tag".into(),
            mount_point: "/mnt x".into(),
            fstype: "virtiofs".into(),
            options: "defaults".into(),
        });
        assert!(c.validate().is_err());
        let mut c = base.clone();
        c.runcmd.push(vec!["echo".into(), "a\nb".into()]);
        assert!(c.validate().is_err());
        let mut c = base.clone();
        c.users.push(SeedUser::new("root\n- name: evil", vec![]));
        assert!(c.validate().is_err());
        let mut c = base.clone();
        c.network.push(SeedNic {
            name: "eth0".into(),
            addresses: vec!["10.0.0.2/33".into()],
            ..Default::default()
        });
        assert!(c.validate().is_err());
        let mut c = base;
        c.write_files.push(SeedFile {
            path: "relative/path".into(),
            ..Default::default()
        });
        assert!(c.validate().is_err());
    }
}
