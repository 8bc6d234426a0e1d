//! `GrpcModelScanner`: the same answer however the body is chunked, and the
//! same field 1 as prost decoding the first message, or a refusal the proxy
//! acts on (a repeated field 1 naming another model is found by the
//! verifier of the rest, a group before field 1 makes the message
//! undecodable); a model rewrite keeps the message decodable with the new
//! name.

#![no_main]

use infermesh_proxy::classify::{rewrite_grpc_model, GrpcFields, GrpcModelScanner, Scan};
use libfuzzer_sys::fuzz_target;
use prost::encoding::{decode_key, skip_field, DecodeContext, WireType};
use prost::Message;

#[path = "common.rs"]
mod common;

const LIMITS: [usize; 2] = [64 * 1024, 16];

/// Field 1 as a (repeated, to see every occurrence) string; other fields are skipped.
#[derive(Clone, PartialEq, Message)]
struct FieldOne {
    #[prost(string, repeated, tag = "1")]
    names: Vec<String>,
}

fn scan(chunks: &[&[u8]], limit: usize) -> GrpcFields {
    scanner(chunks, limit).finish()
}

fn scanner(chunks: &[&[u8]], limit: usize) -> GrpcModelScanner {
    let mut scanner = GrpcModelScanner::new(limit);
    for chunk in chunks {
        if scanner.feed(chunk) == Scan::Done {
            break;
        }
    }
    scanner
}

/// Whether the verifier of the rest of the first message, after a scan
/// that read its model, refuses it.
fn verifier_refuses(body: &[u8], message_len: usize) -> bool {
    let scanner = scanner(&[body], usize::MAX);
    let from = scanner.consumed();
    let Some(mut verifier) = scanner.into_verifier() else {
        return false;
    };
    verifier.feed(&body[from..5 + message_len]).is_err()
}

/// The first message when its frame is whole and uncompressed.
fn first_message(body: &[u8]) -> Option<&[u8]> {
    let (&flag, rest) = body.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    (flag == 0).then_some(())?;
    rest.get(4..4 + len)
}

/// Whether a group (wire type 3) comes before the first field 1.
fn group_before_field_one(mut buf: &[u8]) -> bool {
    while !buf.is_empty() {
        let Ok((tag, wire)) = decode_key(&mut buf) else {
            return false;
        };
        if tag == 1 {
            return false;
        }
        if wire == WireType::StartGroup {
            return true;
        }
        if skip_field(wire, tag, &mut buf, DecodeContext::default()).is_err() {
            return false;
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let (cuts, body) = common::split_input(data);
    let parts = common::chunks(body, &cuts);
    for limit in LIMITS {
        let one_shot = scan(&[body], limit);
        assert_eq!(one_shot, scan(&parts, limit), "limit {limit}");
        if let Some(span) = &one_shot.field_span {
            assert!(
                span.start >= 5 && span.end <= body.len().min(limit),
                "span {span:?}"
            );
        }
    }

    let fields = scan(&[body], usize::MAX);
    let Some(message) = first_message(body) else {
        return;
    };
    if let Ok(decoded) = FieldOne::decode(message) {
        match decoded.names.as_slice() {
            [] => assert_eq!(fields.model, None, "a model where prost finds no field 1"),
            // A group before field 1, which decoders skip: the scan says it
            // cannot decode the message (the proxy refuses it), never that
            // there is no model.
            _ if group_before_field_one(message) => {
                assert!(fields.undecodable, "a group hid field 1: {fields:?}")
            }
            [only] => assert_eq!(
                fields.model.as_ref(),
                Some(only),
                "field 1 differs from prost's"
            ),
            // Decoders keep the last of a repeated field 1; the scan routes
            // by the first, so the verifier must refuse any that differs (it
            // may also refuse what it does not follow, such as a group).
            [first, rest @ ..] => {
                assert_eq!(fields.model.as_ref(), Some(first), "a repeated field 1");
                if rest.iter().any(|name| name != first) {
                    assert!(
                        verifier_refuses(body, message.len()),
                        "a repeated field 1 naming {rest:?} after {first:?} passed the verifier"
                    );
                }
            }
        }
        if fields.field_span.is_some() {
            let rewritten =
                rewrite_grpc_model(body, &fields, "renamed").expect("a rewrite of a found field");
            let again = first_message(&rewritten).expect("the rewritten frame is whole");
            let decoded = FieldOne::decode(again).expect("the rewritten message decodes");
            assert_eq!(decoded.names.first().map(String::as_str), Some("renamed"));
            assert_eq!(
                scan(&[&rewritten], usize::MAX).model.as_deref(),
                Some("renamed")
            );
        }
    }
});
