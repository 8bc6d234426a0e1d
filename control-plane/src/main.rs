//! `infermesh-control`: the infermesh control plane.
//!
//! `validate PATH` checks a policy file or a directory of them, as the
//! control plane does before publishing a snapshot, so that CI and editors
//! can refuse a bad policy before it reaches a cluster. `serve` watches a
//! policy directory and streams every valid version of it to the proxies
//! (`PolicyDiscovery.Subscribe`). `schema` writes the JSON Schemas of the
//! policy kinds, for editors.

#![forbid(unsafe_code)]

mod admin;
mod discovery;
mod metrics;
mod policies;
mod proxies;
mod serve;
mod snapshot;

use std::io::Write;
use std::net::SocketAddr;
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
    /// Serve the policies under a directory to proxies, following every change.
    ///
    /// Prints `listening grpc=IP:PORT admin=IP:PORT` once both are bound.
    /// A change is published as a new version only when the whole directory
    /// is valid; otherwise it is logged and the version in force stays.
    Serve {
        /// The policy directory (or a single policy file).
        #[arg(long, value_name = "DIR")]
        policies: PathBuf,
        /// Address of the policy gRPC server.
        #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// Address of the admin server (/live, /ready, /metrics, /proxies, /policy).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9091")]
        admin: SocketAddr,
    },
    /// Write the JSON Schema of every policy kind into a directory.
    Schema {
        /// Where to write `*.schema.json` (created when missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
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
        Command::Serve {
            policies,
            listen,
            admin,
        } => serve(serve::Settings {
            policies,
            listen,
            admin,
        }),
        Command::Schema { out } => schema(&out),
    }
}

fn serve(settings: serve::Settings) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("INFERMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("infermesh-control")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("infermesh-control: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(serve::run(settings));
    // Streams that did not close in the grace period are dropped here.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("infermesh-control: {message}");
            ExitCode::FAILURE
        }
    }
}

fn schema(out: &Path) -> ExitCode {
    let written = std::fs::create_dir_all(out).and_then(|()| {
        policy::schemas()
            .into_iter()
            .map(|file| {
                let path = out.join(&file.name);
                std::fs::write(&path, file.json).map(|()| path)
            })
            .collect::<std::io::Result<Vec<PathBuf>>>()
    });
    match written {
        Ok(paths) => {
            for path in paths {
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "infermesh-control: cannot write schemas to {}: {error}",
                out.display()
            );
            ExitCode::FAILURE
        }
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
            if set.backends.is_empty()
                && set.local_models.is_empty()
                && set.routes.is_empty()
                && set.mesh.is_none()
            {
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

/// `N documents (B backends, R routes)`, and the local models when there
/// are any.
fn summary(set: &PolicySet) -> String {
    let documents = set.backends.len()
        + set.local_models.len()
        + set.routes.len()
        + usize::from(set.mesh.is_some());
    let local = match set.local_models.len() {
        0 => String::new(),
        n => format!(", {n} local models"),
    };
    format!(
        "{documents} documents ({} backends, {} routes{local})",
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
