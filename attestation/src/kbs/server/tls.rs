//! The broker's TLS identity: the configured certificate and key, or the
//! self-signed pair `hsev-kbs init` makes in `<state_dir>/tls` (P-256, for
//! `localhost`, `127.0.0.1`, `::1` and the names asked for). Its clients
//! pin the certificate's public key ([`SpkiPin`], `hsev-kbs fingerprint`),
//! not a certificate authority, so a self-signed pair is as good as any.
//!
//! The key file must be readable by its owner only, as the KEK. This module
//! reads and writes these files and builds the rustls server configuration
//! (TLS 1.3, HTTP/1.1); it never logs the key.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::config::KbsConfig;
use crate::kbs::tls::{crypto_provider, SpkiPin};

/// The folder of the self-signed pair in the state folder.
pub const TLS_DIR: &str = "tls";

/// Why the broker has no usable TLS identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or written.
    #[error("{path}: {problem}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// No identity yet at the default place.
    #[error(
        "no TLS certificate at {0}: run `hsev-kbs init --state-dir DIR`, set [tls] cert_file and \
         key_file, or (development only) insecure_http_dev = true"
    )]
    Missing(String),
    /// Generating the self-signed pair failed.
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refuses the pair.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_error(path: &Path, problem: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        problem: problem.to_string(),
    }
}

/// A loaded certificate chain and key, and the key's pin.
pub struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The pin of the leaf's public key.
    pub pin: SpkiPin,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|error| file_error(path, error))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(path, format!("not PEM certificates: {error}")))?;
    if chain.is_empty() {
        return Err(file_error(path, "holds no certificate"));
    }
    Ok(chain)
}

/// The pin of the certificate the broker serves (`hsev-kbs fingerprint`).
pub fn fingerprint(cert_file: &Path) -> Result<SpkiPin, TlsError> {
    let chain = read_chain(cert_file)?;
    SpkiPin::of_certificate(chain[0].as_ref()).map_err(|error| file_error(cert_file, error))
}

/// Loads the configured (or default) pair, checking that the key file is
/// its owner's alone and that the key is the certificate's.
pub fn load(config: &KbsConfig) -> Result<TlsIdentity, TlsError> {
    let files = config.tls_files();
    if config.tls.is_none() && !files.cert_file.exists() {
        return Err(TlsError::Missing(files.cert_file.display().to_string()));
    }
    let chain = read_chain(&files.cert_file)?;
    let key_path = &files.key_file;
    let metadata = std::fs::metadata(key_path).map_err(|error| file_error(key_path, error))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(file_error(
            key_path,
            format!("mode {mode:04o} lets group or others read the TLS key: chmod 600"),
        ));
    }
    let pem = zeroize::Zeroizing::new(
        std::fs::read(key_path).map_err(|error| file_error(key_path, error))?,
    );
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|error| file_error(key_path, format!("not a PEM private key: {error}")))?;
    let pin = SpkiPin::of_certificate(chain[0].as_ref())
        .map_err(|error| file_error(&files.cert_file, error))?;
    let identity = TlsIdentity { chain, key, pin };
    // Fails here, not at the first handshake, if the key is not the leaf's.
    server_config(&identity)?;
    Ok(identity)
}

/// The rustls configuration of the HTTPS listener: TLS 1.3, HTTP/1.1.
pub fn server_config(identity: &TlsIdentity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Writes `bytes` to a new file `path` (never over an existing one).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|error| file_error(path, error))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|error| file_error(path, error))
}

/// Makes the self-signed pair in `<state_dir>/tls` for `localhost`,
/// `127.0.0.1`, `::1` and `names`; answers the files written and the pin.
pub fn create_self_signed(
    state_dir: &Path,
    names: &[String],
) -> Result<(Vec<PathBuf>, SpkiPin), TlsError> {
    let dir = state_dir.join(TLS_DIR);
    std::fs::create_dir_all(&dir).map_err(|error| file_error(&dir, error))?;
    let mut subject_names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    subject_names.extend(names.iter().cloned());
    let mut params = rcgen::CertificateParams::new(subject_names)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hsev-kbs");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let certificate = params.self_signed(&key)?;
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
    write_new(&key_path, key_pem.as_bytes(), 0o600)?;
    write_new(&cert_path, certificate.pem().as_bytes(), 0o644)?;
    let pin = SpkiPin::of_certificate(certificate.der().as_ref())
        .map_err(|error| file_error(&cert_path, error))?;
    Ok((vec![key_path, cert_path], pin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(state_dir: &Path) -> KbsConfig {
        KbsConfig::parse(&format!(
            "state_dir = {:?}\nmode = \"development\"",
            state_dir.display().to_string()
        ))
        .expect("config")
    }

    #[test]
    fn the_self_signed_pair_loads_and_pins_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = load(&config(dir.path())).expect_err("no pair yet");
        assert!(missing.to_string().contains("hsev-kbs init"), "{missing}");
        let (written, pin) =
            create_self_signed(dir.path(), &["kbs.example".to_owned()]).expect("made");
        assert_eq!(written.len(), 2);
        let identity = load(&config(dir.path())).expect("loads");
        assert_eq!(identity.pin, pin);
        assert_eq!(
            fingerprint(&config(dir.path()).tls_files().cert_file).expect("pin"),
            pin
        );
        // Never over an existing pair.
        assert!(create_self_signed(dir.path(), &[]).is_err());
        // A key others can read is refused, naming the mode.
        let key = dir.path().join("tls/key.pem");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let error = load(&config(dir.path())).expect_err("open key");
        assert!(error.to_string().contains("0644"), "{error}");
    }
}
