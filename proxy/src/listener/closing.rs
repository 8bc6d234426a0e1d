//! Graceful shutdown of a listener's HTTP connections, for one atomic load
//! per poll of a connection.
//!
//! hyper-util's `GracefulShutdown` polls a `watch` channel's `changed()`
//! future beside the connection at every poll, which registers the task's
//! waker with the channel again each time: about 500 instructions per
//! proxied request, as a connection is polled several times for each. Here
//! a connection hands its task's waker to the listener once (and again only
//! if the connection moves to another task), and closing wakes each of them.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use hyper_util::server::graceful::GracefulConnection;
use parking_lot::Mutex;
use slab::Slab;
use tokio::sync::Notify;

/// A listener's open connections, which [`Closing::close`] asks to finish.
pub struct Closing {
    shared: Arc<Shared>,
}

struct Shared {
    /// Set once, when the listener closes; read at every poll.
    closing: AtomicBool,
    /// One entry per connection, from its acceptance to its end: the waker
    /// of the task that last polled it, once it is polled.
    open: Mutex<Slab<Option<Waker>>>,
    /// Signalled when the last connection ends after closing began.
    all_ended: Notify,
}

/// One accepted connection's place among the listener's open ones. Taken
/// when the connection is accepted, so that a connection still in its TLS
/// handshake is counted and waited for.
pub struct Watcher {
    shared: Arc<Shared>,
    key: usize,
}

impl Closing {
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                closing: AtomicBool::new(false),
                open: Mutex::new(Slab::new()),
                all_ended: Notify::new(),
            }),
        }
    }

    /// Counts a newly accepted connection in.
    pub fn watcher(&self) -> Watcher {
        let key = self.shared.open.lock().insert(None);
        Watcher {
            shared: self.shared.clone(),
            key,
        }
    }

    /// Connections accepted and not yet ended.
    pub fn count(&self) -> usize {
        self.shared.open.lock().len()
    }

    /// Asks every connection to finish (an HTTP/1.1 connection after the
    /// response in flight, if any; HTTP/2 with a GOAWAY), and waits until
    /// all have ended.
    pub async fn close(self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        // A connection that handed its waker over before this lock is woken
        // here; one that does so after it reads `closing` as true.
        for (_, waker) in self.shared.open.lock().iter() {
            if let Some(waker) = waker {
                waker.wake_by_ref();
            }
        }
        loop {
            let ended = self.shared.all_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.shared.open.lock().is_empty() {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut open = self.shared.open.lock();
        open.remove(self.key);
        if open.is_empty() && self.shared.closing.load(Ordering::SeqCst) {
            self.shared.all_ended.notify_waiters();
        }
    }
}

impl Watcher {
    /// `conn`, asked to finish gracefully once the listener closes.
    pub fn watch<C: GracefulConnection>(self, conn: C) -> Watched<C> {
        Watched {
            conn,
            watcher: self,
            waker: None,
            shut: false,
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection that finishes gracefully when its listener closes.
    pub struct Watched<C> {
        #[pin]
        conn: C,
        watcher: Watcher,
        // The waker the listener holds for this connection.
        waker: Option<Waker>,
        // Whether the connection was asked to finish.
        shut: bool,
    }
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if !*this.shut {
            let shared = &this.watcher.shared;
            if !this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                let waker = cx.waker().clone();
                if let Some(slot) = shared.open.lock().get_mut(this.watcher.key) {
                    *slot = Some(waker.clone());
                }
                *this.waker = Some(waker);
            }
            if shared.closing.load(Ordering::SeqCst) {
                *this.shut = true;
                this.conn.as_mut().graceful_shutdown();
            }
        }
        this.conn.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn close_returns_at_once_without_connections() {
        let closing = Closing::new();
        tokio::time::timeout(Duration::from_secs(1), closing.close())
            .await
            .expect("nothing to wait for");
    }

    #[tokio::test]
    async fn close_waits_for_every_watcher_even_one_never_polled() {
        let closing = Closing::new();
        let first = closing.watcher();
        let second = closing.watcher();
        assert_eq!(closing.count(), 2);
        drop(first);
        assert_eq!(closing.count(), 1);
        let close = tokio::spawn(closing.close());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!close.is_finished(), "a connection is still open");
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), close)
            .await
            .expect("close ends with the last connection")
            .unwrap();
    }
}
