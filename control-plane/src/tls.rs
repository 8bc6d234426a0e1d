//! TLS on the control plane's gRPC port, once it is the mesh's CA: its own
//! certificate, signed by itself and renewed at about 70% of its lifetime,
//! and client certificates verified when presented. A proxy without one
//! may only ask for a certificate (with its bootstrap token); the policy
//! stream requires one.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use futures_util::Stream;
use infermesh_proto::spiffe::SpiffeId;
use rcgen::KeyPair;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use crate::ca::{Authority, SignError};

/// Longest a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the control plane's serving certificate or TLS configuration could
/// not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// No key pair could be generated.
    #[error("cannot generate a key: {0}")]
    GenerateKey(#[source] rcgen::Error),
    /// The authority would not sign the certificate.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// rustls cannot sign with the generated key.
    #[error("unusable key: {0}")]
    UnusableKey(#[source] rustls::Error),
    /// The CA's root cannot anchor client verification.
    #[error("the CA root is not a usable trust anchor: {0}")]
    TrustAnchor(#[source] rustls::Error),
    /// The client certificate verifier cannot be built.
    #[error("cannot build the client verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// Who is on the other end of a gRPC connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The SPIFFE ID of the client's certificate; `None` without one.
    pub identity: Option<SpiffeId>,
}

/// The control plane's own certificate, swapped on renewal.
#[derive(Debug)]
struct OwnCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for OwnCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The admission webhook's TLS: a certificate for `identity` and the
/// webhook's `dns_names` (the API server checks the Service's DNS name),
/// issued by the mesh CA and renewed like the gRPC port's; no client
/// certificate is asked for.
pub fn webhook_config(
    authority: Arc<Authority>,
    identity: SpiffeId,
    dns_names: Vec<String>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let (key, not_after) = issue(&authority, &identity, &dns_names)?;
    let own = Arc::new(OwnCert(ArcSwap::from_pointee(key)));
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(own.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio::spawn(renew(
        authority, identity, dns_names, own, not_after, "webhook",
    ));
    Ok(Arc::new(config))
}

/// Issues the control plane's certificate for `identity` (plus `dns_names`
/// for clients that check host names) and keeps it renewed.
pub fn server_config(
    authority: Arc<Authority>,
    identity: SpiffeId,
    dns_names: Vec<String>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let (key, not_after) = issue(&authority, &identity, &dns_names)?;
    let own = Arc::new(OwnCert(ArcSwap::from_pointee(key)));
    let mut roots = RootCertStore::empty();
    for root in authority.roots() {
        roots.add(root.clone()).map_err(TlsError::TrustAnchor)?;
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(TlsError::Verifier)?;
    let mut config = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(own.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio::spawn(renew(
        authority, identity, dns_names, own, not_after, "gRPC",
    ));
    Ok(Arc::new(config))
}

fn issue(
    authority: &Authority,
    identity: &SpiffeId,
    dns_names: &[String],
) -> Result<(CertifiedKey, SystemTime), TlsError> {
    let pair = KeyPair::generate().map_err(TlsError::GenerateKey)?;
    let signed = authority.sign_key(identity, &pair, dns_names, None)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pair.serialize_der()));
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(TlsError::UnusableKey)?;
    Ok((CertifiedKey::new(signed.chain, signing), signed.not_after))
}

async fn renew(
    authority: Arc<Authority>,
    identity: SpiffeId,
    dns_names: Vec<String>,
    own: Arc<OwnCert>,
    mut not_after: SystemTime,
    port: &'static str,
) {
    loop {
        let left = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        // Renew when 70% of the lifetime has passed, i.e. 30% is left.
        let lifetime = authority.lifetime(None);
        let wait = left.saturating_sub(lifetime.mul_f64(0.3));
        tokio::time::sleep(wait.max(Duration::from_millis(500))).await;
        match issue(&authority, &identity, &dns_names) {
            Ok((key, until)) => {
                own.0.store(Arc::new(key));
                not_after = until;
                tracing::info!(%identity, port, "control plane certificate renewed");
            }
            Err(error) => {
                tracing::error!(%error, port, "cannot renew the control plane certificate");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// A TLS connection handed to tonic, with who the client is.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepted connections after their handshakes. Handshakes run in their own
/// tasks, so a slow or silent client never holds up the others; a failed
/// one is logged with the reason.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = Result<TlsConn, std::io::Error>> {
    let (done, ready) = tokio::sync::mpsc::channel::<TlsConn>(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a gRPC connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            tracing::info!(%remote, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                let identity = match tls.get_ref().1.peer_certificates() {
                    Some([leaf, ..]) => match SpiffeId::from_certificate(leaf) {
                        Ok(id) => Some(id),
                        Err(error) => {
                            tracing::info!(%remote, %error, "client certificate refused");
                            return;
                        }
                    },
                    _ => None,
                };
                let info = PeerInfo {
                    remote: Some(remote),
                    identity,
                };
                let _ = done.send(TlsConn { inner: tls, info }).await;
            });
        }
    });
    futures_util::stream::unfold(ready, |mut ready| async move {
        ready.recv().await.map(|conn| (Ok(conn), ready))
    })
}
