//! The mesh dashboard: real proxies following a real `infermesh-control`
//! send their per-model traffic summaries on the policy stream (plaintext
//! and mutual TLS); the control plane's `/dashboard.json` shows the same
//! request counts, failures and tokens the proxies count in their own
//! metrics; and the `/dashboard` page, loaded in headless Chromium (Debian's
//! `chromium` driven by `chromium-driver` over plain WebDriver HTTP), shows
//! them too. The page's screenshot is saved as
//! `target/test-artifacts/dashboard.png`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use infermesh_tests::client::{chat_body, json_request};
use infermesh_tests::kserve::{grpc_client, infer_request, KServeGrpcServer, KServeSettings};
use infermesh_tests::mesh::Mesh;
use infermesh_tests::{
    policy, until, ControlPlaneProcess, HttpClient, Metrics, OpenAiServer, ProxyProcess,
};
use serde_json::{json, Value};

const MODEL: &str = "chat-model";
const OTHER_MODEL: &str = "embed-model";
/// How often the proxies in these tests send their summaries.
const INTERVAL_MS: &str = "300";

fn policies(upstream: &OpenAiServer) -> Vec<(&'static str, String)> {
    vec![
        (
            "backends.yaml",
            policy::backend("models", &[upstream.addr()], ""),
        ),
        (
            "routes.yaml",
            policy::route(
                "chat",
                &format!(
                    "match:\n  - model: {{exact: {MODEL}}}\n  - model: {{exact: {OTHER_MODEL}}}\nbackends:\n  - backend: models\n"
                ),
            ),
        ),
    ]
}

async fn wait_ready(proxy: &ProxyProcess) {
    let client = HttpClient::http1();
    until(
        "the proxy becomes ready",
        Duration::from_secs(20),
        || async {
            let reply = client.get(&format!("{}/ready", proxy.admin_url())).await;
            (reply.status == 200).then_some(()).ok_or(reply.text())
        },
    )
    .await;
}

async fn dashboard_json(admin_url: &str) -> Value {
    let reply = HttpClient::http1()
        .get(&format!("{admin_url}/dashboard.json"))
        .await;
    assert_eq!(reply.status, 200, "/dashboard.json: {}", reply.text());
    reply.json()
}

/// One request through `proxy`: `status` asks the upstream to answer with
/// it, `delay_ms` delays its first byte.
async fn request(
    client: &HttpClient,
    proxy: &ProxyProcess,
    model: &str,
    stream: bool,
    status: Option<u16>,
    delay_ms: u64,
) -> u16 {
    let mut headers = vec![("x-test-usage-tokens", "40".to_string())];
    if let Some(status) = status {
        headers.push(("x-test-status", status.to_string()));
    }
    headers.push(("x-test-delay-ms", delay_ms.to_string()));
    let body = if stream {
        json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": true,
               "stream_options": {"include_usage": true}})
        .to_string()
    } else {
        chat_body(model, false)
    };
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let reply = client
        .fetch(json_request(
            &format!("{}/v1/chat/completions", proxy.url()),
            &body,
            &headers,
        ))
        .await;
    reply.status.as_u16()
}

/// The row of `model` in a list of model rows.
fn row<'a>(rows: &'a Value, model: &str) -> Option<&'a Value> {
    rows.as_array()?.iter().find(|r| r["model"] == model)
}

/// Requests a proxy counted in `infermesh_requests_total`, and the 5xx ones.
async fn counted(proxy: &ProxyProcess) -> (f64, f64) {
    let metrics = Metrics::scrape(proxy).await;
    let all = metrics.sum("infermesh_requests_total", &[]);
    let failed: f64 = metrics
        .find("infermesh_requests_total", &[])
        .filter(|s| {
            s.labels
                .get("status")
                .is_some_and(|status| status.starts_with('5'))
        })
        .map(|s| s.value)
        .sum();
    (all, failed)
}

#[tokio::test]
async fn the_dashboard_shows_what_two_proxies_counted_and_chromium_draws_it() {
    let upstream = OpenAiServer::start("models");
    let files = policies(&upstream);
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let control = ControlPlaneProcess::start(&files);
    let follower = |id: &str| {
        ProxyProcess::builder()
            .no_config()
            .arg("--control-plane")
            .arg(&control.url())
            .arg("--proxy-id")
            .arg(id)
            .env("INFERMESH_SUMMARY_INTERVAL_MS", INTERVAL_MS)
            .start()
    };
    let first = follower("first");
    let second = follower("second");
    wait_ready(&first).await;
    wait_ready(&second).await;

    // Through `first`: 12 answers (6 streamed) of which 3 are 500s, 4
    // answers of the other model; through `second`: 8 answers delayed by
    // 300 ms before their first byte.
    let client = HttpClient::http1();
    for i in 0..12 {
        let status = (i % 4 == 3).then_some(500);
        request(&client, &first, MODEL, i % 2 == 0, status, 0).await;
    }
    for _ in 0..4 {
        assert_eq!(
            request(&client, &first, OTHER_MODEL, false, None, 0).await,
            200
        );
    }
    for _ in 0..8 {
        assert_eq!(
            request(&client, &second, MODEL, false, None, 300).await,
            200
        );
    }
    let (first_all, first_failed) = counted(&first).await;
    let (second_all, second_failed) = counted(&second).await;
    assert_eq!(
        (first_all, first_failed),
        (16.0, 3.0),
        "first's own metrics"
    );
    assert_eq!(
        (second_all, second_failed),
        (8.0, 0.0),
        "second's own metrics"
    );

    // The control plane's figures: the same counts, once the summaries came.
    let admin = control.admin_url();
    let data = until(
        "the summaries of both proxies reach the control plane",
        Duration::from_secs(10),
        || async {
            let data = dashboard_json(&admin).await;
            let mesh = &data["figures"]["mesh"];
            let requests = row(mesh, MODEL).map(|r| r["requests"].as_u64());
            (requests == Some(Some(20)) && row(mesh, OTHER_MODEL).is_some())
                .then_some(data.clone())
                .ok_or(data.to_string())
        },
    )
    .await;
    eprintln!("/dashboard.json: {data:#}");
    let figures = &data["figures"];
    let mesh = row(&figures["mesh"], MODEL).unwrap();
    assert_eq!(mesh["failures"], 3);
    let success = mesh["successRate"].as_f64().unwrap();
    assert!((success - 17.0 / 20.0).abs() < 1e-9, "{success}");
    // Rates are over the time the summaries cover: here, since the
    // proxies' first summaries, less than the recent span.
    let recent = mesh["seconds"].as_f64().unwrap();
    assert!(
        recent > 0.0 && recent <= figures["recentSeconds"].as_f64().unwrap(),
        "{recent}"
    );
    let rate = mesh["requestRate"].as_f64().unwrap();
    assert!((rate - 20.0 / recent).abs() < 1e-9, "{rate}");
    // Every answer reported 20 prompt and 20 completion tokens (streams in
    // their usage chunk); the 500s reported none.
    let tokens_in = mesh["inputTokensPerSecond"].as_f64().unwrap() * recent;
    let tokens_out = mesh["outputTokensPerSecond"].as_f64().unwrap() * recent;
    assert!((tokens_in - 17.0 * 20.0).abs() < 1e-6, "{tokens_in}");
    assert!((tokens_out - 17.0 * 20.0).abs() < 1e-6, "{tokens_out}");
    // Per proxy: first's figures and second's, apart.
    let by_first = row(&figures["proxies"]["first"], MODEL).unwrap();
    let by_second = row(&figures["proxies"]["second"], MODEL).unwrap();
    assert_eq!(
        (by_first["requests"].as_u64(), by_first["failures"].as_u64()),
        (Some(12), Some(3))
    );
    assert_eq!(by_second["requests"], 8);
    assert_eq!(by_second["successRate"], 1.0);
    assert_eq!(
        row(&figures["proxies"]["first"], OTHER_MODEL).unwrap()["requests"],
        4
    );
    // second's answers took at least 300 ms to their first byte, first's far less.
    let slow = by_second["ttftP50Ms"].as_f64().unwrap();
    let fast = by_first["ttftP50Ms"].as_f64().unwrap();
    assert!(slow >= 250.0, "second's TTFT p50 {slow} ms");
    assert!(
        fast < slow,
        "first's TTFT p50 {fast} ms, second's {slow} ms"
    );
    // Both proxies connected and up to date.
    let connected = data["connected"].as_array().unwrap();
    for id in ["first", "second"] {
        let entry = connected
            .iter()
            .find(|p| p["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {connected:?}"));
        assert_eq!(entry["upToDate"], true, "{entry}");
    }

    // The page, in Chromium.
    let browser = Browser::start().await;
    browser.open(&format!("{admin}/dashboard")).await;
    let shown = until(
        "the page draws the mesh figures",
        Duration::from_secs(15),
        || async {
            let shown = browser
                .script(
                    "return Array.from(document.querySelectorAll('tr[data-model]')).map(r => ({
                    scope: r.dataset.scope, model: r.dataset.model,
                    requests: r.querySelector('td.requests').textContent,
                    rate: r.querySelector('td.rate').textContent,
                    success: (r.querySelector('[data-success]') || {}).textContent || null,
                    sparkline: r.querySelectorAll('svg.spark polyline').length }));",
                )
                .await;
            (shown.as_array().is_some_and(|rows| rows.len() >= 5))
                .then_some(shown.clone())
                .ok_or(shown.to_string())
        },
    )
    .await;
    let find = |scope: &str, model: &str| {
        shown
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["scope"] == scope && r["model"] == model)
            .unwrap_or_else(|| panic!("no row {scope}/{model} in {shown:#}"))
            .clone()
    };
    let mesh_row = find("mesh", MODEL);
    assert_eq!(mesh_row["requests"], "20", "{mesh_row}");
    assert_eq!(mesh_row["success"], "85.0%", "{mesh_row}");
    assert_eq!(mesh_row["sparkline"], 1);
    // The page polls every 2 s: its rate is that of a poll at most a few
    // seconds later than the figures above (the same 20 requests over a
    // slightly longer span), shown with two decimals.
    let shown_rate: f64 = mesh_row["rate"].as_str().unwrap().parse().unwrap();
    let now = dashboard_json(&admin).await;
    let latest = row(&now["figures"]["mesh"], MODEL).unwrap()["requestRate"]
        .as_f64()
        .unwrap();
    assert!(
        shown_rate <= rate + 0.006 && shown_rate >= latest - 0.006,
        "{mesh_row}: between {latest} and {rate}"
    );
    assert_eq!(find("first", MODEL)["requests"], "12");
    assert_eq!(find("first", MODEL)["success"], "75.0%");
    assert_eq!(find("second", MODEL)["requests"], "8");
    assert_eq!(find("second", MODEL)["success"], "100.0%");
    let proxies = browser
        .script("return Array.from(document.querySelectorAll('tr[data-proxy]')).map(r => r.dataset.proxy);")
        .await;
    assert_eq!(proxies, json!(["first", "second"]));
    let screenshot = browser.screenshot("dashboard.png").await;
    eprintln!("screenshot of the dashboard: {}", screenshot.display());
}

#[tokio::test]
async fn summaries_travel_on_a_mutually_authenticated_policy_stream() {
    let upstream = OpenAiServer::start("models");
    let kserve = KServeGrpcServer::with_settings(
        "kserve",
        KServeSettings {
            infer_delay: Duration::from_millis(200),
            ..KServeSettings::default()
        },
    );
    let mut files = policies(&upstream);
    files.push((
        "grpc.yaml",
        policy::docs(&[
            policy::backend("kserve", &[kserve.addr()], "protocol: http2"),
            policy::route(
                "grpc",
                "match:\n  - model: {exact: grpc-model}\nbackends:\n  - backend: kserve\n",
            ),
        ]),
    ));
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let mesh = Mesh::start(&files, "24h", &[("apps", "web")]);
    let proxy = mesh
        .proxy("apps", "web")
        .env("INFERMESH_SUMMARY_INTERVAL_MS", INTERVAL_MS)
        .start();
    wait_ready(&proxy).await;
    let client = HttpClient::http1();
    for _ in 0..5 {
        assert_eq!(request(&client, &proxy, MODEL, true, None, 0).await, 200);
    }
    // gRPC: three calls answered OK after 200 ms, one for a model no route
    // takes (the proxy's UNIMPLEMENTED, a failure).
    let mut grpc = grpc_client(proxy.outbound).await;
    for i in 0..3 {
        grpc.model_infer(infer_request("grpc-model", &i.to_string()))
            .await
            .expect("a routed call succeeds");
    }
    let refused = grpc
        .model_infer(infer_request("unrouted-model", "x"))
        .await
        .expect_err("no route");
    assert_eq!(refused.code(), tonic::Code::Unimplemented);
    let admin = mesh.control.admin_url();
    let data = until(
        "the summary reaches the control plane",
        Duration::from_secs(10),
        || async {
            let data = dashboard_json(&admin).await;
            let requests =
                row(&data["figures"]["proxies"]["apps-web"], MODEL).map(|r| r["requests"].clone());
            let grpc = row(&data["figures"]["proxies"]["apps-web"], "unrouted-model")
                .map(|r| r["requests"].clone());
            (requests == Some(json!(5)) && grpc == Some(json!(1)))
                .then_some(data.clone())
                .ok_or(data.to_string())
        },
    )
    .await;
    let rows = &data["figures"]["proxies"]["apps-web"];
    let grpc = row(rows, "grpc-model").unwrap();
    assert_eq!(
        (grpc["requests"].as_u64(), grpc["failures"].as_u64()),
        (Some(3), Some(0)),
        "{grpc}"
    );
    let ttft = grpc["ttftP50Ms"].as_f64().unwrap();
    assert!(
        ttft >= 150.0,
        "the first gRPC message came after 200 ms, p50 {ttft}"
    );
    assert_eq!(row(rows, "unrouted-model").unwrap()["failures"], 1);
    let entry = &data["connected"][0];
    assert_eq!(
        entry["identity"], "spiffe://cluster.local/ns/apps/sa/web",
        "{entry}"
    );
}

/// Headless Chromium under `chromedriver`, spoken to over WebDriver HTTP.
struct Browser {
    driver: Child,
    url: String,
    session: String,
}

impl Browser {
    async fn start() -> Self {
        let port = infermesh_tests::free_addr().port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/setup.sh installs it)");
        let url = format!("http://127.0.0.1:{port}");
        // Held from here, so that a failure below still ends chromedriver.
        let mut browser = Self {
            driver,
            url: url.clone(),
            session: String::new(),
        };
        browser.session = {
            {
                let client = HttpClient::http1();
                until("chromedriver answers", Duration::from_secs(20), || async {
                    let status = client
                        .send(
                            http::Request::get(format!("{url}/status"))
                                .body(infermesh_tests::client::full(""))
                                .unwrap(),
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    status
                        .status()
                        .is_success()
                        .then_some(())
                        .ok_or("not yet".to_string())
                })
                .await;
                let binary = ["/usr/bin/chromium", "/usr/lib/chromium/chromium"]
                    .into_iter()
                    .find(|p| std::path::Path::new(p).exists())
                    .expect("Debian's chromium (scripts/setup.sh installs it)");
                let capabilities = json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": binary, "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1400,900"]}}}});
                let reply = client
                    .fetch(json_request(
                        &format!("{url}/session"),
                        &capabilities.to_string(),
                        &[],
                    ))
                    .await;
                assert_eq!(reply.status, 200, "new WebDriver session: {}", reply.text());
                reply.json()["value"]["sessionId"]
                    .as_str()
                    .expect("a session id")
                    .to_string()
            }
        };
        browser
    }

    async fn command(&self, path: &str, body: Value) -> Value {
        let reply = HttpClient::http1()
            .fetch(json_request(
                &format!("{}/session/{}/{path}", self.url, self.session),
                &body.to_string(),
                &[],
            ))
            .await;
        assert_eq!(reply.status, 200, "WebDriver {path}: {}", reply.text());
        reply.json()["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command("url", json!({ "url": url })).await;
    }

    async fn script(&self, script: &str) -> Value {
        self.command("execute/sync", json!({"script": script, "args": []}))
            .await
    }

    /// Saves a PNG of the page under `target/test-artifacts/`.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let reply = HttpClient::http1()
            .get(&format!("{}/session/{}/screenshot", self.url, self.session))
            .await;
        assert_eq!(reply.status, 200, "screenshot: {}", reply.text());
        let png = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            reply.json()["value"].as_str().expect("base64 PNG"),
        )
        .expect("a base64 PNG");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
        std::fs::create_dir_all(&dir).expect("target/test-artifacts");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write the screenshot");
        path.canonicalize().unwrap_or(path)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the session ends Chromium; then chromedriver goes.
        if !self.session.is_empty() {
            let _ = std::process::Command::new("curl")
                .args([
                    "-s",
                    "-X",
                    "DELETE",
                    &format!("{}/session/{}", self.url, self.session),
                ])
                .stdout(Stdio::null())
                .status();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The metric families a scrape declares (`# TYPE name kind`), with the
/// sample names each kind yields.
fn declared(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("#") || words.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "summary" => &["_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

#[tokio::test]
async fn the_grafana_dashboard_parses_and_queries_only_metrics_a_proxy_exposes() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/infermesh.json");
    let text = std::fs::read_to_string(&path).expect("deploy/grafana/infermesh.json");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    // Grafana 10's dashboard model: the fields it needs to import it.
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = std::collections::BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().expect("a panel id")),
            "duplicate id in {panel}"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24 && grid["h"].as_u64().unwrap() > 0, "{panel}");
        if panel["type"] == "row" {
            continue;
        }
        assert!(["timeseries", "stat"].contains(&panel["type"].as_str().unwrap()));
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            exprs.push(
                target["expr"]
                    .as_str()
                    .expect("a PromQL expression")
                    .to_string(),
            );
        }
    }
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for variable in ["datasource", "route", "backend"] {
        assert!(variables.contains(&variable), "{variables:?}");
    }

    // A real proxy, with traffic that moves every family the dashboard
    // reads: answers and 500s, a dead backend retried then fallen back
    // from, a slow answer hedged, a request refused before routing.
    let upstream = OpenAiServer::start("models");
    let twin = OpenAiServer::start("twin");
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let policy = policy::docs(&[
        policy::backend("models", &[upstream.addr()], ""),
        policy::backend("pair", &[upstream.addr(), twin.addr()], ""),
        policy::backend("dead", &[dead], "connectTimeout: 1s"),
        policy::route(
            "chat",
            &format!("match:\n  - model: {{exact: {MODEL}}}\nbackends:\n  - backend: models\n"),
        ),
        policy::route(
            "failover",
            "match:\n  - model: {exact: fail-model}\nbackends:\n  - backend: dead\nretries:\n  maxAttempts: 2\n  backoffBase: 5ms\nfallback:\n  - backend: models\n",
        ),
        policy::route(
            "hedged",
            "match:\n  - model: {exact: slow-model}\nbackends:\n  - backend: pair\nhedging:\n  delay: 50ms\n",
        ),
    ]);
    let proxy = ProxyProcess::start(&policy);
    wait_ready(&proxy).await;
    let client = HttpClient::http1();
    assert_eq!(request(&client, &proxy, MODEL, false, None, 0).await, 200);
    assert_eq!(
        request(&client, &proxy, MODEL, false, Some(500), 0).await,
        500
    );
    assert_eq!(
        request(&client, &proxy, "fail-model", false, None, 0).await,
        200
    );
    assert_eq!(
        request(&client, &proxy, "slow-model", false, None, 300).await,
        200
    );
    // A stream, for the time per output token.
    assert_eq!(request(&client, &proxy, MODEL, true, None, 0).await, 200);
    let refused = infermesh_tests::client::raw_exchange(
        proxy.outbound,
        b"NOT HTTP AT ALL\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(refused.status(), Some(400), "{}", refused.text());
    let metrics = Metrics::scrape(&proxy).await;
    let exposed = declared(&metrics.text);
    let mut queried = std::collections::BTreeSet::new();
    for expr in &exprs {
        for prefix in ["infermesh_", "gen_ai_client_", "gen_ai_server_"] {
            let mut rest = expr.as_str();
            while let Some(at) = rest.find(prefix) {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    assert!(
        queried.iter().filter(|n| n.starts_with("gen_ai_")).count() >= 4,
        "the model panels: {queried:?}"
    );
    for name in &queried {
        assert!(
            metrics.has(name) || exposed.contains(name),
            "the dashboard queries {name}, which the proxy does not expose"
        );
    }
    // The labels the traffic panels group by are on the samples.
    let sample = metrics
        .find("infermesh_requests_total", &[("status", "500")])
        .next()
        .expect("the 500 counted");
    for label in ["route", "backend", "status", "listener"] {
        assert!(sample.labels.contains_key(label), "{sample:?}");
    }
    assert!(metrics
        .find(
            "infermesh_request_duration_seconds_bucket",
            &[("route", "chat")]
        )
        .next()
        .is_some());
}
