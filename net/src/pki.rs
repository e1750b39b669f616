//! The cluster's certificate authority: one self-signed ECDSA P-256 CA per cluster, which
//! issues every node (and client) a leaf certificate usable for both ends of mutual TLS.
//!
//! Layout of a TLS directory:
//!
//! - `ca.pem`: the CA certificate, which is all a node or a client trusts ([`load_roots`]);
//! - `ca.key`: the CA private key (mode 0600), only in the directory the CA lives in;
//! - `<name>.pem` + `<name>.key` (0600): the leaf certificate and key of node `name`.
//!
//! Certificates are created with rcgen and parsed with a small DER walk over the few fields
//! ferry needs (subject, public key, common name, subject alternative names).

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, PrivateKeyDer, UnixTime};

/// How long the CA certificate is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a leaf certificate is valid.
const LEAF_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// [`ClusterCa::issue`] issues a new leaf instead of reusing one that expires within this.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates start being valid this long before they are made, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Errors loading, creating or issuing certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not a PEM {what} ({detail}); restore the file from a backup, or remove it to have it made again", .path.display())]
    NotPem {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("{}: not a usable {what}: {detail}; restore the file from a backup, or remove it to have it made again", .path.display())]
    Invalid {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("{}: this key does not belong to the certificate in {}; put back the matching pair, or remove both to have new ones made", .key.display(), .cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{}: private key readable by group or others (mode {mode:o}); run `chmod 600 {}`, and consider the key compromised if others could log in", .path.display(), .path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{} exists but {} does not; put back {}, or remove {} to create a new CA (every node then needs a new certificate)", .present.display(), .missing.display(), .missing.display(), .present.display())]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("{}: this is the CA of {found:?}, not of cluster {cluster:?}; use the TLS directory of cluster {cluster:?}", .path.display())]
    ClusterMismatch {
        path: PathBuf,
        found: String,
        cluster: String,
    },
    #[error("{}: holds the CA certificate of another cluster; use a separate directory per cluster", .path.display())]
    ForeignCa { path: PathBuf },
    #[error(
        "{name:?} is not a valid node or DNS name: use letters, digits, '-' and '.', not \"ca\""
    )]
    InvalidName { name: String },
    #[error("cannot make the certificate for {name:?}: {source}")]
    Generate { name: String, source: rcgen::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The certificate authority of one cluster, with its private key.
pub struct ClusterCa {
    dir: PathBuf,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    /// The CA certificate re-made from the stored key and subject: rcgen signs with this. Its
    /// subject and key are those of `cert_der`, so what it signs chains to `cert_der`.
    issuer: rcgen::Certificate,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn ca_subject(cluster: &str) -> String {
    format!("ferry cluster {cluster} CA")
}

fn ca_params(cluster: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, ca_subject(cluster));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl ClusterCa {
    /// Loads `dir/ca.pem` + `dir/ca.key`, or creates them (ECDSA P-256, CN "ferry cluster
    /// `cluster` CA", 10 years) with `dir` 0700 (if this creates it) and the key 0600.
    ///
    /// A stored CA must belong to `cluster`, its key must match its certificate and the key
    /// must not be readable by group or others.
    pub fn load_or_create(dir: &Path, cluster: &str) -> Result<ClusterCa, PkiError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => Self::load(dir, cluster),
            (false, false) => Self::create(dir, cluster),
            (true, false) => Err(PkiError::Incomplete {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(PkiError::Incomplete {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    fn create(dir: &Path, cluster: &str) -> Result<ClusterCa, PkiError> {
        create_dir(dir)?;
        let name = ca_subject(cluster);
        let generate = |source| PkiError::Generate {
            name: name.clone(),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let mut params = ca_params(cluster);
        set_validity(&mut params, CA_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(generate)?;
        // The key first: a crash in between leaves a lone key, which load_or_create reports
        // instead of silently making a second CA.
        write_file(&dir.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
        let cert_pem = cert.pem();
        write_file(&dir.join("ca.pem"), cert_pem.as_bytes(), 0o644)?;
        Self::from_parts(dir, cluster, cert_pem, cert.der().clone(), key)
    }

    fn load(dir: &Path, cluster: &str) -> Result<ClusterCa, PkiError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        let cert_pem = read_text(&cert_path)?;
        let cert_der = parse_certs(&cert_path, &cert_pem)?.swap_remove(0);
        let key = read_key(&key_path)?;
        let fields = cert_fields(&cert_der).ok_or_else(|| bad_cert(&cert_path))?;
        if fields.spki != key.public_key_der().as_slice() {
            return Err(PkiError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        let found = common_name(fields.subject).unwrap_or_default();
        if found != ca_subject(cluster) {
            return Err(PkiError::ClusterMismatch {
                path: cert_path,
                found,
                cluster: cluster.to_string(),
            });
        }
        Self::from_parts(dir, cluster, cert_pem, cert_der, key)
    }

    fn from_parts(
        dir: &Path,
        cluster: &str,
        cert_pem: String,
        cert_der: CertificateDer<'static>,
        key: KeyPair,
    ) -> Result<ClusterCa, PkiError> {
        let cert_path = dir.join("ca.pem");
        let issuer = ca_params(cluster)
            .self_signed(&key)
            .map_err(|source| PkiError::Generate {
                name: ca_subject(cluster),
                source,
            })?;
        // Leaves name the issuer by the subject rcgen writes; it must be the stored one byte
        // for byte, or they would not chain to ca.pem.
        let stored = cert_fields(&cert_der).ok_or_else(|| bad_cert(&cert_path))?;
        let remade = cert_fields(issuer.der()).ok_or_else(|| bad_cert(&cert_path))?;
        if stored.subject != remade.subject {
            return Err(PkiError::Invalid {
                path: cert_path,
                what: "ferry CA certificate",
                detail: "its subject is not encoded the way ferry makes it".into(),
            });
        }
        let mut roots = RootCertStore::empty();
        roots.add(cert_der.clone()).map_err(|e| PkiError::Invalid {
            path: cert_path.clone(),
            what: "CA certificate",
            detail: e.to_string(),
        })?;
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| PkiError::Invalid {
            path: cert_path,
            what: "CA certificate",
            detail: format!("{e:?}"),
        })?;
        Ok(ClusterCa {
            dir: dir.to_path_buf(),
            cert_pem,
            cert_der,
            key,
            issuer,
            verifier,
        })
    }

    /// The CA certificate, PEM (the contents of `ca.pem`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The directory the CA was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A root store trusting this CA alone.
    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        // Parsed once already in from_parts.
        let _ = roots.add(self.cert_der.clone());
        roots
    }

    /// Issues (or reuses, if `dir/<name>.pem` exists, is signed by this CA, is valid for at
    /// least 30 more days, has the same SANs and its key is `dir/<name>.key`) a leaf
    /// certificate and key for `name`: CN = `name`, DNS SANs = `name` followed by `dns`, IP
    /// SANs = `ips`; usable for both server and client auth; valid 2 years. Written to
    /// `dir/<name>.pem` and `dir/<name>.key` (0600).
    ///
    /// `name` must be a DNS name (clients use it as the TLS server name); pass "localhost" in
    /// `dns` for a node that is also reached by that name. If `dir` has no `ca.pem` yet, this
    /// CA's certificate is written there, so [`load_roots`]`(dir)` trusts it; a `ca.pem` of
    /// another CA there is an error.
    pub fn issue(
        &self,
        dir: &Path,
        name: &str,
        dns: &[String],
        ips: &[IpAddr],
    ) -> Result<Identity, PkiError> {
        check_name(name)?;
        for d in dns {
            check_dns(d)?;
        }
        let mut want_dns = vec![name.to_ascii_lowercase()];
        for d in dns {
            let d = d.to_ascii_lowercase();
            if !want_dns.contains(&d) {
                want_dns.push(d);
            }
        }
        let mut want_ips: Vec<IpAddr> = Vec::new();
        for ip in ips {
            if !want_ips.contains(ip) {
                want_ips.push(*ip);
            }
        }
        create_dir(dir)?;
        self.ensure_roots_file(dir)?;

        if let Ok(id) = Identity::load(dir, name) {
            if self.still_good(&id, &want_dns, &want_ips) {
                return Ok(id);
            }
        }

        let generate = |source| PkiError::Generate {
            name: name.to_string(),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        for d in &want_dns {
            let d = d.clone().try_into().map_err(generate)?;
            params.subject_alt_names.push(SanType::DnsName(d));
        }
        for ip in &want_ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        set_validity(&mut params, LEAF_VALIDITY);
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(generate)?;

        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        write_file(&dir.join(format!("{name}.key")), key_pem.as_bytes(), 0o600)?;
        write_file(&dir.join(format!("{name}.pem")), cert_pem.as_bytes(), 0o644)?;
        Ok(Identity {
            name: name.to_string(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        })
    }

    /// Whether an existing identity can be handed out again for these SANs.
    fn still_good(&self, id: &Identity, dns: &[String], ips: &[IpAddr]) -> bool {
        let Some(later) = SystemTime::now()
            .checked_add(RENEW_BEFORE)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        else {
            return false;
        };
        if self
            .verifier
            .verify_client_cert(
                &id.chain[0],
                &id.chain[1..],
                UnixTime::since_unix_epoch(later),
            )
            .is_err()
        {
            return false;
        }
        let Some(sans) = cert_fields(&id.chain[0]).and_then(|f| subject_alt_names(f.extensions))
        else {
            return false;
        };
        let have_dns: Vec<String> = sans.dns.iter().map(|d| d.to_ascii_lowercase()).collect();
        same_set(&have_dns, dns) && same_set(&sans.ips, ips)
    }

    /// Makes sure `dir/ca.pem` is this CA's certificate, writing it if missing.
    fn ensure_roots_file(&self, dir: &Path) -> Result<(), PkiError> {
        let path = dir.join("ca.pem");
        if !exists(&path)? {
            return write_file(&path, self.cert_pem.as_bytes(), 0o644);
        }
        let text = read_text(&path)?;
        if parse_certs(&path, &text)?.contains(&self.cert_der) {
            Ok(())
        } else {
            Err(PkiError::ForeignCa { path })
        }
    }
}

fn same_set<T: PartialEq>(a: &[T], b: &[T]) -> bool {
    a.iter().all(|x| b.contains(x)) && b.iter().all(|x| a.contains(x))
}

/// A node's (or client's) certificate chain and private key.
pub struct Identity {
    /// The node name: the certificate's CN and first DNS SAN.
    pub name: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            name: self.name.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads `dir/<name>.pem` (the certificate chain, leaf first) and `dir/<name>.key`, which
    /// must match the leaf and not be readable by group or others.
    pub fn load(dir: &Path, name: &str) -> Result<Identity, PkiError> {
        check_name(name)?;
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        let chain = parse_certs(&cert_path, &read_text(&cert_path)?)?;
        let key = read_key(&key_path)?;
        let fields = cert_fields(&chain[0]).ok_or_else(|| bad_cert(&cert_path))?;
        if fields.spki != key.public_key_der().as_slice() {
            return Err(PkiError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        Ok(Identity {
            name: name.to_string(),
            chain,
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        })
    }

    /// The certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key of the leaf certificate.
    pub fn private_key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The DNS names in the leaf certificate (the name first).
    pub fn dns_names(&self) -> Vec<String> {
        self.sans().dns
    }

    /// The IP addresses in the leaf certificate.
    pub fn ips(&self) -> Vec<IpAddr> {
        self.sans().ips
    }

    fn sans(&self) -> Sans {
        cert_fields(&self.chain[0])
            .and_then(|f| subject_alt_names(f.extensions))
            .unwrap_or_default()
    }
}

/// The CA certificate(s) trusted by a node or a client: every certificate in `dir/ca.pem`.
pub fn load_roots(dir: &Path) -> Result<RootCertStore, PkiError> {
    let path = dir.join("ca.pem");
    let certs = parse_certs(&path, &read_text(&path)?)?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| PkiError::Invalid {
            path: path.clone(),
            what: "CA certificate",
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// A random bearer token: 32 bytes from ring's `SystemRandom`, hex.
pub fn random_token() -> String {
    let bytes = random_bytes::<32>();
    let mut s = String::with_capacity(64);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Random bytes from ring's `SystemRandom` (through the ring provider of rustls).
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut buf)
        .expect("the system random number generator failed");
    buf
}

/// A positive 16-byte serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = random_bytes::<16>();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(BACKDATE);
    params.not_after = epoch + now + validity;
}

fn check_name(name: &str) -> Result<(), PkiError> {
    if name.eq_ignore_ascii_case("ca") {
        return Err(PkiError::InvalidName {
            name: name.to_string(),
        });
    }
    check_dns(name)
}

fn check_dns(name: &str) -> Result<(), PkiError> {
    // DnsName allows neither '/' nor a leading '.', so the name is also a safe file name.
    if DnsName::try_from(name).is_err() || name.starts_with('.') || name.contains('/') {
        return Err(PkiError::InvalidName {
            name: name.to_string(),
        });
    }
    Ok(())
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(io_err(path))
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// Writes `path` whole or not at all: into a temporary file with `mode`, then renamed.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    // A stale temporary file would keep its old mode: start afresh.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    String::from_utf8(bytes).map_err(|_| PkiError::NotPem {
        path: path.to_path_buf(),
        what: "file",
        detail: "it is not text".into(),
    })
}

/// Every certificate in a PEM file; at least one.
fn parse_certs(path: &Path, text: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let not_pem = |detail: String| PkiError::NotPem {
        path: path.to_path_buf(),
        what: "certificate",
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(not_pem("no CERTIFICATE section".into()));
    }
    for cert in &certs {
        if cert_fields(cert).is_none() {
            return Err(bad_cert(path));
        }
    }
    Ok(certs)
}

/// A private key file: PEM, not readable by group or others, and a key rcgen can sign with.
fn read_key(path: &Path) -> Result<KeyPair, PkiError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = read_text(path)?;
    let der = PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| PkiError::NotPem {
        path: path.to_path_buf(),
        what: "private key",
        detail: e.to_string(),
    })?;
    KeyPair::try_from(&der).map_err(|e| PkiError::Invalid {
        path: path.to_path_buf(),
        what: "private key",
        detail: e.to_string(),
    })
}

fn bad_cert(path: &Path) -> PkiError {
    PkiError::Invalid {
        path: path.to_path_buf(),
        what: "certificate",
        detail: "its DER does not parse as X.509".into(),
    }
}

/// The subject alternative names of a certificate.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Sans {
    pub(crate) dns: Vec<String>,
    pub(crate) ips: Vec<IpAddr>,
}

/// The node name of a certificate: its CN, or else its first DNS SAN.
pub(crate) fn cert_name(cert: &[u8]) -> Option<String> {
    let fields = cert_fields(cert)?;
    common_name(fields.subject)
        .or_else(|| subject_alt_names(fields.extensions)?.dns.into_iter().next())
}

/// The parts of a certificate ferry reads.
struct CertFields<'a> {
    /// The subject Name, whole (tag and length included).
    subject: &'a [u8],
    /// The SubjectPublicKeyInfo, whole.
    spki: &'a [u8],
    /// The contents of the Extensions SEQUENCE, if any.
    extensions: Option<&'a [u8]>,
}

fn cert_fields(der: &[u8]) -> Option<CertFields<'_>> {
    use der::{expect, next, SEQUENCE};
    let mut input = der;
    let mut cert = expect(&mut input, SEQUENCE)?.value;
    let mut tbs = expect(&mut cert, SEQUENCE)?.value;
    let mut field = next(&mut tbs)?;
    if field.tag == 0xa0 {
        // [0] version
        field = next(&mut tbs)?;
    }
    if field.tag != der::INTEGER {
        return None; // serialNumber
    }
    expect(&mut tbs, SEQUENCE)?; // signature
    expect(&mut tbs, SEQUENCE)?; // issuer
    expect(&mut tbs, SEQUENCE)?; // validity
    let subject = expect(&mut tbs, SEQUENCE)?.raw;
    let spki = expect(&mut tbs, SEQUENCE)?.raw;
    let mut extensions = None;
    while let Some(field) = next(&mut tbs) {
        if field.tag == 0xa3 {
            let mut inner = field.value;
            extensions = Some(expect(&mut inner, SEQUENCE)?.value);
        }
    }
    Some(CertFields {
        subject,
        spki,
        extensions,
    })
}

/// The first commonName of a Name.
fn common_name(name: &[u8]) -> Option<String> {
    use der::{expect, next, OID, SEQUENCE, SET};
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut input = name;
    let mut rdns = expect(&mut input, SEQUENCE)?.value;
    while let Some(rdn) = next(&mut rdns) {
        if rdn.tag != SET {
            return None;
        }
        let mut atvs = rdn.value;
        while let Some(atv) = next(&mut atvs) {
            let mut atv = atv.value;
            if expect(&mut atv, OID)?.value == CN {
                return String::from_utf8(next(&mut atv)?.value.to_vec()).ok();
            }
        }
    }
    None
}

/// The DNS names and IP addresses of the subjectAltName extension (empty if there is none).
fn subject_alt_names(extensions: Option<&[u8]>) -> Option<Sans> {
    use der::{expect, next, OCTET_STRING, OID, SEQUENCE};
    const SAN: &[u8] = &[0x55, 0x1d, 0x11];
    let mut sans = Sans::default();
    let mut exts = extensions.unwrap_or_default();
    while let Some(ext) = next(&mut exts) {
        let mut ext = ext.value;
        if expect(&mut ext, OID)?.value != SAN {
            continue;
        }
        let mut value = next(&mut ext)?;
        if value.tag == der::BOOLEAN {
            value = next(&mut ext)?; // critical
        }
        if value.tag != OCTET_STRING {
            return None;
        }
        let mut inner = value.value;
        let mut names = expect(&mut inner, SEQUENCE)?.value;
        while let Some(name) = next(&mut names) {
            match name.tag {
                0x82 => sans.dns.push(String::from_utf8(name.value.to_vec()).ok()?),
                0x87 => sans.ips.push(match name.value.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(name.value).ok()?),
                    16 => IpAddr::from(<[u8; 16]>::try_from(name.value).ok()?),
                    _ => return None,
                }),
                _ => {}
            }
        }
    }
    Some(sans)
}

/// Just enough DER to walk a certificate.
mod der {
    pub const BOOLEAN: u8 = 0x01;
    pub const INTEGER: u8 = 0x02;
    pub const OCTET_STRING: u8 = 0x04;
    pub const OID: u8 = 0x06;
    pub const SEQUENCE: u8 = 0x30;
    pub const SET: u8 = 0x31;

    pub struct Tlv<'a> {
        pub tag: u8,
        pub value: &'a [u8],
        /// Tag, length and value.
        pub raw: &'a [u8],
    }

    /// Takes the next element off `input`.
    pub fn next<'a>(input: &mut &'a [u8]) -> Option<Tlv<'a>> {
        let all = *input;
        let (&tag, rest) = all.split_first()?;
        if tag & 0x1f == 0x1f {
            return None; // multi-byte tags: not in certificates ferry reads
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |len, &b| (len << 8) | usize::from(b));
            rest = &rest[n..];
            len
        };
        if rest.len() < len {
            return None;
        }
        let header = all.len() - rest.len();
        *input = &rest[len..];
        Some(Tlv {
            tag,
            value: &rest[..len],
            raw: &all[..header + len],
        })
    }

    /// Takes the next element off `input` if it has tag `tag`.
    pub fn expect<'a>(input: &mut &'a [u8], tag: u8) -> Option<Tlv<'a>> {
        let tlv = next(input)?;
        (tlv.tag == tag).then_some(tlv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "ferry-pki-unit-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn der_walk_reads_what_rcgen_writes() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec![
            "node-1".to_string(),
            "localhost".to_string(),
            "10.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "ferry");
        params.distinguished_name.push(DnType::CommonName, "node-1");
        let cert = params.self_signed(&key).unwrap();
        let fields = cert_fields(cert.der()).unwrap();
        assert_eq!(fields.spki, key.public_key_der().as_slice());
        assert_eq!(common_name(fields.subject).as_deref(), Some("node-1"));
        let sans = subject_alt_names(fields.extensions).unwrap();
        assert_eq!(sans.dns, ["node-1", "localhost"]);
        assert_eq!(
            sans.ips,
            [
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(cert_name(cert.der()).as_deref(), Some("node-1"));
    }

    #[test]
    fn cert_name_falls_back_to_the_first_dns_san() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["node-2".to_string()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(cert_name(cert.der()).as_deref(), Some("node-2"));
        assert!(cert_fields(b"\x30\x03\x02\x01").is_none());
        assert!(cert_name(b"junk").is_none());
    }

    #[test]
    fn random_tokens_are_64_hex_digits_and_differ() {
        let a = random_token();
        let b = random_token();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn corrupt_ca_pem_is_reported() {
        let dir = TempDir::new();
        ClusterCa::load_or_create(&dir.0, "c").unwrap();
        fs::write(dir.0.join("ca.pem"), "not a certificate\n").unwrap();
        let err = ClusterCa::load_or_create(&dir.0, "c").unwrap_err();
        assert!(matches!(err, PkiError::NotPem { .. }), "{err}");
        assert!(err.to_string().contains("ca.pem"), "{err}");

        let body = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        fs::write(dir.0.join("ca.pem"), body).unwrap();
        let err = ClusterCa::load_or_create(&dir.0, "c").unwrap_err();
        assert!(matches!(err, PkiError::Invalid { .. }), "{err}");

        let body = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        fs::write(dir.0.join("ca.pem"), body).unwrap();
        let err = ClusterCa::load_or_create(&dir.0, "c").unwrap_err();
        assert!(matches!(err, PkiError::NotPem { .. }), "{err}");
    }

    #[test]
    fn corrupt_key_is_reported() {
        let dir = TempDir::new();
        ClusterCa::load_or_create(&dir.0, "c").unwrap();
        let key = dir.0.join("ca.key");
        write_file(&key, b"garbage", 0o600).unwrap();
        let err = ClusterCa::load_or_create(&dir.0, "c").unwrap_err();
        assert!(matches!(err, PkiError::NotPem { .. }), "{err}");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn mismatched_ca_key_is_reported() {
        let a = TempDir::new();
        let b = TempDir::new();
        ClusterCa::load_or_create(&a.0, "c").unwrap();
        ClusterCa::load_or_create(&b.0, "c").unwrap();
        fs::copy(b.0.join("ca.key"), a.0.join("ca.key")).unwrap();
        let err = ClusterCa::load_or_create(&a.0, "c").unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn mismatched_leaf_key_is_reported() {
        let dir = TempDir::new();
        let ca = ClusterCa::load_or_create(&dir.0, "c").unwrap();
        ca.issue(&dir.0, "n1", &[], &[]).unwrap();
        ca.issue(&dir.0, "n2", &[], &[]).unwrap();
        fs::copy(dir.0.join("n2.key"), dir.0.join("n1.key")).unwrap();
        let err = Identity::load(&dir.0, "n1").unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
        // issue replaces the broken pair.
        let id = ca.issue(&dir.0, "n1", &[], &[]).unwrap();
        assert_eq!(id.name, "n1");
        Identity::load(&dir.0, "n1").unwrap();
    }

    #[test]
    fn loose_key_permissions_are_reported() {
        let dir = TempDir::new();
        ClusterCa::load_or_create(&dir.0, "c").unwrap();
        let key = dir.0.join("ca.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = ClusterCa::load_or_create(&dir.0, "c").unwrap_err();
        assert!(
            matches!(err, PkiError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn half_a_ca_is_not_replaced() {
        let dir = TempDir::new();
        ClusterCa::load_or_create(&dir.0, "c").unwrap();
        fs::remove_file(dir.0.join("ca.pem")).unwrap();
        let err = ClusterCa::load_or_create(&dir.0, "c").unwrap_err();
        assert!(matches!(err, PkiError::Incomplete { .. }), "{err}");
        assert!(dir.0.join("ca.key").exists());
    }

    #[test]
    fn another_clusters_ca_is_refused() {
        let dir = TempDir::new();
        ClusterCa::load_or_create(&dir.0, "east").unwrap();
        let err = ClusterCa::load_or_create(&dir.0, "west").unwrap_err();
        assert!(matches!(err, PkiError::ClusterMismatch { .. }), "{err}");

        let other = TempDir::new();
        let west = ClusterCa::load_or_create(&other.0, "west").unwrap();
        let err = west.issue(&dir.0, "n1", &[], &[]).unwrap_err();
        assert!(matches!(err, PkiError::ForeignCa { .. }), "{err}");
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = TempDir::new();
        let ca = ClusterCa::load_or_create(&dir.0, "c").unwrap();
        for name in ["ca", "../x", "a/b", "", "a b", ".hidden"] {
            let err = ca.issue(&dir.0, name, &[], &[]).unwrap_err();
            assert!(matches!(err, PkiError::InvalidName { .. }), "{name}: {err}");
        }
        let err = ca
            .issue(&dir.0, "ok", &["not ok".to_string()], &[])
            .unwrap_err();
        assert!(matches!(err, PkiError::InvalidName { .. }), "{err}");
    }
}
