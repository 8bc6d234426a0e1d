//! `infermesh-init`: installs the nftables rules that redirect a pod's TCP
//! traffic to its infermesh sidecar, in the current network namespace, as a
//! meshed pod's init container runs it.
//!
//! The ruleset is native nftables handed to `nft -f -` in one transaction:
//! the kernel applies all of it or none of it, one `inet` table covers IPv4
//! and IPv6, and re-running replaces the table instead of adding to it.
//! See docs/interception.md.

mod rules;

use std::io::Write as _;
use std::process::{Command, ExitCode, Stdio};

use clap::{ArgAction, Parser};

use rules::{CidrList, Flags, PortList, Rules, TABLE};

/// Redirects this network namespace's TCP traffic to the infermesh sidecar
/// (outbound to --outbound-port, inbound to --inbound-port) with nftables.
#[derive(Debug, Parser)]
#[command(name = "infermesh-init", version)]
struct Args {
    /// UID the proxy runs as; its own connections are never redirected.
    /// Must not be 0.
    #[arg(long, value_name = "UID", default_value_t = 2102)]
    proxy_uid: u32,
    /// GID the proxy runs as; its connections are never redirected
    /// (default: the same number as --proxy-uid). Must not be 0.
    #[arg(long, value_name = "GID")]
    proxy_gid: Option<u32>,
    /// Port of the proxy's outbound listener, where outbound TCP goes.
    #[arg(long, value_name = "PORT", default_value_t = 4140, value_parser = clap::value_parser!(u16).range(1..))]
    outbound_port: u16,
    /// Port of the proxy's inbound listener, where inbound TCP goes.
    #[arg(long, value_name = "PORT", default_value_t = 4143, value_parser = clap::value_parser!(u16).range(1..))]
    inbound_port: u16,
    /// The proxy's admin port; inbound connections to it are never redirected.
    #[arg(long, value_name = "PORT", default_value_t = 4191, value_parser = clap::value_parser!(u16).range(1..))]
    admin_port: u16,
    /// Outbound destination ports that bypass the proxy: a comma list of
    /// ports and ranges, e.g. 22,9000-9100. Repeatable.
    #[arg(long, value_name = "PORTS")]
    skip_outbound_ports: Vec<PortList>,
    /// Outbound destinations that bypass the proxy: a comma list of IPv4 and
    /// IPv6 CIDRs, e.g. 10.96.0.0/12,fd00::/8. Repeatable.
    #[arg(long, value_name = "CIDRS")]
    skip_outbound_cidrs: Vec<CidrList>,
    /// Inbound ports that are not redirected (the admin port and the proxy's
    /// own ports never are): a comma list of ports and ranges. Repeatable.
    #[arg(long, value_name = "PORTS")]
    skip_inbound_ports: Vec<PortList>,
    /// Redirect IPv6 too (an `inet` table); --ipv6=false installs an IPv4-only
    /// `ip` table.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    ipv6: bool,
    /// Remove infermesh's table (either family) and nothing else; succeeds
    /// when there is none.
    #[arg(long)]
    clean: bool,
    /// Print the exact ruleset that would be given to `nft -f -` and change
    /// nothing.
    #[arg(long)]
    dry_run: bool,
}

impl Args {
    fn flags(&self) -> Flags {
        Flags {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            admin_port: self.admin_port,
            skip_outbound_ports: flatten(&self.skip_outbound_ports, |list| &list.0),
            skip_outbound_cidrs: flatten(&self.skip_outbound_cidrs, |list| &list.0),
            skip_inbound_ports: flatten(&self.skip_inbound_ports, |list| &list.0),
            ipv6: self.ipv6,
        }
    }
}

fn flatten<L, T: Clone>(lists: &[L], items: impl Fn(&L) -> &Vec<T>) -> Vec<T> {
    lists
        .iter()
        .flat_map(|list| items(list).iter().cloned())
        .collect()
}

/// Running nft failed; nothing was applied.
#[derive(Debug, thiserror::Error)]
enum NftError {
    #[error("nft not found: install the Debian package nftables (apt-get install nftables)")]
    NotFound(#[source] std::io::Error),
    #[error("cannot run nft")]
    Spawn(#[source] std::io::Error),
    #[error("cannot write the ruleset to nft")]
    Write(#[source] std::io::Error),
    #[error("nft refused the ruleset ({status}), nothing was applied:\n{stderr}")]
    Refused {
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Feeds `ruleset` to `nft -f -`, which applies it as one transaction.
fn apply(ruleset: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => NftError::NotFound(error),
            _ => NftError::Spawn(error),
        })?;
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(ruleset.as_bytes()))
        .unwrap_or(Ok(()));
    // Wait even when writing failed, so nft's own reason is not lost.
    let output = child.wait_with_output().map_err(NftError::Spawn)?;
    if !output.status.success() {
        return Err(NftError::Refused {
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr)
                .trim_end()
                .to_string(),
        });
    }
    written.map_err(NftError::Write)
}

/// The error and each of its causes, `a: b: c`.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rules = match Rules::new(args.flags()) {
        Ok(rules) => rules,
        Err(error) => {
            eprintln!("infermesh-init: {}", chain(&error));
            return ExitCode::from(2);
        }
    };
    let ruleset = if args.clean {
        rules::clean_ruleset()
    } else {
        rules.ruleset()
    };
    if args.dry_run {
        print!("{ruleset}");
        return ExitCode::SUCCESS;
    }
    if let Err(error) = apply(&ruleset) {
        eprintln!("infermesh-init: {}", chain(&error));
        return ExitCode::FAILURE;
    }
    if args.clean {
        println!("infermesh-init: removed table inet {TABLE} and table ip {TABLE} (where present)");
    } else {
        print!("{}", rules.summary());
    }
    ExitCode::SUCCESS
}
