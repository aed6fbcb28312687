//! The broker's configuration file (TOML): unknown keys are refused, every
//! key has an explicit default, and [`KbsConfig::validate`] names the bad
//! field.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! state_dir = "/var/lib/hsev-kbs"
//! kek_file = "/var/lib/hsev-kbs/kek.bin"   # default: <state_dir>/kek.bin
//! mode = "production"                      # or "development"
//! simulated_roots = []                     # development only
//! session_ttl_seconds = 120
//! max_sessions = 65536
//! insecure_http_dev = false                # plain HTTP: development only
//!
//! [tls]                                    # default: <state_dir>/tls/{cert,key}.pem
//! cert_file = "/etc/hsev-kbs/cert.pem"
//! key_file = "/etc/hsev-kbs/key.pem"
//!
//! [[admin_tokens]]
//! name = "alice"
//! role = "tenant"                          # its repository's resources and policies
//! repository = "alice"
//! sha256 = "<hex SHA-256 of the bearer token: hsev-kbs hash-token>"
//!
//! [[admin_tokens]]
//! name = "alice-auditor"
//! role = "reader"                          # reads its repository's policies, changes nothing
//! repository = "alice"
//! sha256 = "<hex>"
//!
//! [[admin_tokens]]
//! name = "ops"
//! role = "operator"                        # announces VMs, nothing else
//! sha256 = "<hex>"
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::HexBytes;

/// A configuration that cannot be read or makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax, unknown key or wrong type (the message names the key).
    #[error("{path}: {source}")]
    Toml {
        /// The file.
        path: String,
        /// The parse error.
        source: toml::de::Error,
    },
    /// A value out of range or inconsistent with another.
    #[error("config field {field}: {problem}")]
    Invalid {
        /// The field (`admin_tokens[1].name`, ...).
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Whether simulated evidence can ever be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Only AMD's roots are trusted; simulated evidence is always refused,
    /// whatever a resource's policy says.
    Production,
    /// The simulated roots listed are trusted too, and resources whose
    /// policy sets `allow_simulated = true` may accept their evidence. It
    /// gives no confidentiality: for development pools only.
    Development,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Production => "production",
            Mode::Development => "development",
        })
    }
}

/// What an admin token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminRole {
    /// A tenant: reads and changes the resources, release policies and
    /// reference values of its own repository, and nothing else.
    Tenant,
    /// A party that checks for a tenant (the SlapOS connector, an
    /// auditor): reads the release policies and announcements of its
    /// repository, never a key, and changes nothing.
    Reader,
    /// The operator of the hosts: announces VMs (the id and image it says
    /// it runs), never sets a policy, never reads a resource.
    Operator,
}

impl std::fmt::Display for AdminRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AdminRole::Tenant => "tenant",
            AdminRole::Reader => "reader",
            AdminRole::Operator => "operator",
        })
    }
}

/// A bearer token of the admin API, stored as its SHA-256 only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    /// Who holds it (written in the audit log).
    pub name: String,
    /// What it may do.
    pub role: AdminRole,
    /// A tenant's repository (required for tenants and readers, refused
    /// for operators).
    #[serde(default)]
    pub repository: Option<String>,
    /// SHA-256 of the token, hex.
    pub sha256: HexBytes<32>,
}

/// The broker's own certificate chain and key (PEM): both or neither.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PKCS #8, SEC1 or PKCS #1; mode 0600 or stricter).
    pub key_file: PathBuf,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_ttl() -> u64 {
    120
}

fn default_max_sessions() -> usize {
    65_536
}

/// `hsev-kbs serve --config FILE`. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KbsConfig {
    /// Address to listen on (port 0: any free port, printed at start).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The broker's folder: database, audit log, token-signing key.
    pub state_dir: PathBuf,
    /// The 32-byte key-encryption key (mode 0600 or stricter); default
    /// `<state_dir>/kek.bin`.
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
    /// `production` or `development`.
    pub mode: Mode,
    /// Development only: roots of simulated AMD Secure Processors to trust,
    /// each a PEM bundle (ARK + ASK [+ ASVK]) or a simulated platform's
    /// folder holding `ark.pem` and `ask.pem`.
    #[serde(default)]
    pub simulated_roots: Vec<PathBuf>,
    /// Seconds a challenge may wait for its attestation, and an attested
    /// session lasts.
    #[serde(default = "default_ttl")]
    pub session_ttl_seconds: u64,
    /// Most sessions held at once (an attested one keeps its verified
    /// report, a few KiB); past it, `auth` answers 503.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// The broker's TLS certificate and key; default: the self-signed pair
    /// in `<state_dir>/tls` (`hsev-kbs init` makes it).
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Serve plain HTTP instead of HTTPS (development mode only): anyone on
    /// the network path can then read the admin API's tokens and stand in
    /// for the broker.
    #[serde(default)]
    pub insecure_http_dev: bool,
    /// Bearer tokens of the admin API.
    #[serde(default)]
    pub admin_tokens: Vec<AdminToken>,
}

impl KbsConfig {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|error| match error {
            ConfigError::Toml { source, .. } => ConfigError::Toml {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates TOML.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: KbsConfig = toml::from_str(text).map_err(|source| ConfigError::Toml {
            path: "config".into(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The key-encryption key's file.
    pub fn kek_path(&self) -> PathBuf {
        self.kek_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("kek.bin"))
    }

    /// The TLS certificate and key files: configured, or the default pair
    /// in the state folder.
    pub fn tls_files(&self) -> TlsFiles {
        self.tls.clone().unwrap_or_else(|| TlsFiles {
            cert_file: self.state_dir.join(super::tls::TLS_DIR).join("cert.pem"),
            key_file: self.state_dir.join(super::tls::TLS_DIR).join("key.pem"),
        })
    }

    /// Checks what serde cannot, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "empty"));
        }
        if self
            .kek_file
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            return Err(invalid("kek_file", "empty"));
        }
        if self.mode == Mode::Production && !self.simulated_roots.is_empty() {
            return Err(invalid(
                "simulated_roots",
                "production mode trusts no simulated platform: remove them, or set mode = \"development\"",
            ));
        }
        if !(1..=86_400).contains(&self.session_ttl_seconds) {
            return Err(invalid(
                "session_ttl_seconds",
                format!("{} is not within 1..=86400", self.session_ttl_seconds),
            ));
        }
        if self.max_sessions == 0 {
            return Err(invalid("max_sessions", "must be at least 1"));
        }
        if self.insecure_http_dev && self.mode == Mode::Production {
            return Err(invalid(
                "insecure_http_dev",
                "plain HTTP is for development only: remove it, or set mode = \"development\"",
            ));
        }
        if self.insecure_http_dev && self.tls.is_some() {
            return Err(invalid(
                "insecure_http_dev",
                "[tls] is set too: choose HTTPS ([tls]) or plain HTTP",
            ));
        }
        if let Some(tls) = &self.tls {
            for (field, path) in [
                ("tls.cert_file", &tls.cert_file),
                ("tls.key_file", &tls.key_file),
            ] {
                if path.as_os_str().is_empty() {
                    return Err(invalid(field, "empty"));
                }
            }
        }
        let mut names = HashSet::new();
        let mut hashes = HashSet::new();
        for (index, token) in self.admin_tokens.iter().enumerate() {
            if token.name.is_empty()
                || token.name.len() > 64
                || !token
                    .name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
            {
                return Err(invalid(
                    format!("admin_tokens[{index}].name"),
                    format!("{:?} must be 1-64 letters, digits, '-' or '_'", token.name),
                ));
            }
            if !names.insert(&token.name) {
                return Err(invalid(
                    format!("admin_tokens[{index}].name"),
                    format!("{:?} appears twice", token.name),
                ));
            }
            match (token.role, &token.repository) {
                (AdminRole::Tenant | AdminRole::Reader, None) => {
                    return Err(invalid(
                        format!("admin_tokens[{index}].repository"),
                        format!(
                            "a {} token needs the repository it is scoped to",
                            token.role
                        ),
                    ))
                }
                (AdminRole::Tenant | AdminRole::Reader, Some(repository)) => {
                    crate::kbs::protocol::check_name(repository).map_err(|error| {
                        invalid(
                            format!("admin_tokens[{index}].repository"),
                            error.to_string(),
                        )
                    })?;
                }
                (AdminRole::Operator, Some(_)) => {
                    return Err(invalid(
                        format!("admin_tokens[{index}].repository"),
                        "an operator token has no repository: it may only announce VMs",
                    ))
                }
                (AdminRole::Operator, None) => {}
            }
            if !hashes.insert(token.sha256.0) {
                return Err(invalid(
                    format!("admin_tokens[{index}].sha256"),
                    "the same token hash appears twice",
                ));
            }
        }
        Ok(())
    }

    /// A sample configuration for `hsev-kbs init`.
    pub fn sample(state_dir: &Path) -> String {
        format!(
            r#"# hsev-kbs configuration (hsev-kbs serve --config THIS_FILE).
listen = "127.0.0.1:8080"
state_dir = {state_dir}
kek_file = {kek}
# "production": only AMD's roots; simulated evidence is always refused.
# "development": also the simulated_roots below, for resources whose policy
# sets allow_simulated = true. Simulated evidence gives NO confidentiality.
mode = "production"
simulated_roots = []
session_ttl_seconds = 120
# HTTPS with the self-signed pair `hsev-kbs init` made in {tls_dir}
# (its pin, for guests and clients: hsev-kbs fingerprint --config THIS_FILE),
# or your own:
# [tls]
# cert_file = "/etc/hsev-kbs/cert.pem"
# key_file = "/etc/hsev-kbs/key.pem"

# Admin API bearer tokens, stored as SHA-256 only:
#   head -c 32 /dev/urandom | base64 > alice.token
#   hsev-kbs hash-token < alice.token
# A tenant's token reads and changes its own repository only:
# [[admin_tokens]]
# name = "alice"
# role = "tenant"
# repository = "alice"
# sha256 = "<64 hex digits>"
# A reader's token reads a repository's policies and changes nothing
# (for a party that checks on the tenant's behalf, like a SlapOS connector):
# [[admin_tokens]]
# name = "alice-reader"
# role = "reader"
# repository = "alice"
# sha256 = "<64 hex digits>"
# The operator's token may only announce VMs (never a policy, never a key):
# [[admin_tokens]]
# name = "ops"
# role = "operator"
# sha256 = "<64 hex digits>"
"#,
            tls_dir = state_dir.join(super::tls::TLS_DIR).display(),
            state_dir = toml_string(&state_dir.display().to_string()),
            kek = toml_string(&state_dir.join("kek.bin").display().to_string()),
        )
    }
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_parses_with_defaults() {
        let config =
            KbsConfig::parse(&KbsConfig::sample(Path::new("/var/lib/kbs"))).expect("sample");
        assert_eq!(config.mode, Mode::Production);
        assert_eq!(config.session_ttl_seconds, 120);
        assert_eq!(config.kek_path(), Path::new("/var/lib/kbs/kek.bin"));
        let minimal =
            KbsConfig::parse("state_dir = \"/s\"\nmode = \"development\"").expect("minimal");
        assert_eq!(minimal.listen, default_listen());
        assert_eq!(minimal.kek_path(), Path::new("/s/kek.bin"));
        assert!(!minimal.insecure_http_dev);
        assert_eq!(
            minimal.tls_files(),
            TlsFiles {
                cert_file: PathBuf::from("/s/tls/cert.pem"),
                key_file: PathBuf::from("/s/tls/key.pem"),
            }
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let hash = "0".repeat(64);
        for (text, field) in [
            ("state_dir = \"/s\"\nmode = \"prod\"", "mode"),
            ("state_dir = \"/s\"\nmode = \"production\"\nlisten = \"nowhere\"", "listen"),
            ("state_dir = \"/s\"\nmode = \"production\"\nsession_ttl = 3", "session_ttl"),
            ("state_dir = \"/s\"\nmode = \"production\"\nsession_ttl_seconds = 0", "session_ttl_seconds"),
            ("state_dir = \"/s\"\nmode = \"production\"\nsimulated_roots = [\"/r.pem\"]", "simulated_roots"),
            ("mode = \"production\"", "state_dir"),
            (&format!("state_dir = \"/s\"\nmode = \"production\"\n[[admin_tokens]]\nname = \"a b\"\nrole = \"operator\"\nsha256 = \"{hash}\""), "admin_tokens[0].name"),
            ("state_dir = \"/s\"\nmode = \"production\"\n[[admin_tokens]]\nname = \"a\"\nrole = \"operator\"\nsha256 = \"00\"", "sha256"),
            (&format!("state_dir = \"/s\"\nmode = \"production\"\n[[admin_tokens]]\nname = \"a\"\nrole = \"operator\"\nsha256 = \"{hash}\"\n[[admin_tokens]]\nname = \"b\"\nrole = \"operator\"\nsha256 = \"{hash}\""), "admin_tokens[1].sha256"),
            (&format!("state_dir = \"/s\"\nmode = \"production\"\n[[admin_tokens]]\nname = \"a\"\nsha256 = \"{hash}\""), "role"),
            (&format!("state_dir = \"/s\"\nmode = \"production\"\n[[admin_tokens]]\nname = \"a\"\nrole = \"tenant\"\nsha256 = \"{hash}\""), "admin_tokens[0].repository"),
            (&format!("state_dir = \"/s\"\nmode = \"production\"\n[[admin_tokens]]\nname = \"a\"\nrole = \"reader\"\nsha256 = \"{hash}\""), "admin_tokens[0].repository"),
            (&format!("state_dir = \"/s\"\nmode = \"production\"\n[[admin_tokens]]\nname = \"a\"\nrole = \"tenant\"\nrepository = \"a/b\"\nsha256 = \"{hash}\""), "admin_tokens[0].repository"),
            (&format!("state_dir = \"/s\"\nmode = \"production\"\n[[admin_tokens]]\nname = \"a\"\nrole = \"operator\"\nrepository = \"a\"\nsha256 = \"{hash}\""), "admin_tokens[0].repository"),
            (&format!("state_dir = \"/s\"\nmode = \"production\"\n[[admin_tokens]]\nname = \"a\"\nrole = \"root\"\nsha256 = \"{hash}\""), "role"),
            ("state_dir = \"/s\"\nmode = \"production\"\ninsecure_http_dev = true", "insecure_http_dev"),
            ("state_dir = \"/s\"\nmode = \"development\"\ninsecure_http_dev = true\n[tls]\ncert_file = \"c\"\nkey_file = \"k\"", "insecure_http_dev"),
            ("state_dir = \"/s\"\nmode = \"development\"\n[tls]\ncert_file = \"c\"", "key_file"),
        ] {
            let error = KbsConfig::parse(text).expect_err(text);
            assert!(error.to_string().contains(field), "{field}: {error}");
        }
    }
}
