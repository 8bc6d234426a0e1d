//! `infermesh-control serve`: the policy directory watcher, the policy
//! stream server and the admin server, assembled.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use infermesh_proto::policy_api::policy_discovery_server::PolicyDiscoveryServer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use infermesh_proto::identity_api::identity_server::IdentityServer;
use infermesh_proto::spiffe::SpiffeId;

use crate::admin::{self, Admin};
use crate::ca::{Authority, CaError, CaSettings};
use crate::discovery::Discovery;
use crate::identity::{IdentityService, TokenFile, TokenFileError};
use crate::kubernetes::tokens::TokenReviewer;
use crate::metrics::Metrics;
use crate::policies::{self, Publisher};
use crate::proxies::Registry;
use crate::tls::TlsError;

/// How long open streams get to close after SIGTERM before the process
/// exits anyway; proxies keep their snapshots either way.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What `serve` needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The policy directory (or file); `None` with Kubernetes: the policy
    /// custom resources.
    pub policies: Option<PathBuf>,
    /// The Kubernetes API, with `--kubernetes`.
    pub kubernetes: Option<crate::kubernetes::Settings>,
    /// The policy gRPC address, as [`policy_listen`] chose it.
    pub listen: Listen,
    /// The admin address.
    pub admin: SocketAddr,
    /// The certificate authority, when the control plane is one.
    pub identity: Option<IdentitySettings>,
    /// Publish policy sets that route nothing (`--allow-empty-policy`).
    pub allow_empty_policy: bool,
    /// The injection webhook, served when there is a CA.
    pub webhook: WebhookSettings,
}

/// The sidecar injection webhook.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Its HTTPS address.
    pub listen: SocketAddr,
    /// DNS names on its certificate.
    pub dns_names: Vec<String>,
    /// What it injects.
    pub inject: crate::inject::Config,
}

/// The port of the policy gRPC server unless `--listen` says otherwise.
pub const DEFAULT_GRPC_PORT: u16 = 8080;

/// Where the policy gRPC server listens, and whether that exposes the
/// plaintext, unauthenticated policy stream beyond this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// The address to bind.
    pub addr: SocketAddr,
    /// No CA and not loopback: accepted with `--insecure-listen`, and
    /// warned about at start.
    pub exposed: bool,
}

/// A policy address that would expose the plaintext stream unasked.
#[derive(Debug, thiserror::Error)]
#[error(
    "--listen {addr} without a CA would serve every namespace's policy, unauthenticated and in \
     plaintext, to anyone who can reach that address; give a CA (--ca-dir, or --ca-cert and \
     --ca-key) so that the stream requires mesh certificates, listen on loopback, or add \
     --insecure-listen to accept the exposure"
)]
pub struct ExposedListen {
    addr: SocketAddr,
}

/// The policy gRPC address: `--listen`, else every interface with a CA
/// (mutual TLS guards the stream) and loopback without one. Without a CA a
/// non-loopback address needs `insecure`.
pub fn policy_listen(
    listen: Option<SocketAddr>,
    with_ca: bool,
    insecure: bool,
) -> Result<Listen, ExposedListen> {
    let addr = listen.unwrap_or_else(|| {
        let ip = if with_ca {
            std::net::Ipv4Addr::UNSPECIFIED
        } else {
            std::net::Ipv4Addr::LOCALHOST
        };
        SocketAddr::from((ip, DEFAULT_GRPC_PORT))
    });
    let exposed = !with_ca && !addr.ip().is_loopback();
    if exposed && !insecure {
        return Err(ExposedListen { addr });
    }
    Ok(Listen { addr, exposed })
}

/// The control plane as the mesh's certificate authority.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// Where the keys come from, and leaf lifetimes.
    pub ca: CaSettings,
    /// The bootstrap token file; optional with Kubernetes, where pods
    /// present their service-account tokens instead.
    pub tokens: Option<PathBuf>,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The control plane's own identity, on its serving certificate.
    pub own_identity: SpiffeId,
    /// DNS names on its serving certificate, for clients that check them.
    pub dns_names: Vec<String>,
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The certificate authority could not be loaded.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The bootstrap token file was refused.
    #[error(transparent)]
    Tokens(#[from] TokenFileError),
    /// The serving certificate or TLS configuration could not be made.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The policy server's port cannot be bound.
    #[error("cannot bind the policy server on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the socket said.
        #[source]
        source: std::io::Error,
    },
    /// The webhook's port cannot be bound.
    #[error("cannot bind the injection webhook on {addr}: {source}")]
    Webhook {
        /// The address asked for.
        addr: SocketAddr,
        /// What the socket said.
        #[source]
        source: std::io::Error,
    },
    /// The bound policy port cannot be read back.
    #[error("{0}")]
    LocalAddr(#[source] std::io::Error),
    /// The Kubernetes API cannot be used.
    #[error(transparent)]
    Kubernetes(#[from] crate::kubernetes::KubeError),
    /// The admin server's port cannot be bound.
    #[error("cannot bind the admin server on {addr}: {source}")]
    Admin {
        /// The address asked for.
        addr: SocketAddr,
        /// What the socket said.
        #[source]
        source: std::io::Error,
    },
}

/// Runs until SIGTERM or Ctrl-C; an error is a failure to start.
pub async fn run(settings: Settings) -> Result<(), ServeError> {
    let metrics = Arc::new(Metrics::new());
    let source = settings
        .policies
        .clone()
        .unwrap_or_else(|| PathBuf::from("kubernetes"));
    // The emptiness guard is for files caught mid-write; the cluster's
    // resources are listed whole, and none at all is a new cluster.
    let from_cluster = settings.policies.is_none();
    let publisher = Publisher::new(
        source.clone(),
        metrics.clone(),
        settings.allow_empty_policy || from_cluster,
    );
    let registry = Registry::new(metrics.clone());
    let kube = match &settings.kubernetes {
        Some(kubernetes) => Some(crate::kubernetes::client(kubernetes).await?),
        None => None,
    };

    // The authority and its token file load before anything binds, so a
    // bad key or token file fails the start with the reason.
    let authority = match &settings.identity {
        Some(identity) => {
            let authority = Arc::new(Authority::load(&identity.ca)?);
            let tokens = match &identity.tokens {
                Some(path) => Some(Arc::new(TokenFile::open(
                    path.clone(),
                    identity.trust_domain.clone(),
                )?)),
                None => None,
            };
            let reviewer = kube.clone().map(|client| {
                Arc::new(TokenReviewer::new(
                    client,
                    identity.trust_domain.clone(),
                    metrics.clone(),
                ))
            });
            Some((authority, tokens, reviewer, identity.clone()))
        }
        None => None,
    };
    let listen = settings.listen.addr;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(ServeError::LocalAddr)?;
    if settings.listen.exposed {
        tracing::warn!(
            %grpc_addr,
            "INSECURE: the policy stream listens beyond loopback without a CA (--insecure-listen): \
             plaintext, no authentication, and any client that names a namespace receives its \
             policies; give --ca-dir to require mesh certificates"
        );
    }
    // The webhook's certificate comes from the CA; without one it is off.
    let webhook = match &authority {
        Some((authority, _, _, identity)) => {
            let addr = settings.webhook.listen;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Webhook { addr, source })?;
            let bound = listener.local_addr().map_err(ServeError::LocalAddr)?;
            let tls = crate::tls::webhook_config(
                authority.clone(),
                identity.own_identity.clone(),
                settings.webhook.dns_names.clone(),
            )?;
            crate::inject::webhook::spawn(listener, tls, settings.webhook.inject.clone());
            tracing::info!(
                webhook = %bound,
                dns_names = ?settings.webhook.dns_names,
                proxy_image = %settings.webhook.inject.proxy_image,
                "sidecar injection webhook serving POST /inject"
            );
            Some(bound)
        }
        None => {
            tracing::info!(
                "sidecar injection webhook off: its certificate comes from the mesh CA; give \
                 --ca-dir or --ca-cert/--ca-key to serve it"
            );
            None
        }
    };
    let admin_state = Admin {
        publisher: publisher.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
    };
    let admin_addr =
        admin::spawn(settings.admin, admin_state).map_err(|source| ServeError::Admin {
            addr: settings.admin,
            source,
        })?;
    tracing::info!(%grpc_addr, %admin_addr, policies = %source.display(), "infermesh-control started");
    {
        let mut stdout = std::io::stdout().lock();
        let _ = match webhook {
            Some(webhook) => writeln!(
                stdout,
                "listening grpc={grpc_addr} admin={admin_addr} webhook={webhook}"
            ),
            None => writeln!(stdout, "listening grpc={grpc_addr} admin={admin_addr}"),
        };
        let _ = stdout.flush();
    }

    let (stop_tx, stopped) = watch::channel(false);
    if let Some(client) = &kube {
        let view = crate::kubernetes::services::ServiceView::watch(client.clone());
        let changes = view.changes();
        publisher.resolve_services_in(view);
        tokio::spawn(policies::follow_services(
            publisher.clone(),
            changes,
            stopped.clone(),
        ));
    }
    let watcher = match (&settings.policies, &kube, &settings.kubernetes) {
        (None, Some(client), Some(kubernetes)) => {
            let publisher = publisher.clone();
            tokio::spawn(crate::kubernetes::policies::run(
                client.clone(),
                move |set| publisher.offer(set),
                kubernetes.root_namespace.clone(),
            ))
        }
        _ => tokio::spawn(policies::watch(publisher.clone(), stopped.clone())),
    };
    let mut discovery = Discovery::new(
        publisher.subscribe(),
        registry,
        metrics.clone(),
        stopped.clone(),
        authority.is_some(),
    );
    if let Some(client) = &kube {
        discovery = discovery.with_pods(crate::kubernetes::pods::watch(client.clone()));
        if let Some((authority, ..)) = &authority {
            let bundle = crate::kubernetes::bundle::pem(authority.roots());
            crate::kubernetes::bundle::distribute(client.clone(), bundle);
        }
    }
    let mut server_stopped = stopped;
    let mut builder = tonic::transport::Server::builder()
        // Finds proxies that vanished without closing their connection.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    let stop = async move {
        let _ = server_stopped.wait_for(|stop| *stop).await;
    };
    let server = match authority {
        Some((authority, tokens, reviewer, identity)) => {
            let config = crate::tls::server_config(
                authority.clone(),
                identity.own_identity.clone(),
                identity.dns_names.clone(),
            )?;
            tracing::info!(
                trust_domain = %identity.trust_domain,
                identity = %identity.own_identity,
                bootstrap_tokens = tokens.is_some(),
                kubernetes_token_review = reviewer.is_some(),
                "certificate authority enabled; the gRPC port speaks TLS"
            );
            let service = IdentityService::new(authority, tokens, reviewer, metrics);
            tokio::spawn(
                builder
                    .add_service(PolicyDiscoveryServer::new(discovery))
                    .add_service(IdentityServer::new(service))
                    .serve_with_incoming_shutdown(crate::tls::incoming(listener, config), stop),
            )
        }
        None => tokio::spawn(
            builder
                .add_service(PolicyDiscoveryServer::new(discovery))
                .serve_with_incoming_shutdown(incoming(listener), stop),
        ),
    };

    infermesh_admin::shutdown_signal("control plane").await;
    tracing::info!("shutting down: ending policy streams; proxies keep their snapshots");
    let _ = stop_tx.send(true);
    watcher.abort();
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(Err(error))) => tracing::warn!(%error, "policy server ended with an error"),
        Err(_) => tracing::info!("streams still open after the grace period; exiting"),
        _ => {}
    }
    Ok(())
}

/// Accepted connections; accept errors (out of file descriptors, mostly)
/// are logged and retried after a pause instead of spinning.
fn incoming(listener: TcpListener) -> impl Stream<Item = Result<TcpStream, std::io::Error>> {
    futures_util::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((Ok(stream), listener));
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a policy stream connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn without_a_ca_the_policy_stream_stays_on_loopback_unless_told() {
        let listen = policy_listen(None, false, false).unwrap();
        assert_eq!(listen.addr, "127.0.0.1:8080".parse().unwrap());
        assert!(!listen.exposed);
        for local in ["127.0.0.1:0", "[::1]:9000", "127.0.0.2:8080"] {
            assert!(!policy_listen(addr(local), false, false).unwrap().exposed);
        }
        for open in ["0.0.0.0:8080", "[::]:8080", "10.0.0.7:8080"] {
            let error = policy_listen(addr(open), false, false).unwrap_err();
            assert!(error.to_string().contains("--insecure-listen"), "{error}");
            assert!(policy_listen(addr(open), false, true).unwrap().exposed);
        }
    }

    #[test]
    fn with_a_ca_every_interface_is_the_default_and_nothing_is_exposed() {
        let listen = policy_listen(None, true, false).unwrap();
        assert_eq!(listen.addr, "0.0.0.0:8080".parse().unwrap());
        assert!(!listen.exposed);
        assert!(!policy_listen(addr("[::]:0"), true, false).unwrap().exposed);
    }
}
