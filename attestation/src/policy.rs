//! The appraisal policy: what a verifier accepts beyond "genuine".
//!
//! Written in TOML; unknown keys are refused, every key has a safe default:
//! debug guests, migration agents and simulated evidence are refused unless
//! the policy says otherwise.
//!
//! ```toml
//! allowed_measurements = ["6a6519d757e68c2e..."]
//! allowed_vmpls = [0]
//! minimum_abi = "1.51"
//! allowed_id_key_digests = ["<96 hex digits: hsev idkey generate>"]
//! [minimum_tcb]
//! bootloader = 3
//! snp = 8
//! microcode = 115
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::certs::EndorsementKind;
use crate::hex_bytes::HexBytes;
use crate::product::Product;

/// A policy that cannot be read or makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file cannot be read.
    #[error("cannot read policy {path}: {source}")]
    Read {
        /// The policy file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax, unknown key or wrong type (the message names the key).
    #[error("policy: {0}")]
    Toml(#[from] toml::de::Error),
    /// A key whose value is out of range.
    #[error("policy key {key}: {problem}")]
    Invalid {
        /// The offending key.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// Lowest acceptable value of each TCB component; absent means any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinimumTcb {
    /// Turin's FMC patch level (ignored on products without one).
    pub fmc: Option<u8>,
    /// PSP bootloader.
    pub bootloader: Option<u8>,
    /// PSP OS.
    pub tee: Option<u8>,
    /// SNP firmware.
    pub snp: Option<u8>,
    /// CPU microcode.
    pub microcode: Option<u8>,
}

/// A minimum firmware ABI version, written `"major.minor"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AbiVersion {
    /// Major version.
    pub major: u8,
    /// Minor version.
    pub minor: u8,
}

impl std::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl Serialize for AbiVersion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AbiVersion {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let parsed = text.split_once('.').and_then(|(major, minor)| {
            Some(AbiVersion {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
            })
        });
        parsed.ok_or_else(|| {
            serde::de::Error::custom(format!("{text:?} is not an ABI version like \"1.51\""))
        })
    }
}

/// What a verifier accepts. See the module documentation for the format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppraisalPolicy {
    /// Accepted launch measurements; empty accepts any.
    pub allowed_measurements: Vec<HexBytes<48>>,
    /// Lowest acceptable reported TCB, per component.
    pub minimum_tcb: MinimumTcb,
    /// Accept guests whose policy allows debugging (the host can read them).
    pub allow_debug: bool,
    /// Accept guests whose policy allows a migration agent.
    pub allow_migration_agent: bool,
    /// Demand that the guest policy restricts the guest to one socket.
    pub require_single_socket: bool,
    /// Demand that the platform runs with SMT disabled.
    pub require_smt_disabled: bool,
    /// Lowest firmware ABI the guest policy may require (`"1.51"`).
    pub minimum_abi: Option<AbiVersion>,
    /// VMPLs the report may have been requested at.
    pub allowed_vmpls: Vec<u32>,
    /// Exact report_data the report must carry.
    pub report_data: Option<HexBytes<64>>,
    /// Exact host_data the report must carry.
    pub host_data: Option<HexBytes<32>>,
    /// Chips the report may come from; empty accepts any.
    pub allowed_chip_ids: Vec<HexBytes<64>>,
    /// Keys that may sign the report.
    pub allowed_signing_keys: Vec<EndorsementKind>,
    /// Products the report may come from; empty accepts any.
    pub allowed_products: Vec<Product>,
    /// Lowest acceptable guest SVN.
    pub minimum_guest_svn: Option<u32>,
    /// ID keys (SHA-384 of each in AMD's layout, as `hsev idkey generate`
    /// prints it) one of which must have signed the launch's ID block; empty
    /// accepts a launch with or without one. With it, "whatever my ID key
    /// signed" can stand in for a list of measurements.
    pub allowed_id_key_digests: Vec<HexBytes<48>>,
    /// Author keys one of which must have signed the ID key; empty accepts
    /// any (or none).
    pub allowed_author_key_digests: Vec<HexBytes<48>>,
    /// Accept evidence from a simulated AMD Secure Processor. It proves
    /// nothing about confidentiality: for development pools only.
    pub allow_simulated: bool,
}

impl Default for AppraisalPolicy {
    fn default() -> Self {
        AppraisalPolicy {
            allowed_measurements: Vec::new(),
            minimum_tcb: MinimumTcb::default(),
            allow_debug: false,
            allow_migration_agent: false,
            require_single_socket: false,
            require_smt_disabled: false,
            minimum_abi: None,
            allowed_vmpls: vec![0, 1, 2, 3],
            report_data: None,
            host_data: None,
            allowed_chip_ids: Vec::new(),
            allowed_signing_keys: vec![EndorsementKind::Vcek, EndorsementKind::Vlek],
            allowed_products: Vec::new(),
            minimum_guest_svn: None,
            allowed_id_key_digests: Vec::new(),
            allowed_author_key_digests: Vec::new(),
            allow_simulated: false,
        }
    }
}

impl AppraisalPolicy {
    /// Parses and validates a TOML policy.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let policy: AppraisalPolicy = toml::from_str(text)?;
        policy.validate()?;
        Ok(policy)
    }

    /// Reads, parses and validates a TOML policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// The policy as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks values serde cannot: ranges and emptiness.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Some(vmpl) = self.allowed_vmpls.iter().find(|&&vmpl| vmpl > 3) {
            return Err(PolicyError::Invalid {
                key: "allowed_vmpls",
                problem: format!("VMPL {vmpl} does not exist (0-3)"),
            });
        }
        if self.allowed_vmpls.is_empty() {
            return Err(PolicyError::Invalid {
                key: "allowed_vmpls",
                problem: "empty: no report could ever pass".into(),
            });
        }
        if self.allowed_signing_keys.is_empty() {
            return Err(PolicyError::Invalid {
                key: "allowed_signing_keys",
                problem: "empty: no report could ever pass".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_safe() {
        let policy = AppraisalPolicy::from_toml("").expect("empty policy is the default");
        assert_eq!(policy, AppraisalPolicy::default());
        assert!(!policy.allow_debug);
        assert!(!policy.allow_simulated);
        assert!(!policy.allow_migration_agent);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let error = AppraisalPolicy::from_toml("allow_debugging = true").expect_err("unknown key");
        assert!(error.to_string().contains("allow_debugging"), "{error}");
        let error = AppraisalPolicy::from_toml("[minimum_tcb]\nsnpp = 1").expect_err("unknown key");
        assert!(error.to_string().contains("snpp"), "{error}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let error = AppraisalPolicy::from_toml("allowed_vmpls = [4]").expect_err("vmpl 4");
        assert!(error.to_string().contains("allowed_vmpls"), "{error}");
        let error = AppraisalPolicy::from_toml("minimum_abi = \"one\"").expect_err("abi");
        assert!(error.to_string().contains("minimum_abi"), "{error}");
        let error = AppraisalPolicy::from_toml("host_data = \"00\"").expect_err("short host data");
        assert!(error.to_string().contains("host_data"), "{error}");
        let error =
            AppraisalPolicy::from_toml("allowed_signing_keys = [\"ark\"]").expect_err("key");
        assert!(
            error.to_string().contains("allowed_signing_keys"),
            "{error}"
        );
    }

    #[test]
    fn round_trips_through_toml() {
        let policy = AppraisalPolicy {
            minimum_abi: Some(AbiVersion {
                major: 1,
                minor: 51,
            }),
            minimum_tcb: MinimumTcb {
                snp: Some(8),
                ..MinimumTcb::default()
            },
            host_data: Some(HexBytes([7; 32])),
            allowed_id_key_digests: vec![HexBytes([9; 48])],
            allowed_author_key_digests: vec![HexBytes([8; 48])],
            ..AppraisalPolicy::default()
        };
        assert_eq!(
            AppraisalPolicy::from_toml(&policy.to_toml()).expect("parses"),
            policy
        );
    }
}
