//! `infermesh-bench-sse`: times server-sent event streams for
//! `scripts/bench.sh`.
//!
//! Two figures that h2load and wrk do not give:
//!
//! - **time to first event**: from writing a `GET /sse` request on a
//!   keep-alive HTTP/1.1 connection to reading the first `data:` line, over
//!   many short streams (median, p99, spread);
//! - **distinct reads**: one long stream of `--events` events sent
//!   `--gap-ms` apart, read with plain `read(2)` calls; a path that forwards
//!   each event as it comes shows about one read per event, one that buffers
//!   shows far fewer.
//!
//! It speaks just enough HTTP/1.1 for the bench upstream's answers (chunked
//! or `content-length` bodies, or close-delimited) and prints one JSON line.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::Parser;

/// Measures SSE time to first event and distinct reads per stream.
#[derive(Debug, Parser)]
#[command(name = "infermesh-bench-sse")]
struct Args {
    /// Server address (the upstream, or a proxy in front of it).
    #[arg(long)]
    addr: SocketAddr,
    /// Short streams to time for the first-event figure.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Events in the long stream that counts reads.
    #[arg(long, default_value_t = 200)]
    events: u32,
    /// Milliseconds between events of the long stream.
    #[arg(long, default_value_t = 5)]
    gap_ms: u64,
}

/// What one request/response exchange looked like from the client.
#[derive(Debug, Default)]
struct Exchange {
    status: u16,
    first_byte: Duration,
    first_event: Duration,
    total: Duration,
    reads: u32,
    event_reads: u32,
    events: u32,
}

fn main() {
    let args = Args::parse();
    let mut conn: Option<TcpStream> = None;
    let mut first_event = Vec::with_capacity(args.requests);
    let mut first_byte = Vec::with_capacity(args.requests);
    let mut errors = 0u32;
    for _ in 0..args.requests {
        match exchange(&mut conn, args.addr, "/sse?n=3&gap_ms=1") {
            Ok(x) if x.status == 200 && x.events == 3 => {
                first_event.push(x.first_event.as_secs_f64() * 1e6);
                first_byte.push(x.first_byte.as_secs_f64() * 1e6);
            }
            Ok(_) | Err(_) => {
                errors += 1;
                conn = None;
            }
        }
    }
    let path = format!("/sse?n={}&gap_ms={}", args.events, args.gap_ms);
    let stream = exchange(&mut conn, args.addr, &path);
    let stream_json = match stream {
        Ok(x) => format!(
            "{{\"status\":{},\"events\":{},\"reads\":{},\"event_reads\":{},\"first_event_us\":{:.1},\"duration_ms\":{:.1}}}",
            x.status,
            x.events,
            x.reads,
            x.event_reads,
            x.first_event.as_secs_f64() * 1e6,
            x.total.as_secs_f64() * 1e3
        ),
        Err(e) => {
            errors += 1;
            format!("{{\"error\":\"{}\"}}", e.to_string().replace('"', "'"))
        }
    };
    println!(
        "{{\"first_event_us\":{},\"first_byte_us\":{},\"errors\":{},\"stream\":{}}}",
        summary(&mut first_event),
        summary(&mut first_byte),
        errors,
        stream_json
    );
}

/// Sends `GET path` on `conn` (connecting first when there is none) and reads
/// the whole response, noting when bytes and events arrived.
fn exchange(
    conn: &mut Option<TcpStream>,
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<Exchange> {
    if conn.is_none() {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        *conn = Some(stream);
    }
    let stream = conn.as_mut().expect("connected above");
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: bench\r\naccept: text/event-stream\r\n\r\n");
    let start = Instant::now();
    stream.write_all(request.as_bytes())?;

    let mut x = Exchange::default();
    let mut response: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = [0u8; 64 * 1024];
    let mut body_start = None;
    let mut framing = Framing::Close;
    let mut close = false;
    loop {
        let n = stream.read(&mut chunk)?;
        let now = start.elapsed();
        if n == 0 {
            // Close-delimited body, or the server hung up early.
            *conn = None;
            if body_start.is_none() || !matches!(framing, Framing::Close) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed mid-response",
                ));
            }
            break;
        }
        if x.reads == 0 {
            x.first_byte = now;
        }
        x.reads += 1;
        // Count `data:` starts in the new bytes (and across the seam).
        let seam = response.len().saturating_sub(4);
        response.extend_from_slice(&chunk[..n]);
        let new_events = count(&response[seam..], b"data:");
        if new_events > 0 {
            if x.events == 0 {
                x.first_event = now;
            }
            x.events += new_events;
            x.event_reads += 1;
        }
        if body_start.is_none() {
            if let Some(end) = find(&response, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
                x.status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                framing = Framing::from_head(&head);
                close = head.contains("\r\nconnection: close");
                body_start = Some(end + 4);
            }
        }
        if let Some(start_of_body) = body_start {
            let body = &response[start_of_body..];
            let done = match framing {
                Framing::Chunked => {
                    body.ends_with(b"0\r\n\r\n")
                        && (body.len() == 5 || body.ends_with(b"\r\n0\r\n\r\n"))
                }
                Framing::Length(len) => body.len() >= len,
                Framing::Close => false,
            };
            if done {
                break;
            }
        }
    }
    x.total = start.elapsed();
    if close {
        *conn = None;
    }
    Ok(x)
}

enum Framing {
    Chunked,
    Length(usize),
    Close,
}

impl Framing {
    fn from_head(head: &str) -> Framing {
        if head.contains("\r\ntransfer-encoding: chunked") {
            return Framing::Chunked;
        }
        head.split("\r\n")
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .map_or(Framing::Close, Framing::Length)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn count(haystack: &[u8], needle: &[u8]) -> u32 {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count() as u32
}

/// `{"count":…,"p50":…,"p99":…,"min":…,"max":…,"mean":…}` of samples in µs.
fn summary(samples: &mut [f64]) -> String {
    if samples.is_empty() {
        return "{\"count\":0}".to_string();
    }
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    format!(
        "{{\"count\":{},\"p50\":{:.1},\"p99\":{:.1},\"min\":{:.1},\"max\":{:.1},\"mean\":{:.1}}}",
        samples.len(),
        pct(0.5),
        pct(0.99),
        samples[0],
        samples[samples.len() - 1],
        mean
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_is_read_from_the_head() {
        assert!(matches!(
            Framing::from_head("http/1.1 200 ok\r\ntransfer-encoding: chunked"),
            Framing::Chunked
        ));
        assert!(matches!(
            Framing::from_head("http/1.1 200 ok\r\ncontent-length: 12"),
            Framing::Length(12)
        ));
        assert!(matches!(
            Framing::from_head("http/1.1 200 ok"),
            Framing::Close
        ));
    }

    #[test]
    fn events_are_counted_by_their_data_prefix() {
        assert_eq!(count(b"data: a\n\ndata: b\n\n", b"data:"), 2);
        assert_eq!(find(b"ab\r\n\r\ncd", b"\r\n\r\n"), Some(2));
    }
}
