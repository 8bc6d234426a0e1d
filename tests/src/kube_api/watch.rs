//! A watch response: one JSON event per line in a chunked body, as
//! kube-apiserver streams them. Selectors are applied per event (an object
//! whose labels stop matching is reported DELETED, one that starts matching
//! ADDED), bookmarks are sent every second when asked for (and once after
//! the current objects of a streaming list, `sendInitialEvents=true`), the stream ends
//! cleanly after `timeoutSeconds`, and ends with an error (the connection is
//! cut mid-body) on [`super::KubeApi::drop_watches`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::select::{FieldSelector, LabelSelector};
use super::store::{Change, ChangeType, Resource, Store, Subscription, WatchMsg};

/// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
pub(crate) const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

/// A watch as requested.
pub(crate) struct WatchRequest {
    pub resource: Resource,
    pub kind: String,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: after the current objects, a BOOKMARK
    /// annotated `k8s.io/initial-events-end`.
    pub initial_events: bool,
    pub timeout: Option<Duration>,
}

pub(crate) type Chunk = Result<Frame<Bytes>, std::io::Error>;

/// One watch event as a line.
pub(crate) fn event_line(kind: &str, object: &Value) -> Frame<Bytes> {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object}))
        .expect("JSON values serialize");
    line.push(b'\n');
    Frame::data(Bytes::from(line))
}

impl WatchRequest {
    fn selects(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }

    /// The event a change is reported as to this watch, if any.
    fn event(&self, change: &Change) -> Option<(&'static str, Value)> {
        let now = self.selects(&change.object);
        let before = change.previous.as_ref().is_some_and(|p| self.selects(p));
        let event = match (change.change, before, now) {
            (ChangeType::Deleted, _, true) => ChangeType::Deleted,
            (ChangeType::Deleted, _, false) => return None,
            (_, true, true) => ChangeType::Modified,
            (_, false, true) => ChangeType::Added,
            (_, true, false) => {
                // As kube-apiserver's watch cache: the object as the watch
                // last matched it, at the change's resourceVersion.
                let mut last = change.previous.clone().unwrap_or_default();
                last["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                return Some((ChangeType::Deleted.as_str(), last));
            }
            (_, false, false) => return None,
        };
        Some((event.as_str(), change.object.clone()))
    }

    fn bookmark(&self, rv: u64) -> Value {
        json!({
            "kind": self.kind,
            "apiVersion": self.resource.api_version,
            "metadata": {"resourceVersion": rv.to_string()},
        })
    }

    /// Feeds `out` with the subscription's events until the client leaves,
    /// the timeout passes, or the watches are dropped.
    pub async fn run(self, store: Arc<Mutex<Store>>, sub: Subscription, out: mpsc::Sender<Chunk>) {
        let Subscription {
            backlog,
            start_rv,
            mut rx,
        } = sub;
        for change in &backlog {
            if let Some((kind, object)) = self.event(change) {
                if out.send(Ok(event_line(kind, &object))).await.is_err() {
                    return;
                }
            }
        }
        if self.initial_events {
            let mut end = self.bookmark(start_rv);
            end["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            if out.send(Ok(event_line("BOOKMARK", &end))).await.is_err() {
                return;
            }
        }
        // The resourceVersion up to which this watch has seen every change.
        let mut position = start_rv;
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut bookmarks =
            tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_EVERY, BOOKMARK_EVERY);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(WatchMsg::Change(change)) => {
                        position = change.rv;
                        if let Some((kind, object)) = self.event(&change) {
                            if out.send(Ok(event_line(kind, &object))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(WatchMsg::Drop) | None => {
                        let cut = std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the fixture dropped every watch",
                        );
                        let _ = out.send(Err(cut)).await;
                        return;
                    }
                },
                _ = bookmarks.tick(), if self.bookmarks => {
                    // Changes are queued under the store's lock, so an empty
                    // queue under it means this watch has seen them all.
                    let rv = {
                        let store = store.lock().unwrap();
                        if rx.is_empty() { store.resource_version() } else { position }
                    };
                    position = position.max(rv);
                    if out.send(Ok(event_line("BOOKMARK", &self.bookmark(position)))).await.is_err() {
                        return;
                    }
                }
                _ = sleep_until(deadline) => return,
                _ = out.closed() => return,
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
