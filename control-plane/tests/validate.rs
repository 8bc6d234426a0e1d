//! `infermesh-control validate` as users and CI run it: every example policy
//! passes, and every file of the broken corpus fails with exactly the
//! errors recorded next to it.
//!
//! The corpus lives in `tests/broken/`: a file `NAME.yaml` (or a directory
//! `NAME/`, for checks across files) and `NAME.expected`, which holds the
//! expected output lines without the path that was validated: `LINE:COLUMN:
//! reason` for a file, `FILE:LINE:COLUMN: reason` (relative to the
//! directory) for a directory. The binary runs in `tests/` with the path
//! `broken/NAME.yaml`, so positions quoted inside messages read
//! `broken/NAME.yaml:L:C`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

fn validate(path: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infermesh-control"))
        .current_dir(tests_dir())
        .arg("validate")
        .arg(path)
        .args(extra)
        .output()
        .expect("infermesh-control runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    entries.sort();
    entries
}

#[test]
fn every_example_policy_is_valid() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut checked = Vec::new();
    for example in sorted_entries(&examples) {
        let output = validate(&example, &[]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{} is not valid:\n{}",
            example.display(),
            stdout(&output)
        );
        assert!(stdout(&output).starts_with("ok: "), "{}", stdout(&output));
        checked.push(example);
    }
    for scenario in ["openai-chat", "kserve-grpc", "kserve-rest", "timeouts"] {
        assert!(
            checked.iter().any(|p| p.ends_with(scenario)),
            "example {scenario} is missing"
        );
    }
}

#[test]
fn every_broken_policy_fails_with_exactly_the_expected_errors() {
    let broken = tests_dir().join("broken");
    let mut failures = Vec::new();
    let mut cases = 0;
    for path in sorted_entries(&broken) {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("UTF-8 file name")
            .to_owned();
        let (stem, separator) = if path.is_dir() {
            (name.as_str(), "/")
        } else if let Some(stem) = name.strip_suffix(".yaml") {
            (stem, ":")
        } else {
            continue;
        };
        cases += 1;
        let expected_file = broken.join(format!("{stem}.expected"));
        let expected = fs::read_to_string(&expected_file)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_file.display()));
        let arg = format!("broken/{name}");
        let want: String = expected
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| format!("{arg}{separator}{line}\n"))
            .collect();
        let output = validate(Path::new(&arg), &[]);
        let got = stdout(&output);
        if output.status.code() != Some(1) || got != want {
            failures.push(format!(
                "{arg}: exit {:?}\n--- expected\n{want}--- got\n{got}",
                output.status.code()
            ));
        }
    }
    assert!(cases >= 20, "only {cases} broken cases found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn json_output_carries_the_same_errors_as_text() {
    let path = Path::new("broken/many-errors.yaml");
    let text = validate(path, &[]);
    let json = validate(path, &["--output", "json"]);
    assert_eq!(json.status.code(), Some(1));
    let items: Vec<serde_json::Value> = serde_json::from_slice(&json.stdout).expect("a JSON array");
    let lines: Vec<String> = items
        .iter()
        .map(|item| {
            format!(
                "{}:{}:{}: {}",
                item["file"].as_str().expect("file"),
                item["line"].as_u64().expect("line"),
                item["column"].as_u64().expect("column"),
                item["message"].as_str().expect("message"),
            )
        })
        .collect();
    assert_eq!(lines, stdout(&text).lines().collect::<Vec<_>>());
    assert!(lines.len() > 5);
}

#[test]
fn a_valid_policy_prints_its_counts_and_json_prints_an_empty_array() {
    let dir = std::env::temp_dir().join(format!("infermesh-validate-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("policy.yaml");
    fs::write(
        &file,
        "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: vllm}
spec: {endpoints: [\"vllm:8000\"]}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: chat}
spec: {backends: [{backend: vllm}]}
---
apiVersion: infermesh.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {}
",
    )
    .expect("write policy");
    let text = validate(&file, &[]);
    let json = validate(&file, &["--output", "json"]);
    fs::remove_dir_all(&dir).expect("remove temp dir");
    assert_eq!(text.status.code(), Some(0));
    assert_eq!(stdout(&text), "ok: 3 documents (1 backends, 1 routes)\n");
    assert_eq!(json.status.code(), Some(0));
    assert_eq!(stdout(&json), "[]\n");
}

#[test]
fn a_path_that_does_not_exist_is_an_error_not_a_panic() {
    let output = validate(Path::new("no/such/policy.yaml"), &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stdout(&output).starts_with("no/such/policy.yaml:1:1: cannot read: "),
        "{}",
        stdout(&output)
    );
}
