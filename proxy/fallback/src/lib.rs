//! The local inference engine: small models served by the proxy itself on
//! wgpu compute shaders, for `local:` backends and as the last link of a
//! fallback chain. It knows nothing of HTTP.
//!
//! The first model is all-MiniLM-L6-v2 (a BERT encoder with mean pooling
//! and L2 normalisation): [`LocalEmbedder::start`] loads it on a dedicated
//! engine thread that owns the device, and [`Embedder::embed`] batches
//! concurrent requests into single-submission forward passes, sharing each
//! pass between the queued requests sequence by sequence.

pub mod bert;
pub mod engine;
pub mod gpu;
pub mod kernels;
pub mod tokenize;

pub use engine::{DropReason, EngineConfig, EngineObserver, LocalEmbedder, PassStats};
pub use gpu::AdapterPreference;

use std::future::Future;
use std::path::{Path, PathBuf};

/// Most inputs one embedding request may carry (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// The files a model directory must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// `config.json`: the architecture and its sizes.
    pub config: PathBuf,
    /// `model.safetensors`: the weights.
    pub weights: PathBuf,
    /// `tokenizer.json`: the tokenizer.
    pub tokenizer: PathBuf,
}

impl ModelFiles {
    /// Finds the model files in `dir`, or says which is missing.
    pub fn locate(dir: &Path) -> Result<Self, EngineError> {
        let file = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(EngineError::ModelFiles {
                    dir: dir.to_path_buf(),
                    reason: format!("{name} is missing"),
                })
            }
        };
        Ok(Self {
            config: file("config.json")?,
            weights: file("model.safetensors")?,
            tokenizer: file("tokenizer.json")?,
        })
    }
}

/// Texts to embed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingRequest {
    /// One vector is returned per input, in order.
    pub inputs: Vec<String>,
}

impl EmbeddingRequest {
    /// Checks the request as the remote APIs would, so a client gets the same
    /// 400 from the local engine as from a model server.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.inputs.is_empty() {
            return Err(EngineError::InvalidInput("input must not be empty".into()));
        }
        if self.inputs.len() > MAX_INPUTS {
            return Err(EngineError::InvalidInput(format!(
                "too many inputs: {} (at most {MAX_INPUTS})",
                self.inputs.len()
            )));
        }
        if let Some(index) = self.inputs.iter().position(|s| s.is_empty()) {
            return Err(EngineError::InvalidInput(format!(
                "input[{index}] is an empty string"
            )));
        }
        Ok(())
    }
}

/// Embedding vectors for a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// Width of each vector.
    pub dimensions: usize,
    /// One L2-normalised vector per input.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens consumed, after truncation, as `usage.prompt_tokens` reports.
    pub prompt_tokens: usize,
}

/// What an engine serving embeddings offers the proxy.
pub trait Embedder: Send + Sync {
    /// The model's name, as clients ask for it.
    fn model(&self) -> &str;
    /// Embeds the inputs; concurrent calls may be batched together.
    fn embed(
        &self,
        request: EmbeddingRequest,
    ) -> impl Future<Output = Result<Embeddings, EngineError>> + Send;
}

/// Why the engine could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The request is malformed: a 400 (gRPC `INVALID_ARGUMENT`).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The model directory is incomplete.
    #[error("model directory {dir}: {reason}")]
    ModelFiles {
        /// The directory that was searched.
        dir: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No compute adapter is usable: a 503 with this reason.
    #[error("no usable compute adapter: {0}")]
    NoAdapter(String),
    /// The device failed while running the model: a 503 with this reason.
    #[error("compute device error: {0}")]
    Gpu(String),
    /// The request's deadline passed before its sequences were computed.
    #[error("the deadline passed before the request was computed")]
    Expired,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_oversized_requests_are_refused_with_a_reason() {
        let empty = EmbeddingRequest { inputs: vec![] };
        assert_eq!(
            empty.validate(),
            Err(EngineError::InvalidInput("input must not be empty".into()))
        );
        let blank = EmbeddingRequest {
            inputs: vec!["a".into(), String::new()],
        };
        assert!(blank
            .validate()
            .unwrap_err()
            .to_string()
            .contains("input[1]"));
        let many = EmbeddingRequest {
            inputs: vec!["x".into(); MAX_INPUTS + 1],
        };
        assert!(many
            .validate()
            .unwrap_err()
            .to_string()
            .contains("too many inputs"));
        let fine = EmbeddingRequest {
            inputs: vec!["hello".into()],
        };
        assert_eq!(fine.validate(), Ok(()));
    }

    #[test]
    fn a_model_directory_without_weights_names_the_missing_file() {
        let dir = std::env::temp_dir().join(format!("infermesh-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        let err = ModelFiles::locate(&dir).unwrap_err();
        assert!(
            err.to_string().contains("model.safetensors is missing"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
