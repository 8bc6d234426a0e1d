//! `infermesh-sim`, the simulated vLLM server the balancing benchmark runs
//! on, driven as users drive vLLM: the official `openai` package (streaming
//! with usage, models, adapters), plain HTTP for errors and `/metrics`, and
//! `infermesh-sim-load` against two servers. What is asserted is what the
//! benchmark relies on: a repeated prefix really is faster and is counted as
//! prefix-cache hits, adapters cost a load and are limited, the metrics
//! carry vLLM's names.
//!
//! Needs the venv of `scripts/setup.sh` (or `INFERMESH_PYTHON`) for the
//! `openai` tests; `INFERMESH_SKIP_PYTHON=1` skips them.

use std::process::Command;
use std::time::Duration;

use infermesh_tests::sim::sim_load_binary;
use infermesh_tests::{python, HttpClient, Metrics, SimServer};
use serde_json::Value;

const BASE: &str = "meta-llama/Llama-3.1-8B-Instruct";

fn chat(sim: &SimServer, args: &[&str]) -> Value {
    let base = format!("{}/v1", sim.url());
    let mut all = vec!["--base-url", base.as_str()];
    all.extend_from_slice(args);
    let output = python::run_script("sim_chat.py", &all, Duration::from_secs(60));
    assert!(
        output.status.success(),
        "sim_chat.py failed ({})\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("sim_chat.py prints JSON")
}

fn python_ready() -> bool {
    if python::skipped() {
        eprintln!("INFERMESH_SKIP_PYTHON is set: skipped");
        return false;
    }
    python::require_modules(&["openai"]);
    true
}

/// `n` distinct words, each one token of the simulator's tokenizer.
fn words(seed: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{seed}{}", i % 97))
        .collect::<Vec<_>>()
        .join(" ")
}

fn ttft(v: &Value) -> f64 {
    v["ttft"].as_f64().expect("a first content chunk")
}

#[test]
fn the_openai_package_streams_a_chat_completion_with_usage() {
    if !python_ready() {
        return;
    }
    let sim = SimServer::start(&["--name", "sim-a"]);
    let v = chat(&sim, &["--model", BASE, "--max-tokens", "12"]);
    assert_eq!(v["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 12, "{v}");
    assert_eq!(v["text"].as_str().unwrap().split_whitespace().count(), 12);
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 5, "{v}");
    assert_eq!(v["usage"]["total_tokens"].as_u64().unwrap(), prompt + 12);
    // One chunk per token (nothing else runs) plus the usage chunk.
    assert!(v["chunks"].as_u64().unwrap() >= 12, "{v}");
    // 12 tokens: a ~30 ms prefill and 11 gaps of 12 ms.
    let elapsed = v["elapsed"].as_f64().unwrap();
    assert!(elapsed >= 0.15, "{v}");

    let v = chat(&sim, &["--model", BASE, "--max-tokens", "5", "--no-stream"]);
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
    assert_eq!(v["finish_reason"], "length");
    let v = chat(&sim, &["--list-models"]);
    assert_eq!(v["models"], serde_json::json!([BASE]));
}

#[test]
fn a_repeated_prefix_is_faster_and_counted_as_prefix_cache_hits() {
    if !python_ready() {
        return;
    }
    let sim = SimServer::start(&[]);
    // 3,000 prompt tokens: 30 ms + 600 ms of prefill cold, 30 ms + a few warm.
    let system = words("sys", 3000);
    let cold = chat(
        &sim,
        &[
            "--model",
            BASE,
            "--system",
            &system,
            "--question",
            "first one",
        ],
    );
    let warm = chat(
        &sim,
        &[
            "--model",
            BASE,
            "--system",
            &system,
            "--question",
            "second two",
        ],
    );
    let fresh = chat(
        &sim,
        &[
            "--model",
            BASE,
            "--system",
            &words("other", 3000),
            "--question",
            "first one",
        ],
    );
    let cached = |v: &Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(cached(&cold), 0, "{cold}");
    assert_eq!(cached(&fresh), 0, "{fresh}");
    assert!(cached(&warm) >= 2990, "{warm}");
    assert!(ttft(&cold) >= 0.6, "{cold}");
    assert!(ttft(&fresh) >= 0.6, "{fresh}");
    assert!(ttft(&warm) < ttft(&cold) / 2.0, "warm {warm}\ncold {cold}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let text = rt
        .block_on(HttpClient::http1().get(&format!("{}/metrics", sim.url())))
        .text();
    let m = Metrics::parse(&text);
    let labels = [("model_name", BASE)];
    let prompts: u64 = [&cold, &warm, &fresh]
        .iter()
        .map(|v| v["usage"]["prompt_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(
        m.sum("vllm:prefix_cache_queries_total", &labels),
        prompts as f64
    );
    assert_eq!(
        m.sum("vllm:prefix_cache_hits_total", &labels),
        cached(&warm) as f64
    );
    assert_eq!(
        m.sum("vllm:time_to_first_token_seconds_count", &labels),
        3.0
    );
}

#[test]
fn lora_adapters_are_listed_cost_a_load_and_are_limited_to_max_loras() {
    if !python_ready() {
        return;
    }
    let sim = SimServer::start(&[
        "--lora",
        "tenant-a",
        "--lora",
        "tenant-b",
        "--max-loras",
        "1",
        "--lora-load-ms",
        "1500",
    ]);
    let v = chat(&sim, &["--list-models"]);
    assert_eq!(
        v["models"],
        serde_json::json!([BASE, "tenant-a", "tenant-b"])
    );
    let a1 = chat(&sim, &["--model", "tenant-a"]);
    let a2 = chat(&sim, &["--model", "tenant-a"]);
    let b = chat(&sim, &["--model", "tenant-b"]);
    let a3 = chat(&sim, &["--model", "tenant-a"]);
    assert!(ttft(&a1) >= 1.45, "a first load: {a1}");
    assert!(ttft(&a2) < 0.75, "a loaded: {a2}");
    assert!(ttft(&b) >= 1.45, "b evicts a: {b}");
    assert!(ttft(&a3) >= 1.45, "a was evicted: {a3}");

    // While a request runs on tenant-b, a request for tenant-a waits (one
    // slot, in use), and the metrics say so.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!("{}/v1/chat/completions", sim.url());
        let body = |model: &str| {
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":300}}"#)
        };
        let long = tokio::spawn({
            let (url, body) = (url.clone(), body("tenant-b"));
            async move { HttpClient::http1().post_json(&url, &body).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let queued = tokio::spawn({
            let (url, body) = (url.clone(), body("tenant-a"));
            async move { HttpClient::http1().post_json(&url, &body).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let m = Metrics::parse(
            &HttpClient::http1()
                .get(&format!("{}/metrics", sim.url()))
                .await
                .text(),
        );
        let info: Vec<_> = m.find("vllm:lora_requests_info", &[]).collect();
        assert_eq!(info.len(), 1, "{}", m.text);
        let l = &info[0].labels;
        assert_eq!(l["running_lora_adapters"], "tenant-b", "{}", m.text);
        assert_eq!(l["waiting_lora_adapters"], "tenant-a", "{}", m.text);
        assert_eq!(l["max_lora"], "1");
        assert_eq!(l["model_name"], BASE);
        assert!(info[0].value > 1.7e9, "a Unix timestamp: {}", info[0].value);
        assert_eq!(m.sum("vllm:num_requests_running", &[]), 1.0);
        assert_eq!(m.sum("vllm:num_requests_waiting", &[]), 1.0);
        assert_eq!(long.await.unwrap().status, 200);
        let queued = queued.await.unwrap();
        assert_eq!(queued.status, 200);
        assert_eq!(queued.json()["usage"]["completion_tokens"], 300);
    });
}

#[tokio::test]
async fn metrics_use_vllms_names_and_responses_carry_the_server_and_its_load() {
    let sim = SimServer::start(&["--name", "sim-7", "--kv-blocks", "1000", "--load-report"]);
    let client = HttpClient::http1();
    let url = format!("{}/v1/completions", sim.url());
    let running = tokio::spawn({
        let url = url.clone();
        async move {
            HttpClient::http1()
                .post_json(
                    &url,
                    &format!(
                        r#"{{"model":"{BASE}","prompt":"{}","max_tokens":100}}"#,
                        words("p", 800)
                    ),
                )
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let reply = client
        .post_json(
            &url,
            &format!(r#"{{"model":"{BASE}","prompt":"hello there","max_tokens":3}}"#),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.upstream(), Some("sim-7"));
    assert_eq!(reply.json()["object"], "text_completion");
    assert_eq!(
        reply.json()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        3
    );
    // The ORCA text form: the 800-token request holds 57 of 1000 blocks.
    let report = reply
        .header("endpoint-load-metrics")
        .expect("a load report")
        .to_string();
    assert!(report.starts_with("TEXT "), "{report}");
    let fields: std::collections::BTreeMap<&str, f64> = report["TEXT ".len()..]
        .split(", ")
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("key=value");
            (k, v.parse().expect("a number"))
        })
        .collect();
    assert_eq!(
        fields["named_metrics.num_requests_running"], 1.0,
        "{report}"
    );
    assert_eq!(
        fields["named_metrics.num_requests_waiting"], 0.0,
        "{report}"
    );
    assert!(
        fields["named_metrics.kv_cache_usage_perc"] > 0.05,
        "{report}"
    );

    let m = Metrics::parse(&client.get(&format!("{}/metrics", sim.url())).await.text());
    let labels = [("model_name", BASE)];
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:cache_config_info",
        "vllm:lora_requests_info",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:time_to_first_token_seconds_bucket",
    ] {
        assert!(
            m.find(name, &labels).next().is_some(),
            "{name} missing:\n{}",
            m.text
        );
    }
    let config: Vec<_> = m.find("vllm:cache_config_info", &labels).collect();
    assert_eq!(config[0].labels["block_size"], "16");
    assert_eq!(config[0].labels["num_gpu_blocks"], "1000");
    let usage = m.sum("vllm:kv_cache_usage_perc", &labels);
    assert!(usage > 0.05 && usage <= 1.0, "{}", m.text);
    assert_eq!(running.await.unwrap().status, 200);
}

#[tokio::test]
async fn bad_requests_get_an_openai_shaped_error_with_the_reason() {
    let sim = SimServer::start(&["--kv-blocks", "64"]);
    let client = HttpClient::http1();
    let chat = format!("{}/v1/chat/completions", sim.url());
    let cases = [
        ("{not json", 400, "not JSON"),
        (
            r#"{"messages":[{"role":"user","content":"x"}]}"#,
            400,
            "`model`",
        ),
        (&format!(r#"{{"model":"{BASE}"}}"#), 400, "`messages`"),
        (
            &format!(
                r#"{{"model":"{BASE}","messages":[{{"role":"user","content":"x"}}],"max_tokens":0}}"#
            ),
            400,
            "max_tokens",
        ),
        (
            &format!(
                r#"{{"model":"{BASE}","messages":[{{"role":"user","content":"x"}}],"max_tokens":2000}}"#
            ),
            400,
            "KV cache blocks",
        ),
        (
            r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#,
            404,
            "does not exist",
        ),
    ];
    for (body, status, reason) in cases {
        let reply = client.post_json(&chat, body).await;
        assert_eq!(reply.status, status, "{body}: {}", reply.text());
        let e = &reply.json()["error"];
        assert!(
            e["message"].as_str().unwrap().contains(reason),
            "{body}: {e}"
        );
        assert_eq!(e["code"], status);
        assert!(e["type"].as_str().unwrap().ends_with("Error"), "{e}");
    }
}

#[test]
fn the_load_generator_measures_a_shared_prefix_run_over_two_servers() {
    let servers = [
        SimServer::start(&[
            "--name",
            "s1",
            "--time-scale",
            "10",
            "--stream-interval",
            "4",
        ]),
        SimServer::start(&[
            "--name",
            "s2",
            "--time-scale",
            "10",
            "--stream-interval",
            "4",
        ]),
    ];
    let mut command = Command::new(sim_load_binary());
    for s in &servers {
        command.args([
            "--target",
            &s.url(),
            "--metrics",
            &format!("{}/metrics", s.url()),
        ]);
    }
    let output = command
        .args([
            "--rate",
            "4",
            "--duration",
            "20",
            "--time-scale",
            "10",
            "--tenants",
            "4",
        ])
        .args([
            "--system-tokens",
            "1000",
            "--question-tokens",
            "20",
            "--output-tokens",
            "16",
        ])
        .output()
        .expect("run infermesh-sim-load");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let v: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    let sent = v["requests"]["sent"].as_u64().unwrap();
    assert!(sent >= 40, "about 80 requests in 20 simulated seconds: {v}");
    assert_eq!(v["requests"]["ok"].as_u64().unwrap(), sent, "{v}");
    assert_eq!(v["output_tokens"].as_u64().unwrap(), 16 * sent, "{v}");
    assert_eq!(
        v["upstreams"]["s1"].as_u64().unwrap() + v["upstreams"]["s2"].as_u64().unwrap(),
        sent
    );
    // 4 tenants, each prefix cached on both servers after its first requests.
    let hit = v["prefix_cache_hit_rate"].as_f64().unwrap();
    assert!(hit > 0.6, "{v}");
    // Times are simulated: a warm prefill is ~35 ms, a cold one 230 ms;
    // decode gaps are about 12 ms (events carry 4 tokens each, and the load
    // generator divides their gaps by the tokens in them).
    let p50 = v["ttft_s"]["p50"].as_f64().unwrap();
    assert!(p50 > 0.02 && p50 < 0.2, "{v}");
    let itl = v["itl_s"]["p50"].as_f64().unwrap();
    assert!(itl > 0.008 && itl < 0.05, "{v}");
}
