//! `infermesh-sim`: a simulated vLLM server, and `infermesh-sim-load`, an
//! open-loop load generator, the fleet and the traffic the balancing tests
//! and `scripts/bench-balancing.sh` use.
//!
//! The latency model (see [`engine`] for the rules, `docs/simulator.md` for
//! the reference): prefill = 30 ms + 0.2 ms × uncached prompt tokens, one
//! prefill at a time; decode = 12 ms per output token alone, up to 2× that
//! with `max-num-seqs` (256) running; a KV cache of 8,192 blocks of 16
//! tokens with prefix caching; at most `max-loras` (1) adapters loaded, 100
//! ms to load one. These defaults stand for an 8B model on one H100.

pub mod cache;
pub mod engine;
pub mod load;
pub mod metrics;
pub mod server;
pub mod tokenize;
