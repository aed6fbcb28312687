//! mTLS on the pool's channel: the server and client configurations built
//! from a member's identity and the pool's CA, who a caller is (the common
//! name of the certificate it presented, and that certificate's
//! fingerprint), and, for a host about to join, the pool's CA fetched from
//! the coordinator's own TLS handshake and accepted only if its fingerprint
//! is the one the join token carries.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Certificate, ClientTlsConfig, Identity as TonicIdentity, ServerTlsConfig};

use super::pki::{fingerprint_der, Identity};

/// The TLS configuration of a member's pool listener: its identity (with
/// the CA in its chain, so a joining host can see it), client certificates
/// from the pool's CA (required unless `optional`, for the coordinator's
/// `Join`).
pub fn server_config(identity: &Identity, ca_pem: &str, optional: bool) -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(TonicIdentity::from_pem(
            format!("{}\n{ca_pem}", identity.cert_pem.trim_end()),
            &identity.key_pem,
        ))
        .client_ca_root(Certificate::from_pem(ca_pem))
        .client_auth_optional(optional)
}

/// The TLS configuration of a call to the member named `peer`: the pool's
/// CA only, and this member's identity.
pub fn client_config(identity: &Identity, ca_pem: &str, peer: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(TonicIdentity::from_pem(
            &identity.cert_pem,
            &identity.key_pem,
        ))
        .domain_name(peer)
}

/// The TLS configuration of a joining host's call: the pool's CA, no
/// identity yet.
pub fn joining_config(ca_pem: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(super::pki::COORDINATOR_NAME)
}

/// Who called: the common name and fingerprint of the certificate the peer
/// presented (verified by the TLS layer against the pool's CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The certificate's common name: a host's name, or the coordinator's.
    pub name: String,
    /// The certificate's fingerprint.
    pub fingerprint: String,
}

/// The peer of `request`, when it presented a certificate.
pub fn peer<T>(request: &tonic::Request<T>) -> Option<Peer> {
    let certs = request.peer_certs()?;
    let leaf = certs.first()?;
    let cert = openssl::x509::X509::from_der(leaf.as_ref()).ok()?;
    let name = cert
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()?
        .data()
        .to_string()
        .ok()?;
    Some(Peer {
        name,
        fingerprint: fingerprint_der(leaf.as_ref()),
    })
}

/// Records the chain a server presents and accepts it: the caller decides
/// from the recorded chain (by fingerprint) whether to trust anything.
#[derive(Debug)]
struct ChainRecorder {
    chain: Mutex<Vec<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for ChainRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = self
            .chain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        chain.push(end_entity.to_vec());
        chain.extend(intermediates.iter().map(|cert| cert.to_vec()));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why the pool's CA could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CaFetchError {
    /// The coordinator cannot be reached.
    #[error("cannot reach the coordinator at {address}: {reason}")]
    Unreachable {
        /// Where.
        address: String,
        /// Why.
        reason: String,
    },
    /// No certificate in the chain has the token's fingerprint.
    #[error(
        "the server at {address} presents no CA with the join token's fingerprint {expected} \
         (it presents {presented}): not this pool's coordinator"
    )]
    Mismatch {
        /// Where.
        address: String,
        /// The token's fingerprint.
        expected: String,
        /// The fingerprints presented.
        presented: String,
    },
}

/// The pool's CA (PEM) from the TLS handshake of the coordinator at
/// `address`, accepted only if its fingerprint is `expected`.
pub async fn fetch_pool_ca(address: &str, expected: &str) -> Result<String, CaFetchError> {
    let unreachable = |reason: String| CaFetchError::Unreachable {
        address: address.to_owned(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let recorder = Arc::new(ChainRecorder {
        chain: Mutex::new(Vec::new()),
        provider: Arc::clone(&provider),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| unreachable(error.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&recorder) as Arc<dyn ServerCertVerifier>)
        .with_no_client_auth();
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .map_err(|_| unreachable("no answer in 10 s".to_owned()))?
    .map_err(|error| unreachable(error.to_string()))?;
    let name = ServerName::try_from(super::pki::COORDINATOR_NAME)
        .map_err(|error| unreachable(error.to_string()))?;
    // The handshake only records the chain; nothing is sent over it.
    let _ = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await;
    let chain = recorder
        .chain
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if chain.is_empty() {
        return Err(unreachable("it presented no certificate".to_owned()));
    }
    chain
        .iter()
        .find(|der| fingerprint_der(der) == expected)
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
        .ok_or_else(|| CaFetchError::Mismatch {
            address: address.to_owned(),
            expected: expected.to_owned(),
            presented: chain
                .iter()
                .map(|der| fingerprint_der(der))
                .collect::<Vec<_>>()
                .join(", "),
        })
}
