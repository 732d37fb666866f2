//! Network attachments of a VM. The networking subsystem ([`crate::net`]) turns these into
//! backend arguments and host devices.

use serde::{Deserialize, Serialize};

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// A host port published to a guest port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    /// Host address to bind (default `127.0.0.1`... see the networking module).
    #[serde(default)]
    pub host_ip: Option<std::net::IpAddr>,
    /// Host port.
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// How one guest NIC is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum NetworkAttachment {
    /// User-mode NAT inside the VMM (rootless), with published ports.
    User {
        /// Published ports.
        #[serde(default)]
        port_forwards: Vec<PortForward>,
    },
}
