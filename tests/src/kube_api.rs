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
//! `allowWatchBookmarks`, `timeoutSeconds`, `sendInitialEvents`); GET, POST, PUT, PATCH (merge,
//! strategic merge as merge, apply as merge, JSON patch) and DELETE of one
//! object; PUT and PATCH of `/status` (which only change `status`; writes
//! to the object keep its `status`); TokenReview; `/version`. Errors are
//! `Status` objects with kube-apiserver's codes and reasons.

mod rest;
mod select;
mod store;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::{json, Value};

use store::{plural, Key, Resource, Store};

struct Shared {
    store: Arc<Mutex<Store>>,
    requests: Mutex<Vec<String>>,
    token: String,
    /// [`KubeApi::refuse_watches`].
    watches_refused: std::sync::atomic::AtomicBool,
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
            watches_refused: Default::default(),
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

    /// Serves lists and watches of `kind` (an empty list rather than 404)
    /// before any object of it exists, as installing its CRD does. The
    /// core kinds, EndpointSlice, Deployment and the infermesh.io kinds are
    /// served from the start.
    pub fn register_kind(&self, api_version: &str, kind: &str) {
        self.shared
            .store
            .lock()
            .unwrap()
            .register_kind(api_version, kind);
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

    /// While `refused`, new watch requests get 503 ServiceUnavailable (lists
    /// are still served). With [`KubeApi::drop_watches`] before and
    /// [`KubeApi::compact`] after the changes, it makes a gap a watcher
    /// certainly misses: watchers cannot re-watch before the history is gone.
    pub fn refuse_watches(&self, refused: bool) {
        self.shared
            .watches_refused
            .store(refused, std::sync::atomic::Ordering::SeqCst);
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
            let service = hyper::service::service_fn(move |req| rest::handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}
