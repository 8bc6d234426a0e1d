//! Intercepted connections: the pod's redirect rules (`infermesh-init`)
//! send an application's outbound TCP to the outbound listener and the
//! mesh's inbound TCP to the inbound listener. The kernel keeps the address
//! the connection was really for (`SO_ORIGINAL_DST`); routing may match on
//! it, and what no route claims passes through to it unchanged.
//!
//! A connection that reached a listener directly has no original
//! destination and is served exactly as before.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use infermesh_proto::policy::ListenerKind;
use tokio::net::TcpStream;

/// Ports of original destinations whose connections are copied as opaque
/// TCP without waiting for protocol detection: server-speaks-first
/// protocols (SMTP, MySQL, Galera, PostgreSQL, Redis, Elasticsearch
/// transport, memcached), the same default Linkerd ships. Without this a
/// client of such a server would wait the detection timeout (10 s) before
/// its first byte.
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// How a listener treats redirected connections.
#[derive(Debug, Clone)]
pub struct Interception {
    /// Where the inbound listener delivers what no inbound route claims:
    /// this host, at the connection's original port (the application
    /// listens on it, on loopback or on every address).
    pub app_host: IpAddr,
    /// Original destination ports forwarded as opaque TCP at once.
    pub opaque_ports: Vec<u16>,
    /// The ports the proxy itself listens on: a connection redirected to
    /// one of them on this host would come straight back (a loop).
    pub own_ports: Vec<u16>,
}

impl Default for Interception {
    fn default() -> Self {
        Self {
            app_host: IpAddr::from([127, 0, 0, 1]),
            opaque_ports: DEFAULT_OPAQUE_PORTS.to_vec(),
            own_ports: Vec::new(),
        }
    }
}

/// A connection the redirect rules sent to a listener, on every request
/// of it as an extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirected {
    /// The address the client dialled.
    pub original: SocketAddr,
    /// Where traffic that no route claims goes: the original destination
    /// (outbound), or the local application at the original port (inbound).
    pub passthrough: SocketAddr,
}

/// Why a redirected connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the original destination {original} is this proxy's own listener: passing it through would loop")]
pub struct Loop {
    /// The address the client dialled.
    pub original: SocketAddr,
}

impl Interception {
    /// What the redirect rules did to `stream`, accepted on a listener of
    /// `kind`: `None` when it reached the listener directly.
    /// `peer` is the client's address as `accept` gave it.
    pub fn classify(
        &self,
        kind: ListenerKind,
        stream: &TcpStream,
        peer: SocketAddr,
    ) -> Result<Option<Redirected>, Loop> {
        let Ok(local) = stream.local_addr() else {
            return Ok(None);
        };
        let Some(original) = original_destination(stream, local) else {
            return Ok(None);
        };
        let on_this_host = original.ip().is_loopback()
            || original.ip().is_unspecified()
            || local.ip() == original.ip()
            || peer.ip() == original.ip();
        if on_this_host && self.own_ports.contains(&original.port()) {
            return Err(Loop { original });
        }
        let passthrough = match kind {
            ListenerKind::Outbound => original,
            ListenerKind::Inbound => SocketAddr::new(self.app_host, original.port()),
        };
        Ok(Some(Redirected {
            original,
            passthrough,
        }))
    }

    /// Whether connections to `original` skip protocol detection.
    pub fn opaque(&self, original: SocketAddr) -> bool {
        self.opaque_ports.contains(&original.port())
    }
}

/// The address `stream` (accepted on `local`) was dialled at before a
/// `REDIRECT` rule changed it, or `None` when no rule did (or the kernel
/// keeps no record: no connection tracking in this namespace).
pub fn original_destination(stream: &TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let original = match local {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (original != local).then_some(original)
}

/// A port list item that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("empty item in the port list (two commas in a row, or a trailing comma)")]
    Empty,
    #[error("{text:?} is not a port number")]
    NotANumber {
        text: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("port {0} is out of range (1-65535)")]
    OutOfRange(u32),
    #[error("range {low}-{high} runs backwards")]
    Backwards { low: u16, high: u16 },
}

/// One port or an inclusive range of ports, `22` or `9000-9100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        Self {
            low: port,
            high: port,
        }
    }
}

impl FromStr for PortRange {
    type Err = PortError;

    fn from_str(text: &str) -> Result<Self, PortError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(PortError::Empty);
        }
        let port = |part: &str| -> Result<u16, PortError> {
            let part = part.trim();
            let value: u32 = part.parse().map_err(|source| PortError::NotANumber {
                text: part.to_string(),
                source,
            })?;
            match u16::try_from(value) {
                Ok(port) if port != 0 => Ok(port),
                _ => Err(PortError::OutOfRange(value)),
            }
        };
        let (low, high) = match text.split_once('-') {
            Some((low, high)) => (port(low)?, port(high)?),
            None => {
                let single = port(text)?;
                (single, single)
            }
        };
        if low > high {
            return Err(PortError::Backwards { low, high });
        }
        Ok(Self { low, high })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

/// A comma-separated list of ports and ranges, as one flag value; the empty
/// string is the empty list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<PortRange>);

impl FromStr for PortList {
    type Err = PortError;

    fn from_str(text: &str) -> Result<Self, PortError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        text.split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl PortList {
    /// Every port the list takes, ranges expanded.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().flat_map(|range| range.low..=range.high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ports(text: &str) -> Result<Vec<u16>, PortError> {
        text.parse::<PortList>().map(|l| l.ports().collect())
    }

    #[test]
    fn port_lists_take_ports_and_ranges() {
        assert_eq!(
            parse_ports("25, 3306,9000-9002").unwrap(),
            [25, 3306, 9000, 9001, 9002]
        );
        assert_eq!(parse_ports("").unwrap(), Vec::<u16>::new());
        for bad in ["0", "70000", "9-1", "http", "1-"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(original_destination(&accepted, addr), None);
        let interception = Interception {
            own_ports: vec![addr.port()],
            ..Interception::default()
        };
        assert_eq!(
            interception.classify(ListenerKind::Outbound, &accepted, peer),
            Ok(None)
        );
    }
}
