//! Rate limits, fault injection and mirroring against real upstreams: 429
//! with `Retry-After` past a burst and recovery; per-tenant buckets; token
//! limits corrected by the usage the model server reports, in JSON and in
//! the last SSE event of a stream that still arrives event by event; gRPC
//! `RESOURCE_EXHAUSTED`; fault shares over 10,000 requests; an injected
//! delay; a slow mirror that receives marked copies without slowing the
//! primary.

use std::time::{Duration, Instant};

use infermesh_tests::client::{distinct_arrivals, drive, json_request};
use infermesh_tests::kserve::{grpc_client, infer_request};
use infermesh_tests::{
    policy, refused_addr, Arrivals, HttpClient, KServeGrpcServer, Metrics, OpenAiServer,
    OpenAiSettings, ProxyProcess,
};

const CHAT: &str = "/v1/chat/completions";

/// A proxy with one route to `upstream` whose spec ends with `extra`
/// (unindented YAML), and, when given, a second backend `shadow`.
fn proxy_with(upstream: &OpenAiServer, shadow: Option<String>, extra: &str) -> ProxyProcess {
    let mut docs = vec![policy::backend("chat", &[upstream.addr()], "")];
    if let Some(shadow) = shadow {
        docs.push(policy::backend("shadow", &[shadow], ""));
    }
    docs.push(policy::route(
        "chat",
        &format!("match:\n  - path: {{prefix: /v1/}}\nbackends:\n  - backend: chat\n{extra}"),
    ));
    ProxyProcess::start(&policy::docs(&docs))
}

fn url(proxy: &ProxyProcess) -> String {
    format!("{}{CHAT}", proxy.url())
}

/// A chat request allowing `max_tokens` of output.
fn chat(max_tokens: u64, stream: bool) -> String {
    let options = if stream {
        r#","stream":true,"stream_options":{"include_usage":true}"#
    } else {
        ""
    };
    format!(
        r#"{{"model":"llama","messages":[{{"role":"user","content":"Say hello"}}],"max_tokens":{max_tokens}{options}}}"#
    )
}

async fn post(
    proxy: &ProxyProcess,
    body: &str,
    headers: &[(&str, &str)],
) -> infermesh_tests::Reply {
    HttpClient::http1()
        .fetch(json_request(&url(proxy), body, headers))
        .await
}

#[tokio::test]
async fn a_request_limit_answers_429_with_retry_after_past_the_burst_and_recovers() {
    let upstream = OpenAiServer::start("chat");
    let proxy = proxy_with(
        &upstream,
        None,
        "rateLimits:\n  - {key: route, requestsPerSecond: 1, burst: 3}",
    );
    for i in 0..3 {
        let reply = post(&proxy, &chat(16, false), &[]).await;
        assert_eq!(
            reply.status,
            200,
            "request {i} of the burst: {}",
            reply.text()
        );
    }
    let refused = post(&proxy, &chat(16, false), &[]).await;
    let message = refused.assert_proxy_error(429, "rate_limited");
    assert!(
        message.contains("route chat allows 1 requests per second"),
        "{message}"
    );
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        upstream.request_count(),
        3,
        "a refused request reaches no upstream"
    );

    // One request a second refills the bucket.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = post(&proxy, &chat(16, false), &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let metrics = Metrics::scrape(&proxy).await;
    assert_eq!(
        metrics.sum(
            "infermesh_rate_limited_total",
            &[("route", "chat"), ("kind", "requests")]
        ),
        1.0
    );
    assert_eq!(
        metrics.sum(
            "infermesh_requests_total",
            &[("route", "chat"), ("status", "429")]
        ),
        1.0
    );
}

#[tokio::test]
async fn buckets_keyed_by_a_header_are_independent() {
    let upstream = OpenAiServer::start("chat");
    let proxy = proxy_with(
        &upstream,
        None,
        "rateLimits:\n  - {key: {header: x-tenant}, requestsPerSecond: 0.1, burst: 2}",
    );
    let status = |reply: infermesh_tests::Reply| reply.status.as_u16();
    let blue = [("x-tenant", "blue")];
    let green = [("x-tenant", "green")];
    assert_eq!(status(post(&proxy, &chat(8, false), &blue).await), 200);
    assert_eq!(status(post(&proxy, &chat(8, false), &blue).await), 200);
    let refused = post(&proxy, &chat(8, false), &blue).await;
    let message = refused.assert_proxy_error(429, "rate_limited");
    assert!(message.contains("for x-tenant: blue"), "{message}");
    assert_eq!(refused.header("retry-after"), Some("10"));
    // Another tenant, and requests without the header, have buckets of their own.
    assert_eq!(status(post(&proxy, &chat(8, false), &green).await), 200);
    assert_eq!(status(post(&proxy, &chat(8, false), &green).await), 200);
    assert_eq!(status(post(&proxy, &chat(8, false), &[]).await), 200);
    assert_eq!(status(post(&proxy, &chat(8, false), &[]).await), 200);
    assert_eq!(status(post(&proxy, &chat(8, false), &green).await), 429);
    assert_eq!(upstream.request_count(), 6);
}

#[tokio::test]
async fn a_token_limit_is_corrected_by_the_usage_the_model_reports() {
    let upstream = OpenAiServer::with_settings(
        "chat",
        OpenAiSettings {
            total_tokens: 10,
            ..OpenAiSettings::default()
        },
    );
    // 3,000 tokens a minute (50 a second). Each request is estimated at
    // about 1,030 tokens (max_tokens 1,000 and its body), so the estimate
    // alone lets two through.
    let proxy = proxy_with(
        &upstream,
        None,
        "rateLimits:\n  - {key: route, tokensPerMinute: 3000}",
    );
    for i in 0..10 {
        let reply = post(&proxy, &chat(1000, false), &[]).await;
        assert_eq!(
            reply.status,
            200,
            "request {i}: the usage of 10 tokens should have been given back: {}",
            reply.text()
        );
    }
    // A request whose usage is far above its estimate leaves the bucket in debt.
    let reply = post(
        &proxy,
        &chat(1000, false),
        &[("x-test-usage-tokens", "5000")],
    )
    .await;
    assert_eq!(reply.status, 200);
    let refused = post(&proxy, &chat(1000, false), &[]).await;
    let message = refused.assert_proxy_error(429, "rate_limited");
    assert!(
        message.contains("3000 model tokens per minute"),
        "{message}"
    );
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (30..=130).contains(&wait),
        "Retry-After {wait}: the bucket owes about 2,000 tokens plus the next request's 1,030 at 50 a second"
    );

    let metrics = Metrics::scrape(&proxy).await;
    let tokens = |stage| {
        metrics.sum(
            "infermesh_rate_limit_tokens_total",
            &[("route", "chat"), ("stage", stage)],
        )
    };
    assert!(
        tokens("estimated") >= 11.0 * 1000.0,
        "{}",
        tokens("estimated")
    );
    assert!(
        tokens("refunded") >= 10.0 * 1000.0,
        "{}",
        tokens("refunded")
    );
    assert!(tokens("added") >= 3900.0, "{}", tokens("added"));
    assert_eq!(
        metrics.sum(
            "infermesh_rate_limited_total",
            &[("route", "chat"), ("kind", "tokens")]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_stream_with_include_usage_corrects_the_charge_and_arrives_unbuffered() {
    let upstream = OpenAiServer::with_settings(
        "chat",
        OpenAiSettings {
            stream_chunks: 10,
            chunk_gap: Duration::from_millis(50),
            total_tokens: 12,
            ..OpenAiSettings::default()
        },
    );
    let proxy = proxy_with(
        &upstream,
        None,
        "rateLimits:\n  - {key: route, tokensPerMinute: 3000}",
    );
    // Three streams estimated at about 1,050 tokens each: only the usage in
    // their last event lets the third through.
    for i in 0..3 {
        let response = HttpClient::http1()
            .send(json_request(&url(&proxy), &chat(1000, true), &[]))
            .await
            .expect("response head");
        assert_eq!(response.status(), 200, "stream {i}");
        let arrivals = Arrivals::read(response.into_body()).await;
        assert!(arrivals.end.is_ok(), "{:?}", arrivals.end);
        let events = arrivals.sse_events();
        assert_eq!(
            events.len(),
            12,
            "10 chunks, the usage and [DONE]: {events:?}"
        );
        assert!(
            events[10].data.contains("\"total_tokens\":12"),
            "{:?}",
            events[10]
        );
        let at: Vec<Instant> = events[..10].iter().map(|e| e.at).collect();
        assert_eq!(
            distinct_arrivals(&at, Duration::from_millis(5)),
            10,
            "stream {i}: the chunks did not arrive one by one"
        );
        let log = &upstream.streams()[i];
        assert!(
            at[0] + Duration::from_millis(300) < log.sent[9],
            "stream {i}: the first chunk reached the client only when the last was sent"
        );
    }
    let metrics = Metrics::scrape(&proxy).await;
    assert!(
        metrics.sum(
            "infermesh_rate_limit_tokens_total",
            &[("route", "chat"), ("stage", "refunded")]
        ) >= 3.0 * 1000.0
    );
}

#[tokio::test]
async fn a_grpc_client_past_the_limit_gets_resource_exhausted() {
    let upstream = KServeGrpcServer::start("kserve");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("kserve", &[upstream.addr()], "protocol: http2"),
        policy::route(
            "kserve",
            "match:\n  - grpc: {service: inference.GRPCInferenceService}\nbackends:\n  - backend: kserve\nrateLimits:\n  - {key: route, requestsPerSecond: 0.5, burst: 1}",
        ),
    ]));
    let mut client = grpc_client(proxy.outbound).await;
    client
        .model_infer(infer_request("llm", "1"))
        .await
        .expect("the first call passes");
    let status = client
        .model_infer(infer_request("llm", "2"))
        .await
        .expect_err("the second call is limited");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("route kserve allows 0.50 requests per second"),
        "{status:?}"
    );
    assert_eq!(upstream.calls().len(), 1);
}

#[tokio::test]
async fn fault_shares_hold_over_10000_requests() {
    let upstream = OpenAiServer::start("chat");
    let proxy = proxy_with(
        &upstream,
        None,
        "faults:\n  abort: {status: 503, percent: 80}\n  delay: {duration: 1ms, percent: 2.5}",
    );
    let client = HttpClient::http2();
    let target = url(&proxy);
    let body = chat(8, false);
    let started = Instant::now();
    let replies = drive(10_000, 64, |_| {
        let client = client.clone();
        let request = json_request(&target, &body, &[]);
        async move { client.fetch(request).await }
    })
    .await;
    let aborted = replies
        .iter()
        .filter(|r| r.status == 503 && r.upstream().is_none())
        .count();
    let served = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(aborted + served, 10_000);
    // 80% ± 1.5 points: over six standard deviations of 10,000 draws.
    assert!(
        (7_850..=8_150).contains(&aborted),
        "{aborted} of 10,000 requests aborted; 8,000 expected"
    );
    assert_eq!(upstream.request_count(), served);
    replies
        .iter()
        .find(|r| r.status == 503)
        .unwrap()
        .assert_proxy_error(503, "fault_injected");
    let metrics = Metrics::scrape(&proxy).await;
    let injected = |kind| {
        metrics.sum(
            "infermesh_faults_injected_total",
            &[("route", "chat"), ("kind", kind)],
        )
    };
    assert_eq!(injected("abort"), aborted as f64);
    // 2.5% ± 0.75 points.
    let delayed = injected("delay");
    assert!(
        (175.0..=325.0).contains(&delayed),
        "{delayed} of 10,000 requests delayed; 250 expected"
    );
    eprintln!("10,000 requests in {:?}", started.elapsed());
}

#[tokio::test]
async fn a_delay_fault_holds_the_request_for_its_duration() {
    let upstream = OpenAiServer::start("chat");
    let proxy = proxy_with(
        &upstream,
        None,
        "faults:\n  delay: {duration: 400ms, percent: 100}",
    );
    for _ in 0..3 {
        let sent = Instant::now();
        let reply = post(&proxy, &chat(8, false), &[]).await;
        let took = sent.elapsed();
        assert_eq!(reply.status, 200);
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(1400),
            "the request took {took:?} with a 400 ms delay"
        );
        let received = upstream.requests().last().unwrap().received_at;
        assert!(received >= sent + Duration::from_millis(400));
    }
}

#[tokio::test]
async fn a_slow_mirror_receives_marked_copies_and_adds_no_latency() {
    let primary = OpenAiServer::start("chat");
    let mirror = OpenAiServer::with_settings(
        "shadow",
        OpenAiSettings {
            first_byte_delay: Duration::from_secs(2),
            ..OpenAiSettings::default()
        },
    );
    let proxy = proxy_with(
        &primary,
        Some(mirror.addr().to_string()),
        "mirror: {backend: shadow}",
    );
    let mut took = Vec::new();
    let bodies: Vec<String> = (0..20).map(|i| chat(i, false)).collect();
    for body in &bodies {
        let sent = Instant::now();
        let reply = post(&proxy, body, &[("x-tenant", "blue")]).await;
        took.push(sent.elapsed());
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.upstream(),
            Some("chat"),
            "the client gets the primary's answer"
        );
    }
    took.sort();
    assert!(
        took[10] < Duration::from_millis(200) && took[19] < Duration::from_millis(1500),
        "primary requests took {took:?} with a mirror that answers after 2 s"
    );

    let copies = mirror.wait_requests(20, Duration::from_secs(10)).await;
    assert_eq!(copies.len(), 20);
    let mut copied: Vec<&[u8]> = copies.iter().map(|c| c.body.as_ref()).collect();
    let mut sent: Vec<&[u8]> = bodies.iter().map(|b| b.as_bytes()).collect();
    copied.sort();
    sent.sort();
    assert_eq!(
        copied, sent,
        "each copy carries the client's body byte for byte"
    );
    for copy in &copies {
        assert_eq!(copy.headers["x-infermesh-mirror"], "1");
        assert_eq!(copy.headers["x-tenant"], "blue");
        assert_eq!(copy.uri.path(), CHAT);
    }
    assert!(primary
        .requests()
        .iter()
        .all(|r| !r.headers.contains_key("x-infermesh-mirror")));

    // The mirror's answers are read and counted once they come.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sent = Metrics::scrape(&proxy).await.sum(
            "infermesh_mirrored_requests_total",
            &[("route", "chat"), ("outcome", "sent")],
        );
        if sent == 20.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{sent} mirrored copies counted as sent"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_mirror_that_is_down_or_full_never_fails_the_primary() {
    let primary = OpenAiServer::start("chat");
    let proxy = proxy_with(
        &primary,
        Some(refused_addr().to_string()),
        "mirror: {backend: shadow, maxInFlight: 1}",
    );
    let client = HttpClient::http1();
    let target = url(&proxy);
    let body = chat(8, false);
    let replies = drive(50, 10, |_| {
        let client = client.clone();
        let request = json_request(&target, &body, &[]);
        async move { client.fetch(request).await }
    })
    .await;
    assert!(replies.iter().all(|r| r.status == 200));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = Metrics::scrape(&proxy).await;
    let outcome = |outcome| {
        metrics.sum(
            "infermesh_mirrored_requests_total",
            &[("route", "chat"), ("outcome", outcome)],
        )
    };
    assert_eq!(outcome("sent"), 0.0);
    assert!(outcome("failed") >= 1.0);
    assert_eq!(outcome("failed") + outcome("dropped"), 50.0);
}
