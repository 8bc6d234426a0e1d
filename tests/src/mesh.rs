//! A mesh with identity: `infermesh-control` as the certificate authority
//! (its root generated on first start in a temporary directory), bootstrap
//! tokens for the workloads a test names, and proxies that obtain their
//! SPIFFE certificates from it. Also certificates minted by the test itself
//! (signed by the mesh's CA, by a stranger, expired, with the wrong names)
//! for peers such as `curl` and `openssl s_client`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::{ControlPlaneProcess, HttpClient, ProxyBuilder, ProxyProcess};

/// The control plane as CA, and where its files are.
pub struct Mesh {
    pub control: ControlPlaneProcess,
    dir: tempfile::TempDir,
}

/// `namespace/service-account`, the identities tokens are issued for.
pub type Workload<'a> = (&'a str, &'a str);

impl Mesh {
    /// Starts the control plane over `policies`, issuing certificates that
    /// live `lifetime` (`"24h"`, `"4s"`), with a token for each workload.
    pub fn start(policies: &[(&str, &str)], lifetime: &str, workloads: &[Workload<'_>]) -> Self {
        let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_wrapped(policies, lifetime, workloads, &[], any)
    }

    /// [`Mesh::start`] with the control plane run under `wrap` (`ip netns
    /// exec NODE`) and listening on `listen`. The mesh's directory, the
    /// root certificate and the token files are readable by every user
    /// (the CA's key stays private), for proxies running as another user.
    pub fn start_wrapped(
        policies: &[(&str, &str)],
        lifetime: &str,
        workloads: &[Workload<'_>],
        wrap: &[&str],
        listen: std::net::SocketAddr,
    ) -> Self {
        Self::launch(policies, lifetime, Some(workloads), &[], wrap, listen)
    }

    /// [`Mesh::start`] with more `serve` flags (`--kubernetes --kubeconfig
    /// FILE`); `workloads: None` gives no `--bootstrap-tokens` file at all.
    pub fn start_with(
        policies: &[(&str, &str)],
        lifetime: &str,
        workloads: Option<&[Workload<'_>]>,
        extra_args: &[&str],
    ) -> Self {
        let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        Self::launch(policies, lifetime, workloads, extra_args, &[], any)
    }

    fn launch(
        policies: &[(&str, &str)],
        lifetime: &str,
        workloads: Option<&[Workload<'_>]>,
        extra_args: &[&str],
        wrap: &[&str],
        listen: std::net::SocketAddr,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("infermesh-mesh-")
            .tempdir()
            .expect("temporary mesh directory");
        let ca_dir = dir.path().join("ca");
        let tokens = dir.path().join("tokens");
        let mut args: Vec<&str> = vec![
            "--ca-dir",
            ca_dir.to_str().expect("UTF-8 path"),
            "--cert-lifetime",
            lifetime,
            // Not the default 0.0.0.0:8443: suites run side by side.
            "--webhook-listen",
            "127.0.0.1:0",
        ];
        if let Some(workloads) = workloads {
            let mut text = String::from("# namespace/service-account token\n");
            for (ns, sa) in workloads {
                text.push_str(&format!("{ns}/{sa} {}\n", token_for(ns, sa)));
            }
            std::fs::write(&tokens, text).expect("write the token file");
            args.extend(["--bootstrap-tokens", tokens.to_str().expect("UTF-8 path")]);
        }
        args.extend(extra_args);
        let control = ControlPlaneProcess::start_wrapped(policies, &args, wrap, listen);
        if !wrap.is_empty() {
            use std::os::unix::fs::PermissionsExt;
            let open = |path: &Path, mode: u32| {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()))
            };
            // The CA's directory stays 0700 (the control plane keeps its key
            // there); the root certificate is copied out of it.
            open(dir.path(), 0o755);
            let bundle = dir.path().join("bundle.crt");
            std::fs::copy(ca_dir.join("ca.crt"), &bundle).expect("copy the root certificate");
            open(&bundle, 0o644);
        }
        Self { control, dir }
    }

    /// The control plane's URL for proxies (`https://`).
    pub fn url(&self) -> String {
        format!("https://{}", self.control.grpc)
    }

    /// The root certificate (PEM file), the proxies' `--trust-bundle`
    /// (a world-readable copy when the mesh was started for pods).
    pub fn ca_cert(&self) -> PathBuf {
        let bundle = self.dir.path().join("bundle.crt");
        if bundle.exists() {
            return bundle;
        }
        self.dir.path().join("ca/ca.crt")
    }

    /// The root key (PEM file), for certificates the test mints.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.path().join("ca/ca.key")
    }

    /// A scratch directory for files a test writes.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `token` into a file and returns its path.
    pub fn token_file(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.token"));
        std::fs::write(&path, format!("{token}\n")).expect("write a token file");
        // Readable by a proxy running as another user (in a pod).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .expect("chmod 644 a token file");
        path
    }

    /// A proxy for workload `ns/sa` with its own token, following this
    /// control plane; add flags, then `start()` it.
    pub fn proxy(&self, ns: &str, sa: &str) -> ProxyBuilder {
        let token = self.token_file(&format!("{ns}-{sa}"), &token_for(ns, sa));
        self.proxy_with_token(ns, sa, &token)
    }

    /// A proxy for `ns/sa` presenting the token in `token_file`.
    pub fn proxy_with_token(&self, ns: &str, sa: &str, token_file: &Path) -> ProxyBuilder {
        ProxyProcess::builder()
            .no_config()
            .arg("--control-plane")
            .arg(&self.url())
            .arg("--identity-token-file")
            .arg(token_file.to_str().expect("UTF-8 path"))
            .arg("--trust-bundle")
            .arg(self.ca_cert().to_str().expect("UTF-8 path"))
            .arg("--workload-namespace")
            .arg(ns)
            .arg("--service-account")
            .arg(sa)
            .arg("--proxy-id")
            .arg(&format!("{ns}-{sa}"))
    }

    /// Mints a client certificate for `spiffe_id` signed by the mesh's
    /// root, valid from `not_before` to `not_after`; writes `NAME.crt` and
    /// `NAME.key` and returns their paths.
    pub fn mint(
        &self,
        name: &str,
        sans: &[San<'_>],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> (PathBuf, PathBuf) {
        let key_pem = std::fs::read_to_string(self.ca_key()).expect("read the CA key");
        let cert_pem = std::fs::read_to_string(self.ca_cert()).expect("read the CA certificate");
        let ca_key = KeyPair::from_pem(&key_pem).expect("the CA key");
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, ca_key).expect("the CA certificate");
        mint_with(self.dir.path(), name, sans, not_before, not_after, &issuer)
    }

    /// A certificate for `spiffe_id`, signed by the mesh, valid for a day.
    pub fn mint_valid(&self, name: &str, spiffe_id: &str) -> (PathBuf, PathBuf) {
        let now = SystemTime::now();
        self.mint(
            name,
            &[San::Uri(spiffe_id)],
            now - Duration::from_secs(60),
            now + Duration::from_secs(24 * 3600),
        )
    }

    /// A certificate for `spiffe_id` signed by a CA the mesh does not know.
    pub fn mint_untrusted(&self, name: &str, spiffe_id: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "a stranger's CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = Issuer::new(params, key);
        let now = SystemTime::now();
        mint_with(
            self.dir.path(),
            name,
            &[San::Uri(spiffe_id)],
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
            &issuer,
        )
    }
}

/// A subject alternative name of a minted certificate.
#[derive(Debug, Clone, Copy)]
pub enum San<'a> {
    Uri(&'a str),
    Dns(&'a str),
}

fn mint_with(
    dir: &Path,
    name: &str,
    sans: &[San<'_>],
    not_before: SystemTime,
    not_after: SystemTime,
    issuer: &Issuer<'_, KeyPair>,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().expect("a key");
    let mut params = CertificateParams::default();
    for san in sans {
        params.subject_alt_names.push(match san {
            San::Uri(uri) => SanType::URI((*uri).try_into().expect("an ASCII URI")),
            San::Dns(dns) => SanType::DnsName((*dns).try_into().expect("an ASCII name")),
        });
    }
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let cert = params
        .signed_by(&key, issuer)
        .expect("sign the certificate");
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem()).expect("write the certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
    (cert_path, key_path)
}

/// The bootstrap token of `ns/sa` in test meshes: fixed per identity so a
/// test can also present another workload's token on purpose.
pub fn token_for(ns: &str, sa: &str) -> String {
    format!("test-token-{ns}-{sa}-0123456789")
}

/// Waits until the proxy's `/ready` answers 200; panics with its last
/// answer after `timeout`.
pub async fn wait_ready(proxy: &ProxyProcess, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let client = HttpClient::http1();
    loop {
        let reply = client.get(&format!("{}/ready", proxy.admin_url())).await;
        if reply.status == 200 {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "the proxy is not ready after {timeout:?}: {} {}\n--- stderr\n{}",
                reply.status,
                reply.text(),
                proxy.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `curl` with `args`, returning (exit code, stdout, stderr).
pub fn curl(args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed (scripts/setup.sh installs it)");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The callers' side of a meshed model server: mesh-wide outbound routes
/// (`/v1/` to `llama-mesh`, KServe gRPC to `infer-mesh`) to the server
/// proxy's inbound listener at `inbound` over mutual TLS, expecting the
/// identity `server`.
pub fn meshed_client_policy(inbound: std::net::SocketAddr, server: &str) -> String {
    format!(
        r#"apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{name: llama-mesh}}
spec:
  endpoints: ["{inbound}"]
  mtls: {{identity: "{server}"}}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{name: infer-mesh}}
spec:
  endpoints: ["{inbound}"]
  protocol: http2
  mtls: {{identity: "{server}"}}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {{name: to-llama}}
spec:
  match: [{{path: {{prefix: /v1/}}}}]
  backends: [{{backend: llama-mesh}}]
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {{name: to-infer}}
spec:
  match: [{{grpc: {{service: inference.GRPCInferenceService}}}}]
  backends: [{{backend: infer-mesh}}]
"#
    )
}
