//! CustomResourceDefinitions for the policy kinds, made from the same JSON
//! Schemas as `validate` and `schema` (`infermesh_proto::policy::schemas`),
//! turned into the *structural* OpenAPI v3 schema the Kubernetes API server
//! requires: every `$ref` inlined, `const` written as a one-value `enum`,
//! `anyOf [X, null]` and `type: [X, null]` written as `nullable`, a `oneOf`
//! of strings folded into one `enum`, a `oneOf` of objects kept with only
//! its `required` lists (the properties move to the parent), and a value
//! that is a string or an object (which no structural type describes)
//! marked `x-kubernetes-preserve-unknown-fields`, a number or a string
//! marked `x-kubernetes-int-or-string`. `additionalProperties:
//! false` is dropped (the API server prunes unknown fields instead) and
//! defaults are dropped (the loader applies them, as it does for files).

use serde_json::{json, Map, Value};

/// The API group of the policy kinds.
pub const GROUP: &str = "infermesh.io";
/// Their version.
pub const VERSION: &str = "v1alpha1";

/// The kinds, with their plural and short names.
const KINDS: [(&str, &str, &str); 5] = [
    ("Backend", "backends", "imb"),
    ("LocalModel", "localmodels", "imlm"),
    ("ModelRoute", "modelroutes", "imr"),
    ("MeshConfig", "meshconfigs", "imc"),
    ("AuthorizationPolicy", "authorizationpolicies", "imap"),
];

/// Each kind with its plural resource name, for watching them.
pub fn kinds() -> impl Iterator<Item = (&'static str, &'static str)> {
    KINDS.iter().map(|(kind, plural, _)| (*kind, *plural))
}

/// The plural resource names, for RBAC rules.
pub fn plurals() -> Vec<&'static str> {
    KINDS.iter().map(|(_, plural, _)| *plural).collect()
}

/// One CRD per policy kind, in a fixed order.
pub fn crds() -> Vec<Value> {
    let files = infermesh_proto::policy::schemas();
    KINDS
        .iter()
        .map(|(kind, plural, short)| {
            let name = format!("{}.schema.json", kind.to_lowercase());
            // Every kind has its file; `schemas()` is tested to list them.
            let schema: Value = files
                .iter()
                .find(|f| f.name == name)
                .and_then(|f| serde_json::from_str(&f.json).ok())
                .unwrap_or(Value::Null);
            crd(kind, plural, short, &schema)
        })
        .collect()
}

fn crd(kind: &str, plural: &str, short: &str, schema: &Value) -> Value {
    let definitions = schema
        .get("definitions")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let spec = schema
        .pointer("/properties/spec")
        .map(|s| structural(s, &definitions))
        .unwrap_or_else(|| json!({"type": "object"}));
    let open_api = json!({
        "type": "object",
        "description": schema.get("description").cloned().unwrap_or(Value::Null),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status_schema(),
        },
    });
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{plural}.{GROUP}"),
            "labels": {"app.kubernetes.io/part-of": "infermesh"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": format!("{kind}List"),
                "plural": plural,
                "singular": kind.to_lowercase(),
                "shortNames": [short],
                "categories": ["infermesh"],
            },
            "versions": [{
                "name": VERSION,
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns(kind),
                "schema": {"openAPIV3Schema": open_api},
            }],
        },
    })
}

fn columns(kind: &str) -> Value {
    let mut columns = match kind {
        "Backend" => vec![
            json!({"name": "Protocol", "type": "string", "jsonPath": ".spec.protocol"}),
            json!({"name": "Endpoints", "type": "string", "jsonPath": ".spec.endpoints"}),
            json!({"name": "Service", "type": "string", "jsonPath": ".spec.service.name"}),
        ],
        "LocalModel" => {
            vec![json!({"name": "Model Dir", "type": "string", "jsonPath": ".spec.modelDir"})]
        }
        "ModelRoute" => vec![
            json!({"name": "Listener", "type": "string", "jsonPath": ".spec.listener"}),
            json!({"name": "Backends", "type": "string", "jsonPath": ".spec.backends[*].backend"}),
        ],
        "MeshConfig" => {
            vec![json!({"name": "mTLS", "type": "string", "jsonPath": ".spec.mtls.mode"})]
        }
        _ => Vec::new(),
    };
    columns.push(json!({"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}));
    columns.push(json!({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}));
    Value::Array(columns)
}

/// The status the watcher writes: standard conditions.
fn status_schema() -> Value {
    json!({
        "type": "object",
        "description": "What the control plane made of this policy.",
        "properties": {
            "observedGeneration": {"type": "integer", "format": "int64"},
            "conditions": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
                "items": {
                    "type": "object",
                    "required": ["type", "status"],
                    "properties": {
                        "type": {"type": "string"},
                        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                        "reason": {"type": "string"},
                        "message": {"type": "string"},
                        "observedGeneration": {"type": "integer", "format": "int64"},
                        "lastTransitionTime": {"type": "string", "format": "date-time"},
                    },
                },
            },
        },
    })
}

/// Keys a structural schema node may keep as they are.
const KEPT: [&str; 11] = [
    "description",
    "type",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "required",
];

/// Formats the API server knows; the others (`uint32`, ...) are dropped,
/// `minimum` says what they meant.
const FORMATS: [&str; 5] = ["int32", "int64", "float", "double", "date-time"];

/// The structural form of `schema`, `$ref`s resolved in `definitions`.
pub fn structural(schema: &Value, definitions: &Map<String, Value>) -> Value {
    let Some(node) = schema.as_object() else {
        return json!({});
    };
    // `{$ref}` or `{allOf: [{$ref}], description...}`: the target, with the
    // node's own description.
    let target = node.get("$ref").or_else(|| {
        node.get("allOf")
            .and_then(Value::as_array)
            .filter(|all| all.len() == 1)
            .and_then(|all| all[0].get("$ref"))
    });
    if let Some(target) = target.and_then(Value::as_str) {
        let name = target.trim_start_matches("#/definitions/");
        let mut out = structural(definitions.get(name).unwrap_or(&Value::Null), definitions);
        if let (Some(description), Some(obj)) = (node.get("description"), out.as_object_mut()) {
            obj.insert("description".into(), description.clone());
        }
        return out;
    }
    let mut out = Map::new();
    for key in KEPT {
        if let Some(value) = node.get(key) {
            out.insert(key.into(), value.clone());
        }
    }
    if let Some(value) = node.get("const") {
        out.insert("enum".into(), json!([value]));
    }
    if let Some(format) = node.get("format").and_then(Value::as_str) {
        if FORMATS.contains(&format) {
            out.insert("format".into(), json!(format));
        }
    }
    // `type: [X, "null"]`.
    if let Some(types) = node.get("type").and_then(Value::as_array) {
        let real: Vec<&Value> = types.iter().filter(|t| *t != "null").collect();
        if real.len() == 1 {
            out.insert("type".into(), real[0].clone());
            out.insert("nullable".into(), json!(true));
        }
    }
    if let Some(Value::Object(properties)) = node.get("properties") {
        let converted: Map<String, Value> = properties
            .iter()
            .map(|(name, p)| (name.clone(), structural(p, definitions)))
            .collect();
        out.insert("properties".into(), Value::Object(converted));
        out.insert("type".into(), json!("object"));
    }
    if let Some(extra @ Value::Object(_)) = node.get("additionalProperties") {
        out.insert(
            "additionalProperties".into(),
            structural(extra, definitions),
        );
        out.insert("type".into(), json!("object"));
    }
    if let Some(items) = node.get("items") {
        out.insert("items".into(), structural(items, definitions));
    }
    for junctor in ["oneOf", "anyOf"] {
        if let Some(Value::Array(branches)) = node.get(junctor) {
            fold_junctor(&mut out, junctor, branches, definitions);
        }
    }
    // A node without a type is a value of any shape.
    if !out.contains_key("type")
        && !out.contains_key("x-kubernetes-preserve-unknown-fields")
        && !out.contains_key("x-kubernetes-int-or-string")
    {
        out.insert("x-kubernetes-preserve-unknown-fields".into(), json!(true));
    }
    Value::Object(out)
}

fn fold_junctor(
    out: &mut Map<String, Value>,
    junctor: &str,
    branches: &[Value],
    definitions: &Map<String, Value>,
) {
    let null = |b: &Value| b.get("type") == Some(&json!("null"));
    let real: Vec<Value> = branches
        .iter()
        .filter(|b| !null(b))
        .map(|b| structural(b, definitions))
        .collect();
    let nullable = real.len() < branches.len();
    if nullable {
        out.insert("nullable".into(), json!(true));
    }
    if real.len() == 1 {
        // `anyOf [X, null]`: X itself; the node's description stays.
        if let Value::Object(x) = &real[0] {
            for (key, value) in x {
                if key != "description" || !out.contains_key("description") {
                    out.insert(key.clone(), value.clone());
                }
            }
        }
        return;
    }
    let types: Vec<Option<&Value>> = real.iter().map(|b| b.get("type")).collect();
    let outer_type = out.get("type").cloned();
    let first = types.first().copied().flatten().cloned().or(outer_type);
    let same = types.iter().all(|t| t.is_none() || t.cloned() == first);
    let mut kinds: Vec<&Value> = types.iter().flatten().copied().collect();
    kinds.sort_by_key(|t| t.as_str());
    if kinds == [&json!("integer"), &json!("string")] {
        // A port by number or by name: Kubernetes' own IntOrString.
        for key in [
            "type",
            "properties",
            "enum",
            "pattern",
            "minimum",
            "maximum",
        ] {
            out.remove(key);
        }
        out.insert("x-kubernetes-int-or-string".into(), json!(true));
        return;
    }
    if !same || first.is_none() {
        // A string or an object: no structural type says that.
        for key in ["type", "properties", "enum", "pattern"] {
            out.remove(key);
        }
        out.insert("x-kubernetes-preserve-unknown-fields".into(), json!(true));
        return;
    }
    out.insert("type".into(), first.clone().unwrap_or(Value::Null));
    if first == Some(json!("string")) && real.iter().all(|b| b.get("enum").is_some()) {
        // Strings from a closed set.
        let values: Vec<Value> = real
            .iter()
            .flat_map(|b| b["enum"].as_array().cloned().unwrap_or_default())
            .collect();
        out.insert("enum".into(), Value::Array(values));
        return;
    }
    // Branches keep only what may stand in a junctor; their properties move
    // to the node.
    let mut kept = Vec::new();
    for branch in &real {
        let mut b = Map::new();
        if let Some(Value::Object(properties)) = branch.get("properties") {
            let parent = out
                .entry("properties")
                .or_insert_with(|| json!({}))
                .as_object_mut();
            if let Some(parent) = parent {
                for (name, p) in properties {
                    parent.entry(name.clone()).or_insert_with(|| p.clone());
                }
            }
        }
        for key in ["required", "enum", "pattern", "minimum", "maximum"] {
            if let Some(value) = branch.get(key) {
                b.insert(key.into(), value.clone());
            }
        }
        kept.push(Value::Object(b));
    }
    out.insert(junctor.into(), Value::Array(kept));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules of a structural schema the API server checks
    /// (`apiextensions` validation), on every node.
    fn check(node: &Value, path: &str, in_junctor: bool, problems: &mut Vec<String>) {
        let Some(obj) = node.as_object() else {
            problems.push(format!("{path}: not an object"));
            return;
        };
        for key in obj.keys() {
            if ![
                "description",
                "type",
                "enum",
                "pattern",
                "minimum",
                "maximum",
                "minLength",
                "maxLength",
                "minItems",
                "maxItems",
                "required",
                "format",
                "nullable",
                "properties",
                "additionalProperties",
                "items",
                "oneOf",
                "anyOf",
                "x-kubernetes-preserve-unknown-fields",
                "x-kubernetes-int-or-string",
                "x-kubernetes-list-type",
                "x-kubernetes-list-map-keys",
            ]
            .contains(&key.as_str())
            {
                problems.push(format!("{path}: `{key}` has no place in a CRD schema"));
            }
        }
        if in_junctor {
            for key in [
                "type",
                "description",
                "nullable",
                "additionalProperties",
                "default",
            ] {
                if obj.contains_key(key) {
                    problems.push(format!("{path}: `{key}` inside oneOf/anyOf"));
                }
            }
        } else if !obj.contains_key("type")
            && !obj.contains_key("x-kubernetes-preserve-unknown-fields")
            && !obj.contains_key("x-kubernetes-int-or-string")
        {
            problems.push(format!("{path}: no type"));
        }
        if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
            problems.push(format!("{path}: properties and additionalProperties"));
        }
        if let Some(t) = obj.get("type") {
            if !t.is_string() {
                problems.push(format!("{path}: type {t}"));
            }
        }
        if let Some(Value::Object(properties)) = obj.get("properties") {
            for (name, p) in properties {
                check(p, &format!("{path}.{name}"), in_junctor, problems);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child) = obj.get(key) {
                check(child, &format!("{path}.{key}"), in_junctor, problems);
            }
        }
        for junctor in ["oneOf", "anyOf"] {
            if let Some(Value::Array(branches)) = obj.get(junctor) {
                for (i, branch) in branches.iter().enumerate() {
                    check(branch, &format!("{path}.{junctor}[{i}]"), true, problems);
                    // Every property a branch names is declared outside it.
                    if let Some(Value::Array(required)) = branch.get("required") {
                        for name in required.iter().filter_map(Value::as_str) {
                            if node.pointer(&format!("/properties/{name}")).is_none() {
                                problems
                                    .push(format!("{path}.{junctor}[{i}]: `{name}` undeclared"));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_crd_schema_is_structural() {
        let crds = crds();
        assert_eq!(crds.len(), 5);
        let mut problems = Vec::new();
        for crd in &crds {
            let name = crd["metadata"]["name"].as_str().unwrap_or_default();
            let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            check(schema, name, false, &mut problems);
            let text = schema.to_string();
            for banned in [
                "$ref",
                "\"const\"",
                "\"default\"",
                "\"examples\"",
                "\"null\"",
            ] {
                assert!(!text.contains(banned), "{name}: {banned} left in {text}");
            }
        }
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn string_choices_become_an_enum_and_optional_objects_nullable() {
        let crds = crds();
        let backend =
            &crds[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(backend["properties"]["protocol"]["type"], "string");
        assert!(backend["properties"]["protocol"]["enum"]
            .as_array()
            .is_some_and(|e| e.contains(&json!("http1")) && e.contains(&json!("http2"))));
        assert_eq!(backend["properties"]["mtls"]["nullable"], true);
        assert_eq!(backend["properties"]["mtls"]["type"], "object");
        let port = &backend["properties"]["service"]["properties"]["port"];
        assert_eq!(port["x-kubernetes-int-or-string"], true, "{port}");
        assert!(port.get("type").is_none(), "{port}");
    }
}
