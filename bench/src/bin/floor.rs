//! `infermesh-bench-floor`: the least an HTTP/1.1 proxy built on hyper does
//! per request, to measure what hyper itself costs beside nginx and HAProxy.
//!
//! Each client connection gets one upstream connection, opened when the
//! client connects; each request is sent on it as it came (its head and
//! body untouched, streamed both ways) and the response comes back the
//! same way. No routing, no classification, no limits, no metrics, no
//! logs: hyper's HTTP/1.1 server and client connections, tokio and the
//! sockets, as `infermesh-proxy` drives them (one current-thread runtime,
//! the upstream connection a task of its own). `docs/benchmarks.md` says
//! what it showed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use clap::Parser;
use http::Request;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// A bare HTTP/1.1 forwarder on hyper, for benchmarks.
#[derive(Debug, Parser)]
#[command(name = "infermesh-bench-floor")]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Where every request goes.
    #[arg(long)]
    upstream: SocketAddr,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.addr).await?;
        println!("listening addr={}", listener.local_addr()?);
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(async move {
                if let Err(error) = serve(client, args.upstream).await {
                    eprintln!("infermesh-bench-floor: {error}");
                }
            });
        }
    })
}

/// Serves one client connection over one upstream connection.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn serve(client: TcpStream, upstream: SocketAddr) -> Result<(), BoxError> {
    client.set_nodelay(true)?;
    let tcp = TcpStream::connect(upstream).await?;
    tcp.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    // An HTTP/1.1 connection serves one request at a time: the sender is
    // taken for each and put back once its response head arrived.
    let sender: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::new(Mutex::new(Some(sender)));
    let service = service_fn(move |request: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let taken = sender.lock().expect("not poisoned").take();
            let Some(mut upstream) = taken else {
                return Err(std::io::Error::other("the upstream connection is busy"));
            };
            let response = match upstream.ready().await {
                Ok(()) => upstream.send_request(request).await,
                Err(error) => Err(error),
            };
            *sender.lock().expect("not poisoned") = Some(upstream);
            response.map_err(std::io::Error::other)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await?;
    Ok(())
}
