//! The proxy's mesh identity: a key generated here (it never leaves the
//! process), a short-lived SPIFFE certificate from the control plane's CA,
//! renewed at about 70% of its lifetime and swapped in without touching
//! open connections, and the TLS configurations built on them:
//!
//! - inbound (server): presents the certificate, requires a client
//!   certificate that chains to the mesh's roots and carries a SPIFFE ID of
//!   the mesh's trust domain;
//! - outbound (client, per meshed backend): presents the certificate and
//!   accepts only a server whose SPIFFE ID is the one the policy expects;
//! - the control-plane connection: the same, expecting the control plane's
//!   identity.
//!
//! Every configuration reads the certificate and the roots at handshake
//! time, so a renewal applies to the next handshake with no rebuild.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use infermesh_filters::backoff::{Backoff, BackoffState, Jitter};
use infermesh_proto::identity_api::identity_client::IdentityClient;
use infermesh_proto::identity_api::CertifyRequest;
use infermesh_proto::spiffe::SpiffeId;
use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error as TlsError,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::sync::watch;

use crate::refusal::Reason;

/// Why the mesh identity could not be set up, or a certificate obtained.
/// The messages read as the proxy's log and `/config` show them.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The trust bundle file cannot be read as PEM certificates.
    #[error("{}: {source}", path.display())]
    BundleFile {
        /// The `--trust-bundle` file.
        path: PathBuf,
        /// What the PEM reader said.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The trust bundle's certificates are no usable roots.
    #[error("{}: {source}", path.display())]
    Bundle {
        /// The `--trust-bundle` file.
        path: PathBuf,
        /// What is wrong with its roots.
        #[source]
        source: Box<CredentialError>,
    },
    /// A root the store refuses.
    #[error("unusable trust anchor: {0}")]
    Anchor(#[source] TlsError),
    /// No roots at all.
    #[error("no trust anchors")]
    NoAnchors,
    /// The roots do not make a verifier.
    #[error("cannot verify {role} with these roots: {source}")]
    Verifier {
        /// `servers` or `clients`.
        role: &'static str,
        /// What rustls said.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The bootstrap token file cannot be read.
    #[error("cannot read the bootstrap token {}: {source}", path.display())]
    Token {
        /// The `--identity-token-file`.
        path: PathBuf,
        /// What reading it said.
        #[source]
        source: std::io::Error,
    },
    /// The token cannot be sent in a header.
    #[error("the bootstrap token has characters a header cannot carry")]
    TokenHeader,
    /// No key pair could be generated.
    #[error("cannot generate a key: {0}")]
    KeyGen(#[source] rcgen::Error),
    /// The identity cannot be a certificate's URI name.
    #[error("identity is not ASCII: {0}")]
    NotAscii(#[source] rcgen::Error),
    /// The certificate request cannot be built.
    #[error("cannot build the CSR: {0}")]
    Csr(#[source] rcgen::Error),
    /// The control plane cannot be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The CA took longer than the request's limit.
    #[error("the CA did not answer in time")]
    Timeout,
    /// The CA refused the request.
    #[error("the CA refused: {:?}: {}", .0.code(), .0.message())]
    Refused(#[source] tonic::Status),
    /// The CA's answer holds no certificate.
    #[error("the CA answered with no certificate")]
    NoCertificate,
    /// The issued certificate carries no SPIFFE ID.
    #[error("{0}")]
    NotSpiffe(#[source] infermesh_proto::spiffe::IdentityError),
    /// The issued certificate is for someone else.
    #[error("the CA issued a certificate for {got}, not {wanted}")]
    WrongIdentity {
        /// The identity in the certificate.
        got: Box<SpiffeId>,
        /// This proxy's identity.
        wanted: Box<SpiffeId>,
    },
    /// The generated key cannot sign.
    #[error("unusable key: {0}")]
    Key(#[source] TlsError),
}

/// Why a gRPC channel to the control plane could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL does not parse.
    #[error("invalid control-plane URL {url:?}: {source}")]
    Url {
        /// The `--control-plane` URL.
        url: String,
        /// What tonic said.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting (TCP, TLS, HTTP/2) failed.
    #[error("cannot connect to {url}: {}", crate::error::error_chain(source))]
    Connect {
        /// The `--control-plane` URL.
        url: String,
        /// What the connection attempt said.
        #[source]
        source: tonic::transport::Error,
    },
}

/// ALPN identifiers.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN identifier of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Renew once this share of the lifetime has passed.
const RENEW_AT: f64 = 0.7;
/// Waits after a failed request for a certificate: a ceiling of 200 ms
/// doubling to 30 s, each wait drawn between half and all of it, so the
/// proxies that failed together during a CA outage do not all come back in
/// the same instant (and none comes back at once).
const RENEWAL_RETRY: Backoff = Backoff::new(
    Duration::from_millis(200),
    Duration::from_secs(30),
    Jitter::Equal,
);
/// Limit on one certificate request.
const CERTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// How the proxy gets its identity.
#[derive(Clone)]
pub struct IdentitySettings {
    /// Who this proxy is.
    pub id: SpiffeId,
    /// File holding the bootstrap token, re-read for every request.
    pub token_file: PathBuf,
    /// PEM file of the roots that the control plane's certificate chains
    /// to, for the first connection (later roots come with each certificate).
    pub trust_bundle: PathBuf,
    /// Lifetime asked for; the CA's default when `None`.
    pub lifetime: Option<Duration>,
    /// The control plane's URL (`https://host:port`).
    pub control_plane: String,
    /// The SPIFFE ID the control plane must prove.
    pub control_plane_id: SpiffeId,
}

impl fmt::Debug for IdentitySettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token file's path is fine to show; its contents never are.
        f.debug_struct("IdentitySettings")
            .field("id", &self.id.to_string())
            .field("token_file", &self.token_file)
            .field("trust_bundle", &self.trust_bundle)
            .field("lifetime", &self.lifetime)
            .field("control_plane", &self.control_plane)
            .field("control_plane_id", &self.control_plane_id.to_string())
            .finish()
    }
}

/// The roots peers are verified against, and rustls's WebPKI verifiers
/// over them, which the mesh's verifiers wrap.
struct Trust {
    roots: Arc<RootCertStore>,
    servers: Arc<WebPkiServerVerifier>,
    clients: Arc<dyn ClientCertVerifier>,
}

impl Trust {
    fn new(
        anchors: &[CertificateDer<'static>],
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, CredentialError> {
        let mut roots = RootCertStore::empty();
        for anchor in anchors {
            roots.add(anchor.clone()).map_err(CredentialError::Anchor)?;
        }
        if roots.is_empty() {
            return Err(CredentialError::NoAnchors);
        }
        let roots = Arc::new(roots);
        let servers = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|source| CredentialError::Verifier {
                role: "servers",
                source,
            })?;
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|source| CredentialError::Verifier {
                role: "clients",
                source,
            })?;
        Ok(Self {
            roots,
            servers,
            clients,
        })
    }
}

/// What the admin server shows about the certificate (never the
/// certificate itself).
#[derive(Debug, Clone, Default)]
pub struct CertStatus {
    /// End of validity of the certificate in force.
    pub not_after: Option<SystemTime>,
    /// Certificates obtained since start.
    pub renewals: u64,
    /// The last failure to obtain one, if the last attempt failed.
    pub last_error: Option<String>,
}

/// The proxy's identity and credentials.
pub struct Identity {
    id: SpiffeId,
    provider: Arc<CryptoProvider>,
    key: ArcSwapOption<CertifiedKey>,
    trust: ArcSwap<Trust>,
    status: Mutex<CertStatus>,
    ready: watch::Sender<bool>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id.to_string())
            .field("certified", &self.key.load().is_some())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// An identity with no certificate yet, trusting the roots in
    /// `trust_bundle` (PEM).
    pub fn new(id: SpiffeId, trust_bundle: &std::path::Path) -> Result<Arc<Self>, CredentialError> {
        use rustls::pki_types::pem::PemObject;
        let anchors: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(trust_bundle)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .map_err(|source| CredentialError::BundleFile {
                path: trust_bundle.to_owned(),
                source,
            })?;
        Self::trusting(id, &anchors).map_err(|source| CredentialError::Bundle {
            path: trust_bundle.to_owned(),
            source: Box::new(source),
        })
    }

    /// An identity with no certificate yet, trusting `anchors`.
    fn trusting(
        id: SpiffeId,
        anchors: &[CertificateDer<'static>],
    ) -> Result<Arc<Self>, CredentialError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let trust = Trust::new(anchors, &provider)?;
        Ok(Arc::new(Self {
            id,
            provider,
            key: ArcSwapOption::empty(),
            trust: ArcSwap::from_pointee(trust),
            status: Mutex::new(CertStatus::default()),
            ready: watch::channel(false).0,
        }))
    }

    /// Who this proxy is.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// Whether a certificate is in force.
    pub fn certified(&self) -> bool {
        self.key.load().is_some()
    }

    /// The certificate's state, for the admin server.
    pub fn status(&self) -> CertStatus {
        self.status.lock().clone()
    }

    /// Waits until the first certificate is in force.
    pub async fn wait_certified(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// Installs a certificate chain (leaf first) for `key` and the roots
    /// that came with it.
    fn install_credentials(
        &self,
        key: PrivateKeyDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        anchors: &[CertificateDer<'static>],
        not_after: SystemTime,
    ) -> Result<(), CredentialError> {
        let leaf = chain.first().ok_or(CredentialError::NoCertificate)?;
        let got = SpiffeId::from_certificate(leaf).map_err(CredentialError::NotSpiffe)?;
        if got != self.id {
            return Err(CredentialError::WrongIdentity {
                got: Box::new(got),
                wanted: Box::new(self.id.clone()),
            });
        }
        if !anchors.is_empty() {
            self.trust
                .store(Arc::new(Trust::new(anchors, &self.provider)?));
        }
        let signing = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(CredentialError::Key)?;
        self.key
            .store(Some(Arc::new(CertifiedKey::new(chain, signing))));
        let mut status = self.status.lock();
        status.not_after = Some(not_after);
        status.renewals += 1;
        status.last_error = None;
        drop(status);
        self.ready.send_replace(true);
        Ok(())
    }

    /// TLS 1.3 client configuration that presents this proxy's certificate
    /// and accepts only a server proving `expected`. ALPN is left to the
    /// connector, which offers what the connection will speak.
    pub fn client_config(self: &Arc<Self>, expected: SpiffeId) -> Arc<ClientConfig> {
        let verifier = Arc::new(PeerVerifier {
            identity: self.clone(),
            expected,
        });
        // The ring provider supports TLS 1.3; this cannot fail.
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported by the ring provider");
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(OwnClientCert(self.clone())));
        Arc::new(config)
    }

    /// TLS 1.3 server configuration of the inbound listener.
    ///
    /// Sessions resume from stateless tickets (12-hour tickets, encrypted
    /// with keys that rotate every 6 hours). rustls's default keeps
    /// sessions (24-hour tickets) in a cache of 256 entries, two per
    /// handshake, which a few hundred handshakes from any callers (probes,
    /// other sidecars) flush, so a sidecar's saved sessions stopped
    /// resuming. A ticket carries the caller's certificate chain, so a
    /// resumed connection has the caller's SPIFFE ID too.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let builder = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported by the ring provider");
        let mut config = builder
            .with_client_cert_verifier(Arc::new(CallerVerifier(self.clone())))
            .with_cert_resolver(Arc::new(OwnServerCert(self.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        match rustls::crypto::ring::Ticketer::new() {
            Ok(ticketer) => config.ticketer = ticketer,
            Err(error) => {
                tracing::warn!(%error, "no TLS session tickets; sessions resume from a cache of 256");
            }
        }
        Arc::new(config)
    }

    /// Obtains the first certificate and renews it until the drain is
    /// signaled.
    pub async fn run(self: Arc<Self>, settings: IdentitySettings, drain: drain::Watch) {
        tokio::select! {
            release = drain.signaled() => drop(release),
            () = self.renew(settings) => {}
        }
    }

    async fn renew(self: Arc<Self>, settings: IdentitySettings) {
        let tls = self.client_config(settings.control_plane_id.clone());
        let mut retries = BackoffState::new(RENEWAL_RETRY);
        loop {
            match self.certify(&settings, &tls).await {
                Ok((not_after, lifetime)) => {
                    retries.reset();
                    let left = not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let wait = left.saturating_sub(lifetime.mul_f64(1.0 - RENEW_AT));
                    tracing::info!(
                        identity = %self.id,
                        not_after = unix(not_after),
                        renew_in_ms = wait.as_millis() as u64,
                        "mesh certificate in force"
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(error) => {
                    let left = self
                        .status
                        .lock()
                        .not_after
                        .and_then(|t| t.duration_since(SystemTime::now()).ok());
                    let pause = next_retry_pause(&mut retries, left);
                    tracing::warn!(identity = %self.id, %error, retry_in_ms = pause.as_millis() as u64, "cannot obtain a mesh certificate");
                    self.status.lock().last_error = Some(error.to_string());
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// One request for a certificate: a fresh key, a CSR, the CA's answer.
    async fn certify(
        &self,
        settings: &IdentitySettings,
        tls: &Arc<ClientConfig>,
    ) -> Result<(SystemTime, Duration), CredentialError> {
        let token = std::fs::read_to_string(&settings.token_file).map_err(|source| {
            CredentialError::Token {
                path: settings.token_file.clone(),
                source,
            }
        })?;
        let token = token.trim();
        let key = rcgen::KeyPair::generate().map_err(CredentialError::KeyGen)?;
        let mut params = rcgen::CertificateParams::default();
        let uri = self
            .id
            .to_string()
            .try_into()
            .map_err(CredentialError::NotAscii)?;
        params.subject_alt_names.push(rcgen::SanType::URI(uri));
        let csr = params
            .serialize_request(&key)
            .map_err(CredentialError::Csr)?;
        let channel = connect(&settings.control_plane, tls.clone()).await?;
        let mut client = IdentityClient::new(channel);
        let mut request = tonic::Request::new(CertifyRequest {
            identity: self.id.to_string(),
            csr: csr.der().to_vec(),
            lifetime_seconds: settings.lifetime.map_or(0, |d| d.as_secs().max(1)),
        });
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| CredentialError::TokenHeader)?;
        request.metadata_mut().insert("authorization", bearer);
        request.set_timeout(CERTIFY_TIMEOUT);
        let response = tokio::time::timeout(CERTIFY_TIMEOUT, client.certify(request))
            .await
            .map_err(|_| CredentialError::Timeout)?
            .map_err(CredentialError::Refused)?
            .into_inner();
        let not_after = UNIX_EPOCH + Duration::from_secs(response.not_after.max(0) as u64);
        let issued = SystemTime::now();
        let chain = response
            .chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let anchors: Vec<CertificateDer<'static>> = response
            .trust_anchors
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        self.install_credentials(der, chain, &anchors, not_after)?;
        let lifetime = not_after.duration_since(issued).unwrap_or_default();
        Ok((not_after, lifetime))
    }
}

/// The wait before the next request for a certificate, after one more
/// failure, when the certificate in force has `left` before it expires:
/// never more than a quarter of that, so a renewal never sleeps past the
/// expiry (the ceiling stays at least the base, so an expiring certificate
/// does not turn the loop into a tight one).
fn next_retry_pause(retries: &mut BackoffState, left: Option<Duration>) -> Duration {
    retries.next_delay_within(left.map_or(Duration::MAX, |left| left / 4))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A gRPC channel to the control plane over mutual TLS (or over
/// server-authenticated TLS before the first certificate).
pub async fn connect(
    url: &str,
    tls: Arc<ClientConfig>,
) -> Result<tonic::transport::Channel, ConnectError> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_only()
        .enable_http2()
        .wrap_connector({
            let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(Duration::from_secs(5)));
            http
        });
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|source| ConnectError::Url {
            url: url.to_owned(),
            source,
        })?
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .map_err(|source| ConnectError::Connect {
            url: url.to_owned(),
            source,
        })
}

/// A failed handshake's reason for the log: rustls's own message, or ours
/// for a certificate refused by the mesh's checks (rustls would show it
/// wrapped in debug formatting).
pub fn describe_handshake_error(error: &std::io::Error) -> String {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>())
    {
        Some(TlsError::InvalidCertificate(CertificateError::Other(OtherError(reason)))) => {
            format!("invalid peer certificate: {reason}")
        }
        Some(tls) => tls.to_string(),
        None => error.to_string(),
    }
}

/// Whether a failed inbound handshake is the client closing its socket
/// (end of file, reset, broken pipe) rather than a TLS failure.
pub fn client_went_away(error: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    // A TLS error is wrapped as `InvalidData`; these kinds are the socket's own.
    matches!(
        error.kind(),
        K::UnexpectedEof | K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted
    ) && error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>())
        .is_none()
}

/// The refusal reason of a failed inbound handshake, for the metric.
pub fn handshake_refusal(error: &std::io::Error) -> Reason {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>())
    {
        Some(tls) => tls_refusal(tls),
        None => Reason::TlsOther,
    }
}

fn tls_refusal(error: &TlsError) -> Reason {
    use rustls::PeerIncompatible as P;
    match error {
        TlsError::NoCertificatesPresented => Reason::TlsNoCertificate,
        TlsError::InvalidCertificate(CertificateError::UnknownIssuer) => Reason::TlsUnknownIssuer,
        TlsError::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => Reason::TlsExpired,
        TlsError::InvalidCertificate(CertificateError::Other(OtherError(other)))
            if other.is::<Refused>() =>
        {
            Reason::TlsIdentity
        }
        TlsError::PeerIncompatible(
            P::SupportedVersionsExtensionRequired
            | P::Tls12NotOffered
            | P::Tls12NotOfferedOrEnabled
            | P::ServerDoesNotSupportTls12Or13,
        ) => Reason::TlsVersion,
        _ => Reason::TlsOther,
    }
}

/// A refusal with the reason, as rustls carries it to the log line.
#[derive(Debug)]
struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refused(reason: String) -> TlsError {
    TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(
        reason,
    )))))
}

/// Verifies a server: the chain check of rustls's WebPKI verifier over the
/// mesh's roots (not its host-name match), then the SPIFFE ID: the server
/// must prove `expected`. Handshake signatures are the WebPKI verifier's.
struct PeerVerifier {
    identity: Arc<Identity>,
    expected: SpiffeId,
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerVerifier({})", self.expected)
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        // `WebPkiServerVerifier::verify_server_cert` is this chain check
        // (the same rustls function) followed by a match of the name that
        // was dialled, a DNS name or an IP address. A mesh certificate names
        // its workload in a URI SAN instead, and a proxy dials endpoints by
        // address, so that last step is replaced by the SPIFFE check below.
        let cert = ParsedCertificate::try_from(end_entity)?;
        let trust = self.identity.trust.load();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &trust.roots,
            intermediates,
            now,
            self.identity.provider.signature_verification_algorithms.all,
        )?;
        let got = SpiffeId::from_certificate(end_entity).map_err(|e| refused(e.to_string()))?;
        if got != self.expected {
            return Err(refused(format!(
                "the peer is {got}, not the expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.identity
            .trust
            .load()
            .servers
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.identity
            .trust
            .load()
            .servers
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.identity
            .trust
            .load()
            .servers
            .supported_verify_schemes()
    }
}

/// Verifies a caller on the inbound listener: rustls's WebPKI verifier over
/// the mesh's roots (a certificate is required), then the SPIFFE ID: it must
/// be of this mesh's trust domain.
struct CallerVerifier(Arc<Identity>);

impl fmt::Debug for CallerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallerVerifier")
    }
}

impl ClientCertVerifier for CallerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a mesh has one trust domain, and clients need none.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.0
            .trust
            .load()
            .clients
            .verify_client_cert(end_entity, intermediates, now)?;
        let caller = SpiffeId::from_certificate(end_entity).map_err(|e| refused(e.to_string()))?;
        if caller.trust_domain() != self.0.id.trust_domain() {
            return Err(refused(format!(
                "the caller {caller} is not of this mesh's trust domain `{}`",
                self.0.id.trust_domain()
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0
            .trust
            .load()
            .clients
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0
            .trust
            .load()
            .clients
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.trust.load().clients.supported_verify_schemes()
    }
}

/// This proxy's certificate, for the server side of a handshake.
struct OwnServerCert(Arc<Identity>);

impl fmt::Debug for OwnServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OwnServerCert")
    }
}

impl ResolvesServerCert for OwnServerCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.key.load_full()
    }
}

/// This proxy's certificate, for the client side of a handshake; none
/// before the first one is obtained.
struct OwnClientCert(Arc<Identity>);

impl fmt::Debug for OwnClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OwnClientCert")
    }
}

impl ResolvesClientCert for OwnClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.key.load_full()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Who sent an inbound request and where: in the request's extensions for
/// every filter and the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundConn {
    /// The caller's identity, as its certificate proved it; `None` for a
    /// plaintext caller (permissive mode, or a proxy without identity).
    pub caller: Option<Arc<SpiffeId>>,
    /// The port of the listener the connection arrived on.
    pub port: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_failures_map_to_their_refusal_reason() {
        use rustls::PeerIncompatible;
        let cases = [
            (TlsError::NoCertificatesPresented, Reason::TlsNoCertificate),
            (
                TlsError::InvalidCertificate(CertificateError::UnknownIssuer),
                Reason::TlsUnknownIssuer,
            ),
            (
                TlsError::InvalidCertificate(CertificateError::Expired),
                Reason::TlsExpired,
            ),
            (
                TlsError::InvalidCertificate(CertificateError::NotValidYet),
                Reason::TlsExpired,
            ),
            (
                refused("not of this trust domain".into()),
                Reason::TlsIdentity,
            ),
            (
                TlsError::PeerIncompatible(PeerIncompatible::SupportedVersionsExtensionRequired),
                Reason::TlsVersion,
            ),
            (
                TlsError::InvalidCertificate(CertificateError::BadSignature),
                Reason::TlsOther,
            ),
        ];
        for (error, reason) in cases {
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, error.clone());
            assert_eq!(handshake_refusal(&io), reason, "{error:?}");
        }
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(handshake_refusal(&eof), Reason::TlsOther);
    }

    // === renewal retries ===

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn renewal_retry_pauses_stay_within_bounds() {
        let lefts = [
            None,
            Some(Duration::ZERO),
            Some(ms(100)),
            Some(ms(900)),
            Some(Duration::from_secs(20)),
            Some(Duration::from_secs(24 * 3600)),
        ];
        for left in lefts {
            for seed in 0..20 {
                let mut retries =
                    BackoffState::with_rng(RENEWAL_RETRY, fastrand::Rng::with_seed(seed));
                for failure in 1..=40u32 {
                    // 200 ms doubling to 30 s, no more than a quarter of
                    // what the certificate has left, no less than 200 ms.
                    let doubling =
                        (ms(200) * 2u32.pow((failure - 1).min(10))).min(Duration::from_secs(30));
                    let ceiling = match left {
                        Some(left) => doubling.min(left / 4).max(ms(200)),
                        None => doubling,
                    };
                    let pause = next_retry_pause(&mut retries, left);
                    assert!(
                        pause >= ceiling / 2 && pause <= ceiling,
                        "failure {failure}, left {left:?}: {pause:?} outside [{:?}, {ceiling:?}]",
                        ceiling / 2
                    );
                    if let Some(left) = left.filter(|left| *left >= ms(800)) {
                        assert!(pause <= left / 4, "sleeps past the expiry");
                    }
                }
                retries.reset();
                assert!(next_retry_pause(&mut retries, None) <= ms(200));
            }
        }
    }

    #[test]
    fn proxies_cut_off_by_one_ca_outage_do_not_retry_in_step() {
        // A thousand proxies, each with the state `run` gives it, failing
        // at the same instant. Without jitter all of them came back exactly
        // 200 ms later.
        let first: Vec<Duration> = (0..1000)
            .map(|_| next_retry_pause(&mut BackoffState::new(RENEWAL_RETRY), None))
            .collect();
        assert!(first.iter().all(|&p| p >= ms(100) && p <= ms(200)));
        let mut per_ms = std::collections::HashMap::<u128, usize>::new();
        for pause in &first {
            *per_ms.entry(pause.as_millis()).or_default() += 1;
        }
        let crowd = per_ms.values().max().copied().unwrap_or(0);
        assert!(
            crowd <= 50,
            "{crowd} of 1000 proxies retry in the same millisecond"
        );
        // The window is used from end to end: each tenth holds some.
        for tenth in 0..10 {
            let (start, end) = (ms(100 + 10 * tenth), ms(110 + 10 * tenth));
            let n = first.iter().filter(|&&p| p >= start && p <= end).count();
            assert!(n >= 40, "{n} pauses in [{start:?}, {end:?}]");
        }
        // And two proxies' whole sequences differ.
        let sequence = || {
            let mut retries = BackoffState::new(RENEWAL_RETRY);
            (0..8)
                .map(|_| next_retry_pause(&mut retries, None))
                .collect::<Vec<_>>()
        };
        assert_ne!(sequence(), sequence());
    }

    // === verifiers ===

    const ME: &str = "spiffe://mesh.test/ns/models/sa/llama";
    const PEER: &str = "spiffe://mesh.test/ns/models/sa/vllm";

    /// A certificate authority made by the test.
    struct Ca {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        der: CertificateDer<'static>,
    }

    fn ca(name: &str) -> Ca {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let der = params.self_signed(&key).expect("self-signed").der().clone();
        Ca {
            issuer: rcgen::Issuer::new(params, key),
            der,
        }
    }

    /// A leaf for `spiffe_id`, signed by `ca`, valid until `not_after`.
    fn leaf(ca: &Ca, spiffe_id: &str, not_after: SystemTime) -> CertificateDer<'static> {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::default();
        params
            .subject_alt_names
            .push(SanType::URI(spiffe_id.try_into().expect("ASCII")));
        params.not_before = (SystemTime::now() - Duration::from_secs(3600)).into();
        params.not_after = not_after.into();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params
            .signed_by(&key, &ca.issuer)
            .expect("signed")
            .der()
            .clone()
    }

    fn valid(ca: &Ca, spiffe_id: &str) -> CertificateDer<'static> {
        leaf(ca, spiffe_id, SystemTime::now() + Duration::from_secs(3600))
    }

    fn mesh_identity(ca: &Ca) -> Arc<Identity> {
        Identity::trusting(
            ME.parse().expect("a SPIFFE ID"),
            std::slice::from_ref(&ca.der),
        )
        .expect("an identity")
    }

    fn verify_server(
        identity: &Arc<Identity>,
        expected: &str,
        cert: &CertificateDer<'_>,
    ) -> Result<(), TlsError> {
        let verifier = PeerVerifier {
            identity: identity.clone(),
            expected: expected.parse().expect("a SPIFFE ID"),
        };
        // A proxy dials an endpoint by address; the certificate names none.
        let dialled = ServerName::try_from("10.0.0.7").expect("an address");
        verifier
            .verify_server_cert(cert, &[], &dialled, &[], UnixTime::now())
            .map(|_| ())
    }

    fn verify_caller(identity: &Arc<Identity>, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
        CallerVerifier(identity.clone())
            .verify_client_cert(cert, &[], UnixTime::now())
            .map(|_| ())
    }

    /// The reason the metric and the log line would show.
    fn outcome(result: Result<(), TlsError>) -> Result<(), (Reason, String)> {
        result.map_err(|error| {
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, error);
            (handshake_refusal(&io), describe_handshake_error(&io))
        })
    }

    #[test]
    fn a_server_proving_the_expected_identity_over_a_trusted_chain_is_accepted() {
        let mesh = ca("mesh");
        let identity = mesh_identity(&mesh);
        assert_eq!(
            outcome(verify_server(&identity, PEER, &valid(&mesh, PEER))),
            Ok(())
        );
    }

    #[test]
    fn a_server_with_a_valid_chain_but_another_identity_is_refused_after_the_chain() {
        let mesh = ca("mesh");
        let identity = mesh_identity(&mesh);
        let other = "spiffe://mesh.test/ns/models/sa/impostor";
        assert_eq!(
            outcome(verify_server(&identity, PEER, &valid(&mesh, other))),
            Err((
                Reason::TlsIdentity,
                format!("invalid peer certificate: the peer is {other}, not the expected {PEER}")
            ))
        );
    }

    /// Why the server verifier runs the WebPKI chain check itself rather
    /// than the whole `WebPkiServerVerifier::verify_server_cert`: that one
    /// ends with a match of the dialled address, which a mesh certificate
    /// does not carry.
    #[test]
    fn the_whole_webpki_server_check_would_refuse_a_mesh_peer_dialled_by_address() {
        let mesh = ca("mesh");
        let identity = mesh_identity(&mesh);
        let dialled = ServerName::try_from("10.0.0.7").expect("an address");
        let error = identity
            .trust
            .load()
            .servers
            .verify_server_cert(&valid(&mesh, PEER), &[], &dialled, &[], UnixTime::now())
            .map(|_| ())
            .expect_err("no name to match");
        assert!(
            matches!(
                error,
                TlsError::InvalidCertificate(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{error:?}"
        );
        assert_eq!(
            outcome(verify_server(&identity, PEER, &valid(&mesh, PEER))),
            Ok(())
        );
    }

    #[test]
    fn a_server_chain_the_mesh_does_not_trust_is_refused_with_the_chain_reason() {
        let mesh = ca("mesh");
        let stranger = ca("stranger");
        let identity = mesh_identity(&mesh);
        // The chain is checked first: even the expected identity, or a
        // wrong one, is refused as an unknown issuer.
        for id in [PEER, "spiffe://elsewhere/ns/x/sa/y"] {
            let (reason, _) = outcome(verify_server(&identity, PEER, &valid(&stranger, id)))
                .expect_err("refused");
            assert_eq!(reason, Reason::TlsUnknownIssuer, "{id}");
        }
        let expired = leaf(&mesh, PEER, SystemTime::now() - Duration::from_secs(60));
        let (reason, _) = outcome(verify_server(&identity, PEER, &expired)).expect_err("refused");
        assert_eq!(reason, Reason::TlsExpired);
    }

    #[test]
    fn a_caller_of_this_trust_domain_over_a_trusted_chain_is_accepted() {
        let mesh = ca("mesh");
        let identity = mesh_identity(&mesh);
        assert_eq!(
            outcome(verify_caller(&identity, &valid(&mesh, PEER))),
            Ok(())
        );
    }

    #[test]
    fn a_caller_with_a_valid_chain_but_another_trust_domain_is_refused_after_the_chain() {
        let mesh = ca("mesh");
        let identity = mesh_identity(&mesh);
        let other = "spiffe://elsewhere/ns/models/sa/vllm";
        assert_eq!(
            outcome(verify_caller(&identity, &valid(&mesh, other))),
            Err((
                Reason::TlsIdentity,
                format!(
                    "invalid peer certificate: the caller {other} is not of this mesh's trust domain `mesh.test`"
                )
            ))
        );
    }

    #[test]
    fn a_caller_chain_the_mesh_does_not_trust_is_refused_with_the_chain_reason() {
        let mesh = ca("mesh");
        let stranger = ca("stranger");
        let identity = mesh_identity(&mesh);
        for id in [PEER, "spiffe://elsewhere/ns/x/sa/y"] {
            let (reason, _) =
                outcome(verify_caller(&identity, &valid(&stranger, id))).expect_err("refused");
            assert_eq!(reason, Reason::TlsUnknownIssuer, "{id}");
        }
        let expired = leaf(&mesh, PEER, SystemTime::now() - Duration::from_secs(60));
        let (reason, _) = outcome(verify_caller(&identity, &expired)).expect_err("refused");
        assert_eq!(reason, Reason::TlsExpired);
    }

    #[test]
    fn both_verifiers_offer_the_signature_schemes_of_the_provider() {
        let identity = mesh_identity(&ca("mesh"));
        let schemes = identity
            .provider
            .signature_verification_algorithms
            .supported_schemes();
        assert!(!schemes.is_empty());
        let peer = PeerVerifier {
            identity: identity.clone(),
            expected: PEER.parse().expect("a SPIFFE ID"),
        };
        assert_eq!(peer.supported_verify_schemes(), schemes);
        assert_eq!(CallerVerifier(identity).supported_verify_schemes(), schemes);
    }
}
