//! The blocking KBS clients: the RCAR flow a guest runs (auth, attest,
//! resource), and the admin calls a tenant makes (release policies,
//! reference values) or the operator makes (announcing a VM).
//!
//! An `https://` broker is reached only through a connection pinned to its
//! public key ([`super::tls`]): no certificate authority, and a server
//! presenting another key is refused ([`ClientError::WrongBroker`]). Plain
//! `http://` (a development broker) has no key to pin; whether it may be
//! used is the caller's decision.
//!
//! This module must never log or keep a secret it handles (resource
//! plaintext, admin token), and never retry on its own: it tells the
//! caller whether a retry can help ([`ClientError::Unreachable`]) or not.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

pub use super::jwe::KeyAlgorithm;
use super::jwe::TeeKeyPair;
pub use super::protocol::ResourcePath;
use super::protocol::{
    check_name, composite_evidence, runtime_data_binding, Announcement, AnnouncementBody,
    Attestation, AttestationToken, Challenge, ErrorInformation, JweResponse, LeaseGrant,
    LeaseHolder, ReferenceValuesBody, Request, ResourceBody, ResourceSummary, RuntimeData, Tee,
    LEASE_HEADER, PROTOCOL_VERSION, SESSION_COOKIE,
};
use super::release_policy::ReleasePolicy;
pub use super::tls::{PinMismatch, SpkiPin};

/// Largest answer body read (a JWE of a disk key is a few hundred bytes).
const MAX_ANSWER: u64 = 16 << 20;

/// Why a call to the broker failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The broker cannot be reached, timed out, or failed (5xx): retrying
    /// later can help.
    #[error("key broker unreachable: {0}")]
    Unreachable(String),
    /// The broker keeps the single-instance resource for another live
    /// launch (503 `PolicyDeny`): retrying once that launch's lease lapses
    /// can help.
    #[error("key broker holds the key for another live instance: {0}")]
    Held(String),
    /// The broker refused (4xx), with its RFC 7807 reason.
    #[error("key broker refused ({status} {error_type}): {detail}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The RFC 7807 type URI (`about:blank` when the body had none).
        error_type: String,
        /// The broker's explanation.
        detail: String,
    },
    /// The server presented another public key than the pinned one: not
    /// the broker the pin names (final: no retry helps).
    #[error("{0}")]
    WrongBroker(PinMismatch),
    /// An answer that does not follow the protocol, or a local step of the
    /// flow (key generation, evidence, decryption) that failed.
    #[error("key broker protocol: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The last segment of a refusal's type URI (`PolicyDeny`, ...).
    pub fn refusal_kind(&self) -> Option<&str> {
        match self {
            ClientError::Refused { error_type, .. } => error_type.rsplit('/').next(),
            _ => None,
        }
    }
}

/// A configured HTTP agent for one broker.
#[derive(Debug, Clone)]
struct Http {
    agent: ureq::Agent,
    base_url: String,
}

/// An answer: status, `Set-Cookie` values, the lease header, body.
struct Answer {
    status: u16,
    cookies: Vec<String>,
    lease_seconds: Option<u32>,
    body: Vec<u8>,
}

impl Http {
    fn new(base_url: &str, pin: Option<SpkiPin>, timeout: Duration) -> Result<Self, ClientError> {
        let base_url = base_url.trim_end_matches('/');
        let (authority, https) = match (
            base_url.strip_prefix("https://"),
            base_url.strip_prefix("http://"),
        ) {
            (Some(authority), _) => (authority, true),
            (None, Some(authority)) => (authority, false),
            (None, None) => {
                return Err(ClientError::Protocol(format!(
                    "broker URL {base_url:?}: expected https://HOST:PORT (or http:// for a \
                     development broker)"
                )))
            }
        };
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(ClientError::Protocol(format!(
                "broker URL {base_url:?}: expected https://HOST:PORT"
            )));
        }
        match (https, pin) {
            (true, None) => {
                return Err(ClientError::Protocol(format!(
                    "broker URL {base_url:?}: an https broker is trusted by the pin of its \
                     public key (sha256:<hex>, `hsev-kbs fingerprint`), never by a certificate \
                     authority: give the pin"
                )))
            }
            (false, Some(_)) => {
                return Err(ClientError::Protocol(format!(
                    "broker URL {base_url:?}: plain http has no key to pin: use https://"
                )))
            }
            _ => {}
        }
        let builder = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0);
        // A whole-call timeout makes ureq resolve the host in a new thread
        // on every call, so that the lookup can be abandoned. An IP address
        // needs no lookup: there, each step (connect, send, receive) gets
        // `timeout` instead, and no thread is spawned.
        let builder = if is_ip_literal(authority) {
            builder
                .timeout_connect(Some(timeout))
                .timeout_send_request(Some(timeout))
                .timeout_send_body(Some(timeout))
                .timeout_recv_response(Some(timeout))
                .timeout_recv_body(Some(timeout))
        } else {
            builder.timeout_global(Some(timeout))
        };
        let agent: ureq::Agent = match pin {
            Some(pin) => super::tls::pinned_agent(builder.build(), pin)
                .map_err(|error| ClientError::Protocol(error.to_string()))?,
            None => builder.build().into(),
        };
        Ok(Http {
            agent,
            base_url: base_url.to_owned(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn finish(
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Answer, ClientError> {
        let mut response = result.map_err(|error| match super::tls::mismatch_of(&error) {
            Some(mismatch) => ClientError::WrongBroker(mismatch.clone()),
            None => ClientError::Unreachable(error.to_string()),
        })?;
        let status = response.status().as_u16();
        let cookies = response
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|value| value.to_str().ok().map(str::to_owned))
            .collect();
        let lease_seconds = response
            .headers()
            .get(LEASE_HEADER)
            .and_then(|value| value.to_str().ok()?.parse().ok());
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_vec()
            .map_err(|error| ClientError::Unreachable(format!("reading the answer: {error}")))?;
        Ok(Answer {
            status,
            cookies,
            lease_seconds,
            body,
        })
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Answer, ClientError> {
        let url = self.url(path);
        let result = match (method, body) {
            ("POST", Some(body)) => {
                let mut request = self
                    .agent
                    .post(&url)
                    .header("content-type", "application/json");
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                request.send(body)
            }
            ("PUT", Some(body)) => {
                let mut request = self
                    .agent
                    .put(&url)
                    .header("content-type", "application/json");
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                request.send(body)
            }
            ("DELETE", None) => {
                let mut request = self.agent.delete(&url);
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                request.call()
            }
            _ => {
                let mut request = self.agent.get(&url);
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                request.call()
            }
        };
        Self::finish(result)
    }
}

/// Whether `HOST:PORT` (or `[V6]:PORT`) names an IP address.
fn is_ip_literal(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    };
    host.parse::<std::net::IpAddr>().is_ok()
}

impl Answer {
    /// The body as `T` on 2xx, else the refusal or failure.
    fn into_json<T: DeserializeOwned>(self, what: &str) -> Result<T, ClientError> {
        self.check()?;
        serde_json::from_slice(&self.body)
            .map_err(|error| ClientError::Protocol(format!("{what} answer: {error}")))
    }

    /// Ok on 2xx; a refusal on 4xx; held on 503 `PolicyDeny`; unreachable
    /// on any other 5xx.
    fn check(&self) -> Result<(), ClientError> {
        let text = || {
            String::from_utf8_lossy(&self.body)
                .chars()
                .take(2048)
                .collect::<String>()
        };
        match self.status {
            200..=299 => Ok(()),
            400..=499 => Err(
                match serde_json::from_slice::<ErrorInformation>(&self.body) {
                    Ok(problem) => ClientError::Refused {
                        status: self.status,
                        error_type: problem.error_type,
                        detail: problem.detail,
                    },
                    Err(_) => ClientError::Refused {
                        status: self.status,
                        error_type: "about:blank".into(),
                        detail: text(),
                    },
                },
            ),
            500..=599 => Err(
                match serde_json::from_slice::<ErrorInformation>(&self.body) {
                    Ok(problem)
                        if self.status == 503 && problem.error_type.ends_with("/PolicyDeny") =>
                    {
                        ClientError::Held(problem.detail)
                    }
                    Ok(problem) => ClientError::Unreachable(format!(
                        "HTTP {}: {}",
                        self.status, problem.detail
                    )),
                    Err(_) => ClientError::Unreachable(format!("HTTP {}: {}", self.status, text())),
                },
            ),
            status => Err(ClientError::Protocol(format!(
                "unexpected HTTP status {status}"
            ))),
        }
    }
}

fn to_json(value: &impl serde::Serialize) -> Result<Vec<u8>, ClientError> {
    // Evidence with its certificates is some 13 KiB: grow the buffer once.
    let mut json = Vec::with_capacity(16 * 1024);
    serde_json::to_writer(&mut json, value)
        .map_err(|error| ClientError::Protocol(error.to_string()))?;
    Ok(json)
}

/// A lease the broker granted, and when (on this machine's monotonic
/// clock) the request that got it was sent: the broker's lease began no
/// earlier, so it lapses no earlier than `requested_at` + `lease_seconds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The broker's answer.
    pub grant: LeaseGrant,
    /// When the request was sent.
    pub requested_at: std::time::Instant,
}

impl Lease {
    /// How long the lease lasts.
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.grant.lease_seconds.into())
    }
}

/// A guest's client of the RCAR protocol.
#[derive(Debug, Clone)]
pub struct KbsClient {
    http: Http,
}

impl KbsClient {
    /// A client of the broker at `base_url` (`https://HOST:PORT` with the
    /// `pin` of its public key, or `http://HOST:PORT` without one for a
    /// development broker). With a host name, every call gives up after
    /// `timeout`; with an IP address (the guest's case), every step of a
    /// call (connect, send, receive) does.
    pub fn new(
        base_url: &str,
        pin: Option<SpkiPin>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        Ok(KbsClient {
            http: Http::new(base_url, pin, timeout)?,
        })
    }

    /// `POST /kbs/v0/auth`: the challenge and the session cookie's value.
    pub fn auth(&self) -> Result<(Challenge, String), ClientError> {
        let request = Request {
            version: PROTOCOL_VERSION.into(),
            tee: Tee::Snp,
            extra_params: serde_json::Value::String(String::new()),
        };
        let answer = self
            .http
            .send("POST", "/kbs/v0/auth", &[], Some(&to_json(&request)?))?;
        let session = answer
            .cookies
            .iter()
            .find_map(|cookie| session_cookie(cookie))
            .map(str::to_owned);
        let challenge: Challenge = answer.into_json("auth")?;
        let session = session.ok_or_else(|| {
            ClientError::Protocol(format!("auth answer without a {SESSION_COOKIE} cookie"))
        })?;
        Ok((challenge, session))
    }

    /// `POST /kbs/v0/attest` in the session `session`.
    pub fn attest(
        &self,
        session: &str,
        attestation: &Attestation,
    ) -> Result<AttestationToken, ClientError> {
        let cookie = format!("{SESSION_COOKIE}={session}");
        self.http
            .send(
                "POST",
                "/kbs/v0/attest",
                &[("cookie", &cookie)],
                Some(&to_json(attestation)?),
            )?
            .into_json("attest")
    }

    /// `GET /kbs/v0/resource/<path>` in an attested session.
    pub fn resource(&self, session: &str, path: &ResourcePath) -> Result<JweResponse, ClientError> {
        self.resource_and_lease_length(session, path)
            .map(|(jwe, _)| jwe)
    }

    /// [`Self::resource`], and the length of its lease if the broker says
    /// it is single-instance ([`LEASE_HEADER`]).
    fn resource_and_lease_length(
        &self,
        session: &str,
        path: &ResourcePath,
    ) -> Result<(JweResponse, Option<u32>), ClientError> {
        let cookie = format!("{SESSION_COOKIE}={session}");
        let answer = self.http.send(
            "GET",
            &format!("/kbs/v0/resource/{path}"),
            &[("cookie", &cookie)],
            None,
        )?;
        let lease_seconds = answer.lease_seconds;
        Ok((answer.into_json("resource")?, lease_seconds))
    }

    /// The whole RCAR flow, as Trustee's client runs it: auth, ephemeral
    /// key, runtime data, evidence for its binding (no additional
    /// evidence), attest, resource, decrypt. `evidence` gets the 64 bytes
    /// the report's `report_data` must hold and returns the SNP evidence in
    /// Trustee JSON form.
    pub fn fetch_resource(
        &self,
        path: &ResourcePath,
        algorithm: KeyAlgorithm,
        evidence: &mut dyn FnMut(&[u8; 64]) -> Result<serde_json::Value, String>,
    ) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        let (session, key_pair) = self.attested_session(algorithm, evidence)?;
        let jwe = self.resource(&session, path)?;
        key_pair
            .decrypt(&jwe)
            .map_err(|error| ClientError::Protocol(format!("resource: {error}")))
    }

    /// [`Self::fetch_resource`], then, in the same session, the lease of a
    /// resource the broker says is single-instance (none for another
    /// resource, or a broker that keeps no leases).
    pub fn fetch_resource_and_lease(
        &self,
        path: &ResourcePath,
        algorithm: KeyAlgorithm,
        evidence: &mut dyn FnMut(&[u8; 64]) -> Result<serde_json::Value, String>,
    ) -> Result<(Zeroizing<Vec<u8>>, Option<Lease>), ClientError> {
        let (session, key_pair) = self.attested_session(algorithm, evidence)?;
        let (jwe, lease_seconds) = self.resource_and_lease_length(&session, path)?;
        let secret = key_pair
            .decrypt(&jwe)
            .map_err(|error| ClientError::Protocol(format!("resource: {error}")))?;
        match lease_seconds {
            Some(_) => Ok((secret, Some(self.lease(&session, path)?))),
            None => Ok((secret, None)),
        }
    }

    /// Renews this launch's lease on the single-instance resource `path`
    /// (HyperSEV's `POST /hsev/v0/lease/<path>`), in a session attested
    /// afresh with `evidence`: the broker sees the launch is still running.
    pub fn renew_lease(
        &self,
        path: &ResourcePath,
        evidence: &mut dyn FnMut(&[u8; 64]) -> Result<serde_json::Value, String>,
    ) -> Result<Lease, ClientError> {
        let (session, _key_pair) =
            self.attested_session(KeyAlgorithm::EcdhEsA256kwP256, evidence)?;
        self.lease(&session, path)
    }

    /// `POST /hsev/v0/lease/<path>` in an attested session.
    fn lease(&self, session: &str, path: &ResourcePath) -> Result<Lease, ClientError> {
        let cookie = format!("{SESSION_COOKIE}={session}");
        let requested_at = std::time::Instant::now();
        let grant = self
            .http
            .send(
                "POST",
                &format!("/hsev/v0/lease/{path}"),
                &[("cookie", &cookie)],
                Some(b"{}"),
            )?
            .into_json("lease")?;
        Ok(Lease {
            grant,
            requested_at,
        })
    }

    /// Auth and attest: the attested session's cookie value and the
    /// ephemeral key pair the broker encrypts to.
    fn attested_session(
        &self,
        algorithm: KeyAlgorithm,
        evidence: &mut dyn FnMut(&[u8; 64]) -> Result<serde_json::Value, String>,
    ) -> Result<(String, TeeKeyPair), ClientError> {
        let (challenge, session) = self.auth()?;
        let key_pair = TeeKeyPair::generate(algorithm)
            .map_err(|error| ClientError::Protocol(format!("ephemeral key: {error}")))?;
        let runtime_data = RuntimeData {
            nonce: challenge.nonce,
            tee_pubkey: key_pair
                .public_jwk()
                .map_err(|error| ClientError::Protocol(format!("ephemeral key: {error}")))?,
        };
        // No additional evidence: `composite_evidence` sends an empty one.
        let binding = runtime_data_binding(&runtime_data, "")
            .map_err(|error| ClientError::Protocol(error.to_string()))?;
        let snp_evidence = evidence(&binding)
            .map_err(|error| ClientError::Protocol(format!("cannot obtain evidence: {error}")))?;
        let attestation = Attestation {
            init_data: None,
            runtime_data,
            tee_evidence: composite_evidence(snp_evidence),
        };
        self.attest(&session, &attestation)?;
        Ok((session, key_pair))
    }
}

/// The value of a `kbs-session-id` `Set-Cookie` header.
fn session_cookie(header: &str) -> Option<&str> {
    let first = header.split(';').next()?.trim();
    let (name, value) = first.split_once('=')?;
    (name.trim() == SESSION_COOKIE && !value.trim().is_empty()).then(|| value.trim())
}

/// A client of the broker's admin API, with a tenant's or the operator's
/// token (what it may do is the token's scope, which the broker enforces).
pub struct AdminClient {
    http: Http,
    authorization: Zeroizing<String>,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("base_url", &self.http.base_url)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// A client of the broker at `base_url` (pinned by `pin`, as for
    /// [`KbsClient::new`]) with the bearer `token`.
    pub fn new(
        base_url: &str,
        pin: Option<SpkiPin>,
        token: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(ClientError::Protocol(
                "the admin token must be non-empty printable ASCII".into(),
            ));
        }
        Ok(AdminClient {
            http: Http::new(base_url, pin, timeout)?,
            authorization: Zeroizing::new(format!("Bearer {token}")),
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Answer, ClientError> {
        let answer = self.http.send(
            method,
            path,
            &[("authorization", self.authorization.as_str())],
            body,
        )?;
        answer.check()?;
        Ok(answer)
    }

    fn checked_name(name: &str) -> Result<&str, ClientError> {
        check_name(name).map_err(|error| ClientError::Protocol(error.to_string()))?;
        Ok(name)
    }

    /// Creates or replaces `repository`'s reference-value set `name`.
    pub fn put_reference_values(
        &self,
        repository: &str,
        name: &str,
        measurements: &[[u8; 48]],
    ) -> Result<(), ClientError> {
        let body = ReferenceValuesBody {
            measurements: measurements.iter().map(hex::encode).collect(),
        };
        self.call(
            "PUT",
            &format!(
                "/admin/v0/reference-values/{}/{}",
                Self::checked_name(repository)?,
                Self::checked_name(name)?
            ),
            Some(&to_json(&body)?),
        )
        .map(drop)
    }

    /// Creates or replaces the resource at `path`: its release `policy`,
    /// the reference-value sets of its repository it also accepts, and its
    /// secret `data` if given (without it, the resource keeps its secret,
    /// or gets one the broker generates at its first release).
    pub fn put_resource(
        &self,
        path: &ResourcePath,
        data: Option<&[u8]>,
        policy: &ReleasePolicy,
        reference_values: &[String],
    ) -> Result<(), ClientError> {
        for name in reference_values {
            Self::checked_name(name)?;
        }
        let body = ResourceBody {
            data: data.map(|data| STANDARD.encode(data)),
            policy: policy.to_toml(),
            reference_values: reference_values.to_vec(),
        };
        let json = Zeroizing::new(to_json(&body)?);
        let _secret = body.data.map(Zeroizing::new);
        self.call(
            "PUT",
            &format!("/admin/v0/resources/{path}"),
            Some(json.as_slice()),
        )
        .map(drop)
    }

    /// Which launch holds the single-instance resource at `path`.
    pub fn lease(&self, path: &ResourcePath) -> Result<LeaseHolder, ClientError> {
        self.call("GET", &format!("/admin/v0/leases/{path}"), None)?
            .into_json("lease")
    }

    /// Ends the lease on `path`: its holder is refused from now on, and the
    /// next launch that passes the policy takes the resource.
    pub fn end_lease(&self, path: &ResourcePath) -> Result<LeaseHolder, ClientError> {
        self.call("DELETE", &format!("/admin/v0/leases/{path}"), None)?
            .into_json("lease")
    }

    /// Deletes the resource at `path`.
    pub fn delete_resource(&self, path: &ResourcePath) -> Result<(), ClientError> {
        self.call("DELETE", &format!("/admin/v0/resources/{path}"), None)
            .map(drop)
    }

    /// Deletes `repository`'s reference-value set `name`.
    pub fn delete_reference_values(&self, repository: &str, name: &str) -> Result<(), ClientError> {
        self.call(
            "DELETE",
            &format!(
                "/admin/v0/reference-values/{}/{}",
                Self::checked_name(repository)?,
                Self::checked_name(name)?
            ),
            None,
        )
        .map(drop)
    }

    /// The path, policy and reference-value sets of each resource of the
    /// token's repository (never data).
    pub fn list_resources(&self) -> Result<Vec<ResourceSummary>, ClientError> {
        self.call("GET", "/admin/v0/resources", None)?
            .into_json("resource list")
    }

    /// Says that VM `vm` of `repository` boots `image` (hex image id) and
    /// should measure `expected_measurement`: information for the tenant,
    /// which changes no release.
    pub fn announce(
        &self,
        repository: &str,
        vm: &str,
        image: &str,
        expected_measurement: Option<&[u8]>,
    ) -> Result<(), ClientError> {
        let body = AnnouncementBody {
            image: image.to_owned(),
            expected_measurement: expected_measurement.map(hex::encode),
        };
        self.call(
            "PUT",
            &format!(
                "/admin/v0/announcements/{}/{}",
                Self::checked_name(repository)?,
                Self::checked_name(vm)?
            ),
            Some(&to_json(&body)?),
        )
        .map(drop)
    }

    /// The announcements the token may see (its repository's, or every one
    /// for the operator).
    pub fn announcements(&self) -> Result<Vec<Announcement>, ClientError> {
        self.call("GET", "/admin/v0/announcements", None)?
            .into_json("announcement list")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_needs_a_pin_and_plain_http_has_none() {
        let second = Duration::from_secs(1);
        let pin = SpkiPin([1; 32]);
        assert!(KbsClient::new("https://10.0.2.2:8080/", Some(pin), second).is_ok());
        assert!(KbsClient::new("http://10.0.2.2:8080/", None, second).is_ok());
        for (bad, pin) in [
            ("https://kbs:1", None),
            ("http://kbs:1", Some(pin)),
            ("kbs:1", None),
            ("ftp://kbs:1", Some(pin)),
            ("https://", Some(pin)),
            ("https://a/b", Some(pin)),
            ("https://u@h:1", Some(pin)),
        ] {
            assert!(
                matches!(
                    KbsClient::new(bad, pin, second),
                    Err(ClientError::Protocol(_))
                ),
                "{bad}"
            );
        }
        let error = KbsClient::new("https://kbs:1", None, second).expect_err("no pin");
        assert!(error.to_string().contains("pin"), "{error}");
        assert!(AdminClient::new("https://h:1", Some(pin), "", second).is_err());
    }

    #[test]
    fn ip_literals_are_recognised() {
        assert!(is_ip_literal("10.0.2.2:8080"));
        assert!(is_ip_literal("[::1]:8080"));
        assert!(!is_ip_literal("kbs.example:8080"));
        assert!(!is_ip_literal("localhost:1"));
    }

    #[test]
    fn session_cookie_is_read() {
        assert_eq!(
            session_cookie("kbs-session-id=abc; Path=/kbs/v0; HttpOnly; Max-Age=120"),
            Some("abc")
        );
        assert_eq!(session_cookie("other=abc"), None);
        assert_eq!(session_cookie("kbs-session-id=; Path=/"), None);
    }

    #[test]
    fn unreachable_broker_is_retryable() {
        // Port 9 on loopback: nothing listens (connection refused).
        let client =
            KbsClient::new("http://127.0.0.1:9", None, Duration::from_secs(2)).expect("client");
        assert!(matches!(client.auth(), Err(ClientError::Unreachable(_))));
    }

    #[test]
    fn answers_are_classified() {
        let answer = |status, body: &str| Answer {
            status,
            cookies: Vec::new(),
            lease_seconds: None,
            body: body.as_bytes().to_vec(),
        };
        let problem = r#"{"type":"https://github.com/confidential-containers/kbs/errors/PolicyDeny","detail":"measurement"}"#;
        let refused = answer(401, problem).check().expect_err("401");
        assert_eq!(refused.refusal_kind(), Some("PolicyDeny"));
        assert!(matches!(
            answer(404, "no").check(),
            Err(ClientError::Refused { status: 404, .. })
        ));
        assert!(matches!(
            answer(503, problem).check(),
            Err(ClientError::Held(detail)) if detail == "measurement"
        ));
        let busy = r#"{"type":"https://github.com/confidential-containers/kbs/errors/InternalError","detail":"too many sessions"}"#;
        assert!(matches!(
            answer(503, busy).check(),
            Err(ClientError::Unreachable(said)) if said == "HTTP 503: too many sessions"
        ));
        assert!(matches!(
            answer(302, "").check(),
            Err(ClientError::Protocol(_))
        ));
        assert!(matches!(
            answer(200, "{").into_json::<Challenge>("auth"),
            Err(ClientError::Protocol(_))
        ));
    }
}
