//! The port map of an onion service: `"80 -> 127.0.0.1:8080"` entries, virtual port to local
//! target (Tor's `HiddenServicePort`).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One `VIRTPORT -> ADDRESS:PORT` mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortMapping {
    /// The port clients ask for (BEGIN's port).
    pub virtual_port: u16,
    /// Where the service connects such a stream to.
    pub target: SocketAddr,
}

/// Why a port mapping does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "port mapping `{text}`: {why}; write it as \"VIRTPORT -> ADDRESS:PORT\", e.g. \"80 -> 127.0.0.1:8080\""
)]
pub struct PortMappingError {
    text: String,
    why: &'static str,
}

impl FromStr for PortMapping {
    type Err = PortMappingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| PortMappingError {
            text: s.chars().take(80).collect(),
            why,
        };
        let (virt, target) = s.split_once("->").ok_or_else(|| err("no `->`"))?;
        let virtual_port: u16 = virt
            .trim()
            .parse()
            .map_err(|_| err("the virtual port is not a number from 1 to 65535"))?;
        if virtual_port == 0 {
            return Err(err("the virtual port is 0"));
        }
        let target: SocketAddr = target
            .trim()
            .parse()
            .map_err(|_| err("the target is not an IP address and port"))?;
        if target.port() == 0 {
            return Err(err("the target port is 0"));
        }
        Ok(Self {
            virtual_port,
            target,
        })
    }
}

impl TryFrom<String> for PortMapping {
    type Error = PortMappingError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PortMapping> for String {
    fn from(p: PortMapping) -> Self {
        p.to_string()
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.virtual_port, self.target)
    }
}

/// The target of virtual port `port`: the first mapping for it, if any.
pub fn target_for(ports: &[PortMapping], port: u16) -> Option<SocketAddr> {
    ports
        .iter()
        .find(|p| p.virtual_port == port)
        .map(|p| p.target)
}
