//! `infermesh-control inject`: Kubernetes YAML in, the same YAML with the
//! sidecar added out.
//!
//! Documents are read as `serde_yaml_ng::Value`, whose mappings keep their
//! key order, so a resource that is not changed prints as it came (less its
//! comments); only a workload's pod template goes through
//! [`inject_pod`](super::inject_pod).

use serde_yaml_ng::Value as Yaml;

use super::{inject_pod, Config, Outcome};

/// Kinds whose pod template is `spec.template`.
const TEMPLATED: [&str; 6] = [
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "ReplicationController",
    "Job",
];

/// Why the input could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The YAML does not parse; with its position when the parser gave one.
    #[error("{0}")]
    Yaml(#[source] serde_yaml_ng::Error),
    /// A pod template cannot be read as JSON (a non-string key, say).
    #[error("{what}: {source}")]
    Template {
        /// `Deployment "web"`.
        what: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The injected template cannot be turned back into YAML.
    #[error("{what}: {source}")]
    Back {
        /// `Deployment "web"`.
        what: String,
        /// Why.
        #[source]
        source: serde_yaml_ng::Error,
    },
}

impl InjectError {
    /// `LINE:COLUMN` of a YAML error, when the parser gave one.
    pub fn location(&self) -> Option<(usize, usize)> {
        match self {
            InjectError::Yaml(error) => error.location().map(|l| (l.line(), l.column())),
            _ => None,
        }
    }
}

/// What happened to one workload, for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `Deployment "web"`.
    pub what: String,
    /// What injection did.
    pub outcome: Outcome,
}

/// The injected documents, as YAML, and a note per workload.
pub fn inject_text(text: &str, config: &Config) -> Result<(String, Vec<Note>), InjectError> {
    let mut docs = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let doc: Yaml = serde::Deserialize::deserialize(document).map_err(InjectError::Yaml)?;
        // An empty document (a trailing `---`) has nothing to print.
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    let mut notes = Vec::new();
    for doc in &mut docs {
        inject_resource(doc, config, &mut notes)?;
    }
    let mut out = String::new();
    for (i, doc) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        let text = serde_yaml_ng::to_string(doc).map_err(|source| InjectError::Back {
            what: describe(doc),
            source,
        })?;
        out.push_str(&text);
    }
    Ok((out, notes))
}

fn describe(doc: &Yaml) -> String {
    let kind = doc.get("kind").and_then(Yaml::as_str).unwrap_or("resource");
    match doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Yaml::as_str)
    {
        Some(name) => format!("{kind} {name:?}"),
        None => kind.to_string(),
    }
}

/// Injects one resource: a workload, a `List` of resources, or anything
/// else, which is left as it is.
fn inject_resource(
    doc: &mut Yaml,
    config: &Config,
    notes: &mut Vec<Note>,
) -> Result<(), InjectError> {
    let Some(kind) = doc.get("kind").and_then(Yaml::as_str).map(str::to_string) else {
        return Ok(());
    };
    let what = describe(doc);
    if kind.ends_with("List") {
        if let Some(items) = doc.get_mut("items").and_then(Yaml::as_sequence_mut) {
            for item in items {
                inject_resource(item, config, notes)?;
            }
        }
        return Ok(());
    }
    let template = if kind == "Pod" {
        Some(doc)
    } else if TEMPLATED.contains(&kind.as_str()) {
        doc.get_mut("spec").and_then(|s| s.get_mut("template"))
    } else if kind == "CronJob" {
        doc.get_mut("spec")
            .and_then(|s| s.get_mut("jobTemplate"))
            .and_then(|j| j.get_mut("spec"))
            .and_then(|s| s.get_mut("template"))
    } else {
        None
    };
    let Some(template) = template else {
        return Ok(());
    };
    let Some(map) = template.as_mapping_mut() else {
        return Ok(());
    };
    let to_json = |value: Option<&Yaml>| -> Result<serde_json::Value, InjectError> {
        match value {
            None => Ok(serde_json::Value::Object(Default::default())),
            Some(value) => serde_json::to_value(value).map_err(|source| InjectError::Template {
                what: what.clone(),
                source,
            }),
        }
    };
    let mut meta = to_json(map.get("metadata"))?;
    let mut spec = to_json(map.get("spec"))?;
    let outcome = inject_pod(&mut meta, &mut spec, config);
    if outcome == Outcome::Injected {
        for (key, value) in [("metadata", meta), ("spec", spec)] {
            let value = serde_yaml_ng::to_value(value).map_err(|source| InjectError::Back {
                what: what.clone(),
                source,
            })?;
            map.insert(Yaml::from(key), value);
        }
    }
    notes.push(Note { what, outcome });
    Ok(())
}
