//! The connector's requester-side check of encrypted disks' keys, against a
//! real `hsev-kbs` over pinned HTTPS, with a reader token that changes
//! nothing: a VM may run only when its guest fetches its key from the
//! requesters' broker (URL, pin, repository) and the requester has pinned a
//! release policy bound to this VM (`host_data`) and to a measurement or an
//! ID key, refusing debuggable guests, migration agents and simulated
//! evidence on a production node. No policy yet is "awaiting", naming the
//! command the requester runs; a broker that cannot be asked, or that
//! presents another key, is "later", never "yes".

use std::time::Duration;

use hsev_attestation::kbs::client::{AdminClient, ClientError, SpkiPin};
use hsev_attestation::kbs::release_policy::ReleasePolicy;
use hsev_attestation::policy::AppraisalPolicy;
use hsev_attestation::HexBytes;
use hsev_e2e::kbs::{reader_token, Kbs, KbsMode};
use hsev_proto::v1::{KeyBroker, Vm, VmSpec};
use hsev_xapi::slapos::config::KeyBrokerConfig;
use hsev_xapi::slapos::encrypted_disk::{KeyCheckError, TenantKeyBroker};

const REPOSITORY: &str = "alice";

fn config(kbs: &Kbs) -> KeyBrokerConfig {
    KeyBrokerConfig {
        guest_url: kbs.guest_url(),
        url: Some(kbs.url()),
        pin: kbs.pin(),
        repository: REPOSITORY.to_owned(),
        token_file: kbs.reader_token_file(REPOSITORY),
    }
}

fn binding(config: &KeyBrokerConfig) -> KeyBroker {
    KeyBroker {
        url: config.guest_url.clone(),
        pin: config.pin.clone(),
        repository: config.repository.clone(),
    }
}

/// A VM as hsevd shows one whose guest fetches its key through `binding`.
fn vm(id: &str, binding: Option<KeyBroker>) -> Vm {
    let key_resource = binding
        .as_ref()
        .map(|binding| format!("{}/disk-key/{id}", binding.repository))
        .unwrap_or_default();
    Vm {
        id: id.to_owned(),
        spec: Some(VmSpec {
            image: "ab".repeat(32),
            encrypted_disk_mib: 1024,
            key_resource,
            key_broker: binding,
            ..VmSpec::default()
        }),
        ..Vm::default()
    }
}

fn bound_to(id: &str) -> AppraisalPolicy {
    AppraisalPolicy {
        host_data: Some(HexBytes(openssl::sha::sha256(id.as_bytes()))),
        allowed_measurements: vec![HexBytes([7; 48])],
        ..AppraisalPolicy::default()
    }
}

#[test]
fn a_vm_runs_only_once_its_requester_pinned_a_policy_bound_to_it_at_the_broker_its_guest_names() {
    let mut kbs = Kbs::start(KbsMode::Development);
    let config = config(&kbs);
    let pin: SpkiPin = kbs.pin().parse().expect("pin");
    // The requester's own token: its policies, pinned from its machine.
    let tenant = AdminClient::new(
        &kbs.url(),
        Some(pin),
        &std::fs::read_to_string(kbs.tenant_token_file(REPOSITORY)).expect("token"),
        Duration::from_secs(10),
    )
    .expect("client");
    let pin_policy = |id: &str, policy: &AppraisalPolicy| {
        tenant
            .put_resource(
                &format!("{REPOSITORY}/disk-key/{id}")
                    .parse()
                    .expect("a path"),
                None,
                &ReleasePolicy::from(policy.clone()),
                &[],
            )
            .expect("pinned");
    };
    pin_policy("good", &bound_to("good"));
    pin_policy(
        "by-id-key",
        &AppraisalPolicy {
            allowed_measurements: Vec::new(),
            allowed_id_key_digests: vec![HexBytes([9; 48])],
            ..bound_to("by-id-key")
        },
    );
    pin_policy(
        "unbound",
        &AppraisalPolicy {
            host_data: None,
            ..bound_to("unbound")
        },
    );
    pin_policy("other", &bound_to("someone-else"));
    pin_policy(
        "debug",
        &AppraisalPolicy {
            allow_debug: true,
            ..bound_to("debug")
        },
    );
    pin_policy(
        "migration",
        &AppraisalPolicy {
            allow_migration_agent: true,
            ..bound_to("migration")
        },
    );
    pin_policy(
        "simulated",
        &AppraisalPolicy {
            allow_simulated: true,
            ..bound_to("simulated")
        },
    );
    pin_policy(
        "any-launch",
        &AppraisalPolicy {
            allowed_measurements: Vec::new(),
            ..bound_to("any-launch")
        },
    );

    let broker = TenantKeyBroker::new(&config).expect("broker");
    let ours = Some(binding(&config));
    assert_eq!(broker.check(&vm("good", ours.clone()), false), Ok(()));
    assert_eq!(
        broker.check(&vm("by-id-key", ours.clone()), false),
        Ok(()),
        "\"whatever my ID key signed\" is a pinned launch too"
    );
    assert_eq!(
        broker.check(&vm("simulated", ours.clone()), true),
        Ok(()),
        "a development node accepts simulated evidence"
    );

    // Not pinned yet: the VM waits, and the requester is told what to run.
    match broker.check(&vm("fresh", ours.clone()), false) {
        Err(KeyCheckError::NotPinned { resource, command }) => {
            assert_eq!(resource, "alice/disk-key/fresh");
            for part in [
                "hsev kbs policy set --vm fresh",
                "--repository alice",
                &format!("--key-broker {}", config.guest_url),
                &format!("--broker-pin {}", config.pin),
                "--image-manifest",
            ] {
                assert!(command.contains(part), "{part:?} not in {command}");
            }
        }
        other => panic!("fresh: {other:?}"),
    }
    pin_policy("fresh", &bound_to("fresh"));
    assert_eq!(
        broker.check(&vm("fresh", ours.clone()), false),
        Ok(()),
        "runs once pinned"
    );

    let elsewhere = |edit: fn(&mut KeyBroker)| {
        let mut binding = binding(&config);
        edit(&mut binding);
        Some(binding)
    };
    for (vm, problem) in [
        (vm("unbound", ours.clone()), "binds no host_data"),
        (vm("other", ours.clone()), "another VM's host_data"),
        (vm("debug", ours.clone()), "debuggable guests"),
        (vm("migration", ours.clone()), "migration agent"),
        (vm("simulated", ours.clone()), "simulated evidence"),
        (vm("any-launch", ours.clone()), "any launch measurement"),
        (vm("nameless", None), "names none"),
        (
            vm(
                "good",
                elsewhere(|binding| binding.url = "https://10.0.2.2:1".into()),
            ),
            "not the requesters'",
        ),
        (
            vm(
                "good",
                elsewhere(|binding| binding.pin = format!("sha256:{}", "00".repeat(32))),
            ),
            "not the requesters'",
        ),
        (
            vm(
                "good",
                elsewhere(|binding| binding.repository = "bob".into()),
            ),
            "not the requesters'",
        ),
        (
            Vm {
                spec: Some(VmSpec {
                    key_resource: "alice/disk-key/other".into(),
                    ..vm("good", ours.clone()).spec.expect("spec")
                }),
                ..vm("good", ours.clone())
            },
            "is not the one this VM's guest fetches",
        ),
    ] {
        match broker.check(&vm, false) {
            Err(KeyCheckError::Refused { problem: found, .. }) => {
                assert!(found.contains(problem), "{}: {found}", vm.id);
            }
            other => panic!("{}: {other:?}", vm.id),
        }
    }

    // The connector's token changes nothing at the broker.
    let reader = AdminClient::new(
        &kbs.url(),
        Some(pin),
        &reader_token(REPOSITORY),
        Duration::from_secs(10),
    )
    .expect("client");
    let refused = reader
        .put_resource(
            &"alice/disk-key/good".parse().expect("a path"),
            None,
            &ReleasePolicy::from(AppraisalPolicy::default()),
            &[],
        )
        .expect_err("a reader sets no policy");
    assert!(
        matches!(&refused, ClientError::Refused { status: 403, .. }),
        "{refused}"
    );

    // A broker that presents another key is not asked.
    let other_pin = KeyBrokerConfig {
        pin: format!("sha256:{}", "00".repeat(32)),
        ..config.clone()
    };
    let impostor = TenantKeyBroker::new(&other_pin).expect("broker");
    match impostor.check(&vm("good", Some(binding(&other_pin))), false) {
        Err(KeyCheckError::Unreachable { detail, .. }) => {
            assert!(
                detail.contains(&config.pin[7..]),
                "names what it saw: {detail}"
            );
        }
        other => panic!("another key: {other:?}"),
    }

    kbs.kill_9();
    assert!(matches!(
        broker.check(&vm("good", ours), false),
        Err(KeyCheckError::Unreachable { .. })
    ));
}
