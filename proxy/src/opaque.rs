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
pub async fn serve(mut client: TcpStream, peer: SocketAddr, kind: ListenerKind, inputs: &Inputs) {
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
        refusal::log(
            listener,
            Reason::NotHttp,
            peer,
            &"refused a connection that is not HTTP: no opaque backend is configured (MeshConfig spec.opaque.backend)",
        );
        return;
    };
    let Some(endpoint) = backend.pick() else {
        count("refused");
        tracing::warn!(%peer, backend = backend.name().as_str(), "refused an opaque connection: the backend has no endpoint");
        return;
    };
    let _in_flight = endpoint.start();
    let mut upstream = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect(endpoint.addr()),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            count("refused");
            backend.connect_failed();
            tracing::warn!(%peer, endpoint = %endpoint.addr(), %error, "opaque connection: connecting upstream failed");
            return;
        }
        Err(_) => {
            count("refused");
            backend.connect_failed();
            tracing::warn!(%peer, endpoint = %endpoint.addr(), "opaque connection: connecting upstream timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    count("forwarded");
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            tracing::debug!(%peer, endpoint = %endpoint.addr(), sent, received, "opaque connection closed")
        }
        Err(error) => tracing::debug!(%peer, %error, "opaque connection ended with an error"),
    }
}

/// Copies an intercepted connection that no route can claim (not HTTP, or
/// to an opaque port) to `target`, its original destination (outbound) or
/// the local application (inbound), byte for byte.
pub async fn pass_through(
    mut client: TcpStream,
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
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            count("failed");
            tracing::debug!(listener, %peer, %target, %error, "passthrough: connecting failed");
            reset(&client);
            return;
        }
        Err(_) => {
            count("failed");
            tracing::debug!(listener, %peer, %target, "passthrough: connecting timed out");
            reset(&client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    count("forwarded");
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            tracing::debug!(listener, %peer, %target, sent, received, "passthrough connection closed")
        }
        Err(error) => {
            tracing::debug!(listener, %peer, %error, "passthrough connection ended with an error")
        }
    }
}

/// Closes `client` with a reset rather than a clean end of stream when its
/// destination could not be reached, as a refused connection would look
/// to it without the proxy in between.
fn reset(client: &TcpStream) {
    let _ = socket2::SockRef::from(client).set_linger(Some(Duration::ZERO));
}
