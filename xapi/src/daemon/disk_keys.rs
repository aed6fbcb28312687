//! Encrypted data disks: a fresh random key per VM, the disk formatted as
//! LUKS2 with it, and the key registered at the key broker (`hsev-kbs`)
//! with the release policy that binds it to this VM's expected launch.
//!
//! The key exists in this process only between its generation and its
//! registration, and is zeroized after: the host keeps no copy, so only a
//! guest that attests as this VM's expected launch ever unlocks the disk.
//! This module never logs a key and never writes one to a file.

use std::fs::OpenOptions;
use std::path::Path;
use std::time::Duration;

use hsev_attestation::kbs::client::{AdminClient, ClientError, ResourcePath};
use hsev_attestation::policy::AppraisalPolicy;
use hsev_attestation::HexBytes;
use zeroize::Zeroizing;

use super::artifacts;
use super::config::KeyBrokerConfig;
use super::error::OpError;
use crate::model::{KeyBrokerBinding, VmId};

/// The encrypted disk's name among a VM's disks, and the serial number the
/// guest's agent finds it by.
pub const ENCRYPTED_DISK_NAME: &str = "hsev-data";

/// The resource type of disk keys at the key broker.
const DISK_KEY_TYPE: &str = "disk-key";

/// Bytes of a disk key: the LUKS2 passphrase, random, so no slow KDF.
const DISK_KEY_BYTES: usize = 32;

/// How long one admin call to the key broker may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The key broker as this host uses it.
#[derive(Debug)]
pub struct KeyBroker {
    admin: AdminClient,
    url: String,
    guest_url: String,
    repository: String,
    /// Release keys to guests of the simulated Secure Processor: true
    /// exactly when this host launches through it (a development pool).
    allow_simulated: bool,
}

impl KeyBroker {
    /// The key broker of `config`, with its admin token read from its file.
    pub fn new(config: &KeyBrokerConfig, allow_simulated: bool) -> Result<Self, String> {
        let token = std::fs::read_to_string(&config.admin_token_file).map_err(|error| {
            format!(
                "key_broker.admin_token_file {}: {error}",
                config.admin_token_file.display()
            )
        })?;
        let token = Zeroizing::new(token.lines().next().unwrap_or_default().trim().to_owned());
        if token.is_empty() {
            return Err(format!(
                "key_broker.admin_token_file {} is empty",
                config.admin_token_file.display()
            ));
        }
        let admin = AdminClient::new(&config.url, &token, ADMIN_TIMEOUT)
            .map_err(|error| format!("key_broker.url {}: {error}", config.url))?;
        Ok(KeyBroker {
            admin,
            url: config.url.clone(),
            guest_url: config.guest_url(),
            repository: config.repository.clone(),
            allow_simulated,
        })
    }

    /// Where `vm`'s disk key lives and how its guest reaches it.
    pub fn binding(&self, vm: &VmId) -> KeyBrokerBinding {
        KeyBrokerBinding {
            guest_url: self.guest_url.clone(),
            resource: format!("{}/{DISK_KEY_TYPE}/{}", self.repository, vm.0),
        }
    }

    /// Creates `disk` (`size_mib`, sparse), formats it as LUKS2 with a fresh
    /// random key, and registers the key at the key broker for `vm`'s
    /// expected measurement, its host data and no debugging. Forgets the key.
    pub fn provision(
        &self,
        vm: &VmId,
        binding: &KeyBrokerBinding,
        disk: &Path,
        size_mib: u64,
        expected_measurement: &[u8],
    ) -> Result<(), OpError> {
        let measurement: [u8; 48] = expected_measurement.try_into().map_err(|_| {
            OpError::precondition("an encrypted disk needs an SEV-SNP launch measurement")
        })?;
        let mut key = Zeroizing::new([0u8; DISK_KEY_BYTES]);
        openssl::rand::rand_bytes(key.as_mut_slice())
            .map_err(|error| OpError::internal(format!("no random disk key: {error}")))?;

        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(disk)
            .map_err(|error| {
                OpError::internal(format!("cannot create {}: {error}", disk.display()))
            })?;
        file.set_len(size_mib * 1024 * 1024).map_err(|error| {
            OpError::internal(format!("cannot size {}: {error}", disk.display()))
        })?;
        drop(file);
        hsev_agent::luks::luks_format(disk, key.as_slice()).map_err(|error| {
            OpError::internal(format!(
                "cannot format {} as LUKS2: {error}",
                disk.display()
            ))
        })?;

        let path = resource_path(binding)?;
        let reference_values = reference_values_name(vm);
        self.admin
            .put_reference_values(&reference_values, &[measurement])
            .map_err(|error| self.unavailable("register the expected measurement", &error))?;
        let policy = AppraisalPolicy {
            host_data: Some(HexBytes(artifacts::host_data(vm))),
            allow_debug: false,
            allow_migration_agent: false,
            allow_simulated: self.allow_simulated,
            ..AppraisalPolicy::default()
        };
        let registered = self.admin.put_resource(
            &path,
            key.as_slice(),
            &policy.into(),
            std::slice::from_ref(&reference_values),
        );
        if let Err(error) = registered {
            let _ = self.admin.delete_reference_values(&reference_values);
            return Err(self.unavailable("register the disk key", &error));
        }
        tracing::info!(vm = %vm, resource = %binding.resource, "disk key registered at the key broker");
        Ok(())
    }

    /// Removes `vm`'s key and its reference values from the key broker: the
    /// disk can never be unlocked again. A resource already gone is fine.
    pub fn revoke(&self, vm: &VmId, binding: &KeyBrokerBinding) -> Result<(), OpError> {
        let path = resource_path(binding)?;
        match self.admin.delete_resource(&path) {
            Ok(()) | Err(ClientError::Refused { status: 404, .. }) => {}
            Err(error) => return Err(self.unavailable("revoke the disk key", &error)),
        }
        match self
            .admin
            .delete_reference_values(&reference_values_name(vm))
        {
            Ok(()) | Err(ClientError::Refused { status: 404, .. }) => {}
            Err(error) => return Err(self.unavailable("remove the reference values", &error)),
        }
        tracing::info!(vm = %vm, resource = %binding.resource, "disk key revoked at the key broker");
        Ok(())
    }

    fn unavailable(&self, what: &str, error: &ClientError) -> OpError {
        // The error's own text says "key broker unreachable", "... refused".
        let message = format!("cannot {what} at {}: {error}", self.url);
        match error {
            ClientError::Unreachable(_) => OpError::unavailable(message),
            _ => OpError::internal(message),
        }
    }
}

/// The reference-value set holding `vm`'s expected measurement.
fn reference_values_name(vm: &VmId) -> String {
    format!("vm-{}", vm.0)
}

fn resource_path(binding: &KeyBrokerBinding) -> Result<ResourcePath, OpError> {
    binding
        .resource
        .parse()
        .map_err(|error| OpError::internal(format!("resource {:?}: {error}", binding.resource)))
}
