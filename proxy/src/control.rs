//! Following a control plane (`--control-plane URL`): the proxy opens one
//! `PolicyDiscovery.Subscribe` stream, says who it is and which version it
//! holds, and answers every snapshot it is sent with an ACK once the snapshot
//! is in force, or a NACK with the reason while it keeps the one it had.
//!
//! Like an xDS client, and unlike a poller, the proxy never asks for a
//! version: it states what it holds and the control plane decides what to
//! send. When the stream breaks the proxy keeps serving its last good
//! snapshot and reconnects with exponential back-off and full jitter,
//! forever, logging each change of state once rather than each attempt.
//! With `--policy-cache` the last applied snapshot is also kept on disk, and
//! served at start-up when the control plane cannot be reached.

mod cache;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use infermesh_filters::backoff::{Backoff, BackoffState, Jitter};
use infermesh_proto::policy::{PolicySet, Workload};
use infermesh_proto::policy_api::policy_discovery_client::PolicyDiscoveryClient;
use infermesh_proto::policy_api::proxy_message::Message;
use infermesh_proto::policy_api::{Ack, Hello, Nack, PolicySnapshot, ProxyMessage};
use infermesh_proto::spiffe::SpiffeId;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

use crate::identity::Identity;

pub use cache::{CacheError, Cached, PolicyCache};

use crate::error::error_chain;
use crate::inputs::Inputs;
use crate::snapshot::{Origin, Snapshot, Source};

/// Reconnect delays: a ceiling of 100 ms doubling to 10 s, full jitter, so
/// the proxies cut off by one control-plane restart do not all come back in
/// the same millisecond.
const RECONNECT: Backoff = Backoff::new(
    Duration::from_millis(100),
    Duration::from_secs(10),
    Jitter::Full,
);
/// How long start-up waits for the control plane's first snapshot before it
/// serves the cached one (sooner when the control plane cannot be reached).
const CACHE_GRACE: Duration = Duration::from_secs(3);
/// Limit on establishing the connection to the control plane.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new snapshot waits for its new backends' host names to
/// resolve before it goes into force anyway (they keep resolving).
const DISCOVERY_WAIT: Duration = Duration::from_secs(2);
/// Largest snapshot message accepted; tonic's default of 4 MiB is too small
/// for the default `--max-policy-resources`.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How often the proxy sends its traffic summary (when it had traffic);
/// `INFERMESH_SUMMARY_INTERVAL_MS` changes it.
fn summary_interval() -> Duration {
    std::env::var("INFERMESH_SUMMARY_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map_or(Duration::from_secs(5), Duration::from_millis)
}

/// Who this proxy is, as told to the control plane in the Hello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// Unique per proxy instance (the pod name, or `hostname-pid`).
    pub proxy_id: String,
    /// Workload identity (service account, or SPIFFE ID).
    pub identity: String,
    /// Namespace and labels of the workload, which scope the policy it gets.
    pub workload: Workload,
}

/// What the proxy needs to follow a control plane.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `http://host:port` of the control plane's policy gRPC server.
    pub url: String,
    /// Who this proxy is.
    pub node: Node,
    /// Where the last applied snapshot is kept, if anywhere.
    pub cache: Option<PolicyCache>,
    /// Snapshots with more resources than this are refused.
    pub max_resources: usize,
    /// With a mesh identity: the stream waits for the first certificate
    /// and runs over mutual TLS, verifying the control plane's SPIFFE ID.
    pub tls: Option<(Arc<Identity>, SpiffeId)>,
}

/// A control-plane setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// `--control-plane` is neither `http://` nor `https://`.
    #[error("invalid control-plane URL {url:?}: expected http://host:port")]
    Scheme {
        /// The URL given.
        url: String,
    },
    /// `--control-plane` does not parse as a URL.
    #[error("invalid control-plane URL {url:?}: {}", error_chain(.source))]
    Url {
        /// The URL given.
        url: String,
        /// What tonic said of it.
        #[source]
        source: tonic::transport::Error,
    },
}

/// The policy stream's state, for the admin server.
#[derive(Debug, Default)]
pub struct Status {
    url: String,
    connected: AtomicBool,
    rejected: Mutex<Option<Rejection>>,
}

/// The last snapshot the proxy refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Its version.
    pub version: u64,
    /// Why, as sent in the NACK.
    pub error: String,
}

impl Status {
    /// The control plane's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the policy stream is open.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// The last snapshot refused, if any.
    pub fn last_rejected(&self) -> Option<Rejection> {
        self.rejected.lock().clone()
    }
}

/// Decides whether a pushed snapshot can be applied: the policy to put in
/// force, or the reason to send in the NACK.
pub fn check_snapshot(
    snapshot: &PolicySnapshot,
    max_resources: usize,
) -> Result<PolicySet, String> {
    let count = snapshot.resources.len();
    if count > max_resources {
        return Err(format!(
            "snapshot has {count} resources; this proxy accepts at most {max_resources} (--max-policy-resources)"
        ));
    }
    PolicySet::from_resources(&snapshot.resources)
}

/// The version to state in a Hello: that of the snapshot in force when it
/// came from the control plane (directly or through the cache), else 0.
pub fn held_version(snapshot: &Snapshot) -> u64 {
    match snapshot.source() {
        Source::ControlPlane | Source::Cache => snapshot.version(),
        Source::Pending | Source::Default | Source::File => 0,
    }
}

/// Builds a snapshot from `policy` on top of the one in force, waits briefly
/// for its new backends' host names, and swaps it in: requests already
/// running finish on the old one.
pub async fn install(inputs: &Inputs, policy: PolicySet, origin: Origin, drain: &drain::Watch) {
    let previous = inputs.snapshot.load_full();
    let next = Arc::new(Snapshot::build(
        policy,
        origin,
        Some(&previous),
        &inputs.metrics,
        inputs.identity.as_ref(),
    ));
    // In a task of its own, so that giving up the wait does not stop it.
    let discovery = tokio::spawn({
        let next = next.clone();
        let drain = drain.clone();
        async move { next.start_discovery(&drain).await }
    });
    let _ = tokio::time::timeout(DISCOVERY_WAIT, discovery).await;
    let tracing = next
        .policy()
        .mesh
        .as_ref()
        .and_then(|m| m.spec.tracing.as_ref());
    if let Err(error) = crate::traces::configure(tracing, &inputs.metrics.trace_spans_dropped) {
        tracing::error!(error = %error, "cannot export traces: tracing stays as it was");
    }
    crate::otlp_metrics::configure(
        next.policy()
            .mesh
            .as_ref()
            .and_then(|m| m.spec.otlp_metrics.as_ref()),
        &inputs.metrics.otlp_metric_exports_failed,
    );
    inputs.snapshot.store(next);
    inputs.metrics.policy_version.set(origin.version as i64);
    inputs.metrics.policy_update(true);
}

/// The policy-stream client.
#[derive(Debug)]
pub struct ControlPlane {
    endpoint: Endpoint,
    settings: Settings,
    inputs: Arc<Inputs>,
    status: Arc<Status>,
    cache_failing: AtomicBool,
    /// Released when the client's task ends.
    drain: drain::Watch,
}

/// Whether the stream is up, for logging each change once.
#[derive(Debug, PartialEq, Eq)]
enum Link {
    Starting,
    Up,
    Down(String),
}

impl ControlPlane {
    /// A client for `settings.url`, its URL checked; nothing is connected
    /// until [`ControlPlane::run`], which follows the stream under `drain`
    /// (which also holds the discovery of the backends it installs).
    pub fn new(
        settings: Settings,
        inputs: Arc<Inputs>,
        drain: drain::Watch,
    ) -> Result<Self, ControlError> {
        if !(settings.url.starts_with("http://") || settings.url.starts_with("https://")) {
            return Err(ControlError::Scheme {
                url: settings.url.clone(),
            });
        }
        let endpoint = Endpoint::from_shared(settings.url.clone())
            .map_err(|source| ControlError::Url {
                url: settings.url.clone(),
                source,
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // Notice a control plane that vanished without closing the stream.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let status = Arc::new(Status {
            url: settings.url.clone(),
            ..Status::default()
        });
        Ok(Self {
            endpoint,
            settings,
            inputs,
            status,
            cache_failing: AtomicBool::new(false),
            drain,
        })
    }

    /// The stream's state, for the admin server.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Follows the control plane until the drain is signaled; snapshots it
    /// applies start their backends' discovery under the same drain.
    pub async fn run(self) {
        tokio::select! {
            release = self.drain.clone().signaled() => {
                tracing::debug!("leaving the policy stream: draining");
                drop(release);
            }
            () = self.follow() => {}
        }
    }

    async fn follow(&self) {
        let mut cached = self.read_cache();
        let cache_deadline = tokio::time::Instant::now() + CACHE_GRACE;
        let mut backoff = BackoffState::new(RECONNECT);
        let mut link = Link::Starting;
        loop {
            let reason = {
                let session = self.session(&mut link, &mut backoff);
                tokio::pin!(session);
                loop {
                    tokio::select! {
                        reason = &mut session => break reason,
                        _ = tokio::time::sleep_until(cache_deadline), if cached.is_some() => {
                            self.serve_cache(cached.take(), "no snapshot from the control plane yet").await;
                        }
                    }
                }
            };
            self.set_connected(false);
            self.serve_cache(cached.take(), "the control plane cannot be reached")
                .await;
            let current = self.inputs.snapshot.load();
            if link != Link::Down(reason.clone()) {
                tracing::warn!(
                    url = %self.settings.url,
                    reason = %reason,
                    serving_version = current.version(),
                    source = current.source().as_str(),
                    "control plane unavailable; serving the snapshot in force and reconnecting with back-off"
                );
            }
            link = Link::Down(reason);
            let delay = backoff.next_delay();
            tracing::debug!(?delay, "reconnecting to the control plane");
            tokio::time::sleep(delay).await;
        }
    }

    /// One stream, from connecting to its end; returns why it ended.
    async fn session(&self, link: &mut Link, backoff: &mut BackoffState) -> String {
        let connected = match &self.settings.tls {
            Some((identity, control_plane_id)) => {
                if !identity.certified() {
                    tracing::info!(
                        "waiting for the mesh certificate before subscribing to the control plane"
                    );
                    identity.wait_certified().await;
                }
                let tls = identity.client_config(control_plane_id.clone());
                crate::identity::connect(&self.settings.url, tls)
                    .await
                    .map_err(|error| error.to_string())
            }
            None => self.endpoint.connect().await.map_err(|error| {
                format!(
                    "cannot connect to {}: {}",
                    self.settings.url,
                    error_chain(&error)
                )
            }),
        };
        let channel = match connected {
            Ok(channel) => channel,
            Err(error) => return error,
        };
        let mut client =
            PolicyDiscoveryClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<ProxyMessage>(8);
        let hello = self.hello();
        let held = hello.version;
        // The receiver is alive and the channel empty: this cannot fail.
        let _ = tx.try_send(ProxyMessage {
            message: Some(Message::Hello(hello)),
        });
        let outgoing = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|message| (message, rx))
        });
        let mut incoming = match client.subscribe(outgoing).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                return format!(
                    "the control plane refused the policy stream: {}",
                    describe_status(&status)
                )
            }
        };
        self.set_connected(true);
        if *link != Link::Up {
            tracing::info!(url = %self.settings.url, held_version = held, "subscribed to the control plane");
        }
        *link = Link::Up;
        // The first summary one interval after subscribing (not at once:
        // the answer to the first snapshot comes first).
        let every = summary_interval();
        let mut summaries = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        summaries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                message = incoming.message() => message,
                _ = summaries.tick() => {
                    if let Some(summary) = crate::summary::summaries().take() {
                        // A full channel (the stream is stuck) drops the
                        // summary rather than wait: it is only figures.
                        let _ = tx.try_send(ProxyMessage {
                            message: Some(Message::Summary(summary)),
                        });
                    }
                    continue;
                }
            };
            match message {
                Ok(Some(snapshot)) => {
                    backoff.reset();
                    let reply = self.apply(snapshot).await;
                    if tx.send(reply).await.is_err() {
                        return "the policy stream closed".into();
                    }
                }
                Ok(None) => return "the control plane closed the policy stream".into(),
                Err(status) => {
                    return format!("the policy stream broke: {}", describe_status(&status))
                }
            }
        }
    }

    fn hello(&self) -> Hello {
        let node = &self.settings.node;
        Hello {
            proxy_id: node.proxy_id.clone(),
            identity: node.identity.clone(),
            namespace: node.workload.namespace.clone(),
            labels: node.workload.labels.clone().into_iter().collect(),
            version: held_version(&self.inputs.snapshot.load()),
        }
    }

    /// Applies one pushed snapshot and says how it went.
    async fn apply(&self, snapshot: PolicySnapshot) -> ProxyMessage {
        let version = snapshot.version;
        let message = match check_snapshot(&snapshot, self.settings.max_resources) {
            Ok(policy) => {
                let origin = Origin {
                    version,
                    source: Source::ControlPlane,
                };
                install(&self.inputs, policy, origin, &self.drain).await;
                tracing::info!(
                    version,
                    resources = snapshot.resources.len(),
                    "applied a policy snapshot from the control plane"
                );
                self.write_cache(version, snapshot.resources).await;
                Message::Ack(Ack {
                    version,
                    nonce: snapshot.nonce,
                })
            }
            Err(error) => {
                let keeping = self.inputs.snapshot.load().version();
                tracing::warn!(
                    version,
                    keeping_version = keeping,
                    %error,
                    "rejected a policy snapshot from the control plane"
                );
                self.inputs.metrics.policy_update(false);
                *self.status.rejected.lock() = Some(Rejection {
                    version,
                    error: error.clone(),
                });
                Message::Nack(Nack {
                    version,
                    nonce: snapshot.nonce,
                    error,
                })
            }
        };
        ProxyMessage {
            message: Some(message),
        }
    }

    fn set_connected(&self, connected: bool) {
        self.status.connected.store(connected, Ordering::Release);
        self.inputs
            .metrics
            .control_plane_connected
            .set(i64::from(connected));
    }

    /// Reads and checks the cache; a bad one is logged and ignored.
    fn read_cache(&self) -> Option<Cached> {
        let cache = self.settings.cache.as_ref()?;
        match cache.load() {
            Ok(Some(cached)) => Some(cached),
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(%error, "ignoring the policy cache");
                None
            }
        }
    }

    /// Serves the cached snapshot, unless one from the control plane (or the
    /// cache itself) is already in force.
    async fn serve_cache(&self, cached: Option<Cached>, why: &str) {
        let Some(cached) = cached else { return };
        if self.inputs.snapshot.load().source() != Source::Pending {
            return;
        }
        let path = self
            .settings
            .cache
            .as_ref()
            .map(|c| c.path().display().to_string())
            .unwrap_or_default();
        let snapshot = PolicySnapshot {
            version: cached.version,
            nonce: String::new(),
            resources: cached.resources,
        };
        match check_snapshot(&snapshot, self.settings.max_resources) {
            Ok(policy) => {
                let origin = Origin {
                    version: cached.version,
                    source: Source::Cache,
                };
                install(&self.inputs, policy, origin, &self.drain).await;
                tracing::warn!(
                    version = cached.version,
                    cache = %path,
                    "{why}: serving the cached policy snapshot"
                );
            }
            Err(error) => {
                self.inputs.metrics.policy_update(false);
                tracing::warn!(cache = %path, %error, "{why}, and the cached policy snapshot cannot be applied");
            }
        }
    }

    async fn write_cache(
        &self,
        version: u64,
        resources: Vec<infermesh_proto::policy_api::Resource>,
    ) {
        let Some(cache) = self.settings.cache.clone() else {
            return;
        };
        let written = tokio::task::spawn_blocking(move || cache.store(version, &resources)).await;
        let error = match written {
            Ok(Ok(())) => {
                if self.cache_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the policy cache is written again");
                }
                return;
            }
            Ok(Err(error)) => error.to_string(),
            Err(error) => error.to_string(),
        };
        if !self.cache_failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "cannot keep the policy snapshot on disk; serving it all the same");
        }
    }
}

fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{:?}", status.code());
    if !status.message().is_empty() {
        text.push_str(": ");
        text.push_str(status.message());
    }
    if let Some(source) = std::error::Error::source(status) {
        let cause = error_chain(source);
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::pin::Pin;

    use arc_swap::ArcSwap;
    use futures_util::Stream;
    use infermesh_proto::policy_api::policy_discovery_server::{
        PolicyDiscovery, PolicyDiscoveryServer,
    };
    use infermesh_proto::policy_api::Resource;
    use tonic::{Request, Response, Status as GrpcStatus, Streaming};

    use super::*;
    use crate::metrics::Metrics;

    const POLICY: &str = r#"
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: vllm}
spec:
  endpoints: ["127.0.0.1:8000"]
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: chat}
spec:
  backends: [{backend: vllm}]
"#;

    fn resources() -> Vec<Resource> {
        infermesh_proto::policy::load_str(Path::new("p.yaml"), POLICY)
            .unwrap()
            .to_resources()
    }

    fn push(version: u64, resources: Vec<Resource>) -> PolicySnapshot {
        PolicySnapshot {
            version,
            nonce: format!("n{version}"),
            resources,
        }
    }

    #[test]
    fn a_snapshot_over_the_resource_limit_is_refused_with_the_counts() {
        let error = check_snapshot(&push(1, resources()), 1).unwrap_err();
        assert_eq!(
            error,
            "snapshot has 2 resources; this proxy accepts at most 1 (--max-policy-resources)"
        );
        assert!(check_snapshot(&push(1, resources()), 2).is_ok());
    }

    #[test]
    fn an_undecodable_snapshot_is_refused_with_the_reason() {
        let mut bad = resources();
        bad[0].json = "{\"apiVersion\": 3}".into();
        let error = check_snapshot(&push(1, bad), 100).unwrap_err();
        assert!(error.starts_with("Backend \"vllm\""), "{error}");
        let routes_only = resources().into_iter().skip(1).collect();
        let error = check_snapshot(&push(1, routes_only), 100).unwrap_err();
        assert!(error.contains("not in the snapshot"), "{error}");
    }

    #[test]
    fn only_a_snapshot_from_the_control_plane_has_a_version_to_state() {
        let metrics = Metrics::new();
        let build = |source| {
            Snapshot::build(
                PolicySet::default(),
                Origin { version: 9, source },
                None,
                &metrics,
                None,
            )
        };
        assert_eq!(held_version(&build(Source::ControlPlane)), 9);
        assert_eq!(held_version(&build(Source::Cache)), 9);
        assert_eq!(held_version(&build(Source::File)), 0);
        assert_eq!(held_version(&build(Source::Pending)), 0);
    }

    #[test]
    fn a_url_without_a_scheme_is_refused() {
        let settings = Settings {
            url: "127.0.0.1:8080".into(),
            node: Node::default(),
            cache: None,
            max_resources: 10,
            tls: None,
        };
        let error = ControlPlane::new(settings, inputs(), drain::channel().1).unwrap_err();
        assert!(error.to_string().contains("expected http://"), "{error}");
    }

    // === a scripted control plane ===

    /// One stream as the fake control plane sees it.
    struct Session {
        from_proxy: Streaming<ProxyMessage>,
        to_proxy: mpsc::Sender<Result<PolicySnapshot, GrpcStatus>>,
    }

    impl Session {
        async fn next(&mut self) -> Message {
            let message = tokio::time::timeout(Duration::from_secs(10), self.from_proxy.message())
                .await
                .expect("the proxy answers")
                .expect("the stream is intact")
                .expect("the stream is open");
            match message.message.expect("a message") {
                // Traffic of other tests in this process, summarised.
                Message::Summary(_) => Box::pin(self.next()).await,
                message => message,
            }
        }

        async fn hello(&mut self) -> Hello {
            match self.next().await {
                Message::Hello(hello) => hello,
                other => panic!("expected a Hello, got {other:?}"),
            }
        }

        async fn send(&self, snapshot: PolicySnapshot) {
            self.to_proxy.send(Ok(snapshot)).await.unwrap();
        }
    }

    struct Fake {
        sessions: mpsc::UnboundedSender<Session>,
    }

    type SnapshotStream = Pin<Box<dyn Stream<Item = Result<PolicySnapshot, GrpcStatus>> + Send>>;

    #[tonic::codegen::async_trait]
    impl PolicyDiscovery for Fake {
        type SubscribeStream = SnapshotStream;

        async fn subscribe(
            &self,
            request: Request<Streaming<ProxyMessage>>,
        ) -> Result<Response<SnapshotStream>, GrpcStatus> {
            let (tx, rx) = mpsc::channel(8);
            let _ = self.sessions.send(Session {
                from_proxy: request.into_inner(),
                to_proxy: tx,
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            });
            Ok(Response::new(Box::pin(stream)))
        }
    }

    async fn fake_control_plane() -> (SocketAddr, mpsc::UnboundedReceiver<Session>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let incoming = futures_util::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| stream);
            Some((accepted, listener))
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PolicyDiscoveryServer::new(Fake { sessions: tx }))
                .serve_with_incoming(incoming),
        );
        (addr, rx)
    }

    fn inputs() -> Arc<Inputs> {
        let metrics = Arc::new(Metrics::new());
        let snapshot = Snapshot::build(
            PolicySet::default(),
            Origin::local(Source::Pending),
            None,
            &metrics,
            None,
        );
        Arc::new(Inputs {
            snapshot: ArcSwap::from_pointee(snapshot),
            passthrough: crate::passthrough::Passthrough::new(&metrics),
            metrics,
            identity: None,
        })
    }

    fn settings(addr: SocketAddr, cache: Option<PolicyCache>) -> Settings {
        Settings {
            url: format!("http://{addr}"),
            node: Node {
                proxy_id: "proxy-1".into(),
                identity: "sa/chat".into(),
                workload: Workload {
                    namespace: "team-a".into(),
                    labels: [("app".to_string(), "chat".to_string())].into(),
                },
            },
            cache,
            max_resources: 2,
            tls: None,
        }
    }

    async fn next_session(sessions: &mut mpsc::UnboundedReceiver<Session>) -> Session {
        tokio::time::timeout(Duration::from_secs(10), sessions.recv())
            .await
            .expect("the proxy connects")
            .expect("the fake is serving")
    }

    #[tokio::test]
    async fn the_proxy_says_who_it_is_applies_pushes_and_acks_or_nacks_them() {
        let (addr, mut sessions) = fake_control_plane().await;
        let inputs = inputs();
        // The signal lives as long as the test: dropped, it would drain.
        let (_signal, drain) = drain::channel();
        let control = ControlPlane::new(settings(addr, None), inputs.clone(), drain).unwrap();
        let status = control.status();
        let task = tokio::spawn(control.run());

        let mut session = next_session(&mut sessions).await;
        let hello = session.hello().await;
        assert_eq!(hello.proxy_id, "proxy-1");
        assert_eq!(hello.identity, "sa/chat");
        assert_eq!(hello.namespace, "team-a");
        assert_eq!(hello.labels.get("app").map(String::as_str), Some("chat"));
        assert_eq!(hello.version, 0, "holds nothing yet");

        session.send(push(5, resources())).await;
        assert_eq!(
            session.next().await,
            Message::Ack(Ack {
                version: 5,
                nonce: "n5".into()
            })
        );
        let snapshot = inputs.snapshot.load();
        assert_eq!(
            (snapshot.version(), snapshot.source()),
            (5, Source::ControlPlane)
        );
        assert!(snapshot.backend("vllm").is_some());
        assert!(status.connected());

        // Three resources where two are allowed: refused, version 5 stays.
        let mut three = resources();
        three.push(three[0].clone());
        session.send(push(6, three)).await;
        match session.next().await {
            Message::Nack(nack) => {
                assert_eq!((nack.version, nack.nonce.as_str()), (6, "n6"));
                assert!(nack.error.contains("has 3 resources"), "{}", nack.error);
            }
            other => panic!("expected a Nack, got {other:?}"),
        }
        assert_eq!(inputs.snapshot.load().version(), 5);
        assert_eq!(status.last_rejected().map(|r| r.version), Some(6));
        let metrics = inputs.metrics.render();
        assert!(
            metrics.contains("infermesh_policy_updates_total{outcome=\"applied\"} 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("infermesh_policy_updates_total{outcome=\"rejected\"} 1"),
            "{metrics}"
        );
        assert!(metrics.contains("infermesh_policy_version 5"), "{metrics}");
        assert!(
            metrics.contains("infermesh_control_plane_connected 1"),
            "{metrics}"
        );

        // The control plane goes away: the proxy keeps version 5, reconnects
        // and says it holds version 5.
        drop(session);
        let mut session = next_session(&mut sessions).await;
        assert_eq!(session.hello().await.version, 5);
        assert_eq!(inputs.snapshot.load().version(), 5);
        session.send(push(7, resources())).await;
        assert!(matches!(
            session.next().await,
            Message::Ack(Ack { version: 7, .. })
        ));
        task.abort();
    }

    #[tokio::test]
    async fn without_a_control_plane_the_cache_is_served_and_its_version_stated_later() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PolicyCache::new(dir.path().join("policy.json"));
        cache.store(41, &resources()).unwrap();

        // Nothing listens at first.
        let addr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let inputs = inputs();
        let (_signal, drain) = drain::channel();
        let control =
            ControlPlane::new(settings(addr, Some(cache.clone())), inputs.clone(), drain).unwrap();
        let task = tokio::spawn(control.run());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while inputs.snapshot.load().source() != Source::Cache {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cache was not served"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(inputs.snapshot.load().version(), 41);

        // The control plane comes up on that address: the proxy states 41,
        // takes the new version and caches it.
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (tx, mut sessions) = mpsc::unbounded_channel();
        let incoming = futures_util::stream::unfold(listener, |listener| async move {
            Some((listener.accept().await.map(|(s, _)| s), listener))
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PolicyDiscoveryServer::new(Fake { sessions: tx }))
                .serve_with_incoming(incoming),
        );
        let mut session = next_session(&mut sessions).await;
        assert_eq!(session.hello().await.version, 41);
        session.send(push(42, resources())).await;
        assert!(matches!(
            session.next().await,
            Message::Ack(Ack { version: 42, .. })
        ));
        assert_eq!(inputs.snapshot.load().source(), Source::ControlPlane);
        assert_eq!(cache.load().unwrap().unwrap().version, 42);
        task.abort();
    }
}
