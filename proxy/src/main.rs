//! `infermesh-proxy`: the sidecar binary.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use arc_swap::ArcSwap;
use clap::Parser;
use infermesh_proto::policy::{self, ListenerKind, PolicySet};
use infermesh_proxy::admin::{self, Admin};
use infermesh_proxy::listener::Listener;
use infermesh_proxy::metrics::Metrics;
use infermesh_proxy::service::Inputs;
use infermesh_proxy::snapshot::Snapshot;
use tokio::sync::watch;

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
    /// Data-plane worker threads (default: one per CPU).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();

    let policy = match &args.config {
        Some(path) => match policy::load_path(path) {
            Ok(policy) => policy,
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
        None => PolicySet::default(),
    };

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("infermesh-worker");
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("infermesh-proxy: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, policy)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("infermesh-proxy: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("INFERMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,infermesh::access=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn run(args: Args, policy: PolicySet) -> Result<(), String> {
    let metrics = Arc::new(Metrics::new());
    let snapshot = Snapshot::build(policy, &metrics);
    snapshot.start_discovery().await;
    let inputs = Arc::new(Inputs {
        snapshot: ArcSwap::from_pointee(snapshot),
        metrics,
    });

    let outbound = Listener::bind(args.outbound, ListenerKind::Outbound, inputs.clone())
        .await
        .map_err(|e| {
            format!(
                "cannot bind the outbound listener on {}: {e}",
                args.outbound
            )
        })?;
    let inbound = Listener::bind(args.inbound, ListenerKind::Inbound, inputs.clone())
        .await
        .map_err(|e| format!("cannot bind the inbound listener on {}: {e}", args.inbound))?;
    let admin_state = Admin::new(inputs.clone());
    let admin_addr = admin::spawn(args.admin, admin_state.clone())
        .map_err(|e| format!("cannot bind the admin server on {}: {e}", args.admin))?;
    let outbound_addr = outbound.local_addr().map_err(|e| e.to_string())?;
    let inbound_addr = inbound.local_addr().map_err(|e| e.to_string())?;

    let (stop, stopped) = watch::channel(false);
    let outbound_task = tokio::spawn(outbound.run(stopped.clone()));
    let inbound_task = tokio::spawn(inbound.run(stopped));
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

    shutdown_signal().await;
    tracing::info!("shutting down: no new connections; draining in-flight requests");
    admin_state.set_ready(false);
    let _ = stop.send(true);
    let _ = outbound_task.await;
    let _ = inbound_task.await;
    tracing::info!("drained; exiting");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the proxy");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
