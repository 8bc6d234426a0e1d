//! Retries against upstreams that fail on cue: what is retried, what is not
//! (a response that has started, a status in gRPC trailers, a body too long
//! to replay), where a retry goes, and how the budget bounds an outage.

use std::time::{Duration, Instant};

use infermesh_tests::client::{chat_body, drive, json_request};
use infermesh_tests::kserve::{grpc_client, infer_request};
use infermesh_tests::{
    policy, refused_addr, Arrivals, HttpClient, KServeGrpcServer, KServeSettings, Metrics,
    ProxyProcess, ScriptedServer, Step,
};

const CHAT: &str = "/v1/chat/completions";

/// A proxy whose route sends model `model` to `endpoints` (in round-robin
/// order) with this `retries:` block (unindented YAML).
fn retrying_proxy(endpoints: &[String], h2: bool, retries: &str) -> ProxyProcess {
    let protocol = if h2 { "http2" } else { "http1" };
    let retries: String = retries.lines().map(|l| format!("  {l}\n")).collect();
    ProxyProcess::start(&policy::docs(&[
        policy::backend(
            "target",
            endpoints,
            &format!("protocol: {protocol}\nbalancer: round-robin\nconnectTimeout: 1s"),
        ),
        policy::route(
            "target",
            &format!("match:\n  - model: {{exact: model}}\nbackends:\n  - backend: target\nretries:\n{retries}"),
        ),
    ]))
}

fn url(proxy: &ProxyProcess) -> String {
    format!("{}{CHAT}", proxy.url())
}

#[tokio::test]
async fn a_listed_status_is_retried_on_the_other_endpoint_with_the_same_body() {
    let failing = ScriptedServer::start("a", vec![Step::Status(503, None)]);
    let healthy = ScriptedServer::start("b", vec![Step::Status(200, None)]);
    let proxy = retrying_proxy(
        &[failing.addr().to_string(), healthy.addr().to_string()],
        false,
        "maxAttempts: 2\nbackoffBase: 5ms",
    );
    let body = chat_body("model", false);
    for _ in 0..6 {
        let reply = HttpClient::http1().post_json(&url(&proxy), &body).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.upstream(), Some("b"));
    }
    assert!(failing.request_count() >= 1);
    // Every attempt at the healthy endpoint carried the client's body.
    assert!(healthy.bodies().iter().all(|b| b == body.as_bytes()));
    let metrics = Metrics::scrape(&proxy).await;
    assert_eq!(
        metrics.sum(
            "infermesh_retries_total",
            &[("route", "target"), ("outcome", "retried")]
        ),
        failing.request_count() as f64
    );
}

#[tokio::test]
async fn an_unlisted_status_is_not_retried() {
    let upstream =
        ScriptedServer::start("a", vec![Step::Status(500, None), Step::Status(200, None)]);
    let proxy = retrying_proxy(&[upstream.addr().to_string()], false, "maxAttempts: 3");
    let reply = HttpClient::http1()
        .post_json(&url(&proxy), &chat_body("model", false))
        .await;
    assert_eq!(reply.status, 500);
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn a_connect_failure_is_retried_on_another_endpoint() {
    let healthy = ScriptedServer::start("b", vec![Step::Status(200, None)]);
    let proxy = retrying_proxy(
        &[refused_addr().to_string(), healthy.addr().to_string()],
        false,
        "maxAttempts: 2\nbackoffBase: 5ms",
    );
    for _ in 0..4 {
        let reply = HttpClient::http1()
            .post_json(&url(&proxy), &chat_body("model", false))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(healthy.request_count(), 4);
}

#[tokio::test]
async fn a_stream_that_fails_after_its_first_event_is_not_retried() {
    // A retry would succeed, so a retry would show as a second request and
    // as events from a second answer.
    let upstream = ScriptedServer::start("a", vec![Step::SseThenReset(2), Step::Status(200, None)]);
    let proxy = retrying_proxy(
        &[upstream.addr().to_string()],
        false,
        "maxAttempts: 3\nbackoffBase: 5ms\non: {statuses: [500, 502, 503, 504]}",
    );
    let request = json_request(&url(&proxy), &chat_body("model", true), &[]);
    let response = HttpClient::http1()
        .send(request)
        .await
        .expect("response head");
    assert_eq!(response.status(), 200);
    let arrivals = Arrivals::read(response.into_body()).await;
    let events: Vec<String> = arrivals.sse_events().into_iter().map(|e| e.data).collect();
    assert_eq!(
        events,
        [
            r#"{"upstream":"a","event":0}"#,
            r#"{"upstream":"a","event":1}"#
        ],
        "each event exactly once"
    );
    assert!(
        arrivals.end.is_err(),
        "the cut stream must not look complete"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn retry_after_is_waited_for_and_a_long_one_reaches_the_client() {
    let upstream = ScriptedServer::start(
        "a",
        vec![
            Step::Status(429, Some(1)),
            Step::Status(200, None),
            Step::Status(429, Some(60)),
        ],
    );
    let proxy = retrying_proxy(&[upstream.addr().to_string()], false, "maxAttempts: 2");
    let started = Instant::now();
    let reply = HttpClient::http1()
        .post_json(&url(&proxy), &chat_body("model", false))
        .await;
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() >= Duration::from_secs(1));
    let reply = HttpClient::http1()
        .post_json(&url(&proxy), &chat_body("model", false))
        .await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("retry-after"), Some("60"));
    assert_eq!(upstream.request_count(), 3);
}

#[tokio::test]
async fn a_body_longer_than_the_replay_buffer_is_sent_once() {
    let upstream =
        ScriptedServer::start("a", vec![Step::Status(503, None), Step::Status(200, None)]);
    let proxy = retrying_proxy(
        &[upstream.addr().to_string()],
        false,
        "maxAttempts: 3\nmaxReplayBytes: 1024",
    );
    let long = format!(
        r#"{{"model":"model","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(4096)
    );
    let reply = HttpClient::http1().post_json(&url(&proxy), &long).await;
    assert_eq!(reply.status, 503);
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn under_a_total_outage_the_budget_keeps_attempts_near_the_requests() {
    let upstream = ScriptedServer::start("down", vec![Step::Status(503, None)]);
    let proxy = retrying_proxy(
        &[upstream.addr().to_string()],
        false,
        "maxAttempts: 5\nbackoffBase: 1ms\nbackoffMax: 5ms\nbudget: {ratio: 0.2, minPerSecond: 10}",
    );
    let requests = 300;
    let url = url(&proxy);
    let started = Instant::now();
    let replies = drive(requests, 30, |_| {
        let url = url.clone();
        async move {
            HttpClient::http1()
                .post_json(&url, &chat_body("model", false))
                .await
        }
    })
    .await;
    let seconds = started.elapsed().as_secs_f64().ceil() + 1.0;
    assert!(replies.iter().all(|r| r.status == 503));
    let attempts = upstream.request_count() as f64;
    let bound = 1.2 * requests as f64 + 10.0 * seconds;
    assert!(
        attempts <= bound,
        "{attempts} attempts for {requests} requests in {seconds}s (bound {bound}); 5 attempts each would be {}",
        requests * 5
    );
    let metrics = Metrics::scrape(&proxy).await;
    assert!(
        metrics.sum(
            "infermesh_retries_total",
            &[("route", "target"), ("outcome", "budget_exhausted")]
        ) > 0.0
    );
}

#[tokio::test]
async fn grpc_unavailable_in_headers_is_retried_and_a_status_in_trailers_is_not() {
    let unavailable = ScriptedServer::start("a", vec![Step::GrpcStatus(14)]);
    let kserve = KServeGrpcServer::with_settings(
        "b",
        KServeSettings {
            stream_responses: 2,
            stream_end: Some((tonic::Code::Unavailable, "ends badly".into())),
            ..KServeSettings::default()
        },
    );
    let proxy = retrying_proxy(
        &[unavailable.addr().to_string(), kserve.addr().to_string()],
        true,
        "maxAttempts: 2\nbackoffBase: 5ms\non: {grpcCodes: [UNAVAILABLE, RESOURCE_EXHAUSTED]}",
    );
    let mut client = grpc_client(proxy.outbound).await;
    for i in 0..4 {
        let reply = client
            .model_infer(infer_request("model", &i.to_string()))
            .await
            .expect("a retry reaches the healthy endpoint");
        assert_eq!(reply.into_inner().id, i.to_string());
    }
    assert!(unavailable.request_count() >= 1);

    // A stream whose status comes in trailers, after messages, has started:
    // the client gets the messages and the status, once.
    let before = kserve.calls().len();
    // The first attempt may meet the scripted endpoint, which is retried.
    let mut stream = client
        .model_stream_infer(tokio_stream::iter(vec![infer_request("model", "s")]))
        .await
        .expect("the stream starts")
        .into_inner();
    let mut messages = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => messages += 1,
            Ok(None) => panic!("the stream should end with UNAVAILABLE"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(messages, 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let streams = kserve
        .calls()
        .iter()
        .skip(before)
        .filter(|c| c.method == "ModelStreamInfer")
        .count();
    assert_eq!(streams, 1, "a started stream is never retried");
}
