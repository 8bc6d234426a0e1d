//! The engine: a dedicated thread that owns the device and the model, fed
//! over a channel, batching concurrent requests.
//!
//! Async callers send a job and await a oneshot reply, so no tokio worker
//! ever blocks on the device. The thread takes the first job, then keeps
//! collecting for at most `max_wait` (or until `max_batch_size` sequences
//! are waiting), sorts the sequences by length so that padding is small, and
//! runs them in forward passes of at most `max_batch_size` sequences and
//! `max_batch_tokens` padded tokens.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::bert::Bert;
use crate::gpu::{AdapterPreference, Gpu};
use crate::tokenize::{TextTokenizer, DEFAULT_MAX_TOKENS};
use crate::{Embedder, EmbeddingRequest, Embeddings, EngineError, ModelFiles};

/// How to load and batch one local model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// The name clients ask for.
    pub name: String,
    /// Directory holding `config.json`, `model.safetensors`, `tokenizer.json`.
    pub model_dir: PathBuf,
    /// Most sequences in one forward pass.
    pub max_batch_size: usize,
    /// Most padded tokens (sequences × longest) in one forward pass.
    pub max_batch_tokens: usize,
    /// Longest a request waits for others to join its batch.
    pub max_wait: Duration,
    /// Truncation length, special tokens included.
    pub max_tokens: usize,
    /// Which adapter to run on.
    pub adapter: AdapterPreference,
}

impl EngineConfig {
    /// Defaults for `model_dir`: batches of 32 sequences or 8192 tokens,
    /// 2 ms of waiting, truncation at 256 tokens.
    pub fn new(name: impl Into<String>, model_dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            model_dir: model_dir.into(),
            max_batch_size: 32,
            max_batch_tokens: 8192,
            max_wait: Duration::from_millis(2),
            max_tokens: DEFAULT_MAX_TOKENS,
            adapter: AdapterPreference::default(),
        }
    }
}

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>;

struct Job {
    sequences: Vec<Vec<u32>>,
    queued_at: Instant,
    reply: Reply,
}

/// What the engine reports about its work, for metrics. Called on the
/// engine thread, so implementations should only touch atomics.
pub trait EngineObserver: Send + Sync {
    /// A request waited this long between its submission and the start of
    /// the batch that carries it.
    fn queued(&self, wait: Duration);
    /// A forward pass ran.
    fn pass(&self, pass: &PassStats);
}

/// One forward pass, as [`EngineObserver::pass`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassStats {
    /// Sequences in the pass.
    pub sequences: usize,
    /// Tokens of those sequences, before padding.
    pub tokens: usize,
    /// Tokens processed: sequences × the longest one.
    pub padded_tokens: usize,
    /// Time from recording the pass to reading its results back.
    pub elapsed: Duration,
}

/// An observer that ignores everything.
struct Unobserved;

impl EngineObserver for Unobserved {
    fn queued(&self, _: Duration) {}
    fn pass(&self, _: &PassStats) {}
}

/// A model served from this process. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct LocalEmbedder {
    name: String,
    dimensions: usize,
    adapter: String,
    tokenizer: Arc<TextTokenizer>,
    jobs: mpsc::Sender<Job>,
}

impl LocalEmbedder {
    /// Loads the model on a new engine thread and waits until it is ready
    /// (seconds: call from a blocking context). A missing adapter or model
    /// file is a typed error.
    pub fn start(config: EngineConfig) -> Result<Self, EngineError> {
        Self::start_observed(config, Arc::new(Unobserved))
    }

    /// [`LocalEmbedder::start`], reporting queue waits and forward passes to
    /// `observer`.
    pub fn start_observed(
        config: EngineConfig,
        observer: Arc<dyn EngineObserver>,
    ) -> Result<Self, EngineError> {
        let files = ModelFiles::locate(&config.model_dir)?;
        let tokenizer = Arc::new(TextTokenizer::load(&files.tokenizer, config.max_tokens)?);
        let (jobs, receiver) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let limits = Limits {
            max_batch_size: config.max_batch_size.max(1),
            max_batch_tokens: config.max_batch_tokens.max(config.max_tokens),
            max_wait: config.max_wait,
        };
        let adapter = config.adapter.clone();
        std::thread::Builder::new()
            .name(format!("fallback-{}", config.name))
            .spawn(move || {
                let loaded = Gpu::new(&adapter).and_then(|gpu| {
                    let bert = Bert::load(&gpu, &files.config, &files.weights)?;
                    Ok((gpu, bert))
                });
                match loaded {
                    Ok((gpu, bert)) => {
                        let _ = ready_tx.send(Ok((gpu.info.name.clone(), bert.config.hidden_size)));
                        serve(gpu, bert, receiver, limits, observer.as_ref());
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| EngineError::Gpu(format!("cannot start the engine thread: {e}")))?;
        let (adapter, dimensions) = ready_rx
            .recv()
            .map_err(|_| EngineError::Gpu("the engine thread died while loading".into()))??;
        tracing::info!(model = %config.name, %adapter, dimensions, "local model ready");
        Ok(Self {
            name: config.name,
            dimensions,
            adapter,
            tokenizer,
            jobs,
        })
    }

    /// The adapter the model runs on.
    pub fn adapter(&self) -> &str {
        &self.adapter
    }

    /// Width of the vectors.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Token ids of each input, as the engine will see them.
    pub fn tokenize(&self, inputs: &[String]) -> Result<Vec<Vec<u32>>, EngineError> {
        inputs
            .iter()
            .map(|text| self.tokenizer.encode(text))
            .collect()
    }

    /// Embeds already-tokenized sequences.
    pub async fn embed_tokens(
        &self,
        sequences: Vec<Vec<u32>>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                sequences,
                queued_at: Instant::now(),
                reply,
            })
            .map_err(|_| EngineError::Gpu("the engine thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| EngineError::Gpu("the engine thread dropped the request".into()))?
    }
}

impl Embedder for LocalEmbedder {
    fn model(&self) -> &str {
        &self.name
    }

    async fn embed(&self, request: EmbeddingRequest) -> Result<Embeddings, EngineError> {
        request.validate()?;
        let sequences = self.tokenize(&request.inputs)?;
        let prompt_tokens = sequences.iter().map(Vec::len).sum();
        let vectors = self.embed_tokens(sequences).await?;
        Ok(Embeddings {
            dimensions: self.dimensions,
            vectors,
            prompt_tokens,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    max_batch_size: usize,
    max_batch_tokens: usize,
    max_wait: Duration,
}

fn serve(
    mut gpu: Gpu,
    bert: Bert,
    jobs: mpsc::Receiver<Job>,
    limits: Limits,
    observer: &dyn EngineObserver,
) {
    while let Ok(first) = jobs.recv() {
        let deadline = Instant::now() + limits.max_wait;
        let mut waiting = first.sequences.len();
        let mut batch = vec![first];
        while waiting < limits.max_batch_size {
            let left = deadline.saturating_duration_since(Instant::now());
            match jobs.recv_timeout(left) {
                Ok(job) => {
                    waiting += job.sequences.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        run(&mut gpu, &bert, batch, limits, observer);
    }
}

/// Splits sequences (given by length, in processing order) into forward
/// passes within the limits; returns each pass's index range.
fn plan(lengths: &[usize], limits: Limits) -> Vec<std::ops::Range<usize>> {
    let mut passes = Vec::new();
    let mut start = 0;
    let mut longest = 0;
    for (index, &len) in lengths.iter().enumerate() {
        let count = index - start + 1;
        let padded = count * longest.max(len);
        if index > start && (count > limits.max_batch_size || padded > limits.max_batch_tokens) {
            passes.push(start..index);
            start = index;
            longest = 0;
        }
        longest = longest.max(len);
    }
    if start < lengths.len() {
        passes.push(start..lengths.len());
    }
    passes
}

fn run(gpu: &mut Gpu, bert: &Bert, jobs: Vec<Job>, limits: Limits, observer: &dyn EngineObserver) {
    let now = Instant::now();
    for job in &jobs {
        observer.queued(now.saturating_duration_since(job.queued_at));
    }
    // (job, position in job), sorted by length so each pass pads little.
    let mut order: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| (0..job.sequences.len()).map(move |s| (j, s)))
        .collect();
    order.sort_by_key(|&(j, s)| jobs[j].sequences[s].len());
    let lengths: Vec<usize> = order
        .iter()
        .map(|&(j, s)| jobs[j].sequences[s].len())
        .collect();
    let mut results: Vec<Vec<Option<Vec<f32>>>> = jobs
        .iter()
        .map(|job| vec![None; job.sequences.len()])
        .collect();
    let mut failure = None;
    for pass in plan(&lengths, limits) {
        let batch: Vec<Vec<u32>> = order[pass.clone()]
            .iter()
            .map(|&(j, s)| jobs[j].sequences[s].clone())
            .collect();
        let started = Instant::now();
        match bert.forward(gpu, &batch) {
            Ok(vectors) => {
                let stats = PassStats {
                    sequences: batch.len(),
                    tokens: batch.iter().map(Vec::len).sum(),
                    padded_tokens: batch.len() * batch.iter().map(Vec::len).max().unwrap_or(0),
                    elapsed: started.elapsed(),
                };
                observer.pass(&stats);
                tracing::debug!(
                    sequences = stats.sequences,
                    padded_tokens = stats.padded_tokens,
                    elapsed = ?stats.elapsed,
                    "forward pass"
                );
                for (&(j, s), vector) in order[pass].iter().zip(vectors) {
                    results[j][s] = Some(vector);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "forward pass failed");
                failure = Some(e);
                break;
            }
        }
    }
    for (job, vectors) in jobs.into_iter().zip(results) {
        let answer = match &failure {
            Some(e) => Err(e.clone()),
            None => vectors
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| EngineError::Gpu("a sequence was left out of every pass".into())),
        };
        let _ = job.reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(size: usize, tokens: usize) -> Limits {
        Limits {
            max_batch_size: size,
            max_batch_tokens: tokens,
            max_wait: Duration::ZERO,
        }
    }

    #[test]
    fn passes_respect_the_size_limit() {
        assert_eq!(plan(&[3; 5], limits(2, 1000)), vec![0..2, 2..4, 4..5]);
    }

    #[test]
    fn passes_respect_the_padded_token_limit() {
        // Sorted lengths; 3 x 10 = 30 tokens would pass 25.
        assert_eq!(plan(&[2, 5, 10, 10], limits(32, 25)), vec![0..2, 2..4]);
    }

    #[test]
    fn one_sequence_longer_than_the_token_limit_still_gets_a_pass() {
        assert_eq!(plan(&[300], limits(32, 256)), vec![0..1]);
        assert!(plan(&[], limits(32, 256)).is_empty());
    }
}
