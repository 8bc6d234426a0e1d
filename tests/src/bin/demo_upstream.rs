//! An OpenAI-compatible model server for the demo (`scripts/demo.sh`): the
//! same fixture the end-to-end tests run, on a chosen address.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use infermesh_tests::{OpenAiServer, OpenAiSettings};

/// Serves /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models
/// and KServe v2 REST, echoing the model name and tagging answers with
/// `x-upstream: <name>`.
#[derive(Parser, Debug)]
#[command(name = "infermesh-demo-upstream")]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8001")]
    addr: SocketAddr,
    /// Name sent back in the `x-upstream` header.
    #[arg(long, default_value = "demo-upstream")]
    name: String,
    /// Chunks in a streamed chat completion.
    #[arg(long, default_value_t = 10)]
    chunks: usize,
    /// Milliseconds between streamed chunks.
    #[arg(long, default_value_t = 100)]
    gap_ms: u64,
    /// Milliseconds before the response headers.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

fn main() {
    let args = Args::parse();
    let settings = OpenAiSettings {
        stream_chunks: args.chunks,
        chunk_gap: Duration::from_millis(args.gap_ms),
        first_byte_delay: Duration::from_millis(args.delay_ms),
        models: vec!["llama-demo".to_string(), "small-demo".to_string()],
        ..OpenAiSettings::default()
    };
    let server = match OpenAiServer::bind(args.addr, &args.name, settings) {
        Ok(server) => server,
        Err(e) => {
            eprintln!(
                "infermesh-demo-upstream: cannot listen on {}: {e}",
                args.addr
            );
            std::process::exit(1);
        }
    };
    println!("listening addr={} name={}", server.addr(), args.name);
    loop {
        std::thread::park();
    }
}
