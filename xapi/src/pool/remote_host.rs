//! The coordinator's side of a remote host: [`HostClient`] over the pool's
//! mTLS channel to that host's agent (`HostAgent` service). Blocking, as
//! the coordinator's operations are: each call runs on the daemon's runtime
//! and waits for it.

use hsev_attestation::tenant_attest::{AttestAnswer, NONCE_LEN};
use hsev_proto::internal::host_agent_client::HostAgentClient;
use hsev_proto::internal::{ConsoleRead, Empty, Json};
use tonic::transport::{Channel, Endpoint};

use super::pki::Identity;
use super::tls::client_config;
use super::wire::{
    follow_steps, op_error, DestroyArgs, FetchDisksArgs, PrepareArgs, StopArgs, VmAndRuntime,
};
use super::{ConsoleChunk, HostClient, LaunchRequest, Launched, Progress, Recovered};
use crate::daemon::error::OpError;
use crate::daemon::host::HostCapabilities;
use crate::hypervisor::StopMode;
use crate::model::{DiskRecord, VmId, VmRuntime};

/// A host of the pool reached over the network.
#[derive(Debug, Clone)]
pub struct RemoteHost {
    name: String,
    address: String,
    channel: Channel,
    runtime: tokio::runtime::Handle,
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Json, OpError> {
    serde_json::to_vec(value)
        .map(|json| Json { json })
        .map_err(|error| OpError::internal(format!("encoding: {error}")))
}

fn decode<T: serde::de::DeserializeOwned>(json: &Json) -> Result<T, OpError> {
    serde_json::from_slice(&json.json)
        .map_err(|error| OpError::internal(format!("an unreadable answer: {error}")))
}

impl RemoteHost {
    /// The host `name` whose agent listens at `address`, reached with this
    /// member's identity; connects on first use.
    pub fn new(
        name: &str,
        address: &str,
        identity: &Identity,
        ca_pem: &str,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, OpError> {
        let channel = Endpoint::from_shared(format!("https://{address}"))
            .and_then(|endpoint| endpoint.tls_config(client_config(identity, ca_pem, name)))
            .map_err(|error| OpError::internal(format!("host {name} at {address}: {error}")))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .http2_keep_alive_interval(std::time::Duration::from_secs(5))
            .keep_alive_timeout(std::time::Duration::from_secs(5))
            .connect_lazy();
        Ok(RemoteHost {
            name: name.to_owned(),
            address: address.to_owned(),
            channel,
            runtime,
        })
    }

    /// Its agent's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn client(&self) -> HostAgentClient<Channel> {
        HostAgentClient::new(self.channel.clone())
    }

    /// A failed call, named for this host.
    fn failed(&self, status: &tonic::Status) -> OpError {
        let error = op_error(status);
        if status.code() == tonic::Code::Unavailable {
            OpError::unavailable(format!(
                "host {} ({}) cannot be reached: {}",
                self.name, self.address, error.message
            ))
        } else {
            error
        }
    }
}

impl HostClient for RemoteHost {
    fn name(&self) -> &str {
        &self.name
    }

    fn probe(&self) -> Result<HostCapabilities, OpError> {
        self.runtime.block_on(async {
            let answer = self
                .client()
                .probe(Empty {})
                .await
                .map_err(|status| self.failed(&status))?;
            decode(answer.get_ref())
        })
    }

    fn prepare(
        &self,
        vm: &VmId,
        disks: &[DiskRecord],
        progress: Progress<'_>,
    ) -> Result<(), OpError> {
        let args = encode(&PrepareArgs {
            vm: vm.clone(),
            disks: disks.to_vec(),
        })?;
        self.runtime.block_on(async {
            let stream = self
                .client()
                .prepare(args)
                .await
                .map_err(|status| self.failed(&status))?
                .into_inner();
            follow_steps(stream, progress).await
        })
    }

    fn launch(&self, request: &LaunchRequest, progress: Progress<'_>) -> Result<Launched, OpError> {
        let args = encode(request)?;
        self.runtime.block_on(async {
            let stream = self
                .client()
                .launch(args)
                .await
                .map_err(|status| self.failed(&status))?
                .into_inner();
            follow_steps(stream, progress).await
        })
    }

    fn stop(&self, vm: &VmId, runtime: &VmRuntime, mode: StopMode) -> Result<String, OpError> {
        let args = encode(&StopArgs {
            vm: vm.clone(),
            runtime: runtime.clone(),
            mode: mode.into(),
        })?;
        self.runtime.block_on(async {
            let answer = self
                .client()
                .stop(args)
                .await
                .map_err(|status| self.failed(&status))?;
            decode(answer.get_ref())
        })
    }

    fn reset(&self, vm: &VmId, runtime: &VmRuntime) -> Result<(), OpError> {
        let args = encode(&VmAndRuntime {
            vm: vm.clone(),
            runtime: runtime.clone(),
            nonce: String::new(),
        })?;
        self.runtime.block_on(async {
            self.client()
                .reset(args)
                .await
                .map(|_| ())
                .map_err(|status| self.failed(&status))
        })
    }

    fn destroy(
        &self,
        vm: &VmId,
        disks: &[DiskRecord],
        wipe: bool,
        progress: Progress<'_>,
    ) -> Result<(), OpError> {
        let args = encode(&DestroyArgs {
            vm: vm.clone(),
            disks: disks.to_vec(),
            wipe,
        })?;
        self.runtime.block_on(async {
            let stream = self
                .client()
                .destroy(args)
                .await
                .map_err(|status| self.failed(&status))?
                .into_inner();
            follow_steps(stream, progress).await
        })
    }

    fn attest(
        &self,
        vm: &VmId,
        runtime: &VmRuntime,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<AttestAnswer, OpError> {
        let args = encode(&VmAndRuntime {
            vm: vm.clone(),
            runtime: runtime.clone(),
            nonce: hex::encode(nonce),
        })?;
        self.runtime.block_on(async {
            let answer = self
                .client()
                .attest(args)
                .await
                .map_err(|status| self.failed(&status))?;
            decode(answer.get_ref())
        })
    }

    fn read_console(&self, vm: &VmId, offset: u64, max: usize) -> Result<ConsoleChunk, OpError> {
        self.runtime.block_on(async {
            let answer = self
                .client()
                .read_console(ConsoleRead {
                    vm: vm.0.clone(),
                    offset,
                    max: u32::try_from(max).unwrap_or(u32::MAX),
                })
                .await
                .map_err(|status| self.failed(&status))?
                .into_inner();
            Ok(ConsoleChunk {
                data: answer.data,
                length: answer.length,
            })
        })
    }

    fn recover(&self) -> Result<Vec<(VmId, Recovered)>, OpError> {
        self.runtime.block_on(async {
            let answer = self
                .client()
                .recover(Empty {})
                .await
                .map_err(|status| self.failed(&status))?;
            decode(answer.get_ref())
        })
    }
    fn fetch_disks(
        &self,
        vm: &VmId,
        disks: &[DiskRecord],
        from: &str,
        from_address: &str,
        progress: Progress<'_>,
    ) -> Result<u64, OpError> {
        let args = encode(&FetchDisksArgs {
            vm: vm.clone(),
            disks: disks.to_vec(),
            from: from.to_owned(),
            from_address: from_address.to_owned(),
        })?;
        self.runtime.block_on(async {
            let stream = self
                .client()
                .fetch_disks(args)
                .await
                .map_err(|status| self.failed(&status))?
                .into_inner();
            follow_steps(stream, progress).await
        })
    }
}
