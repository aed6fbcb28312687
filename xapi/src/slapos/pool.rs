//! HyperSEV as the connector uses it: hsevd's public `hsev.v1` API, with the
//! connector's own token, like any other client. VMs are always addressed
//! by id once found, never by a name another owner could share.

use std::time::Duration;

use hsev_proto::v1::{
    CreateVmRequest, DeleteVmRequest, Host, HostRef, ImageRef, ListHostsRequest, ListVmsRequest,
    Progress, StopVmRequest, Vm, VmRef, VmSpec, VmState,
};
use tonic::{Code, Status};

use crate::cli::client::{Connection, ConnectionArgs, RemoteError, Settings, Token};

use super::config::HsevConfig;

/// A call to hsevd that did not work.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    /// hsevd cannot be reached.
    #[error("hsevd at {endpoint} is unreachable: {detail}")]
    Unreachable {
        /// Where it was looked for.
        endpoint: String,
        /// What failed.
        detail: String,
    },
    /// hsevd refused or failed the call.
    #[error("hsevd refused ({}): {message}", code_name(*.code))]
    Refused {
        /// The gRPC code.
        code: Code,
        /// hsevd's message.
        message: String,
    },
    /// The connector's settings cannot be used (token file, CA, endpoint).
    #[error("{0}")]
    Setup(String),
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}

impl PoolError {
    /// Whether hsevd itself is away (as opposed to refusing one call, or
    /// answering that something it needs is: its key broker, say).
    pub fn is_outage(&self) -> bool {
        matches!(self, PoolError::Unreachable { .. })
    }

    /// Whether the request itself is at fault (bad or unservable values),
    /// rather than the VM or the pool.
    pub fn is_request_fault(&self) -> bool {
        matches!(
            self,
            PoolError::Refused {
                code: Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound,
                ..
            }
        )
    }

    /// hsevd's own words, for a message to the requester.
    pub fn message(&self) -> String {
        match self {
            PoolError::Refused { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

/// A status hsevd sent, or one the client made up for a call that never
/// reached it: those carry the transport's error as their source.
fn classify(status: &Status, endpoint: String, message: String) -> PoolError {
    if std::error::Error::source(status).is_some() {
        PoolError::Unreachable {
            endpoint,
            detail: message,
        }
    } else {
        PoolError::Refused {
            code: status.code(),
            message,
        }
    }
}

/// hsevd, reached with the connector's settings.
#[derive(Debug)]
pub struct Pool {
    settings: Settings,
    connection: Option<Connection>,
}

impl Pool {
    /// A pool reached as `config` says (nothing is dialled yet).
    pub fn new(config: &HsevConfig) -> Result<Self, PoolError> {
        let args = ConnectionArgs {
            endpoint: Some(config.endpoint.clone()),
            ca: config.ca.clone(),
            token: None::<Token>,
            token_file: Some(config.token_file.clone()),
            config: None,
        };
        let settings = Settings::resolve(&args).map_err(PoolError::Setup)?;
        Ok(Pool {
            settings,
            connection: None,
        })
    }

    /// Where hsevd is.
    pub fn endpoint(&self) -> String {
        self.settings.endpoint.to_string()
    }

    /// The open connection, dialling again after a failure.
    async fn connection(&mut self) -> Result<Connection, PoolError> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let connection = Connection::open(&self.settings)
            .await
            .map_err(|error| self.error(error))?;
        self.connection = Some(connection.clone());
        Ok(connection)
    }

    fn error(&mut self, error: RemoteError) -> PoolError {
        let error = match error {
            RemoteError::Unreachable { endpoint, detail } => {
                PoolError::Unreachable { endpoint, detail }
            }
            RemoteError::Status(status) => self.status(&status),
            RemoteError::Input(message) => PoolError::Setup(message),
            RemoteError::Failed(message) => PoolError::Refused {
                code: Code::Internal,
                message,
            },
        };
        if error.is_outage() {
            // A new connection on the next call.
            self.connection = None;
        }
        error
    }

    fn status(&self, status: &Status) -> PoolError {
        classify(
            status,
            self.endpoint(),
            self.settings.redact(status.message()),
        )
    }

    fn failed(&mut self, status: Status) -> PoolError {
        let error = self.status(&status);
        if error.is_outage() {
            self.connection = None;
        }
        error
    }

    /// The VMs `owner` owns.
    pub async fn vms(&mut self, owner: &str) -> Result<Vec<Vm>, PoolError> {
        let connection = self.connection().await?;
        let request = ListVmsRequest {
            state: VmState::Unspecified.into(),
            owner: owner.to_owned(),
        };
        match connection.vms().list_vms(request).await {
            Ok(response) => Ok(response
                .into_inner()
                .vms
                .into_iter()
                .filter(|vm| vm.owner == owner)
                .collect()),
            Err(status) => Err(self.failed(status)),
        }
    }

    /// The id of the image named (or with the id) `image`.
    pub async fn image_id(&mut self, image: &str) -> Result<String, PoolError> {
        let connection = self.connection().await?;
        let request = ImageRef {
            image: image.to_owned(),
        };
        match connection.images().get_image(request).await {
            Ok(response) => Ok(response.into_inner().id),
            Err(status) => Err(self.failed(status)),
        }
    }

    /// Every host of the pool (admin tokens only).
    pub async fn hosts(&mut self) -> Result<Vec<Host>, PoolError> {
        let connection = self.connection().await?;
        match connection.hosts().list_hosts(ListHostsRequest {}).await {
            Ok(response) => Ok(response.into_inner().hosts),
            Err(status) => Err(self.failed(status)),
        }
    }

    /// One host (admin tokens only).
    pub async fn host(&mut self, name: &str) -> Result<Host, PoolError> {
        let connection = self.connection().await?;
        let request = HostRef {
            host: name.to_owned(),
        };
        match connection.hosts().get_host(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.failed(status)),
        }
    }

    /// Creates a VM, not started.
    pub async fn create(&mut self, spec: VmSpec) -> Result<Vm, PoolError> {
        let connection = self.connection().await?;
        let request = CreateVmRequest {
            spec: Some(spec),
            start: false,
            request_id: uuid::Uuid::new_v4().to_string(),
        };
        let stream = connection.vms().create_vm(request).await;
        self.finish(stream, "create").await
    }

    /// Starts a VM.
    pub async fn start(&mut self, id: &str) -> Result<Vm, PoolError> {
        let connection = self.connection().await?;
        let stream = connection.vms().start_vm(VmRef { vm: id.to_owned() }).await;
        self.finish(stream, "start").await
    }

    /// Stops a VM: ACPI shutdown, killed after `timeout` (at once when
    /// `force`).
    pub async fn stop(
        &mut self,
        id: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<Vm, PoolError> {
        let connection = self.connection().await?;
        let request = StopVmRequest {
            vm: id.to_owned(),
            force,
            timeout_seconds: if force {
                0
            } else {
                u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).max(1)
            },
        };
        let stream = connection.vms().stop_vm(request).await;
        self.finish(stream, "stop").await
    }

    /// Deletes a VM and wipes its disks.
    pub async fn delete_wiped(&mut self, id: &str) -> Result<(), PoolError> {
        let connection = self.connection().await?;
        let request = DeleteVmRequest {
            vm: id.to_owned(),
            wipe_disks: true,
        };
        let stream = connection.vms().delete_vm(request).await;
        match self.follow(stream).await {
            Ok(_) => Ok(()),
            // Gone already: what was asked.
            Err(PoolError::Refused {
                code: Code::NotFound,
                ..
            }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    async fn follow(
        &mut self,
        stream: Result<tonic::Response<tonic::Streaming<Progress>>, Status>,
    ) -> Result<Option<Vm>, PoolError> {
        let mut stream = match stream {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(self.failed(status)),
        };
        let mut vm = None;
        loop {
            match stream.message().await {
                Ok(Some(progress)) => {
                    tracing::debug!(step = %progress.step, detail = %progress.detail, percent = progress.percent, "hsevd");
                    if progress.vm.is_some() {
                        vm = progress.vm;
                    }
                }
                Ok(None) => return Ok(vm),
                Err(status) => return Err(self.failed(status)),
            }
        }
    }

    async fn finish(
        &mut self,
        stream: Result<tonic::Response<tonic::Streaming<Progress>>, Status>,
        what: &str,
    ) -> Result<Vm, PoolError> {
        self.follow(stream)
            .await?
            .ok_or_else(|| PoolError::Refused {
                code: Code::Internal,
                message: format!("hsevd ended the {what} without sending the VM"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_call_that_never_reached_hsevd_is_an_outage() {
        let transport = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        )));
        assert!(classify(&transport, "unix:///s".into(), "refused".into()).is_outage());
        // hsevd answered: its key broker is away, hsevd is not.
        let answered = Status::unavailable("cannot register the disk key: key broker unreachable");
        let error = classify(&answered, "unix:///s".into(), answered.message().into());
        assert!(!error.is_outage() && !error.is_request_fault(), "{error}");
        let invalid = Status::invalid_argument("vcpus must be at least 1");
        assert!(classify(&invalid, "unix:///s".into(), String::new()).is_request_fault());
    }
}
