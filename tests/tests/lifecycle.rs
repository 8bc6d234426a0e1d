//! The proxy process: start-up with a file, a directory, no policy or every
//! example policy; refusing an invalid policy with `FILE:LINE:COLUMN` and exit
//! code 2; graceful shutdown on SIGTERM.

use std::time::{Duration, Instant};

use infermesh_tests::client::{chat_body, json_request};
use infermesh_tests::{
    policy, Arrivals, HttpClient, OpenAiServer, OpenAiSettings, ProxyExit, ProxyProcess,
    StreamOutcome,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn streaming_policy(upstream: &OpenAiServer, drain: &str) -> String {
    policy::docs(&[
        policy::backend("chat", &[upstream.addr()], ""),
        policy::route(
            "chat",
            "match:\n  - path: {prefix: /v1/}\nbackends:\n  - backend: chat\n",
        ),
        policy::mesh(&format!("drainTimeout: {drain}\n")),
    ])
}

/// Whether a new request to `addr` fails to get a response within half a second.
async fn new_request_refused(addr: std::net::SocketAddr) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return true;
    };
    if stream
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .is_err()
    {
        return true;
    }
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
        Ok(Ok(n)) => !String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        _ => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_stream_finish_then_exits_0() {
    let upstream = OpenAiServer::with_settings(
        "draining",
        OpenAiSettings {
            stream_chunks: 50,
            chunk_gap: Duration::from_millis(100),
            ..OpenAiSettings::default()
        },
    );
    let mut proxy = ProxyProcess::start(&streaming_policy(&upstream, "20s"));
    let url = format!("{}/v1/chat/completions", proxy.url());
    let response = HttpClient::http1()
        .send(json_request(&url, &chat_body("m", true), &[]))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let reader = tokio::spawn(Arrivals::read(response.into_body()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.streams().first().is_none_or(|s| s.sent.len() < 3) {
        assert!(Instant::now() < deadline, "the stream did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    proxy.terminate();
    let terminated_at = Instant::now();

    // New work is turned away while the old stream drains.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !new_request_refused(proxy.outbound).await {
        assert!(
            Instant::now() < deadline,
            "3 s after SIGTERM the proxy still serves new requests"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin_client = HttpClient::http1();
    let ready = admin_client.send(
        http::Request::get(format!("{}/ready", proxy.admin_url()))
            .body(infermesh_tests::client::full(bytes::Bytes::new()))
            .unwrap(),
    );
    if let Ok(Ok(ready)) = tokio::time::timeout(Duration::from_secs(1), ready).await {
        assert_ne!(
            ready.status(),
            200,
            "/ready still says ready while draining"
        );
    }
    assert_eq!(
        upstream.streams()[0].outcome,
        StreamOutcome::Streaming,
        "the stream should still be running here"
    );

    let arrivals = tokio::time::timeout(Duration::from_secs(15), reader)
        .await
        .expect("the stream finishes")
        .unwrap();
    assert!(
        arrivals.end.is_ok(),
        "the draining stream was cut: {:?}",
        arrivals.end
    );
    let events = arrivals.sse_events();
    assert_eq!(events.len(), 51, "50 chunks and [DONE] after SIGTERM");
    assert_eq!(events[50].data, "[DONE]");
    assert!(arrivals.ended_at > terminated_at + Duration::from_secs(1));

    let status = proxy
        .exited(Duration::from_secs(10))
        .await
        .expect("the proxy exits after the drain");
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test]
async fn sigterm_when_idle_exits_0_promptly() {
    let upstream = OpenAiServer::start("idle");
    let mut proxy = ProxyProcess::start(&streaming_policy(&upstream, "30s"));
    let reply = HttpClient::http1()
        .get(&format!("{}/v1/models", proxy.url()))
        .await;
    assert_eq!(reply.status, 200);
    proxy.terminate();
    let status = proxy
        .exited(Duration::from_secs(5))
        .await
        .expect("exit within 5 s of SIGTERM when idle");
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

/// Reads one HTTP/1.1 response with a `content-length` from `stream`, and
/// returns its head.
async fn read_response(stream: &mut tokio::net::TcpStream) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(n > 0, "the connection closed before the response ended");
        seen.extend_from_slice(&buf[..n]);
        let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .expect("a content-length")
            .trim()
            .parse()
            .unwrap();
        if seen.len() >= end + 4 + length {
            return head;
        }
    }
}

/// Idle keep-alive connections do not hold a draining proxy until its drain
/// deadline: each is asked to finish, an HTTP/1.1 one is closed and an
/// HTTP/2 one sent a GOAWAY, and the proxy exits at once.
#[tokio::test]
async fn sigterm_closes_idle_keep_alive_connections_and_exits_promptly() {
    let upstream = OpenAiServer::start("idle-connections");
    let mut proxy = ProxyProcess::start(&streaming_policy(&upstream, "30s"));
    let mut http1 = tokio::net::TcpStream::connect(proxy.outbound)
        .await
        .unwrap();
    for _ in 0..2 {
        http1
            .write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let head = read_response(&mut http1).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }
    let tcp = tokio::net::TcpStream::connect(proxy.outbound)
        .await
        .unwrap();
    let (mut http2, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let http2_connection = tokio::spawn(connection);
    let response = http2
        .send_request(
            http::Request::get("http://x/v1/models")
                .body(infermesh_tests::client::full(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let reply = infermesh_tests::client::Reply::read(response)
        .await
        .unwrap();
    assert!(reply.text().contains("\"data\""), "{}", reply.text());

    proxy.terminate();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), http1.read(&mut buf))
        .await
        .expect("the proxy closes the idle HTTP/1.1 connection");
    assert!(
        matches!(read, Ok(0)) || read.is_err(),
        "an idle HTTP/1.1 connection got bytes after SIGTERM: {read:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), http2_connection)
        .await
        .expect("the proxy ends the idle HTTP/2 connection")
        .unwrap()
        .expect("with a GOAWAY, not an error");
    assert!(
        http2.is_closed(),
        "the HTTP/2 connection still takes requests"
    );
    let status = proxy
        .exited(Duration::from_secs(5))
        .await
        .expect("exit within 5 s of SIGTERM, not at the 30 s drain deadline");
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_at_the_drain_deadline_when_a_stream_outlives_it() {
    let upstream = OpenAiServer::with_settings(
        "endless",
        OpenAiSettings {
            stream_chunks: 200,
            chunk_gap: Duration::from_millis(100),
            ..OpenAiSettings::default()
        },
    );
    let mut proxy = ProxyProcess::start(&streaming_policy(&upstream, "1s"));
    let url = format!("{}/v1/chat/completions", proxy.url());
    let response = HttpClient::http1()
        .send(json_request(&url, &chat_body("m", true), &[]))
        .await
        .unwrap();
    let reader = tokio::spawn(Arrivals::read(response.into_body()));
    assert!(
        upstream
            .wait_streams_started(1, Duration::from_secs(5))
            .await
    );
    proxy.terminate();
    let terminated_at = Instant::now();
    let status = proxy
        .exited(Duration::from_secs(6))
        .await
        .expect("the proxy exits within a few seconds of a 1 s drain deadline");
    assert!(
        terminated_at.elapsed() >= Duration::from_millis(900),
        "exited before the drain deadline"
    );
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let arrivals = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap();
    assert!(
        arrivals.end.is_err(),
        "the cut stream must not look complete to the client"
    );
}

/// The 1-based line and column of `needle` in `text`.
fn position(text: &str, needle: &str) -> (usize, usize) {
    let offset = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the policy"));
    let line = text[..offset].matches('\n').count() + 1;
    let column = offset - text[..offset].rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[track_caller]
fn assert_refused(
    exit: &ProxyExit,
    file: &std::path::Path,
    lines: std::ops::RangeInclusive<usize>,
    column: Option<usize>,
) {
    assert_eq!(
        exit.status.code(),
        Some(2),
        "an invalid policy must exit 2; got {}\n--- stderr\n{}",
        exit.status,
        exit.stderr
    );
    assert!(
        !exit.stdout.contains("listening"),
        "it listened: {}",
        exit.stdout
    );
    let prefix = format!("{}:", file.display());
    let located: Vec<(usize, usize)> = exit
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let mut parts = rest.splitn(3, ':');
            let line = parts.next()?.parse().ok()?;
            let column = parts.next()?.parse().ok()?;
            let reason = parts.next()?;
            (reason.starts_with(' ') && reason.trim().len() > 3).then_some((line, column))
        })
        .collect();
    assert!(
        located
            .iter()
            .any(|(l, c)| lines.contains(l) && column.is_none_or(|want| *c == want)),
        "expected `{prefix}LINE:COLUMN: reason` with LINE in {lines:?}{}; stderr was:\n{}",
        column
            .map(|c| format!(" and COLUMN {c}"))
            .unwrap_or_default(),
        exit.stderr
    );
}

#[test]
fn an_unknown_field_is_refused_with_file_line_column_and_exit_2() {
    let text = policy::docs(&[policy::backend(
        "a",
        &["127.0.0.1:9"],
        "endpointz: []\nprotocol: http1",
    )]);
    let (line, column) = position(&text, "endpointz");
    let exit = ProxyProcess::builder()
        .policy(&text)
        .run_to_exit(Duration::from_secs(10));
    assert_refused(&exit, &exit.files[0], line..=line, Some(column));
}

#[test]
fn a_route_to_an_unknown_backend_is_refused_at_the_reference() {
    let text = policy::docs(&[
        policy::backend("real", &["127.0.0.1:9"], ""),
        policy::route("r", "backends:\n  - backend: missing-backend\n"),
    ]);
    let (line, column) = position(&text, "missing-backend");
    let exit = ProxyProcess::builder()
        .policy(&text)
        .run_to_exit(Duration::from_secs(10));
    assert_refused(&exit, &exit.files[0], line..=line, Some(column));
}

#[test]
fn a_yaml_syntax_error_is_refused_near_its_line() {
    let text = policy::route(
        "r",
        "backends:\n  - backend: a\n    weight: [1, 2\nother: x\n",
    );
    let (line, _) = position(&text, "weight:");
    let exit = ProxyProcess::builder()
        .policy(&text)
        .run_to_exit(Duration::from_secs(10));
    assert_refused(&exit, &exit.files[0], line..=line + 2, None);
}

#[test]
fn a_bad_file_in_a_policy_directory_is_named() {
    let good = policy::backend("a", &["127.0.0.1:9"], "");
    let bad = policy::route("r", "backends:\n  - backend: a\n    weight: lots\n");
    let (line, _) = position(&bad, "lots");
    let exit = ProxyProcess::builder()
        .file("10-backends.yaml", &good)
        .file("20-routes.yaml", &bad)
        .config_dir()
        .run_to_exit(Duration::from_secs(10));
    assert_refused(&exit, &exit.files[1], line..=line, None);
}

#[tokio::test]
async fn a_policy_directory_is_loaded_as_one_policy() {
    let upstream = OpenAiServer::start("dir");
    let proxy = ProxyProcess::builder()
        .file(
            "10-backends.yaml",
            &policy::backend("chat", &[upstream.addr()], ""),
        )
        .file(
            "routes/20-routes.yaml",
            &policy::route(
                "chat",
                "match:\n  - model: {exact: m}\nbackends:\n  - backend: chat\n",
            ),
        )
        .config_dir()
        .start();
    let reply = HttpClient::http1()
        .post_json(
            &format!("{}/v1/chat/completions", proxy.url()),
            &chat_body("m", false),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.upstream(), Some("dir"));
}

#[tokio::test]
async fn without_a_policy_the_proxy_is_ready_and_routes_nothing() {
    let proxy = ProxyProcess::builder().no_config().start();
    let client = HttpClient::http1();
    assert_eq!(
        client
            .get(&format!("{}/ready", proxy.admin_url()))
            .await
            .status,
        200
    );
    client
        .post_json(
            &format!("{}/v1/chat/completions", proxy.url()),
            &chat_body("m", false),
        )
        .await
        .assert_proxy_error(404, "no_route");
}

#[tokio::test]
async fn every_example_policy_starts_the_proxy() {
    let examples = infermesh_tests::repo_root().join("deploy/examples");
    let mut entries: Vec<_> = std::fs::read_dir(&examples)
        .unwrap_or_else(|e| panic!("{}: {e}", examples.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    assert!(
        entries.iter().any(|p| p.ends_with("quickstart")),
        "deploy/examples/quickstart (used by scripts/demo.sh) is missing"
    );
    for example in entries {
        let proxy = ProxyProcess::builder().config_path(&example).start();
        let reply = HttpClient::http1()
            .get(&format!("{}/config", proxy.admin_url()))
            .await;
        assert_eq!(
            reply.status,
            200,
            "{}: /config {}",
            example.display(),
            reply.text()
        );
    }
}
