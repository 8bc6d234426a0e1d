//! End-to-end test support for infermesh: upstream model servers written as
//! fixtures, handles on the real `infermesh-proxy` and `infermesh-control`
//! processes, and the clients and parsers the tests drive them with.
//!
//! Every fixture binds `127.0.0.1:0`, reports the address it got, and runs on
//! its own thread with its own tokio runtime, so a test never shares a port or
//! a runtime with another one and a fixture keeps serving while the test
//! blocks.

pub mod client;
pub mod control_plane;
pub mod kserve;
pub mod kube_api;
pub mod local;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod openai;
pub mod otlp;
pub mod policy;
pub mod process;
pub mod python;
pub mod refusing;
pub mod scripted;
pub mod sim;
pub mod tcp;

pub use client::{raw_exchange, Arrivals, HttpClient, Reply, SseEvent};
pub use control_plane::ControlPlaneProcess;
pub use kserve::{GrpcCall, KServeGrpcServer, KServeSettings};
pub use kube_api::KubeApi;
pub use metrics::Metrics;
pub use openai::{OpenAiServer, OpenAiSettings, RecordedRequest, StreamLog, StreamOutcome};
pub use process::{ProxyBuilder, ProxyExit, ProxyProcess};
pub use refusing::RefusingH2Server;
pub use scripted::{ScriptedServer, Step};
pub use sim::SimServer;
pub use tcp::TcpEchoServer;

use std::path::PathBuf;

/// The root of the repository (the Cargo workspace).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the workspace")
        .to_path_buf()
}

/// A port free at the time of asking, for a process that binds it next.
///
/// Taken below the kernel's ephemeral range when there is room: a port
/// the kernel hands out (to `bind(0)`, or as the source port of any
/// connection some test opens) could otherwise be taken between this call
/// and the process's bind, which then fails with "address in use". Ports
/// below the range are only taken by an explicit bind, so they are handed
/// out in turn from a per-process counter (started at an offset of the
/// process id, for test binaries that run side by side) and checked free.
pub fn free_addr() -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let below = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(0);
    if below > LOWEST + 1_000 {
        let span = below - LOWEST;
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let port = LOWEST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port as u16));
            if std::net::TcpListener::bind(addr).is_ok() {
                return addr;
            }
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr");
    drop(listener);
    addr
}

/// An address on which nothing listens, so a connection to it is refused.
pub fn refused_addr() -> std::net::SocketAddr {
    // Bound but never listening: connections are refused, and no other
    // test's listener can take the port while this process lives (a port
    // merely freed could be, and then it would answer).
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().expect("local_addr");
    std::mem::forget(socket);
    addr
}

/// Starts a fixture's thread on `127.0.0.1:0`; see [`spawn_fixture_on`].
pub(crate) fn spawn_fixture<F, Fut>(
    thread_name: &str,
    serve: F,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>)
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    spawn_fixture_on(any_port, thread_name, serve).expect("bind 127.0.0.1:0")
}

/// Starts a fixture's thread: binds `addr` synchronously (so the caller gets
/// the bound address at once), builds a current-thread runtime and runs
/// `serve` on it until the returned sender is dropped or fires.
pub(crate) fn spawn_fixture_on<F, Fut>(
    addr: std::net::SocketAddr,
    thread_name: &str,
    serve: F,
) -> std::io::Result<(std::net::SocketAddr, tokio::sync::oneshot::Sender<()>)>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let listener = std::net::TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(thread_name.to_string())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("fixture runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("from_std");
                tokio::select! {
                    _ = stop_rx => {}
                    _ = serve(listener) => {}
                }
            });
            // Dropping the runtime cancels every connection task, closing its socket.
            runtime.shutdown_timeout(std::time::Duration::from_millis(100));
        })?;
    Ok((addr, stop_tx))
}

/// Polls `check` every 50 ms until it gives a value; panics with `what`
/// and its last complaint after `timeout`.
pub async fn until<T, E, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    E: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = std::time::Instant::now();
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if started.elapsed() > timeout => {
                panic!("{what}: not within {timeout:?}; last: {last:?}")
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `timeout`;
/// panics with `what` when it never does. Returns the value and the time taken.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    mut check: F,
) -> (T, std::time::Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = std::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return (value, started.elapsed());
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
