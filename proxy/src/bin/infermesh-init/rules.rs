//! The redirect ruleset: validated settings in, the exact nftables text out.
//!
//! Everything here is a plain value and a pure function, so what a set of
//! flags turns into is tested without touching the kernel; `main.rs` only
//! hands the text to `nft -f -`.

use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::str::FromStr;

pub use infermesh_proxy::redirect::{PortList, PortRange};
use ipnet::IpNet;

/// The name of the one table infermesh-init owns, in either family.
pub const TABLE: &str = "infermesh";

/// A flag that cannot be used; the process exits 2 with it.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    #[error("--proxy-uid 0: the proxy must not run as root (its traffic is told apart from the application's by its UID, and root's traffic would bypass the mesh); run it as its own user, e.g. 2102")]
    RootUid,
    #[error("--proxy-gid 0: the proxy must not run in the root group (traffic of every process in it would bypass the mesh); use the proxy's own group, e.g. 2102")]
    RootGid,
    #[error("--{first} and --{second} are both {port}: the proxy's outbound, inbound and admin ports must differ")]
    SamePort {
        first: &'static str,
        second: &'static str,
        port: u16,
    },
    #[error(
        "--skip-outbound-cidrs {cidr}: an IPv6 range, but --ipv6=false installs IPv4 rules only"
    )]
    Ipv6CidrWithoutIpv6 { cidr: Cidr },
}

/// A CIDR list item that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum CidrError {
    #[error("empty item in the CIDR list (two commas in a row, or a trailing comma)")]
    Empty,
    #[error("{text:?} is not an IPv4 or IPv6 address")]
    Address {
        text: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("{text:?} has no valid prefix length (0-{max})")]
    Prefix { text: String, max: u8 },
    #[error("{text:?} has bits set past its prefix length; did you mean {canonical}?")]
    HostBits { text: String, canonical: Cidr },
}

/// An IPv4 or IPv6 network, `10.0.0.0/8` or `fd00::/8`; a bare address is a
/// single host. Written and masked by `ipnet`; this type only adds the
/// flag's error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr(pub IpNet);

impl Cidr {
    /// Whether the network is an IPv6 one.
    pub fn is_ipv6(&self) -> bool {
        matches!(self.0, IpNet::V6(_))
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, CidrError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(CidrError::Empty);
        }
        let (address_text, prefix_text) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address_text.parse().map_err(|source| CidrError::Address {
            text: text.to_string(),
            source,
        })?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = prefix_text.map_or(Some(max), |p| p.parse::<u8>().ok());
        let net = prefix
            .and_then(|prefix| IpNet::new(address, prefix).ok())
            .ok_or_else(|| CidrError::Prefix {
                text: text.to_string(),
                max,
            })?;
        if net.trunc() != net {
            return Err(CidrError::HostBits {
                text: text.to_string(),
                canonical: Cidr(net.trunc()),
            });
        }
        Ok(Self(net))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `ipnet` prints the prefix length even of a single host.
        write!(f, "{}/{}", self.0.addr(), self.0.prefix_len())
    }
}

/// A comma-separated list of CIDRs, as one flag value; the empty string is
/// the empty list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

impl FromStr for CidrList {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, CidrError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        text.split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// The table's address family: `inet` covers IPv4 and IPv6 in one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Inet,
    Ip,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Inet => "inet",
            Family::Ip => "ip",
        })
    }
}

/// The flags as given, before their combination is checked.
#[derive(Debug, Clone)]
pub struct Flags {
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub admin_port: u16,
    pub skip_outbound_ports: Vec<PortRange>,
    pub skip_outbound_cidrs: Vec<Cidr>,
    pub skip_inbound_ports: Vec<PortRange>,
    pub ipv6: bool,
}

/// What to install, checked as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub family: Family,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Outbound ports that bypass the proxy, sorted, without duplicates.
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound destinations that bypass the proxy, sorted, without duplicates.
    pub skip_outbound_cidrs: Vec<Cidr>,
    /// Inbound ports that are not redirected: the admin port, the proxy's own
    /// listeners and `--skip-inbound-ports`, sorted, without duplicates.
    pub skip_inbound_ports: Vec<PortRange>,
}

impl Rules {
    /// Checks the flags together; nothing has been touched yet when this fails.
    pub fn new(flags: Flags) -> Result<Self, FlagError> {
        if flags.proxy_uid == 0 {
            return Err(FlagError::RootUid);
        }
        let proxy_gid = flags.proxy_gid.unwrap_or(flags.proxy_uid);
        if proxy_gid == 0 {
            return Err(FlagError::RootGid);
        }
        let ports = [
            ("outbound-port", flags.outbound_port),
            ("inbound-port", flags.inbound_port),
            ("admin-port", flags.admin_port),
        ];
        for (i, (first, port)) in ports.iter().enumerate() {
            if let Some((second, _)) = ports[i + 1..].iter().find(|(_, other)| other == port) {
                return Err(FlagError::SamePort {
                    first,
                    second,
                    port: *port,
                });
            }
        }
        let family = if flags.ipv6 { Family::Inet } else { Family::Ip };
        if let Some(cidr) = flags
            .skip_outbound_cidrs
            .iter()
            .find(|cidr| family == Family::Ip && cidr.is_ipv6())
        {
            return Err(FlagError::Ipv6CidrWithoutIpv6 { cidr: *cidr });
        }
        let mut skip_inbound_ports = vec![
            PortRange::single(flags.admin_port),
            PortRange::single(flags.inbound_port),
            PortRange::single(flags.outbound_port),
        ];
        skip_inbound_ports.extend(flags.skip_inbound_ports);
        Ok(Self {
            family,
            proxy_uid: flags.proxy_uid,
            proxy_gid,
            outbound_port: flags.outbound_port,
            inbound_port: flags.inbound_port,
            skip_outbound_ports: sorted(flags.skip_outbound_ports),
            skip_outbound_cidrs: sorted(flags.skip_outbound_cidrs),
            skip_inbound_ports: sorted(skip_inbound_ports),
        })
    }

    /// The whole `nft -f` input: one transaction that removes any table of
    /// ours (creating it first, so the removal cannot fail) and defines the
    /// new one. nft applies all of it or none of it.
    pub fn ruleset(&self) -> String {
        let mut out = clean_ruleset();
        let v4_cidrs: Vec<_> = self
            .skip_outbound_cidrs
            .iter()
            .filter(|cidr| !cidr.is_ipv6())
            .collect();
        let v6_cidrs: Vec<_> = self
            .skip_outbound_cidrs
            .iter()
            .filter(|cidr| cidr.is_ipv6())
            .collect();

        // `write!` into a String cannot fail.
        let _ = writeln!(out, "table {} {TABLE} {{", self.family);
        out.push_str("\tchain output {\n");
        out.push_str("\t\ttype nat hook output priority -100; policy accept;\n");
        let _ = writeln!(out, "\t\tmeta skuid {} return", self.proxy_uid);
        let _ = writeln!(out, "\t\tmeta skgid {} return", self.proxy_gid);
        out.push_str("\t\toif \"lo\" return\n");
        out.push_str("\t\tip daddr 127.0.0.0/8 return\n");
        if self.family == Family::Inet {
            out.push_str("\t\tip6 daddr ::1 return\n");
        }
        if !self.skip_outbound_ports.is_empty() {
            let _ = writeln!(
                out,
                "\t\ttcp dport {} return",
                set(&self.skip_outbound_ports)
            );
        }
        if !v4_cidrs.is_empty() {
            let _ = writeln!(out, "\t\tip daddr {} return", set(&v4_cidrs));
        }
        if !v6_cidrs.is_empty() {
            let _ = writeln!(out, "\t\tip6 daddr {} return", set(&v6_cidrs));
        }
        let _ = writeln!(
            out,
            "\t\tmeta l4proto tcp redirect to :{}",
            self.outbound_port
        );
        out.push_str("\t}\n");
        out.push_str("\tchain prerouting {\n");
        out.push_str("\t\ttype nat hook prerouting priority -100; policy accept;\n");
        let _ = writeln!(
            out,
            "\t\ttcp dport {} return",
            set(&self.skip_inbound_ports)
        );
        let _ = writeln!(
            out,
            "\t\tmeta l4proto tcp redirect to :{}",
            self.inbound_port
        );
        out.push_str("\t}\n");
        out.push_str("}\n");
        out
    }

    /// A few lines saying what `ruleset` installs, for people reading logs.
    pub fn summary(&self) -> String {
        let mut outbound = vec![
            format!("uid {}", self.proxy_uid),
            format!("gid {}", self.proxy_gid),
            "loopback".to_string(),
        ];
        if !self.skip_outbound_ports.is_empty() {
            outbound.push(format!("ports {}", list(&self.skip_outbound_ports)));
        }
        if !self.skip_outbound_cidrs.is_empty() {
            outbound.push(format!("cidrs {}", list(&self.skip_outbound_cidrs)));
        }
        let families = match self.family {
            Family::Inet => "IPv4 and IPv6",
            Family::Ip => "IPv4 only",
        };
        format!(
            "infermesh-init: applied table {family} {TABLE} ({families})\n  \
             outbound: TCP redirected to :{outbound_port}, except {outbound}\n  \
             inbound: TCP redirected to :{inbound_port}, except ports {inbound}\n",
            family = self.family,
            outbound_port = self.outbound_port,
            outbound = outbound.join(", "),
            inbound_port = self.inbound_port,
            inbound = list(&self.skip_inbound_ports),
        )
    }
}

/// The `nft -f` input that removes our tables of both families, and nothing
/// else; it succeeds when they are absent (each is created, then deleted).
pub fn clean_ruleset() -> String {
    let mut out = String::new();
    for family in [Family::Inet, Family::Ip] {
        let _ = writeln!(out, "table {family} {TABLE}");
        let _ = writeln!(out, "delete table {family} {TABLE}");
    }
    out
}

fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items.dedup();
    items
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// An nft anonymous set, `{ 22, 9000-9100 }`; overlapping items are merged
/// by nft itself.
fn set<T: fmt::Display>(items: &[T]) -> String {
    let items: Vec<_> = items.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Flags {
        Flags {
            proxy_uid: 2102,
            proxy_gid: None,
            outbound_port: 4140,
            inbound_port: 4143,
            admin_port: 4191,
            skip_outbound_ports: vec![],
            skip_outbound_cidrs: vec![],
            skip_inbound_ports: vec![],
            ipv6: true,
        }
    }

    #[test]
    fn defaults_render_the_documented_ruleset() {
        let rules = Rules::new(flags()).unwrap();
        assert_eq!(
            rules.ruleset(),
            "table inet infermesh\n\
             delete table inet infermesh\n\
             table ip infermesh\n\
             delete table ip infermesh\n\
             table inet infermesh {\n\
             \tchain output {\n\
             \t\ttype nat hook output priority -100; policy accept;\n\
             \t\tmeta skuid 2102 return\n\
             \t\tmeta skgid 2102 return\n\
             \t\toif \"lo\" return\n\
             \t\tip daddr 127.0.0.0/8 return\n\
             \t\tip6 daddr ::1 return\n\
             \t\tmeta l4proto tcp redirect to :4140\n\
             \t}\n\
             \tchain prerouting {\n\
             \t\ttype nat hook prerouting priority -100; policy accept;\n\
             \t\ttcp dport { 4140, 4143, 4191 } return\n\
             \t\tmeta l4proto tcp redirect to :4143\n\
             \t}\n\
             }\n"
        );
    }

    #[test]
    fn skips_become_return_rules_before_the_redirect() {
        let rules = Rules::new(Flags {
            proxy_gid: Some(3000),
            skip_outbound_ports: "9000-9100,22".parse::<PortList>().unwrap().0,
            skip_outbound_cidrs: "fd00::/8,10.0.0.0/8,192.168.1.7"
                .parse::<CidrList>()
                .unwrap()
                .0,
            skip_inbound_ports: "8022".parse::<PortList>().unwrap().0,
            ..flags()
        })
        .unwrap();
        let text = rules.ruleset();
        let output: Vec<_> = text
            .lines()
            .skip_while(|line| !line.contains("chain output"))
            .take_while(|line| !line.contains("chain prerouting"))
            .map(str::trim)
            .collect();
        assert_eq!(
            output,
            [
                "chain output {",
                "type nat hook output priority -100; policy accept;",
                "meta skuid 2102 return",
                "meta skgid 3000 return",
                "oif \"lo\" return",
                "ip daddr 127.0.0.0/8 return",
                "ip6 daddr ::1 return",
                "tcp dport { 22, 9000-9100 } return",
                "ip daddr { 10.0.0.0/8, 192.168.1.7/32 } return",
                "ip6 daddr { fd00::/8 } return",
                "meta l4proto tcp redirect to :4140",
                "}",
            ]
        );
        assert!(text.contains("\t\ttcp dport { 4140, 4143, 4191, 8022 } return\n"));
    }

    #[test]
    fn ports_move_with_their_flags() {
        let rules = Rules::new(Flags {
            outbound_port: 15001,
            inbound_port: 15006,
            admin_port: 15020,
            ..flags()
        })
        .unwrap();
        let text = rules.ruleset();
        assert!(text.contains("redirect to :15001\n"));
        assert!(text.contains("redirect to :15006\n"));
        assert!(text.contains("tcp dport { 15001, 15006, 15020 } return\n"));
        assert!(!text.contains("4140"));
    }

    #[test]
    fn ipv6_false_renders_an_ip_table_without_ipv6_rules() {
        let rules = Rules::new(Flags {
            ipv6: false,
            skip_outbound_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            ..flags()
        })
        .unwrap();
        let text = rules.ruleset();
        // The old table of either family goes in the same transaction.
        assert!(text.starts_with(&clean_ruleset()));
        assert!(text.contains("\ntable ip infermesh {\n"));
        assert!(!text.contains("table inet infermesh {"));
        assert!(!text.contains("ip6"));
    }

    #[test]
    fn only_tcp_is_redirected() {
        let text = Rules::new(flags()).unwrap().ruleset();
        let redirects: Vec<_> = text.lines().filter(|l| l.contains("redirect")).collect();
        assert_eq!(redirects.len(), 2);
        assert!(redirects
            .iter()
            .all(|l| l.trim().starts_with("meta l4proto tcp redirect")));
        assert!(!text.contains("udp"));
    }

    #[test]
    fn clean_removes_both_families_and_nothing_else() {
        assert_eq!(
            clean_ruleset(),
            "table inet infermesh\ndelete table inet infermesh\n\
             table ip infermesh\ndelete table ip infermesh\n"
        );
    }

    #[test]
    fn duplicate_skips_are_listed_once() {
        let rules = Rules::new(Flags {
            skip_outbound_ports: "22,22,80".parse::<PortList>().unwrap().0,
            skip_inbound_ports: "4191".parse::<PortList>().unwrap().0,
            ..flags()
        })
        .unwrap();
        let text = rules.ruleset();
        assert!(text.contains("tcp dport { 22, 80 } return"));
        assert!(text.contains("tcp dport { 4140, 4143, 4191 } return"));
    }

    #[test]
    fn root_uid_and_gid_are_refused() {
        let error = Rules::new(Flags {
            proxy_uid: 0,
            ..flags()
        })
        .unwrap_err();
        assert!(matches!(error, FlagError::RootUid));
        assert!(error.to_string().contains("must not run as root"));
        let error = Rules::new(Flags {
            proxy_gid: Some(0),
            ..flags()
        })
        .unwrap_err();
        assert!(matches!(error, FlagError::RootGid));
    }

    #[test]
    fn the_gid_defaults_to_the_uid() {
        let rules = Rules::new(Flags {
            proxy_uid: 1337,
            ..flags()
        })
        .unwrap();
        assert_eq!(rules.proxy_gid, 1337);
        assert!(rules.ruleset().contains("meta skgid 1337 return"));
    }

    #[test]
    fn the_proxy_ports_must_differ() {
        let error = Rules::new(Flags {
            admin_port: 4140,
            ..flags()
        })
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "--outbound-port and --admin-port are both 4140: the proxy's outbound, inbound and admin ports must differ"
        );
    }

    #[test]
    fn an_ipv6_cidr_needs_ipv6() {
        let error = Rules::new(Flags {
            ipv6: false,
            skip_outbound_cidrs: vec!["fd00::/8".parse().unwrap()],
            ..flags()
        })
        .unwrap_err();
        assert!(error.to_string().contains("fd00::/8"), "{error}");
    }

    #[test]
    fn ports_and_ranges_parse_and_bad_ones_say_why() {
        assert_eq!(
            "22, 9000-9100".parse::<PortList>().unwrap().0,
            [
                PortRange::single(22),
                PortRange {
                    low: 9000,
                    high: 9100
                }
            ]
        );
        assert_eq!("".parse::<PortList>().unwrap().0, []);
        let message = |text: &str| text.parse::<PortList>().unwrap_err().to_string();
        assert_eq!(message("70000"), "port 70000 is out of range (1-65535)");
        assert_eq!(message("0"), "port 0 is out of range (1-65535)");
        assert_eq!(message("9100-9000"), "range 9100-9000 runs backwards");
        assert_eq!(message("ssh"), "\"ssh\" is not a port number");
        assert_eq!(message("-5"), "\"\" is not a port number");
        assert!(message("22,,80").starts_with("empty item"));
    }

    #[test]
    fn cidrs_parse_and_bad_ones_say_why() {
        let parsed = "10.0.0.0/8, fd00::/8,192.168.0.1"
            .parse::<CidrList>()
            .unwrap()
            .0;
        let shown: Vec<_> = parsed.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "fd00::/8", "192.168.0.1/32"]);
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert_eq!("::/0".parse::<Cidr>().unwrap().to_string(), "::/0");
        let message = |text: &str| text.parse::<CidrList>().unwrap_err().to_string();
        assert_eq!(
            message("10.0.0.1/8"),
            "\"10.0.0.1/8\" has bits set past its prefix length; did you mean 10.0.0.0/8?"
        );
        assert_eq!(
            message("10.0.0.0/33"),
            "\"10.0.0.0/33\" has no valid prefix length (0-32)"
        );
        assert_eq!(
            message("fd00::/129"),
            "\"fd00::/129\" has no valid prefix length (0-128)"
        );
        assert_eq!(
            message("10.0.0/8"),
            "\"10.0.0/8\" is not an IPv4 or IPv6 address"
        );
        assert_eq!(
            message("fd00::1/8"),
            "\"fd00::1/8\" has bits set past its prefix length; did you mean fd00::/8?"
        );
    }

    #[test]
    fn summary_names_every_exception() {
        let rules = Rules::new(Flags {
            skip_outbound_ports: vec![PortRange::single(22)],
            skip_outbound_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            ..flags()
        })
        .unwrap();
        assert_eq!(
            rules.summary(),
            "infermesh-init: applied table inet infermesh (IPv4 and IPv6)\n  \
             outbound: TCP redirected to :4140, except uid 2102, gid 2102, loopback, ports 22, cidrs 10.0.0.0/8\n  \
             inbound: TCP redirected to :4143, except ports 4140,4143,4191\n"
        );
    }
}
