//! The proxy answering requests itself with a `LocalModel` on its wgpu
//! engine (lavapipe here): OpenAI embeddings and KServe v2 REST and gRPC,
//! as a route's backend and as the last link of a fallback chain, with the
//! real APIs' errors; and a model that cannot load, which leaves the rest
//! of the proxy serving.
//!
//! "What the remote model returns" is sentence-transformers' output for the
//! same model, committed as `proxy/fallback/tests/golden.json`. Inputs are
//! few and short: every forward pass runs on the CPU.

use std::time::{Duration, Instant};

use infermesh_proto::kserve::model_infer_request::InferInputTensor;
use infermesh_proto::kserve::{
    InferTensorContents, ModelInferRequest, ModelMetadataRequest, ModelReadyRequest,
};
use infermesh_tests::client::chat_body;
use infermesh_tests::kserve::grpc_client;
use infermesh_tests::local::{cosine, floats, golden_for, model_dir, wait_ready, Golden};
use infermesh_tests::{
    policy, refused_addr, HttpClient, Metrics, OpenAiServer, ProxyProcess, Reply,
};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MIN_COSINE: f64 = 0.9999;
const MAX_ABS_DIFF: f32 = 1e-4;

/// A remote embeddings backend that is down, with the local model as its
/// fallback; a route straight to the local model (`minilm`); a chat route
/// with the same fallback.
fn proxy() -> ProxyProcess {
    ProxyProcess::start(&policy::docs(&[
        policy::backend("remote", &[refused_addr()], "connectTimeout: 1s"),
        policy::local_model("minilm", &model_dir(), "maxWait: 5ms\nmaxInputs: 8"),
        policy::route(
            "embeddings",
            "match:\n  - model: {exact: text-embedding-remote}\nbackends:\n  - backend: remote\nfallback:\n  - {backend: \"local:minilm\", model: all-MiniLM-L6-v2}",
        ),
        policy::route(
            "direct",
            "match:\n  - model: {exact: minilm}\nbackends:\n  - backend: \"local:minilm\"",
        ),
        policy::route(
            "chat",
            "match:\n  - model: {exact: chat-model}\nbackends:\n  - backend: remote\nfallback:\n  - backend: \"local:minilm\"",
        ),
    ]))
}

#[track_caller]
fn assert_matches(golden: &Golden, got: &[f32]) {
    assert_eq!(got.len(), golden.vector.len(), "{:?}", golden.input);
    let similarity = cosine(golden.vector.as_slice(), got);
    let diff = golden
        .vector
        .iter()
        .zip(got)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        similarity >= MIN_COSINE && diff <= MAX_ABS_DIFF,
        "{:?}: cosine {similarity}, max abs diff {diff}",
        golden.input
    );
}

fn little_endian_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[tokio::test]
async fn embeddings_for_a_down_backend_come_from_the_local_model_as_the_remote_model_computes_them()
{
    let proxy = proxy();
    wait_ready(&proxy, "minilm").await;
    let client = HttpClient::http1();
    let url = format!("{}/v1/embeddings", proxy.url());
    let inputs = [
        "The cat sat on the mat.",
        "café crème brûlée",
        "你好，世界",
        "hello",
    ];
    let body = json!({"model": "text-embedding-remote", "input": inputs}).to_string();
    let reply = client.post_json(&url, &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer = reply.json();
    assert_eq!(answer["object"], "list");
    // The client's model name is echoed, not the alias sent to the engine.
    assert_eq!(answer["model"], "text-embedding-remote");
    let data = answer["data"].as_array().expect("data");
    assert_eq!(data.len(), inputs.len());
    let mut tokens = 0;
    for (index, (item, input)) in data.iter().zip(inputs).enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], index);
        let golden = golden_for(input);
        tokens += golden.tokens;
        assert_matches(&golden, &floats(&item["embedding"]));
    }
    assert_eq!(answer["usage"]["prompt_tokens"], tokens);
    assert_eq!(answer["usage"]["total_tokens"], tokens);

    // base64: the little-endian f32 bytes, as OpenAI sends them.
    let body = json!({"model": "text-embedding-remote", "input": "A man is playing a guitar.", "encoding_format": "base64"});
    let reply = client.post_json(&url, &body.to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let encoded = reply.json()["data"][0]["embedding"]
        .as_str()
        .expect("a base64 string")
        .to_owned();
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64");
    assert_matches(
        &golden_for("A man is playing a guitar."),
        &little_endian_f32(&bytes),
    );

    // A chat completion is not the local model's to answer: the client
    // gets the remote failure, and the link is not counted.
    let reply = client
        .post_json(
            &format!("{}/v1/chat/completions", proxy.url()),
            &chat_body("chat-model", false),
        )
        .await;
    reply.assert_proxy_error(503, "upstream_connect_error");

    let metrics = Metrics::scrape(&proxy).await;
    let local = [("route", "embeddings"), ("backend", "local:minilm")];
    assert_eq!(metrics.sum("infermesh_fallbacks_total", &local), 2.0);
    assert_eq!(
        metrics.sum(
            "infermesh_requests_total",
            &[
                ("route", "embeddings"),
                ("backend", "local:minilm"),
                ("status", "200")
            ]
        ),
        2.0
    );
    assert_eq!(
        metrics.sum(
            "infermesh_local_requests_total",
            &[
                ("route", "embeddings"),
                ("model", "minilm"),
                ("outcome", "served")
            ]
        ),
        2.0
    );
    assert_eq!(
        metrics.sum("infermesh_fallbacks_total", &[("route", "chat")]),
        0.0
    );
    let model = [("model", "minilm")];
    assert_eq!(metrics.sum("infermesh_local_sequences_total", &model), 5.0);
    assert!(metrics.sum("infermesh_local_tokens_total", &model) >= tokens as f64);
    assert!(metrics.sum("infermesh_local_batch_size_count", &model) >= 2.0);
    assert!(metrics.sum("infermesh_local_forward_seconds_count", &model) >= 2.0);
    assert!(metrics.sum("infermesh_local_queue_wait_seconds_count", &model) >= 2.0);
    assert_eq!(metrics.sum("infermesh_local_model_ready", &model), 1.0);
}

#[tokio::test]
async fn kserve_rest_and_grpc_are_answered_by_the_local_model() {
    let proxy = proxy();
    wait_ready(&proxy, "minilm").await;
    let client = HttpClient::http1();
    let base = format!("{}/v2/models/minilm", proxy.url());

    let metadata = client.get(&base).await;
    assert_eq!(metadata.status, 200, "{}", metadata.text());
    let metadata = metadata.json();
    assert_eq!(metadata["name"], "minilm");
    assert_eq!(metadata["inputs"][0]["datatype"], "BYTES");
    assert_eq!(
        metadata["outputs"][0],
        json!({"name": "embedding", "datatype": "FP32", "shape": [-1, 384]})
    );
    assert_eq!(client.get(&format!("{base}/ready")).await.status, 200);

    let texts = ["How do I reset my password?", "Über Größe und Maß"];
    let body = json!({
        "id": "rest-1",
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}],
        "outputs": [{"name": "embedding"}],
    });
    let reply = client
        .post_json(&format!("{base}/infer"), &body.to_string())
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer = reply.json();
    assert_eq!(answer["model_name"], "minilm");
    assert_eq!(answer["id"], "rest-1");
    let output = &answer["outputs"][0];
    assert_eq!(output["name"], "embedding");
    assert_eq!(output["datatype"], "FP32");
    assert_eq!(output["shape"], json!([2, 384]));
    let data = floats(&output["data"]);
    for (i, text) in texts.iter().enumerate() {
        assert_matches(&golden_for(text), &data[i * 384..(i + 1) * 384]);
    }

    let mut grpc = grpc_client(proxy.outbound).await;
    let ready = grpc
        .model_ready(ModelReadyRequest {
            name: "minilm".into(),
            version: String::new(),
        })
        .await
        .expect("ModelReady");
    assert!(ready.into_inner().ready);
    let metadata = grpc
        .model_metadata(ModelMetadataRequest {
            name: "minilm".into(),
            version: String::new(),
        })
        .await
        .expect("ModelMetadata")
        .into_inner();
    assert_eq!(metadata.outputs[0].shape, [-1, 384]);

    // Texts in `contents`: the vectors come back in `contents`.
    let texts = ["Embeddings map text to vectors.", "🚀"];
    let request = infer_request(
        Some(InferTensorContents {
            bytes_contents: texts.iter().map(|t| t.as_bytes().to_vec()).collect(),
            ..Default::default()
        }),
        Vec::new(),
        2,
    );
    let response = grpc
        .model_infer(request)
        .await
        .expect("ModelInfer")
        .into_inner();
    assert_eq!(response.model_name, "minilm");
    assert_eq!(response.id, "grpc-1");
    assert_eq!(response.outputs[0].shape, [2, 384]);
    let data = &response.outputs[0]
        .contents
        .as_ref()
        .expect("contents")
        .fp32_contents;
    for (i, text) in texts.iter().enumerate() {
        assert_matches(&golden_for(text), &data[i * 384..(i + 1) * 384]);
    }

    // Texts raw, as Triton's clients send them: the vectors come back raw.
    let text = "Kubernetes sidecar injection webhook";
    let mut raw = (text.len() as u32).to_le_bytes().to_vec();
    raw.extend_from_slice(text.as_bytes());
    let response = grpc
        .model_infer(infer_request(None, vec![raw], 1))
        .await
        .expect("ModelInfer")
        .into_inner();
    assert_eq!(response.outputs[0].shape, [1, 384]);
    assert_eq!(response.raw_output_contents.len(), 1);
    assert_matches(
        &golden_for(text),
        &little_endian_f32(&response.raw_output_contents[0]),
    );
}

fn infer_request(
    contents: Option<InferTensorContents>,
    raw: Vec<Vec<u8>>,
    n: i64,
) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "minilm".into(),
        id: "grpc-1".into(),
        inputs: vec![InferInputTensor {
            name: "text".into(),
            datatype: "BYTES".into(),
            shape: vec![n],
            contents,
            ..Default::default()
        }],
        raw_input_contents: raw,
        ..Default::default()
    }
}

#[tokio::test]
async fn bad_requests_to_the_local_model_get_the_real_apis_errors() {
    let proxy = proxy();
    wait_ready(&proxy, "minilm").await;
    let client = HttpClient::http1();
    let url = format!("{}/v1/embeddings", proxy.url());
    let cases = [
        (
            json!({"model": "minilm", "input": []}),
            "input",
            "input must not be empty",
        ),
        (
            json!({"model": "minilm", "input": ""}),
            "input",
            "input[0] is an empty string",
        ),
        (
            json!({"model": "minilm", "input": vec!["a"; 9]}),
            "input",
            "too many inputs: 9 (this model takes at most 8 per request)",
        ),
        (
            json!({"model": "minilm", "input": ["a", {"b": 1}]}),
            "input",
            "input[1] must be a string",
        ),
        (
            json!({"model": "minilm", "input": [1, 2]}),
            "input",
            "token arrays are not accepted",
        ),
        (
            json!({"model": "minilm", "input": 7}),
            "input",
            "must be a string or an array of strings",
        ),
        (
            json!({"model": "minilm", "input": "a", "encoding_format": "int8"}),
            "encoding_format",
            "`encoding_format` must be `float` or `base64`",
        ),
        (
            json!({"model": "minilm", "input": "a", "dimensions": 64}),
            "dimensions",
            "384-dimensional",
        ),
    ];
    for (body, param, message) in cases {
        let reply = client.post_json(&url, &body.to_string()).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.text());
        assert!(reply
            .header("content-type")
            .unwrap_or_default()
            .starts_with("application/json"));
        let error = &reply.json()["error"];
        assert_eq!(error["type"], "invalid_request_error", "{body}");
        assert_eq!(error["param"], param, "{body}");
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains(message),
            "{body}: {error}"
        );
    }
    // A chat completion sent to the embedding model: 404, as OpenAI answers.
    let reply = client
        .post_json(
            &format!("{}/v1/chat/completions", proxy.url()),
            &chat_body("minilm", false),
        )
        .await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
    assert_eq!(reply.json()["error"]["param"], "model");

    // KServe REST: the protocol's `{"error": "..."}`.
    let body =
        json!({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a"]}]});
    let reply = client
        .post_json(
            &format!("{}/v2/models/minilm/infer", proxy.url()),
            &body.to_string(),
        )
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(reply.json()["error"]
        .as_str()
        .unwrap_or_default()
        .contains("has shape [3] but 1 elements"));

    // gRPC: INVALID_ARGUMENT with the reason.
    let mut grpc = grpc_client(proxy.outbound).await;
    let mut fp32 = infer_request(
        Some(InferTensorContents {
            fp32_contents: vec![1.0],
            ..Default::default()
        }),
        Vec::new(),
        1,
    );
    fp32.inputs[0].datatype = "FP32".into();
    let status = grpc
        .model_infer(fp32)
        .await
        .expect_err("FP32 input refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("must have datatype BYTES"),
        "{status:?}"
    );
    let empty = infer_request(Some(InferTensorContents::default()), Vec::new(), 0);
    let status = grpc.model_infer(empty).await.expect_err("no texts refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("input must not be empty"),
        "{status:?}"
    );

    let metrics = Metrics::scrape(&proxy).await;
    assert!(
        metrics.sum(
            "infermesh_local_requests_total",
            &[("route", "direct"), ("outcome", "invalid")]
        ) >= 12.0
    );
    assert_eq!(
        metrics.sum("infermesh_local_sequences_total", &[("model", "minilm")]),
        0.0,
        "a refused request reached the engine"
    );
}

#[tokio::test]
async fn a_local_model_without_its_files_leaves_the_proxy_serving_remote_routes() {
    let upstream = OpenAiServer::start("remote");
    let missing = tempfile::tempdir().expect("temp dir");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("remote", &[upstream.addr()], ""),
        policy::local_model("broken", missing.path(), ""),
        policy::route(
            "chat",
            "match:\n  - model: {exact: llama}\nbackends:\n  - backend: remote",
        ),
        policy::route(
            "local",
            "match:\n  - model: {exact: minilm}\nbackends:\n  - backend: \"local:broken\"",
        ),
    ]));
    let client = HttpClient::http1();

    // Loading fails at once, off the request path; /ready stays 200 and says why.
    let mut body = String::new();
    for _ in 0..100 {
        let reply = client.get(&format!("{}/ready", proxy.admin_url())).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        body = reply.text();
        if body.contains("unavailable") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(body.starts_with("ready\n"), "{body}");
    assert!(
        body.contains("local model broken: unavailable (model directory ")
            && body.contains("config.json is missing"),
        "{body}"
    );

    let reply = client
        .post_json(
            &format!("{}/v1/chat/completions", proxy.url()),
            &chat_body("llama", false),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.upstream(), Some("remote"));

    let reply = client
        .post_json(
            &format!("{}/v1/embeddings", proxy.url()),
            &json!({"model": "minilm", "input": "hello"}).to_string(),
        )
        .await;
    let message = reply.assert_proxy_error(503, "local_model_unavailable");
    assert!(
        message.contains("local model broken is unavailable"),
        "{message}"
    );
    assert!(message.contains("config.json is missing"), "{message}");

    let reply = client
        .get(&format!("{}/v2/models/minilm/ready", proxy.url()))
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text());

    let mut grpc = grpc_client(proxy.outbound).await;
    let ready = grpc
        .model_ready(ModelReadyRequest {
            name: "minilm".into(),
            version: String::new(),
        })
        .await
        .expect("ModelReady answers");
    assert!(!ready.into_inner().ready);
    let status = grpc
        .model_infer(infer_request(
            Some(InferTensorContents {
                bytes_contents: vec![b"hello".to_vec()],
                ..Default::default()
            }),
            Vec::new(),
            1,
        ))
        .await
        .expect_err("unavailable");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("config.json is missing"),
        "{status:?}"
    );

    let metrics = Metrics::scrape(&proxy).await;
    assert_eq!(
        metrics.sum("infermesh_local_model_ready", &[("model", "broken")]),
        0.0
    );
    assert!(
        proxy.stderr().contains("local model unavailable"),
        "{}",
        proxy.stderr()
    );
}

async fn config_version(proxy: &ProxyProcess) -> u64 {
    let reply = HttpClient::http1()
        .get(&format!("{}/config", proxy.admin_url()))
        .await;
    reply.json()["version"].as_u64().unwrap_or(0)
}

async fn next_version(proxy: &ProxyProcess, after: u64) -> u64 {
    let started = std::time::Instant::now();
    loop {
        let version = config_version(proxy).await;
        if version > after {
            return version;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no snapshot after version {after}\n--- stderr\n{}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_policy_push_that_keeps_the_local_model_keeps_its_engine() {
    let local = |extra: &str| {
        policy::docs(&[
            policy::local_model("minilm", &model_dir(), extra),
            policy::route(
                "direct",
                "match:\n  - model: {exact: minilm}\nbackends:\n  - backend: \"local:minilm\"",
            ),
        ])
    };
    let other = |model: &str| {
        policy::route(
            "other",
            &format!(
                "match:\n  - model: {{exact: {model}}}\nbackends:\n  - backend: \"local:minilm\""
            ),
        )
    };
    let control_plane = infermesh_tests::ControlPlaneProcess::start(&[
        ("local.yaml", &local("maxWait: 5ms")),
        ("other.yaml", &other("first")),
    ]);
    let proxy = ProxyProcess::builder()
        .no_config()
        .arg("--control-plane")
        .arg(&control_plane.url())
        .start();
    wait_ready(&proxy, "minilm").await;
    let loads = |proxy: &ProxyProcess| proxy.stderr().matches("loading local model").count();
    assert_eq!(loads(&proxy), 1);
    let client = HttpClient::http1();
    let url = format!("{}/v1/embeddings", proxy.url());
    let body = json!({"model": "minilm", "input": "hello"}).to_string();
    assert_eq!(client.post_json(&url, &body).await.status, 200);

    // Another document changes: the engine serves on, nothing reloads.
    let version = config_version(&proxy).await;
    control_plane.write("other.yaml", &other("second"));
    let version = next_version(&proxy, version).await;
    let reply = client.post_json(&url, &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(loads(&proxy), 1, "{}", proxy.stderr());

    // The model's own spec changes: a new engine loads, and serves.
    control_plane.write("local.yaml", &local("maxWait: 3ms"));
    next_version(&proxy, version).await;
    wait_ready(&proxy, "minilm").await;
    assert_eq!(loads(&proxy), 2, "{}", proxy.stderr());
    let reply = client.post_json(&url, &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

// === the engine's queue ===

/// A local model with passes of at most 8 sequences, reached directly
/// (`minilm`) and through a route with a one-second time limit
/// (`minilm-limited`).
fn queue_proxy() -> ProxyProcess {
    ProxyProcess::start(&policy::docs(&[
        policy::local_model(
            "minilm",
            &model_dir(),
            "maxWait: 5ms\nmaxBatchSize: 8\nmaxInputs: 256",
        ),
        policy::route(
            "direct",
            "match:\n  - model: {exact: minilm}\nbackends:\n  - backend: \"local:minilm\"",
        ),
        policy::route(
            "limited",
            "match:\n  - model: {exact: minilm-limited}\nbackends:\n  - backend: \"local:minilm\"\ntimeouts:\n  firstByte: 1s",
        ),
    ]))
}

/// The golden inputs of at most 16 tokens, so that every pass costs about
/// the same.
fn short_golden() -> Vec<Golden> {
    infermesh_tests::local::golden()
        .into_iter()
        .filter(|g| g.tokens <= 16)
        .collect()
}

/// 200 inputs: [`short_golden`], over and over.
fn long_inputs() -> Vec<String> {
    short_golden()
        .into_iter()
        .map(|g| g.input)
        .cycle()
        .take(200)
        .collect()
}

fn embeddings_body(model: &str, inputs: &[String]) -> String {
    json!({"model": model, "input": inputs}).to_string()
}

/// Sends an embeddings request and returns the reply and how long it took.
async fn timed_embed(proxy: &ProxyProcess, model: &str, inputs: &[String]) -> (Reply, Duration) {
    let started = Instant::now();
    let reply = HttpClient::http1()
        .post_json(
            &format!("{}/v1/embeddings", proxy.url()),
            &embeddings_body(model, inputs),
        )
        .await;
    (reply, started.elapsed())
}

/// What the engine has done so far, from its metrics.
#[derive(Debug, Clone, Copy)]
struct Work {
    /// Sequences computed.
    computed: f64,
    /// Forward passes run.
    passes: f64,
    cancelled: f64,
    expired: f64,
}

async fn work(proxy: &ProxyProcess) -> Work {
    let metrics = Metrics::scrape(proxy).await;
    let model = [("model", "minilm")];
    let dropped = |reason| {
        metrics.sum(
            "infermesh_local_sequences_dropped_total",
            &[("model", "minilm"), ("reason", reason)],
        )
    };
    Work {
        computed: metrics.sum("infermesh_local_sequences_total", &model),
        passes: metrics.sum("infermesh_local_batch_size_count", &model),
        cancelled: dropped("cancelled"),
        expired: dropped("expired"),
    }
}

/// Waits until the engine has run a forward pass since `before`.
async fn wait_for_a_pass(proxy: &ProxyProcess, before: Work) {
    let started = Instant::now();
    while work(proxy).await.passes <= before.passes {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no forward pass within 60 s\n--- stderr\n{}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every one of `sequences` sequences sent since `before` was
/// either computed or dropped, and returns the engine's work then.
async fn wait_accounted(proxy: &ProxyProcess, before: Work, sequences: f64) -> Work {
    let started = Instant::now();
    loop {
        let now = work(proxy).await;
        let accounted = (now.computed - before.computed)
            + (now.cancelled - before.cancelled)
            + (now.expired - before.expired);
        if accounted >= sequences {
            return now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "after 30 s only {accounted} of {sequences} sequences were computed or dropped: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long one short request and the costliest pass of [`long_inputs`]
/// (its 8 longest inputs) take alone, after a warm-up (the fastest of three
/// runs each).
async fn solo_times(proxy: &ProxyProcess) -> (Duration, Duration) {
    let short = vec!["hello".to_owned()];
    let mut golden = short_golden();
    golden.sort_by_key(|g| std::cmp::Reverse(g.tokens));
    let pass: Vec<String> = golden.into_iter().take(8).map(|g| g.input).collect();
    let mut best = (Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        let (reply, took) = timed_embed(proxy, "minilm", &short).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        best.0 = best.0.min(took);
        let (reply, took) = timed_embed(proxy, "minilm", &pass).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        best.1 = best.1.min(took);
    }
    best
}

/// The short request's wait is bounded by the pass under way, its own pass
/// and slack for a loaded machine; a short request behind all 25 passes
/// of a 200-input request passes it.
#[track_caller]
fn assert_not_stuck(waited: Duration, solo: (Duration, Duration), what: &str) {
    let bound = (solo.0 + solo.1) * 4;
    eprintln!(
        "{what}: waited {waited:?}; alone {:?}, a full pass {:?}",
        solo.0, solo.1
    );
    assert!(
        waited <= bound,
        "{what}: the short request took {waited:?}; alone it takes {:?} and a full pass {:?} (bound {bound:?})",
        solo.0,
        solo.1
    );
}

#[tokio::test]
async fn a_short_request_is_served_between_the_passes_of_a_long_one() {
    let proxy = queue_proxy();
    wait_ready(&proxy, "minilm").await;
    let solo = solo_times(&proxy).await;
    let before = work(&proxy).await;

    let inputs = long_inputs();
    let long = {
        let (url, body) = (
            format!("{}/v1/embeddings", proxy.url()),
            embeddings_body("minilm", &inputs),
        );
        tokio::spawn(async move { HttpClient::http1().post_json(&url, &body).await })
    };
    wait_for_a_pass(&proxy, before).await;
    let (reply, waited) = timed_embed(&proxy, "minilm", &["hello".to_owned()]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_matches(
        &golden_for("hello"),
        &floats(&reply.json()["data"][0]["embedding"]),
    );
    let at_short = work(&proxy).await;
    // Scheduled by request, the short one would come after all 200.
    let long_done = at_short.computed - before.computed - 1.0;
    assert!(
        long_done < 100.0,
        "{long_done} of the long request's 200 sequences were computed before the short one"
    );
    assert_not_stuck(waited, solo, "behind a long request");

    // The long request is still wanted: it gets every vector, each the one
    // sentence-transformers computes.
    let reply = long.await.expect("the long request's task");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer = reply.json();
    let data = answer["data"].as_array().expect("data");
    assert_eq!(data.len(), inputs.len());
    for (item, input) in data.iter().zip(&inputs) {
        assert_matches(&golden_for(input), &floats(&item["embedding"]));
    }
    let after = work(&proxy).await;
    assert_eq!(after.computed - before.computed, 201.0);
    assert_eq!((after.cancelled, after.expired), (0.0, 0.0));
}

#[tokio::test]
async fn a_long_request_whose_client_hangs_up_leaves_the_queue() {
    let proxy = queue_proxy();
    wait_ready(&proxy, "minilm").await;
    let solo = solo_times(&proxy).await;

    // The client sends 200 inputs and hangs up once the engine is on them.
    let before = work(&proxy).await;
    let body = embeddings_body("minilm", &long_inputs());
    let mut stream = TcpStream::connect(proxy.outbound).await.expect("connect");
    let head = format!(
        "POST /v1/embeddings HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body.as_bytes()).await.expect("write");
    wait_for_a_pass(&proxy, before).await;
    drop(stream);
    let (reply, waited) = timed_embed(&proxy, "minilm", &["hello".to_owned()]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_not_stuck(waited, solo, "behind an abandoned request");
    assert_cancelled(&proxy, before).await;
}

/// Asserts that of the 200 sequences of a request abandoned since
/// `before` (and one short request), some were dropped as cancelled and
/// the rest computed.
async fn assert_cancelled(proxy: &ProxyProcess, before: Work) {
    let after = wait_accounted(proxy, before, 201.0).await;
    let dropped = after.cancelled - before.cancelled;
    let computed = after.computed - before.computed;
    assert!(dropped > 0.0, "nothing was dropped: {after:?}");
    assert_eq!(dropped + computed, 201.0, "{after:?}");
    assert_eq!(after.expired, 0.0, "{after:?}");
}

#[tokio::test]
async fn a_cancelled_grpc_call_leaves_the_queue() {
    let proxy = queue_proxy();
    wait_ready(&proxy, "minilm").await;
    let solo = solo_times(&proxy).await;

    // A KServe ModelInfer call of 200 texts, dropped once the engine is on
    // them: its HTTP/2 stream is reset.
    let before = work(&proxy).await;
    let texts = long_inputs();
    let request = infer_request(
        Some(InferTensorContents {
            bytes_contents: texts.iter().map(|t| t.as_bytes().to_vec()).collect(),
            ..Default::default()
        }),
        Vec::new(),
        texts.len() as i64,
    );
    let mut grpc = grpc_client(proxy.outbound).await;
    let call = tokio::spawn(async move { grpc.model_infer(request).await });
    wait_for_a_pass(&proxy, before).await;
    call.abort();
    assert!(
        call.await.is_err(),
        "the call finished before it was dropped"
    );
    let (reply, waited) = timed_embed(&proxy, "minilm", &["hello".to_owned()]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_not_stuck(waited, solo, "behind a cancelled gRPC call");
    assert_cancelled(&proxy, before).await;
}

#[tokio::test]
async fn a_long_request_past_its_routes_time_limit_leaves_the_queue() {
    let proxy = queue_proxy();
    wait_ready(&proxy, "minilm").await;
    let solo = solo_times(&proxy).await;

    // The route's 1 s limit passes while 200 inputs are queued: the client
    // gets 504, and the engine drops what it has not computed.
    let before = work(&proxy).await;
    let (reply, _) = timed_embed(&proxy, "minilm-limited", &long_inputs()).await;
    reply.assert_proxy_error(504, "timeout");
    let (reply, waited) = timed_embed(&proxy, "minilm", &["hello".to_owned()]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_not_stuck(waited, solo, "behind a timed-out request");
    let after = wait_accounted(&proxy, before, 201.0).await;
    let dropped = after.expired - before.expired;
    let computed = after.computed - before.computed;
    assert!(dropped > 0.0, "nothing was dropped: {after:?}");
    assert_eq!(dropped + computed, 201.0, "{after:?}");
    assert_eq!(after.cancelled, 0.0, "{after:?}");
}
