//! Real Python clients through the proxy: the `openai` package streaming a
//! chat completion and listing models, `grpcio` calling KServe v2
//! `ModelInfer` with stubs generated from the repository's proto file, and
//! Triton's `tritonclient` (HTTP and gRPC) checking health, readiness,
//! inference and the proxy's own errors.
//!
//! They need the venv that `scripts/setup.sh` makes (or `INFERMESH_PYTHON`);
//! `INFERMESH_SKIP_PYTHON=1` skips them, and nothing else does.

use std::time::Duration;

use infermesh_tests::local;
use infermesh_tests::openai::chunk_text;
use infermesh_tests::{
    policy, python, KServeGrpcServer, OpenAiServer, OpenAiSettings, ProxyProcess,
};
use serde_json::Value;

fn run_json(script: &str, args: &[&str]) -> Value {
    let output = python::run_script(script, args, Duration::from_secs(60));
    assert!(
        output.status.success(),
        "{script} failed ({})\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[test]
fn the_openai_package_streams_a_chat_completion_through_the_proxy() {
    if python::skipped() {
        eprintln!("INFERMESH_SKIP_PYTHON is set: skipped");
        return;
    }
    python::require_modules(&["openai"]);
    let upstream = OpenAiServer::with_settings(
        "py-openai",
        OpenAiSettings {
            stream_chunks: 20,
            chunk_gap: Duration::from_millis(50),
            ..OpenAiSettings::default()
        },
    );
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("chat", &[upstream.addr()], ""),
        policy::route(
            "chat",
            "match:\n  - model: {exact: friendly}\nbackends:\n  - backend: chat\n    model: llama-3.1-8b-instruct\n",
        ),
    ]));
    let base_url = format!("{}/v1", proxy.url());
    let result = run_json(
        "openai_stream.py",
        &["--base-url", &base_url, "--model", "friendly"],
    );

    let chunks = result["chunks"].as_array().expect("chunks");
    let contents: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["content"].as_str())
        .collect();
    let expected: Vec<String> = (0..20).map(chunk_text).collect();
    assert_eq!(contents, expected, "{result:#}");
    assert_eq!(chunks.last().unwrap()["finish_reason"], "stop");
    assert!(chunks.iter().all(|c| c["model"] == "llama-3.1-8b-instruct"));
    let times: Vec<f64> = chunks.iter().map(|c| c["t"].as_f64().unwrap()).collect();
    let spread = times[times.len() - 1] - times[0];
    assert!(spread >= 0.5, "the openai client got 20 chunks within {spread:.3} s; the upstream spread them over 0.95 s");

    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    let body = requests[0].json();
    assert_eq!(
        body["model"], "llama-3.1-8b-instruct",
        "the alias was not applied"
    );
    assert_eq!(body["stream"], true);
    assert_eq!(requests[0].uri.path(), "/v1/chat/completions");
    let agent = requests[0]
        .headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        agent.starts_with("OpenAI/Python"),
        "user-agent {agent:?} did not reach the upstream"
    );
}

#[test]
fn grpcio_calls_kserve_model_infer_through_the_proxy() {
    if python::skipped() {
        eprintln!("INFERMESH_SKIP_PYTHON is set: skipped");
        return;
    }
    python::require_modules(&["grpc", "grpc_tools"]);
    let upstream = KServeGrpcServer::start("py-kserve");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("kserve", &[upstream.addr()], "protocol: http2"),
        policy::route(
            "resnet",
            "match:\n  - model: {exact: resnet50}\nbackends:\n  - backend: kserve\n",
        ),
    ]));
    let proto_dir = infermesh_tests::repo_root().join("proto/proto");
    let result = run_json(
        "kserve_grpc.py",
        &[
            "--target",
            &proxy.outbound.to_string(),
            "--proto-dir",
            proto_dir.to_str().unwrap(),
            "--model",
            "resnet50",
            "--id",
            "py-1",
        ],
    );
    assert_eq!(result["code"], "OK", "{result:#}");
    assert_eq!(result["model_name"], "resnet50");
    assert_eq!(result["id"], "py-1");
    assert_eq!(result["upstream"], "py-kserve");
    assert_eq!(result["outputs"][0]["datatype"], "FP32");
    assert_eq!(result["outputs"][0]["fp32"], serde_json::json!([3.0, -4.0]));
    assert_eq!(result["unrouted"]["code"], "UNIMPLEMENTED", "{result:#}");
    assert_eq!(upstream.model_names(), ["resnet50"]);
}

#[test]
fn the_python_clients_get_local_embeddings_when_the_remote_backend_is_down() {
    if python::skipped() {
        eprintln!("INFERMESH_SKIP_PYTHON is set: skipped");
        return;
    }
    python::require_modules(&["openai", "grpc", "grpc_tools"]);
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("remote", &[infermesh_tests::refused_addr()], ""),
        policy::local_model("minilm", &local::model_dir(), "maxWait: 5ms"),
        policy::route(
            "embeddings",
            "match:\n  - model: {exact: text-embedding-remote}\nbackends:\n  - backend: remote\nfallback:\n  - backend: \"local:minilm\"\n",
        ),
    ]));
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(local::wait_ready(&proxy, "minilm"));
    let texts = ["I love machine learning!", "Привет, как дела?"];
    let proto_dir = infermesh_tests::repo_root().join("proto/proto");
    let base_url = format!("{}/v1", proxy.url());
    let target = proxy.outbound.to_string();
    let mut args = vec![
        "--base-url",
        &base_url,
        "--model",
        "text-embedding-remote",
        "--target",
        &target,
        "--proto-dir",
        proto_dir.to_str().unwrap(),
        "--grpc-model",
        "text-embedding-remote",
    ];
    args.extend(texts);
    let result = run_json("local_clients.py", &args);

    let golden: Vec<local::Golden> = texts.iter().map(|t| local::golden_for(t)).collect();
    let check = |what: &str, got: &[f32], golden: &local::Golden| {
        let similarity = local::cosine(&golden.vector, got);
        assert!(
            similarity >= 0.9999,
            "{what} {:?}: cosine {similarity}",
            golden.input
        );
    };
    let openai = &result["openai"];
    assert_eq!(openai["model"], "text-embedding-remote", "{result:#}");
    let tokens: usize = golden.iter().map(|g| g.tokens).sum();
    assert_eq!(openai["usage"]["prompt_tokens"], tokens);
    for encoding in ["default", "float", "base64"] {
        let vectors = openai[encoding].as_array().expect(encoding);
        assert_eq!(vectors.len(), texts.len());
        for (vector, golden) in vectors.iter().zip(&golden) {
            check(encoding, &local::floats(vector), golden);
        }
    }
    assert_eq!(openai["empty"]["status"], 400, "{result:#}");
    assert_eq!(openai["empty"]["body"]["type"], "invalid_request_error");

    let kserve = &result["kserve"];
    assert_eq!(kserve["ready"], true, "{result:#}");
    let infer = &kserve["infer"];
    assert_eq!(infer["model_name"], "text-embedding-remote");
    assert_eq!(infer["id"], "py-1");
    assert_eq!(infer["datatype"], "FP32");
    assert_eq!(infer["shape"], serde_json::json!([2, 384]));
    let data = local::floats(&infer["data"]);
    for (i, golden) in golden.iter().enumerate() {
        check("ModelInfer", &data[i * 384..(i + 1) * 384], golden);
    }
    assert_eq!(kserve["invalid"]["code"], "INVALID_ARGUMENT", "{result:#}");
    assert!(kserve["invalid"]["details"]
        .as_str()
        .unwrap_or_default()
        .contains("BYTES"));
}

/// The proxy of the tritonclient test: resnet50 goes to the KServe fixtures
/// (gRPC and REST); with `local`, every other KServe request (health,
/// other model names) goes to the local model `minilm`.
fn kserve_proxy(grpc: &KServeGrpcServer, rest: &OpenAiServer, local: bool) -> ProxyProcess {
    let mut docs = vec![
        policy::backend("kserve-grpc", &[grpc.addr()], "protocol: http2"),
        policy::backend("kserve-rest", &[rest.addr()], ""),
        policy::route(
            "resnet-grpc",
            "match:\n  - grpc: {service: inference.GRPCInferenceService}\n    model: {exact: resnet50}\nbackends:\n  - backend: kserve-grpc\n",
        ),
        policy::route(
            "resnet-rest",
            "match:\n  - model: {exact: resnet50}\nbackends:\n  - backend: kserve-rest\n",
        ),
    ];
    if local {
        docs.push(policy::local_model(
            "minilm",
            &local::model_dir(),
            "maxWait: 5ms",
        ));
        docs.push(policy::route(
            "kserve-local",
            "match:\n  - path: {prefix: /v2}\n  - grpc: {service: inference.GRPCInferenceService}\nbackends:\n  - backend: \"local:minilm\"\n",
        ));
    }
    ProxyProcess::start(&policy::docs(&docs))
}

#[test]
fn tritonclient_speaks_kserve_v2_through_the_proxy_over_http_and_grpc() {
    if python::skipped() {
        eprintln!("INFERMESH_SKIP_PYTHON is set: skipped");
        return;
    }
    python::require_modules(&["tritonclient.http", "tritonclient.grpc"]);
    let grpc = KServeGrpcServer::start("triton-grpc");
    let rest = OpenAiServer::start("triton-rest");
    let served = kserve_proxy(&grpc, &rest, true);
    let bare = kserve_proxy(&grpc, &rest, false);
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(local::wait_ready(&served, "minilm"));
    let result = run_json(
        "kserve_tritonclient.py",
        &[
            "--served",
            &served.outbound.to_string(),
            "--bare",
            &bare.outbound.to_string(),
            "--model",
            "resnet50",
            "--local",
            "minilm",
            "--other",
            "other-model",
            "--unrouted",
            "no-such-model",
        ],
    );

    for api in ["http", "grpc"] {
        let seen = &result[api];
        // Server health is answered alike over REST and gRPC.
        assert_eq!(seen["server_live"]["ok"], true, "{api}: {result:#}");
        assert_eq!(seen["server_ready"]["ok"], true, "{api}: {result:#}");
        // The local model is ready under its name only.
        assert_eq!(seen["local_ready"]["ok"], true, "{api}: {result:#}");
        assert_eq!(seen["other_ready"]["ok"], false, "{api}: {result:#}");
        assert_eq!(
            seen["local_infer"]["ok"]["shape"],
            serde_json::json!([1, 384]),
            "{api}: {result:#}"
        );
        // Inference for a name the local model does not serve is refused
        // with the reason, in the client's own exception.
        let other = &seen["other_infer"];
        assert_eq!(
            other["exception"], "InferenceServerException",
            "{api}: {result:#}"
        );
        assert!(
            other["message"]
                .as_str()
                .is_some_and(|m| m.contains("other-model")),
            "{api}: {result:#}"
        );
        // A model no route takes: a clean exception saying so, never a
        // TypeError from a body the client cannot read.
        for call in ["unrouted_infer", "unrouted_metadata"] {
            let unrouted = &seen[call];
            assert_eq!(
                unrouted["exception"], "InferenceServerException",
                "{api} {call}: {result:#}"
            );
            assert!(unrouted.get("broken").is_none(), "{api} {call}: {result:#}");
            let message = unrouted["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("no route matches") && message.contains("no-such-model"),
                "{api} {call}: {result:#}"
            );
        }
    }
    assert_eq!(
        result["http"]["unrouted_infer"]["status"], "404",
        "{result:#}"
    );
    assert_eq!(
        result["grpc"]["unrouted_infer"]["status"], "StatusCode.UNIMPLEMENTED",
        "{result:#}"
    );
    assert_eq!(
        result["grpc"]["other_infer"]["status"], "StatusCode.NOT_FOUND",
        "{result:#}"
    );
    assert_eq!(result["http"]["other_infer"]["status"], "404", "{result:#}");

    let http = &result["http"]["infer"]["ok"];
    assert_eq!(http["model_name"], "resnet50", "{result:#}");
    assert_eq!(http["id"], "http-1");
    assert_eq!(http["output0"], serde_json::json!([0.5]));
    let infer = &result["grpc"]["infer"]["ok"];
    assert_eq!(infer["model_name"], "resnet50", "{result:#}");
    assert_eq!(infer["id"], "grpc-1");
    assert_eq!(infer["datatype"], "FP32");
    assert_eq!(grpc.model_names(), ["resnet50"]);
    let rest_paths: Vec<String> = rest
        .requests()
        .iter()
        .map(|r| r.uri.path().to_string())
        .collect();
    assert_eq!(rest_paths, ["/v2/models/resnet50/infer"]);
}

#[test]
fn the_openai_package_lists_the_models_the_routes_name() {
    if python::skipped() {
        eprintln!("INFERMESH_SKIP_PYTHON is set: skipped");
        return;
    }
    python::require_modules(&["openai"]);
    let upstream = OpenAiServer::start("py-models");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("chat", &[upstream.addr()], ""),
        // Listed whether or not it loads: no need to spend the load here.
        policy::local_model("minilm", std::path::Path::new("/nonexistent/minilm"), ""),
        policy::route(
            "chat",
            "match:\n  - model: {exact: friendly}\n  - model: {exact: llama-3.1-8b}\n  - model: {prefix: llama-}\nbackends:\n  - backend: chat\n",
        ),
        policy::route(
            "embeddings",
            "match:\n  - model: {exact: text-embedding-small}\n  - model: {exact: friendly}\nbackends:\n  - backend: \"local:minilm\"\n",
        ),
    ]));
    let base_url = format!("{}/v1", proxy.url());
    let result = run_json("openai_models.py", &["--base-url", &base_url]);
    assert_eq!(
        result["ids"],
        serde_json::json!(["friendly", "llama-3.1-8b", "text-embedding-small"]),
        "{result:#}"
    );
    assert_eq!(
        result["owned_by"],
        serde_json::json!(["chat", "chat", "local:minilm"]),
        "{result:#}"
    );
    assert_eq!(upstream.request_count(), 0, "the list is the proxy's own");
}
