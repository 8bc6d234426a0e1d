//! Refusals before routing: malformed HTTP/1.1, request heads over the
//! budget (HTTP/1.1 and HTTP/2), slow request heads, HTTP/2 floods (rapid
//! reset, CONTINUATION) driven with raw sockets and the `h2` crate; each is
//! answered or closed, counted in `infermesh_refusals_total` by reason, and
//! logged with a rate limit; the proxy keeps serving after each. A client
//! answered before its upload ended (a refusal after the body's prefix)
//! finishes the upload without a reset stream or a closed connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use infermesh_tests::client::{chat_body, raw_exchange};
use infermesh_tests::metrics::Metrics;
use infermesh_tests::openai::OpenAiSettings;
use infermesh_tests::{policy, HttpClient, OpenAiServer, ProxyProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REFUSALS: &str = "infermesh_refusals_total";

/// A proxy whose one route sends everything to `upstream`, with a short
/// header read timeout.
fn proxy(upstream: &OpenAiServer) -> ProxyProcess {
    ProxyProcess::builder()
        .policy(&policy::docs(&[
            policy::backend("all", &[upstream.addr()], ""),
            policy::route("all", "backends:\n  - backend: all\n"),
        ]))
        .arg("--header-read-timeout")
        .arg("1s")
        .start()
}

async fn refusals(proxy: &ProxyProcess, reason: &str) -> f64 {
    refusals_on(proxy, "outbound", reason).await
}

async fn refusals_on(proxy: &ProxyProcess, listener: &str, reason: &str) -> f64 {
    Metrics::scrape(proxy)
        .await
        .sum(REFUSALS, &[("listener", listener), ("reason", reason)])
}

/// Waits until the outbound `reason` count reaches `want` (counts land as
/// the connection task ends, a moment after the client saw it close).
async fn wait_refusals(proxy: &ProxyProcess, reason: &str, want: f64) {
    wait_refusals_on(proxy, "outbound", reason, want).await
}

async fn wait_refusals_on(proxy: &ProxyProcess, listener: &str, reason: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = refusals_on(proxy, listener, reason).await;
        if got >= want {
            assert_eq!(got, want, "{reason}: more refusals than expected");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{reason}: {got} refusals counted, expected {want}\n{}",
            Metrics::scrape(proxy).await.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn assert_still_serves(proxy: &ProxyProcess) {
    for client in [HttpClient::http1(), HttpClient::http2()] {
        let reply = client.get(&format!("{}/v1/models", proxy.url())).await;
        assert_eq!(
            reply.status,
            200,
            "the proxy stopped serving: {}",
            reply.text()
        );
    }
}

fn body_of(raw: &str) -> &str {
    raw.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

#[tokio::test]
async fn malformed_http1_is_refused_with_400_and_counted() {
    let upstream = OpenAiServer::start("models");
    let proxy = proxy(&upstream);
    let cases: [&[u8]; 3] = [
        b"GET /v1/models HTTP/1.1\r\nhost: a\r\nthis header has no colon\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-length: abc\r\n\r\n",
        b"GET /v1/mo dels HTTP/1.1\r\nhost: a\r\n\r\n",
    ];
    for case in cases {
        let reply = raw_exchange(proxy.outbound, case, Duration::from_secs(5)).await;
        assert_eq!(reply.status(), Some(400), "{:?}", reply.text());
        assert!(reply.closed);
    }
    wait_refusals(&proxy, "malformed_http", 3.0).await;
    // A client that connects and leaves without a byte refused nothing.
    drop(TcpStream::connect(proxy.outbound).await.unwrap());
    assert_still_serves(&proxy).await;
    assert_eq!(refusals(&proxy, "malformed_http").await, 3.0);
    assert_eq!(upstream.request_count(), 2);
}

#[tokio::test]
async fn http1_heads_over_the_budget_get_431_and_are_counted() {
    let upstream = OpenAiServer::start("models");
    let proxy = proxy(&upstream);

    // 100 fields within the byte budget are served.
    let mut head = String::from("GET /v1/models HTTP/1.1\r\nhost: a\r\nconnection: close\r\n");
    for i in 0..98 {
        head.push_str(&format!("x-field-{i}: {}\r\n", "v".repeat(100)));
    }
    let reply = raw_exchange(
        proxy.outbound,
        format!("{head}\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(reply.status(), Some(200), "{}", reply.text());

    // A 80 KB header: over the 64 KiB budget, under the parser's hard
    // limit: a 431 with the reason in a JSON body.
    let big = format!(
        "GET /v1/models HTTP/1.1\r\nhost: a\r\nconnection: close\r\nx-big: {}\r\n\r\n",
        "b".repeat(80_000)
    );
    let reply = raw_exchange(proxy.outbound, big.as_bytes(), Duration::from_secs(5)).await;
    let text = reply.text();
    assert_eq!(reply.status(), Some(431), "{text}");
    let body: serde_json::Value = serde_json::from_str(body_of(&text)).expect("a JSON body");
    assert_eq!(body["error"]["type"], "request_header_fields_too_large");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the limit is 65536"),
        "{body}"
    );
    wait_refusals(&proxy, "header_too_large", 1.0).await;

    // Over keep-alive, the same connection then serves the next request.
    let mut conn = TcpStream::connect(proxy.outbound).await.unwrap();
    let big = big.replace("connection: close\r\n", "");
    let next = "GET /v1/models HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";
    conn.write_all(big.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("request_header_fields_too_large\"") {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("no 431")
            .unwrap();
        assert_ne!(
            n,
            0,
            "closed after the 431: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    conn.write_all(next.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest))
        .await
        .expect("no answer to the next request")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("HTTP/1.1 200"), "{rest}");
    wait_refusals(&proxy, "header_too_large", 2.0).await;

    // A 200 KB header and 101 fields: refused by the HTTP/1.1 parser
    // itself (431, no body), counted all the same.
    let huge = format!(
        "GET /v1/models HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "b".repeat(200_000)
    );
    let reply = raw_exchange(proxy.outbound, huge.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(reply.status(), Some(431), "{}", reply.text());
    let mut many = String::from("GET /v1/models HTTP/1.1\r\nhost: a\r\n");
    for i in 0..100 {
        many.push_str(&format!("x-field-{i}: v\r\n"));
    }
    let reply = raw_exchange(
        proxy.outbound,
        format!("{many}\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(reply.status(), Some(431), "{}", reply.text());
    wait_refusals(&proxy, "header_too_large", 4.0).await;

    assert_still_serves(&proxy).await;
    assert_eq!(
        upstream.request_count(),
        4,
        "a refused request reached the upstream"
    );
}

#[tokio::test]
async fn a_slow_request_head_is_cut_at_the_header_timeout_and_counted() {
    let upstream = OpenAiServer::start("models");
    let proxy = proxy(&upstream);

    // A slowloris client: the head starts, and never ends.
    let mut slow = TcpStream::connect(proxy.outbound).await.unwrap();
    slow.write_all(b"GET /v1/models HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let mut answered = Vec::new();
    let mut dribble = tokio::time::interval(Duration::from_millis(200));
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the slow connection was not closed at the header timeout"
        );
        tokio::select! {
            read = slow.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => answered.extend_from_slice(&buf[..n]),
            },
            // One more header line now and then, as slowloris does.
            _ = dribble.tick() => {
                let _ = slow.write_all(b"x-a: b\r\n").await;
            }
        }
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}",
        started.elapsed()
    );
    assert!(
        !String::from_utf8_lossy(&answered).contains("200"),
        "{answered:?}"
    );
    wait_refusals(&proxy, "header_timeout", 1.0).await;

    // An idle keep-alive connection closed at the same timeout after a
    // served request is no refusal.
    let mut idle = TcpStream::connect(proxy.outbound).await.unwrap();
    idle.write_all(b"GET /v1/models HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection was never closed");
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(refusals(&proxy, "header_timeout").await, 1.0);
    assert_still_serves(&proxy).await;
}

#[tokio::test]
async fn each_head_of_a_keep_alive_connection_has_the_whole_header_timeout() {
    let upstream = OpenAiServer::start("models");
    let proxy = proxy(&upstream);

    // Heads that come promptly, one every 300 ms for 2.5 s on one
    // connection (more than twice the 1 s timeout): each head is timed
    // from when the proxy began to wait for it, never from an earlier one.
    let mut conn = TcpStream::connect(proxy.outbound).await.unwrap();
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        conn.write_all(b"GET /v1/models HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let response = read_response(&mut conn)
            .await
            .unwrap_or_else(|| panic!("closed after {served} prompt requests"));
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        served += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(refusals(&proxy, "header_timeout").await, 0.0);

    // Then a head that never ends on the same connection: cut at the
    // timeout, counted from the end of the last response (300 ms before
    // the head began).
    let took = unfinished_head_cut(&mut conn)
        .await
        .expect("the slow head was never cut");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(2500),
        "cut {took:?} after the head began"
    );
    wait_refusals(&proxy, "header_timeout", 1.0).await;
    assert_still_serves(&proxy).await;
}

/// An HTTP/2 connection (prior knowledge) with the `h2` crate's client.
/// Reads one HTTP/1.1 response from `conn`: its head, then a body of
/// `content-length` bytes or chunks up to the last one. `None` when the
/// connection closed first.
async fn read_response(conn: &mut TcpStream) -> Option<String> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let body = &data[end + 4..];
            let done = match head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
            {
                Some(length) => body.len() >= length.trim().parse::<usize>().unwrap(),
                None => body.ends_with(b"0\r\n\r\n"),
            };
            if done {
                return Some(String::from_utf8_lossy(&data).into_owned());
            }
        }
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn the_header_timeout_starts_again_for_each_request_of_a_connection() {
    // A stream of 8 chunks 200 ms apart outlasts the 1 s header timeout.
    let upstream = OpenAiServer::with_settings(
        "models",
        OpenAiSettings {
            stream_chunks: 8,
            chunk_gap: Duration::from_millis(200),
            ..OpenAiSettings::default()
        },
    );
    let proxy = proxy(&upstream);
    let mut conn = TcpStream::connect(proxy.outbound).await.unwrap();
    let models = b"GET /v1/models HTTP/1.1\r\nhost: a\r\n\r\n";

    conn.write_all(models).await.unwrap();
    let first = read_response(&mut conn).await.expect("first answer");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // A pause within the timeout of the wait that began after that answer.
    tokio::time::sleep(Duration::from_millis(400)).await;
    conn.write_all(models).await.unwrap();
    let second = read_response(&mut conn).await.expect("second answer");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");

    // A response that streams for longer than the header timeout is not
    // cut by it, and the connection serves on at once afterwards.
    let body = chat_body("gpt-fixture", true);
    let streamed = Instant::now();
    conn.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let stream = read_response(&mut conn).await.expect("the stream was cut");
    assert!(
        streamed.elapsed() >= Duration::from_millis(1500),
        "{stream}"
    );
    assert!(stream.contains("data: [DONE]"), "{stream}");
    conn.write_all(models).await.unwrap();
    let after = read_response(&mut conn)
        .await
        .expect("answer after the stream");
    assert!(after.starts_with("HTTP/1.1 200"), "{after}");

    // And the timeout still cuts a head that never ends, on this
    // connection's next wait.
    let waited = unfinished_head_cut(&mut conn)
        .await
        .expect("the unfinished head was never cut");
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&waited),
        "cut after {waited:?}"
    );
    wait_refusals(&proxy, "header_timeout", 1.0).await;
    assert_still_serves(&proxy).await;
}

/// Sends the start of a request head that never ends on `conn`, and reads
/// until the proxy closes the connection: how long after the head began
/// that came, `None` when it did not within 10 s.
async fn unfinished_head_cut(conn: &mut TcpStream) -> Option<Duration> {
    conn.write_all(b"GET /v1/models HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    let began = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(1..) = conn.read(&mut buf).await {}
    })
    .await
    .ok()
    .map(|()| began.elapsed())
}

async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Sends a GET with `headers` on a new stream; the status and body.
async fn h2_get(
    client: &mut h2::client::SendRequest<Bytes>,
    url: &str,
    headers: &[(String, String)],
) -> Result<(u16, String), h2::Error> {
    let mut request = http::Request::get(url);
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let ready = client.clone().ready().await?;
    *client = ready;
    let (response, _) = client.send_request(request.body(()).unwrap(), true)?;
    let response = response.await?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

#[tokio::test]
async fn http2_heads_over_the_budget_get_431_on_their_stream_and_the_connection_lives() {
    let upstream = OpenAiServer::start("models");
    let proxy = proxy(&upstream);
    let url = format!("{}/v1/models", proxy.url());
    let mut client = h2_client(proxy.outbound).await;

    let (status, _) = h2_get(&mut client, &url, &[]).await.unwrap();
    assert_eq!(status, 200);

    // A 100 KB header: 431 with the reason, on its stream only.
    let big = [("x-big".to_string(), "b".repeat(100_000))];
    let (status, body) = h2_get(&mut client, &url, &big)
        .await
        .expect("a 431, not a dead connection");
    assert_eq!(status, 431, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
    assert_eq!(body["error"]["type"], "request_header_fields_too_large");

    // 101 small fields: 431 too.
    let many: Vec<_> = (0..101)
        .map(|i| (format!("x-field-{i}"), "v".to_string()))
        .collect();
    let (status, body) = h2_get(&mut client, &url, &many).await.unwrap();
    assert_eq!(status, 431, "{body}");
    assert!(body.contains("101 header fields"), "{body}");

    // 140 KB: over the 128 KiB the proxy advertises, the h2 library
    // answers 431 on the stream by itself; the connection still lives.
    let huge = [("x-big".to_string(), "b".repeat(140_000))];
    let (status, _) = h2_get(&mut client, &url, &huge).await.unwrap();
    assert_eq!(status, 431);

    // The same connection serves the next request.
    let (status, _) = h2_get(&mut client, &url, &[]).await.unwrap();
    assert_eq!(status, 200);
    wait_refusals(&proxy, "header_too_large", 1.0).await;
    wait_refusals(&proxy, "too_many_headers", 1.0).await;
    assert_eq!(
        upstream.request_count(),
        2,
        "a refused request reached the upstream"
    );
}

// === raw HTTP/2 frames ===

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A GET / header block in HPACK: indexed :method GET, :scheme http,
/// :path /, and a literal :authority.
const GET_BLOCK: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'a'];

fn rapid_reset(streams: u32) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    for i in 0..streams {
        let id = 2 * i + 1;
        frame(&mut out, HEADERS, END_HEADERS | END_STREAM, id, GET_BLOCK);
        frame(&mut out, RST_STREAM, 0, id, &8u32.to_be_bytes());
    }
    out
}

fn continuation_flood(frames: usize) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    frame(&mut out, HEADERS, END_STREAM, 1, GET_BLOCK);
    for _ in 0..frames {
        // A literal `x: y` without indexing, again and again.
        frame(
            &mut out,
            CONTINUATION,
            0,
            1,
            &[0x00, 0x01, b'x', 0x01, b'y'],
        );
    }
    out
}

/// Writes `bytes`, reads until the server closes, and returns the error
/// code of the server's GOAWAY, if it sent one.
async fn goaway_code(addr: SocketAddr, bytes: &[u8]) -> Option<u32> {
    let reply = raw_exchange(addr, bytes, Duration::from_secs(10)).await;
    assert!(reply.closed, "the connection stayed open");
    let mut rest = &reply.bytes[..];
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        let kind = rest[3];
        let payload = rest.get(9..9 + len)?;
        if kind == GOAWAY {
            return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
        }
        rest = &rest[9 + len..];
    }
    None
}

#[tokio::test]
async fn http2_floods_are_closed_with_enhance_your_calm_and_counted() {
    let upstream = OpenAiServer::start("models");
    let proxy = proxy(&upstream);

    assert_eq!(
        goaway_code(proxy.outbound, &continuation_flood(100)).await,
        Some(ENHANCE_YOUR_CALM)
    );
    wait_refusals(&proxy, "h2_flood", 1.0).await;
    assert_eq!(
        goaway_code(proxy.outbound, &rapid_reset(200)).await,
        Some(ENHANCE_YOUR_CALM)
    );
    wait_refusals(&proxy, "h2_flood", 2.0).await;

    // A protocol error: a CONTINUATION with no HEADERS before it.
    let mut stray = PREFACE.to_vec();
    frame(&mut stray, SETTINGS, 0, 0, &[]);
    frame(&mut stray, CONTINUATION, END_HEADERS, 1, GET_BLOCK);
    assert_eq!(goaway_code(proxy.outbound, &stray).await, Some(0x1));
    wait_refusals(&proxy, "h2_protocol", 1.0).await;

    assert_still_serves(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_leaves_a_handful_of_log_lines() {
    let upstream = OpenAiServer::start("models");
    let proxy = proxy(&upstream);
    let started = Instant::now();
    let attack = rapid_reset(100);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let attack = attack.clone();
        let addr = proxy.outbound;
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                let _ = raw_exchange(addr, &attack, Duration::from_secs(10)).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    wait_refusals(&proxy, "h2_flood", 200.0).await;
    let windows = started.elapsed().as_secs() / 10 + 2;
    let lines = |stderr: &str| {
        stderr
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("h2_flood"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let logged = lines(&proxy.stderr());
    assert!(
        !logged.is_empty() && logged.len() as u64 <= 5 * windows,
        "{} lines for 200 refusals in {:?}:\n{}",
        logged.len(),
        started.elapsed(),
        logged.join("\n")
    );
    // Nor does the h2 library log one line per connection by itself.
    let stderr = proxy.stderr();
    assert!(!stderr.contains("reached limit"), "{stderr}");

    // After the window, the next refusal's line says how many were left out.
    tokio::time::sleep(Duration::from_secs(10)).await;
    goaway_code(proxy.outbound, &attack).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = lines(&proxy.stderr());
        let left_out: u64 = all
            .iter()
            .filter_map(|l| l.split("suppressed=").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        if all.len() > logged.len() {
            assert_eq!(
                left_out + all.len() as u64,
                201,
                "each refusal is either logged or counted as left out:\n{}",
                all.join("\n")
            );
            break;
        }
        assert!(Instant::now() < deadline, "no line after the window");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_still_serves(&proxy).await;
}

// === inbound mutual TLS ===

const WEB: &str = "spiffe://cluster.local/ns/apps/sa/web";

/// An inbound route in namespace `models` to `openai`.
fn inbound_policy(openai: SocketAddr) -> String {
    format!(
        r#"apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{name: llama-server}}
spec: {{endpoints: ["{openai}"]}}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {{name: chat, namespace: models}}
spec:
  listener: inbound
  match: [{{path: {{prefix: /v1/}}}}]
  backends: [{{backend: llama-server}}]
"#
    )
}

/// `openssl s_client` against `addr` with `args`, sending a request and
/// hanging up; whatever it printed.
fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    let mut child = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-quiet"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl is installed (scripts/setup.sh installs it)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n");
        std::thread::sleep(Duration::from_millis(500));
    }
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_mtls_refusals_are_counted_by_reason() {
    use infermesh_tests::mesh::{curl, wait_ready, Mesh, San};
    use std::time::SystemTime;

    let openai = OpenAiServer::start("llama");
    let mesh = Mesh::start(
        &[("server.yaml", &inbound_policy(openai.addr()))],
        "1h",
        &[("models", "llama")],
    );
    let server = mesh.proxy("models", "llama").start();
    wait_ready(&server, Duration::from_secs(20)).await;
    let url = format!("https://{}/v1/models", server.inbound);
    let get = |cert: &std::path::Path, key: &std::path::Path| {
        curl(&[
            "-k",
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "-w",
            "\n%{http_code}",
            &url,
        ])
    };
    let wait_inbound = |reason: &'static str| wait_refusals_on(&server, "inbound", reason, 1.0);

    let (good_cert, good_key) = mesh.mint_valid("good", WEB);
    let (code, out, err) = get(&good_cert, &good_key);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n200"), "{out}");

    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cases = [
        (mesh.mint_untrusted("stranger", WEB), "tls_unknown_issuer"),
        (
            mesh.mint("expired", &[San::Uri(WEB)], now - 3 * hour, now - hour),
            "tls_expired",
        ),
        (
            mesh.mint_valid("foreign", "spiffe://partner.org/ns/apps/sa/web"),
            "tls_identity",
        ),
    ];
    for ((cert, key), reason) in cases {
        let (code, out, _) = get(&cert, &key);
        assert_ne!(code, 0, "{reason}: accepted: {out}");
        wait_inbound(reason).await;
    }

    // No certificate at all, and TLS 1.2.
    let printed = s_client(server.inbound, &["-tls1_3"]);
    assert!(!printed.contains("HTTP/1.1 200"), "{printed}");
    wait_inbound("tls_no_certificate").await;
    let printed = s_client(
        server.inbound,
        &[
            "-tls1_2",
            "-cert",
            good_cert.to_str().unwrap(),
            "-key",
            good_key.to_str().unwrap(),
        ],
    );
    assert!(!printed.contains("HTTP/1.1 200"), "{printed}");
    wait_inbound("tls_version").await;

    // Plaintext on the strict port.
    let reply = raw_exchange(
        server.inbound,
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(reply.closed && reply.bytes.is_empty(), "{reply:?}");
    wait_inbound("plaintext_refused").await;

    // Each reason was logged once, with its name.
    let stderr = server.stderr();
    for reason in [
        "tls_unknown_issuer",
        "tls_expired",
        "tls_identity",
        "tls_no_certificate",
        "tls_version",
        "plaintext_refused",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("WARN") && l.contains(&format!("reason=\"{reason}\""))),
            "no log line for {reason}:\n{stderr}"
        );
    }

    // And the good caller still gets through.
    let (code, out, err) = get(&good_cert, &good_key);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n200"), "{out}");
}

/// A proxy that routes only the model `known` and reads 1 KiB of a body
/// to find it: any other body is answered 404 once that much arrived, the
/// rest unread.
fn known_model_proxy(upstream: &OpenAiServer) -> ProxyProcess {
    ProxyProcess::start(&policy::docs(&[
        policy::backend("all", &[upstream.addr()], ""),
        policy::route(
            "known",
            "match:\n  - model: {exact: known}\nbackends:\n  - backend: all\n",
        ),
        policy::mesh("classify:\n  maxBodyPrefix: 1024\n"),
    ]))
}

/// The start of a chat body naming `model`, past the 1 KiB the proxy
/// reads, its padding left open.
fn unfinished_body(model: &str) -> String {
    format!(
        r#"{{"model":"{model}","messages":[],"pad":"{}"#,
        "x".repeat(2_000)
    )
}

/// The rest of the body [`unfinished_body`] began: 100 KB, well past an
/// HTTP/2 stream's first window, and the end of the object.
fn body_rest() -> String {
    format!("{}\"}}", "x".repeat(100_000))
}

/// Opens a chat request to `url` on `client` and sends the unfinished
/// start of its body; the response to come, and the open upload.
async fn unfinished_upload(
    client: h2::client::SendRequest<Bytes>,
    url: &str,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::client::ResponseFuture,
    h2::SendStream<Bytes>,
) {
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let (response, mut upload) = client.send_request(request, false).unwrap();
    upload
        .send_data(Bytes::from(unfinished_body("unknown")), false)
        .unwrap();
    (client, response, upload)
}

/// Waits up to `within` for the peer to reset `upload`'s stream.
async fn reset_within(upload: &mut h2::SendStream<Bytes>, within: Duration) -> Option<h2::Reason> {
    tokio::time::timeout(within, std::future::poll_fn(|cx| upload.poll_reset(cx)))
        .await
        .ok()
        .and_then(Result::ok)
}

#[tokio::test]
async fn an_http2_client_answered_before_its_upload_ended_finishes_it_without_a_reset() {
    let upstream = OpenAiServer::start("all");
    let proxy = known_model_proxy(&upstream);
    let url = format!("{}/v1/chat/completions", proxy.url());
    let client = h2_client(proxy.outbound).await;

    // Answered after the first piece, while the upload is still open.
    let (client, response, mut upload) = unfinished_upload(client, &url).await;
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("answered before the body ended")
        .unwrap();
    assert_eq!(response.status(), 404);
    // A reset, if one comes, comes right after the answer.
    assert_eq!(
        reset_within(&mut upload, Duration::from_millis(300)).await,
        None,
        "the stream was reset under a client still uploading"
    );
    // The rest of the upload, 100 KB past the stream's first window,
    // goes through and ends the stream cleanly.
    upload.send_data(Bytes::from(body_rest()), true).unwrap();
    assert_eq!(
        reset_within(&mut upload, Duration::from_millis(500)).await,
        None,
        "the stream was reset after the upload ended"
    );
    assert!(upstream.requests().is_empty(), "nothing went upstream");

    // A client that never ends its upload is not waited for long: its
    // stream is reset within the linger time (2 s).
    let (mut client, response, mut upload) = unfinished_upload(client, &url).await;
    assert_eq!(response.await.unwrap().status(), 404);
    let started = Instant::now();
    assert!(
        reset_within(&mut upload, Duration::from_secs(10))
            .await
            .is_some(),
        "a body that never ends is dropped in the end"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The connection serves on.
    let (status, _) = h2_get(&mut client, &format!("{}/v1/models", proxy.url()), &[])
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_http1_client_answered_before_its_upload_ended_keeps_its_connection() {
    let upstream = OpenAiServer::start("all");
    let proxy = known_model_proxy(&upstream);
    let rest = body_rest();
    let first = unfinished_body("unknown");
    let mut conn = TcpStream::connect(proxy.outbound).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: models\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        first.len() + rest.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(first.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_response(&mut conn))
        .await
        .expect("answered before the body ended")
        .expect("an answer, not a closed connection");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    conn.write_all(rest.as_bytes()).await.unwrap();
    // The same connection carries the next request.
    let known = chat_body("known", false);
    let next = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: models\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{known}",
        known.len()
    );
    conn.write_all(next.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_response(&mut conn))
        .await
        .expect("the next request answered")
        .expect("the connection was kept");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(upstream.requests().len(), 1);
}
