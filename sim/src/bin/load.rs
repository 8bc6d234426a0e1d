//! `infermesh-sim-load`: open-loop load of streaming chat completions, for
//! `scripts/bench-balancing.sh`. See `docs/simulator.md`.
//!
//! Requests arrive as a Poisson process at `--rate` (or `--load` ×
//! `--capacity`) requests per simulated second, round-robin over the
//! `--target`s, for `--duration` simulated seconds; whatever is still in
//! flight then is waited for (up to `--drain` simulated seconds, after that
//! it counts as failed). Every time and rate reported is in simulated time:
//! wall time × `--time-scale`, the factor the servers were started with.
//!
//! Per request it records the time to first token (the first SSE `data:`
//! event with content), the gaps between content events divided by the
//! tokens each carried (the servers are asked for
//! `stream_options.continuous_usage_stats`; without it one token per event),
//! and the output tokens of the final usage. With `--metrics URL`s it
//! scrapes `vllm:prefix_cache_queries_total`/`hits_total` before and after
//! and reports the fleet's prefix-cache hit rate over the run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use infermesh_sim::load::{percentile, prefix_counters, SseSplitter, Workload, WorkloadKind};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(name = "infermesh-sim-load")]
struct Args {
    /// Base URL to send to (`URL/v1/chat/completions`); repeat for round robin.
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// Requests per simulated second.
    #[arg(long, conflicts_with = "load")]
    rate: Option<f64>,
    /// Offered load as a share of --capacity (0.8 = 80%).
    #[arg(long, requires = "capacity")]
    load: Option<f64>,
    /// The fleet's capacity, requests per simulated second.
    #[arg(long)]
    capacity: Option<f64>,
    /// Simulated seconds of arrivals.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Simulated seconds to wait for requests in flight after the arrivals end.
    #[arg(long, default_value_t = 120.0)]
    drain: f64,
    /// The servers' --time-scale (simulated seconds per wall second).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    #[arg(long, value_enum, default_value = "shared-prefix")]
    workload: WorkloadKind,
    #[arg(long, default_value_t = 32)]
    tenants: usize,
    #[arg(long, default_value_t = 2000)]
    system_tokens: usize,
    #[arg(long, default_value_t = 50)]
    question_tokens: usize,
    /// max_tokens of every request.
    #[arg(long, default_value_t = 128)]
    output_tokens: usize,
    /// The base model's name.
    #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
    model: String,
    /// Adapters to name instead of the base model (tenant t uses the t-th mod n).
    #[arg(long, value_delimiter = ',')]
    lora: Vec<String>,
    /// A server's /metrics URL, for the prefix-cache hit rate (repeatable).
    #[arg(long = "metrics")]
    metrics: Vec<String>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A label copied into the JSON report.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Debug, Default)]
struct Outcome {
    ok: bool,
    error: Option<String>,
    ttft: Option<f64>,
    gaps: Vec<f64>,
    output_tokens: u64,
    upstream: Option<String>,
    done_at: f64,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let rate = match (a.rate, a.load, a.capacity) {
        (Some(r), _, _) => r,
        (None, Some(l), Some(c)) => l * c,
        _ => {
            eprintln!("infermesh-sim-load: give --rate, or --load with --capacity");
            std::process::exit(2);
        }
    };
    if [rate, a.time_scale, a.duration]
        .iter()
        .any(|v| v.is_nan() || *v <= 0.0)
    {
        eprintln!(
            "infermesh-sim-load: --rate/--load, --time-scale and --duration must be positive"
        );
        std::process::exit(2);
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let before = scrape(&client, &a.metrics).await;
    let workload = Workload {
        kind: a.workload,
        tenants: a.tenants,
        system_tokens: a.system_tokens,
        question_tokens: a.question_tokens,
    };
    let scale = a.time_scale;
    let mut rng = fastrand::Rng::with_seed(a.seed);
    let start = Instant::now();
    let wall_duration = a.duration / scale;
    let mut next = 0.0f64; // wall seconds since start
    let mut tasks = Vec::new();
    let mut i = 0usize;
    loop {
        // Exponential gaps: a Poisson process at `rate` per simulated second.
        next += -(1.0 - rng.f64()).ln() / (rate * scale);
        if next >= wall_duration {
            break;
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            start + Duration::from_secs_f64(next),
        ))
        .await;
        let prompt = workload.next(&mut rng);
        let model = if a.lora.is_empty() {
            a.model.clone()
        } else {
            a.lora[prompt.tenant % a.lora.len()].clone()
        };
        let body = json!({
            "model": model,
            "messages": [
                {"role": "system", "content": prompt.system},
                {"role": "user", "content": prompt.question},
            ],
            "max_tokens": a.output_tokens,
            "stream": true,
            "stream_options": {"include_usage": true, "continuous_usage_stats": true},
        });
        let url = format!(
            "{}/v1/chat/completions",
            a.targets[i % a.targets.len()].trim_end_matches('/')
        );
        i += 1;
        let client = client.clone();
        tasks.push(tokio::spawn(one(
            client,
            url,
            body.to_string(),
            start,
            scale,
        )));
    }
    let arrivals_done = start.elapsed().as_secs_f64();
    let deadline = tokio::time::Instant::from_std(
        start + Duration::from_secs_f64(arrivals_done + a.drain / scale),
    );
    let mut outcomes = Vec::new();
    for t in tasks {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(o)) => outcomes.push(o),
            Ok(Err(e)) => outcomes.push(Outcome {
                error: Some(format!("task: {e}")),
                ..Default::default()
            }),
            Err(_) => outcomes.push(Outcome {
                error: Some("still running when the drain time ended".into()),
                ..Default::default()
            }),
        }
    }
    let after = scrape(&client, &a.metrics).await;
    report(&a, rate, &outcomes, before.zip(after), scale);
}

/// The fleet's `(queries, hits)`; `None` without URLs or when a scrape failed.
async fn scrape(client: &HttpClient, urls: &[String]) -> Option<(f64, f64)> {
    if urls.is_empty() {
        return None;
    }
    let mut total = (0.0, 0.0);
    for url in urls {
        let uri: http::Uri = match url.parse() {
            Ok(u) => u,
            Err(e) => {
                eprintln!("infermesh-sim-load: bad --metrics URL {url}: {e}");
                return None;
            }
        };
        let response = match client.get(uri).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("infermesh-sim-load: scraping {url}: {e}");
                return None;
            }
        };
        let body = response.into_body().collect().await.ok()?.to_bytes();
        let (q, h) = prefix_counters(&String::from_utf8_lossy(&body));
        total.0 += q;
        total.1 += h;
    }
    Some(total)
}

/// Sends one streaming request and times its events.
async fn one(client: HttpClient, url: String, body: String, start: Instant, scale: f64) -> Outcome {
    let mut o = Outcome::default();
    let request = match http::Request::post(&url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
    {
        Ok(r) => r,
        Err(e) => {
            o.error = Some(format!("request: {e}"));
            return o;
        }
    };
    let sent = Instant::now();
    let response = match client.request(request).await {
        Ok(r) => r,
        Err(e) => {
            o.error = Some(format!("send: {e}"));
            return o;
        }
    };
    o.upstream = response
        .headers()
        .get("x-upstream")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let status = response.status();
    let mut body = response.into_body();
    let mut sse = SseSplitter::default();
    let mut last: Option<Instant> = None;
    let mut tokens_so_far = 0u64;
    let mut done = false;
    let mut error_text = String::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                o.error = Some(format!("body: {e}"));
                return o;
            }
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        if !status.is_success() {
            error_text.push_str(&String::from_utf8_lossy(data));
            continue;
        }
        let now = Instant::now();
        for event in sse.push(data) {
            if event == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&event) else {
                o.error = Some(format!("unreadable event {event:?}"));
                return o;
            };
            let completion = v
                .pointer("/usage/completion_tokens")
                .and_then(Value::as_u64);
            let has_content = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty());
            if has_content {
                let n = completion
                    .map(|c| c.saturating_sub(tokens_so_far))
                    .unwrap_or(1)
                    .max(1);
                match last {
                    None => o.ttft = Some((now - sent).as_secs_f64() * scale),
                    Some(prev) => {
                        let gap = (now - prev).as_secs_f64() * scale / n as f64;
                        o.gaps.extend(std::iter::repeat_n(gap, n as usize));
                    }
                }
                last = Some(now);
                tokens_so_far += n;
            }
            if let Some(c) = completion {
                tokens_so_far = tokens_so_far.max(c);
                o.output_tokens = c;
            }
        }
    }
    if !status.is_success() {
        o.error = Some(format!("{status}: {}", error_text.trim()));
    } else if !done {
        o.error = Some("the stream ended without [DONE]".into());
    } else {
        o.ok = true;
    }
    o.done_at = start.elapsed().as_secs_f64() * scale;
    o
}

fn report(
    a: &Args,
    rate: f64,
    outcomes: &[Outcome],
    cache: Option<((f64, f64), (f64, f64))>,
    scale: f64,
) {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let mut ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft).collect();
    ttft.sort_by(f64::total_cmp);
    let mut itl: Vec<f64> = ok.iter().flat_map(|o| o.gaps.iter().copied()).collect();
    itl.sort_by(f64::total_cmp);
    let tokens: u64 = ok.iter().map(|o| o.output_tokens).sum();
    let span = ok.iter().map(|o| o.done_at).fold(a.duration, f64::max);
    let hit_rate = cache.and_then(|((q0, h0), (q1, h1))| {
        let q = q1 - q0;
        (q > 0.0).then(|| (h1 - h0) / q)
    });
    let mut upstreams: BTreeMap<String, u64> = BTreeMap::new();
    for o in &ok {
        *upstreams
            .entry(o.upstream.clone().unwrap_or_else(|| "-".into()))
            .or_default() += 1;
    }
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| !o.ok) {
        let e = o.error.clone().unwrap_or_default();
        *errors.entry(e.chars().take(160).collect()).or_default() += 1;
    }
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let out = json!({
        "label": a.label,
        "workload": format!("{:?}", a.workload),
        "rate_rps": rate,
        "duration_s": a.duration,
        "time_scale": scale,
        "times": "simulated seconds (wall × time_scale)",
        "requests": {"sent": outcomes.len(), "ok": ok.len(), "failed": outcomes.len() - ok.len()},
        "ttft_s": {"p50": percentile(&ttft, 0.5), "p90": percentile(&ttft, 0.9), "p99": percentile(&ttft, 0.99), "mean": mean(&ttft)},
        "itl_s": {"p50": percentile(&itl, 0.5), "p90": percentile(&itl, 0.9)},
        "output_tokens": tokens,
        "output_tokens_per_s": tokens as f64 / span,
        "prefix_cache_hit_rate": hit_rate,
        "upstreams": upstreams,
        "errors": errors,
    });
    println!("{out}");
    eprintln!(
        "{:<18} {:>7} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8}",
        "workload",
        "rate/s",
        "ok",
        "failed",
        "ttft p50",
        "ttft p90",
        "ttft p99",
        "itl p90",
        "out tok/s",
        "hit rate"
    );
    eprintln!(
        "{:<18} {:>7.2} {:>5} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>9.4} {:>10.1} {:>8}",
        format!("{:?}", a.workload),
        rate,
        ok.len(),
        outcomes.len() - ok.len(),
        percentile(&ttft, 0.5),
        percentile(&ttft, 0.9),
        percentile(&ttft, 0.99),
        percentile(&itl, 0.9),
        tokens as f64 / span,
        hit_rate.map_or("-".to_string(), |h| format!("{:.1}%", h * 100.0)),
    );
}
