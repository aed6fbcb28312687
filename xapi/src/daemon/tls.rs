//! The TLS identity of the TCP listener: the configured pair, or a
//! self-signed one made once and kept in `<state_dir>/tls` (clients trust it
//! with `hsev --ca <state_dir>/tls/cert.pem`).

use std::path::Path;

use super::config::Config;

/// A certificate chain and key, PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    /// Certificate chain.
    pub cert_pem: Vec<u8>,
    /// Private key; never logged.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}

/// Why no TLS identity could be had.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Generating the self-signed pair failed.
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io)
}

/// The configured pair, or the self-signed one of this state folder
/// (created on first use, for `localhost`, `127.0.0.1` and `::1`).
pub fn identity(config: &Config) -> Result<TlsIdentity, TlsError> {
    if let Some(tls) = &config.tls {
        return Ok(TlsIdentity {
            cert_pem: read(&tls.cert)?,
            key_pem: read(&tls.key)?,
        });
    }
    let dir = config.state_dir.join("tls");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert_path.is_file() && key_path.is_file() {
        return Ok(TlsIdentity {
            cert_pem: read(&cert_path)?,
            key_pem: read(&key_path)?,
        });
    }
    std::fs::create_dir_all(&dir).map_err(|source| TlsError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Some(host) = &config.host_name {
        names.push(host.clone());
    }
    let certified = rcgen::generate_simple_self_signed(names)?;
    let identity = TlsIdentity {
        cert_pem: certified.cert.pem().into_bytes(),
        key_pem: certified.signing_key.serialize_pem().into_bytes(),
    };
    write(&key_path, &identity.key_pem, 0o600)?;
    write(&cert_path, &identity.cert_pem, 0o644)?;
    Ok(identity)
}
