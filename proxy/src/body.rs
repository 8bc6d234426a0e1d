//! Request bodies on their way upstream: the prefix read for classification
//! is replayed first, then the rest of the client's body streams through.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use infermesh_filters::replay::ReplayBody;
use infermesh_filters::BoxError;

/// A client's request body with its already-read prefix put back in front.
#[derive(Debug, Default)]
pub struct ProxyBody {
    prefix: VecDeque<Bytes>,
    prefix_len: u64,
    trailers: Option<HeaderMap>,
    rest: Option<Incoming>,
    /// Set instead of the fields above on the way upstream, when the retry
    /// filter keeps the body to send it again.
    attempt: Option<Box<ReplayBody<ProxyBody>>>,
}

impl ProxyBody {
    /// The client's body, nothing read from it yet.
    pub fn streaming(body: Incoming) -> Self {
        Self {
            rest: Some(body),
            ..Default::default()
        }
    }

    /// A body whose first chunks were read already. `rest` is `None` when the
    /// client's body ended within the prefix; `trailers` are the client's, if
    /// they were read too.
    pub fn replay(
        prefix: VecDeque<Bytes>,
        trailers: Option<HeaderMap>,
        rest: Option<Incoming>,
    ) -> Self {
        let prefix_len = prefix.iter().map(|b| b.len() as u64).sum();
        Self {
            prefix,
            prefix_len,
            trailers,
            rest,
            attempt: None,
        }
    }

    /// One attempt's body, as the retry filter hands it on.
    pub fn attempt(body: ReplayBody<ProxyBody>) -> Self {
        Self {
            attempt: Some(Box::new(body)),
            ..Default::default()
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(attempt) = this.attempt.as_mut() {
            return Pin::new(attempt.as_mut()).poll_frame(cx);
        }
        if let Some(chunk) = this.prefix.pop_front() {
            this.prefix_len -= chunk.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(rest) = this.rest.as_mut() {
            return match Pin::new(rest).poll_frame(cx) {
                Poll::Ready(None) => {
                    this.rest = None;
                    Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
                }
                Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
                Poll::Pending => Poll::Pending,
            };
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        if let Some(attempt) = &self.attempt {
            return attempt.is_end_stream();
        }
        self.prefix.is_empty()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(|rest| rest.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(attempt) = &self.attempt {
            return attempt.size_hint();
        }
        let rest = match &self.rest {
            Some(rest) => rest.size_hint(),
            None => SizeHint::with_exact(0),
        };
        // Upper first: SizeHint asserts lower <= upper at every step.
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(self.prefix_len));
        }
        hint.set_lower(rest.lower().saturating_add(self.prefix_len));
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_hint_counts_the_replayed_prefix() {
        let body = ProxyBody::replay(
            VecDeque::from([
                Bytes::from_static(b"{\"model\""),
                Bytes::from_static(b":1}"),
            ]),
            None,
            None,
        );
        assert_eq!(body.size_hint().exact(), Some(11));
        assert!(!body.is_end_stream());
    }

    #[tokio::test]
    async fn replayed_chunks_come_first_and_unchanged() {
        use http_body_util::BodyExt;
        let body = ProxyBody::replay(
            VecDeque::from([Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]),
            Some(HeaderMap::new()),
            None,
        );
        let collected = body.collect().await.unwrap();
        assert!(collected.trailers().is_some());
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"abcd"));
    }
}
