//! The key broker on the wire, as Trustee's own client sees it: the real
//! `hsev-kbs` process on 127.0.0.1 and, on the other side, a client built
//! from the kbs-types of Trustee's client (guest-components' `kbs_protocol`
//! at the revision Trustee pins, kbs-types 0.15) that does what
//! `kbs_protocol`'s RCAR client does, step for step: its headers and
//! cookie, its Request (the hash algorithms it supports), the composite
//! evidence and its binding (SHA-384 of the JCS of `{tee-pubkey, nonce,
//! additional-evidence}`, padded to 64 bytes as its SNP attester pads it),
//! init-data, the passport-mode bearer, and JWE decryption that rebuilds
//! the AAD from the parsed header with sorted keys. Evidence comes from a
//! real simulated AMD Secure Processor. Nothing of the broker's own
//! protocol code is used on this side.

#[path = "support/kbs.rs"]
mod kbs_support;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hsev_attestation::firmware::LaunchedGuest;
use hsev_attestation::kbs::client::ResourcePath;
use hsev_attestation::kbs::release_policy::ReleasePolicy;
use hsev_attestation::policy::AppraisalPolicy;
use kbs_support::{admin_client, evidence, raw_agent, Kbs, KbsMode, SimPlatform, GUEST_POLICY};
use kbs_types_client::{
    Attestation, Challenge, CompositeEvidence, ErrorInformation, HashAlgorithm, InitData,
    ProtectedHeader, Request, Response, RuntimeData, Tee, TeePubKey,
};
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::encrypt::Decrypter;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::rsa::{Padding, Rsa};
use serde::Serialize;
use serde_json::{json, Value};

const MEASUREMENT: [u8; 48] = [0x42; 48];
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
/// What Trustee's client calls itself (`reqwest`'s user agent).
const USER_AGENT: &str = "attestation-agent-kbs-client/0.1.0";
/// `kbs_protocol`'s `KBS_PROTOCOL_VERSION`.
const KBS_PROTOCOL_VERSION: &str = "0.4.0";
const ERROR_TYPE_PREFIX: &str = "https://github.com/confidential-containers/kbs/errors/";
/// The error types of Trustee's KBS: the variants of `Error` in its
/// `kbs/src/error.rs` (the RFC 7807 `type` is the variant's name).
const TRUSTEE_ERROR_TYPES: [&str; 19] = [
    "AdminAuthInitialization",
    "AdminAuthAccess",
    "AttestationError",
    "HTTPFailed",
    "HTTPSFailed",
    "InvalidRequestPath",
    "JweError",
    "PluginManagerInitialization",
    "PluginNotFound",
    "PluginInternalError",
    "PolicyDeny",
    "ParsePolicyError",
    "PolicyEngineError",
    "RvpsError",
    "SerdeError",
    "StorageBackendInitialization",
    "TokenNotFound",
    "TokenVerifierError",
    "PrometheusError",
];

/// The key pairs `kbs_protocol`'s `TeeKeyAlgorithm` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    P256,
    P521,
    RsaOaep256,
}

/// A TEE key pair, as `kbs_protocol`'s `TeeKeyPair`.
struct TeeKey {
    kind: KeyKind,
    key: PKey<Private>,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(text).expect("base64url")
}

impl KeyKind {
    fn curve(self) -> Option<(Nid, i32, &'static str)> {
        match self {
            KeyKind::P256 => Some((Nid::X9_62_PRIME256V1, 32, "P-256")),
            KeyKind::P521 => Some((Nid::SECP521R1, 66, "P-521")),
            KeyKind::RsaOaep256 => None,
        }
    }
}

impl TeeKey {
    fn new(kind: KeyKind) -> Self {
        let key = match kind.curve() {
            Some((nid, _, _)) => {
                let group = EcGroup::from_curve_name(nid).expect("curve");
                PKey::from_ec_key(EcKey::generate(&group).expect("ec key")).expect("pkey")
            }
            // `RSA_PUBKEY_LENGTH` of its crypto crate.
            None => PKey::from_rsa(Rsa::generate(2048).expect("rsa")).expect("pkey"),
        };
        TeeKey { kind, key }
    }

    /// `TeeKeyPair::export_pubkey`.
    fn export_pubkey(&self) -> TeePubKey {
        match self.kind.curve() {
            Some((_, length, crv)) => {
                let ec = self.key.ec_key().expect("ec");
                let mut x = BigNum::new().expect("bn");
                let mut y = BigNum::new().expect("bn");
                let mut context = BigNumContext::new().expect("ctx");
                ec.public_key()
                    .affine_coordinates(ec.group(), &mut x, &mut y, &mut context)
                    .expect("coordinates");
                TeePubKey::EC {
                    crv: crv.into(),
                    alg: "ECDH-ES+A256KW".into(),
                    x: b64(&x.to_vec_padded(length).expect("x")),
                    y: b64(&y.to_vec_padded(length).expect("y")),
                }
            }
            None => {
                let rsa = self.key.rsa().expect("rsa");
                TeePubKey::RSA {
                    alg: "RSA-OAEP-256".into(),
                    k_mod: b64(&rsa.n().to_vec()),
                    k_exp: b64(&rsa.e().to_vec()),
                }
            }
        }
    }

    /// `TeeKeyPair::unwrap_cek`.
    fn unwrap_cek(&self, header: &ProtectedHeader, wrapped: &[u8]) -> Vec<u8> {
        match header.alg.as_str() {
            "RSA-OAEP-256" => {
                let mut decrypter = Decrypter::new(&self.key).expect("rsa key");
                decrypter
                    .set_rsa_padding(Padding::PKCS1_OAEP)
                    .expect("oaep");
                decrypter
                    .set_rsa_oaep_md(MessageDigest::sha256())
                    .expect("md");
                decrypter
                    .set_rsa_mgf1_md(MessageDigest::sha256())
                    .expect("mgf1");
                let mut cek = vec![0; decrypter.decrypt_len(wrapped).expect("len")];
                let length = decrypter.decrypt(wrapped, &mut cek).expect("RSA-OAEP");
                cek.truncate(length);
                cek
            }
            "ECDH-ES+A256KW" => {
                let epk = header.other_fields.get("epk").expect("epk");
                let (nid, _, crv) = self.kind.curve().expect("an EC key");
                assert_eq!(epk["crv"], crv, "unmatched curve");
                let group = EcGroup::from_curve_name(nid).expect("curve");
                let mut point = vec![0x04];
                point.extend(unb64(epk["x"].as_str().expect("x")));
                point.extend(unb64(epk["y"].as_str().expect("y")));
                let mut context = BigNumContext::new().expect("ctx");
                let point = EcPoint::from_bytes(&group, &point, &mut context).expect("epk point");
                let peer = PKey::from_ec_key(EcKey::from_public_key(&group, &point).expect("epk"))
                    .expect("pkey");
                let mut deriver = openssl::derive::Deriver::new(&self.key).expect("deriver");
                deriver.set_peer(&peer).expect("peer");
                let z = deriver.derive_to_vec().expect("ECDH");
                // Concat KDF, one SHA-256 round: counter, Z, the algorithm
                // with its length, empty PartyUInfo and PartyVInfo, 256 bits.
                let algorithm = b"ECDH-ES+A256KW";
                let mut hasher = openssl::sha::Sha256::new();
                hasher.update(&1u32.to_be_bytes());
                hasher.update(&z);
                hasher.update(&u32::try_from(algorithm.len()).expect("len").to_be_bytes());
                hasher.update(algorithm);
                hasher.update(&0u32.to_be_bytes());
                hasher.update(&0u32.to_be_bytes());
                hasher.update(&256u32.to_be_bytes());
                let kek = hasher.finish();
                let kek = openssl::aes::AesKey::new_decrypt(&kek).expect("kek");
                let mut cek = vec![0; wrapped.len() - 8];
                openssl::aes::unwrap_key(&kek, None, &mut cek, wrapped).expect("A256KW unwrap");
                cek
            }
            other => panic!("unsupported algorithm {other}"),
        }
    }

    /// `TeeKeyPair::decrypt_response`: the AAD is not the received header
    /// but the parsed one written again, `alg` and `enc` then the other
    /// members, every object's keys sorted (kbs-types' `generate_aad`
    /// under `serde_json` without `preserve_order`, as Trustee builds it).
    fn decrypt_response(&self, response: Response) -> Vec<u8> {
        let cek = self.unwrap_cek(&response.protected, &response.encrypted_key);
        let aad = sorted_aad(&response.protected);
        openssl::symm::decrypt_aead(
            openssl::symm::Cipher::aes_256_gcm(),
            &cek,
            Some(&response.iv),
            &aad,
            &response.ciphertext,
            &response.tag,
        )
        .expect("AES-256-GCM with the rebuilt AAD")
    }
}

/// A JSON value with every object's keys sorted.
fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let ordered: BTreeMap<&String, Value> = map
                .iter()
                .map(|(key, value)| (key, sorted(value)))
                .collect();
            let mut object = serde_json::Map::new();
            for (key, value) in ordered {
                object.insert(key.clone(), value);
            }
            Value::Object(object)
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// base64url of the protected header as Trustee's client writes it again.
fn sorted_aad(header: &ProtectedHeader) -> Vec<u8> {
    #[derive(Serialize)]
    struct Written<'a> {
        alg: &'a str,
        enc: &'a str,
        #[serde(flatten)]
        other: BTreeMap<&'a String, Value>,
    }
    let written = Written {
        alg: &header.alg,
        enc: &header.enc,
        other: header
            .other_fields
            .iter()
            .map(|(key, value)| (key, sorted(value)))
            .collect(),
    };
    b64(serde_json::to_string(&written).expect("json").as_bytes()).into_bytes()
}

/// A refusal as Trustee's client reads it: the status and the RFC 7807
/// body parsed as kbs-types' `ErrorInformation`.
#[derive(Debug)]
struct Refusal {
    status: u16,
    kind: String,
    detail: String,
}

fn refusal(status: u16, body: &[u8]) -> Refusal {
    let information: ErrorInformation = serde_json::from_slice(body).unwrap_or_else(|error| {
        panic!(
            "{status}: not an ErrorInformation ({error}): {}",
            String::from_utf8_lossy(body)
        )
    });
    let kind = information
        .error_type
        .strip_prefix(ERROR_TYPE_PREFIX)
        .unwrap_or_else(|| panic!("type {} is not Trustee's", information.error_type))
        .to_owned();
    assert!(
        TRUSTEE_ERROR_TYPES.contains(&kind.as_str()),
        "{kind} is not one of Trustee's error types"
    );
    Refusal {
        status,
        kind,
        detail: information.detail,
    }
}

fn assert_refusal<T: std::fmt::Debug>(
    result: Result<T, Refusal>,
    status: u16,
    kind: &str,
    words: &[&str],
) {
    match result {
        Err(refusal) => {
            assert_eq!(
                (refusal.status, refusal.kind.as_str()),
                (status, kind),
                "{}",
                refusal.detail
            );
            for word in words {
                assert!(
                    refusal.detail.contains(word),
                    "{word:?} not in {:?}",
                    refusal.detail
                );
            }
        }
        Ok(value) => panic!("expected {status} {kind}, got {value:?}"),
    }
}

/// What the client attests with: the SNP guest, and what it presents.
struct Guest<'a> {
    snp: &'a LaunchedGuest,
    init_data: Option<InitData>,
    /// Binds the old `{nonce, tee-pubkey}` form instead of Trustee's.
    old_binding: bool,
}

impl<'a> Guest<'a> {
    fn plain(snp: &'a LaunchedGuest) -> Self {
        Guest {
            snp,
            init_data: None,
            old_binding: false,
        }
    }
}

/// `kbs_protocol`'s `KbsClient` with an evidence provider: a cookie jar
/// of one, and its TEE key.
struct TrusteeClient {
    url: String,
    agent: ureq::Agent,
    cookie: Option<String>,
    key: TeeKey,
}

struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl TrusteeClient {
    fn new(kbs: &Kbs, kind: KeyKind) -> Self {
        TrusteeClient {
            url: kbs.url(),
            // Trustee's client trusts the broker's certificate it is given
            // (`--cert-file`); this one pins its key, which the broker's
            // TLS answers alike.
            agent: raw_agent(
                kbs,
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(60)))
                    .build(),
            ),
            cookie: None,
            key: TeeKey::new(kind),
        }
    }

    fn keep_cookie(&mut self, response: &ureq::http::Response<ureq::Body>) {
        for value in response.headers().get_all("set-cookie") {
            let text = value.to_str().expect("ascii cookie");
            let pair = text.split(';').next().expect("name=value").trim();
            if pair.starts_with("kbs-session-id=") {
                self.cookie = Some(pair.to_owned());
            }
        }
    }

    fn post(&mut self, path: &str, body: &impl Serialize) -> Answer {
        let mut request = self
            .agent
            .post(&format!("{}/kbs/v0/{path}", self.url))
            .header("user-agent", USER_AGENT)
            .header("content-type", "application/json");
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let body = serde_json::to_vec(body).expect("json");
        let mut response = request.send(&body[..]).expect("the broker answers");
        self.keep_cookie(&response);
        Answer {
            status: response.status().as_u16(),
            body: response.body_mut().read_to_vec().expect("body"),
        }
    }

    fn get(&mut self, path: &str, bearer: Option<&str>) -> Answer {
        let mut request = self
            .agent
            .get(&format!("{}/kbs/v0/{path}", self.url))
            .header("user-agent", USER_AGENT);
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        if let Some(token) = bearer {
            request = request.header("authorization", &format!("Bearer {token}"));
        }
        let mut response = request.call().expect("the broker answers");
        self.keep_cookie(&response);
        Answer {
            status: response.status().as_u16(),
            body: response.body_mut().read_to_vec().expect("body"),
        }
    }

    /// `build_request`: the version and the hash algorithms it supports.
    fn request(tee: Tee) -> Request {
        Request {
            version: KBS_PROTOCOL_VERSION.into(),
            tee,
            extra_params: json!({"supported-hash-algorithms": HashAlgorithm::list_all()}),
        }
    }

    /// `POST /kbs/v0/auth` with `body`.
    fn auth_with(&mut self, body: &impl Serialize) -> Result<Challenge, Refusal> {
        let answer = self.post("auth", body);
        match answer.status {
            200 => Ok(serde_json::from_slice(&answer.body).expect("a Challenge")),
            status => Err(refusal(status, &answer.body)),
        }
    }

    /// The handshake of `rcar_handshake`; the token on success.
    fn rcar_handshake(&mut self, guest: &Guest<'_>) -> Result<String, Refusal> {
        let challenge = self.auth_with(&Self::request(Tee::Snp))?;
        let algorithm = match challenge.extra_params.get("selected-hash-algorithm") {
            Some(name) => name
                .as_str()
                .expect("a string")
                .parse::<HashAlgorithm>()
                .expect("a hash algorithm"),
            None => HashAlgorithm::Sha384,
        };
        let runtime_data = RuntimeData {
            nonce: challenge.nonce,
            tee_pubkey: self.key.export_pubkey(),
        };
        // `get_composite_evidence`: no device, so no additional evidence;
        // the primary runtime data names the additional evidence string.
        let additional_evidence = String::new();
        let primary_runtime_data = if guest.old_binding {
            json!({"tee-pubkey": runtime_data.tee_pubkey, "nonce": runtime_data.nonce})
        } else {
            json!({
                "tee-pubkey": runtime_data.tee_pubkey,
                "nonce": runtime_data.nonce,
                "additional-evidence": additional_evidence,
            })
        };
        let canonical = serde_json_canonicalizer::to_vec(&primary_runtime_data).expect("jcs");
        // The SNP attester pads the digest to the 64 bytes of report_data.
        let mut report_data = [0u8; 64];
        let digest = algorithm.digest(&canonical);
        report_data[..digest.len()].copy_from_slice(&digest);
        let primary_evidence = evidence(guest.snp, &report_data).expect("SNP evidence");
        let attestation = Attestation {
            init_data: guest.init_data.clone(),
            runtime_data,
            tee_evidence: CompositeEvidence {
                primary_evidence,
                additional_evidence,
            },
        };
        let answer = self.post("attest", &attestation);
        match answer.status {
            200 => {
                let token: Value = serde_json::from_slice(&answer.body).expect("json");
                Ok(token["token"].as_str().expect("token").to_owned())
            }
            status => Err(refusal(status, &answer.body)),
        }
    }

    /// `get_resource`, in the session of the cookie jar or with `bearer`.
    fn get_resource(&mut self, path: &str, bearer: Option<&str>) -> Result<Vec<u8>, Refusal> {
        let answer = self.get(&format!("resource/{path}"), bearer);
        match answer.status {
            200 => {
                let text: Value = serde_json::from_slice(&answer.body).expect("json");
                let response: Response =
                    serde_json::from_slice(&answer.body).expect("a kbs-types Response");
                // The header travels as its own canonical form.
                assert_eq!(
                    text["protected"].as_str().expect("protected").as_bytes(),
                    sorted_aad(&response.protected),
                    "the protected header is not what the client rebuilds"
                );
                Ok(self.key.decrypt_response(response))
            }
            status => Err(refusal(status, &answer.body)),
        }
    }
}

/// The claims of a JWT, unverified.
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("JWT payload");
    serde_json::from_slice(&unb64(payload)).expect("JSON")
}

/// A development broker trusting `platform`, with `secret` at `path`
/// under `policy` accepting [`MEASUREMENT`].
fn broker(platform: &SimPlatform, extra_config: &str) -> Kbs {
    let kbs = Kbs::start_with(KbsMode::Development, &[platform.dir.path()], extra_config);
    admin_client(&kbs, "default")
        .put_reference_values("default", "vm", &[MEASUREMENT])
        .expect("reference values");
    kbs
}

fn put(kbs: &Kbs, path: &str, policy: &ReleasePolicy) {
    let path: ResourcePath = path.parse().expect("path");
    admin_client(kbs, "default")
        .put_resource(&path, Some(SECRET), policy, &["vm".into()])
        .expect("resource");
}

fn simulated() -> ReleasePolicy {
    AppraisalPolicy {
        allow_simulated: true,
        ..AppraisalPolicy::default()
    }
    .into()
}

#[test]
fn trustees_client_gets_the_resource_with_snp_evidence_with_each_of_its_keys() {
    let platform = SimPlatform::new();
    let kbs = broker(&platform, "");
    put(&kbs, "default/key/disk", &simulated());
    let guest = platform.launch(MEASUREMENT, GUEST_POLICY, [0; 32]);
    for kind in [KeyKind::P256, KeyKind::P521, KeyKind::RsaOaep256] {
        let mut client = TrusteeClient::new(&kbs, kind);
        let token = client
            .rcar_handshake(&Guest::plain(&guest))
            .unwrap_or_else(|refusal| panic!("{kind:?}: {refusal:?}"));
        assert!(client.cookie.is_some(), "a kbs-session-id cookie");
        let released = client
            .get_resource("default/key/disk", None)
            .unwrap_or_else(|refusal| panic!("{kind:?}: {refusal:?}"));
        assert_eq!(released, SECRET, "{kind:?}");
        // The same session serves again, without attesting again.
        assert_eq!(
            client
                .get_resource("default/key/disk", None)
                .expect("again"),
            SECRET
        );
        // The token is what `kbs_protocol`'s `Token::new` reads.
        let claims = claims(&token);
        assert_eq!(
            claims["tee-pubkey"],
            serde_json::to_value(client.key.export_pubkey()).expect("jwk")
        );
        assert!(claims["exp"].as_u64() > claims["iat"].as_u64());
        assert!(claims["jti"].is_string());
        assert_eq!(claims["measurement"], hex::encode(MEASUREMENT));
    }
    // The challenge is the one Trustee's KBS gives an SNP guest: a base64
    // nonce of 32 bytes, no extra parameters (so SHA-384).
    let mut client = TrusteeClient::new(&kbs, KeyKind::P256);
    let challenge = client
        .auth_with(&TrusteeClient::request(Tee::Snp))
        .expect("challenge");
    assert_eq!(STANDARD.decode(&challenge.nonce).expect("base64").len(), 32);
    assert_eq!(challenge.extra_params, json!(""));
    kbs.verify_audit();
}

#[test]
fn passport_mode_releases_on_the_token_alone() {
    let platform = SimPlatform::new();
    let kbs = broker(&platform, "");
    put(&kbs, "default/key/disk", &simulated());
    let guest = platform.launch(MEASUREMENT, GUEST_POLICY, [0; 32]);
    let mut attester = TrusteeClient::new(&kbs, KeyKind::P256);
    let token = attester
        .rcar_handshake(&Guest::plain(&guest))
        .expect("token");

    // `kbs-client get-resource --attestation-token --tee-key-file`: a
    // client with no cookie, the token as bearer, the same TEE key.
    let mut passport = TrusteeClient::new(&kbs, KeyKind::P256);
    passport.key = attester.key;
    assert_eq!(
        passport
            .get_resource("default/key/disk", Some(&token))
            .expect("released on the token"),
        SECRET
    );
    assert!(passport.cookie.is_none(), "no session was made");

    // A session that has not attested falls back on the token, as
    // Trustee's KBS does.
    let mut unattested = TrusteeClient::new(&kbs, KeyKind::P256);
    unattested.key = passport.key;
    unattested
        .auth_with(&TrusteeClient::request(Tee::Snp))
        .expect("challenge");
    assert_eq!(
        unattested
            .get_resource("default/key/disk", Some(&token))
            .expect("released"),
        SECRET
    );
    assert_refusal(
        unattested.get_resource("default/key/disk", None),
        401,
        "TokenNotFound",
        &["has not attested", "Bearer"],
    );

    // A token altered, cut, or signed by another broker: refused.
    let mut stranger = TrusteeClient::new(&kbs, KeyKind::P256);
    let (signed, signature) = token.rsplit_once('.').expect("JWS");
    let mut forged_claims = claims(&token);
    forged_claims["measurement"] = json!(hex::encode([0x43; 48]));
    let header = signed.split('.').next().expect("header");
    let forged = format!(
        "{header}.{}.{signature}",
        b64(forged_claims.to_string().as_bytes())
    );
    for bad in [forged.as_str(), signed, "not-a-token"] {
        assert_refusal(
            stranger.get_resource("default/key/disk", Some(bad)),
            401,
            "TokenVerifierError",
            &["attestation token"],
        );
    }
    let other_platform = SimPlatform::new();
    let other_kbs = broker(&other_platform, "");
    put(&other_kbs, "default/key/disk", &simulated());
    let other_guest = other_platform.launch(MEASUREMENT, GUEST_POLICY, [0; 32]);
    let other_token = TrusteeClient::new(&other_kbs, KeyKind::P256)
        .rcar_handshake(&Guest::plain(&other_guest))
        .expect("token of another broker");
    assert_refusal(
        stranger.get_resource("default/key/disk", Some(&other_token)),
        401,
        "TokenVerifierError",
        &["does not verify"],
    );
    // Neither a session nor a token.
    assert_refusal(
        stranger.get_resource("default/key/disk", None),
        401,
        "TokenNotFound",
        &["no kbs-session-id cookie", "Bearer"],
    );

    // A token outlives nothing: past its exp it is refused.
    drop(kbs);
    let kbs = broker(&platform, "session_ttl_seconds = 1");
    put(&kbs, "default/key/disk", &simulated());
    let mut short = TrusteeClient::new(&kbs, KeyKind::P256);
    let token = short.rcar_handshake(&Guest::plain(&guest)).expect("token");
    std::thread::sleep(Duration::from_millis(2100));
    let mut late = TrusteeClient::new(&kbs, KeyKind::P256);
    late.key = short.key;
    assert_refusal(
        late.get_resource("default/key/disk", Some(&token)),
        401,
        "TokenVerifierError",
        &["expired"],
    );
}

#[test]
fn every_refusal_is_a_trustee_error_its_client_reads() {
    let platform = SimPlatform::new();
    let kbs = broker(&platform, "");
    put(&kbs, "default/key/disk", &simulated());
    let guest = platform.launch(MEASUREMENT, GUEST_POLICY, [0; 32]);
    let other_measurement = platform.launch([0x43; 48], GUEST_POLICY, [0; 32]);

    // The version: exactly 0.4.0, as Trustee's KBS requires.
    for version in ["0.4.1", "0.3.0", "0.5.0", "0.4.0-rc1", "0.4"] {
        let mut client = TrusteeClient::new(&kbs, KeyKind::P256);
        let mut request = TrusteeClient::request(Tee::Snp);
        request.version = version.into();
        assert_refusal(
            client.auth_with(&request),
            401,
            "AttestationError",
            &["Version Mismatch", version],
        );
    }
    // The TEE: `sev` is no name of the protocol; every other one is, and
    // is refused by name.
    let mut client = TrusteeClient::new(&kbs, KeyKind::P256);
    assert_refusal(
        client.auth_with(&json!({"version": "0.4.0", "tee": "sev", "extra-params": ""})),
        401,
        "AttestationError",
        &["unknown variant `sev`"],
    );
    for tee in [
        Tee::AzSnpVtpm,
        Tee::AzTdxVtpm,
        Tee::Nvidia,
        Tee::Sgx,
        Tee::Tdx,
        Tee::Cca,
        Tee::Csv,
        Tee::Se,
        Tee::HygonDcu,
        Tee::Tpm,
        Tee::Sample,
        Tee::SampleDevice,
    ] {
        let name = serde_json::to_value(tee).expect("name");
        let name = name.as_str().expect("a string");
        assert_refusal(
            client.auth_with(&TrusteeClient::request(tee)),
            401,
            "AttestationError",
            &[&format!("tee \"{name}\""), "SEV-SNP only"],
        );
    }
    // A name newer kbs-types know (Trustee's KBS uses 0.18).
    assert_refusal(
        client.auth_with(&json!({"version": "0.4.0", "tee": "nvidia-dpu", "extra-params": ""})),
        401,
        "AttestationError",
        &["nvidia-dpu", "SEV-SNP only"],
    );

    // The binding: the old `{nonce, tee-pubkey}` form is refused.
    let mut client = TrusteeClient::new(&kbs, KeyKind::P256);
    assert_refusal(
        client.rcar_handshake(&Guest {
            old_binding: true,
            ..Guest::plain(&guest)
        }),
        401,
        "AttestationError",
        &["report_data"],
    );
    // Attest without the session cookie, or in a spent session.
    let mut client = TrusteeClient::new(&kbs, KeyKind::P256);
    let attestation = json!({
        "init-data": null,
        "runtime-data": {"nonce": "x", "tee-pubkey": client.key.export_pubkey()},
        "tee-evidence": {"primary_evidence": {}, "additional_evidence": ""},
    });
    let answer = client.post("attest", &attestation);
    assert_refusal(
        Err::<(), _>(refusal(answer.status, &answer.body)),
        401,
        "AttestationError",
        &["no kbs-session-id cookie"],
    );
    client.rcar_handshake(&Guest::plain(&guest)).expect("token");
    let answer = client.post("attest", &attestation);
    assert_refusal(
        Err::<(), _>(refusal(answer.status, &answer.body)),
        401,
        "AttestationError",
        &["already used"],
    );
    // RSA1_5 key wrapping, which Trustee's KBS still offers: refused.
    let mut client = TrusteeClient::new(&kbs, KeyKind::RsaOaep256);
    let challenge = client
        .auth_with(&TrusteeClient::request(Tee::Snp))
        .expect("challenge");
    let TeePubKey::RSA { k_mod, k_exp, .. } = client.key.export_pubkey() else {
        panic!("an RSA key")
    };
    let attestation = json!({
        "runtime-data": {"nonce": challenge.nonce, "tee-pubkey": {"kty": "RSA", "alg": "RSA1_5", "n": k_mod, "e": k_exp}},
        "tee-evidence": {"primary_evidence": {}, "additional_evidence": ""},
    });
    let answer = client.post("attest", &attestation);
    assert_refusal(
        Err::<(), _>(refusal(answer.status, &answer.body)),
        401,
        "AttestationError",
        &["RSA1_5", "RSA-OAEP-256"],
    );

    // The release policy refuses another measurement.
    let mut client = TrusteeClient::new(&kbs, KeyKind::P256);
    client
        .rcar_handshake(&Guest::plain(&other_measurement))
        .expect("attested: the measurement is each resource's call");
    assert_refusal(
        client.get_resource("default/key/disk", None),
        401,
        "PolicyDeny",
        &["measurement", &hex::encode([0x43; 48])],
    );
    // A path that names nothing: 404, which the client reads as such.
    let mut client = TrusteeClient::new(&kbs, KeyKind::P256);
    client.rcar_handshake(&Guest::plain(&guest)).expect("token");
    assert_refusal(
        client.get_resource("default/key/none", None),
        404,
        "InvalidRequestPath",
        &["default/key/none"],
    );
    assert_refusal(
        client.get_resource("default/key", None),
        404,
        "InvalidRequestPath",
        &["resource path"],
    );
    let answer = client.get("nebula-ca/credential", None);
    assert_refusal(
        Err::<(), _>(refusal(answer.status, &answer.body)),
        404,
        "PluginNotFound",
        &["/kbs/v0/nebula-ca/credential"],
    );
}

#[test]
fn init_data_is_bound_to_host_data_and_read_by_the_release_policy() {
    let toml = "algorithm = \"sha384\"\nversion = \"0.1.0\"\n\n[data]\n\"vm.toml\" = '''\nname = \"vault\"\n'''\n";
    let digest = openssl::sha::sha384(toml.as_bytes());
    let mut host_data = [0u8; 32];
    host_data.copy_from_slice(&digest[..32]);
    let init_data = InitData {
        format: "toml".into(),
        body: toml.into(),
    };
    let platform = SimPlatform::new();
    let kbs = broker(&platform, "");
    let requiring = |value: &str| -> ReleasePolicy {
        ReleasePolicy::from_toml(&format!(
            "allow_simulated = true\n[init_data.data]\n\"vm.toml\" = {}\n",
            toml::Value::String(value.into())
        ))
        .expect("policy")
    };
    put(&kbs, "default/key/vault", &requiring("name = \"vault\"\n"));
    put(&kbs, "default/key/other", &requiring("name = \"other\"\n"));
    put(&kbs, "default/key/any", &simulated());
    let launched = platform.launch(MEASUREMENT, GUEST_POLICY, host_data);

    // Bound: released where the policy's entries match, and the token
    // carries the init-data's claims.
    let mut client = TrusteeClient::new(&kbs, KeyKind::P256);
    let token = client
        .rcar_handshake(&Guest {
            init_data: Some(init_data.clone()),
            ..Guest::plain(&launched)
        })
        .expect("bound init-data attests");
    assert_eq!(
        claims(&token)["init_data"]["data"]["vm.toml"],
        "name = \"vault\"\n"
    );
    assert_eq!(
        client
            .get_resource("default/key/vault", None)
            .expect("vault"),
        SECRET
    );
    assert_eq!(
        client.get_resource("default/key/any", None).expect("any"),
        SECRET
    );
    assert_refusal(
        client.get_resource("default/key/other", None),
        401,
        "PolicyDeny",
        &["init_data", "vm.toml"],
    );
    // The same guest without its init-data: the policy that needs it
    // refuses.
    let mut client = TrusteeClient::new(&kbs, KeyKind::P256);
    client
        .rcar_handshake(&Guest::plain(&launched))
        .expect("attests");
    assert_refusal(
        client.get_resource("default/key/vault", None),
        401,
        "PolicyDeny",
        &["init_data", "presented none"],
    );
    assert_eq!(
        client.get_resource("default/key/any", None).expect("any"),
        SECRET
    );
    // Mismatched: a guest launched with other host data presents it.
    let elsewhere = platform.launch(MEASUREMENT, GUEST_POLICY, [0x07; 32]);
    let mut client = TrusteeClient::new(&kbs, KeyKind::P256);
    assert_refusal(
        client.rcar_handshake(&Guest {
            init_data: Some(init_data.clone()),
            ..Guest::plain(&elsewhere)
        }),
        401,
        "AttestationError",
        &["init_data", &hex::encode([0x07; 32])],
    );
    // Another format than TOML, or no init-data document.
    for (format, body, word) in [
        ("json", "{}", "\"json\""),
        ("toml", "version = \"0.1.0\"\n[data]\n", "algorithm"),
    ] {
        let mut client = TrusteeClient::new(&kbs, KeyKind::P256);
        assert_refusal(
            client.rcar_handshake(&Guest {
                init_data: Some(InitData {
                    format: format.into(),
                    body: body.into(),
                }),
                ..Guest::plain(&launched)
            }),
            401,
            "AttestationError",
            &["init-data", word],
        );
    }
    kbs.verify_audit();
}
