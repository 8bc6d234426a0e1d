//! Every error a client can get from the proxy, with its status and body
//! (HTTP) or grpc-status (gRPC); malformed HTTP; opaque TCP. Each API gets
//! errors in its own shape: `{"error":{"type","message"}}` on OpenAI and
//! other HTTP paths, KServe v2's `{"error":"<message>"}` on `/v2` paths.

use std::time::{Duration, Instant};

use infermesh_tests::client::{chat_body, json_request, raw_exchange, Reply};
use infermesh_tests::kserve::{grpc_client, infer_request};
use infermesh_tests::{
    policy, refused_addr, Arrivals, HttpClient, KServeGrpcServer, KServeSettings, Metrics,
    OpenAiServer, OpenAiSettings, ProxyProcess, StreamOutcome, TcpEchoServer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = "/v1/chat/completions";

/// A proxy whose only route sends model `model` to `endpoints` (HTTP/1.1 and
/// gRPC alike, upstream HTTP/2 when `h2`), with these timeouts.
fn single_route(endpoints: &[String], h2: bool, timeouts: &str) -> ProxyProcess {
    let protocol = if h2 {
        "protocol: http2"
    } else {
        "protocol: http1"
    };
    let timeouts = if timeouts.is_empty() {
        String::new()
    } else {
        format!(
            "timeouts:\n{}",
            timeouts
                .lines()
                .map(|l| format!("  {l}\n"))
                .collect::<String>()
        )
    };
    ProxyProcess::start(&policy::docs(&[
        policy::backend(
            "target",
            endpoints,
            &format!("{protocol}\nconnectTimeout: 1s"),
        ),
        policy::route(
            "target",
            &format!(
                "match:\n  - model: {{exact: model}}\nbackends:\n  - backend: target\n{timeouts}"
            ),
        ),
    ]))
}

#[tokio::test]
async fn no_route_is_a_404_json_error_over_http1_and_http2() {
    let upstream = OpenAiServer::start("unused");
    let proxy = single_route(&[upstream.addr().to_string()], false, "");
    let url = format!("{}{CHAT}", proxy.url());
    for client in [HttpClient::http1(), HttpClient::http2()] {
        let reply = client
            .post_json(&url, &chat_body("some-other-model", false))
            .await;
        reply.assert_proxy_error(404, "no_route");
        let reply = client
            .get(&format!("{}/not/a/model/api", proxy.url()))
            .await;
        reply.assert_proxy_error(404, "no_route");
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn no_route_for_grpc_is_unimplemented() {
    let upstream = KServeGrpcServer::start("unused");
    let proxy = single_route(&[upstream.addr().to_string()], true, "");
    let mut client = grpc_client(proxy.outbound).await;
    let status = client
        .model_infer(infer_request("not-routed", "1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert!(
        !status.message().is_empty(),
        "UNIMPLEMENTED without a message"
    );
    assert!(upstream.calls().is_empty());
}

#[tokio::test]
async fn a_refused_connection_is_a_503_upstream_connect_error() {
    let proxy = single_route(&[refused_addr().to_string()], false, "");
    let url = format!("{}{CHAT}", proxy.url());
    for client in [HttpClient::http1(), HttpClient::http2()] {
        let started = Instant::now();
        let reply = client.post_json(&url, &chat_body("model", false)).await;
        reply.assert_proxy_error(503, "upstream_connect_error");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }
    let mut client = grpc_client(proxy.outbound).await;
    let status = client
        .model_infer(infer_request("model", "1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(!status.message().is_empty());
}

#[tokio::test]
async fn failed_requests_are_in_the_duration_histogram() {
    // A refused connection: a 503 at once.
    let proxy = single_route(&[refused_addr().to_string()], false, "");
    let reply = HttpClient::http1()
        .post_json(
            &format!("{}{CHAT}", proxy.url()),
            &chat_body("model", false),
        )
        .await;
    reply.assert_proxy_error(503, "upstream_connect_error");
    let metrics = Metrics::scrape(&proxy).await;
    let labels = [("route", "target"), ("backend", "target")];
    assert_eq!(
        metrics.sum("infermesh_request_duration_seconds_count", &labels),
        1.0,
        "a refused request is timed"
    );
    // A first-byte timeout: a 504 after the limit, timed as long as it took.
    let slow = OpenAiServer::with_settings(
        "slow",
        OpenAiSettings {
            first_byte_delay: Duration::from_secs(5),
            ..OpenAiSettings::default()
        },
    );
    let proxy = single_route(&[slow.addr().to_string()], false, "firstByte: 300ms");
    let reply = HttpClient::http1()
        .post_json(
            &format!("{}{CHAT}", proxy.url()),
            &chat_body("model", false),
        )
        .await;
    reply.assert_proxy_error(504, "timeout");
    let metrics = Metrics::scrape(&proxy).await;
    assert_eq!(
        metrics.sum("infermesh_request_duration_seconds_count", &labels),
        1.0
    );
    let seconds = metrics.sum("infermesh_request_duration_seconds_sum", &labels);
    assert!(
        (0.25..3.0).contains(&seconds),
        "a 300ms timeout timed as {seconds}s"
    );
}

#[tokio::test]
async fn a_backend_whose_names_do_not_resolve_is_a_503_no_endpoint() {
    let proxy = single_route(
        &["model-server.does-not-exist.invalid:8000".to_string()],
        false,
        "",
    );
    let url = format!("{}{CHAT}", proxy.url());
    let reply = HttpClient::http1()
        .post_json(&url, &chat_body("model", false))
        .await;
    reply.assert_proxy_error(503, "no_endpoint");
    let mut client = grpc_client(proxy.outbound).await;
    let status = client
        .model_infer(infer_request("model", "1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn a_slow_first_byte_is_a_504_timeout() {
    let upstream = OpenAiServer::with_settings(
        "slow",
        OpenAiSettings {
            first_byte_delay: Duration::from_secs(5),
            ..OpenAiSettings::default()
        },
    );
    let proxy = single_route(&[upstream.addr().to_string()], false, "firstByte: 300ms");
    let started = Instant::now();
    let reply = HttpClient::http1()
        .post_json(
            &format!("{}{CHAT}", proxy.url()),
            &chat_body("model", false),
        )
        .await;
    reply.assert_proxy_error(504, "timeout");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "a 300ms first-byte limit answered after {took:?}"
    );
    assert_eq!(
        upstream.request_count(),
        1,
        "the request reached the upstream once"
    );
}

#[tokio::test]
async fn a_slow_grpc_answer_is_deadline_exceeded() {
    let upstream = KServeGrpcServer::with_settings(
        "slow",
        KServeSettings {
            infer_delay: Duration::from_secs(5),
            ..KServeSettings::default()
        },
    );
    let proxy = single_route(&[upstream.addr().to_string()], true, "firstByte: 300ms");
    let mut client = grpc_client(proxy.outbound).await;
    let started = Instant::now();
    let status = client
        .model_infer(infer_request("model", "1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn limits_too_long_to_reach_never_fire() {
    // Any duration parses; one past the end of the clock must neither fire
    // nor overflow (it panicked every request before).
    let far = "18446744073709551615s";
    let upstream = OpenAiServer::with_settings(
        "far",
        OpenAiSettings {
            stream_chunks: 3,
            chunk_gap: Duration::from_millis(20),
            ..OpenAiSettings::default()
        },
    );
    let proxy = single_route(
        &[upstream.addr().to_string()],
        false,
        &format!("firstByte: {far}\nidle: {far}\ntotal: {far}"),
    );
    for stream in [false, true] {
        let response = HttpClient::http1()
            .send(json_request(
                &format!("{}{CHAT}", proxy.url()),
                &chat_body("model", stream),
                &[],
            ))
            .await
            .expect("response head");
        assert_eq!(response.status(), 200, "stream {stream}");
        let arrivals = Arrivals::read(response.into_body()).await;
        assert!(
            arrivals.end.is_ok(),
            "stream {stream}: the body ended whole"
        );
        if stream {
            assert_eq!(arrivals.sse_events().len(), 4, "three chunks and [DONE]");
        }
    }
}

#[tokio::test]
async fn an_idle_stream_is_reset_after_the_idle_limit() {
    for h2_client in [false, true] {
        let upstream = OpenAiServer::with_settings(
            "stalls",
            OpenAiSettings {
                stream_chunks: 5,
                chunk_gap: Duration::from_secs(4),
                ..OpenAiSettings::default()
            },
        );
        let proxy = single_route(&[upstream.addr().to_string()], false, "idle: 500ms");
        let client = if h2_client {
            HttpClient::http2()
        } else {
            HttpClient::http1()
        };
        let response = client
            .send(json_request(
                &format!("{}{CHAT}", proxy.url()),
                &chat_body("model", true),
                &[],
            ))
            .await
            .expect("response head");
        assert_eq!(response.status(), 200);
        let arrivals = Arrivals::read(response.into_body()).await;
        let events = arrivals.sse_events();
        assert_eq!(
            events.len(),
            1,
            "h2 client {h2_client}: only the first chunk came before the stall: {events:?}"
        );
        assert!(
            arrivals.end.is_err(),
            "h2 client {h2_client}: a stalled stream must end in an error, not look complete"
        );
        let stalled_for = arrivals.ended_at - events[0].at;
        assert!(
            stalled_for >= Duration::from_millis(400) && stalled_for < Duration::from_secs(3),
            "h2 client {h2_client}: the stream was cut {stalled_for:?} after the last chunk with a 500ms idle limit"
        );
        let log = upstream
            .wait_stream_end(0, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(
            matches!(log.outcome, StreamOutcome::ClientGone { .. }),
            "h2 client {h2_client}: the upstream stream stayed open: {:?}",
            log.outcome
        );
    }
}

#[tokio::test]
async fn an_idle_grpc_stream_ends_with_deadline_exceeded() {
    let upstream = KServeGrpcServer::with_settings(
        "stalls",
        KServeSettings {
            stream_responses: 5,
            stream_gap: Duration::from_secs(4),
            ..KServeSettings::default()
        },
    );
    let proxy = single_route(&[upstream.addr().to_string()], true, "idle: 500ms");
    let mut client = grpc_client(proxy.outbound).await;
    let mut stream = client
        .model_stream_infer(tokio_stream::iter(vec![infer_request("model", "i")]))
        .await
        .expect("the stream starts")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("the first message")
        .expect("not the end");
    assert_eq!(first.infer_response.unwrap().id, "i-0");
    let started = Instant::now();
    let status = stream
        .message()
        .await
        .expect_err("a stalled stream ends with a status");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_total_limit_is_a_504_before_the_response_and_cuts_a_long_stream() {
    let upstream = OpenAiServer::with_settings(
        "long",
        OpenAiSettings {
            stream_chunks: 40,
            chunk_gap: Duration::from_millis(100),
            ..OpenAiSettings::default()
        },
    );
    let proxy = single_route(&[upstream.addr().to_string()], false, "total: 1s");
    let url = format!("{}{CHAT}", proxy.url());
    let client = HttpClient::http1();

    // Before the response starts: 504.
    let started = Instant::now();
    let reply = client
        .fetch(json_request(
            &url,
            &chat_body("model", false),
            &[("x-test-delay-ms", "5000")],
        ))
        .await;
    reply.assert_proxy_error(504, "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );

    // Mid-stream: the stream is cut, not completed.
    let started = Instant::now();
    let response = client
        .send(json_request(&url, &chat_body("model", true), &[]))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let arrivals = Arrivals::read(response.into_body()).await;
    let events = arrivals.sse_events();
    assert!(
        arrivals.end.is_err(),
        "a stream cut by the total limit must end in an error"
    );
    assert!(
        (2..30).contains(&events.len()),
        "with a 1 s limit on a 4 s stream the client got {} events",
        events.len()
    );
    assert!(events.iter().all(|e| e.data != "[DONE]"));
    let took = arrivals.ended_at - started;
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "cut after {took:?}"
    );
}

#[tokio::test]
async fn the_total_limit_cuts_a_grpc_stream_with_deadline_exceeded() {
    let upstream = KServeGrpcServer::with_settings(
        "long",
        KServeSettings {
            stream_responses: 40,
            stream_gap: Duration::from_millis(100),
            ..KServeSettings::default()
        },
    );
    let proxy = single_route(&[upstream.addr().to_string()], true, "total: 1s");
    let mut client = grpc_client(proxy.outbound).await;
    let mut stream = client
        .model_stream_infer(tokio_stream::iter(vec![infer_request("model", "t")]))
        .await
        .expect("the stream starts")
        .into_inner();
    let mut received = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => {
                panic!("the stream ended OK after {received} messages despite the 1s total limit")
            }
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        (2..30).contains(&received),
        "{received} messages before the limit"
    );
}

#[tokio::test]
async fn malformed_http_gets_a_400_and_the_connection_closes() {
    let upstream = OpenAiServer::start("never");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("all", &[upstream.addr()], ""),
        policy::route("all", "backends:\n  - backend: all\n"),
    ]));
    let cases: [&[u8]; 4] = [
        b"GET /v1/models HTTP/1.1\r\nhost: a\r\nthis header has no colon\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-length: abc\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        b"GET /v1/mo dels HTTP/1.1\r\nhost: a\r\n\r\n",
    ];
    for case in cases {
        let reply = raw_exchange(proxy.outbound, case, Duration::from_secs(5)).await;
        assert_eq!(
            reply.status(),
            Some(400),
            "{:?} got {:?}",
            String::from_utf8_lossy(case),
            reply.text()
        );
        assert!(
            reply.closed,
            "{:?}: the connection stayed open",
            String::from_utf8_lossy(case)
        );
    }
    // A head cut short, then the client leaves: nothing to answer, nothing breaks.
    let reply = raw_exchange(
        proxy.outbound,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost:",
        Duration::from_millis(300),
    )
    .await;
    assert!(!reply.text().contains("200"), "{:?}", reply.text());
    assert_eq!(
        upstream.request_count(),
        0,
        "a malformed request reached the upstream"
    );
    let reply = HttpClient::http1()
        .get(&format!("{}/v1/models", proxy.url()))
        .await;
    assert_eq!(
        reply.status,
        200,
        "the proxy stopped serving: {}",
        reply.text()
    );
}

#[tokio::test]
async fn opaque_tcp_is_forwarded_to_the_opaque_backend() {
    let echo = TcpEchoServer::start();
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("tcp-echo", &[echo.addr()], ""),
        policy::mesh("opaque:\n  backend: tcp-echo\n"),
    ]));
    let mut stream = tokio::net::TcpStream::connect(proxy.outbound)
        .await
        .unwrap();
    let mut payload = vec![0x01u8, 0x02, 0x00, 0xff];
    payload.extend((0..64 * 1024).map(|i| (i % 251) as u8));
    let (mut read, mut write) = stream.split();
    let writer = async {
        write.write_all(&payload).await.unwrap();
    };
    let mut echoed = vec![0u8; payload.len()];
    let reader = tokio::time::timeout(Duration::from_secs(10), read.read_exact(&mut echoed));
    let (_, read_result) = tokio::join!(writer, reader);
    read_result
        .expect("the echo within 10 s")
        .expect("read the echo");
    assert!(echoed == payload, "the bytes came back changed");
    assert_eq!(echo.connections(), 1);
}

#[tokio::test]
async fn opaque_tcp_is_refused_without_an_opaque_backend() {
    let upstream = OpenAiServer::start("http-only");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("all", &[upstream.addr()], ""),
        policy::route("all", "backends:\n  - backend: all\n"),
    ]));
    let reply = raw_exchange(
        proxy.outbound,
        b"\x01\x02not http at all\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        reply.closed,
        "the proxy kept an opaque connection open with nowhere to send it"
    );
    assert!(
        reply.bytes.is_empty(),
        "the proxy answered opaque bytes with {:?}",
        reply.text()
    );
    assert_eq!(upstream.request_count(), 0);
    let reply = HttpClient::http1()
        .get(&format!("{}/v1/models", proxy.url()))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test]
async fn an_upstream_that_breaks_http_is_a_502_upstream_error() {
    // The echo server answers a request with the request itself: not a response.
    let echo = TcpEchoServer::start();
    let proxy = single_route(&[echo.addr().to_string()], false, "firstByte: 5s");
    let started = Instant::now();
    let reply = HttpClient::http1()
        .post_json(
            &format!("{}{CHAT}", proxy.url()),
            &chat_body("model", false),
        )
        .await;
    reply.assert_proxy_error(502, "upstream_error");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(echo.connections() >= 1);
}

/// Asserts a proxy error in KServe v2's shape: this status, JSON, a body
/// that is exactly `{"error": "<message>"}`, no upstream involved. Returns
/// the message.
#[track_caller]
fn assert_kserve_error(reply: &Reply, status: u16) -> String {
    assert_eq!(reply.status.as_u16(), status, "{}", reply.text());
    let content_type = reply.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type:?}"
    );
    assert_eq!(
        reply.upstream(),
        None,
        "an upstream answered: {}",
        reply.text()
    );
    let body = reply.json();
    let fields = body.as_object().expect("a JSON object");
    assert_eq!(fields.len(), 1, "more than `error` in {body}");
    let message = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("`error` is not a string in {body}"));
    assert!(!message.trim().is_empty(), "empty message in {body}");
    message.to_string()
}

#[tokio::test]
async fn kserve_paths_get_every_proxy_error_as_a_kserve_error_body() {
    let slow = OpenAiServer::with_settings(
        "slow",
        OpenAiSettings {
            first_byte_delay: Duration::from_secs(5),
            ..OpenAiSettings::default()
        },
    );
    let fast = OpenAiServer::start("fast");
    // Answers a request with the request itself: not HTTP.
    let echo = TcpEchoServer::start();
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("refused", &[refused_addr()], "connectTimeout: 1s"),
        policy::backend(
            "unresolved",
            &["model-server.does-not-exist.invalid:8000"],
            "",
        ),
        policy::backend("echo", &[echo.addr()], ""),
        policy::local_model("broken", std::path::Path::new("/nonexistent/broken"), ""),
        policy::route(
            "unresolved",
            "match:\n  - model: {exact: unresolved}\nbackends:\n  - backend: unresolved\n",
        ),
        policy::route(
            "echo",
            "match:\n  - model: {exact: echo}\nbackends:\n  - backend: echo\ntimeouts:\n  firstByte: 5s\n",
        ),
        policy::route(
            "broken",
            "match:\n  - model: {exact: broken}\nbackends:\n  - backend: \"local:broken\"\n",
        ),
        policy::backend("slow", &[slow.addr()], ""),
        policy::backend("fast", &[fast.addr()], ""),
        policy::route(
            "refused",
            "match:\n  - model: {exact: refused}\nbackends:\n  - backend: refused\n",
        ),
        policy::route(
            "slow",
            "match:\n  - model: {exact: slow}\nbackends:\n  - backend: slow\ntimeouts:\n  firstByte: 300ms\n",
        ),
        policy::route(
            "limited",
            "match:\n  - model: {exact: limited}\nbackends:\n  - backend: fast\nrateLimits:\n  - {key: route, requestsPerSecond: 0.01, burst: 1}\n",
        ),
    ]));
    let client = HttpClient::http1();
    let infer = |model: &str| format!("{}/v2/models/{model}/infer", proxy.url());
    let body = r#"{"inputs":[{"name":"input0","shape":[1],"datatype":"FP32","data":[1.0]}]}"#;

    let reply = client.post_json(&infer("nothing"), body).await;
    let message = assert_kserve_error(&reply, 404);
    assert!(
        message.starts_with("no route matches POST /v2/models/nothing/infer"),
        "{message}"
    );
    let reply = client
        .get(&format!("{}/v2/health/ready", proxy.url()))
        .await;
    assert!(assert_kserve_error(&reply, 404).contains("no route matches GET /v2/health/ready"));
    // A path under /v2 that is no KServe endpoint is still answered in its shape.
    let reply = client
        .get(&format!("{}/v2/repository/index", proxy.url()))
        .await;
    assert_kserve_error(&reply, 404);

    let reply = client.post_json(&infer("refused"), body).await;
    let message = assert_kserve_error(&reply, 503);
    assert!(message.starts_with("connecting to 127.0.0.1:"), "{message}");

    let reply = client.post_json(&infer("unresolved"), body).await;
    assert!(assert_kserve_error(&reply, 503).contains("has no available endpoint"));

    let reply = client.post_json(&infer("echo"), body).await;
    assert!(assert_kserve_error(&reply, 502).starts_with("upstream "));

    // The proxy's own engine, whose model is missing (loading, then failed:
    // both are 503 with the reason).
    let texts = r#"{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","data":["hello"]}]}"#;
    let reply = client.post_json(&infer("broken"), texts).await;
    assert!(assert_kserve_error(&reply, 503).starts_with("local model broken is unavailable"));

    let reply = client.post_json(&infer("slow"), body).await;
    assert_eq!(
        assert_kserve_error(&reply, 504),
        "no response within the time-to-first-byte limit of 300ms"
    );

    let first = client.post_json(&infer("limited"), body).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let reply = client.post_json(&infer("limited"), body).await;
    assert!(assert_kserve_error(&reply, 429).starts_with("rate limited: "));
    assert!(
        reply.header("retry-after").is_some(),
        "429 without Retry-After"
    );

    // The same failures on OpenAI paths keep OpenAI's shape.
    let chat = format!("{}{CHAT}", proxy.url());
    client
        .post_json(&chat, &chat_body("nothing", false))
        .await
        .assert_proxy_error(404, "no_route");
    client
        .post_json(&chat, &chat_body("refused", false))
        .await
        .assert_proxy_error(503, "upstream_connect_error");
    client
        .post_json(&chat, &chat_body("limited", false))
        .await
        .assert_proxy_error(429, "rate_limited");
    assert_eq!(fast.request_count(), 1);
}
