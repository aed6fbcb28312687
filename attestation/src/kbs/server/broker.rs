//! The broker's command layer, transport-free: auth, attest and resource
//! for guests, and the admin changes, each answering a value or a
//! [`BrokerError`] that says which protocol refusal it is. The HTTP layer
//! only parses the transport and maps [`BrokerError::kind`] to a status.
//!
//! Sessions live in memory: a challenge's nonce is single-use and expires;
//! an attested session keeps the verified evidence (its signature checked
//! once) and the guest's ephemeral key, and expires in turn. A restart
//! forgets them all; a guest simply starts over.
//!
//! Every decision is in the audit log, durable before the answer leaves.
//! This module must never put a secret (resource data, KEK, tokens) in a
//! log line, an audit entry or an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use time::OffsetDateTime;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::audit::{AuditError, AuditEvent, AuditLog, AuditTicket};
use super::config::{AdminToken, KbsConfig};
use super::evidence::{
    describe_failures, AttestedEvidence, CompositeEvidence, EvidenceError, EvidenceVerifier,
};
use super::store::{Store, StoreError};
use super::token::TokenSigner;
use crate::certs::RootOrigin;
use crate::kbs::jwe::RecipientKey;
use crate::kbs::protocol::{
    check_name, runtime_data_binding, AttestationToken, Challenge, ErrorKind, JweResponse,
    ReferenceValuesBody, Request, ResourceBody, ResourcePath, ResourceSummary, RuntimeData, Tee,
};
use crate::policy::AppraisalPolicy;
use crate::verifier::Check;
use crate::HexBytes;

/// Largest resource accepted (disk keys are 32 to 64 bytes).
pub const MAX_RESOURCE_BYTES: usize = 64 * 1024;
/// Sessions created between two sweeps of the expired ones.
const SWEEP_EVERY: u64 = 1024;

/// A refusal or failure of a broker command, each one protocol error kind.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A request that does not parse or makes no sense; names the field.
    #[error("{0}")]
    InvalidRequest(String),
    /// A protocol version other than 0.4.x.
    #[error("{0}")]
    ProtocolVersion(String),
    /// No session, no admin token, or a session that has not attested.
    #[error("{0}")]
    Unauthorized(String),
    /// An admin token that is not one of the configured ones.
    #[error("{0}")]
    Forbidden(String),
    /// The session's nonce was used or expired, or the session expired.
    #[error("{0}")]
    ExpiredSession(String),
    /// The evidence failed a check (each failed check named).
    #[error("{0}")]
    AttestationFailed(String),
    /// The resource's release policy refuses the guest (each failed check named).
    #[error("{0}")]
    PolicyDeny(String),
    /// No such resource or reference-value set.
    #[error("{0}")]
    NotFound(String),
    /// Too many sessions at once.
    #[error("{0}")]
    Busy(String),
    /// The broker failed (store, audit log): nothing was released.
    #[error("{0}")]
    Internal(String),
}

impl BrokerError {
    /// The protocol error kind (and so the HTTP status).
    pub fn kind(&self) -> ErrorKind {
        match self {
            BrokerError::InvalidRequest(_) => ErrorKind::InvalidRequest,
            BrokerError::ProtocolVersion(_) => ErrorKind::ProtocolVersion,
            BrokerError::Unauthorized(_) => ErrorKind::Unauthorized,
            BrokerError::Forbidden(_) => ErrorKind::Forbidden,
            BrokerError::ExpiredSession(_) => ErrorKind::ExpiredSession,
            BrokerError::AttestationFailed(_) => ErrorKind::AttestationFailed,
            BrokerError::PolicyDeny(_) => ErrorKind::PolicyDeny,
            BrokerError::NotFound(_) => ErrorKind::ResourceNotFound,
            BrokerError::Busy(_) => ErrorKind::ServiceUnavailable,
            BrokerError::Internal(_) => ErrorKind::InternalError,
        }
    }
}

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

/// What an attested session holds.
#[derive(Debug)]
struct Attested {
    evidence: AttestedEvidence,
    recipient: RecipientKey,
}

#[derive(Debug)]
enum SessionState {
    /// Waiting for `/attest` with this nonce.
    Challenged { nonce: String },
    /// The nonce was presented once; it cannot be again.
    Used,
    /// Attested: resources may be asked for.
    Attested(Arc<Attested>),
}

#[derive(Debug)]
struct Session {
    expires: Instant,
    state: SessionState,
}

#[derive(Debug, Default)]
struct SessionTable {
    sessions: HashMap<Uuid, Session>,
    created: u64,
}

/// `POST /kbs/v0/attest` as the broker reads it: the shape of
/// [`crate::kbs::protocol::Attestation`], the primary evidence kept as its
/// JSON text for the verifier to parse once (one pass over the body).
#[derive(Deserialize)]
struct AttestationRequest<'a> {
    #[serde(rename = "runtime-data")]
    runtime_data: RuntimeData,
    #[serde(rename = "tee-evidence", borrow)]
    tee_evidence: CompositeEvidence<'a>,
    #[serde(rename = "init-data", default)]
    _init_data: Option<IgnoredAny>,
}

/// The same with bare evidence (no `primary_evidence`), read again whole.
#[derive(Deserialize)]
struct BareAttestationRequest<'a> {
    #[serde(rename = "tee-evidence", borrow)]
    tee_evidence: &'a RawValue,
}

/// The runtime data and SNP evidence text of an attest request body.
fn parse_attestation(body: &[u8]) -> Result<(RuntimeData, &str), BrokerError> {
    let invalid = |error: serde_json::Error| {
        BrokerError::InvalidRequest(format!("attestation request: {error}"))
    };
    let request: AttestationRequest<'_> = serde_json::from_slice(body).map_err(invalid)?;
    let evidence = match request.tee_evidence.primary_evidence {
        Some(primary) => primary.get(),
        None => {
            let bare: BareAttestationRequest<'_> = serde_json::from_slice(body).map_err(invalid)?;
            bare.tee_evidence.get()
        }
    };
    Ok((request.runtime_data, evidence))
}

/// A validated `PUT /admin/v0/resources` body.
struct NewResource {
    data: Zeroizing<Vec<u8>>,
    policy: AppraisalPolicy,
    policy_toml: String,
    reference_values: Vec<String>,
}

/// The key broker: verifier, store, sessions, token signer and audit log.
#[derive(Debug)]
pub struct Broker {
    verifier: EvidenceVerifier,
    store: Store,
    audit: AuditLog,
    signer: TokenSigner,
    admin_tokens: Vec<AdminToken>,
    ttl: Duration,
    max_sessions: usize,
    sessions: Mutex<SessionTable>,
}

/// A session id from a `Cookie` header value.
fn session_from_cookie(cookie: Option<&str>) -> Option<Uuid> {
    cookie?
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| name.trim() == crate::kbs::protocol::SESSION_COOKIE)
        .and_then(|(_, value)| Uuid::parse_str(value.trim()).ok())
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
            ttl: Duration::from_secs(config.session_ttl_seconds),
            max_sessions: config.max_sessions,
            sessions: Mutex::new(SessionTable::default()),
        }
    }

    /// The session lifetime (the cookie's Max-Age).
    pub fn session_ttl(&self) -> Duration {
        self.ttl
    }

    fn table(&self) -> std::sync::MutexGuard<'_, SessionTable> {
        // Sessions are replaced whole under the lock: a panic elsewhere
        // cannot leave one half-changed.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
                let error = BrokerError::InvalidRequest(format!("auth request: {error}"));
                return self.refuse(refusal, error).await;
            }
        };
        let refusal = refusal
            .field("version", request.version.clone())
            .field("tee", request.tee.to_string());
        if !request.version.starts_with("0.4.") {
            let error = BrokerError::ProtocolVersion(format!(
                "protocol version {:?} is not supported: this broker speaks 0.4.x",
                request.version
            ));
            return self.refuse(refusal, error).await;
        }
        if request.tee != Tee::Snp {
            let error = BrokerError::InvalidRequest(format!(
                "tee {}: this broker attests SEV-SNP guests only (tee \"snp\")",
                request.tee
            ));
            return self.refuse(refusal, error).await;
        }
        let mut nonce_bytes = [0u8; 32];
        openssl::rand::rand_bytes(&mut nonce_bytes)
            .map_err(|error| BrokerError::Internal(format!("random nonce: {error}")))?;
        let nonce = STANDARD.encode(nonce_bytes);
        let id = Uuid::new_v4();
        let admitted = {
            let now = Instant::now();
            let mut table = self.table();
            table.created += 1;
            if table.created.is_multiple_of(SWEEP_EVERY)
                || table.sessions.len() >= self.max_sessions
            {
                table.sessions.retain(|_, session| session.expires > now);
            }
            let admitted = table.sessions.len() < self.max_sessions;
            if admitted {
                table.sessions.insert(
                    id,
                    Session {
                        expires: now + self.ttl,
                        state: SessionState::Challenged {
                            nonce: nonce.clone(),
                        },
                    },
                );
            }
            admitted
        };
        if !admitted {
            let error = BrokerError::Busy(format!(
                "{} sessions are open, the most this broker holds: retry later",
                self.max_sessions
            ));
            return self.refuse(refusal, error).await;
        }
        self.record(
            AuditEvent::new("auth")
                .field("session", id.to_string())
                .field("version", request.version)
                .field("tee", request.tee.to_string()),
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
            let error = BrokerError::Unauthorized(
                "no kbs-session-id cookie: call /kbs/v0/auth first".into(),
            );
            return self.refuse(refusal, error).await;
        };
        let refusal = refusal.field("session", id.to_string());
        // Take the nonce: whatever follows, it is never accepted again.
        let taken = {
            let mut table = self.table();
            match table.sessions.get_mut(&id) {
                None => Err(BrokerError::Unauthorized(
                    "unknown session (expired and forgotten, or the broker restarted): call /kbs/v0/auth again".into(),
                )),
                Some(session) if session.expires <= Instant::now() => {
                    table.sessions.remove(&id);
                    Err(BrokerError::ExpiredSession(
                        "the challenge expired before the attestation: call /kbs/v0/auth again"
                            .into(),
                    ))
                }
                Some(session) => match std::mem::replace(&mut session.state, SessionState::Used) {
                    SessionState::Challenged { nonce } => Ok(nonce),
                    SessionState::Used | SessionState::Attested(_) => Err(BrokerError::ExpiredSession(
                        "the session's nonce was already used: a nonce attests once; call /kbs/v0/auth again".into(),
                    )),
                },
            }
        };
        let nonce = match taken {
            Ok(nonce) => nonce,
            Err(error) => return self.refuse(refusal, error).await,
        };
        let (runtime_data, evidence_text) = match parse_attestation(body) {
            Ok(parsed) => parsed,
            Err(error) => return self.refuse(refusal, error).await,
        };
        if runtime_data.nonce != nonce {
            let error = BrokerError::AttestationFailed(
                "runtime-data.nonce: not this session's challenge (replayed or from another session)".into(),
            );
            return self.refuse(refusal, error).await;
        }
        let recipient = match RecipientKey::from_jwk(&runtime_data.tee_pubkey) {
            Ok(recipient) => recipient,
            Err(error) => {
                let error =
                    BrokerError::InvalidRequest(format!("runtime-data.tee-pubkey: {error}"));
                return self.refuse(refusal, error).await;
            }
        };
        let binding = match runtime_data_binding(&runtime_data) {
            Ok(binding) => binding,
            Err(error) => {
                let error = BrokerError::InvalidRequest(format!("runtime-data: {error}"));
                return self.refuse(refusal, error).await;
            }
        };
        let now = OffsetDateTime::now_utc();
        let evidence = match self.verifier.verify(evidence_text, &binding, now) {
            Ok(evidence) => evidence,
            Err(EvidenceError::Refused(failures)) => {
                let refusal = refusal.field("failed_checks", failed_names(&failures));
                let error = BrokerError::AttestationFailed(format!(
                    "the evidence fails: {}",
                    describe_failures(&failures)
                ));
                return self.refuse(refusal, error).await;
            }
            Err(error) => {
                let error = BrokerError::InvalidRequest(error.to_string());
                return self.refuse(refusal, error).await;
            }
        };
        let report = evidence.signed().report();
        let issued = now.unix_timestamp();
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let claims = json!({
            "iss": "hsev-kbs",
            "iat": issued,
            "exp": issued.saturating_add(ttl),
            "tee-pubkey": serde_json::to_value(&runtime_data.tee_pubkey).unwrap_or(Value::Null),
            "tee": "snp",
            "origin": origin_name(evidence.origin()),
            "product": evidence.product().to_string(),
            "measurement": hex_value(&report.measurement),
            "host_data": hex_value(&report.host_data),
            "chip_id": hex_value(&report.chip_id),
            "policy": format!("{:#x}", report.policy.raw()),
            "vmpl": report.vmpl,
            "reported_tcb": serde_json::to_value(report.reported_tcb).unwrap_or(Value::Null),
        });
        let token = self
            .signer
            .sign(&claims)
            .map_err(|error| BrokerError::Internal(error.to_string()))?;
        let accepted = AuditEvent::new("attestation")
            .field("result", "accepted")
            .field("session", id.to_string())
            .field("origin", origin_name(evidence.origin()))
            .field("product", evidence.product().to_string())
            .field("measurement", hex_value(&report.measurement))
            .field("host_data", hex_value(&report.host_data))
            .field("chip_id", hex_value(&report.chip_id))
            .field("policy", format!("{:#x}", report.policy.raw()));
        let ticket: AuditTicket = self.audit.record(accepted);
        {
            let mut table = self.table();
            if let Some(session) = table.sessions.get_mut(&id) {
                session.expires = Instant::now() + self.ttl;
                session.state = SessionState::Attested(Arc::new(Attested {
                    evidence,
                    recipient,
                }));
            }
        }
        ticket.committed().await?;
        Ok(AttestationToken { token })
    }

    /// `GET /kbs/v0/resource/<path>` with the request's `Cookie` header.
    pub async fn resource(
        &self,
        cookie: Option<&str>,
        path: &str,
    ) -> Result<JweResponse, BrokerError> {
        let refusal = AuditEvent::new("refusal")
            .field("call", "resource")
            .field("resource", path);
        let Some(id) = session_from_cookie(cookie) else {
            let error = BrokerError::Unauthorized(
                "no kbs-session-id cookie: authenticate and attest first".into(),
            );
            return self.refuse(refusal, error).await;
        };
        let refusal = refusal.field("session", id.to_string());
        let attested = {
            let mut table = self.table();
            match table.sessions.get(&id) {
                None => Err(BrokerError::Unauthorized(
                    "unknown session (expired and forgotten, or the broker restarted): start over with /kbs/v0/auth".into(),
                )),
                Some(session) if session.expires <= Instant::now() => {
                    table.sessions.remove(&id);
                    Err(BrokerError::ExpiredSession(
                        "the session expired: start over with /kbs/v0/auth".into(),
                    ))
                }
                Some(Session {
                    state: SessionState::Attested(attested),
                    ..
                }) => Ok(Arc::clone(attested)),
                Some(_) => Err(BrokerError::Unauthorized(
                    "the session has not attested successfully".into(),
                )),
            }
        };
        let attested = match attested {
            Ok(attested) => attested,
            Err(error) => return self.refuse(refusal, error).await,
        };
        let path: ResourcePath = match path.parse() {
            Ok(path) => path,
            Err(error) => {
                return self
                    .refuse(refusal, BrokerError::InvalidRequest(error.to_string()))
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
            .map_err(|error| BrokerError::Internal(format!("encrypting the resource: {error}")))?;
        drop(plaintext);
        self.record(
            AuditEvent::new("release")
                .field("session", id.to_string())
                .field("resource", path.to_string())
                .field("measurement", hex_value(&report.measurement))
                .field("host_data", hex_value(&report.host_data))
                .field("origin", origin_name(attested.evidence.origin())),
        )
        .await?;
        Ok(jwe)
    }

    /// The admin token's holder, from an `Authorization` header value.
    pub async fn authorize_admin(
        &self,
        authorization: Option<&str>,
        call: &str,
    ) -> Result<String, BrokerError> {
        let refusal = AuditEvent::new("refusal").field("call", call.to_owned());
        let Some(token) = authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
        else {
            let error = BrokerError::Unauthorized(
                "the admin API needs an Authorization: Bearer <token> header".into(),
            );
            return self.refuse(refusal, error).await;
        };
        let digest = openssl::sha::sha256(token.as_bytes());
        let holder = self
            .admin_tokens
            .iter()
            .find(|known| openssl::memcmp::eq(&known.sha256.0, &digest))
            .map(|known| known.name.clone());
        match holder {
            Some(name) => Ok(name),
            None => {
                let error = BrokerError::Forbidden("the admin token is not valid".into());
                self.refuse(refusal, error).await
            }
        }
    }

    /// Runs a store write off the async workers.
    fn blocking<T>(work: impl FnOnce() -> T) -> T {
        tokio::task::block_in_place(work)
    }

    /// Records an admin change, then applies it, so that no change is ever
    /// durable without its entry (a crash in between leaves an entry for a
    /// change not made, never the reverse); a change that fails to apply is
    /// followed by a refusal entry.
    async fn admin_change<T>(
        &self,
        admin: &str,
        action: &'static str,
        target: &str,
        apply: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, BrokerError> {
        self.record(
            AuditEvent::new("admin")
                .field("admin", admin.to_owned())
                .field("action", action)
                .field("target", target.to_owned()),
        )
        .await?;
        match Self::blocking(apply) {
            Ok(value) => Ok(value),
            Err(error) => {
                self.admin_refused(admin, action, target, error.into())
                    .await
            }
        }
    }

    async fn admin_refused<T>(
        &self,
        admin: &str,
        action: &'static str,
        target: &str,
        error: BrokerError,
    ) -> Result<T, BrokerError> {
        let event = AuditEvent::new("refusal")
            .field("call", action)
            .field("admin", admin.to_owned())
            .field("target", target.to_owned());
        self.refuse(event, error).await
    }

    /// `PUT /admin/v0/reference-values/<name>`.
    pub async fn put_reference_values(
        &self,
        admin: &str,
        name: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let action = "put_reference_values";
        let parsed = (|| {
            check_name(name).map_err(|error| BrokerError::InvalidRequest(error.to_string()))?;
            let body: ReferenceValuesBody = serde_json::from_slice(body)
                .map_err(|error| BrokerError::InvalidRequest(format!("body: {error}")))?;
            body.measurements
                .iter()
                .enumerate()
                .map(|(index, text)| {
                    HexBytes::<48>::parse(text)
                        .map(|bytes| bytes.0)
                        .map_err(|error| {
                            BrokerError::InvalidRequest(format!("measurements[{index}]: {error}"))
                        })
                })
                .collect::<Result<Vec<[u8; 48]>, BrokerError>>()
        })();
        let measurements = match parsed {
            Ok(measurements) => measurements,
            Err(error) => return self.admin_refused(admin, action, name, error).await,
        };
        self.admin_change(admin, action, name, || {
            self.store.put_reference_values(name, measurements)
        })
        .await
    }

    /// `DELETE /admin/v0/reference-values/<name>`.
    pub async fn delete_reference_values(
        &self,
        admin: &str,
        name: &str,
    ) -> Result<(), BrokerError> {
        let action = "delete_reference_values";
        if let Err(error) = check_name(name) {
            let error = BrokerError::InvalidRequest(error.to_string());
            return self.admin_refused(admin, action, name, error).await;
        }
        if !self.store.has_reference_values(name) {
            let error = BrokerError::NotFound(format!("no reference-value set {name}"));
            return self.admin_refused(admin, action, name, error).await;
        }
        self.admin_change(admin, action, name, || {
            self.store.delete_reference_values(name)
        })
        .await
    }

    fn parse_resource(&self, body: &[u8]) -> Result<NewResource, BrokerError> {
        let body: ResourceBody = serde_json::from_slice(body)
            .map_err(|error| BrokerError::InvalidRequest(format!("body: {error}")))?;
        let encoded = Zeroizing::new(body.data);
        let data = Zeroizing::new(STANDARD.decode(encoded.as_bytes()).map_err(|error| {
            BrokerError::InvalidRequest(format!("data: not standard base64: {error}"))
        })?);
        if data.is_empty() {
            return Err(BrokerError::InvalidRequest("data: empty".into()));
        }
        if data.len() > MAX_RESOURCE_BYTES {
            return Err(BrokerError::InvalidRequest(format!(
                "data: {} bytes, at most {MAX_RESOURCE_BYTES}",
                data.len()
            )));
        }
        let policy = AppraisalPolicy::from_toml(&body.policy)
            // PolicyError's message starts with "policy" and names the key.
            .map_err(|error| BrokerError::InvalidRequest(error.to_string()))?;
        if policy.report_data.is_some() {
            return Err(BrokerError::InvalidRequest(
                "policy.report_data: the broker sets it per session (the runtime-data binding); leave it out".into(),
            ));
        }
        for (index, name) in body.reference_values.iter().enumerate() {
            check_name(name).map_err(|error| {
                BrokerError::InvalidRequest(format!("reference_values[{index}]: {error}"))
            })?;
            if body.reference_values[..index].contains(name) {
                return Err(BrokerError::InvalidRequest(format!(
                    "reference_values[{index}]: {name:?} appears twice"
                )));
            }
            if !self.store.has_reference_values(name) {
                return Err(BrokerError::InvalidRequest(format!(
                    "reference_values[{index}]: no reference-value set named {name:?} (put it first)"
                )));
            }
        }
        Ok(NewResource {
            data,
            policy,
            policy_toml: body.policy,
            reference_values: body.reference_values,
        })
    }

    /// `PUT /admin/v0/resources/<path>`.
    pub async fn put_resource(
        &self,
        admin: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let action = "put_resource";
        let parsed = path
            .parse::<ResourcePath>()
            .map_err(|error| BrokerError::InvalidRequest(error.to_string()))
            .and_then(|resource_path| Ok((resource_path, self.parse_resource(body)?)));
        let (resource_path, resource) = match parsed {
            Ok(parsed) => parsed,
            Err(error) => return self.admin_refused(admin, action, path, error).await,
        };
        let NewResource {
            data,
            policy,
            policy_toml,
            reference_values,
        } = resource;
        self.admin_change(admin, action, &resource_path.to_string(), || {
            self.store
                .put_resource(&resource_path, &data, policy, policy_toml, reference_values)
        })
        .await
    }

    /// `DELETE /admin/v0/resources/<path>`.
    pub async fn delete_resource(&self, admin: &str, path: &str) -> Result<(), BrokerError> {
        let action = "delete_resource";
        let resource_path = match path.parse::<ResourcePath>() {
            Ok(resource_path) => resource_path,
            Err(error) => {
                let error = BrokerError::InvalidRequest(error.to_string());
                return self.admin_refused(admin, action, path, error).await;
            }
        };
        if self.store.resource(&resource_path).is_none() {
            let error = BrokerError::NotFound(format!("no resource {resource_path}"));
            return self.admin_refused(admin, action, path, error).await;
        }
        self.admin_change(admin, action, &resource_path.to_string(), || {
            self.store.delete_resource(&resource_path)
        })
        .await
    }

    /// `GET /admin/v0/resources`: paths and policies, never data.
    pub fn list_resources(&self) -> Vec<ResourceSummary> {
        self.store.list()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
