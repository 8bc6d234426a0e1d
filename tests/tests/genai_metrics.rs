//! GenAI metrics and access logs, end to end: an application sidecar
//! (`apps/web`) calls a model server's sidecar (`models/llama`) over mutual
//! TLS with the official `openai` package (a streamed chat with usage), a
//! plain HTTP client (whole answers, a 503, an unknown model) and a tonic
//! gRPC client (a KServe `ModelStreamInfer` stream). Both sidecars'
//! Prometheus endpoints then hold `gen_ai_*` histograms per model, route,
//! backend and caller, with the token counts the upstream reported, a time
//! to first token that is the first event (not the headers), a time per
//! output token that is the gap between events, and the failure in the
//! duration histogram; and each sidecar's standard output holds the JSON
//! access lines its policy asks for, refusals limited per second.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use infermesh_tests::client::json_request;
use infermesh_tests::kserve::{grpc_client, infer_request};
use infermesh_tests::mesh::{meshed_client_policy, wait_ready, Mesh};
use infermesh_tests::{
    python, until, HttpClient, KServeGrpcServer, Metrics, OpenAiServer, ProxyProcess,
};
use serde_json::Value;

const WEB: &str = "spiffe://cluster.local/ns/apps/sa/web";
const SERVER: &str = "spiffe://cluster.local/ns/models/sa/llama";

/// The model server's side: OpenAI models by exact name and by prefix,
/// KServe gRPC with no access log of its own.
fn server_policy(openai: SocketAddr, kserve: SocketAddr) -> String {
    format!(
        r#"apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{name: llama-server}}
spec: {{endpoints: ["{openai}"]}}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{name: triton}}
spec: {{endpoints: ["{kserve}"], protocol: http2}}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {{name: chat, namespace: models}}
spec:
  listener: inbound
  match: [{{model: {{exact: llama-3-8b}}}}, {{model: {{prefix: mistral-}}}}]
  backends: [{{backend: llama-server}}]
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {{name: infer, namespace: models}}
spec:
  listener: inbound
  match: [{{grpc: {{service: inference.GRPCInferenceService}}}}]
  backends: [{{backend: triton}}]
  accessLog: false
"#
    )
}

/// The callers' side, and the mesh's access-log settings.
fn client_policy(inbound: SocketAddr) -> String {
    format!(
        "{}---\napiVersion: infermesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  accessLog: {{requests: true, refusalsPerSecond: 3}}\n",
        meshed_client_policy(inbound, SERVER)
    )
}

fn chat(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

/// The proxy's access lines of `kind` (`request`, `refusal`) so far.
fn access_lines(proxy: &ProxyProcess, kind: &str) -> Vec<Value> {
    proxy
        .stdout_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["type"] == kind)
        .collect()
}

/// Mean of a histogram: its `_sum` over its `_count` for these labels.
fn mean(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> (f64, f64) {
    let count = metrics.sum(&format!("{name}_count"), labels);
    let sum = metrics.sum(&format!("{name}_sum"), labels);
    (count, if count > 0.0 { sum / count } else { f64::NAN })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_requests_have_genai_metrics_and_access_lines_per_model_and_caller() {
    if python::skipped() {
        eprintln!("INFERMESH_SKIP_PYTHON is set: skipped");
        return;
    }
    python::require_modules(&["openai"]);
    let openai = OpenAiServer::start("llama");
    let kserve = KServeGrpcServer::start("triton");
    let inbound: SocketAddr = infermesh_tests::free_addr();
    let mesh = Mesh::start(
        &[
            ("server.yaml", &server_policy(openai.addr(), kserve.addr())),
            ("client.yaml", &client_policy(inbound)),
        ],
        "1h",
        &[("models", "llama"), ("apps", "web")],
    );
    let server = mesh
        .proxy("models", "llama")
        .inbound(inbound)
        .env("INFERMESH_SUMMARY_INTERVAL_MS", "300")
        .start();
    // Only the model server's sidecar sends summaries during the test.
    let web = mesh
        .proxy("apps", "web")
        .env("INFERMESH_SUMMARY_INTERVAL_MS", "3600000")
        .start();
    for proxy in [&server, &web] {
        wait_ready(proxy, Duration::from_secs(20)).await;
    }
    let http = HttpClient::http1();
    let url = format!("{}/v1/chat/completions", web.url());

    // Two whole answers of 40 tokens (20 in, 20 out), one with a trace.
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for headers in [
        vec![("x-test-usage-tokens", "40")],
        vec![("x-test-usage-tokens", "40"), ("traceparent", traceparent)],
    ] {
        let reply = http
            .fetch(json_request(&url, &chat("llama-3-8b"), &headers))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    // A failure: the upstream answers 503.
    let reply = http
        .fetch(json_request(
            &url,
            &chat("llama-3-8b"),
            &[("x-test-status", "503")],
        ))
        .await;
    assert_eq!(reply.status, 503);

    // A stream with the official client: its first event 300 ms after the
    // request (headers at once would not count), six content chunks 80 ms
    // apart, and usage (6 in, 6 out) in its last chunk.
    let output = python::run_script(
        "openai_stream.py",
        &[
            "--base-url",
            &format!("{}/v1", web.url()),
            "--model",
            "mistral-7b",
            "--include-usage",
            "--header",
            "x-test-delay-ms=300",
            "--header",
            "x-test-chunks=6",
            "--header",
            "x-test-gap-ms=80",
            "--header",
            "x-test-usage-tokens=12",
        ],
        Duration::from_secs(60),
    );
    assert!(
        output.status.success(),
        "openai_stream.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let streamed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        streamed["usage"],
        serde_json::json!({"prompt_tokens": 6, "completion_tokens": 6}),
        "{streamed}"
    );

    // KServe over gRPC: a stream of four responses 60 ms apart, for a
    // model no policy names.
    let mut grpc = grpc_client(web.url().trim_start_matches("http://").parse().unwrap()).await;
    let mut request = tonic::Request::new(tokio_stream::iter(vec![infer_request("resnet", "s")]));
    request
        .metadata_mut()
        .insert("x-test-responses", "4".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-test-gap-ms", "60".parse().unwrap());
    let mut responses = grpc.model_stream_infer(request).await.unwrap().into_inner();
    let mut received = 0;
    while let Some(message) = tokio_stream::StreamExt::next(&mut responses).await {
        message.unwrap();
        received += 1;
    }
    assert_eq!(received, 4);
    // And a unary ModelInfer.
    grpc.model_infer(infer_request("resnet", "u"))
        .await
        .unwrap();

    // Requests the model server's sidecar refuses: models no route serves.
    for _ in 0..8 {
        let reply = http
            .fetch(json_request(&url, &chat("unknown-model"), &[]))
            .await;
        assert_eq!(reply.status, 404, "{}", reply.text());
    }

    let server_metrics = until(
        "the stream's figures in the server sidecar's metrics",
        Duration::from_secs(10),
        || async {
            let metrics = Metrics::scrape(&server).await;
            let streams = metrics.sum("gen_ai_server_time_per_output_token_seconds_count", &[]);
            (streams >= 2.0).then_some(metrics).ok_or(streams)
        },
    )
    .await;
    let m = &server_metrics;
    let at_server = |model: &'static str| {
        [
            ("gen_ai_request_model", model),
            ("route", "chat"),
            ("backend", "llama-server"),
            ("caller", WEB),
        ]
    };

    // Tokens: as the upstream reported them, per model and caller.
    let llama = at_server("llama-3-8b");
    let tokens = |labels: &[(&str, &str)], kind: &str| {
        let mut labels = labels.to_vec();
        labels.push(("gen_ai_token_type", kind));
        m.sum("gen_ai_client_token_usage_sum", &labels)
    };
    assert_eq!(tokens(&llama, "input"), 40.0, "{}", m.text);
    assert_eq!(tokens(&llama, "output"), 40.0);
    let mistral = [
        ("gen_ai_request_model", "mistral-*"),
        ("route", "chat"),
        ("caller", WEB),
        ("gen_ai_operation_name", "chat"),
    ];
    assert_eq!(tokens(&mistral, "input"), 6.0, "{}", m.text);
    assert_eq!(tokens(&mistral, "output"), 6.0);

    // Duration: the successes, and the 503 as a failure.
    let mut ok = llama.to_vec();
    ok.push(("error_type", ""));
    assert_eq!(
        m.sum("gen_ai_client_operation_duration_seconds_count", &ok),
        2.0
    );
    let mut failed = llama.to_vec();
    failed.push(("error_type", "503"));
    assert_eq!(
        m.sum("gen_ai_client_operation_duration_seconds_count", &failed),
        1.0,
        "{}",
        m.text
    );

    // The stream: first token after the 300 ms wait for the first event,
    // then about 80 ms per token (six chunks, the usage chunk and [DONE]
    // 80 ms apart: 7 gaps over 5 tokens after the first).
    let (count, ttft) = mean(m, "gen_ai_server_time_to_first_token_seconds", &mistral);
    assert_eq!(count, 1.0);
    let (_, duration) = mean(m, "gen_ai_client_operation_duration_seconds", &mistral);
    assert!(ttft >= 0.3, "time to first token {ttft}");
    assert!(
        duration - ttft >= 0.4,
        "the first token is the first event, not the end: ttft {ttft}, duration {duration}"
    );
    let (count, per_token) = mean(m, "gen_ai_server_time_per_output_token_seconds", &mistral);
    assert_eq!(count, 1.0);
    assert!(
        per_token >= 0.07 && per_token < ttft,
        "time per output token {per_token} (ttft {ttft})"
    );

    // gRPC: a model no policy names is `other`; each message is a token.
    let grpc_labels = [
        ("gen_ai_operation_name", "inference"),
        ("gen_ai_request_model", "other"),
        ("route", "infer"),
        ("caller", WEB),
    ];
    let (count, per_message) = mean(
        m,
        "gen_ai_server_time_per_output_token_seconds",
        &grpc_labels,
    );
    assert_eq!(count, 1.0, "{}", m.text);
    assert!(per_message >= 0.05, "time per gRPC message {per_message}");
    assert_eq!(
        m.sum(
            "gen_ai_server_time_to_first_token_seconds_count",
            &grpc_labels
        ),
        2.0,
        "the stream and the unary call"
    );
    assert!(
        !m.text.contains("resnet") && !m.text.contains("unknown-model"),
        "model names no policy names stay out of the labels"
    );

    // The application's sidecar sees the same requests with no caller;
    // its routes name no model, so every model is `other` there.
    let client = Metrics::scrape(&web).await;
    let outbound = [
        ("gen_ai_request_model", "other"),
        ("route", "to-llama"),
        ("backend", "llama-mesh"),
        ("caller", ""),
        ("gen_ai_token_type", "output"),
    ];
    assert_eq!(
        client.sum("gen_ai_client_token_usage_sum", &outbound),
        46.0,
        "{}",
        client.text
    );

    // Access lines at the model server's sidecar: every field of a whole
    // answer, none for the gRPC route that turned them off.
    let lines = until(
        "the access lines of the server sidecar",
        Duration::from_secs(5),
        || async {
            let lines = access_lines(&server, "request");
            let chat = lines.iter().filter(|l| l["route"] == "chat").count();
            let refused = lines.iter().any(|l| l["error"] == "no_route");
            (chat >= 4 && refused)
                .then_some(lines.clone())
                .ok_or(format!("{lines:?}"))
        },
    )
    .await;
    let traced = lines
        .iter()
        .find(|l| l["trace_id"] == "0af7651916cd43dd8448eb211c80319c")
        .unwrap_or_else(|| panic!("no access line with the trace id: {lines:#?}"));
    assert_eq!(traced["listener"], "inbound");
    assert_eq!(traced["caller"], WEB);
    assert_eq!(traced["model"], "llama-3-8b");
    assert_eq!(traced["api"], "openai_chat");
    assert_eq!(traced["backend"], "llama-server");
    assert_eq!(traced["endpoint"], openai.addr().to_string());
    assert_eq!(traced["attempts"], 1);
    assert_eq!(traced["status"], 200);
    assert_eq!(traced["input_tokens"], 20);
    assert_eq!(traced["output_tokens"], 20);
    assert!(traced["ttft_ms"].as_f64().is_some() && traced["duration_ms"].as_f64().is_some());
    assert!(traced["timestamp"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let failed = lines
        .iter()
        .find(|l| l["status"] == 503)
        .expect("the 503's line");
    assert_eq!(failed["route"], "chat");
    assert!(
        lines.iter().all(|l| l["route"] != "infer"),
        "the infer route keeps no access log: {lines:#?}"
    );
    let stream = lines
        .iter()
        .find(|l| l["model"] == "mistral-7b")
        .expect("the stream's line");
    assert_eq!(stream["stream"], true);
    assert_eq!(stream["output_tokens"], 6);

    // Eight refusals in a burst: at most three lines per second, each
    // with its reason.
    let refused: Vec<&Value> = lines.iter().filter(|l| l["error"] == "no_route").collect();
    assert!(
        (1..=6).contains(&refused.len()),
        "refusal lines are limited: {refused:#?}"
    );
    assert_eq!(refused[0]["status"], 404);
    assert!(refused[0]["reason"]
        .as_str()
        .unwrap()
        .contains("unknown-model"));
    // A second later the next line counts those left out.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = http
        .fetch(json_request(&url, &chat("unknown-model"), &[]))
        .await;
    assert_eq!(reply.status, 404);
    let suppressed = until(
        "a refusal line counting the ones left out",
        Duration::from_secs(5),
        || async {
            let lines = access_lines(&server, "request");
            lines
                .iter()
                .filter(|l| l["error"] == "no_route")
                .find_map(|l| l["suppressed"].as_u64().filter(|n| *n > 0))
                .ok_or(format!("{lines:#?}"))
        },
    )
    .await;
    assert!(suppressed >= 2, "{suppressed}");

    // A connection refused before any request: plaintext on the strict
    // mTLS port.
    let mut plain = std::net::TcpStream::connect(inbound).unwrap();
    plain
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let refusal = until(
        "a refusal line for the plaintext connection",
        Duration::from_secs(5),
        || async {
            let lines = access_lines(&server, "refusal");
            lines
                .into_iter()
                .find(|l| l["listener"] == "inbound")
                .ok_or_else(|| server.stdout_lines().join("\n"))
        },
    )
    .await;
    assert!(
        refusal["error"]
            .as_str()
            .is_some_and(|e| e == "plaintext_refused" || e.starts_with("tls_")),
        "{refusal}"
    );
    assert!(refusal["peer"].as_str().unwrap().starts_with("127.0.0.1:"));

    // The dashboard's success rate counts 5xx as failures, not the
    // requests the proxy refused (404 no_route).
    let dashboard = until(
        "the server sidecar's summary on the control plane's dashboard",
        Duration::from_secs(10),
        || async {
            let reply = HttpClient::http1()
                .get(&format!("{}/dashboard.json", mesh.control.admin_url()))
                .await;
            let data = reply.json();
            let rows = data["figures"]["mesh"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let find = |model: &str| rows.iter().find(|r| r["model"] == model).cloned();
            match (find("unknown-model"), find("llama-3-8b")) {
                (Some(unknown), Some(llama)) if unknown["requests"] == 9 => Ok((unknown, llama)),
                _ => Err(data.to_string()),
            }
        },
    )
    .await;
    let (unknown, llama) = dashboard;
    assert_eq!(unknown["failures"], 0, "{unknown}");
    assert_eq!(llama["failures"], 1, "the 503: {llama}");

    // The application's sidecar logs its outbound requests too.
    let client_lines = access_lines(&web, "request");
    assert!(
        client_lines
            .iter()
            .any(|l| l["route"] == "to-llama" && l["listener"] == "outbound" && l["caller"] == ""),
        "{client_lines:#?}"
    );
    assert_eq!(
        Metrics::scrape(&server)
            .await
            .sum("infermesh_access_log_lines_dropped_total", &[]),
        0.0
    );
}

/// Three whole answers of 40 tokens (20 in, 20 out) through `proxy`.
async fn three_answers(proxy: &ProxyProcess) {
    let url = format!("{}/v1/chat/completions", proxy.url());
    for _ in 0..3 {
        let reply = HttpClient::http1()
            .fetch(json_request(
                &url,
                &chat("llama-3-8b"),
                &[("x-test-usage-tokens", "40")],
            ))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn genai_metrics_reach_an_otlp_collector_over_grpc_and_http() {
    let collector = infermesh_tests::otlp::OtlpCollector::start();
    let upstream = OpenAiServer::start("llama");
    let routes = |mesh: &str| {
        infermesh_tests::policy::docs(&[
            infermesh_tests::policy::backend("llama", &[upstream.addr()], ""),
            infermesh_tests::policy::route(
                "chat",
                "match:\n  - model: {exact: llama-3-8b}\nbackends:\n  - backend: llama\n",
            ),
            mesh.to_string(),
        ])
    };
    // One proxy told by its policy (OTLP/gRPC), one by the standard
    // variables (OTLP/HTTP), one whose collector is down.
    let by_policy = ProxyProcess::builder()
        .policy(&routes(&infermesh_tests::policy::mesh(&format!(
            "otlpMetrics: {{endpoint: \"{}\", interval: 1s}}\n",
            collector.grpc_endpoint()
        ))))
        .env("OTEL_SERVICE_NAME", "by-policy")
        .start();
    let by_env = ProxyProcess::builder()
        .policy(&routes(""))
        .env("OTEL_METRICS_EXPORTER", "otlp")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.http_endpoint())
        .env("OTEL_METRIC_EXPORT_INTERVAL", "500")
        .env("OTEL_SERVICE_NAME", "by-env")
        .start();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let collector_down = ProxyProcess::builder()
        .policy(&routes(""))
        .env("OTEL_METRICS_EXPORTER", "otlp")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            &format!("http://{dead_addr}"),
        )
        .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
        .start();
    for proxy in [&by_policy, &by_env, &collector_down] {
        three_answers(proxy).await;
    }

    for (service, transport) in [
        ("by-policy", infermesh_tests::otlp::Transport::Grpc),
        ("by-env", infermesh_tests::otlp::Transport::Http),
    ] {
        let input = until(
            &format!("{service}'s token usage at the collector"),
            Duration::from_secs(15),
            || async {
                collector
                    .histograms()
                    .into_iter()
                    .rev()
                    .find(|p| {
                        p.service == service
                            && p.name == "gen_ai.client.token.usage"
                            && p.str("gen_ai.token.type") == Some("input")
                            && p.count == 3
                    })
                    .ok_or(service)
            },
        )
        .await;
        assert_eq!(input.transport, transport);
        assert_eq!(input.unit, "{token}");
        assert_eq!(input.sum, 60.0);
        assert_eq!(input.str("gen_ai.request.model"), Some("llama-3-8b"));
        assert_eq!(input.str("gen_ai.operation.name"), Some("chat"));
        assert_eq!(input.str("infermesh.route"), Some("chat"));
        assert_eq!(input.str("infermesh.backend"), Some("llama"));
        assert_eq!(input.bounds.first(), Some(&1.0), "the advised boundaries");
        let points = collector.histograms();
        let duration = points
            .iter()
            .rev()
            .find(|p| p.service == service && p.name == "gen_ai.client.operation.duration")
            .expect("the duration histogram");
        assert_eq!((duration.unit.as_str(), duration.count), ("s", 3));
        assert!(points
            .iter()
            .any(|p| p.service == service && p.name == "gen_ai.server.time_to_first_token"));
    }

    // The collector that is down: requests unaffected, failures counted.
    let failed = until(
        "failed metric exports counted",
        Duration::from_secs(10),
        || async {
            let failed = Metrics::scrape(&collector_down)
                .await
                .sum("infermesh_otlp_metric_exports_failed_total", &[]);
            (failed >= 1.0).then_some(failed).ok_or(failed)
        },
    )
    .await;
    assert!(failed >= 1.0);
    three_answers(&collector_down).await;
}
