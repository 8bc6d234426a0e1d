//! Circuit breaking and its neighbours against upstreams that fail on cue:
//! outlier ejection and re-admission, the maximum ejected share, limits on
//! pending and in-flight requests, 429 penalties in the balancer, refused
//! HTTP/2 streams retried, and hedging against a slow tail.

use std::time::{Duration, Instant};

use infermesh_tests::client::{chat_body, drive, json_request};
use infermesh_tests::{
    policy, HttpClient, Metrics, OpenAiServer, OpenAiSettings, ProxyProcess, RefusingH2Server,
    ScriptedServer, Step,
};

const CHAT: &str = "/v1/chat/completions";

/// A proxy whose route sends model `model` to backend `target` over
/// `endpoints`; `backend` and `route` hold more spec fields (unindented).
fn proxy(endpoints: &[String], backend: &str, route: &str) -> ProxyProcess {
    ProxyProcess::start(&policy::docs(&[
        policy::backend("target", endpoints, backend),
        policy::route(
            "target",
            &format!(
                "match:\n  - model: {{exact: model}}\nbackends:\n  - backend: target\n{route}"
            ),
        ),
    ]))
}

fn url(proxy: &ProxyProcess) -> String {
    format!("{}{CHAT}", proxy.url())
}

async fn chat(proxy: &ProxyProcess) -> infermesh_tests::Reply {
    HttpClient::http1()
        .post_json(&url(proxy), &chat_body("model", false))
        .await
}

fn ejections(metrics: &Metrics, reason: &str) -> f64 {
    metrics.sum(
        "infermesh_outlier_ejections_total",
        &[("backend", "target"), ("reason", reason)],
    )
}

fn ejected(metrics: &Metrics) -> f64 {
    metrics.sum(
        "infermesh_outlier_ejected_endpoints",
        &[("backend", "target")],
    )
}

#[tokio::test]
async fn an_endpoint_failing_in_a_row_is_ejected_and_readmitted_after_a_good_probe() {
    // `a` fails three times, then is healthy again.
    let a = ScriptedServer::start(
        "a",
        vec![
            Step::Status(503, None),
            Step::Status(503, None),
            Step::Status(503, None),
            Step::Status(200, None),
        ],
    );
    let b = ScriptedServer::start("b", vec![Step::Status(200, None)]);
    let proxy = proxy(
        &[a.addr().to_string(), b.addr().to_string()],
        "balancer: round-robin\noutlierDetection: {consecutiveFailures: 3, baseEjection: 1s}",
        "",
    );
    // Round robin alternates: `a` meets its three failures within six requests.
    let mut failures = 0;
    for _ in 0..6 {
        let reply = chat(&proxy).await;
        if reply.status == 503 {
            assert_eq!(reply.upstream(), Some("a"));
            failures += 1;
        }
    }
    assert_eq!(failures, 3);
    let ejected_at = Instant::now();
    let m = Metrics::scrape(&proxy).await;
    assert_eq!(ejections(&m, "consecutive_failures"), 1.0);
    assert_eq!(ejected(&m), 1.0);

    // Ejected: everything goes to `b`.
    let before = a.request_count();
    for _ in 0..8 {
        let reply = chat(&proxy).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.upstream(), Some("b"));
    }
    assert_eq!(
        a.request_count(),
        before,
        "no request reaches an ejected endpoint"
    );
    assert!(
        ejected_at.elapsed() < Duration::from_secs(1),
        "the machine is too slow for this test"
    );

    // After the ejection, the next request is the probe, to `a`; it
    // succeeds, and `a` takes its share again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let probe = chat(&proxy).await;
    assert_eq!(probe.status, 200);
    assert_eq!(probe.upstream(), Some("a"), "the probe goes first");
    let m = Metrics::scrape(&proxy).await;
    assert_eq!(ejected(&m), 0.0);
    let mut by_a = 0;
    for _ in 0..10 {
        let reply = chat(&proxy).await;
        assert_eq!(reply.status, 200);
        by_a += usize::from(reply.upstream() == Some("a"));
    }
    assert_eq!(by_a, 5, "round robin again");
}

#[tokio::test]
async fn a_failed_probe_ejects_the_endpoint_again_for_longer() {
    let a = ScriptedServer::start("a", vec![Step::Status(500, None)]);
    let b = ScriptedServer::start("b", vec![Step::Status(200, None)]);
    let proxy = proxy(
        &[a.addr().to_string(), b.addr().to_string()],
        "balancer: round-robin\noutlierDetection: {consecutiveFailures: 1, baseEjection: 300ms}",
        "",
    );
    while ejected(&Metrics::scrape(&proxy).await) == 0.0 {
        chat(&proxy).await;
    }
    assert_eq!(a.request_count(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The probe fails: ejected again, now for 600 ms.
    let probe = chat(&proxy).await;
    assert_eq!((probe.status.as_u16(), probe.upstream()), (500, Some("a")));
    assert_eq!(a.request_count(), 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..4 {
        assert_eq!(chat(&proxy).await.upstream(), Some("b"));
    }
    assert_eq!(
        a.request_count(),
        2,
        "the second ejection is longer than the first"
    );
    let m = Metrics::scrape(&proxy).await;
    assert_eq!(ejections(&m, "consecutive_failures"), 1.0);
    assert_eq!(ejections(&m, "probe_failed"), 1.0);
    assert_eq!(ejected(&m), 1.0);
}

#[tokio::test]
async fn the_maximum_ejected_share_is_never_passed() {
    let a = ScriptedServer::start("a", vec![Step::Status(503, None)]);
    let b = ScriptedServer::start("b", vec![Step::Status(503, None)]);
    let proxy = proxy(
        &[a.addr().to_string(), b.addr().to_string()],
        "balancer: round-robin\noutlierDetection: {consecutiveFailures: 2, baseEjection: 30s}",
        "",
    );
    for _ in 0..20 {
        assert_eq!(chat(&proxy).await.status, 503);
    }
    let m = Metrics::scrape(&proxy).await;
    assert_eq!(ejected(&m), 1.0, "50% of two endpoints is one");
    assert_eq!(ejections(&m, "consecutive_failures"), 1.0);
    // The endpoint that stays takes everything, failing or not.
    let (a_count, b_count) = (a.request_count(), b.request_count());
    assert_eq!(a_count + b_count, 20);
    assert!(a_count.min(b_count) <= 3, "a {a_count}, b {b_count}");
}

#[tokio::test]
async fn with_every_endpoint_ejected_the_fallback_chain_answers_at_once() {
    let a = ScriptedServer::start("a", vec![Step::Status(503, None)]);
    let b = ScriptedServer::start("b", vec![Step::Status(503, None)]);
    let spare = ScriptedServer::start("spare", vec![Step::Status(200, None)]);
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend(
            "target",
            &[a.addr(), b.addr()],
            "balancer: round-robin\noutlierDetection: {consecutiveFailures: 1, baseEjection: 30s, maxEjectedPercent: 100}",
        ),
        policy::backend("spare", &[spare.addr()], ""),
        policy::route(
            "target",
            "match:\n  - model: {exact: model}\nbackends:\n  - backend: target\nfallback:\n  - backend: spare",
        ),
    ]));
    // Each endpoint's first 503 ejects it (and goes down the chain).
    for _ in 0..2 {
        let reply = chat(&proxy).await;
        assert_eq!(reply.upstream(), Some("spare"));
    }
    assert_eq!(ejected(&Metrics::scrape(&proxy).await), 2.0);
    let (a_count, b_count) = (a.request_count(), b.request_count());
    let started = Instant::now();
    for _ in 0..5 {
        let reply = chat(&proxy).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.upstream(), Some("spare"));
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!((a.request_count(), b.request_count()), (a_count, b_count));

    // Without a chain the client is told why, at once.
    let alone = proxy_alone(&a, &b);
    for _ in 0..2 {
        chat(&alone).await;
    }
    let reply = chat(&alone).await;
    let message = reply.assert_proxy_error(503, "no_endpoint");
    assert!(message.contains("ejected"), "{message}");
}

fn proxy_alone(a: &ScriptedServer, b: &ScriptedServer) -> ProxyProcess {
    proxy(
        &[a.addr().to_string(), b.addr().to_string()],
        "balancer: round-robin\noutlierDetection: {consecutiveFailures: 1, baseEjection: 30s, maxEjectedPercent: 100}",
        "",
    )
}

#[tokio::test]
async fn past_the_pending_limit_requests_fail_fast_with_overloaded() {
    let slow = ScriptedServer::start("slow", vec![Step::Delay(Duration::from_millis(1500))]);
    let proxy = proxy(&[slow.addr().to_string()], "limits: {maxPending: 2}", "");
    let url = url(&proxy);
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                HttpClient::http1()
                    .post_json(&url, &chat_body("model", false))
                    .await
            })
        })
        .collect();
    // Both are in the upstream's queue once it has read them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while slow.request_count() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let reply = chat(&proxy).await;
    let message = reply.assert_proxy_error(503, "overloaded");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert!(message.contains("pending limit of 2"), "{message}");
    for waiting in waiting {
        assert_eq!(waiting.await.unwrap().status, 200);
    }
    assert_eq!(
        slow.request_count(),
        2,
        "the refused request never reached the upstream"
    );
    // Room again once they answered.
    let reply = chat(&proxy).await;
    assert_eq!(reply.status, 200);
    let m = Metrics::scrape(&proxy).await;
    assert_eq!(
        m.sum(
            "infermesh_overloaded_total",
            &[("backend", "target"), ("limit", "pending")]
        ),
        1.0
    );
}

#[tokio::test]
async fn streams_count_against_the_in_flight_limit_until_they_end() {
    let upstream = OpenAiServer::with_settings(
        "stream",
        OpenAiSettings {
            stream_chunks: 8,
            chunk_gap: Duration::from_millis(150),
            ..OpenAiSettings::default()
        },
    );
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("target", &[upstream.addr()], "limits: {maxInFlight: 2}"),
        policy::route("target", "backends:\n  - backend: target"),
    ]));
    let url = url(&proxy);
    let client = HttpClient::http1();
    // Two streams have their heads: nothing is pending, both are in flight.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let response = client
            .send(json_request(&url, &chat_body("gpt-fixture", true), &[]))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        streams.push(response);
    }
    let reply = client
        .post_json(&url, &chat_body("gpt-fixture", false))
        .await;
    let message = reply.assert_proxy_error(503, "overloaded");
    assert!(message.contains("in-flight limit of 2"), "{message}");
    // A stream that ends makes room.
    let first = streams.remove(0);
    infermesh_tests::Arrivals::read(first.into_body()).await;
    let reply = client
        .post_json(&url, &chat_body("gpt-fixture", false))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let m = Metrics::scrape(&proxy).await;
    assert_eq!(
        m.sum(
            "infermesh_overloaded_total",
            &[("backend", "target"), ("limit", "in_flight")]
        ),
        1.0
    );
}

#[tokio::test]
async fn an_endpoint_answering_429_with_retry_after_loses_its_traffic_meanwhile() {
    for balancer in ["peak-ewma", "least-request"] {
        let shedding = ScriptedServer::start("shedding", vec![Step::Status(429, Some(30))]);
        let healthy = ScriptedServer::start("healthy", vec![Step::Status(200, None)]);
        let proxy = proxy(
            &[shedding.addr().to_string(), healthy.addr().to_string()],
            &format!("balancer: {balancer}"),
            "",
        );
        let mut statuses = Vec::new();
        for _ in 0..30 {
            statuses.push(chat(&proxy).await.status.as_u16());
        }
        // Power of two choices over two endpoints compares both each time:
        // once penalised, the shedding one is never the lighter. Before
        // that it wins a comparison now and then, so it is met once.
        assert_eq!(
            shedding.request_count(),
            1,
            "{balancer}: requests that reached the shedding endpoint"
        );
        assert_eq!(
            statuses.iter().filter(|s| **s == 429).count(),
            shedding.request_count()
        );
        let m = Metrics::scrape(&proxy).await;
        assert_eq!(
            m.sum(
                "infermesh_endpoint_penalties_total",
                &[("backend", "target")]
            ),
            shedding.request_count() as f64
        );
    }
}

#[tokio::test]
async fn a_refused_stream_is_retried_and_reaches_the_server_once() {
    let refusing = RefusingH2Server::start("h2", 1);
    let proxy = proxy(
        &[refusing.addr().to_string()],
        "protocol: http2",
        "retries: {maxAttempts: 2, backoffBase: 5ms}",
    );
    let reply = chat(&proxy).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.upstream(), Some("h2"));
    assert_eq!((refusing.refused_count(), refusing.stream_count()), (1, 2));
    let m = Metrics::scrape(&proxy).await;
    assert_eq!(
        m.sum(
            "infermesh_retries_total",
            &[("route", "target"), ("outcome", "retried")]
        ),
        1.0
    );

    // Without retries the client learns it was refused.
    let refusing = RefusingH2Server::start("h2", 1);
    let proxy = proxy_h2(&refusing);
    let reply = chat(&proxy).await;
    let message = reply.assert_proxy_error(502, "upstream_error");
    assert!(message.to_lowercase().contains("refused"), "{message}");
}

fn proxy_h2(server: &RefusingH2Server) -> ProxyProcess {
    proxy(&[server.addr().to_string()], "protocol: http2", "")
}

/// The slowest of `count` requests (at most 4 at a time), and every reply.
async fn slowest(proxy: &ProxyProcess, count: usize) -> (Duration, Vec<infermesh_tests::Reply>) {
    let url = url(proxy);
    let timed = drive(count, 4, |_| {
        let url = url.clone();
        async move {
            let started = Instant::now();
            let mut reply = HttpClient::http1()
                .post_json(&url, &chat_body("model", false))
                .await;
            let took = started.elapsed().as_millis().to_string();
            reply.headers.insert("x-took-ms", took.parse().unwrap());
            reply
        }
    })
    .await;
    let max = timed
        .iter()
        .map(|r| r.header("x-took-ms").unwrap().parse::<u64>().unwrap())
        .max()
        .unwrap();
    (Duration::from_millis(max), timed)
}

/// An endpoint whose every fifth request takes a second.
fn slow_tail(name: &str) -> ScriptedServer {
    let fast = Step::Status(200, None);
    let slow = Step::Delay(Duration::from_secs(1));
    let cycle = [fast.clone(), fast.clone(), fast.clone(), fast, slow];
    ScriptedServer::start(name, cycle.iter().cycle().take(400).cloned().collect())
}

#[tokio::test]
async fn hedging_cuts_the_slow_tail_and_cancels_the_losers() {
    let requests = 40;
    // Without hedging, the slow tail is what the slowest client sees.
    let tail = slow_tail("tail");
    let steady = ScriptedServer::start("steady", vec![Step::Status(200, None)]);
    let plain = proxy(
        &[tail.addr().to_string(), steady.addr().to_string()],
        "protocol: http2\nbalancer: round-robin",
        "",
    );
    let (max, replies) = slowest(&plain, requests).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert!(max >= Duration::from_secs(1), "without hedging: {max:?}");

    let tail = slow_tail("tail");
    let steady = ScriptedServer::start("steady", vec![Step::Status(200, None)]);
    let hedged = proxy(
        &[tail.addr().to_string(), steady.addr().to_string()],
        "protocol: http2\nbalancer: round-robin",
        "hedging: {delay: 100ms}",
    );
    let (max, replies) = slowest(&hedged, requests).await;
    assert!(replies.iter().all(|r| r.status == 200));
    // The hedge goes out at 100 ms and answers at once; a generous margin
    // for a shared machine, still far below the one-second tail.
    assert!(max < Duration::from_millis(600), "with hedging: {max:?}");
    let m = Metrics::scrape(&hedged).await;
    let sent = m.sum(
        "infermesh_hedges_total",
        &[("route", "target"), ("outcome", "sent")],
    );
    let won = m.sum(
        "infermesh_hedges_total",
        &[("route", "target"), ("outcome", "won")],
    );
    assert!(won >= 1.0 && won <= sent, "sent {sent}, won {won}");
    // Every slow attempt (each fifth request the tail endpoint received)
    // lost to its hedge and was cancelled: its stream was reset.
    let slow_attempts = tail.request_count() / 5;
    assert!(slow_attempts >= 1);
    let deadline = Instant::now() + Duration::from_secs(2);
    while tail.cancelled_count() < slow_attempts && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tail.cancelled_count(), slow_attempts);
}

#[tokio::test]
async fn hedging_over_http1_closes_the_losing_connection() {
    let tail = ScriptedServer::start("tail", vec![Step::Delay(Duration::from_secs(2))]);
    let steady = ScriptedServer::start("steady", vec![Step::Status(200, None)]);
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend(
            "target",
            &[tail.addr(), steady.addr()],
            "balancer: round-robin",
        ),
        policy::route(
            "target",
            "match:\n  - model: {exact: model}\nbackends:\n  - backend: target\nhedging: {delay: 100ms}",
        ),
    ]));
    for _ in 0..4 {
        let started = Instant::now();
        let reply = chat(&proxy).await;
        assert_eq!(reply.upstream(), Some("steady"));
        assert!(started.elapsed() < Duration::from_millis(800));
    }
    // Every attempt that reached the slow endpoint lost to its hedge, and
    // was dropped: its connection closed under it.
    let won = Metrics::scrape(&proxy).await.sum(
        "infermesh_hedges_total",
        &[("route", "target"), ("outcome", "won")],
    );
    assert!(won >= 1.0);
    assert_eq!(tail.request_count() as f64, won);
    let deadline = Instant::now() + Duration::from_secs(2);
    while tail.cancelled_count() < tail.request_count() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tail.cancelled_count(), tail.request_count());
}

/// A client that gives up while an HTTP/2 upstream is still working on the
/// answer has the upstream's stream reset at once, whichever protocol the
/// client spoke, and the shared upstream connection goes on serving.
#[tokio::test]
async fn a_client_leaving_before_the_answer_resets_the_http2_upstream_stream() {
    let slow = ScriptedServer::start(
        "slow",
        vec![
            Step::Delay(Duration::from_secs(10)),
            Step::Delay(Duration::from_secs(10)),
            Step::Status(200, None),
        ],
    );
    let proxy = proxy(&[slow.addr().to_string()], "protocol: http2", "");
    for (left_before, client) in [HttpClient::http2(), HttpClient::http1()]
        .into_iter()
        .enumerate()
    {
        let request = client.send(json_request(&url(&proxy), &chat_body("model", false), &[]));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), request)
                .await
                .is_err(),
            "the slow upstream answered within 300 ms"
        );
        drop(client);
        let left_at = Instant::now();
        while slow.cancelled_count() <= left_before {
            assert!(
                left_at.elapsed() < Duration::from_secs(2),
                "the upstream's stream was not reset within 2 s of the client leaving (client {left_before})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let reply = HttpClient::http1()
        .post_json(&url(&proxy), &chat_body("model", false))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.upstream(), Some("slow"));
}
