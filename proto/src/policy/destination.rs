//! Original destinations: the address an application dialled before the
//! pod's redirect rules sent its connection to the sidecar. A `Backend`
//! lists the destinations that stand for it (`addresses`) and a route can
//! match on them (`match[].destination`), both written as patterns:
//!
//! | pattern | matches |
//! | --- | --- |
//! | `10.96.0.10:8000` | that address and port |
//! | `10.96.0.10` | that address, any port |
//! | `10.244.1.0/24:8000` | any address of the network, that port |
//! | `10.244.1.0/24` | any address of the network, any port |
//! | `[fd00::5]:8000`, `[fd00::/64]:8000` | the same for IPv6 (brackets before a port) |
//! | `fd00::5`, `fd00::/64` | IPv6 without a port |

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;

/// A parsed destination pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DestinationPattern {
    /// The addresses it takes (a single address is a /32 or /128 network).
    pub net: IpNet,
    /// The port it takes; any port when absent.
    pub port: Option<u16>,
}

/// Why a destination pattern does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("destination `{pattern}` {reason}")]
pub struct DestinationError {
    pattern: String,
    reason: &'static str,
}

impl DestinationPattern {
    /// Whether `addr` is one of the destinations this pattern stands for.
    /// An IPv4 address seen through an IPv6 socket (`::ffff:a.b.c.d`)
    /// matches as the IPv4 address it is.
    pub fn matches(&self, addr: SocketAddr) -> bool {
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.port.is_none_or(|p| p == addr.port()) && self.net.contains(&ip)
    }

    /// Whether every destination `other` takes, this one takes too.
    pub fn covers(&self, other: &DestinationPattern) -> bool {
        let port = match (self.port, other.port) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => a == b,
        };
        port && self.net.contains(&other.net)
    }
}

impl FromStr for DestinationPattern {
    type Err = DestinationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason| DestinationError {
            pattern: text.to_owned(),
            reason,
        };
        let (address, port) = if let Some(rest) = text.strip_prefix('[') {
            let (address, after) = rest
                .split_once(']')
                .ok_or_else(|| fail("has no `]` after its IPv6 address"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| fail("has brackets but no `:PORT` after them"))?;
            (address, Some(port))
        } else if text.matches(':').count() == 1 {
            let (address, port) = text.split_once(':').unwrap_or((text, ""));
            (address, Some(port))
        } else {
            // No colon (IPv4 without a port) or several (IPv6 without one).
            (text, None)
        };
        let port = match port {
            None => None,
            Some(port) => Some(
                port.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| fail("has no valid port (1-65535) after the `:`"))?,
            ),
        };
        let net = if address.contains('/') {
            let net: IpNet = address.parse().map_err(|_| {
                fail("is not an address or a network in CIDR form (`10.0.0.0/16`, `fd00::/64`)")
            })?;
            if net.trunc() != net {
                return Err(fail(
                    "has host bits set after its prefix length: write the network address (e.g. `10.0.0.0/16`)",
                ));
            }
            net
        } else {
            let ip: IpAddr = address
                .parse()
                .map_err(|_| fail("is not an IP address, a network in CIDR form, or either with `:PORT` (host names belong in `endpoints`)"))?;
            IpNet::from(ip)
        };
        Ok(Self { net, port })
    }
}

impl fmt::Display for DestinationPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let single = self.net.prefix_len() == self.net.max_prefix_len();
        let net = if single {
            self.net.addr().to_string()
        } else {
            self.net.to_string()
        };
        match (self.port, self.net) {
            (None, _) => f.write_str(&net),
            (Some(port), IpNet::V4(_)) => write!(f, "{net}:{port}"),
            (Some(port), IpNet::V6(_)) => write!(f, "[{net}]:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> DestinationPattern {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn every_written_form_parses_and_prints_back() {
        for text in [
            "10.96.0.10:8000",
            "10.96.0.10",
            "10.244.1.0/24:8000",
            "10.244.1.0/24",
            "[fd00::5]:8000",
            "[fd00::/64]:8000",
            "fd00::5",
            "fd00::/64",
        ] {
            assert_eq!(parse(text).to_string(), text);
        }
    }

    #[test]
    fn addresses_networks_and_ports_match_as_written() {
        assert!(parse("10.96.0.10:8000").matches(addr("10.96.0.10:8000")));
        assert!(!parse("10.96.0.10:8000").matches(addr("10.96.0.10:8001")));
        assert!(!parse("10.96.0.10:8000").matches(addr("10.96.0.11:8000")));
        assert!(parse("10.96.0.10").matches(addr("10.96.0.10:1")));
        assert!(parse("10.244.1.0/24:8000").matches(addr("10.244.1.77:8000")));
        assert!(!parse("10.244.1.0/24:8000").matches(addr("10.244.2.77:8000")));
        assert!(parse("[fd00::/64]:8000").matches(addr("[fd00::9]:8000")));
        assert!(!parse("[fd00::/64]:8000").matches(addr("10.0.0.1:8000")));
        // An IPv4 peer of a dual-stack socket.
        assert!(parse("10.96.0.10:8000").matches(addr("[::ffff:10.96.0.10]:8000")));
    }

    #[test]
    fn malformed_patterns_say_what_is_wrong() {
        for (text, says) in [
            ("llama.models.svc:8000", "host names belong in `endpoints`"),
            ("10.96.0.10:0", "valid port"),
            ("10.96.0.10:http", "valid port"),
            ("10.0.0.1/16", "host bits"),
            ("10.0.0.0/33", "CIDR form"),
            ("[fd00::5", "no `]`"),
            ("[fd00::5]", "no `:PORT`"),
            ("", "is not an IP address"),
        ] {
            let error = text.parse::<DestinationPattern>().unwrap_err().to_string();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn a_pattern_covers_the_narrower_ones() {
        assert!(parse("10.0.0.0/8").covers(&parse("10.1.0.0/16:80")));
        assert!(parse("10.1.0.0/16:80").covers(&parse("10.1.2.3:80")));
        assert!(!parse("10.1.0.0/16:80").covers(&parse("10.1.2.3")));
        assert!(!parse("10.1.0.0/16").covers(&parse("10.0.0.0/8")));
    }
}
