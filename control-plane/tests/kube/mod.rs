//! Shared by the injection tests: YAML documents as JSON, and
//! `kubernetes-validate` (strict, every Kubernetes version from 1.29 the
//! package knows) run on them.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// Every non-empty document of a YAML text, as JSON.
pub fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("valid YAML"))
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

/// The interpreter: `$INFERMESH_PYTHON`, else `<repo>/.venv/bin/python`
/// (made by `scripts/setup.sh`), else `python3`.
fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("INFERMESH_PYTHON") {
        return PathBuf::from(path);
    }
    let venv = repo().join(".venv/bin/python");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("python3")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("control-plane/ sits in the workspace")
        .to_path_buf()
}

/// Validates every resource of `yaml` strictly against Kubernetes 1.29
/// through the newest version kubernetes-validate knows; panics with every
/// failure.
pub fn validate_all(yaml: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("resources.yaml");
    std::fs::write(&file, yaml).expect("write the resources");
    let output = Command::new(python())
        .arg(repo().join("tests/python/kube_validate.py"))
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; run scripts/setup.sh",
                python().display()
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "kubernetes-validate refused (run scripts/setup.sh if it is missing):\n{stdout}{stderr}\n{yaml}"
    );
    assert!(
        stdout.contains("checked 1.29 ") && stdout.contains(" 1.37"),
        "not every version from 1.29 to 1.37 was checked: {stdout}"
    );
}
