//! Hostile input against the real proxy: HTTP/1.1 request-smuggling shapes
//! over raw sockets, and HTTP/2 floods (rapid reset, CONTINUATION floods,
//! HPACK bombs, zero flow-control windows), slow readers and 64 MiB uploads.
//!
//! After each attack the proxy must still be running, answer a normal request
//! with the upstream's 200, and keep its memory bounded (`VmHWM`, the peak
//! resident set, from `/proc/<pid>/status`). The upstream fixture records
//! every request it received whole; each smuggling shape is either refused
//! (400 and the connection closed, nothing reaches the upstream) or
//! normalised (the upstream sees exactly the requests the proxy framed, each
//! well formed), and each case says which.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use infermesh_tests::client::{chat_body, full};
use infermesh_tests::{
    policy, HttpClient, KServeGrpcServer, OpenAiServer, ProxyProcess, RecordedRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Growth of the proxy's peak resident set that any one attack may cause.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

/// A proxy whose one route sends everything to one OpenAI fixture over HTTP/1.1.
struct Rig {
    upstream: OpenAiServer,
    proxy: ProxyProcess,
    /// `VmHWM` after start-up and a first request, in KiB.
    baseline_kib: u64,
}

impl Rig {
    async fn start() -> Self {
        let upstream = OpenAiServer::start("up");
        let proxy = ProxyProcess::start(&policy::docs(&[
            policy::backend("up", &[upstream.addr()], "protocol: http1"),
            policy::route("all", "backends:\n  - backend: up\n"),
        ]));
        let mut rig = Rig {
            upstream,
            proxy,
            baseline_kib: 0,
        };
        // Warm both client protocols up, so lazily built state is in the baseline.
        rig.assert_serves("start-up").await;
        let reply = HttpClient::http2()
            .post_json(
                &format!("{}/v1/chat/completions", rig.proxy.url()),
                &chat_body("m", false),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        rig.upstream.clear_requests();
        rig.baseline_kib = status_kib(rig.proxy.pid(), "VmHWM");
        rig
    }

    fn outbound(&self) -> SocketAddr {
        self.proxy.outbound
    }

    /// The proxy runs, a normal request gets the upstream's 200 over HTTP/1.1
    /// and HTTP/2, and its peak memory grew less than the limit. Clears the
    /// upstream's record of requests.
    async fn assert_serves(&mut self, after: &str) {
        assert!(
            self.proxy.try_exit().is_none(),
            "the proxy exited after {after}: {:?}",
            self.proxy.try_exit()
        );
        let url = format!("{}/v1/chat/completions", self.proxy.url());
        for client in [HttpClient::http1(), HttpClient::http2()] {
            let reply = client.post_json(&url, &chat_body("m", false)).await;
            assert_eq!(
                reply.status,
                200,
                "a normal request after {after} failed: {}",
                reply.text()
            );
            assert_eq!(reply.upstream(), Some("up"), "after {after}");
        }
        if self.baseline_kib > 0 {
            let peak = status_kib(self.proxy.pid(), "VmHWM");
            eprintln!(
                "after {after}: VmRSS {} KiB, VmHWM {peak} KiB, baseline VmHWM {} KiB",
                status_kib(self.proxy.pid(), "VmRSS"),
                self.baseline_kib
            );
            assert!(
                peak < self.baseline_kib + RSS_GROWTH_LIMIT_KIB,
                "after {after} the proxy's peak RSS is {peak} KiB, {} KiB over its baseline",
                peak - self.baseline_kib
            );
        }
        self.upstream.clear_requests();
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Waits until the upstream saw `count` streams' clients go away.
async fn wait_clients_gone(upstream: &OpenAiServer, count: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let gone = upstream.client_gone_count();
        if gone >= count || Instant::now() >= deadline {
            return gone;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// === HTTP/1.1 ===

/// One HTTP/1.x response as it came off the wire.
#[derive(Debug, Clone)]
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// What came back on one raw connection.
#[derive(Debug)]
struct Exchange {
    responses: Vec<RawResponse>,
    /// The proxy closed the connection before the timeout.
    closed: bool,
    /// Bytes after the last whole response.
    rest: Vec<u8>,
}

/// Splits whole responses (sized by `content-length`, as the proxy's and the
/// fixture's are) off the front of `buf`.
fn split_responses(buf: &mut Vec<u8>, out: &mut Vec<RawResponse>) {
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        if buf.len() < end + 4 + length {
            return;
        }
        let body = buf[end + 4..end + 4 + length].to_vec();
        buf.drain(..end + 4 + length);
        out.push(RawResponse { status, head, body });
    }
}

/// Writes `bytes` on a new connection and reads until `want` responses came
/// and `linger` passed without more, the proxy closes, or `timeout` passes.
async fn exchange(addr: SocketAddr, bytes: &[u8], want: usize, timeout: Duration) -> Exchange {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The proxy may answer and close before reading everything; that is fine.
    let _ = stream.write_all(bytes).await;
    let linger = Duration::from_millis(300);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut responses = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let closed = loop {
        let until = if responses.len() >= want {
            (tokio::time::Instant::now() + linger).min(deadline)
        } else {
            deadline
        };
        match tokio::time::timeout_at(until, stream.read(&mut chunk)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                split_responses(&mut buf, &mut responses);
            }
        }
    };
    Exchange {
        responses,
        closed,
        rest: buf,
    }
}

/// What the proxy must do with a smuggling shape.
#[derive(Debug)]
enum Expect {
    /// A 4xx of these statuses, the connection closed, nothing at the upstream.
    Refused(&'static [u16]),
    /// The upstream receives exactly these requests `(method, path, body)`,
    /// in order, each framed by one `content-length` or by chunking alone;
    /// the client gets the upstream's answer to each, and nothing else.
    Forwarded(&'static [(&'static str, &'static str, &'static [u8])]),
}

const BAD_REQUEST: &[u16] = &[400];

/// Runs each case on its own connection and checks what the client and the
/// upstream saw; then the proxy must still serve.
async fn run_cases(rig: &mut Rig, cases: &[(&str, Vec<u8>, Expect)]) {
    let mut failures = Vec::new();
    for (name, bytes, expect) in cases {
        let want = match expect {
            Expect::Refused(_) => 1,
            Expect::Forwarded(requests) => requests.len(),
        };
        let got = exchange(rig.outbound(), bytes, want, Duration::from_secs(5)).await;
        // Give a request the proxy forwarded time to land before looking.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = rig.upstream.requests();
        if let Err(why) = check_case(expect, &got, &seen) {
            failures.push(format!(
                "{name}: {why}\n  sent {:?}\n  got {:?} closed={} rest={:?}\n  upstream saw {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)]),
                got.responses
                    .iter()
                    .map(|r| format!("{} {}", r.head, String::from_utf8_lossy(&r.body)))
                    .collect::<Vec<_>>(),
                got.closed,
                String::from_utf8_lossy(&got.rest),
                seen.iter()
                    .map(|r| format!(
                        "{} {} {:?} {:?}",
                        r.method,
                        r.uri,
                        r.headers,
                        String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
                    ))
                    .collect::<Vec<_>>()
            ));
        }
        rig.upstream.clear_requests();
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    rig.assert_serves("the smuggling shapes").await;
}

fn check_case(expect: &Expect, got: &Exchange, seen: &[RecordedRequest]) -> Result<(), String> {
    match expect {
        Expect::Refused(statuses) => {
            let Some(first) = got.responses.first() else {
                return Err(format!("no response; expected one of {statuses:?}"));
            };
            if !statuses.contains(&first.status) {
                return Err(format!("status {}, expected {statuses:?}", first.status));
            }
            if got.responses.len() != 1 {
                return Err(format!("{} responses, expected 1", got.responses.len()));
            }
            if !got.closed {
                return Err("the connection stayed open after the refusal".into());
            }
            if !seen.is_empty() {
                return Err(format!("{} request(s) reached the upstream", seen.len()));
            }
        }
        Expect::Forwarded(requests) => {
            // One answer per request, each from the upstream (a body that
            // is not JSON gets the fixture's own 400).
            let from_upstream = got
                .responses
                .iter()
                .filter(|r| r.head.to_ascii_lowercase().contains("\r\nx-upstream: up"))
                .count();
            if got.responses.len() != requests.len() || from_upstream != requests.len() {
                return Err(format!(
                    "{} responses, {from_upstream} from the upstream; expected {}",
                    got.responses.len(),
                    requests.len()
                ));
            }
            if seen.len() != requests.len() {
                return Err(format!(
                    "the upstream saw {} requests, expected {}",
                    seen.len(),
                    requests.len()
                ));
            }
            for (i, ((method, path, body), recorded)) in requests.iter().zip(seen).enumerate() {
                if recorded.method.as_str() != *method || recorded.uri.path() != *path {
                    return Err(format!(
                        "request {i} reached the upstream as {} {}, expected {method} {path}",
                        recorded.method, recorded.uri
                    ));
                }
                if recorded.body.as_ref() != *body {
                    return Err(format!("request {i}'s body changed"));
                }
                let lengths = recorded.headers.get_all("content-length").iter().count();
                let chunked = recorded.headers.contains_key("transfer-encoding");
                if lengths > 1 || (lengths == 1 && chunked) {
                    return Err(format!(
                        "request {i} reached the upstream with {lengths} content-length and \
                         transfer-encoding {chunked}"
                    ));
                }
                if recorded.headers.get_all("host").iter().count() > 1 {
                    return Err(format!("request {i} reached the upstream with two hosts"));
                }
            }
        }
    }
    Ok(())
}

fn bytes(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

const SMUGGLED: &[u8] = b"GET /echo/smuggled HTTP/1.1\r\nhost: a\r\n\r\n";

#[tokio::test]
async fn framing_header_shapes_are_refused_or_normalised() {
    let mut rig = Rig::start().await;
    let cases = [
        (
            "two different content-lengths",
            bytes(&[
                b"POST /echo/a HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 5\r\n\r\nhello",
            ]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "two equal content-lengths are one",
            bytes(&[
                b"POST /echo/a HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello",
            ]),
            Expect::Forwarded(&[("POST", "/echo/a", b"hello")]),
        ),
        (
            "a content-length list",
            bytes(&[b"POST /echo/a HTTP/1.1\r\nhost: a\r\ncontent-length: 5, 5\r\n\r\nhello"]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "a signed content-length",
            bytes(&[b"POST /echo/a HTTP/1.1\r\nhost: a\r\ncontent-length: +5\r\n\r\nhello"]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "a content-length past u64",
            bytes(&[
                b"POST /echo/a HTTP/1.1\r\nhost: a\r\ncontent-length: 99999999999999999999999\r\n\r\nhello",
            ]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            // RFC 9112 section 6.3: chunked wins, content-length goes, and the
            // connection closes after the answer, so the bytes after the
            // chunked body are never read as a request.
            "content-length then chunked, a request after the chunked body",
            bytes(&[
                b"POST /echo/a HTTP/1.1\r\nhost: a\r\ncontent-length: 47\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                SMUGGLED,
            ]),
            Expect::Forwarded(&[("POST", "/echo/a", b"")]),
        ),
        (
            "chunked then content-length, a request after the chunked body",
            bytes(&[
                b"POST /echo/a HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 47\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                SMUGGLED,
            ]),
            Expect::Forwarded(&[("POST", "/echo/a", b"hello")]),
        ),
        (
            "chunked, then a second transfer-encoding that is not",
            bytes(&[
                b"POST /echo/a HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ntransfer-encoding: identity\r\n\r\n0\r\n\r\n",
            ]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "transfer-encoding: chunked, identity",
            bytes(&[
                b"POST /echo/a HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, identity\r\ncontent-length: 5\r\n\r\nhello",
            ]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "transfer-encoding: xchunked",
            bytes(&[
                b"POST /echo/a HTTP/1.1\r\nhost: a\r\ntransfer-encoding: xchunked\r\ncontent-length: 5\r\n\r\nhello",
            ]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "transfer-encoding: chunked with a parameter",
            bytes(&[
                b"POST /echo/a HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked;x=1\r\ncontent-length: 5\r\n\r\nhello",
            ]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "a space before the colon of transfer-encoding",
            bytes(&[
                b"POST /echo/a HTTP/1.1\r\nhost: a\r\ntransfer-encoding : chunked\r\ncontent-length: 5\r\n\r\nhello",
            ]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "transfer-encoding folded onto a second line",
            bytes(&[
                b"POST /echo/a HTTP/1.1\r\nhost: a\r\ntransfer-encoding:\r\n chunked\r\ncontent-length: 5\r\n\r\nhello",
            ]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "a tab before chunked is still chunked",
            bytes(&[
                b"POST /echo/a HTTP/1.1\r\nhost: a\r\ntransfer-encoding:\tchunked\r\ncontent-length: 47\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                SMUGGLED,
            ]),
            Expect::Forwarded(&[("POST", "/echo/a", b"hello")]),
        ),
        (
            "CHUNKED in capitals is chunked",
            bytes(&[
                b"POST /echo/a HTTP/1.1\r\nhost: a\r\ntransfer-encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            ]),
            Expect::Forwarded(&[("POST", "/echo/a", b"hello")]),
        ),
        (
            "transfer-encoding on HTTP/1.0",
            bytes(&[
                b"POST /echo/a HTTP/1.0\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\nhello",
            ]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "header folding (obs-fold)",
            bytes(&[b"GET /echo/a HTTP/1.1\r\nhost: a\r\nx-folded: one\r\n two\r\n\r\n"]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "a NUL byte in a header value",
            bytes(&[b"GET /echo/a HTTP/1.1\r\nhost: a\r\nx-nul: a\x00b\r\n\r\n"]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "a NUL byte in a header name",
            bytes(&[b"GET /echo/a HTTP/1.1\r\nhost: a\r\nx-n\x00ul: ab\r\n\r\n"]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "a NUL byte in the target",
            bytes(&[b"GET /echo/a\x00b HTTP/1.1\r\nhost: a\r\n\r\n"]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "a bare CR ends a line",
            bytes(&[b"GET /echo/a HTTP/1.1\rhost: a\r\n\r\n"]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "a bare CR inside a header value",
            bytes(&[b"GET /echo/a HTTP/1.1\r\nhost: a\r\nx-cr: a\rb\r\n\r\n"]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            // RFC 9112 section 2.2 lets a recipient accept a bare LF as a line end.
            "bare LF line ends",
            bytes(&[b"GET /echo/lf HTTP/1.1\nhost: a\n\n"]),
            Expect::Forwarded(&[("GET", "/echo/lf", b"")]),
        ),
        (
            "an unknown version",
            bytes(&[b"GET /echo/a HTTP/1.2\r\nhost: a\r\n\r\n"]),
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "a request line with two spaces",
            bytes(&[b"GET  /echo/a HTTP/1.1\r\nhost: a\r\n\r\n"]),
            Expect::Refused(BAD_REQUEST),
        ),
    ];
    run_cases(&mut rig, &cases).await;
}

#[tokio::test]
async fn pipelined_requests_after_a_body_reach_the_upstream_as_framed() {
    let mut rig = Rig::start().await;
    let chat = chat_body("m", false);
    let chat_request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{chat}",
        chat.len()
    );
    // Leaked so the expectations can borrow it for 'static.
    let chat: &'static [u8] = Box::leak(chat.into_bytes().into_boxed_slice());
    let chunked_smuggled = bytes(&[
        format!("{:x}\r\n", SMUGGLED.len()).as_bytes(),
        SMUGGLED,
        b"\r\n0\r\n\r\n",
    ]);
    let cases = [
        (
            "a request inside a content-length body, then a real one",
            bytes(&[
                format!(
                    "POST /echo/one HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n\r\n",
                    SMUGGLED.len()
                )
                .as_bytes(),
                SMUGGLED,
                b"GET /echo/two HTTP/1.1\r\nhost: a\r\n\r\n",
            ]),
            Expect::Forwarded(&[("POST", "/echo/one", SMUGGLED), ("GET", "/echo/two", b"")]),
        ),
        (
            "a request inside a chunk, then a real one",
            bytes(&[
                b"POST /echo/one HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n",
                &chunked_smuggled,
                b"GET /echo/two HTTP/1.1\r\nhost: a\r\n\r\n",
            ]),
            Expect::Forwarded(&[("POST", "/echo/one", SMUGGLED), ("GET", "/echo/two", b"")]),
        ),
        (
            "a chunk extension and a trailer, then a real request",
            bytes(&[
                b"POST /echo/one HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5;ext=\"x\"\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\n",
                b"GET /echo/two HTTP/1.1\r\nhost: a\r\n\r\n",
            ]),
            Expect::Forwarded(&[("POST", "/echo/one", b"hello"), ("GET", "/echo/two", b"")]),
        ),
        (
            "a classified chat body, then a real request",
            bytes(&[
                chat_request.as_bytes(),
                b"GET /echo/two HTTP/1.1\r\nhost: a\r\n\r\n",
            ]),
            Expect::Forwarded(
                Box::leak(Box::new([
                    ("POST", "/v1/chat/completions", chat),
                    ("GET", "/echo/two", b"" as &[u8]),
                ]))
                .as_slice(),
            ),
        ),
        (
            "a chunked chat body holding a request, then a real one",
            bytes(&[
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
                format!("{:x}\r\n", chat.len()).as_bytes(),
                chat,
                b"\r\n",
                &chunked_smuggled,
                b"GET /echo/two HTTP/1.1\r\nhost: a\r\n\r\n",
            ]),
            // The body is a JSON object followed by more: refused (the
            // model it names may not be the one an upstream parser sees),
            // the connection closed, the smuggled text never a request.
            Expect::Refused(BAD_REQUEST),
        ),
        (
            "twenty pipelined requests",
            b"GET /echo/p HTTP/1.1\r\nhost: a\r\n\r\n".repeat(20),
            Expect::Forwarded(&[("GET", "/echo/p", b"" as &[u8]); 20]),
        ),
    ];
    run_cases(&mut rig, &cases).await;
}

/// Writes `bytes` in pieces of `piece` bytes, `gap` apart.
async fn dribble(stream: &mut TcpStream, bytes: &[u8], piece: usize, gap: Duration) {
    for part in bytes.chunks(piece) {
        stream.write_all(part).await.expect("write");
        stream.flush().await.expect("flush");
        tokio::time::sleep(gap).await;
    }
}

/// Reads until `want` whole responses came in, or panics after 10 s.
async fn read_responses(stream: &mut TcpStream, want: usize) -> Vec<RawResponse> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < want {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                buf.extend_from_slice(&chunk[..n]);
                split_responses(&mut buf, &mut out);
            }
            other => panic!("{} of {want} responses, then {other:?}", out.len()),
        }
    }
    out
}

/// An idle keep-alive connection holds no read or write buffer in the proxy
/// (a patch to hyper, see third_party/hyper): what arrives after a pause is
/// read into the stack and copied out. Requests that come a byte at a time,
/// after idle pauses, with heads larger than one such read, and pipelined,
/// must still reach the upstream whole.
#[tokio::test]
async fn requests_in_pieces_and_after_idle_pauses_reach_the_upstream_whole() {
    let mut rig = Rig::start().await;
    let mut stream = TcpStream::connect(rig.outbound()).await.expect("connect");
    let chat = chat_body("m", false);
    let chat_request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{chat}",
        chat.len()
    );
    // 1. A byte at a time: every read finds the buffer released.
    dribble(
        &mut stream,
        chat_request.as_bytes(),
        1,
        Duration::from_millis(1),
    )
    .await;
    let first = read_responses(&mut stream, 1).await;
    assert_eq!(first[0].status, 200, "{}", first[0].head);
    // 2. After an idle pause, a 20 KiB header value (more than one 8 KiB
    //    read) in 3,000-byte pieces, the body split from its head.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let long_value = "v".repeat(20 * 1024);
    let long_head = format!(
        "POST /echo/long HTTP/1.1\r\nhost: a\r\nx-long: {long_value}\r\ncontent-length: 5\r\n\r\n"
    );
    dribble(
        &mut stream,
        long_head.as_bytes(),
        3000,
        Duration::from_millis(5),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    dribble(&mut stream, b"hello", 2, Duration::from_millis(5)).await;
    let second = read_responses(&mut stream, 1).await;
    assert_eq!(second[0].status, 200, "{}", second[0].head);
    // 3. After another pause, three pipelined requests in one write.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream
        .write_all(&b"GET /echo/p HTTP/1.1\r\nhost: a\r\n\r\n".repeat(3))
        .await
        .expect("write");
    let third = read_responses(&mut stream, 3).await;
    assert!(third.iter().all(|r| r.status == 200), "{third:?}");

    let seen = rig.upstream.requests();
    let paths: Vec<_> = seen.iter().map(|r| r.uri.path().to_string()).collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/echo/long",
            "/echo/p",
            "/echo/p",
            "/echo/p"
        ],
        "{seen:?}"
    );
    assert_eq!(seen[0].body, chat.as_bytes());
    assert_eq!(seen[1].headers["x-long"], long_value.as_str());
    assert_eq!(seen[1].body, &b"hello"[..]);
    drop(stream);
    rig.assert_serves("requests in pieces").await;
}

#[tokio::test]
async fn oversized_heads_are_refused() {
    let mut rig = Rig::start().await;
    let long_target = bytes(&[
        b"GET /echo/",
        &vec![b'a'; 200 * 1024],
        b" HTTP/1.1\r\nhost: a\r\n\r\n",
    ]);
    let long_uri = bytes(&[
        b"GET /echo/",
        &vec![b'a'; 70 * 1024],
        b" HTTP/1.1\r\nhost: a\r\n\r\n",
    ]);
    let long_header = bytes(&[
        b"GET /echo/a HTTP/1.1\r\nhost: a\r\nx-long: ",
        &vec![b'a'; 200 * 1024],
        b"\r\n\r\n",
    ]);
    let many_headers = bytes(&[
        b"GET /echo/a HTTP/1.1\r\nhost: a\r\n",
        &b"x-h: 1\r\n".repeat(5000),
        b"\r\n",
    ]);
    let too_large: &[u16] = &[400, 414, 431];
    let cases = [
        (
            "a 200 KiB request line",
            long_target,
            Expect::Refused(too_large),
        ),
        ("a 70 KiB target", long_uri, Expect::Refused(too_large)),
        (
            "a 200 KiB header value",
            long_header,
            Expect::Refused(too_large),
        ),
        ("5,000 headers", many_headers, Expect::Refused(too_large)),
    ];
    run_cases(&mut rig, &cases).await;
}

#[tokio::test]
async fn bad_chunk_sizes_are_refused_with_400() {
    let mut rig = Rig::start().await;
    let cases: Vec<(&str, Vec<u8>, Expect)> = [
        ("a chunk size past u64", &b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n"[..]),
        ("a negative chunk size", b"-5\r\nhello\r\n0\r\n\r\n"),
        ("a 0x chunk size", b"0x5\r\nhello\r\n0\r\n\r\n"),
        ("a chunk longer than its size", b"3\r\nhello\r\n0\r\n\r\n"),
        ("a chunk size that is not hex", b"zz\r\nhello\r\n0\r\n\r\n"),
    ]
    .into_iter()
    .flat_map(|(name, body)| {
        // A plain route streams the body on; a chat route reads it to classify first.
        ["/echo/a", "/v1/chat/completions"].map(|path| {
            (
                name,
                bytes(&[
                    format!(
                        "POST {path} HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                    )
                    .as_bytes(),
                    body,
                ]),
                Expect::Refused(BAD_REQUEST),
            )
        })
    })
    .collect();
    run_cases(&mut rig, &cases).await;
}

#[tokio::test]
async fn two_host_headers_are_refused() {
    let mut rig = Rig::start().await;
    // RFC 9112 section 3.2: more than one Host is a 400.
    let got = exchange(
        rig.outbound(),
        b"GET /echo/a HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        1,
        Duration::from_secs(5),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    check_case(
        &Expect::Refused(BAD_REQUEST),
        &got,
        &rig.upstream.requests(),
    )
    .unwrap_or_else(|why| panic!("two Host headers: {why}: {got:?}"));
    rig.assert_serves("two Host headers").await;
}

#[tokio::test]
async fn an_absolute_form_target_replaces_host() {
    let mut rig = Rig::start().await;
    // RFC 9112 section 3.2.2: an absolute-form target's authority replaces
    // Host; either refused or forwarded with the target's host alone.
    let got = exchange(
        rig.outbound(),
        b"GET http://other.example/echo/abs HTTP/1.1\r\nhost: a\r\n\r\n",
        1,
        Duration::from_secs(5),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = rig.upstream.requests();
    match got.responses.first().map(|r| r.status) {
        Some(400) => assert!(seen.is_empty(), "refused, yet forwarded: {seen:?}"),
        Some(200) => {
            assert_eq!(seen.len(), 1, "{seen:?}");
            let hosts: Vec<_> = seen[0].headers.get_all("host").iter().collect();
            assert_eq!(hosts, ["other.example"], "{seen:?}");
        }
        other => panic!("absolute-form target: status {other:?}: {got:?}"),
    }
    rig.assert_serves("an absolute-form target").await;
}

#[tokio::test]
async fn refused_heads_say_why_in_json() {
    let rig = Rig::start().await;
    for (name, request) in [
        (
            "two different content-lengths",
            b"POST /echo/a HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
        ),
        (
            "a NUL byte in a header value",
            b"GET /echo/a HTTP/1.1\r\nhost: a\r\nx-nul: a\x00b\r\n\r\n".to_vec(),
        ),
        (
            "a 200 KiB request line",
            bytes(&[b"GET /echo/", &vec![b'a'; 200 * 1024], b" HTTP/1.1\r\nhost: a\r\n\r\n"]),
        ),
    ] {
        let got = exchange(rig.outbound(), &request, 1, Duration::from_secs(5)).await;
        let response = got
            .responses
            .first()
            .unwrap_or_else(|| panic!("{name}: no response"));
        assert!(
            (400..500).contains(&response.status),
            "{name}: {}",
            response.head
        );
        let json: Option<serde_json::Value> = serde_json::from_slice(&response.body).ok();
        let message = json
            .as_ref()
            .and_then(|j| j["error"]["message"].as_str())
            .map(str::to_owned);
        assert!(
            message.is_some_and(|m| !m.is_empty()),
            "{name}: {} with body {:?}: no JSON error saying why",
            response.status,
            String::from_utf8_lossy(&response.body)
        );
    }
}

#[tokio::test]
async fn a_repeated_grpc_model_name_reaches_no_backend_of_another_model() {
    let resnet = KServeGrpcServer::start("grpc-resnet");
    let bert = KServeGrpcServer::start("grpc-bert");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("resnet", &[resnet.addr()], "protocol: http2"),
        policy::backend("bert", &[bert.addr()], "protocol: http2"),
        policy::route(
            "resnet",
            "match:\n  - model: {exact: resnet50}\nbackends:\n  - backend: resnet\n",
        ),
        policy::route(
            "bert",
            "match:\n  - model: {exact: bert-base}\nbackends:\n  - backend: bert\n",
        ),
    ]));
    // ModelInferRequest with field 1 (model_name) twice: protobuf decoders,
    // the upstream's included, keep the last one.
    let mut message = vec![0x0a, 8];
    message.extend_from_slice(b"resnet50");
    message.extend_from_slice(&[0x0a, 9]);
    message.extend_from_slice(b"bert-base");
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let request = Request::post(format!(
        "{}/inference.GRPCInferenceService/ModelInfer",
        proxy.url()
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(full(frame))
    .unwrap();
    let reply = HttpClient::http2().fetch(request).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let misrouted: Vec<String> = resnet
        .calls()
        .iter()
        .map(|c| c.model_name.clone())
        .filter(|m| m != "resnet50")
        .collect();
    assert!(
        misrouted.is_empty(),
        "the resnet50 backend served {misrouted:?} (reply {} from {:?})",
        reply.status,
        reply.upstream()
    );
}

#[tokio::test]
async fn a_64_mib_upload_streams_through_without_being_held() {
    let mut rig = Rig::start().await;
    let size = 64 << 20;
    let prefix = br#"{"model":"m","messages":[{"role":"user","content":""#;
    let suffix = br#""}]}"#;
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(prefix);
    body.resize(size - suffix.len(), b'a');
    body.extend_from_slice(suffix);
    let body = Bytes::from(body);
    let url = format!("{}/v1/chat/completions", rig.proxy.url());
    for (version, client) in [
        ("HTTP/1.1", HttpClient::http1()),
        ("HTTP/2", HttpClient::http2()),
    ] {
        let reply = client.post_json(&url, &chat_body("m", false)).await;
        assert_eq!(reply.status, 200, "{version} warm-up: {}", reply.text());
        rig.upstream.clear_requests();
        let started = Instant::now();
        let request = Request::post(&url)
            .header("content-type", "application/json")
            .body(full(body.clone()))
            .unwrap();
        let reply = client.fetch(request).await;
        assert_eq!(reply.status, 200, "{version}: {}", reply.text());
        let seen = rig.upstream.requests();
        assert_eq!(seen.len(), 1, "{version}");
        assert_eq!(seen[0].body.len(), size, "{version}");
        assert!(
            seen[0].body == body,
            "{version}: the body changed on the way"
        );
        let peak = status_kib(rig.proxy.pid(), "VmHWM");
        eprintln!(
            "{version}: 64 MiB in {:?}, proxy peak RSS {peak} KiB (baseline {} KiB)",
            started.elapsed(),
            rig.baseline_kib
        );
        // Streamed, not held: a quarter of the body would already be too much.
        assert!(
            peak < rig.baseline_kib + 16 * 1024,
            "{version}: the proxy's peak RSS grew by {} KiB for a 64 MiB upload",
            peak - rig.baseline_kib
        );
        rig.assert_serves(&format!("a 64 MiB upload over {version}"))
            .await;
    }
}

#[tokio::test]
async fn slow_readers_hold_bounded_memory() {
    let mut rig = Rig::start().await;
    // Each connection asks for a long stream and reads none of it.
    let mut idle = Vec::new();
    for i in 0..50 {
        let body = chat_body("m", true);
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\nx-test-chunks: 20000\r\nx-test-gap-ms: 0\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(rig.outbound()).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        idle.push(stream);
        if i == 0 {
            assert!(
                rig.upstream
                    .wait_streams_started(1, Duration::from_secs(5))
                    .await
            );
        }
    }
    assert!(
        rig.upstream
            .wait_streams_started(50, Duration::from_secs(10))
            .await,
        "not every stream reached the upstream"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.assert_serves("50 slow readers (still connected)").await;
    drop(idle);
    // Each abandoned stream is closed upstream, not left running.
    let gone = wait_clients_gone(&rig.upstream, 50, Duration::from_secs(10)).await;
    assert_eq!(
        gone, 50,
        "upstream streams still open after their clients left"
    );
    rig.assert_serves("50 slow readers (gone)").await;
}

// === HTTP/2 ===

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A literal header without indexing, with a literal name (no Huffman).
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// The pseudo-headers of `GET path` over http (static table, literal path and authority).
fn hpack_get(path: &[u8]) -> Vec<u8> {
    let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
    block.push(0x04); // :path, literal without indexing, indexed name
    hpack_int(&mut block, 0, 7, path.len());
    block.extend_from_slice(path);
    block.push(0x01); // :authority
    hpack_int(&mut block, 0, 7, 1);
    block.push(b'a');
    block
}

/// A raw HTTP/2 connection that has sent its preface and empty SETTINGS,
/// with a task that reads and drops what the proxy sends and reports whether
/// a GOAWAY came and when the connection ended.
struct RawH2 {
    writer: tokio::net::tcp::OwnedWriteHalf,
    reader: tokio::task::JoinHandle<H2Ending>,
}

#[derive(Debug)]
struct H2Ending {
    goaway: Option<u32>,
    /// HEADERS frames the proxy sent (responses).
    header_blocks: usize,
    data_frames: usize,
}

impl RawH2 {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut read, mut writer) = stream.into_split();
        writer.write_all(H2_PREFACE).await.unwrap();
        writer
            .write_all(&frame(FRAME_SETTINGS, 0, 0, &[]))
            .await
            .unwrap();
        let reader = tokio::spawn(async move {
            let mut ending = H2Ending {
                goaway: None,
                header_blocks: 0,
                data_frames: 0,
            };
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match read.read(&mut chunk).await {
                    Ok(0) | Err(_) => return ending,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                while buf.len() >= 9 {
                    let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                    if buf.len() < 9 + len {
                        break;
                    }
                    match buf[3] {
                        FRAME_GOAWAY if len >= 8 => {
                            ending.goaway =
                                Some(u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]))
                        }
                        FRAME_HEADERS => ending.header_blocks += 1,
                        FRAME_DATA => ending.data_frames += 1,
                        _ => {}
                    }
                    buf.drain(..9 + len);
                }
            }
        });
        RawH2 { writer, reader }
    }

    /// Writes until the proxy stops taking bytes or `budget` bytes went;
    /// returns the bytes written.
    async fn flood(&mut self, mut next: impl FnMut(usize) -> Vec<u8>, budget: usize) -> usize {
        let mut sent = 0;
        let mut i = 0;
        while sent < budget {
            let bytes = next(i);
            i += 1;
            match tokio::time::timeout(Duration::from_secs(5), self.writer.write_all(&bytes)).await
            {
                Ok(Ok(())) => sent += bytes.len(),
                // Refused (closed) or no longer read (stalled): the proxy stopped taking it.
                Ok(Err(_)) | Err(_) => break,
            }
        }
        sent
    }

    /// Waits for the proxy to close the connection.
    async fn ending(self, timeout: Duration) -> Option<H2Ending> {
        let RawH2 { writer, reader } = self;
        drop(writer);
        tokio::time::timeout(timeout, reader)
            .await
            .ok()
            .map(|r| r.expect("reader task"))
    }
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off() {
    let mut rig = Rig::start().await;
    // HEADERS without END_HEADERS, then CONTINUATION frames of new literal
    // headers, 16 KiB each, for as long as the proxy takes them.
    let mut raw = RawH2::connect(rig.outbound()).await;
    raw.writer
        .write_all(&frame(
            FRAME_HEADERS,
            FLAG_END_STREAM,
            1,
            &hpack_get(b"/echo/flood"),
        ))
        .await
        .unwrap();
    let budget = 256 << 20;
    let sent = raw
        .flood(
            |i| {
                let mut block = Vec::new();
                while block.len() < 16_000 {
                    hpack_literal(&mut block, format!("x-flood-{i}").as_bytes(), &[b'a'; 1000]);
                }
                frame(FRAME_CONTINUATION, 0, 1, &block)
            },
            budget,
        )
        .await;
    assert!(
        sent < budget,
        "the proxy took {sent} bytes of one header block"
    );
    let ending = raw.ending(Duration::from_secs(10)).await;
    eprintln!("CONTINUATION flood: cut after {sent} bytes: {ending:?}");
    let ending = ending.expect("the connection stayed open");
    assert!(ending.goaway.is_some(), "closed without a GOAWAY");
    assert_eq!(ending.header_blocks, 0, "the flooded stream was answered");
    assert_eq!(rig.upstream.request_count(), 0);
    rig.assert_serves("a CONTINUATION flood").await;

    // Empty CONTINUATION frames cost the proxy no memory but all of a core:
    // the connection must not be kept busy forever.
    let mut raw = RawH2::connect(rig.outbound()).await;
    raw.writer
        .write_all(&frame(
            FRAME_HEADERS,
            FLAG_END_STREAM,
            1,
            &hpack_get(b"/echo/flood"),
        ))
        .await
        .unwrap();
    let empty = frame(FRAME_CONTINUATION, 0, 1, &[]).repeat(10_000);
    let started = Instant::now();
    let sent = raw.flood(|_| empty.clone(), 90 * 10_000 * 1000).await;
    eprintln!(
        "empty CONTINUATION flood: {} frames in {:?}",
        sent / 9,
        started.elapsed()
    );
    let ending = raw.ending(Duration::from_secs(10)).await;
    assert!(
        ending.is_some(),
        "the connection stayed open after {} empty CONTINUATION frames",
        sent / 9
    );
    assert_eq!(rig.upstream.request_count(), 0);
    rig.assert_serves("an empty-CONTINUATION flood").await;
}

#[tokio::test]
async fn an_hpack_bomb_is_refused() {
    let mut rig = Rig::start().await;
    let mut raw = RawH2::connect(rig.outbound()).await;
    // One 4,000-byte header inserted into the dynamic table, then referenced
    // by one byte (index 62) 15,000 times: 60 MB decoded from one 16 KB frame,
    // on 20 streams.
    for n in 0..20u32 {
        let mut block = hpack_get(b"/echo/bomb");
        if n == 0 {
            block.push(0x40);
            hpack_int(&mut block, 0, 7, 6);
            block.extend_from_slice(b"x-bomb");
            hpack_int(&mut block, 0, 7, 4000);
            block.extend_from_slice(&[b'a'; 4000]);
        }
        block.extend_from_slice(&[0x80 | 62; 12_000]);
        let written = raw
            .writer
            .write_all(&frame(
                FRAME_HEADERS,
                FLAG_END_STREAM | FLAG_END_HEADERS,
                1 + 2 * n,
                &block,
            ))
            .await;
        if written.is_err() {
            break;
        }
    }
    let ending = raw.ending(Duration::from_secs(10)).await;
    eprintln!("HPACK bomb: {ending:?}");
    let ending = ending.expect("the connection stayed open");
    assert!(ending.goaway.is_some(), "closed without a GOAWAY");
    assert_eq!(ending.header_blocks, 0, "a bombed stream was answered");
    assert_eq!(
        rig.upstream.request_count(),
        0,
        "a bombed request reached the upstream"
    );
    rig.assert_serves("an HPACK bomb").await;
}

#[tokio::test]
async fn http2_requests_cannot_smuggle_into_an_http1_upstream() {
    let mut rig = Rig::start().await;
    // Streams whose HTTP/2 framing disagrees with what an HTTP/1.1 rendering
    // of them would say: the upstream (spoken to over HTTP/1.1) must see
    // at most the request the HTTP/2 stream framed, never a second one.
    let post = |path: &[u8], extra: &[(&[u8], &[u8])]| {
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
        block.push(0x04);
        hpack_int(&mut block, 0, 7, path.len());
        block.extend_from_slice(path);
        block.push(0x01);
        hpack_int(&mut block, 0, 7, 1);
        block.push(b'a');
        for (name, value) in extra {
            hpack_literal(&mut block, name, value);
        }
        block
    };
    let chunked_body = [&b"0\r\n\r\n"[..], SMUGGLED].concat();
    let streams: [(&str, Vec<u8>, Vec<u8>); 4] = [
        (
            "content-length 0 with a request as DATA",
            post(b"/echo/h2-cl", &[(b"content-length", b"0")]),
            SMUGGLED.to_vec(),
        ),
        (
            "content-length shorter than the DATA",
            post(b"/echo/h2-short", &[(b"content-length", b"2")]),
            [&b"{}"[..], SMUGGLED].concat(),
        ),
        (
            "transfer-encoding: chunked",
            post(b"/echo/h2-te", &[(b"transfer-encoding", b"chunked")]),
            chunked_body,
        ),
        (
            "CR LF inside a header value",
            post(
                b"/echo/h2-crlf",
                &[(
                    b"x-split",
                    b"a\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nhost: a",
                )],
            ),
            b"{}".to_vec(),
        ),
    ];
    for (n, (name, head, body)) in streams.iter().enumerate() {
        let mut raw = RawH2::connect(rig.outbound()).await;
        let id = 1;
        let mut bytes = frame(FRAME_HEADERS, FLAG_END_HEADERS, id, head);
        bytes.extend(frame(FRAME_DATA, FLAG_END_STREAM, id, body));
        raw.writer.write_all(&bytes).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = rig.upstream.requests();
        for request in &seen {
            assert!(
                !request.uri.path().contains("smuggled"),
                "{name}: a smuggled request reached the upstream: {seen:?}"
            );
            let declared: Option<usize> = request
                .headers
                .get("content-length")
                .and_then(|v| v.to_str().ok()?.parse().ok());
            assert!(
                declared.is_none_or(|len| len == request.body.len()),
                "{name}: the upstream got a body of {} bytes under content-length {declared:?}",
                request.body.len()
            );
            assert!(
                !request.body.windows(SMUGGLED.len()).any(|w| w == SMUGGLED)
                    || request.uri.path() == "/echo/h2-te",
                "{name}: the upstream got the request as a body: {seen:?}"
            );
        }
        assert!(seen.len() <= 1, "{name} (stream {n}): {seen:?}");
        eprintln!(
            "{name}: the upstream saw {:?}",
            seen.iter()
                .map(|r| format!("{} {} {:?}", r.method, r.uri, r.body))
                .collect::<Vec<_>>()
        );
        drop(raw);
        rig.assert_serves(name).await;
    }
}

#[tokio::test]
async fn rapid_reset_floods_leave_the_proxy_serving() {
    let mut rig = Rig::start().await;
    let started = Instant::now();
    let mut opened = 0usize;
    for _connection in 0..4 {
        let tcp = TcpStream::connect(rig.outbound()).await.unwrap();
        let Ok((client, connection)) = h2::client::handshake(tcp).await else {
            continue;
        };
        let driver = tokio::spawn(connection);
        // The loop owns the client; it is dropped when the loop ends.
        let mut client = client;
        for _ in 0..5_000 {
            client = match client.ready().await {
                Ok(ready) => ready,
                Err(_) => break,
            };
            // A request the proxy forwards at once, reset as soon as sent.
            let request = http::Request::builder()
                .method(Method::GET)
                .uri(format!("http://{}/echo/reset", rig.outbound()))
                .body(())
                .unwrap();
            let Ok((_response, mut stream)) = client.send_request(request, true) else {
                break;
            };
            stream.send_reset(h2::Reason::CANCEL);
            opened += 1;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    }
    eprintln!(
        "rapid reset: {opened} streams opened and reset in {:?}; the upstream saw {}",
        started.elapsed(),
        rig.upstream.request_count()
    );
    assert!(opened > 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    rig.assert_serves("a rapid-reset flood").await;
}

#[tokio::test]
async fn zero_flow_control_windows_hold_bounded_memory() {
    let mut rig = Rig::start().await;
    // A client that opens 100 long streams and never lets the proxy send a byte.
    let tcp = TcpStream::connect(rig.outbound()).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let mut client = client;
    let mut held = Vec::new();
    for _ in 0..100 {
        client = client.ready().await.unwrap();
        let body = chat_body("m", true);
        let request = http::Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/v1/chat/completions", rig.outbound()))
            .header("content-type", "application/json")
            .header("x-test-chunks", "20000")
            .header("x-test-gap-ms", "0")
            .body(())
            .unwrap();
        let (response, mut stream) = client.send_request(request, false).unwrap();
        stream.send_data(Bytes::from(body), true).unwrap();
        held.push((response, stream));
    }
    assert!(
        rig.upstream
            .wait_streams_started(100, Duration::from_secs(10))
            .await,
        "not every stream reached the upstream"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.assert_serves("100 zero-window streams (still open)")
        .await;
    drop(held);
    drop(client);
    driver.abort();
    let gone = wait_clients_gone(&rig.upstream, 100, Duration::from_secs(10)).await;
    assert_eq!(
        gone, 100,
        "upstream streams still open after their clients left"
    );
    rig.assert_serves("100 zero-window streams (gone)").await;
}
