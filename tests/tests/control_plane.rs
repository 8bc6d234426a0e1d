//! Proxies that follow a control plane: the real `infermesh-control serve`
//! over a policy directory, real proxies subscribed to it with
//! `--control-plane`, and real traffic through them to `OpenAiServer`
//! upstreams. Policy files are edited as an operator would: in place, or by
//! renaming a new file over the old one.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use infermesh_tests::client::{chat_body, json_request};
use infermesh_tests::eventually;
use infermesh_tests::kserve::{grpc_client, infer_request};
use infermesh_tests::{
    policy, Arrivals, ControlPlaneProcess, HttpClient, Metrics, OpenAiServer, ProxyProcess, Reply,
};
use serde_json::Value;

const MODEL: &str = "chat-model";

fn backends(blue: &OpenAiServer, green: &OpenAiServer) -> String {
    policy::docs(&[
        policy::backend("blue", &[blue.addr()], ""),
        policy::backend("green", &[green.addr()], ""),
    ])
}

/// The route for [`MODEL`], to one backend.
fn route_to(backend: &str) -> String {
    policy::route(
        "chat",
        &format!("match:\n  - model: {{exact: {MODEL}}}\nbackends:\n  - backend: {backend}\n"),
    )
}

/// A control plane serving `backends.yaml` (blue, green) and `routes.yaml`
/// (the chat route to `backend`).
fn control_plane(blue: &OpenAiServer, green: &OpenAiServer, backend: &str) -> ControlPlaneProcess {
    ControlPlaneProcess::start(&[
        ("backends.yaml", &backends(blue, green)),
        ("routes.yaml", &route_to(backend)),
    ])
}

/// A proxy following `control_plane`, with more flags.
fn follower(control_plane: &ControlPlaneProcess, id: &str, extra: &[&str]) -> ProxyProcess {
    let mut builder = ProxyProcess::builder()
        .no_config()
        .arg("--control-plane")
        .arg(&control_plane.url())
        .arg("--proxy-id")
        .arg(id);
    for arg in extra {
        builder = builder.arg(arg);
    }
    builder.start()
}

async fn get(url: String) -> Reply {
    HttpClient::http1().get(&url).await
}

async fn ready(proxy: &ProxyProcess) -> bool {
    get(format!("{}/ready", proxy.admin_url())).await.status == 200
}

async fn wait_ready(proxy: &ProxyProcess) {
    eventually(
        "the proxy becomes ready",
        Duration::from_secs(15),
        || async { ready(proxy).await.then_some(()) },
    )
    .await;
}

async fn config(proxy: &ProxyProcess) -> Value {
    let reply = get(format!("{}/config", proxy.admin_url())).await;
    assert_eq!(reply.status, 200, "/config: {}", reply.text());
    reply.json()
}

async fn scrape(proxy: &ProxyProcess) -> Metrics {
    Metrics::parse(&get(format!("{}/metrics", proxy.admin_url())).await.text())
}

fn gauge(metrics: &Metrics, name: &str) -> Option<f64> {
    metrics.find(name, &[]).next().map(|s| s.value)
}

/// One chat request through `proxy`; the reply says which upstream answered.
async fn chat(client: &HttpClient, proxy: &ProxyProcess) -> Reply {
    client
        .post_json(
            &format!("{}/v1/chat/completions", proxy.url()),
            &chat_body(MODEL, false),
        )
        .await
}

/// Which upstream answers [`MODEL`] through `proxy`, asserting success.
async fn upstream_of(client: &HttpClient, proxy: &ProxyProcess) -> String {
    let reply = chat(client, proxy).await;
    assert_eq!(
        reply.status,
        200,
        "chat through the proxy: {}",
        reply.text()
    );
    reply.upstream().unwrap_or_default().to_string()
}

/// Waits until every proxy sends [`MODEL`] to `upstream`; returns how long it took.
async fn wait_upstream(proxies: &[&ProxyProcess], upstream: &str, timeout: Duration) -> Duration {
    let client = HttpClient::http1();
    let started = Instant::now();
    for proxy in proxies {
        eventually(
            &format!("traffic through {} reaches {upstream}", proxy.outbound),
            timeout.saturating_sub(started.elapsed()),
            || async { (upstream_of(&client, proxy).await == upstream).then_some(()) },
        )
        .await;
    }
    started.elapsed()
}

/// The version of the snapshot in force in `proxy`, and its source.
async fn version(proxy: &ProxyProcess) -> (u64, String) {
    let config = config(proxy).await;
    (
        config["version"].as_u64().unwrap_or_default(),
        config["source"].as_str().unwrap_or_default().to_string(),
    )
}

/// The control plane's entry for `proxy_id` in `/proxies`.
async fn proxy_entry(control_plane: &ControlPlaneProcess, proxy_id: &str) -> Option<Value> {
    let proxies = control_plane.proxies().await;
    let list = proxies
        .get("proxies")
        .and_then(Value::as_array)
        .or_else(|| proxies.as_array())
        .cloned()
        .unwrap_or_default();
    list.into_iter()
        .find(|p| p["id"].as_str() == Some(proxy_id))
}

/// The version the control plane publishes now.
async fn published_version(control_plane: &ControlPlaneProcess) -> u64 {
    let policy = control_plane.policy().await;
    policy["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("no version in /policy: {policy:#}"))
}

// === the tests ===

#[tokio::test]
async fn traffic_follows_a_policy_edit_within_a_second() {
    let blue = OpenAiServer::start("blue");
    let green = OpenAiServer::start("green");
    let control_plane = control_plane(&blue, &green, "blue");
    let first = follower(&control_plane, "first", &[]);
    let second = follower(&control_plane, "second", &[]);
    wait_ready(&first).await;
    wait_ready(&second).await;
    let client = HttpClient::http1();
    for proxy in [&first, &second] {
        assert_eq!(upstream_of(&client, proxy).await, "blue");
        let (version, source) = version(proxy).await;
        assert!(version > 0, "a pushed snapshot has a version");
        assert_eq!(source, "control-plane");
    }
    let before = version(&first).await.0;

    control_plane.write_in_place("routes.yaml", &route_to("green"));
    let took = wait_upstream(&[&first, &second], "green", Duration::from_secs(5)).await;
    eprintln!("both proxies followed the edit after {took:?}");
    assert!(
        took <= Duration::from_secs(1),
        "traffic took {took:?} to follow the edit"
    );
    assert!(version(&first).await.0 > before);

    // Both proxies ACKed the version the control plane publishes.
    let published = published_version(&control_plane).await;
    for id in ["first", "second"] {
        let (entry, _) = eventually(
            &format!("{id} ACKs version {published}"),
            Duration::from_secs(5),
            || async {
                proxy_entry(&control_plane, id)
                    .await
                    .filter(|e| e["ackedVersion"].as_u64() == Some(published))
            },
        )
        .await;
        assert!(entry["lastNack"].is_null(), "{entry:#}");
    }
    let metrics = scrape(&first).await;
    assert_eq!(
        gauge(&metrics, "infermesh_control_plane_connected"),
        Some(1.0)
    );
    assert_eq!(
        gauge(&metrics, "infermesh_policy_version"),
        Some(published as f64)
    );
    let applied = metrics
        .find("infermesh_policy_updates_total", &[("outcome", "applied")])
        .next()
        .map(|s| s.value);
    assert!(applied >= Some(2.0), "{}", metrics.text);
}

#[tokio::test]
async fn fifty_edits_under_steady_load_fail_no_request() {
    let blue = OpenAiServer::start("blue");
    let green = OpenAiServer::start("green");
    let control_plane = control_plane(&blue, &green, "blue");
    let proxies = Arc::new([
        follower(&control_plane, "load-1", &[]),
        follower(&control_plane, "load-2", &[]),
    ]);
    for proxy in proxies.iter() {
        wait_ready(proxy).await;
    }

    // Steady load: unary requests on two connections per proxy, and short
    // streams that are in flight while snapshots change under them.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for worker in 0..6 {
        let (proxies, stop, sent, failures) = (
            proxies.clone(),
            stop.clone(),
            sent.clone(),
            failures.clone(),
        );
        workers.push(tokio::spawn(async move {
            let client = HttpClient::http1();
            let proxy = &proxies[worker % 2];
            let url = format!("{}/v1/chat/completions", proxy.url());
            while !stop.load(Ordering::Relaxed) {
                let streaming = worker >= 4;
                let request = json_request(
                    &url,
                    &chat_body(MODEL, streaming),
                    &[("x-test-chunks", "5"), ("x-test-gap-ms", "20")],
                );
                let outcome = match client.send(request).await {
                    Ok(response) if response.status() == 200 => {
                        let arrivals = Arrivals::read(response.into_body()).await;
                        let text = String::from_utf8_lossy(&arrivals.bytes()).into_owned();
                        if streaming && !text.contains("[DONE]") {
                            Err(format!("stream cut short: {text:?}"))
                        } else {
                            Ok(())
                        }
                    }
                    Ok(response) => Err(format!("status {}", response.status())),
                    Err(error) => Err(format!("{error:?}")),
                };
                sent.fetch_add(1, Ordering::Relaxed);
                if let Err(failure) = outcome {
                    failures.lock().unwrap().push(failure);
                }
            }
        }));
    }

    let edits = 50;
    let edits_started = Instant::now();
    let mut last = version(&proxies[0]).await.0;
    for edit in 0..edits {
        let target = if edit % 2 == 0 { "green" } else { "blue" };
        // Renamed over the old file: an in-place rewrite can be read half
        // written, and each such read is refused (invalid, or empty) rather
        // than published, so this edit would not be a version of its own.
        control_plane.write("routes.yaml", &route_to(target));
        // Each edit is its own version on both proxies before the next one.
        for proxy in proxies.iter() {
            let (now, _) = eventually(
                &format!("edit {edit} reaches {}", proxy.outbound),
                Duration::from_secs(5),
                || async {
                    let now = version(proxy).await.0;
                    (now > last).then_some(now)
                },
            )
            .await;
            assert!(now > last);
        }
        last = version(&proxies[0]).await.0;
    }
    // The last edit routed to blue; let the load run on it for a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let sent = sent.load(Ordering::Relaxed);
    eprintln!(
        "{edits} edits in {:?}; {sent} requests, {} failed; blue served {}, green {}",
        edits_started.elapsed(),
        failures.len(),
        blue.request_count(),
        green.request_count()
    );
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed during {edits} edits; first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(sent >= 200, "only {sent} requests ran during the edits");
    assert!(blue.request_count() > 0 && green.request_count() > 0);
    let client = HttpClient::http1();
    for proxy in proxies.iter() {
        assert_eq!(upstream_of(&client, proxy).await, "blue");
    }
}

#[tokio::test]
async fn an_invalid_edit_keeps_routing_and_the_control_plane_reports_it() {
    let blue = OpenAiServer::start("blue");
    let green = OpenAiServer::start("green");
    let control_plane = control_plane(&blue, &green, "blue");
    let proxy = follower(&control_plane, "invalid-edit", &[]);
    wait_ready(&proxy).await;
    let before = version(&proxy).await;

    // A route to a backend that does not exist, and a misspelt field.
    control_plane.write(
        "routes.yaml",
        &route_to("purple").replace("match:", "mtch:"),
    );
    let (refusal, _) = eventually(
        "the control plane reports the invalid edit",
        Duration::from_secs(5),
        || async {
            let policy = control_plane.policy().await;
            (policy["state"] == "refused").then(|| policy["lastRefusal"].clone())
        },
    )
    .await;
    let errors = refusal["errors"].as_array().cloned().unwrap_or_default();
    assert!(
        errors.iter().any(|e| e["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("routes.yaml"))
            && e["line"].as_u64() > Some(0)
            && e["message"].as_str().is_some_and(|m| m.contains("mtch"))),
        "{refusal:#}"
    );
    // Routing stays as it was, on the same version.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = HttpClient::http1();
    for _ in 0..10 {
        assert_eq!(upstream_of(&client, &proxy).await, "blue");
    }
    assert_eq!(version(&proxy).await, before);
    assert_eq!(published_version(&control_plane).await, before.0);

    // Fixed: traffic moves.
    control_plane.write("routes.yaml", &route_to("green"));
    wait_upstream(&[&proxy], "green", Duration::from_secs(5)).await;
}

#[tokio::test]
async fn proxies_keep_serving_without_the_control_plane_and_resync_after_it_restarts() {
    let blue = OpenAiServer::start("blue");
    let green = OpenAiServer::start("green");
    let mut control_plane = control_plane(&blue, &green, "blue");
    let first = follower(&control_plane, "resync-1", &[]);
    let second = follower(&control_plane, "resync-2", &[]);
    wait_ready(&first).await;
    wait_ready(&second).await;

    control_plane.kill();
    let client = HttpClient::http1();
    for proxy in [&first, &second] {
        eventually(
            "the proxy notices the control plane is gone",
            Duration::from_secs(5),
            || async {
                (gauge(&scrape(proxy).await, "infermesh_control_plane_connected") == Some(0.0))
                    .then_some(())
            },
        )
        .await;
        for _ in 0..20 {
            assert_eq!(upstream_of(&client, proxy).await, "blue");
        }
        assert!(ready(proxy).await, "a proxy with a snapshot stays ready");
        let config = config(proxy).await;
        assert_eq!(config["controlPlane"]["connected"], Value::Bool(false));
    }

    // The policy changes while the control plane is down; once it is back,
    // the proxies resync to what it publishes.
    control_plane.write("routes.yaml", &route_to("green"));
    control_plane.restart();
    wait_upstream(&[&first, &second], "green", Duration::from_secs(15)).await;
    let published = published_version(&control_plane).await;
    for (proxy, id) in [(&first, "resync-1"), (&second, "resync-2")] {
        eventually(
            &format!("{id} resyncs to version {published}"),
            Duration::from_secs(5),
            || async {
                let ours = version(proxy).await;
                let acked = proxy_entry(&control_plane, id)
                    .await
                    .and_then(|e| e["ackedVersion"].as_u64());
                (ours == (published, "control-plane".into()) && acked == Some(published))
                    .then_some(())
            },
        )
        .await;
    }
}

#[tokio::test]
async fn a_snapshot_the_proxy_cannot_apply_is_nacked_and_shown_in_proxies() {
    let blue = OpenAiServer::start("blue");
    let green = OpenAiServer::start("green");
    let control_plane = control_plane(&blue, &green, "blue");
    // The route and the one backend it names: two resources, one too many.
    let small = follower(
        &control_plane,
        "too-small",
        &["--max-policy-resources", "1"],
    );
    let roomy = follower(&control_plane, "roomy", &[]);
    wait_ready(&roomy).await;

    let (entry, _) = eventually(
        "the NACK shows in /proxies",
        Duration::from_secs(10),
        || async {
            proxy_entry(&control_plane, "too-small")
                .await
                .filter(|e| !e["lastNack"].is_null())
        },
    )
    .await;
    let error = entry["lastNack"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("snapshot has 2 resources; this proxy accepts at most 1"),
        "{entry:#}"
    );
    assert!(
        entry["ackedVersion"].as_u64().unwrap_or_default() == 0,
        "{entry:#}"
    );
    let roomy_entry = proxy_entry(&control_plane, "roomy").await.expect("roomy");
    assert!(roomy_entry["lastNack"].is_null(), "{roomy_entry:#}");

    // The proxy that refused has nothing to serve, says so, and counts it.
    assert!(!ready(&small).await);
    let config = config(&small).await;
    assert_eq!(config["source"], "none");
    assert!(config["controlPlane"]["lastRejected"]["error"]
        .as_str()
        .unwrap_or_default()
        .contains("accepts at most 1"));
    let rejected = scrape(&small)
        .await
        .find("infermesh_policy_updates_total", &[("outcome", "rejected")])
        .next()
        .map(|s| s.value);
    assert!(rejected >= Some(1.0));
    let reply = chat(&HttpClient::http1(), &small).await;
    reply.assert_proxy_error(503, "no_policy_yet");
}

#[tokio::test]
async fn the_cache_lets_a_restarted_proxy_serve_without_the_control_plane() {
    let blue = OpenAiServer::start("blue");
    let green = OpenAiServer::start("green");
    let mut control_plane = control_plane(&blue, &green, "blue");
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("policy-cache.json");
    let cache_arg = cache.to_str().unwrap();
    let mut proxy = follower(&control_plane, "cached", &["--policy-cache", cache_arg]);
    wait_ready(&proxy).await;
    let (held, _) = version(&proxy).await;
    eventually("the cache is written", Duration::from_secs(5), || async {
        cached_version(&cache).filter(|v| *v == held)
    })
    .await;

    // Both go down; the proxy comes back alone and serves from its cache.
    control_plane.kill();
    proxy.terminate();
    proxy
        .exited(Duration::from_secs(10))
        .await
        .expect("proxy exits");
    let restarted = follower(&control_plane, "cached", &["--policy-cache", cache_arg]);
    wait_ready(&restarted).await;
    assert_eq!(version(&restarted).await, (held, "cache".into()));
    assert_eq!(upstream_of(&HttpClient::http1(), &restarted).await, "blue");
    assert!(
        restarted
            .stderr()
            .contains("serving the cached policy snapshot"),
        "{}",
        restarted.stderr()
    );

    // The control plane returns with a new route: the proxy moves on from the cache.
    control_plane.write("routes.yaml", &route_to("green"));
    control_plane.restart();
    wait_upstream(&[&restarted], "green", Duration::from_secs(15)).await;
    assert_eq!(version(&restarted).await.1, "control-plane");
}

fn cached_version(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str::<Value>(&text).ok()?["version"].as_u64()
}

#[tokio::test]
async fn workloads_get_only_the_routes_scoped_to_them() {
    let blue = OpenAiServer::start("blue");
    let green = OpenAiServer::start("green");
    let scoped = policy::route(
        "chat-team-a",
        &format!(
            "match:\n  - model: {{exact: {MODEL}}}\nbackends:\n  - backend: green\nworkloadSelector:\n  matchLabels: {{team: a}}\n"
        ),
    );
    let control_plane = ControlPlaneProcess::start(&[
        ("backends.yaml", &backends(&blue, &green)),
        (
            "routes.yaml",
            &policy::docs(&[scoped.clone(), route_to("blue")]),
        ),
    ]);
    let team_a = follower(&control_plane, "team-a", &["--workload-label", "team=a"]);
    let team_b = follower(&control_plane, "team-b", &["--workload-label", "team=b"]);
    wait_ready(&team_a).await;
    wait_ready(&team_b).await;
    let client = HttpClient::http1();
    assert_eq!(upstream_of(&client, &team_a).await, "green");
    assert_eq!(upstream_of(&client, &team_b).await, "blue");

    // The same file as a local policy, scoped by the same flags.
    let local = |labels: &[&str]| {
        let mut builder = ProxyProcess::builder().policy(&policy::docs(&[
            backends(&blue, &green),
            scoped.clone(),
            route_to("blue"),
        ]));
        for label in labels {
            builder = builder.arg("--workload-label").arg(label);
        }
        builder.start()
    };
    let local_a = local(&["team=a"]);
    let local_none = local(&[]);
    assert_eq!(upstream_of(&client, &local_a).await, "green");
    assert_eq!(upstream_of(&client, &local_none).await, "blue");
    assert_eq!(config(&local_a).await["source"], "file");
}

/// Steady chat traffic through `proxies` until `stop`: the number of
/// requests sent and the failures, each described.
type Load = (
    Arc<AtomicBool>,
    Arc<AtomicUsize>,
    Arc<std::sync::Mutex<Vec<String>>>,
    Vec<tokio::task::JoinHandle<()>>,
);

fn steady_load(proxies: &Arc<[ProxyProcess; 2]>, workers: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut handles = Vec::new();
    for worker in 0..workers {
        let (proxies, stop, sent, failures) = (
            proxies.clone(),
            stop.clone(),
            sent.clone(),
            failures.clone(),
        );
        handles.push(tokio::spawn(async move {
            let client = HttpClient::http1();
            let proxy = &proxies[worker % 2];
            while !stop.load(Ordering::Relaxed) {
                let reply = chat(&client, proxy).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if reply.status != 200 {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{}: {}", reply.status, reply.text()));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    (stop, sent, failures, handles)
}

/// `/ready` of the control plane: status and text.
async fn control_ready(control_plane: &ControlPlaneProcess) -> (u16, String) {
    let reply = get(format!("{}/ready", control_plane.admin_url())).await;
    (reply.status.as_u16(), reply.text())
}

async fn empty_refusals(control_plane: &ControlPlaneProcess) -> f64 {
    let text = get(format!("{}/metrics", control_plane.admin_url()))
        .await
        .text();
    Metrics::parse(&text).sum("infermesh_control_empty_policy_refusals_total", &[])
}

/// Waits until the control plane reports the policy files refused as
/// empty, and returns the reason it gives.
async fn wait_empty_refusal(control_plane: &ControlPlaneProcess, after: f64) -> String {
    eventually(
        "the control plane refuses the empty policy set",
        Duration::from_secs(10),
        || async {
            let policy = control_plane.policy().await;
            let refused = policy["state"] == "refused"
                && policy["lastRefusal"]["reason"] == "empty"
                && empty_refusals(control_plane).await > after;
            refused.then(|| {
                policy["lastRefusal"]["errors"][0]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
        },
    )
    .await
    .0
}

async fn wait_serving(control_plane: &ControlPlaneProcess) {
    eventually(
        "the control plane serves the files again",
        Duration::from_secs(10),
        || async { (control_plane.policy().await["state"] == "serving").then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn an_emptied_or_deleted_policy_file_does_not_empty_the_mesh() {
    let blue = OpenAiServer::start("blue");
    let green = OpenAiServer::start("green");
    let control_plane = control_plane(&blue, &green, "blue");
    let proxies = Arc::new([
        follower(&control_plane, "empty-1", &[]),
        follower(&control_plane, "empty-2", &[]),
    ]);
    for proxy in proxies.iter() {
        wait_ready(proxy).await;
    }
    let before = version(&proxies[0]).await;
    let published = published_version(&control_plane).await;
    let (stop, sent, failures, workers) = steady_load(&proxies, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // An editor's truncate, then its write a while later.
    control_plane.write_in_place("routes.yaml", "");
    let why = wait_empty_refusal(&control_plane, 0.0).await;
    assert!(why.contains("ModelRoute"), "{why}");
    assert!(why.contains("--allow-empty-policy"), "{why}");
    let (status, ready) = control_ready(&control_plane).await;
    assert_eq!(status, 200, "{ready}");
    assert!(
        ready.contains(&format!("serving version {published}"))
            && ready.contains("refused (empty)"),
        "{ready}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    control_plane.write_in_place("routes.yaml", &route_to("blue"));
    wait_serving(&control_plane).await;

    // Every file deleted (a ConfigMap swapped for an empty one), then back.
    // (In this order, a load between the two steps sees an invalid set,
    // never one without routes.)
    control_plane.remove("backends.yaml");
    control_plane.remove("routes.yaml");
    let why = wait_empty_refusal(&control_plane, 1.0).await;
    assert!(why.contains("no policy documents"), "{why}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    control_plane.write("routes.yaml", &route_to("blue"));
    control_plane.write("backends.yaml", &backends(&blue, &green));
    wait_serving(&control_plane).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let sent = sent.load(Ordering::Relaxed);
    eprintln!("{sent} requests, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed while the policy files were empty; first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(sent >= 50, "only {sent} requests ran");
    // Nothing was published: the proxies hold the version they had.
    for proxy in proxies.iter() {
        assert_eq!(version(proxy).await, before);
    }
    assert_eq!(published_version(&control_plane).await, published);
    assert_eq!(empty_refusals(&control_plane).await, 2.0);
    let log = control_plane.stderr();
    assert_eq!(
        log.matches("refused a policy set without routes").count(),
        1,
        "logged once per change:\n{log}"
    );
}

#[tokio::test]
async fn a_file_emptied_while_its_writer_is_still_busy_keeps_its_routes() {
    let blue = OpenAiServer::start("blue");
    let green = OpenAiServer::start("green");
    let other_route = policy::route(
        "other",
        "match:\n  - model: {exact: other-model}\nbackends:\n  - backend: green\n",
    );
    let control_plane = ControlPlaneProcess::start(&[
        ("backends.yaml", &backends(&blue, &green)),
        ("routes.yaml", &route_to("blue")),
        ("other.yaml", &other_route),
    ]);
    let proxy = follower(&control_plane, "emptied-file", &[]);
    wait_ready(&proxy).await;
    let before = version(&proxy).await;
    let client = HttpClient::http1();
    let other = || async {
        client
            .post_json(
                &format!("{}/v1/chat/completions", proxy.url()),
                &chat_body("other-model", false),
            )
            .await
    };
    assert_eq!(other().await.status, 200);

    // `generate > other.yaml`: the shell truncates at once, the writer
    // takes its time.
    control_plane.write_in_place("other.yaml", "");
    let (error, _) = eventually(
        "the control plane refuses the emptied file",
        Duration::from_secs(10),
        || async {
            let policy = control_plane.policy().await;
            (policy["state"] == "refused" && policy["lastRefusal"]["reason"] == "empty")
                .then(|| policy["lastRefusal"]["errors"][0].clone())
        },
    )
    .await;
    assert!(
        error["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("other.yaml"))
            && error["message"]
                .as_str()
                .is_some_and(|m| m.contains("delete the file")),
        "{error:#}"
    );
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(800) {
        let reply = other().await;
        assert_eq!(
            reply.status,
            200,
            "while other.yaml is empty: {}",
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    control_plane.write_in_place("other.yaml", &other_route);
    wait_serving(&control_plane).await;
    assert_eq!(other().await.status, 200);
    assert_eq!(version(&proxy).await, before);

    // Deleting the file is how its routes go on purpose.
    control_plane.remove("other.yaml");
    eventually(
        "the deletion reaches the proxy",
        Duration::from_secs(10),
        || async { (version(&proxy).await.0 > before.0).then_some(()) },
    )
    .await;
    other().await.assert_proxy_error(404, "no_route");
    assert_eq!(upstream_of(&client, &proxy).await, "blue");
}

#[tokio::test]
async fn with_allow_empty_policy_an_emptied_directory_is_published() {
    let blue = OpenAiServer::start("blue");
    let green = OpenAiServer::start("green");
    let control_plane = ControlPlaneProcess::start_with(
        &[
            ("backends.yaml", &backends(&blue, &green)),
            ("routes.yaml", &route_to("blue")),
        ],
        &["--allow-empty-policy"],
    );
    let proxy = follower(&control_plane, "allow-empty", &[]);
    wait_ready(&proxy).await;
    let client = HttpClient::http1();
    assert_eq!(upstream_of(&client, &proxy).await, "blue");
    let before = version(&proxy).await.0;
    control_plane.remove("routes.yaml");
    control_plane.remove("backends.yaml");
    eventually(
        "the empty set reaches the proxy",
        Duration::from_secs(10),
        || async { (version(&proxy).await.0 > before).then_some(()) },
    )
    .await;
    chat(&client, &proxy)
        .await
        .assert_proxy_error(404, "no_route");
    assert_eq!(control_plane.policy().await["state"], "serving");
    assert_eq!(empty_refusals(&control_plane).await, 0.0);
}

#[tokio::test]
async fn a_policy_of_only_a_mesh_config_is_an_explicit_empty_mesh() {
    let blue = OpenAiServer::start("blue");
    let green = OpenAiServer::start("green");
    let control_plane = control_plane(&blue, &green, "blue");
    let proxy = follower(&control_plane, "mesh-only", &[]);
    wait_ready(&proxy).await;
    let before = version(&proxy).await.0;
    control_plane.write(
        "mesh.yaml",
        "apiVersion: infermesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {}\n",
    );
    control_plane.remove("backends.yaml");
    control_plane.remove("routes.yaml");
    eventually(
        "the MeshConfig-only set reaches the proxy",
        Duration::from_secs(10),
        || async {
            let config = config(&proxy).await;
            let now = config["version"].as_u64().unwrap_or_default();
            (now > before && control_plane.policy().await["documents"]["routes"] == 0).then_some(())
        },
    )
    .await;
    chat(&HttpClient::http1(), &proxy)
        .await
        .assert_proxy_error(404, "no_route");
    assert_eq!(empty_refusals(&control_plane).await, 0.0);
}

#[tokio::test]
async fn a_proxy_waiting_for_an_absent_control_plane_is_live_but_not_ready() {
    let nowhere = infermesh_tests::refused_addr();
    let proxy = ProxyProcess::builder()
        .no_config()
        .arg("--control-plane")
        .arg(&format!("http://{nowhere}"))
        .start();
    assert_eq!(get(format!("{}/live", proxy.admin_url())).await.status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!ready(&proxy).await);
    let config = config(&proxy).await;
    assert_eq!(config["source"], "none");
    assert_eq!(config["version"], 0);
    assert_eq!(config["controlPlane"]["connected"], Value::Bool(false));
    // Not "no route": the proxy cannot know yet; a 503 says try again.
    let reply = chat(&HttpClient::http1(), &proxy).await;
    let message = reply.assert_proxy_error(503, "no_policy_yet");
    assert!(message.contains("control plane"), "{message}");
    let mut grpc = grpc_client(proxy.outbound).await;
    let status = grpc
        .model_infer(infer_request("any-model", "1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no policy yet"), "{status:?}");
    // Reconnect attempts are logged once, not each time.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let warnings = proxy.stderr().matches("control plane unavailable").count();
    assert_eq!(warnings, 1, "{}", proxy.stderr());
}

#[test]
fn a_control_plane_url_that_cannot_work_stops_the_proxy() {
    let exit = ProxyProcess::builder()
        .no_config()
        .arg("--control-plane")
        .arg("127.0.0.1:8080")
        .run_to_exit(Duration::from_secs(10));
    assert!(!exit.status.success());
    assert!(
        exit.stderr.contains("invalid control-plane URL"),
        "{}",
        exit.stderr
    );
}
