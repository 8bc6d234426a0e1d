//! `balancer: model-aware` end to end: real proxies in front of model
//! servers that report their load in vLLM's Prometheus names (a small
//! server here whose reported queue the test sets, and `infermesh-sim`
//! for LoRA adapters). Prefix affinity across independent proxies, a hot
//! prefix spilling, an endpoint whose metrics cannot be read, a server
//! reporting a long queue, and a LoRA request finding its adapter.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use infermesh_tests::client::drive;
use infermesh_tests::{policy, HttpClient, Metrics, ProxyProcess, SimServer};

/// A model server that answers every completion at once (after `delay`)
/// with an `x-upstream` header, and serves `/metrics` with the text the
/// test sets (a 500 when it is `None`).
struct Fake {
    addr: SocketAddr,
    name: String,
    metrics: Arc<Mutex<Option<String>>>,
    /// An `endpoint-load-metrics` header for every completion, when set.
    orca: Arc<Mutex<Option<String>>>,
    completions: Arc<AtomicUsize>,
}

impl Fake {
    fn start(name: &str, delay: Duration) -> Fake {
        // Its own thread and runtime, as the fixtures in `tests/src`, so
        // that it serves whatever the test's runtime is doing.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Mutex::new(Some(vllm_metrics(0, 0, 0.0))));
        let completions = Arc::new(AtomicUsize::new(0));
        let orca = Arc::new(Mutex::new(None::<String>));
        let (page, count, upstream, report) = (
            metrics.clone(),
            completions.clone(),
            name.to_string(),
            orca.clone(),
        );
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (page, count, upstream, report) =
                    (page.clone(), count.clone(), upstream.clone(), report.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let (page, count, upstream, report) =
                            (page.clone(), count.clone(), upstream.clone(), report.clone());
                        async move {
                            let path = request.uri().path().to_string();
                            let _ = request.into_body().collect().await;
                            let response = if path == "/metrics" {
                                match page.lock().unwrap().clone() {
                                    Some(text) => Response::new(Full::new(Bytes::from(text))),
                                    None => Response::builder()
                                        .status(StatusCode::INTERNAL_SERVER_ERROR)
                                        .body(Full::new(Bytes::from("metrics broken")))
                                        .unwrap(),
                                }
                            } else {
                                tokio::time::sleep(delay).await;
                                count.fetch_add(1, Ordering::Relaxed);
                                let mut response = Response::builder();
                                if let Some(load) = report.lock().unwrap().clone() {
                                    response = response.header("endpoint-load-metrics", load);
                                }
                                response
                                    .header("content-type", "application/json")
                                    .header("x-upstream", upstream.as_str())
                                    .body(Full::new(Bytes::from(
                                        r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
                                    )))
                                    .unwrap()
                            };
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            });
        });
        Fake {
            addr,
            name: name.to_string(),
            metrics,
            orca,
            completions,
        }
    }

    fn report_per_response(&self, header: &str) {
        *self.orca.lock().unwrap() = Some(header.to_string());
    }

    fn report(&self, page: Option<String>) {
        *self.metrics.lock().unwrap() = page;
    }

    fn completions(&self) -> usize {
        self.completions.load(Ordering::Relaxed)
    }
}

fn vllm_metrics(waiting: u32, running: u32, kv: f64) -> String {
    format!(
        "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"m\"}} {waiting}\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"m\"}} {running}\nvllm:kv_cache_usage_perc{{model_name=\"m\"}} {kv}\n"
    )
}

/// A backend `fleet` with the model-aware balancer, polling every 100ms.
fn fleet_policy(endpoints: &[SocketAddr], extra: &str) -> String {
    policy::docs(&[
        policy::backend(
            "fleet",
            endpoints,
            &format!("balancer: model-aware\nmodelAware:\n  prefix: {{blocks: 4, blockSize: 64}}\n  metrics: {{interval: 100ms}}\n{extra}"),
        ),
        policy::route("chat", "backends:\n  - backend: fleet\n"),
    ])
}

/// A chat request whose system prompt is tenant `tenant`'s (a few hundred
/// bytes, the same for every question) followed by `question`.
fn chat(tenant: usize, question: &str) -> String {
    let system = format!("Tenant {tenant}: ").repeat(40);
    format!(
        r#"{{"model":"m","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"{question}"}}],"max_tokens":4}}"#
    )
}

async fn send(client: &HttpClient, proxy: &ProxyProcess, body: &str) -> String {
    let reply = client
        .post_json(&format!("{}/v1/chat/completions", proxy.url()), body)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.upstream().expect("x-upstream").to_string()
}

/// Lets the proxies poll the servers' metrics at least twice.
async fn let_them_poll() {
    tokio::time::sleep(Duration::from_millis(400)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_prefix_from_three_proxies_reaches_the_same_endpoint() {
    let servers: Vec<Fake> = (0..4)
        .map(|i| Fake::start(&format!("s{i}"), Duration::ZERO))
        .collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    // Each proxy lists the endpoints in another order: the ring depends on
    // the addresses alone.
    let proxies: Vec<ProxyProcess> = (0..3)
        .map(|p| {
            let mut order = addrs.clone();
            order.rotate_left(p);
            ProxyProcess::start(&fleet_policy(&order, ""))
        })
        .collect();
    let_them_poll().await;
    let client = HttpClient::http1();
    let mut owners: HashMap<usize, HashSet<String>> = HashMap::new();
    for tenant in 0..12 {
        for (p, proxy) in proxies.iter().enumerate() {
            for q in 0..3 {
                let upstream =
                    send(&client, proxy, &chat(tenant, &format!("question {p}-{q}?"))).await;
                owners.entry(tenant).or_default().insert(upstream);
            }
        }
    }
    for (tenant, seen) in &owners {
        assert_eq!(
            seen.len(),
            1,
            "tenant {tenant}'s prefix went to {seen:?} from three proxies"
        );
    }
    let used: HashSet<&String> = owners.values().flatten().collect();
    assert!(
        used.len() >= 3,
        "twelve prefixes should spread over the four servers, used {used:?}"
    );
    for proxy in &proxies {
        let m = Metrics::scrape(proxy).await;
        assert_eq!(
            m.sum(
                "infermesh_prefix_affinity_total",
                &[("backend", "fleet"), ("outcome", "hit")]
            ),
            36.0,
            "{}",
            m.text
        );
    }
    // The servers' reports are what the proxy shows.
    let m = Metrics::scrape(&proxies[0]).await;
    assert!(m.has("infermesh_endpoint_server_queue"), "{}", m.text);
    assert!(m.has("infermesh_endpoint_kv_cache_usage"), "{}", m.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_prefix_spills_to_the_next_endpoint_when_its_own_is_over_the_bound() {
    let servers: Vec<Fake> = (0..4)
        .map(|i| Fake::start(&format!("s{i}"), Duration::from_millis(150)))
        .collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let proxy = ProxyProcess::start(&fleet_policy(&addrs, ""));
    let_them_poll().await;
    let client = HttpClient::http1();
    // One at a time, the prefix stays home.
    let mut home = HashSet::new();
    for q in 0..5 {
        home.insert(send(&client, &proxy, &chat(7, &format!("q{q}"))).await);
    }
    assert_eq!(home.len(), 1, "{home:?}");
    let home = home.into_iter().next().unwrap();
    // Sixteen at once: its own endpoint fills to the bound, the rest spill.
    let url = format!("{}/v1/chat/completions", proxy.url());
    let replies = drive(64, 16, |i| {
        let (client, url) = (client.clone(), url.clone());
        async move { client.post_json(&url, &chat(7, &format!("hot {i}"))).await }
    })
    .await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.text());
        *counts
            .entry(reply.upstream().unwrap().to_string())
            .or_default() += 1;
    }
    let at_home = counts.get(&home).copied().unwrap_or(0);
    assert!(
        counts.len() >= 2,
        "a hot prefix stayed on one server: {counts:?}"
    );
    assert!(
        at_home >= 16,
        "its own server should keep at least its even share: {counts:?} (home {home})"
    );
    let m = Metrics::scrape(&proxy).await;
    let spills = m.sum(
        "infermesh_prefix_affinity_total",
        &[("backend", "fleet"), ("outcome", "spill")],
    );
    assert!(spills >= 1.0, "{}", m.text);
    assert_eq!(
        spills as usize,
        64 - at_home,
        "every request away from home is a spill: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_whose_metrics_cannot_be_read_is_still_used_by_load() {
    let healthy = Fake::start("readable", Duration::from_millis(20));
    let broken = Fake::start("unreadable", Duration::from_millis(20));
    broken.report(None);
    let proxy = ProxyProcess::start(&fleet_policy(&[healthy.addr, broken.addr], ""));
    let_them_poll().await;
    let url = format!("{}/v1/chat/completions", proxy.url());
    let client = HttpClient::http1();
    // Short prompts: no prefix, so the load alone decides.
    let replies = drive(200, 4, |i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post_json(
                    &url,
                    &format!(
                        r#"{{"model":"m","messages":[{{"role":"user","content":"hi {i}"}}]}}"#
                    ),
                )
                .await
        }
    })
    .await;
    assert!(replies.iter().all(|r| r.status == 200));
    let (a, b) = (healthy.completions(), broken.completions());
    assert_eq!(a + b, 200);
    assert!(
        (60..=140).contains(&b),
        "the endpoint without metrics got {b} of 200 (the other {a}): expected about half"
    );
    // A page of garbage is no worse than none.
    broken.report(Some("<html>not metrics</html>".into()));
    let_them_poll().await;
    let replies = drive(20, 2, |i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post_json(
                    &url,
                    &format!(
                        r#"{{"model":"m","messages":[{{"role":"user","content":"hey {i}"}}]}}"#
                    ),
                )
                .await
        }
    })
    .await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert!(broken.completions() > b, "still used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reporting_a_long_queue_gets_less_traffic() {
    let servers: Vec<Fake> = (0..3)
        .map(|i| Fake::start(&format!("s{i}"), Duration::from_millis(5)))
        .collect();
    servers[0].report(Some(vllm_metrics(30, 8, 0.95)));
    servers[1].report(Some(vllm_metrics(0, 2, 0.2)));
    servers[2].report(Some(vllm_metrics(0, 2, 0.2)));
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let proxy = ProxyProcess::start(&fleet_policy(&addrs, ""));
    let_them_poll().await;
    let url = format!("{}/v1/chat/completions", proxy.url());
    let client = HttpClient::http1();
    let replies = drive(300, 4, |i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post_json(
                    &url,
                    &format!(r#"{{"model":"m","messages":[{{"role":"user","content":"q{i}"}}]}}"#),
                )
                .await
        }
    })
    .await;
    assert!(replies.iter().all(|r| r.status == 200));
    let counts: Vec<usize> = servers.iter().map(Fake::completions).collect();
    assert!(
        counts[0] * 20 < 300,
        "the server with 30 waiting got {} of 300: {counts:?}",
        counts[0]
    );
    let m = Metrics::scrape(&proxy).await;
    let queue = m.sum(
        "infermesh_endpoint_server_queue",
        &[
            ("backend", "fleet"),
            ("endpoint", &servers[0].addr.to_string()),
        ],
    );
    assert_eq!(queue, 30.0, "{}", m.text);
    // Once its queue drains, it gets its share back.
    servers[0].report(Some(vllm_metrics(0, 2, 0.2)));
    let_them_poll().await;
    let before = servers[0].completions();
    let replies = drive(300, 4, |i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post_json(
                    &url,
                    &format!(r#"{{"model":"m","messages":[{{"role":"user","content":"r{i}"}}]}}"#),
                )
                .await
        }
    })
    .await;
    assert!(replies.iter().all(|r| r.status == 200));
    let after = servers[0].completions() - before;
    assert!(
        after >= 60,
        "{} got {after} of 300 after its queue drained",
        servers[0].name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_request_prefers_the_server_holding_its_adapter() {
    let sims: Vec<SimServer> = (0..3)
        .map(|i| {
            SimServer::start(&[
                "--name",
                &format!("sim{i}"),
                "--lora",
                "tenant-a",
                "--lora",
                "tenant-b",
                "--max-loras",
                "1",
                "--lora-load-ms",
                "500",
            ])
        })
        .collect();
    let addrs: Vec<SocketAddr> = sims.iter().map(SimServer::addr).collect();
    let proxy = ProxyProcess::start(&fleet_policy(&addrs, ""));
    // sim1 serves a long tenant-a request, so its metrics list tenant-a.
    let long = tokio::spawn({
        let url = format!("{}/v1/chat/completions", sims[1].url());
        async move {
            HttpClient::http1()
                .post_json(&url, r#"{"model":"tenant-a","messages":[{"role":"user","content":"tell me a story"}],"max_tokens":400}"#)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let client = HttpClient::http1();
    let mut seen = HashMap::<String, usize>::new();
    for i in 0..10 {
        let body = format!(
            r#"{{"model":"tenant-a","messages":[{{"role":"user","content":"hello {i}"}}],"max_tokens":2}}"#
        );
        *seen.entry(send(&client, &proxy, &body).await).or_default() += 1;
    }
    assert_eq!(
        seen.get("sim1").copied(),
        Some(10),
        "tenant-a requests should all go where tenant-a is loaded: {seen:?}"
    );
    // Requests for the base model are not held to it.
    let mut base = HashSet::new();
    for i in 0..30 {
        let body = format!(
            r#"{{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{{"role":"user","content":"hi {i}"}}],"max_tokens":2}}"#
        );
        base.insert(send(&client, &proxy, &body).await);
    }
    assert!(base.len() >= 2, "{base:?}");
    assert_eq!(long.await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_reported_in_responses_load_headers_is_avoided_without_polling() {
    let servers: Vec<Fake> = (0..2)
        .map(|i| Fake::start(&format!("s{i}"), Duration::from_millis(5)))
        .collect();
    // Nothing to poll: what the proxy learns comes with each response.
    for server in &servers {
        server.report(None);
    }
    servers[0].report_per_response(
        "TEXT named_metrics.kv_cache_usage_perc=0.9, named_metrics.num_requests_waiting=40, named_metrics.num_requests_running=8",
    );
    servers[1].report_per_response(
        "TEXT named_metrics.kv_cache_usage_perc=0.1, named_metrics.num_requests_waiting=0, named_metrics.num_requests_running=1",
    );
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend(
            "fleet",
            &addrs,
            "balancer: model-aware\nmodelAware:\n  metrics: {path: \"off\", interval: 2s}\n",
        ),
        policy::route("chat", "backends:\n  - backend: fleet\n"),
    ]));
    let url = format!("{}/v1/chat/completions", proxy.url());
    let client = HttpClient::http1();
    let replies = drive(200, 2, |i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post_json(
                    &url,
                    &format!(r#"{{"model":"m","messages":[{{"role":"user","content":"o{i}"}}]}}"#),
                )
                .await
        }
    })
    .await;
    assert!(replies.iter().all(|r| r.status == 200));
    let counts: Vec<usize> = servers.iter().map(Fake::completions).collect();
    assert!(
        counts[0] * 10 < 200,
        "the server whose responses report 40 waiting got {} of 200: {counts:?}",
        counts[0]
    );
    let m = Metrics::scrape(&proxy).await;
    let queue = m.sum(
        "infermesh_endpoint_server_queue",
        &[
            ("backend", "fleet"),
            ("endpoint", &servers[0].addr.to_string()),
        ],
    );
    assert_eq!(queue, 40.0, "{}", m.text);
}
