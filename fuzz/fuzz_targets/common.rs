//! Input layout shared by the targets that check chunking: byte 0 is the
//! number of cut points (mod 16), then two little-endian bytes per cut, then
//! the body. A seed with a leading `\0` is just its body.

/// Splits the fuzzer's input into the cut points and the body.
#[allow(dead_code)]
pub fn split_input(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&count, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let count = usize::from(count % 16).min(rest.len() / 2);
    let (cuts, body) = rest.split_at(count * 2);
    let cuts = cuts
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    (cuts, body)
}

/// `body` split at `cuts` (taken modulo the body length, sorted); empty chunks kept.
#[allow(dead_code)]
pub fn chunks<'a>(body: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for cut in cuts.into_iter().chain([body.len()]) {
        out.push(&body[start..cut]);
        start = cut;
    }
    out
}
