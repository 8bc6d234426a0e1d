//! Traffic splitting and load balancing through the proxy, counted at the
//! upstreams: weighted backends, round robin, least-request and peak-EWMA,
//! and what the pickers do with an endpoint that fails: a replica killed
//! under a steady request rate, a replica answering 500 at once, and two
//! equal replicas that must share the traffic evenly.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infermesh_tests::client::{drive, json_request};
use infermesh_tests::{
    policy, HttpClient, OpenAiServer, OpenAiSettings, ProxyProcess, ScriptedServer, Step,
};

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

/// The outcome of one request of a [`SteadyLoad`]: when it was sent and its
/// status (0 when the proxy's connection failed).
type Outcome = (Instant, u16);

/// Requests sent through the proxy at a fixed rate from a task of their
/// own, each recorded with its outcome, so a test can kill an upstream
/// while the traffic flows.
struct SteadyLoad {
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SteadyLoad {
    /// Starts sending `per_second` requests a second for `length`.
    fn start(proxy: &ProxyProcess, per_second: u32, length: Duration) -> Self {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let recorded = outcomes.clone();
        let url = format!("{}/v1/embeddings", proxy.url());
        let task = tokio::spawn(async move {
            let client = HttpClient::http1();
            let mut ticks = tokio::time::interval(Duration::from_secs(1) / per_second);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let end = Instant::now() + length;
            let mut sent = Vec::new();
            while Instant::now() < end {
                ticks.tick().await;
                let (client, url, recorded) = (client.clone(), url.clone(), recorded.clone());
                sent.push(tokio::spawn(async move {
                    let at = Instant::now();
                    let status = match client.send(json_request(&url, EMBED, &[])).await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                            status
                        }
                        Err(_) => 0,
                    };
                    recorded.lock().unwrap().push((at, status));
                }));
            }
            for request in sent {
                let _ = request.await;
            }
        });
        Self { outcomes, task }
    }

    /// Waits for the last request to finish and returns every outcome.
    async fn finish(self) -> Vec<Outcome> {
        self.task.await.expect("the load task");
        let mut outcomes = self.outcomes.lock().unwrap().clone();
        outcomes.sort_by_key(|(at, _)| *at);
        outcomes
    }
}

/// Two replicas behind the proxy under 100 requests/s; one is stopped (its
/// listener closed, so connections are refused) for 3 s, then started again
/// on the same port. Returns the requests sent during the outage, how many
/// of all requests failed, and how many requests the restarted replica got
/// in the 5 s after it came back.
async fn kill_a_replica_under_load(balancer: &str) -> (usize, usize, usize) {
    let steady = OpenAiServer::start("steady");
    let doomed = OpenAiServer::start("doomed");
    let doomed_addr = doomed.addr();
    // No retries and no outlier detection: the balancer alone decides.
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend(
            "pool",
            &[steady.addr(), doomed_addr],
            &format!("balancer: {balancer}"),
        ),
        policy::route("pool", "backends:\n  - backend: pool\n"),
    ]));
    let load = SteadyLoad::start(&proxy, 100, Duration::from_millis(9_500));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        doomed.request_count() > 0,
        "{balancer}: the replica to be killed got no request before it was killed"
    );
    drop(doomed);
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let back = Instant::now();
    let revived = OpenAiServer::bind(doomed_addr, "revived", OpenAiSettings::default())
        .expect("the killed replica's port is free again");
    let outcomes = load.finish().await;
    let during_outage = outcomes
        .iter()
        .filter(|(at, _)| (killed..back).contains(at))
        .count();
    let failed = outcomes.iter().filter(|(_, status)| *status != 200).count();
    let revived = revived.request_count();
    eprintln!("{balancer}: {failed} failed of {during_outage} sent during the outage; {revived} to the restarted replica");
    (during_outage, failed, revived)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_fails_half_the_requests_under_round_robin() {
    // The control for the two tests below: round robin ignores outcomes, so
    // the kill is real when about half of the outage's requests fail.
    let (during_outage, failed, revived) = kill_a_replica_under_load("round-robin").await;
    assert!(
        failed * 4 > during_outage,
        "round robin: only {failed} requests failed while one of two replicas was down for 3 s ({during_outage} sent meanwhile)"
    );
    assert!(
        revived > 0,
        "round robin: the restarted replica got nothing"
    );
}

/// The share of an outage's requests that may fail under a balancer that
/// reacts to failures: the requests in flight at the kill and a few probes.
fn assert_few_failed(balancer: &str, (during_outage, failed, revived): (usize, usize, usize)) {
    assert!(
        during_outage > 150,
        "{balancer}: only {during_outage} requests went out during the 3 s outage"
    );
    assert!(
        failed * 10 < during_outage,
        "{balancer}: {failed} requests failed while one of two replicas was down for 3 s ({during_outage} sent meanwhile); expected under 10% (round robin fails about half)"
    );
    assert!(
        revived > 20,
        "{balancer}: the replica got only {revived} requests in the 5 s after it came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_sends_almost_nothing_to_a_killed_replica() {
    let outcome = kill_a_replica_under_load("peak-ewma").await;
    assert_few_failed("peak-ewma", outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_sends_almost_nothing_to_a_killed_replica() {
    let outcome = kill_a_replica_under_load("least-request").await;
    assert_few_failed("least-request", outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answering_500_at_once_gets_a_small_share() {
    for balancer in ["peak-ewma", "least-request"] {
        let healthy = delayed("healthy", Duration::from_millis(2));
        let broken = ScriptedServer::start("broken", vec![Step::Status(500, None)]);
        let proxy = ProxyProcess::start(&policy::docs(&[
            policy::backend(
                "pool",
                &[healthy.addr(), broken.addr()],
                &format!("balancer: {balancer}"),
            ),
            policy::route("pool", "backends:\n  - backend: pool\n"),
        ]));
        let client = HttpClient::http1();
        let url = format!("{}/v1/embeddings", proxy.url());
        let replies = drive(1000, 8, |_| {
            let client = client.clone();
            let url = url.clone();
            async move { client.fetch(json_request(&url, EMBED, &[])).await }
        })
        .await;
        let failed = replies.iter().filter(|r| r.status != 200).count();
        let (h, b) = (healthy.request_count(), broken.request_count());
        eprintln!("{balancer}: {b} of 1000 to the replica answering 500");
        assert_eq!(h + b, 1000, "{balancer}: the upstreams saw {h} + {b}");
        assert_eq!(
            failed, b,
            "{balancer}: every failure is the broken replica's"
        );
        assert!(
            b * 10 < 1000,
            "{balancer} sent {b} of 1000 requests to a replica answering 500 at once (the healthy one got {h}); expected under 10%"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_splits_evenly_between_two_equal_replicas() {
    // A steady rate, as a service sees it: at a few requests in flight the
    // latency estimate alone decides, and noise must not pick a winner. The
    // replicas take 2 ms, as a model server does some work before its first
    // byte, so that what the test measures is not which fixture thread the
    // loaded machine happened to schedule better.
    let a = delayed("a", Duration::from_millis(2));
    let b = delayed("b", Duration::from_millis(2));
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("pool", &[a.addr(), b.addr()], "balancer: peak-ewma"),
        policy::route("pool", "backends:\n  - backend: pool\n"),
    ]));
    let outcomes = SteadyLoad::start(&proxy, 200, Duration::from_secs(10))
        .finish()
        .await;
    let failed = outcomes.iter().filter(|(_, status)| *status != 200).count();
    assert_eq!(failed, 0, "{failed} of {} requests failed", outcomes.len());
    let (a, b) = (a.request_count(), b.request_count());
    assert!(a + b > 1000, "only {} requests went out in 10 s", a + b);
    let share = a as f64 / (a + b) as f64;
    eprintln!("peak-ewma split {a}/{b}");
    assert!(
        (0.35..=0.65).contains(&share),
        "peak-EWMA split {} requests {a}/{b} between two identical replicas; expected within 35/65",
        a + b
    );
}
