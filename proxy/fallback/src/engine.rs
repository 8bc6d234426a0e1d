//! The engine: a dedicated thread that owns the device and the model, fed
//! over a channel, batching concurrent requests.
//!
//! Async callers send a job and await a oneshot reply, so no tokio worker
//! ever blocks on the device. The thread keeps a queue of requests and runs
//! one forward pass at a time (at most `max_batch_size` sequences and
//! `max_batch_tokens` padded tokens), each chosen afresh from everything
//! queued by `schedule::next_pass`: sequences, not requests, are the unit,
//! shared round robin between requests, so a short request is not stuck
//! behind a long one's later passes. A request whose caller has gone (its
//! reply channel closed, as when the proxy's time limit drops the future) or
//! whose deadline has passed leaves the queue before the next pass. When the
//! engine was idle, the first job waits at most `max_wait` for others to
//! join its pass.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

mod schedule;

pub use schedule::DropReason;

use schedule::{PassLimits, Waiting};

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
    deadline: Option<Instant>,
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
    /// A request left the queue for `reason` with `sequences` of its
    /// sequences not computed.
    fn dropped(&self, reason: DropReason, sequences: usize);
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
    fn dropped(&self, _: DropReason, _: usize) {}
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
            pass: PassLimits {
                max_sequences: config.max_batch_size.max(1),
                max_padded_tokens: config.max_batch_tokens.max(config.max_tokens),
            },
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
        self.embed_tokens_by(sequences, None).await
    }

    /// Embeds already-tokenized sequences, unless `deadline` passes first
    /// ([`EngineError::Expired`]). Dropping the future withdraws the request:
    /// its sequences not yet computed leave the queue before the next pass.
    pub async fn embed_tokens_by(
        &self,
        sequences: Vec<Vec<u32>>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                sequences,
                queued_at: Instant::now(),
                deadline,
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
    pass: PassLimits,
    max_wait: Duration,
}

/// A request on the engine thread: its sequences, shortest first (so that
/// passes pad little), and the vectors computed so far.
struct Queued {
    id: u64,
    sequences: Vec<Vec<u32>>,
    /// Indices into `sequences`, in the order they are taken.
    order: Vec<usize>,
    /// Token counts in `order`'s order.
    lengths: Vec<usize>,
    /// How many of `order` have been computed.
    done: usize,
    vectors: Vec<Vec<f32>>,
    queued_at: Instant,
    deadline: Option<Instant>,
    reply: Reply,
}

impl Queued {
    fn new(id: u64, job: Job) -> Self {
        let mut order: Vec<usize> = (0..job.sequences.len()).collect();
        order.sort_by_key(|&i| job.sequences[i].len());
        let lengths = order.iter().map(|&i| job.sequences[i].len()).collect();
        let count = job.sequences.len();
        Self {
            id,
            sequences: job.sequences,
            order,
            lengths,
            done: 0,
            vectors: vec![Vec::new(); count],
            queued_at: job.queued_at,
            deadline: job.deadline,
            reply: job.reply,
        }
    }

    fn left(&self) -> usize {
        self.order.len() - self.done
    }
}

/// The engine thread's loop: gather jobs, then run one pass at a time,
/// each chosen by [`schedule::next_pass`] over everything still queued.
fn serve(
    mut gpu: Gpu,
    bert: Bert,
    jobs: mpsc::Receiver<Job>,
    limits: Limits,
    observer: &dyn EngineObserver,
) {
    let mut queue: Vec<Queued> = Vec::new();
    let mut next_id = 0u64;
    let mut after = None;
    let mut admit = |queue: &mut Vec<Queued>, job: Job| {
        queue.push(Queued::new(next_id, job));
        next_id += 1;
    };
    loop {
        if queue.is_empty() {
            // Idle: wait for work, then let others join it for `max_wait`.
            let Ok(first) = jobs.recv() else { return };
            admit(&mut queue, first);
            let until = Instant::now() + limits.max_wait;
            while queue.iter().map(Queued::left).sum::<usize>() < limits.pass.max_sequences {
                match jobs.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(job) => admit(&mut queue, job),
                    Err(_) => break,
                }
            }
        } else {
            // Busy: whatever arrived during the last pass joins the queue
            // without delaying the next one.
            while let Ok(job) = jobs.try_recv() {
                admit(&mut queue, job);
            }
        }
        let decision = {
            let waiting: Vec<Waiting<'_>> = queue
                .iter()
                .map(|q| Waiting {
                    id: q.id,
                    remaining: &q.lengths[q.done..],
                    deadline: q.deadline,
                    cancelled: q.reply.is_closed(),
                })
                .collect();
            schedule::next_pass(&waiting, after, Instant::now(), limits.pass)
        };
        after = decision.last.or(after);
        let mut fates: Vec<Fate> = (0..queue.len()).map(|_| Fate::Stay).collect();
        for &(position, reason) in &decision.dropped {
            let request = &queue[position];
            observer.dropped(reason, request.left());
            tracing::debug!(
                reason = reason.as_str(),
                sequences = request.left(),
                of = request.order.len(),
                "dropped a request's unfinished sequences"
            );
            fates[position] = match reason {
                // A caller still waiting is told why; one gone is not.
                DropReason::Expired => Fate::Answer(Err(EngineError::Expired)),
                DropReason::Cancelled => Fate::Forget,
            };
        }
        if !decision.taken.is_empty() {
            run_pass(
                &mut gpu,
                &bert,
                &mut queue,
                &decision.taken,
                &mut fates,
                observer,
            );
        }
        let mut staying = Vec::with_capacity(queue.len());
        for (mut request, fate) in queue.drain(..).zip(fates) {
            match fate {
                Fate::Stay if request.left() > 0 => staying.push(request),
                Fate::Stay => {
                    let vectors = std::mem::take(&mut request.vectors);
                    let _ = request.reply.send(Ok(vectors));
                }
                Fate::Answer(answer) => {
                    let _ = request.reply.send(answer);
                }
                Fate::Forget => {}
            }
        }
        queue = staying;
    }
}

/// What becomes of a queued request after a pass.
enum Fate {
    /// It stays queued, or is answered when it has nothing left.
    Stay,
    /// It leaves with this answer.
    Answer(Result<Vec<Vec<f32>>, EngineError>),
    /// It leaves unanswered: nobody is waiting.
    Forget,
}

/// Runs one forward pass over the sequences `taken` from the queue and
/// stores their vectors; a failed pass fails the requests in it.
fn run_pass(
    gpu: &mut Gpu,
    bert: &Bert,
    queue: &mut [Queued],
    taken: &[(usize, usize)],
    fates: &mut [Fate],
    observer: &dyn EngineObserver,
) {
    let now = Instant::now();
    let mut batch = Vec::new();
    for &(position, count) in taken {
        let request = &queue[position];
        if request.done == 0 {
            observer.queued(now.saturating_duration_since(request.queued_at));
        }
        for &index in &request.order[request.done..request.done + count] {
            batch.push(request.sequences[index].clone());
        }
    }
    let started = Instant::now();
    let computed = bert.forward(gpu, &batch).and_then(|vectors| {
        if vectors.len() == batch.len() {
            Ok(vectors)
        } else {
            Err(EngineError::Gpu(format!(
                "a pass of {} sequences returned {} vectors",
                batch.len(),
                vectors.len()
            )))
        }
    });
    match computed {
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
                requests = taken.len(),
                padded_tokens = stats.padded_tokens,
                elapsed = ?stats.elapsed,
                "forward pass"
            );
            let mut vectors = vectors.into_iter();
            for &(position, count) in taken {
                let request = &mut queue[position];
                for slot in request.done..request.done + count {
                    let index = request.order[slot];
                    request.vectors[index] = vectors.next().unwrap_or_default();
                }
                request.done += count;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "forward pass failed");
            for &(position, _) in taken {
                fates[position] = Fate::Answer(Err(e.clone()));
            }
        }
    }
}
