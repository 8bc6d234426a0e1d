//! The `PolicyDiscovery.Subscribe` server: one stream per proxy.
//!
//! A stream must open with a Hello. The server then sends the current
//! snapshot scoped to that proxy, with a fresh nonce, and after that every
//! published version whose scoped content differs from what the stream last
//! sent. ACKs and NACKs count only when they quote the latest nonce.
//!
//! The response stream is a state machine polled by tonic: it reads the
//! proxy's answers while it waits for the next version, and it computes a
//! push only when tonic asks for the next message, so a proxy that reads
//! slowly gets the newest version, never a queue of stale ones. Streams share
//! the current snapshot through a `watch` channel and hold no common lock.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use infermesh_proto::policy::Workload;
use infermesh_proto::policy_api::policy_discovery_server::PolicyDiscovery;
use infermesh_proto::policy_api::proxy_message::Message;
use infermesh_proto::policy_api::{Hello, PolicySnapshot, ProxyMessage};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::kubernetes::pods::{PodInfo, Pods};
use crate::metrics::Metrics;
use crate::proxies::{Answer, Outcome, ProxyState, Registration, Registry, Sent};
use crate::snapshot::{Published, Scoped};
use crate::tls::PeerInfo;
use infermesh_proto::spiffe::SpiffeId;

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stream waits for its pod to reach the pod watch (a pod just
/// created) before it is served with the labels of its Hello.
const POD_WAIT: Duration = Duration::from_secs(5);

/// The current snapshot; `None` until a valid policy set is published.
pub type Current = watch::Receiver<Option<Arc<Published>>>;

/// The gRPC service; cheap to clone per stream.
#[derive(Debug, Clone)]
pub struct Discovery {
    current: Current,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    /// Streams must come from a proxy holding a mesh certificate of the
    /// namespace it subscribes for (the control plane is the CA).
    require_identity: bool,
    /// In a cluster: the pods, whose labels scope policy instead of the
    /// Hello's.
    pods: Option<Pods>,
}

impl Discovery {
    /// A service that streams `current` and ends every stream on `shutdown`.
    pub fn new(
        current: Current,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
        require_identity: bool,
    ) -> Self {
        Self {
            current,
            registry,
            metrics,
            shutdown,
            require_identity,
            pods: None,
        }
    }

    /// Takes each proxy's labels from its pod (named by its Hello), and
    /// checks that the pod runs as the service account of its certificate.
    pub fn with_pods(mut self, pods: Pods) -> Self {
        self.pods = Some(pods);
        self
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<PolicySnapshot, Status>> + Send>>;

#[tonic::async_trait]
impl PolicyDiscovery for Discovery {
    type SubscribeStream = SnapshotStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        // The Hello is read by the response stream, not here: answering
        // with headers at once lets a client that waits for them before
        // writing its first message work too.
        let tls = request.extensions().get::<PeerInfo>().cloned();
        if self.require_identity && tls.as_ref().and_then(|t| t.identity.as_ref()).is_none() {
            return Err(Status::unauthenticated(
                "the policy stream needs a mesh certificate: obtain one from Identity.Certify and connect with it",
            ));
        }
        let (peer, identity) = match tls {
            Some(info) => (info.remote, info.identity),
            None => (request.remote_addr(), None),
        };
        let session = Session {
            peer,
            identity,
            inbound: request.into_inner(),
            current: self.current.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            pods: self.pods.clone(),
            pod_changes: None,
            phase: Phase::AwaitHello,
        };
        let stream = futures_util::stream::unfold(session, |mut session| async move {
            session.next().await.map(|item| (item, session))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

enum Phase {
    AwaitHello,
    Streaming(Box<Subscriber>),
    Done,
}

/// A stream that said Hello.
struct Subscriber {
    workload: Workload,
    /// The pod whose labels are the workload's, in a cluster: namespace
    /// and name.
    pod: Option<(String, String)>,
    /// The service account of the stream's certificate, which the pod
    /// must run as for its labels to count.
    service_account: Option<String>,
    registration: Registration,
    /// Version last compared with `sent`.
    checked: u64,
    /// What was last sent, to skip versions that change nothing here.
    sent: Option<Arc<Scoped>>,
}

struct Session {
    peer: Option<SocketAddr>,
    /// The proxy's certificate identity, on a mutually authenticated stream.
    identity: Option<SpiffeId>,
    inbound: Streaming<ProxyMessage>,
    current: Current,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    pods: Option<Pods>,
    /// Changes of the pods, once the stream follows its pod.
    pod_changes: Option<watch::Receiver<u64>>,
    phase: Phase,
}

impl Session {
    /// The next message for the proxy; `None` ends the stream.
    async fn next(&mut self) -> Option<Result<PolicySnapshot, Status>> {
        loop {
            if *self.shutdown.borrow() {
                return None;
            }
            match &mut self.phase {
                Phase::Done => return None,
                Phase::AwaitHello => match self.hello().await {
                    Ok(Some(subscriber)) => {
                        if subscriber.pod.is_some() {
                            self.pod_changes = self.pods.as_ref().map(Pods::changes);
                        }
                        self.phase = Phase::Streaming(Box::new(subscriber));
                    }
                    Ok(None) => {
                        self.phase = Phase::Done;
                        return None;
                    }
                    Err(status) => {
                        self.phase = Phase::Done;
                        return Some(Err(status));
                    }
                },
                Phase::Streaming(subscriber) => {
                    let published = self.current.borrow_and_update().clone();
                    if let Some(push) = published.and_then(|p| subscriber.push(&p, &self.metrics)) {
                        return Some(Ok(push));
                    }
                    let pod_changed = async {
                        match self.pod_changes.as_mut() {
                            Some(changes) => changes.changed().await.is_ok(),
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = self.shutdown.changed() => return None,
                        true = pod_changed => {
                            if let Some(pods) = &self.pods {
                                subscriber.follow_pod(pods);
                            }
                        }
                        changed = self.current.changed() => {
                            if changed.is_err() {
                                return None;
                            }
                        }
                        message = self.inbound.message() => match message {
                            Ok(Some(message)) => {
                                if let Err(status) = subscriber.receive(message, &self.metrics) {
                                    self.phase = Phase::Done;
                                    return Some(Err(status));
                                }
                            }
                            // The proxy went away; so does its registration.
                            Ok(None) | Err(_) => {
                                self.phase = Phase::Done;
                                return None;
                            }
                        },
                    }
                }
            }
        }
    }

    /// Reads the opening Hello and registers the proxy; `Ok(None)` when the
    /// stream closed first.
    async fn hello(&mut self) -> Result<Option<Subscriber>, Status> {
        let first = tokio::select! {
            _ = self.shutdown.changed() => return Ok(None),
            first = tokio::time::timeout(HELLO_TIMEOUT, self.inbound.message()) => first,
        };
        let hello = match first {
            Ok(Ok(Some(ProxyMessage {
                message: Some(Message::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument(
                    "a policy stream must open with a Hello (proxy id, identity, namespace, labels, version held)",
                ))
            }
            Ok(Ok(None) | Err(_)) => return Ok(None),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "no Hello within {}s of opening the policy stream",
                    HELLO_TIMEOUT.as_secs()
                )))
            }
        };
        let Hello {
            proxy_id,
            identity,
            namespace,
            labels,
            version,
        } = hello;
        let identity = match &self.identity {
            Some(id) if id.namespace() != namespace => {
                return Err(Status::permission_denied(format!(
                    "this proxy's certificate ({id}) is for namespace `{}`; it may not subscribe for namespace `{namespace}`",
                    id.namespace()
                )));
            }
            // The certificate, not the Hello, says who the proxy is.
            Some(id) => id.to_string(),
            None => identity,
        };
        let mut workload = Workload {
            namespace,
            labels: labels.into_iter().collect(),
        };
        let mut pod = None;
        if let Some(pods) = &self.pods {
            if !proxy_id.is_empty() {
                match self.pod_of(pods, &workload.namespace, &proxy_id).await {
                    Some(info) => {
                        if let Some(id) = &self.identity {
                            if id.service_account() != info.service_account {
                                return Err(Status::permission_denied(format!(
                                    "pod {}/{proxy_id} runs as service account `{}`, and this \
                                     proxy's certificate is {id}: a proxy subscribes as the pod \
                                     it runs in",
                                    workload.namespace, info.service_account
                                )));
                            }
                        }
                        workload.labels = info.labels;
                    }
                    None => tracing::warn!(
                        proxy = %proxy_id,
                        namespace = %workload.namespace,
                        "no pod of this name in the cluster after {}s; scoping by the labels \
                         the proxy sent until it appears",
                        POD_WAIT.as_secs()
                    ),
                }
                // Followed either way: a pod seen late takes over then.
                pod = Some((workload.namespace.clone(), proxy_id.clone()));
            }
        }
        let id = if proxy_id.is_empty() {
            self.peer
                .map_or_else(|| "unnamed".to_owned(), |p| format!("unnamed@{p}"))
        } else {
            proxy_id
        };
        tracing::debug!(%id, namespace = %workload.namespace, held_version = version, "proxy subscribed");
        let state = ProxyState::new(id, identity, &workload, self.peer, version);
        Ok(Some(Subscriber {
            workload,
            pod,
            service_account: self
                .identity
                .as_ref()
                .map(|id| id.service_account().to_owned()),
            registration: self.registry.register(state),
            checked: 0,
            sent: None,
        }))
    }
}

impl Session {
    /// The pod `namespace/name`, waiting up to [`POD_WAIT`] for the pod
    /// watch to see it.
    async fn pod_of(&self, pods: &Pods, namespace: &str, name: &str) -> Option<PodInfo> {
        let mut changes = pods.changes();
        let deadline = tokio::time::Instant::now() + POD_WAIT;
        loop {
            if let Some(info) = pods.get(namespace, name) {
                return Some(info);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }
}

impl Subscriber {
    /// Takes the pod's current labels; a change re-scopes the stream (the
    /// next push compares the newly scoped content with what was sent).
    fn follow_pod(&mut self, pods: &Pods) {
        let Some((namespace, name)) = &self.pod else {
            return;
        };
        let Some(info) = pods.get(namespace, name) else {
            return;
        };
        if info.labels == self.workload.labels {
            return;
        }
        if let Some(account) = &self.service_account {
            if *account != info.service_account {
                tracing::debug!(
                    proxy = %name,
                    %namespace,
                    pod_service_account = %info.service_account,
                    certificate_service_account = %account,
                    "the pod runs as another service account than this proxy's certificate; its labels are not taken"
                );
                return;
            }
        }
        tracing::info!(proxy = %name, %namespace, labels = ?info.labels, "the pod's labels changed; re-scoping its policy");
        self.workload.labels = info.labels;
        self.registration.state.lock().labels = self.workload.labels.clone();
        self.checked = 0;
    }

    /// The snapshot to send for `published`, unless this stream already
    /// checked that version or holds the same content.
    fn push(&mut self, published: &Published, metrics: &Metrics) -> Option<PolicySnapshot> {
        if published.version == self.checked {
            return None;
        }
        self.checked = published.version;
        let scoped = published.scoped(&self.workload);
        let unchanged = self.sent.as_ref().is_some_and(|s| s.same_content(&scoped));
        let mut state = self.registration.state.lock();
        state.checked_version = published.version;
        if unchanged {
            return None;
        }
        let nonce = format!("{:016x}", fastrand::u64(..));
        state.last_sent = Some(Sent {
            version: published.version,
            nonce: nonce.clone(),
            at: SystemTime::now(),
        });
        drop(state);
        metrics.pushes.inc();
        let resources = scoped.resources.clone();
        self.sent = Some(scoped);
        Some(PolicySnapshot {
            version: published.version,
            nonce,
            resources,
        })
    }

    /// Records an ACK or NACK; a second Hello ends the stream.
    fn receive(&mut self, message: ProxyMessage, metrics: &Metrics) -> Result<(), Status> {
        let answer = match message.message {
            Some(Message::Ack(ack)) => Answer::Ack { nonce: ack.nonce },
            Some(Message::Nack(nack)) => Answer::Nack {
                nonce: nack.nonce,
                error: nack.error,
            },
            Some(Message::Hello(_)) => {
                return Err(Status::invalid_argument(
                    "Hello may only be sent once, as the first message of a stream",
                ))
            }
            Some(Message::Summary(summary)) => {
                self.registration.summary(summary);
                return Ok(());
            }
            // An empty message, or one of a newer API: nothing to do.
            None => return Ok(()),
        };
        let mut state = self.registration.state.lock();
        match state.answer(answer, SystemTime::now()) {
            Outcome::Acked(_) => {
                metrics.acks.inc();
            }
            Outcome::Nacked(version) => {
                metrics.nacks.inc();
                let error = state
                    .last_nack
                    .as_ref()
                    .map(|n| n.error.as_str())
                    .unwrap_or_default();
                tracing::warn!(proxy = %state.id, version, %error, "a proxy refused a policy snapshot");
            }
            Outcome::Stale => {
                metrics.stale_responses.inc();
                tracing::debug!(proxy = %state.id, "ignored an answer quoting a stale nonce");
            }
        }
        Ok(())
    }
}
