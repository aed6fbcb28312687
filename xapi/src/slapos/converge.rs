//! One instance brought to what its requester asked, from whatever state
//! the VM is in (none, being made, stopped, running, failed, left by an
//! earlier instance): each pass takes the next steps and publishes what is
//! true. Errors of the request are reported as `error` (naming the
//! parameter) and make no VM; a VM that fails is reported as `bang`, once
//! per failure, and retried with backoff.

use hsev_proto::v1::{Vm, VmState};
use serde_json::Value;
use tonic::Code;

use super::encrypted_disk::{self, Vouched};
use super::hosts;
use super::master::{InstanceSummary, MasterError, RequestedState};
use super::naming::VmNames;
use super::node::{transitional, vm_name, Node, PassError};
use super::parameters::{self, Request, SoftwareType};
use super::pool::PoolError;
use super::publish::{self, connection_parameters, ConnectionParameters};
use super::spec::{differences, vm_spec};

/// Why a VM may not run (yet).
enum Vetting {
    /// Never, as requested: the message names the parameter.
    Refused(String),
    /// Not before its requester acts: the message says how.
    Awaiting(String),
    /// Not now: asking again later can help.
    Later(String),
}

/// hsevd's refusal of a request, with the parameter it concerns named
/// where its words tell which.
fn hsevd_refusal(message: &str) -> String {
    let parameter = [
        ("vcpus", "cpu-count"),
        ("memory_mib", "ram-size"),
        ("unknown image", "image"),
        ("guest_policy", "guest-policy"),
        ("encrypted_disk", "encrypted-disk-size"),
        ("key broker", "encrypted-disk-size"),
        ("port_forwards", "nat-rules"),
        ("disk", "disk-size"),
        ("cannot run", "confidential-mode"),
    ]
    .iter()
    .find(|(word, _)| message.contains(word))
    .map(|(_, parameter)| *parameter);
    match parameter {
        Some(parameter) => format!("{parameter}: hsevd refused: {message}"),
        None => format!("hsevd refused the request: {message}"),
    }
}

impl Node {
    /// Converges `instance`, given the connector's VMs on its partition.
    pub(super) async fn converge(
        &mut self,
        instance: &InstanceSummary,
        vms: &[Vm],
    ) -> Result<(), PassError> {
        let guid = instance.instance_guid.as_str();
        let mut current = None;
        for vm in vms {
            let serves = self
                .names
                .slot(vm_name(vm))
                .is_some_and(|slot| VmNames::serves(&slot, guid));
            if serves {
                current = Some(vm.clone());
            } else {
                self.remove(vm, "it served an earlier instance of this partition")
                    .await?;
            }
        }
        if instance.software_release != self.config.master.software_release
            && instance.state != RequestedState::Destroyed
        {
            let message = format!(
                "this node provides HyperSEV's software release {} only, not {}",
                self.config.master.software_release, instance.software_release
            );
            return self.refuse(guid, &message, None).await;
        }
        match instance.state {
            RequestedState::Destroyed => self.destroy(guid, current).await,
            RequestedState::Started | RequestedState::Stopped => {
                self.serve(instance, current).await
            }
        }
    }

    /// Deletes the instance's VM, wiping its disks, and reports it
    /// destroyed: the master frees the partition.
    async fn destroy(&mut self, guid: &str, vm: Option<Vm>) -> Result<(), PassError> {
        if let Some(vm) = &vm {
            if transitional(vm) {
                return Ok(());
            }
            match self.pool.delete_wiped(&vm.id).await {
                Ok(()) => {
                    tracing::info!(instance = %guid, vm = %vm_name(vm), id = %vm.id, "destroyed: VM deleted, disks wiped");
                }
                Err(error) if error.is_outage() => return Err(error.into()),
                Err(error) => {
                    return self
                        .fail(
                            guid,
                            &format!("deleting the VM failed: {}", error.message()),
                        )
                        .await
                }
            }
        }
        if self.ledger.state_is_new(guid, RequestedState::Destroyed) {
            let instance = guid.to_owned();
            self.on_master(move |master| master.report_state(&instance, RequestedState::Destroyed))
                .await?;
            self.ledger.reported(guid, RequestedState::Destroyed);
            tracing::info!(instance = %guid, "reported destroyed: the partition is free");
        }
        self.work.remove(guid);
        Ok(())
    }

    /// Brings a started or stopped instance's VM to its request.
    async fn serve(&mut self, summary: &InstanceSummary, vm: Option<Vm>) -> Result<(), PassError> {
        let guid = summary.instance_guid.as_str();
        let instance = {
            let guid = guid.to_owned();
            match self.on_master(move |master| master.instance(&guid)).await {
                Ok(instance) => instance,
                // Gone since the listing: the next pass no longer lists it.
                Err(MasterError::Refused {
                    status: 403 | 404, ..
                }) => return Ok(()),
                Err(error) => return Err(error.into()),
            }
        };
        let parsed = SoftwareType::parse(&instance.software_type).and_then(|software_type| {
            let decoded = parameters::decode(&instance.parameters)?;
            parameters::parse(software_type, &decoded, &self.config.node.default_image)
        });
        let request = match parsed {
            Ok(request) => request,
            // A bad change leaves a VM made from earlier parameters as it is.
            Err(error) => return self.refuse(guid, &error.to_string(), vm.as_ref()).await,
        };
        // What a refusal after work holds for: these parameters, until
        // they change or the master's timestamp moves (a bang asks again).
        let fingerprint = format!(
            "{}|{}|{}",
            instance.processing_timestamp,
            instance.software_type,
            Value::Object(instance.parameters.clone())
        );
        match self.work.get(guid).and_then(|work| work.refused.clone()) {
            Some((refused, message)) if refused == fingerprint => {
                return self.refuse(guid, &message, None).await
            }
            Some(_) => {
                if let Some(work) = self.work.get_mut(guid) {
                    work.refused = None;
                }
            }
            None => {}
        }
        if let Some(message) = encrypted_disk::unservable(&request, self.key_broker.as_deref()) {
            return self.refuse(guid, &message, vm.as_ref()).await;
        }
        let image_id = match self.pool.image_id(&request.image).await {
            Ok(id) => id,
            Err(error) if error.is_outage() => return Err(error.into()),
            Err(error) => {
                let message = format!("image: {:?}: {}", request.image, error.message());
                return self.refuse(guid, &message, vm.as_ref()).await;
            }
        };

        let mut vm = vm;
        if let Some(current) = &vm {
            if transitional(current) {
                return Ok(());
            }
            let changed = differences(current, &request, &image_id);
            if !changed.is_empty() {
                tracing::info!(instance = %guid, vm = %vm_name(current), changed = %changed.join(", "), "parameters changed: re-creating the VM");
                match self.pool.delete_wiped(&current.id).await {
                    Ok(()) => vm = None,
                    Err(error) if error.is_outage() => return Err(error.into()),
                    Err(error) => {
                        return self
                            .fail(
                                guid,
                                &format!(
                                    "deleting the VM to re-create it failed: {}",
                                    error.message()
                                ),
                            )
                            .await
                    }
                }
            }
        }
        if self.backing_off(guid) {
            return Ok(());
        }
        let vm = match vm {
            Some(vm) => vm,
            None => match self
                .create(guid, &summary.partition, &request, &image_id, &fingerprint)
                .await?
            {
                Some(vm) => vm,
                None => return Ok(()),
            },
        };
        match summary.state {
            RequestedState::Started => self.keep_running(guid, vm, &request, &fingerprint).await,
            _ => self.halt(guid, vm, &request).await,
        }
    }

    /// Creates the instance's VM, not started; `None` when refused.
    async fn create(
        &mut self,
        guid: &str,
        partition: &str,
        request: &Request,
        image_id: &str,
        fingerprint: &str,
    ) -> Result<Option<Vm>, PassError> {
        let name = self.names.vm_name(partition, guid);
        let spec = vm_spec(&name, request, image_id, self.config.key_broker.as_ref());
        match self.pool.create(spec).await {
            Ok(vm) => {
                if vm.owner != self.config.hsev.owner {
                    return Err(PassError::Setup(format!(
                        "hsev.owner is {:?}, but hsevd made the VM {name} for {:?}: set hsev.owner \
                         to the token's name in hsevd.toml",
                        self.config.hsev.owner, vm.owner
                    )));
                }
                tracing::info!(instance = %guid, vm = %name, id = %vm.id, "VM created");
                self.recovered(guid);
                Ok(Some(vm))
            }
            Err(PoolError::Refused {
                code: Code::AlreadyExists,
                ..
            }) => {
                // Made meanwhile by a creation an earlier run of the
                // connector asked for: that VM serves this instance.
                let owner = self.config.hsev.owner.clone();
                let made = self.pool.vms(&owner).await?;
                match made.into_iter().find(|vm| vm_name(vm) == name) {
                    Some(vm) if transitional(&vm) => Ok(None),
                    Some(vm) => Ok(Some(vm)),
                    None => Err(PassError::Setup(format!(
                        "hsevd has a VM named {name} that the VMs of {owner:?} do not include: \
                         set hsev.owner to the connector token's name in hsevd.toml"
                    ))),
                }
            }
            Err(error) if error.is_outage() => Err(error.into()),
            Err(error) if error.is_request_fault() => {
                let message = hsevd_refusal(&error.message());
                self.remember_refusal(guid, fingerprint, &message);
                self.refuse(guid, &message, None).await?;
                Ok(None)
            }
            Err(error) => {
                self.fail(
                    guid,
                    &format!("creating the VM failed: {}", error.message()),
                )
                .await?;
                Ok(None)
            }
        }
    }

    /// Runs the VM of a started instance, after the checks it must pass.
    async fn keep_running(
        &mut self,
        guid: &str,
        vm: Vm,
        request: &Request,
        fingerprint: &str,
    ) -> Result<(), PassError> {
        if transitional(&vm) {
            return Ok(());
        }
        let running = if vm.state == i32::from(VmState::Running) {
            vm
        } else {
            if vm.state == i32::from(VmState::Failed) {
                let failure = format!("{}|{}", vm.updated_at, vm.state_reason);
                if self.ledger.bang_is_new(guid, &failure) {
                    let message = format!("the VM failed: {}", vm.state_reason);
                    self.bang(guid, &message).await?;
                    self.ledger.banged(guid, &failure);
                }
            }
            if self.backing_off(guid) {
                return Ok(());
            }
            match self.vet(&vm, request).await? {
                Ok(()) => {}
                Err(Vetting::Refused(message)) => {
                    return self.reject(guid, &vm, &message, fingerprint).await
                }
                Err(Vetting::Later(message)) => {
                    self.back_off(guid);
                    return self.refuse(guid, &message, Some(&vm)).await;
                }
                Err(Vetting::Awaiting(message)) => {
                    // Asked again each pass, so that it starts within one
                    // of the requester's pin; no error: nothing failed.
                    let mut parameters = connection_parameters(&vm, Some(request));
                    parameters.insert(publish::AWAITING.to_owned(), message);
                    return self.publish_parameters(guid, parameters).await;
                }
            }
            match self.pool.start(&vm.id).await {
                Ok(started) => {
                    tracing::info!(instance = %guid, vm = %vm_name(&started), "VM started");
                    self.recovered(guid);
                    started
                }
                Err(error) if error.is_outage() => return Err(error.into()),
                Err(error) if error.is_request_fault() => {
                    let message = hsevd_refusal(&error.message());
                    return self.reject(guid, &vm, &message, fingerprint).await;
                }
                Err(error) => {
                    return self
                        .fail(
                            guid,
                            &format!("starting the VM failed: {}", error.message()),
                        )
                        .await
                }
            }
        };
        if let Some(message) = measurement_mismatch(&running, request) {
            return self.reject(guid, &running, &message, fingerprint).await;
        }
        self.publish(guid, &running, request, RequestedState::Started)
            .await
    }

    /// Stops the VM of a stopped instance.
    async fn halt(&mut self, guid: &str, vm: Vm, request: &Request) -> Result<(), PassError> {
        if transitional(&vm) {
            return Ok(());
        }
        let vm = if vm.state == i32::from(VmState::Running) {
            let timeout =
                std::time::Duration::from_secs(self.config.node.stop_timeout_seconds.into());
            match self.pool.stop(&vm.id, false, timeout).await {
                Ok(stopped) => {
                    tracing::info!(instance = %guid, vm = %vm_name(&stopped), "VM stopped");
                    stopped
                }
                Err(error) if error.is_outage() => return Err(error.into()),
                Err(error) => {
                    return self
                        .fail(
                            guid,
                            &format!("stopping the VM failed: {}", error.message()),
                        )
                        .await
                }
            }
        } else {
            vm
        };
        self.publish(guid, &vm, request, RequestedState::Stopped)
            .await
    }

    /// The checks a VM passes before each start: the pinned measurement,
    /// real SEV hardware, the host's TCB, where its disk key is held.
    async fn vet(&mut self, vm: &Vm, request: &Request) -> Result<Result<(), Vetting>, PassError> {
        if let Some(pin) = &request.expected_measurement {
            if vm.expected_measurement != *pin {
                return Ok(Err(Vetting::Refused(format!(
                    "expected-measurement: the VM would launch with measurement {}, not the pinned {}",
                    hex_or_none(&vm.expected_measurement),
                    hex::encode(pin)
                ))));
            }
        }
        if request.confidential()
            && vm.simulated_firmware
            && !self.config.node.allow_simulated_firmware
        {
            return Ok(Err(Vetting::Refused(format!(
                "confidential-mode: host {} has a simulated Secure Processor, which gives no \
                 confidentiality, and this node serves confidential VMs on real SEV hardware only",
                vm.host
            ))));
        }
        if let Some(minimum) = &request.minimum_tcb {
            let host =
                match self.pool.host(&vm.host).await {
                    Ok(host) => host,
                    Err(error) if error.is_outage() => return Err(error.into()),
                    Err(PoolError::Refused {
                        code: Code::PermissionDenied,
                        ..
                    }) => return Ok(Err(Vetting::Refused(
                        "minimum-tcb: cannot be checked: the connector's token cannot read the \
                         pool's hosts (an admin token can)"
                            .to_owned(),
                    ))),
                    Err(error) => {
                        return Ok(Err(Vetting::Later(format!(
                            "minimum-tcb: cannot read host {}: {}",
                            vm.host,
                            error.message()
                        ))))
                    }
                };
            let reported = host
                .capabilities
                .and_then(|capabilities| capabilities.sev)
                .map(|sev| sev.reported_tcb)
                .unwrap_or_default();
            if let Err(problem) = hosts::check_tcb(&reported, minimum) {
                return Ok(Err(Vetting::Refused(format!("minimum-tcb: {problem}"))));
            }
        }
        match encrypted_disk::vouch(
            self.key_broker.clone(),
            vm,
            self.config.node.allow_simulated_firmware,
        )
        .await
        {
            Vouched::Yes => {}
            Vouched::Refused(message) => return Ok(Err(Vetting::Refused(message))),
            Vouched::Later(message) => return Ok(Err(Vetting::Later(message))),
            Vouched::Awaiting(message) => return Ok(Err(Vetting::Awaiting(message))),
        }
        Ok(Ok(()))
    }

    /// Refuses a request after its VM was made: the VM goes (disks
    /// wiped), and the same parameters are not tried again.
    async fn reject(
        &mut self,
        guid: &str,
        vm: &Vm,
        message: &str,
        fingerprint: &str,
    ) -> Result<(), PassError> {
        tracing::warn!(instance = %guid, vm = %vm_name(vm), reason = %message, "request refused: deleting its VM");
        if vm.state == i32::from(VmState::Running) {
            match self
                .pool
                .stop(&vm.id, true, std::time::Duration::ZERO)
                .await
            {
                Ok(_) => {}
                Err(error) if error.is_outage() => return Err(error.into()),
                Err(error) => tracing::warn!(%error, "cannot stop the refused VM"),
            }
        }
        match self.pool.delete_wiped(&vm.id).await {
            Ok(()) => {}
            Err(error) if error.is_outage() => return Err(error.into()),
            Err(error) => tracing::warn!(%error, "cannot delete the refused VM"),
        }
        self.remember_refusal(guid, fingerprint, message);
        self.refuse(guid, message, None).await
    }

    fn remember_refusal(&mut self, guid: &str, fingerprint: &str, message: &str) {
        self.work.entry(guid.to_owned()).or_default().refused =
            Some((fingerprint.to_owned(), message.to_owned()));
    }

    /// Reports `message` as the instance's error (once) and publishes it,
    /// beside what the VM that still serves it shows.
    async fn refuse(
        &mut self,
        guid: &str,
        message: &str,
        vm: Option<&Vm>,
    ) -> Result<(), PassError> {
        if self.ledger.error_is_new(guid, message) {
            tracing::warn!(instance = %guid, error = %message, "request refused");
            let (instance, reported) = (guid.to_owned(), message.to_owned());
            self.on_master(move |master| master.report_error(&instance, &reported))
                .await?;
            self.ledger.errored(guid, message);
        }
        let parameters = match vm {
            Some(vm) => {
                let mut parameters = connection_parameters(vm, None);
                parameters.insert("error".to_owned(), message.to_owned());
                parameters
            }
            None => publish::refusal(message),
        };
        self.publish_parameters(guid, parameters).await
    }

    /// Bangs the instance with `message` and backs off: its VM failed.
    async fn fail(&mut self, guid: &str, message: &str) -> Result<(), PassError> {
        self.back_off(guid);
        if self.ledger.bang_is_new(guid, message) {
            self.bang(guid, message).await?;
            self.ledger.banged(guid, message);
        }
        Ok(())
    }

    async fn bang(&mut self, guid: &str, message: &str) -> Result<(), PassError> {
        tracing::warn!(instance = %guid, reason = %message, "bang");
        let (instance, reported) = (guid.to_owned(), message.to_owned());
        self.on_master(move |master| master.bang(&instance, &reported))
            .await?;
        Ok(())
    }

    /// Publishes what `vm` shows, then reports `state`: each when it changed.
    async fn publish(
        &mut self,
        guid: &str,
        vm: &Vm,
        request: &Request,
        state: RequestedState,
    ) -> Result<(), PassError> {
        self.publish_parameters(guid, connection_parameters(vm, Some(request)))
            .await?;
        if self.ledger.state_is_new(guid, state) {
            let instance = guid.to_owned();
            self.on_master(move |master| master.report_state(&instance, state))
                .await?;
            self.ledger.reported(guid, state);
            tracing::info!(instance = %guid, vm = %vm_name(vm), state = state.as_str(), "reported");
        }
        Ok(())
    }

    async fn publish_parameters(
        &mut self,
        guid: &str,
        parameters: ConnectionParameters,
    ) -> Result<(), PassError> {
        if !self.ledger.connection_is_new(guid, &parameters) {
            return Ok(());
        }
        let (instance, serialised) = (guid.to_owned(), publish::json_in_xml(&parameters));
        self.on_master(move |master| master.publish(&instance, &serialised))
            .await?;
        tracing::info!(instance = %guid, state = parameters.get("state").map_or("", String::as_str), attestation = parameters.get("attestation-state").map_or("", String::as_str), "connection parameters published");
        self.ledger.published(guid, parameters);
        Ok(())
    }
}

/// A running VM whose launch digest or attested measurement is not the
/// pinned one.
fn measurement_mismatch(vm: &Vm, request: &Request) -> Option<String> {
    let pin = request.expected_measurement.as_ref()?;
    let attested = vm
        .attestation
        .as_ref()
        .and_then(|attestation| attestation.verdict.as_ref())
        .map(|verdict| verdict.measurement.as_slice())
        .filter(|measurement| !measurement.is_empty());
    for (what, found) in [
        (
            "launched",
            Some(vm.launch_digest.as_slice()).filter(|digest| !digest.is_empty()),
        ),
        ("attested", attested),
    ] {
        if let Some(found) = found.filter(|found| *found != pin.as_slice()) {
            return Some(format!(
                "expected-measurement: the VM {what} with measurement {}, not the pinned {}",
                hex::encode(found),
                hex::encode(pin)
            ));
        }
    }
    None
}

fn hex_or_none(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        "(none computed)".to_owned()
    } else {
        hex::encode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsevd_refusals_name_the_parameter_they_concern() {
        assert_eq!(
            hsevd_refusal("vcpus 200 exceeds the host's 64 CPUs"),
            "cpu-count: hsevd refused: vcpus 200 exceeds the host's 64 CPUs"
        );
        assert!(hsevd_refusal("memory_mib 9999999 exceeds the host's").starts_with("ram-size: "));
        assert!(hsevd_refusal("this host cannot run sev guests").starts_with("confidential-mode: "));
        assert!(hsevd_refusal("something else").starts_with("hsevd refused the request: "));
    }

    #[test]
    fn a_pinned_measurement_must_match_the_launch_and_the_attestation() {
        let request = Request {
            expected_measurement: Some(vec![1; 48]),
            ..sample_request()
        };
        let mut vm = Vm {
            launch_digest: vec![1; 48],
            ..Vm::default()
        };
        assert_eq!(measurement_mismatch(&vm, &request), None);
        vm.launch_digest = vec![2; 48];
        let message = measurement_mismatch(&vm, &request).expect("mismatch");
        assert!(
            message.starts_with("expected-measurement: the VM launched"),
            "{message}"
        );
        assert_eq!(
            measurement_mismatch(&vm, &sample_request()),
            None,
            "nothing pinned"
        );
    }

    fn sample_request() -> Request {
        parameters::parse(SoftwareType::SevSnp, &serde_json::Map::new(), "debian").expect("valid")
    }
}
