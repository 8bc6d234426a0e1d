//! The response body type every filter speaks.

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

/// Errors carried by bodies and services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A type-erased response body: upstream bodies pass through it frame by
/// frame, so boxing never buffers.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes` whole.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body with no data.
pub fn empty() -> BoxBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// What a [`Watched`] body tells its watcher: each frame as it passes, and
/// once, how the body ended. A watcher that holds guards (in-flight counts,
/// a rate-limit charge, the request's accounting) releases them in `end`
/// or, when the body is dropped before its end, in its own `Drop`.
pub trait Watch {
    /// A frame passes on its way to the reader.
    fn frame(&mut self, _frame: &Frame<Bytes>) {}
    /// The body ended (its last frame passed) or failed; called at most once.
    /// A body dropped before either calls nothing: the watcher is dropped.
    fn end(self, _ended: Ended)
    where
        Self: Sized,
    {
    }
}

/// How a watched body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Its last frame passed.
    Complete,
    /// It yielded an error.
    Failed,
}

pin_project_lite::pin_project! {
    /// A body that shows each frame to a [`Watch`] and tells it how the body
    /// ended as soon as it knows (with the last frame, not at the next
    /// poll), the one "on end" wrapper of the proxy's guards. Frames pass
    /// unchanged and unbuffered.
    pub struct Watched<B, W> {
        #[pin]
        inner: B,
        watch: Option<W>,
    }
}

impl<B, W> Watched<B, W> {
    /// `inner`, watched by `watch`.
    pub fn new(inner: B, watch: W) -> Self {
        Self {
            inner,
            watch: Some(watch),
        }
    }
}

impl<B, W> http_body::Body for Watched<B, W>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    W: Watch,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        let ended = match &frame {
            Some(Ok(frame)) => {
                if let Some(watch) = this.watch.as_mut() {
                    watch.frame(frame);
                }
                this.inner.is_end_stream().then_some(Ended::Complete)
            }
            None => Some(Ended::Complete),
            Some(Err(_)) => Some(Ended::Failed),
        };
        if let Some(ended) = ended {
            if let Some(watch) = this.watch.take() {
                watch.end(ended);
            }
        }
        std::task::Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::StreamBody;

    use super::*;

    #[derive(Default, Clone)]
    struct Log(Arc<Mutex<Vec<String>>>);

    impl Watch for Log {
        fn frame(&mut self, frame: &Frame<Bytes>) {
            let what = match frame.data_ref() {
                Some(data) => format!("data {}", data.len()),
                None => "trailers".into(),
            };
            self.0.lock().unwrap().push(what);
        }
        fn end(self, ended: Ended) {
            self.0.lock().unwrap().push(format!("end {ended:?}"));
        }
    }

    impl Drop for Log {
        fn drop(&mut self) {
            if let Ok(mut log) = self.0.lock() {
                log.push("drop".into());
            }
        }
    }

    impl Log {
        fn lines(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    type Frames = Vec<Result<Frame<Bytes>, BoxError>>;

    fn stream(frames: Frames) -> impl http_body::Body<Data = Bytes, Error = BoxError> {
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn the_watcher_sees_each_frame_and_the_end_once() {
        let log = Log::default();
        let body = Watched::new(full("hello"), log.clone());
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected, "hello");
        // A whole body ends with its last frame, not at the next poll.
        assert_eq!(log.lines(), ["data 5", "end Complete", "drop"]);

        let log = Log::default();
        let frames = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::trailers(http::HeaderMap::new())),
        ];
        Watched::new(stream(frames), log.clone())
            .collect()
            .await
            .unwrap();
        assert_eq!(log.lines(), ["data 2", "trailers", "end Complete", "drop"]);
    }

    #[tokio::test]
    async fn a_failed_or_dropped_body_releases_the_watcher() {
        let log = Log::default();
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(Bytes::from_static(b"a"))), Err("cut".into())];
        assert!(Watched::new(stream(frames), log.clone())
            .collect()
            .await
            .is_err());
        assert_eq!(log.lines(), ["data 1", "end Failed", "drop"]);

        let log = Log::default();
        drop(Watched::new(full("never read"), log.clone()));
        assert_eq!(log.lines(), ["drop"]);
    }
}
