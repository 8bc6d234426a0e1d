//! OpenTelemetry traces through real sidecars into a real OTLP collector
//! (tests/src/otlp.rs: a gRPC and an HTTP/protobuf receiver decoding the
//! official protobufs): one trace end to end, parent/child links, an
//! attempt span per retry, the GenAI attributes, W3C propagation to the
//! model server, sampling decisions, and a collector that is down.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use infermesh_tests::client::{chat_body, json_request};
use infermesh_tests::kserve::{grpc_client, infer_request};
use infermesh_tests::otlp::{OtlpCollector, Span, Transport};
use infermesh_tests::{
    policy, refused_addr, ControlPlaneProcess, HttpClient, KServeGrpcServer, Metrics, OpenAiServer,
    ProxyProcess, ScriptedServer, Step,
};

const CHAT: &str = "/v1/chat/completions";
const MODEL: &str = "gpt-fixture";

/// Environment of a proxy exporting to `endpoint` over `protocol`, with
/// batches sent every 100 ms.
fn otel_env(
    builder: infermesh_tests::ProxyBuilder,
    service: &str,
    endpoint: &str,
    protocol: &str,
) -> infermesh_tests::ProxyBuilder {
    builder
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_SERVICE_NAME", service)
}

/// The server sidecar: its inbound route sends to `endpoints` in turn and
/// retries a 503 once, on the other endpoint.
fn server_policy(endpoints: &[SocketAddr]) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{name: llama}}
spec: {{endpoints: [{}], balancer: round-robin}}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {{name: serve}}
spec:
  listener: inbound
  match: [{{path: {{prefix: /v1/}}}}]
  backends: [{{backend: llama}}]
  retries: {{maxAttempts: 2, backoffBase: 5ms, on: {{statuses: [503]}}}}
"#,
        endpoints.join(", ")
    )
}

/// The client sidecar: model `MODEL` goes to the server sidecar's inbound
/// listener.
fn client_policy(server_inbound: SocketAddr) -> String {
    policy::docs(&[
        policy::backend("remote", &[server_inbound], ""),
        policy::route(
            "chat",
            &format!("match:\n  - model: {{exact: {MODEL}}}\nbackends:\n  - backend: remote"),
        ),
    ])
}

fn hex_id(seed: u64, len: usize) -> String {
    let text = format!(
        "{:016x}{:016x}",
        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        seed + 1
    );
    text[..len].to_string()
}

fn only<'a>(spans: &'a [Span], what: &str, pick: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "one {what} expected in {spans:#?}");
    found[0]
}

#[tokio::test]
async fn a_request_through_two_sidecars_is_one_trace_with_an_attempt_span_per_retry() {
    let collector = OtlpCollector::start();
    let model_server = OpenAiServer::start("llm");
    let failing = ScriptedServer::start("down", vec![Step::Status(503, None); 16]);
    // The server sidecar exports over HTTP/protobuf, the client's over gRPC:
    // both receivers see the same traces.
    let server = otel_env(
        ProxyProcess::builder(),
        "server-sidecar",
        &collector.http_endpoint(),
        "http/protobuf",
    )
    .policy(&server_policy(&[failing.addr(), model_server.addr()]))
    .start();
    let client = otel_env(
        ProxyProcess::builder(),
        "client-sidecar",
        &collector.grpc_endpoint(),
        "grpc",
    )
    .arg("--access-log")
    .policy(&client_policy(server.inbound))
    .start();

    let url = format!("{}{CHAT}", client.url());
    let mut traces = Vec::new();
    let mut usage = serde_json::Value::Null;
    for n in 0..4u64 {
        let trace_id = hex_id(n + 7, 32);
        let caller_span = hex_id(n + 100, 16);
        let traceparent = format!("00-{trace_id}-{caller_span}-01");
        let reply = HttpClient::http1()
            .fetch(json_request(
                &url,
                &chat_body(MODEL, false),
                &[("traceparent", &traceparent), ("tracestate", "app=1")],
            ))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        usage = serde_json::from_slice(&reply.body).unwrap();
        traces.push((trace_id, caller_span));
    }
    // Each trace: client sidecar server + client span(s), server sidecar
    // server + one or two attempt spans.
    let spans = collector
        .wait_for(Duration::from_secs(20), |spans| {
            traces.iter().all(|(trace_id, _)| {
                let trace: Vec<&Span> = spans.iter().filter(|s| &s.trace_id == trace_id).collect();
                trace.iter().filter(|s| s.is_server()).count() == 2
                    && trace
                        .iter()
                        .filter(|s| s.is_client() && s.service == "server-sidecar")
                        .count()
                        >= 1
                    && trace
                        .iter()
                        .filter(|s| s.is_client() && s.service == "client-sidecar")
                        .count()
                        == 1
            })
        })
        .await;
    let upstream_requests = model_server.requests();
    let mut retried = 0;
    for (trace_id, caller_span) in &traces {
        let trace: Vec<Span> = spans
            .iter()
            .filter(|s| &s.trace_id == trace_id)
            .cloned()
            .collect();
        // The client sidecar's server span is the child of the caller's span.
        let client_server = only(&trace, "client sidecar server span", |s| {
            s.is_server() && s.service == "client-sidecar"
        });
        assert_eq!(&client_server.parent_span_id, caller_span);
        assert_eq!(client_server.transport, Transport::Grpc);
        assert_eq!(client_server.str("infermesh.listener"), Some("outbound"));
        assert_eq!(client_server.str("infermesh.route"), Some("chat"));
        assert_eq!(client_server.str("infermesh.backend"), Some("remote"));
        assert_eq!(client_server.int("http.response.status_code"), Some(200));
        assert_eq!(client_server.str("gen_ai.operation.name"), Some("chat"));
        assert_eq!(client_server.str("gen_ai.request.model"), Some(MODEL));
        assert_eq!(client_server.bool("gen_ai.request.stream"), Some(false));
        assert_eq!(client_server.int("infermesh.retry_count"), Some(0));
        // The upstream's answer, read as it passed: token counts equal to
        // its `usage`.
        let server_server = only(&trace, "server sidecar server span", |s| {
            s.is_server() && s.service == "server-sidecar"
        });
        for span in [client_server, server_server] {
            assert_eq!(span.str("gen_ai.response.model"), usage["model"].as_str());
            assert_eq!(
                span.attributes
                    .contains_key("gen_ai.response.finish_reasons"),
                usage["choices"][0]["finish_reason"].is_string()
            );
            let usage = &usage["usage"];
            assert!(usage["prompt_tokens"].as_i64().is_some(), "{usage}");
            assert_eq!(
                span.int("gen_ai.usage.input_tokens"),
                usage["prompt_tokens"].as_i64()
            );
            assert_eq!(
                span.int("gen_ai.usage.output_tokens"),
                usage["completion_tokens"].as_i64()
            );
        }
        // Its attempt is its child, aimed at the server sidecar.
        let client_attempt = only(&trace, "client sidecar attempt", |s| {
            s.is_client() && s.service == "client-sidecar"
        });
        assert_eq!(client_attempt.parent_span_id, client_server.span_id);
        assert_eq!(client_attempt.str("infermesh.attempt.kind"), Some("first"));
        assert_eq!(client_attempt.str("server.address"), Some("127.0.0.1"));
        assert_eq!(
            client_attempt.int("server.port"),
            Some(i64::from(server.inbound.port()))
        );
        // The server sidecar continues the trace from that attempt.
        let server_server = only(&trace, "server sidecar server span", |s| {
            s.is_server() && s.service == "server-sidecar"
        });
        assert_eq!(server_server.parent_span_id, client_attempt.span_id);
        assert_eq!(server_server.transport, Transport::Http);
        assert_eq!(server_server.str("infermesh.listener"), Some("inbound"));
        assert_eq!(server_server.str("gen_ai.request.model"), Some(MODEL));
        let mut attempts: Vec<&Span> = trace
            .iter()
            .filter(|s| s.is_client() && s.service == "server-sidecar")
            .collect();
        attempts.sort_by_key(|s| s.int("infermesh.attempt"));
        assert!(attempts
            .iter()
            .all(|a| a.parent_span_id == server_server.span_id));
        let last = attempts.last().unwrap();
        assert_eq!(last.int("http.response.status_code"), Some(200));
        assert_eq!(
            last.int("server.port"),
            Some(i64::from(model_server.addr().port()))
        );
        match attempts.len() {
            1 => assert_eq!(server_server.int("infermesh.retry_count"), Some(0)),
            2 => {
                retried += 1;
                assert_eq!(attempts[0].str("infermesh.attempt.kind"), Some("first"));
                assert_eq!(attempts[0].int("http.response.status_code"), Some(503));
                assert_eq!(attempts[0].status, 2, "a failed attempt is an error");
                assert_eq!(
                    attempts[0].int("server.port"),
                    Some(i64::from(failing.addr().port()))
                );
                assert_eq!(attempts[1].str("infermesh.attempt.kind"), Some("retry"));
                assert_eq!(server_server.int("infermesh.retry_count"), Some(1));
            }
            n => panic!("{n} attempts in {trace:#?}"),
        }
        // The model server got the context of the attempt that reached it,
        // with the caller's trace state.
        let seen = upstream_requests
            .iter()
            .find(|r| {
                r.headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains(trace_id.as_str()))
            })
            .unwrap_or_else(|| panic!("no upstream request in trace {trace_id}"));
        assert_eq!(
            seen.headers["traceparent"],
            format!("00-{trace_id}-{}-01", last.span_id).as_str()
        );
        assert_eq!(seen.headers["tracestate"], "app=1");
        // The access log names the trace.
        let access = client.stdout_lines().join("\n");
        assert!(
            access.contains(&format!(r#""trace_id":"{trace_id}""#)),
            "access log without trace id {trace_id}: {access}",
        );
    }
    // Round-robin sends every other first attempt to the failing endpoint.
    assert!(retried >= 1, "no retry among {} traces", traces.len());

    // A request without trace context starts a trace at the client sidecar.
    let before = model_server.request_count();
    let streamed = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"Say hello"}}],"stream":true,"stream_options":{{"include_usage":true}}}}"#
    );
    let reply = HttpClient::http1().post_json(&url, &streamed).await;
    assert_eq!(reply.status, 200);
    // The usage of the stream's last chunk.
    let usage = reply
        .text()
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
        .filter_map(|chunk| chunk.get("usage").filter(|u| u.is_object()).cloned())
        .next_back()
        .expect("a usage chunk");
    assert!(usage["completion_tokens"].as_i64().is_some(), "{usage}");
    let request = model_server
        .wait_requests(before + 1, Duration::from_secs(5))
        .await
        .pop()
        .unwrap();
    let traceparent = request.headers["traceparent"].to_str().unwrap().to_string();
    let trace_id = traceparent.split('-').nth(1).unwrap().to_string();
    let spans = collector
        .wait_for(Duration::from_secs(20), |spans| {
            spans
                .iter()
                .filter(|s| s.trace_id == trace_id && s.is_server())
                .count()
                == 2
        })
        .await;
    let trace: Vec<Span> = spans
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect();
    let root = only(&trace, "root span", |s| s.parent_span_id.is_empty());
    assert_eq!(root.service, "client-sidecar");
    assert_eq!(root.bool("gen_ai.request.stream"), Some(true));
    let first_chunk = root.attributes.get("infermesh.time_to_first_chunk_ms");
    assert!(
        matches!(first_chunk, Some(infermesh_tests::otlp::Value::Double(ms)) if *ms > 0.0),
        "{root:?}"
    );
    // Token counts from the stream's usage chunk, read as it passed.
    for span in trace.iter().filter(|s| s.is_server()) {
        assert_eq!(
            span.int("gen_ai.usage.input_tokens"),
            usage["prompt_tokens"].as_i64(),
            "{span:?}"
        );
        assert_eq!(
            span.int("gen_ai.usage.output_tokens"),
            usage["completion_tokens"].as_i64(),
            "{span:?}"
        );
    }
}

#[tokio::test]
async fn sampling_follows_the_parent_then_the_ratio() {
    let collector = OtlpCollector::start();
    let model_server = OpenAiServer::start("llm");
    let proxy = otel_env(
        ProxyProcess::builder(),
        "sidecar",
        &collector.grpc_endpoint(),
        "grpc",
    )
    .env("OTEL_TRACES_SAMPLER_ARG", "0")
    .policy(&client_policy(model_server.addr()))
    .start();
    let url = format!("{}{CHAT}", proxy.url());
    let send = |headers: Vec<(&'static str, String)>| {
        let url = url.clone();
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let reply = HttpClient::http1()
                .fetch(json_request(&url, &chat_body(MODEL, false), &headers))
                .await;
            assert_eq!(reply.status, 200);
        }
    };
    // Ratio 0, no parent: no span, no header added.
    send(vec![]).await;
    // An unsampled parent: no span, its header passes unchanged.
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    send(vec![("traceparent", unsampled.to_string())]).await;
    // A malformed header is ignored, not an error.
    send(vec![(
        "traceparent",
        "00-xyz-b7ad6b7169203331-01".to_string(),
    )])
    .await;
    // A sampled parent, in W3C and in both B3 forms: sampled whatever the ratio.
    send(vec![(
        "traceparent",
        "00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string(),
    )])
    .await;
    send(vec![(
        "b3",
        "2af7651916cd43dd8448eb211c80319c-b7ad6b7169203332-1".to_string(),
    )])
    .await;
    send(vec![
        (
            "x-b3-traceid",
            "3af7651916cd43dd8448eb211c80319c".to_string(),
        ),
        ("x-b3-spanid", "b7ad6b7169203333".to_string()),
        ("x-b3-sampled", "1".to_string()),
    ])
    .await;
    let spans = collector
        .wait_for(Duration::from_secs(20), |spans| {
            spans.iter().filter(|s| s.is_server()).count() >= 3
        })
        .await;
    // Let a late batch arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = if spans.len() < collector.spans().len() {
        collector.spans()
    } else {
        spans
    };
    let mut servers: Vec<(String, String)> = spans
        .iter()
        .filter(|s| s.is_server())
        .map(|s| (s.trace_id.clone(), s.parent_span_id.clone()))
        .collect();
    servers.sort();
    assert_eq!(
        servers,
        vec![
            (
                "1af7651916cd43dd8448eb211c80319c".to_string(),
                "b7ad6b7169203331".to_string()
            ),
            (
                "2af7651916cd43dd8448eb211c80319c".to_string(),
                "b7ad6b7169203332".to_string()
            ),
            (
                "3af7651916cd43dd8448eb211c80319c".to_string(),
                "b7ad6b7169203333".to_string()
            ),
        ],
        "{spans:#?}"
    );
    let requests = model_server.requests();
    assert_eq!(requests.len(), 6);
    assert!(!requests[0].headers.contains_key("traceparent"));
    assert_eq!(requests[1].headers["traceparent"], unsampled);
    assert!(requests[3].headers["traceparent"]
        .to_str()
        .unwrap()
        .starts_with("00-1af7651916cd43dd8448eb211c80319c-"));
    // B3 callers are continued in W3C.
    assert!(requests[4].headers["traceparent"]
        .to_str()
        .unwrap()
        .starts_with("00-2af7651916cd43dd8448eb211c80319c-"));
}

#[tokio::test]
async fn with_the_collector_down_requests_are_unaffected_and_drops_are_counted() {
    let model_server = OpenAiServer::start("llm");
    let down = format!("http://{}", refused_addr());
    let proxy = otel_env(ProxyProcess::builder(), "sidecar", &down, "grpc")
        .policy(&client_policy(model_server.addr()))
        .start();
    let url = format!("{}{CHAT}", proxy.url());
    let started = Instant::now();
    for _ in 0..20 {
        let reply = HttpClient::http1()
            .post_json(&url, &chat_body(MODEL, false))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    // Generous: 20 requests to a local fixture take milliseconds; waiting
    // on export (a connect timeout each) would take far longer.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?} for 20 requests",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dropped = Metrics::scrape(&proxy)
            .await
            .sum("infermesh_trace_spans_dropped_total", &[]);
        // Two spans per request: the server span and its attempt.
        if dropped >= 40.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{dropped} spans counted as dropped, 40 expected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_collector_that_never_answers_costs_requests_nothing() {
    let model_server = OpenAiServer::start("llm");
    // Accepted by the kernel, never read: every export waits for its timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let proxy = otel_env(ProxyProcess::builder(), "sidecar", &endpoint, "grpc")
        .env("OTEL_BSP_EXPORT_TIMEOUT", "500")
        .env("OTEL_BSP_MAX_QUEUE_SIZE", "8")
        .env("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
        .policy(&client_policy(model_server.addr()))
        .start();
    let url = format!("{}{CHAT}", proxy.url());
    let started = Instant::now();
    for _ in 0..50 {
        send_chat(&url).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?} for 50 requests",
        started.elapsed()
    );
    // 100 spans through a queue of 8 behind exports that time out: most
    // are dropped, and every drop is counted.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dropped = Metrics::scrape(&proxy)
            .await
            .sum("infermesh_trace_spans_dropped_total", &[]);
        if dropped >= 80.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{dropped} spans counted as dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(silent);
}

#[tokio::test]
async fn a_bad_tracing_setting_stops_the_proxy_with_the_reason() {
    let exit = ProxyProcess::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
        .env("OTEL_TRACES_SAMPLER_ARG", "one percent")
        .policy(&client_policy(refused_addr()))
        .run_to_exit(Duration::from_secs(10));
    assert_eq!(exit.status.code(), Some(2), "{}", exit.stderr);
    assert!(
        exit.stderr.contains("OTEL_TRACES_SAMPLER_ARG"),
        "{}",
        exit.stderr
    );
}

#[tokio::test]
async fn a_mesh_config_sets_the_collector_and_the_ratio_over_the_environment() {
    let collector = OtlpCollector::start();
    let model_server = OpenAiServer::start("llm");
    let mesh = policy::mesh(&format!(
        "tracing:\n  endpoint: {}\n  protocol: http\n  sampling: 1",
        collector.http_endpoint()
    ));
    // The environment names a collector that is down: the policy wins.
    let down = format!("http://{}", refused_addr());
    let proxy = otel_env(ProxyProcess::builder(), "sidecar", &down, "grpc")
        .env("OTEL_TRACES_SAMPLER_ARG", "0")
        .policy(&policy::docs(&[client_policy(model_server.addr()), mesh]))
        .start();
    let reply = HttpClient::http1()
        .post_json(&format!("{}{CHAT}", proxy.url()), &chat_body(MODEL, false))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let spans = collector
        .wait_for(Duration::from_secs(20), |spans| spans.len() >= 2)
        .await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    assert!(spans.iter().all(|s| s.transport == Transport::Http));
    let server = only(&spans, "server span", |s| s.is_server());
    assert!(server.parent_span_id.is_empty(), "a root span: {server:?}");
    let attempt = only(&spans, "attempt span", |s| s.is_client());
    assert_eq!(attempt.parent_span_id, server.span_id);
    let metrics = Metrics::scrape(&proxy).await;
    assert_eq!(metrics.sum("infermesh_trace_spans_dropped_total", &[]), 0.0);
}

#[tokio::test]
async fn a_mesh_config_pushed_by_the_control_plane_starts_retargets_and_stops_tracing() {
    let first = OtlpCollector::start();
    let second = OtlpCollector::start();
    let model_server = OpenAiServer::start("llm");
    let mesh = |collector: &OtlpCollector| {
        policy::mesh(&format!(
            "tracing:\n  endpoint: {}\n  sampling: 1",
            collector.grpc_endpoint()
        ))
    };
    let control_plane =
        ControlPlaneProcess::start(&[("policy.yaml", &client_policy(model_server.addr()))]);
    // No endpoint in the environment: tracing is off until the policy says.
    let proxy = ProxyProcess::builder()
        .no_config()
        .arg("--control-plane")
        .arg(&control_plane.url())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start();
    let url = format!("{}{CHAT}", proxy.url());
    let send = || send_chat(&url);
    let routed = Instant::now();
    loop {
        let reply = HttpClient::http1()
            .post_json(&url, &chat_body(MODEL, false))
            .await;
        if reply.status == 200 {
            break;
        }
        assert!(routed.elapsed() < Duration::from_secs(20), "never routed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each step: push the policy, then send until a request's spans land
    // where the step says (a request may still meet the previous policy).
    control_plane.write(
        "policy.yaml",
        &policy::docs(&[client_policy(model_server.addr()), mesh(&first)]),
    );
    traced_at(&first, &url).await;
    // Retargeted: the next spans go to the second collector.
    control_plane.write(
        "policy.yaml",
        &policy::docs(&[client_policy(model_server.addr()), mesh(&second)]),
    );
    traced_at(&second, &url).await;
    // Removed: no more spans anywhere.
    control_plane.write("policy.yaml", &client_policy(model_server.addr()));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = second.spans().len();
        send().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if second.spans().len() == before {
            break;
        }
        assert!(Instant::now() < deadline, "tracing never stopped");
    }
    let (first_count, second_count) = (first.spans().len(), second.spans().len());
    for _ in 0..5 {
        send().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(first.spans().len(), first_count);
    assert_eq!(second.spans().len(), second_count);
}

async fn send_chat(url: &str) {
    let reply = HttpClient::http1()
        .post_json(url, &chat_body(MODEL, false))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// Sends requests to `url` until one's server span reaches `collector`.
async fn traced_at(collector: &OtlpCollector, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        send_chat(url).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        if collector.spans().iter().any(|s| s.is_server()) {
            return;
        }
        assert!(Instant::now() < deadline, "no span reached the collector");
    }
}

#[tokio::test]
async fn fallback_links_hedges_and_mirror_copies_are_attempts_of_their_kind() {
    let collector = OtlpCollector::start();
    let llm = OpenAiServer::start("llm");
    let shadow = OpenAiServer::start("shadow");
    let down = refused_addr();
    let slow = ScriptedServer::start("slow", vec![Step::Delay(Duration::from_secs(1)); 8]);
    let route = |name: &str, model: &str, rest: &str| {
        policy::route(
            name,
            &format!("match:\n  - model: {{exact: {model}}}\nbackends:\n  - backend: {rest}"),
        )
    };
    let proxy = otel_env(
        ProxyProcess::builder(),
        "sidecar",
        &collector.grpc_endpoint(),
        "grpc",
    )
    .policy(&policy::docs(&[
        policy::backend("llm", &[llm.addr()], ""),
        policy::backend("shadow", &[shadow.addr()], ""),
        policy::backend("down", &[down], "connectTimeout: 1s"),
        policy::backend("pair", &[slow.addr(), llm.addr()], "balancer: round-robin"),
        route("fb", "fb", "down\nfallback:\n  - backend: llm"),
        route("mirrored", "mirrored", "llm\nmirror: {backend: shadow}"),
        route("hedged", "hedged", "pair\nhedging: {delay: 100ms}"),
    ]))
    .start();
    let url = format!("{}{CHAT}", proxy.url());
    for model in ["fb", "mirrored", "hedged", "hedged"] {
        let reply = HttpClient::http1()
            .post_json(&url, &chat_body(model, false))
            .await;
        assert_eq!(reply.status, 200, "{model}: {}", reply.text());
    }
    let kinds_of = |spans: &[Span], model: &str| -> Vec<Vec<(String, i64)>> {
        spans
            .iter()
            .filter(|s| s.is_server() && s.str("gen_ai.request.model") == Some(model))
            .map(|server| {
                let mut kinds: Vec<(String, i64)> = spans
                    .iter()
                    .filter(|a| a.is_client() && a.parent_span_id == server.span_id)
                    .map(|a| {
                        (
                            a.str("infermesh.attempt.kind").unwrap_or("").to_string(),
                            a.int("server.port").unwrap_or(0),
                        )
                    })
                    .collect();
                kinds.sort();
                kinds
            })
            .collect()
    };
    let port = |addr: SocketAddr| i64::from(addr.port());
    let spans = collector
        .wait_for(Duration::from_secs(20), |spans| {
            kinds_of(spans, "fb").first().is_some_and(|k| k.len() == 2)
                && kinds_of(spans, "mirrored")
                    .first()
                    .is_some_and(|k| k.len() == 2)
                && kinds_of(spans, "hedged").len() == 2
        })
        .await;
    assert_eq!(
        kinds_of(&spans, "fb"),
        vec![vec![
            ("fallback".to_string(), port(llm.addr())),
            ("first".to_string(), port(down)),
        ]],
        "{spans:#?}"
    );
    let fb = only(&spans, "fb server span", |s| {
        s.is_server() && s.str("gen_ai.request.model") == Some("fb")
    });
    assert_eq!(fb.str("infermesh.backend"), Some("llm"));
    assert_eq!(fb.int("infermesh.retry_count"), Some(1));
    let refused = only(&spans, "the refused attempt", |s| {
        s.parent_span_id == fb.span_id && s.str("infermesh.attempt.kind") == Some("first")
    });
    assert_eq!(refused.status, 2);
    assert_eq!(refused.str("error.type"), Some("no_response"));
    assert_eq!(
        kinds_of(&spans, "mirrored"),
        vec![vec![
            ("first".to_string(), port(llm.addr())),
            ("mirror".to_string(), port(shadow.addr())),
        ]]
    );
    // Round robin sends one of the two hedged requests to the slow
    // endpoint first: its hedge goes to the other at 100 ms.
    let hedged = kinds_of(&spans, "hedged");
    assert!(
        hedged.contains(&vec![
            ("first".to_string(), port(slow.addr())),
            ("hedge".to_string(), port(llm.addr())),
        ]),
        "{hedged:?}"
    );
}

#[tokio::test]
async fn a_grpc_call_is_traced_with_its_grpc_status() {
    let collector = OtlpCollector::start();
    let resnet = KServeGrpcServer::start("grpc-resnet");
    let proxy = otel_env(
        ProxyProcess::builder(),
        "sidecar",
        &collector.grpc_endpoint(),
        "grpc",
    )
    .policy(&policy::docs(&[
        policy::backend("resnet", &[resnet.addr()], "protocol: http2"),
        policy::route(
            "resnet",
            "match:\n  - model: {exact: resnet50}\nbackends:\n  - backend: resnet\n",
        ),
    ]))
    .start();
    let mut client = grpc_client(proxy.outbound).await;
    client
        .model_infer(infer_request("resnet50", "r1"))
        .await
        .expect("ModelInfer resnet50");
    // No route for this model: the proxy's own UNIMPLEMENTED (12).
    let status = client
        .model_infer(infer_request("other", "o1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    let spans = collector
        .wait_for(Duration::from_secs(20), |spans| {
            spans.iter().filter(|s| s.is_server()).count() >= 2
                && spans.iter().any(|s| s.is_client())
        })
        .await;
    let served = only(&spans, "the served call", |s| {
        s.is_server() && s.str("gen_ai.request.model") == Some("resnet50")
    });
    assert_eq!(served.str("gen_ai.operation.name"), Some("inference"));
    assert_eq!(served.int("rpc.grpc.status_code"), Some(0));
    assert_eq!(served.str("infermesh.route"), Some("resnet"));
    let attempt = only(&spans, "its attempt", |s| {
        s.is_client() && s.parent_span_id == served.span_id
    });
    assert_eq!(
        attempt.int("server.port"),
        Some(i64::from(resnet.addr().port()))
    );
    let refused = only(&spans, "the unrouted call", |s| {
        s.is_server() && s.str("gen_ai.request.model") == Some("other")
    });
    assert_eq!(refused.int("rpc.grpc.status_code"), Some(12));
    assert!(refused.str("infermesh.route").is_none());
}
