//! Request bodies that can be sent more than once, for retries.
//!
//! The body streams to the first attempt as it arrives (nothing waits for
//! the whole body), and each chunk is also kept, up to a limit. A retry gets a
//! new body that replays the kept chunks and then goes on reading the
//! client's body where the earlier attempt left it. Once more than the limit
//! has been read the chunks are no longer kept and the request cannot be
//! retried: a large upload is sent once.
//!
//! Unlike buffering the whole body before the first attempt, this adds no
//! latency, and a client-streaming gRPC call is not held up.
//!
//! Hedging needs more: attempts that run at the same time. Once the whole
//! body has been read and kept, [`ReplayBody::copies`] makes further bodies
//! that replay it without touching the client's body, so they never take
//! chunks from each other.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use infermesh_filters::replay::ReplayBody;
//!
//! # tokio_test_block_on(async {
//! let (first, handle) = ReplayBody::shared(Full::new(Bytes::from("hello")), 1024);
//! assert_eq!(first.collect().await.unwrap().to_bytes(), "hello");
//! let again = handle.next_attempt().unwrap();
//! assert_eq!(again.collect().await.unwrap().to_bytes(), "hello");
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::body::BoxError;

/// A request body, either passed through or shared for replay.
#[derive(Debug)]
pub struct ReplayBody<B> {
    state: State<B>,
}

#[derive(Debug)]
enum State<B> {
    /// Not retryable: the body as it is, at no cost.
    Direct(B),
    Shared {
        shared: Arc<Mutex<Shared<B>>>,
        /// The attempt this body belongs to; a body of an older attempt
        /// stops, so it cannot steal chunks from the current one.
        generation: u32,
        /// Index of the next kept chunk to replay.
        cursor: usize,
        done: bool,
    },
}

#[derive(Debug)]
struct Shared<B> {
    body: B,
    chunks: Vec<Bytes>,
    kept: usize,
    limit: usize,
    /// More than `limit` bytes were read, or the body failed: no replay.
    overflowed: bool,
    ended: bool,
    trailers: Option<HeaderMap>,
    generation: u32,
}

/// Makes further attempts' bodies from a shared [`ReplayBody`].
#[derive(Debug)]
pub struct ReplayHandle<B> {
    shared: Arc<Mutex<Shared<B>>>,
}

impl<B> ReplayBody<B> {
    /// A body sent once, never replayed.
    pub fn direct(body: B) -> Self {
        Self {
            state: State::Direct(body),
        }
    }

    /// The body itself when it is not kept for a replay ([`ReplayBody::direct`]),
    /// so that a sender can take it as it is; else `self` back.
    pub fn into_direct(self) -> Result<B, Self> {
        match self.state {
            State::Direct(body) => Ok(body),
            state => Err(Self { state }),
        }
    }

    /// A body for the first attempt, and a handle for the next ones, which
    /// works while no more than `limit` bytes have been read.
    pub fn shared(body: B, limit: usize) -> (Self, ReplayHandle<B>) {
        let shared = Arc::new(Mutex::new(Shared {
            body,
            chunks: Vec::new(),
            kept: 0,
            limit,
            overflowed: false,
            ended: false,
            trailers: None,
            generation: 0,
        }));
        let body = Self {
            state: State::Shared {
                shared: shared.clone(),
                generation: 0,
                cursor: 0,
                done: false,
            },
        };
        (body, ReplayHandle { shared })
    }
}

fn lock<B>(shared: &Mutex<Shared<B>>) -> MutexGuard<'_, Shared<B>> {
    // A panic while holding the lock leaves consistent data; keep going.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<B> ReplayHandle<B> {
    /// The body of the next attempt, or `None` when the body can no longer
    /// be replayed. Bodies of earlier attempts stop yielding data.
    pub fn next_attempt(&self) -> Option<ReplayBody<B>> {
        let mut shared = lock(&self.shared);
        if shared.overflowed {
            return None;
        }
        shared.generation += 1;
        Some(ReplayBody {
            state: State::Shared {
                shared: self.shared.clone(),
                generation: shared.generation,
                cursor: 0,
                done: false,
            },
        })
    }

    /// Whether another attempt could still get the whole body.
    pub fn is_replayable(&self) -> bool {
        !lock(&self.shared).overflowed
    }
}

/// Makes concurrent copies of a shared body once it has been read whole.
#[derive(Debug)]
pub struct Copies<B> {
    shared: Arc<Mutex<Shared<B>>>,
}

impl<B> ReplayBody<B> {
    /// A maker of copies of this body, for attempts sent while this one
    /// runs; `None` for a body that is never replayed.
    pub fn copies(&self) -> Option<Copies<B>> {
        match &self.state {
            State::Direct(_) => None,
            State::Shared { shared, .. } => Some(Copies {
                shared: shared.clone(),
            }),
        }
    }
}

impl<B: Body> Copies<B> {
    /// A copy of the whole body, or `None` while the body has not been
    /// read to its end, or when it was too long to keep.
    pub fn copy(&self) -> Option<ReplayBody<B>> {
        let shared = lock(&self.shared);
        let whole = !shared.overflowed && (shared.ended || shared.body.is_end_stream());
        whole.then(|| ReplayBody {
            state: State::Shared {
                shared: self.shared.clone(),
                generation: shared.generation,
                cursor: 0,
                done: false,
            },
        })
    }
}

/// A body of an attempt that a retry replaced.
#[derive(Debug, thiserror::Error)]
#[error("request body superseded by a retry")]
pub struct Superseded;

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let (shared, generation, cursor, done) = match &mut self.state {
            State::Direct(body) => {
                return Pin::new(body)
                    .poll_frame(cx)
                    .map(|f| f.map(|f| f.map_err(Into::into)))
            }
            State::Shared {
                shared,
                generation,
                cursor,
                done,
            } => (shared, *generation, cursor, done),
        };
        if *done {
            return Poll::Ready(None);
        }
        let mut shared = lock(shared);
        // Kept chunks can be replayed by any attempt; only reading on from
        // the client's body belongs to the newest one.
        if let Some(chunk) = shared.chunks.get(*cursor) {
            *cursor += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if shared.ended {
            *done = true;
            return Poll::Ready(shared.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        }
        if shared.generation != generation {
            return Poll::Ready(Some(Err(Superseded.into())));
        }
        let frame = match Pin::new(&mut shared.body).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(frame) => frame,
        };
        match frame {
            None => {
                shared.ended = true;
                *done = true;
                Poll::Ready(None)
            }
            Some(Err(error)) => {
                shared.overflowed = true;
                Poll::Ready(Some(Err(error.into())))
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if !shared.overflowed {
                        if shared.kept + data.len() <= shared.limit {
                            shared.kept += data.len();
                            shared.chunks.push(data.clone());
                            *cursor += 1;
                        } else {
                            // Free what was kept: no attempt can use it now.
                            shared.overflowed = true;
                            shared.chunks = Vec::new();
                            *cursor = 0;
                        }
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    shared.trailers = Some(trailers.clone());
                    shared.ended = true;
                    *done = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Direct(body) => body.is_end_stream(),
            State::Shared {
                shared,
                cursor,
                done,
                ..
            } => {
                if *done {
                    return true;
                }
                let shared = lock(shared);
                *cursor >= shared.chunks.len()
                    && ((shared.ended && shared.trailers.is_none())
                        || (!shared.ended && shared.body.is_end_stream()))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Direct(body) => body.size_hint(),
            State::Shared {
                shared,
                cursor,
                done,
                ..
            } => {
                if *done {
                    return SizeHint::with_exact(0);
                }
                let shared = lock(shared);
                let replay: u64 = shared
                    .chunks
                    .get(*cursor..)
                    .unwrap_or_default()
                    .iter()
                    .map(|c| c.len() as u64)
                    .sum();
                if shared.ended {
                    return SizeHint::with_exact(replay);
                }
                let rest = shared.body.size_hint();
                let mut hint = SizeHint::new();
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(replay));
                }
                hint.set_lower(rest.lower().saturating_add(replay));
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;

    /// A body yielding the given chunks, one per poll.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
        }
    }

    fn chunks(parts: &[&'static str]) -> Chunks {
        Chunks(
            parts
                .iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect(),
        )
    }

    #[tokio::test]
    async fn only_a_body_not_kept_for_a_replay_is_given_back_as_it_is() {
        let direct = ReplayBody::direct(chunks(&["ab", "cd"])).into_direct();
        let body = direct.ok().expect("a direct body is its own body");
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcd");
        let (kept, handle) = ReplayBody::shared(chunks(&["ab", "cd"]), 1024);
        let kept = kept.into_direct().err().expect("a kept body stays kept");
        assert_eq!(kept.collect().await.unwrap().to_bytes(), "abcd");
        let again = handle.next_attempt().expect("still replayable");
        assert_eq!(again.collect().await.unwrap().to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn a_retry_replays_what_the_first_attempt_read_then_the_rest() {
        let (mut first, handle) = ReplayBody::shared(chunks(&["ab", "cd", "ef"]), 1024);
        // The first attempt reads part of the body, then fails.
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        let second = handle.next_attempt().unwrap();
        assert!(first.frame().await.unwrap().is_err(), "superseded");
        assert_eq!(second.size_hint().lower(), 2);
        assert_eq!(second.collect().await.unwrap().to_bytes(), "abcdef");
        let third = handle.next_attempt().unwrap();
        assert_eq!(third.size_hint().exact(), Some(6));
        assert_eq!(third.collect().await.unwrap().to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn copies_of_a_whole_body_replay_it_side_by_side() {
        let (mut first, _handle) = ReplayBody::shared(chunks(&["ab", "cd"]), 1024);
        let copies = first.copies().unwrap();
        assert!(copies.copy().is_none(), "not read yet");
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        assert!(copies.copy().is_none(), "read in part");
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "cd");
        assert!(copies.copy().is_none(), "its end not seen yet");
        assert!(first.frame().await.is_none());
        let a = copies.copy().unwrap();
        let b = copies.copy().unwrap();
        assert_eq!(b.collect().await.unwrap().to_bytes(), "abcd");
        assert_eq!(a.collect().await.unwrap().to_bytes(), "abcd");
        assert!(
            first.frame().await.is_none(),
            "the first attempt stays ended"
        );
        assert!(ReplayBody::direct(chunks(&["x"])).copies().is_none());
    }

    #[tokio::test]
    async fn a_body_longer_than_the_limit_is_sent_once() {
        let (first, handle) = ReplayBody::shared(chunks(&["abcd", "efgh"]), 6);
        assert_eq!(first.collect().await.unwrap().to_bytes(), "abcdefgh");
        assert!(!handle.is_replayable());
        assert!(handle.next_attempt().is_none());
    }
}
