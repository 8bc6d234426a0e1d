//! `infermesh-sim`: one simulated vLLM server. See `docs/simulator.md`.

use std::net::SocketAddr;

use clap::Parser;
use infermesh_sim::engine::{Profile, MS};
use infermesh_sim::server::{Config, Server};

/// A simulated vLLM server: OpenAI endpoints, vLLM metrics, a latency model
/// with continuous batching, prefix caching and LoRA adapters. Defaults: an
/// 8B model on one H100.
#[derive(Debug, Parser)]
#[command(name = "infermesh-sim")]
struct Args {
    /// Address to listen on (port 0 picks one; printed as `listening addr=…`).
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// Sent back as the `x-upstream` header, to tell servers apart.
    #[arg(long)]
    name: Option<String>,
    /// The base model's name.
    #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
    model: String,
    /// An adapter requests may name as their `model` (repeatable).
    #[arg(long = "lora", value_name = "NAME")]
    loras: Vec<String>,
    /// Most adapters loaded at once (least recently used is unloaded).
    #[arg(long, default_value_t = 1)]
    max_loras: usize,
    /// Milliseconds (simulated) to load an adapter.
    #[arg(long, default_value_t = 100.0)]
    lora_load_ms: f64,
    /// Most requests running at once; more wait.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// KV cache blocks (of --block-size tokens).
    #[arg(long, default_value_t = 8192)]
    kv_blocks: usize,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Fixed part of a prefill, milliseconds.
    #[arg(long, default_value_t = 30.0)]
    prefill_overhead_ms: f64,
    /// Prefill time per uncached prompt token, milliseconds.
    #[arg(long, default_value_t = 0.2)]
    prefill_per_token_ms: f64,
    /// Time between output tokens with one request running, milliseconds.
    #[arg(long, default_value_t = 12.0)]
    inter_token_ms: f64,
    /// How much slower each decode step is with max-num-seqs running.
    #[arg(long, default_value_t = 2.0)]
    full_batch_factor: f64,
    /// Simulated seconds per wall second (10 = ten times faster than real time).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Output tokens of a request without max_tokens.
    #[arg(long, default_value_t = 128)]
    output_tokens: usize,
    /// Adds `endpoint-load-metrics` (ORCA text) to every response.
    #[arg(long)]
    load_report: bool,
    /// Output tokens per SSE event after the first (as vLLM's option): fewer
    /// events for a benchmark at a high time scale.
    #[arg(long, default_value_t = 1)]
    stream_interval: usize,
}

fn ns(ms: f64) -> u64 {
    (ms * MS as f64).round() as u64
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    if a.time_scale.is_nan()
        || a.time_scale <= 0.0
        || a.max_num_seqs == 0
        || a.kv_blocks == 0
        || a.block_size == 0
    {
        eprintln!("infermesh-sim: --time-scale, --max-num-seqs, --kv-blocks and --block-size must be positive");
        std::process::exit(2);
    }
    let config = Config {
        model: a.model,
        name: a.name,
        loras: a.loras,
        profile: Profile {
            max_num_seqs: a.max_num_seqs,
            kv_blocks: a.kv_blocks,
            block_size: a.block_size,
            prefill_overhead: ns(a.prefill_overhead_ms),
            prefill_per_token: ns(a.prefill_per_token_ms),
            inter_token: ns(a.inter_token_ms),
            full_batch_factor: a.full_batch_factor,
            max_loras: a.max_loras.max(1),
            lora_load: ns(a.lora_load_ms),
        },
        time_scale: a.time_scale,
        default_output_tokens: a.output_tokens,
        load_report: a.load_report,
        stream_interval: a.stream_interval,
    };
    let server = match Server::bind(a.addr, config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("infermesh-sim: cannot listen on {}: {e}", a.addr);
            std::process::exit(1);
        }
    };
    match server.local_addr() {
        Ok(addr) => println!("listening addr={addr}"),
        Err(e) => {
            eprintln!("infermesh-sim: {e}");
            std::process::exit(1);
        }
    }
    if let Err(e) = server.run().await {
        eprintln!("infermesh-sim: {e}");
        std::process::exit(1);
    }
}
