//! `hsevd`'s configuration: a TOML file (unknown keys refused, every error
//! naming its key) overridable by flags.
//!
//! ```toml
//! state_dir = "/var/lib/hsevd"
//! socket = "/run/hsevd/hsevd.sock"      # default: <state_dir>/hsevd.sock
//! listen = "127.0.0.1:7443"             # TCP with TLS; omit for the socket only
//! metrics_listen = "127.0.0.1:9464"     # Prometheus text format; omit to disable
//! host_name = "node-1"                  # default: the machine's hostname
//! driver = "qemu"                       # qemu | libvirt | fake (tests: no guest)
//! accelerator = "auto"                  # auto | kvm | tcg
//! allow_debug_policy = false            # refuse guest policies with DEBUG set
//! default_vcpu_type = "EPYC-v4"
//! log_format = "text"                   # text | json
//!
//! [tls]                                 # default: a self-signed pair in <state_dir>/tls
//! cert = "/etc/hsevd/cert.pem"
//! key = "/etc/hsevd/key.pem"
//!
//! [libvirt]                             # driver = "libvirt" only
//! uri = "qemu:///system"                # a local QEMU URI, `?socket=PATH` allowed
//! domain_prefix = "hsev-"               # domains are <prefix><vm id>
//!
//! [firmware]
//! simulated_dir = "/var/lib/hsevd/sim"  # use the simulated Secure Processor (no /dev/sev)
//!
//! labels = ["zone=a"]                   # (top level) what placement matches on this host
//!
//! [placement]                           # the coordinator's
//! cpu_overcommit = 4.0                  # vCPUs per host CPU
//! memory_overcommit = 1.0               # confidential guests' memory is pinned
//! weigher = "spread"                    # spread | pack
//! allow_simulated = false               # place on simulated Secure Processors (dev pools)
//! [placement.minimum_tcb]               # the pool's floor, per component
//! snp = 8
//!
//! [pool]                                # a pool of several hosts
//! listen = "10.0.0.10:7444"             # mTLS with the pool's CA only
//! storage = "local"                     # local | shared (the coordinator's)
//! shared_dir = "/srv/hsev"              # every host: where a shared pool's disks are
//! heartbeat_ms = 1000
//! down_after_ms = 5000                  # not heard from this long: down (a host's lease)
//! fence_after_ms = 5000                 # a host unanswered this long stops its HA VMs (default: down_after_ms)
//! fence_margin_ms = 2000                # HA restart waits down_after + this
//!
//! [store]                               # the coordinator's pool state
//! kind = "sqlite"                       # sqlite (<state_dir>/hsevd.db) | etcd
//! endpoints = ["https://10.0.0.1:2379"] # etcd: its members' client URLs
//! prefix = "/hsev/"                     # etcd: the key prefix of this pool
//! ca = "/etc/hsev/etcd-ca.pem"          # etcd: TLS (then https:// endpoints)
//! cert = "/etc/hsev/etcd-client.pem"    # etcd: a client certificate, with key
//! key = "/etc/hsev/etcd-client.key"
//! lease_ttl_s = 10                      # etcd: the leader's and hosts' lease TTL
//! timeout_ms = 3000                     # etcd: one request, before Unavailable
//!
//! [[tokens]]
//! name = "ops"
//! role = "admin"
//! sha256 = "<hex sha256 of the bearer token>"
//!
//! [[tokens]]
//! name = "alice"
//! role = "tenant"                       # sees and touches only VMs it owns
//! sha256 = "<hex>"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hsev_attestation::HexBytes;
use serde::Deserialize;

use crate::hypervisor::libvirt::LibvirtConfig;
use crate::hypervisor::select::DriverKind;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Syntax, unknown key or wrong type; the message names the key.
    #[error("{path}: {source}")]
    Toml {
        /// The file.
        path: String,
        /// What is wrong.
        source: toml::de::Error,
    },
    /// A value out of range.
    #[error("config key {key}: {problem}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// Who a token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every VM, images, hosts.
    Admin,
    /// Its own VMs only.
    Tenant,
}

/// A bearer token, stored as its SHA-256 only.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The caller's name; a tenant's VMs are owned by this name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// SHA-256 of the token, hex.
    pub sha256: HexBytes<32>,
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AcceleratorChoice {
    /// KVM where a guest can really run, else TCG.
    #[default]
    Auto,
    /// KVM, or fail.
    Kvm,
    /// TCG.
    Tcg,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// TLS for the TCP listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
}

/// This hsevd's part in a pool of several hosts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// The pool listener (mTLS with the pool's CA only), where the
    /// coordinator and the hosts reach each other; without it, a pool of
    /// this one host.
    pub listen: Option<SocketAddr>,
    /// Where VMs' disks live (the coordinator's setting): `local` or
    /// `shared`.
    pub storage: crate::coordinator::StorageKind,
    /// The folder a `shared` pool keeps VMs' disks in, mounted at this
    /// same path on every host (NFS, CephFS).
    pub shared_dir: Option<PathBuf>,
    /// How often a host tells the coordinator it is alive, milliseconds.
    pub heartbeat_ms: u64,
    /// A host not heard from for this long is down, milliseconds: the TTL
    /// of its liveness lease.
    pub down_after_ms: u64,
    /// A host whose heartbeats the coordinator has not answered for this
    /// long hard-stops its HA VMs, milliseconds; at most `down_after_ms`,
    /// which it is when not set.
    pub fence_after_ms: Option<u64>,
    /// How much longer than `down_after_ms` the coordinator waits before it
    /// restarts a silent host's HA VMs elsewhere, milliseconds (see
    /// `coordinator::ha` for why it is safe).
    pub fence_margin_ms: u64,
}

impl PoolConfig {
    /// How long a host whose heartbeats go unanswered waits before it
    /// hard-stops its HA VMs, milliseconds: `fence_after_ms`, else
    /// `down_after_ms`.
    pub fn effective_fence_after_ms(&self) -> u64 {
        self.fence_after_ms.unwrap_or(self.down_after_ms)
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            listen: None,
            storage: crate::coordinator::StorageKind::Local,
            shared_dir: None,
            heartbeat_ms: 1000,
            down_after_ms: 5000,
            fence_after_ms: None,
            fence_margin_ms: 2000,
        }
    }
}

/// The SEV firmware to use.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FirmwareConfig {
    /// Use the simulated Secure Processor kept in this folder (created if
    /// missing); without it, `/dev/sev` when present, else no SEV at all.
    pub simulated_dir: Option<PathBuf>,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the store, VM run folders, disks and images live.
    pub state_dir: PathBuf,
    /// The Unix socket; default `<state_dir>/hsevd.sock`.
    pub socket: Option<PathBuf>,
    /// TCP address for gRPC over TLS.
    pub listen: Option<SocketAddr>,
    /// TCP address for Prometheus metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// This host's name in the pool.
    pub host_name: Option<String>,
    /// The hypervisor driver.
    #[serde(default)]
    pub driver: DriverKind,
    /// The libvirt driver's settings.
    #[serde(default)]
    pub libvirt: LibvirtConfig,
    /// Accelerator choice.
    #[serde(default)]
    pub accelerator: AcceleratorChoice,
    /// Accept guest policies that allow debugging.
    #[serde(default)]
    pub allow_debug_policy: bool,
    /// vCPU model used when a spec names none.
    #[serde(default = "default_vcpu_type")]
    pub default_vcpu_type: String,
    /// Log format.
    #[serde(default)]
    pub log_format: LogFormat,
    /// TLS pair; default a self-signed one in `<state_dir>/tls`.
    pub tls: Option<TlsConfig>,
    /// Firmware.
    #[serde(default)]
    pub firmware: FirmwareConfig,
    /// This host's labels, which placement matches (`zone=a`, `gpu`).
    #[serde(default)]
    pub labels: Vec<String>,
    /// The pool's placement settings (the coordinator's).
    #[serde(default)]
    pub placement: crate::placement::PoolPolicy,
    /// This hsevd's part in a pool of several hosts.
    #[serde(default)]
    pub pool: PoolConfig,
    /// Where the coordinator keeps the pool state.
    #[serde(default)]
    pub store: crate::store::StoreConfig,
    /// Bearer tokens.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

fn default_vcpu_type() -> String {
    "EPYC-v4".to_owned()
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: display.clone(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Toml {
            path: display,
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            key: key.to_owned(),
            problem,
        };
        if !self.state_dir.is_absolute() {
            return Err(invalid(
                "state_dir",
                format!("{} is not an absolute path", self.state_dir.display()),
            ));
        }
        if hsev_attestation::measurement::vcpu_sig_for_type(&self.default_vcpu_type).is_none() {
            return Err(invalid(
                "default_vcpu_type",
                format!("unknown vCPU type {:?}", self.default_vcpu_type),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (index, token) in self.tokens.iter().enumerate() {
            if token.name.is_empty()
                || !token
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(
                    &format!("tokens[{index}].name"),
                    format!("{:?} must be letters, digits, '-' or '_'", token.name),
                ));
            }
            if !names.insert(&token.name) {
                return Err(invalid(
                    &format!("tokens[{index}].name"),
                    format!("{:?} appears twice", token.name),
                ));
            }
        }
        if let Some(name) = &self.host_name {
            if name.is_empty() {
                return Err(invalid("host_name", "must not be empty".into()));
            }
        }
        if let Some(dir) = &self.pool.shared_dir {
            if !dir.is_absolute() {
                return Err(invalid(
                    "pool.shared_dir",
                    format!("{} is not an absolute path", dir.display()),
                ));
            }
        }
        if self.pool.storage == crate::coordinator::StorageKind::Shared
            && self.pool.shared_dir.is_none()
        {
            return Err(invalid(
                "pool.storage",
                "\"shared\" needs pool.shared_dir, the folder every host mounts at the same path"
                    .into(),
            ));
        }
        if let Err(crate::store::StoreError::Invalid { field, reason }) = self.store.validate() {
            return Err(invalid(field, reason));
        }
        if self.pool.heartbeat_ms == 0 || self.pool.down_after_ms <= self.pool.heartbeat_ms {
            return Err(invalid(
                "pool.down_after_ms",
                format!(
                    "{} must be above pool.heartbeat_ms ({})",
                    self.pool.down_after_ms, self.pool.heartbeat_ms
                ),
            ));
        }
        if let Err((key, reason)) = crate::coordinator::ha::FenceTiming::from_config(&self.pool) {
            return Err(invalid(key, reason));
        }
        for (key, value) in [
            ("placement.cpu_overcommit", self.placement.cpu_overcommit),
            (
                "placement.memory_overcommit",
                self.placement.memory_overcommit,
            ),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(invalid(key, format!("{value} must be a positive number")));
            }
        }
        if let Some(label) = self
            .labels
            .iter()
            .find(|label| label.is_empty() || label.contains(char::is_whitespace))
        {
            return Err(invalid(
                "labels",
                format!("{label:?}: no empty or spaced labels"),
            ));
        }
        self.libvirt.validate().map_err(|error| match error {
            crate::hypervisor::DriverError::InvalidSpec { field, reason } => ConfigError::Invalid {
                key: field.to_owned(),
                problem: reason,
            },
            other => invalid("libvirt", other.to_string()),
        })?;
        Ok(())
    }

    /// The Unix socket path.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("hsevd.sock"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|error| error.to_string())?;
        config.validate().map_err(|error| error.to_string())?;
        Ok(config)
    }

    #[test]
    fn a_minimal_config_gets_safe_defaults() {
        let config = parse("state_dir = \"/var/lib/hsevd\"").expect("valid");
        assert!(!config.allow_debug_policy);
        assert_eq!(config.accelerator, AcceleratorChoice::Auto);
        assert_eq!(config.driver, DriverKind::Qemu);
        assert_eq!(config.socket_path(), Path::new("/var/lib/hsevd/hsevd.sock"));
        assert!(config.tokens.is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("state_dir = \"/x\"\nlisten_addr = \"1\"", "listen_addr"),
            ("state_dir = \"relative\"", "state_dir"),
            ("state_dir = \"/x\"\naccelerator = \"hvf\"", "accelerator"),
            ("state_dir = \"/x\"\ndriver = \"xen\"", "driver"),
            ("state_dir = \"/x\"\n[libvirt]\nuri = \"qemu+ssh://h/system\"", "libvirt.uri"),
            ("state_dir = \"/x\"\n[libvirt]\nurl = \"qemu:///system\"", "url"),
            ("state_dir = \"/x\"\ndefault_vcpu_type = \"Pentium\"", "default_vcpu_type"),
            ("state_dir = \"/x\"\n[[tokens]]\nname = \"a b\"\nrole = \"admin\"\nsha256 = \"00\"", "sha256"),
            (
                &format!("state_dir = \"/x\"\n[[tokens]]\nname = \"a b\"\nrole = \"admin\"\nsha256 = \"{}\"", "0".repeat(64)),
                "tokens[0].name",
            ),
            ("state_dir = \"/x\"\n[firmware]\nsimulated = true", "simulated"),
            // Keys belong to the tenant's broker: the host has none to name.
            (
                "state_dir = \"/x\"\n[key_broker]\nurl = \"http://kbs:1\"",
                "key_broker",
            ),
        ];
        for (text, key) in cases {
            let error = parse(text).expect_err(text);
            assert!(error.contains(key), "{key} not named in {error}");
        }
    }
    #[test]
    fn fencing_settings_that_break_the_argument_are_refused() {
        let pool = |keys: &str| format!("state_dir = \"/x\"\n[pool]\n{keys}");
        // The defaults, and a host that fences a little before its lease ends.
        let config = parse(&pool("")).expect("the defaults");
        let timing = crate::coordinator::ha::FenceTiming::from_config(&config.pool)
            .expect("the defaults keep the argument");
        assert_eq!(timing.restart_after(), Duration::from_secs(7));
        parse(&pool("fence_after_ms = 4000")).expect("fencing sooner is fine");
        for (keys, key, says) in [
            (
                "fence_after_ms = 6000",
                "pool.fence_after_ms",
                "at most pool.down_after_ms",
            ),
            (
                "fence_after_ms = 900",
                "pool.fence_after_ms",
                "above pool.heartbeat_ms",
            ),
            ("fence_margin_ms = 600", "pool.fence_margin_ms", "too short"),
            // A longer lease needs a longer margin (its clocks' drift).
            (
                "down_after_ms = 60000\nfence_margin_ms = 2000",
                "pool.fence_margin_ms",
                "too short",
            ),
        ] {
            let error = parse(&pool(keys)).expect_err(keys);
            assert!(
                error.contains(key) && error.contains(says),
                "{keys}: {error}"
            );
        }
    }
}
