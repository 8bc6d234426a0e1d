//! The fixtures on their own, without the proxy: each test here checks that a
//! fixture behaves as the end-to-end tests assume, so a failure there points
//! at the proxy and not at the fixture.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use infermesh_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use infermesh_proto::kserve::{ModelMetadataRequest, ModelReadyRequest};
use infermesh_tests::client::{
    chat_body, chat_deltas, distinct_arrivals, full, json_request, paced,
};
use infermesh_tests::kserve::{infer_request, END_TRAILER};
use infermesh_tests::openai::chunk_text;
use infermesh_tests::{
    raw_exchange, Arrivals, HttpClient, KServeGrpcServer, KServeSettings, OpenAiServer,
    OpenAiSettings, StreamOutcome, TcpEchoServer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn openai_fixture_speaks_http1_and_http2_on_one_port() {
    let upstream = OpenAiServer::start("alpha");
    let url = format!("http://{}/v1/chat/completions", upstream.addr());
    for client in [HttpClient::http1(), HttpClient::http2()] {
        let reply = client.post_json(&url, &chat_body("llama-3", false)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.upstream(), Some("alpha"));
        assert_eq!(reply.json()["model"], "llama-3");
        assert_eq!(
            reply.json()["choices"][0]["message"]["content"],
            "hello from alpha"
        );
    }
    let versions: Vec<_> = upstream.requests().iter().map(|r| r.version).collect();
    assert_eq!(versions, [http::Version::HTTP_11, http::Version::HTTP_2]);
}

#[tokio::test]
async fn openai_fixture_answers_every_endpoint_and_echoes_the_model() {
    let upstream = OpenAiServer::start("beta");
    let base = format!("http://{}", upstream.addr());
    let client = HttpClient::http1();

    let completion = client
        .post_json(
            &format!("{base}/v1/completions"),
            r#"{"model":"text-1","prompt":"hi"}"#,
        )
        .await;
    assert_eq!(completion.status, 200);
    assert_eq!(completion.json()["model"], "text-1");
    assert_eq!(completion.json()["object"], "text_completion");

    let embeddings = client
        .post_json(
            &format!("{base}/v1/embeddings"),
            r#"{"model":"embed-1","input":["a","b"]}"#,
        )
        .await;
    assert_eq!(embeddings.json()["model"], "embed-1");
    assert_eq!(embeddings.json()["data"].as_array().map(Vec::len), Some(2));

    let models = client.get(&format!("{base}/v1/models")).await;
    assert_eq!(models.json()["data"][0]["id"], "gpt-fixture");

    let infer = client
        .post_json(
            &format!("{base}/v2/models/resnet/versions/3/infer"),
            r#"{"id":"r1","inputs":[]}"#,
        )
        .await;
    assert_eq!(infer.status, 200);
    assert_eq!(infer.json()["model_name"], "resnet");
    assert_eq!(infer.json()["model_version"], "3");
    assert_eq!(infer.json()["id"], "r1");
    assert_eq!(infer.json()["outputs"][0]["datatype"], "FP32");

    for path in ["/v2/models/resnet/ready", "/v2/health/ready", "/ready"] {
        let reply = client.get(&format!("{base}{path}")).await;
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.upstream(), Some("beta"), "{path}");
    }

    let missing = client.get(&format!("{base}/nope")).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["type"], "fixture_error");
    assert_eq!(missing.upstream(), Some("beta"));

    let requested = client
        .fetch(json_request(
            &format!("{base}/v1/chat/completions"),
            &chat_body("m", false),
            &[("x-test-status", "429")],
        ))
        .await;
    assert_eq!(requested.status, 429);
    assert_eq!(upstream.request_count(), 9);
}

#[tokio::test]
async fn openai_fixture_records_bodies_byte_for_byte() {
    let upstream = OpenAiServer::start("gamma");
    let url = format!("http://{}/v1/chat/completions", upstream.addr());
    let body = "{ \"messages\" : [ {\"role\":\"user\",\"content\":\"h\u{e9}llo \\u00e9 \\\"q\\\"\"} ],\n  \"model\":\"m-1\" }";
    HttpClient::http1().post_json(&url, body).await;
    let pieces = vec![
        (Duration::ZERO, Bytes::from_static(b"{\"model\":\"m-2\",")),
        (
            Duration::from_millis(30),
            Bytes::from_static(b"\"messages\":[]}"),
        ),
    ];
    let request = Request::post(&url).body(paced(pieces)).unwrap();
    let reply = HttpClient::http1().fetch(request).await;
    assert_eq!(reply.json()["model"], "m-2");
    let recorded = upstream.requests();
    assert_eq!(recorded[0].body, body.as_bytes());
    assert_eq!(recorded[0].model().as_deref(), Some("m-1"));
    assert_eq!(
        recorded[1].body,
        &b"{\"model\":\"m-2\",\"messages\":[]}"[..]
    );
}

#[tokio::test]
async fn openai_fixture_streams_each_chunk_as_its_own_arrival() {
    let upstream = OpenAiServer::with_settings(
        "stream",
        OpenAiSettings {
            stream_chunks: 20,
            chunk_gap: Duration::from_millis(50),
            ..OpenAiSettings::default()
        },
    );
    let url = format!("http://{}/v1/chat/completions", upstream.addr());
    for client in [HttpClient::http1(), HttpClient::http2()] {
        let response = client
            .send(json_request(&url, &chat_body("s", true), &[]))
            .await
            .unwrap();
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let arrivals = Arrivals::read(response.into_body()).await;
        assert!(arrivals.end.is_ok(), "{:?}", arrivals.end);
        let events = arrivals.sse_events();
        assert_eq!(events.len(), 21, "20 chunks and [DONE]");
        assert_eq!(events.last().unwrap().data, "[DONE]");
        let deltas = chat_deltas(&events);
        assert_eq!(deltas, (0..20).map(chunk_text).collect::<Vec<_>>());
        let times: Vec<Instant> = events[..20].iter().map(|e| e.at).collect();
        assert_eq!(distinct_arrivals(&times, Duration::from_millis(5)), 20);
        assert!(times[19] - times[0] >= Duration::from_millis(19 * 45));
    }
    let streams = upstream.streams();
    assert_eq!(streams.len(), 2);
    assert!(streams
        .iter()
        .all(|s| s.outcome == StreamOutcome::Completed && s.sent.len() == 20));
}

#[tokio::test]
async fn openai_fixture_notices_a_client_that_goes_away() {
    let upstream = OpenAiServer::with_settings(
        "gone",
        OpenAiSettings {
            stream_chunks: 100,
            chunk_gap: Duration::from_millis(50),
            ..OpenAiSettings::default()
        },
    );
    // HTTP/1.1: close the socket after two events.
    let body = chat_body("s", true);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(upstream.addr())
        .await
        .unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(6).filter(|w| w == b"data: ").count() < 2 {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    let closed_at = Instant::now();
    let log = upstream
        .wait_stream_end(0, Duration::from_secs(3))
        .await
        .unwrap();
    match log.outcome {
        StreamOutcome::ClientGone { at, after_chunks } => {
            assert!(at.duration_since(closed_at) < Duration::from_secs(1));
            assert!(after_chunks < 100);
        }
        other => panic!("expected ClientGone, got {other:?}"),
    }

    // HTTP/2: drop the response body (the client resets the stream).
    let url = format!("http://{}/v1/chat/completions", upstream.addr());
    let client = HttpClient::http2();
    let response = client
        .send(json_request(&url, &chat_body("s", true), &[]))
        .await
        .unwrap();
    let arrivals = Arrivals::read_limited(response.into_body(), 2).await;
    assert_eq!(arrivals.frames.len(), 2);
    drop(arrivals);
    let dropped_at = Instant::now();
    let log = upstream
        .wait_stream_end(1, Duration::from_secs(3))
        .await
        .unwrap();
    match log.outcome {
        StreamOutcome::ClientGone { at, .. } => {
            assert!(at.duration_since(dropped_at) < Duration::from_secs(1))
        }
        other => panic!("expected ClientGone, got {other:?}"),
    }
    assert_eq!(upstream.client_gone_count(), 2);
}

#[tokio::test]
async fn openai_fixture_delays_the_first_byte() {
    let upstream = OpenAiServer::start("slow");
    upstream.update(|s| s.first_byte_delay = Duration::from_millis(300));
    let url = format!("http://{}/v1/chat/completions", upstream.addr());
    let started = Instant::now();
    let reply = HttpClient::http1()
        .post_json(&url, &chat_body("m", false))
        .await;
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn kserve_fixture_echoes_unary_calls() {
    let upstream = KServeGrpcServer::start("kserve-a");
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", upstream.addr()))
        .await
        .unwrap();
    let response = client
        .model_infer(infer_request("bert", "req-1"))
        .await
        .unwrap();
    assert_eq!(response.metadata().get("x-upstream").unwrap(), "kserve-a");
    let message = response.into_inner();
    assert_eq!(message.model_name, "bert");
    assert_eq!(message.id, "req-1");
    assert_eq!(message.outputs[0].datatype, "FP32");
    assert_eq!(
        message.outputs[0].contents.as_ref().unwrap().fp32_contents,
        vec![3.0, -4.0]
    );

    let ready = client
        .model_ready(ModelReadyRequest {
            name: "bert".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(ready.into_inner().ready);
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: "bert".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(metadata.into_inner().name, "bert");

    let mut failing = tonic::Request::new(infer_request("bert", "req-2"));
    failing
        .metadata_mut()
        .insert("x-test-grpc-code", "8".parse().unwrap());
    failing
        .metadata_mut()
        .insert("x-test-grpc-message", "busy".parse().unwrap());
    let status = client.model_infer(failing).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(status.message(), "busy");

    assert_eq!(upstream.model_names(), ["bert", "bert", "bert", "bert"]);
}

#[tokio::test]
async fn kserve_fixture_streams_responses_and_ends_with_the_chosen_status() {
    let upstream = KServeGrpcServer::with_settings(
        "kserve-stream",
        KServeSettings {
            stream_responses: 10,
            stream_gap: Duration::from_millis(50),
            stream_end: Some((
                tonic::Code::FailedPrecondition,
                "quota spent \u{2713}".to_string(),
            )),
            ..KServeSettings::default()
        },
    );
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", upstream.addr()))
        .await
        .unwrap();
    let requests = tokio_stream::iter(vec![infer_request("llm", "s1")]);
    let response = client.model_stream_infer(requests).await.unwrap();
    assert_eq!(
        response.metadata().get("x-upstream").unwrap(),
        "kserve-stream"
    );
    let mut stream = response.into_inner();
    let mut times = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(message)) => {
                let inner = message.infer_response.unwrap();
                assert_eq!(inner.id, format!("s1-{}", times.len()));
                times.push(Instant::now());
            }
            Ok(None) => panic!("stream ended with OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(times.len(), 10);
    assert_eq!(distinct_arrivals(&times, Duration::from_millis(5)), 10);
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(status.message(), "quota spent \u{2713}");
    assert_eq!(status.metadata().get(END_TRAILER).unwrap(), "end-of-stream");
}

#[tokio::test]
async fn kserve_fixture_notices_a_cancelled_stream() {
    let upstream = KServeGrpcServer::with_settings(
        "kserve-cancel",
        KServeSettings {
            stream_responses: 100,
            stream_gap: Duration::from_millis(50),
            ..KServeSettings::default()
        },
    );
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", upstream.addr()))
        .await
        .unwrap();
    // The request stream ends, so dropping the response stream resets the whole HTTP/2 stream.
    let requests = tokio_stream::iter(vec![infer_request("llm", "c1")]);
    let mut stream = client
        .model_stream_infer(requests)
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    stream.message().await.unwrap().unwrap();
    drop(stream);
    let dropped_at = Instant::now();
    let log = upstream
        .wait_stream_end(0, Duration::from_secs(3))
        .await
        .unwrap();
    match log.outcome {
        StreamOutcome::ClientGone { at, .. } => {
            assert!(at.duration_since(dropped_at) < Duration::from_secs(1))
        }
        other => panic!("expected ClientGone, got {other:?}"),
    }
}

#[tokio::test]
async fn tcp_echo_fixture_echoes() {
    let echo = TcpEchoServer::start();
    let reply = {
        let mut stream = tokio::net::TcpStream::connect(echo.addr()).await.unwrap();
        stream.write_all(b"\x01opaque\x02").await.unwrap();
        let mut buf = [0u8; 8];
        stream.read_exact(&mut buf).await.unwrap();
        buf
    };
    assert_eq!(&reply, b"\x01opaque\x02");
    assert_eq!(echo.connections(), 1);
    assert_eq!(echo.received(), b"\x01opaque\x02");
}

#[tokio::test]
async fn raw_exchange_reads_until_the_peer_closes() {
    let upstream = OpenAiServer::start("raw");
    let reply = raw_exchange(
        upstream.addr(),
        b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(reply.closed);
    assert_eq!(reply.status(), Some(200));
}

#[test]
fn demo_upstream_binary_serves_on_the_given_address() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_infermesh-demo-upstream"))
        .args([
            "--addr",
            "127.0.0.1:0",
            "--name",
            "demo-a",
            "--chunks",
            "3",
            "--gap-ms",
            "5",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in {line:?}"))
        .to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reply = runtime.block_on(async {
        let url = format!("http://{addr}/v1/chat/completions");
        let response = HttpClient::http1()
            .send(json_request(&url, &chat_body("llama-demo", true), &[]))
            .await
            .unwrap();
        assert_eq!(response.headers()["x-upstream"], "demo-a");
        Arrivals::read(response.into_body()).await
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        chat_deltas(&reply.sse_events()),
        ["tok0 ", "tok1 ", "tok2 "]
    );
}

#[tokio::test]
async fn paced_bodies_are_sent_in_pieces() {
    let upstream = OpenAiServer::start("paced");
    let url = format!("http://{}/echo/x", upstream.addr());
    let request = Request::post(&url)
        .body(paced(vec![
            (Duration::ZERO, Bytes::from_static(b"ab")),
            (Duration::from_millis(20), Bytes::from_static(b"cd")),
        ]))
        .unwrap();
    let reply = HttpClient::http1().fetch(request).await;
    assert_eq!(reply.json()["bodyLength"], 4);
    let empty = HttpClient::http2()
        .fetch(Request::get(&url).body(full(Bytes::new())).unwrap())
        .await;
    assert_eq!(empty.json()["method"], "GET");
}

/// The pods suite's server process: every extra server of
/// `infermesh-demo-upstream` listens where asked and does its job.
#[test]
fn demo_upstream_binary_runs_grpc_echo_udp_and_flaky_servers_beside_openai() {
    use std::io::{BufRead, Read, Write};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_infermesh-demo-upstream"))
        .args(["--addr", "127.0.0.1:0", "--name", "pod"])
        .args(["--grpc-addr", "127.0.0.1:0", "--echo-addr", "127.0.0.1:0"])
        .args([
            "--echo-addr",
            "127.0.0.1:0",
            "--udp-echo-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--flaky-addr",
            "127.0.0.1:0",
            "--banner-addr",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    while !lines
        .last()
        .is_some_and(|l: &String| l.starts_with("listening addr="))
    {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "output ended: {lines:?}"
        );
        lines.push(line.trim().to_string());
    }
    let addrs = |key: &str| -> Vec<std::net::SocketAddr> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("listening {key}=")))
            .map(|a| a.split_whitespace().next().unwrap().parse().unwrap())
            .collect()
    };
    let (grpc, echoes, udp, flaky, banner) = (
        addrs("grpc"),
        addrs("echo"),
        addrs("udp-echo"),
        addrs("flaky"),
        addrs("banner"),
    );
    assert_eq!(
        (
            grpc.len(),
            echoes.len(),
            udp.len(),
            flaky.len(),
            banner.len()
        ),
        (1, 2, 1, 1, 1),
        "{lines:?}"
    );
    let mut stream = std::io::BufReader::new(std::net::TcpStream::connect(banner[0]).unwrap());
    let mut hello = String::new();
    stream.read_line(&mut hello).unwrap();
    assert_eq!(hello, "220 demo-upstream ready\r\n");
    stream.get_mut().write_all(b"after").unwrap();
    let mut reply = [0u8; 5];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"after");
    for echo in &echoes {
        let mut stream = std::net::TcpStream::connect(echo).unwrap();
        stream.write_all(b"ping").unwrap();
        let mut reply = [0u8; 4];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"ping");
    }
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket.send_to(b"datagram", udp[0]).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = socket.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"datagram");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", grpc[0]))
            .await
            .unwrap();
        let reply = client
            .model_infer(infer_request("llama", "pod-1"))
            .await
            .unwrap();
        assert_eq!(reply.metadata().get("x-upstream").unwrap(), "pod");
        assert_eq!(reply.into_inner().id, "pod-1");
        let url = format!("http://{}/v1/chat/completions", flaky[0]);
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let reply = HttpClient::http1()
                .post_json(&url, &chat_body("m", false))
                .await;
            statuses.push(reply.status);
        }
        assert_eq!(statuses, [503, 200, 200]);
    });
    let _ = child.kill();
    let _ = child.wait();
}
