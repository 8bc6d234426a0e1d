//! An OpenAI-compatible model server for the demo (`scripts/demo.sh`): the
//! same fixture the end-to-end tests run, on a chosen address. The pods
//! suite (`tests/tests/pods.rs`) also runs it inside network namespaces,
//! with the KServe gRPC fixture, TCP and UDP echo servers and a server
//! that fails once beside it.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use clap::Parser;
use infermesh_tests::{
    KServeGrpcServer, KServeSettings, OpenAiServer, OpenAiSettings, ScriptedServer, Step,
    TcpEchoServer,
};

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
    /// Also serve the KServe v2 gRPC fixture (`ModelInfer` and the rest) here.
    #[arg(long)]
    grpc_addr: Option<SocketAddr>,
    /// Also run a TCP echo server here (repeatable).
    #[arg(long)]
    echo_addr: Vec<SocketAddr>,
    /// Also run a UDP echo server here: each datagram is sent back to its sender.
    #[arg(long)]
    udp_echo_addr: Option<SocketAddr>,
    /// Also run a server that speaks first here (as MySQL, SMTP and Redis
    /// replicas do): it sends `220 demo-upstream ready\r\n` on each
    /// connection, then echoes.
    #[arg(long)]
    banner_addr: Option<SocketAddr>,
    /// Also serve HTTP here answering 503 to the first request and 200
    /// (a JSON body naming the server) to every later one.
    #[arg(long)]
    flaky_addr: Option<SocketAddr>,
}

fn fail(what: &str, addr: SocketAddr, error: std::io::Error) -> ! {
    eprintln!("infermesh-demo-upstream: cannot listen on {addr} ({what}): {error}");
    std::process::exit(1);
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
    // The extra servers print their lines first: the `listening addr=`
    // line, last, means everything listens.
    let _grpc = args.grpc_addr.map(|addr| {
        let server = KServeGrpcServer::bind(addr, &args.name, KServeSettings::default())
            .unwrap_or_else(|e| fail("gRPC", addr, e));
        println!("listening grpc={}", server.addr());
        server
    });
    let _echoes: Vec<TcpEchoServer> = args
        .echo_addr
        .iter()
        .map(|&addr| {
            let server = TcpEchoServer::bind(addr).unwrap_or_else(|e| fail("echo", addr, e));
            println!("listening echo={}", server.addr());
            server
        })
        .collect();
    if let Some(addr) = args.udp_echo_addr {
        let socket = UdpSocket::bind(addr).unwrap_or_else(|e| fail("UDP echo", addr, e));
        println!("listening udp-echo={}", socket.local_addr().unwrap_or(addr));
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        });
    }
    if let Some(addr) = args.banner_addr {
        let listener =
            std::net::TcpListener::bind(addr).unwrap_or_else(|e| fail("banner", addr, e));
        println!("listening banner={}", listener.local_addr().unwrap_or(addr));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    if stream.write_all(b"220 demo-upstream ready\r\n").is_err() {
                        return;
                    }
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    let _flaky = args.flaky_addr.map(|addr| {
        let server = ScriptedServer::bind(
            addr,
            &format!("{}-flaky", args.name),
            vec![Step::Status(503, None), Step::Status(200, None)],
        )
        .unwrap_or_else(|e| fail("flaky", addr, e));
        println!("listening flaky={}", server.addr());
        server
    });
    let server = OpenAiServer::bind(args.addr, &args.name, settings)
        .unwrap_or_else(|e| fail("OpenAI", args.addr, e));
    println!("listening addr={} name={}", server.addr(), args.name);
    loop {
        std::thread::park();
    }
}
