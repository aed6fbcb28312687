//! Encrypted data disks, the requester's side: the one place the connector
//! deals with the key broker that holds its requesters' disk keys
//! (`[key_broker]` in its config).
//!
//! hsevd makes the disk and registers its key at the broker; before such a
//! VM first runs, the connector checks, acting for the requester, that the
//! key is held by the requesters' broker in their repository under a
//! release policy bound to this very VM (its `host_data`), refusing debug
//! and migration agents, and refusing simulated evidence unless the
//! connector serves a development pool. Anything else, or a broker it
//! cannot ask, and the VM does not start: no key is released on doubt.
//! This module only reads the broker; it never sees a key.

use std::sync::Arc;
use std::time::Duration;

use hsev_attestation::kbs::client::{AdminClient, ClientError};
use hsev_attestation::kbs::release_policy::ReleasePolicy;
use hsev_proto::v1::Vm;
use zeroize::Zeroizing;

use super::config::KeyBrokerConfig;
use super::parameters::Request;

/// How long one call to the broker may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a VM's disk key cannot be vouched for.
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
    /// The key is not held as the requester needs it.
    #[error("the disk key {resource} {problem}")]
    Refused {
        /// The resource hsevd names.
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
        Ok(Err(error @ KeyCheckError::Unreachable { .. })) => {
            Vouched::Later(format!("encrypted-disk-size: {error}"))
        }
        Ok(Err(error)) => Vouched::Refused(format!("encrypted-disk-size: {error}")),
        Err(error) => Vouched::Later(format!(
            "encrypted-disk-size: the key broker check did not finish: {error}"
        )),
    }
}

/// The requesters' key broker, read with its admin API.
#[derive(Debug)]
pub struct TenantKeyBroker {
    admin: AdminClient,
    url: String,
    repository: String,
}

impl TenantKeyBroker {
    /// The broker of `config`, its token read from its file.
    pub fn new(config: &KeyBrokerConfig) -> Result<Self, String> {
        let token = std::fs::read_to_string(&config.admin_token_file).map_err(|error| {
            format!(
                "key_broker.admin_token_file {}: {error}",
                config.admin_token_file.display()
            )
        })?;
        let token = Zeroizing::new(token.lines().next().unwrap_or_default().trim().to_owned());
        let admin = AdminClient::new(&config.url, &token, CALL_TIMEOUT)
            .map_err(|error| format!("key_broker: {error}"))?;
        Ok(TenantKeyBroker {
            admin,
            url: config.url.clone(),
            repository: config.repository.clone(),
        })
    }

    /// Checks that `vm`'s disk key is held as its requester needs
    /// (blocking: call it off the async threads).
    pub fn check(&self, vm: &Vm, allow_simulated: bool) -> Result<(), KeyCheckError> {
        let resource = vm
            .spec
            .as_ref()
            .map(|spec| spec.key_resource.clone())
            .unwrap_or_default();
        let refused = |problem: String| KeyCheckError::Refused {
            resource: resource.clone(),
            problem,
        };
        if resource.is_empty() {
            return Err(refused("is not named by hsevd".to_owned()));
        }
        if !resource.starts_with(&format!("{}/", self.repository)) {
            return Err(refused(format!(
                "is not in the requesters' repository {:?} at {}",
                self.repository, self.url
            )));
        }
        let resources = self.admin.list_resources().map_err(|error| match error {
            ClientError::Unreachable(detail) => KeyCheckError::Unreachable {
                url: self.url.clone(),
                detail,
            },
            other => KeyCheckError::Unreachable {
                url: self.url.clone(),
                detail: other.to_string(),
            },
        })?;
        let summary = resources
            .iter()
            .find(|summary| summary.path.to_string() == resource)
            .ok_or_else(|| refused(format!("is not registered at {}", self.url)))?;
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
        if summary.reference_values.is_empty() && policy.allowed_measurements.is_empty() {
            return Err(refused("is released to any launch measurement".to_owned()));
        }
        Ok(())
    }
}
