//! Opaque TCP: connections that are neither HTTP/1.1 nor HTTP/2 are copied
//! byte for byte to the mesh's opaque backend, or refused when there is
//! none; an intercepted one goes to its original destination instead.

use std::net::SocketAddr;
use std::time::Duration;

use infermesh_proto::policy::ListenerKind;
use tokio::net::TcpStream;

use crate::inputs::Inputs;
use crate::metrics::{listener_label, OpaqueLabels, PassthroughLabels};
use crate::refusal::{self, Reason};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Forwards `client` to the opaque backend, or closes it.
pub async fn serve(client: TcpStream, peer: SocketAddr, kind: ListenerKind, inputs: &Inputs) {
    let listener = listener_label(kind);
    let count = |outcome: &'static str| {
        inputs
            .metrics
            .opaque_connections
            .get_or_create(&OpaqueLabels { listener, outcome })
            .inc();
    };
    let snapshot = inputs.snapshot.load_full();
    let Some(backend) = snapshot.opaque_backend() else {
        count("refused");
        inputs.metrics.refused(kind, Reason::NotHttp);
        let detail = &"refused a connection that is not HTTP: no opaque backend is configured (MeshConfig spec.opaque.backend)";
        refusal::log(listener, Reason::NotHttp, peer, detail);
        crate::access::refusal(
            snapshot.access_log(),
            listener,
            Reason::NotHttp.as_str(),
            peer,
            detail,
        );
        return;
    };
    let Some(endpoint) = backend.pick() else {
        count("refused");
        tracing::warn!(%peer, backend = backend.name().as_str(), "refused an opaque connection: the backend has no endpoint");
        return;
    };
    let _in_flight = endpoint.start();
    let upstream = match connect(endpoint.addr()).await {
        Ok(stream) => stream,
        Err(error) => {
            count("refused");
            backend.connect_failed();
            tracing::warn!(%peer, endpoint = %endpoint.addr(), %error, "opaque connection: connecting upstream failed");
            return;
        }
    };
    count("forwarded");
    splice(client, upstream, peer, endpoint.addr(), "opaque").await;
}

/// Copies an intercepted connection that no route can claim (not HTTP, or
/// to an opaque port) to `target`, its original destination (outbound) or
/// the local application (inbound), byte for byte.
pub async fn pass_through(
    client: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    inputs: &Inputs,
    target: SocketAddr,
) {
    let listener = listener_label(kind);
    let count = |outcome: &'static str| {
        inputs
            .metrics
            .passthrough
            .get_or_create(&PassthroughLabels {
                listener,
                protocol: "tcp",
                outcome,
            })
            .inc();
    };
    tracing::debug!(listener, %peer, %target, "passing an intercepted TCP connection through");
    let upstream = match connect(target).await {
        Ok(stream) => stream,
        Err(error) => {
            count("failed");
            tracing::debug!(listener, %peer, %target, %error, "passthrough: connecting failed");
            reset(&client);
            return;
        }
    };
    count("forwarded");
    splice(client, upstream, peer, target, "passthrough").await;
}

/// A TCP connection to `target` within the connect limit, without Nagle's
/// delay.
async fn connect(target: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Copies bytes both ways until both sides are done; `what` names the
/// connection in the debug log line that says how it ended.
async fn splice(
    mut client: TcpStream,
    mut upstream: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    what: &'static str,
) {
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            tracing::debug!(%peer, %target, sent, received, "{what} connection closed")
        }
        Err(error) => {
            tracing::debug!(%peer, %target, %error, "{what} connection ended with an error")
        }
    }
}

/// Closes `client` with a reset rather than a clean end of stream when its
/// destination could not be reached, as a refused connection would look
/// to it without the proxy in between.
fn reset(client: &TcpStream) {
    let _ = socket2::SockRef::from(client).set_linger(Some(Duration::ZERO));
}
