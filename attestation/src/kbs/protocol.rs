//! The Trustee KBS protocol (RCAR, version 0.4.0) on the wire: the JSON
//! shapes of `/kbs/v0/auth`, `/kbs/v0/attest` and `/kbs/v0/resource`, the
//! RFC 7807 error body and Trustee's error type names, resource paths, and
//! the binding of the runtime data into the report.
//!
//! The request and answer shapes are `kbs-types`' (the crate Trustee's KBS
//! and client share), re-exported here. Two are this module's own, each
//! saying why: [`AttestationToken`] (kbs-types has no type for the
//! `/attest` answer) and [`JweResponse`] (the resource's JWE, whose
//! protected header must keep the exact bytes its tag covers).
//!
//! This module owns only shapes and pure functions: it must never do I/O,
//! and never decide whether evidence is acceptable (the verifier does).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use kbs_types::{
    Attestation, Challenge, CompositeEvidence, ErrorInformation, InitData, Request, RuntimeData,
    Tee, TeePubKey,
};

/// The protocol version this crate speaks; Trustee's KBS requires exactly
/// this one (`=0.4.0`).
pub const PROTOCOL_VERSION: &str = "0.4.0";

/// The cookie that carries the session between the three calls.
pub const SESSION_COOKIE: &str = "kbs-session-id";

/// The prefix of every RFC 7807 `type` URI, as Trustee's KBS writes it
/// (`ERROR_TYPE_PREFIX` in its `kbs/src/error.rs`, plus the slash).
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

/// The name kbs-types (and so Trustee) gives a TEE on the wire: `snp`,
/// `az-snp-vtpm`, `sample`, ...
pub fn tee_name(tee: Tee) -> String {
    serde_json::to_value(tee)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{tee:?}"))
}

/// The `tee-evidence` of an SNP guest with no device evidence, as Trustee's
/// client sends it.
pub fn composite_evidence(snp_evidence: Value) -> CompositeEvidence {
    CompositeEvidence {
        primary_evidence: snp_evidence,
        additional_evidence: String::new(),
    }
}

/// `POST /kbs/v0/attest` answer: a JWT signed by the broker (ES256).
/// kbs-types has no type for it (Trustee's client reads it with a private
/// struct of the same shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationToken {
    /// The compact JWS.
    pub token: String,
}

/// `GET /kbs/v0/resource/...` answer: a JWE in the flattened JSON
/// serialization (RFC 7516 section 7.2.2); every field base64url without
/// padding. See [`super::jwe`].
///
/// It is the wire shape of kbs-types' `Response`, kept as text because
/// that type re-serialises its protected header whenever it is written,
/// with the key order of whatever `serde_json` features the build has
/// (this workspace keeps insertion order); the bytes the tag covers are
/// fixed once, canonically, by [`super::jwe`], and travel as they are.
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

/// The kinds of refusal, each named by one of the error types of Trustee's
/// KBS (the variants of `Error` in its `kbs/src/error.rs`), so that
/// Trustee's client reads them as its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The admin API's bearer token is missing or not one of the broker's.
    AdminAuthAccess,
    /// `/auth` or `/attest` refused: a malformed request, another protocol
    /// version or TEE, an unknown or spent session, evidence that fails.
    AttestationError,
    /// A path that names no resource (malformed, or nothing stored there).
    InvalidRequestPath,
    /// The resource could not be encrypted to the TEE's key.
    JweError,
    /// A release policy that does not parse (admin API).
    ParsePolicyError,
    /// The broker's store or audit log failed: nothing was released.
    PluginInternalError,
    /// A `/kbs/v0/` endpoint (a Trustee "plugin") this broker does not serve.
    PluginNotFound,
    /// The resource's release policy refuses the attested guest.
    PolicyDeny,
    /// Reference values that cannot be registered (admin API).
    RvpsError,
    /// An admin request body that does not deserialize or make sense.
    SerdeError,
    /// A resource request with neither an attested session nor a token.
    TokenNotFound,
    /// A bearer token the broker did not issue, or no longer honours.
    TokenVerifierError,
}

impl ErrorKind {
    /// Every kind, to map a type URI back.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::AdminAuthAccess,
        ErrorKind::AttestationError,
        ErrorKind::InvalidRequestPath,
        ErrorKind::JweError,
        ErrorKind::ParsePolicyError,
        ErrorKind::PluginInternalError,
        ErrorKind::PluginNotFound,
        ErrorKind::PolicyDeny,
        ErrorKind::RvpsError,
        ErrorKind::SerdeError,
        ErrorKind::TokenNotFound,
        ErrorKind::TokenVerifierError,
    ];

    /// The kind's name, the last segment of its type URI.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::AdminAuthAccess => "AdminAuthAccess",
            ErrorKind::AttestationError => "AttestationError",
            ErrorKind::InvalidRequestPath => "InvalidRequestPath",
            ErrorKind::JweError => "JweError",
            ErrorKind::ParsePolicyError => "ParsePolicyError",
            ErrorKind::PluginInternalError => "PluginInternalError",
            ErrorKind::PluginNotFound => "PluginNotFound",
            ErrorKind::PolicyDeny => "PolicyDeny",
            ErrorKind::RvpsError => "RvpsError",
            ErrorKind::SerdeError => "SerdeError",
            ErrorKind::TokenNotFound => "TokenNotFound",
            ErrorKind::TokenVerifierError => "TokenVerifierError",
        }
    }

    /// The HTTP status Trustee's KBS answers this kind with: 404 for a
    /// path that names nothing, 401 for everything else.
    pub fn trustee_status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequestPath | ErrorKind::PluginNotFound => 404,
            _ => 401,
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

    /// An RFC 7807 problem of this kind.
    pub fn problem(self, detail: impl Into<String>) -> ErrorInformation {
        ErrorInformation {
            error_type: self.type_uri(),
            detail: detail.into(),
        }
    }
}

/// What the primary evidence's runtime data is, as Trustee's client
/// builds it and Trustee's KBS checks it (`kbs/src/attestation/backend.rs`):
/// the runtime data and the additional evidence string exactly as sent.
#[derive(Serialize)]
struct PrimaryRuntimeData<'a> {
    #[serde(rename = "tee-pubkey")]
    tee_pubkey: &'a TeePubKey,
    nonce: &'a str,
    #[serde(rename = "additional-evidence")]
    additional_evidence: &'a str,
}

/// The 64 bytes the report's `report_data` must hold: SHA-384 of the
/// RFC 8785 canonical JSON of `{"tee-pubkey", "nonce",
/// "additional-evidence"}` (the runtime data's two fields, and the
/// composite evidence's `additional_evidence` string as sent), zero-padded.
/// That is the binding of Trustee's client and KBS for every TEE but IBM
/// SE, SNP included.
///
/// RFC 8785 (JCS) fixes key order, whitespace and number and string
/// escapes, so the guest and the broker hash the same bytes whatever JSON
/// library either uses; `serde_json_canonicalizer` is the implementation
/// Trustee itself uses (plain `serde_json::to_vec` keeps insertion order
/// and is no canonical form).
pub fn runtime_data_binding(
    runtime_data: &RuntimeData,
    additional_evidence: &str,
) -> Result<[u8; 64], ProtocolError> {
    let canonical = serde_json_canonicalizer::to_vec(&PrimaryRuntimeData {
        tee_pubkey: &runtime_data.tee_pubkey,
        nonce: &runtime_data.nonce,
        additional_evidence,
    })?;
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

/// `PUT /admin/v0/reference-values/<repository>/<name>` body.
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
    /// The secret, base64 (standard alphabet, padded). Absent: the
    /// resource keeps the secret it has, or, new, gets one the broker
    /// generates at its first release (32 random bytes), which no one
    /// outside the broker and the attested guest ever sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The release policy, a [`super::release_policy::ReleasePolicy`] in
    /// TOML.
    pub policy: String,
    /// Names of the repository's reference-value sets whose measurements
    /// the resource also accepts.
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
    /// Whether it holds a secret yet (false: generated at the first
    /// release).
    #[serde(default)]
    pub has_data: bool,
}

/// The header of a resource answer that says the resource is
/// single-instance, its value the lease's length in seconds: the guest
/// then keeps the lease (`POST /hsev/v0/lease/<path>`).
pub const LEASE_HEADER: &str = "hsev-lease-seconds";

/// `POST /hsev/v0/lease/<path>`'s answer (HyperSEV's own endpoint): the
/// attested launch holds the single-instance resource until `expires_at`,
/// `lease_seconds` after the broker took the renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseGrant {
    /// The resource.
    pub resource: String,
    /// The holder's REPORT_ID, hex.
    pub report_id: String,
    /// How long a renewal holds it.
    pub lease_seconds: u32,
    /// When the lease lapses unless renewed (RFC 3339).
    pub expires_at: String,
}

/// `GET /admin/v0/leases/<path>`'s answer: which launch holds a
/// single-instance resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseHolder {
    /// The resource.
    pub resource: String,
    /// The holder's REPORT_ID, hex.
    pub report_id: String,
    /// Its CHIP_ID, hex.
    pub chip_id: String,
    /// Its MEASUREMENT, hex.
    pub measurement: String,
    /// When it was first released the resource (RFC 3339).
    pub since: String,
    /// When its lease lapses unless renewed (RFC 3339).
    pub expires_at: String,
    /// Whether the lease still lives.
    pub live: bool,
}

/// `PUT /admin/v0/announcements/<repository>/<vm>` body: what the
/// operator says it runs for a tenant. Information for the tenant only:
/// it never changes what the broker releases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnouncementBody {
    /// The image id the VM boots (hex SHA-256 of its manifest).
    pub image: String,
    /// The launch measurement the operator expects, 96 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_measurement: Option<String>,
}

/// One entry of `GET /admin/v0/announcements`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announcement {
    /// The tenant's repository.
    pub repository: String,
    /// The VM's id.
    pub vm: String,
    /// The image id it boots, as announced.
    pub image: String,
    /// The operator's expected measurement, as announced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_measurement: Option<String>,
    /// The admin token's holder that announced it.
    pub announced_by: String,
    /// When (RFC 3339).
    pub updated: String,
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
    fn shapes_are_kbs_types() {
        let request: Request =
            serde_json::from_str(r#"{"version":"0.4.0","tee":"snp","extra-params":""}"#)
                .expect("request");
        assert_eq!(request.tee, Tee::Snp);
        for (tee, name) in [
            (Tee::Snp, "snp"),
            (Tee::AzSnpVtpm, "az-snp-vtpm"),
            (Tee::Sample, "sample"),
            (Tee::NvidiaDpu, "nvidia-dpu"),
        ] {
            assert_eq!(tee_name(tee), name);
        }
        // `sev` is no TEE of the protocol: a parse error, not a value.
        assert!(serde_json::from_str::<Request>(
            r#"{"version":"0.4.0","tee":"sev","extra-params":""}"#
        )
        .is_err());

        let attestation = Attestation {
            init_data: None,
            runtime_data: RuntimeData {
                nonce: "n".into(),
                tee_pubkey: ec_key(),
            },
            tee_evidence: composite_evidence(serde_json::json!({"attestation_report": {}})),
        };
        let json = serde_json::to_value(&attestation).expect("serializes");
        assert_eq!(json["runtime-data"]["tee-pubkey"]["kty"], "EC");
        assert_eq!(json["tee-evidence"]["additional_evidence"], "");

        let error = ErrorKind::PolicyDeny.problem("measurement");
        let json = serde_json::to_value(&error).expect("serializes");
        assert_eq!(
            json["type"],
            "https://github.com/confidential-containers/kbs/errors/PolicyDeny"
        );
        assert_eq!(
            ErrorKind::from_type_uri(&error.error_type),
            Some(ErrorKind::PolicyDeny)
        );
        assert_eq!(ErrorKind::PolicyDeny.trustee_status(), 401);
        assert_eq!(ErrorKind::InvalidRequestPath.trustee_status(), 404);
    }

    #[test]
    fn binding_is_trustees() {
        let runtime_data = RuntimeData {
            nonce: "abc".into(),
            tee_pubkey: ec_key(),
        };
        let binding = runtime_data_binding(&runtime_data, "").expect("binding");
        // Exactly what Trustee's client hashes: the three keys sorted, the
        // JWK's keys sorted, no whitespace.
        let canonical = br#"{"additional-evidence":"","nonce":"abc","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"x","y":"y"}}"#;
        assert_eq!(binding[..48], openssl::sha::sha384(canonical));
        assert_eq!(binding[48..], [0; 16]);
        // The additional evidence string is bound as sent.
        assert_ne!(
            binding,
            runtime_data_binding(&runtime_data, "{}").expect("binding")
        );
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
