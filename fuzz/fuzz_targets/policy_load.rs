//! The policy loader (`infermesh_proto::policy::load_str`): never panics, and
//! every error it reports names the file and a position inside the text.

#![no_main]

use std::path::Path;

use infermesh_proto::policy::load_str;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.yaml");
    let Err(errors) = load_str(file, text) else {
        return;
    };
    assert!(!errors.is_empty(), "an error result with no error");
    // YAML ends lines at LF, CR LF and a lone CR.
    let normalised = text.replace("\r\n", "\n").replace('\r', "\n");
    let lines: Vec<&str> = normalised.split('\n').collect();
    for error in &errors {
        assert_eq!(error.file, file);
        assert!(error.line >= 1 && error.column >= 1, "{error}");
        assert!(
            error.line <= lines.len(),
            "{error}: past the last line ({})",
            lines.len()
        );
        let line = lines[error.line - 1];
        assert!(
            error.column <= line.chars().count() + 1,
            "{error}: past the end of line {:?}",
            line
        );
        assert!(!error.message.is_empty(), "{error}: no reason");
        let shown = error.to_string();
        let at = format!("fuzz.yaml:{}:{}: ", error.line, error.column);
        assert!(
            shown.starts_with(&at),
            "{shown:?} does not start with {at:?}"
        );
    }
});
