//! The declarative VM spec that `hsev vm apply` reads, and how a VM that
//! exists differs from it.
//!
//! A spec is one TOML or JSON document naming every field `hsev vm create`
//! takes, under the flags' names and in their forms (`disks = ["data:1024"]`,
//! `forwards = ["8080:80"]`, `policy = "0x30000"`); unknown keys are refused
//! by name. [`SpecFile::desired`] checks it into a [`DesiredVm`], each error
//! naming its field; [`plan`] compares a desired VM with the VM hsevd shows
//! and sorts every difference into what changes in place (labels) and what
//! only a re-create changes (everything a launch or its measurement depends
//! on). This module never talks to hsevd and never changes anything.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use hsev_proto::v1::{ConfidentialMode, DiskSpec, KeyBroker, Placement, PortForward, Vm, VmSpec};
use serde::Deserialize;

use super::vm::{mode_name, parse_disk, parse_forward, parse_minimum_tcb, parse_policy, Mode};
use crate::model::check_labels;

/// The guest policy a confidential VM gets when its spec names none.
pub const DEFAULT_POLICY: u64 = 0x30000;

/// A spec as written: the keys of a TOML or JSON document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    /// The VM's name: 1-63 of `[a-z0-9-]`, starting with a letter.
    pub name: String,
    /// Id or name of an imported image.
    pub image: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory: u64,
    /// Memory protection: `none`, `sev`, `sev-es`, `sev-snp`.
    pub mode: Mode,
    /// SEV-SNP guest policy, hex text (`"0x30000"`) or a number.
    #[serde(default)]
    pub policy: Option<PolicyValue>,
    /// Extra empty data disks, `NAME:SIZE_MIB` each.
    #[serde(default)]
    pub disks: Vec<String>,
    /// Size in MiB of the LUKS2 data disk whose key only the key broker
    /// holds.
    #[serde(default)]
    pub encrypted_disk: Option<u64>,
    /// Host loopback ports forwarded into the guest, `HOSTPORT:GUESTPORT`
    /// each.
    #[serde(default)]
    pub forwards: Vec<String>,
    /// vCPU model the measurement uses; absent: the host's default.
    #[serde(default)]
    pub vcpu_type: Option<String>,
    /// Labels, the only field that changes without a re-create.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The tenant's own key broker, as the guest reaches it.
    #[serde(default)]
    pub key_broker: Option<KeyBrokerSpec>,
    /// The tenant's SNP ID key, which signs an ID block over the launch
    /// measurement computed from `image_manifest`.
    #[serde(default)]
    pub id_key: Option<PathBuf>,
    /// An author key that signs the ID key.
    #[serde(default)]
    pub author_key: Option<PathBuf>,
    /// The tenant's copy of the image's manifest, for the ID block.
    #[serde(default)]
    pub image_manifest: Option<PathBuf>,
    /// Where the pool may place the VM; read when the VM is created (a VM
    /// that exists stays where it is: `hsev vm migrate` moves it).
    #[serde(default)]
    pub placement: PlacementSpec,
}

/// `[placement]`: the flags of `hsev vm create` that choose its host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    /// Only this host (still checked by every filter).
    #[serde(default)]
    pub host: Option<String>,
    /// Labels the host must carry.
    #[serde(default)]
    pub host_labels: Vec<String>,
    /// Never on a host holding a VM of this group.
    #[serde(default)]
    pub anti_affinity: Option<String>,
    /// On the host of this group's VMs, when there are some.
    #[serde(default)]
    pub affinity: Option<String>,
    /// A host running this hypervisor driver (qemu, libvirt).
    #[serde(default)]
    pub driver: Option<String>,
    /// The lowest TCB the host may report, `snp=22,bl=10`.
    #[serde(default)]
    pub min_tcb: Option<String>,
}

/// A guest policy as a spec may write it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PolicyValue {
    /// A number (TOML's `0x30000` is one).
    Number(u64),
    /// Hex text, with or without `0x`.
    Text(String),
}

/// `[key_broker]`: the tenant's key broker.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBrokerSpec {
    /// Its base URL as the guest reaches it (`https://...`; `http://` for a
    /// development broker).
    pub url: String,
    /// SHA-256 of its TLS public key, `sha256:<64 hex digits>`.
    #[serde(default)]
    pub pin: Option<String>,
    /// The tenant's repository there.
    pub repository: String,
}

/// Why a spec cannot be applied. Nothing has been changed.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file cannot be read.
    #[error("cannot read the spec {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The document does not parse, or has a key or a type it should not.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line.
        message: String,
    },
    /// A field's value is wrong.
    #[error("{field}: {reason}")]
    Field {
        /// The field, as the spec names it.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

fn field_error(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

impl SpecFile {
    /// Reads a spec: JSON when the file name ends in `.json`, else TOML.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_owned(),
            source,
        })?;
        let is_json = path
            .extension()
            .is_some_and(|extension| extension.eq_ignore_ascii_case("json"));
        let mut spec = if is_json {
            Self::from_json(&text)
        } else {
            Self::from_toml(&text)
        }
        .map_err(|message| SpecError::Parse {
            path: path.to_owned(),
            message,
        })?;
        // The key files and the manifest are named relative to the spec.
        if let Some(folder) = path.parent() {
            for file in [
                spec.id_key.as_mut(),
                spec.author_key.as_mut(),
                spec.image_manifest.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if file.is_relative() {
                    *file = folder.join(&*file);
                }
            }
        }
        Ok(spec)
    }

    /// Parses a TOML spec; the error is one line, with its line number.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|error| {
            let line = error
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
                .map(|line| format!("line {line}: "))
                .unwrap_or_default();
            format!("{line}{}", error.message().trim_end())
        })
    }

    /// Parses a JSON spec; serde_json's message names the line.
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|error| error.to_string())
    }

    /// Checks every field and gives the VM it describes.
    pub fn desired(&self) -> Result<DesiredVm, SpecError> {
        if !valid_vm_name(&self.name) {
            return Err(field_error(
                "name",
                format!(
                    "{:?}: 1-63 of a-z, 0-9 and '-', starting with a letter",
                    self.name
                ),
            ));
        }
        if self.image.trim().is_empty() {
            return Err(field_error("image", "must name an imported image"));
        }
        if self.vcpus == 0 {
            return Err(field_error("vcpus", "must be at least 1"));
        }
        if self.memory < 64 {
            return Err(field_error("memory", "must be at least 64 (MiB)"));
        }
        let guest_policy = match (&self.policy, self.mode) {
            (None, _) => 0,
            (Some(_), Mode::None) => {
                return Err(field_error(
                    "policy",
                    "applies to SEV modes only, not to mode none",
                ))
            }
            (Some(PolicyValue::Number(policy)), _) => *policy,
            (Some(PolicyValue::Text(text)), _) => {
                parse_policy(text).map_err(|reason| field_error("policy", reason))?
            }
        };
        let disks = self
            .disks
            .iter()
            .enumerate()
            .map(|(index, text)| {
                parse_disk(text).map_err(|reason| field_error(format!("disks[{index}]"), reason))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let forwards = self
            .forwards
            .iter()
            .enumerate()
            .map(|(index, text)| {
                parse_forward(text)
                    .map_err(|reason| field_error(format!("forwards[{index}]"), reason))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let encrypted_disk_mib = match self.encrypted_disk {
            None => 0,
            Some(0) => return Err(field_error("encrypted_disk", "must be at least 1 (MiB)")),
            Some(_) if self.mode != Mode::SevSnp => {
                return Err(field_error(
                    "encrypted_disk",
                    "needs mode sev-snp (the key is released to an attested SNP guest)",
                ))
            }
            Some(size) => size,
        };
        if self.vcpu_type.as_deref().is_some_and(str::is_empty) {
            return Err(field_error(
                "vcpu_type",
                "must name a vCPU model (e.g. EPYC-v4), or be left out for the host's default",
            ));
        }
        check_labels(&self.labels).map_err(|reason| field_error("labels", reason))?;
        let key_broker = match &self.key_broker {
            Some(key_broker) => {
                key_broker.check()?;
                if self.mode != Mode::SevSnp {
                    return Err(field_error(
                        "key_broker",
                        "needs mode sev-snp (the guest attests to it)",
                    ));
                }
                Some(KeyBroker {
                    url: key_broker.url.clone(),
                    pin: key_broker.pin.clone().unwrap_or_default(),
                    repository: key_broker.repository.clone(),
                })
            }
            None if encrypted_disk_mib > 0 => {
                return Err(field_error(
                    "encrypted_disk",
                    "needs [key_broker]: your key broker (url, pin, repository), from which \
                     the guest fetches the key",
                ))
            }
            None => None,
        };
        let id_key =
            match (&self.id_key, &self.author_key, &self.image_manifest) {
                (None, None, None) => None,
                (None, Some(_), _) => return Err(field_error("author_key", "needs id_key")),
                (Some(_), _, None) => return Err(field_error(
                    "id_key",
                    "needs image_manifest, the image the ID block's measurement is computed from",
                )),
                (None, None, Some(_)) => {
                    return Err(field_error("image_manifest", "is only read with id_key"))
                }
                (Some(_), _, Some(_)) if self.mode != Mode::SevSnp => {
                    return Err(field_error("id_key", "an ID block is for mode sev-snp"))
                }
                (Some(id_key), author_key, Some(image_manifest)) => Some(IdKeySource {
                    id_key: id_key.clone(),
                    author_key: author_key.clone(),
                    image_manifest: image_manifest.clone(),
                }),
            };
        let minimum_tcb = self
            .placement
            .min_tcb
            .as_deref()
            .map(parse_minimum_tcb)
            .transpose()
            .map_err(|reason| field_error("placement.min_tcb", reason))?;
        let placement = Placement {
            host: self.placement.host.clone().unwrap_or_default(),
            labels: self.placement.host_labels.clone(),
            anti_affinity: self.placement.anti_affinity.clone().unwrap_or_default(),
            affinity: self.placement.affinity.clone().unwrap_or_default(),
            driver: self.placement.driver.clone().unwrap_or_default(),
            minimum_tcb,
        };
        Ok(DesiredVm {
            spec: VmSpec {
                name: self.name.clone(),
                image: self.image.clone(),
                vcpus: self.vcpus,
                memory_mib: self.memory,
                mode: ConfidentialMode::from(self.mode).into(),
                guest_policy,
                disks,
                port_forwards: forwards,
                vcpu_type: self.vcpu_type.clone().unwrap_or_default(),
                encrypted_disk_mib,
                key_resource: String::new(),
                key_broker,
                id_block: Vec::new(),
                id_auth: Vec::new(),
                labels: self.labels.clone().into_iter().collect(),
                placement: Some(placement),
                ha: hsev_proto::v1::HaPolicy::None.into(),
                ha_priority: 0,
            },
            id_key,
        })
    }
}

impl KeyBrokerSpec {
    /// Checks the table's form: an http(s) URL, a `sha256:` pin for https,
    /// a repository name.
    fn check(&self) -> Result<(), SpecError> {
        let https = self.url.starts_with("https://");
        if !https && !self.url.starts_with("http://") {
            return Err(field_error(
                "key_broker.url",
                format!("{:?} is not an http:// or https:// URL", self.url),
            ));
        }
        match &self.pin {
            Some(pin) => {
                let digits = pin.strip_prefix("sha256:").unwrap_or_default();
                if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(field_error(
                        "key_broker.pin",
                        "expected sha256:<64 hex digits>, the SHA-256 of the broker's TLS public key",
                    ));
                }
            }
            None if https => {
                return Err(field_error(
                    "key_broker.pin",
                    "an https:// broker needs the pin of its TLS public key",
                ))
            }
            None => {}
        }
        let repository_ok = !self.repository.is_empty()
            && self
                .repository
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !repository_ok {
            return Err(field_error(
                "key_broker.repository",
                "1 or more of A-Z, a-z, 0-9, '-' and '_'",
            ));
        }
        Ok(())
    }
}

/// The same rule as hsevd's, so that a bad name is refused before any call.
fn valid_vm_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|first| first.is_ascii_lowercase())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A checked spec: what `CreateVm` would be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredVm {
    /// The spec, with the image as the spec names it and 0 for a default
    /// guest policy.
    pub spec: VmSpec,
    /// The ID key that signs the VM's ID block once it is made (its
    /// measurement names the VM), before its first start.
    pub id_key: Option<IdKeySource>,
}

/// An ID block signed here, over the measurement computed from the
/// tenant's copy of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdKeySource {
    /// The ID key (`hsev idkey generate`).
    pub id_key: PathBuf,
    /// An author key that signs the ID key.
    pub author_key: Option<PathBuf>,
    /// The tenant's copy of the image's manifest.
    pub image_manifest: PathBuf,
}

impl DesiredVm {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether its guest gets a disk key after attesting, so that it is
    /// ready only once the key broker released it.
    pub fn has_attested_disk(&self) -> bool {
        self.spec.encrypted_disk_mib > 0
    }
}

/// How a difference can be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Changed on the VM as it is, whatever its state.
    InPlace,
    /// Only a new VM has it: the old one and its disks are deleted.
    Recreate,
}

/// One difference between a VM and its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The field, as the spec names it (`labels.KEY` for a label).
    pub field: String,
    /// What the VM has (`none` when absent).
    pub from: String,
    /// What the spec asks (`none` when absent).
    pub to: String,
    /// How it is applied.
    pub kind: ChangeKind,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {}", self.field, self.from, self.to)
    }
}

/// The changes, `, `-joined.
pub fn changes_text(changes: &[Change]) -> String {
    changes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn policy_text(policy: u64) -> String {
    format!("{policy:#x}")
}

fn disks_text(disks: &[DiskSpec]) -> String {
    let mut texts: Vec<String> = disks
        .iter()
        .map(|disk| format!("{}:{}", disk.name, disk.size_mib))
        .collect();
    texts.sort();
    if texts.is_empty() {
        "none".to_owned()
    } else {
        texts.join(",")
    }
}

fn forwards_text(forwards: &[PortForward]) -> String {
    let mut texts: Vec<String> = forwards
        .iter()
        .map(|forward| format!("{}:{}", forward.host_port, forward.guest_port))
        .collect();
    texts.sort();
    if texts.is_empty() {
        "none".to_owned()
    } else {
        texts.join(",")
    }
}

/// An image id as people read it: its first 12 hex digits.
fn short_id(id: &str) -> String {
    id.chars().take(12).collect()
}

/// What it takes to turn `existing` into `desired`, whose image resolves to
/// `image_id`: nothing, in-place changes, or a re-create. Lists, whose
/// order hsevd does not keep, compare as sets; a field the spec leaves out
/// (`vcpu_type`) matches whatever the VM has.
pub fn plan(desired: &DesiredVm, image_id: &str, existing: &Vm) -> Vec<Change> {
    let want = &desired.spec;
    let have = existing.spec.clone().unwrap_or_default();
    let mut changes = Vec::new();
    let mut recreate = |field: &str, from: String, to: String| {
        if from != to {
            changes.push(Change {
                field: field.to_owned(),
                from,
                to,
                kind: ChangeKind::Recreate,
            });
        }
    };
    if have.image != image_id {
        recreate(
            "image",
            short_id(&have.image),
            format!("{} ({})", short_id(image_id), want.image),
        );
    }
    recreate("vcpus", have.vcpus.to_string(), want.vcpus.to_string());
    recreate(
        "memory",
        have.memory_mib.to_string(),
        want.memory_mib.to_string(),
    );
    recreate("mode", mode_name(have.mode), mode_name(want.mode));
    if want.mode != i32::from(ConfidentialMode::None) && want.mode == have.mode {
        let wanted = if want.guest_policy == 0 {
            DEFAULT_POLICY
        } else {
            want.guest_policy
        };
        recreate(
            "policy",
            policy_text(have.guest_policy),
            policy_text(wanted),
        );
    }
    recreate("disks", disks_text(&have.disks), disks_text(&want.disks));
    recreate(
        "encrypted_disk",
        have.encrypted_disk_mib.to_string(),
        want.encrypted_disk_mib.to_string(),
    );
    recreate(
        "forwards",
        forwards_text(&have.port_forwards),
        forwards_text(&want.port_forwards),
    );
    if !want.vcpu_type.is_empty() {
        recreate("vcpu_type", have.vcpu_type.clone(), want.vcpu_type.clone());
    }
    let broker_text = |broker: Option<&KeyBroker>| {
        broker.map_or_else(
            || "none".to_owned(),
            |broker| format!("{} {} {}", broker.url, broker.pin, broker.repository),
        )
    };
    recreate(
        "key_broker",
        broker_text(have.key_broker.as_ref()),
        broker_text(want.key_broker.as_ref()),
    );
    let have_labels: BTreeMap<&String, &String> = have.labels.iter().collect();
    let want_labels: BTreeMap<&String, &String> = want.labels.iter().collect();
    let keys: std::collections::BTreeSet<&String> = have_labels
        .keys()
        .chain(want_labels.keys())
        .copied()
        .collect();
    for key in keys {
        let from = have_labels.get(key).map(|value| value.as_str());
        let to = want_labels.get(key).map(|value| value.as_str());
        if from != to {
            changes.push(Change {
                field: format!("labels.{key}"),
                from: from.unwrap_or("none").to_owned(),
                to: to.unwrap_or("none").to_owned(),
                kind: ChangeKind::InPlace,
            });
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
name = "vault"
image = "debian"
vcpus = 2
memory = 1024
mode = "sev-snp"
policy = "0x30000"
disks = ["data:64", "logs:16"]
encrypted_disk = 32
forwards = ["0:22"]
vcpu_type = "EPYC-v4"
key_broker = { url = "https://10.0.2.2:8443", pin = "sha256:0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f", repository = "alice" }
labels = { "opensvc.node" = "n1" }
"#;

    /// SPEC's key broker line.
    fn key_broker_line() -> &'static str {
        SPEC.lines()
            .find(|line| line.starts_with("key_broker"))
            .expect("a key_broker line")
    }

    fn desired(text: &str) -> DesiredVm {
        SpecFile::from_toml(text)
            .expect("parses")
            .desired()
            .expect("valid")
    }

    fn existing(spec: &VmSpec) -> Vm {
        let mut spec = spec.clone();
        spec.image = "ab".repeat(32);
        if spec.guest_policy == 0 {
            spec.guest_policy = DEFAULT_POLICY;
        }
        Vm {
            spec: Some(spec),
            ..Vm::default()
        }
    }

    #[test]
    fn toml_and_json_give_the_same_vm() {
        let json = r#"{"name": "vault", "image": "debian", "vcpus": 2, "memory": 1024,
            "mode": "sev-snp", "policy": "0x30000", "disks": ["data:64", "logs:16"],
            "encrypted_disk": 32, "forwards": ["0:22"], "vcpu_type": "EPYC-v4",
            "key_broker": {"url": "https://10.0.2.2:8443",
                           "pin": "sha256:0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f",
                           "repository": "alice"},
            "labels": {"opensvc.node": "n1"}}"#;
        let from_json = SpecFile::from_json(json)
            .expect("parses")
            .desired()
            .expect("valid");
        assert_eq!(from_json, desired(SPEC));
        let spec = &from_json.spec;
        assert_eq!(spec.memory_mib, 1024);
        assert_eq!(spec.guest_policy, 0x30000);
        assert_eq!(spec.disks.len(), 2);
        assert_eq!(spec.port_forwards[0].guest_port, 22);
        assert!(from_json.has_attested_disk());
        assert_eq!(
            SpecFile::from_toml(&SPEC.replace("\"0x30000\"", "0x30000"))
                .expect("a TOML number")
                .desired()
                .expect("valid")
                .spec
                .guest_policy,
            0x30000
        );
    }

    #[test]
    fn unknown_keys_are_refused_by_name_with_their_line() {
        let error =
            SpecFile::from_toml(&format!("{SPEC}colour = \"blue\"\n")).expect_err("refused");
        assert!(error.contains("unknown field `colour`"), "{error}");
        assert!(error.starts_with("line 14: "), "{error}");
        let error = SpecFile::from_toml(
            "name = \"a\"\nimage = \"i\"\nvcpus = 1\nmemory = 64\nmode = \"none\"\n\
             [key_broker]\nurl = \"http://k\"\nrepository = \"r\"\nport = 1\n",
        )
        .expect_err("refused");
        assert!(error.contains("unknown field `port`"), "{error}");
        let error = SpecFile::from_json(r#"{"name": "a", "cpus": 1}"#).expect_err("refused");
        assert!(error.contains("unknown field `cpus`"), "{error}");
        assert!(error.contains("line 1"), "{error}");
        let error = SpecFile::from_toml("name = \"a\"\nimage = \"i\"\nvcpus = 1\nmemory = 64\n")
            .expect_err("refused");
        assert!(error.contains("missing field `mode`"), "{error}");
        let error =
            SpecFile::from_toml(&SPEC.replace("\"sev-snp\"", "\"snp\"")).expect_err("refused");
        assert!(error.contains("sev-snp"), "the variants are named: {error}");
    }

    #[test]
    fn bad_values_name_their_field() {
        for (from, to, field) in [
            ("\"vault\"", "\"Vault\"", "name:"),
            ("vcpus = 2", "vcpus = 0", "vcpus:"),
            ("memory = 1024", "memory = 10", "memory:"),
            ("\"0x30000\"", "\"zz\"", "policy:"),
            ("\"logs:16\"", "\"logs\"", "disks[1]:"),
            ("\"0:22\"", "\"22\"", "forwards[0]:"),
            (
                "encrypted_disk = 32",
                "encrypted_disk = 0",
                "encrypted_disk:",
            ),
            ("\"EPYC-v4\"", "\"\"", "vcpu_type:"),
            ("\"opensvc.node\"", "\"Node\"", "labels:"),
        ] {
            assert!(SPEC.contains(from), "{from}");
            let error = SpecFile::from_toml(&SPEC.replace(from, to))
                .expect("parses")
                .desired()
                .expect_err("refused");
            assert!(error.to_string().starts_with(field), "{field}: {error}");
        }
        let plain = SPEC
            .replace("\"sev-snp\"", "\"none\"")
            .replace("encrypted_disk = 32\n", "");
        let error = SpecFile::from_toml(&plain)
            .expect("parses")
            .desired()
            .expect_err("a policy on an ordinary VM");
        assert!(error.to_string().starts_with("policy:"), "{error}");
        let error = SpecFile::from_toml(&SPEC.replace("\"sev-snp\"", "\"sev\""))
            .expect("parses")
            .desired()
            .expect_err("an encrypted disk without SNP");
        assert!(error.to_string().starts_with("encrypted_disk:"), "{error}");
    }

    #[test]
    fn a_tenant_key_broker_and_an_id_key_are_checked_and_carried() {
        let without_broker = SPEC.replace(key_broker_line(), "");
        let with = |table: &str| {
            SpecFile::from_toml(&format!("{without_broker}{table}"))
                .expect("parses")
                .desired()
        };
        let pin = format!("sha256:{}", "0f".repeat(32));
        let desired = with(&format!(
            "[key_broker]\nurl = \"https://kbs.example:8443\"\npin = \"{pin}\"\nrepository = \"alice\"\n"
        ))
        .expect("valid");
        assert_eq!(
            desired.spec.key_broker,
            Some(KeyBroker {
                url: "https://kbs.example:8443".into(),
                pin: pin.clone(),
                repository: "alice".into(),
            })
        );
        let error = |table: &str| with(table).expect_err("refused").to_string();
        let refused = error("");
        assert!(
            refused.starts_with("encrypted_disk: needs [key_broker]"),
            "{refused}"
        );
        let refused =
            error("[key_broker]\nurl = \"https://kbs.example\"\nrepository = \"alice\"\n");
        assert!(refused.starts_with("key_broker.pin:"), "{refused}");
        let refused = error(&format!(
            "[key_broker]\nurl = \"kbs.example\"\npin = \"{pin}\"\nrepository = \"alice\"\n"
        ));
        assert!(refused.starts_with("key_broker.url:"), "{refused}");
        let plain = SpecFile::from_toml(&format!(
            "name = \"a\"\nimage = \"i\"\nvcpus = 1\nmemory = 64\nmode = \"none\"\n\
             [key_broker]\nurl = \"https://k:1\"\npin = \"{pin}\"\nrepository = \"r\"\n"
        ))
        .expect("parses")
        .desired()
        .expect_err("refused")
        .to_string();
        assert!(
            plain.starts_with("key_broker: needs mode sev-snp"),
            "{plain}"
        );

        let id_key = |keys: &str| {
            SpecFile::from_toml(&SPEC.replace("vcpu_type", &format!("{keys}\nvcpu_type")))
                .expect("parses")
                .desired()
        };
        let refused = |keys: &str| id_key(keys).expect_err("refused").to_string();
        assert!(refused("id_key = \"id.pem\"").starts_with("id_key: needs image_manifest"));
        assert!(refused("author_key = \"a.pem\"").starts_with("author_key: needs id_key"));
        let signed = id_key(
            "id_key = \"id.pem\"\nauthor_key = \"author.pem\"\nimage_manifest = \"manifest.json\"",
        )
        .expect("valid");
        assert_eq!(
            signed.id_key,
            Some(IdKeySource {
                id_key: "id.pem".into(),
                author_key: Some("author.pem".into()),
                image_manifest: "manifest.json".into(),
            })
        );
    }

    #[test]
    fn the_same_vm_needs_nothing_whatever_the_order_of_its_lists() {
        let want = desired(SPEC);
        let mut have = existing(&want.spec);
        if let Some(spec) = have.spec.as_mut() {
            spec.disks.reverse();
        }
        assert_eq!(plan(&want, &"ab".repeat(32), &have), Vec::new());
        // A spec that leaves out the policy and the vCPU type takes the
        // defaults the host filled in.
        let defaults = desired(
            &SPEC
                .replace("policy = \"0x30000\"\n", "")
                .replace("vcpu_type = \"EPYC-v4\"\n", ""),
        );
        assert_eq!(plan(&defaults, &"ab".repeat(32), &have), Vec::new());
    }

    #[test]
    fn labels_change_in_place_and_the_rest_needs_a_re_create() {
        let want = desired(SPEC);
        let have = existing(&want.spec);
        let relabelled = desired(&SPEC.replace("\"n1\"", "\"n2\", team = \"db\""));
        let changes = plan(&relabelled, &"ab".repeat(32), &have);
        assert_eq!(
            changes_text(&changes),
            "labels.opensvc.node n1 -> n2, labels.team none -> db"
        );
        assert!(changes
            .iter()
            .all(|change| change.kind == ChangeKind::InPlace));

        let bigger = desired(
            &SPEC
                .replace("vcpus = 2", "vcpus = 4")
                .replace("\"logs:16\"", "\"logs:32\""),
        );
        let changes = plan(&bigger, &"cd".repeat(32), &have);
        assert_eq!(
            changes_text(&changes),
            format!(
                "image {} -> {} (debian), vcpus 2 -> 4, disks data:64,logs:16 -> data:64,logs:32",
                "ab".repeat(6),
                "cd".repeat(6)
            )
        );
        assert!(changes
            .iter()
            .all(|change| change.kind == ChangeKind::Recreate));
    }
}
