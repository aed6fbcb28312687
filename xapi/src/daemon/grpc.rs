//! The `hsev.v1` services: each RPC authenticates its caller, translates
//! the request into one lifecycle call, runs it off the async runtime, and
//! translates the answer back. Long operations stream their progress.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hsev_proto::v1::{
    self, host_service_server::HostService, image_service_server::ImageService,
    vm_service_server::VmService,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::auth::{Caller, Tokens};
use super::error::{Kind, OpError};
use super::images;
use super::metrics::{Metrics, RequestLabels};
use crate::api::vm::{
    host_to_proto, image_to_proto, spec_from_proto, state_from_proto, vm_to_proto,
};
use crate::coordinator::Coordinator;
use crate::model::VmRecord;

/// A stream of progress messages.
pub type ProgressStream = Pin<Box<dyn Stream<Item = Result<v1::Progress, Status>> + Send>>;

/// The services' shared state.
#[derive(Debug, Clone)]
pub struct Api {
    /// The pool coordinator.
    pub coordinator: Arc<Coordinator>,
    /// Bearer tokens.
    pub tokens: Arc<Tokens>,
    /// Where imported images go.
    pub images_dir: std::path::PathBuf,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

impl Api {
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        self.tokens
            .authenticate(header)
            .map_err(|error| Status::unauthenticated(error.to_string()))
    }

    fn admin<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let caller = self.caller(request)?;
        if caller.is_admin() {
            Ok(caller)
        } else {
            Err(OpError::new(Kind::PermissionDenied, "admins only").into())
        }
    }

    fn count(&self, method: &str, code: tonic::Code) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                code: code_name(code),
            })
            .inc();
    }

    fn vm(&self, record: &VmRecord) -> v1::Vm {
        view(&self.coordinator, record)
    }

    /// Runs a blocking call off the runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        method: &'static str,
        call: impl FnOnce(&Coordinator) -> Result<T, OpError> + Send + 'static,
    ) -> Result<T, Status> {
        let manager = Arc::clone(&self.coordinator);
        let outcome = tokio::task::spawn_blocking(move || call(&manager))
            .await
            .map_err(|error| Status::internal(format!("the operation panicked: {error}")))?
            .map_err(Status::from);
        self.count(
            method,
            outcome
                .as_ref()
                .map_or_else(Status::code, |_| tonic::Code::Ok),
        );
        outcome
    }

    /// Runs a long blocking call, streaming its progress, then the final
    /// message it returns (or its error).
    fn streamed(
        &self,
        method: &'static str,
        span: tracing::Span,
        call: impl FnOnce(&Coordinator, &(dyn Fn(&str, &str, u32) + Sync)) -> Result<v1::Progress, OpError>
            + Send
            + 'static,
    ) -> ProgressStream {
        let (sender, receiver) = mpsc::unbounded_channel();
        let manager = Arc::clone(&self.coordinator);
        let metrics = Arc::clone(&self.metrics);
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let progress_sender = sender.clone();
            let progress = move |step: &str, detail: &str, percent: u32| {
                tracing::info!(step, detail, "progress");
                let _ = progress_sender.send(Ok(v1::Progress {
                    step: step.to_owned(),
                    detail: detail.to_owned(),
                    percent,
                    vm: None,
                }));
            };
            let outcome = call(&manager, &progress).map_err(|error| {
                tracing::warn!(%error, "failed");
                Status::from(error)
            });
            let code = outcome
                .as_ref()
                .map_or_else(Status::code, |_| tonic::Code::Ok);
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    method: method.to_owned(),
                    code: code_name(code),
                })
                .inc();
            let _ = sender.send(outcome);
        });
        Box::pin(UnboundedReceiverStream::new(receiver))
    }
}

/// The API view of a VM, with its host's state and its placement.
fn view(coordinator: &Coordinator, vm: &VmRecord) -> v1::Vm {
    let mut shown = vm_to_proto(vm, coordinator.simulated_firmware(&vm.host));
    shown.placement = coordinator
        .placement_explanation(&vm.id)
        .unwrap_or_default();
    // What runs on a host not heard from is not known: never shown running.
    if let Some(reason) = coordinator.down_reason(&vm.host) {
        if !matches!(
            vm.state,
            crate::model::VmState::Stopped | crate::model::VmState::Lost
        ) {
            shown.state = v1::VmState::Unknown.into();
            shown.state_reason = format!("{reason}; last known: {}", vm.state);
        }
    }
    shown
}

/// The last message of a VM operation: the VM as it now is.
fn finished(coordinator: &Coordinator, vm: &VmRecord) -> v1::Progress {
    v1::Progress {
        step: "done".to_owned(),
        detail: String::new(),
        percent: 100,
        vm: Some(view(coordinator, vm)),
    }
}

/// The most console bytes one read carries.
const CONSOLE_CHUNK: usize = 16 * 1024;

fn seconds_or(value: u32, default: u64) -> Duration {
    Duration::from_secs(if value == 0 {
        default
    } else {
        u64::from(value)
    })
}

#[tonic::async_trait]
impl VmService for Api {
    type CreateVmStream = ProgressStream;
    type StartVmStream = ProgressStream;
    type StopVmStream = ProgressStream;
    type RebootVmStream = ProgressStream;
    type DeleteVmStream = ProgressStream;
    type StreamConsoleStream = Pin<Box<dyn Stream<Item = Result<v1::ConsoleChunk, Status>> + Send>>;

    async fn create_vm(
        &self,
        request: Request<v1::CreateVmRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let spec = spec_from_proto(
            request
                .spec
                .ok_or_else(|| Status::invalid_argument("spec is required"))?,
        )?;
        let span = tracing::info_span!("create_vm", caller = %caller.name, name = %spec.name);
        let start = request.start;
        let request_id = Some(request.request_id).filter(|id| !id.is_empty());
        if request_id
            .as_ref()
            .is_some_and(|id| id.chars().count() > 128)
        {
            return Err(Status::invalid_argument(
                "request_id is longer than 128 characters",
            ));
        }
        Ok(Response::new(self.streamed(
            "CreateVm",
            span,
            move |manager, progress| {
                manager
                    .create(&caller, spec, start, request_id.as_deref(), progress)
                    .map(|vm| finished(manager, &vm))
            },
        )))
    }

    async fn start_vm(
        &self,
        request: Request<v1::VmRef>,
    ) -> Result<Response<ProgressStream>, Status> {
        let caller = self.caller(&request)?;
        let vm = request.into_inner().vm;
        let span = tracing::info_span!("start_vm", caller = %caller.name, vm = %vm);
        Ok(Response::new(self.streamed(
            "StartVm",
            span,
            move |manager, progress| {
                manager
                    .start(&caller, &vm, progress)
                    .map(|vm| finished(manager, &vm))
            },
        )))
    }

    async fn stop_vm(
        &self,
        request: Request<v1::StopVmRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let span = tracing::info_span!("stop_vm", caller = %caller.name, vm = %request.vm);
        let timeout = seconds_or(request.timeout_seconds, 30);
        Ok(Response::new(self.streamed(
            "StopVm",
            span,
            move |manager, progress| {
                manager
                    .stop(&caller, &request.vm, request.force, timeout, progress)
                    .map(|vm| finished(manager, &vm))
            },
        )))
    }

    async fn reboot_vm(
        &self,
        request: Request<v1::VmRef>,
    ) -> Result<Response<ProgressStream>, Status> {
        let caller = self.caller(&request)?;
        let vm = request.into_inner().vm;
        let span = tracing::info_span!("reboot_vm", caller = %caller.name, vm = %vm);
        Ok(Response::new(self.streamed(
            "RebootVm",
            span,
            move |manager, progress| {
                manager
                    .reboot(&caller, &vm, progress)
                    .map(|vm| finished(manager, &vm))
            },
        )))
    }

    async fn delete_vm(
        &self,
        request: Request<v1::DeleteVmRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let span = tracing::info_span!("delete_vm", caller = %caller.name, vm = %request.vm);
        Ok(Response::new(self.streamed(
            "DeleteVm",
            span,
            move |manager, progress| {
                manager
                    .delete(&caller, &request.vm, request.wipe_disks, progress)
                    .map(|vm| finished(manager, &vm))
            },
        )))
    }

    async fn get_vm(&self, request: Request<v1::VmRef>) -> Result<Response<v1::Vm>, Status> {
        let caller = self.caller(&request)?;
        let vm = request.into_inner().vm;
        let record = self
            .blocking("GetVm", move |manager| manager.get(&caller, &vm))
            .await?;
        Ok(Response::new(self.vm(&record)))
    }

    async fn list_vms(
        &self,
        request: Request<v1::ListVmsRequest>,
    ) -> Result<Response<v1::ListVmsResponse>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let state = state_from_proto(request.state)?;
        let records = self
            .blocking("ListVms", move |manager| {
                manager.list(&caller, state, Some(&request.owner))
            })
            .await?;
        Ok(Response::new(v1::ListVmsResponse {
            vms: records.iter().map(|record| self.vm(record)).collect(),
        }))
    }

    async fn wait_vm(
        &self,
        request: Request<v1::WaitVmRequest>,
    ) -> Result<Response<v1::Vm>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let state = state_from_proto(request.state)?
            .ok_or_else(|| Status::invalid_argument("state is required"))?;
        let timeout = seconds_or(request.timeout_seconds, 60);
        let record = self
            .blocking("WaitVm", move |manager| {
                manager.wait(&caller, &request.vm, state, timeout)
            })
            .await?;
        Ok(Response::new(self.vm(&record)))
    }

    async fn stream_console(
        &self,
        request: Request<v1::ConsoleRequest>,
    ) -> Result<Response<Self::StreamConsoleStream>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        // The first read says whether the VM is there at all.
        let vm = request.vm.clone();
        let first_caller = caller.clone();
        let (first, _) = self
            .blocking("StreamConsole", move |coordinator| {
                coordinator.read_console(&first_caller, &vm, 0, 0)
            })
            .await?;
        let (sender, receiver) = mpsc::channel(16);
        let coordinator = Arc::clone(&self.coordinator);
        tokio::spawn(async move {
            let mut offset = if request.tail_bytes > 0 && request.tail_bytes < first.length {
                first.length - request.tail_bytes
            } else {
                0
            };
            loop {
                let reader = Arc::clone(&coordinator);
                let (caller, vm) = (caller.clone(), request.vm.clone());
                let read = tokio::task::spawn_blocking(move || {
                    reader.read_console(&caller, &vm, offset, CONSOLE_CHUNK)
                })
                .await;
                let Ok(Ok((chunk, live))) = read else { return };
                if chunk.data.is_empty() {
                    if !request.follow || !live || sender.is_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                offset += chunk.data.len() as u64;
                if sender
                    .send(Ok(v1::ConsoleChunk { data: chunk.data }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn get_vm_attestation(
        &self,
        request: Request<v1::VmRef>,
    ) -> Result<Response<v1::AttestationStatus>, Status> {
        let caller = self.caller(&request)?;
        let vm = request.into_inner().vm;
        let record = self
            .blocking("GetVmAttestation", move |manager| manager.get(&caller, &vm))
            .await?;
        Ok(Response::new(crate::api::vm::attestation_to_proto(
            &record.attestation,
        )))
    }

    async fn attest_vm(
        &self,
        request: Request<v1::AttestVmRequest>,
    ) -> Result<Response<v1::AttestVmResponse>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let nonce: [u8; hsev_attestation::tenant_attest::NONCE_LEN] =
            request.nonce.as_slice().try_into().map_err(|_| {
                Status::invalid_argument(format!(
                    "nonce: {} bytes, not {}",
                    hsev_attestation::tenant_attest::NONCE_LEN,
                    request.nonce.len()
                ))
            })?;
        let evidence = self
            .blocking("AttestVm", move |manager| {
                manager.attest(&caller, &request.vm, &nonce)
            })
            .await?;
        Ok(Response::new(v1::AttestVmResponse {
            evidence_json: evidence.to_string(),
        }))
    }

    async fn set_vm_id_block(
        &self,
        request: Request<v1::SetVmIdBlockRequest>,
    ) -> Result<Response<v1::Vm>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let id_block = crate::api::vm::id_block_from_proto(&request.id_block, &request.id_auth)?;
        let record = self
            .blocking("SetVmIdBlock", move |manager| {
                manager.set_id_block(&caller, &request.vm, id_block)
            })
            .await?;
        Ok(Response::new(self.vm(&record)))
    }

    async fn set_vm_ha(
        &self,
        request: Request<v1::SetVmHaRequest>,
    ) -> Result<Response<v1::Vm>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let ha = crate::api::vm::ha_from_proto(request.ha)?;
        let record = self
            .blocking("SetVmHa", move |manager| {
                manager.set_ha(&caller, &request.vm, ha, request.ha_priority)
            })
            .await?;
        Ok(Response::new(self.vm(&record)))
    }

    async fn set_vm_labels(
        &self,
        request: Request<v1::SetVmLabelsRequest>,
    ) -> Result<Response<v1::Vm>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let labels = request.labels.into_iter().collect();
        let record = self
            .blocking("SetVmLabels", move |manager| {
                manager.set_labels(&caller, &request.vm, labels)
            })
            .await?;
        Ok(Response::new(self.vm(&record)))
    }
}

#[tonic::async_trait]
impl ImageService for Api {
    type ImportImageStream = ProgressStream;

    async fn import_image(
        &self,
        request: Request<v1::ImportImageRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let caller = self.admin(&request)?;
        let request = request.into_inner();
        let images_dir = self.images_dir.clone();
        let span = tracing::info_span!("import_image", caller = %caller.name, name = %request.name);
        Ok(Response::new(self.streamed(
            "ImportImage",
            span,
            move |manager, progress| {
                let image = images::import(
                    manager.store(),
                    &images_dir,
                    &request.name,
                    std::path::Path::new(&request.source_dir),
                    progress,
                )?;
                Ok(v1::Progress {
                    step: "done".into(),
                    detail: format!("imported {} ({})", image.name, image.id),
                    percent: 100,
                    vm: None,
                })
            },
        )))
    }

    async fn list_images(
        &self,
        request: Request<v1::ListImagesRequest>,
    ) -> Result<Response<v1::ListImagesResponse>, Status> {
        self.caller(&request)?;
        let images = self
            .blocking("ListImages", |manager| Ok(manager.store().list_images()?))
            .await?;
        Ok(Response::new(v1::ListImagesResponse {
            images: images.iter().map(image_to_proto).collect(),
        }))
    }

    async fn get_image(
        &self,
        request: Request<v1::ImageRef>,
    ) -> Result<Response<v1::Image>, Status> {
        self.caller(&request)?;
        let image = request.into_inner().image;
        let record = self
            .blocking("GetImage", move |manager| {
                Ok(manager.store().get_image(&image)?)
            })
            .await?;
        Ok(Response::new(image_to_proto(&record)))
    }
}

/// The API view of every host with its allocations.
fn hosts(manager: &Coordinator) -> Result<Vec<v1::Host>, OpError> {
    let allocations = manager.store().host_allocations()?;
    Ok(manager
        .store()
        .list_hosts()?
        .iter()
        .map(|host| {
            let allocation = allocations
                .iter()
                .find(|allocation| allocation.host == host.name);
            let placed = allocation.map(|allocation| allocation.placed);
            let placed = placed.unwrap_or_default();
            let mut shown = host_to_proto(
                host,
                u32::try_from(placed.vcpus).unwrap_or(u32::MAX),
                placed.memory_mib,
                u32::try_from(placed.vms).unwrap_or(u32::MAX),
                manager.down_reason(&host.name),
            );
            // Free ASIDs as placement sees them: the firmware's count at the
            // last probe does not follow the VMs placed since.
            if let Some(sev) = shown
                .capabilities
                .as_mut()
                .and_then(|capabilities| capabilities.sev.as_mut())
            {
                sev.asids_free = sev
                    .asids_total
                    .saturating_sub(manager.asids_held(&host.name));
            }
            // The coordinator's own host has no agent address of its own.
            if host.address.is_empty() {
                shown.coordinator = true;
                shown.address = manager.pool_address().unwrap_or_default();
            }
            shown
        })
        .collect())
}

#[tonic::async_trait]
impl HostService for Api {
    async fn list_hosts(
        &self,
        request: Request<v1::ListHostsRequest>,
    ) -> Result<Response<v1::ListHostsResponse>, Status> {
        self.admin(&request)?;
        let hosts = self.blocking("ListHosts", hosts).await?;
        Ok(Response::new(v1::ListHostsResponse { hosts }))
    }

    async fn get_host(&self, request: Request<v1::HostRef>) -> Result<Response<v1::Host>, Status> {
        self.admin(&request)?;
        let name = request.into_inner().host;
        let hosts = self.blocking("GetHost", hosts).await?;
        hosts
            .into_iter()
            .find(|host| host.name == name)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("host {name} not found")))
    }

    async fn probe_host(
        &self,
        request: Request<v1::HostRef>,
    ) -> Result<Response<v1::Host>, Status> {
        self.admin(&request)?;
        let name = request.into_inner().host;
        let probed = name.clone();
        let hosts = self
            .blocking("ProbeHost", move |coordinator| {
                coordinator.probe_host(&probed)?;
                hosts(coordinator)
            })
            .await?;
        hosts
            .into_iter()
            .find(|host| host.name == name)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("host {name} not found")))
    }

    async fn create_join_token(
        &self,
        request: Request<v1::CreateJoinTokenRequest>,
    ) -> Result<Response<v1::JoinToken>, Status> {
        let admin = self.admin(&request)?;
        let ttl = seconds_or(request.into_inner().ttl_seconds, 3600);
        let issued = self
            .blocking("CreateJoinToken", move |coordinator| {
                coordinator.create_join_token(&admin.name, ttl)
            })
            .await?;
        Ok(Response::new(v1::JoinToken {
            token: issued.token,
            expires_at: issued
                .expires_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            ca_fingerprint: issued.ca_fingerprint,
        }))
    }

    async fn eject_host(
        &self,
        request: Request<v1::HostRef>,
    ) -> Result<Response<v1::Host>, Status> {
        self.admin(&request)?;
        let name = request.into_inner().host;
        let record = self
            .blocking("EjectHost", move |coordinator| coordinator.eject(&name))
            .await?;
        Ok(Response::new(host_to_proto(&record, 0, 0, 0, None)))
    }

    type SetHostStateStream = ProgressStream;

    async fn set_host_state(
        &self,
        request: Request<v1::SetHostStateRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        self.admin(&request)?;
        let request = request.into_inner();
        let span =
            tracing::info_span!("set_host_state", host = %request.host, state = %request.state);
        Ok(Response::new(self.streamed(
            "SetHostState",
            span,
            move |coordinator, progress| {
                let detail = if request.state == "maintenance" {
                    let evacuation = coordinator.enter_maintenance(&request.host, progress)?;
                    let moved: Vec<String> = evacuation
                        .moved
                        .iter()
                        .map(|(vm, to)| format!("{vm} -> {to}"))
                        .collect();
                    if evacuation.stuck.is_empty() {
                        format!(
                            "host {} is in maintenance and empty; moved: {}",
                            request.host,
                            if moved.is_empty() {
                                "nothing".to_owned()
                            } else {
                                moved.join(", ")
                            }
                        )
                    } else {
                        let stuck: Vec<String> = evacuation
                            .stuck
                            .iter()
                            .map(|(vm, why)| format!("{vm}: {why}"))
                            .collect();
                        return Err(OpError::precondition(format!(
                            "host {} stays in maintenance with VMs that could not move: {}{}",
                            request.host,
                            stuck.join("; "),
                            if moved.is_empty() {
                                String::new()
                            } else {
                                format!(" (moved: {})", moved.join(", "))
                            }
                        )));
                    }
                } else {
                    coordinator.set_host_status(&request.host, &request.state)?;
                    format!("host {} is {}", request.host, request.state)
                };
                Ok(v1::Progress {
                    step: "done".to_owned(),
                    detail,
                    percent: 100,
                    vm: None,
                })
            },
        )))
    }

    type MigrateVmStream = ProgressStream;

    async fn migrate_vm(
        &self,
        request: Request<v1::MigrateVmRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let caller = self.admin(&request)?;
        let request = request.into_inner();
        let span = tracing::info_span!("migrate_vm", vm = %request.vm, to = %request.to_host);
        Ok(Response::new(self.streamed(
            "MigrateVm",
            span,
            move |coordinator, progress| {
                let to = (!request.to_host.is_empty()).then_some(request.to_host.as_str());
                coordinator
                    .migrate(&caller, &request.vm, to, request.live, progress)
                    .map(|vm| finished(coordinator, &vm))
            },
        )))
    }

    async fn plan_ha(
        &self,
        request: Request<v1::HaPlanRequest>,
    ) -> Result<Response<v1::HaPlanResponse>, Status> {
        self.admin(&request)?;
        let failures = request.into_inner().host_failures;
        let plan = self
            .blocking("PlanHa", move |coordinator| coordinator.ha_plan(failures))
            .await?;
        Ok(Response::new(v1::HaPlanResponse {
            restartable: plan.shortfalls.is_empty(),
            scenarios: plan.scenarios,
            shortfalls: plan.shortfalls,
        }))
    }
}
