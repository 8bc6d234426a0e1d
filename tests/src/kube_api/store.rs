//! The fixture API server's state: objects, the resourceVersion counter and
//! its history, open watches, and the service-account tokens TokenReview
//! knows. Everything here is plain data behind one mutex; the HTTP side
//! (`kube_api.rs`) and the watch streams (`watch.rs`) call into it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Value};
use tokio::sync::mpsc;

/// A kind of object at one API version: `("v1", "pods")`,
/// `("discovery.k8s.io/v1", "endpointslices")`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Resource {
    pub api_version: String,
    pub plural: String,
}

/// Where one object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub resource: Resource,
    pub namespace: Option<String>,
    pub name: String,
}

/// What happened to an object, as a watch reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One write, kept in the history until [`Store::compact`].
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub change: ChangeType,
    pub key: Key,
    /// The object after the write (for a deletion: its last state, with
    /// the deletion's resourceVersion, as the real server sends it).
    pub object: Value,
    /// The object before the write, so a watch with a label selector can
    /// turn a modification into ADDED or DELETED when the labels move.
    pub previous: Option<Value>,
}

/// What a watch's queue carries.
#[derive(Debug)]
pub(crate) enum WatchMsg {
    Change(Arc<Change>),
    /// [`Store::drop_watches`]: end the connection abruptly.
    Drop,
}

struct Subscriber {
    resource: Resource,
    namespace: Option<String>,
    tx: mpsc::UnboundedSender<WatchMsg>,
}

/// A watch just registered: what it must send first, and its queue.
pub(crate) struct Subscription {
    /// Changes after the requested resourceVersion, or synthetic ADDED
    /// events for the current objects (a watch without a resourceVersion).
    pub backlog: Vec<Arc<Change>>,
    /// The store's resourceVersion when the watch started.
    pub start_rv: u64,
    pub rx: mpsc::UnboundedReceiver<WatchMsg>,
}

/// The service account a token stands for.
#[derive(Debug, Clone)]
pub(crate) struct TokenOwner {
    pub namespace: String,
    pub service_account: String,
    pub uid: String,
    pub audiences: Vec<String>,
}

/// An API error, rendered as a `Status` object with its HTTP code.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `details` of the Status (name and kind of the object concerned).
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn not_found(key: &Key) -> Self {
        Self {
            details: Some(json!({"name": key.name, "kind": key.resource.plural})),
            ..Self::new(
                404,
                "NotFound",
                format!("{} \"{}\" not found", key.resource.plural, key.name),
            )
        }
    }

    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// The `Status` object the real server sends.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// The audience of tokens reviewed without `spec.audiences`, as a
/// kube-apiserver started without `--api-audiences` uses.
pub(crate) const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Everything the server holds.
pub(crate) struct Store {
    objects: BTreeMap<Key, Value>,
    /// The last resourceVersion given out (one counter for every kind, as etcd's revision).
    rv: u64,
    /// Every change with a resourceVersion above `compacted`.
    history: Vec<Arc<Change>>,
    compacted: u64,
    /// Kinds learned from written objects, for naming lists.
    kinds: HashMap<Resource, String>,
    subscribers: Vec<Subscriber>,
    tokens: HashMap<String, TokenOwner>,
    uid_seed: u64,
    uids: u64,
}

impl Store {
    pub fn new() -> Self {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        Self {
            objects: BTreeMap::new(),
            rv: 0,
            history: Vec::new(),
            compacted: 0,
            kinds: HashMap::new(),
            subscribers: Vec::new(),
            tokens: HashMap::new(),
            uid_seed: seed,
            uids: 0,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn next_uid(&mut self) -> String {
        self.uids += 1;
        let seed = self.uid_seed;
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (seed >> 32) as u32,
            (seed >> 16) as u16,
            seed as u16 & 0xfff,
            (self.uids >> 48) as u16 & 0xfff,
            self.uids & 0xffff_ffff_ffff
        )
    }

    /// The kind served at `resource`, when known.
    pub fn kind(&self, resource: &Resource) -> Option<String> {
        self.kinds
            .get(resource)
            .cloned()
            .or_else(|| builtin_kind(resource).map(str::to_string))
    }

    /// Serves `kind` at `api_version` before any object of it is written.
    pub fn register_kind(&mut self, api_version: &str, kind: &str) {
        let resource = Resource {
            api_version: api_version.to_string(),
            plural: plural(kind),
        };
        self.kinds.insert(resource, kind.to_string());
    }

    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    /// The fixture's own write: creates or replaces `object`. A `status`
    /// in it replaces the stored one; without one the stored status stays.
    pub fn put(&mut self, object: Value) -> Result<Value, ApiError> {
        let key = key_of(&object)?;
        let mut object = object;
        if object.get("status").is_none() {
            if let Some(status) = self.objects.get(&key).and_then(|o| o.get("status")) {
                object["status"] = status.clone();
            }
        }
        Ok(self.write(key, object))
    }

    /// POST: creates `object` in `namespace` of `resource`; 409 when it exists.
    pub fn create(
        &mut self,
        resource: &Resource,
        namespace: Option<&str>,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        }
        match (namespace, object.pointer("/metadata/namespace").and_then(Value::as_str)) {
            (Some(path), Some(body)) if path != body => {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({body}) does not match the namespace sent on the request ({path})"
                )))
            }
            (Some(path), None) => object["metadata"]["namespace"] = json!(path),
            _ => {}
        }
        let key = key_of(&object)?;
        if key.resource != *resource {
            return Err(ApiError::bad_request(format!(
                "the object is a {} {}, not one of {}",
                key.resource.api_version, key.resource.plural, resource.plural
            )));
        }
        if self.objects.contains_key(&key) {
            return Err(ApiError {
                details: Some(json!({"name": key.name, "kind": key.resource.plural})),
                ..ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{} \"{}\" already exists", key.resource.plural, key.name),
                )
            });
        }
        if let Some(status) = object.as_object_mut() {
            status.remove("status");
        }
        Ok(self.write(key, object))
    }

    /// PUT (on the object or on its `/status`): replaces the object but
    /// its status, or only its status. 409 when the body's resourceVersion
    /// is not the stored one.
    pub fn replace(
        &mut self,
        key: &Key,
        body: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        self.check_version(key, &body)?;
        self.replace_unchecked(key, body, status_only)
    }

    /// 404 when `key` is absent, 409 when `body` names another resourceVersion.
    fn check_version(&self, key: &Key, body: &Value) -> Result<(), ApiError> {
        let old = self
            .objects
            .get(key)
            .ok_or_else(|| ApiError::not_found(key))?;
        let Some(rv) = body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
        else {
            return Ok(());
        };
        let stored = old
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str);
        if rv.is_empty() || Some(rv) == stored {
            return Ok(());
        }
        Err(ApiError {
            details: Some(json!({"name": key.name, "kind": key.resource.plural})),
            ..ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                    key.resource.plural, key.name
                ),
            )
        })
    }

    fn replace_unchecked(
        &mut self,
        key: &Key,
        body: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let old = self
            .objects
            .get(key)
            .ok_or_else(|| ApiError::not_found(key))?;
        let object = if status_only {
            let mut object = old.clone();
            object["status"] = body.get("status").cloned().unwrap_or(Value::Null);
            object
        } else {
            if key_of(&body)? != *key {
                return Err(ApiError::bad_request(
                    "the object's apiVersion, kind, namespace or name differ from the request's",
                ));
            }
            let mut object = body;
            object["status"] = old.get("status").cloned().unwrap_or(Value::Null);
            object
        };
        Ok(self.write(key.clone(), strip_null_status(object)))
    }

    /// PATCH with a JSON merge patch (also used for strategic merge and
    /// apply patches); `create` makes a missing object from the patch
    /// (server-side apply does).
    pub fn merge_patch(
        &mut self,
        key: &Key,
        patch: &Value,
        status_only: bool,
        create: bool,
    ) -> Result<Value, ApiError> {
        let Some(old) = self.objects.get(key) else {
            if create && !status_only {
                let mut object = patch.clone();
                if let Some(ns) = &key.namespace {
                    object["metadata"]["namespace"] = json!(ns);
                }
                let resource = key.resource.clone();
                return self.create(&resource, key.namespace.as_deref(), object);
            }
            return Err(ApiError::not_found(key));
        };
        let mut merged = old.clone();
        self.check_version(key, patch)?;
        json_patch::merge(&mut merged, patch);
        self.replace_unchecked(key, merged, status_only)
    }

    /// PATCH with an RFC 6902 JSON patch.
    pub fn json_patch(
        &mut self,
        key: &Key,
        patch: &[json_patch::PatchOperation],
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let old = self
            .objects
            .get(key)
            .ok_or_else(|| ApiError::not_found(key))?;
        let mut patched = old.clone();
        json_patch::patch(&mut patched, patch)
            .map_err(|e| ApiError::new(422, "Invalid", format!("the JSON patch failed: {e}")))?;
        self.replace_unchecked(key, patched, status_only)
    }

    /// Removes the object and records its deletion.
    pub fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(ChangeType::Deleted, key.clone(), object.clone(), None);
        Some(object)
    }

    /// Stores `object` under `key` with the server-owned metadata set.
    fn write(&mut self, key: Key, mut object: Value) -> Value {
        let previous = self.objects.get(&key).cloned();
        self.rv += 1;
        let (uid, created, generation) = match &previous {
            Some(old) => {
                let generation = old["metadata"]["generation"].as_u64().unwrap_or(1);
                let spec_changed = old.get("spec") != object.get("spec");
                (
                    old["metadata"]["uid"].clone(),
                    old["metadata"]["creationTimestamp"].clone(),
                    generation + u64::from(spec_changed),
                )
            }
            None => (
                json!(self.next_uid()),
                json!(humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
                1,
            ),
        };
        let metadata = &mut object["metadata"];
        metadata["uid"] = uid;
        metadata["creationTimestamp"] = created;
        metadata["generation"] = json!(generation);
        metadata["resourceVersion"] = json!(self.rv.to_string());
        if let Some(ns) = &key.namespace {
            metadata["namespace"] = json!(ns);
        }
        if let Some(kind) = object.get("kind").and_then(Value::as_str) {
            self.kinds.insert(key.resource.clone(), kind.to_string());
        }
        self.objects.insert(key.clone(), object.clone());
        let change = if previous.is_some() {
            ChangeType::Modified
        } else {
            ChangeType::Added
        };
        self.record(change, key, object.clone(), previous);
        object
    }

    fn record(&mut self, change: ChangeType, key: Key, object: Value, previous: Option<Value>) {
        let change = Arc::new(Change {
            rv: self.rv,
            change,
            key,
            object,
            previous,
        });
        self.subscribers.retain(|s| {
            if s.resource != change.key.resource
                || (s.namespace.is_some() && s.namespace != change.key.namespace)
            {
                return !s.tx.is_closed();
            }
            s.tx.send(WatchMsg::Change(change.clone())).is_ok()
        });
        self.history.push(change);
    }

    /// The objects of `resource` (in `namespace`, or all), in key order.
    pub fn objects<'a>(
        &'a self,
        resource: &'a Resource,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> + 'a {
        self.objects.iter().filter(move |(key, _)| {
            key.resource == *resource
                && namespace.is_none_or(|ns| key.namespace.as_deref() == Some(ns))
        })
    }

    /// Forgets the history: watches from before now get 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// The oldest resourceVersion a watch or a continued list may start from.
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Registers a watch of `resource` in `namespace` (or all) from
    /// resourceVersion `from` (`None`: now, after the current objects as ADDED).
    pub fn subscribe(
        &mut self,
        resource: &Resource,
        namespace: Option<&str>,
        from: Option<u64>,
    ) -> Result<Subscription, ApiError> {
        let in_scope = |key: &Key| {
            key.resource == *resource
                && namespace.is_none_or(|ns| key.namespace.as_deref() == Some(ns))
        };
        let backlog = match from {
            Some(from) if from < self.compacted => {
                return Err(ApiError::expired(format!(
                    "too old resource version: {from} ({})",
                    self.compacted + 1
                )))
            }
            Some(from) => self
                .history
                .iter()
                .filter(|c| c.rv > from && in_scope(&c.key))
                .cloned()
                .collect(),
            None => self
                .objects
                .iter()
                .filter(|(key, _)| in_scope(key))
                .map(|(key, object)| {
                    Arc::new(Change {
                        rv: rv_of(object),
                        change: ChangeType::Added,
                        key: key.clone(),
                        object: object.clone(),
                        previous: None,
                    })
                })
                .collect(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.push(Subscriber {
            resource: resource.clone(),
            namespace: namespace.map(str::to_string),
            tx,
        });
        Ok(Subscription {
            backlog,
            start_rv: self.rv,
            rx,
        })
    }

    /// Tells every open watch to end abruptly.
    pub fn drop_watches(&mut self) {
        for subscriber in self.subscribers.drain(..) {
            let _ = subscriber.tx.send(WatchMsg::Drop);
        }
    }

    /// Watches whose client is still connected.
    pub fn open_watches(&mut self) -> usize {
        self.subscribers.retain(|s| !s.tx.is_closed());
        self.subscribers.len()
    }

    pub fn add_token(
        &mut self,
        token: &str,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
    ) {
        let uid = self.next_uid();
        self.tokens.insert(
            token.to_string(),
            TokenOwner {
                namespace: namespace.to_string(),
                service_account: service_account.to_string(),
                uid,
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
            },
        );
    }

    /// The `status` of a TokenReview of `token` for `audiences` (empty:
    /// the API server's own audience), as kube-apiserver answers.
    pub fn review_token(&self, token: &str, audiences: &[String]) -> Value {
        let Some(owner) = self.tokens.get(token) else {
            return json!({
                "authenticated": false,
                "user": {},
                "error": "[invalid bearer token, token lookup failed: the token is not one this server issued]",
            });
        };
        let wanted: Vec<String> = if audiences.is_empty() {
            vec![API_AUDIENCE.to_string()]
        } else {
            audiences.to_vec()
        };
        let own: Vec<String> = if owner.audiences.is_empty() {
            vec![API_AUDIENCE.to_string()]
        } else {
            owner.audiences.clone()
        };
        let granted: Vec<&String> = wanted.iter().filter(|a| own.contains(a)).collect();
        if granted.is_empty() {
            return json!({
                "authenticated": false,
                "user": {},
                "error": format!(
                    "[invalid bearer token, token audiences {} is invalid for the target audiences {}]",
                    json!(own),
                    json!(wanted)
                ),
            });
        }
        let ns = &owner.namespace;
        json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{ns}:{}", owner.service_account),
                "uid": owner.uid,
                "groups": [
                    "system:serviceaccounts",
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated",
                ],
            },
            "audiences": granted,
        })
    }
}

fn strip_null_status(mut object: Value) -> Value {
    if object.get("status") == Some(&Value::Null) {
        if let Some(map) = object.as_object_mut() {
            map.remove("status");
        }
    }
    object
}

/// The resourceVersion stored in an object's metadata.
pub(crate) fn rv_of(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or_default()
}

/// Where `object` belongs, from its apiVersion, kind, namespace and name.
pub(crate) fn key_of(object: &Value) -> Result<Key, ApiError> {
    let field = |pointer: &str| object.pointer(pointer).and_then(Value::as_str);
    let api_version = field("/apiVersion").filter(|s| !s.is_empty());
    let kind = field("/kind").filter(|s| !s.is_empty());
    let name = field("/metadata/name").filter(|s| !s.is_empty());
    let (Some(api_version), Some(kind), Some(name)) = (api_version, kind, name) else {
        return Err(ApiError::bad_request(
            "the object needs apiVersion, kind and metadata.name",
        ));
    };
    Ok(Key {
        resource: Resource {
            api_version: api_version.to_string(),
            plural: plural(kind),
        },
        namespace: field("/metadata/namespace")
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        name: name.to_string(),
    })
}

/// The resource name of a kind: lowercase, plus "s" ("y" → "ies", "s" → "ses").
pub(crate) fn plural(kind: &str) -> String {
    let lower = kind.to_lowercase();
    if let Some(stem) = lower.strip_suffix('y') {
        if !stem.ends_with(['a', 'e', 'i', 'o', 'u']) {
            return format!("{stem}ies");
        }
    }
    if lower.ends_with('s')
        || lower.ends_with('x')
        || lower.ends_with("ch")
        || lower.ends_with("sh")
    {
        return format!("{lower}es");
    }
    format!("{lower}s")
}

/// Kinds served before any object of theirs was written, so that an empty
/// list still names its kind.
fn builtin_kind(resource: &Resource) -> Option<&'static str> {
    let kinds: &[&str] = match resource.api_version.as_str() {
        "v1" => &[
            "Pod",
            "Service",
            "Namespace",
            "Endpoints",
            "ConfigMap",
            "Secret",
            "ServiceAccount",
            "Node",
        ],
        "discovery.k8s.io/v1" => &["EndpointSlice"],
        "apps/v1" => &["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"],
        "infermesh.io/v1alpha1" => &[
            "Backend",
            "ModelRoute",
            "MeshConfig",
            "LocalModel",
            "AuthorizationPolicy",
        ],
        _ => &[],
    };
    kinds.iter().copied().find(|k| plural(k) == resource.plural)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns"}, "spec": spec})
    }

    #[test]
    fn plurals_follow_the_api_server() {
        assert_eq!(plural("Pod"), "pods");
        assert_eq!(plural("EndpointSlice"), "endpointslices");
        assert_eq!(plural("AuthorizationPolicy"), "authorizationpolicies");
        assert_eq!(plural("Ingress"), "ingresses");
        assert_eq!(plural("Gateway"), "gateways");
    }

    #[test]
    fn generation_moves_with_spec_only() {
        let mut store = Store::new();
        let a = store.put(pod("a", json!({"x": 1}))).unwrap();
        assert_eq!(a["metadata"]["generation"], 1);
        assert_eq!(a["metadata"]["resourceVersion"], "1");
        let key = key_of(&a).unwrap();
        let b = store
            .merge_patch(&key, &json!({"status": {"phase": "Running"}}), true, false)
            .unwrap();
        assert_eq!(b["metadata"]["generation"], 1);
        assert_eq!(b["status"]["phase"], "Running");
        let c = store.put(pod("a", json!({"x": 2}))).unwrap();
        assert_eq!(c["metadata"]["generation"], 2);
        assert_eq!(c["metadata"]["uid"], a["metadata"]["uid"]);
        assert_eq!(
            c["status"]["phase"], "Running",
            "a put without status keeps it"
        );
        assert_eq!(c["metadata"]["resourceVersion"], "3");
    }

    #[test]
    fn status_writes_touch_only_status() {
        let mut store = Store::new();
        let a = store.put(pod("a", json!({"x": 1}))).unwrap();
        let key = key_of(&a).unwrap();
        let b = store
            .merge_patch(
                &key,
                &json!({"spec": {"x": 9}, "status": {"ok": true}}),
                true,
                false,
            )
            .unwrap();
        assert_eq!(b["spec"]["x"], 1);
        assert_eq!(b["status"]["ok"], true);
        let c = store
            .merge_patch(
                &key,
                &json!({"spec": {"x": 9}, "status": {"ok": false}}),
                false,
                false,
            )
            .unwrap();
        assert_eq!(c["spec"]["x"], 9);
        assert_eq!(c["status"]["ok"], true);
    }

    #[test]
    fn json_patches_apply_in_order() {
        let mut store = Store::new();
        let a = store.put(pod("a", json!({"x": 1}))).unwrap();
        let key = key_of(&a).unwrap();
        let ops: Vec<json_patch::PatchOperation> = serde_json::from_value(json!([
            {"op": "add", "path": "/metadata/labels", "value": {"app": "web"}},
            {"op": "replace", "path": "/spec/x", "value": 2},
        ]))
        .unwrap();
        let b = store.json_patch(&key, &ops, false).unwrap();
        assert_eq!(b["metadata"]["labels"]["app"], "web");
        assert_eq!(b["spec"]["x"], 2);
        assert_eq!(b["metadata"]["generation"], 2);
        let bad: Vec<json_patch::PatchOperation> =
            serde_json::from_value(json!([{"op": "remove", "path": "/nope"}])).unwrap();
        assert_eq!(store.json_patch(&key, &bad, false).unwrap_err().code, 422);
    }

    #[test]
    fn a_stale_resource_version_conflicts() {
        let mut store = Store::new();
        let a = store.put(pod("a", json!({}))).unwrap();
        let key = key_of(&a).unwrap();
        store.put(pod("a", json!({"y": 1}))).unwrap();
        let err = store.replace(&key, a, false).unwrap_err();
        assert_eq!(err.code, 409);
    }

    #[test]
    fn watches_from_compacted_history_expire() {
        let mut store = Store::new();
        store.put(pod("a", json!({}))).unwrap();
        store.put(pod("b", json!({}))).unwrap();
        let resource = Resource {
            api_version: "v1".into(),
            plural: "pods".into(),
        };
        let sub = store.subscribe(&resource, None, Some(1)).unwrap();
        assert_eq!(sub.backlog.len(), 1);
        store.compact();
        let err = store.subscribe(&resource, None, Some(1)).err().unwrap();
        assert_eq!((err.code, err.reason), (410, "Expired"));
        assert!(store.subscribe(&resource, None, Some(2)).is_ok());
    }

    #[test]
    fn token_reviews_check_audiences() {
        let mut store = Store::new();
        store.add_token("t", "ns", "sa", &["infermesh"]);
        let ok = store.review_token("t", &["infermesh".into()]);
        assert_eq!(ok["authenticated"], true);
        assert_eq!(ok["user"]["username"], "system:serviceaccount:ns:sa");
        let wrong = store.review_token("t", &["other".into()]);
        assert_eq!(wrong["authenticated"], false);
        assert!(wrong["error"]
            .as_str()
            .unwrap()
            .contains("invalid for the target audiences"));
        let none = store.review_token("t", &[]);
        assert_eq!(none["authenticated"], false);
        assert_eq!(store.review_token("x", &[])["authenticated"], false);
    }
}
