//! The broker's command layer, transport-free: auth, attest and resource
//! for guests (this module), the admin changes ([`admin`]), each answering
//! a value or a [`BrokerError`] that says which Trustee refusal it is. The
//! HTTP layer only parses the transport and maps the error to its status.
//!
//! `/attest` checks, as Trustee's KBS does, that the primary evidence's
//! `report_data` is the binding of `{tee-pubkey, nonce,
//! additional-evidence}` and that the init-data, if any, is the report's
//! HOST_DATA; the verified evidence and the guest's key are then held in
//! the session and in the grant its token names ([`sessions`]). A
//! resource is asked for with the session's cookie or, in passport mode,
//! with the token as `Authorization: Bearer`; either way it is released on
//! the held evidence, appraised against that resource's release policy.
//!
//! Additional (device) evidence is bound as Trustee binds it but not
//! appraised: the release decision is the SNP report's alone.
//!
//! Every decision is in the audit log, durable before the answer leaves.
//! This module must never put a secret (resource data, KEK, tokens) in a
//! log line, an audit entry or an error.

mod admin;

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use time::OffsetDateTime;
use uuid::Uuid;

pub use self::admin::MAX_RESOURCE_BYTES;
use super::audit::{AuditError, AuditEvent, AuditLog, AuditTicket};
use super::config::{AdminToken, KbsConfig};
use super::error::BrokerError;
use super::evidence::{describe_failures, AttestedEvidence, EvidenceError, EvidenceVerifier};
use super::sessions::{SessionProblem, Sessions};
use super::store::{Store, StoreError};
use super::token::{TokenSigner, ISSUER};
use crate::certs::RootOrigin;
use crate::kbs::init_data::InitDataDocument;
use crate::kbs::jwe::RecipientKey;
use crate::kbs::protocol::{
    runtime_data_binding, tee_name, AttestationToken, Challenge, InitData, JweResponse, Request,
    ResourcePath, RuntimeData, Tee, PROTOCOL_VERSION, SESSION_COOKIE,
};
use crate::verifier::Check;

impl From<AuditError> for BrokerError {
    fn from(error: AuditError) -> Self {
        BrokerError::Internal(format!("not recorded in the audit log: {error}"))
    }
}

impl From<StoreError> for BrokerError {
    fn from(error: StoreError) -> Self {
        BrokerError::Internal(error.to_string())
    }
}

/// What an attestation leaves: the verified evidence and the key its
/// resources are encrypted to.
#[derive(Debug)]
struct Attested {
    evidence: AttestedEvidence,
    recipient: RecipientKey,
}

/// `POST /kbs/v0/attest` as the broker reads it: kbs-types' `Attestation`
/// field for field, except that the primary evidence is kept as its JSON
/// text for the verifier to parse once, straight into the report (one pass
/// over a body of some 13 KiB, where kbs-types' `Value` would build the
/// whole tree first).
#[derive(Deserialize)]
struct AttestationRequest<'a> {
    #[serde(rename = "init-data", default)]
    init_data: Option<InitData>,
    #[serde(rename = "runtime-data")]
    runtime_data: RuntimeData,
    #[serde(rename = "tee-evidence", borrow)]
    tee_evidence: CompositeEvidenceText<'a>,
}

/// kbs-types' `CompositeEvidence`, its primary evidence unparsed.
#[derive(Deserialize)]
struct CompositeEvidenceText<'a> {
    #[serde(borrow)]
    primary_evidence: &'a RawValue,
    additional_evidence: String,
}

/// The key broker: verifier, store, sessions, token signer and audit log.
#[derive(Debug)]
pub struct Broker {
    verifier: EvidenceVerifier,
    store: Store,
    audit: AuditLog,
    signer: TokenSigner,
    admin_tokens: Vec<AdminToken>,
    sessions: Sessions<Attested>,
}

/// A session id from a `Cookie` header value.
fn session_from_cookie(cookie: Option<&str>) -> Option<Uuid> {
    cookie?
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| name.trim() == SESSION_COOKIE)
        .and_then(|(_, value)| Uuid::parse_str(value.trim()).ok())
}

/// The token of an `Authorization: Bearer <token>` header value (the
/// scheme compared without case, as RFC 7235 says).
fn bearer_token(authorization: Option<&str>) -> Option<&str> {
    let (scheme, token) = authorization?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether `version` is the one Trustee's KBS requires: semver `=0.4.0`
/// (so build metadata may follow, a pre-release may not).
fn is_protocol_version(version: &str) -> bool {
    semver::Version::parse(version).is_ok_and(|version| {
        (version.major, version.minor, version.patch) == (0, 4, 0) && version.pre.is_empty()
    })
}

fn failed_names(failures: &[Check]) -> Value {
    Value::Array(
        failures
            .iter()
            .map(|check| json!({"check": check.name, "detail": check.detail}))
            .collect(),
    )
}

fn hex_value(bytes: &[u8]) -> Value {
    Value::String(hex::encode(bytes))
}

fn origin_name(origin: RootOrigin) -> &'static str {
    match origin {
        RootOrigin::Amd => "amd",
        RootOrigin::Simulated => "simulated",
    }
}

/// The claims of the token of an attestation: what the broker verified,
/// never a secret, and `jti`, the grant it stands for.
fn token_claims(
    grant: Uuid,
    issued: i64,
    ttl: i64,
    runtime_data: &RuntimeData,
    evidence: &AttestedEvidence,
) -> Value {
    let report = evidence.signed().report();
    let mut claims = json!({
        "iss": ISSUER,
        "iat": issued,
        "exp": issued.saturating_add(ttl),
        "jti": grant.to_string(),
        "tee-pubkey": serde_json::to_value(&runtime_data.tee_pubkey).unwrap_or(Value::Null),
        "tee": tee_name(Tee::Snp),
        "origin": origin_name(evidence.origin()),
        "product": evidence.product().to_string(),
        "measurement": hex_value(&report.measurement),
        "host_data": hex_value(&report.host_data),
        "chip_id": hex_value(&report.chip_id),
        "policy": format!("{:#x}", report.policy.raw()),
        "vmpl": report.vmpl,
        "reported_tcb": serde_json::to_value(report.reported_tcb).unwrap_or(Value::Null),
    });
    if let Some(document) = evidence.init_data() {
        claims["init_data"] = document.claims();
    }
    claims
}

/// Why an attestation's session gives no nonce, for a person.
fn nonce_problem_text(problem: SessionProblem) -> &'static str {
    match problem {
        SessionProblem::Expired => {
            "the challenge expired before the attestation: call /kbs/v0/auth again"
        }
        SessionProblem::Spent | SessionProblem::NotAttested => {
            "the session's nonce was already used: a nonce attests once; call /kbs/v0/auth again"
        }
        SessionProblem::Unknown => {
            "unknown session (expired and forgotten, or the broker restarted): call /kbs/v0/auth again"
        }
    }
}

/// Why a resource request's session gives no attestation, for a person.
fn session_problem_text(problem: SessionProblem) -> &'static str {
    match problem {
        SessionProblem::Unknown => {
            "its session is unknown (expired and forgotten, or the broker restarted)"
        }
        SessionProblem::Expired => "its session expired",
        SessionProblem::Spent | SessionProblem::NotAttested => "its session has not attested",
    }
}

impl Broker {
    /// A broker over its parts.
    pub fn new(
        config: &KbsConfig,
        verifier: EvidenceVerifier,
        store: Store,
        audit: AuditLog,
        signer: TokenSigner,
    ) -> Self {
        Broker {
            verifier,
            store,
            audit,
            signer,
            admin_tokens: config.admin_tokens.clone(),
            sessions: Sessions::new(
                std::time::Duration::from_secs(config.session_ttl_seconds),
                config.max_sessions,
            ),
        }
    }

    /// The session lifetime (the cookie's Max-Age).
    pub fn session_ttl(&self) -> std::time::Duration {
        self.sessions.ttl()
    }

    /// Records `event` and waits until it is durable.
    async fn record(&self, event: AuditEvent) -> Result<(), BrokerError> {
        self.audit.record(event).committed().await?;
        Ok(())
    }

    /// Records a refusal, then answers it (an audit failure wins).
    async fn refuse<T>(&self, event: AuditEvent, error: BrokerError) -> Result<T, BrokerError> {
        let event = event
            .field("kind", error.kind().name())
            .field("reason", error.to_string());
        self.record(event).await?;
        Err(error)
    }

    /// `POST /kbs/v0/auth`: a challenge and the new session's id.
    pub async fn auth(&self, body: &[u8]) -> Result<(Challenge, Uuid), BrokerError> {
        let refusal = AuditEvent::new("refusal").field("call", "auth");
        let request: Request = match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(error) => {
                let error = BrokerError::Attestation(format!("auth request: {error}"));
                return self.refuse(refusal, error).await;
            }
        };
        let refusal = refusal
            .field("version", request.version.clone())
            .field("tee", tee_name(request.tee));
        if !is_protocol_version(&request.version) {
            // Trustee's words, which its client and tests look for.
            let error = BrokerError::Attestation(format!(
                "KBS Client Protocol Version Mismatch: expect ={PROTOCOL_VERSION} while the request is {}",
                request.version
            ));
            return self.refuse(refusal, error).await;
        }
        if request.tee != Tee::Snp {
            let error = BrokerError::Attestation(format!(
                "tee {:?}: this broker attests SEV-SNP only (tee \"snp\")",
                tee_name(request.tee)
            ));
            return self.refuse(refusal, error).await;
        }
        let mut nonce_bytes = [0u8; 32];
        openssl::rand::rand_bytes(&mut nonce_bytes)
            .map_err(|error| BrokerError::Internal(format!("random nonce: {error}")))?;
        let nonce = STANDARD.encode(nonce_bytes);
        let Some(id) = self.sessions.open(nonce.clone()) else {
            let error = BrokerError::Busy(format!(
                "{} sessions are open, the most this broker holds: retry later",
                self.sessions.max()
            ));
            return self.refuse(refusal, error).await;
        };
        self.record(
            AuditEvent::new("auth")
                .field("session", id.to_string())
                .field("version", request.version)
                .field("tee", tee_name(request.tee)),
        )
        .await?;
        Ok((
            Challenge {
                nonce,
                extra_params: Value::String(String::new()),
            },
            id,
        ))
    }

    /// `POST /kbs/v0/attest` with the request's `Cookie` header.
    pub async fn attest(
        &self,
        cookie: Option<&str>,
        body: &[u8],
    ) -> Result<AttestationToken, BrokerError> {
        let refusal = AuditEvent::new("attestation").field("result", "refused");
        let Some(id) = session_from_cookie(cookie) else {
            let error = BrokerError::Attestation(format!(
                "no {SESSION_COOKIE} cookie: call /kbs/v0/auth first"
            ));
            return self.refuse(refusal, error).await;
        };
        let refusal = refusal.field("session", id.to_string());
        // Take the nonce: whatever follows, it is never accepted again.
        let nonce = match self.sessions.take_nonce(id) {
            Ok(nonce) => nonce,
            Err(problem) => {
                let error = BrokerError::Attestation(nonce_problem_text(problem).into());
                return self.refuse(refusal, error).await;
            }
        };
        let request: AttestationRequest<'_> = match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(error) => {
                let error = BrokerError::Attestation(format!("attestation request: {error}"));
                return self.refuse(refusal, error).await;
            }
        };
        let runtime_data = request.runtime_data;
        if runtime_data.nonce != nonce {
            let error = BrokerError::Attestation(
                "runtime-data.nonce: not this session's challenge (replayed or from another session)".into(),
            );
            return self.refuse(refusal, error).await;
        }
        let recipient = match RecipientKey::from_jwk(&runtime_data.tee_pubkey) {
            Ok(recipient) => recipient,
            Err(error) => {
                let error = BrokerError::Attestation(format!("runtime-data.tee-pubkey: {error}"));
                return self.refuse(refusal, error).await;
            }
        };
        let init_data = match request
            .init_data
            .as_ref()
            .map(InitDataDocument::from_attestation)
            .transpose()
        {
            Ok(init_data) => init_data,
            Err(error) => {
                let error = BrokerError::Attestation(error.to_string());
                return self.refuse(refusal, error).await;
            }
        };
        let additional_evidence = &request.tee_evidence.additional_evidence;
        let binding = match runtime_data_binding(&runtime_data, additional_evidence) {
            Ok(binding) => binding,
            Err(error) => {
                let error = BrokerError::Attestation(format!("runtime-data: {error}"));
                return self.refuse(refusal, error).await;
            }
        };
        let now = OffsetDateTime::now_utc();
        let primary_evidence = request.tee_evidence.primary_evidence.get();
        let evidence = match self
            .verifier
            .verify(primary_evidence, &binding, init_data, now)
        {
            Ok(evidence) => evidence,
            Err(EvidenceError::Refused(failures)) => {
                let refusal = refusal.field("failed_checks", failed_names(&failures));
                let error = BrokerError::Attestation(format!(
                    "the evidence fails: {}",
                    describe_failures(&failures)
                ));
                return self.refuse(refusal, error).await;
            }
            Err(error) => {
                let error = BrokerError::Attestation(error.to_string());
                return self.refuse(refusal, error).await;
            }
        };
        let grant = Uuid::new_v4();
        let report = evidence.signed().report();
        let ttl = i64::try_from(self.sessions.ttl().as_secs()).unwrap_or(i64::MAX);
        let claims = token_claims(grant, now.unix_timestamp(), ttl, &runtime_data, &evidence);
        let token = self
            .signer
            .sign(&claims)
            .map_err(|error| BrokerError::Internal(error.to_string()))?;
        let mut accepted = AuditEvent::new("attestation")
            .field("result", "accepted")
            .field("session", id.to_string())
            .field("token", grant.to_string())
            .field("origin", origin_name(evidence.origin()))
            .field("product", evidence.product().to_string())
            .field("measurement", hex_value(&report.measurement))
            .field("host_data", hex_value(&report.host_data))
            .field("chip_id", hex_value(&report.chip_id))
            .field("policy", format!("{:#x}", report.policy.raw()));
        if let Some(document) = evidence.init_data() {
            accepted = accepted.field("init_data", hex_value(&document.digest));
        }
        if !additional_evidence.is_empty() {
            accepted = accepted.field(
                "additional_evidence",
                format!("{} bytes, bound, not appraised", additional_evidence.len()),
            );
        }
        let ticket: AuditTicket = self.audit.record(accepted);
        self.sessions.attest(
            id,
            grant,
            Arc::new(Attested {
                evidence,
                recipient,
            }),
        );
        ticket.committed().await?;
        Ok(AttestationToken { token })
    }

    /// What a resource request may be answered on: the attested session
    /// of its cookie or, failing that, the grant of its bearer token.
    fn attestation_of(
        &self,
        cookie: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<(Arc<Attested>, String), BrokerError> {
        let session = match session_from_cookie(cookie) {
            Some(id) => match self.sessions.attested(id) {
                Ok(attested) => return Ok((attested, format!("session {id}"))),
                Err(problem) => format!(
                    "the {SESSION_COOKIE} cookie names no attested session: {}",
                    session_problem_text(problem)
                ),
            },
            None => format!("no {SESSION_COOKIE} cookie"),
        };
        let Some(token) = bearer_token(authorization) else {
            return Err(BrokerError::NoToken(format!(
                "{session}, and no Authorization: Bearer attestation token: attest first (/kbs/v0/auth, /kbs/v0/attest)"
            )));
        };
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let verified = self
            .signer
            .verify(token, now)
            .map_err(|error| BrokerError::BadToken(error.to_string()))?;
        Uuid::parse_str(&verified.id)
            .ok()
            .and_then(|grant| self.sessions.granted(grant))
            .map(|attested| (attested, format!("token {}", verified.id)))
            .ok_or_else(|| {
                BrokerError::BadToken(
                    "attestation token: its attestation is no longer held (the broker restarted): attest again".into(),
                )
            })
    }

    /// `GET /kbs/v0/resource/<path>` with the request's `Cookie` and
    /// `Authorization` headers.
    pub async fn resource(
        &self,
        cookie: Option<&str>,
        authorization: Option<&str>,
        path: &str,
    ) -> Result<JweResponse, BrokerError> {
        let refusal = AuditEvent::new("refusal")
            .field("call", "resource")
            .field("resource", path);
        let (attested, via) = match self.attestation_of(cookie, authorization) {
            Ok(found) => found,
            Err(error) => return self.refuse(refusal, error).await,
        };
        let refusal = refusal.field("via", via.clone());
        let path: ResourcePath = match path.parse() {
            Ok(path) => path,
            Err(error) => {
                return self
                    .refuse(refusal, BrokerError::NotFound(error.to_string()))
                    .await
            }
        };
        let Some(resource) = self.store.resource(&path) else {
            let error = BrokerError::NotFound(format!("no resource {path}"));
            return self.refuse(refusal, error).await;
        };
        let measurements = self.store.measurements_of(&resource.reference_values);
        let report = attested.evidence.signed().report();
        if let Err(failures) = self.verifier.appraise_release(
            &attested.evidence,
            &resource.policy,
            &measurements,
            OffsetDateTime::now_utc(),
        ) {
            let refusal = refusal
                .field("measurement", hex_value(&report.measurement))
                .field("failed_checks", failed_names(&failures));
            let error = BrokerError::PolicyDeny(format!(
                "the release policy of {path} refuses this guest: {}",
                describe_failures(&failures)
            ));
            return self.refuse(refusal, error).await;
        }
        let plaintext = self.store.unseal(&resource)?;
        let jwe = attested
            .recipient
            .encrypt(&plaintext)
            .map_err(|error| BrokerError::Jwe(format!("encrypting the resource: {error}")))?;
        drop(plaintext);
        self.record(
            AuditEvent::new("release")
                .field("via", via)
                .field("resource", path.to_string())
                .field("measurement", hex_value(&report.measurement))
                .field("host_data", hex_value(&report.host_data))
                .field("origin", origin_name(attested.evidence.origin())),
        )
        .await?;
        Ok(jwe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kbs::protocol::{composite_evidence, Attestation, TeePubKey};

    #[test]
    fn session_cookie_is_found_among_others() {
        let id = Uuid::new_v4();
        assert_eq!(
            session_from_cookie(Some(&format!("a=b; kbs-session-id={id}; c=d"))),
            Some(id)
        );
        assert_eq!(session_from_cookie(Some("kbs-session-id=nope")), None);
        assert_eq!(session_from_cookie(None), None);
    }

    #[test]
    fn bearer_tokens_and_versions_are_read_as_trustee_does() {
        assert_eq!(bearer_token(Some("Bearer a.b.c")), Some("a.b.c"));
        assert_eq!(bearer_token(Some("bearer  a.b.c ")), Some("a.b.c"));
        assert_eq!(bearer_token(Some("Basic a.b.c")), None);
        assert_eq!(bearer_token(Some("Bearer ")), None);
        assert_eq!(bearer_token(None), None);
        assert!(is_protocol_version("0.4.0"));
        assert!(is_protocol_version("0.4.0+build.7"));
        for other in ["0.4.1", "0.4", "0.3.0", "0.4.0-rc1", "v0.4.0", " 0.4.0", ""] {
            assert!(!is_protocol_version(other), "{other:?}");
        }
    }

    /// What kbs-types writes, this broker's reader reads, field for field.
    #[test]
    fn the_attestation_reader_takes_what_kbs_types_writes() {
        let attestation = Attestation {
            init_data: Some(InitData {
                format: "toml".into(),
                body: "algorithm = \"sha384\"".into(),
            }),
            runtime_data: RuntimeData {
                nonce: "n".into(),
                tee_pubkey: TeePubKey::EC {
                    crv: "P-256".into(),
                    alg: "ECDH-ES+A256KW".into(),
                    x: "x".into(),
                    y: "y".into(),
                },
            },
            tee_evidence: composite_evidence(json!({"attestation_report": {"version": 3}})),
        };
        let text = serde_json::to_vec(&attestation).expect("serializes");
        let read: AttestationRequest<'_> = serde_json::from_slice(&text).expect("reads");
        assert_eq!(read.runtime_data.nonce, "n");
        assert_eq!(read.init_data.expect("init-data").format, "toml");
        assert_eq!(read.tee_evidence.additional_evidence, "");
        let primary: Value =
            serde_json::from_str(read.tee_evidence.primary_evidence.get()).expect("json");
        assert_eq!(primary["attestation_report"]["version"], 3);
        // Without init-data, as Trustee's client sends `"init-data": null`.
        let plain = Attestation {
            init_data: None,
            ..attestation
        };
        let text = serde_json::to_vec(&plain).expect("serializes");
        assert!(serde_json::from_slice::<AttestationRequest<'_>>(&text).is_ok());
    }
}
