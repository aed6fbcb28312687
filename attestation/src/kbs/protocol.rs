//! The Trustee KBS protocol (RCAR, kbs-types 0.4.0) on the wire: the JSON
//! shapes of `/kbs/v0/auth`, `/kbs/v0/attest` and `/kbs/v0/resource`, the
//! RFC 7807 error body, resource paths, and the binding of the runtime data
//! into the report.
//!
//! This module owns only shapes and pure functions: it must never do I/O,
//! and never decide whether evidence is acceptable (the verifier does).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this crate speaks (`Request::version`).
pub const PROTOCOL_VERSION: &str = "0.4.0";

/// The cookie that carries the session between the three calls.
pub const SESSION_COOKIE: &str = "kbs-session-id";

/// The prefix of every RFC 7807 `type` URI, as Trustee spells it.
pub const ERROR_TYPE_PREFIX: &str = "https://github.com/confidential-containers/kbs/errors/";

/// Why a protocol value is malformed.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A resource path that is not `repository/type/tag`.
    #[error("resource path {path:?}: {problem}")]
    ResourcePath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A reference-value set name that is not 1-128 of `[A-Za-z0-9._-]`.
    #[error("name {0:?}: must be 1-128 of [A-Za-z0-9._-], and not . or ..")]
    Name(String),
    /// The runtime data cannot be canonicalized (cannot happen for the
    /// types of this module; kept so no error is swallowed).
    #[error("runtime data is not canonical JSON: {0}")]
    Canonical(#[from] serde_json::Error),
}

/// The TEE a client attests from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tee {
    /// AMD SEV-SNP.
    Snp,
    /// AMD SEV (no attestation report of its own).
    Sev,
    /// Intel TDX.
    Tdx,
    /// Intel SGX.
    Sgx,
    /// Arm CCA.
    Cca,
    /// Trustee's sample TEE: no hardware at all.
    Sample,
}

impl fmt::Display for Tee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tee::Snp => "snp",
            Tee::Sev => "sev",
            Tee::Tdx => "tdx",
            Tee::Sgx => "sgx",
            Tee::Cca => "cca",
            Tee::Sample => "sample",
        })
    }
}

fn empty_extra_params() -> Value {
    Value::String(String::new())
}

/// `POST /kbs/v0/auth` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version; this broker speaks 0.4.x.
    pub version: String,
    /// The TEE the client runs in.
    pub tee: Tee,
    /// TEE-specific parameters (unused for SNP).
    #[serde(rename = "extra-params", default = "empty_extra_params")]
    pub extra_params: Value,
}

/// `POST /kbs/v0/auth` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Challenge {
    /// Base64 (standard alphabet, padded) of 32 random bytes.
    pub nonce: String,
    /// TEE-specific parameters (unused for SNP).
    #[serde(rename = "extra-params", default = "empty_extra_params")]
    pub extra_params: Value,
}

/// The public half of the client's ephemeral key, as a JWK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kty")]
pub enum TeePubKey {
    /// An elliptic-curve key (`crv` P-256, `alg` ECDH-ES+A256KW).
    EC {
        /// Curve name.
        crv: String,
        /// Key-management algorithm the key is for.
        alg: String,
        /// Base64url affine x coordinate.
        x: String,
        /// Base64url affine y coordinate.
        y: String,
    },
    /// An RSA key (`alg` RSA-OAEP-256).
    RSA {
        /// Key-management algorithm the key is for.
        alg: String,
        /// Base64url modulus.
        n: String,
        /// Base64url public exponent.
        e: String,
    },
}

/// What the report binds: the challenge's nonce and the key the resource
/// is encrypted to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeData {
    /// The nonce of the challenge, as received.
    pub nonce: String,
    /// The client's ephemeral public key.
    #[serde(rename = "tee-pubkey")]
    pub tee_pubkey: TeePubKey,
}

/// `POST /kbs/v0/attest` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attestation {
    /// Initialisation data (unused by this broker).
    #[serde(rename = "init-data", default, skip_serializing_if = "Option::is_none")]
    pub init_data: Option<Value>,
    /// The data whose binding the report carries.
    #[serde(rename = "runtime-data")]
    pub runtime_data: RuntimeData,
    /// `{"primary_evidence": <SNP evidence JSON>, "additional_evidence": ""}`
    /// (the bare evidence object is accepted too).
    #[serde(rename = "tee-evidence")]
    pub tee_evidence: Value,
}

impl Attestation {
    /// Wraps SNP evidence in the composite form kbs-types 0.4.0 sends.
    pub fn new(runtime_data: RuntimeData, snp_evidence: Value) -> Self {
        Attestation {
            init_data: None,
            runtime_data,
            tee_evidence: serde_json::json!({
                "primary_evidence": snp_evidence,
                "additional_evidence": "",
            }),
        }
    }

    /// The SNP evidence object, from the composite or the bare form.
    pub fn primary_evidence(&self) -> &Value {
        match self.tee_evidence.get("primary_evidence") {
            Some(primary) => primary,
            None => &self.tee_evidence,
        }
    }
}

/// `POST /kbs/v0/attest` answer: a JWT signed by the broker (ES256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationToken {
    /// The compact JWS.
    pub token: String,
}

/// `GET /kbs/v0/resource/...` answer: a JWE in the flattened JSON
/// serialization (RFC 7516 section 7.2.2); every field base64url without
/// padding. See [`super::jwe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JweResponse {
    /// The protected header's JSON, base64url.
    pub protected: String,
    /// The content key, wrapped or encrypted to the recipient.
    pub encrypted_key: String,
    /// The 96-bit GCM initialisation vector.
    pub iv: String,
    /// The ciphertext.
    pub ciphertext: String,
    /// The 128-bit GCM tag.
    pub tag: String,
    /// Additional authenticated data, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aad: Option<String>,
}

/// The kinds of refusal, each a Trustee error type URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The evidence did not verify, or its binding or nonce is wrong.
    AttestationFailed,
    /// A request that cannot be parsed or makes no sense.
    InvalidRequest,
    /// A protocol version this broker does not speak.
    ProtocolVersion,
    /// No session, or no valid credentials.
    Unauthorized,
    /// Valid credentials without the right to the call.
    Forbidden,
    /// The session's nonce was used or timed out.
    ExpiredSession,
    /// The attested guest does not satisfy the resource's release policy.
    PolicyDeny,
    /// No such resource (or reference-value set).
    ResourceNotFound,
    /// The broker cannot serve now (retry later).
    ServiceUnavailable,
    /// The broker failed; nothing was released.
    InternalError,
}

impl ErrorKind {
    /// Every kind, to map a type URI back.
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::AttestationFailed,
        ErrorKind::InvalidRequest,
        ErrorKind::ProtocolVersion,
        ErrorKind::Unauthorized,
        ErrorKind::Forbidden,
        ErrorKind::ExpiredSession,
        ErrorKind::PolicyDeny,
        ErrorKind::ResourceNotFound,
        ErrorKind::ServiceUnavailable,
        ErrorKind::InternalError,
    ];

    /// The kind's name, the last segment of its type URI.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::AttestationFailed => "AttestationFailed",
            ErrorKind::InvalidRequest => "InvalidRequest",
            ErrorKind::ProtocolVersion => "ProtocolVersion",
            ErrorKind::Unauthorized => "Unauthorized",
            ErrorKind::Forbidden => "Forbidden",
            ErrorKind::ExpiredSession => "ExpiredSession",
            ErrorKind::PolicyDeny => "PolicyDeny",
            ErrorKind::ResourceNotFound => "ResourceNotFound",
            ErrorKind::ServiceUnavailable => "ServiceUnavailable",
            ErrorKind::InternalError => "InternalError",
        }
    }

    /// The HTTP status a refusal of this kind is answered with.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::AttestationFailed
            | ErrorKind::ProtocolVersion
            | ErrorKind::Unauthorized
            | ErrorKind::ExpiredSession => 401,
            ErrorKind::Forbidden | ErrorKind::PolicyDeny => 403,
            ErrorKind::ResourceNotFound => 404,
            ErrorKind::ServiceUnavailable => 503,
            ErrorKind::InternalError => 500,
        }
    }

    /// The RFC 7807 type URI.
    pub fn type_uri(self) -> String {
        format!("{ERROR_TYPE_PREFIX}{}", self.name())
    }

    /// The kind a type URI names, if any.
    pub fn from_type_uri(uri: &str) -> Option<Self> {
        let name = uri.strip_prefix(ERROR_TYPE_PREFIX)?;
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// An RFC 7807 problem body, as Trustee answers every refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInformation {
    /// `https://github.com/confidential-containers/kbs/errors/<Kind>`.
    #[serde(rename = "type")]
    pub error_type: String,
    /// What is wrong, for a person.
    pub detail: String,
}

impl ErrorInformation {
    /// A problem of `kind`.
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        ErrorInformation {
            error_type: kind.type_uri(),
            detail: detail.into(),
        }
    }
}

/// The 64 bytes a report's `report_data` must hold for `runtime_data`:
/// SHA-384 of its RFC 8785 canonical JSON, zero-padded.
///
/// RFC 8785 (JCS) fixes key order, whitespace and number and string
/// escapes, so the guest and the broker hash the same bytes whatever JSON
/// library either uses; `serde_json_canonicalizer` is a maintained,
/// dependency-light implementation of exactly that RFC (plain
/// `serde_json::to_vec` keeps insertion order and is no canonical form).
pub fn runtime_data_binding(runtime_data: &RuntimeData) -> Result<[u8; 64], ProtocolError> {
    let canonical = serde_json_canonicalizer::to_vec(runtime_data)?;
    let digest = openssl::sha::sha384(&canonical);
    let mut binding = [0u8; 64];
    binding[..48].copy_from_slice(&digest);
    Ok(binding)
}

/// `repository/type/tag`: where a resource lives in the broker.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ResourcePath {
    /// The repository (HyperSEV uses one per pool).
    pub repository: String,
    /// The kind of resource (`disk-key`, ...): the protocol's `type`.
    pub kind: String,
    /// The tag (HyperSEV: the VM id and disk).
    pub tag: String,
}

impl ResourcePath {
    /// Builds a path, checking each segment.
    pub fn new(repository: &str, kind: &str, tag: &str) -> Result<Self, ProtocolError> {
        format!("{repository}/{kind}/{tag}").parse()
    }
}

/// Whether `segment` is a non-empty run of `[A-Za-z0-9._-]`, not `.`/`..`.
fn valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= 128
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

impl FromStr for ResourcePath {
    type Err = ProtocolError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let problem = |problem| ProtocolError::ResourcePath {
            path: text.to_owned(),
            problem,
        };
        let segments: Vec<&str> = text.split('/').collect();
        let [repository, kind, tag] = segments.as_slice() else {
            return Err(problem("expected three segments, repository/type/tag"));
        };
        if ![repository, kind, tag]
            .into_iter()
            .all(|segment| valid_segment(segment))
        {
            return Err(problem(
                "each segment must be 1-128 of [A-Za-z0-9._-], and not . or ..",
            ));
        }
        Ok(ResourcePath {
            repository: (*repository).to_owned(),
            kind: (*kind).to_owned(),
            tag: (*tag).to_owned(),
        })
    }
}

impl fmt::Display for ResourcePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.repository, self.kind, self.tag)
    }
}

impl TryFrom<String> for ResourcePath {
    type Error = ProtocolError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<ResourcePath> for String {
    fn from(path: ResourcePath) -> Self {
        path.to_string()
    }
}

/// Checks the name of a reference-value set: 1-128 of `[A-Za-z0-9._-]`.
pub fn check_name(name: &str) -> Result<(), ProtocolError> {
    if valid_segment(name) {
        Ok(())
    } else {
        Err(ProtocolError::Name(name.to_owned()))
    }
}

/// `PUT /admin/v0/reference-values/<name>` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceValuesBody {
    /// Launch measurements, 96 hex digits each.
    pub measurements: Vec<String>,
}

/// `PUT /admin/v0/resources/<repo>/<type>/<tag>` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceBody {
    /// The secret, base64 (standard alphabet, padded).
    pub data: String,
    /// The release policy, an [`crate::policy::AppraisalPolicy`] in TOML.
    pub policy: String,
    /// Names of reference-value sets whose measurements the resource
    /// also accepts.
    #[serde(default)]
    pub reference_values: Vec<String>,
}

/// One entry of `GET /admin/v0/resources`: never the data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSummary {
    /// Where the resource lives.
    pub path: ResourcePath,
    /// Its release policy, TOML.
    pub policy: String,
    /// The reference-value sets it accepts.
    pub reference_values: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ec_key() -> TeePubKey {
        TeePubKey::EC {
            crv: "P-256".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: "x".into(),
            y: "y".into(),
        }
    }

    #[test]
    fn shapes_match_kbs_types() {
        let request: Request =
            serde_json::from_str(r#"{"version":"0.4.0","tee":"snp"}"#).expect("request");
        assert_eq!(request.tee, Tee::Snp);
        assert_eq!(request.extra_params, Value::String(String::new()));
        let sample: Request =
            serde_json::from_str(r#"{"version":"0.4.0","tee":"sample","extra-params":""}"#)
                .expect("sample");
        assert_eq!(sample.tee, Tee::Sample);

        let attestation = Attestation::new(
            RuntimeData {
                nonce: "n".into(),
                tee_pubkey: ec_key(),
            },
            serde_json::json!({"attestation_report": {}}),
        );
        let json = serde_json::to_value(&attestation).expect("serializes");
        assert!(json.get("init-data").is_none());
        assert_eq!(json["runtime-data"]["tee-pubkey"]["kty"], "EC");
        assert_eq!(
            json["tee-evidence"]["primary_evidence"]["attestation_report"],
            serde_json::json!({})
        );
        assert_eq!(json["tee-evidence"]["additional_evidence"], "");

        let bare: Attestation = serde_json::from_value(serde_json::json!({
            "runtime-data": {"nonce": "n", "tee-pubkey": {"kty": "RSA", "alg": "RSA-OAEP-256", "n": "AQ", "e": "AQAB"}},
            "tee-evidence": {"attestation_report": {"version": 3}}
        }))
        .expect("bare evidence");
        assert_eq!(bare.primary_evidence()["attestation_report"]["version"], 3);

        let error = ErrorInformation::new(ErrorKind::PolicyDeny, "measurement");
        let json = serde_json::to_value(&error).expect("serializes");
        assert_eq!(
            json["type"],
            "https://github.com/confidential-containers/kbs/errors/PolicyDeny"
        );
        assert_eq!(
            ErrorKind::from_type_uri(&error.error_type),
            Some(ErrorKind::PolicyDeny)
        );
    }

    #[test]
    fn binding_is_canonical() {
        let runtime_data = RuntimeData {
            nonce: "abc".into(),
            tee_pubkey: ec_key(),
        };
        // The same object with its keys in another order and with spaces.
        let reordered = r#"{ "tee-pubkey": {"y":"y","x":"x","kty":"EC","alg":"ECDH-ES+A256KW","crv":"P-256"}, "nonce": "abc" }"#;
        let parsed: RuntimeData = serde_json::from_str(reordered).expect("parses");
        let binding = runtime_data_binding(&runtime_data).expect("binding");
        assert_eq!(binding, runtime_data_binding(&parsed).expect("binding"));
        let canonical = br#"{"nonce":"abc","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"x","y":"y"}}"#;
        assert_eq!(binding[..48], openssl::sha::sha384(canonical));
        assert_eq!(binding[48..], [0; 16]);
    }

    #[test]
    fn resource_paths_are_validated() {
        let path: ResourcePath = "pool-1/disk-key/vm_7.root".parse().expect("valid");
        assert_eq!(path.kind, "disk-key");
        assert_eq!(path.to_string(), "pool-1/disk-key/vm_7.root");
        for bad in [
            "a/b", "a/b/c/d", "a//c", "a/b/c d", "../b/c", "a/b/..", "a/b/ü", "",
        ] {
            let error = bad.parse::<ResourcePath>().expect_err(bad);
            assert!(error.to_string().contains("resource path"), "{error}");
        }
        let json = serde_json::to_string(&path).expect("serializes");
        assert_eq!(json, r#""pool-1/disk-key/vm_7.root""#);
        assert!(serde_json::from_str::<ResourcePath>(r#""a/b""#).is_err());
    }
}
