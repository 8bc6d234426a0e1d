//! The latency model of one simulated vLLM server, in simulated time.
//!
//! A pure state machine: the HTTP layer submits requests and advances it to
//! "now" (simulated nanoseconds), and it answers with the events that
//! happened — a request scheduled (its prefill began), a token produced, a
//! request finished. No clocks, no I/O, so every rule below has a unit test.
//!
//! - **Queueing.** Requests wait in arrival order (first come, first served,
//!   no overtaking). The head is scheduled when (1) fewer than
//!   `max_num_seqs` requests are running, (2) the prefill lane is free,
//!   (3) its adapter is loaded or can be (see LoRA), and (4) the KV cache has
//!   blocks for its prompt and `max_tokens` of output ([`crate::cache`]).
//! - **Prefill.** `prefill_overhead + uncached prompt tokens ×
//!   prefill_per_token`. Prefills run one at a time (the GPU's compute is
//!   what a prefill is bound by), so prompt tokens that must be computed are
//!   what limits a server's request rate, and a cached prefix raises it.
//!   The first output token comes at the end of the prefill.
//! - **Decode.** Each further token comes `inter_token × f(n)` after the
//!   previous one, where `n` is the number of running requests when it is
//!   produced and `f(n) = 1 + (full_batch_factor − 1) × (n − 1) /
//!   (max_num_seqs − 1)`: 1 alone, `full_batch_factor` with a full batch
//!   (decode is memory-bound: a bigger batch costs each step a little).
//! - **LoRA.** A request naming an adapter needs it loaded. At most
//!   `max_loras` are loaded; loading one adds `lora_load` before the
//!   request's prefill and evicts the least recently used loaded adapter
//!   that no running request uses; when every loaded adapter is in use, the
//!   request waits.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};

use crate::cache::{Allocation, KvCache};

/// Simulated time, nanoseconds.
pub type Nanos = u64;
/// A request's number, unique within one engine.
pub type Id = u64;

pub const MS: Nanos = 1_000_000;
pub const US: Nanos = 1_000;

/// The server's latency and capacity profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub max_num_seqs: usize,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub prefill_overhead: Nanos,
    pub prefill_per_token: Nanos,
    pub inter_token: Nanos,
    pub full_batch_factor: f64,
    pub max_loras: usize,
    pub lora_load: Nanos,
}

impl Default for Profile {
    /// An 8B model on one H100 (the figures llm-d's benchmarks use): 30 ms +
    /// 0.2 ms per uncached prompt token of prefill, 12 ms per output token
    /// alone, twice that with a full batch of 256.
    fn default() -> Self {
        Self {
            max_num_seqs: 256,
            kv_blocks: 8192,
            block_size: 16,
            prefill_overhead: 30 * MS,
            prefill_per_token: 200 * US,
            inter_token: 12 * MS,
            full_batch_factor: 2.0,
            max_loras: 1,
            lora_load: 100 * MS,
        }
    }
}

impl Profile {
    /// Prefill time of a prompt with `uncached` tokens to compute.
    pub fn prefill_time(&self, uncached: usize) -> Nanos {
        self.prefill_overhead + uncached as Nanos * self.prefill_per_token
    }

    /// Whether a request of `prompt` tokens and `output` tokens can ever fit.
    pub fn check(&self, prompt: usize, output: usize) -> Result<(), Rejection> {
        let tokens = prompt + output;
        let needed = tokens.div_ceil(self.block_size.max(1));
        if needed > self.kv_blocks {
            return Err(Rejection::TooLong {
                tokens,
                needed,
                capacity: self.kv_blocks,
            });
        }
        Ok(())
    }

    /// Time between two output tokens with `running` requests in the batch.
    pub fn inter_token_time(&self, running: usize) -> Nanos {
        let span = self.max_num_seqs.saturating_sub(1).max(1) as f64;
        let filled = (running.max(1) - 1) as f64 / span;
        let factor = 1.0 + (self.full_batch_factor - 1.0) * filled.min(1.0);
        (self.inter_token as f64 * factor) as Nanos
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub tokens: Vec<u32>,
    /// Tokens to generate (at least one).
    pub output_tokens: usize,
    /// The adapter the request's `model` names.
    pub lora: Option<String>,
}

/// What happened, in simulated time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The request left the queue; its prefill begins.
    Scheduled {
        id: Id,
        at: Nanos,
        cached_tokens: usize,
        lora_loaded: bool,
    },
    /// Output token `index` (0 is the first, at the end of the prefill).
    Token { id: Id, at: Nanos, index: usize },
    /// The last token came; the request's blocks are released.
    Finished { id: Id, at: Nanos },
}

/// A request the server can never serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("this request needs {needed} KV cache blocks ({tokens} prompt and output tokens) but the server has {capacity}; shorten the prompt or max_tokens")]
    TooLong {
        tokens: usize,
        needed: usize,
        capacity: usize,
    },
}

/// Counters the metrics export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Of those, tokens found.
    pub prefix_hits: u64,
    pub lora_loads: u64,
}

#[derive(Debug)]
struct Running {
    allocation: Allocation,
    lora: Option<String>,
    emitted: usize,
    output_tokens: usize,
}

/// The state of one server.
#[derive(Debug)]
pub struct Engine {
    profile: Profile,
    cache: KvCache,
    waiting: VecDeque<(Id, Request)>,
    running: HashMap<Id, Running>,
    timeline: BinaryHeap<Reverse<(Nanos, Id)>>,
    prefill_free_at: Nanos,
    /// Loaded adapters and when each was last used.
    loras: HashMap<String, u64>,
    tick: u64,
    counters: Counters,
}

impl Engine {
    pub fn new(profile: Profile) -> Self {
        let cache = KvCache::new(profile.kv_blocks, profile.block_size);
        Self {
            profile,
            cache,
            waiting: VecDeque::new(),
            running: HashMap::new(),
            timeline: BinaryHeap::new(),
            prefill_free_at: 0,
            loras: HashMap::new(),
            tick: 0,
            counters: Counters::default(),
        }
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Queues `request` at `now`; it may be scheduled at once.
    pub fn submit(
        &mut self,
        id: Id,
        mut request: Request,
        now: Nanos,
        events: &mut Vec<Event>,
    ) -> Result<(), Rejection> {
        request.output_tokens = request.output_tokens.max(1);
        self.profile
            .check(request.tokens.len(), request.output_tokens)?;
        self.waiting.push_back((id, request));
        self.schedule(now, events);
        Ok(())
    }

    /// Drops a request (its client went away), wherever it is.
    pub fn abort(&mut self, id: Id, now: Nanos, events: &mut Vec<Event>) {
        if let Some(pos) = self.waiting.iter().position(|(w, _)| *w == id) {
            self.waiting.remove(pos);
        }
        if let Some(r) = self.running.remove(&id) {
            self.cache.release(&r.allocation);
        }
        self.schedule(now, events);
    }

    /// When the next event is due, if any.
    pub fn next_event(&self) -> Option<Nanos> {
        self.timeline.peek().map(|Reverse((at, _))| *at)
    }

    /// Runs the model up to `now`, appending what happened to `events`.
    pub fn advance(&mut self, now: Nanos, events: &mut Vec<Event>) {
        while let Some(&Reverse((at, id))) = self.timeline.peek() {
            if at > now {
                break;
            }
            self.timeline.pop();
            let running = self.running.len();
            let Some(r) = self.running.get_mut(&id) else {
                // Aborted: its prefill slot ends all the same.
                self.schedule(at, events);
                continue;
            };
            let index = r.emitted;
            r.emitted += 1;
            events.push(Event::Token { id, at, index });
            if r.emitted >= r.output_tokens {
                let r = self.running.remove(&id).expect("present above");
                self.cache.release(&r.allocation);
                events.push(Event::Finished { id, at });
            } else {
                let next = at + self.profile.inter_token_time(running);
                self.timeline.push(Reverse((next, id)));
            }
            self.schedule(at, events);
        }
    }

    /// Schedules the head of the queue when everything it needs is free.
    fn schedule(&mut self, now: Nanos, events: &mut Vec<Event>) {
        if self.prefill_free_at > now || self.running.len() >= self.profile.max_num_seqs {
            return;
        }
        let Some((id, request)) = self.waiting.front() else {
            return;
        };
        let id = *id;
        // The adapter: loaded, or a free slot, or an idle one to evict.
        let mut evict = None;
        let mut load = false;
        if let Some(name) = &request.lora {
            if !self.loras.contains_key(name) {
                load = true;
                if self.loras.len() >= self.profile.max_loras {
                    let busy: BTreeSet<&str> = self
                        .running
                        .values()
                        .filter_map(|r| r.lora.as_deref())
                        .collect();
                    evict = self
                        .loras
                        .iter()
                        .filter(|(n, _)| !busy.contains(n.as_str()))
                        .min_by_key(|(_, used)| **used)
                        .map(|(n, _)| n.clone());
                    if evict.is_none() {
                        return;
                    }
                }
            }
        }
        let total = request.tokens.len() + request.output_tokens;
        let Some(allocation) = self.cache.try_allocate(&request.tokens, total) else {
            return;
        };
        let (_, request) = self.waiting.pop_front().expect("front above");
        if let Some(name) = evict {
            self.loras.remove(&name);
        }
        self.tick += 1;
        if let Some(name) = &request.lora {
            self.loras.insert(name.clone(), self.tick);
        }
        if load {
            self.counters.lora_loads += 1;
        }
        let cached = allocation.cached_tokens;
        self.counters.prefix_queries += request.tokens.len() as u64;
        self.counters.prefix_hits += cached as u64;
        let load_time = if load { self.profile.lora_load } else { 0 };
        let end = now + load_time + self.profile.prefill_time(request.tokens.len() - cached);
        self.prefill_free_at = end;
        self.timeline.push(Reverse((end, id)));
        self.running.insert(
            id,
            Running {
                allocation,
                lora: request.lora,
                emitted: 0,
                output_tokens: request.output_tokens,
            },
        );
        events.push(Event::Scheduled {
            id,
            at: now,
            cached_tokens: cached,
            lora_loaded: load,
        });
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn kv_usage(&self) -> f64 {
        self.cache.usage()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Adapters of running requests, sorted.
    pub fn running_loras(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self
            .running
            .values()
            .filter_map(|r| r.lora.as_deref())
            .collect();
        set.into_iter().map(str::to_string).collect()
    }

    /// Adapters of waiting requests, sorted.
    pub fn waiting_loras(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self
            .waiting
            .iter()
            .filter_map(|(_, r)| r.lora.as_deref())
            .collect();
        set.into_iter().map(str::to_string).collect()
    }

    /// Loaded adapters, sorted.
    pub fn loaded_loras(&self) -> Vec<String> {
        let mut v: Vec<String> = self.loras.keys().cloned().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32)
            .map(|i| seed.wrapping_mul(1_000_003) ^ i)
            .collect()
    }

    fn req(seed: u32, len: usize, out: usize) -> Request {
        Request {
            tokens: prompt(seed, len),
            output_tokens: out,
            lora: None,
        }
    }

    /// Runs until no event is left; returns every event.
    fn drain(engine: &mut Engine) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(at) = engine.next_event() {
            engine.advance(at, &mut events);
        }
        events
    }

    fn first_token(events: &[Event], id: Id) -> Nanos {
        events
            .iter()
            .find_map(|e| match e {
                Event::Token {
                    id: i,
                    at,
                    index: 0,
                } if *i == id => Some(*at),
                _ => None,
            })
            .expect("a first token")
    }

    fn scheduled(events: &[Event], id: Id) -> Nanos {
        events
            .iter()
            .find_map(|e| match e {
                Event::Scheduled { id: i, at, .. } if *i == id => Some(*at),
                _ => None,
            })
            .expect("scheduled")
    }

    #[test]
    fn prefill_is_overhead_plus_uncached_tokens_and_decode_is_tokens_times_itl() {
        let p = Profile::default();
        let mut e = Engine::new(p.clone());
        let mut ev = Vec::new();
        e.submit(1, req(1, 1000, 10), 0, &mut ev).unwrap();
        ev.extend(drain(&mut e));
        assert_eq!(first_token(&ev, 1), 30 * MS + 1000 * 200 * US);
        let Some(Event::Finished { at, .. }) = ev.last() else {
            panic!("{ev:?}")
        };
        assert_eq!(*at, 230 * MS + 9 * 12 * MS);
    }

    #[test]
    fn a_repeated_prefix_hits_the_cache_and_prefills_faster() {
        let mut e = Engine::new(Profile::default());
        let mut ev = Vec::new();
        e.submit(1, req(7, 2000, 4), 0, &mut ev).unwrap();
        ev.extend(drain(&mut e));
        let cold = first_token(&ev, 1);
        let start = 10_000 * MS;
        let mut again = req(7, 2000, 4);
        again.tokens.extend([1, 2, 3]); // same prefix, a different question
        e.submit(2, again, start, &mut ev).unwrap();
        ev.extend(drain(&mut e));
        let warm = first_token(&ev, 2) - start;
        assert!(warm * 5 < cold, "warm {warm} cold {cold}");
        let c = e.counters();
        assert_eq!(c.prefix_queries, 4003);
        assert_eq!(c.prefix_hits, 2000);
    }

    #[test]
    fn prefills_run_one_at_a_time() {
        let mut e = Engine::new(Profile::default());
        let mut ev = Vec::new();
        e.submit(1, req(1, 500, 2), 0, &mut ev).unwrap();
        e.submit(2, req(2, 500, 2), 0, &mut ev).unwrap();
        assert_eq!(e.waiting(), 1);
        ev.extend(drain(&mut e));
        assert_eq!(first_token(&ev, 2), 2 * first_token(&ev, 1));
    }

    #[test]
    fn each_decode_step_slows_as_the_batch_fills() {
        let p = Profile {
            max_num_seqs: 5,
            full_batch_factor: 3.0,
            ..Profile::default()
        };
        assert_eq!(p.inter_token_time(1), 12 * MS);
        assert_eq!(p.inter_token_time(3), 24 * MS);
        assert_eq!(p.inter_token_time(5), 36 * MS);
        // Alone: 12 ms gaps; with four others decoding, wider gaps.
        let mut e = Engine::new(p);
        let mut ev = Vec::new();
        for id in 0..5 {
            e.submit(id, req(id as u32, 10, 200), 0, &mut ev).unwrap();
        }
        ev.extend(drain(&mut e));
        let tokens: Vec<Nanos> = ev
            .iter()
            .filter_map(|x| match x {
                Event::Token { id: 0, at, .. } => Some(*at),
                _ => None,
            })
            .collect();
        let last_gap = tokens[100] - tokens[99];
        assert_eq!(last_gap, 36 * MS);
    }

    #[test]
    fn requests_queue_when_max_num_seqs_are_running() {
        let p = Profile {
            max_num_seqs: 2,
            ..Profile::default()
        };
        let mut e = Engine::new(p);
        let mut ev = Vec::new();
        for id in 0..3 {
            e.submit(id, req(id as u32, 10, 50), 0, &mut ev).unwrap();
        }
        e.advance(500 * MS, &mut ev);
        assert_eq!((e.running(), e.waiting()), (2, 1));
        ev.extend(drain(&mut e));
        let finished_0 = ev
            .iter()
            .find_map(|x| match x {
                Event::Finished { id: 0, at } => Some(*at),
                _ => None,
            })
            .unwrap();
        assert_eq!(scheduled(&ev, 2), finished_0);
    }

    #[test]
    fn a_request_waits_for_kv_blocks_and_an_impossible_one_is_rejected() {
        let p = Profile {
            kv_blocks: 10,
            ..Profile::default()
        };
        let mut e = Engine::new(p);
        let mut ev = Vec::new();
        assert!(matches!(
            e.submit(9, req(9, 150, 20), 0, &mut ev),
            Err(Rejection::TooLong { needed: 11, .. })
        ));
        e.submit(0, req(0, 100, 20), 0, &mut ev).unwrap(); // 8 blocks
        e.submit(1, req(1, 40, 10), 0, &mut ev).unwrap(); // 4 blocks
        e.advance(200 * MS, &mut ev);
        assert_eq!((e.running(), e.waiting()), (1, 1));
        assert!(e.kv_usage() >= 0.8);
        ev.extend(drain(&mut e));
        let finished_0 = ev
            .iter()
            .find_map(|x| match x {
                Event::Finished { id: 0, at } => Some(*at),
                _ => None,
            })
            .unwrap();
        assert_eq!(scheduled(&ev, 1), finished_0);
    }

    #[test]
    fn an_aborted_request_gives_its_blocks_and_its_seat_back() {
        let p = Profile {
            max_num_seqs: 1,
            kv_blocks: 100,
            ..Profile::default()
        };
        let mut e = Engine::new(p);
        let mut ev = Vec::new();
        e.submit(0, req(0, 100, 500), 0, &mut ev).unwrap();
        e.submit(1, req(1, 100, 5), 0, &mut ev).unwrap();
        e.submit(2, req(2, 100, 5), 0, &mut ev).unwrap();
        e.abort(2, 0, &mut ev); // gone while waiting
        e.advance(1000 * MS, &mut ev);
        assert_eq!((e.running(), e.waiting()), (1, 1));
        e.abort(0, 1000 * MS, &mut ev); // gone while decoding
        assert_eq!(scheduled(&ev, 1), 1000 * MS);
        ev.extend(drain(&mut e));
        assert!(!ev
            .iter()
            .any(|x| matches!(x, Event::Token { id: 0, at, .. } if *at > 1000 * MS)));
        assert!(!ev
            .iter()
            .any(|x| matches!(x, Event::Scheduled { id: 2, .. })));
        assert_eq!((e.running(), e.waiting(), e.kv_usage()), (0, 0, 0.0));
    }

    #[test]
    fn loading_an_adapter_costs_its_load_time_and_max_loras_is_respected() {
        let p = Profile {
            max_loras: 1,
            lora_load: 100 * MS,
            ..Profile::default()
        };
        let lora = |seed, name: &str, out| Request {
            lora: Some(name.to_string()),
            ..req(seed, 10, out)
        };
        let mut e = Engine::new(p.clone());
        let mut ev = Vec::new();
        e.submit(1, lora(1, "a", 300), 0, &mut ev).unwrap();
        e.advance(1000 * MS, &mut ev);
        assert_eq!(first_token(&ev, 1), 100 * MS + p.prefill_time(10));
        // Loaded now: the next request for `a` pays no load.
        e.submit(2, lora(2, "a", 1), 1000 * MS, &mut ev).unwrap();
        e.advance(2000 * MS, &mut ev);
        assert_eq!(first_token(&ev, 2), 1000 * MS + p.prefill_time(10));
        // `b` must wait while a request still runs on `a` (one slot).
        e.submit(3, lora(3, "b", 1), 2000 * MS, &mut ev).unwrap();
        assert_eq!(e.waiting_loras(), vec!["b".to_string()]);
        assert_eq!(e.running_loras(), vec!["a".to_string()]);
        ev.extend(drain(&mut e));
        let finished_1 = ev
            .iter()
            .find_map(|x| match x {
                Event::Finished { id: 1, at } => Some(*at),
                _ => None,
            })
            .unwrap();
        assert_eq!(scheduled(&ev, 3), finished_1);
        assert_eq!(
            first_token(&ev, 3),
            finished_1 + 100 * MS + p.prefill_time(10)
        );
        assert_eq!(e.loaded_loras(), vec!["b".to_string()]);
        assert_eq!(e.counters().lora_loads, 2);
    }
}
