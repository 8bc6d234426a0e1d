//! The simulator's stand-in tokenizer: deterministic, model-free, and close
//! enough to a real BPE count for English-like text.
//!
//! A token is a run of letters and digits of at most [`CHARS_PER_TOKEN`]
//! characters (longer runs are cut into pieces of that many characters, the
//! fixed chars-per-token fallback) or one punctuation character; whitespace
//! separates tokens and is not a token. Each token's id is a 32-bit FNV-1a
//! hash of its text, so equal texts give equal ids and a shared prefix of
//! text is a shared prefix of ids — which is what prefix caching keys on.

/// The longest run of letters or digits counted as one token.
pub const CHARS_PER_TOKEN: usize = 6;

/// The token ids of `text`.
pub fn tokenize(text: &str) -> Vec<u32> {
    let mut out = Vec::with_capacity(text.len() / 4 + 1);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut Vec<u32>| {
        if !word.is_empty() {
            out.push(fnv(word.as_bytes()));
            word.clear();
        }
    };
    for c in text.chars() {
        if c.is_alphanumeric() {
            if word.chars().count() == CHARS_PER_TOKEN {
                flush(&mut word, &mut out);
            }
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            if !c.is_whitespace() {
                let mut buf = [0u8; 4];
                out.push(fnv(c.encode_utf8(&mut buf).as_bytes()));
            }
        }
    }
    flush(&mut word, &mut out);
    out
}

fn fnv(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Words the simulator generates as output and the load generator builds
/// prompts from; each is one token.
pub const WORDS: &[&str] = &[
    "the", "model", "serves", "tokens", "fast", "cache", "prefix", "block", "batch", "queue",
    "mesh", "proxy", "route", "load", "time", "first", "next", "every", "small", "large", "kv",
    "gpu", "lora", "prompt", "answer", "server", "fleet", "hash", "chain", "ring", "spill",
    "bound", "score", "decode", "stream", "event", "data", "word", "text", "chat", "user",
    "system", "tenant", "policy", "metric", "gauge", "count", "sum", "rate", "peak", "ewma",
    "least", "round", "robin", "aware", "simple", "plain", "quick", "steady", "peer", "pod",
    "node", "cell", "sim",
];

/// The `index`th generated output word.
pub fn output_word(index: usize) -> &'static str {
    WORDS[(index.wrapping_mul(7919) + 13) % WORDS.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_punctuation_are_tokens_and_whitespace_is_not() {
        assert_eq!(tokenize("Hello, world!").len(), 4);
        assert_eq!(tokenize("  a   b  ").len(), 2);
        assert!(tokenize("").is_empty());
    }

    #[test]
    fn long_runs_fall_back_to_fixed_chars_per_token() {
        assert_eq!(tokenize("abcdefghijklm").len(), 3); // 6 + 6 + 1
    }

    #[test]
    fn a_shared_text_prefix_is_a_shared_token_prefix() {
        let a = tokenize("you are a helpful assistant. question one");
        let b = tokenize("you are a helpful assistant. question two");
        assert_eq!(a[..a.len() - 1], b[..b.len() - 1]);
        assert_ne!(a.last(), b.last());
    }

    #[test]
    fn every_word_is_one_token() {
        for w in WORDS {
            assert_eq!(tokenize(w).len(), 1, "{w}");
        }
    }
}
