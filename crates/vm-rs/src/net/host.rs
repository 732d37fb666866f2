//! Host-side networking of a VM: TAP devices, bridges, addresses and NAT (through netlink and
//! the TUN ioctls; nftables for the masquerade rule), switch membership and port-forward
//! sidecars — created by [`prepare`], removed by [`teardown`], and cleaned up after crashes by
//! [`reconcile`].
//!
//! ## What the manager calls
//!
//! ```text
//! start:   let state = net::host::prepare(home, name, vm_dir, &config.networks).await?;
//!          // state is saved as <vm_dir>/net.json before any device is made
//!          devices.nics = state.nics (typed NICs);  cmdline.extend(state.guest_cmdline());
//!          devices.netns = state.netns   (the driver starts the VMM in it)
//!          (if QEMU fails to start: net::host::teardown(&state).await)
//! stop / kill / QEMU exited / remove:
//!          net::host::teardown(&state).await   // or teardown_vm_dir(vm_dir) from net.json
//! manager start (after reattaching):
//!          net::host::reconcile(home, &|vm| vm_is_running(vm)).await
//! ```
//!
//! ## Ownership tags
//!
//! Every device vm-rs creates carries an interface alias (`ip link` shows it):
//! `vmrs:<home id>:tap:<vm>:<nic>` on TAPs, `vmrs:<home id>:bridge` on bridges, where the
//! home id is a short hash of the data dir, so two vm-rs installations (or parallel tests)
//! never reap each other's devices. A TAP or bridge without such an alias was made by
//! someone else and is never deleted. NAT rules live in an nftables table
//! `vmrs_<home id>_<bridge>` (family `ip`), deleted with the bridge.

#[cfg_attr(not(target_os = "linux"), allow(unused_imports))]
use super::netns::{self, NetnsError};
use super::sidecar::{self, SidecarError, SidecarRecord};
use super::{plan, NetError, NicBackend, NicPlan};
#[cfg_attr(not(target_os = "linux"), allow(unused_imports))]
use crate::config::{Ipv4Cidr, NetworkAttachment};
#[cfg(target_os = "linux")]
use futures::TryStreamExt;
#[cfg(target_os = "linux")]
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prefix of the interface alias on every device vm-rs creates.
pub const ALIAS_PREFIX: &str = "vmrs:";
/// Version of [`NetState`] records.
pub const STATE_VERSION: u32 = 1;
/// File name of the record in the VM directory.
pub const STATE_FILE: &str = crate::vm_dir::VmDir::NET_STATE;

/// Errors setting up or tearing down host networking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The attachments are invalid.
    #[error("invalid network configuration")]
    Config(#[from] NetError),
    /// A netlink request failed.
    #[cfg(target_os = "linux")]
    #[error("netlink: cannot {op}")]
    Netlink {
        /// What was being done.
        op: String,
        /// Cause.
        #[source]
        source: rtnetlink::Error,
    },
    /// A TUN/TAP ioctl or sysctl failed.
    #[error("cannot {op}")]
    Io {
        /// What was being done.
        op: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The network namespace could not be entered.
    #[error("network namespace")]
    Netns(#[from] NetnsError),
    /// `nft` failed.
    #[error("nft {op} failed: {stderr}")]
    Firewall {
        /// What was being done.
        op: String,
        /// nft's message.
        stderr: String,
    },
    /// A switch or forwarder sidecar failed.
    #[error("network sidecar")]
    Sidecar(#[from] SidecarError),
    /// The `slirp4netns` user-mode network failed.
    #[error(transparent)]
    Slirp(#[from] super::slirp::SlirpError),
    /// Attachments of one VM name different namespaces.
    #[error("all tap and bridge networks of a vm must use the same namespace")]
    MixedNamespaces,
    /// An existing interface has the name vm-rs wanted and is not a TAP/bridge vm-rs made.
    #[error("interface {name} exists and was not created by vm-rs")]
    Foreign {
        /// Its name.
        name: String,
    },
    /// Host devices (TAPs, bridges, NAT rules) on a host that has none (they need Linux).
    #[error("{what} needs a Linux host")]
    Unsupported {
        /// What was asked for.
        what: &'static str,
    },
    /// An existing interface the user named is not the kind of device the attachment needs
    /// (e.g. `tap=lo`, `bridge=eth0`): refused before anything is configured on it.
    #[error("interface {name} is a {actual} device, not a {wanted}")]
    WrongKind {
        /// Its name.
        name: String,
        /// What the attachment needs (`tap` or `bridge`).
        wanted: &'static str,
        /// What the kernel says it is (`loopback`, `veth`, `physical`, ...).
        actual: String,
    },
}

impl HostError {
    /// What kind of failure this is, looking through to the cause (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            HostError::Config(e) => e.kind(),
            #[cfg(target_os = "linux")]
            HostError::Netlink { .. } => K::Backend,
            HostError::Firewall { .. } => K::Backend,
            HostError::Unsupported { .. } => K::Unsupported,
            HostError::Io { source, .. } => K::of_io(source),
            HostError::Netns(e) => e.kind(),
            HostError::Sidecar(e) => e.kind(),
            HostError::Slirp(e) => e.kind(),
            HostError::MixedNamespaces => K::Invalid,
            HostError::Foreign { .. } => K::Conflict,
            HostError::WrongKind { .. } => K::Invalid,
        }
    }
}

fn io_op(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> HostError {
    let op = op.into();
    move |source| HostError::Io { op, source }
}

#[cfg(target_os = "linux")]
fn nl_op(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> HostError {
    let op = op.into();
    move |source| HostError::Netlink { op, source }
}

/// A short id of a data dir, used in device tags.
pub fn home_id(home: &Path) -> String {
    let canon = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_path_buf());
    let h = super::hash(&["home", &canon.to_string_lossy()]);
    hex::encode(&h[..4])
}

/// The start of every TAP alias of the data dir `home_id` (a TAP's alias goes on with
/// `<vm>:<nic>`).
fn tap_alias_prefix(home_id: &str) -> String {
    format!("{ALIAS_PREFIX}{home_id}:tap:")
}

#[cfg(target_os = "linux")]
fn tap_alias(home_id: &str, vm: &str, index: usize) -> String {
    format!("{}{vm}:{index}", tap_alias_prefix(home_id))
}

fn bridge_alias(home_id: &str) -> String {
    format!("{ALIAS_PREFIX}{home_id}:bridge")
}

fn nat_table(home_id: &str, bridge: &str) -> String {
    let b: String = bridge
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("vmrs_{home_id}_{b}")
}

/// A device or rule [`prepare`] made (and [`teardown`] removes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum HostDevice {
    /// A TAP device.
    Tap {
        /// Name.
        name: String,
    },
    /// A bridge (deleted only when no interface is attached any more).
    Bridge {
        /// Name.
        name: String,
        /// Its NAT table, if NAT was asked for.
        #[serde(default)]
        nat_table: Option<String>,
    },
    /// The NAT table vm-rs added for a bridge it did not create (the user's): deleted when no
    /// TAP of this data dir is attached to that bridge any more (or the bridge is gone).
    Nat {
        /// The bridge.
        bridge: String,
        /// The nft table (`ip` family).
        table: String,
    },
    /// The VM's own network namespace (a bind mount at `path`), for a `slirp4netns` NIC:
    /// removing it removes the devices inside.
    Netns {
        /// The namespace file.
        path: PathBuf,
    },
}

/// Everything host-side about one VM's networking: persisted as `net.json` in the VM
/// directory so a later process can tear it down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Record version ([`STATE_VERSION`]).
    pub version: u32,
    /// VM name.
    pub vm_name: String,
    /// Data dir.
    pub home: PathBuf,
    /// Network namespace of the TAP/bridge devices (the VMM must run there).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// `netns` is the VM's own (made for a `slirp4netns` NIC, removed with the VM).
    #[serde(default)]
    pub own_netns: bool,
    /// The NICs.
    pub nics: Vec<NicPlan>,
    /// Devices created (in creation order).
    #[serde(default)]
    pub devices: Vec<HostDevice>,
    /// Switch networks joined.
    #[serde(default)]
    pub switches: Vec<String>,
    /// Port-forward sidecars started.
    #[serde(default)]
    pub forwarders: Vec<SidecarRecord>,
    /// `slirp4netns` sidecars started.
    #[serde(default)]
    pub slirp: Vec<SidecarRecord>,
}

impl NetState {
    /// All guest kernel command-line words.
    pub fn guest_cmdline(&self) -> Vec<String> {
        self.nics.iter().flat_map(NicPlan::guest_cmdline).collect()
    }

    /// The namespace the VMM must be started in, if any.
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// Write to `<vm_dir>/net.json` (temp file, fsync, rename).
    pub fn save(&self, vm_dir: &Path) -> Result<(), HostError> {
        let path = vm_dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|e| io_op("encode net.json")(e.into()))?;
        crate::fsutil::write_atomic(&path, &json).map_err(io_op(format!("write {}", path.display())))
    }

    /// Read `<vm_dir>/net.json`; `Ok(None)` when there is none.
    pub fn load(vm_dir: &Path) -> Result<Option<Self>, HostError> {
        let path = vm_dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(d) => serde_json::from_slice(&d)
                .map(Some)
                .map_err(|e| io_op(format!("read {}", path.display()))(e.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_op(format!("read {}", path.display()))(e)),
        }
    }
}

/// A netlink connection, possibly inside a namespace.
#[cfg(target_os = "linux")]
struct Netlink {
    handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

#[cfg(target_os = "linux")]
impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(target_os = "linux")]
impl Netlink {
    async fn open(ns: Option<&Path>) -> Result<Self, HostError> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _) = netns::run_in(ns, move || {
            // the socket is created (and bound to the namespace) on this thread; it is
            // registered with the caller's runtime
            let _g = rt.enter();
            rtnetlink::new_connection()
        })
        .await?
        .map_err(io_op("open a netlink socket"))?;
        let task = tokio::spawn(conn);
        Ok(Self { handle, task })
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, HostError> {
        let mut s = self.handle.link().get().match_name(name.to_string()).execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl_op(format!("look up {name}"))(e)),
        }
    }

    async fn links(&self) -> Result<Vec<LinkMessage>, HostError> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_op("list links"))
    }

    async fn set(&self, msg: LinkMessage, op: String) -> Result<(), HostError> {
        self.handle.link().set(msg).execute().await.map_err(nl_op(op))
    }

    async fn del(&self, index: u32, name: &str) -> Result<(), HostError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            Err(e) => Err(nl_op(format!("delete {name}"))(e)),
        }
    }

    async fn add_addr(&self, index: u32, cidr: Ipv4Cidr, dev: &str) -> Result<(), HostError> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(cidr.addr), cidr.prefix_len)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(nl_op(format!("add {cidr} to {dev}"))(e)),
        }
    }
}

#[cfg(target_os = "linux")]
fn alias_of(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(s) => Some(s.as_str()),
        _ => None,
    })
}

/// The kernel's kind of a link (`tun`, `bridge`, `veth`, ...); `None` for a device without
/// link info (loopback, most physical NICs).
#[cfg(target_os = "linux")]
fn kind_of(m: &LinkMessage) -> Option<&InfoKind> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

/// Refuses an existing link that is not `wanted` (a TAP is kind `tun`).
#[cfg(target_os = "linux")]
fn check_kind(m: &LinkMessage, name: &str, wanted: &'static str) -> Result<(), HostError> {
    let ok = matches!(
        (wanted, kind_of(m)),
        ("tap", Some(InfoKind::Tun)) | ("bridge", Some(InfoKind::Bridge))
    );
    if ok {
        return Ok(());
    }
    let actual = match kind_of(m) {
        Some(InfoKind::Tun) => "tun".to_string(),
        Some(InfoKind::Bridge) => "bridge".to_string(),
        Some(InfoKind::Other(k)) => k.clone(),
        Some(k) => format!("{k:?}").to_lowercase(),
        None if m
            .header
            .flags
            .contains(rtnetlink::packet_route::link::LinkFlags::Loopback) =>
        {
            "loopback".to_string()
        }
        None => "physical".to_string(),
    };
    Err(HostError::WrongKind {
        name: name.into(),
        wanted,
        actual,
    })
}

#[cfg(target_os = "linux")]
fn name_of(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(s) => Some(s.as_str()),
        _ => None,
    })
}

#[cfg(target_os = "linux")]
fn controller_of(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

/// Create a TAP device with the TUN ioctls (netlink cannot create TUN/TAP). It is not
/// persistent yet: it lives as long as the returned descriptor, so a process killed before
/// [`persist_tap`] (before the device carries its alias) leaves no device behind.
#[cfg(target_os = "linux")]
fn create_tap(name: &str) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes, which `IfReq` matches in
    // size and layout for the fields used) through the pointer, valid for the whole call.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// Make the TAP device attached to `tap` (from [`create_tap`]) outlive the descriptor.
#[cfg(target_os = "linux")]
fn persist_tap(tap: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
    // SAFETY: TUNSETPERSIST takes an integer argument by value; no memory is passed.
    if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn enable_forwarding() -> std::io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1")
}

#[cfg(target_os = "linux")]
async fn nft(ns: Option<&Path>, op: &str, script: String) -> Result<(), HostError> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new("nft");
    cmd.args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Some(ns) = ns {
        netns::command_in(&mut cmd, ns)?;
    }
    let mut child = cmd.spawn().map_err(io_op("run nft"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(io_op("write to nft"))?;
    }
    let out = child.wait_with_output().await.map_err(io_op("run nft"))?;
    if !out.status.success() {
        return Err(HostError::Firewall {
            op: op.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(target_os = "linux")]
async fn add_nat(ns: Option<&Path>, table: &str, bridge: &str, subnet: Ipv4Cidr) -> Result<(), HostError> {
    // names were validated ([A-Za-z0-9_.-]) and the subnet is a parsed CIDR: nothing here can
    // inject nft syntax
    let script = format!(
        "table ip {table} {{\n\
         \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {subnet} oifname != \"{bridge}\" masquerade\n\t}}\n\
         \tchain forward {{ type filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{bridge}\" accept\n\
         \t\toifname \"{bridge}\" ct state established,related accept\n\t}}\n}}\n",
        subnet = subnet.network_cidr()
    );
    nft(ns, &format!("add nat table {table}"), script).await
}

#[cfg(target_os = "linux")]
async fn delete_nat(ns: Option<&Path>, table: &str) -> Result<(), HostError> {
    match nft(
        ns,
        &format!("delete table {table}"),
        format!("delete table ip {table}\n"),
    )
    .await
    {
        Err(HostError::Firewall { stderr, .. }) if stderr.contains("No such file") => Ok(()),
        other => other,
    }
}

/// Set up everything the VM's networks need on the host. Saves the state to
/// `<vm_dir>/net.json` before creating anything and after each step, so a crash midway
/// still leaves a record [`teardown_vm_dir`]/[`reconcile`] can use. On failure, what was
/// created is removed again.
pub async fn prepare(
    home: &Path,
    vm_name: &str,
    vm_dir: &Path,
    attachments: &[NetworkAttachment],
) -> Result<NetState, HostError> {
    let nics = plan(vm_name, vm_dir, home, attachments)?;
    // A record an earlier run of this VM left (it died with nobody watching, so nobody tore
    // its networks down) goes first: the new record replaces it and would forget what it lists.
    if let Err(e) = teardown_vm_dir(vm_dir).await {
        tracing::warn!(vm = vm_name, error = %e, "tearing down the networks of an earlier run");
    }
    // a slirp4netns NIC brings its own namespace (validated to be the only TAP of the VM)
    let own_netns = nics
        .iter()
        .any(|n| matches!(n.backend, NicBackend::Tap { slirp: Some(_), .. }));
    // every TAP/bridge NIC must live in the same namespace (the VMM runs in it)
    let mut namespaces = attachments
        .iter()
        .filter(|a| a.needs_host_devices())
        .map(|a| a.netns().map(Path::to_path_buf));
    let ns = if own_netns {
        Some(super::slirp::netns_path(vm_dir))
    } else {
        namespaces.next().flatten()
    };
    let mut namespaces = attachments
        .iter()
        .filter(|a| a.needs_host_devices())
        .map(|a| a.netns().map(Path::to_path_buf));
    if !own_netns && namespaces.any(|n| n != ns) {
        return Err(HostError::MixedNamespaces);
    }
    let mut state = NetState {
        version: STATE_VERSION,
        vm_name: vm_name.to_string(),
        home: home.to_path_buf(),
        netns: ns,
        own_netns,
        nics,
        devices: Vec::new(),
        switches: Vec::new(),
        forwarders: Vec::new(),
        slirp: Vec::new(),
    };
    state.save(vm_dir)?;
    match build(&mut state, attachments, vm_dir).await {
        Ok(()) => {
            state.save(vm_dir)?;
            Ok(state)
        }
        Err(e) => {
            if let Err(t) = teardown(&state).await {
                tracing::warn!(vm = vm_name, error = %t, "cleanup after failed network setup");
            }
            let _ = state.save(vm_dir);
            Err(e)
        }
    }
}

async fn build(
    state: &mut NetState,
    attachments: &[NetworkAttachment],
    vm_dir: &Path,
) -> Result<(), HostError> {
    let hid = home_id(&state.home);
    let ns = state.netns.clone();
    if let (true, Some(path)) = (state.own_netns, ns.clone()) {
        state.devices.push(HostDevice::Netns { path: path.clone() });
        state.save(vm_dir)?;
        super::slirp::create_netns(&path).await?;
    }
    let nl = if state.own_netns || attachments.iter().any(NetworkAttachment::needs_host_devices) {
        Some(Netlink::open(ns.as_deref()).await?)
    } else {
        None
    };
    let nics = state.nics.clone();
    for (nic, a) in nics.iter().zip(attachments) {
        match (&nic.backend, a) {
            (
                NicBackend::Tap {
                    ifname,
                    bridge,
                    slirp,
                },
                _,
            ) => {
                let Some(nl) = nl.as_ref() else { continue };
                let bridge_index = match (bridge, a, slirp) {
                    (Some(br), _, Some(_)) => Some(plain_bridge(nl, br).await?),
                    (Some(br), NetworkAttachment::Bridge { gateway, nat, .. }, None) => {
                        Some(ensure_bridge(state, vm_dir, nl, &hid, br, *gateway, *nat).await?)
                    }
                    _ => None,
                };
                ensure_tap(state, nl, &hid, ifname, nic.index, bridge_index).await?;
                if let (Some(sl), Some(br), Some(ns)) = (slirp, bridge_index, ns.as_deref()) {
                    let rec = super::slirp::start(vm_dir, ns, sl.net).await?;
                    state.slirp.push(rec);
                    state.save(vm_dir)?;
                    attach_up(nl, super::slirp::SLIRP_TAP, br).await?;
                    for pf in &sl.port_forwards {
                        super::slirp::add_hostfwd(vm_dir, pf, sl.guest).await?;
                    }
                }
                if let (
                    NetworkAttachment::Tap {
                        host_address: Some(h),
                        ..
                    },
                    Some(link),
                ) = (a, nl.link_by_name(ifname).await?)
                {
                    nl.add_addr(link.header.index, *h, ifname).await?;
                }
                state.save(vm_dir)?;
            }
            (NicBackend::Switch { network, .. }, _) => {
                let dir = super::networks_dir(&state.home);
                sidecar::join(&dir, network, &state.vm_name)?;
                state.switches.push(network.clone());
                state.save(vm_dir)?;
                sidecar::ensure_switch(&dir, network).await?;
            }
            _ => {}
        }
        if let (NetworkAttachment::Bridge { port_forwards, .. }, Some(guest)) = (a, nic.guest.address()) {
            for pf in port_forwards {
                let listen = SocketAddr::new(pf.bind_ip(), pf.host_port);
                let target = SocketAddr::new(IpAddr::V4(guest.addr), pf.guest_port);
                let log = vm_dir.join(format!("forward-{}.log", pf.host_port));
                let rec =
                    sidecar::spawn_forwarder(listen, target, &log, vm_dir, state.netns.as_deref()).await?;
                state.forwarders.push(rec);
                state.save(vm_dir)?;
            }
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
async fn ensure_bridge(
    state: &mut NetState,
    vm_dir: &Path,
    nl: &Netlink,
    hid: &str,
    name: &str,
    gateway: Ipv4Cidr,
    nat: bool,
) -> Result<u32, HostError> {
    let ours = bridge_alias(hid);
    let existing = nl.link_by_name(name).await?;
    // ours: one we make now, or a leftover carrying our alias
    let ours_bridge = match &existing {
        Some(m) => {
            check_kind(m, name, "bridge")?;
            alias_of(m) == Some(ours.as_str())
        }
        None => true,
    };
    let nat_table = nat.then(|| nat_table(hid, name));
    // Recorded before anything is made: the kernel ignores an alias in the creating message,
    // so a starter killed between creating the bridge and tagging it would otherwise leave an
    // untagged bridge that looks like the user's (kept for ever, with its NAT table, and taken
    // as the user's by the next start). On the user's bridge only the NAT table is ours.
    let recorded = state.devices.iter().any(|d| match d {
        HostDevice::Bridge { name: n, .. } | HostDevice::Nat { bridge: n, .. } => n == name,
        _ => false,
    });
    if !recorded {
        match (ours_bridge, &nat_table) {
            (true, _) => state.devices.push(HostDevice::Bridge {
                name: name.to_string(),
                nat_table: nat_table.clone(),
            }),
            (false, Some(t)) => state.devices.push(HostDevice::Nat {
                bridge: name.to_string(),
                table: t.clone(),
            }),
            (false, None) => {}
        }
        state.save(vm_dir)?;
    }
    let index = match existing {
        Some(m) => m.header.index,
        None => {
            match nl
                .handle
                .link()
                .add(rtnetlink::LinkBridge::new(name).build())
                .execute()
                .await
            {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                Err(e) => return Err(nl_op(format!("create bridge {name}"))(e)),
            }
            let m = nl
                .link_by_name(name)
                .await?
                .ok_or_else(|| HostError::Foreign { name: name.into() })?;
            nl.set(
                rtnetlink::LinkUnspec::new_with_index(m.header.index)
                    .alias(ours)
                    .build(),
                format!("tag bridge {name}"),
            )
            .await?;
            m.header.index
        }
    };
    nl.add_addr(index, gateway, name).await?;
    nl.set(
        rtnetlink::LinkUnspec::new_with_index(index).up().build(),
        format!("bring {name} up"),
    )
    .await?;
    if let Some(table) = nat_table {
        netns::run_in(state.netns.as_deref(), enable_forwarding)
            .await?
            .map_err(io_op("enable ip forwarding"))?;
        add_nat(state.netns.as_deref(), &table, name, gateway).await?;
    }
    Ok(index)
}

/// A bridge with no address (inside a VM's own namespace), up; its index.
#[cfg(target_os = "linux")]
async fn plain_bridge(nl: &Netlink, name: &str) -> Result<u32, HostError> {
    if nl.link_by_name(name).await?.is_none() {
        match nl
            .handle
            .link()
            .add(rtnetlink::LinkBridge::new(name).build())
            .execute()
            .await
        {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
            Err(e) => return Err(nl_op(format!("create bridge {name}"))(e)),
        }
    }
    let m = nl
        .link_by_name(name)
        .await?
        .ok_or_else(|| HostError::Foreign { name: name.into() })?;
    check_kind(&m, name, "bridge")?;
    nl.set(
        rtnetlink::LinkUnspec::new_with_index(m.header.index).up().build(),
        format!("bring {name} up"),
    )
    .await?;
    Ok(m.header.index)
}

/// Enslave the existing link `name` to the bridge with index `bridge` and bring it up.
#[cfg(target_os = "linux")]
async fn attach_up(nl: &Netlink, name: &str, bridge: u32) -> Result<(), HostError> {
    let link = nl
        .link_by_name(name)
        .await?
        .ok_or_else(|| HostError::Foreign { name: name.into() })?;
    nl.set(
        rtnetlink::LinkUnspec::new_with_index(link.header.index)
            .controller(bridge)
            .up()
            .build(),
        format!("attach {name} to its bridge"),
    )
    .await
}

#[cfg(target_os = "linux")]
async fn ensure_tap(
    state: &mut NetState,
    nl: &Netlink,
    hid: &str,
    name: &str,
    nic: usize,
    bridge: Option<u32>,
) -> Result<(), HostError> {
    let ours = tap_alias(hid, &state.vm_name, nic);
    let existing = nl.link_by_name(name).await?;
    // `fresh`: the descriptor of a TAP made here, persistent only once it carries its alias
    let (created, fresh) = match existing {
        // a leftover of this very VM (crash before teardown): reuse it
        Some(m) if alias_of(&m) == Some(ours.as_str()) => (true, None),
        Some(m) if alias_of(&m).is_some_and(|a| a.starts_with(ALIAS_PREFIX)) => {
            return Err(HostError::Foreign { name: name.into() })
        }
        // a TAP the user made: use it as is (anything else is refused before it is touched)
        Some(m) => {
            check_kind(&m, name, "tap")?;
            (false, None)
        }
        None => {
            let n = name.to_string();
            let tap = netns::run_in(state.netns.as_deref(), move || create_tap(&n))
                .await?
                .map_err(io_op(format!("create tap {name}")))?;
            (true, Some(tap))
        }
    };
    let m = nl
        .link_by_name(name)
        .await?
        .ok_or_else(|| HostError::Foreign { name: name.into() })?;
    if created {
        state.devices.push(HostDevice::Tap {
            name: name.to_string(),
        });
    }
    let mut b = rtnetlink::LinkUnspec::new_with_index(m.header.index).up();
    if created {
        b = b.alias(ours);
    }
    if let Some(br) = bridge {
        b = b.controller(br);
    }
    nl.set(b.build(), format!("set up tap {name}")).await?;
    if let Some(tap) = fresh {
        persist_tap(&tap).map_err(io_op(format!("make tap {name} persistent")))?;
    }
    Ok(())
}

/// Remove what [`prepare`] made for this VM: its TAPs, bridges it created that have no
/// interface attached any more (with their NAT table), its switch memberships (stopping a
/// switch with no members left) and its port-forward sidecars. Idempotent: missing devices
/// are fine.
pub async fn teardown(state: &NetState) -> Result<(), HostError> {
    let mut first_err: Option<HostError> = None;
    let mut keep = |r: Result<(), HostError>| {
        if let Err(e) = r {
            tracing::warn!(vm = %state.vm_name, error = %e, "network teardown step failed");
            first_err.get_or_insert(e);
        }
    };
    for f in state.forwarders.iter().chain(&state.slirp) {
        keep(f.stop(Duration::from_secs(2)).await.map_err(HostError::from));
    }
    let planned_tap = state
        .nics
        .iter()
        .any(|n| matches!(n.backend, NicBackend::Tap { .. }));
    // (the VM's own namespace goes as a whole, with everything in it)
    if !state.own_netns && (!state.devices.is_empty() || planned_tap) {
        match Netlink::open(state.netns.as_deref()).await {
            Ok(nl) => {
                for d in &state.devices {
                    if let HostDevice::Tap { name } = d {
                        keep(delete_link(&nl, name).await);
                    }
                }
                // Devices the plan names but the record does not list: a starter killed
                // between creating one and saving the record left it. Only ours (by alias)
                // are deleted.
                keep(delete_unrecorded_taps(state, &nl).await);
                for d in &state.devices {
                    if let HostDevice::Bridge { name, nat_table } = d {
                        keep(
                            delete_bridge_if_unused(&nl, state.netns.as_deref(), name, nat_table.as_deref())
                                .await,
                        );
                    }
                }
                keep(delete_unrecorded_bridges(state, &nl).await);
                for d in &state.devices {
                    if let HostDevice::Nat { bridge, table } = d {
                        keep(delete_nat_if_unused(state, &nl, bridge, table).await);
                    }
                }
            }
            Err(e) => keep(Err(e)),
        }
    }
    for d in &state.devices {
        if let HostDevice::Netns { path } = d {
            keep(super::slirp::remove_netns(path).map_err(HostError::from));
        }
    }
    let dir = super::networks_dir(&state.home);
    for net in &state.switches {
        keep(
            sidecar::leave(&dir, net, &state.vm_name)
                .await
                .map_err(HostError::from),
        );
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// [`teardown`] from the record in `<vm_dir>/net.json`, then delete the record.
pub async fn teardown_vm_dir(vm_dir: &Path) -> Result<(), HostError> {
    if let Some(state) = NetState::load(vm_dir)? {
        teardown(&state).await?;
        let _ = std::fs::remove_file(vm_dir.join(STATE_FILE));
    }
    Ok(())
}

/// The TAPs of `state`'s plan that its record does not list, deleted where they exist with
/// this VM's alias (a TAP without it is someone else's).
#[cfg(target_os = "linux")]
async fn delete_unrecorded_taps(state: &NetState, nl: &Netlink) -> Result<(), HostError> {
    let hid = home_id(&state.home);
    for n in &state.nics {
        let NicBackend::Tap { ifname, .. } = &n.backend else {
            continue;
        };
        let recorded = state
            .devices
            .iter()
            .any(|d| matches!(d, HostDevice::Tap { name } if name == ifname));
        if recorded {
            continue;
        }
        if let Some(m) = nl.link_by_name(ifname).await? {
            if alias_of(&m) == Some(tap_alias(&hid, &state.vm_name, n.index).as_str()) {
                nl.del(m.header.index, ifname).await?;
            }
        }
    }
    Ok(())
}

/// The bridges of `state`'s plan that its record does not list: deleted, with their NAT
/// table, when they carry this data dir's bridge alias and nothing is attached (what
/// [`delete_bridge_if_unused`] does for recorded ones); a NAT table of ours whose bridge is
/// gone is deleted too.
#[cfg(target_os = "linux")]
async fn delete_unrecorded_bridges(state: &NetState, nl: &Netlink) -> Result<(), HostError> {
    let hid = home_id(&state.home);
    let ns = state.netns.as_deref();
    for n in &state.nics {
        let NicBackend::Tap { bridge: Some(br), .. } = &n.backend else {
            continue;
        };
        let recorded = state
            .devices
            .iter()
            .any(|d| matches!(d, HostDevice::Bridge { name, .. } if name == br));
        if recorded {
            continue;
        }
        match nl.link_by_name(br).await? {
            Some(m) if alias_of(&m) == Some(bridge_alias(&hid).as_str()) => {
                delete_bridge_if_unused(nl, ns, br, None).await?;
            }
            Some(_) => continue,
            None => {}
        }
        if nl.link_by_name(br).await?.is_none() {
            // the plan does not say whether the bridge had NAT: a table of ours may exist
            // or not (or nft may be missing on a host that never used NAT), so this is
            // best effort
            if let Err(e) = delete_nat(ns, &nat_table(&hid, br)).await {
                tracing::debug!(bridge = %br, error = %e, "no nat table to delete");
            }
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
async fn delete_link(nl: &Netlink, name: &str) -> Result<(), HostError> {
    if let Some(m) = nl.link_by_name(name).await? {
        nl.del(m.header.index, name).await?;
    }
    Ok(())
}

#[cfg(target_os = "linux")]
async fn delete_bridge_if_unused(
    nl: &Netlink,
    ns: Option<&Path>,
    name: &str,
    nat_table: Option<&str>,
) -> Result<(), HostError> {
    let Some(m) = nl.link_by_name(name).await? else {
        if let Some(t) = nat_table {
            delete_nat(ns, t).await?;
        }
        return Ok(());
    };
    let index = m.header.index;
    let in_use = nl.links().await?.iter().any(|l| controller_of(l) == Some(index));
    if in_use {
        return Ok(());
    }
    nl.del(index, name).await?;
    if let Some(t) = nat_table {
        delete_nat(ns, t).await?;
    }
    Ok(())
}

/// Delete our NAT `table` on the (someone else's) `bridge` unless a TAP of this data dir is
/// still attached to it (another VM of ours uses the NAT); gone with the bridge too.
#[cfg(target_os = "linux")]
async fn delete_nat_if_unused(
    state: &NetState,
    nl: &Netlink,
    bridge: &str,
    table: &str,
) -> Result<(), HostError> {
    if let Some(m) = nl.link_by_name(bridge).await? {
        let index = m.header.index;
        let tap_prefix = tap_alias_prefix(&home_id(&state.home));
        let ours_attached = nl.links().await?.iter().any(|l| {
            controller_of(l) == Some(index) && alias_of(l).is_some_and(|a| a.starts_with(&tap_prefix))
        });
        if ours_attached {
            return Ok(());
        }
    }
    delete_nat(state.netns.as_deref(), table).await
}

/// Names of the devices in namespace `ns` tagged by the data dir `home` — `(name, alias)`.
pub async fn tagged_devices(home: &Path, ns: Option<&Path>) -> Result<Vec<(String, String)>, HostError> {
    let prefix = format!("{ALIAS_PREFIX}{}:", home_id(home));
    let nl = Netlink::open(ns).await?;
    Ok(nl
        .links()
        .await?
        .iter()
        .filter_map(|m| {
            let alias = alias_of(m)?;
            alias
                .starts_with(&prefix)
                .then(|| (name_of(m).unwrap_or_default().to_string(), alias.to_string()))
        })
        .collect())
}

/// Clean up after crashes: for every VM directory under `<home>/vms` whose VM `is_running`
/// says is not running, tear down its `net.json`; then, in the default namespace and every
/// namespace named by a record, delete TAPs tagged by this data dir whose VM is not running
/// and tagged bridges with nothing attached; finally drop switch members that are not
/// running and stop switches left without members. Returns the names of deleted devices.
pub async fn reconcile(
    home: &Path,
    is_running: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Vec<String>, HostError> {
    let hid = home_id(home);
    let mut namespaces: Vec<Option<PathBuf>> = vec![None];
    let vms_dir = crate::paths::vms_dir(home);
    if let Ok(rd) = std::fs::read_dir(&vms_dir) {
        for e in rd.flatten() {
            let dir = e.path();
            let Ok(Some(state)) = NetState::load(&dir) else {
                continue;
            };
            if !state.own_netns
                && !namespaces.contains(&state.netns)
                && state.netns.as_deref().is_some_and(Path::exists)
            {
                namespaces.push(state.netns.clone());
            }
            if !is_running(&state.vm_name) {
                if let Err(e) = teardown(&state).await {
                    tracing::warn!(vm = %state.vm_name, error = %e, "reconcile teardown");
                }
                let _ = std::fs::remove_file(dir.join(STATE_FILE));
            }
        }
    }
    let mut deleted = Vec::new();
    let tap_prefix = tap_alias_prefix(&hid);
    let br_alias = bridge_alias(&hid);
    for ns in &namespaces {
        let nl = Netlink::open(ns.as_deref()).await?;
        let links = nl.links().await?;
        for m in &links {
            let (Some(alias), Some(name)) = (alias_of(m), name_of(m)) else {
                continue;
            };
            if let Some(rest) = alias.strip_prefix(&tap_prefix) {
                let vm = rest.rsplit_once(':').map(|(vm, _)| vm).unwrap_or(rest);
                if !is_running(vm) {
                    nl.del(m.header.index, name).await?;
                    deleted.push(name.to_string());
                }
            }
        }
        for m in &links {
            let (Some(alias), Some(name)) = (alias_of(m), name_of(m)) else {
                continue;
            };
            if alias == br_alias {
                let table = nat_table(&hid, name);
                let before = nl.link_by_name(name).await?.is_some();
                delete_bridge_if_unused(&nl, ns.as_deref(), name, Some(&table)).await?;
                if before && nl.link_by_name(name).await?.is_none() {
                    deleted.push(name.to_string());
                }
            }
        }
    }
    let ndir = super::networks_dir(home);
    for net in sidecar::networks(&ndir) {
        let members = sidecar::members(&ndir, &net);
        let dead: Vec<&String> = members.iter().filter(|m| !is_running(m)).collect();
        for vm in &dead {
            sidecar::leave(&ndir, &net, vm).await?;
        }
        if members.is_empty() {
            // a network directory with no members (crash between join and start)
            if let Some(r) = sidecar::switch_record(&ndir, &net) {
                r.stop(Duration::from_secs(2)).await?;
            }
            crate::process::kill_owned_by(&sidecar::network_dir(&ndir, &net));
            let _ = std::fs::remove_dir_all(sidecar::network_dir(&ndir, &net));
        }
    }
    Ok(deleted)
}

/// Hosts without netlink and TAP devices (macOS): vm-rs has no host devices there, so
/// listing finds none and tearing down has nothing to do, while making one is
/// [`HostError::Unsupported`]. (The manager refuses TAP and bridge NICs before this through
/// the backend's capabilities; switch networks and port-forward sidecars work as on Linux.)
#[cfg(not(target_os = "linux"))]
mod no_devices {
    use super::{HostError, NetState};
    use crate::config::Ipv4Cidr;
    use std::path::Path;

    pub(super) struct LinkHeader {
        pub(super) index: u32,
    }

    /// Never made: a host without netlink has no links to describe.
    pub(super) struct LinkMessage {
        pub(super) header: LinkHeader,
    }

    pub(super) struct Netlink;

    impl Netlink {
        pub(super) async fn open(_ns: Option<&Path>) -> Result<Self, HostError> {
            Ok(Netlink)
        }

        pub(super) async fn link_by_name(&self, _name: &str) -> Result<Option<LinkMessage>, HostError> {
            Ok(None)
        }

        pub(super) async fn links(&self) -> Result<Vec<LinkMessage>, HostError> {
            Ok(Vec::new())
        }

        pub(super) async fn del(&self, _index: u32, _name: &str) -> Result<(), HostError> {
            Ok(())
        }

        pub(super) async fn add_addr(
            &self,
            _index: u32,
            _cidr: Ipv4Cidr,
            _dev: &str,
        ) -> Result<(), HostError> {
            Err(HostError::Unsupported {
                what: "a host address on a tap",
            })
        }
    }

    pub(super) fn alias_of(m: &LinkMessage) -> Option<&str> {
        let _ = m.header.index;
        None
    }

    pub(super) fn name_of(_m: &LinkMessage) -> Option<&str> {
        None
    }

    pub(super) async fn plain_bridge(_nl: &Netlink, _name: &str) -> Result<u32, HostError> {
        Err(HostError::Unsupported { what: "a bridge" })
    }

    pub(super) async fn attach_up(_nl: &Netlink, _name: &str, _bridge: u32) -> Result<(), HostError> {
        Err(HostError::Unsupported { what: "a bridge" })
    }

    pub(super) async fn ensure_bridge(
        _state: &mut NetState,
        _vm_dir: &Path,
        _nl: &Netlink,
        _hid: &str,
        _name: &str,
        _gateway: Ipv4Cidr,
        _nat: bool,
    ) -> Result<u32, HostError> {
        Err(HostError::Unsupported {
            what: "a bridge network",
        })
    }

    pub(super) async fn ensure_tap(
        _state: &mut NetState,
        _nl: &Netlink,
        _hid: &str,
        _name: &str,
        _nic: usize,
        _bridge: Option<u32>,
    ) -> Result<(), HostError> {
        Err(HostError::Unsupported {
            what: "a tap network",
        })
    }

    pub(super) async fn delete_link(_nl: &Netlink, _name: &str) -> Result<(), HostError> {
        Ok(())
    }

    pub(super) async fn delete_unrecorded_taps(_state: &NetState, _nl: &Netlink) -> Result<(), HostError> {
        Ok(())
    }

    pub(super) async fn delete_nat_if_unused(
        _state: &NetState,
        _nl: &Netlink,
        _bridge: &str,
        _table: &str,
    ) -> Result<(), HostError> {
        Ok(())
    }

    pub(super) async fn delete_unrecorded_bridges(_state: &NetState, _nl: &Netlink) -> Result<(), HostError> {
        Ok(())
    }

    pub(super) async fn delete_bridge_if_unused(
        _nl: &Netlink,
        _ns: Option<&Path>,
        _name: &str,
        _nat_table: Option<&str>,
    ) -> Result<(), HostError> {
        Ok(())
    }
}
#[cfg(not(target_os = "linux"))]
use no_devices::*;
