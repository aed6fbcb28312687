//! The pool's own certificate authority and the identities it issues: the
//! coordinator's server certificate and each host's, signed from the host's
//! certificate signing request so that a host's private key never leaves
//! it. Every coordinator <-> host and host <-> host call is mTLS with this
//! CA only.
//!
//! This module owns key and certificate material: it writes private keys
//! with mode 0600, never logs one, and never hands one to a caller but the
//! identity that owns it.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The common name of the coordinator's certificate.
pub const COORDINATOR_NAME: &str = "hsev-coordinator";

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Generating, parsing or signing failed.
    #[error("{0}")]
    Certificate(#[from] rcgen::Error),
    /// A signing request that asks for something a host may not have.
    #[error("the certificate request {0}")]
    Request(String),
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Identity {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key; never logged.
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads `<dir>/<name>.pem` and `<dir>/<name>.key`.
    pub fn load(dir: &Path, name: &str) -> Result<Self, PkiError> {
        Ok(Identity {
            cert_pem: read(&dir.join(format!("{name}.pem")))?,
            key_pem: read(&dir.join(format!("{name}.key")))?,
        })
    }

    /// Writes `<dir>/<name>.pem` (0644) and `<dir>/<name>.key` (0600).
    pub fn save(&self, dir: &Path, name: &str) -> Result<(), PkiError> {
        create_dir(dir)?;
        write(
            &dir.join(format!("{name}.key")),
            self.key_pem.as_bytes(),
            0o600,
        )?;
        write(
            &dir.join(format!("{name}.pem")),
            self.cert_pem.as_bytes(),
            0o644,
        )
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let partial = path.with_extension("partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&partial)
        .map_err(io)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io)?;
    std::fs::rename(&partial, path).map_err(io)
}

/// SHA-256 of a certificate's DER, `sha256:<hex>`: how tokens and
/// revocations name a certificate.
pub fn fingerprint(pem: &str) -> Result<String, PkiError> {
    let der = pem::parse(pem)
        .map_err(|_| PkiError::Certificate(rcgen::Error::CouldNotParseCertificate))?;
    Ok(fingerprint_der(der.contents()))
}

/// Whether the certificate `pem` names `host` (a DNS subject alternative
/// name).
pub fn names_host(pem: &str, host: &str) -> bool {
    openssl::x509::X509::from_pem(pem.as_bytes())
        .ok()
        .and_then(|cert| cert.subject_alt_names())
        .is_some_and(|names| names.iter().any(|name| name.dnsname() == Some(host)))
}

fn dns_name(name: &str) -> SanType {
    SanType::DnsName(
        name.to_owned()
            .try_into()
            .unwrap_or_else(|_| "invalid".try_into().expect("ASCII")),
    )
}

/// [`fingerprint`] of DER bytes.
pub fn fingerprint_der(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(openssl::sha::sha256(der)))
}

/// The names a certificate is valid for: the host's name and its address.
fn subject_alt_names(name: &str, address: Option<IpAddr>) -> Vec<SanType> {
    let mut names = vec![dns_name(name)];
    if let Some(address) = address {
        names.push(SanType::IpAddress(address));
    }
    names
}

/// The pool's certificate authority, as the coordinator holds it.
pub struct PoolCa {
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for PoolCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolCa").finish_non_exhaustive()
    }
}

impl PoolCa {
    /// The CA kept in `dir` (`ca.pem`, `ca.key`), made on first use for
    /// the pool `pool`.
    pub fn open_or_create(dir: &Path, pool: &str) -> Result<Self, PkiError> {
        if dir.join("ca.pem").is_file() {
            let identity = Identity::load(dir, "ca")?;
            return Ok(PoolCa {
                key: KeyPair::from_pem(&identity.key_pem)?,
                cert_pem: identity.cert_pem,
            });
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("HyperSEV pool {pool} CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let ca = PoolCa {
            cert_pem: cert.pem(),
            key,
        };
        Identity {
            cert_pem: ca.cert_pem.clone(),
            key_pem: ca.key.serialize_pem(),
        }
        .save(dir, "ca")?;
        Ok(ca)
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's fingerprint, as join tokens carry it.
    pub fn fingerprint(&self) -> Result<String, PkiError> {
        fingerprint(&self.cert_pem)
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?)
    }

    fn leaf_params(name: &str, address: Option<IpAddr>) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = subject_alt_names(name, address);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(825);
        Ok(params)
    }

    /// The coordinator's own identity, for `address`. It is also the
    /// identity of the host agent beside it, so it names that host too:
    /// another host fetching a disk from the coordinator's host checks the
    /// host's name, as with any host.
    pub fn issue_coordinator(
        &self,
        host: &str,
        address: Option<IpAddr>,
    ) -> Result<Identity, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = Self::leaf_params(COORDINATOR_NAME, address)?;
        params.subject_alt_names.push(dns_name(host));
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A host's certificate from its signing request. The certificate
    /// names the host as the pool knows it, whatever the request says: a
    /// host cannot ask for another's name, nor for a CA.
    pub fn issue_host(
        &self,
        csr_pem: &str,
        name: &str,
        address: Option<IpAddr>,
    ) -> Result<String, PkiError> {
        if name == COORDINATOR_NAME {
            return Err(PkiError::Request(format!("names the coordinator ({name})")));
        }
        let mut request = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|error| PkiError::Request(format!("does not verify: {error}")))?;
        request.params = Self::leaf_params(name, address)?;
        Ok(request.signed_by(&self.issuer()?)?.pem())
    }
}

/// A new host's key and its certificate signing request; the key stays on
/// the host.
pub fn host_request(name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common_name(pem: &str) -> String {
        let cert = openssl::x509::X509::from_pem(pem.as_bytes()).expect("x509");
        let name = cert
            .subject_name()
            .entries_by_nid(openssl::nid::Nid::COMMONNAME)
            .next()
            .expect("a common name");
        name.data().to_string().expect("utf-8")
    }

    #[test]
    fn a_host_certificate_comes_from_its_request_and_names_the_host_as_the_pool_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = PoolCa::open_or_create(dir.path(), "test").expect("CA");
        let again = PoolCa::open_or_create(dir.path(), "test").expect("the same CA");
        assert_eq!(ca.cert_pem(), again.cert_pem());
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .map(|metadata| std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()))
            .expect("key file");
        assert_eq!(mode & 0o777, 0o600);

        let (key, csr) = host_request("sneaky").expect("request");
        let cert = ca
            .issue_host(&csr, "h1", Some("10.0.0.11".parse().expect("ip")))
            .expect("issued");
        assert_eq!(
            common_name(&cert),
            "h1",
            "the pool's name, not the request's"
        );
        assert!(!cert.contains(&key), "the key never leaves the host");
        let openssl_cert = openssl::x509::X509::from_pem(cert.as_bytes()).expect("x509");
        let ca_cert = openssl::x509::X509::from_pem(ca.cert_pem().as_bytes()).expect("x509");
        assert!(openssl_cert
            .verify(&ca_cert.public_key().expect("key"))
            .expect("verify"));

        assert!(matches!(
            ca.issue_host(&csr, COORDINATOR_NAME, None),
            Err(PkiError::Request(_))
        ));
        let mut forged = csr.clone();
        forged.replace_range(forged.len() / 2..forged.len() / 2 + 4, "AAAA");
        assert!(ca.issue_host(&forged, "h2", None).is_err());
        assert!(fingerprint(ca.cert_pem())
            .expect("fp")
            .starts_with("sha256:"));
    }
}
