//! Intercepted connections: the pod's redirect rules (`infermesh-init`)
//! send an application's outbound TCP to the outbound listener and the
//! mesh's inbound TCP to the inbound listener. The kernel keeps the address
//! the connection was really for (`SO_ORIGINAL_DST`); routing may match on
//! it, and what no route claims passes through to it unchanged.
//!
//! A connection that reached a listener directly has no original
//! destination and is served exactly as before.

use std::net::{IpAddr, SocketAddr};

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
    pub fn classify(
        &self,
        kind: ListenerKind,
        stream: &TcpStream,
    ) -> Result<Option<Redirected>, Loop> {
        let Some(original) = original_destination(stream) else {
            return Ok(None);
        };
        let local = stream.local_addr().ok();
        let peer = stream.peer_addr().ok();
        let on_this_host = original.ip().is_loopback()
            || original.ip().is_unspecified()
            || local.is_some_and(|l| l.ip() == original.ip())
            || peer.is_some_and(|p| p.ip() == original.ip());
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

/// The address `stream` was dialled at before a `REDIRECT` rule changed
/// it, or `None` when no rule did (or the kernel keeps no record: no
/// connection tracking in this namespace).
pub fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let socket = socket2::SockRef::from(stream);
    let original = match local {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (original != local).then_some(original)
}

/// Parses `--opaque-ports`: ports and ranges, comma-separated
/// (`25,3306,9000-9010`); an empty list turns the shortcut off.
pub fn parse_ports(text: &str) -> Result<Vec<u16>, PortsError> {
    let mut ports = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| PortsError(item.to_owned()))
        };
        match item.split_once('-') {
            Some((low, high)) => {
                let (low, high) = (port(low)?, port(high)?);
                if low > high {
                    return Err(PortsError(item.to_owned()));
                }
                ports.extend(low..=high);
            }
            None => ports.push(port(item)?),
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// A port list item that is not a port (1-65535) or a range `LOW-HIGH`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a port (1-65535) or a range LOW-HIGH")]
pub struct PortsError(String);

#[cfg(test)]
mod tests {
    use super::*;

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
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(original_destination(&accepted), None);
        let interception = Interception {
            own_ports: vec![addr.port()],
            ..Interception::default()
        };
        assert_eq!(
            interception.classify(ListenerKind::Outbound, &accepted),
            Ok(None)
        );
    }
}
