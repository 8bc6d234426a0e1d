//! Tokenization as sentence-transformers does it for BERT models:
//! `tokenizer.json`'s normalizer and WordPiece, `[CLS] … [SEP]`, truncation
//! at the model's `max_seq_length`, no padding (batches pad to their longest
//! sequence). The shipped file bakes in truncation at 128 and padding to 128,
//! which sentence-transformers overrides; so do we.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::EngineError;

/// sentence-transformers' `max_seq_length` for all-MiniLM-L6-v2.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// A loaded tokenizer.
pub struct TextTokenizer {
    inner: Tokenizer,
    max_tokens: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, truncating at `max_tokens` (special tokens included).
    pub fn load(path: &Path, max_tokens: usize) -> Result<Self, EngineError> {
        let bad = |reason: String| EngineError::ModelFiles {
            dir: path.parent().unwrap_or(path).to_path_buf(),
            reason: format!("tokenizer.json: {reason}"),
        };
        let mut inner = Tokenizer::from_file(path).map_err(|e| bad(e.to_string()))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| bad(e.to_string()))?;
        inner.with_padding(None);
        Ok(Self { inner, max_tokens })
    }

    /// The most tokens one input becomes.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Token ids of `text`, special tokens included.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| EngineError::InvalidInput(format!("cannot tokenize: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }
}
