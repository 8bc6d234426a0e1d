//! Request classification: which API a request speaks and which model it names.
//!
//! Routing, authorization and balancing all key on the model, but the model
//! name often lives in the request body (the `model` member of an OpenAI JSON
//! body, field 1 of a KServe gRPC message). This module decides from the head
//! alone where it can ([`classify_head`]) and otherwise says which body scan
//! is needed ([`BodyScan`]); the scanners ([`JsonScanner`],
//! [`GrpcModelScanner`]) then read the body incrementally, chunk by chunk, and
//! stop at the first moment they know enough.
//!
//! Why a bounded incremental scan rather than parsing the body:
//!
//! - **Latency.** Routing starts as soon as the model is known, usually within
//!   the first few hundred bytes, not after a multi-megabyte prompt or tensor
//!   upload has arrived. Time to first byte is a measured figure.
//! - **Memory.** A scanner keeps a few fixed bytes of state plus the model
//!   name it found, and gives up after `limit` bytes, so a hostile or huge body
//!   cannot make the proxy hold more than the configured prefix.
//! - **Unchanged replay.** Scanners only look at the bytes; they never copy or
//!   re-encode the body. The caller keeps the chunks it fed and replays them to
//!   the upstream byte for byte. The one sanctioned change, a model-alias
//!   rewrite, replaces only the model literal ([`rewrite_json_model`],
//!   [`rewrite_grpc_model`]) using the span the scanner reported.
//!
//! Everything here is pure: plain values in, plain values out, no I/O.

mod grpc;
mod head;
mod json;

pub use grpc::{rewrite_grpc_model, GrpcFields, GrpcModelScanner, GrpcVerifier};
pub use head::{classify_head, ApiKind, BodyScan, GrpcMethod, HeadClass};
pub use json::{rewrite_json_model, JsonFields, JsonScanner, PromptPrefix, MAX_PROMPT_GRANULES};

/// Why the rest of a body cannot be trusted to name the model the request
/// was routed and authorized by; positions are body offsets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Ambiguity {
    /// A JSON body with a second top-level `model` (parsers keep the last).
    #[error("the JSON body has more than one top-level `model` member")]
    RepeatedModel,
    /// Something other than whitespace after the top-level JSON object.
    #[error("the JSON body holds another value after its top-level object (at byte {0})")]
    SecondValue(usize),
    /// A byte past which the JSON scan cannot follow what a parser would see.
    #[error("the JSON body is not valid JSON (at byte {0})")]
    InvalidJson(usize),
    /// A gRPC message (or a repeated field 1) naming another model.
    #[error("a gRPC message names another model than the first one (at byte {0})")]
    OtherModel(usize),
    /// A compressed gRPC message, which the proxy does not decompress.
    #[error("a compressed gRPC message cannot be checked for its model (at byte {0})")]
    Compressed(usize),
    /// A gRPC message that cannot be decoded.
    #[error("{what} (at byte {at})")]
    MalformedGrpc {
        /// What is wrong with it.
        what: &'static str,
        /// Where.
        at: usize,
    },
}

/// Whether a body scanner wants more of the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// Feed the next chunk (or call `finish` if the body has ended).
    NeedMore,
    /// Nothing more is needed; call `finish`.
    Done,
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, Method};
    use proptest::prelude::*;
    use prost::encoding::{encode_key, encode_varint, WireType};

    use super::*;

    /// Fixed state a scanner may hold besides the model name it reads.
    const FIXED: usize = 64;

    /// The most a scanner with `limit` may hold: its fixed state plus a model
    /// name no longer than the bytes it may read (a `Vec` at most doubles).
    fn bound(limit: usize) -> usize {
        FIXED + 2 * limit
    }

    /// Splits `body` at `cuts` (taken modulo the body length, sorted).
    fn chunks<'a>(body: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([body.len()]) {
            out.push(&body[start..cut]);
            start = cut;
        }
        out
    }

    fn scan_json(chunks: &[&[u8]], limit: usize) -> JsonFields {
        let mut scanner = JsonScanner::new(limit);
        for chunk in chunks {
            let scan = scanner.feed(chunk);
            assert!(
                scanner.retained_bytes() <= bound(limit),
                "{} > {}",
                scanner.retained_bytes(),
                bound(limit)
            );
            if scan == Scan::Done {
                break;
            }
        }
        scanner.finish()
    }

    fn scan_grpc(chunks: &[&[u8]], limit: usize) -> GrpcFields {
        let mut scanner = GrpcModelScanner::new(limit);
        for chunk in chunks {
            let scan = scanner.feed(chunk);
            assert!(
                scanner.retained_bytes() <= bound(limit),
                "{} > {}",
                scanner.retained_bytes(),
                bound(limit)
            );
            if scan == Scan::Done {
                break;
            }
        }
        scanner.finish()
    }

    /// A JSON string literal for `s`, escaping non-ASCII as `\u` when `ascii`.
    fn json_string(s: &str, ascii: bool) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 || (ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// A valid OpenAI-like body, with its model and stream flag.
    fn json_body() -> impl Strategy<Value = (Vec<u8>, String, bool)> {
        (
            any::<String>(),
            any::<bool>(),
            proptest::option::of(any::<bool>()),
            any::<String>(),
            prop::sample::select(vec!["", " ", "\n\t", "  \r\n"]),
            0usize..3,
        )
            .prop_map(|(model, ascii, stream, content, ws, order)| {
                let model_member = format!("{ws}\"model\"{ws}:{ws}{}", json_string(&model, ascii));
                let messages = format!(
                    "\"messages\":[{{\"role\":\"user\",\"model\":\"nested\",\"content\":{}}}],\"n\":-1.5e3",
                    json_string(&content, !ascii)
                );
                let mut members = vec![model_member, messages];
                if let Some(stream) = stream {
                    members.push(format!("\"stream\":{ws}{stream}"));
                }
                members.rotate_left(order);
                let body = format!("{ws}{{{}{ws}}}{ws}", members.join(","));
                (body.into_bytes(), model, stream == Some(true))
            })
    }

    /// One protobuf field: (field number, wire type choice, payload).
    fn proto_field() -> impl Strategy<Value = (u32, u8, Vec<u8>)> {
        (
            prop_oneof![Just(1u32), 2u32..20, 1000u32..(1 << 29) - 1],
            0u8..5,
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..40),
                "[a-z0-9./-]{0,20}".prop_map(String::into_bytes),
            ],
        )
    }

    /// Encodes fields into a message; returns it and what the scanner must find.
    fn encode_fields(fields: &[(u32, u8, Vec<u8>)]) -> (Vec<u8>, Option<String>) {
        let mut message = Vec::new();
        let mut expected = None;
        let mut decided = false;
        for (tag, wire, payload) in fields {
            match wire {
                0 => {
                    encode_key(*tag, WireType::Varint, &mut message);
                    encode_varint(payload.len() as u64 * 0x1234_5678, &mut message);
                }
                1 => {
                    encode_key(*tag, WireType::SixtyFourBit, &mut message);
                    message.extend_from_slice(&[0xab; 8]);
                }
                2 => {
                    encode_key(*tag, WireType::ThirtyTwoBit, &mut message);
                    message.extend_from_slice(&[0xcd; 4]);
                }
                _ => {
                    encode_key(*tag, WireType::LengthDelimited, &mut message);
                    encode_varint(payload.len() as u64, &mut message);
                    message.extend_from_slice(payload);
                }
            }
            if *tag == 1 && !decided {
                decided = true;
                if *wire >= 3 {
                    expected = String::from_utf8(payload.clone()).ok();
                }
            }
        }
        (message, expected)
    }

    fn path_segment() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "",
                "v1",
                "v2",
                "models",
                "versions",
                "infer",
                "ready",
                "health",
                "live",
                "chat",
                "completions",
                "embeddings",
                "generate",
                "inference.GRPCInferenceService",
                "ModelInfer",
                "ServerLive",
                "%2F",
                "%",
                "%zz",
                "%ff",
                "?",
                "?a=b",
                "#",
            ])
            .prop_map(String::from),
            "[a-zA-Z0-9%._~-]{1,8}",
            any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn scanners_never_panic_and_stay_bounded_on_random_bytes(
            body in prop::collection::vec(any::<u8>(), 0..4096),
            cuts in prop::collection::vec(any::<usize>(), 0..16),
            limit in 0usize..5000,
        ) {
            let parts = chunks(&body, &cuts);
            let json = scan_json(&parts, limit);
            prop_assert_eq!(
                &JsonFields { truncated: false, ..json.clone() },
                &JsonFields { truncated: false, ..scan_json(&[&body], limit) }
            );
            if let Some(span) = json.model_span {
                prop_assert!(span.end <= body.len().min(limit) && body[span.start] == b'"');
            }
            let grpc = scan_grpc(&parts, limit);
            prop_assert_eq!(&grpc, &scan_grpc(&[&body], limit));
            if let Some(span) = grpc.field_span {
                prop_assert!(span.start >= 5 && span.end <= body.len().min(limit));
            }
        }

        #[test]
        fn scanners_stay_bounded_on_inputs_far_larger_than_the_limit(
            fill in any::<u8>(),
            len in 0usize..200_000,
            limit in 0usize..2048,
        ) {
            let mut body = b"{\"model\":\"".to_vec();
            body.resize(body.len() + len, fill);
            let parts: Vec<&[u8]> = body.chunks(997).collect();
            scan_json(&parts, limit);
            let mut frame = vec![0, 0xff, 0xff, 0xff, 0xff, 0x0a, 0xff, 0xff, 0x03];
            frame.resize(frame.len() + len, fill);
            let parts: Vec<&[u8]> = frame.chunks(997).collect();
            scan_grpc(&parts, limit);
        }

        #[test]
        fn valid_json_bodies_give_their_model_however_chunked(
            (body, model, stream) in json_body(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let fields = scan_json(&chunks(&body, &cuts), 1 << 20);
            prop_assert_eq!(fields.model.as_deref(), Some(model.as_str()));
            prop_assert_eq!(fields.stream, stream);
            prop_assert!(fields.complete);
            let span = fields.model_span.clone().unwrap();
            let rewritten = rewrite_json_model(&body, span, "renamed");
            let again = scan_json(&[&rewritten], 1 << 20);
            prop_assert_eq!(again.model.as_deref(), Some("renamed"));
            prop_assert_eq!(again.stream, stream);
        }

        #[test]
        fn truncated_json_bodies_never_panic_and_agree_across_chunkings(
            (body, _model, _stream) in json_body(),
            keep in any::<prop::sample::Index>(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
            limit in 0usize..512,
        ) {
            let body = &body[..keep.index(body.len() + 1)];
            let whole = scan_json(&[body], limit);
            prop_assert_eq!(
                &JsonFields { truncated: false, ..scan_json(&chunks(body, &cuts), limit) },
                &JsonFields { truncated: false, ..whole.clone() }
            );
            if let Some(span) = whole.model_span {
                prop_assert!(span.end <= body.len());
            }
        }

        #[test]
        fn random_protobuf_frames_give_the_first_field_one(
            fields in prop::collection::vec(proto_field(), 0..8),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
            trailing in prop::collection::vec(any::<u8>(), 0..32),
        ) {
            let (message, expected) = encode_fields(&fields);
            let mut body = vec![0];
            body.extend_from_slice(&(message.len() as u32).to_be_bytes());
            body.extend_from_slice(&message);
            body.extend_from_slice(&trailing);
            let found = scan_grpc(&chunks(&body, &cuts), 1 << 20);
            prop_assert_eq!(&found.model, &expected);
            prop_assert_eq!(found.frame_len, Some(message.len() as u32));
            if expected.is_some() {
                let rewritten = rewrite_grpc_model(&body, &found, "renamed").unwrap();
                let again = scan_grpc(&[&rewritten], 1 << 20);
                prop_assert_eq!(again.model.as_deref(), Some("renamed"));
                prop_assert_eq!(&rewritten[rewritten.len() - trailing.len()..], &trailing[..]);
            }
        }

        #[test]
        fn truncated_protobuf_frames_never_panic_and_agree_across_chunkings(
            fields in prop::collection::vec(proto_field(), 0..8),
            flag in prop_oneof![Just(0u8), any::<u8>()],
            keep in any::<prop::sample::Index>(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
            limit in 0usize..256,
        ) {
            let (message, _) = encode_fields(&fields);
            let mut body = vec![flag];
            body.extend_from_slice(&(message.len() as u32).to_be_bytes());
            body.extend_from_slice(&message);
            let body = &body[..keep.index(body.len() + 1)];
            let whole = scan_grpc(&[body], limit);
            prop_assert_eq!(&scan_grpc(&chunks(body, &cuts), limit), &whole);
            if whole.field_span.is_some() {
                prop_assert!(rewrite_grpc_model(body, &whole, "x").is_some());
            }
        }

        #[test]
        fn classify_head_never_panics_and_keeps_its_invariants(
            segments in prop::collection::vec(path_segment(), 0..7),
            method in prop::sample::select(vec![Method::GET, Method::POST, Method::PUT, Method::DELETE]),
            content_type in prop::sample::select(vec![
                None, Some("application/grpc"), Some("application/grpc+proto"),
                Some("application/json"), Some("application/grpc-web"), Some("text/plain"),
            ]),
        ) {
            let path = format!("/{}", segments.join("/"));
            let content_type = content_type.map(HeaderValue::from_static);
            let class = classify_head(&method, &path, content_type.as_ref());
            prop_assert_eq!(class.api.is_grpc(), class.grpc.is_some());
            match class.body {
                BodyScan::OpenAiJson => prop_assert!(matches!(
                    class.api,
                    ApiKind::OpenAiChat | ApiKind::OpenAiCompletions | ApiKind::OpenAiEmbeddings
                )),
                BodyScan::GrpcModelName => prop_assert_eq!(class.api, ApiKind::KServeGrpc),
                BodyScan::None => {}
            }
            if class.model.is_some() {
                prop_assert!(matches!(class.api, ApiKind::KServeRest | ApiKind::OpenAiModels));
            }
            if !path.contains(['?', '#']) {
                let with_query = format!("{path}?model=other&x=/v1/models");
                prop_assert_eq!(&classify_head(&method, &with_query, content_type.as_ref()), &class);
            }
        }
    }
}
