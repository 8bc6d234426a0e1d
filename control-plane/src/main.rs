//! `infermesh-control`: the infermesh control plane.
//!
//! `validate PATH` checks a policy file or a directory of them, as the
//! control plane does before publishing a snapshot, so that CI and editors
//! can refuse a bad policy before it reaches a cluster.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use infermesh_proto::policy::{self, PolicyError, PolicySet};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(name = "infermesh-control", version, about = "infermesh control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check mesh policy files: a file, or every *.yaml / *.yml under a directory.
    ///
    /// Exits 0 when every document is valid, 1 otherwise, printing one
    /// `FILE:LINE:COLUMN: reason` line per problem.
    Validate {
        /// A policy file or a directory of policy files.
        path: PathBuf,
        /// How problems are printed.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// `FILE:LINE:COLUMN: reason` lines.
    Text,
    /// A JSON array of `{file, line, column, message}` objects.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { path, output } => validate(&path, output),
    }
}

fn validate(path: &Path, output: Output) -> ExitCode {
    let result = policy::load_path(path);
    let report = match output {
        Output::Text => text_report(&result),
        Output::Json => json_report(&result),
    };
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (`| head`) must not turn a result into a panic.
    let _ = stdout
        .write_all(report.as_bytes())
        .and_then(|()| stdout.flush());
    match result {
        Ok(set) => {
            if set.backends.is_empty() && set.routes.is_empty() && set.mesh.is_none() {
                eprintln!(
                    "warning: no policy documents under {} (policy files end in .yaml or .yml)",
                    path.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            let files = {
                let mut files: Vec<&Path> = errors.iter().map(|e| e.file.as_path()).collect();
                files.dedup();
                files.len()
            };
            eprintln!(
                "{} problem{} in {} file{}",
                errors.len(),
                plural(errors.len()),
                files,
                plural(files)
            );
            ExitCode::FAILURE
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn text_report(result: &Result<PolicySet, Vec<PolicyError>>) -> String {
    match result {
        Ok(set) => format!("ok: {}\n", summary(set)),
        Err(errors) => errors.iter().map(|e| format!("{e}\n")).collect(),
    }
}

/// One error as `--output json` prints it.
#[derive(Serialize)]
struct JsonError<'a> {
    file: String,
    line: usize,
    column: usize,
    message: &'a str,
}

fn json_report(result: &Result<PolicySet, Vec<PolicyError>>) -> String {
    let errors: &[PolicyError] = match result {
        Ok(_) => &[],
        Err(errors) => errors,
    };
    let items: Vec<JsonError<'_>> = errors
        .iter()
        .map(|e| JsonError {
            file: e.file.display().to_string(),
            line: e.line,
            column: e.column,
            message: &e.message,
        })
        .collect();
    // Strings and integers always serialize; the fallback is never taken.
    let json = serde_json::to_string(&items)
        .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()));
    format!("{json}\n")
}

/// `N documents (B backends, R routes)`.
fn summary(set: &PolicySet) -> String {
    let documents = set.backends.len() + set.routes.len() + usize::from(set.mesh.is_some());
    format!(
        "{documents} documents ({} backends, {} routes)",
        set.backends.len(),
        set.routes.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_report_has_one_object_per_error() {
        let errors = vec![PolicyError {
            file: PathBuf::from("a.yaml"),
            line: 3,
            column: 5,
            message: "unknown field `x`".into(),
        }];
        let report = json_report(&Err(errors));
        assert_eq!(
            report,
            "[{\"file\":\"a.yaml\",\"line\":3,\"column\":5,\"message\":\"unknown field `x`\"}]\n"
        );
        let parsed: serde_json::Value = serde_json::from_str(&report).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!([{"file": "a.yaml", "line": 3, "column": 5, "message": "unknown field `x`"}])
        );
        assert_eq!(json_report(&Ok(PolicySet::default())), "[]\n");
    }

    #[test]
    fn an_empty_set_is_reported_as_zero_documents() {
        assert_eq!(
            text_report(&Ok(PolicySet::default())),
            "ok: 0 documents (0 backends, 0 routes)\n"
        );
    }
}
