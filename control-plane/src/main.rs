//! `infermesh-control`: the infermesh control plane.
//!
//! `validate PATH` checks a policy file or a directory of them, as the
//! control plane does before publishing a snapshot, so that CI and editors
//! can refuse a bad policy before it reaches a cluster. `serve` watches a
//! policy directory and streams every valid version of it to the proxies
//! (`PolicyDiscovery.Subscribe`). `schema` writes the JSON Schemas of the
//! policy kinds, for editors. `install` prints every Kubernetes manifest a
//! cluster needs.

#![forbid(unsafe_code)]

mod admin;
mod ca;
mod crd;
mod dashboard;
mod discovery;
mod identity;
mod inject;
mod install;
mod kubernetes;
mod metrics;
mod policies;
mod proxies;
mod serve;
mod snapshot;
mod tls;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use infermesh_proto::policy::{self, PolicyError, PolicySet};
use infermesh_proto::spiffe::IdentityError;
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
        /// The policy directory (or a single policy file). With
        /// `--kubernetes` and no `--policies`, the policies are the
        /// cluster's infermesh.io custom resources instead.
        #[arg(long, value_name = "DIR", required_unless_present = "kubernetes")]
        policies: Option<PathBuf>,
        /// Run against the Kubernetes API: Services and EndpointSlices for
        /// `Backend.service`, Pods for the workloads of proxies, TokenReviews
        /// for identity, and (without `--policies`) the policy custom
        /// resources. The API server and credentials come from `--kubeconfig`,
        /// else `KUBECONFIG`, else the pod's service account.
        #[arg(long)]
        kubernetes: bool,
        /// The kubeconfig file for `--kubernetes`.
        #[arg(long, value_name = "FILE", requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// With `--kubernetes`: policy resources in this namespace reach the
        /// whole mesh; those of any other namespace reach its proxies only.
        #[arg(long, value_name = "NAMESPACE", default_value = "infermesh-system")]
        root_namespace: String,
        /// Address of the policy gRPC server [default: 0.0.0.0:8080 with a
        /// CA, 127.0.0.1:8080 without one].
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Without a CA the policy stream is plaintext and unauthenticated:
        /// anyone who reaches it reads every namespace's policy. A
        /// `--listen` address other than loopback is refused without a CA
        /// unless this flag accepts that.
        #[arg(long)]
        insecure_listen: bool,
        /// Publish a policy set that routes nothing (no document, or every
        /// `ModelRoute` removed), or in which a file that held documents is
        /// blank. Without it such a set is refused and the
        /// snapshot in force stays, since an emptied or deleted file is far
        /// more often an accident than a wish; a set holding only a
        /// `MeshConfig` is always taken as meant.
        #[arg(long)]
        allow_empty_policy: bool,
        /// Address of the admin server (/live, /ready, /metrics, /proxies, /policy).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9091")]
        admin: SocketAddr,
        /// Address of the sidecar injection webhook (HTTPS, `POST /inject`);
        /// on only when the control plane is a CA, which issues its certificate.
        #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8443")]
        webhook_listen: SocketAddr,
        /// DNS names on the webhook's certificate: the Service the
        /// MutatingWebhookConfiguration names (repeat for several).
        #[arg(long = "webhook-name", value_name = "DNS",
              default_values_t = ["infermesh-control.infermesh-system.svc".to_string()])]
        webhook_names: Vec<String>,
        /// What the webhook injects.
        #[command(flatten)]
        inject: inject::Config,
        #[command(flatten)]
        ca: Box<CaArgs>,
    },
    /// Print every Kubernetes manifest a cluster needs: `kubectl apply -f
    /// <(infermesh-control install)` installs the mesh.
    ///
    /// A new mesh root CA is generated on each run unless --ca-cert/--ca-key
    /// give one; everything else is the same from run to run.
    Install(Box<InstallArgs>),
    /// Print Kubernetes workloads with the sidecar added.
    ///
    /// Reads YAML (one or more documents, `List`s) from FILE or stdin
    /// (`-` or nothing) and prints every document: Pods, Deployments,
    /// StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs get the
    /// sidecar, anything else passes through. What happened to each workload
    /// goes to stderr. This is what the admission webhook does to a pod.
    Inject {
        /// The YAML file; `-` or nothing reads stdin.
        file: Option<PathBuf>,
        #[command(flatten)]
        config: inject::Config,
        /// The mesh's trust domain, which the injected proxy's identity names.
        #[arg(long, default_value = infermesh_proto::spiffe::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Write the JSON Schema of every policy kind into a directory.
    Schema {
        /// Where to write `*.schema.json` (created when missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// The certificate authority. Giving `--ca-dir` or `--ca-cert` makes the
/// control plane the mesh's CA: the gRPC port then speaks TLS, serves the
/// Identity service, and the policy stream requires a mesh certificate.
#[derive(Debug, clap::Args)]
struct CaArgs {
    /// Directory of the CA's `ca.crt` and `ca.key`; a root is generated
    /// there on first start when both are missing.
    #[arg(long, value_name = "DIR", conflicts_with = "ca_cert")]
    ca_dir: Option<PathBuf>,
    /// Root certificate (PEM), with `--ca-key`, instead of `--ca-dir`.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Root private key (PEM).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Intermediate certificate (PEM) that signs workload certificates in
    /// the root's place, with `--intermediate-key`.
    #[arg(long, value_name = "FILE", requires = "intermediate_key")]
    intermediate_cert: Option<PathBuf>,
    /// Intermediate private key (PEM).
    #[arg(long, value_name = "FILE", requires = "intermediate_cert")]
    intermediate_key: Option<PathBuf>,
    /// Bootstrap tokens: lines of `<namespace>/<service-account> <token>`.
    /// Required with a CA unless `--kubernetes`, where pods present their
    /// projected service-account tokens (audience `infermesh`), verified by
    /// a TokenReview; bootstrap tokens still work beside them.
    #[arg(long, value_name = "FILE")]
    bootstrap_tokens: Option<PathBuf>,
    /// The mesh's trust domain.
    #[arg(long, default_value = infermesh_proto::spiffe::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Lifetime of workload certificates (down to 1s, for tests).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    cert_lifetime: std::time::Duration,
    /// Longest lifetime a proxy may ask for.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = humantime::parse_duration)]
    max_cert_lifetime: std::time::Duration,
    /// The control plane's own SPIFFE ID, on its serving certificate;
    /// `spiffe://<trust-domain>/ns/infermesh-system/sa/infermesh-control` by default.
    #[arg(long, value_name = "SPIFFE_ID")]
    identity: Option<infermesh_proto::spiffe::SpiffeId>,
    /// DNS names on the serving certificate (repeat for several).
    #[arg(long = "server-name", value_name = "DNS", default_values_t = ["localhost".to_string()])]
    server_names: Vec<String>,
}

/// What `install` prints.
#[derive(Debug, clap::Args)]
struct InstallArgs {
    /// The control plane's namespace.
    #[arg(long, default_value = "infermesh-system")]
    namespace: String,
    /// The control plane image.
    #[arg(long, value_name = "IMAGE", default_value = concat!("infermesh/control:", env!("CARGO_PKG_VERSION")))]
    control_image: String,
    /// The sidecar image the injector adds to pods.
    #[arg(long, value_name = "IMAGE", default_value = concat!("infermesh/proxy:", env!("CARGO_PKG_VERSION")))]
    proxy_image: String,
    /// Root certificate (PEM) of the mesh CA, with --ca-key, instead of a
    /// new one.
    #[arg(
        long,
        value_name = "FILE",
        requires = "ca_key",
        conflicts_with = "ca_placeholder"
    )]
    ca_cert: Option<PathBuf>,
    /// Root private key (PEM).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Leave the CA Secret, the trust bundle and the webhook's caBundle as
    /// a placeholder to fill (for a copy kept in version control).
    #[arg(long)]
    ca_placeholder: bool,
    /// Write one file per group of objects into DIR instead of stdout.
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
}

/// Why the serve command's flags do not fit together.
#[derive(Debug, thiserror::Error)]
enum FlagError {
    /// Flags that only mean something with a CA, without one.
    #[error(
        "--bootstrap-tokens and --intermediate-cert need a CA: give --ca-dir or --ca-cert/--ca-key"
    )]
    NoCa,
    /// The trust domain is not a valid SPIFFE trust domain.
    #[error("--trust-domain: {0}")]
    TrustDomain(#[source] IdentityError),
    /// A CA without bootstrap tokens or Kubernetes would sign for no one.
    #[error("a CA needs --bootstrap-tokens FILE or --kubernetes: proxies prove their identity with a bootstrap token or their service-account token")]
    NoTokens,
    /// Leaves must live at least a second.
    #[error("--cert-lifetime must be at least 1s")]
    Lifetime,
    /// The default identity cannot be made in this trust domain.
    #[error("{0}")]
    OwnIdentity(#[source] IdentityError),
    /// The policy stream would listen beyond loopback unprotected.
    #[error(transparent)]
    Listen(#[from] serve::ExposedListen),
}

impl CaArgs {
    /// The CA's settings; `kubernetes` makes bootstrap tokens optional.
    fn settings(self, kubernetes: bool) -> Result<Option<serve::IdentitySettings>, FlagError> {
        if self.ca_dir.is_none() && self.ca_cert.is_none() {
            if self.bootstrap_tokens.is_some() || self.intermediate_cert.is_some() {
                return Err(FlagError::NoCa);
            }
            return Ok(None);
        }
        infermesh_proto::spiffe::check_trust_domain(&self.trust_domain)
            .map_err(FlagError::TrustDomain)?;
        let tokens = self.bootstrap_tokens;
        if tokens.is_none() && !kubernetes {
            return Err(FlagError::NoTokens);
        }
        if self.cert_lifetime < ca::MIN_LIFETIME {
            return Err(FlagError::Lifetime);
        }
        let own_identity = match self.identity {
            Some(id) => id,
            None => infermesh_proto::spiffe::SpiffeId::new(
                &self.trust_domain,
                "infermesh-system",
                "infermesh-control",
            )
            .map_err(FlagError::OwnIdentity)?,
        };
        Ok(Some(serve::IdentitySettings {
            ca: ca::CaSettings {
                dir: self.ca_dir,
                root: self.ca_cert.zip(self.ca_key),
                intermediate: self.intermediate_cert.zip(self.intermediate_key),
                default_lifetime: self.cert_lifetime,
                max_lifetime: self.max_cert_lifetime.max(self.cert_lifetime),
            },
            tokens,
            trust_domain: self.trust_domain,
            own_identity,
            dns_names: self.server_names,
        }))
    }
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
            kubernetes,
            kubeconfig,
            root_namespace,
            listen,
            insecure_listen,
            allow_empty_policy,
            admin,
            webhook_listen,
            webhook_names,
            mut inject,
            ca,
        } => {
            inject.trust_domain = ca.trust_domain.clone();
            let settings = ca.settings(kubernetes).and_then(|identity| {
                let listen = serve::policy_listen(listen, identity.is_some(), insecure_listen)?;
                Ok(serve::Settings {
                    policies,
                    kubernetes: kubernetes.then_some(kubernetes::Settings {
                        kubeconfig,
                        root_namespace,
                    }),
                    listen,
                    admin,
                    identity,
                    allow_empty_policy,
                    webhook: serve::WebhookSettings {
                        listen: webhook_listen,
                        dns_names: webhook_names,
                        inject,
                    },
                })
            });
            match settings {
                Ok(settings) => serve(settings),
                Err(message) => {
                    eprintln!("infermesh-control: {message}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Install(args) => install(*args),
        Command::Schema { out } => schema(&out),
        Command::Inject {
            file,
            mut config,
            trust_domain,
        } => {
            config.trust_domain = trust_domain;
            inject_command(file.as_deref(), &config)
        }
    }
}

fn inject_command(file: Option<&Path>, config: &inject::Config) -> ExitCode {
    let file = file.filter(|f| *f != Path::new("-"));
    let name = file.map_or("<stdin>".to_string(), |f| f.display().to_string());
    let text = match file {
        Some(path) => std::fs::read_to_string(path),
        None => std::io::read_to_string(std::io::stdin()),
    };
    let text = match text {
        Ok(text) => text,
        Err(error) => {
            eprintln!("{name}: cannot read: {error}");
            return ExitCode::FAILURE;
        }
    };
    match inject::yaml::inject_text(&text, config) {
        Ok((out, notes)) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.flush());
            for note in notes {
                match note.outcome {
                    inject::Outcome::Injected => eprintln!("{}: injected", note.what),
                    inject::Outcome::AlreadyInjected => {
                        eprintln!("{}: already injected, left as it is", note.what)
                    }
                    inject::Outcome::OptedOut => {
                        eprintln!("{}: {}: disabled, left as it is", note.what, inject::INJECT)
                    }
                    inject::Outcome::Refused(reason) => {
                        eprintln!("warning: {name}: {}: not injected: {reason}", note.what)
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            match error.location() {
                Some((line, column)) => eprintln!("{name}:{line}:{column}: {error}"),
                None => eprintln!("{name}: {error}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn install(args: InstallArgs) -> ExitCode {
    let ca = match (args.ca_cert, args.ca_key, args.ca_placeholder) {
        (Some(cert), Some(key), _) => install::CaSource::Files { cert, key },
        (_, _, true) => install::CaSource::Placeholder,
        _ => install::CaSource::Generate,
    };
    let settings = install::Settings {
        namespace: args.namespace,
        control_image: args.control_image,
        proxy_image: args.proxy_image,
        ca,
    };
    let result = install::manifests(&settings).and_then(|groups| match &args.output {
        Some(dir) => install::write(&groups, dir).map(|paths| {
            for path in paths {
                println!("wrote {}", path.display());
            }
        }),
        None => {
            let mut stdout = std::io::stdout().lock();
            // A closed stdout (`| head`) is not an error worth a panic.
            let _ = stdout
                .write_all(install::render(&groups).as_bytes())
                .and_then(|()| stdout.flush());
            Ok(())
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("infermesh-control: {error}");
            ExitCode::FAILURE
        }
    }
}

fn serve(settings: serve::Settings) -> ExitCode {
    infermesh_admin::init_logging("info");
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
                && set.authorizations.is_empty()
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
        + set.authorizations.len()
        + usize::from(set.mesh.is_some());
    let local = match set.local_models.len() {
        0 => String::new(),
        n => format!(", {n} local models"),
    };
    let mut out = format!(
        "{documents} documents ({} backends, {} routes{local}",
        set.backends.len(),
        set.routes.len()
    );
    if !set.authorizations.is_empty() {
        let n = set.authorizations.len();
        out.push_str(&format!(
            ", {n} authorization polic{}",
            if n == 1 { "y" } else { "ies" }
        ));
    }
    out.push(')');
    out
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

    /// The CA's settings from `serve` arguments.
    fn ca_settings(args: &[&str]) -> Result<Option<serve::IdentitySettings>, FlagError> {
        let cli = Cli::try_parse_from(
            ["infermesh-control", "serve", "--policies", "p"]
                .iter()
                .chain(args),
        )
        .unwrap();
        let Command::Serve { ca, kubernetes, .. } = cli.command else {
            unreachable!("serve was parsed");
        };
        ca.settings(kubernetes)
    }

    #[test]
    fn a_ca_needs_bootstrap_tokens_unless_the_cluster_vouches() {
        let error = ca_settings(&["--ca-dir", "ca"]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("--bootstrap-tokens FILE or --kubernetes"),
            "{error}"
        );
        let kube = ca_settings(&["--ca-dir", "ca", "--kubernetes"])
            .unwrap()
            .unwrap();
        assert_eq!(kube.tokens, None);
        let both = ca_settings(&["--ca-dir", "ca", "--kubernetes", "--bootstrap-tokens", "t"])
            .unwrap()
            .unwrap();
        assert_eq!(both.tokens, Some(PathBuf::from("t")));
        assert!(matches!(
            ca_settings(&["--kubernetes", "--bootstrap-tokens", "t"]),
            Err(FlagError::NoCa)
        ));
    }

    #[test]
    fn an_empty_set_is_reported_as_zero_documents() {
        assert_eq!(
            text_report(&Ok(PolicySet::default())),
            "ok: 0 documents (0 backends, 0 routes)\n"
        );
    }
}
