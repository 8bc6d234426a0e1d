//! The part of a request body read before routing: read while the model is
//! found and checked ([`read_classified`]), completed for a replay
//! ([`complete_prefix`]), renamed for a model alias ([`rewrite_model`]). The
//! chunks read are replayed to the upstream first by `ProxyBody`, followed by
//! the rest of the client's body as it streams.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http_body::Body;
use http_body_util::BodyExt;
use infermesh_filters::ProxyError;

use crate::body::{BodyCheck, ClientBody};
use crate::classify::{self, BodyScan, GrpcModelScanner, JsonScanner, Scan};

/// A request body read as far as classification needs.
pub(crate) struct Classified {
    pub(crate) body: BodyState,
    /// Shared: the metrics, the balancer's hint and the routing all keep it.
    pub(crate) model: Option<Arc<str>>,
    pub(crate) stream: bool,
    pub(crate) max_tokens: Option<u64>,
    /// Hashes of the prompt's leading bytes, for a model-aware balancer.
    pub(crate) prompt: Option<classify::PromptPrefix>,
    /// Verifies the rest of the body, when it streams on after the prefix
    /// and the request was routed by a model read from the prefix.
    pub(crate) check: Option<BodyCheck>,
}

/// Reads the body's prefix and finds the model in it. When a decision rests
/// on the model, the body must not name another one further on: checked now
/// for what was read, and by a [`BodyCheck`] for the rest as it streams.
pub(crate) async fn read_classified(
    head: &classify::HeadClass,
    body: ClientBody,
    limit: usize,
    prove_model: bool,
    whole_object: bool,
    prompt_hashing: Option<(usize, usize)>,
) -> Result<Classified, ProxyError> {
    let mut model: Option<Arc<str>> = head.model.as_deref().map(Arc::from);
    // Known up front only for the KServe streaming method; OpenAI says so in the body.
    let mut stream = head
        .grpc
        .as_ref()
        .is_some_and(|g| g.method == "ModelStreamInfer");
    let mut max_tokens = None;
    let mut prompt = None;
    let mut check = None;
    let body = match head.body {
        BodyScan::None => BodyState::Streaming(body),
        BodyScan::OpenAiJson => {
            let mut scanner = JsonScanner::new(limit);
            if whole_object {
                scanner = scanner.whole_object();
            }
            if let Some((granule, granules)) = prompt_hashing {
                scanner = scanner.hash_prompt(granule, granules);
            }
            let prefix = read_prefix(body, |chunk| scanner.feed(chunk)).await?;
            let mut fields = scanner.take_fields();
            if prove_model {
                if let Some(why) = fields.ambiguity() {
                    return Err(ProxyError::BadRequest(why.to_string()));
                }
                if fields.truncated || prefix.rest.is_some() {
                    return Err(ProxyError::Forbidden(format!(
                        "the model of a JSON body longer than classify.maxBodyPrefix ({limit} bytes) cannot be verified for authorization; raise maxBodyPrefix in the MeshConfig"
                    )));
                }
                if fields.object_end.is_none() {
                    return Err(ProxyError::BadRequest(
                        "the JSON body ends before its top-level object does".into(),
                    ));
                }
            } else if fields.model.is_some() {
                if let Some(why) = fields.ambiguity() {
                    return Err(ProxyError::BadRequest(why.to_string()));
                }
                // Routed by this model: nothing further on may name another.
                let consumed = scanner.consumed();
                // The scanner goes on as the verifier, in place.
                scanner.verify_rest();
                for chunk in unscanned(&prefix.chunks, consumed) {
                    scanner.feed(chunk);
                }
                if let Some(why) = scanner.ambiguity() {
                    return Err(ProxyError::BadRequest(why.to_string()));
                }
                if prefix.rest.is_some() {
                    check = Some(BodyCheck::Json(Box::new(scanner)));
                }
            }
            model = fields.model.take().map(Arc::from);
            stream = fields.stream;
            max_tokens = fields.max_tokens;
            prompt = fields.prompt.take();
            BodyState::Scanned(prefix, Scanned::Json(fields))
        }
        BodyScan::GrpcModelName => {
            let mut scanner = GrpcModelScanner::new(limit);
            let prefix = read_prefix(body, |chunk| scanner.feed(chunk)).await?;
            let mut fields = scanner.fields();
            if fields.undecodable {
                return Err(ProxyError::BadRequest(
                    "the first gRPC message cannot be decoded far enough to read its model (a group, a wrong wire type, or a broken varint or length)".into(),
                ));
            }
            let consumed = scanner.consumed();
            // Every later message, and a repeated field 1 in the first, must
            // name the same model.
            if let Some(mut verifier) = scanner.into_verifier() {
                for chunk in unscanned(&prefix.chunks, consumed) {
                    verifier
                        .feed(chunk)
                        .map_err(|why| ProxyError::BadRequest(why.to_string()))?;
                }
                if prefix.rest.is_some() {
                    check = Some(BodyCheck::Grpc(Box::new(verifier)));
                }
            }
            model = fields.model.take().map(Arc::from);
            BodyState::Scanned(prefix, Scanned::Grpc(fields))
        }
    };
    Ok(Classified {
        body,
        model,
        stream,
        max_tokens,
        prompt,
        check,
    })
}

/// The parts of `chunks` from body offset `from` on.
pub(crate) fn unscanned(chunks: &VecDeque<Bytes>, from: usize) -> impl Iterator<Item = &[u8]> {
    let mut start = 0usize;
    chunks.iter().filter_map(move |chunk| {
        let begin = start;
        start += chunk.len();
        (start > from).then(|| &chunk[from.saturating_sub(begin)..])
    })
}

// Lives on the stack of one request's classification; boxing the larger
// variant would cost an allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum BodyState {
    Streaming(ClientBody),
    Scanned(Prefix, Scanned),
}

#[derive(Clone)]
pub(crate) enum Scanned {
    Json(classify::JsonFields),
    Grpc(classify::GrpcFields),
    /// Read whole for a fallback chain; the model is in the path (KServe
    /// REST), so nothing in the body is renamed.
    Path,
}

/// The part of a body read before routing.
pub(crate) struct Prefix {
    pub(crate) chunks: VecDeque<Bytes>,
    pub(crate) trailers: Option<HeaderMap>,
    /// The rest of the body, `None` when it ended within the prefix.
    pub(crate) rest: Option<ClientBody>,
}

/// Reads body frames into a prefix until `feed` says it has seen enough or
/// the body ends.
pub(crate) async fn read_prefix(
    mut body: ClientBody,
    mut feed: impl FnMut(&[u8]) -> Scan,
) -> Result<Prefix, ProxyError> {
    let mut chunks = VecDeque::new();
    if body.is_end_stream() {
        return Ok(Prefix {
            chunks,
            trailers: None,
            rest: None,
        });
    }
    loop {
        match body.frame().await {
            None => {
                return Ok(Prefix {
                    chunks,
                    trailers: None,
                    rest: None,
                })
            }
            Some(Err(error)) => {
                return Err(ProxyError::BadRequest(format!(
                    "reading the request body failed: {error}"
                )))
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let scan = feed(&data);
                    if !data.is_empty() {
                        chunks.push_back(data);
                    }
                    if matches!(scan, Scan::Done) {
                        let rest = (!body.is_end_stream()).then_some(body);
                        return Ok(Prefix {
                            chunks,
                            trailers: None,
                            rest,
                        });
                    }
                }
                Err(frame) => {
                    return Ok(Prefix {
                        chunks,
                        trailers: frame.into_trailers().ok(),
                        rest: None,
                    })
                }
            },
        }
    }
}

/// Reads the rest of a body into `prefix` while the whole stays within
/// `limit` bytes; a longer body keeps its rest to stream.
pub(crate) async fn complete_prefix(prefix: &mut Prefix, limit: usize) -> Result<(), ProxyError> {
    let mut read: usize = prefix.chunks.iter().map(Bytes::len).sum();
    while let Some(rest) = prefix.rest.as_mut() {
        if rest.is_end_stream() {
            prefix.rest = None;
            break;
        }
        if read >= limit {
            break;
        }
        match rest.frame().await {
            None => prefix.rest = None,
            Some(Err(error)) => {
                return Err(ProxyError::BadRequest(format!(
                    "reading the request body failed: {error}"
                )))
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    read += data.len();
                    if !data.is_empty() {
                        prefix.chunks.push_back(data);
                    }
                }
                Err(frame) => {
                    prefix.trailers = frame.into_trailers().ok();
                    prefix.rest = None;
                }
            },
        }
    }
    Ok(())
}

/// Replaces the model name in the prefix with `alias`, fixing the length.
pub(crate) fn rewrite_model(
    prefix: &mut Prefix,
    scanned: &Scanned,
    alias: &str,
    headers: &mut HeaderMap,
) {
    let joined: Bytes = if prefix.chunks.len() == 1 {
        prefix.chunks[0].clone()
    } else {
        let mut all = Vec::with_capacity(prefix.chunks.iter().map(Bytes::len).sum());
        for chunk in &prefix.chunks {
            all.extend_from_slice(chunk);
        }
        Bytes::from(all)
    };
    let rewritten = match scanned {
        Scanned::Json(fields) => fields
            .model_span
            .clone()
            .filter(|span| span.end <= joined.len())
            .map(|span| classify::rewrite_json_model(&joined, span, alias)),
        Scanned::Grpc(fields) => classify::rewrite_grpc_model(&joined, fields, alias),
        Scanned::Path => None,
    };
    let Some(rewritten) = rewritten else {
        return;
    };
    let delta = rewritten.len() as i64 - joined.len() as i64;
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
    {
        headers.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from((length + delta).max(0) as u64),
        );
    }
    prefix.chunks.clear();
    prefix.chunks.push_back(rewritten);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unscanned_parts_start_at_the_offset() {
        let chunks = VecDeque::from([
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"de"),
            Bytes::from_static(b"fgh"),
        ]);
        let rest = |from| {
            unscanned(&chunks, from)
                .map(<[u8]>::to_vec)
                .collect::<Vec<_>>()
        };
        assert_eq!(rest(0), [b"abc".to_vec(), b"de".to_vec(), b"fgh".to_vec()]);
        assert_eq!(rest(2), [b"c".to_vec(), b"de".to_vec(), b"fgh".to_vec()]);
        assert_eq!(rest(3), [b"de".to_vec(), b"fgh".to_vec()]);
        assert_eq!(rest(7), [b"h".to_vec()]);
        assert!(rest(8).is_empty());
    }
}
