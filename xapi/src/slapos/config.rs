//! The connector's configuration: a TOML file (unknown keys refused, every
//! error naming its key), with the master's URL overridable by `--master`.
//!
//! ```toml
//! [master]
//! url = "https://slap.example.com"          # or --master URL
//! computer_guid = "COMP-1234"               # this node's reference at the master
//! software_release = "https://example.com/hypersev/integrations/slapos/software.cfg"
//! cert_file = "/etc/hsev-slapos/node.crt"   # the node's client certificate, when the
//! key_file = "/etc/hsev-slapos/node.key"    # master asks for one (the real master does)
//! ca_file = "/etc/hsev-slapos/master-ca.pem" # default: the usual public roots
//!
//! [hsev]
//! endpoint = "unix:///var/lib/hsevd/hsevd.sock"   # or https://HOST:PORT
//! token_file = "/etc/hsev-slapos/hsev.token"
//! owner = "slapos"                          # the token's name in hsevd.toml
//! ca = "/var/lib/hsevd/tls/cert.pem"        # https:// endpoints only
//!
//! [node]
//! partitions = 16                           # default: the pool's capacity (admin token)
//! pass_interval_seconds = 5
//! vm_name_prefix = "comp-1234"              # default: computer_guid, lower-cased
//! default_image = "debian"
//! stop_timeout_seconds = 30
//! allow_simulated_firmware = false          # development pools only: NO confidentiality
//!
//! [key_broker]                              # the requesters' key broker, for encrypted disks
//! guest_url = "https://10.0.2.2:8443"       # as their guests reach it (measured)
//! url = "https://kbs.example:8443"          # from the connector (default: guest_url)
//! pin = "sha256:<64 hex>"                   # its TLS public key (`hsev-kbs fingerprint`)
//! repository = "hsev"                       # the requesters' repository there
//! token_file = "/etc/hsev-slapos/kbs.token" # a reader token of that repository
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use hsev_attestation::kbs::client::SpkiPin;
use hsev_attestation::kbs::protocol::check_name;
use serde::Deserialize;

use super::naming::VmNames;

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
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// The SlapOS master and this node's identity there.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterConfig {
    /// The master's base URL (its JSON-RPC API lives under it).
    pub url: Option<String>,
    /// This compute node's reference at the master (`COMP-1234`).
    pub computer_guid: String,
    /// The URL of HyperSEV's software release, as requesters name it.
    pub software_release: String,
    /// The node's client certificate (PEM), for a master that asks for one.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
    /// Trust only these authorities (PEM) for an https:// master.
    pub ca_file: Option<PathBuf>,
}

/// How the connector reaches hsevd.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsevConfig {
    /// hsevd's address: `unix:///PATH` or `https://HOST:PORT`.
    pub endpoint: String,
    /// The file holding the connector's bearer token.
    pub token_file: PathBuf,
    /// The name hsevd knows that token by: the owner of the connector's VMs.
    pub owner: String,
    /// The authority of hsevd's TLS certificate (https:// only).
    pub ca: Option<PathBuf>,
}

/// The compute node the connector presents.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Partitions to register; default: the pool's capacity.
    pub partitions: Option<u32>,
    /// Seconds between two passes.
    #[serde(default = "default_pass_interval")]
    pub pass_interval_seconds: u32,
    /// What the connector's VM names start with; default: the compute
    /// node's reference, lower-cased.
    pub vm_name_prefix: Option<String>,
    /// The image a request that names none boots.
    #[serde(default = "default_image")]
    pub default_image: String,
    /// Seconds a stopped instance's guest gets to power off.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_seconds: u32,
    /// Serve confidential requests from a host whose Secure Processor is
    /// simulated (development pools; no confidentiality at all).
    #[serde(default)]
    pub allow_simulated_firmware: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            partitions: None,
            pass_interval_seconds: default_pass_interval(),
            vm_name_prefix: None,
            default_image: default_image(),
            stop_timeout_seconds: default_stop_timeout(),
            allow_simulated_firmware: false,
        }
    }
}

fn default_pass_interval() -> u32 {
    5
}

fn default_image() -> String {
    "debian".to_owned()
}

fn default_stop_timeout() -> u32 {
    30
}

/// The requesters' key broker, where the keys of their encrypted disks
/// live. Their guests fetch their keys from it (the binding is measured on
/// the guest's command line); the requesters pin each disk key's release
/// policy there themselves; the connector only reads those policies, with
/// a token that can change nothing, before such a VM first runs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBrokerConfig {
    /// Its base URL as the guests reach it (https://HOST:PORT).
    pub guest_url: String,
    /// Its base URL from the connector; default: `guest_url`.
    pub url: Option<String>,
    /// SHA-256 of its TLS public key, `sha256:<64 hex digits>` (`hsev-kbs
    /// fingerprint`): the guests and the connector refuse any other broker.
    pub pin: String,
    /// The resource repository the requesters' disk keys live in.
    #[serde(default = "default_repository")]
    pub repository: String,
    /// A file holding a token of that repository (first line); a `reader`
    /// token suffices, and is all the connector should hold.
    pub token_file: PathBuf,
}

impl KeyBrokerConfig {
    /// The URL the connector reaches the broker at.
    pub fn connector_url(&self) -> &str {
        self.url.as_deref().unwrap_or(&self.guest_url)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, problem: String| ConfigError::Invalid { key, problem };
        for (key, url) in [
            ("key_broker.guest_url", Some(self.guest_url.as_str())),
            ("key_broker.url", self.url.as_deref()),
        ] {
            let Some(url) = url else { continue };
            let authority = url.strip_prefix("https://").unwrap_or_default();
            if authority.is_empty()
                || authority.contains(['/', '?', '#', '@'])
                || url.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(
                    key,
                    format!(
                        "{url:?} must be https://HOST:PORT: the broker is trusted by its \
                         pinned key, never over plain http"
                    ),
                ));
            }
        }
        self.pin.parse::<SpkiPin>().map_err(|error| {
            invalid(
                "key_broker.pin",
                format!("{:?}: {error} (`hsev-kbs fingerprint` prints it)", self.pin),
            )
        })?;
        check_name(&self.repository)
            .map_err(|error| invalid("key_broker.repository", error.to_string()))
    }
}

fn default_repository() -> String {
    "hsev".to_owned()
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The SlapOS master.
    pub master: MasterConfig,
    /// hsevd.
    pub hsev: HsevConfig,
    /// The compute node.
    #[serde(default)]
    pub node: NodeConfig,
    /// The requesters' key broker; without it, encrypted disks are refused.
    pub key_broker: Option<KeyBrokerConfig>,
}

impl Config {
    /// Reads a configuration file; `master_url` (the `--master` flag)
    /// overrides `master.url`. Relative paths are relative to the file's
    /// folder.
    pub fn load(path: &Path, master_url: Option<&str>) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: display.clone(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Toml {
            path: display,
            source,
        })?;
        if let Some(url) = master_url {
            config.master.url = Some(url.to_owned());
        }
        if let Some(folder) = path.parent() {
            config.resolve_paths(folder);
        }
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, folder: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = folder.join(&*path);
            }
        };
        for path in [
            self.master.cert_file.as_mut(),
            self.master.key_file.as_mut(),
            self.master.ca_file.as_mut(),
            self.hsev.ca.as_mut(),
            Some(&mut self.hsev.token_file),
            self.key_broker
                .as_mut()
                .map(|key_broker| &mut key_broker.token_file),
        ]
        .into_iter()
        .flatten()
        {
            resolve(path);
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, problem: String| ConfigError::Invalid { key, problem };
        let url = self.master_url();
        if url.is_empty() {
            return Err(invalid(
                "master.url",
                "missing: give it here or with --master URL".into(),
            ));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                "master.url",
                format!("{url:?} is neither http:// nor https://"),
            ));
        }
        if self.master.computer_guid.trim().is_empty() {
            return Err(invalid("master.computer_guid", "must not be empty".into()));
        }
        if self.master.software_release.trim().is_empty() {
            return Err(invalid(
                "master.software_release",
                "must not be empty".into(),
            ));
        }
        match (&self.master.cert_file, &self.master.key_file) {
            (Some(_), None) => {
                return Err(invalid(
                    "master.key_file",
                    "missing: cert_file needs its key".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "master.cert_file",
                    "missing: key_file needs its certificate".into(),
                ))
            }
            _ => {}
        }
        if (self.master.cert_file.is_some() || self.master.ca_file.is_some())
            && !url.starts_with("https://")
        {
            return Err(invalid(
                "master.url",
                format!("{url:?}: a client certificate or CA needs an https:// master"),
            ));
        }
        if self.hsev.owner.is_empty()
            || !self
                .hsev
                .owner
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "hsev.owner",
                format!(
                    "{:?} must be the token's name in hsevd.toml (letters, digits, '-', '_')",
                    self.hsev.owner
                ),
            ));
        }
        if self.node.partitions == Some(0) {
            return Err(invalid("node.partitions", "must be at least 1".into()));
        }
        if !(1..=3600).contains(&self.node.pass_interval_seconds) {
            return Err(invalid(
                "node.pass_interval_seconds",
                format!("{} is not within 1-3600", self.node.pass_interval_seconds),
            ));
        }
        if self.node.stop_timeout_seconds == 0 {
            return Err(invalid(
                "node.stop_timeout_seconds",
                "must be at least 1".into(),
            ));
        }
        if self.node.default_image.is_empty() {
            return Err(invalid("node.default_image", "must not be empty".into()));
        }
        VmNames::new(&self.vm_name_prefix())
            .map_err(|problem| invalid("node.vm_name_prefix", problem))?;
        if let Some(key_broker) = &self.key_broker {
            key_broker.validate()?;
        }
        Ok(())
    }

    /// The master's base URL, without a trailing slash.
    pub fn master_url(&self) -> String {
        self.master
            .url
            .as_deref()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_owned()
    }

    /// What the connector's VM names start with.
    pub fn vm_name_prefix(&self) -> String {
        self.node.vm_name_prefix.clone().unwrap_or_else(|| {
            self.master
                .computer_guid
                .to_ascii_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect()
        })
    }

    /// The time between two passes.
    pub fn pass_interval(&self) -> Duration {
        Duration::from_secs(self.node.pass_interval_seconds.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[master]\nurl = \"http://127.0.0.1:1\"\ncomputer_guid = \"COMP-42\"\n\
        software_release = \"/sr/software.cfg\"\n[hsev]\nendpoint = \"unix:///s.sock\"\n\
        token_file = \"token\"\nowner = \"slapos\"\n";

    const PIN: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn load(text: &str, master: Option<&str>) -> Result<Config, String> {
        let folder = tempfile::tempdir().expect("tempdir");
        let path = folder.path().join("connector.toml");
        std::fs::write(&path, text).expect("written");
        Config::load(&path, master).map_err(|error| error.to_string())
    }

    #[test]
    fn a_minimal_config_gets_its_defaults_and_paths_relative_to_it() {
        let config = load(MINIMAL, None).expect("valid");
        assert_eq!(config.vm_name_prefix(), "comp-42");
        assert_eq!(config.pass_interval(), Duration::from_secs(5));
        assert_eq!(config.node.default_image, "debian");
        assert!(!config.node.allow_simulated_firmware);
        assert!(config.hsev.token_file.is_absolute());
        assert!(config.hsev.token_file.ends_with("token"));
        let overridden = load(MINIMAL, Some("http://10.0.0.1:9/")).expect("valid");
        assert_eq!(overridden.master_url(), "http://10.0.0.1:9");
    }

    #[test]
    fn the_key_broker_names_what_the_guest_and_the_connector_reach() {
        let config = load(
            &format!(
                "{MINIMAL}[key_broker]\nguest_url = \"https://10.0.2.2:8443\"\npin = \"{PIN}\"\n\
                 token_file = \"kbs.token\"\n"
            ),
            None,
        )
        .expect("valid");
        let key_broker = config.key_broker.expect("a key broker");
        assert_eq!(key_broker.connector_url(), "https://10.0.2.2:8443");
        assert_eq!(key_broker.repository, "hsev");
        assert!(key_broker.token_file.is_absolute());
        let config = load(
            &format!(
                "{MINIMAL}[key_broker]\nguest_url = \"https://10.0.2.2:8443\"\n\
                 url = \"https://127.0.0.1:8443\"\npin = \"{PIN}\"\nrepository = \"tenants\"\n\
                 token_file = \"kbs.token\"\n"
            ),
            None,
        )
        .expect("valid");
        let key_broker = config.key_broker.expect("a key broker");
        assert_eq!(key_broker.connector_url(), "https://127.0.0.1:8443");
        assert_eq!(key_broker.repository, "tenants");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                MINIMAL.replace("url = \"http://127.0.0.1:1\"\n", ""),
                "master.url",
            ),
            (
                MINIMAL.replace("http://127.0.0.1:1", "ftp://x"),
                "master.url",
            ),
            (
                format!("{MINIMAL}[node]\npartitions = 0\n"),
                "node.partitions",
            ),
            (
                format!("{MINIMAL}[node]\npass_interval_seconds = 0\n"),
                "node.pass_interval_seconds",
            ),
            (
                format!("{MINIMAL}[node]\nvm_name_prefix = \"9lives\"\n"),
                "node.vm_name_prefix",
            ),
            (
                MINIMAL.replace("owner = \"slapos\"", "owner = \"a b\""),
                "hsev.owner",
            ),
            (format!("{MINIMAL}[node]\npartition = 3\n"), "partition"),
            (
                MINIMAL.replace(
                    "[hsev]",
                    "cert_file = \"c.pem\"\nkey_file = \"k.pem\"\n[hsev]",
                ),
                "master.url",
            ),
            (
                MINIMAL.replace("[hsev]", "cert_file = \"c.pem\"\n[hsev]"),
                "master.key_file",
            ),
            (
                format!("{MINIMAL}[key_broker]\nguest_url = \"http://kbs:80\"\npin = \"{PIN}\"\ntoken_file = \"t\"\n"),
                "key_broker.guest_url",
            ),
            (
                format!("{MINIMAL}[key_broker]\nguest_url = \"https://kbs:1\"\nurl = \"https://kbs/x\"\npin = \"{PIN}\"\ntoken_file = \"t\"\n"),
                "key_broker.url",
            ),
            (
                format!("{MINIMAL}[key_broker]\nguest_url = \"https://kbs:1\"\npin = \"sha256:00\"\ntoken_file = \"t\"\n"),
                "key_broker.pin",
            ),
            (
                format!("{MINIMAL}[key_broker]\nguest_url = \"https://kbs:1\"\npin = \"{PIN}\"\nrepository = \"a/b\"\ntoken_file = \"t\"\n"),
                "key_broker.repository",
            ),
            (
                format!("{MINIMAL}[key_broker]\nurl = \"https://kbs:1\"\nadmin_token_file = \"t\"\n"),
                "admin_token_file",
            ),
        ];
        for (text, key) in cases {
            let error = load(&text, None).expect_err(&text);
            assert!(error.contains(key), "{key} not named in {error}");
        }
    }
}
