//! A Kubernetes API server, as a fixture: enough of kube-apiserver's REST
//! protocol for real clients (kube-rs's `Api` and `kube::runtime::watcher`)
//! to list, watch, read, patch and create what the control plane uses.
//!
//! It serves HTTPS (HTTP/1.1) with a certificate from its own CA and
//! accepts one bearer token, both written into a kubeconfig. Objects are
//! `serde_json::Value`s keyed by apiVersion, resource (plural), namespace
//! and name; every write takes the next value of one resourceVersion counter
//! (etcd's revision) and is kept in a history that watches replay from.
//! [`KubeApi::compact`] forgets that history, so a watch from before it gets
//! `410 Expired` as from a real server, and [`KubeApi::drop_watches`] cuts
//! every watch connection mid-stream, so tests can check that a watcher
//! resumes (from its last resourceVersion) or re-lists (after 410).
//!
//! Served: `/api/v1/...` and `/apis/GROUP/VERSION/...`, cluster-wide and
//! `/namespaces/NS/...`; list (`labelSelector`, `fieldSelector`, `limit`,
//! `continue`); watch (`watch=true`, `resourceVersion`,
//! `allowWatchBookmarks`, `timeoutSeconds`); GET, POST, PUT, PATCH (merge,
//! strategic merge as merge, apply as merge, JSON patch) and DELETE of one
//! object; PUT and PATCH of `/status` (which only change `status`; writes
//! to the object keep its `status`); TokenReview; `/version`. Errors are
//! `Status` objects with kube-apiserver's codes and reasons.

mod select;
mod store;
mod watch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use select::{FieldSelector, LabelSelector};
use store::{key_of, plural, ApiError, Key, Resource, Store};
use watch::{event_line, WatchRequest};

struct Shared {
    store: Arc<Mutex<Store>>,
    requests: Mutex<Vec<String>>,
    token: String,
}

/// A Kubernetes API server on `https://127.0.0.1:<port>`.
pub struct KubeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl KubeApi {
    /// Starts a server on `127.0.0.1:0` with a new CA, certificate and token.
    pub fn start() -> KubeApi {
        let dir = tempfile::Builder::new()
            .prefix("infermesh-kube-api-")
            .tempdir()
            .expect("temporary directory for the kubeconfig");
        let (tls, ca_pem) = tls_config();
        std::fs::write(dir.path().join("ca.crt"), &ca_pem).expect("write ca.crt");
        let token = format!(
            "fixture-admin-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let shared = Arc::new(Shared {
            store: Arc::new(Mutex::new(Store::new())),
            requests: Mutex::new(Vec::new()),
            token,
        });
        let serving = shared.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let (addr, stop) = crate::spawn_fixture("kube-api", move |listener| {
            accept_loop(listener, acceptor, serving)
        });
        let api = KubeApi {
            addr,
            shared,
            dir,
            _stop: stop,
        };
        write_kubeconfig(&api.kubeconfig(), &api.url(), &ca_pem, &api.shared.token);
        api
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig naming this server, its CA (`certificate-authority-data`)
    /// and its bearer token, in the current context (namespace `default`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The CA certificate (PEM) the server's certificate is signed by, for `curl --cacert`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The bearer token every request must carry.
    pub fn token(&self) -> String {
        self.shared.token.clone()
    }

    /// Creates or replaces the object (by apiVersion, kind, metadata.namespace,
    /// metadata.name), sets metadata.resourceVersion/uid/generation (generation
    /// bumps when spec changes), emits ADDED or MODIFIED to matching watches;
    /// returns the stored object. A `status` in `object` replaces the stored
    /// one; without one, the stored status stays (as when a controller wrote it).
    pub fn apply(&self, object: Value) -> Value {
        let mut store = self.shared.store.lock().unwrap();
        store
            .put(object.clone())
            .unwrap_or_else(|e| panic!("KubeApi::apply({object}): {}", e.message))
    }

    /// Removes it and emits DELETED; false when absent.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let key = key(api_version, kind, namespace, name);
        self.shared.store.lock().unwrap().remove(&key).is_some()
    }

    /// The stored object, including a status written through the API (PATCH/PUT .../status).
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let key = key(api_version, kind, namespace, name);
        self.shared.store.lock().unwrap().get(&key).cloned()
    }

    /// Forgets the event history: a watch from an older resourceVersion gets
    /// 410 Gone (an ERROR event with a Status of code 410, reason Expired),
    /// so watchers must re-list. Open watches keep going.
    pub fn compact(&self) {
        self.shared.store.lock().unwrap().compact();
    }

    /// Closes every open watch connection mid-stream (clients must re-watch
    /// from their last resourceVersion).
    pub fn drop_watches(&self) {
        self.shared.store.lock().unwrap().drop_watches();
    }

    /// TokenReview: `token` authenticates as system:serviceaccount:NS:SA for
    /// these audiences (none: the API server's own audience).
    pub fn add_token(
        &self,
        token: &str,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
    ) {
        self.shared
            .store
            .lock()
            .unwrap()
            .add_token(token, namespace, service_account, audiences);
    }

    /// Every request seen, as "METHOD PATH?QUERY", for asserting re-lists and watches.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The last resourceVersion given out.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().resource_version()
    }

    /// Watches whose client is connected now.
    pub fn open_watches(&self) -> usize {
        self.shared.store.lock().unwrap().open_watches()
    }

    /// Waits until `check(requests())` holds, up to `timeout`; returns whether it did.
    pub async fn wait_for_requests(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&[String]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if check(&self.requests()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `count` watches are open, up to `timeout`.
    pub async fn wait_for_watches(&self, count: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.open_watches() < count {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

fn key(api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Key {
    Key {
        resource: Resource {
            api_version: api_version.to_string(),
            plural: plural(kind),
        },
        namespace: namespace.map(str::to_string),
        name: name.to_string(),
    }
}

/// A CA and a server certificate for 127.0.0.1 and localhost signed by it.
fn tls_config() -> (rustls::ServerConfig, String) {
    let ca_key = KeyPair::generate().expect("a CA key");
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "infermesh-tests kube-apiserver CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).expect("self-sign the CA").pem();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().expect("a server key");
    let mut params = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes.default.svc".to_string(),
    ])
    .expect("DNS names");
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &issuer)
        .expect("sign the server certificate");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .expect("the server certificate and key");
    // kube-rs speaks HTTP/1.1; a watch then holds its own connection, as
    // with kube-apiserver for HTTP/1.1 clients.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (config, ca_pem)
}

fn write_kubeconfig(path: &Path, url: &str, ca_pem: &str, token: &str) {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    // JSON is YAML, and kubeconfig readers take it.
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fixture", "cluster": {"server": url, "certificate-authority-data": ca}}],
        "users": [{"name": "fixture", "user": {"token": token}}],
        "contexts": [{"name": "fixture", "context": {"cluster": "fixture", "user": "fixture", "namespace": "default"}}],
        "current-context": "fixture",
    });
    std::fs::write(path, serde_json::to_vec_pretty(&config).expect("JSON"))
        .expect("write the kubeconfig");
}

// === serving ===

type Body = BoxBody<Bytes, std::io::Error>;

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(
            serde_json::to_vec(value).expect("JSON values serialize"),
        ))
        .expect("a valid response")
}

fn error_response(error: &ApiError) -> Response<Body> {
    json_response(error.code, &error.status())
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_default();
    shared
        .requests
        .lock()
        .unwrap()
        .push(format!("{} {target}", req.method()));
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(shared.token.as_str()) {
        return Ok(error_response(&ApiError::new(
            401,
            "Unauthorized",
            "Unauthorized",
        )));
    }
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(error_response(&ApiError::bad_request(format!(
                "reading the request body: {e}"
            ))))
        }
    };
    let query: HashMap<String, String> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let answer = route(
        &shared,
        &parts.method,
        parts.uri.path(),
        &query,
        &content_type,
        &body,
    );
    Ok(match answer {
        Ok(Answer::Json(code, value)) => json_response(code, &value),
        Ok(Answer::Stream(response)) => response,
        Err(error) => error_response(&error),
    })
}

enum Answer {
    Json(u16, Value),
    Stream(Response<Body>),
}

/// What a path names.
#[derive(Debug, PartialEq)]
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn not_found() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// Parses `/api/v1/[namespaces/NS/]PLURAL[/NAME[/status]]` and its `/apis/GROUP/VERSION` form.
fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", _, "status" | "finalize"] => (None, rest),
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, status) = match rest {
        [plural] => (plural, None, false),
        [plural, name] => (plural, Some(name.to_string()), false),
        [plural, name, "status"] => (plural, Some(name.to_string()), true),
        _ => return None,
    };
    if plural.is_empty() || name.as_deref() == Some("") {
        return None;
    }
    Some(Target {
        resource: Resource {
            api_version,
            plural: plural.to_string(),
        },
        namespace,
        name,
        status,
    })
}

fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    content_type: &str,
    body: &Bytes,
) -> Result<Answer, ApiError> {
    if path == "/version" {
        return Ok(Answer::Json(
            200,
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-infermesh-fixture", "platform": "linux/amd64"}),
        ));
    }
    let target = parse_path(path).ok_or_else(not_found)?;
    let resource = &target.resource;
    if resource.api_version == "authentication.k8s.io/v1" && resource.plural == "tokenreviews" {
        if *method != Method::POST || target.name.is_some() {
            return Err(method_not_allowed(method));
        }
        return token_review(shared, body).map(|review| Answer::Json(201, review));
    }
    let namespace = target.namespace.as_deref();
    let mut store = shared.store.lock().unwrap();
    let kind = store.kind(resource).ok_or_else(not_found)?;
    let Some(name) = &target.name else {
        return match *method {
            Method::GET if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) => {
                drop(store);
                start_watch(shared, &target, kind, query).map(Answer::Stream)
            }
            Method::GET => {
                list(&store, resource, namespace, kind, query).map(|l| Answer::Json(200, l))
            }
            Method::POST => {
                let object = parse_json(body)?;
                store
                    .create(resource, namespace, object)
                    .map(|o| Answer::Json(201, o))
            }
            _ => Err(method_not_allowed(method)),
        };
    };
    let key = Key {
        resource: resource.clone(),
        namespace: target.namespace.clone(),
        name: name.clone(),
    };
    let object = match *method {
        Method::GET => store
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&key)),
        Method::PUT => store.replace(&key, parse_json(body)?, target.status),
        Method::PATCH => patch(&mut store, &key, content_type, body, target.status),
        Method::DELETE if !target.status => {
            store.remove(&key).ok_or_else(|| ApiError::not_found(&key))
        }
        _ => Err(method_not_allowed(method)),
    }?;
    Ok(Answer::Json(200, object))
}

fn method_not_allowed(method: &Method) -> ApiError {
    ApiError::new(
        405,
        "MethodNotAllowed",
        format!("the server does not allow this method on the requested resource: {method}"),
    )
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))
}

fn patch(
    store: &mut Store,
    key: &Key,
    content_type: &str,
    body: &Bytes,
    status: bool,
) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    match media {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            store.merge_patch(key, &parse_json(body)?, status, false)
        }
        "application/apply-patch+yaml" => {
            let patch: Value = serde_yaml_ng::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("the apply patch is not YAML: {e}")))?;
            if key_of(&patch).is_ok_and(|k| k.name != key.name) {
                return Err(ApiError::bad_request("the apply patch names another object"));
            }
            store.merge_patch(key, &patch, status, true)
        }
        "application/json-patch+json" => {
            let ops: Vec<json_patch::PatchOperation> = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("the body is not a JSON patch: {e}")))?;
            store.json_patch(key, &ops, status)
        }
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"),
        )),
    }
}

/// The position a continued list resumes after, and the list's resourceVersion.
#[derive(serde::Serialize, serde::Deserialize)]
struct Continue {
    rv: u64,
    namespace: Option<String>,
    name: String,
}

fn list(
    store: &Store,
    resource: &Resource,
    namespace: Option<&str>,
    kind: String,
    query: &HashMap<String, String>,
) -> Result<Value, ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))?;
    let limit = match query.get("limit").map(String::as_str) {
        None | Some("") => 0,
        Some(n) => n
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {n:?}")))?,
    };
    let from = match query.get("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(token) => {
            let from: Continue = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|raw| serde_json::from_slice(&raw).ok())
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            if from.rv < store.compacted() {
                return Err(ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter."));
            }
            Some(from)
        }
    };
    let rv = from.as_ref().map_or(store.resource_version(), |f| f.rv);
    let mut matching = store
        .objects(resource, namespace)
        .filter(|(key, _)| {
            from.as_ref()
                .is_none_or(|f| (&key.namespace, &key.name) > (&f.namespace, &f.name))
        })
        .filter(|(_, object)| labels.matches(object) && fields.matches(object));
    let mut items = Vec::new();
    let mut last = None;
    for (key, object) in matching.by_ref() {
        if limit > 0 && items.len() == limit {
            last = Some(key);
            break;
        }
        items.push(object.clone());
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if last.is_some() {
        // The page's last item is where the next page starts after.
        let tail = items.last().expect("a full page");
        let token = Continue {
            rv,
            namespace: tail["metadata"]["namespace"].as_str().map(str::to_string),
            name: tail["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        };
        metadata["continue"] = json!(base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&token).expect("JSON")));
        // As kube-apiserver, the count is given only when no selector filters the list.
        if labels.is_empty() && fields.is_empty() {
            metadata["remainingItemCount"] = json!(1 + matching.count());
        }
    }
    Ok(json!({
        "apiVersion": resource.api_version,
        "kind": format!("{kind}List"),
        "metadata": metadata,
        "items": items,
    }))
}

fn start_watch(
    shared: &Shared,
    target: &Target,
    kind: String,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let flag = |name: &str| matches!(query.get(name).map(String::as_str), Some("true" | "1"));
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let timeout = match query.get("timeoutSeconds").map(String::as_str) {
        None | Some("") => None,
        Some(s) => Some(Duration::from_secs(s.parse().map_err(|_| {
            ApiError::bad_request(format!("invalid timeoutSeconds {s:?}"))
        })?)),
    };
    let request = WatchRequest {
        resource: target.resource.clone(),
        kind,
        labels: LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?,
        fields: FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))?,
        bookmarks: flag("allowWatchBookmarks"),
        timeout,
    };
    let subscription =
        shared
            .store
            .lock()
            .unwrap()
            .subscribe(&target.resource, target.namespace.as_deref(), from);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    match subscription {
        Ok(subscription) => {
            tokio::spawn(request.run(shared.store.clone(), subscription, tx));
        }
        // kube-apiserver answers 200 and sends the 410 as the stream's only event.
        Err(expired) => {
            tx.try_send(Ok(event_line("ERROR", &expired.status())))
                .expect("an empty channel");
        }
    }
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(ReceiverStream::new(rx)).boxed())
        .expect("a valid response"))
}

fn token_review(shared: &Shared, body: &Bytes) -> Result<Value, ApiError> {
    let mut review = parse_json(body)?;
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if token.is_empty() {
        return Err(ApiError::bad_request(
            "token is required for TokenReview in authentication",
        ));
    }
    let audiences: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let status = shared
        .store
        .lock()
        .unwrap()
        .review_token(&token, &audiences);
    review["apiVersion"] = json!("authentication.k8s.io/v1");
    review["kind"] = json!("TokenReview");
    review["metadata"] = json!({"creationTimestamp": null});
    review["status"] = status;
    Ok(review)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_resources() {
        let t = parse_path("/api/v1/namespaces/ns/pods/a/status").unwrap();
        assert_eq!(t.resource.plural, "pods");
        assert_eq!(t.namespace.as_deref(), Some("ns"));
        assert_eq!(t.name.as_deref(), Some("a"));
        assert!(t.status);
        let t = parse_path("/apis/discovery.k8s.io/v1/endpointslices").unwrap();
        assert_eq!(t.resource.api_version, "discovery.k8s.io/v1");
        assert_eq!((t.namespace, t.name), (None, None));
        let t = parse_path("/api/v1/namespaces/ns").unwrap();
        assert_eq!(
            (t.resource.plural.as_str(), t.name.as_deref()),
            ("namespaces", Some("ns"))
        );
        let t = parse_path("/api/v1/namespaces").unwrap();
        assert_eq!(t.resource.plural, "namespaces");
        let t = parse_path("/api/v1/namespaces/ns/status").unwrap();
        assert!(t.status && t.namespace.is_none());
        assert!(parse_path("/api/v1/namespaces/ns/pods/a/log/x").is_none());
        assert!(parse_path("/healthz").is_none());
    }
}
