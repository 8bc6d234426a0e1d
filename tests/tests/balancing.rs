//! Traffic splitting and load balancing through the proxy, counted at the
//! upstreams: weighted backends, round robin, least-request and peak-EWMA.

use std::time::Duration;

use infermesh_tests::client::{drive, json_request};
use infermesh_tests::{policy, HttpClient, OpenAiServer, OpenAiSettings, ProxyProcess};

const EMBED: &str = r#"{"model":"embed","input":"hello"}"#;

/// Sends `count` embedding requests through the proxy, `concurrency` at a time,
/// and checks that every one succeeded.
async fn send_many(proxy: &ProxyProcess, count: usize, concurrency: usize) {
    let client = HttpClient::http1();
    let url = format!("{}/v1/embeddings", proxy.url());
    let replies = drive(count, concurrency, |_| {
        let client = client.clone();
        let url = url.clone();
        async move { client.fetch(json_request(&url, EMBED, &[])).await }
    })
    .await;
    let failed: Vec<_> = replies.iter().filter(|r| r.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {count} requests failed, e.g. {} {}",
        failed.len(),
        failed[0].status,
        failed[0].text()
    );
}

fn delayed(name: &str, delay: Duration) -> OpenAiServer {
    OpenAiServer::with_settings(
        name,
        OpenAiSettings {
            first_byte_delay: delay,
            ..OpenAiSettings::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_lands_within_two_points_over_10000_requests() {
    let stable = OpenAiServer::start("stable");
    let canary = OpenAiServer::start("canary");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("stable", &[stable.addr()], ""),
        policy::backend("canary", &[canary.addr()], ""),
        policy::route(
            "split",
            "match:\n  - model: {exact: embed}\nbackends:\n  - backend: stable\n    weight: 90\n  - backend: canary\n    weight: 10\n",
        ),
    ]));
    send_many(&proxy, 10_000, 16).await;
    let (a, b) = (stable.request_count(), canary.request_count());
    assert_eq!(a + b, 10_000, "the upstreams saw {a} + {b} requests");
    let share = a as f64 / 100.0;
    assert!(
        (88.0..=92.0).contains(&share),
        "stable got {share:.2}% of 10,000 requests (canary {b}); expected 90 ± 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_requests_evenly() {
    let upstreams: Vec<OpenAiServer> = (0..3)
        .map(|i| OpenAiServer::start(&format!("rr-{i}")))
        .collect();
    let endpoints: Vec<_> = upstreams.iter().map(OpenAiServer::addr).collect();
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("rr", &endpoints, "balancer: round-robin"),
        policy::route("rr", "backends:\n  - backend: rr\n"),
    ]));
    send_many(&proxy, 3000, 8).await;
    let counts: Vec<usize> = upstreams.iter().map(OpenAiServer::request_count).collect();
    assert_eq!(counts.iter().sum::<usize>(), 3000);
    assert!(
        counts.iter().all(|&c| (970..=1030).contains(&c)),
        "round robin over 3 endpoints gave {counts:?} of 3000 requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_sends_clearly_less_to_an_endpoint_10x_slower() {
    let fast = delayed("fast", Duration::from_millis(10));
    let slow = delayed("slow", Duration::from_millis(100));
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("pool", &[fast.addr(), slow.addr()], "balancer: peak-ewma"),
        policy::route("pool", "backends:\n  - backend: pool\n"),
    ]));
    send_many(&proxy, 600, 4).await;
    let (f, s) = (fast.request_count(), slow.request_count());
    assert_eq!(f + s, 600);
    assert!(
        s * 4 < 600,
        "peak-EWMA sent {s} of 600 requests to the endpoint 10x slower (fast got {f}); expected clearly less than half, under 25%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_prefers_the_endpoint_with_fewer_requests_in_flight() {
    let fast = delayed("fast", Duration::from_millis(10));
    let slow = delayed("slow", Duration::from_millis(200));
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend(
            "pool",
            &[fast.addr(), slow.addr()],
            "balancer: least-request",
        ),
        policy::route("pool", "backends:\n  - backend: pool\n"),
    ]));
    send_many(&proxy, 400, 8).await;
    let (f, s) = (fast.request_count(), slow.request_count());
    assert_eq!(f + s, 400);
    assert!(
        s * 10 < 400 * 3,
        "least-request sent {s} of 400 requests to the endpoint that holds them 20x longer (fast got {f}); expected under 30%"
    );
}
