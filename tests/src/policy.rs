//! Small builders for mesh policy YAML, so tests read as the policy they set up.

use std::fmt::Display;

/// A `kind: Backend` document. `extra` holds more `spec` fields, one per line,
/// unindented (e.g. `"protocol: http2\nbalancer: round-robin"`).
pub fn backend(name: &str, endpoints: &[impl Display], extra: &str) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata:\n  name: {name}\nspec:\n  endpoints: [{}]\n{}",
        endpoints.join(", "),
        indent(extra)
    )
}

/// A `kind: ModelRoute` document whose `spec` is `spec` (unindented YAML).
pub fn route(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata:\n  name: {name}\nspec:\n{}",
        indent(spec)
    )
}

/// A `kind: LocalModel` document over `model_dir`; `extra` holds more
/// `spec` fields, one per line, unindented.
pub fn local_model(name: &str, model_dir: &std::path::Path, extra: &str) -> String {
    format!(
        "apiVersion: infermesh.io/v1alpha1\nkind: LocalModel\nmetadata:\n  name: {name}\nspec:\n  modelDir: {:?}\n{}",
        model_dir.display().to_string(),
        indent(extra)
    )
}

/// A `kind: MeshConfig` document whose `spec` is `spec` (unindented YAML).
pub fn mesh(spec: &str) -> String {
    format!(
        "apiVersion: infermesh.io/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: mesh\nspec:\n{}",
        indent(spec)
    )
}

/// Joins documents into one multi-document YAML file.
pub fn docs(documents: &[String]) -> String {
    documents.join("---\n")
}

fn indent(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_indented_under_spec() {
        let text = docs(&[
            backend("a", &["127.0.0.1:1"], "protocol: http2"),
            route("r", "backends:\n  - backend: a\n"),
        ]);
        assert_eq!(
            text,
            "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata:\n  name: a\nspec:\n  endpoints: [\"127.0.0.1:1\"]\n  protocol: http2\n---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata:\n  name: r\nspec:\n  backends:\n    - backend: a\n"
        );
    }
}
