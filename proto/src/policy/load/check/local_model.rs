//! `LocalModel` checks: the bounds its engine can honour. The proxy runs
//! them again on what it receives (see `wire.rs`).

use super::path::{find, P};
use crate::policy::load::{PolicyError, Typed};
use crate::policy::LocalModelSpec;
use P::K;

/// `LocalModel` bounds: a forward pass of more sequences only adds latency
/// on the devices the engine targets; BERT models have 512 positions; one
/// request carries at most OpenAI's 2048 inputs; a batch waits at most 1 s.
const MAX_LOCAL_BATCH_SIZE: u32 = 256;
const MAX_LOCAL_BATCH_TOKENS: u32 = 1 << 20;
const MAX_LOCAL_TOKENS: u32 = 512;
const MAX_LOCAL_INPUTS: u32 = 2048;
/// `LocalModel.maxQueued` bound.
const MAX_LOCAL_QUEUED: u32 = 1_000_000;
const MAX_LOCAL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Bounds of a `LocalModel`, each located at its field.
pub(super) fn local_model_spec(model: &Typed<LocalModelSpec>, errors: &mut Vec<PolicyError>) {
    let (file, tree, spec) = (&model.file, &model.tree, &model.resource.spec);
    for (field, problem) in local_model_problems(spec) {
        let at = find(tree, &[K("spec"), K(field)]).at;
        errors.push(PolicyError::new(file, at, problem));
    }
}

/// What is wrong with a `LocalModel` spec, by field.
pub(in crate::policy) fn local_model_problems(
    spec: &LocalModelSpec,
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if spec.model_dir.trim().is_empty() {
        problems.push((
            "modelDir",
            "`modelDir` is empty: give the directory that holds config.json, model.safetensors and tokenizer.json".to_owned(),
        ));
    }
    let mut range = |field: &'static str, value: u32, min: u32, max: u32| {
        if !(min..=max).contains(&value) {
            problems.push((
                field,
                format!("`{field}` must be between {min} and {max}, found {value}"),
            ));
        }
    };
    range("maxBatchSize", spec.max_batch_size, 1, MAX_LOCAL_BATCH_SIZE);
    range("maxTokens", spec.max_tokens, 2, MAX_LOCAL_TOKENS);
    range("maxInputs", spec.max_inputs, 1, MAX_LOCAL_INPUTS);
    range("maxQueued", spec.max_queued, 1, MAX_LOCAL_QUEUED);
    range(
        "maxBatchTokens",
        spec.max_batch_tokens,
        spec.max_tokens.clamp(2, MAX_LOCAL_TOKENS),
        MAX_LOCAL_BATCH_TOKENS,
    );
    if spec.max_wait > MAX_LOCAL_WAIT {
        problems.push((
            "maxWait",
            format!(
                "`maxWait` ({}ms) must be at most 1s: every request waits this long when it is alone",
                spec.max_wait.as_millis()
            ),
        ));
    }
    problems
}
