//! The toolstack's domain model: pools, hosts, images, VMs, disks and
//! events, as the store keeps them and the services reason about them.
//! Transport types (`hsev.v1` messages) are translated in [`crate::api`];
//! nothing here knows about gRPC or SQL.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A VM's id (a UUID in its hyphenated text form).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmId(pub String);

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a VM's memory is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConfidentialMode {
    /// An ordinary VM.
    None,
    /// AMD SEV.
    Sev,
    /// AMD SEV-ES.
    SevEs,
    /// AMD SEV-SNP.
    SevSnp,
}

impl fmt::Display for ConfidentialMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfidentialMode::None => "none",
            ConfidentialMode::Sev => "sev",
            ConfidentialMode::SevEs => "sev-es",
            ConfidentialMode::SevSnp => "sev-snp",
        })
    }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Disks are being prepared.
    Creating,
    /// Defined, not running.
    Stopped,
    /// Its VMM process is being started.
    Starting,
    /// Its VMM process runs.
    Running,
    /// Shutting down.
    Stopping,
    /// Its VMM process died or could not start.
    Failed,
    /// Being deleted.
    Deleting,
    /// Its host was declared failed while it ran, and it is not restarted
    /// elsewhere (not HA, or no host could take it): `state_reason` says
    /// why. Never restarted on its own.
    Lost,
}

impl VmState {
    /// Every state.
    pub const ALL: [VmState; 8] = [
        VmState::Creating,
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Failed,
        VmState::Deleting,
        VmState::Lost,
    ];

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Failed => "failed",
            VmState::Deleting => "deleting",
            VmState::Lost => "lost",
        }
    }

    /// Parses [`VmState::as_str`].
    pub fn parse(text: &str) -> Option<VmState> {
        VmState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host port forwarded to a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortForward {
    /// Host port on loopback (0: pick a free one at start).
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
}

/// An extra data disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Name, unique within the VM.
    pub name: String,
    /// Size in MiB.
    pub size_mib: u64,
}

/// What a VM is made of; fixed at creation, but for its labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Name, unique per owner.
    pub name: String,
    /// The image id.
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Memory protection.
    pub mode: ConfidentialMode,
    /// SNP/SEV guest policy.
    pub guest_policy: u64,
    /// Extra data disks.
    pub disks: Vec<DiskSpec>,
    /// Forwarded ports.
    pub port_forwards: Vec<PortForward>,
    /// vCPU model the measurement uses (e.g. `EPYC-v4`).
    pub vcpu_type: String,
    /// Size of the data disk the guest encrypts (LUKS2) with a key that
    /// only the tenant's key broker holds and releases to the attested
    /// guest; 0: none. The host creates it empty and never sees the key.
    #[serde(default)]
    pub encrypted_disk_mib: u64,
    /// The tenant's key broker, where the guest's agent fetches that disk's
    /// key: given by the tenant, measured through the kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_broker: Option<KeyBrokerBinding>,
    /// The owner's ID block, checked by the firmware before the guest runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_block: Option<OwnerIdBlock>,
    /// Where it may be placed.
    #[serde(default)]
    pub placement: PlacementRules,
    /// Labels for whoever manages the VM; see [`check_labels`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// What the pool does when its host fails.
    #[serde(default)]
    pub ha: HaPolicy,
    /// Among HA VMs restarted after a host failure, higher first.
    #[serde(default)]
    pub ha_priority: i32,
}

/// The most labels a VM carries.
pub const MAX_LABELS: usize = 32;

/// Checks labels: at most [`MAX_LABELS`]; keys 1-63 of `[a-z0-9._/-]`
/// starting with a letter or a digit; values at most 255 printable
/// characters. The message names the offending key.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("{} labels: at most {MAX_LABELS}", labels.len()));
    }
    for (key, value) in labels {
        let valid_key = key.len() <= 63
            && key
                .chars()
                .next()
                .is_some_and(|first| first.is_ascii_lowercase() || first.is_ascii_digit())
            && key.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '/' | '-')
            });
        if !valid_key {
            return Err(format!(
                "label key {key:?}: 1-63 of a-z, 0-9, '.', '_', '/' and '-', starting with a letter or a digit"
            ));
        }
        if value.chars().count() > 255 || value.chars().any(char::is_control) {
            return Err(format!(
                "label {key}: the value must be at most 255 printable characters"
            ));
        }
    }
    Ok(())
}

/// What the pool does with a VM whose host fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HaPolicy {
    /// Nothing: the VM is marked lost.
    #[default]
    None,
    /// Its host fences it and the coordinator starts it on another host (a
    /// fresh launch).
    Restart,
}

impl HaPolicy {
    /// The name shown and accepted.
    pub fn as_str(self) -> &'static str {
        match self {
            HaPolicy::None => "none",
            HaPolicy::Restart => "restart",
        }
    }
}

/// What a VM asks of the host it is placed on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlacementRules {
    /// Only this host (still checked by every placement filter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Labels the host must carry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Never on a host holding a VM of this group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<String>,
    /// With the VMs of this group, on their host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// A host running this hypervisor driver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The lowest TCB the host's platform may report, per component.
    pub minimum_tcb: hsev_attestation::policy::MinimumTcb,
}

/// How a guest reaches its disk key: its tenant's key broker as the guest
/// sees it, the public key the guest pins it by, and the tenant's
/// repository there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyBrokerBinding {
    /// The key broker's base URL from inside the guest.
    pub guest_url: String,
    /// SHA-256 of the broker's TLS public key (SubjectPublicKeyInfo),
    /// `sha256:<64 hex digits>`; empty only for a plain-HTTP development
    /// broker.
    #[serde(default)]
    pub pin: String,
    /// The tenant's repository at the broker.
    pub repository: String,
}

/// The encrypted disk's name among a VM's disks, and the serial number the
/// guest's agent finds it by.
pub const ENCRYPTED_DISK_NAME: &str = "hsev-data";

/// The resource type of disk keys at the key broker.
pub const DISK_KEY_TYPE: &str = "disk-key";

impl KeyBrokerBinding {
    /// The resource holding `vm`'s disk key: `<repository>/disk-key/<vm id>`.
    pub fn resource(&self, vm: &VmId) -> String {
        format!("{}/{DISK_KEY_TYPE}/{}", self.repository, vm.0)
    }

    /// The kernel command line options `vm`'s agent reads.
    pub fn cmdline_options(&self, vm: &VmId) -> String {
        let pin = if self.pin.is_empty() {
            String::new()
        } else {
            format!(" hsev.kbs.pin={}", self.pin)
        };
        format!(
            "hsev.net=user hsev.kbs={}{pin} hsev.kbs.resource={}",
            self.guest_url,
            self.resource(vm)
        )
    }
}

/// An ID block and its authentication structure as the VM's owner signed
/// them (SNP ABI bytes, stored base64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerIdBlock {
    /// The structures.
    pub signed: hsev_attestation::id_block::SignedIdBlock,
}

#[derive(Serialize, Deserialize)]
struct OwnerIdBlockText {
    block: String,
    auth: String,
}

impl Serialize for OwnerIdBlock {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        let engine = base64::engine::general_purpose::STANDARD;
        OwnerIdBlockText {
            block: engine.encode(self.signed.block.to_bytes()),
            auth: engine.encode(self.signed.auth_bytes()),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for OwnerIdBlock {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use base64::Engine;
        let engine = base64::engine::general_purpose::STANDARD;
        let text = OwnerIdBlockText::deserialize(deserializer)?;
        let decode = |field: &str, value: &str| {
            engine
                .decode(value)
                .map_err(|error| serde::de::Error::custom(format!("id_block.{field}: {error}")))
        };
        let signed = hsev_attestation::id_block::SignedIdBlock::from_bytes(
            &decode("block", &text.block)?,
            &decode("auth", &text.auth)?,
        )
        .map_err(serde::de::Error::custom)?;
        Ok(OwnerIdBlock { signed })
    }
}

/// Where a guest attestation stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "lowercase")]
pub enum Attestation {
    /// Not a confidential VM.
    NotApplicable,
    /// Waiting for the guest.
    Pending,
    /// The guest attested and got its key.
    Released,
    /// The key broker refused, with its reason.
    Refused(String),
}

impl Attestation {
    /// Where a new VM of `mode` stands before its first boot.
    pub fn initial(mode: ConfidentialMode) -> Attestation {
        if mode == ConfidentialMode::None {
            Attestation::NotApplicable
        } else {
            Attestation::Pending
        }
    }
}

/// What a running VM's process is, so a restarted daemon can find it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRuntime {
    /// The hypervisor driver that started it (`qemu`, `libvirt`, `fake`):
    /// another driver never adopts it.
    #[serde(default = "qemu_driver")]
    pub driver: String,
    /// The engine's own handle on the VM, where it keeps one: the libvirt
    /// domain's UUID, the fake driver's VM number; `None` for QEMU, which
    /// is known by its process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// The VMM process id (0 where the engine owns the process and does
    /// not say: libvirt, fake).
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22),
    /// so a recycled pid is never mistaken for it.
    pub start_ticks: u64,
    /// Its QMP socket (the QEMU driver; empty where the engine keeps the
    /// VMM's control channel to itself).
    pub qmp_socket: PathBuf,
    /// Where its serial console is logged.
    pub console_log: PathBuf,
    /// The simulated Secure Processor's channel socket, when simulated.
    pub sim_channel: Option<PathBuf>,
    /// The simulated firmware's launch id, when simulated.
    pub sim_launch_id: Option<u64>,
    /// Host ports actually forwarded.
    pub port_forwards: Vec<PortForward>,
    /// The socket of the guest agent's status port, when the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_channel: Option<PathBuf>,
    /// The socket of the port the agent answers attestation requests on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attest_channel: Option<PathBuf>,
}

fn qemu_driver() -> String {
    // Runtimes recorded before drivers were named were all QEMU's.
    "qemu".to_owned()
}

impl VmRuntime {
    /// How the VMM is known, for events and logs: `pid 1234`, `libvirt
    /// domain <uuid>`.
    pub fn vmm(&self) -> String {
        match &self.domain {
            Some(domain) => format!("{} domain {domain}", self.driver),
            None => format!("pid {}", self.pid),
        }
    }
}

/// A VM as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Id.
    pub id: VmId,
    /// Owning tenant.
    pub owner: String,
    /// Spec.
    pub spec: VmSpec,
    /// State.
    pub state: VmState,
    /// Why it is in that state.
    pub state_reason: String,
    /// The host it is placed on.
    pub host: String,
    /// Expected launch measurement (SNP: 48 bytes; empty when not computed).
    pub expected_measurement: Vec<u8>,
    /// Launch digest of the last start (empty before the first).
    pub launch_digest: Vec<u8>,
    /// Attestation state.
    pub attestation: Attestation,
    /// The running process, when there is one.
    pub runtime: Option<VmRuntime>,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Last state change.
    pub updated_at: OffsetDateTime,
}

/// An extra disk of a VM, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The VM.
    pub vm: VmId,
    /// Disk name.
    pub name: String,
    /// Its file, relative to the VMs' folder of the host it is on
    /// (`<vm id>/disk-<name>.qcow2`).
    pub path: PathBuf,
    /// Size in MiB.
    pub size_mib: u64,
}

/// An image as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Id (sha256 of its manifest).
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Folder holding its artifacts.
    pub dir: PathBuf,
    /// sha256 by role (`firmware`, `kernel`, `initrd`).
    pub sha256: Vec<(String, String)>,
    /// Kernel command line.
    pub cmdline: String,
    /// The firmware measures kernel, initrd and command line.
    pub measured_direct_boot: bool,
    /// Bytes stored.
    pub size_bytes: u64,
    /// Import time.
    pub imported_at: OffsetDateTime,
}

/// A host as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Unique name.
    pub name: String,
    /// `up`, `disabled` or `maintenance` (whether it is heard from is the
    /// coordinator's to know, not the store's).
    pub status: String,
    /// The probed capabilities, as JSON (see `daemon::probe`).
    pub capabilities_json: String,
    /// When last probed.
    pub probed_at: OffsetDateTime,
    /// Where the coordinator reaches its agent (`host:port`); empty for the
    /// coordinator's own host, reached in-process.
    pub address: String,
    /// The fingerprint of the certificate the pool's CA issued it.
    pub cert_fingerprint: String,
}

/// Something that happened to a VM, kept for `hsev vm show` and audits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Sequence number, increasing.
    pub seq: i64,
    /// The VM, if the event concerns one.
    pub vm: Option<VmId>,
    /// Short kind (`created`, `started`, `exited`, ...).
    pub kind: String,
    /// Details.
    pub detail: String,
    /// When.
    pub at: OffsetDateTime,
}
