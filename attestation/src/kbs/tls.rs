//! The key broker's TLS identity as its clients pin it: the SHA-256 of the
//! certificate's SubjectPublicKeyInfo ([`SpkiPin`], written
//! `sha256:<64 hex>`, what `hsev-kbs fingerprint` prints), and the client
//! side of a pinned connection ([`pinned_agent`]).
//!
//! A pinned connection trusts exactly one public key and nothing else: no
//! certificate authority, no host name, no validity dates. The guest learns
//! the pin from its measured kernel command line, so a host that changes the
//! pin changes the launch measurement, and a host that stands in for the
//! broker on the guest's network presents another key, which is refused
//! with both fingerprints named ([`PinMismatch`]). The server still proves
//! that it holds the pinned key: the handshake's signature is checked
//! against the certificate's key, as rustls checks any other.
//!
//! Why rustls and a verifier of its own: ureq (the agent's HTTP client)
//! speaks TLS through rustls, whose `ServerCertVerifier` is the one place a
//! client decides whom it trusts; ureq's own rustls connector accepts only
//! root certificates, so this module plugs a connector of its own into
//! ureq's connector chain. OpenSSL (linked for the crypto elsewhere) would
//! need a verify callback and a hand-written ureq transport as well. ring is
//! the crypto provider, as for the rest of the workspace's TLS.
//!
//! This module never sends or logs anything but the fingerprints.

use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, StreamOwned,
};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, TcpConnector,
    Transport, TransportAdapter,
};

/// The prefix of a pin's text.
const PIN_PREFIX: &str = "sha256:";

/// SHA-256 of a certificate's SubjectPublicKeyInfo (DER): the key a client
/// pins, whatever certificate carries it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpkiPin(pub [u8; 32]);

/// A pin or a certificate that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// Not `sha256:<64 hex digits>`.
    #[error("pin {0:?}: expected sha256:<64 hex digits> (hsev-kbs fingerprint)")]
    Syntax(String),
    /// A certificate that does not parse.
    #[error("certificate: {0}")]
    Certificate(String),
}

impl SpkiPin {
    /// The pin of a certificate (DER).
    pub fn of_certificate(der: &[u8]) -> Result<Self, PinError> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|error| PinError::Certificate(error.to_string()))?;
        Ok(SpkiPin(openssl::sha::sha256(
            certificate.tbs_certificate.subject_pki.raw,
        )))
    }

    /// The pin of the first certificate of a PEM file's text.
    pub fn of_pem(pem: &[u8]) -> Result<Self, PinError> {
        let certificate = openssl::x509::X509::from_pem(pem)
            .map_err(|error| PinError::Certificate(error.to_string()))?;
        let der = certificate
            .to_der()
            .map_err(|error| PinError::Certificate(error.to_string()))?;
        Self::of_certificate(&der)
    }
}

impl FromStr for SpkiPin {
    type Err = PinError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || PinError::Syntax(text.to_owned());
        let digits = text.strip_prefix(PIN_PREFIX).ok_or_else(syntax)?;
        let mut pin = [0u8; 32];
        hex::decode_to_slice(digits, &mut pin).map_err(|_| syntax())?;
        Ok(SpkiPin(pin))
    }
}

impl fmt::Display for SpkiPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PIN_PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for SpkiPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpkiPin({self})")
    }
}

/// A server that presented another key than the pinned one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the key broker presented public key {presented}, not the pinned {expected}: it is not the \
     broker the pin names"
)]
pub struct PinMismatch {
    /// The pin the client holds.
    pub expected: SpkiPin,
    /// The key the server presented.
    pub presented: SpkiPin,
}

/// Finds a [`PinMismatch`] inside a failed handshake's error.
fn pin_mismatch(error: &std::io::Error) -> Option<PinMismatch> {
    let rustls::Error::InvalidCertificate(CertificateError::Other(other)) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())?
    else {
        return None;
    };
    other.0.downcast_ref::<PinMismatch>().cloned()
}

/// Accepts exactly the server whose leaf certificate carries the pinned key.
#[derive(Debug)]
struct PinVerifier {
    pin: SpkiPin,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = SpkiPin::of_certificate(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if presented == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(PinMismatch {
                    expected: self.pin,
                    presented,
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The crypto provider of HyperSEV's TLS.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.3 client configuration that trusts only `pin`.
fn pinned_config(pin: SpkiPin) -> Result<ClientConfig, rustls::Error> {
    let provider = crypto_provider();
    let verifier = PinVerifier {
        pin,
        algorithms: provider.signature_verification_algorithms,
    };
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// Wraps the chained TCP transport of an `https` request in a pinned TLS
/// connection; leaves `http` alone.
#[derive(Debug)]
struct PinnedTlsConnector {
    config: Arc<ClientConfig>,
}

impl<In: Transport> Connector<In> for PinnedTlsConnector {
    type Out = Either<In, PinnedTlsTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let Some(transport) = chained else {
            return Ok(None);
        };
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(Either::A(transport)));
        }
        let host = details
            .uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        // The name is sent as SNI only (an IP address not even that): the
        // pin, not the name, says whom this connection trusts.
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| ureq::Error::BadUri(format!("{host}: not a host name for TLS")))?;
        let mut connection = ClientConnection::new(self.config.clone(), name)
            .map_err(|error| ureq::Error::Other(Box::new(error)))?;
        let mut socket = TransportAdapter::new(transport.boxed(), details.current_time.clone());
        socket.set_timeout(details.timeout);
        connection
            .complete_io(&mut socket)
            .map_err(|error| match pin_mismatch(&error) {
                Some(mismatch) => ureq::Error::Other(Box::new(mismatch)),
                None => ureq::Error::Io(error),
            })?;
        Ok(Some(Either::B(PinnedTlsTransport {
            buffers: LazyBuffers::new(
                details.config.input_buffer_size(),
                details.config.output_buffer_size(),
            ),
            stream: StreamOwned::new(connection, socket),
        })))
    }
}

/// An established pinned TLS connection, as ureq reads and writes it.
struct PinnedTlsTransport {
    buffers: LazyBuffers,
    stream: StreamOwned<ClientConnection, TransportAdapter>,
}

impl fmt::Debug for PinnedTlsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedTlsTransport").finish_non_exhaustive()
    }
}

impl Transport for PinnedTlsTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.stream.get_mut().set_timeout(timeout);
        let output = &self.buffers.output()[..amount];
        self.stream.write_all(output)?;
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.stream.get_mut().set_timeout(timeout);
        let input = self.buffers.input_append_buf();
        let amount = self.stream.read(input)?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        self.stream.get_mut().get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}

/// A ureq agent whose `https` connections trust only `pin` (plain `http`
/// goes through unchanged: whether it may is the caller's decision).
pub fn pinned_agent(config: ureq::config::Config, pin: SpkiPin) -> Result<ureq::Agent, PinError> {
    let tls = pinned_config(pin).map_err(|error| PinError::Certificate(error.to_string()))?;
    let connector = ().chain(TcpConnector::default()).chain(PinnedTlsConnector {
        config: Arc::new(tls),
    });
    Ok(ureq::Agent::with_parts(
        config,
        connector,
        ureq::unversioned::resolver::DefaultResolver::default(),
    ))
}

/// Whether a failed call was refused for presenting another key.
pub fn mismatch_of(error: &ureq::Error) -> Option<&PinMismatch> {
    match error {
        ureq::Error::Other(inner) => inner.downcast_ref::<PinMismatch>(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use openssl::pkey::{PKey, PKeyRef, Private};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::*;

    #[test]
    fn pins_read_and_print_as_sha256_hex() {
        let text = format!("sha256:{}", "ab".repeat(32));
        let pin: SpkiPin = text.parse().expect("parses");
        assert_eq!(pin.0, [0xab; 32]);
        assert_eq!(pin.to_string(), text);
        for bad in [
            "ab".repeat(32),
            format!("sha384:{}", "ab".repeat(32)),
            format!("sha256:{}", "ab".repeat(31)),
            format!("sha256:{}zz", "ab".repeat(31)),
            String::new(),
        ] {
            let error = bad.parse::<SpkiPin>().expect_err(&bad);
            assert!(error.to_string().contains("sha256:<64 hex"), "{error}");
        }
    }

    #[test]
    fn the_pin_is_the_public_keys_not_the_certificates() {
        // Two certificates over one key pin alike; another key differs.
        let key = p256_key();
        let first = self_signed(&key, "first");
        let second = self_signed(&key, "second");
        assert_ne!(first, second);
        let pin = SpkiPin::of_certificate(&first).expect("pin");
        assert_eq!(SpkiPin::of_certificate(&second).expect("pin"), pin);
        let other = self_signed(&p256_key(), "first");
        assert_ne!(SpkiPin::of_certificate(&other).expect("pin"), pin);
        let public = key.public_key_to_der().expect("spki");
        assert_eq!(pin.0, openssl::sha::sha256(&public));
        assert!(SpkiPin::of_certificate(b"not a certificate").is_err());
    }

    /// A real TLS 1.3 server on loopback: the pinned client gets its answer;
    /// a client pinning another key is refused before sending anything,
    /// with both fingerprints.
    #[test]
    fn a_pinned_client_talks_to_its_server_and_refuses_any_other() {
        let key = p256_key();
        let certificate = self_signed(&key, "hsev-kbs");
        let pin = SpkiPin::of_certificate(&certificate).expect("pin");
        let server = TlsServer::start(&certificate, &key);
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(20)))
            .build();

        let agent = pinned_agent(config.clone(), pin).expect("agent");
        let mut answer = agent.get(&server.url).call().expect("answered");
        assert_eq!(answer.body_mut().read_to_string().expect("body"), "ok");

        let expected = SpkiPin([7; 32]);
        let agent = pinned_agent(config, expected).expect("agent");
        let error = agent.get(&server.url).call().expect_err("refused");
        let mismatch = mismatch_of(&error).expect("a pin mismatch");
        assert_eq!(
            mismatch,
            &PinMismatch {
                expected,
                presented: pin
            }
        );
        let text = mismatch.to_string();
        assert!(
            text.contains(&pin.to_string()) && text.contains(&expected.to_string()),
            "{text}"
        );
    }

    /// Answers `ok` to one request per TLS connection, in a thread.
    struct TlsServer {
        url: String,
    }

    impl TlsServer {
        fn start(certificate: &[u8], key: &PKeyRef<Private>) -> TlsServer {
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.private_key_to_pkcs8().expect("pkcs8"),
            ));
            let config = rustls::ServerConfig::builder_with_provider(crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("tls 1.3")
                .with_no_client_auth()
                .with_single_cert(vec![CertificateDer::from(certificate.to_vec())], key)
                .expect("server config");
            let config = Arc::new(config);
            let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
            let url = format!("https://{}/", listener.local_addr().expect("address"));
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let Ok(connection) = rustls::ServerConnection::new(config.clone()) else {
                        continue;
                    };
                    let mut tls = StreamOwned::new(connection, stream);
                    let mut request = [0u8; 4096];
                    if matches!(tls.read(&mut request), Ok(read) if read > 0) {
                        let _ = tls.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        );
                        let _ = tls.flush();
                    }
                }
            });
            TlsServer { url }
        }
    }

    fn p256_key() -> PKey<Private> {
        let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)
            .expect("group");
        PKey::from_ec_key(openssl::ec::EcKey::generate(&group).expect("key")).expect("pkey")
    }

    fn self_signed(key: &PKeyRef<Private>, name: &str) -> Vec<u8> {
        let mut subject = openssl::x509::X509NameBuilder::new().expect("name");
        subject
            .append_entry_by_text("CN", name)
            .expect("common name");
        let subject = subject.build();
        let mut builder = openssl::x509::X509Builder::new().expect("builder");
        builder.set_version(2).expect("version");
        builder.set_subject_name(&subject).expect("subject");
        builder.set_issuer_name(&subject).expect("issuer");
        builder.set_pubkey(key).expect("key");
        let not_before = openssl::asn1::Asn1Time::days_from_now(0).expect("time");
        let not_after = openssl::asn1::Asn1Time::days_from_now(1).expect("time");
        builder.set_not_before(&not_before).expect("not before");
        builder.set_not_after(&not_after).expect("not after");
        builder
            .sign(key, openssl::hash::MessageDigest::sha256())
            .expect("signs");
        builder.build().to_der().expect("der")
    }
}
