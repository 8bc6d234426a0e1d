//! `kind: LocalModel`: a model the proxy serves itself, and the `local:`
//! prefix by which routes name one.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration;

/// The prefix that makes a backend name refer to a `LocalModel`:
/// `local:minilm` is the `LocalModel` called `minilm`.
pub const LOCAL_PREFIX: &str = "local:";

/// The `LocalModel` a backend name refers to, when it is `local:<name>`.
pub fn local_model_name(backend: &str) -> Option<&str> {
    backend.strip_prefix(LOCAL_PREFIX)
}

/// A model the proxy serves itself, on its embedded wgpu engine (a GPU, or
/// lavapipe on the CPU). Routes send requests to it with the backend name
/// `local:<name>`, as their backend or as a link of a fallback chain. The
/// first supported model is all-MiniLM-L6-v2 (BERT sentence embeddings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalModelSpec {
    /// Directory on the proxy's machine holding `config.json`,
    /// `model.safetensors` and `tokenizer.json`; a relative path is taken
    /// from the proxy's working directory. A missing or broken directory
    /// does not stop the proxy: the model is reported unavailable and its
    /// routes answer 503 with the reason.
    pub model_dir: String,
    /// Most sequences (inputs) in one forward pass (1 to 256).
    #[serde(default = "defaults::max_batch_size")]
    pub max_batch_size: u32,
    /// Most padded tokens (sequences × the longest one) in one forward pass;
    /// at least `maxTokens`, so that any input fits.
    #[serde(default = "defaults::max_batch_tokens")]
    pub max_batch_tokens: u32,
    /// Longest a request waits for other requests to join its batch (at
    /// most 1s).
    #[serde(default = "defaults::max_wait", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub max_wait: Duration,
    /// Inputs are cut to this many tokens, special tokens included, as
    /// sentence-transformers does (2 to 512; 256 for all-MiniLM-L6-v2).
    #[serde(default = "defaults::max_tokens")]
    pub max_tokens: u32,
    /// Most inputs one request may carry (1 to 2048, OpenAI's limit); a
    /// request with more is refused with 400.
    #[serde(default = "defaults::max_inputs")]
    pub max_inputs: u32,
    /// Most sequences waiting for or in a forward pass (1 to 1,000,000);
    /// a request that would queue past it is refused at once with 503,
    /// so a flood cannot pile up latency and memory behind the engine. A
    /// request alone in an empty queue is always admitted.
    #[serde(default = "defaults::max_queued")]
    pub max_queued: u32,
    /// Runs on the first adapter whose name contains this
    /// (case-insensitive), e.g. `llvmpipe` for lavapipe; by default a
    /// discrete GPU, then an integrated one, then a CPU implementation.
    /// wgpu's `WGPU_ADAPTER_NAME` environment variable applies when this is
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

mod defaults {
    use std::time::Duration;

    pub fn max_batch_size() -> u32 {
        32
    }
    pub fn max_batch_tokens() -> u32 {
        8192
    }
    pub fn max_wait() -> Duration {
        Duration::from_millis(2)
    }
    pub fn max_tokens() -> u32 {
        256
    }
    pub fn max_inputs() -> u32 {
        2048
    }
    pub fn max_queued() -> u32 {
        4096
    }
}
