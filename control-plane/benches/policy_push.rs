//! Policy push at scale: a real `infermesh-control serve` and thousands of
//! lightweight subscribers (tonic clients that ACK every snapshot), all in
//! this process, each on its own HTTP/2 connection as real proxies are.
//!
//! For each size (1,000 then 10,000 subscribers by default) it edits the
//! policy file several times and measures, for each edit, the time from the
//! write to the last subscriber's ACK of the new version; and it reads the
//! control plane's memory (VmRSS, VmHWM) from /proc at idle and at each size.
//!
//! ```text
//! cargo bench -p infermesh-control --bench policy_push
//! cargo bench -p infermesh-control --bench policy_push -- --proxies 1000,10000 --edits 30
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use infermesh_proto::policy_api::policy_discovery_client::PolicyDiscoveryClient;
use infermesh_proto::policy_api::proxy_message::Message;
use infermesh_proto::policy_api::{Ack, Hello, ProxyMessage};
use tokio::sync::{mpsc, Semaphore};

/// Namespaces the subscribers are spread over, so that scoping does work.
const NAMESPACES: usize = 10;

struct Options {
    sizes: Vec<usize>,
    edits: usize,
}

fn options() -> Options {
    let mut options = Options {
        sizes: vec![1_000, 10_000],
        edits: 30,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--proxies" => {
                options.sizes = args
                    .next()
                    .expect("--proxies N[,N...]")
                    .split(',')
                    .map(|n| n.parse().expect("a number of proxies"))
                    .collect();
            }
            "--edits" => options.edits = args.next().expect("--edits N").parse().expect("N"),
            // `cargo bench` passes `--bench`; anything else is ignored too.
            _ => {}
        }
    }
    options
}

/// Lets this process (and the control plane it starts) hold one socket per
/// subscriber: the soft limit on open files goes up to the hard limit.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

/// A mesh of 20 backends and 40 routes: some mesh-wide, some per namespace,
/// some for labelled workloads; and a MeshConfig every proxy receives,
/// whose `drainTimeout` the edits change.
fn policy(drain_seconds: usize) -> String {
    let mut docs = Vec::new();
    for b in 0..20 {
        docs.push(format!(
            "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {{name: model-{b}}}\nspec:\n  endpoints: [\"model-{b}-0.models.svc.cluster.local:8000\", \"model-{b}-1.models.svc.cluster.local:8000\"]\n  balancer: peak-ewma\n"
        ));
    }
    for r in 0..40 {
        let scope = match r % 4 {
            0 => String::new(),
            1 => format!(", namespace: ns-{}", r % NAMESPACES),
            _ => String::new(),
        };
        let selector = if r % 4 == 2 {
            "\n  workloadSelector: {matchLabels: {track: canary}}"
        } else {
            ""
        };
        docs.push(format!(
            "apiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: route-{r}{scope}}}\nspec:\n  match:\n    - model: {{exact: model-{r}}}\n      headers: [{{name: x-tenant, value: tenant-{r}}}]\n  backends:\n    - {{backend: model-{}, weight: 9}}\n    - {{backend: model-{}, weight: 1}}\n  timeouts: {{firstByte: 30s, idle: 60s}}{selector}\n",
            r % 20,
            (r + 1) % 20
        ));
    }
    docs.push(format!(
        "apiVersion: infermesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  drainTimeout: {drain_seconds}s\n"
    ));
    docs.join("---\n")
}

struct ControlPlane {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
}

impl ControlPlane {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_infermesh-control"))
            .args(["serve", "--policies"])
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("INFERMESH_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("infermesh-control starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the listening line");
        let addr = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|p| p.strip_prefix(key))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        };
        let (grpc, admin) = (addr("grpc="), addr("admin="));
        Self { child, grpc, admin }
    }

    fn get(&self, path: &str) -> String {
        let mut stream = TcpStream::connect(self.admin).expect("admin");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
        )
        .expect("send");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("read");
        reply
    }

    fn metric(&self, name: &str) -> f64 {
        self.get("/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// (VmRSS, VmHWM) in MiB.
    fn memory(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        let field = |name: &str| -> f64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .map_or(f64::NAN, |kib| kib / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// CPU seconds the control plane used so far (user + system).
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("/proc stat");
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of /proc/PID/stat; after the
        // `)` the first field is the 3rd.
        (ticks(11) + ticks(12)) / 100.0
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One ACK a subscriber sent: the version, when, and the size of the
/// snapshot it answers (encoded protobuf bytes).
type AckEvent = (u64, Instant, usize);

/// Opens a subscriber that ACKs every snapshot and reports each ACK.
async fn subscribe(
    addr: SocketAddr,
    index: usize,
    acks: mpsc::UnboundedSender<AckEvent>,
) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = PolicyDiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel::<ProxyMessage>(4);
    let mut labels = HashMap::new();
    labels.insert("app".to_owned(), format!("app-{}", index % 50));
    labels.insert("pod".to_owned(), format!("pod-{index}"));
    if index.is_multiple_of(10) {
        labels.insert("track".to_owned(), "canary".to_owned());
    }
    let hello = Hello {
        proxy_id: format!("pod-{index}"),
        identity: format!("spiffe://cluster.local/ns/ns-{}/sa/app", index % NAMESPACES),
        namespace: format!("ns-{}", index % NAMESPACES),
        labels,
        version: 0,
    };
    let _ = tx.try_send(ProxyMessage {
        message: Some(Message::Hello(hello)),
    });
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut inbound = client
        .subscribe(outgoing)
        .await
        .map_err(|e| format!("subscribe: {e}"))?
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(snapshot)) = inbound.message().await {
            let size = prost::Message::encoded_len(&snapshot);
            let ack = ProxyMessage {
                message: Some(Message::Ack(Ack {
                    version: snapshot.version,
                    nonce: snapshot.nonce,
                })),
            };
            let version = snapshot.version;
            if tx.send(ack).await.is_err() {
                break;
            }
            let _ = acks.send((version, Instant::now(), size));
        }
    });
    Ok(())
}

/// Counts ACKs per version and tells when a version has `target` of them.
struct Tally {
    acks: mpsc::UnboundedReceiver<AckEvent>,
    per_version: HashMap<u64, (usize, Instant)>,
    /// Snapshots received and their bytes, for the average size.
    snapshots: usize,
    bytes: usize,
}

impl Tally {
    /// Waits until `target` ACKs of `version` arrived; returns the last one's time.
    async fn wait(&mut self, version: u64, target: usize, limit: Duration) -> Option<Instant> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some((count, last)) = self.per_version.get(&version) {
                if *count >= target {
                    return Some(*last);
                }
            }
            let (v, at, size) = tokio::time::timeout_at(deadline, self.acks.recv())
                .await
                .ok()??;
            let entry = self.per_version.entry(v).or_insert((0, at));
            entry.0 += 1;
            entry.1 = entry.1.max(at);
            self.bytes += size;
            self.snapshots += 1;
        }
    }
}

/// The 1-minute load average: the machine is shared, and it shows.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let options = options();
    let fd_limit = raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(options, fd_limit));
}

async fn run(options: Options, fd_limit: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("policy.yaml");
    let mut drain = 30;
    std::fs::write(&file, policy(drain)).expect("write policy");
    let cp = ControlPlane::start(dir.path());
    while !cp.get("/ready").starts_with("HTTP/1.1 200") {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut version = cp.metric("infermesh_control_snapshot_version") as u64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle_rss, _) = cp.memory();
    println!(
        "policy: 20 backends, 40 routes, 1 MeshConfig ({} bytes of YAML); open-file limit {fd_limit}; load average {}",
        policy(drain).len(),
        load_average()
    );
    println!("idle: VmRSS {idle_rss:.1} MiB");

    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    let mut tally = Tally {
        acks: acks_rx,
        per_version: HashMap::new(),
        snapshots: 0,
        bytes: 0,
    };
    let mut open = 0;
    let mut rows = Vec::new();
    for &size in &options.sizes {
        // Open the subscribers this size adds, 256 connecting at a time.
        let started = Instant::now();
        let gate = Arc::new(Semaphore::new(256));
        let mut tasks = Vec::new();
        for index in open..size {
            let permit = gate.clone().acquire_owned().await.expect("semaphore");
            let acks = acks_tx.clone();
            let addr = cp.grpc;
            tasks.push(tokio::spawn(async move {
                let result = subscribe(addr, index, acks).await;
                drop(permit);
                result
            }));
        }
        for task in tasks {
            if let Err(error) = task.await.expect("task") {
                panic!("a subscriber failed: {error}");
            }
        }
        open = size;
        let synced = tally
            .wait(version, size, Duration::from_secs(120))
            .await
            .is_some();
        assert!(synced, "not every subscriber got version {version}");
        let connect = started.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss_connected, _) = cp.memory();

        let cpu_before = cp.cpu_seconds();
        let mut latencies = Vec::new();
        for _ in 0..options.edits {
            drain += 1;
            let text = policy(drain);
            let written = Instant::now();
            std::fs::write(&file, text).expect("edit policy");
            version += 1;
            let last = tally
                .wait(version, size, Duration::from_secs(60))
                .await
                .unwrap_or_else(|| panic!("version {version} did not reach {size} subscribers"));
            latencies.push(last.saturating_duration_since(written));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let cpu = cp.cpu_seconds() - cpu_before;
        let (rss, hwm) = cp.memory();
        latencies.sort();
        let acks = cp.metric("infermesh_control_acks_total");
        println!(
            "{size} subscribers: connected and synced in {:.1} s; {} edits: p50 {}, p99 {}, max {}; VmRSS {rss_connected:.1} MiB after connecting, {rss:.1} MiB after the edits, VmHWM {hwm:.1} MiB; control-plane CPU {:.0} µs per push; {acks} ACKs counted; mean snapshot {} bytes; load average {}",
            connect.as_secs_f64(),
            options.edits,
            ms(percentile(&latencies, 50.0)),
            ms(percentile(&latencies, 99.0)),
            ms(latencies.last().copied().unwrap_or_default()),
            cpu * 1e6 / (options.edits * size) as f64,
            tally.bytes / tally.snapshots.max(1),
            load_average(),
        );
        rows.push((size, latencies, rss, hwm));
    }

    println!();
    println!("| subscribers | edits | file change → last ACK p50 | p99 | VmRSS | VmHWM | RSS per subscriber |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    println!("| 0 (idle) | | | | {idle_rss:.1} MiB | | |");
    for (size, latencies, rss, hwm) in &rows {
        println!(
            "| {size} | {} | {} | {} | {rss:.1} MiB | {hwm:.1} MiB | {:.1} KiB |",
            latencies.len(),
            ms(percentile(latencies, 50.0)),
            ms(percentile(latencies, 99.0)),
            (rss - idle_rss) * 1024.0 / *size as f64,
        );
    }
}
