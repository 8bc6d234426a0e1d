//! `UsageScanner` (token-limit correction from a response's `usage`): the
//! same total however the stream is chunked, equal to a plain reference
//! search for the last `"total_tokens": N`.

#![no_main]

use infermesh_filters::rate_limit::UsageScanner;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

const KEY: &[u8] = b"\"total_tokens\"";

/// The last `"total_tokens"` followed by optional whitespace, `:`, optional
/// whitespace and digits (saturating), searching on after each key.
fn reference(body: &[u8]) -> Option<u64> {
    let ws = |b: u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let mut last = None;
    let mut i = 0;
    while let Some(at) = body[i..].iter().position(|&b| b == b'"') {
        let start = i + at;
        if !body[start..].starts_with(KEY) {
            i = start + 1;
            continue;
        }
        i = start + KEY.len();
        let mut j = i;
        while j < body.len() && ws(body[j]) {
            j += 1;
        }
        if body.get(j) != Some(&b':') {
            continue;
        }
        j += 1;
        while j < body.len() && ws(body[j]) {
            j += 1;
        }
        let digits = body[j..].iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 {
            let n = body[j..j + digits].iter().fold(0u64, |n, &d| {
                n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
            });
            last = Some(n);
        }
    }
    last
}

fuzz_target!(|data: &[u8]| {
    let (cuts, body) = common::split_input(data);
    let mut one_shot = UsageScanner::default();
    one_shot.feed(body);
    let mut chunked = UsageScanner::default();
    for part in common::chunks(body, &cuts) {
        chunked.feed(part);
    }
    assert_eq!(
        one_shot.total(),
        chunked.total(),
        "chunking changed the total"
    );
    assert_eq!(
        one_shot.total(),
        reference(body),
        "the reference search disagrees"
    );
});
