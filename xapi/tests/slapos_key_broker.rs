//! The connector's requester-side check of encrypted disks' keys, against a
//! real `hsev-kbs`: a key is vouched for only when it is held in the
//! requesters' repository under a release policy bound to this VM
//! (`host_data`), refusing debuggable guests, migration agents, simulated
//! evidence on a production node, and any launch measurement; a broker
//! that cannot be asked is "later", never "yes".

use std::time::Duration;

use hsev_attestation::kbs::client::AdminClient;
use hsev_attestation::kbs::release_policy::ReleasePolicy;
use hsev_attestation::policy::AppraisalPolicy;
use hsev_attestation::HexBytes;
use hsev_e2e::kbs::{Kbs, KbsMode, KBS_ADMIN};
use hsev_proto::v1::{Vm, VmSpec};
use hsev_xapi::slapos::config::KeyBrokerConfig;
use hsev_xapi::slapos::encrypted_disk::{KeyCheckError, TenantKeyBroker};

fn vm(id: &str, resource: &str) -> Vm {
    Vm {
        id: id.to_owned(),
        spec: Some(VmSpec {
            encrypted_disk_mib: 1024,
            key_resource: resource.to_owned(),
            ..VmSpec::default()
        }),
        ..Vm::default()
    }
}

fn bound_to(id: &str) -> AppraisalPolicy {
    AppraisalPolicy {
        host_data: Some(HexBytes(openssl::sha::sha256(id.as_bytes()))),
        ..AppraisalPolicy::default()
    }
}

#[test]
fn a_disk_key_is_vouched_for_only_when_its_release_policy_binds_it_to_the_vm() {
    let mut kbs = Kbs::start(KbsMode::Development);
    let admin = AdminClient::new(&kbs.url(), KBS_ADMIN, Duration::from_secs(10)).expect("client");
    admin
        .put_reference_values("launches", &[[7u8; 48]])
        .expect("reference values");
    let register = |resource: &str, policy: &AppraisalPolicy, with_values: bool| {
        let values = if with_values {
            vec!["launches".to_owned()]
        } else {
            Vec::new()
        };
        admin
            .put_resource(
                &resource.parse().expect("a path"),
                b"key",
                &ReleasePolicy::from(policy.clone()),
                &values,
            )
            .expect("registered");
    };
    register("hsev/disk-key/good", &bound_to("good"), true);
    register("hsev/disk-key/unbound", &AppraisalPolicy::default(), true);
    register("hsev/disk-key/other", &bound_to("someone-else"), true);
    register(
        "hsev/disk-key/debug",
        &AppraisalPolicy {
            allow_debug: true,
            ..bound_to("debug")
        },
        true,
    );
    register(
        "hsev/disk-key/simulated",
        &AppraisalPolicy {
            allow_simulated: true,
            ..bound_to("simulated")
        },
        true,
    );
    register("hsev/disk-key/any-launch", &bound_to("any-launch"), false);
    register("tenant-b/disk-key/foreign", &bound_to("foreign"), true);

    let broker = TenantKeyBroker::new(&KeyBrokerConfig {
        url: kbs.url(),
        admin_token_file: kbs.admin_token_file(),
        repository: "hsev".to_owned(),
    })
    .expect("broker");
    assert_eq!(
        broker.check(&vm("good", "hsev/disk-key/good"), false),
        Ok(())
    );
    assert_eq!(
        broker.check(&vm("simulated", "hsev/disk-key/simulated"), true),
        Ok(()),
        "a development node accepts simulated evidence"
    );
    for (id, resource, problem) in [
        ("unbound", "hsev/disk-key/unbound", "binds no host_data"),
        ("other", "hsev/disk-key/other", "another VM's host_data"),
        ("debug", "hsev/disk-key/debug", "debuggable guests"),
        ("simulated", "hsev/disk-key/simulated", "simulated evidence"),
        (
            "any-launch",
            "hsev/disk-key/any-launch",
            "any launch measurement",
        ),
        (
            "foreign",
            "tenant-b/disk-key/foreign",
            "not in the requesters' repository",
        ),
        ("missing", "hsev/disk-key/missing", "is not registered"),
        ("nameless", "", "not named by hsevd"),
    ] {
        match broker.check(&vm(id, resource), false) {
            Err(KeyCheckError::Refused { problem: found, .. }) => {
                assert!(found.contains(problem), "{id}: {found}");
            }
            other => panic!("{id}: {other:?}"),
        }
    }

    kbs.kill_9();
    assert!(matches!(
        broker.check(&vm("good", "hsev/disk-key/good"), false),
        Err(KeyCheckError::Unreachable { .. })
    ));
}
