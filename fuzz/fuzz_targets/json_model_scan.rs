//! `JsonScanner`: the same answer however the body is chunked, and the same
//! `model`, `stream` and duplicate verdict as serde_json where the body is a
//! valid JSON object and the scan reached a decision.

#![no_main]

use std::fmt;

use infermesh_proxy::classify::{JsonFields, JsonScanner, Scan};
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

#[path = "common.rs"]
mod common;

/// Limits to scan with: the proxy's default and one that cuts most seeds short.
const LIMITS: [usize; 2] = [64 * 1024, 24];

fn scan(chunks: &[&[u8]], limit: usize, whole: bool) -> JsonFields {
    let mut scanner = JsonScanner::new(limit);
    if whole {
        scanner = scanner.whole_object();
    }
    for chunk in chunks {
        if scanner.feed(chunk) == Scan::Done {
            break;
        }
    }
    scanner.finish()
}

/// A JSON object's members in order, repeats kept (serde_json's `Map` keeps the last).
struct Members(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Value>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

fuzz_target!(|data: &[u8]| {
    let (cuts, body) = common::split_input(data);
    let parts = common::chunks(body, &cuts);
    for limit in LIMITS {
        for whole in [false, true] {
            let one_shot = scan(&[body], limit, whole);
            let chunked = scan(&parts, limit, whole);
            // `truncated` says whether the limit cut a chunk the scan was
            // still reading, which depends on where chunks end; the rest
            // must not.
            assert_eq!(
                JsonFields {
                    truncated: false,
                    ..one_shot.clone()
                },
                JsonFields {
                    truncated: false,
                    ..chunked
                },
                "limit {limit}, whole_object {whole}"
            );
            if let Some(span) = &one_shot.model_span {
                assert!(
                    span.end <= body.len().min(limit),
                    "span {span:?} past the scanned bytes"
                );
                let literal: String = serde_json::from_slice(&body[span.clone()])
                    .expect("the model span is a JSON string literal");
                assert_eq!(
                    Some(&literal),
                    one_shot.model.as_ref(),
                    "span and model disagree"
                );
            }
        }
    }

    // Agreement with serde_json on a valid object read whole.
    let Ok(Members(members)) = serde_json::from_slice::<Members>(body) else {
        return;
    };
    let fields = scan(&[body], usize::MAX, true);
    if !fields.complete {
        return;
    }
    let models: Vec<&Value> = members
        .iter()
        .filter(|(k, _)| k == "model")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        fields.duplicate_model,
        models.len() > 1,
        "duplicate verdict, members {members:?}"
    );
    match models.as_slice() {
        [] => assert_eq!(fields.model, None),
        [only] => assert_eq!(
            fields.model.as_deref(),
            only.as_str(),
            "the model differs from serde_json's"
        ),
        _ => {}
    }
    let streams: Vec<&Value> = members
        .iter()
        .filter(|(k, _)| k == "stream")
        .map(|(_, v)| v)
        .collect();
    if let [only] = streams.as_slice() {
        assert_eq!(
            fields.stream,
            **only == Value::Bool(true),
            "stream differs from serde_json's"
        );
    }
});
