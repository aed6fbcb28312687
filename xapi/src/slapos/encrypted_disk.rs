//! Encrypted data disks, the requester's side: the one place the connector
//! deals with the key broker that holds its requesters' disk keys
//! (`[key_broker]` in its config).
//!
//! The key never passes through the host: hsevd makes the disk empty, the
//! guest's measured command line names the requesters' broker (its URL,
//! the pin of its public key, their repository), and the guest's agent
//! fetches the key after attesting and formats the disk itself. The release
//! policy is the requester's: pinned from its own machine with `hsev kbs
//! policy set --vm ID`. Before such a VM first runs, the connector checks,
//! acting for the requester with a token that changes nothing, that its
//! guest names that broker and that a release policy bound to this very VM
//! (its `host_data`) is pinned, refusing debug and migration agents, any
//! launch measurement, and simulated evidence unless the connector serves a
//! development pool. No policy yet: the VM waits, and its connection
//! parameters say what the requester must run. A wrong policy, or a guest
//! pointed elsewhere: the VM never runs. A broker it cannot ask: later.
//! This module only reads the broker; it never sees a key, and never sets
//! or changes a policy.

use std::sync::Arc;
use std::time::Duration;

use hsev_attestation::kbs::client::{AdminClient, SpkiPin};
use hsev_attestation::kbs::release_policy::ReleasePolicy;
use hsev_proto::v1::Vm;
use zeroize::Zeroizing;

use super::config::KeyBrokerConfig;
use super::parameters::Request;
use crate::model::DISK_KEY_TYPE;

/// How long one call to the broker may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a VM's disk key cannot be vouched for (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyCheckError {
    /// The broker cannot be asked now; asking again later can help.
    #[error("the requesters' key broker at {url} cannot be asked: {detail}")]
    Unreachable {
        /// The broker.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The requester has pinned no release policy for the key yet.
    #[error(
        "the disk key {resource} has no release policy yet: its requester pins one from its own \
         machine (the VM waits until then): {command}"
    )]
    NotPinned {
        /// The resource the guest fetches.
        resource: String,
        /// The command the requester runs.
        command: String,
    },
    /// The key is not held as the requester needs it.
    #[error("the disk key {resource} {problem}")]
    Refused {
        /// The resource the guest fetches.
        resource: String,
        /// What is wrong.
        problem: String,
    },
}

/// Why a node without a key broker of its requesters serves no encrypted disk.
const NO_KEY_BROKER: &str = "encrypted-disk-size: this node has no key broker for its requesters' \
                             disk keys ([key_broker] in the connector's config)";

/// Why this node cannot serve `request`'s encrypted disk at all, known
/// before any VM is made.
pub fn unservable(request: &Request, key_broker: Option<&TenantKeyBroker>) -> Option<String> {
    (request.encrypted_disk_size.is_some() && key_broker.is_none())
        .then(|| NO_KEY_BROKER.to_owned())
}

/// What the requesters' broker says of a VM's disk key; the messages name
/// `encrypted-disk-size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vouched {
    /// Held as the requester needs, or no encrypted disk to vouch for.
    Yes,
    /// The requester has not pinned its policy yet: the VM waits; the
    /// message says what to run.
    Awaiting(String),
    /// Not held as the requester needs: the VM must never run.
    Refused(String),
    /// The broker cannot be asked now.
    Later(String),
}

/// Checks `vm`'s disk key at `key_broker`, when `vm` has an encrypted disk
/// (the broker is asked off the async threads).
pub async fn vouch(
    key_broker: Option<Arc<TenantKeyBroker>>,
    vm: &Vm,
    allow_simulated: bool,
) -> Vouched {
    let encrypted = vm
        .spec
        .as_ref()
        .is_some_and(|spec| spec.encrypted_disk_mib > 0);
    if !encrypted {
        return Vouched::Yes;
    }
    let Some(key_broker) = key_broker else {
        return Vouched::Refused(NO_KEY_BROKER.to_owned());
    };
    let checked = vm.clone();
    match tokio::task::spawn_blocking(move || key_broker.check(&checked, allow_simulated)).await {
        Ok(Ok(())) => Vouched::Yes,
        Ok(Err(error @ KeyCheckError::NotPinned { .. })) => {
            Vouched::Awaiting(format!("encrypted-disk-size: {error}"))
        }
        Ok(Err(error @ KeyCheckError::Unreachable { .. })) => {
            Vouched::Later(format!("encrypted-disk-size: {error}"))
        }
        Ok(Err(error)) => Vouched::Refused(format!("encrypted-disk-size: {error}")),
        Err(error) => Vouched::Later(format!(
            "encrypted-disk-size: the key broker check did not finish: {error}"
        )),
    }
}

/// The requesters' key broker, read with a token of their repository.
#[derive(Debug)]
pub struct TenantKeyBroker {
    admin: AdminClient,
    config: KeyBrokerConfig,
}

impl TenantKeyBroker {
    /// The broker of `config` (already validated), its token read from its
    /// file.
    pub fn new(config: &KeyBrokerConfig) -> Result<Self, String> {
        let token = Zeroizing::new(std::fs::read_to_string(&config.token_file).map_err(
            |error| {
                format!(
                    "key_broker.token_file {}: {error}",
                    config.token_file.display()
                )
            },
        )?);
        let token = token.lines().next().unwrap_or_default().trim();
        let pin = config
            .pin
            .parse::<SpkiPin>()
            .map_err(|error| format!("key_broker.pin: {error}"))?;
        let admin = AdminClient::new(config.connector_url(), Some(pin), token, CALL_TIMEOUT)
            .map_err(|error| format!("key_broker: {error}"))?;
        Ok(TenantKeyBroker {
            admin,
            config: config.clone(),
        })
    }

    /// What the requester runs on its own machine to pin `vm`'s policy.
    fn pin_command(&self, vm: &Vm, allow_simulated: bool) -> String {
        let image = vm
            .spec
            .as_ref()
            .map(|spec| spec.image.as_str())
            .unwrap_or_default();
        format!(
            "hsev kbs policy set --vm {} --repository {} --key-broker {} --broker <its URL from \
             your machine> --broker-pin {} --broker-token-file <your token of {}> \
             --image-manifest <your copy of image {image}>{}",
            vm.id,
            self.config.repository,
            self.config.guest_url,
            self.config.pin,
            self.config.repository,
            if allow_simulated {
                " --allow-simulated"
            } else {
                ""
            }
        )
    }

    /// Checks that `vm`'s guest fetches its disk key from the requesters'
    /// broker and that the key's release policy is pinned as the
    /// requester needs (blocking: call it off the async threads).
    pub fn check(&self, vm: &Vm, allow_simulated: bool) -> Result<(), KeyCheckError> {
        let spec = vm.spec.clone().unwrap_or_default();
        let resource = spec.key_resource.clone();
        let refused = |problem: String| KeyCheckError::Refused {
            resource: resource.clone(),
            problem,
        };
        let Some(binding) = &spec.key_broker else {
            return Err(refused(
                "is fetched from no key broker: the VM's guest names none".to_owned(),
            ));
        };
        if binding.url != self.config.guest_url
            || binding.pin != self.config.pin
            || binding.repository != self.config.repository
        {
            return Err(refused(format!(
                "is fetched from the broker {} (pin {:?}, repository {:?}), not the requesters' \
                 {} (pin {}, repository {:?})",
                binding.url,
                binding.pin,
                binding.repository,
                self.config.guest_url,
                self.config.pin,
                self.config.repository
            )));
        }
        let expected = format!("{}/{DISK_KEY_TYPE}/{}", self.config.repository, vm.id);
        if resource != expected {
            return Err(KeyCheckError::Refused {
                resource: if resource.is_empty() {
                    "(unnamed)".to_owned()
                } else {
                    resource.clone()
                },
                problem: format!("is not the one this VM's guest fetches, {expected}"),
            });
        }
        let url = self.config.connector_url().to_owned();
        let resources =
            self.admin
                .list_resources()
                .map_err(|error| KeyCheckError::Unreachable {
                    url: url.clone(),
                    detail: error.to_string(),
                })?;
        let Some(summary) = resources
            .iter()
            .find(|summary| summary.path.to_string() == resource)
        else {
            return Err(KeyCheckError::NotPinned {
                resource: resource.clone(),
                command: self.pin_command(vm, allow_simulated),
            });
        };
        let policy = ReleasePolicy::from_toml(&summary.policy)
            .map_err(|error| refused(format!("has a release policy that does not parse: {error}")))?
            .appraisal;
        let host_data = openssl::sha::sha256(vm.id.as_bytes());
        match policy.host_data {
            Some(bound) if bound.0 == host_data => {}
            Some(_) => {
                return Err(refused(
                    "is bound to another VM's host_data, not this one's".to_owned(),
                ))
            }
            None => {
                return Err(refused(
                    "is released to any VM: its policy binds no host_data".to_owned(),
                ))
            }
        }
        if policy.allow_debug {
            return Err(refused(
                "is released to debuggable guests (the host could read them)".to_owned(),
            ));
        }
        if policy.allow_migration_agent {
            return Err(refused(
                "is released to guests with a migration agent".to_owned(),
            ));
        }
        if policy.allow_simulated && !allow_simulated {
            return Err(refused(
                "is released to simulated evidence, which this node does not accept \
                 (node.allow_simulated_firmware)"
                    .to_owned(),
            ));
        }
        // A measurement, a reference-value set, or "what my ID key signed".
        if summary.reference_values.is_empty()
            && policy.allowed_measurements.is_empty()
            && policy.allowed_id_key_digests.is_empty()
        {
            return Err(refused(
                "is released to any launch measurement: its policy pins none, nor an ID key"
                    .to_owned(),
            ));
        }
        Ok(())
    }
}
