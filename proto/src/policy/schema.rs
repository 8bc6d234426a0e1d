//! JSON Schemas of the policy kinds, generated from the serde types so that
//! they cannot drift from what the loader accepts. The field docs of the
//! kind modules (`backend.rs`, `model_route.rs`, ...) become the
//! descriptions editors show.
//!
//! The schemas are draft-07, the dialect every YAML language server reads;
//! `infermesh-control schema --out deploy/schemas` writes them.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use super::{
    AuthorizationPolicySpec, BackendSpec, LocalModelSpec, MeshConfigSpec, ModelRouteSpec, Resource,
    API_VERSION,
};

/// One generated schema file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaFile {
    /// File name, e.g. `backend.schema.json`.
    pub name: String,
    /// Pretty-printed JSON, ending with a newline.
    pub json: String,
}

/// A schema per kind (`backend`, `modelroute`, `meshconfig`, `localmodel`,
/// `authorizationpolicy`), and
/// `policy.schema.json`, which accepts a document of any kind (for files
/// that mix kinds, as most do).
pub fn schemas() -> Vec<SchemaFile> {
    let kinds = [
        kind::<BackendSpec>("Backend"),
        kind::<ModelRouteSpec>("ModelRoute"),
        kind::<MeshConfigSpec>("MeshConfig"),
        kind::<LocalModelSpec>("LocalModel"),
        kind::<AuthorizationPolicySpec>("AuthorizationPolicy"),
    ];
    let mut files: Vec<SchemaFile> = kinds
        .iter()
        .map(|(name, schema)| file(&format!("{}.schema.json", name.to_lowercase()), schema))
        .collect();
    files.push(file("policy.schema.json", &any_kind(&kinds)));
    files
}

fn file(name: &str, schema: &Value) -> SchemaFile {
    // Plain JSON values always serialize.
    let text = serde_json::to_string_pretty(schema).unwrap_or_default();
    SchemaFile {
        name: name.to_owned(),
        json: format!("{text}\n"),
    }
}

/// The schema of one kind: the generic document with `apiVersion` and
/// `kind` pinned, titled and described after the kind.
fn kind<S: JsonSchema>(kind: &str) -> (String, Value) {
    let generator = SchemaSettings::draft07().into_generator();
    let mut schema = generator.into_root_schema_for::<Resource<S>>().to_value();
    let spec_doc = schema
        .pointer(&format!("/definitions/{}/description", S::schema_name()))
        .cloned()
        .unwrap_or(Value::Null);
    if let Some(root) = schema.as_object_mut() {
        root.insert("title".into(), json!(kind));
        root.insert("description".into(), spec_doc);
        if let Some(Value::Object(properties)) = root.get_mut("properties") {
            properties.insert(
                "apiVersion".into(),
                json!({"const": API_VERSION, "description": "The policy API version."}),
            );
            properties.insert(
                "kind".into(),
                json!({"const": kind, "description": "The kind of this document."}),
            );
        }
    }
    (kind.to_owned(), schema)
}

/// A schema that dispatches on `kind` to the kinds' schemas, all inlined so
/// that the file stands alone.
fn any_kind(kinds: &[(String, Value)]) -> Value {
    let mut definitions = Map::new();
    let mut branches = Vec::new();
    for (kind, schema) in kinds {
        let mut schema = schema.clone();
        if let Some(root) = schema.as_object_mut() {
            root.remove("$schema");
            if let Some(Value::Object(defs)) = root.remove("definitions") {
                // The same Rust type has the same schema in every kind.
                definitions.extend(defs);
            }
        }
        branches.push(json!({
            "if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
            "then": {"$ref": format!("#/definitions/{kind}")},
        }));
        definitions.insert(kind.clone(), schema);
    }
    let names: Vec<&str> = kinds.iter().map(|(k, _)| k.as_str()).collect();
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "infermesh policy document",
        "description": "One document of an infermesh mesh policy: a Backend, a ModelRoute, the MeshConfig, a LocalModel or an AuthorizationPolicy.",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": API_VERSION, "description": "The policy API version."},
            "kind": {"enum": names, "description": "The kind of this document."},
        },
        "allOf": branches,
        "definitions": definitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema_of(name: &str) -> Value {
        let file = schemas()
            .into_iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no {name}"));
        serde_json::from_str(&file.json).unwrap()
    }

    #[test]
    fn there_is_a_schema_per_kind_and_one_for_any_kind() {
        let names: Vec<String> = schemas().into_iter().map(|f| f.name).collect();
        assert_eq!(
            names,
            [
                "backend.schema.json",
                "modelroute.schema.json",
                "meshconfig.schema.json",
                "localmodel.schema.json",
                "authorizationpolicy.schema.json",
                "policy.schema.json"
            ]
        );
    }

    #[test]
    fn a_kind_schema_pins_api_version_and_kind_and_refuses_unknown_fields() {
        let schema = schema_of("modelroute.schema.json");
        assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
        assert_eq!(schema["properties"]["kind"]["const"], "ModelRoute");
        assert_eq!(schema["properties"]["apiVersion"]["const"], API_VERSION);
        assert_eq!(schema["additionalProperties"], false);
        let spec = &schema["definitions"]["ModelRouteSpec"];
        assert_eq!(spec["additionalProperties"], false);
        let fields: Vec<&String> = spec["properties"].as_object().unwrap().keys().collect();
        assert_eq!(
            fields,
            [
                "accessLog",
                "backends",
                "fallback",
                "faults",
                "hedging",
                "listener",
                "match",
                "mirror",
                "rateLimits",
                "retries",
                "timeouts",
                "workloadSelector"
            ]
        );
        assert_eq!(spec["required"], json!(["backends"]));
    }

    #[test]
    fn field_docs_defaults_and_durations_reach_the_schema() {
        let schema = schema_of("backend.schema.json");
        let spec = &schema["definitions"]["BackendSpec"];
        assert!(spec["properties"]["endpoints"]["description"]
            .as_str()
            .unwrap()
            .starts_with("Endpoints as `host:port`"));
        assert_eq!(spec["properties"]["connectTimeout"]["default"], "2s");
        assert_eq!(spec["properties"]["balancer"]["default"], "peak-ewma");
        let duration = &schema["definitions"]["Duration"];
        assert_eq!(duration["type"], "string");
        assert!(duration["pattern"].is_string());
        let optional = &schema["definitions"]["BackendSpec"]["properties"];
        assert!(optional.get("total").is_none());
        let route = schema_of("modelroute.schema.json");
        let timeouts = &route["definitions"]["RouteTimeouts"]["properties"];
        assert_eq!(timeouts["total"]["default"], "none");
        assert_eq!(timeouts["firstByte"]["default"], "5m");
    }

    #[test]
    fn the_any_kind_schema_dispatches_on_kind_and_stands_alone() {
        let schema = schema_of("policy.schema.json");
        assert_eq!(
            schema["properties"]["kind"]["enum"],
            json!([
                "Backend",
                "ModelRoute",
                "MeshConfig",
                "LocalModel",
                "AuthorizationPolicy"
            ])
        );
        let definitions = schema["definitions"].as_object().unwrap();
        for branch in schema["allOf"].as_array().unwrap() {
            let target = branch["then"]["$ref"].as_str().unwrap();
            let name = target.strip_prefix("#/definitions/").unwrap();
            assert!(definitions.contains_key(name), "{name}");
        }
        // Every reference anywhere resolves inside the file.
        let text = serde_json::to_string(&schema).unwrap();
        for part in text.split("\"$ref\":\"").skip(1) {
            let target = &part[..part.find('"').unwrap()];
            let name = target.strip_prefix("#/definitions/").unwrap();
            assert!(definitions.contains_key(name), "{target}");
        }
    }

    #[test]
    fn scoping_fields_are_described() {
        let schema = schema_of("meshconfig.schema.json");
        let selector = &schema["definitions"]["WorkloadSelector"];
        assert!(selector["properties"]["matchLabels"]["description"]
            .as_str()
            .unwrap()
            .contains("each with exactly this value"));
        assert_eq!(
            selector["properties"]["matchLabels"]["additionalProperties"]["type"],
            "string"
        );
    }
}
