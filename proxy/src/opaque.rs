//! Opaque TCP: connections that are neither HTTP/1.1 nor HTTP/2 are copied
//! byte for byte to the mesh's opaque backend, or refused when there is none.

use std::net::SocketAddr;
use std::time::Duration;

use infermesh_proto::policy::ListenerKind;
use tokio::net::TcpStream;

use crate::inputs::Inputs;
use crate::metrics::{listener_label, OpaqueLabels};
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
