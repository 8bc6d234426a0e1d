//! Streaming through the proxy: SSE and gRPC streams pass chunk by chunk (no
//! buffering, no coalescing), trailers pass unchanged, request bodies stream
//! upstream, and a client that goes away cancels the upstream stream.
//!
//! Arrival times are measured at the client and compared with the times the
//! upstream fixture (in this process) handed each chunk to its connection.

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use infermesh_tests::client::{chat_body, chat_deltas, distinct_arrivals, json_request, paced};
use infermesh_tests::kserve::{grpc_client, infer_request, END_TRAILER};
use infermesh_tests::openai::chunk_text;
use infermesh_tests::{
    policy, Arrivals, HttpClient, KServeGrpcServer, KServeSettings, OpenAiServer, OpenAiSettings,
    ProxyProcess, StreamOutcome,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// Two arrivals closer than this count as one (the upstream sends 50 ms apart).
const SAME_ARRIVAL: Duration = Duration::from_millis(5);

fn openai_policy(upstream: &OpenAiServer, protocol: &str) -> String {
    policy::docs(&[
        policy::backend("chat", &[upstream.addr()], &format!("protocol: {protocol}")),
        policy::route(
            "openai",
            "match:\n  - path: {prefix: /v1/}\nbackends:\n  - backend: chat\n",
        ),
    ])
}

fn grpc_policy(upstream: &KServeGrpcServer, route_extra: &str) -> String {
    policy::docs(&[
        policy::backend("kserve", &[upstream.addr()], "protocol: http2"),
        policy::route(
            "kserve",
            &format!(
                "match:\n  - grpc: {{service: inference.GRPCInferenceService}}\nbackends:\n  - backend: kserve\n{route_extra}"
            ),
        ),
    ])
}

fn twenty_chunks_50ms_apart(name: &str) -> OpenAiServer {
    OpenAiServer::with_settings(
        name,
        OpenAiSettings {
            stream_chunks: 20,
            chunk_gap: Duration::from_millis(50),
            ..OpenAiSettings::default()
        },
    )
}

fn gaps_ms(times: &[Instant]) -> Vec<u128> {
    times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect()
}

/// The median time from the upstream handing chunk i to its connection to
/// the client receiving it. A proxy that holds each chunk until the next one
/// comes shows the upstream's 50 ms gap here; one that forwards at once shows
/// a few milliseconds. The median ignores the odd stall of a busy machine.
#[track_caller]
fn assert_median_lag_small(sent: &[Instant], arrived: &[Instant]) {
    assert_eq!(sent.len(), arrived.len());
    let mut lags: Vec<Duration> = sent
        .iter()
        .zip(arrived)
        .map(|(s, a)| a.saturating_duration_since(*s))
        .collect();
    lags.sort();
    let median = lags[lags.len() / 2];
    assert!(
        median < Duration::from_millis(25),
        "chunks reached the client a median {median:?} after the upstream sent them (lags {lags:?}); each chunk must be forwarded as it arrives"
    );
}

async fn assert_sse_passes_chunk_by_chunk(client: HttpClient, upstream_protocol: &str) {
    assert_sse_passes_chunk_by_chunk_on(client, upstream_protocol, "1").await;
}

async fn assert_sse_passes_chunk_by_chunk_on(
    client: HttpClient,
    upstream_protocol: &str,
    threads: &str,
) {
    let upstream = twenty_chunks_50ms_apart("sse");
    let proxy = ProxyProcess::builder()
        .policy(&openai_policy(&upstream, upstream_protocol))
        .arg("--threads")
        .arg(threads)
        .start();
    let url = format!("{}/v1/chat/completions", proxy.url());

    let response = client
        .send(json_request(&url, &chat_body("llama-3", true), &[]))
        .await
        .expect("response from the proxy");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-upstream"], "sse");
    let arrivals = Arrivals::read(response.into_body()).await;
    assert!(
        arrivals.end.is_ok(),
        "the stream ended with an error: {:?}",
        arrivals.end
    );

    let events = arrivals.sse_events();
    assert_eq!(events.len(), 21, "20 chunks and [DONE], got {events:?}");
    assert_eq!(
        chat_deltas(&events),
        (0..20).map(chunk_text).collect::<Vec<_>>()
    );
    assert_eq!(events[20].data, "[DONE]");

    let log = &upstream.streams()[0];
    assert_eq!(log.outcome, StreamOutcome::Completed);
    let at: Vec<Instant> = events[..20].iter().map(|e| e.at).collect();
    assert_eq!(
        distinct_arrivals(&at, SAME_ARRIVAL),
        20,
        "the 20 chunks did not arrive separately; gaps between arrivals (ms): {:?}",
        gaps_ms(&at)
    );
    assert!(
        at[0] + Duration::from_millis(500) < log.sent[19],
        "the first chunk arrived only {:?} before the upstream sent the last; it should arrive as soon as it is sent",
        log.sent[19].saturating_duration_since(at[0])
    );
    assert_median_lag_small(&log.sent, &at);
}

#[tokio::test]
async fn sse_passes_chunk_by_chunk_http1_client_http1_upstream() {
    assert_sse_passes_chunk_by_chunk(HttpClient::http1(), "http1").await;
}

#[tokio::test]
async fn sse_passes_chunk_by_chunk_http2_client_http2_upstream() {
    assert_sse_passes_chunk_by_chunk(HttpClient::http2(), "http2").await;
}

#[tokio::test]
async fn sse_passes_chunk_by_chunk_http2_client_http1_upstream() {
    assert_sse_passes_chunk_by_chunk(HttpClient::http2(), "http1").await;
}

#[tokio::test]
async fn sse_passes_chunk_by_chunk_on_a_multi_threaded_runtime() {
    // The suite runs its proxies with one worker (a current-thread
    // runtime); this is the other flavour.
    assert_sse_passes_chunk_by_chunk_on(HttpClient::http2(), "http1", "2").await;
}

#[tokio::test]
async fn grpc_server_stream_passes_message_by_message_and_its_trailers_unchanged() {
    let upstream = KServeGrpcServer::with_settings(
        "grpc-stream",
        KServeSettings {
            stream_responses: 20,
            stream_gap: Duration::from_millis(50),
            stream_end: Some((
                tonic::Code::FailedPrecondition,
                "token quota spent \u{2713} 100%".to_string(),
            )),
            ..KServeSettings::default()
        },
    );
    let proxy = ProxyProcess::start(&grpc_policy(&upstream, ""));
    let mut client = grpc_client(proxy.outbound).await;

    let response = client
        .model_stream_infer(tokio_stream::iter(vec![infer_request("llm", "s1")]))
        .await
        .expect("the stream starts");
    assert_eq!(
        response.metadata().get("x-upstream").unwrap(),
        "grpc-stream"
    );
    let mut stream = response.into_inner();
    let mut at = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(message)) => {
                let inner = message.infer_response.expect("infer_response");
                assert_eq!(inner.id, format!("s1-{}", at.len()));
                assert_eq!(inner.model_name, "llm");
                at.push(Instant::now());
            }
            Ok(None) => {
                panic!("the stream ended with OK; the upstream ended it with FAILED_PRECONDITION")
            }
            Err(status) => break status,
        }
    };
    assert_eq!(at.len(), 20, "messages before the status");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert_eq!(status.message(), "token quota spent \u{2713} 100%");
    assert_eq!(
        status
            .metadata()
            .get(END_TRAILER)
            .map(|v| v.to_str().unwrap()),
        Some("end-of-stream"),
        "the upstream's trailer metadata did not reach the client: {status:?}"
    );

    let log = &upstream.streams()[0];
    assert_eq!(
        distinct_arrivals(&at, SAME_ARRIVAL),
        20,
        "the 20 messages did not arrive separately; gaps (ms): {:?}",
        gaps_ms(&at)
    );
    assert!(
        at[0] + Duration::from_millis(500) < log.sent[19],
        "the first message arrived only {:?} before the upstream sent the last",
        log.sent[19].saturating_duration_since(at[0])
    );
    assert_median_lag_small(&log.sent, &at);
}

#[tokio::test]
async fn grpc_stream_that_ends_ok_ends_ok_and_unary_errors_pass_unchanged() {
    let upstream = KServeGrpcServer::with_settings(
        "grpc-ok",
        KServeSettings {
            stream_responses: 3,
            ..KServeSettings::default()
        },
    );
    let proxy = ProxyProcess::start(&grpc_policy(&upstream, ""));
    let mut client = grpc_client(proxy.outbound).await;

    let mut stream = client
        .model_stream_infer(tokio_stream::iter(vec![
            infer_request("llm", "a"),
            infer_request("llm", "b"),
        ]))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(message) = stream.message().await.expect("the stream ends with OK") {
        ids.push(message.infer_response.unwrap().id);
    }
    assert_eq!(ids, ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]);

    // A trailers-only error from the upstream (grpc-status in the headers).
    let mut request = tonic::Request::new(infer_request("llm", "u1"));
    request
        .metadata_mut()
        .insert("x-test-grpc-code", "8".parse().unwrap());
    request.metadata_mut().insert(
        "x-test-grpc-message",
        "model busy, retry later".parse().unwrap(),
    );
    let status = client.model_infer(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "model busy, retry later");
}

/// Reads from a raw HTTP/1.1 connection until `events` SSE `data:` lines arrived.
async fn read_events(stream: &mut tokio::net::TcpStream, events: usize) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(6).filter(|w| w == b"data: ").count() < events {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("events within 10 s")
            .expect("read");
        assert!(
            n > 0,
            "the proxy closed the connection early: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

#[track_caller]
fn assert_gone_within_a_second(outcome: &StreamOutcome, left_at: Instant) {
    match outcome {
        StreamOutcome::ClientGone { at, after_chunks } => {
            let delay = at.saturating_duration_since(left_at);
            assert!(
                delay < Duration::from_secs(1),
                "the upstream stream was closed {delay:?} after the client left"
            );
            assert!(*after_chunks < 100, "the upstream sent every chunk");
        }
        other => {
            panic!("the upstream stream is still open a second after the client left: {other:?}")
        }
    }
}

fn endless_stream(name: &str) -> OpenAiServer {
    OpenAiServer::with_settings(
        name,
        OpenAiSettings {
            stream_chunks: 100,
            chunk_gap: Duration::from_millis(50),
            ..OpenAiSettings::default()
        },
    )
}

#[tokio::test]
async fn http1_client_disconnect_mid_stream_closes_the_upstream_stream() {
    for protocol in ["http1", "http2"] {
        let upstream = endless_stream("endless");
        let proxy = ProxyProcess::start(&openai_policy(&upstream, protocol));
        let body = chat_body("llama-3", true);
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: models\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut stream = tokio::net::TcpStream::connect(proxy.outbound)
            .await
            .unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let seen = read_events(&mut stream, 3).await;
        assert!(
            seen.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&seen)
        );
        drop(stream);
        let left_at = Instant::now();
        let log = upstream
            .wait_stream_end(0, Duration::from_secs(1))
            .await
            .expect("a stream");
        assert_gone_within_a_second(&log.outcome, left_at);

        // The proxy still serves.
        let reply = HttpClient::http1()
            .post_json(
                &format!("{}/v1/chat/completions", proxy.url()),
                &chat_body("llama-3", false),
            )
            .await;
        assert_eq!(reply.status, 200, "upstream {protocol}: {}", reply.text());
    }
}

#[tokio::test]
async fn http2_client_reset_mid_stream_closes_the_upstream_stream() {
    for protocol in ["http1", "http2"] {
        let upstream = endless_stream("endless");
        let proxy = ProxyProcess::start(&openai_policy(&upstream, protocol));
        let url = format!("{}/v1/chat/completions", proxy.url());
        let client = HttpClient::http2();
        let response = client
            .send(json_request(&url, &chat_body("llama-3", true), &[]))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut events = 0;
        while events < 3 {
            use http_body_util::BodyExt;
            let frame = body.frame().await.expect("a frame").expect("no error");
            if let Some(data) = frame.data_ref() {
                events += data.windows(6).filter(|w| w == b"data: ").count();
            }
        }
        // Dropping the body resets the HTTP/2 stream; the connection stays open.
        drop(body);
        let left_at = Instant::now();
        let log = upstream
            .wait_stream_end(0, Duration::from_secs(1))
            .await
            .expect("a stream");
        assert_gone_within_a_second(&log.outcome, left_at);

        let reply = client.post_json(&url, &chat_body("llama-3", false)).await;
        assert_eq!(reply.status, 200, "upstream {protocol}: {}", reply.text());
    }
}

#[tokio::test]
async fn grpc_client_cancel_mid_stream_closes_the_upstream_stream() {
    let upstream = KServeGrpcServer::with_settings(
        "grpc-endless",
        KServeSettings {
            stream_responses: 100,
            stream_gap: Duration::from_millis(50),
            ..KServeSettings::default()
        },
    );
    let proxy = ProxyProcess::start(&grpc_policy(&upstream, ""));
    let mut client = grpc_client(proxy.outbound).await;
    let mut stream = client
        .model_stream_infer(tokio_stream::iter(vec![infer_request("llm", "c1")]))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream
            .message()
            .await
            .expect("a message")
            .expect("not the end");
    }
    drop(stream);
    let left_at = Instant::now();
    let log = upstream
        .wait_stream_end(0, Duration::from_secs(1))
        .await
        .expect("a stream");
    assert_gone_within_a_second(&log.outcome, left_at);

    let reply = client
        .model_infer(infer_request("llm", "after"))
        .await
        .expect("the proxy still serves");
    assert_eq!(reply.into_inner().id, "after");
}

/// An HTTP/2 upstream answers a bidirectional stream before the client's
/// side of it ends: the request messages sent after the answer began still
/// reach it one by one, each answered before the next is sent.
#[tokio::test]
async fn a_bidirectional_grpc_stream_keeps_sending_after_the_answer_starts() {
    let upstream = KServeGrpcServer::with_settings(
        "grpc-bidi",
        KServeSettings {
            stream_responses: 1,
            ..KServeSettings::default()
        },
    );
    let proxy = ProxyProcess::start(&grpc_policy(&upstream, ""));
    let mut client = grpc_client(proxy.outbound).await;
    let (requests, outgoing) = tokio::sync::mpsc::channel(1);
    requests.send(infer_request("llm", "m0")).await.unwrap();
    let mut answers = client
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .expect("the stream starts")
        .into_inner();
    for i in 0..4 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            requests
                .send(infer_request("llm", &format!("m{i}")))
                .await
                .expect("the request stream is open");
        }
        let answer = tokio::time::timeout(Duration::from_secs(5), answers.message())
            .await
            .unwrap_or_else(|_| panic!("no answer to message {i} within 5 s"))
            .expect("a message")
            .expect("not the end");
        let id = answer.infer_response.expect("a response").id;
        assert_eq!(id, format!("m{i}-0"));
    }
    drop(requests);
    let end = tokio::time::timeout(Duration::from_secs(5), answers.message())
        .await
        .expect("the stream ends once the requests do")
        .expect("ends without an error");
    assert!(end.is_none(), "nothing after the last answer");
    assert_eq!(
        upstream.calls().len(),
        4,
        "every message reached the upstream"
    );
}

#[tokio::test]
async fn request_bodies_stream_upstream_before_the_client_finishes_sending() {
    let upstream = OpenAiServer::start("uploads");
    let proxy = ProxyProcess::start(&openai_policy(&upstream, "http1"));
    let url = format!("{}/v1/chat/completions", proxy.url());
    let pieces: Vec<Bytes> = vec![
        Bytes::from_static(b"{\"model\":\"llama-3\",\"stream\":false,\"messages\":["),
        Bytes::from_static(b"{\"role\":\"user\",\"content\":\"first part\"},"),
        Bytes::from_static(b"{\"role\":\"user\",\"content\":\"second part\"}"),
        Bytes::from_static(b"]}"),
    ];
    let expected: Vec<u8> = pieces.concat();
    let gap = Duration::from_millis(400);
    let paced_pieces = pieces
        .into_iter()
        .enumerate()
        .map(|(i, p)| (if i == 0 { Duration::ZERO } else { gap }, p))
        .collect();
    let started = Instant::now();
    let request = Request::post(&url)
        .header("content-type", "application/json")
        .body(paced(paced_pieces))
        .unwrap();
    let reply = HttpClient::http1().fetch(request).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.upstream(), Some("uploads"));

    let recorded = &upstream.requests()[0];
    assert_eq!(recorded.body, expected, "the upstream got a different body");
    let last_piece_sent = started + gap * 3;
    assert!(
        recorded.received_at + Duration::from_millis(400) < last_piece_sent,
        "the request reached the upstream {:?} after it started, only {:?} before the client sent its last piece: the proxy buffered the body",
        recorded.received_at.saturating_duration_since(started),
        last_piece_sent.saturating_duration_since(recorded.received_at)
    );
}

/// Runs curl against the proxy, stamping each stdout line with its arrival.
async fn curl_stream(args: &[&str]) -> (Vec<(Instant, String)>, std::process::ExitStatus) {
    let mut child = tokio::process::Command::new("curl")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("curl (scripts/setup.sh installs it)");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("curl output within 20 s")
        .expect("read curl output")
    {
        seen.push((Instant::now(), line));
    }
    let status = child.wait().await.unwrap();
    (seen, status)
}

#[tokio::test]
async fn curl_streams_sse_through_the_proxy_over_http1_and_http2() {
    let upstream = twenty_chunks_50ms_apart("curl");
    let proxy = ProxyProcess::start(&openai_policy(&upstream, "http1"));
    let url = format!("{}/v1/chat/completions", proxy.url());
    let body = chat_body("llama-3", true);
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let (lines, status) = curl_stream(&[
            "-sS",
            "--no-buffer",
            "--noproxy",
            "*",
            "--fail",
            version,
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
            &url,
        ])
        .await;
        assert!(status.success(), "curl {version} failed: {status}");
        let data: Vec<&(Instant, String)> = lines
            .iter()
            .filter(|(_, l)| l.starts_with("data: "))
            .collect();
        assert_eq!(data.len(), 21, "curl {version} saw {lines:?}");
        assert_eq!(data[20].1, "data: [DONE]");
        let spread = data[19].0 - data[0].0;
        assert!(
            spread >= Duration::from_millis(500),
            "curl {version}: the 20 chunks arrived within {spread:?}; the upstream spread them over 950 ms"
        );
    }
}
