//! Partial decode of the first gRPC message of a request for its model name.
//!
//! KServe's `ModelInferRequest.model_name`, `ModelReadyRequest.name` and
//! `ModelMetadataRequest.name` are all field 1. Serializers write fields in
//! number order, so field 1 is normally the first bytes after the frame header
//! and the scan ends there, however large the tensors that follow.

use std::ops::Range;

use bytes::Bytes;
use prost::encoding::{decode_key, decode_varint, encode_key, encode_varint, WireType};

use super::{Ambiguity, Scan};

/// gRPC length-prefixed message header: compressed flag (u8), length (u32 BE).
const HEADER_LEN: usize = 5;

/// The longest protobuf varint.
const MAX_VARINT_LEN: usize = 10;

/// The field number of the model name.
const MODEL_FIELD: u32 = 1;

/// Reads the first gRPC message of a request body until it finds field 1.
///
/// ```
/// # use infermesh_proxy::classify::{GrpcModelScanner, Scan};
/// let body = [0, 0, 0, 0, 8, 0x0a, 6, b'r', b'e', b's', b'n', b'e', b't'];
/// let mut scanner = GrpcModelScanner::new(64 * 1024);
/// assert_eq!(scanner.feed(&body[..7]), Scan::NeedMore);
/// assert_eq!(scanner.feed(&body[7..]), Scan::Done);
/// assert_eq!(scanner.finish().model.as_deref(), Some("resnet"));
/// ```
#[derive(Debug)]
pub struct GrpcModelScanner {
    limit: usize,
    /// Bytes consumed so far: the body offset of the next byte.
    consumed: usize,
    state: State,
    /// The frame header or a varint split across chunks.
    carry: [u8; MAX_VARINT_LEN],
    carry_len: usize,
    /// Body offset where the first message ends.
    message_end: usize,
    /// Body offset of the key of the field being read.
    field_start: usize,
    model_buf: Vec<u8>,
    fields: GrpcFields,
}

/// What a [`GrpcModelScanner`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrpcFields {
    /// Field 1 of the first message, when it is valid UTF-8.
    pub model: Option<String>,
    /// The body byte range of the whole field 1: key, length and bytes.
    pub field_span: Option<Range<usize>>,
    /// The first message's length, from its frame header.
    pub frame_len: Option<u32>,
    /// Whether the first message is compressed (then it is not decoded).
    pub compressed: bool,
    /// The scan gave up on something it cannot decode before field 1 (a
    /// group, a wrong wire type, a broken varint or length): a protobuf
    /// decoder upstream may still find a model there.
    pub undecodable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading the 5-byte frame header.
    Header,
    /// Reading a field key.
    Key,
    /// Reading the length of a length-delimited field.
    Length {
        model: bool,
    },
    /// Skipping a varint value.
    Varint,
    /// Skipping a fixed-size or length-delimited value.
    Skip {
        remaining: usize,
    },
    /// Reading the model name.
    Model {
        remaining: usize,
    },
    Done,
}

// === impl GrpcModelScanner ===

impl GrpcModelScanner {
    /// A scanner that reads at most `limit` bytes of the body.
    pub fn new(limit: usize) -> Self {
        GrpcModelScanner {
            limit,
            consumed: 0,
            state: State::Header,
            carry: [0; MAX_VARINT_LEN],
            carry_len: 0,
            message_end: 0,
            field_start: 0,
            model_buf: Vec::new(),
            fields: GrpcFields::default(),
        }
    }

    /// Feeds the next chunk; `Done` once field 1 is read, the first message
    /// ended without it, the message is compressed or malformed, or `limit`
    /// bytes were consumed.
    pub fn feed(&mut self, chunk: &[u8]) -> Scan {
        let mut data = &chunk[..chunk.len().min(self.limit - self.consumed)];
        while !data.is_empty() && self.state != State::Done {
            let n = self.step(data);
            data = &data[n..];
            self.consumed += n;
            if self.state != State::Header && self.consumed == self.message_end {
                // The message ended, cleanly between fields or inside a truncated one.
                self.state = State::Done;
            }
        }
        if self.consumed >= self.limit {
            self.state = State::Done;
        }
        if self.state == State::Done {
            Scan::Done
        } else {
            Scan::NeedMore
        }
    }

    /// What was found; also valid when the body ended before `Done`.
    pub fn finish(self) -> GrpcFields {
        self.fields
    }

    /// What was found so far.
    pub fn fields(&self) -> GrpcFields {
        self.fields.clone()
    }

    /// Bytes the scanner holds: its carry buffer and the model name being or already read.
    #[cfg(test)]
    pub(crate) fn retained_bytes(&self) -> usize {
        self.carry.len()
            + self.model_buf.capacity()
            + self.fields.model.as_ref().map_or(0, String::capacity)
    }

    /// Consumes a prefix of `data` (at least one byte) in the current state.
    fn step(&mut self, data: &[u8]) -> usize {
        let data = match self.state {
            State::Header => data,
            // Nothing of a field may lie past the end of the message.
            _ => &data[..data.len().min(self.message_end - self.consumed)],
        };
        match self.state {
            State::Header => {
                let n = (HEADER_LEN - self.carry_len).min(data.len());
                self.carry[self.carry_len..self.carry_len + n].copy_from_slice(&data[..n]);
                self.carry_len += n;
                if self.carry_len == HEADER_LEN {
                    self.header();
                }
                n
            }
            State::Key | State::Length { .. } | State::Varint => {
                let mut n = 0;
                for &b in data {
                    if self.carry_len == MAX_VARINT_LEN {
                        self.give_up();
                        break;
                    }
                    self.carry[self.carry_len] = b;
                    self.carry_len += 1;
                    n += 1;
                    if b < 0x80 {
                        self.varint_complete(self.consumed + n);
                        break;
                    }
                }
                n
            }
            State::Skip { remaining } => {
                let n = remaining.min(data.len());
                self.state = match remaining - n {
                    0 => self.next_field(self.consumed + n),
                    remaining => State::Skip { remaining },
                };
                n
            }
            State::Model { remaining } => {
                let n = remaining.min(data.len());
                self.model_buf.extend_from_slice(&data[..n]);
                if remaining == n {
                    self.model_complete(self.consumed + n);
                } else {
                    self.state = State::Model {
                        remaining: remaining - n,
                    };
                }
                n
            }
            State::Done => data.len(),
        }
    }

    /// Gives up on a message it cannot decode, saying so.
    fn undecodable(&mut self) -> State {
        self.fields.undecodable = true;
        State::Done
    }

    fn give_up(&mut self) {
        self.state = self.undecodable();
    }

    fn header(&mut self) {
        let flag = self.carry[0];
        let len = u32::from_be_bytes([self.carry[1], self.carry[2], self.carry[3], self.carry[4]]);
        self.carry_len = 0;
        self.fields.frame_len = Some(len);
        self.fields.compressed = flag & 1 == 1;
        if flag != 0 {
            // Compressed, or a flag gRPC does not define: nothing to decode.
            self.state = State::Done;
            return;
        }
        self.message_end = HEADER_LEN.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
        self.state = self.next_field(HEADER_LEN);
    }

    fn next_field(&mut self, at: usize) -> State {
        self.field_start = at;
        State::Key
    }

    /// A varint ended at body offset `end`.
    fn varint_complete(&mut self, end: usize) {
        let mut raw = &self.carry[..self.carry_len];
        self.carry_len = 0;
        self.state = match self.state {
            State::Key => match decode_key(&mut raw) {
                Ok((MODEL_FIELD, WireType::LengthDelimited)) => State::Length { model: true },
                // Field 1 of another wire type is malformed for every request we read.
                Ok((MODEL_FIELD, _)) => self.undecodable(),
                Ok((_, WireType::Varint)) => State::Varint,
                Ok((_, WireType::SixtyFourBit)) => State::Skip { remaining: 8 },
                Ok((_, WireType::ThirtyTwoBit)) => State::Skip { remaining: 4 },
                Ok((_, WireType::LengthDelimited)) => State::Length { model: false },
                // Groups are long deprecated and need nesting to skip; give up.
                Ok((_, WireType::StartGroup | WireType::EndGroup)) | Err(_) => self.undecodable(),
            },
            State::Length { model } => match decode_varint(&mut raw) {
                Ok(len) => self.length_complete(len, model, end),
                Err(_) => self.undecodable(),
            },
            State::Varint => match decode_varint(&mut raw) {
                Ok(_) => self.next_field(end),
                Err(_) => self.undecodable(),
            },
            state => state,
        };
    }

    /// The length of a length-delimited field whose bytes start at body offset `start`.
    fn length_complete(&mut self, len: u64, model: bool, start: usize) -> State {
        let in_message = (self.message_end - start) as u64;
        if len > in_message {
            return self.undecodable();
        }
        // `len` fits in the message, hence in usize.
        let len = len as usize;
        if !model {
            return match len {
                0 => self.next_field(start),
                remaining => State::Skip { remaining },
            };
        }
        if start + len > self.limit {
            // The name cannot be read within the limit; do not start buffering it.
            return State::Done;
        }
        self.model_buf.reserve_exact(len);
        if len == 0 {
            self.model_complete(start);
            return State::Done;
        }
        State::Model { remaining: len }
    }

    /// The model name ended at body offset `end`.
    fn model_complete(&mut self, end: usize) {
        let raw = std::mem::take(&mut self.model_buf);
        if let Ok(model) = String::from_utf8(raw) {
            self.fields.model = Some(model);
            self.fields.field_span = Some(self.field_start..end);
        }
        self.state = State::Done;
    }
}

impl GrpcModelScanner {
    /// Body bytes consumed so far: the offset of the first byte not scanned.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// A verifier of the rest of the body, from where the scan stopped,
    /// when the scan found the model in an uncompressed first message.
    pub fn into_verifier(self) -> Option<GrpcVerifier> {
        let model = self.fields.model?;
        if self.fields.compressed || self.fields.field_span.is_none() {
            return None;
        }
        let left = self.message_end.saturating_sub(self.consumed);
        Some(GrpcVerifier {
            expected: model.into_bytes(),
            state: if left == 0 {
                VerifyState::Header
            } else {
                VerifyState::Key
            },
            left,
            carry: [0; MAX_VARINT_LEN],
            carry_len: 0,
            offset: self.consumed,
            problem: None,
        })
    }
}

/// Follows the rest of a gRPC request body after its model was read from
/// field 1 of the first message, and finds any message (the first one
/// included) whose field 1 names another model: protobuf decoders keep the
/// last value of a repeated field, and each message of a stream names its
/// own model, so either would reach the server as a model that routing and
/// authorization never saw. Compressed messages cannot be read and count as
/// such a problem too. Memory is fixed; bytes are looked at, never copied.
#[derive(Debug)]
pub struct GrpcVerifier {
    expected: Vec<u8>,
    state: VerifyState,
    /// Bytes left in the current message (meaningless in `Header`).
    left: usize,
    carry: [u8; MAX_VARINT_LEN],
    carry_len: usize,
    /// Body offset of the next byte.
    offset: usize,
    problem: Option<Ambiguity>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VerifyState {
    Header,
    Key,
    Length {
        model: bool,
    },
    Varint,
    Skip {
        remaining: usize,
    },
    /// Comparing a field 1 value with the expected model: `at` bytes matched.
    Compare {
        at: usize,
        remaining: usize,
    },
    Failed,
}

impl GrpcVerifier {
    /// Checks the next chunk of the body; the reason once a message names
    /// another model, is compressed or cannot be decoded.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), Ambiguity> {
        let mut data = chunk;
        while !data.is_empty() && self.problem.is_none() {
            let in_message = self.state != VerifyState::Header;
            let n = self.step(data);
            data = &data[n..];
            self.offset += n;
            if in_message && self.problem.is_none() && self.left == 0 {
                self.end_of_message();
            }
        }
        match &self.problem {
            Some(problem) => Err(problem.clone()),
            None => Ok(()),
        }
    }

    fn fail(&mut self, why: &'static str) {
        self.fail_with(Ambiguity::MalformedGrpc {
            what: why,
            at: self.offset,
        });
    }

    fn fail_with(&mut self, problem: Ambiguity) {
        self.problem = Some(problem);
        self.state = VerifyState::Failed;
    }

    fn end_of_message(&mut self) {
        match self.state {
            VerifyState::Key if self.carry_len == 0 => self.state = VerifyState::Header,
            _ => self.fail("a gRPC message ends inside a field"),
        }
    }

    /// Consumes a prefix of `data` (at least one byte).
    fn step(&mut self, data: &[u8]) -> usize {
        let data = match self.state {
            VerifyState::Header => data,
            _ => &data[..data.len().min(self.left)],
        };
        match self.state {
            VerifyState::Header => {
                let n = (HEADER_LEN - self.carry_len).min(data.len());
                self.carry[self.carry_len..self.carry_len + n].copy_from_slice(&data[..n]);
                self.carry_len += n;
                if self.carry_len == HEADER_LEN {
                    self.carry_len = 0;
                    let flag = self.carry[0];
                    let len = u32::from_be_bytes([
                        self.carry[1],
                        self.carry[2],
                        self.carry[3],
                        self.carry[4],
                    ]);
                    if flag != 0 {
                        self.fail_with(Ambiguity::Compressed(self.offset));
                        return n;
                    }
                    self.left = len as usize;
                    // An empty message names no model: the next header follows.
                    self.state = if len == 0 {
                        VerifyState::Header
                    } else {
                        VerifyState::Key
                    };
                }
                n
            }
            VerifyState::Key | VerifyState::Length { .. } | VerifyState::Varint => {
                let mut n = 0;
                for &b in data {
                    if self.carry_len == MAX_VARINT_LEN {
                        self.fail("a malformed varint in a gRPC message");
                        return n;
                    }
                    self.carry[self.carry_len] = b;
                    self.carry_len += 1;
                    n += 1;
                    if b < 0x80 {
                        self.left -= n;
                        self.varint_complete();
                        return n;
                    }
                }
                self.left -= n;
                n
            }
            VerifyState::Skip { remaining } => {
                let n = remaining.min(data.len());
                self.left -= n;
                self.state = match remaining - n {
                    0 => VerifyState::Key,
                    remaining => VerifyState::Skip { remaining },
                };
                n
            }
            VerifyState::Compare { at, remaining } => {
                let n = remaining.min(data.len());
                self.left -= n;
                if self.expected.get(at..at + n) != Some(&data[..n]) {
                    self.fail_with(Ambiguity::OtherModel(self.offset));
                    return n;
                }
                self.state = match remaining - n {
                    0 => VerifyState::Key,
                    remaining => VerifyState::Compare {
                        at: at + n,
                        remaining,
                    },
                };
                n
            }
            VerifyState::Failed => data.len(),
        }
    }

    fn varint_complete(&mut self) {
        let mut raw = &self.carry[..self.carry_len];
        self.carry_len = 0;
        self.state = match self.state {
            VerifyState::Key => match decode_key(&mut raw) {
                Ok((MODEL_FIELD, WireType::LengthDelimited)) => VerifyState::Length { model: true },
                Ok((MODEL_FIELD, _)) => {
                    return self.fail("field 1 of a gRPC message has the wrong wire type")
                }
                Ok((_, WireType::Varint)) => VerifyState::Varint,
                Ok((_, WireType::SixtyFourBit)) => VerifyState::Skip { remaining: 8 },
                Ok((_, WireType::ThirtyTwoBit)) => VerifyState::Skip { remaining: 4 },
                Ok((_, WireType::LengthDelimited)) => VerifyState::Length { model: false },
                Ok((_, WireType::StartGroup | WireType::EndGroup)) | Err(_) => {
                    return self.fail("a gRPC message that cannot be decoded")
                }
            },
            VerifyState::Length { model } => match decode_varint(&mut raw) {
                Ok(len) if len > self.left as u64 => {
                    return self.fail("a field longer than its gRPC message")
                }
                Ok(len) => {
                    let len = len as usize;
                    match (model, len) {
                        (true, len) if len != self.expected.len() => {
                            return self.fail_with(Ambiguity::OtherModel(self.offset))
                        }
                        (_, 0) => VerifyState::Key,
                        (true, remaining) => VerifyState::Compare { at: 0, remaining },
                        (false, remaining) => VerifyState::Skip { remaining },
                    }
                }
                Err(_) => return self.fail("a malformed varint in a gRPC message"),
            },
            VerifyState::Varint => match decode_varint(&mut raw) {
                Ok(_) => VerifyState::Key,
                Err(_) => return self.fail("a malformed varint in a gRPC message"),
            },
            state => state,
        };
    }
}

/// Returns `prefix` with field 1 of the first message replaced by `new_model`
/// and the frame length adjusted; `None` when the field is not inside `prefix`.
pub fn rewrite_grpc_model(prefix: &[u8], fields: &GrpcFields, new_model: &str) -> Option<Bytes> {
    let span = fields.field_span.clone()?;
    let frame_len = fields.frame_len?;
    let message_end = HEADER_LEN.saturating_add(usize::try_from(frame_len).ok()?);
    if fields.compressed
        || prefix.first() != Some(&0)
        || span.start < HEADER_LEN
        || span.start > span.end
        || span.end > prefix.len()
        || span.end > message_end
    {
        return None;
    }
    let mut field = Vec::with_capacity(new_model.len() + 1 + MAX_VARINT_LEN);
    encode_key(MODEL_FIELD, WireType::LengthDelimited, &mut field);
    encode_varint(new_model.len() as u64, &mut field);
    field.extend_from_slice(new_model.as_bytes());
    let new_len =
        u32::try_from(u64::from(frame_len) - span.len() as u64 + field.len() as u64).ok()?;

    let mut out = Vec::with_capacity(prefix.len() - span.len() + field.len());
    out.push(0);
    out.extend_from_slice(&new_len.to_be_bytes());
    out.extend_from_slice(&prefix[HEADER_LEN..span.start]);
    out.extend_from_slice(&field);
    out.extend_from_slice(&prefix[span.end..]);
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    const BIG: usize = 1 << 20;

    /// The fields of KServe's `ModelInferRequest` that matter here.
    #[derive(Clone, PartialEq, prost::Message)]
    struct ModelInferRequest {
        #[prost(string, tag = "1")]
        model_name: String,
        #[prost(string, tag = "2")]
        model_version: String,
        #[prost(string, tag = "3")]
        id: String,
        #[prost(bytes = "vec", repeated, tag = "7")]
        raw_input_contents: Vec<Vec<u8>>,
    }

    fn infer(model: &str) -> ModelInferRequest {
        ModelInferRequest {
            model_name: model.into(),
            model_version: "1".into(),
            id: "req-42".into(),
            raw_input_contents: vec![vec![7; 300]],
        }
    }

    fn frame(flag: u8, message: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    fn field_bytes(tag: u32, value: &[u8], out: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(value.len() as u64, out);
        out.extend_from_slice(value);
    }

    fn scan(body: &[u8]) -> GrpcFields {
        scan_limit(body, BIG)
    }

    fn scan_limit(body: &[u8], limit: usize) -> GrpcFields {
        let mut scanner = GrpcModelScanner::new(limit);
        scanner.feed(body);
        scanner.finish()
    }

    fn scan_chunks(body: &[u8], cuts: &[usize]) -> GrpcFields {
        let mut scanner = GrpcModelScanner::new(BIG);
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
    fn model_name_is_read_from_a_model_infer_request() {
        let body = frame(0, &infer("resnet").encode_to_vec());
        let fields = scan(&body);
        assert_eq!(fields.model.as_deref(), Some("resnet"));
        assert_eq!(fields.field_span, Some(5..13));
        assert_eq!(fields.frame_len, Some(body.len() as u32 - 5));
        assert!(!fields.compressed);
    }

    #[test]
    fn scan_is_done_right_after_field_one() {
        let body = frame(0, &infer("resnet").encode_to_vec());
        let mut scanner = GrpcModelScanner::new(BIG);
        assert_eq!(scanner.feed(&body[..12]), Scan::NeedMore);
        assert_eq!(scanner.feed(&body[12..13]), Scan::Done);
        assert_eq!(scanner.feed(&body[13..]), Scan::Done);
        assert_eq!(scanner.finish().model.as_deref(), Some("resnet"));
    }

    #[test]
    fn every_split_of_a_message_gives_the_same_result() {
        let mut message = Vec::new();
        encode_key(4, WireType::Varint, &mut message);
        encode_varint(300_000, &mut message);
        encode_key(5, WireType::SixtyFourBit, &mut message);
        message.extend_from_slice(&[1; 8]);
        encode_key(6, WireType::ThirtyTwoBit, &mut message);
        message.extend_from_slice(&[2; 4]);
        field_bytes(300, &[3; 200], &mut message);
        field_bytes(1, "mödel-é".as_bytes(), &mut message);
        let body = frame(0, &message);
        let whole = scan(&body);
        assert_eq!(whole.model.as_deref(), Some("mödel-é"));
        for cut in 0..=body.len() {
            assert_eq!(scan_chunks(&body, &[cut]), whole, "cut at {cut}");
        }
        for a in (0..body.len()).step_by(3) {
            for b in (a..body.len()).step_by(5) {
                assert_eq!(scan_chunks(&body, &[a, b]), whole, "cuts at {a}, {b}");
            }
        }
        let bytewise: Vec<usize> = (1..body.len()).collect();
        assert_eq!(scan_chunks(&body, &bytewise), whole);
    }

    #[test]
    fn field_one_after_other_fields_is_found_with_its_span() {
        let mut message = Vec::new();
        field_bytes(2, b"v1", &mut message);
        field_bytes(3, b"id", &mut message);
        let start = 5 + message.len();
        field_bytes(1, b"bert", &mut message);
        field_bytes(7, &[0; 50], &mut message);
        let body = frame(0, &message);
        let fields = scan(&body);
        assert_eq!(fields.model.as_deref(), Some("bert"));
        assert_eq!(fields.field_span, Some(start..start + 6));
    }

    #[test]
    fn the_first_field_one_wins() {
        let mut message = Vec::new();
        field_bytes(1, b"first", &mut message);
        field_bytes(1, b"second", &mut message);
        assert_eq!(scan(&frame(0, &message)).model.as_deref(), Some("first"));
    }

    #[test]
    fn a_non_canonical_key_is_decoded_and_spanned() {
        // Field 1, wire type 2, encoded in two bytes.
        let message = [0x8a, 0x00, 2, b'm', b'x'];
        let fields = scan(&frame(0, &message));
        assert_eq!(fields.model.as_deref(), Some("mx"));
        assert_eq!(fields.field_span, Some(5..10));
    }

    #[test]
    fn model_ready_and_metadata_requests_name_the_model_in_field_one() {
        #[derive(Clone, PartialEq, prost::Message)]
        struct ModelReadyRequest {
            #[prost(string, tag = "1")]
            name: String,
            #[prost(string, tag = "2")]
            version: String,
        }
        let request = ModelReadyRequest {
            name: "densenet".into(),
            version: "2".into(),
        };
        assert_eq!(
            scan(&frame(0, &request.encode_to_vec())).model.as_deref(),
            Some("densenet")
        );
    }

    #[test]
    fn compressed_messages_are_not_decoded() {
        let body = frame(1, &infer("resnet").encode_to_vec());
        let mut scanner = GrpcModelScanner::new(BIG);
        assert_eq!(scanner.feed(&body[..5]), Scan::Done);
        let fields = scanner.finish();
        assert_eq!(fields.model, None);
        assert!(fields.compressed);
        assert_eq!(fields.frame_len, Some(body.len() as u32 - 5));
    }

    #[test]
    fn undefined_flags_end_the_scan_without_a_model() {
        let fields = scan(&frame(0x80, &infer("resnet").encode_to_vec()));
        assert_eq!(fields.model, None);
        assert!(!fields.compressed);
    }

    #[test]
    fn a_message_without_field_one_ends_at_its_length() {
        let mut message = Vec::new();
        field_bytes(2, b"v1", &mut message);
        let mut body = frame(0, &message);
        let mut next = Vec::new();
        field_bytes(1, b"next-message", &mut next);
        body.extend(frame(0, &next));
        let mut scanner = GrpcModelScanner::new(BIG);
        assert_eq!(scanner.feed(&body[..5 + message.len()]), Scan::Done);
        assert_eq!(scanner.finish().model, None);
        assert_eq!(scan(&body).model, None);
    }

    #[test]
    fn an_empty_message_has_no_model() {
        let mut scanner = GrpcModelScanner::new(BIG);
        assert_eq!(scanner.feed(&[0, 0, 0, 0, 0]), Scan::Done);
        let fields = scanner.finish();
        assert_eq!(fields.model, None);
        assert_eq!(fields.frame_len, Some(0));
    }

    #[test]
    fn an_empty_model_name_is_reported_as_empty() {
        let fields = scan(&frame(0, &[0x0a, 0]));
        assert_eq!(fields.model.as_deref(), Some(""));
        assert_eq!(fields.field_span, Some(5..7));
    }

    #[test]
    fn a_huge_frame_is_walked_without_buffering() {
        // A 4 GiB message whose first field is a 100 KiB tensor, fed in small chunks.
        let mut message = Vec::new();
        encode_key(7, WireType::LengthDelimited, &mut message);
        encode_varint(100_000, &mut message);
        message.extend(std::iter::repeat_n(9, 100_000));
        field_bytes(1, b"big", &mut message);
        let mut body = vec![0];
        body.extend_from_slice(&u32::MAX.to_be_bytes());
        body.extend_from_slice(&message);
        let mut scanner = GrpcModelScanner::new(BIG);
        for chunk in body.chunks(1000) {
            assert!(scanner.retained_bytes() <= MAX_VARINT_LEN);
            if scanner.feed(chunk) == Scan::Done {
                break;
            }
        }
        let fields = scanner.finish();
        assert_eq!(fields.model.as_deref(), Some("big"));
        assert_eq!(fields.frame_len, Some(u32::MAX));
    }

    #[test]
    fn the_limit_ends_the_scan_before_a_late_field_one() {
        let mut message = Vec::new();
        field_bytes(7, &[0; 5000], &mut message);
        field_bytes(1, b"late", &mut message);
        let mut scanner = GrpcModelScanner::new(1024);
        let body = frame(0, &message);
        let mut done_at = None;
        for (i, chunk) in body.chunks(100).enumerate() {
            if scanner.feed(chunk) == Scan::Done {
                done_at = Some(i);
                break;
            }
        }
        assert_eq!(done_at, Some(10));
        assert_eq!(scanner.finish().model, None);
    }

    #[test]
    fn a_model_name_crossing_the_limit_is_not_buffered() {
        let mut message = Vec::new();
        field_bytes(1, &[b'a'; 2000], &mut message);
        let mut scanner = GrpcModelScanner::new(1024);
        assert_eq!(scanner.feed(&frame(0, &message)[..10]), Scan::Done);
        assert!(scanner.retained_bytes() <= MAX_VARINT_LEN);
        assert_eq!(scanner.finish().model, None);
    }

    #[test]
    fn a_model_name_ending_exactly_at_the_limit_is_read() {
        let body = frame(0, &[0x0a, 3, b'a', b'b', b'c']);
        assert_eq!(scan_limit(&body, body.len()).model.as_deref(), Some("abc"));
        assert_eq!(scan_limit(&body, body.len() - 1).model, None);
    }

    #[test]
    fn invalid_utf8_gives_no_model() {
        let fields = scan(&frame(0, &[0x0a, 2, 0xff, 0xfe]));
        assert_eq!(fields.model, None);
        assert_eq!(fields.field_span, None);
    }

    #[test]
    fn field_one_longer_than_the_message_is_malformed() {
        let mut body = frame(0, &[0x0a, 10, b'a']);
        body.extend_from_slice(b"bcdefghij");
        assert_eq!(scan(&body).model, None);
    }

    #[test]
    fn a_field_crossing_the_message_end_is_malformed() {
        for message in [&[0x20, 0x80][..], &[0x29, 1, 2, 3], &[0x12, 5, 1], &[0x80]] {
            let mut body = frame(0, message);
            body.extend_from_slice(&[0x0a, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 0]);
            let mut scanner = GrpcModelScanner::new(BIG);
            assert_eq!(scanner.feed(&body), Scan::Done, "{message:?}");
            assert_eq!(scanner.finish().model, None, "{message:?}");
        }
    }

    #[test]
    fn groups_end_the_scan() {
        for key in [0x1b, 0x1c] {
            let fields = scan(&frame(0, &[key, 0x0a, 1, b'x']));
            assert_eq!(fields.model, None);
        }
    }

    #[test]
    fn field_one_of_another_wire_type_ends_the_scan() {
        assert_eq!(scan(&frame(0, &[0x08, 1, 0x0a, 1, b'x'])).model, None);
    }

    #[test]
    fn invalid_keys_and_varints_end_the_scan() {
        for message in [
            &[0x02, 0x0a, 1, b'x'][..],
            &[0x0e, 0x0a, 1, b'x'],
            &[0xff; 12],
            &[
                0x20, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ] {
            let mut scanner = GrpcModelScanner::new(BIG);
            assert_eq!(scanner.feed(&frame(0, message)), Scan::Done, "{message:?}");
            assert_eq!(scanner.finish().model, None);
        }
    }

    #[test]
    fn a_truncated_body_keeps_the_frame_length() {
        let body = frame(0, &infer("resnet").encode_to_vec());
        let mut scanner = GrpcModelScanner::new(BIG);
        assert_eq!(scanner.feed(&body[..9]), Scan::NeedMore);
        let fields = scanner.finish();
        assert_eq!(fields.model, None);
        assert_eq!(fields.frame_len, Some(body.len() as u32 - 5));

        let mut scanner = GrpcModelScanner::new(BIG);
        assert_eq!(scanner.feed(&body[..3]), Scan::NeedMore);
        assert_eq!(scanner.finish(), GrpcFields::default());
    }

    #[test]
    fn rewrite_replaces_field_one_and_fixes_the_frame_length() {
        for new_model in ["x", "resnet", &"long-name-".repeat(20)] {
            let request = infer("resnet");
            let body = frame(0, &request.encode_to_vec());
            let fields = scan(&body);
            let rewritten = rewrite_grpc_model(&body, &fields, new_model).unwrap();
            let len = u32::from_be_bytes(rewritten[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, rewritten.len() - 5);
            let decoded = ModelInferRequest::decode(&rewritten[5..]).unwrap();
            assert_eq!(
                decoded,
                ModelInferRequest {
                    model_name: new_model.into(),
                    ..request
                }
            );
            assert_eq!(scan(&rewritten).model.as_deref(), Some(new_model));
        }
    }

    #[test]
    fn rewrite_keeps_bytes_after_the_first_message() {
        let mut body = frame(0, &infer("a").encode_to_vec());
        let first_len = body.len();
        let second = frame(0, &infer("untouched").encode_to_vec());
        body.extend_from_slice(&second);
        let rewritten = rewrite_grpc_model(&body, &scan(&body), "bbb").unwrap();
        assert_eq!(rewritten.len(), body.len() + 2);
        assert_eq!(&rewritten[first_len + 2..], &second[..]);
    }

    #[test]
    fn rewrite_of_a_partial_prefix_keeps_the_full_frame_length() {
        let body = frame(0, &infer("resnet").encode_to_vec());
        let fields = scan(&body);
        let prefix = &body[..20];
        let rewritten = rewrite_grpc_model(prefix, &fields, "densenet").unwrap();
        let len = u32::from_be_bytes(rewritten[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, body.len() - 5 + 2);
        assert_eq!(rewritten.len(), prefix.len() + 2);
    }

    #[test]
    fn rewrite_needs_the_field_inside_the_prefix() {
        let body = frame(0, &infer("resnet").encode_to_vec());
        let fields = scan(&body);
        assert_eq!(rewrite_grpc_model(&body[..12], &fields, "x"), None);
        assert_eq!(rewrite_grpc_model(&body, &GrpcFields::default(), "x"), None);
        let compressed = GrpcFields {
            compressed: true,
            ..fields.clone()
        };
        assert_eq!(rewrite_grpc_model(&body, &compressed, "x"), None);
    }

    /// The verdict of a verifier over `body` after a scan that stopped at
    /// the first field 1, fed in pieces split at every `step` bytes.
    fn verdict(body: &[u8], step: usize) -> Result<(), String> {
        verdict_of(body, step).map_err(|a| a.to_string())
    }

    fn verdict_of(body: &[u8], step: usize) -> Result<(), Ambiguity> {
        let mut scanner = GrpcModelScanner::new(BIG);
        scanner.feed(body);
        let consumed = scanner.consumed();
        let mut verifier = scanner.into_verifier().expect("a model was read");
        for piece in body[consumed..].chunks(step.max(1)) {
            verifier.feed(piece)?;
        }
        Ok(())
    }

    fn message_with_models(models: &[&str]) -> Vec<u8> {
        let mut message = Vec::new();
        for (i, model) in models.iter().enumerate() {
            field_bytes(1, model.as_bytes(), &mut message);
            field_bytes(7, &[i as u8; 40], &mut message);
        }
        message
    }

    #[test]
    fn a_repeated_model_field_naming_another_model_is_found() {
        for step in [1, 3, 7, 1000] {
            let body = frame(0, &message_with_models(&["allowed", "forbidden"]));
            let why = verdict(&body, step).unwrap_err();
            assert!(why.contains("another model"), "{why}");
            // The same name again is what the scan saw.
            let body = frame(0, &message_with_models(&["allowed", "allowed"]));
            assert_eq!(verdict(&body, step), Ok(()));
        }
    }

    #[test]
    fn every_message_of_a_stream_must_name_the_first_model() {
        let first = frame(0, &infer("allowed").encode_to_vec());
        for step in [1, 2, 5, 64, 4096] {
            let mut same = first.clone();
            same.extend(frame(0, &infer("allowed").encode_to_vec()));
            same.extend(frame(0, &[]));
            // A message without field 1 names no model of its own.
            same.extend(frame(0, &{
                let mut m = Vec::new();
                field_bytes(7, b"tensor", &mut m);
                m
            }));
            assert_eq!(verdict(&same, step), Ok(()), "step {step}");
            let mut other = first.clone();
            other.extend(frame(0, &infer("forbidden").encode_to_vec()));
            assert!(verdict(&other, step).unwrap_err().contains("another model"));
            // A longer name that starts the same is another name.
            let mut longer = first.clone();
            longer.extend(frame(0, &infer("allowed-too").encode_to_vec()));
            assert!(verdict(&longer, step).is_err());
            let mut compressed = first.clone();
            compressed.extend(frame(1, &infer("allowed").encode_to_vec()));
            assert!(verdict(&compressed, step)
                .unwrap_err()
                .contains("compressed"));
        }
    }

    #[test]
    fn a_malformed_later_message_is_refused() {
        let mut body = frame(0, &infer("m").encode_to_vec());
        // A length-delimited field longer than its message.
        body.extend(frame(0, &[0x3a, 0x7f, 1, 2]));
        assert!(verdict(&body, 3)
            .unwrap_err()
            .contains("longer than its gRPC message"));
    }

    #[test]
    fn a_group_before_the_model_is_undecodable_not_modelless() {
        // A group (field 2) and then field 1: protobuf decoders skip the
        // group and read `m`; the scan does not follow groups, so it says
        // it gave up rather than that there is no model.
        let body = [0, 0, 0, 0, 5, 0x13, 0x14, 0x0a, 0x01, b'm'];
        let fields = scan(&body);
        assert_eq!(fields.model, None);
        assert!(fields.undecodable);
        // A message that simply has no field 1 is not undecodable.
        let mut message = Vec::new();
        field_bytes(7, b"tensor", &mut message);
        let fields = scan(&frame(0, &message));
        assert!(fields.model.is_none() && !fields.undecodable);
    }
}
