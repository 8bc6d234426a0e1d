//! The fixture Kubernetes API server (`src/kube_api.rs`) against the client
//! the control plane uses: kube-rs's `Api`, `watcher` and `reflector` read a
//! kubeconfig the fixture wrote and talk HTTPS to it. A failure here is a
//! fixture bug, not a control-plane bug.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use infermesh_tests::KubeApi;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

async fn client(api: &KubeApi) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(api.kubeconfig()).expect("the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("a client configuration from the kubeconfig");
    kube::Client::try_from(config).expect("a client")
}

fn service(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "ns", "labels": labels},
        "spec": {"ports": [{"port": 8000}], "selector": {"app": name}},
    })
}

fn pod(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "model:1"}], "serviceAccountName": "web"},
    })
}

fn slice(name: &str, address: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": "model"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
        "ports": [{"port": 8000, "protocol": "TCP"}],
    })
}

/// The watcher's events as short strings ("Init", "InitApply a", "Apply a@7",
/// "Delete b@8", "InitDone", "Error: …"), in order.
fn events<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) -> mpsc::UnboundedReceiver<String>
where
    K: Resource + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let at = |k: &K| {
                format!(
                    "{}@{}",
                    k.meta().name.clone().unwrap_or_default(),
                    k.meta().resource_version.clone().unwrap_or_default()
                )
            };
            let line = match event {
                Ok(watcher::Event::Init) => "Init".to_string(),
                Ok(watcher::Event::InitApply(k)) => {
                    format!("InitApply {}", k.meta().name.clone().unwrap_or_default())
                }
                Ok(watcher::Event::InitDone) => "InitDone".to_string(),
                Ok(watcher::Event::Apply(k)) => format!("Apply {}", at(&k)),
                Ok(watcher::Event::Delete(k)) => format!("Delete {}", at(&k)),
                Err(e) => format!("Error: {e}"),
            };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next `n` events that are not errors.
async fn next_events(rx: &mut mpsc::UnboundedReceiver<String>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let event = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no watcher event within {WAIT:?}; so far {out:?}"))
            .expect("the watcher runs");
        if !event.starts_with("Error") {
            out.push(event);
        }
    }
    out
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lists(requests: &[String], path: &str) -> usize {
    requests
        .iter()
        .filter(|r| r.starts_with(&format!("GET {path}?")) && !r.contains("watch="))
        .count()
}

fn watches(requests: &[String], path: &str) -> Vec<String> {
    requests
        .iter()
        .filter(|r| r.starts_with(&format!("GET {path}?")) && r.contains("watch=true"))
        .cloned()
        .collect()
}

#[tokio::test]
async fn list_then_watch_sees_applies_modifies_and_deletes_in_order() {
    let api = KubeApi::start();
    api.apply(service("a", json!({})));
    api.apply(service("b", json!({})));
    let services: Api<Service> = Api::namespaced(client(&api).await, "ns");
    let mut rx = events(watcher(services, watcher::Config::default()));
    assert_eq!(
        next_events(&mut rx, 4).await,
        ["Init", "InitApply a", "InitApply b", "InitDone"]
    );
    assert!(
        api.wait_for_watches(1, WAIT).await,
        "the watcher opened a watch"
    );

    let a = api.apply(service("a", json!({"tier": "front"})));
    assert!(api.delete("v1", "Service", Some("ns"), "b"));
    api.apply(service("c", json!({})));
    assert!(
        !api.delete("v1", "Service", Some("ns"), "b"),
        "b is already gone"
    );
    assert_eq!(a["metadata"]["resourceVersion"], "3");
    assert_eq!(
        next_events(&mut rx, 3).await,
        ["Apply a@3", "Delete b@4", "Apply c@5"]
    );

    let requests = api.requests();
    assert_eq!(
        lists(&requests, "/api/v1/namespaces/ns/services"),
        1,
        "{requests:#?}"
    );
    let watches = watches(&requests, "/api/v1/namespaces/ns/services");
    assert_eq!(watches.len(), 1, "{requests:#?}");
    assert!(
        watches[0].contains("resourceVersion=2"),
        "watch from the list's version: {watches:?}"
    );
    assert!(
        watches[0].contains("allowWatchBookmarks=true"),
        "{watches:?}"
    );
}

#[tokio::test]
async fn a_streaming_list_watcher_gets_the_objects_then_the_changes() {
    let api = KubeApi::start();
    api.apply(service("a", json!({})));
    api.apply(service("b", json!({})));
    let services: Api<Service> = Api::namespaced(client(&api).await, "ns");
    let config = watcher::Config::default().streaming_lists();
    let mut rx = events(watcher(services, config));
    assert_eq!(
        next_events(&mut rx, 4).await,
        ["Init", "InitApply a", "InitApply b", "InitDone"]
    );
    api.apply(service("c", json!({})));
    assert_eq!(next_events(&mut rx, 1).await, ["Apply c@3"]);
    let requests = api.requests();
    let path = "/api/v1/namespaces/ns/services";
    assert_eq!(lists(&requests, path), 0, "no list: {requests:#?}");
    assert!(watches(&requests, path)[0].contains("sendInitialEvents=true"));
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_the_last_resource_version_without_a_relist() {
    let api = KubeApi::start();
    api.apply(slice("model-x", "10.0.0.1"));
    let slices: Api<EndpointSlice> = Api::namespaced(client(&api).await, "ns");
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(slices, watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(WAIT, reader.wait_until_ready())
        .await
        .expect("the reflector is ready")
        .expect("the writer lives");
    assert!(api.wait_for_watches(1, WAIT).await);

    let rv = api.resource_version();
    api.drop_watches();
    api.apply(slice("model-y", "10.0.0.2"));
    eventually("model-y in the reflector", || {
        reader.state().iter().any(|s| s.name_any() == "model-y")
    })
    .await;

    let path = "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices";
    let requests = api.requests();
    assert_eq!(lists(&requests, path), 1, "no re-list: {requests:#?}");
    let watches = watches(&requests, path);
    assert_eq!(watches.len(), 2, "{requests:#?}");
    assert!(
        watches[1].contains(&format!("resourceVersion={rv}")),
        "the second watch starts at {rv}: {watches:?}"
    );
    let mut addresses: Vec<String> = reader
        .state()
        .iter()
        .flat_map(|s| s.endpoints.iter().flat_map(|e| e.addresses.clone()))
        .collect();
    addresses.sort();
    assert_eq!(addresses, ["10.0.0.1", "10.0.0.2"]);
}

#[tokio::test]
async fn after_compaction_a_dropped_watcher_relists_and_sees_the_gap() {
    let api = KubeApi::start();
    for name in ["p1", "p2", "p3"] {
        api.apply(pod(name, json!({"app": "web"})));
    }
    let pods: Api<Pod> = Api::namespaced(client(&api).await, "ns");
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(pods, watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(WAIT, reader.wait_until_ready())
        .await
        .expect("the reflector is ready")
        .expect("the writer lives");
    assert!(api.wait_for_watches(1, WAIT).await);
    let seen = api.resource_version();

    // The gap: the watcher is cut off while objects change and the history goes.
    api.refuse_watches(true);
    api.drop_watches();
    assert!(api.delete("v1", "Pod", Some("ns"), "p2"));
    api.apply(pod("p1", json!({"app": "web", "version": "2"})));
    api.apply(pod("p4", json!({"app": "web"})));
    api.compact();
    api.refuse_watches(false);

    let state = |reader: &reflector::Store<Pod>| {
        reader
            .state()
            .iter()
            .map(|p| (p.name_any(), p.labels().get("version").cloned()))
            .collect::<BTreeSet<_>>()
    };
    let want = BTreeSet::from([
        ("p1".to_string(), Some("2".to_string())),
        ("p3".to_string(), None),
        ("p4".to_string(), None),
    ]);
    eventually("p2 gone, p1 changed, p4 added", || state(&reader) == want).await;

    let path = "/api/v1/namespaces/ns/pods";
    let requests = api.requests();
    assert_eq!(lists(&requests, path), 2, "a re-list: {requests:#?}");
    assert!(
        watches(&requests, path)
            .iter()
            .any(|w| w.contains(&format!("resourceVersion={seen}"))),
        "a watch from {seen} (answered 410): {requests:#?}"
    );
}

#[tokio::test]
async fn errors_are_status_objects() {
    let api = KubeApi::start();
    api.apply(service("a", json!({})));
    api.apply(service("b", json!({})));
    let services: Api<Service> = Api::namespaced(client(&api).await, "ns");

    match services.get("missing").await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
            assert_eq!(status.message, "services \"missing\" not found");
        }
        other => panic!("expected 404, got {other:?}"),
    }

    // A kind nobody installed is 404 until its "CRD" is.
    let widgets = ApiResource::from_gvk(&GroupVersionKind::gvk("example.com", "v1", "Widget"));
    let widgets: Api<DynamicObject> = Api::all_with(services.clone().into_client(), &widgets);
    match widgets.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404),
        other => panic!("expected 404, got {other:?}"),
    }
    api.register_kind("example.com/v1", "Widget");
    let list = widgets
        .list(&ListParams::default())
        .await
        .expect("an empty list");
    assert!(list.items.is_empty());

    api.compact();
    let mut stream = services
        .watch(&WatchParams::default(), "1")
        .await
        .expect("a watch")
        .boxed();
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Ok(WatchEvent::Error(status)))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(
                status.message.contains("too old resource version: 1"),
                "{}",
                status.message
            );
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        matches!(tokio::time::timeout(WAIT, stream.next()).await, Ok(None)),
        "the stream ends after the 410"
    );
    // The current version is still watchable.
    let rv = api.resource_version().to_string();
    let mut stream = services
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("a watch")
        .boxed();
    api.apply(service("c", json!({})));
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Ok(WatchEvent::Added(s)))) => assert_eq!(s.name_any(), "c"),
        other => panic!("expected ADDED c, got {other:?}"),
    }
}

#[tokio::test]
async fn bookmarks_carry_the_latest_version_and_timeouts_end_watches() {
    let api = KubeApi::start();
    api.apply(service("a", json!({})));
    let client = client(&api).await;
    let services: Api<Service> = Api::namespaced(client.clone(), "ns");
    let list = services.list(&ListParams::default()).await.expect("a list");
    let rv = list.metadata.resource_version.expect("a list version");
    assert_eq!(rv, "1");

    let params = WatchParams::default().timeout(4);
    let mut stream = services.watch(&params, &rv).await.expect("a watch").boxed();
    // A write to another kind moves the one counter; the bookmark says so.
    api.apply(pod("p", json!({})));
    let started = std::time::Instant::now();
    let mut bookmarks = Vec::new();
    while let Some(event) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("events or the end")
    {
        match event.expect("a watch event") {
            WatchEvent::Bookmark(b) => bookmarks.push(b.metadata.resource_version),
            other => panic!("only bookmarks expected, got {other:?}"),
        }
    }
    let lasted = started.elapsed();
    assert!(
        bookmarks.len() >= 2,
        "a bookmark about every second: {bookmarks:?}"
    );
    assert!(bookmarks.iter().all(|b| b == "2"), "{bookmarks:?}");
    assert!(
        lasted >= Duration::from_millis(3500) && lasted < Duration::from_secs(12),
        "timeoutSeconds=4 ended the watch after {lasted:?}"
    );

    // Without allowWatchBookmarks there are none.
    let params = WatchParams {
        bookmarks: false,
        ..WatchParams::default().timeout(2)
    };
    let mut stream = services.watch(&params, "2").await.expect("a watch").boxed();
    let next = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the end");
    assert!(next.is_none(), "nothing but the end: {next:?}");
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists_and_watches() {
    let api = KubeApi::start();
    api.apply(service("a", json!({"app": "web"})));
    api.apply(service("b", json!({"app": "db"})));
    api.apply(service("c", json!({})));
    let services: Api<Service> = Api::namespaced(client(&api).await, "ns");
    let names = |list: kube::core::ObjectList<Service>| {
        list.items.iter().map(|s| s.name_any()).collect::<Vec<_>>()
    };
    for (selector, want) in [
        ("app=web", vec!["a"]),
        ("app!=web", vec!["b", "c"]),
        ("app", vec!["a", "b"]),
        ("!app", vec!["c"]),
        ("app in (db,web)", vec!["a", "b"]),
        ("app=web,app=db", vec![]),
    ] {
        let list = services
            .list(&ListParams::default().labels(selector))
            .await
            .expect("a list");
        assert_eq!(names(list), want, "labelSelector {selector}");
    }
    let list = services
        .list(&ListParams::default().fields("metadata.name=c"))
        .await
        .expect("a list");
    assert_eq!(names(list), ["c"]);
    let everywhere: Api<Service> = Api::all(services.clone().into_client());
    let list = everywhere
        .list(&ListParams::default().fields("metadata.namespace=other"))
        .await
        .expect("a list");
    assert!(list.items.is_empty());
    match services.list(&ListParams::default().labels("a b")).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 400),
        other => panic!("expected 400, got {other:?}"),
    }

    let config = watcher::Config::default().labels("app=web");
    let mut rx = events(watcher(services, config));
    assert_eq!(
        next_events(&mut rx, 3).await,
        ["Init", "InitApply a", "InitDone"]
    );
    assert!(api.wait_for_watches(1, WAIT).await);
    api.apply(service("c", json!({"other": "x"}))); // not selected: no event
    api.apply(service("b", json!({"app": "web"}))); // now selected: ADDED
    api.apply(service("a", json!({"app": "db"}))); // no longer selected: DELETED
    assert_eq!(next_events(&mut rx, 2).await, ["Apply b@5", "Delete a@6"]);
}

#[tokio::test]
async fn lists_are_paginated_with_continue_tokens() {
    let api = KubeApi::start();
    for name in ["p1", "p2", "p3", "p4", "p5"] {
        api.apply(pod(name, json!({})));
    }
    api.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "elsewhere", "namespace": "other"}}));
    let client = client(&api).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
    let mut params = ListParams::default().limit(2);
    let mut pages = Vec::new();
    loop {
        let page = pods.list(&params).await.expect("a page");
        assert_eq!(page.metadata.resource_version.as_deref(), Some("6"));
        pages.push((
            page.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
            page.metadata.remaining_item_count,
        ));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    assert_eq!(
        pages,
        [
            (vec!["p1".to_string(), "p2".to_string()], Some(3)),
            (vec!["p3".to_string(), "p4".to_string()], Some(1)),
            (vec!["p5".to_string()], None),
        ]
    );
    let all: Api<Pod> = Api::all(client);
    let list = all.list(&ListParams::default()).await.expect("a list");
    assert_eq!(list.items.len(), 6);

    // A watcher pages its initial list the same way.
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(pods, watcher::Config::default().page_size(2)),
    );
    tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(WAIT, reader.wait_until_ready())
        .await
        .expect("ready")
        .expect("writer");
    assert_eq!(reader.state().len(), 5);
    let requests = api.requests();
    let pages = requests
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/namespaces/ns/pods?") && r.contains("limit=2"))
        .count();
    assert_eq!(
        pages,
        3 + 3,
        "three pages by hand, three by the watcher: {requests:#?}"
    );
}

#[tokio::test]
async fn status_writes_on_a_dynamic_backend_change_only_status() {
    let api = KubeApi::start();
    let backend = json!({
        "apiVersion": "infermesh.io/v1alpha1", "kind": "Backend",
        "metadata": {"name": "chat", "namespace": "ns"},
        "spec": {"protocol": "openai", "endpoints": ["10.0.0.1:8000"]},
    });
    api.apply(backend.clone());
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("infermesh.io", "v1alpha1", "Backend"),
        "backends",
    );
    let backends: Api<DynamicObject> = Api::namespaced_with(client(&api).await, "ns", &resource);

    let status = json!({"status": {"conditions": [{"type": "Accepted", "status": "True", "reason": "Valid"}]}});
    let written = backends
        .patch_status("chat", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("a merge patch of status");
    assert_eq!(written.data["status"], status["status"]);
    let stored = api
        .get("infermesh.io/v1alpha1", "Backend", Some("ns"), "chat")
        .expect("stored");
    assert_eq!(stored["status"], status["status"]);
    assert_eq!(stored["spec"], backend["spec"]);
    assert_eq!(
        stored["metadata"]["generation"], 1,
        "a status write keeps the generation"
    );

    // Server-side apply of status, as a controller with a field manager sends it.
    let applied = json!({
        "apiVersion": "infermesh.io/v1alpha1", "kind": "Backend",
        "metadata": {"name": "chat"},
        "status": {"observedGeneration": 1},
        "spec": {"protocol": "ignored on /status"},
    });
    backends
        .patch_status(
            "chat",
            &PatchParams::apply("infermesh-control").force(),
            &Patch::Apply(&applied),
        )
        .await
        .expect("an apply patch of status");
    let got = backends.get("chat").await.expect("get");
    assert_eq!(got.data["status"]["observedGeneration"], 1);
    assert_eq!(got.data["status"]["conditions"][0]["type"], "Accepted");
    assert_eq!(got.data["spec"], backend["spec"]);

    // PUT .../status with a stale resourceVersion conflicts.
    let mut stale = written.clone();
    stale.data["status"] = json!({"conditions": []});
    match backends
        .replace_status("chat", &PostParams::default(), &stale)
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"))
        }
        other => panic!("expected 409, got {other:?}"),
    }

    // The test's own write of the spec bumps the generation and keeps the status.
    let mut changed = backend.clone();
    changed["spec"]["endpoints"] = json!(["10.0.0.2:8000"]);
    let stored = api.apply(changed);
    assert_eq!(stored["metadata"]["generation"], 2);
    assert_eq!(stored["status"]["observedGeneration"], 1);
}

#[tokio::test]
async fn creates_replaces_patches_and_deletes_through_the_api() {
    let api = KubeApi::start();
    let services: Api<Service> = Api::namespaced(client(&api).await, "ns");
    let mut rx = events(watcher(services.clone(), watcher::Config::default()));
    assert_eq!(next_events(&mut rx, 2).await, ["Init", "InitDone"]);
    assert!(api.wait_for_watches(1, WAIT).await);

    let new: Service = serde_json::from_value(service("a", json!({}))).expect("a Service");
    let created = services
        .create(&PostParams::default(), &new)
        .await
        .expect("create");
    assert_eq!(created.metadata.resource_version.as_deref(), Some("1"));
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    match services.create(&PostParams::default(), &new).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                (status.code, status.reason.as_str()),
                (409, "AlreadyExists")
            )
        }
        other => panic!("expected 409, got {other:?}"),
    }

    let mut changed = created.clone();
    changed
        .spec
        .as_mut()
        .expect("a spec")
        .ports
        .as_mut()
        .expect("ports")[0]
        .port = 9000;
    let replaced = services
        .replace("a", &PostParams::default(), &changed)
        .await
        .expect("replace");
    assert_eq!(replaced.metadata.generation, Some(2));
    match services
        .replace("a", &PostParams::default(), &changed)
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 409, "stale resourceVersion"),
        other => panic!("expected 409, got {other:?}"),
    }

    let labels = json!({"metadata": {"labels": {"tier": "front"}}});
    services
        .patch("a", &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .expect("merge patch");
    let note = json!({"metadata": {"annotations": {"note": "x"}}});
    services
        .patch("a", &PatchParams::default(), &Patch::Strategic(&note))
        .await
        .expect("strategic merge patch");
    // Server-side apply creates what is missing.
    services
        .patch(
            "b",
            &PatchParams::apply("test"),
            &Patch::Apply(service("b", json!({}))),
        )
        .await
        .expect("apply creates");
    let a = services.get("a").await.expect("get a");
    assert_eq!(a.labels().get("tier").map(String::as_str), Some("front"));
    assert_eq!(a.annotations().get("note").map(String::as_str), Some("x"));

    services
        .delete("a", &Default::default())
        .await
        .expect("delete");
    assert!(api.get("v1", "Service", Some("ns"), "a").is_none());
    assert_eq!(
        next_events(&mut rx, 6).await,
        [
            "Apply a@1",
            "Apply a@2",
            "Apply a@3",
            "Apply a@4",
            "Apply b@5",
            "Delete a@6"
        ]
    );
}

#[tokio::test]
async fn token_reviews_authenticate_registered_tokens_for_their_audience() {
    let api = KubeApi::start();
    api.add_token("token-web", "apps", "web", &["infermesh"]);
    let reviews: Api<TokenReview> = Api::all(client(&api).await);
    let review = |token: &str, audiences: &[&str]| TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
        },
        ..Default::default()
    };

    let ok = reviews
        .create(&PostParams::default(), &review("token-web", &["infermesh"]))
        .await
        .expect("a TokenReview");
    let status = ok.status.expect("a status");
    assert_eq!(status.authenticated, Some(true));
    let user = status.user.expect("a user");
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:apps:web")
    );
    assert_eq!(
        user.groups.unwrap_or_default(),
        [
            "system:serviceaccounts",
            "system:serviceaccounts:apps",
            "system:authenticated"
        ]
    );
    assert!(user.uid.is_some_and(|u| !u.is_empty()));
    assert_eq!(status.audiences.unwrap_or_default(), ["infermesh"]);

    for (token, audiences, reason) in [
        (
            "token-web",
            &["vault"][..],
            "invalid for the target audiences",
        ),
        ("token-web", &[][..], "invalid for the target audiences"),
        ("unknown", &["infermesh"][..], "invalid bearer token"),
    ] {
        let refused = reviews
            .create(&PostParams::default(), &review(token, audiences))
            .await
            .expect("a TokenReview");
        let status = refused.status.expect("a status");
        assert_ne!(
            status.authenticated,
            Some(true),
            "{token} for {audiences:?}"
        );
        let error = status.error.unwrap_or_default();
        assert!(error.contains(reason), "{token} for {audiences:?}: {error}");
    }
}

fn curl(api: &KubeApi, args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "--max-time", "15", "--cacert"])
        .arg(api.ca_file())
        .args(args)
        .output()
        .expect("run curl");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn requests_without_the_bearer_token_get_401() {
    let api = KubeApi::start();
    api.apply(service("a", json!({})));
    let url = format!("{}/api/v1/namespaces/ns/services", api.url());
    for auth in [None, Some("Authorization: Bearer wrong")] {
        let mut args = vec!["-w", "\n%{http_code}"];
        if let Some(header) = auth {
            args.extend(["-H", header]);
        }
        args.push(&url);
        let (out, err) = curl(&api, &args);
        let (body, code) = out
            .rsplit_once('\n')
            .unwrap_or_else(|| panic!("curl: {out} {err}"));
        assert_eq!(code, "401", "{auth:?}: {out} {err}");
        let status: Value = serde_json::from_str(body).expect("a JSON Status");
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["code"], 401);
        assert_eq!(status["reason"], "Unauthorized");
    }
    // With the token, curl verifying the fixture's CA gets the list.
    let header = format!("Authorization: Bearer {}", api.token());
    let (out, err) = curl(&api, &["-H", &header, &url]);
    let list: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    assert_eq!(list["kind"], "ServiceList");
    assert_eq!(list["items"][0]["metadata"]["name"], "a");
}

#[tokio::test]
async fn a_raw_watch_is_chunked_json_lines() {
    let api = KubeApi::start();
    api.apply(pod("p1", json!({})));
    let header = format!("Authorization: Bearer {}", api.token());
    let url = format!(
        "{}/api/v1/namespaces/ns/pods?watch=1&resourceVersion=1&allowWatchBookmarks=true&timeoutSeconds=3",
        api.url()
    );
    let ca = api.ca_file();
    let watch = std::thread::spawn(move || {
        Command::new("curl")
            .args([
                "-sS",
                "--noproxy",
                "*",
                "-N",
                "--raw",
                "-i",
                "--http1.1",
                "--max-time",
                "15",
                "--cacert",
            ])
            .arg(ca)
            .args(["-H", &header, &url])
            .output()
            .expect("run curl")
    });
    assert!(api.wait_for_watches(1, WAIT).await, "curl's watch is open");
    api.apply(pod("p2", json!({})));
    api.apply(pod("p1", json!({"edited": "yes"})));
    assert!(api.delete("v1", "Pod", Some("ns"), "p2"));
    let out = watch.join().expect("the curl thread");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl ended cleanly when the server did: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (head, mut raw) = text.split_once("\r\n\r\n").expect("headers");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase().contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(
        head.to_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    // Each chunk is one whole event line.
    let mut lines = Vec::new();
    loop {
        let (size, rest) = raw.split_once("\r\n").expect("a chunk size");
        let size = usize::from_str_radix(size, 16).expect("a hex chunk size");
        if size == 0 {
            break;
        }
        let (chunk, rest) = rest.split_at(size);
        assert!(
            chunk.ends_with('\n') && !chunk[..size - 1].contains('\n'),
            "one line per chunk: {chunk:?}"
        );
        lines.push(serde_json::from_str::<Value>(chunk).expect("a JSON event"));
        raw = rest.strip_prefix("\r\n").expect("a chunk's CRLF");
    }
    let events: Vec<(String, String, String)> = lines
        .iter()
        .filter(|e| e["type"] != "BOOKMARK")
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_string(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    let want = [
        ("ADDED", "p2", "2"),
        ("MODIFIED", "p1", "3"),
        ("DELETED", "p2", "4"),
    ]
    .map(|(t, n, rv)| (t.to_string(), n.to_string(), rv.to_string()));
    assert_eq!(events, want);
    let bookmark = lines
        .iter()
        .rev()
        .find(|e| e["type"] == "BOOKMARK")
        .expect("a bookmark in 3 s");
    assert_eq!(bookmark["object"]["kind"], "Pod");
    assert_eq!(bookmark["object"]["apiVersion"], "v1");
    assert_eq!(bookmark["object"]["metadata"]["resourceVersion"], "4");
    assert_eq!(
        lines[0]["object"]["kind"], "Pod",
        "objects carry their kind"
    );
}
