//! The mesh's certificate authority: a root (generated on first start and
//! kept on disk, or given as files), an optional intermediate that signs in
//! its place, and the signing of proxies' CSRs into short-lived SPIFFE
//! certificates.
//!
//! Keys are kept as SSH keeps them: a generated CA directory is created
//! `0700` and its key `0600`, and a private key that group or others may
//! read or write is refused at start with the file and the fix. Workload
//! certificates carry the key usages RFC 5480 and RFC 8813 allow for their
//! key: `digitalSignature` for EC and Ed25519 keys, plus
//! `keyEncipherment` only for RSA keys, which must have at least
//! [`MIN_RSA_BITS`] bits.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use infermesh_proto::spiffe::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::{FromDer, SubjectPublicKeyInfo, X509Certificate};
use x509_parser::public_key::PublicKey;

/// Where the authority's keys come from.
#[derive(Debug, Clone, Default)]
pub struct CaSettings {
    /// Directory holding `ca.crt` and `ca.key`; a root is generated there
    /// when both are missing.
    pub dir: Option<PathBuf>,
    /// Root certificate and key files (PEM), instead of `dir`.
    pub root: Option<(PathBuf, PathBuf)>,
    /// Intermediate certificate and key files (PEM) that sign leaves.
    pub intermediate: Option<(PathBuf, PathBuf)>,
    /// Lifetime of a leaf when the CSR asks for none.
    pub default_lifetime: Duration,
    /// Longest lifetime a leaf gets, whatever it asks for.
    pub max_lifetime: Duration,
}

/// How long a generated root is valid.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves start this far in the past, so that a peer whose clock is a
/// little behind does not see a certificate from the future.
const BACKDATE: Duration = Duration::from_secs(60);
/// The shortest lifetime a leaf may have.
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// The smallest RSA key the authority signs (NIST SP 800-131A).
pub const MIN_RSA_BITS: usize = 2048;

/// A signed leaf.
#[derive(Debug, Clone)]
pub struct Signed {
    /// Leaf first, then intermediates, DER.
    pub chain: Vec<CertificateDer<'static>>,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The request itself is bad: the caller's fault.
    #[error("{0}")]
    BadRequest(String),
    /// A DNS name for the leaf is not one rcgen accepts: ours (the names
    /// come from the control plane's own settings).
    #[error("cannot sign: bad DNS name {name:?}: {source}")]
    DnsName {
        /// The name.
        name: String,
        /// What rcgen said.
        #[source]
        source: rcgen::Error,
    },
    /// The authority could not sign: ours.
    #[error("cannot sign: {0}")]
    Internal(#[source] rcgen::Error),
}

/// Why the authority could not be loaded or generated; each message names
/// the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Neither a CA directory nor root files were given.
    #[error("no certificate authority configured")]
    NotConfigured,
    /// A CA directory holds one file of the pair but not the other.
    #[error("{} exists but {} is missing", .present.display(), .missing.display())]
    HalfPair {
        /// The file that exists.
        present: PathBuf,
        /// The file that does not.
        missing: PathBuf,
    },
    /// A file could not be read (or its mode looked up).
    #[error("{}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// A certificate file holds no PEM certificate.
    #[error("{}: not a PEM certificate: {source}", .path.display())]
    NotPemCertificate {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A key file holds no usable PEM private key.
    #[error("{}: not a PEM private key: {source}", .path.display())]
    NotPemKey {
        /// The file.
        path: PathBuf,
        /// What rcgen said.
        #[source]
        source: rcgen::Error,
    },
    /// A certificate file's certificate cannot be parsed.
    #[error("{}: unreadable certificate: {source}", .path.display())]
    UnreadableCertificate {
        /// The file.
        path: PathBuf,
        /// What the X.509 parser said.
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    /// A private key that group or others may read or write.
    #[error(
        "{}: the private key is open to group or others (mode {mode:04o}); run `chmod 600 {}` \
         (for a Kubernetes Secret volume, set defaultMode: 0400)",
        .path.display(),
        .path.display()
    )]
    OpenKey {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key does not belong to the certificate.
    #[error("{} is not the key of {}", .key.display(), .cert.display())]
    WrongKey {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// The certificate may not sign certificates.
    #[error("{}: not a CA certificate (basicConstraints CA:TRUE is missing)", .path.display())]
    NotCa {
        /// The certificate file.
        path: PathBuf,
    },
    /// rcgen refuses the issuing certificate.
    #[error("cannot use the issuing certificate: {0}")]
    Issuer(#[source] rcgen::Error),
    /// The CA directory cannot be created.
    #[error("cannot create {}: {source}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// A root key cannot be generated.
    #[error("cannot generate the CA key: {0}")]
    GenerateKey(#[source] rcgen::Error),
    /// A generated root cannot be self-signed.
    #[error("cannot self-sign the CA: {0}")]
    SelfSign(#[source] rcgen::Error),
    /// A generated file cannot be written.
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
}

/// The authority.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// Intermediates between the leaf and the root (empty without one).
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    default_lifetime: Duration,
    max_lifetime: Duration,
}

impl std::fmt::Debug for Authority {
    // The signing key stays out of every log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("intermediates", &self.intermediates.len())
            .field("roots", &self.roots.len())
            .field("default_lifetime", &self.default_lifetime)
            .field("max_lifetime", &self.max_lifetime)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads the root (and intermediate) from files, or generates a root in
    /// `dir` on first start. Errors name the file and the reason.
    pub fn load(settings: &CaSettings) -> Result<Self, CaError> {
        let (root_cert, root_key) = match (&settings.root, &settings.dir) {
            (Some((cert, key)), _) => (cert.clone(), key.clone()),
            (None, Some(dir)) => {
                let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
                match (cert.exists(), key.exists()) {
                    (true, true) => warn_if_open(dir),
                    (false, false) => generate_root(dir, &cert, &key)?,
                    (true, false) => {
                        return Err(CaError::HalfPair {
                            present: cert,
                            missing: key,
                        })
                    }
                    (false, true) => {
                        return Err(CaError::HalfPair {
                            present: key,
                            missing: cert,
                        })
                    }
                }
                (cert, key)
            }
            (None, None) => return Err(CaError::NotConfigured),
        };
        let (root_der, root_pair) = read_pair(&root_cert, &root_key)?;
        let (issuer_der, issuer_pair, intermediates) = match &settings.intermediate {
            Some((cert, key)) => {
                let (der, pair) = read_pair(cert, key)?;
                (der.clone(), pair, vec![der])
            }
            None => (root_der.clone(), root_pair, Vec::new()),
        };
        let issuer = Issuer::from_ca_cert_der(&issuer_der, issuer_pair).map_err(CaError::Issuer)?;
        Ok(Self {
            issuer,
            intermediates,
            roots: vec![root_der],
            default_lifetime: settings.default_lifetime,
            max_lifetime: settings.max_lifetime,
        })
    }

    /// The roots peers verify against.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The lifetime a request asking for `asked` gets.
    pub fn lifetime(&self, asked: Option<Duration>) -> Duration {
        asked
            .unwrap_or(self.default_lifetime)
            .clamp(MIN_LIFETIME, self.max_lifetime)
    }

    /// Signs `csr` (DER) into a leaf for `identity`. The CSR's signature
    /// proves the caller holds the key; its names are ignored.
    pub fn sign_csr(
        &self,
        identity: &SpiffeId,
        csr: &[u8],
        lifetime: Option<Duration>,
    ) -> Result<Signed, SignError> {
        // The key is judged before the signature: a weak RSA key also fails
        // ring's signature check, and "invalid signature" would hide why.
        let (_, parsed) = X509CertificationRequest::from_der(csr).map_err(|e| {
            SignError::BadRequest(format!(
                "the CSR is not a valid signed PKCS#10 request: {e}"
            ))
        })?;
        check_key(&parsed.certification_request_info.subject_pki)?;
        let der = CertificateSigningRequestDer::from(csr);
        let request = CertificateSigningRequestParams::from_der(&der).map_err(|e| {
            SignError::BadRequest(format!(
                "the CSR is not a valid signed PKCS#10 request: {e}"
            ))
        })?;
        self.sign_key(identity, &request.public_key, &[], lifetime)
    }

    /// Signs a leaf for `identity` over `public_key`, with extra DNS names
    /// (the control plane's own serving certificate has some).
    pub fn sign_key(
        &self,
        identity: &SpiffeId,
        public_key: &impl PublicKeyData,
        dns_names: &[String],
        lifetime: Option<Duration>,
    ) -> Result<Signed, SignError> {
        let lifetime = self.lifetime(lifetime);
        let now = SystemTime::now();
        let not_after = now + lifetime;
        let mut params = CertificateParams::default();
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(serial());
        let mut dn = DistinguishedName::new();
        // Informational only; peers read the identity from the URI SAN.
        dn.push(DnType::OrganizationName, identity.trust_domain());
        params.distinguished_name = dn;
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e| SignError::BadRequest(format!("identity is not ASCII: {e}")))?;
        params.subject_alt_names.push(SanType::URI(uri));
        for name in dns_names {
            let dns = name
                .clone()
                .try_into()
                .map_err(|source| SignError::DnsName {
                    name: name.clone(),
                    source,
                })?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = leaf_key_usages(&public_key.subject_public_key_info());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(public_key, &self.issuer)
            .map_err(SignError::Internal)?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(Signed { chain, not_after })
    }
}

/// Refuses a key the authority does not sign: an RSA key under
/// [`MIN_RSA_BITS`].
fn check_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<(), SignError> {
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() < MIN_RSA_BITS => {
            Err(SignError::BadRequest(format!(
                "key too small: the CSR's RSA key has {} bits; the mesh CA signs RSA keys of at \
                 least {MIN_RSA_BITS} bits (or ECDSA P-256, what proxies generate)",
                rsa.key_size()
            )))
        }
        _ => Ok(()),
    }
}

/// Key usages of a leaf over `spki` (DER): key encipherment only for RSA,
/// the one key type that can encipher (RFC 5480 section 3 forbids it for
/// EC keys; RFC 8410 for Ed25519).
fn leaf_key_usages(spki: &[u8]) -> Vec<KeyUsagePurpose> {
    let rsa = SubjectPublicKeyInfo::from_der(spki)
        .ok()
        .is_some_and(|(_, info)| matches!(info.parsed(), Ok(PublicKey::RSA(_))));
    if rsa {
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]
    } else {
        vec![KeyUsagePurpose::DigitalSignature]
    }
}

/// Refuses a private key file that group or others may read or write,
/// naming the file and the fix. The mode is that of the file a symlink
/// points at (a Kubernetes Secret volume's `..data` link included).
fn check_key_mode(key: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(key)
        .map_err(|source| CaError::Read {
            path: key.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    // In a Kubernetes Secret volume (its files are links through `..data`)
    // the kubelet makes every file readable by the pod's `fsGroup`, a group
    // of that pod alone: group read is allowed there, nothing else.
    let allowed = if in_secret_volume(key) { 0o040 } else { 0 };
    if mode & 0o077 & !allowed != 0 {
        return Err(CaError::OpenKey {
            path: key.to_owned(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Whether `key` sits in a Kubernetes Secret volume: its directory holds
/// the `..data` link the kubelet's atomic writer makes.
fn in_secret_volume(key: &Path) -> bool {
    key.parent()
        .and_then(|dir| fs::symlink_metadata(dir.join("..data")).ok())
        .is_some_and(|meta| meta.file_type().is_symlink())
}

/// A new self-signed root, as the PEM certificate and key (for
/// `install`, which ships them in a Secret instead of a directory).
pub fn new_root() -> Result<(String, String), CaError> {
    let pair = KeyPair::generate().map_err(CaError::GenerateKey)?;
    let root = root_params()
        .self_signed(&pair)
        .map_err(CaError::SelfSign)?;
    Ok((root.pem(), pair.serialize_pem()))
}

/// Checks that `cert` and `key` are a root CA and its key, as `serve`
/// would on start.
pub fn check_root(cert: &Path, key: &Path) -> Result<(), CaError> {
    read_pair(cert, key).map(|_| ())
}

fn root_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "infermesh");
    dn.push(DnType::CommonName, "infermesh mesh root CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    params.serial_number = Some(serial());
    params
}

/// A random positive 16-byte serial number.
fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // The system RNG does not fail on Linux once booted; a zero serial
    // would still make a valid certificate.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn read_pair(cert: &Path, key: &Path) -> Result<(CertificateDer<'static>, KeyPair), CaError> {
    use rustls_pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_file(cert).map_err(|source| CaError::NotPemCertificate {
        path: cert.to_owned(),
        source,
    })?;
    check_key_mode(key)?;
    let key_pem = fs::read_to_string(key).map_err(|source| CaError::Read {
        path: key.to_owned(),
        source,
    })?;
    let pair = KeyPair::from_pem(&key_pem).map_err(|source| CaError::NotPemKey {
        path: key.to_owned(),
        source,
    })?;
    let (_, parsed) =
        X509Certificate::from_der(&der).map_err(|source| CaError::UnreadableCertificate {
            path: cert.to_owned(),
            source,
        })?;
    if parsed.public_key().raw != pair.subject_public_key_info().as_slice() {
        return Err(CaError::WrongKey {
            key: key.to_owned(),
            cert: cert.to_owned(),
        });
    }
    if !parsed.is_ca() {
        return Err(CaError::NotCa {
            path: cert.to_owned(),
        });
    }
    Ok((der, pair))
}

/// Generates a root in `dir` (created `0700` when missing): the key is
/// written first, readable by its owner only, and each file appears whole
/// (written aside, then renamed).
fn generate_root(dir: &Path, cert: &Path, key: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    warn_if_open(dir);
    let pair = KeyPair::generate().map_err(CaError::GenerateKey)?;
    let params = root_params();
    let root = params.self_signed(&pair).map_err(CaError::SelfSign)?;
    write_private(key, pair.serialize_pem().as_bytes(), 0o600)?;
    write_private(cert, root.pem().as_bytes(), 0o644)?;
    tracing::info!(dir = %dir.display(), "generated a new mesh root CA");
    Ok(())
}

fn write_private(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let aside = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        // A leftover from a crash keeps its old mode through `open`.
        match fs::remove_file(&aside) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&aside)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&aside, path)
    };
    write().map_err(|source| CaError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Warns when a CA directory that already existed lets group or others in:
/// they could replace the key or certificate the authority loads next.
fn warn_if_open(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(dir) {
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{mode:04o}"),
                "the CA directory is open to group or others; `chmod 700` it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> CaSettings {
        CaSettings {
            dir: Some(dir.to_owned()),
            default_lifetime: Duration::from_secs(3600),
            max_lifetime: Duration::from_secs(7200),
            ..CaSettings::default()
        }
    }

    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    /// A CSR (DER) over a new RSA key of `bits`, made by the openssl CLI.
    fn openssl_rsa_csr(dir: &Path, bits: u32) -> Vec<u8> {
        let key = dir.join(format!("rsa{bits}.key"));
        let csr = dir.join(format!("rsa{bits}.csr"));
        let status = std::process::Command::new("openssl")
            .args(["req", "-new", "-newkey"])
            .arg(format!("rsa:{bits}"))
            .args(["-nodes", "-subj", "/O=test", "-outform", "DER", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("the openssl CLI runs");
        assert!(status.success(), "openssl req failed");
        fs::read(csr).unwrap()
    }

    fn key_usage(der: &[u8]) -> x509_parser::extensions::KeyUsage {
        let (_, leaf) = X509Certificate::from_der(der).unwrap();
        *leaf.key_usage().unwrap().expect("a key usage").value
    }

    #[test]
    fn the_ca_directory_is_created_owner_only_and_an_open_key_is_refused() {
        let base = tempfile::tempdir().unwrap();
        chmod(base.path(), 0o755);
        let dir = base.path().join("state/ca");
        Authority::load(&settings(&dir)).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        // Made world-readable by a careless copy: refused with the fix.
        chmod(&dir.join("ca.key"), 0o644);
        let error = Authority::load(&settings(&dir)).unwrap_err().to_string();
        assert!(error.contains("ca.key"), "{error}");
        assert!(error.contains("mode 0644"), "{error}");
        assert!(error.contains("chmod 600"), "{error}");
        chmod(&dir.join("ca.key"), 0o640);
        assert!(Authority::load(&settings(&dir)).is_err());
        chmod(&dir.join("ca.key"), 0o400);
        Authority::load(&settings(&dir)).unwrap();
    }

    #[test]
    fn an_ec_leaf_has_no_key_encipherment_and_an_rsa_leaf_has() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load(&settings(dir.path())).unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let ec = KeyPair::generate().unwrap();
        let csr = CertificateParams::default().serialize_request(&ec).unwrap();
        let signed = ca.sign_csr(&id, csr.der(), None).unwrap();
        let usage = key_usage(&signed.chain[0]);
        assert!(usage.digital_signature());
        assert!(!usage.key_encipherment(), "{usage}");

        let rsa = openssl_rsa_csr(dir.path(), 2048);
        let signed = ca.sign_csr(&id, &rsa, None).unwrap();
        let usage = key_usage(&signed.chain[0]);
        assert!(
            usage.digital_signature() && usage.key_encipherment(),
            "{usage}"
        );
    }

    #[test]
    fn a_csr_with_a_weak_rsa_key_is_refused_as_too_small() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load(&settings(dir.path())).unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let weak = openssl_rsa_csr(dir.path(), 1024);
        let error = ca.sign_csr(&id, &weak, None).unwrap_err();
        assert!(matches!(error, SignError::BadRequest(_)), "{error}");
        assert!(error.to_string().starts_with("key too small"), "{error}");
        assert!(error.to_string().contains("1024 bits"), "{error}");
    }

    #[test]
    fn a_root_is_generated_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = Authority::load(&settings(dir.path())).unwrap();
        let second = Authority::load(&settings(dir.path())).unwrap();
        assert_eq!(first.roots(), second.roots());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_csr_becomes_a_leaf_with_only_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load(&settings(dir.path())).unwrap();
        let key = KeyPair::generate().unwrap();
        // The CSR asks for other names; the leaf carries only the identity.
        let csr = CertificateParams::new(vec!["evil.example".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/models/sa/llama".parse().unwrap();
        let signed = ca
            .sign_csr(&id, csr.der(), Some(Duration::from_secs(999_999)))
            .unwrap();
        assert_eq!(signed.chain.len(), 1);
        assert_eq!(SpiffeId::from_certificate(&signed.chain[0]).unwrap(), id);
        let (_, leaf) = X509Certificate::from_der(&signed.chain[0]).unwrap();
        let sans = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(sans.value.general_names.len(), 1);
        // Capped at the maximum lifetime.
        let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(life, 7200 + BACKDATE.as_secs() as i64);
    }

    #[test]
    fn an_intermediate_signs_in_the_roots_place() {
        let dir = tempfile::tempdir().unwrap();
        // A root, and an intermediate it signs, written as an operator would.
        let root = Authority::load(&settings(dir.path())).unwrap();
        let root_pem = fs::read_to_string(dir.path().join("ca.crt")).unwrap();
        let root_key =
            KeyPair::from_pem(&fs::read_to_string(dir.path().join("ca.key")).unwrap()).unwrap();
        let root_issuer = Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
        let mid_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "infermesh intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let mid = params.signed_by(&mid_key, &root_issuer).unwrap();
        fs::write(dir.path().join("mid.crt"), mid.pem()).unwrap();
        fs::write(dir.path().join("mid.key"), mid_key.serialize_pem()).unwrap();
        chmod(&dir.path().join("mid.key"), 0o600);
        let ca = Authority::load(&CaSettings {
            intermediate: Some((dir.path().join("mid.crt"), dir.path().join("mid.key"))),
            ..settings(dir.path())
        })
        .unwrap();
        assert_eq!(ca.roots(), root.roots());
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let signed = ca.sign_csr(&id, csr.der(), None).unwrap();
        // Leaf, then the intermediate; the leaf names the intermediate as issuer.
        assert_eq!(signed.chain.len(), 2);
        assert_eq!(signed.chain[1].as_ref(), mid.der().as_ref());
        let (_, leaf) = X509Certificate::from_der(&signed.chain[0]).unwrap();
        let (_, inter) = X509Certificate::from_der(&signed.chain[1]).unwrap();
        assert_eq!(leaf.issuer(), inter.subject());
        assert!(leaf.verify_signature(Some(inter.public_key())).is_ok());
    }

    #[test]
    fn garbage_is_not_a_csr() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load(&settings(dir.path())).unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let error = ca.sign_csr(&id, b"not a csr", None).unwrap_err();
        assert!(matches!(error, SignError::BadRequest(_)), "{error}");
        assert!(
            error.to_string().contains("not a valid signed PKCS#10"),
            "{error}"
        );
    }

    #[test]
    fn an_unreadable_key_file_is_named_and_keeps_the_io_error() {
        let dir = tempfile::tempdir().unwrap();
        Authority::load(&settings(dir.path())).unwrap();
        let missing = dir.path().join("gone.key");
        let error = Authority::load(&CaSettings {
            root: Some((dir.path().join("ca.crt"), missing.clone())),
            ..settings(dir.path())
        })
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(&format!("{}: ", missing.display())),
            "{error}"
        );
        let io = std::error::Error::source(&error)
            .and_then(|e| e.downcast_ref::<std::io::Error>())
            .expect("the io error is the source");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        Authority::load(&settings(a.path())).unwrap();
        Authority::load(&settings(b.path())).unwrap();
        let mixed = CaSettings {
            root: Some((a.path().join("ca.crt"), b.path().join("ca.key"))),
            ..settings(a.path())
        };
        let error = Authority::load(&mixed).unwrap_err().to_string();
        assert!(error.contains("is not the key of"), "{error}");
    }

    #[test]
    fn a_secret_volume_key_may_be_group_readable_and_nothing_more() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("tls.key");
        std::fs::write(&key, "key").unwrap();
        let chmod =
            |mode| std::fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
        chmod(0o440);
        assert!(matches!(
            check_key_mode(&key),
            Err(CaError::OpenKey { mode: 0o440, .. })
        ));
        // The kubelet's layout: files beside a `..data` link.
        std::fs::create_dir(dir.path().join("..2026")).unwrap();
        std::os::unix::fs::symlink("..2026", dir.path().join("..data")).unwrap();
        assert!(check_key_mode(&key).is_ok());
        chmod(0o444);
        assert!(matches!(
            check_key_mode(&key),
            Err(CaError::OpenKey { mode: 0o444, .. })
        ));
        chmod(0o460);
        assert!(check_key_mode(&key).is_err());
    }
}
