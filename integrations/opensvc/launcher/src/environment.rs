//! What the launcher is told. An OpenSVC agent calls it with one argument
//! (the action), stdin on /dev/null, and an environment made of its own,
//! `OPENSVC_NAME` / `OPENSVC_NAMESPACE` / `OPENSVC_KIND` / `OPENSVC_RID`,
//! and the resource's `environment` keyword: everything else comes from
//! there.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `HSEV_SPEC` | the VM's spec file (TOML, or JSON for `.json`), as `hsev vm apply` reads it | the `HSEV_*` fields below |
//! | `HSEV_IMAGE`, `HSEV_VCPUS`, `HSEV_MEMORY`, `HSEV_MODE` | the spec's required fields, without `HSEV_SPEC` | |
//! | `HSEV_POLICY`, `HSEV_DISKS`, `HSEV_ENCRYPTED_DISK`, `HSEV_FORWARDS`, `HSEV_VCPU_TYPE`, `HSEV_LABELS` | its optional ones (lists: space- or comma-separated; labels `k=v`) | |
//! | `HSEV_KEY_BROKER`, `HSEV_KEY_BROKER_PIN`, `HSEV_KEY_BROKER_REPOSITORY`, `HSEV_ID_KEY`, `HSEV_AUTHOR_KEY`, `HSEV_IMAGE_MANIFEST` | the tenant's key broker and ID block | |
//! | `HSEV_VM` | the VM's name | the spec's, else the service's (`NAMESPACE-NAME`) |
//! | `HSEV_NODE` | this OpenSVC node | the host name, lower-case |
//! | `HSEV_HOST` | the hypervisor host the VM must run on; `local`: this node | any |
//! | `HSEV_START_TIMEOUT` | seconds `start` waits for a running VM and its disk key | 300 |
//! | `HSEV_STOP_TIMEOUT` | seconds of ACPI shutdown before the VM is killed | 30 |
//! | `HSEV_CALL_TIMEOUT` | seconds `status`, `info` and `provisioned` wait for hsevd | 20 |
//! | `HSEV_WIPE` | `unprovision` overwrites the disks (`yes`/`no`) | no |
//!
//! and hsev's own `HSEV_ENDPOINT`, `HSEV_TOKEN_FILE` (or `HSEV_TOKEN`),
//! `HSEV_CA`, `HSEV_CONFIG`. Nothing here reads a token: the client's
//! settings do, and keep it to themselves.

use std::path::PathBuf;
use std::time::Duration;

use hsev_xapi::cli::vm_spec::{DesiredVm, SpecError, SpecFile};
use serde::Deserialize;

/// Reads a variable; an empty value is no value.
pub type Environment<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The spec's fields as variables: (variable, key in the spec, kind).
const FIELDS: &[(&str, &str, Kind)] = &[
    ("HSEV_IMAGE", "image", Kind::Text),
    ("HSEV_VCPUS", "vcpus", Kind::Integer),
    ("HSEV_MEMORY", "memory", Kind::Integer),
    ("HSEV_MODE", "mode", Kind::Text),
    ("HSEV_POLICY", "policy", Kind::Text),
    ("HSEV_DISKS", "disks", Kind::List),
    ("HSEV_ENCRYPTED_DISK", "encrypted_disk", Kind::Integer),
    ("HSEV_FORWARDS", "forwards", Kind::List),
    ("HSEV_VCPU_TYPE", "vcpu_type", Kind::Text),
    ("HSEV_LABELS", "labels", Kind::Labels),
    ("HSEV_KEY_BROKER", "key_broker.url", Kind::Text),
    ("HSEV_KEY_BROKER_PIN", "key_broker.pin", Kind::Text),
    (
        "HSEV_KEY_BROKER_REPOSITORY",
        "key_broker.repository",
        Kind::Text,
    ),
    ("HSEV_ID_KEY", "id_key", Kind::Text),
    ("HSEV_AUTHOR_KEY", "author_key", Kind::Text),
    ("HSEV_IMAGE_MANIFEST", "image_manifest", Kind::Text),
];

/// The fields a spec cannot go without.
const REQUIRED: &[&str] = &["HSEV_IMAGE", "HSEV_VCPUS", "HSEV_MEMORY", "HSEV_MODE"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Integer,
    List,
    Labels,
}

/// Why the environment does not say what to do.
#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    /// A variable is missing, malformed, or contradicts another.
    #[error("{0}")]
    Invalid(String),
    /// The spec (the file, or the fields) is wrong.
    #[error("{origin}: {source}")]
    Spec {
        /// `HSEV_SPEC=<path>`, or the variable of the wrong field.
        origin: String,
        /// What is wrong.
        source: SpecError,
    },
}

fn invalid(message: impl Into<String>) -> EnvironmentError {
    EnvironmentError::Invalid(message.into())
}

/// Where the VM's spec comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecSource {
    /// `HSEV_SPEC`.
    File(PathBuf),
    /// The `HSEV_*` fields.
    Fields,
}

/// The hypervisor host a VM is pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPin(pub String);

/// Everything the environment says.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The VM's name.
    pub vm: String,
    /// Where its spec comes from.
    pub spec_source: SpecSource,
    /// This OpenSVC node.
    pub node: String,
    /// The OpenSVC service, `NAMESPACE/KIND/NAME`, when run by an agent.
    pub service: Option<String>,
    /// Where the VM must run.
    pub host: Option<HostPin>,
    /// How long `start` waits.
    pub start_timeout: Duration,
    /// ACPI shutdown seconds before a kill.
    pub stop_timeout: u32,
    /// How long a quick call waits for hsevd.
    pub call_timeout: Duration,
    /// Overwrite disks on unprovision.
    pub wipe: bool,
    /// The spec file's text parsed, or the fields: read once.
    spec: Option<Result<SpecFile, String>>,
}

fn seconds(
    environment: Environment<'_>,
    name: &str,
    default: u64,
) -> Result<u64, EnvironmentError> {
    match environment(name) {
        None => Ok(default),
        Some(text) => match text.trim().parse::<u64>() {
            Ok(value) if value > 0 => Ok(value),
            _ => Err(invalid(format!(
                "{name}: {text:?} is not a number of seconds (at least 1)"
            ))),
        },
    }
}

fn yes_no(environment: Environment<'_>, name: &str) -> Result<bool, EnvironmentError> {
    match environment(name).map(|text| text.trim().to_lowercase()) {
        None => Ok(false),
        Some(text) if matches!(text.as_str(), "yes" | "true" | "1" | "on") => Ok(true),
        Some(text) if matches!(text.as_str(), "no" | "false" | "0" | "off") => Ok(false),
        Some(text) => Err(invalid(format!("{name}: {text:?} is neither yes nor no"))),
    }
}

/// This machine's host name, lower-case, as OpenSVC names its node.
pub fn local_host_name() -> Result<String, EnvironmentError> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_lowercase())
        .ok()
        .filter(|name| !name.is_empty())
        .ok_or_else(|| invalid("cannot read this machine's host name: set HSEV_NODE"))
}

/// A VM name made from an OpenSVC service's: lower-case, other characters
/// than `[a-z0-9-]` become `-`, a leading letter guaranteed, 63 at most.
pub fn vm_name_for(namespace: Option<&str>, name: &str) -> String {
    let full = match namespace {
        Some(namespace) if namespace != "root" => format!("{namespace}-{name}"),
        _ => name.to_owned(),
    };
    let mut cleaned: String = full
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !cleaned.starts_with(|c: char| c.is_ascii_lowercase()) {
        cleaned.insert_str(0, "vm-");
    }
    cleaned.truncate(63);
    cleaned.trim_end_matches('-').to_owned()
}

impl Launch {
    /// Reads the process environment.
    pub fn from_process() -> Result<Self, EnvironmentError> {
        Self::from_environment(&|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
    }

    /// Reads `environment`.
    pub fn from_environment(environment: Environment<'_>) -> Result<Self, EnvironmentError> {
        let fields: Vec<&str> = FIELDS
            .iter()
            .map(|(variable, _, _)| *variable)
            .filter(|variable| environment(variable).is_some())
            .collect();
        let (spec_source, spec) = match environment("HSEV_SPEC") {
            Some(path) if !fields.is_empty() => {
                return Err(invalid(format!(
                    "HSEV_SPEC={path} and {} are both set: give the spec file or its fields",
                    fields.join(", ")
                )))
            }
            Some(path) => {
                let path = PathBuf::from(path);
                let spec = SpecFile::load(&path).map_err(|error| error.to_string());
                (SpecSource::File(path), Some(spec))
            }
            None if fields.is_empty() => (SpecSource::Fields, None),
            None => (SpecSource::Fields, Some(spec_from_fields(environment)?)),
        };
        let node = match environment("HSEV_NODE") {
            Some(node) => node.trim().to_lowercase(),
            None => local_host_name()?,
        };
        let opensvc_name = environment("OPENSVC_NAME");
        let namespace = environment("OPENSVC_NAMESPACE");
        let service = opensvc_name.as_ref().map(|name| {
            format!(
                "{}/{}/{name}",
                namespace.as_deref().unwrap_or("root"),
                environment("OPENSVC_KIND").unwrap_or_else(|| "svc".to_owned())
            )
        });
        // Only a file names the VM; the fields' spec is named here.
        let spec_name = match (&spec_source, &spec) {
            (SpecSource::File(_), Some(Ok(spec))) => Some(spec.name.clone()),
            _ => None,
        };
        let vm = match (environment("HSEV_VM"), spec_name, &opensvc_name) {
            (Some(vm), Some(name), _) if vm != name => {
                return Err(invalid(format!(
                    "HSEV_VM={vm} but the spec names the VM {name}: set one, or the same"
                )))
            }
            (Some(vm), _, _) | (None, Some(vm), _) => vm,
            (None, None, Some(name)) if matches!(spec, None | Some(Ok(_))) => {
                vm_name_for(namespace.as_deref(), name)
            }
            (None, None, _) => match &spec {
                // The VM is named in a spec that cannot be read: say why.
                Some(Err(error)) => return Err(invalid(error.clone())),
                _ => {
                    return Err(invalid(
                        "no VM named: set HSEV_VM or HSEV_SPEC (or run from an OpenSVC agent, \
                         which sets OPENSVC_NAME)",
                    ))
                }
            },
        };
        let host = match environment("HSEV_HOST").map(|host| host.trim().to_lowercase()) {
            None => None,
            Some(host) if host == "local" => Some(HostPin(local_host_name()?)),
            Some(host) => Some(HostPin(host)),
        };
        Ok(Launch {
            spec_source,
            node,
            service,
            host,
            start_timeout: Duration::from_secs(seconds(environment, "HSEV_START_TIMEOUT", 300)?),
            stop_timeout: u32::try_from(seconds(environment, "HSEV_STOP_TIMEOUT", 30)?)
                .unwrap_or(u32::MAX),
            call_timeout: Duration::from_secs(seconds(environment, "HSEV_CALL_TIMEOUT", 20)?),
            wipe: yes_no(environment, "HSEV_WIPE")?,
            spec: spec.map(|spec| {
                spec.map(|mut spec| {
                    // A spec made of fields is named here; a file's name
                    // is the VM's already.
                    spec.name.clone_from(&vm);
                    spec
                })
            }),
            vm,
        })
    }

    /// The VM's spec, checked, for the actions that create or start it.
    pub fn desired(&self) -> Result<DesiredVm, EnvironmentError> {
        let spec = match &self.spec {
            Some(Ok(spec)) => spec,
            Some(Err(message)) => return Err(invalid(message.clone())),
            None => {
                return Err(invalid(format!(
                    "no spec for VM {}: set HSEV_SPEC, or {} (and the optional HSEV_* fields)",
                    self.vm,
                    REQUIRED.join(", ")
                )))
            }
        };
        spec.desired().map_err(|source| {
            let origin = match (&self.spec_source, &source) {
                (SpecSource::File(path), _) => format!("HSEV_SPEC={}", path.display()),
                (SpecSource::Fields, SpecError::Field { field, .. }) if field == "name" => {
                    "the VM's name (HSEV_VM, or OPENSVC_NAMESPACE and OPENSVC_NAME)".to_owned()
                }
                (SpecSource::Fields, SpecError::Field { field, .. }) => variable_for(field)
                    .unwrap_or("the HSEV_* fields")
                    .to_owned(),
                (SpecSource::Fields, _) => "the HSEV_* fields".to_owned(),
            };
            EnvironmentError::Spec { origin, source }
        })
    }
}

/// The variable that sets a spec field (`disks[2]`, `key_broker.pin`).
pub fn variable_for(field: &str) -> Option<&'static str> {
    let root = field.split('[').next().unwrap_or(field);
    FIELDS
        .iter()
        .find(|(_, key, _)| *key == root || key.split('.').next() == Some(root))
        .map(|(variable, _, _)| *variable)
}

/// A spec from the `HSEV_*` fields; the VM's name is filled in later.
fn spec_from_fields(
    environment: Environment<'_>,
) -> Result<Result<SpecFile, String>, EnvironmentError> {
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|variable| environment(variable).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(invalid(format!(
            "{} not set: without HSEV_SPEC, the VM's spec is {} (and the optional HSEV_* fields)",
            missing.join(", "),
            REQUIRED.join(", ")
        )));
    }
    let mut table = toml::Table::new();
    table.insert("name".into(), toml::Value::String("unnamed".into()));
    for (variable, key, kind) in FIELDS {
        let Some(text) = environment(variable) else {
            continue;
        };
        let value = match kind {
            Kind::Text => toml::Value::String(text.trim().to_owned()),
            Kind::Integer => toml::Value::Integer(
                text.trim()
                    .parse::<i64>()
                    .map_err(|_| invalid(format!("{variable}: {text:?} is not a whole number")))?,
            ),
            Kind::List => toml::Value::Array(
                text.split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|item| !item.is_empty())
                    .map(|item| toml::Value::String(item.to_owned()))
                    .collect(),
            ),
            Kind::Labels => {
                let mut labels = toml::Table::new();
                for pair in text
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|pair| !pair.is_empty())
                {
                    let (label, value) = pair
                        .split_once('=')
                        .ok_or_else(|| invalid(format!("{variable}: {pair:?} is not KEY=VALUE")))?;
                    labels.insert(label.to_owned(), toml::Value::String(value.to_owned()));
                }
                toml::Value::Table(labels)
            }
        };
        match key.split_once('.') {
            Some((table_key, inner)) => {
                let entry = table
                    .entry(table_key.to_owned())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(inner_table) = entry {
                    inner_table.insert(inner.to_owned(), value);
                }
            }
            None => {
                table.insert((*key).to_owned(), value);
            }
        }
    }
    Ok(SpecFile::deserialize(toml::Value::Table(table))
        .map_err(|error| format!("the HSEV_* fields: {}", error.message().trim_end())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(pairs: &[(&str, &str)]) -> Result<Launch, EnvironmentError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        Launch::from_environment(&move |name| map.get(name).cloned())
    }

    const FIELDS_OK: &[(&str, &str)] = &[
        ("HSEV_NODE", "N1"),
        ("OPENSVC_NAME", "Web.1"),
        ("OPENSVC_NAMESPACE", "prod"),
        ("HSEV_IMAGE", "debian"),
        ("HSEV_VCPUS", "2"),
        ("HSEV_MEMORY", "512"),
        ("HSEV_MODE", "sev-snp"),
        ("HSEV_DISKS", "data:64, logs:8"),
        ("HSEV_LABELS", "team=web tier=1"),
        ("HSEV_ENCRYPTED_DISK", "32"),
        ("HSEV_KEY_BROKER", "https://10.0.2.2:8443"),
        (
            "HSEV_KEY_BROKER_PIN",
            "sha256:0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f",
        ),
        ("HSEV_KEY_BROKER_REPOSITORY", "alice"),
    ];

    #[test]
    fn fields_make_a_spec_named_after_the_service() {
        let launch = launch(FIELDS_OK).expect("valid");
        assert_eq!(launch.vm, "prod-web-1");
        assert_eq!(launch.node, "n1");
        assert_eq!(launch.service.as_deref(), Some("prod/svc/Web.1"));
        assert_eq!(launch.spec_source, SpecSource::Fields);
        assert_eq!(launch.start_timeout, Duration::from_secs(300));
        let desired = launch.desired().expect("a valid spec");
        assert_eq!(desired.name(), "prod-web-1");
        assert_eq!(desired.spec.vcpus, 2);
        assert_eq!(desired.spec.disks.len(), 2);
        assert_eq!(desired.spec.labels["tier"], "1");
        assert!(desired.has_attested_disk());
        assert_eq!(
            desired.spec.key_broker.map(|broker| broker.repository),
            Some("alice".to_owned()),
            "the tenant's broker, from HSEV_KEY_BROKER*"
        );
    }

    #[test]
    fn names_follow_the_vm_rules() {
        assert_eq!(vm_name_for(None, "vault"), "vault");
        assert_eq!(vm_name_for(Some("root"), "vault"), "vault");
        assert_eq!(vm_name_for(Some("prod"), "1st_db"), "prod-1st-db");
        assert_eq!(vm_name_for(None, "9lives"), "vm-9lives");
        assert_eq!(vm_name_for(None, &"x".repeat(80)).len(), 63);
    }

    #[test]
    fn contradictions_and_gaps_are_named() {
        let error = |pairs: &[(&str, &str)]| launch(pairs).expect_err("refused").to_string();
        let mut both = FIELDS_OK.to_vec();
        both.push(("HSEV_SPEC", "/etc/hsev/vault.toml"));
        let message = error(&both);
        assert!(
            message.contains("HSEV_SPEC=/etc/hsev/vault.toml and HSEV_IMAGE"),
            "{message}"
        );
        let missing: Vec<_> = FIELDS_OK
            .iter()
            .copied()
            .filter(|(name, _)| *name != "HSEV_MEMORY")
            .collect();
        assert!(error(&missing).starts_with("HSEV_MEMORY not set"));
        let mut bad = FIELDS_OK.to_vec();
        bad.push(("HSEV_START_TIMEOUT", "soon"));
        assert!(error(&bad).starts_with("HSEV_START_TIMEOUT:"));
        let mut bad = FIELDS_OK.to_vec();
        bad.retain(|(name, _)| *name != "HSEV_VCPUS");
        bad.push(("HSEV_VCPUS", "two"));
        assert!(error(&bad).starts_with("HSEV_VCPUS: \"two\" is not a whole number"));
        assert!(error(&[("HSEV_NODE", "n1")]).starts_with("no VM named"));

        let mut disks = FIELDS_OK.to_vec();
        disks.retain(|(name, _)| *name != "HSEV_DISKS");
        disks.push(("HSEV_DISKS", "data"));
        let message = launch(&disks)
            .expect("read")
            .desired()
            .expect_err("bad")
            .to_string();
        assert!(message.starts_with("HSEV_DISKS: disks[0]:"), "{message}");
    }

    #[test]
    fn a_spec_file_names_the_vm_and_hsev_vm_must_agree() {
        let folder = tempfile::tempdir().expect("tempdir");
        let spec = folder.path().join("vault.toml");
        std::fs::write(
            &spec,
            "name = \"vault\"\nimage = \"debian\"\nvcpus = 1\nmemory = 512\nmode = \"sev-snp\"\n",
        )
        .expect("written");
        let path = spec.to_str().expect("utf-8");
        let read = launch(&[
            ("HSEV_NODE", "n1"),
            ("HSEV_SPEC", path),
            ("OPENSVC_NAME", "svc"),
        ])
        .expect("valid");
        assert_eq!(read.vm, "vault");
        assert_eq!(read.desired().expect("valid").name(), "vault");
        let error = launch(&[
            ("HSEV_NODE", "n1"),
            ("HSEV_SPEC", path),
            ("HSEV_VM", "other"),
        ])
        .expect_err("refused");
        assert!(error
            .to_string()
            .contains("HSEV_VM=other but the spec names the VM vault"));
        // A spec that cannot be read still lets HSEV_VM name the VM (to
        // stop it), and says why at start.
        let broken = launch(&[
            ("HSEV_NODE", "n1"),
            ("HSEV_SPEC", "/nonexistent/vault.toml"),
            ("HSEV_VM", "vault"),
        ])
        .expect("named");
        assert!(broken
            .desired()
            .expect_err("no spec")
            .to_string()
            .contains("cannot read the spec /nonexistent/vault.toml"));
    }
}
