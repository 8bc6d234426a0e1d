//! `infermesh-proxy`: the sidecar binary.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Parser;
use infermesh_proto::policy::{self, ListenerKind, PolicySet, Workload};
use infermesh_proto::spiffe::{IdentityError, SpiffeId};
use infermesh_proxy::admin::{self, Admin};
use infermesh_proxy::control::{self, ControlError, ControlPlane, Node, PolicyCache};
use infermesh_proxy::identity::{CredentialError, Identity, IdentitySettings};
use infermesh_proxy::inputs::Inputs;
use infermesh_proxy::listener::Listener;
use infermesh_proxy::metrics::{listener_label, Metrics};
use infermesh_proxy::passthrough::Passthrough;
use infermesh_proxy::redirect::{Interception, PortList};
use infermesh_proxy::snapshot::{Origin, Snapshot, Source};

/// How much longer than the drain timeout shutdown waits for every task to
/// let go of the drain before exiting anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// The infermesh sidecar proxy for model traffic.
#[derive(Debug, Parser)]
#[command(name = "infermesh-proxy", version)]
struct Args {
    /// Policy file, or a directory of policy files (*.yaml, *.yml). Without
    /// it the proxy starts with no routes.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Admin server address (/live, /ready, /metrics, /config).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4191")]
    admin: SocketAddr,
    /// Outbound listener: traffic from the local application.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4140")]
    outbound: SocketAddr,
    /// Inbound listener: traffic from the mesh to the local model server.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:4143")]
    inbound: SocketAddr,
    /// The outbound listener for IPv6, where a pod's IPv6 redirect rules
    /// send its outbound traffic [default: [::1] on the --outbound port,
    /// when that is 127.0.0.1 and the host has IPv6].
    #[arg(long, value_name = "ADDR")]
    outbound_ipv6: Option<SocketAddr>,
    /// The inbound listener for IPv6, IPv6 only (the IPv4 one keeps IPv4)
    /// [default: [::] on the --inbound port, when that is 0.0.0.0 and the
    /// host has IPv6].
    #[arg(long, value_name = "ADDR")]
    inbound_ipv6: Option<SocketAddr>,
    /// Where the inbound listener delivers intercepted connections that no
    /// inbound route claims: this address, at the port the caller dialled
    /// (the model server listens on it on loopback or on every address).
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    inbound_app_host: std::net::IpAddr,
    /// Original destination ports whose intercepted outbound connections
    /// are copied as opaque TCP at once, without protocol detection
    /// (protocols where the server speaks first); ports and ranges,
    /// comma-separated, or "" for none.
    #[arg(
        long,
        value_name = "PORTS",
        default_value = "25,587,3306,4444,5432,6379,9300,11211"
    )]
    opaque_ports: PortList,
    /// Longest an HTTP/1.1 client may take to send a request head; a slower
    /// one is refused (counted as header_timeout).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "30s")]
    header_read_timeout: std::time::Duration,
    /// Data-plane worker threads (default: one per CPU).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Write an access-log line (JSON, on standard output) for every
    /// request, whatever the policy's `accessLog` settings say.
    #[arg(long)]
    access_log: bool,
    /// Follow this control plane's policy stream, e.g.
    /// http://infermesh-control:8080, instead of a local policy.
    #[arg(long, value_name = "URL", conflicts_with = "config")]
    control_plane: Option<String>,
    /// Keep the last snapshot applied from the control plane in FILE, and
    /// serve it at start-up when the control plane cannot be reached.
    #[arg(long, value_name = "FILE", requires = "control_plane")]
    policy_cache: Option<PathBuf>,
    /// Refuse (NACK) control-plane snapshots with more resources than N.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_policy_resources: usize,
    /// This proxy's name towards the control plane [default: HOSTNAME-PID].
    #[arg(long, value_name = "ID", env = "POD_NAME")]
    proxy_id: Option<String>,
    /// Namespace of the workload beside this proxy, for policy scoping.
    #[arg(long, value_name = "NAMESPACE", env = "POD_NAMESPACE")]
    workload_namespace: Option<String>,
    /// Identity of the workload (service account or SPIFFE ID).
    #[arg(long, value_name = "ID")]
    workload_identity: Option<String>,
    /// A label of the workload, for policy scoping; repeatable.
    #[arg(long = "workload-label", value_name = "KEY=VALUE", value_parser = parse_label)]
    workload_labels: Vec<(String, String)>,
    /// Mesh identity: a file holding this workload's bootstrap token. With
    /// it the proxy obtains a SPIFFE certificate for
    /// spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT from the
    /// control plane (an https:// URL), terminates mutual TLS on its inbound
    /// listener and speaks it to meshed backends.
    #[arg(long, value_name = "FILE", requires_all = ["control_plane", "trust_bundle"])]
    identity_token_file: Option<PathBuf>,
    /// PEM file of the mesh's root certificate(s), to verify the control
    /// plane on the first connection.
    #[arg(long, value_name = "FILE")]
    trust_bundle: Option<PathBuf>,
    /// Service account of the workload, part of its identity.
    #[arg(
        long,
        value_name = "NAME",
        env = "POD_SERVICE_ACCOUNT",
        default_value = "default"
    )]
    service_account: String,
    /// The mesh's trust domain.
    #[arg(long, default_value = infermesh_proto::spiffe::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Certificate lifetime to ask for [default: the CA's].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    cert_lifetime: Option<std::time::Duration>,
    /// The SPIFFE ID the control plane must prove
    /// [default: spiffe://TRUST_DOMAIN/ns/infermesh-system/sa/infermesh-control].
    #[arg(long, value_name = "SPIFFE_ID")]
    control_plane_identity: Option<SpiffeId>,
}

/// The IPv6 listener beside an IPv4 one, where a pod's IPv6 redirect rules
/// send traffic: `[::1]` beside `127.0.0.1`, `[::]` beside `0.0.0.0`, on
/// the same port; none beside another address or port 0.
fn ipv6_twin(ipv4: SocketAddr) -> Option<SocketAddr> {
    let ip = match ipv4.ip() {
        std::net::IpAddr::V4(ip) if ip.is_loopback() => std::net::Ipv6Addr::LOCALHOST,
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv6Addr::UNSPECIFIED,
        _ => return None,
    };
    (ipv4.port() != 0).then(|| SocketAddr::new(ip.into(), ipv4.port()))
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.trim().to_string()))
        }
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// Why the identity flags do not fit together.
#[derive(Debug, thiserror::Error)]
enum IdentityFlagError {
    /// A certificate authority without a token to ask it with.
    #[error("an https:// control plane is a certificate authority: give --identity-token-file and --trust-bundle")]
    NoToken,
    /// A token without a certificate authority to ask.
    #[error("--identity-token-file needs the control plane's https:// URL, got {0:?}")]
    NotHttps(String),
    /// The identity names the namespace.
    #[error("--identity-token-file needs --workload-namespace: the identity names it")]
    NoNamespace,
    /// The workload's flags do not make a SPIFFE ID.
    #[error("this workload's identity: {0}")]
    Workload(#[source] IdentityError),
    /// The default control plane identity cannot be made in this trust domain.
    #[error("{0}")]
    ControlPlane(#[source] IdentityError),
}

impl Args {
    /// How the proxy obtains its mesh identity, when it has one.
    fn identity(&self) -> Result<Option<IdentitySettings>, IdentityFlagError> {
        let Some(token_file) = self.identity_token_file.clone() else {
            if self
                .control_plane
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))
            {
                return Err(IdentityFlagError::NoToken);
            }
            return Ok(None);
        };
        let url = self.control_plane.clone().unwrap_or_default();
        if !url.starts_with("https://") {
            return Err(IdentityFlagError::NotHttps(url));
        }
        let namespace = self
            .workload_namespace
            .clone()
            .filter(|ns| !ns.trim().is_empty())
            .ok_or(IdentityFlagError::NoNamespace)?;
        let id = SpiffeId::new(&self.trust_domain, &namespace, &self.service_account)
            .map_err(IdentityFlagError::Workload)?;
        let control_plane_id = match &self.control_plane_identity {
            Some(id) => id.clone(),
            None => SpiffeId::new(&self.trust_domain, "infermesh-system", "infermesh-control")
                .map_err(IdentityFlagError::ControlPlane)?,
        };
        Ok(Some(IdentitySettings {
            id,
            token_file,
            trust_bundle: self.trust_bundle.clone().unwrap_or_default(),
            lifetime: self.cert_lifetime,
            control_plane: url,
            control_plane_id,
        }))
    }

    /// Who this proxy is, from the workload flags.
    fn node(&self) -> Node {
        let non_empty = |v: &Option<String>| v.clone().filter(|v| !v.trim().is_empty());
        Node {
            proxy_id: non_empty(&self.proxy_id).unwrap_or_else(default_proxy_id),
            identity: non_empty(&self.workload_identity).unwrap_or_else(|| {
                self.identity()
                    .ok()
                    .flatten()
                    .map(|i| i.id.to_string())
                    .unwrap_or_default()
            }),
            workload: Workload {
                namespace: non_empty(&self.workload_namespace).unwrap_or_default(),
                labels: self.workload_labels.iter().cloned().collect(),
            },
        }
    }
}

/// `HOSTNAME-PID`: unique among the proxies of one machine.
fn default_proxy_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "infermesh-proxy".into());
    format!("{host}-{}", std::process::id())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.access_log {
        infermesh_proxy::access::force();
    }
    init_logging();
    let identity = match args.identity() {
        Ok(identity) => identity,
        Err(message) => {
            eprintln!("infermesh-proxy: {message}");
            return ExitCode::from(2);
        }
    };

    let policy = match &args.config {
        Some(path) => match policy::load_path(path) {
            Ok(policy) if policy.backends.iter().any(|b| b.spec.service.is_some()) => {
                // Only the control plane reads the cluster; a proxy that
                // took the file would serve the backend with no endpoint.
                for backend in policy.backends.iter().filter(|b| b.spec.service.is_some()) {
                    eprintln!(
                        "{}: Backend `{}` names a Kubernetes Service, which only \
                         `infermesh-control serve --kubernetes` resolves: follow it with \
                         --control-plane, or list the backend's `endpoints`",
                        path.display(),
                        backend.metadata.name
                    );
                }
                eprintln!(
                    "infermesh-proxy: refusing to start: Service references in {}",
                    path.display()
                );
                return ExitCode::from(2);
            }
            Ok(policy) => Some(scope_local(policy, &args.node().workload)),
            Err(errors) => {
                for error in &errors {
                    eprintln!("{error}");
                }
                eprintln!(
                    "infermesh-proxy: refusing to start: {} error(s) in {}",
                    errors.len(),
                    path.display()
                );
                return ExitCode::from(2);
            }
        },
        None => None,
    };

    // Metrics over OTLP, from the standard OTEL_* variables.
    match infermesh_proxy::otlp_metrics::Target::from_env() {
        Ok(target) => infermesh_proxy::otlp_metrics::set_env(target),
        Err(error) => {
            eprintln!("infermesh-proxy: refusing to start: {error}");
            return ExitCode::from(2);
        }
    }
    // Traces, from the standard OTEL_* variables.
    let traces = match infermesh_proxy::traces::Settings::from_env() {
        Ok(traces) => traces,
        Err(error) => {
            eprintln!("infermesh-proxy: refusing to start: {error}");
            return ExitCode::from(2);
        }
    };

    // One worker: a current-thread runtime, where the listeners and every
    // connection share the thread that runs them, with none of the
    // multi-threaded scheduler's cross-thread wake-ups and atomics.
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let mut runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    runtime.enable_all().thread_name("infermesh-worker");
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("infermesh-proxy: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, policy, identity, traces)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("infermesh-proxy: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The documents of a local policy that apply to this proxy's workload, as
/// the control plane would choose them; says what was left out.
fn scope_local(policy: PolicySet, workload: &Workload) -> PolicySet {
    let scoped = policy.scoped_to(workload);
    let left_out: Vec<&str> = policy
        .routes
        .iter()
        .filter(|r| !scoped.routes.iter().any(|s| s.metadata == r.metadata))
        .map(|r| r.metadata.name.as_str())
        .collect();
    if !left_out.is_empty() || policy.mesh.is_some() != scoped.mesh.is_some() {
        tracing::info!(
            namespace = %workload.namespace,
            labels = ?workload.labels,
            routes = ?left_out,
            mesh_config_left_out = policy.mesh.is_some() != scoped.mesh.is_some(),
            "policy documents scoped to other workloads do not apply here \
             (see --workload-namespace and --workload-label)"
        );
    }
    scoped
}

fn init_logging() {
    // The h2 library warns once per connection it closes for a flood (rapid
    // reset and the like), rustls once per warning alert a peer sends; the
    // proxy counts and logs those refusals itself, rate-limited, so a client
    // cannot flood the log through the libraries' own lines.
    infermesh_admin::init_logging("info,infermesh::access=off,h2=error,rustls=error");
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    /// The mesh identity could not be set up.
    #[error("{0}")]
    Identity(#[source] CredentialError),
    /// `--control-plane` is unusable.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A listener's port cannot be bound.
    #[error("cannot bind the {kind} listener on {addr}: {source}")]
    Bind {
        /// `outbound` or `inbound`.
        kind: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// What the socket said.
        #[source]
        source: std::io::Error,
    },
    /// The admin server's port cannot be bound.
    #[error("cannot bind the admin server on {addr}: {source}")]
    Admin {
        /// The address asked for.
        addr: SocketAddr,
        /// What the socket said.
        #[source]
        source: std::io::Error,
    },
    /// A bound port cannot be read back.
    #[error("{0}")]
    LocalAddr(#[source] std::io::Error),
    /// Trace export cannot start.
    #[error("{0}")]
    Traces(#[source] infermesh_proxy::traces::TracesError),
}

async fn run(
    args: Args,
    policy: Option<PolicySet>,
    identity: Option<IdentitySettings>,
    traces: infermesh_proxy::traces::Settings,
) -> Result<(), StartError> {
    // One drain for every task: each holds a watch, and shutdown signals
    // them all and waits until every one has let go (listeners after their
    // connections drained, the policy stream, renewals, DNS refreshes).
    let (drain_signal, drain) = drain::channel();
    // The identity comes first: snapshots build meshed backends' TLS on it.
    let identity = match identity {
        Some(settings) => {
            let identity = Identity::new(settings.id.clone(), &settings.trust_bundle)
                .map_err(StartError::Identity)?;
            tracing::info!(identity = %settings.id, control_plane = %settings.control_plane, "obtaining a mesh certificate");
            tokio::spawn(identity.clone().run(settings.clone(), drain.clone()));
            Some((identity, settings))
        }
        None => {
            tracing::info!(
                "no mesh identity (--identity-token-file): plaintext inbound and outbound"
            );
            None
        }
    };
    let metrics = Arc::new(Metrics::new());
    let (policy, source) = match (policy, &args.control_plane) {
        (Some(policy), _) => (policy, Source::File),
        (None, Some(_)) => (PolicySet::default(), Source::Pending),
        (None, None) => (PolicySet::default(), Source::Default),
    };
    let mesh = identity.as_ref().map(|(identity, _)| identity.clone());
    let snapshot = Snapshot::build(policy, Origin::local(source), None, &metrics, mesh.as_ref());
    // Traces: the policy's MeshConfig `tracing`, else the OTEL_* variables.
    infermesh_proxy::traces::set_env(traces);
    infermesh_proxy::traces::configure(
        snapshot
            .policy()
            .mesh
            .as_ref()
            .and_then(|m| m.spec.tracing.as_ref()),
        &metrics.trace_spans_dropped,
    )
    .map_err(StartError::Traces)?;
    infermesh_proxy::otlp_metrics::configure(
        snapshot
            .policy()
            .mesh
            .as_ref()
            .and_then(|m| m.spec.otlp_metrics.as_ref()),
        &metrics.otlp_metric_exports_failed,
    );
    snapshot.start_discovery(&drain).await;
    if source != Source::Pending {
        metrics.policy_update(true);
    }
    let inputs = Arc::new(Inputs {
        snapshot: ArcSwap::from_pointee(snapshot),
        passthrough: Passthrough::new(&metrics),
        metrics,
        identity: mesh,
    });
    let control = match &args.control_plane {
        Some(url) => {
            let settings = control::Settings {
                url: url.clone(),
                node: args.node(),
                cache: args.policy_cache.clone().map(PolicyCache::new),
                max_resources: args.max_policy_resources,
                tls: identity.as_ref().map(|(identity, settings)| {
                    (identity.clone(), settings.control_plane_id.clone())
                }),
            };
            Some(ControlPlane::new(settings, inputs.clone(), drain.clone())?)
        }
        None => None,
    };

    // The IPv4 listeners, and the IPv6 ones a pod's IPv6 redirect rules need.
    // Asked for: fatal when they cannot be bound. The IPv6 twins of the
    // default listeners are best effort (a host without IPv6 has none).
    let wanted = [
        (Some(args.outbound), ListenerKind::Outbound, true),
        (Some(args.inbound), ListenerKind::Inbound, true),
        (
            args.outbound_ipv6.or_else(|| ipv6_twin(args.outbound)),
            ListenerKind::Outbound,
            args.outbound_ipv6.is_some(),
        ),
        (
            args.inbound_ipv6.or_else(|| ipv6_twin(args.inbound)),
            ListenerKind::Inbound,
            args.inbound_ipv6.is_some(),
        ),
    ];
    let mut listeners = Vec::new();
    for (addr, kind, required) in wanted {
        let Some(addr) = addr else { continue };
        let listener = match Listener::bind(addr, kind, inputs.clone()).await {
            Ok(listener) => listener,
            Err(source) if required => {
                return Err(StartError::Bind {
                    kind: listener_label(kind),
                    addr,
                    source,
                })
            }
            Err(error) => {
                tracing::warn!(listener = listener_label(kind), %addr, %error, "no IPv6 listener: a pod's IPv6 traffic redirected here would be refused");
                continue;
            }
        };
        listeners.push(listener.with_header_read_timeout(args.header_read_timeout));
    }
    // Intercepted connections to any of the proxy's own ports would loop.
    let own_ports = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.port())
        .chain([args.admin.port()])
        .filter(|p| *p != 0)
        .collect();
    let interception = Arc::new(Interception {
        app_host: args.inbound_app_host,
        opaque_ports: args.opaque_ports.ports().collect(),
        own_ports,
    });
    let listeners: Vec<Listener> = listeners
        .into_iter()
        .map(|l| l.with_interception(interception.clone()))
        .collect();
    let admin_state = Admin::new(inputs.clone(), control.as_ref().map(|c| c.status()));
    let admin_addr =
        admin::spawn(args.admin, admin_state.clone()).map_err(|source| StartError::Admin {
            addr: args.admin,
            source,
        })?;
    let outbound_addr = listeners[0].local_addr().map_err(StartError::LocalAddr)?;
    let inbound_addr = listeners[1].local_addr().map_err(StartError::LocalAddr)?;
    for listener in listeners {
        tokio::spawn(listener.run(drain.clone()));
    }
    // Follows the control plane until shutdown; /ready waits for its first snapshot.
    if let Some(control) = control {
        tokio::spawn(control.run());
    }
    let drain_timeout = inputs.snapshot.load().drain_timeout();
    drop(drain);
    admin_state.set_ready(true);
    tracing::info!(%outbound_addr, %inbound_addr, %admin_addr, "infermesh-proxy started");
    {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(
            stdout,
            "listening outbound={outbound_addr} inbound={inbound_addr} admin={admin_addr}"
        );
        let _ = stdout.flush();
    }

    infermesh_admin::shutdown_signal("proxy").await;
    tracing::info!("shutting down: no new connections; draining in-flight requests");
    admin_state.set_ready(false);
    // The listeners bound their own wait by the snapshot's drain timeout;
    // this bound only guards against a task that never lets go.
    let drain_timeout = inputs.snapshot.load().drain_timeout().max(drain_timeout);
    if tokio::time::timeout(drain_timeout + DRAIN_GRACE, drain_signal.drain())
        .await
        .is_err()
    {
        tracing::warn!("a task did not finish draining in time; exiting anyway");
    }
    tracing::info!("drained; exiting");
    Ok(())
}
