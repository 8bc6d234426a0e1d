//! The admin server: `/live`, `/ready`, `/metrics` (counters that move with
//! traffic) and `/config` (the policy in force).

use std::time::{Duration, Instant};

use infermesh_tests::client::{chat_body, json_request};
use infermesh_tests::{
    policy, refused_addr, Arrivals, HttpClient, Metrics, OpenAiServer, OpenAiSettings, ProxyProcess,
};
use serde_json::Value;

async fn scrape(proxy: &ProxyProcess) -> Metrics {
    let reply = HttpClient::http1()
        .get(&format!("{}/metrics", proxy.admin_url()))
        .await;
    assert_eq!(reply.status, 200, "/metrics: {}", reply.text());
    let content_type = reply.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain")
            || content_type.starts_with("application/openmetrics-text"),
        "/metrics content-type {content_type:?}"
    );
    Metrics::parse(&reply.text())
}

fn chat_policy(upstream: &OpenAiServer, extra_backends: &[String]) -> String {
    let mut docs = vec![
        policy::backend("chat-backend", &[upstream.addr()], ""),
        policy::route(
            "chat-route",
            "match:\n  - model: {exact: llama}\nbackends:\n  - backend: chat-backend\n",
        ),
    ];
    docs.extend(extra_backends.iter().cloned());
    policy::docs(&docs)
}

#[tokio::test]
async fn live_and_ready_answer_200() {
    let upstream = OpenAiServer::start("up");
    let proxy = ProxyProcess::start(&chat_policy(&upstream, &[]));
    let client = HttpClient::http1();
    for path in ["/live", "/ready"] {
        let reply = client.get(&format!("{}{path}", proxy.admin_url())).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
    }
    // The admin server is not the data plane.
    let reply = client.get(&format!("{}/live", proxy.url())).await;
    assert_ne!(reply.status, 200, "/live answered on the outbound listener");
}

#[tokio::test]
async fn metrics_count_requests_by_route_backend_and_status() {
    let upstream = OpenAiServer::start("up");
    let proxy = ProxyProcess::start(&chat_policy(&upstream, &[]));
    let client = HttpClient::http1();
    let url = format!("{}/v1/chat/completions", proxy.url());
    for _ in 0..5 {
        assert_eq!(
            client
                .post_json(&url, &chat_body("llama", false))
                .await
                .status,
            200
        );
    }
    let reply = client
        .fetch(json_request(
            &url,
            &chat_body("llama", false),
            &[("x-test-status", "429")],
        ))
        .await;
    assert_eq!(reply.status, 429);
    for _ in 0..2 {
        client
            .post_json(&url, &chat_body("unrouted", false))
            .await
            .assert_proxy_error(404, "no_route");
    }

    let after = scrape(&proxy).await;
    for family in [
        "infermesh_requests_total",
        "infermesh_requests_in_flight",
        "infermesh_request_duration_seconds_count",
        "infermesh_time_to_first_byte_seconds_count",
    ] {
        assert!(
            after.has(family),
            "/metrics has no {family}:\n{}",
            after.text
        );
    }
    let ok = [
        ("route", "chat-route"),
        ("backend", "chat-backend"),
        ("status", "200"),
    ];
    assert_eq!(
        after.sum("infermesh_requests_total", &ok),
        5.0,
        "requests_total{{route=chat-route,backend=chat-backend,status=200}}:\n{}",
        after.text
    );
    let limited = [
        ("route", "chat-route"),
        ("backend", "chat-backend"),
        ("status", "429"),
    ];
    assert_eq!(
        after.sum("infermesh_requests_total", &limited),
        1.0,
        "{}",
        after.text
    );
    assert_eq!(
        after.sum("infermesh_requests_total", &[("status", "404")]),
        2.0,
        "requests that matched no route are not counted:\n{}",
        after.text
    );
    let durations = after.sum("infermesh_request_duration_seconds_count", &[]);
    assert!(
        durations >= 6.0,
        "request_duration_seconds_count = {durations}:\n{}",
        after.text
    );
    let ttfb = after.sum("infermesh_time_to_first_byte_seconds_count", &[]);
    assert!(
        ttfb >= 6.0,
        "time_to_first_byte_seconds_count = {ttfb}:\n{}",
        after.text
    );
    assert_eq!(after.sum("infermesh_requests_in_flight", &[]), 0.0);
}

#[tokio::test]
async fn metrics_count_upstream_connect_errors() {
    let upstream = OpenAiServer::start("up");
    let dead = policy::backend("dead-backend", &[refused_addr()], "");
    let route = policy::route(
        "dead-route",
        "match:\n  - model: {exact: dead}\nbackends:\n  - backend: dead-backend\n",
    );
    let proxy = ProxyProcess::start(&chat_policy(&upstream, &[dead, route]));
    let url = format!("{}/v1/chat/completions", proxy.url());
    for _ in 0..3 {
        HttpClient::http1()
            .post_json(&url, &chat_body("dead", false))
            .await
            .assert_proxy_error(503, "upstream_connect_error");
    }
    let after = scrape(&proxy).await;
    let errors = after.sum("infermesh_upstream_connect_errors_total", &[]);
    assert!(
        errors >= 3.0,
        "upstream_connect_errors_total = {errors}:\n{}",
        after.text
    );
    assert_eq!(
        after.sum(
            "infermesh_requests_total",
            &[("route", "dead-route"), ("status", "503")]
        ),
        3.0,
        "{}",
        after.text
    );
}

#[tokio::test]
async fn metrics_show_requests_in_flight() {
    let upstream = OpenAiServer::with_settings(
        "streams",
        OpenAiSettings {
            stream_chunks: 20,
            chunk_gap: Duration::from_millis(100),
            ..OpenAiSettings::default()
        },
    );
    let proxy = ProxyProcess::start(&chat_policy(&upstream, &[]));
    let url = format!("{}/v1/chat/completions", proxy.url());
    let client = HttpClient::http1();
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let response = client
                    .send(json_request(&url, &chat_body("llama", true), &[]))
                    .await
                    .unwrap();
                Arrivals::read(response.into_body()).await
            })
        })
        .collect();
    assert!(
        upstream
            .wait_streams_started(2, Duration::from_secs(5))
            .await
    );
    let during = scrape(&proxy).await;
    assert_eq!(
        during.sum("infermesh_requests_in_flight", &[]),
        2.0,
        "two streams are in flight:\n{}",
        during.text
    );
    for stream in streams {
        assert!(stream.await.unwrap().end.is_ok());
    }
    wait_in_flight_zero(&proxy, "after the streams ended").await;
}

#[tokio::test]
async fn a_client_that_leaves_before_the_response_leaves_the_in_flight_gauge() {
    let upstream = OpenAiServer::with_settings(
        "slow",
        OpenAiSettings {
            first_byte_delay: Duration::from_secs(3),
            ..OpenAiSettings::default()
        },
    );
    let proxy = ProxyProcess::start(&chat_policy(&upstream, &[]));
    let url = format!("{}/v1/chat/completions", proxy.url());
    let client = HttpClient::http1();
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let _ = client
                    .send(json_request(&url, &chat_body("llama", false), &[]))
                    .await;
            })
        })
        .collect();
    upstream.wait_requests(3, Duration::from_secs(5)).await;
    let during = scrape(&proxy).await;
    assert_eq!(
        during.sum("infermesh_requests_in_flight", &[]),
        3.0,
        "{}",
        during.text
    );
    // The clients give up before any response header: their connections close.
    for request in waiting {
        request.abort();
    }
    drop(client);
    wait_in_flight_zero(&proxy, "after the clients went away").await;
}

/// Waits up to two seconds for the in-flight gauge to return to zero.
async fn wait_in_flight_zero(proxy: &ProxyProcess, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let in_flight = scrape(proxy).await.sum("infermesh_requests_in_flight", &[]);
        if in_flight == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "in flight stays at {in_flight} {when}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `value` holds the string `needle` anywhere (as a whole string value or key).
fn contains_string(value: &Value, needle: &str) -> bool {
    match value {
        Value::String(s) => s == needle,
        Value::Array(items) => items.iter().any(|v| contains_string(v, needle)),
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| k == needle || contains_string(v, needle)),
        _ => false,
    }
}

#[tokio::test]
async fn config_shows_the_policy_in_force() {
    let upstream = OpenAiServer::start("up");
    let policy = policy::docs(&[
        policy::backend("config-backend", &[upstream.addr()], "protocol: http2\nbalancer: least-request"),
        policy::route(
            "config-route",
            "match:\n  - model: {prefix: config-}\nbackends:\n  - backend: config-backend\n    model: real-model-name\ntimeouts:\n  firstByte: 7s\n",
        ),
    ]);
    let proxy = ProxyProcess::start(&policy);
    let reply = HttpClient::http1()
        .get(&format!("{}/config", proxy.admin_url()))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply
        .header("content-type")
        .unwrap_or_default()
        .starts_with("application/json"));
    let config = reply.json();
    for needle in [
        "config-backend",
        "config-route",
        upstream.addr().to_string().as_str(),
        "real-model-name",
        "config-",
        "least-request",
        "http2",
    ] {
        assert!(
            contains_string(&config, needle),
            "/config does not show {needle:?}: {config:#}"
        );
    }
}
