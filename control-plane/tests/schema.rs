//! The JSON Schemas shipped in `deploy/schemas/` are exactly what
//! `infermesh-control schema` generates from the policy types, so editors
//! never validate against a stale copy.

use std::fs;
use std::path::Path;
use std::process::Command;

const REGENERATE: &str = "cargo run -p infermesh-control -- schema --out deploy/schemas";

#[test]
fn the_committed_schemas_are_up_to_date() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/schemas");
    let fresh = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_infermesh-control"))
        .args(["schema", "--out"])
        .arg(fresh.path())
        .output()
        .expect("infermesh-control runs");
    assert!(output.status.success(), "{output:?}");

    let names = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}; run `{REGENERATE}`", dir.display()))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let generated = names(fresh.path());
    assert_eq!(
        generated,
        [
            "authorizationpolicy.schema.json",
            "backend.schema.json",
            "localmodel.schema.json",
            "meshconfig.schema.json",
            "modelroute.schema.json",
            "policy.schema.json"
        ]
    );
    assert_eq!(
        names(&committed),
        generated,
        "deploy/schemas holds other files; run `{REGENERATE}`"
    );
    for name in &generated {
        let want = fs::read_to_string(fresh.path().join(name)).expect("generated");
        let have = fs::read_to_string(committed.join(name)).expect("committed");
        assert!(
            want == have,
            "deploy/schemas/{name} is stale: run `{REGENERATE}`"
        );
        let schema: serde_json::Value = serde_json::from_str(&have).expect("JSON");
        assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    }
}

#[test]
fn schema_fails_clearly_when_it_cannot_write() {
    let output = Command::new(env!("CARGO_BIN_EXE_infermesh-control"))
        .args(["schema", "--out", "/proc/infermesh-cannot-write-here"])
        .output()
        .expect("infermesh-control runs");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot write schemas to"));
}
