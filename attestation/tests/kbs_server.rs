//! The key broker end to end: the real `hsev-kbs` binary on 127.0.0.1,
//! evidence from a real simulated AMD Secure Processor, the real client.

#[path = "support/kbs.rs"]
mod kbs_support;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hsev_attestation::kbs::client::{ClientError, KbsClient, KeyAlgorithm, ResourcePath};
use hsev_attestation::kbs::jwe::TeeKeyPair;
use hsev_attestation::kbs::protocol::{
    composite_evidence, runtime_data_binding, Attestation, RuntimeData,
};
use hsev_attestation::kbs::release_policy::ReleasePolicy;
use hsev_attestation::policy::AppraisalPolicy;
use hsev_attestation::HexBytes;
use kbs_support::{
    admin_client, evidence, guest_client, raw_agent, reader_client, reader_token, tenant_token,
    Kbs, KbsMode, SimPlatform, DEBUG_GUEST_POLICY, GUEST_POLICY, KBS_OPERATOR,
};

const MEASUREMENT: [u8; 48] = [0x42; 48];
const HOST_DATA: [u8; 32] = [0x07; 32];

fn path(text: &str) -> ResourcePath {
    text.parse().expect("resource path")
}

/// The release policy of the tests: simulated evidence allowed, the VM's
/// host data bound, the measurement coming from the reference values.
fn simulated_policy() -> AppraisalPolicy {
    AppraisalPolicy {
        allow_simulated: true,
        host_data: Some(HexBytes(HOST_DATA)),
        ..AppraisalPolicy::default()
    }
}

/// A development broker trusting `platform`, with the reference-value set
/// `vm` holding [`MEASUREMENT`].
fn development_broker(platform: &SimPlatform, extra_config: &str) -> Kbs {
    let kbs = Kbs::start_with(KbsMode::Development, &[platform.dir.path()], extra_config);
    admin_client(&kbs, "pool")
        .put_reference_values("pool", "vm", &[MEASUREMENT])
        .expect("reference values");
    kbs
}

fn fetch(
    client: &KbsClient,
    guest: &hsev_attestation::firmware::LaunchedGuest,
    resource: &str,
    algorithm: KeyAlgorithm,
) -> Result<Vec<u8>, ClientError> {
    client
        .fetch_resource(&path(resource), algorithm, &mut |binding| {
            evidence(guest, binding)
        })
        .map(|secret| secret.to_vec())
}

fn assert_refused(result: Result<Vec<u8>, ClientError>, status: u16, kind: &str, words: &[&str]) {
    match result {
        Err(ClientError::Refused {
            status: got,
            error_type,
            detail,
        }) => {
            assert_eq!(got, status, "{error_type}: {detail}");
            assert!(
                error_type.ends_with(&format!("/{kind}")),
                "{error_type}: {detail}"
            );
            for word in words {
                assert!(detail.contains(word), "{word:?} not in {detail:?}");
            }
        }
        other => panic!("expected a {status} {kind} refusal, got {other:?}"),
    }
}

/// An Attestation of SNP evidence without device evidence, as the guest
/// sends it.
fn attestation(runtime_data: RuntimeData, snp_evidence: serde_json::Value) -> Attestation {
    Attestation {
        init_data: None,
        runtime_data,
        tee_evidence: composite_evidence(snp_evidence),
    }
}

/// The claims of a JWT, unverified.
fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("JWT payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON")
}

#[test]
fn releases_to_a_guest_that_satisfies_the_policy_with_either_key_algorithm() {
    let platform = SimPlatform::new();
    let kbs = development_broker(&platform, "");
    let secret = b"0123456789abcdef0123456789abcdef".to_vec();
    admin_client(&kbs, "pool")
        .put_resource(
            &path("pool/disk-key/vm-1"),
            Some(&secret),
            &simulated_policy().into(),
            &["vm".into()],
        )
        .expect("resource");
    let guest = platform.launch(MEASUREMENT, GUEST_POLICY, HOST_DATA);
    let client = guest_client(&kbs);
    for algorithm in [KeyAlgorithm::EcdhEsA256kwP256, KeyAlgorithm::RsaOaep256] {
        let released = fetch(&client, &guest, "pool/disk-key/vm-1", algorithm).expect("released");
        assert_eq!(released, secret, "{algorithm:?}");
    }

    // The token says what was verified.
    let (challenge, session) = client.auth().expect("auth");
    let key_pair = TeeKeyPair::generate(KeyAlgorithm::EcdhEsA256kwP256).expect("key");
    let runtime_data = RuntimeData {
        nonce: challenge.nonce,
        tee_pubkey: key_pair.public_jwk().expect("jwk"),
    };
    let binding = runtime_data_binding(&runtime_data, "").expect("binding");
    let attestation = attestation(runtime_data, evidence(&guest, &binding).expect("evidence"));
    let token = client.attest(&session, &attestation).expect("attested");
    let claims = claims(&token.token);
    assert_eq!(claims["origin"], "simulated");
    assert_eq!(claims["measurement"], hex::encode(MEASUREMENT));
    assert_eq!(claims["host_data"], hex::encode(HOST_DATA));
    assert_eq!(claims["policy"], "0x30000");
    assert_eq!(claims["tee-pubkey"]["kty"], "EC");
    assert!(claims["exp"].as_i64() > claims["iat"].as_i64());
    // Two resources in one attested session, no second attestation.
    let jwe = client
        .resource(&session, &path("pool/disk-key/vm-1"))
        .expect("first");
    assert_eq!(key_pair.decrypt(&jwe).expect("decrypts").as_slice(), secret);
    let jwe = client
        .resource(&session, &path("pool/disk-key/vm-1"))
        .expect("second");
    assert_eq!(key_pair.decrypt(&jwe).expect("decrypts").as_slice(), secret);

    // The bare evidence object as tee-evidence is no composite evidence:
    // refused, as Trustee refuses it.
    let (challenge, session) = client.auth().expect("auth");
    let runtime_data = RuntimeData {
        nonce: challenge.nonce,
        tee_pubkey: key_pair.public_jwk().expect("jwk"),
    };
    let binding = runtime_data_binding(&runtime_data, "").expect("binding");
    let bare = serde_json::json!({
        "runtime-data": runtime_data,
        "tee-evidence": evidence(&guest, &binding).expect("evidence"),
    });
    let raw = raw_agent(
        &kbs,
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    )
    .post(&format!("{}/kbs/v0/attest", kbs.url()))
    .header("cookie", &format!("kbs-session-id={session}"))
    .send(bare.to_string().as_bytes())
    .expect("answers");
    assert_eq!(raw.status().as_u16(), 401);

    let verified = kbs.audit_verify();
    assert!(verified.status.success(), "{verified:?}");
    let log = std::fs::read_to_string(kbs.state_dir().join("audit.jsonl")).expect("audit");
    assert!(log.contains("\"event\":\"release\""));
    assert!(
        !log.contains("0123456789abcdef"),
        "the audit log holds no secret"
    );
    assert!(
        !log.contains(&tenant_token("pool")),
        "the audit log holds no token"
    );
}

#[test]
fn refuses_what_the_release_policy_does_not_allow() {
    let platform = SimPlatform::new();
    let kbs = development_broker(&platform, "");
    let admin = admin_client(&kbs, "pool");
    admin
        .put_resource(
            &path("pool/disk-key/vm-1"),
            Some(b"key-1"),
            &simulated_policy().into(),
            &["vm".into()],
        )
        .expect("resource");
    let amd_only = AppraisalPolicy {
        allow_simulated: false,
        ..simulated_policy()
    };
    admin
        .put_resource(
            &path("pool/disk-key/amd-only"),
            Some(b"key-2"),
            &amd_only.into(),
            &["vm".into()],
        )
        .expect("resource");
    admin
        .put_resource(
            &path("pool/disk-key/no-reference"),
            Some(b"key-3"),
            &simulated_policy().into(),
            &[],
        )
        .expect("resource");
    let client = guest_client(&kbs);
    let ec = KeyAlgorithm::EcdhEsA256kwP256;

    let other_measurement = platform.launch([0x43; 48], GUEST_POLICY, HOST_DATA);
    assert_refused(
        fetch(&client, &other_measurement, "pool/disk-key/vm-1", ec),
        401,
        "PolicyDeny",
        &["measurement", &hex::encode([0x43; 48])],
    );
    let debug = platform.launch(MEASUREMENT, DEBUG_GUEST_POLICY, HOST_DATA);
    assert_refused(
        fetch(&client, &debug, "pool/disk-key/vm-1", ec),
        401,
        "PolicyDeny",
        &["debug"],
    );
    let other_vm = platform.launch(MEASUREMENT, GUEST_POLICY, [0x08; 32]);
    assert_refused(
        fetch(&client, &other_vm, "pool/disk-key/vm-1", ec),
        401,
        "PolicyDeny",
        &["host_data"],
    );
    // Every failed check is named, not only the first.
    let everything_wrong = platform.launch([0x44; 48], DEBUG_GUEST_POLICY, [0x09; 32]);
    assert_refused(
        fetch(&client, &everything_wrong, "pool/disk-key/vm-1", ec),
        401,
        "PolicyDeny",
        &["measurement", "debug", "host_data"],
    );
    let guest = platform.launch(MEASUREMENT, GUEST_POLICY, HOST_DATA);
    assert_refused(
        fetch(&client, &guest, "pool/disk-key/amd-only", ec),
        401,
        "PolicyDeny",
        &["simulated_evidence"],
    );
    assert_refused(
        fetch(&client, &guest, "pool/disk-key/no-reference", ec),
        401,
        "PolicyDeny",
        &["measurement", "never released"],
    );
    assert_refused(
        fetch(&client, &guest, "pool/disk-key/unknown", ec),
        404,
        "InvalidRequestPath",
        &["pool/disk-key/unknown"],
    );
    // The right guest still gets its key.
    assert_eq!(
        fetch(&client, &guest, "pool/disk-key/vm-1", ec).expect("released"),
        b"key-1"
    );

    // No session, or a session that never attested: 401.
    let no_session = client.resource(
        "5d5d3d4e-0000-4000-8000-000000000000",
        &path("pool/disk-key/vm-1"),
    );
    assert!(
        matches!(no_session, Err(ClientError::Refused { status: 401, .. })),
        "{no_session:?}"
    );
    let (_, session) = client.auth().expect("auth");
    let unattested = client.resource(&session, &path("pool/disk-key/vm-1"));
    assert!(
        matches!(&unattested, Err(ClientError::Refused { status: 401, detail, error_type }) if detail.contains("has not attested") && error_type.ends_with("/TokenNotFound")),
        "{unattested:?}"
    );
    let raw = raw_agent(
        &kbs,
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    )
    .get(&format!("{}/kbs/v0/resource/pool/disk-key/vm-1", kbs.url()))
    .call()
    .expect("answers");
    assert_eq!(raw.status().as_u16(), 401);
}

/// Runs auth and builds an attestation for `guest`, its evidence bound to
/// `bind` (the real runtime data when `None`).
fn prepared_attestation(
    client: &KbsClient,
    guest: &hsev_attestation::firmware::LaunchedGuest,
    bind: Option<[u8; 64]>,
) -> (String, Attestation) {
    let (challenge, session) = client.auth().expect("auth");
    let key_pair = TeeKeyPair::generate(KeyAlgorithm::EcdhEsA256kwP256).expect("key");
    let runtime_data = RuntimeData {
        nonce: challenge.nonce,
        tee_pubkey: key_pair.public_jwk().expect("jwk"),
    };
    let binding = bind.unwrap_or_else(|| runtime_data_binding(&runtime_data, "").expect("binding"));
    let attestation = attestation(runtime_data, evidence(guest, &binding).expect("evidence"));
    (session, attestation)
}

fn assert_client_refused<T: std::fmt::Debug>(
    result: Result<T, ClientError>,
    status: u16,
    kind: &str,
    word: &str,
) {
    match result {
        Err(ClientError::Refused {
            status: got,
            error_type,
            detail,
        }) => {
            assert_eq!(got, status, "{error_type}: {detail}");
            assert!(error_type.ends_with(kind), "{error_type}: {detail}");
            assert!(detail.contains(word), "{word:?} not in {detail:?}");
        }
        other => panic!("expected {status} {kind}, got {other:?}"),
    }
}

#[test]
fn nonces_are_single_use_fresh_and_bound_to_the_runtime_data() {
    let platform = SimPlatform::new();
    let kbs = development_broker(&platform, "");
    let client = guest_client(&kbs);
    let guest = platform.launch(MEASUREMENT, GUEST_POLICY, HOST_DATA);

    // The same attestation twice in one session: the nonce is spent.
    let (session, attestation) = prepared_attestation(&client, &guest, None);
    client
        .attest(&session, &attestation)
        .expect("first attestation");
    assert_client_refused(
        client.attest(&session, &attestation),
        401,
        "AttestationError",
        "already used",
    );

    // An old nonce (the first session's) in a new session.
    let (new_session, _) = prepared_attestation(&client, &guest, None);
    assert_client_refused(
        client.attest(&new_session, &attestation),
        401,
        "AttestationError",
        "nonce",
    );
    // ...and that failed try spent the new session's nonce too.
    let (_, fresh) = prepared_attestation(&client, &guest, None);
    assert_client_refused(
        client.attest(&new_session, &fresh),
        401,
        "AttestationError",
        "already used",
    );

    // Evidence whose report_data is not the binding of the runtime data.
    let (session, attestation) = prepared_attestation(&client, &guest, Some([0x55; 64]));
    assert_client_refused(
        client.attest(&session, &attestation),
        401,
        "AttestationError",
        "report_data",
    );

    // Runtime data changed after the report was made (another key).
    let (session, mut attestation) = prepared_attestation(&client, &guest, None);
    attestation.runtime_data.tee_pubkey = TeeKeyPair::generate(KeyAlgorithm::EcdhEsA256kwP256)
        .expect("key")
        .public_jwk()
        .expect("jwk");
    assert_client_refused(
        client.attest(&session, &attestation),
        401,
        "AttestationError",
        "report_data",
    );

    // A challenge that waited past the session lifetime.
    drop(kbs);
    let kbs = development_broker(&platform, "session_ttl_seconds = 1");
    let client = guest_client(&kbs);
    let (session, attestation) = prepared_attestation(&client, &guest, None);
    std::thread::sleep(Duration::from_millis(1300));
    assert_client_refused(
        client.attest(&session, &attestation),
        401,
        "AttestationError",
        "expired",
    );
}

#[test]
fn production_mode_refuses_simulated_evidence_whatever_the_policy() {
    let platform = SimPlatform::new();
    let kbs = Kbs::start_with(KbsMode::Production, &[], "");
    admin_client(&kbs, "pool")
        .put_reference_values("pool", "vm", &[MEASUREMENT])
        .expect("reference values");
    admin_client(&kbs, "pool")
        .put_resource(
            &path("pool/disk-key/vm-1"),
            Some(b"key"),
            &simulated_policy().into(),
            &["vm".into()],
        )
        .expect("a policy may say allow_simulated; production ignores it");
    let guest = platform.launch(MEASUREMENT, GUEST_POLICY, HOST_DATA);
    let result = fetch(
        &guest_client(&kbs),
        &guest,
        "pool/disk-key/vm-1",
        KeyAlgorithm::EcdhEsA256kwP256,
    );
    assert_refused(
        result,
        401,
        "AttestationError",
        &["simulated_evidence", "production mode", "certificate_chain"],
    );
    // Simulated roots in a production configuration are refused at start.
    let mut config = std::fs::read_to_string(kbs.config_path()).expect("config");
    config = config.replace(
        "simulated_roots = []",
        &format!(
            "simulated_roots = [{:?}]",
            platform.dir.path().display().to_string()
        ),
    );
    std::fs::write(kbs.config_path(), config).expect("config");
    let output = std::process::Command::new(hsev_e2e::binary("hsev-kbs"))
        .args(["serve", "--config"])
        .arg(kbs.config_path())
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("simulated_roots"), "{stderr}");
}

/// A raw admin call: status and body.
fn raw_admin(
    kbs: &Kbs,
    method: &str,
    route: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let url = format!("{}{route}", kbs.url());
    let agent = raw_agent(
        kbs,
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    );
    let authorization = token.map(|token| format!("Bearer {token}"));
    let response = match method {
        "PUT" => {
            let mut request = agent.put(&url);
            if let Some(value) = &authorization {
                request = request.header("authorization", value);
            }
            request.send(body.as_bytes())
        }
        "DELETE" => {
            let mut request = agent.delete(&url);
            if let Some(value) = &authorization {
                request = request.header("authorization", value);
            }
            request.call()
        }
        _ => {
            let mut request = agent.get(&url);
            if let Some(value) = &authorization {
                request = request.header("authorization", value);
            }
            request.call()
        }
    };
    let mut response = response.expect("answers");
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    (status, body)
}

#[test]
fn admin_api_needs_a_valid_token_and_refuses_bad_input_without_change() {
    let platform = SimPlatform::new();
    let kbs = development_broker(&platform, "");
    let admin = admin_client(&kbs, "pool");
    admin
        .put_resource(
            &path("pool/disk-key/vm-1"),
            Some(b"key"),
            &simulated_policy().into(),
            &["vm".into()],
        )
        .expect("resource");
    let before = admin.list_resources().expect("list");
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].path, path("pool/disk-key/vm-1"));
    assert_eq!(before[0].reference_values, ["vm"]);

    let good = r#"{"data":"a2V5","policy":"allow_simulated = true","reference_values":["vm"]}"#;
    let route = "/admin/v0/resources/pool/disk-key/vm-2";
    // No token or a wrong one: Trustee's AdminAuthAccess, 401 either way.
    for (method, route, token) in [
        ("PUT", route, None),
        ("PUT", route, Some("not-the-token")),
        ("GET", "/admin/v0/resources", None),
        (
            "DELETE",
            "/admin/v0/resources/pool/disk-key/vm-1",
            Some("x"),
        ),
        ("DELETE", "/admin/v0/reference-values/pool/vm", None),
    ] {
        let (status, answer) = raw_admin(&kbs, method, route, token, good);
        assert_eq!(status, 401, "{method} {route}: {answer}");
        assert!(answer.contains("/AdminAuthAccess"), "{answer}");
    }

    let token_text = tenant_token("pool");
    let token = Some(token_text.as_str());
    for (route, body, status, kind, field) in [
        (
            route,
            r#"{"data":"a2V5","policy":"allow_simulatd = true"}"#,
            400,
            "ParsePolicyError",
            "allow_simulatd",
        ),
        (
            route,
            r#"{"data":"not base64!","policy":""}"#,
            400,
            "SerdeError",
            "data",
        ),
        (
            route,
            r#"{"data":"","policy":""}"#,
            400,
            "SerdeError",
            "data",
        ),
        (
            route,
            r#"{"data":"a2V5","policy":"","reference_values":["nope"]}"#,
            400,
            "RvpsError",
            "reference_values[0]",
        ),
        (
            route,
            r#"{"data":"a2V5","policy":"","reference_values":["bad name"]}"#,
            400,
            "RvpsError",
            "reference_values[0]",
        ),
        (
            route,
            r#"{"data":"a2V5","policy":"allowed_vmpls = [7]"}"#,
            400,
            "ParsePolicyError",
            "allowed_vmpls",
        ),
        (
            route,
            r#"{"data":"a2V5","policy":"[init_data]\nrequired = true"}"#,
            400,
            "ParsePolicyError",
            "required",
        ),
        (
            route,
            &format!(
                r#"{{"data":"a2V5","policy":"report_data = \"{}\""}}"#,
                "00".repeat(64)
            ),
            400,
            "ParsePolicyError",
            "report_data",
        ),
        (
            route,
            r#"{"data":"a2V5","policy":"","extra":1}"#,
            400,
            "SerdeError",
            "extra",
        ),
        (route, r#"{"data":"a2V5"}"#, 400, "SerdeError", "policy"),
        (
            "/admin/v0/resources/pool/disk-key",
            good,
            404,
            "InvalidRequestPath",
            "resource path",
        ),
        (
            "/admin/v0/resources/pool/disk%20key/vm-2",
            good,
            404,
            "InvalidRequestPath",
            "resource path",
        ),
        (
            "/admin/v0/resources/pool/../vm-2",
            good,
            404,
            "InvalidRequestPath",
            "resource path",
        ),
        (
            "/admin/v0/reference-values/pool/vm",
            r#"{"measurements":["00"]}"#,
            400,
            "RvpsError",
            "measurements[0]",
        ),
        (
            "/admin/v0/reference-values/pool/vm",
            &format!(r#"{{"measurements":["{}","zz"]}}"#, "11".repeat(48)),
            400,
            "RvpsError",
            "measurements[1]",
        ),
        (
            "/admin/v0/reference-values/pool/vm",
            r#"{"measurement":[]}"#,
            400,
            "RvpsError",
            "measurement",
        ),
    ] {
        let (got, answer) = raw_admin(&kbs, "PUT", route, token, body);
        assert_eq!(got, status, "{route} {body}: {answer}");
        assert!(answer.contains(&format!("/{kind}\"")), "{kind}: {answer}");
        assert!(answer.contains(field), "{field:?} not named in {answer}");
    }
    assert_eq!(
        raw_admin(
            &kbs,
            "DELETE",
            "/admin/v0/resources/pool/disk-key/none",
            token,
            ""
        )
        .0,
        404
    );
    assert_eq!(
        raw_admin(
            &kbs,
            "DELETE",
            "/admin/v0/reference-values/pool/none",
            token,
            ""
        )
        .0,
        404
    );

    // Nothing changed: the list, and the release with the old reference values.
    assert_eq!(admin.list_resources().expect("list"), before);
    let guest = platform.launch(MEASUREMENT, GUEST_POLICY, HOST_DATA);
    let released = fetch(
        &guest_client(&kbs),
        &guest,
        "pool/disk-key/vm-1",
        KeyAlgorithm::EcdhEsA256kwP256,
    );
    assert_eq!(released.expect("still released"), b"key");

    // Deleting the reference values leaves the resource with none: refused.
    admin
        .delete_reference_values("pool", "vm")
        .expect("deletes");
    assert_refused(
        fetch(
            &guest_client(&kbs),
            &guest,
            "pool/disk-key/vm-1",
            KeyAlgorithm::EcdhEsA256kwP256,
        ),
        401,
        "PolicyDeny",
        &["measurement"],
    );
    admin
        .delete_resource(&path("pool/disk-key/vm-1"))
        .expect("deletes");
    assert!(admin.list_resources().expect("list").is_empty());
    let log = std::fs::read_to_string(kbs.state_dir().join("audit.jsonl")).expect("audit");
    assert!(log.contains("\"action\":\"delete_resource\""));
    assert!(!log.contains(&tenant_token("pool")) && !log.contains("not-the-token"));
}

#[test]
fn resource_data_is_encrypted_at_rest() {
    let platform = SimPlatform::new();
    let kbs = development_broker(&platform, "");
    let secret = b"PLAINTEXT-DISK-KEY-7f3a9c1e5b2d8e4f".to_vec();
    admin_client(&kbs, "pool")
        .put_resource(
            &path("pool/disk-key/vm-1"),
            Some(&secret),
            &simulated_policy().into(),
            &["vm".into()],
        )
        .expect("resource");
    let encoded = base64::engine::general_purpose::STANDARD.encode(&secret);
    let mut found_rows = false;
    for entry in std::fs::read_dir(kbs.state_dir()).expect("state dir") {
        let file = entry.expect("entry").path();
        if file.is_dir() {
            continue; // tls/: the broker's certificate and key
        }
        let bytes = std::fs::read(&file).expect("reads");
        let name = file.display().to_string();
        assert!(
            !bytes
                .windows(secret.len())
                .any(|window| window == secret.as_slice()),
            "plaintext in {name}"
        );
        assert!(
            !bytes
                .windows(encoded.len())
                .any(|window| window == encoded.as_bytes()),
            "base64 plaintext in {name}"
        );
        found_rows |= name.contains("kbs.db")
            && bytes
                .windows(5)
                .any(|window| window == b"vm-1\0" || window == b"pool/");
    }
    assert!(found_rows, "the resource row is in the database");
}

#[test]
fn acknowledged_writes_survive_kill_9_and_the_audit_chain_holds() {
    let platform = SimPlatform::new();
    let mut kbs = development_broker(&platform, "");
    let admin = admin_client(&kbs, "pool");
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = {
        let acknowledged = std::sync::Arc::clone(&acknowledged);
        std::thread::spawn(move || {
            for index in 0..2000 {
                let resource = path(&format!("pool/disk-key/vm-{index}"));
                let data = format!("key-{index}");
                match admin.put_resource(
                    &resource,
                    Some(data.as_bytes()),
                    &simulated_policy().into(),
                    &["vm".into()],
                ) {
                    Ok(()) => acknowledged.lock().expect("lock").push(index),
                    Err(_) => break,
                }
            }
        })
    };
    // Let a stream of writes run, then cut the power.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while acknowledged.lock().expect("lock").len() < 40 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    kbs.kill_9();
    writer.join().expect("writer");
    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(
        acknowledged.len() >= 40,
        "only {} writes before the kill",
        acknowledged.len()
    );

    kbs.restart();
    let listed: Vec<String> = admin_client(&kbs, "pool")
        .list_resources()
        .expect("list")
        .into_iter()
        .map(|summary| summary.path.to_string())
        .collect();
    for index in &acknowledged {
        assert!(
            listed.contains(&format!("pool/disk-key/vm-{index}")),
            "vm-{index} lost"
        );
    }
    let client = guest_client(&kbs);
    let guest = platform.launch(MEASUREMENT, GUEST_POLICY, HOST_DATA);
    for index in &acknowledged {
        let released = fetch(
            &client,
            &guest,
            &format!("pool/disk-key/vm-{index}"),
            KeyAlgorithm::EcdhEsA256kwP256,
        )
        .expect("released after the restart");
        assert_eq!(released, format!("key-{index}").into_bytes());
    }

    // The audit chain verifies across the crash...
    let verified = kbs.audit_verify();
    assert!(verified.status.success(), "{verified:?}");
    let stdout = String::from_utf8_lossy(&verified.stdout);
    let entries: u64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("entries "))
        .and_then(|count| count.parse().ok())
        .expect("entries line");
    assert!(entries as usize > acknowledged.len(), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with("head ") && line.len() == 5 + 64),
        "{stdout}"
    );

    // ...and one flipped byte is found, naming its line.
    kbs.kill_9();
    let audit = kbs.state_dir().join("audit.jsonl");
    let mut bytes = std::fs::read(&audit).expect("audit");
    let line_starts: Vec<usize> = std::iter::once(0)
        .chain(
            bytes
                .iter()
                .enumerate()
                .filter(|(_, &byte)| byte == b'\n')
                .map(|(index, _)| index + 1),
        )
        .collect();
    let target_line = 10;
    bytes[line_starts[target_line - 1] + 30] ^= 0x20;
    std::fs::write(&audit, &bytes).expect("writes");
    let broken = kbs.audit_verify();
    assert_eq!(broken.status.code(), Some(1), "{broken:?}");
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(stderr.contains(&format!("line {target_line}")), "{stderr}");
}

#[test]
fn refuses_to_start_on_an_unsafe_kek_or_a_bad_config() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let init = std::process::Command::new(hsev_e2e::binary("hsev-kbs"))
        .args(["init", "--state-dir"])
        .arg(&state)
        .output()
        .expect("init");
    assert!(init.status.success(), "{init:?}");
    let kek = state.join("kek.bin");
    assert_eq!(
        std::fs::metadata(&kek).expect("kek").permissions().mode() & 0o777,
        0o600
    );
    let serve = |config: &str| -> String {
        let path = dir.path().join("kbs.toml");
        std::fs::write(&path, config).expect("config");
        let output = std::process::Command::new(hsev_e2e::binary("hsev-kbs"))
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .expect("runs");
        assert!(!output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let config = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\nmode = \"production\"\n",
        state.display().to_string()
    );

    // The TLS pair init made: its key is the owner's alone, or no start.
    let tls_key = state.join("tls/key.pem");
    assert_eq!(
        std::fs::metadata(&tls_key)
            .expect("tls key")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    std::fs::set_permissions(&tls_key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let error = serve(&config);
    assert!(
        error.contains("key.pem") && error.contains("0644"),
        "{error}"
    );
    std::fs::set_permissions(&tls_key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    // Plain HTTP is for development only, whatever the flag says.
    let path = dir.path().join("kbs.toml");
    std::fs::write(&path, &config).expect("config");
    let output = std::process::Command::new(hsev_e2e::binary("hsev-kbs"))
        .args(["serve", "--insecure-http-dev", "--config"])
        .arg(&path)
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("insecure_http_dev"), "{error}");

    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let error = serve(&config);
    assert!(
        error.contains("kek.bin") && error.contains("0640"),
        "{error}"
    );
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(&kek, [0u8; 31]).expect("short kek");
    let error = serve(&config);
    assert!(error.contains("31 bytes"), "{error}");
    std::fs::remove_file(&kek).expect("remove");
    let error = serve(&config);
    assert!(error.contains("kek.bin"), "{error}");

    let error = serve(&format!("{config}session_ttl = 5\n"));
    assert!(error.contains("session_ttl"), "{error}");
    let error = serve(&config.replace("production", "staging"));
    assert!(error.contains("mode"), "{error}");
    let error = serve(&format!("{config}session_ttl_seconds = 0\n"));
    assert!(error.contains("session_ttl_seconds"), "{error}");
}

/// One admin call with `token`: status and body.
fn admin_as(kbs: &Kbs, token: &str, method: &str, route: &str, body: &str) -> (u16, String) {
    raw_admin(kbs, method, route, Some(token), body)
}

#[test]
fn each_tenant_token_is_scoped_to_its_repository_a_reader_only_reads_and_the_operator_only_announces(
) {
    let platform = SimPlatform::new();
    let kbs = development_broker(&platform, "");
    let alice = admin_client(&kbs, "alice");
    alice
        .put_resource(
            &path("alice/disk-key/vm-1"),
            None,
            &simulated_policy().into(),
            &[],
        )
        .expect("alice sets her own policy");
    let bob = tenant_token("bob");
    let reader = reader_token("alice");
    let good = r#"{"policy":"allow_simulated = true"}"#;
    let alice_route = "/admin/v0/resources/alice/disk-key/vm-1";
    let image = "ab".repeat(32);
    let announcement = format!(
        r#"{{"image":"{image}","expected_measurement":"{}"}}"#,
        hex::encode(MEASUREMENT)
    );
    for (who, token, method, route, body, words) in [
        (
            "bob",
            bob.as_str(),
            "PUT",
            alice_route,
            good,
            vec!["bob", "\\\"alice\\\""],
        ),
        (
            "bob",
            bob.as_str(),
            "DELETE",
            alice_route,
            "",
            vec!["scoped to repository"],
        ),
        (
            "bob",
            bob.as_str(),
            "PUT",
            "/admin/v0/reference-values/alice/vm",
            r#"{"measurements":[]}"#,
            vec!["scoped to repository"],
        ),
        (
            "bob",
            bob.as_str(),
            "PUT",
            "/admin/v0/announcements/alice/vm-1",
            &announcement,
            vec!["scoped to repository"],
        ),
        (
            "operator",
            KBS_OPERATOR,
            "PUT",
            alice_route,
            good,
            vec!["operator role", "announce"],
        ),
        (
            "operator",
            KBS_OPERATOR,
            "DELETE",
            alice_route,
            "",
            vec!["operator role"],
        ),
        (
            "operator",
            KBS_OPERATOR,
            "GET",
            "/admin/v0/resources",
            "",
            vec!["operator role"],
        ),
        (
            "operator",
            KBS_OPERATOR,
            "PUT",
            "/admin/v0/reference-values/alice/vm",
            r#"{"measurements":[]}"#,
            vec!["operator role"],
        ),
        (
            "alice's reader",
            reader.as_str(),
            "PUT",
            alice_route,
            good,
            vec!["reader role", "changes nothing"],
        ),
        (
            "alice's reader",
            reader.as_str(),
            "DELETE",
            alice_route,
            "",
            vec!["reader role"],
        ),
        (
            "alice's reader",
            reader.as_str(),
            "PUT",
            "/admin/v0/reference-values/alice/vm",
            r#"{"measurements":[]}"#,
            vec!["reader role"],
        ),
        (
            "alice's reader",
            reader.as_str(),
            "PUT",
            "/admin/v0/announcements/alice/vm-1",
            &announcement,
            vec!["reader role"],
        ),
    ] {
        let (status, answer) = admin_as(&kbs, token, method, route, body);
        assert_eq!(status, 403, "{who} {method} {route}: {answer}");
        assert!(answer.contains("/AdminAuthAccess\""), "{answer}");
        for word in words {
            assert!(answer.contains(word), "{word:?} not in {answer}");
        }
    }
    // The operator's token is no attestation token either: no key.
    for token in [KBS_OPERATOR, reader.as_str()] {
        let (status, answer) = raw_resource(&kbs, "alice/disk-key/vm-1", token);
        assert_eq!(status, 401, "{answer}");
        assert!(answer.contains("/TokenVerifierError\""), "{answer}");
    }

    // What each may do: the operator announces, alice reads it, bob sees
    // nothing of alice's.
    let (status, answer) = admin_as(
        &kbs,
        KBS_OPERATOR,
        "PUT",
        "/admin/v0/announcements/alice/vm-1",
        &announcement,
    );
    assert_eq!(status, 204, "{answer}");
    let seen = alice.announcements().expect("announcements");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].image, image);
    assert_eq!(seen[0].announced_by, "ops");
    assert_eq!(
        seen[0].expected_measurement.as_deref(),
        Some(hex::encode(MEASUREMENT).as_str())
    );
    assert!(admin_client(&kbs, "bob")
        .announcements()
        .expect("announcements")
        .is_empty());
    assert!(admin_client(&kbs, "bob")
        .list_resources()
        .expect("list")
        .is_empty());
    let listed = alice.list_resources().expect("list");
    assert_eq!(listed.len(), 1);
    let read = reader_client(&kbs, "alice");
    assert_eq!(read.list_resources().expect("a reader lists"), listed);
    assert_eq!(read.announcements().expect("a reader reads them"), seen);
    assert_eq!(
        listed[0].policy,
        ReleasePolicy::from(simulated_policy()).to_toml()
    );
    assert!(!listed[0].has_data, "no secret until the first release");

    // Every refusal is in the audit log, with the caller's role.
    let log = std::fs::read_to_string(kbs.state_dir().join("audit.jsonl")).expect("audit");
    let refusals = log
        .lines()
        .filter(|line| line.contains("\"event\":\"refusal\"") && line.contains("AdminAuthAccess"))
        .count();
    assert_eq!(refusals, 12, "{log}");
    assert!(log.contains("\"role\":\"reader\""), "{log}");
    assert!(log.contains("\"role\":\"operator\""), "{log}");
    assert!(log.contains("\"action\":\"announce\""), "{log}");
    assert!(!log.contains(KBS_OPERATOR) && !log.contains(&bob) && !log.contains(&reader));
    kbs.verify_audit();
}

/// `GET /kbs/v0/resource/<path>` with `Authorization: Bearer <token>`.
fn raw_resource(kbs: &Kbs, path: &str, token: &str) -> (u16, String) {
    let mut response = raw_agent(
        kbs,
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    )
    .get(&format!("{}/kbs/v0/resource/{path}", kbs.url()))
    .header("authorization", &format!("Bearer {token}"))
    .call()
    .expect("answers");
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_to_string().unwrap_or_default(),
    )
}

#[test]
fn a_secret_is_generated_at_the_first_release_once_and_survives_policy_changes() {
    let platform = SimPlatform::new();
    let kbs = development_broker(&platform, "");
    let alice = admin_client(&kbs, "alice");
    let resource = path("alice/disk-key/vm-1");
    let pinned = AppraisalPolicy {
        allowed_measurements: vec![HexBytes(MEASUREMENT)],
        ..simulated_policy()
    };
    alice
        .put_resource(&resource, None, &pinned.clone().into(), &[])
        .expect("policy");
    // A refused guest generates nothing.
    let other = platform.launch([0x43; 48], GUEST_POLICY, HOST_DATA);
    assert_refused(
        fetch(
            &guest_client(&kbs),
            &other,
            "alice/disk-key/vm-1",
            KeyAlgorithm::EcdhEsA256kwP256,
        ),
        401,
        "PolicyDeny",
        &["measurement"],
    );
    assert!(!alice.list_resources().expect("list")[0].has_data);

    let guest = platform.launch(MEASUREMENT, GUEST_POLICY, HOST_DATA);
    let first = fetch(
        &guest_client(&kbs),
        &guest,
        "alice/disk-key/vm-1",
        KeyAlgorithm::EcdhEsA256kwP256,
    )
    .expect("released");
    assert_eq!(first.len(), 32);
    let again = fetch(
        &guest_client(&kbs),
        &guest,
        "alice/disk-key/vm-1",
        KeyAlgorithm::RsaOaep256,
    )
    .expect("released");
    assert_eq!(again, first, "one secret, not one per release");
    assert!(alice.list_resources().expect("list")[0].has_data);

    // The tenant changes its policy (say, for a new image): the secret
    // stays, across a restart too.
    let updated = AppraisalPolicy {
        allowed_measurements: vec![HexBytes(MEASUREMENT), HexBytes([0x44; 48])],
        ..simulated_policy()
    };
    alice
        .put_resource(&resource, None, &updated.into(), &[])
        .expect("policy");
    let mut kbs = kbs;
    kbs.restart();
    let after = fetch(
        &guest_client(&kbs),
        &guest,
        "alice/disk-key/vm-1",
        KeyAlgorithm::EcdhEsA256kwP256,
    )
    .expect("released");
    assert_eq!(after, first);

    // The broker's owner reads it offline, once the broker is stopped.
    let busy = kbs
        .export("alice/disk-key/vm-1")
        .expect_err("the broker runs");
    assert!(busy.contains("owns this state folder"), "{busy}");
    kbs.kill_9();
    assert_eq!(kbs.export("alice/disk-key/vm-1").expect("exported"), first);
    let none = kbs
        .export("alice/disk-key/none")
        .expect_err("no such resource");
    assert!(none.contains("no resource"), "{none}");

    let log = std::fs::read_to_string(kbs.state_dir().join("audit.jsonl")).expect("audit");
    assert_eq!(log.matches("\"event\":\"generate\"").count(), 1, "{log}");
    assert_eq!(log.matches("\"event\":\"export\"").count(), 1, "{log}");
    assert!(
        !log.contains(&hex::encode(&first)),
        "the audit log holds no secret"
    );
    kbs.verify_audit();
}

#[test]
fn the_fingerprint_is_the_key_an_independent_client_pins_and_another_key_is_refused() {
    let platform = SimPlatform::new();
    let kbs = development_broker(&platform, "");
    // curl pins the SubjectPublicKeyInfo's SHA-256, as `--pinnedpubkey`
    // defines it: the broker's fingerprint is that value.
    let (status, body) = kbs.curl(&tenant_token("alice"), "GET", "/admin/v0/resources", None);
    assert_eq!(status, 200, "{body}");

    // A broker of its own on another port stands in: a client pinning the
    // first refuses it, naming both keys, and sends it nothing.
    let impostor = Kbs::start_with(KbsMode::Development, &[platform.dir.path()], "");
    let expected = kbs_support::pin(&kbs).expect("https");
    let presented = kbs_support::pin(&impostor).expect("https");
    assert_ne!(expected, presented);
    let client =
        KbsClient::new(&impostor.url(), Some(expected), Duration::from_secs(30)).expect("client");
    match client.auth() {
        Err(ClientError::WrongBroker(mismatch)) => {
            assert_eq!(mismatch.expected, expected);
            assert_eq!(mismatch.presented, presented);
            let text = mismatch.to_string();
            assert!(
                text.contains(&expected.to_string()) && text.contains(&presented.to_string()),
                "{text}"
            );
        }
        other => panic!("expected a wrong-broker refusal, got {other:?}"),
    }
    let log = std::fs::read_to_string(impostor.state_dir().join("audit.jsonl")).unwrap_or_default();
    assert!(
        !log.contains("\"event\":\"auth\""),
        "the impostor got no request: {log}"
    );
}

#[test]
fn plain_http_is_a_development_flag_said_loudly() {
    let platform = SimPlatform::new();
    let kbs = Kbs::start_plain_http(&[platform.dir.path()]);
    assert!(kbs.url().starts_with("http://"), "{}", kbs.url());
    assert!(kbs.log().contains("PLAIN HTTP"), "{}", kbs.log());
    let alice = admin_client(&kbs, "alice");
    alice
        .put_resource(
            &path("alice/disk-key/vm-1"),
            Some(b"key"),
            &AppraisalPolicy {
                allowed_measurements: vec![HexBytes(MEASUREMENT)],
                ..simulated_policy()
            }
            .into(),
            &[],
        )
        .expect("policy");
    let guest = platform.launch(MEASUREMENT, GUEST_POLICY, HOST_DATA);
    let released = fetch(
        &guest_client(&kbs),
        &guest,
        "alice/disk-key/vm-1",
        KeyAlgorithm::EcdhEsA256kwP256,
    );
    assert_eq!(released.expect("released"), b"key");
}

/// A single-instance resource with a lease of `seconds`.
fn single_instance(seconds: u32) -> ReleasePolicy {
    ReleasePolicy::from_toml(&format!(
        "{}\n[single_instance]\nlease_seconds = {seconds}\n",
        AppraisalPolicy {
            allowed_measurements: vec![HexBytes(MEASUREMENT)],
            ..simulated_policy()
        }
        .to_toml()
    ))
    .expect("policy")
}

/// A 503 `PolicyDeny` (the client's `Held`: retry once the lease may have
/// lapsed) saying that another live launch holds the resource, naming
/// `words`.
fn assert_held<T: std::fmt::Debug>(result: Result<T, ClientError>, words: &[&str]) {
    match result {
        Err(ClientError::Held(said)) => {
            for word in ["held by the live instance", "once that lease lapses"]
                .iter()
                .chain(words)
            {
                assert!(said.contains(word), "{word:?} not in {said:?}");
            }
        }
        other => panic!("expected a live lease to refuse, got {other:?}"),
    }
}

fn renew(
    kbs: &Kbs,
    guest: &hsev_attestation::firmware::LaunchedGuest,
    resource: &str,
) -> Result<hsev_attestation::kbs::protocol::LeaseGrant, ClientError> {
    guest_client(kbs)
        .renew_lease(&path(resource), &mut |binding| evidence(guest, binding))
        .map(|lease| lease.grant)
}

#[test]
fn a_single_instance_key_goes_to_one_live_launch_and_a_replaced_one_never_gets_it_back() {
    let platform = SimPlatform::new();
    let mut kbs = development_broker(&platform, "");
    let alice = admin_client(&kbs, "alice");
    let name = "alice/disk-key/vm-ha";
    let resource = path(name);
    alice
        .put_resource(&resource, None, &single_instance(3), &[])
        .expect("policy");
    let first = platform.launch(MEASUREMENT, GUEST_POLICY, HOST_DATA);
    let second = platform.launch(MEASUREMENT, GUEST_POLICY, HOST_DATA);
    let client = guest_client(&kbs);
    let key = fetch(&client, &first, name, KeyAlgorithm::EcdhEsA256kwP256).expect("released");

    // A launch that was never released the key renews nothing.
    assert_held(renew(&kbs, &second, name), &[]);
    // While the first renews, the second launch is refused, naming it,
    // across a restart of the broker too.
    let first_report_id = renew(&kbs, &first, name).expect("renewed").report_id;
    kbs.restart();
    let client = guest_client(&kbs);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1000));
        let grant = renew(&kbs, &first, name).expect("renewed");
        assert_eq!(
            (grant.lease_seconds, &grant.report_id),
            (3, &first_report_id)
        );
        assert_held(
            fetch(&client, &second, name, KeyAlgorithm::EcdhEsA256kwP256),
            &[&first_report_id[..16]],
        );
    }
    let holder = alice.lease(&resource).expect("lease");
    assert!(holder.live);
    assert_eq!(holder.report_id, first_report_id);
    assert!(
        reader_client(&kbs, "alice").lease(&resource).is_ok(),
        "a reader sees who holds it"
    );
    assert!(admin_client(&kbs, "bob").lease(&resource).is_err());

    // The first stops renewing: once its lease lapses, the second takes
    // over, with the same key; the first is refused from then on.
    std::thread::sleep(Duration::from_millis(3200));
    let taken = fetch(&client, &second, name, KeyAlgorithm::EcdhEsA256kwP256).expect("takeover");
    assert_eq!(taken, key);
    for refused in [
        renew(&kbs, &first, name).map(|_| Vec::new()),
        fetch(&client, &first, name, KeyAlgorithm::EcdhEsA256kwP256),
    ] {
        assert_refused(
            refused,
            401,
            "PolicyDeny",
            &["superseded by report_id", "must stop"],
        );
    }

    // The tenant ends the second's lease: a third launch may take it at
    // once, and the second never again.
    let ended = alice.end_lease(&resource).expect("ended");
    assert_ne!(ended.report_id, first_report_id);
    let third = platform.launch(MEASUREMENT, GUEST_POLICY, HOST_DATA);
    assert_eq!(
        fetch(&client, &third, name, KeyAlgorithm::EcdhEsA256kwP256).expect("third"),
        key
    );
    assert_refused(
        fetch(&client, &second, name, KeyAlgorithm::EcdhEsA256kwP256),
        401,
        "PolicyDeny",
        &["superseded by the tenant"],
    );
    // A resource without [single_instance] has no lease to renew.
    let plain = AppraisalPolicy {
        allowed_measurements: vec![HexBytes(MEASUREMENT)],
        ..simulated_policy()
    };
    alice
        .put_resource(&path("alice/disk-key/plain"), None, &plain.into(), &[])
        .expect("policy");
    let (_, none) = client
        .fetch_resource_and_lease(
            &path("alice/disk-key/plain"),
            KeyAlgorithm::EcdhEsA256kwP256,
            &mut |binding| evidence(&third, binding),
        )
        .expect("released");
    assert_eq!(none, None, "a plain resource has no lease");
    let (_, some) = client
        .fetch_resource_and_lease(&resource, KeyAlgorithm::EcdhEsA256kwP256, &mut |binding| {
            evidence(&third, binding)
        })
        .expect("released");
    assert_eq!(some.expect("a lease").grant.lease_seconds, 3);
    match renew(&kbs, &third, "alice/disk-key/plain") {
        Err(ClientError::Refused { status, detail, .. }) => {
            assert_eq!(status, 404, "{detail}");
            assert!(detail.contains("no [single_instance]"), "{detail}");
        }
        other => panic!("expected 404, got {other:?}"),
    }

    let log = std::fs::read_to_string(kbs.state_dir().join("audit.jsonl")).expect("audit");
    assert!(log.contains("taking over from report_id"), "{log}");
    assert!(log.contains("\"event\":\"lease\""), "{log}");
    assert!(log.contains("\"action\":\"end_lease\""), "{log}");
    kbs.verify_audit();
}
