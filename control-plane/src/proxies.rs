//! The proxies with an open policy stream, and what each holds.
//!
//! Each stream owns its [`ProxyState`] behind a lock of its own, taken when
//! a snapshot is sent or answered; the registry's lock is taken only when a
//! stream opens or closes and when `/proxies` is read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use infermesh_proto::policy::Workload;
use infermesh_proto::policy_api::Summary;
use parking_lot::Mutex;
use serde::Serialize;

use crate::dashboard::Figures;
use crate::metrics::Metrics;

/// What the control plane knows of one connected proxy; `/proxies` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyState {
    /// The proxy's name for itself (the pod name, say).
    pub id: String,
    /// Workload identity (service account or SPIFFE ID).
    pub identity: String,
    /// Namespace of the workload.
    pub namespace: String,
    /// Labels of the workload.
    pub labels: BTreeMap<String, String>,
    /// Address the stream comes from.
    pub peer: Option<SocketAddr>,
    /// When the stream said Hello.
    #[serde(serialize_with = "rfc3339")]
    pub connected_since: SystemTime,
    /// The version the proxy said it held when it connected (0: none).
    pub hello_version: u64,
    /// The latest snapshot sent on this stream.
    pub last_sent: Option<Sent>,
    /// The latest published version compared with what was last sent; a
    /// version that changed nothing this proxy receives is not pushed, so
    /// this can be ahead of `lastSent.version`.
    pub checked_version: u64,
    /// The latest version the proxy acknowledged on this stream.
    pub acked_version: Option<u64>,
    /// When it did.
    #[serde(serialize_with = "opt_rfc3339")]
    pub acked_at: Option<SystemTime>,
    /// The latest refusal, kept after later ACKs so that it can be read.
    pub last_nack: Option<Refusal>,
}

/// A snapshot sent on a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sent {
    /// Its version.
    pub version: u64,
    /// Its nonce; only an answer quoting it counts.
    pub nonce: String,
    /// When it was sent.
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
}

/// A NACK: the proxy could not apply a snapshot and kept its previous one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    /// The version refused.
    pub version: u64,
    /// The proxy's reason.
    pub error: String,
    /// When the NACK arrived.
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
}

/// An answer from a proxy, as the decision below sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The proxy applied the snapshot with this nonce.
    Ack {
        /// The nonce quoted.
        nonce: String,
    },
    /// The proxy refused the snapshot with this nonce.
    Nack {
        /// The nonce quoted.
        nonce: String,
        /// Why.
        error: String,
    },
}

/// What an answer did to the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The latest snapshot is now acknowledged at this version.
    Acked(u64),
    /// The latest snapshot, at this version, was refused.
    Nacked(u64),
    /// The answer quoted another nonce (an earlier push, or none of ours)
    /// and changed nothing.
    Stale,
}

impl ProxyState {
    /// The state of a proxy that just said Hello.
    pub fn new(
        id: String,
        identity: String,
        workload: &Workload,
        peer: Option<SocketAddr>,
        hello_version: u64,
    ) -> Self {
        Self {
            id,
            identity,
            namespace: workload.namespace.clone(),
            labels: workload.labels.clone(),
            peer,
            connected_since: SystemTime::now(),
            hello_version,
            last_sent: None,
            checked_version: 0,
            acked_version: None,
            acked_at: None,
            last_nack: None,
        }
    }

    /// Applies an answer: only one quoting the nonce of the latest snapshot
    /// sent counts, and it counts for that snapshot's version, whatever
    /// version the answer names.
    pub fn answer(&mut self, answer: Answer, now: SystemTime) -> Outcome {
        let nonce = match &answer {
            Answer::Ack { nonce } | Answer::Nack { nonce, .. } => nonce,
        };
        let Some(sent) = self.last_sent.as_ref().filter(|s| &s.nonce == nonce) else {
            return Outcome::Stale;
        };
        let version = sent.version;
        match answer {
            Answer::Ack { .. } => {
                self.acked_version = Some(version);
                self.acked_at = Some(now);
                Outcome::Acked(version)
            }
            Answer::Nack { error, .. } => {
                self.last_nack = Some(Refusal {
                    version,
                    error,
                    at: now,
                });
                Outcome::Nacked(version)
            }
        }
    }
}

/// Every connected proxy.
#[derive(Debug)]
pub struct Registry {
    next_key: AtomicU64,
    proxies: Mutex<BTreeMap<u64, Arc<Mutex<ProxyState>>>>,
    metrics: Arc<Metrics>,
    /// The proxies' traffic summaries, kept after they disconnect until
    /// they age out.
    pub figures: Figures,
}

impl Registry {
    /// An empty registry that keeps the connected-proxies gauge.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            next_key: AtomicU64::new(0),
            proxies: Mutex::new(BTreeMap::new()),
            metrics,
            figures: Figures::default(),
        })
    }

    /// Adds a proxy for as long as the returned registration lives.
    pub fn register(self: &Arc<Self>, state: ProxyState) -> Registration {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(Mutex::new(state));
        self.proxies.lock().insert(key, state.clone());
        self.metrics.connected_proxies.inc();
        Registration {
            registry: self.clone(),
            key,
            state,
        }
    }

    /// A copy of every proxy's state, in connection order.
    pub fn list(&self) -> Vec<ProxyState> {
        let states: Vec<Arc<Mutex<ProxyState>>> = self.proxies.lock().values().cloned().collect();
        states.iter().map(|s| s.lock().clone()).collect()
    }
}

/// A proxy's place in the registry; dropping it (the stream ended) removes
/// the proxy.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    key: u64,
    /// The proxy's state, shared with the registry.
    pub state: Arc<Mutex<ProxyState>>,
}

impl Registration {
    /// Keeps a traffic summary the proxy sent.
    pub fn summary(&self, summary: Summary) {
        let id = self.state.lock().id.clone();
        self.registry.figures.record(&id, summary);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.registry.proxies.lock().remove(&self.key).is_some() {
            self.registry.metrics.connected_proxies.dec();
        }
    }
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

fn opt_rfc3339<S: serde::Serializer>(time: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => rfc3339(time, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn state() -> ProxyState {
        let workload = Workload {
            namespace: "team-a".into(),
            labels: [("app".to_string(), "chat".to_string())].into(),
        };
        ProxyState::new("pod-1".into(), "sa/chat".into(), &workload, None, 0)
    }

    fn sent(version: u64, nonce: &str) -> Option<Sent> {
        Some(Sent {
            version,
            nonce: nonce.into(),
            at: SystemTime::UNIX_EPOCH,
        })
    }

    fn ack(nonce: &str) -> Answer {
        Answer::Ack {
            nonce: nonce.into(),
        }
    }

    fn nack(nonce: &str, error: &str) -> Answer {
        Answer::Nack {
            nonce: nonce.into(),
            error: error.into(),
        }
    }

    const NOW: SystemTime = SystemTime::UNIX_EPOCH;

    #[test]
    fn an_ack_of_the_latest_nonce_records_its_version() {
        let mut s = state();
        s.last_sent = sent(5, "n5");
        assert_eq!(s.answer(ack("n5"), NOW), Outcome::Acked(5));
        assert_eq!(s.acked_version, Some(5));
    }

    #[test]
    fn answers_quoting_an_earlier_or_unknown_nonce_change_nothing() {
        let mut s = state();
        assert_eq!(s.answer(ack("n1"), NOW), Outcome::Stale, "nothing sent yet");
        s.last_sent = sent(5, "n5");
        s.answer(ack("n5"), NOW);
        s.last_sent = sent(6, "n6");
        assert_eq!(s.answer(ack("n5"), NOW), Outcome::Stale);
        assert_eq!(s.answer(nack("n5", "late"), NOW), Outcome::Stale);
        assert_eq!(s.answer(ack(""), NOW), Outcome::Stale);
        assert_eq!(s.acked_version, Some(5));
        assert_eq!(s.last_nack, None);
    }

    #[test]
    fn a_nack_is_kept_with_its_reason_and_the_acked_version_stays() {
        let mut s = state();
        s.last_sent = sent(5, "n5");
        s.answer(ack("n5"), NOW);
        s.last_sent = sent(6, "n6");
        let later = NOW + Duration::from_secs(1);
        assert_eq!(
            s.answer(nack("n6", "unknown kind"), later),
            Outcome::Nacked(6)
        );
        assert_eq!(s.acked_version, Some(5));
        assert_eq!(
            s.last_nack,
            Some(Refusal {
                version: 6,
                error: "unknown kind".into(),
                at: later
            })
        );
        // A later ACK does not erase the record of the refusal.
        s.last_sent = sent(7, "n7");
        s.answer(ack("n7"), later);
        assert_eq!(s.acked_version, Some(7));
        assert_eq!(s.last_nack.as_ref().map(|n| n.version), Some(6));
    }

    #[test]
    fn a_registration_lives_as_long_as_its_stream() {
        let metrics = Arc::new(Metrics::new());
        let registry = Registry::new(metrics.clone());
        let one = registry.register(state());
        let two = registry.register(state());
        assert_eq!(registry.list().len(), 2);
        assert_eq!(metrics.connected_proxies.get(), 2);
        drop(one);
        assert_eq!(registry.list().len(), 1);
        assert_eq!(metrics.connected_proxies.get(), 1);
        drop(two);
        assert!(registry.list().is_empty());
        assert_eq!(metrics.connected_proxies.get(), 0);
    }

    #[test]
    fn the_state_serializes_as_admin_shows_it() {
        let mut s = state();
        s.connected_since = NOW;
        s.last_sent = sent(5, "n5");
        s.answer(ack("n5"), NOW);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "pod-1",
                "identity": "sa/chat",
                "namespace": "team-a",
                "labels": {"app": "chat"},
                "peer": null,
                "connectedSince": "1970-01-01T00:00:00.000Z",
                "helloVersion": 0,
                "lastSent": {"version": 5, "nonce": "n5", "at": "1970-01-01T00:00:00.000Z"},
                "checkedVersion": 0,
                "ackedVersion": 5,
                "ackedAt": "1970-01-01T00:00:00.000Z",
                "lastNack": null,
            })
        );
    }
}
