//! Endpoints from the names in policy: an IP address is used as it is, a
//! host name is resolved, and re-resolved every `dnsRefresh` by its
//! backend. The decision (which endpoints a backend has after a round of
//! lookups) is a pure function; the lookups are the only I/O.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::balance::Endpoint;

/// An endpoint as written in policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An IP address: used as is.
    Addr(SocketAddr),
    /// A host name: resolved, and re-resolved periodically.
    Dns { host: String, port: u16 },
}

impl Target {
    /// Parses `host:port` or `[v6]:port`; the policy loader has validated it.
    pub fn parse(text: &str) -> Option<Self> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Some(Self::Addr(addr));
        }
        let (host, port) = text.rsplit_once(':')?;
        let port = port.parse().ok()?;
        if host.is_empty() {
            return None;
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Some(Self::Addr(SocketAddr::new(ip, port)));
        }
        Some(Self::Dns {
            host: host.to_string(),
            port,
        })
    }
}

/// One lookup per target, in order: an address as it is, a host name
/// resolved by the system resolver.
pub async fn lookup(targets: &[Target]) -> Vec<io::Result<Vec<SocketAddr>>> {
    let mut results = Vec::with_capacity(targets.len());
    for target in targets {
        results.push(match target {
            Target::Addr(addr) => Ok(vec![*addr]),
            Target::Dns { host, port } => tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map(Iterator::collect),
        });
    }
    results
}

/// The endpoint set after a round of `lookups` (one per target): each
/// address once, in target order; an endpoint that stays keeps its
/// statistics (the same `Arc`); a host name whose lookup failed keeps the
/// addresses it had (those on its port that no address target names), so a
/// DNS hiccup does not empty the backend.
pub fn next_endpoints(
    targets: &[Target],
    current: &[Arc<Endpoint>],
    lookups: &[io::Result<Vec<SocketAddr>>],
) -> Vec<Arc<Endpoint>> {
    let by_addr: HashMap<SocketAddr, &Arc<Endpoint>> =
        current.iter().map(|e| (e.addr(), e)).collect();
    let is_static = |addr: SocketAddr| targets.contains(&Target::Addr(addr));
    let mut next: Vec<Arc<Endpoint>> = Vec::new();
    let mut push = |addr: SocketAddr| {
        if next.iter().any(|e| e.addr() == addr) {
            return;
        }
        let endpoint = by_addr
            .get(&addr)
            .map(|e| (*e).clone())
            .unwrap_or_else(|| Arc::new(Endpoint::new(addr)));
        next.push(endpoint);
    };
    for (target, lookup) in targets.iter().zip(lookups) {
        match (target, lookup) {
            (_, Ok(addrs)) => addrs.iter().for_each(|addr| push(*addr)),
            (Target::Addr(addr), Err(_)) => push(*addr),
            (Target::Dns { port, .. }, Err(_)) => current
                .iter()
                .map(|e| e.addr())
                .filter(|addr| addr.port() == *port && !is_static(*addr))
                .for_each(&mut push),
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn addrs(endpoints: &[Arc<Endpoint>]) -> Vec<SocketAddr> {
        endpoints.iter().map(|e| e.addr()).collect()
    }

    #[test]
    fn targets_parse_as_addresses_or_host_names() {
        assert_eq!(
            Target::parse("10.0.0.1:80"),
            Some(Target::Addr(addr("10.0.0.1:80")))
        );
        assert_eq!(
            Target::parse("[::1]:80"),
            Some(Target::Addr(addr("[::1]:80")))
        );
        assert_eq!(
            Target::parse("models.local:8000"),
            Some(Target::Dns {
                host: "models.local".into(),
                port: 8000
            })
        );
        assert_eq!(Target::parse(":80"), None);
        assert_eq!(Target::parse("host"), None);
        assert_eq!(Target::parse("host:port"), None);
    }

    #[test]
    fn endpoints_that_stay_keep_their_statistics_and_each_address_counts_once() {
        let targets = [
            Target::Addr(addr("10.0.0.1:80")),
            Target::Dns {
                host: "a".into(),
                port: 80,
            },
        ];
        let kept = Arc::new(Endpoint::new(addr("10.0.0.2:80")));
        let _busy = kept.start();
        let lookups = vec![
            Ok(vec![addr("10.0.0.1:80")]),
            Ok(vec![
                addr("10.0.0.2:80"),
                addr("10.0.0.1:80"),
                addr("10.0.0.3:80"),
            ]),
        ];
        let next = next_endpoints(&targets, std::slice::from_ref(&kept), &lookups);
        assert_eq!(
            addrs(&next),
            [
                addr("10.0.0.1:80"),
                addr("10.0.0.2:80"),
                addr("10.0.0.3:80")
            ]
        );
        assert!(Arc::ptr_eq(&next[1], &kept));
        assert_eq!(next[1].in_flight(), 1);
    }

    #[test]
    fn a_failed_lookup_keeps_the_names_previous_addresses() {
        let targets = [
            Target::Addr(addr("10.0.0.1:80")),
            Target::Dns {
                host: "a".into(),
                port: 80,
            },
        ];
        let current: Vec<_> = ["10.0.0.1:80", "10.0.0.7:80", "10.0.0.8:9090"]
            .iter()
            .map(|a| Arc::new(Endpoint::new(addr(a))))
            .collect();
        let failed = io::Error::other("no such host");
        let next = next_endpoints(
            &targets,
            &current,
            &[Ok(vec![addr("10.0.0.1:80")]), Err(failed)],
        );
        // The static address once, the name's previous address on its port;
        // another port's address was never this name's.
        assert_eq!(addrs(&next), [addr("10.0.0.1:80"), addr("10.0.0.7:80")]);
    }
}
