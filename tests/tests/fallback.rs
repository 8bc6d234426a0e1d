//! Fallback chains: when the route's backend cannot start a response, the
//! chain's backends are tried in order, each with its model alias.

use infermesh_tests::client::chat_body;
use infermesh_tests::{
    policy, refused_addr, HttpClient, Metrics, OpenAiServer, ProxyProcess, ScriptedServer, Step,
};

const CHAT: &str = "/v1/chat/completions";

fn proxy(primary: &str, second: &str, third: &str) -> ProxyProcess {
    ProxyProcess::start(&policy::docs(&[
        policy::backend("primary", &[primary], "connectTimeout: 1s"),
        policy::backend("second", &[second], "connectTimeout: 1s"),
        policy::backend("third", &[third], "connectTimeout: 1s"),
        policy::route(
            "chat",
            "match:\n  - model: {exact: big}\nbackends:\n  - backend: primary\nfallback:\n  - backend: second\n  - {backend: third, model: small}",
        ),
    ]))
}

async fn fallbacks(proxy: &ProxyProcess, backend: &str) -> f64 {
    let reply = HttpClient::http1()
        .get(&format!("{}/metrics", proxy.admin_url()))
        .await;
    Metrics::parse(&reply.text()).sum(
        "infermesh_fallbacks_total",
        &[("route", "chat"), ("backend", backend)],
    )
}

#[tokio::test]
async fn the_chain_is_tried_in_order_with_the_model_renamed() {
    let second = ScriptedServer::start("second", vec![Step::Status(503, None)]);
    let third = OpenAiServer::start("third");
    let proxy = proxy(
        &refused_addr().to_string(),
        &second.addr().to_string(),
        &third.addr().to_string(),
    );
    let reply = HttpClient::http1()
        .post_json(&format!("{}{CHAT}", proxy.url()), &chat_body("big", false))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.upstream(), Some("third"));
    // The unavailable second link was tried first, with the client's model.
    assert_eq!(second.request_count(), 1);
    let sent: serde_json::Value = serde_json::from_slice(&second.bodies()[0]).unwrap();
    assert_eq!(sent["model"], "big");
    let requests = third.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].model().as_deref(), Some("small"));
    assert_eq!(fallbacks(&proxy, "second").await, 1.0);
    assert_eq!(fallbacks(&proxy, "third").await, 1.0);
}

#[tokio::test]
async fn a_primary_that_answers_keeps_the_chain_idle() {
    let primary = ScriptedServer::start("primary", vec![Step::Status(200, None)]);
    let second = ScriptedServer::start("second", vec![Step::Status(200, None)]);
    let third = ScriptedServer::start("third", vec![Step::Status(200, None)]);
    let proxy = proxy(
        &primary.addr().to_string(),
        &second.addr().to_string(),
        &third.addr().to_string(),
    );
    // A client error is the primary's answer too: not a reason to fall back.
    for _ in 0..3 {
        let reply = HttpClient::http1()
            .post_json(&format!("{}{CHAT}", proxy.url()), &chat_body("big", false))
            .await;
        assert_eq!(reply.upstream(), Some("primary"));
    }
    assert_eq!(second.request_count() + third.request_count(), 0);
}

#[tokio::test]
async fn when_every_link_fails_the_client_gets_the_last_failure() {
    let second = ScriptedServer::start("second", vec![Step::Status(503, None)]);
    let proxy = proxy(
        &refused_addr().to_string(),
        &second.addr().to_string(),
        &refused_addr().to_string(),
    );
    let reply = HttpClient::http1()
        .post_json(&format!("{}{CHAT}", proxy.url()), &chat_body("big", false))
        .await;
    reply.assert_proxy_error(503, "upstream_connect_error");
    assert_eq!(second.request_count(), 1);
}
