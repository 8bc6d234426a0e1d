//! Incremental scan of an OpenAI JSON body for its top-level `model` and `stream`.
//!
//! A small pushdown automaton validates the JSON as it goes, so that only
//! members of the top-level object count: a `"model"` inside `messages` or
//! `tools` is just a string. The container stack is a fixed bit set, so the
//! scanner's memory does not grow with the input beyond the model name itself.

use std::mem;
use std::ops::Range;

use bytes::Bytes;

use super::{Ambiguity, Scan};

/// Deeper nesting ends the scan like a syntax error: no real request nests so
/// deep, and it keeps the container stack a fixed size.
const MAX_DEPTH: usize = 256;

/// Longest top-level key worth decoding: `max_completion_tokens`.
const KEY_CAP: usize = 21;

/// Longest `model` string a verifier keeps (a repeated model is refused
/// whatever its name, so only its presence matters there).
const VERIFY_MODEL_CAP: usize = 1024;

/// Reads a JSON body chunk by chunk until it knows the top-level `model` and `stream`.
///
/// ```
/// # use infermesh_proxy::classify::{JsonScanner, Scan};
/// let mut scanner = JsonScanner::new(64 * 1024);
/// assert_eq!(scanner.feed(br#"{"messages":[{"role":"user","content":"hi"}],"mo"#), Scan::NeedMore);
/// assert_eq!(scanner.feed(br#"del":"gpt-4o","stream":true,"n":1}"#), Scan::Done);
/// let fields = scanner.finish();
/// assert_eq!(fields.model.as_deref(), Some("gpt-4o"));
/// assert!(fields.stream && fields.complete);
/// ```
#[derive(Debug)]
pub struct JsonScanner {
    limit: usize,
    /// Bytes consumed so far: the body offset of the next byte.
    consumed: usize,
    state: State,
    /// Whether the scan ended on a decision rather than on the limit.
    decided: bool,

    /// Open containers; bit `i` is set when level `i + 1` is an object.
    stack: [u64; MAX_DEPTH / 64],
    depth: usize,
    /// The top-level member whose value is being read.
    member: Member,

    /// Where the bytes of the string being read go.
    sink: Sink,
    escape: Escape,
    /// A high surrogate waiting for its low half.
    high: Option<u16>,
    key: [u8; KEY_CAP],
    key_len: usize,
    key_overflow: bool,
    model_buf: Vec<u8>,
    model_start: usize,
    model_invalid: bool,
    /// The model string just read, until its member value is complete.
    pending_model: Option<(String, Range<usize>)>,

    model: Option<String>,
    model_span: Option<Range<usize>>,
    model_seen: bool,
    stream: bool,
    stream_seen: bool,
    /// The integer being read, when it is the value of a top-level
    /// `max_tokens` or `max_completion_tokens`.
    number: Option<u64>,
    max_tokens: Option<u64>,
    /// Read to the end of the top-level object instead of stopping once
    /// `model` and `stream` are known, to catch a repeated `model`.
    whole: bool,
    duplicate_model: bool,
    /// Body offset of the byte being stepped, for error positions.
    pos: usize,
    /// Body offset of the first byte that breaks JSON syntax (or of a
    /// top-level value that is not an object, or of nesting past the cap).
    invalid_at: Option<usize>,
    /// Body offset just past the `}` closing the top-level object.
    object_end: Option<usize>,
    /// Body offset of something other than whitespace after the top-level object.
    trailing_at: Option<usize>,
    /// Input was left unread because the limit cut it.
    truncated: bool,
    /// Longest `model` string kept; a longer one is no valid name.
    model_cap: usize,
    /// Hashes the leading bytes of `messages` or `prompt`, when asked to.
    prompt: Option<PromptHasher>,
}

/// Most hashes of a prompt prefix a scan keeps.
pub const MAX_PROMPT_GRANULES: usize = 1024;

/// Running hashes of the leading bytes of a request's prompt: the decoded
/// strings of the top-level `messages` (roles and contents, each string
/// followed by a separator byte) or `prompt`, FNV-1a over every byte, its
/// state recorded after each `granule` bytes. `chain[i]` stands for the
/// first `(i + 1) × granule` bytes, so any block size that is a multiple of
/// the granule finds the hash of its leading whole blocks there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromptPrefix {
    /// Bytes between two recorded hashes.
    pub granule: usize,
    /// The recorded hashes.
    pub chain: Vec<u64>,
}

impl PromptPrefix {
    /// The hash of the leading whole blocks of `block_size` bytes, at most
    /// `blocks` of them; `None` when not one whole block was read or the
    /// block size is not a multiple of the granule.
    pub fn key(&self, blocks: usize, block_size: usize) -> Option<u64> {
        if self.granule == 0 || !block_size.is_multiple_of(self.granule) {
            return None;
        }
        let per_block = block_size / self.granule;
        let whole = (self.chain.len() / per_block).min(blocks);
        (whole > 0).then(|| self.chain[whole * per_block - 1])
    }
}

#[derive(Debug)]
struct PromptHasher {
    granule: usize,
    max: usize,
    state: u64,
    filled: usize,
    chain: Vec<u64>,
    /// The prompt member ended, or the object did.
    done: bool,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

impl PromptHasher {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.chain.len() >= self.max {
                self.done = true;
                return;
            }
            self.state = (self.state ^ u64::from(b)).wrapping_mul(FNV_PRIME);
            self.filled += 1;
            if self.filled == self.granule {
                self.chain.push(self.state);
                self.filled = 0;
            }
        }
        if self.chain.len() >= self.max {
            self.done = true;
        }
    }
}

/// What a [`JsonScanner`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JsonFields {
    /// The decoded top-level `model` string. A repeated `model` counts as most
    /// JSON parsers count it, the last one wins, but only up to the decision.
    pub model: Option<String>,
    /// The body byte range of the raw `model` literal, quotes included.
    pub model_span: Option<Range<usize>>,
    /// Whether the top level holds `"stream": true`.
    pub stream: bool,
    /// Whether the scan reached a decision before the limit or the end of the body.
    pub complete: bool,
    /// The top-level object has more than one `model` member (seen only
    /// by a [`JsonScanner::whole_object`] scan, or before the decision).
    pub duplicate_model: bool,
    /// The top-level `max_completion_tokens`, else `max_tokens`, when seen
    /// before the decision (a [`JsonScanner::whole_object`] scan sees it
    /// wherever it is).
    pub max_tokens: Option<u64>,
    /// Body offset of the first byte that is not valid JSON, of a top-level
    /// value that is not an object, or of nesting deeper than the scanner
    /// follows: past it the scan cannot tell what a parser would find.
    pub invalid_at: Option<usize>,
    /// Body offset just past the `}` that closed the top-level object, when
    /// the scan saw it.
    pub object_end: Option<usize>,
    /// Body offset of a second value (anything but whitespace) after the
    /// top-level object, when the scan saw one.
    pub trailing_at: Option<usize>,
    /// The limit left part of a chunk unread while the scan still read on
    /// (a chunk that ends exactly at the limit does not tell: the caller
    /// knows whether more of the body follows).
    pub truncated: bool,
    /// Hashes of the prompt's leading bytes, when the scan was asked for
    /// them ([`JsonScanner::hash_prompt`]).
    pub prompt: Option<PromptPrefix>,
}

impl JsonFields {
    /// Why a body whose model decides something cannot be trusted to name
    /// the model a JSON parser upstream will see, as far as the scan went:
    /// a second `model` member, a second value after the object, or a byte
    /// past which the scan cannot follow the syntax.
    pub fn ambiguity(&self) -> Option<Ambiguity> {
        ambiguity(self.duplicate_model, self.trailing_at, self.invalid_at)
    }
}

fn ambiguity(
    duplicate_model: bool,
    trailing_at: Option<usize>,
    invalid_at: Option<usize>,
) -> Option<Ambiguity> {
    if duplicate_model {
        return Some(Ambiguity::RepeatedModel);
    }
    trailing_at
        .map(Ambiguity::SecondValue)
        .or(invalid_at.map(Ambiguity::InvalidJson))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before the top-level value.
    Start,
    /// Expecting a value.
    Value,
    /// After `[`: a value or `]`.
    ArrayStart,
    /// After `{`: a key or `}`.
    ObjectStart,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the closer of the open container.
    AfterValue,
    /// Inside a string; `key` tells whether it is an object key.
    Str {
        key: bool,
    },
    Number(Num),
    /// Inside `true`, `false` or `null`; `rest` are the bytes still expected.
    Literal {
        rest: &'static [u8],
        is_true: bool,
    },
    /// After the top-level object: only whitespace may follow.
    Trailing,
    Done,
}

/// Positions in the JSON number grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpInt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    Unicode { digits: u8, value: u16 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sink {
    Skip,
    Key,
    Model,
    Prompt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Member {
    Model,
    Stream,
    MaxTokens,
    MaxCompletionTokens,
    /// `messages` (chat) or `prompt` (completions): hashed when asked.
    Prompt,
    Other,
}

// === impl JsonScanner ===

impl JsonScanner {
    /// A scanner that reads at most `limit` bytes of the body.
    pub fn new(limit: usize) -> Self {
        JsonScanner {
            limit,
            consumed: 0,
            state: State::Start,
            decided: false,
            stack: [0; MAX_DEPTH / 64],
            depth: 0,
            member: Member::Other,
            sink: Sink::Skip,
            escape: Escape::None,
            high: None,
            key: [0; KEY_CAP],
            key_len: 0,
            key_overflow: false,
            model_buf: Vec::new(),
            model_start: 0,
            model_invalid: false,
            pending_model: None,
            model: None,
            model_span: None,
            model_seen: false,
            stream: false,
            stream_seen: false,
            number: None,
            max_tokens: None,
            whole: false,
            duplicate_model: false,
            pos: 0,
            invalid_at: None,
            object_end: None,
            trailing_at: None,
            truncated: false,
            model_cap: limit,
            prompt: None,
        }
    }

    /// Also hashes the leading bytes of `messages` or `prompt`, recording
    /// the hash every `granule` bytes up to `granules` times (at most
    /// [`MAX_PROMPT_GRANULES`]); the scan reads on past its decision until
    /// that member ends or enough is hashed, within its limit.
    pub fn hash_prompt(mut self, granule: usize, granules: usize) -> Self {
        if granule > 0 && granules > 0 {
            self.prompt = Some(PromptHasher {
                granule,
                max: granules.min(MAX_PROMPT_GRANULES),
                state: FNV_OFFSET,
                filled: 0,
                chain: Vec::new(),
                done: false,
            });
        }
        self
    }

    /// Whether the scan may stop at its decision: no prompt hashing asked,
    /// or the prompt is hashed as far as it goes.
    fn settled(&self) -> bool {
        self.decided && !self.whole && self.prompt.as_ref().is_none_or(|p| p.done)
    }

    /// Whether the scan is over: it ended, or it may stop at its decision.
    /// Asked after every byte, so the common answer (no decision yet) is a
    /// single test: an ended scan has always decided.
    #[inline]
    fn stopped(&self) -> bool {
        self.decided && (self.state == State::Done || self.settled())
    }

    /// Scans the whole top-level object (within the limit) instead of
    /// stopping at the first `model` and `stream`: authorization by model
    /// must see a repeated `model`, which JSON parsers upstream resolve to
    /// the last one.
    pub fn whole_object(mut self) -> Self {
        self.whole = true;
        self
    }

    /// Turns the scanner into a verifier of the rest of the body: it goes on
    /// from where it stopped, without a limit, to the end of the top-level
    /// object and past it, so that [`JsonFields::ambiguity`] reports a
    /// repeated `model` or a second value however far into the body it is.
    /// Its memory stays fixed (a repeated model name is not kept whole).
    pub fn into_verifier(mut self) -> Self {
        self.verify_rest();
        self
    }

    /// [`JsonScanner::into_verifier`] in place, without moving the scanner.
    pub fn verify_rest(&mut self) {
        self.whole = true;
        self.limit = usize::MAX;
        self.truncated = false;
        self.model_cap = self.model_cap.min(VERIFY_MODEL_CAP);
        self.prompt = None;
    }

    /// Feeds the next chunk; `Done` once nothing more is needed: both `model`
    /// and `stream` seen at the top level, the top-level object ended, the
    /// input is not a JSON object or breaks JSON syntax, or `limit` bytes
    /// consumed. A [`JsonScanner::whole_object`] scan reads on past the
    /// object (whitespace only may follow) until the limit or a second value.
    pub fn feed(&mut self, chunk: &[u8]) -> Scan {
        if self.stopped() {
            return Scan::Done;
        }
        let data = &chunk[..chunk.len().min(self.limit - self.consumed)];
        let mut i = 0;
        while i < data.len() {
            if matches!(self.state, State::Str { .. }) && self.escape == Escape::None {
                // Most of a body is string content (prompts); take plain runs at once.
                let run = plain_run(&data[i..]);
                if run > 0 {
                    self.plain(&data[i..i + run]);
                    i += run;
                    // A prompt hashed far enough settles the scan mid-string.
                    if self.settled() {
                        break;
                    }
                    continue;
                }
            }
            self.pos = self.consumed + i;
            // A string that ends in this chunk without an escape, the
            // common case of keys, roles and model names, in one step.
            if let Some(len) = self.whole_string(&data[i..]) {
                i += len;
            } else if self.step(data[i], self.consumed + i) {
                i += 1;
            }
            if self.stopped() {
                break;
            }
        }
        self.consumed += i;
        let stopped = self.stopped();
        if !stopped && self.consumed >= self.limit && chunk.len() > i {
            // Still reading, but the limit leaves the rest of this chunk unread.
            self.truncated = true;
        }
        if stopped || self.consumed >= self.limit {
            Scan::Done
        } else {
            Scan::NeedMore
        }
    }

    /// Body bytes consumed so far: the offset of the first byte not scanned.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// [`JsonFields::ambiguity`] of what was scanned so far.
    pub fn ambiguity(&self) -> Option<Ambiguity> {
        ambiguity(self.duplicate_model, self.trailing_at, self.invalid_at)
    }

    /// What was found so far.
    pub fn fields(&self) -> JsonFields {
        JsonFields {
            model: self.model.clone(),
            model_span: self.model_span.clone(),
            stream: self.stream,
            complete: self.decided,
            duplicate_model: self.duplicate_model,
            max_tokens: self.max_tokens,
            invalid_at: self.invalid_at,
            object_end: self.object_end,
            trailing_at: self.trailing_at,
            truncated: self.truncated,
            prompt: self.prompt.as_ref().map(|p| PromptPrefix {
                granule: p.granule,
                chain: p.chain.clone(),
            }),
        }
    }

    /// What was found so far, the model name and the prompt's hashes moved
    /// out rather than copied: the scanner goes on only as a verifier
    /// ([`JsonScanner::into_verifier`]), which needs neither.
    pub fn take_fields(&mut self) -> JsonFields {
        let prompt = self.prompt.take().map(|p| PromptPrefix {
            granule: p.granule,
            chain: p.chain,
        });
        JsonFields {
            model: self.model.take(),
            prompt,
            ..self.fields()
        }
    }

    /// What was found; also valid when the body ended before `Done`.
    pub fn finish(self) -> JsonFields {
        self.fields()
    }

    /// Bytes the scanner holds: its fixed buffers and the model name being or already read.
    #[cfg(test)]
    pub(crate) fn retained_bytes(&self) -> usize {
        mem::size_of_val(&self.stack)
            + KEY_CAP
            + self.model_buf.capacity()
            + self.pending_model.as_ref().map_or(0, |(m, _)| m.capacity())
            + self.model.as_ref().map_or(0, String::capacity)
            + self
                .prompt
                .as_ref()
                .map_or(0, |p| p.chain.capacity() * mem::size_of::<u64>())
    }

    /// Handles one byte at body offset `at`; `false` when the byte must be seen
    /// again in the new state (it ended a number).
    fn step(&mut self, b: u8, at: usize) -> bool {
        match self.state {
            State::Start => match b {
                b'{' => self.open(true),
                _ if is_ws(b) => {}
                // Not an object: there is no `model` member to find.
                _ => self.fail(),
            },
            State::Value => self.begin_value(b, at),
            State::ArrayStart => match b {
                b']' => self.close(),
                _ => self.begin_value(b, at),
            },
            State::ObjectStart => match b {
                b'"' => self.begin_string(true, at),
                b'}' => self.close(),
                _ if is_ws(b) => {}
                _ => self.fail(),
            },
            State::Key => match b {
                b'"' => self.begin_string(true, at),
                _ if is_ws(b) => {}
                _ => self.fail(),
            },
            State::Colon => match b {
                b':' => self.state = State::Value,
                _ if is_ws(b) => {}
                _ => self.fail(),
            },
            State::AfterValue => match b {
                b',' if self.in_object() => self.state = State::Key,
                b',' => self.state = State::Value,
                b'}' if self.in_object() => self.close(),
                b']' if !self.in_object() => self.close(),
                _ if is_ws(b) => {}
                _ => self.fail(),
            },
            State::Str { key } => self.string_byte(b, at, key),
            State::Number(num) => return self.number_byte(b, num),
            State::Literal { rest, is_true } => match rest {
                [expected] if b == *expected => self.value_end(is_true),
                [expected, rest @ ..] if b == *expected => {
                    self.state = State::Literal { rest, is_true }
                }
                _ => self.fail(),
            },
            State::Trailing => {
                if !is_ws(b) {
                    self.trailing_at = Some(at);
                    self.state = State::Done;
                }
            }
            State::Done => {}
        }
        true
    }

    /// When `bytes` opens a string where one may begin and holds the whole
    /// of it, plain (no escape, no control byte), reads it at once, as the
    /// byte-by-byte steps would, and tells how many bytes it took, quotes
    /// included. Strings hashed as a prompt take the steps: the hash may
    /// settle the scan mid-string.
    #[inline]
    fn whole_string(&mut self, bytes: &[u8]) -> Option<usize> {
        if bytes.first() != Some(&b'"') {
            return None;
        }
        let key = match self.state {
            State::ObjectStart | State::Key => true,
            State::Value | State::ArrayStart => false,
            _ => return None,
        };
        let content = &bytes[1..];
        let run = plain_run(content);
        if content.get(run) != Some(&b'"') {
            return None;
        }
        let sink = self.sink_for(key);
        if sink == Sink::Prompt {
            return None;
        }
        let text = &content[..run];
        let at = self.pos;
        if !key && self.depth == 1 {
            self.pending_model = None;
        }
        match sink {
            Sink::Key => self.member = member_named(text),
            Sink::Model => {
                self.pending_model = (run <= self.model_cap)
                    .then(|| std::str::from_utf8(text).ok())
                    .flatten()
                    .map(|model| (model.to_owned(), at..at + run + 2));
            }
            Sink::Skip | Sink::Prompt => {}
        }
        self.pos = at + run + 1;
        if key {
            self.state = State::Colon;
        } else {
            self.value_end(false);
        }
        Some(run + 2)
    }

    /// Ends the scan on a byte that is not valid JSON where it stands, a
    /// top-level value that is not an object, or nesting past the cap: what
    /// was found stands, but nothing after this byte can be followed.
    fn fail(&mut self) {
        self.decided = true;
        if let Some(prompt) = &mut self.prompt {
            prompt.done = true;
        }
        self.invalid_at.get_or_insert(self.pos);
        self.state = State::Done;
    }

    fn in_object(&self) -> bool {
        self.depth > 0 && self.stack[(self.depth - 1) / 64] & (1 << ((self.depth - 1) % 64)) != 0
    }

    fn open(&mut self, object: bool) {
        if self.depth == MAX_DEPTH {
            return self.fail();
        }
        let (word, bit) = (self.depth / 64, 1u64 << (self.depth % 64));
        if object {
            self.stack[word] |= bit;
            self.state = State::ObjectStart;
        } else {
            self.stack[word] &= !bit;
            self.state = State::ArrayStart;
        }
        self.depth += 1;
    }

    fn close(&mut self) {
        self.depth -= 1;
        self.value_end(false);
    }

    fn begin_value(&mut self, b: u8, at: usize) {
        if self.depth == 1 {
            self.pending_model = None;
        }
        self.state = match b {
            b'"' => return self.begin_string(false, at),
            b'{' => return self.open(true),
            b'[' => return self.open(false),
            b't' => State::Literal {
                rest: b"rue",
                is_true: true,
            },
            b'f' => State::Literal {
                rest: b"alse",
                is_true: false,
            },
            b'n' => State::Literal {
                rest: b"ull",
                is_true: false,
            },
            b'-' => State::Number(Num::Minus),
            b'0'..=b'9' => {
                let counted = self.depth == 1
                    && matches!(self.member, Member::MaxTokens | Member::MaxCompletionTokens);
                self.number = counted.then_some(u64::from(b - b'0'));
                State::Number(if b == b'0' { Num::Zero } else { Num::Int })
            }
            _ if is_ws(b) => return,
            _ => return self.fail(),
        };
    }

    /// A value ended; the member values of the top-level object are recorded here.
    fn value_end(&mut self, is_true: bool) {
        match self.depth {
            0 => {
                // The top-level object closed: a decision, and from here
                // only whitespace may follow.
                self.decided = true;
                if let Some(prompt) = &mut self.prompt {
                    prompt.done = true;
                }
                self.object_end = Some(self.pos + 1);
                self.state = State::Trailing;
                return;
            }
            1 => match self.member {
                Member::Model => {
                    self.duplicate_model |= self.model_seen;
                    let found = self.pending_model.take();
                    self.model_span = found.as_ref().map(|(_, span)| span.clone());
                    self.model = found.map(|(model, _)| model);
                    self.model_seen = true;
                }
                Member::Stream => {
                    self.stream = is_true;
                    self.stream_seen = true;
                }
                // `max_completion_tokens` supersedes the older `max_tokens`.
                Member::MaxCompletionTokens => {
                    if let Some(n) = self.number.take() {
                        self.max_tokens = Some(n);
                    }
                }
                Member::MaxTokens => {
                    if let Some(n) = self.number.take() {
                        self.max_tokens = self.max_tokens.or(Some(n));
                    }
                }
                Member::Prompt => {
                    if let Some(prompt) = &mut self.prompt {
                        prompt.done = true;
                    }
                }
                Member::Other => {}
            },
            _ => {}
        }
        if self.model_seen && self.stream_seen {
            // Enough to route; a whole-object scan reads on.
            self.decided = true;
        }
        self.state = State::AfterValue;
    }

    fn number_byte(&mut self, b: u8, num: Num) -> bool {
        let next = match (num, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus | Num::Int, b'0'..=b'9') => {
                self.number = self
                    .number
                    .map(|n| n.saturating_mul(10).saturating_add(u64::from(b - b'0')));
                Num::Int
            }
            // Only a plain non-negative integer counts as a token count.
            (Num::Zero | Num::Int, b'.') => {
                self.number = None;
                Num::Dot
            }
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => {
                self.number = None;
                Num::Exp
            }
            (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
            (Num::Exp, b'+' | b'-') => Num::ExpSign,
            (Num::Exp | Num::ExpSign | Num::ExpInt, b'0'..=b'9') => Num::ExpInt,
            (Num::Zero | Num::Int | Num::Frac | Num::ExpInt, _) => {
                self.value_end(false);
                return false;
            }
            _ => {
                self.fail();
                return true;
            }
        };
        self.state = State::Number(next);
        true
    }

    // --- strings ---

    /// Where the bytes of a string beginning now go.
    fn sink_for(&self, key: bool) -> Sink {
        match (self.depth, key, self.member) {
            (1, true, _) => Sink::Key,
            (1, false, Member::Model) => Sink::Model,
            (_, false, Member::Prompt) if self.prompt.is_some() => Sink::Prompt,
            _ => Sink::Skip,
        }
    }

    fn begin_string(&mut self, key: bool, at: usize) {
        self.sink = self.sink_for(key);
        match self.sink {
            Sink::Key => {
                self.key_len = 0;
                self.key_overflow = false;
            }
            Sink::Model => {
                self.model_buf.clear();
                self.model_invalid = false;
                self.model_start = at;
            }
            Sink::Prompt | Sink::Skip => {}
        }
        self.escape = Escape::None;
        self.high = None;
        self.state = State::Str { key };
    }

    fn string_byte(&mut self, b: u8, at: usize, key: bool) {
        match self.escape {
            Escape::None => match b {
                b'"' => self.end_string(at, key),
                b'\\' => self.escape = Escape::Backslash,
                0..=0x1f => self.fail(),
                _ => self.plain(&[b]),
            },
            Escape::Backslash => {
                let unescaped = match b {
                    b'"' | b'\\' | b'/' => b,
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'u' => {
                        self.escape = Escape::Unicode {
                            digits: 0,
                            value: 0,
                        };
                        return;
                    }
                    _ => return self.fail(),
                };
                self.escape = Escape::None;
                self.plain(&[unescaped]);
            }
            Escape::Unicode { digits, value } => {
                let Some(digit) = hex_digit(b) else {
                    return self.fail();
                };
                let value = (value << 4) | u16::from(digit);
                if digits == 3 {
                    self.escape = Escape::None;
                    self.code_unit(value);
                } else {
                    self.escape = Escape::Unicode {
                        digits: digits + 1,
                        value,
                    };
                }
            }
        }
    }

    /// Literal string content (or a simple escape, decoded).
    fn plain(&mut self, bytes: &[u8]) {
        if self.high.take().is_some() {
            self.sink_invalid();
        }
        self.sink_bytes(bytes);
    }

    /// A `\uXXXX` escape; surrogate pairs combine, lone surrogates spoil the string.
    fn code_unit(&mut self, unit: u16) {
        if let Some(high) = self.high.take() {
            if let 0xDC00..=0xDFFF = unit {
                let c = 0x10000 + ((u32::from(high) - 0xD800) << 10) + (u32::from(unit) - 0xDC00);
                return self.sink_char(c);
            }
            self.sink_invalid();
        }
        match unit {
            0xD800..=0xDBFF => self.high = Some(unit),
            0xDC00..=0xDFFF => self.sink_invalid(),
            _ => self.sink_char(u32::from(unit)),
        }
    }

    fn sink_char(&mut self, c: u32) {
        match char::from_u32(c) {
            Some(c) => self.sink_bytes(c.encode_utf8(&mut [0; 4]).as_bytes()),
            None => self.sink_invalid(),
        }
    }

    fn sink_bytes(&mut self, bytes: &[u8]) {
        match self.sink {
            Sink::Skip => {}
            Sink::Key => {
                let end = self.key_len + bytes.len();
                if end <= KEY_CAP {
                    self.key[self.key_len..end].copy_from_slice(bytes);
                    self.key_len = end;
                } else {
                    self.key_overflow = true;
                }
            }
            Sink::Model if self.model_buf.len() + bytes.len() > self.model_cap => {
                self.model_invalid = true;
            }
            Sink::Model => self.model_buf.extend_from_slice(bytes),
            Sink::Prompt => {
                if let Some(prompt) = &mut self.prompt {
                    prompt.feed(bytes);
                }
            }
        }
    }

    /// The string being read cannot be a valid name (lone surrogate).
    fn sink_invalid(&mut self) {
        match self.sink {
            Sink::Skip | Sink::Prompt => {}
            Sink::Key => self.key_overflow = true,
            Sink::Model => self.model_invalid = true,
        }
    }

    fn end_string(&mut self, at: usize, key: bool) {
        if self.high.take().is_some() {
            self.sink_invalid();
        }
        match self.sink {
            Sink::Key => {
                self.member = match self.key_overflow {
                    true => Member::Other,
                    false => member_named(&self.key[..self.key_len]),
                };
            }
            Sink::Model => {
                let raw = mem::take(&mut self.model_buf);
                self.pending_model = match self.model_invalid {
                    true => None,
                    false => String::from_utf8(raw)
                        .ok()
                        .map(|model| (model, self.model_start..at + 1)),
                };
            }
            Sink::Prompt => {
                // Strings stay apart: `["ab", "c"]` is not `["a", "bc"]`.
                if let Some(prompt) = &mut self.prompt {
                    prompt.feed(&[0x1e]);
                }
            }
            Sink::Skip => {}
        }
        self.sink = Sink::Skip;
        if key {
            self.state = State::Colon;
        } else {
            self.value_end(false);
        }
    }
}

/// How many bytes at the start of `bytes` are plain string content: up to
/// the first `"`, `\` or control byte (which JSON forbids unescaped).
///
/// This is the scan's inner loop. Keys, roles and model names end within a
/// few bytes, where a plain loop is cheapest. Prompts make most of a body:
/// past the first bytes, a vector search for the two delimiters, then one
/// pass (vectorised by the compiler: no early exit) telling whether the run
/// holds a control byte.
fn plain_run(bytes: &[u8]) -> usize {
    const SHORT: usize = 16;
    let is_end = |b: &u8| *b == b'"' || *b == b'\\' || *b < 0x20;
    let head = bytes.len().min(SHORT);
    if let Some(end) = bytes[..head].iter().position(is_end) {
        return end;
    }
    let rest = &bytes[head..];
    let end = memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
    let run = &rest[..end];
    if run.iter().fold(false, |control, &b| control | (b < 0x20)) {
        head + run.iter().position(is_end).unwrap_or(end)
    } else {
        head + end
    }
}

/// The top-level member a (decoded) key names.
fn member_named(key: &[u8]) -> Member {
    match key {
        b"model" => Member::Model,
        b"stream" => Member::Stream,
        b"max_tokens" => Member::MaxTokens,
        b"max_completion_tokens" => Member::MaxCompletionTokens,
        b"messages" | b"prompt" => Member::Prompt,
        _ => Member::Other,
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

/// Returns `prefix` with the literal at `span` (quotes included) replaced by
/// `new_model` as a JSON string; `prefix` unchanged when `span` is not inside it.
///
/// The caller must fix `content-length` when it forwards the result.
pub fn rewrite_json_model(prefix: &[u8], span: Range<usize>, new_model: &str) -> Bytes {
    if span.start > span.end || span.end > prefix.len() {
        return Bytes::copy_from_slice(prefix);
    }
    let mut out = Vec::with_capacity(prefix.len() - span.len() + new_model.len() + 2);
    out.extend_from_slice(&prefix[..span.start]);
    push_json_string(&mut out, new_model);
    out.extend_from_slice(&prefix[span.end..]);
    Bytes::from(out)
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    // Only ASCII bytes are escaped, so walking bytes keeps UTF-8 sequences intact.
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0..=0x1f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: usize = 1 << 20;

    fn scan(body: &[u8]) -> JsonFields {
        scan_limit(body, BIG)
    }

    fn scan_limit(body: &[u8], limit: usize) -> JsonFields {
        let mut scanner = JsonScanner::new(limit);
        scanner.feed(body);
        scanner.finish()
    }

    /// Feeds `body` in chunks split at `cuts`, stopping at `Done` as the proxy does.
    fn scan_chunks(body: &[u8], cuts: &[usize]) -> JsonFields {
        let mut scanner = JsonScanner::new(BIG);
        let mut start = 0;
        for &cut in cuts.iter().chain([&body.len()]) {
            if scanner.feed(&body[start..cut]) == Scan::Done {
                break;
            }
            start = cut;
        }
        scanner.finish()
    }

    #[test]
    fn a_whole_object_scan_sees_a_repeated_model() {
        let body =
            br#"{"model":"allowed","stream":false,"messages":[{"model":"x"}],"model":"secret"}"#;
        let quick = scan(body);
        assert_eq!(quick.model.as_deref(), Some("allowed"));
        assert!(!quick.duplicate_model, "the quick scan stops early");
        let mut scanner = JsonScanner::new(BIG).whole_object();
        // The object ended; a whole-object scan reads on for what follows it.
        assert_eq!(scanner.feed(body), Scan::NeedMore);
        let whole = scanner.finish();
        assert!(whole.duplicate_model);
        assert!(whole.complete);
        assert_eq!(whole.object_end, Some(body.len()));
        assert_eq!(whole.model.as_deref(), Some("secret"));
        // One top-level model, however deep others are nested, is no duplicate.
        let mut scanner = JsonScanner::new(BIG).whole_object();
        scanner.feed(br#"{"model":"a","tools":[{"model":"b"}],"stream":true}"#);
        let single = scanner.finish();
        assert!(!single.duplicate_model);
        assert!(single.complete && single.stream);
        // Cut by the limit: not complete, so not proven.
        let mut scanner = JsonScanner::new(20).whole_object();
        scanner.feed(br#"{"model":"a","stream":true,"x":"yyyyyyyyyyyy"}"#);
        let cut = scanner.finish();
        assert!(!cut.complete && cut.truncated && cut.object_end.is_none());
    }

    /// Feeds `body` to a quick scan that stops at its decision, then to its
    /// verifier from where it stopped, split at `cut`; the verifier's verdict.
    fn verify(body: &[u8], limit: usize, cut: usize) -> Option<String> {
        verify_ambiguity(body, limit, cut).map(|a| a.to_string())
    }

    fn verify_ambiguity(body: &[u8], limit: usize, cut: usize) -> Option<Ambiguity> {
        let mut scanner = JsonScanner::new(limit);
        scanner.feed(body);
        // As the proxy does: the fields taken, then the verifier.
        let _ = scanner.take_fields();
        let consumed = scanner.consumed();
        let mut verifier = scanner.into_verifier();
        let rest = &body[consumed..];
        let cut = cut.min(rest.len());
        verifier.feed(&rest[..cut]);
        verifier.feed(&rest[cut..]);
        verifier.ambiguity()
    }

    #[test]
    fn a_verifier_finds_a_repeated_model_however_far_past_the_decision() {
        let mut body = br#"{"model":"allowed","stream":true,"pad":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', 100_000));
        body.extend_from_slice(br#"","model":"forbidden"}"#);
        for cut in [0, 1, 50_000, 100_000, 100_010] {
            let why = verify(&body, 64 * 1024, cut).expect("a repeated model is found");
            assert!(why.contains("more than one top-level `model`"), "{why}");
        }
        // The quick scan itself stops before it, as routing needs no more.
        assert_eq!(scan(&body).model.as_deref(), Some("allowed"));
    }

    #[test]
    fn taken_fields_are_the_fields_with_nothing_copied() {
        let bodies: [&[u8]; 4] = [
            br#"{"model":"m","messages":[{"role":"user","content":"a long enough prompt"}],"stream":true}"#,
            br#"{"messages":[{"content":"x"}],"model":"caf\u00e9","max_tokens":7}"#,
            br#"{"model":"only-the-start"#,
            br#"[1,2]"#,
        ];
        for body in bodies {
            let mut scanner = JsonScanner::new(BIG).hash_prompt(4, 4);
            scanner.feed(body);
            let copied = scanner.fields();
            let taken = scanner.take_fields();
            assert_eq!(taken, copied, "{}", String::from_utf8_lossy(body));
            // The scanner kept neither the name nor the hashes.
            let left = scanner.fields();
            assert!(left.model.is_none() && left.prompt.is_none());
            assert_eq!(left.model_span, copied.model_span);
        }
    }

    #[test]
    fn a_verifier_finds_a_second_value_and_broken_syntax() {
        let why = verify(br#"{"model":"a","stream":false}{"model":"b"}"#, BIG, 3).unwrap();
        assert!(
            why.contains("another value after its top-level object"),
            "{why}"
        );
        let why = verify(
            br#"{"model":"a","stream":false,"t":NaN,"model":"b"}"#,
            BIG,
            0,
        )
        .unwrap();
        assert!(why.contains("not valid JSON (at byte 32)"), "{why}");
        // Whitespace after the object, nested models and a body that ends
        // early are no ambiguity.
        assert_eq!(
            verify(b"{\"model\":\"a\",\"stream\":true} \r\n", BIG, 2),
            None
        );
        assert_eq!(
            verify(
                br#"{"model":"a","stream":true,"m":[{"model":"b"}]}"#,
                BIG,
                5
            ),
            None
        );
        assert_eq!(
            verify(br#"{"model":"a","stream":true,"m":[{"#, BIG, 5),
            None
        );
        // Nesting past what the scanner follows cannot be verified.
        let mut deep = br#"{"model":"a","stream":true,"x":"#.to_vec();
        deep.extend(std::iter::repeat_n(b'[', MAX_DEPTH + 1));
        assert!(verify(&deep, BIG, 0).unwrap().contains("not valid JSON"));
    }

    #[test]
    fn a_verifier_keeps_a_repeated_model_name_short() {
        let mut body = br#"{"model":"a","stream":true,"model":""#.to_vec();
        body.extend(std::iter::repeat_n(b'y', 1 << 20));
        let mut scanner = JsonScanner::new(64).into_verifier();
        scanner.feed(&body);
        assert!(scanner.retained_bytes() < 4 * VERIFY_MODEL_CAP);
    }

    #[test]
    fn a_frame_that_crosses_the_limit_and_ends_the_body_is_truncated() {
        // The authorization bypass: the second model lies past the limit in
        // the same chunk that ends the body.
        let mut body = br#"{"model":"allowed","pad":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', 100_000));
        body.extend_from_slice(br#"","model":"forbidden"}"#);
        let mut scanner = JsonScanner::new(64 * 1024).whole_object();
        assert_eq!(scanner.feed(&body), Scan::Done);
        let fields = scanner.finish();
        assert!(fields.truncated && fields.object_end.is_none());
        assert!(!fields.duplicate_model, "not seen, hence the refusal");
    }

    fn found(model: &str, stream: bool) -> (Option<String>, bool, bool) {
        (Some(model.to_owned()), stream, true)
    }

    fn summary(fields: &JsonFields) -> (Option<String>, bool, bool) {
        (fields.model.clone(), fields.stream, fields.complete)
    }

    fn literal<'a>(body: &'a [u8], fields: &JsonFields) -> &'a [u8] {
        &body[fields.model_span.clone().expect("a model span")]
    }

    #[test]
    fn max_tokens_is_read_when_it_is_a_top_level_integer() {
        let max = |body: &str| JsonScanner::new(1 << 16).whole_object().tap_feed(body);
        assert_eq!(
            max(r#"{"model":"m","max_tokens":256,"stream":true}"#),
            Some(256)
        );
        assert_eq!(
            max(r#"{"max_tokens":10,"max_completion_tokens":300,"model":"m"}"#),
            Some(300)
        );
        assert_eq!(
            max(r#"{"max_completion_tokens":300,"max_tokens":10,"model":"m"}"#),
            Some(300)
        );
        assert_eq!(max(r#"{"model":"m","max_tokens":0}"#), Some(0));
        assert_eq!(max(r#"{"model":"m","max_tokens":2.5}"#), None);
        assert_eq!(max(r#"{"model":"m","max_tokens":1e3}"#), None);
        assert_eq!(max(r#"{"model":"m","max_tokens":-4}"#), None);
        assert_eq!(max(r#"{"model":"m","max_tokens":"64"}"#), None);
        assert_eq!(max(r#"{"model":"m","x":{"max_tokens":64}}"#), None);
        assert_eq!(max(r#"{"model":"m","max_tokens":[64]}"#), None);
        // Split anywhere, the count is the same.
        let body = br#"{"model":"m","max_tokens":4096,"messages":[]}"#;
        for cut in 0..body.len() {
            let fields = scan_chunks(body, &[cut]);
            assert_eq!(fields.max_tokens, Some(4096), "cut at {cut}");
        }
    }

    trait TapFeed {
        fn tap_feed(self, body: &str) -> Option<u64>;
    }

    impl TapFeed for JsonScanner {
        fn tap_feed(mut self, body: &str) -> Option<u64> {
            self.feed(body.as_bytes());
            self.finish().max_tokens
        }
    }

    #[test]
    fn model_and_stream_are_found_at_the_top_level() {
        let body = br#"{"model":"gpt-4o","stream":true}"#;
        let fields = scan(body);
        assert_eq!(summary(&fields), found("gpt-4o", true));
        assert_eq!(literal(body, &fields), br#""gpt-4o""#);
    }

    #[test]
    fn scan_is_done_as_soon_as_model_and_stream_are_known() {
        let mut scanner = JsonScanner::new(BIG);
        assert_eq!(scanner.feed(br#"{"stream":false,"model":"m""#), Scan::Done);
        assert_eq!(scanner.feed(b"garbage that is never read"), Scan::Done);
        assert_eq!(summary(&scanner.finish()), found("m", false));
    }

    #[test]
    fn scan_needs_more_until_the_object_ends() {
        let mut scanner = JsonScanner::new(BIG);
        assert_eq!(scanner.feed(br#"{"model":"m""#), Scan::NeedMore);
        assert_eq!(scanner.feed(br#","temperature":0.2"#), Scan::NeedMore);
        assert_eq!(scanner.feed(b"}"), Scan::Done);
        assert_eq!(summary(&scanner.finish()), found("m", false));
    }

    #[test]
    fn model_span_counts_offsets_across_chunks() {
        let body = br#"{"messages":[], "model" : "llama-3" }"#;
        for cut in 0..=body.len() {
            let fields = scan_chunks(body, &[cut]);
            assert_eq!(fields.model_span, Some(26..35), "cut at {cut}");
            assert_eq!(literal(body, &fields), br#""llama-3""#);
        }
    }

    #[test]
    fn nested_model_keys_are_ignored() {
        let body = br#"{"messages":[{"role":"user","model":"nested","content":"x"}],"metadata":{"model":"meta","stream":true},"model":"top"}"#;
        let fields = scan(body);
        assert_eq!(summary(&fields), found("top", false));
        assert_eq!(literal(body, &fields), br#""top""#);
    }

    #[test]
    fn nested_model_without_a_top_level_one_gives_no_model() {
        let fields = scan(br#"{"messages":[{"model":"nested"}],"input":{"model":"x"}}"#);
        assert_eq!(fields.model, None);
        assert_eq!(fields.model_span, None);
        assert!(fields.complete);
    }

    #[test]
    fn model_as_a_string_value_is_not_a_key() {
        let fields = scan(br#"{"role":"model","content":"stream","x":["model","stream"]}"#);
        assert_eq!(summary(&fields), (None, false, true));
    }

    #[test]
    fn escapes_in_the_model_are_decoded() {
        let body = br#"{"model":"a\"b\\c\/d\u00e9\ud83d\ude00\n\t","stream":true}"#;
        let fields = scan(body);
        assert_eq!(fields.model.as_deref(), Some("a\"b\\c/dé😀\n\t"));
        assert_eq!(
            literal(body, &fields),
            br#""a\"b\\c\/d\u00e9\ud83d\ude00\n\t""#
        );
    }

    #[test]
    fn escaped_keys_are_decoded() {
        let fields = scan(br#"{"mod\u0065l":"m","str\u0065am":true}"#);
        assert_eq!(summary(&fields), found("m", true));
    }

    #[test]
    fn keys_that_only_start_like_model_do_not_count() {
        let fields =
            scan(br#"{"model_name":"a","models":"b","mode":"c","":"d","modelmodelmodel":"e"}"#);
        assert_eq!(fields.model, None);
    }

    #[test]
    fn a_plain_run_ends_where_a_byte_by_byte_scan_ends() {
        let naive = |bytes: &[u8]| {
            bytes
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .unwrap_or(bytes.len())
        };
        let mut cases = Vec::new();
        for len in [0usize, 1, 15, 16, 17, 31, 32, 33, 100, 4096] {
            for at in [0, 1, 15, 16, 17, 40, len / 2, len.saturating_sub(1)] {
                for end in [b'"', b'\\', 0x00, 0x1f, b'\n', 0x7f, 0xc3] {
                    let mut bytes = "é".repeat(len).into_bytes();
                    bytes.truncate(len);
                    if at < len {
                        bytes[at] = end;
                    }
                    cases.push(bytes.clone());
                    // A control byte before a later delimiter.
                    if at + 3 < len {
                        bytes[at + 3] = b'"';
                        cases.push(bytes);
                    }
                }
            }
        }
        for bytes in &cases {
            assert_eq!(plain_run(bytes), naive(bytes), "{bytes:?}");
        }
    }

    #[test]
    fn a_long_prompt_is_scanned_to_its_end_in_any_split() {
        let prompt = "y".repeat(5000);
        let body = format!(
            r#"{{"messages":[{{"content":"{prompt}\u0041\n"}}],"model":"m","stream":true}}"#
        );
        for cut in [1, 17, 100, 2500, 5020, body.len() - 1] {
            let fields = scan_chunks(body.as_bytes(), &[cut]);
            assert_eq!(fields.model.as_deref(), Some("m"), "cut at {cut}");
            assert!(fields.stream && fields.invalid_at.is_none(), "cut at {cut}");
        }
        // A raw control byte deep in the prompt breaks the JSON there.
        let broken = body.replacen("yyyy\\u0041", "yyy\u{1}\\u0041", 1);
        let at = broken.find('\u{1}').unwrap();
        assert_eq!(scan(broken.as_bytes()).invalid_at, Some(at));
    }

    #[test]
    fn utf8_in_the_model_survives_any_chunk_split() {
        let body = "{\"model\":\"模型-é-😀\",\"stream\":true}".as_bytes();
        for cut in 0..=body.len() {
            assert_eq!(
                summary(&scan_chunks(body, &[cut])),
                found("模型-é-😀", true),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn every_two_way_split_gives_the_same_result() {
        let bodies: [&[u8]; 5] = [
            br#" { "messages" : [ {"role":"user","content":"say \"hi\" \\ \u00e9"} ] , "model" : "gpt-4o-mini" , "stream" : true } "#,
            br#"{"temperature":-1.5e+3,"n":10,"x":[true,false,null,0,0.5,1E2],"model":"m\u00e9\ud83d\ude00"}"#,
            br#"{"mod\u0065l":"esc","stream":false}"#,
            br#"{"a":{"b":[[{"model":"deep"}]]},"stream":true}"#,
            br#"["model","stream"]"#,
        ];
        for body in bodies {
            let whole = scan(body);
            for cut in 0..=body.len() {
                assert_eq!(
                    scan_chunks(body, &[cut]),
                    whole,
                    "cut at {cut} of {}",
                    String::from_utf8_lossy(body)
                );
            }
            let bytewise: Vec<usize> = (1..body.len()).collect();
            assert_eq!(scan_chunks(body, &bytewise), whole);
        }
    }

    /// Strings held whole by a chunk are read in one step
    /// (`whole_string`); fed a byte at a time, no string is, and every byte
    /// takes the steps. Both must agree, whatever the scanner is asked to do.
    #[test]
    fn strings_read_at_once_agree_with_the_byte_steps() {
        let long_model = format!(r#"{{"model":"{}","stream":true}}"#, "m".repeat(1100));
        let bodies: Vec<&[u8]> = vec![
            br#"{"model":"bench","messages":[{"role":"user","content":"hi"}],"stream":false}"#,
            br#"{"model":"a","model":"b","stream":"yes","max_tokens":12,"max_completion_tokens":7}"#,
            br#"{"a_key_longer_than_any_member_name":"x","model":"","stream":true}"#,
            br#"{"prompt":"hash me, hash me, hash me","model":"p"}"#,
            b"{\"model\":\"bad\xff\xfeutf8\",\"stream\":true}",
            b"{\"model\":\"ctl\x01byte\",\"stream\":true}",
            br#"{"x":{"model":"nested","stream":true},"model":"top"} {"#,
            br#"{"messages":[["model"],{"model":"m"}],"model":"last","stream":true}"#,
            br#"{"model":"half"#,
            br#"{"stream":true,"x":[null,false,true,nul],"model":"lit"}"#,
            br#"{"stream":trueish,"model":"x"}"#,
            br#"{"stream":fals"#,
            long_model.as_bytes(),
        ];
        type Make = fn() -> JsonScanner;
        let makers: [(&str, Make); 4] = [
            ("plain", || JsonScanner::new(BIG)),
            ("limited", || JsonScanner::new(20)),
            ("whole object", || JsonScanner::new(BIG).whole_object()),
            ("prompt hashed", || JsonScanner::new(BIG).hash_prompt(4, 4)),
        ];
        let run = |make: Make, body: &[u8], bytewise: bool| {
            let mut scanner = make();
            let chunks: Vec<&[u8]> = match bytewise {
                true => body.chunks(1).collect(),
                false => vec![body],
            };
            for chunk in &chunks {
                if scanner.feed(chunk) == Scan::Done {
                    break;
                }
            }
            let consumed = scanner.consumed();
            let mut fields = scanner.take_fields();
            // Whether the limit cut a chunk depends on the chunks alone.
            fields.truncated = false;
            // The verifier goes on from where the scan stopped.
            scanner.verify_rest();
            scanner.feed(&body[consumed.min(body.len())..]);
            (fields, consumed, scanner.ambiguity(), scanner.fields())
        };
        for body in &bodies {
            for (name, make) in makers {
                assert_eq!(
                    run(make, body, false),
                    run(make, body, true),
                    "{name}: {}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn every_three_way_split_gives_the_same_result() {
        let body = br#"{"model":"a\"\u00e9\ud83d\ude00","stream":true}"#;
        let whole = scan(body);
        for a in 0..=body.len() {
            for b in a..=body.len() {
                assert_eq!(scan_chunks(body, &[a, b]), whole, "cuts at {a}, {b}");
            }
        }
    }

    #[test]
    fn lone_surrogates_spoil_the_model() {
        for body in [
            br#"{"model":"\ud83d","stream":true}"#.as_slice(),
            br#"{"model":"\ude00x","stream":true}"#,
            br#"{"model":"\ud83dx","stream":true}"#,
            br#"{"model":"\ud83d\u0041","stream":true}"#,
        ] {
            let fields = scan(body);
            assert_eq!(
                summary(&fields),
                (None, true, true),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(fields.model_span, None);
        }
    }

    #[test]
    fn invalid_utf8_in_the_model_gives_no_model() {
        let fields = scan(b"{\"model\":\"a\xffb\",\"stream\":true}");
        assert_eq!(summary(&fields), (None, true, true));
    }

    #[test]
    fn stream_is_true_only_for_literal_true() {
        for (body, stream) in [
            (br#"{"model":"m","stream":true}"#.as_slice(), true),
            (br#"{"model":"m","stream":false}"#, false),
            (br#"{"model":"m","stream":null}"#, false),
            (br#"{"model":"m","stream":"true"}"#, false),
            (br#"{"model":"m","stream":1}"#, false),
            (br#"{"model":"m","stream":[true]}"#, false),
            (br#"{"model":"m","stream":{"a":true}}"#, false),
            (br#"{"model":"m"}"#, false),
        ] {
            assert_eq!(
                summary(&scan(body)),
                found("m", stream),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn nested_stream_true_is_ignored() {
        let fields = scan(br#"{"options":{"stream":true},"model":"m"}"#);
        assert_eq!(summary(&fields), found("m", false));
    }

    #[test]
    fn a_non_string_model_gives_no_model() {
        for body in [
            br#"{"model":5,"stream":true}"#.as_slice(),
            br#"{"model":null}"#,
            br#"{"model":["m"]}"#,
            br#"{"model":{"id":"m"}}"#,
        ] {
            let fields = scan(body);
            assert_eq!(fields.model, None, "{}", String::from_utf8_lossy(body));
            assert!(fields.complete);
        }
    }

    #[test]
    fn the_last_model_before_the_decision_wins() {
        let body = br#"{"model":"first","model":"second"}"#;
        let fields = scan(body);
        assert_eq!(fields.model.as_deref(), Some("second"));
        assert_eq!(literal(body, &fields), br#""second""#);
        assert_eq!(scan(br#"{"model":"first","model":5}"#).model, None);
    }

    #[test]
    fn whitespace_is_allowed_wherever_json_allows_it() {
        let body = b" \r\n\t{ \n\"model\"\t:\r\n\"m\" ,\n \"stream\" :\ttrue\n}\n";
        assert_eq!(summary(&scan(body)), found("m", true));
    }

    #[test]
    fn bodies_that_are_not_objects_end_the_scan_at_once() {
        for body in [
            &b"[{\"model\":\"m\"}]"[..],
            b"\"model\"",
            b"42",
            b"null",
            b"true",
            b"  x",
            b"\xef\xbb\xbf{}",
        ] {
            let mut scanner = JsonScanner::new(BIG);
            assert_eq!(
                scanner.feed(body),
                Scan::Done,
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(summary(&scanner.finish()), (None, false, true));
        }
    }

    #[test]
    fn an_empty_body_is_not_complete() {
        let mut scanner = JsonScanner::new(BIG);
        assert_eq!(scanner.feed(b""), Scan::NeedMore);
        assert_eq!(scanner.feed(b"  "), Scan::NeedMore);
        assert_eq!(scanner.finish(), JsonFields::default());
    }

    #[test]
    fn syntax_errors_end_the_scan_with_what_was_found() {
        for body in [
            &br#"{"model":"m", oops"#[..],
            br#"{"model":"m",}"#,
            br#"{"model":"m",,"stream":true}"#,
            br#"{"model":"m" "stream":true}"#,
            br#"{"model":"m","stream" true}"#,
            br#"{"model":"m","stream":tru}"#,
            br#"{"model":"m","stream":True}"#,
            br#"{"model":"m","x":01}"#,
            br#"{"model":"m","x":1.}"#,
            br#"{"model":"m","x":-}"#,
            br#"{"model":"m","x":1e}"#,
            br#"{"model":"m","x":+1}"#,
            br#"{"model":"m","x":[1,]}"#,
            br#"{"model":"m","x":[}"#,
            br#"{"model":"m","x":{]}"#,
            br#"{"model":"m","x":"\q"}"#,
            br#"{"model":"m","x":"\u12G4"}"#,
            b"{\"model\":\"m\",\"x\":\"a\nb\"}",
            br#"{"model":"m"}}"#,
        ] {
            let mut scanner = JsonScanner::new(BIG);
            assert_eq!(
                scanner.feed(body),
                Scan::Done,
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(
                summary(&scanner.finish()),
                found("m", false),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_syntax_error_before_the_model_gives_no_model() {
        for body in [
            &br#"{'model':'m'}"#[..],
            br#"{model:"m"}"#,
            br#"{"a" "model":"m"}"#,
            br#"{"a":1 "model":"m"}"#,
        ] {
            assert_eq!(
                summary(&scan(body)),
                (None, false, true),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn valid_numbers_and_literals_are_skipped() {
        let body = br#"{"a":0,"b":-0,"c":-12.5e-3,"d":1E+2,"e":0.0,"f":[true,false,null],"g":{},"h":[],"i":"","model":"m"}"#;
        assert_eq!(summary(&scan(body)), found("m", false));
    }

    #[test]
    fn a_number_ending_the_stream_value_is_seen_before_the_delimiter() {
        let body = br#"{"model":"m","stream":0 , "x":1}"#;
        let fields = scan(body);
        assert_eq!(summary(&fields), found("m", false));
    }

    #[test]
    fn the_limit_ends_the_scan_incomplete() {
        let body = br#"{"messages":[{"content":"a long prompt"}],"model":"m","stream":true}"#;
        let mut scanner = JsonScanner::new(20);
        assert_eq!(scanner.feed(&body[..10]), Scan::NeedMore);
        assert_eq!(scanner.feed(&body[10..]), Scan::Done);
        assert_eq!(summary(&scanner.finish()), (None, false, false));
    }

    #[test]
    fn the_limit_keeps_what_was_found_before_it() {
        let body = br#"{"model":"m","messages":[{"content":"a long prompt"}],"stream":true}"#;
        let fields = scan_limit(body, 30);
        assert_eq!(summary(&fields), (Some("m".into()), false, false));
        assert_eq!(fields.model_span, Some(9..12));
    }

    #[test]
    fn a_decision_on_the_last_byte_within_the_limit_is_complete() {
        let body = br#"{"model":"m","stream":true}"#;
        assert_eq!(summary(&scan_limit(body, body.len() - 1)), found("m", true));
        assert_eq!(
            summary(&scan_limit(body, body.len() - 2)),
            (Some("m".into()), false, false)
        );
    }

    #[test]
    fn a_zero_limit_is_done_at_once() {
        let mut scanner = JsonScanner::new(0);
        assert_eq!(scanner.feed(b"{}"), Scan::Done);
        assert_eq!(
            scanner.finish(),
            JsonFields {
                truncated: true,
                ..JsonFields::default()
            }
        );
    }

    #[test]
    fn a_truncated_body_keeps_what_was_found() {
        let mut scanner = JsonScanner::new(BIG);
        assert_eq!(
            scanner.feed(br#"{"model":"m","messages":[{"con"#),
            Scan::NeedMore
        );
        assert_eq!(summary(&scanner.finish()), (Some("m".into()), false, false));
    }

    #[test]
    fn a_model_cut_by_the_end_of_the_body_is_not_reported() {
        let mut scanner = JsonScanner::new(BIG);
        scanner.feed(br#"{"model":"gpt-"#);
        assert_eq!(scanner.finish().model, None);
    }

    #[test]
    fn nesting_beyond_the_depth_cap_ends_the_scan() {
        let mut body = br#"{"model":"m","x":"#.to_vec();
        body.extend(std::iter::repeat_n(b'[', MAX_DEPTH + 10));
        let mut scanner = JsonScanner::new(BIG);
        assert_eq!(scanner.feed(&body), Scan::Done);
        assert_eq!(summary(&scanner.finish()), found("m", false));
    }

    #[test]
    fn nesting_up_to_the_depth_cap_is_fine() {
        let depth = MAX_DEPTH - 1;
        let mut body = br#"{"x":"#.to_vec();
        body.extend(std::iter::repeat_n(b'[', depth - 1));
        body.extend(br#"{"model":"no"}"#);
        body.extend(std::iter::repeat_n(b']', depth - 1));
        body.extend(br#","model":"yes"}"#);
        assert_eq!(summary(&scan(&body)), found("yes", false));
    }

    #[test]
    fn a_long_prompt_before_the_model_is_skipped_in_small_chunks() {
        let mut body = br#"{"messages":[{"role":"user","content":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', 100_000));
        body.extend(br#""}],"model":"m","stream":true}"#);
        let mut scanner = JsonScanner::new(BIG);
        for chunk in body.chunks(7) {
            if scanner.feed(chunk) == Scan::Done {
                break;
            }
            assert!(scanner.retained_bytes() < 256);
        }
        assert_eq!(summary(&scanner.finish()), found("m", true));
    }

    #[test]
    fn rewrite_replaces_only_the_model_literal() {
        let body = br#"{"model" : "alias", "stream":true, "x":"model"}"#;
        let fields = scan(body);
        let rewritten = rewrite_json_model(body, fields.model_span.unwrap(), "meta/llama-3");
        assert_eq!(
            &rewritten[..],
            br#"{"model" : "meta/llama-3", "stream":true, "x":"model"}"#
        );
    }

    #[test]
    fn rewrite_escapes_the_new_model() {
        let body = br#"{"model":"\u0061"}"#;
        let span = scan(body).model_span.unwrap();
        let new_model = "we\"ird\\name\n\u{1}é";
        let rewritten = rewrite_json_model(body, span, new_model);
        assert_eq!(
            &rewritten[..],
            "{\"model\":\"we\\\"ird\\\\name\\n\\u0001é\"}".as_bytes()
        );
        assert_eq!(scan(&rewritten).model.as_deref(), Some(new_model));
    }

    #[test]
    fn rewrite_keeps_the_rest_of_a_prefix() {
        let body = br#"{"model":"a","stream":true,"messages":[{"content":"unfinished"#;
        let fields = scan(body);
        let rewritten = rewrite_json_model(body, fields.model_span.unwrap(), "bbb");
        assert_eq!(
            &rewritten[..],
            br#"{"model":"bbb","stream":true,"messages":[{"content":"unfinished"#
        );
    }

    #[test]
    fn rewrite_with_a_span_outside_the_prefix_changes_nothing() {
        assert_eq!(&rewrite_json_model(b"{}", 1..5, "m")[..], b"{}");
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 2..1;
        assert_eq!(&rewrite_json_model(b"{}", reversed, "m")[..], b"{}");
    }

    fn prompt_of(body: &[u8], cuts: &[usize]) -> (Option<PromptPrefix>, usize) {
        let mut scanner = JsonScanner::new(BIG).hash_prompt(16, 8);
        let mut start = 0;
        for &cut in cuts.iter().chain([&body.len()]) {
            if scanner.feed(&body[start..cut]) == Scan::Done {
                break;
            }
            start = cut;
        }
        let consumed = scanner.consumed();
        (scanner.finish().prompt, consumed)
    }

    const SYSTEM: &str = "You are a careful assistant for the billing team of ACME.";

    fn chat(system: &str, question: &str, tail: &str) -> Vec<u8> {
        format!(
            r#"{{"model":"m","stream":true,"messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"{question}"}}]{tail}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn a_shared_system_prompt_hashes_the_same_whatever_the_question_and_the_chunking() {
        let a = chat(SYSTEM, "What is my balance?", "");
        let b = chat(SYSTEM, "Cancel my order 42, please.", r#","n":1"#);
        let (pa, _) = prompt_of(&a, &[]);
        let (pb, _) = prompt_of(&b, &[3, 40, 41, 77]);
        let (pa, pb) = (pa.unwrap(), pb.unwrap());
        // "system" + separator + the 57-byte content: three whole blocks of 16.
        assert_eq!(pa.key(3, 16), pb.key(3, 16));
        assert!(pa.key(3, 16).is_some());
        // Further on, the questions differ.
        assert_ne!(pa.key(8, 16), pb.key(8, 16));
        // A 32-byte block is two granules.
        assert_eq!(pa.key(1, 32), Some(pa.chain[1]));
        assert_eq!(pa.key(1, 24), None, "not a multiple of the granule");
        let other = chat("Arr! You are a pirate.", "What is my balance?", "");
        let (po, _) = prompt_of(&other, &[]);
        assert_ne!(po.unwrap().key(1, 16), pa.key(1, 16));
    }

    #[test]
    fn a_completion_prompt_is_hashed_and_a_short_one_has_no_whole_block() {
        let long =
            br#"{"model":"m","prompt":"0123456789abcdef0123456789abcdef-tail","stream":false}"#;
        let (p, _) = prompt_of(long, &[]);
        assert_eq!(p.as_ref().unwrap().chain.len(), 2);
        let short = br#"{"model":"m","prompt":"hi","stream":false}"#;
        let (p, _) = prompt_of(short, &[]);
        assert_eq!(p.unwrap().key(4, 16), None);
        // No prompt at all: none either, and the scan still ends.
        let (p, _) = prompt_of(br#"{"model":"m","input":"0123456789abcdef0123"}"#, &[]);
        assert_eq!(p.unwrap().key(1, 16), None);
    }

    #[test]
    fn hashing_reads_on_past_the_decision_only_as_far_as_the_prefix_needs() {
        let question = "q".repeat(500);
        let body = chat(SYSTEM, &question, "");
        // As a client sends it, in small chunks: no chunk past the
        // prefix is asked for.
        let cuts: Vec<usize> = (1..body.len() / 16).map(|i| i * 16).collect();
        let (p, consumed) = prompt_of(&body, &cuts);
        assert_eq!(p.unwrap().chain.len(), 8, "eight granules, no more");
        assert!(consumed < 250, "stopped at {consumed} of {}", body.len());
        // Without hashing it stops at the decision, before `messages`.
        let mut plain = JsonScanner::new(BIG);
        assert_eq!(plain.feed(&body), Scan::Done);
        assert!(plain.consumed() < 30);
        assert_eq!(plain.finish().prompt, None);
        // Hashing keeps within the scan's limit.
        let mut limited = JsonScanner::new(60).hash_prompt(16, 8);
        assert_eq!(limited.feed(&body), Scan::Done);
        assert_eq!(limited.consumed(), 60);
    }

    #[test]
    fn keys_and_strings_outside_the_prompt_are_not_hashed() {
        let a = br#"{"model":"m","messages":[{"role":"user","content":"0123456789abcdef0123456789abcdef"}],"user":"alice"}"#;
        let b = br#"{"user":"bob","messages":[{"content":"0123456789abcdef0123456789abcdef","role":"user"}],"model":"m"}"#;
        let (pa, _) = prompt_of(a, &[]);
        let (pb, _) = prompt_of(b, &[]);
        // Different member order inside a message changes the bytes hashed
        // (role before content or after); the keys themselves never count.
        let c = br#"{"model":"m","messages":[{"ROLE":"user","CONTENT":"0123456789abcdef0123456789abcdef"}]}"#;
        let (pc, _) = prompt_of(c, &[]);
        assert_eq!(pa, pc);
        assert_ne!(pa, pb);
    }
}
