//! Init-data as Trustee defines it (its `kbs/docs/initdata.md`): a TOML
//! document a tenant hands a guest at launch, `version`, `algorithm` and a
//! `data` table of strings, whose digest the host sets as the SNP report's
//! HOST_DATA. The guest sends the TOML in the Attestation's `init-data`
//! (`format = "toml"`); the broker recomputes the digest over the bytes
//! sent, checks it against the report, and hands the `data` table to the
//! release policy.
//!
//! The digest is the document's `algorithm` (`sha256`, `sha384`, `sha512`
//! or `sm3`, kbs-types' names) over the whole text, cut or zero-padded to
//! HOST_DATA's 32 bytes, exactly as Trustee's SNP verifier compares it.
//!
//! This module owns only parsing and that digest: it must never decide
//! whether a guest is acceptable.

use std::collections::BTreeMap;

use kbs_types::{HashAlgorithm, InitData};
use serde::Deserialize;

/// The only init-data format Trustee's KBS (and this broker) accepts.
pub const INIT_DATA_FORMAT: &str = "toml";

/// Why init-data cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InitDataError {
    /// Another format than TOML.
    #[error("init-data format {0:?}: only \"toml\" is accepted")]
    Format(String),
    /// Not an init-data TOML document (the message names the key).
    #[error("init-data body: {0}")]
    Toml(#[from] toml::de::Error),
}

/// The document's shape, as Trustee's attestation service reads it.
#[derive(Deserialize)]
struct Document {
    version: String,
    algorithm: HashAlgorithm,
    data: BTreeMap<String, String>,
}

/// A parsed init-data document and its digest.
#[derive(Debug, Clone, PartialEq)]
pub struct InitDataDocument {
    /// The document's `version` (Trustee's spec: `0.1.0`).
    pub version: String,
    /// Its digest algorithm.
    pub algorithm: HashAlgorithm,
    /// The digest of the whole text, full length.
    pub digest: Vec<u8>,
    /// Its `data` table.
    pub data: BTreeMap<String, String>,
}

impl InitDataDocument {
    /// Parses an init-data TOML text and digests it.
    pub fn from_toml(text: &str) -> Result<Self, InitDataError> {
        let document: Document = toml::from_str(text)?;
        Ok(InitDataDocument {
            version: document.version,
            algorithm: document.algorithm,
            digest: document.algorithm.digest(text.as_bytes()),
            data: document.data,
        })
    }

    /// The Attestation's `init-data`: TOML only.
    pub fn from_attestation(init_data: &InitData) -> Result<Self, InitDataError> {
        if init_data.format != INIT_DATA_FORMAT {
            return Err(InitDataError::Format(init_data.format.clone()));
        }
        Self::from_toml(&init_data.body)
    }

    /// The HOST_DATA a guest launched with this document carries: the
    /// digest cut to 32 bytes, or zero-padded to them.
    pub fn host_data(&self) -> [u8; 32] {
        let mut host_data = [0u8; 32];
        let length = self.digest.len().min(32);
        host_data[..length].copy_from_slice(&self.digest[..length]);
        host_data
    }

    /// The claims a token carries about it.
    pub fn claims(&self) -> serde_json::Value {
        serde_json::json!({
            "version": self.version,
            "algorithm": self.algorithm.as_ref(),
            "digest": hex::encode(&self.digest),
            "data": self.data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCUMENT: &str = "algorithm = \"sha384\"\nversion = \"0.1.0\"\n\n[data]\n\"vm.toml\" = '''\nname = \"vault\"\n'''\n";

    #[test]
    fn digest_is_over_the_text_cut_to_host_data() {
        let document = InitDataDocument::from_toml(DOCUMENT).expect("parses");
        assert_eq!(document.algorithm, HashAlgorithm::Sha384);
        assert_eq!(document.digest, openssl::sha::sha384(DOCUMENT.as_bytes()));
        assert_eq!(document.host_data()[..], document.digest[..32]);
        assert_eq!(document.data["vm.toml"], "name = \"vault\"\n");

        let short = "algorithm = \"sha256\"\nversion = \"0.1.0\"\n[data]\n";
        let document = InitDataDocument::from_toml(short).expect("parses");
        assert_eq!(document.host_data(), openssl::sha::sha256(short.as_bytes()));
        assert_eq!(document.claims()["algorithm"], "sha256");
    }

    #[test]
    fn other_formats_and_documents_are_refused_by_name() {
        let json = InitData {
            format: "json".into(),
            body: "{}".into(),
        };
        let error = InitDataDocument::from_attestation(&json).expect_err("json");
        assert!(error.to_string().contains("\"json\""), "{error}");
        for (text, word) in [
            ("version = \"0.1.0\"\n[data]\n", "algorithm"),
            ("algorithm = \"md5\"\nversion = \"0.1.0\"\n[data]\n", "md5"),
            ("algorithm = \"sha384\"\nversion = \"0.1.0\"\n", "data"),
            (
                "algorithm = \"sha384\"\nversion = \"0.1.0\"\n[data]\nk = 1\n",
                "string",
            ),
        ] {
            let error = InitDataDocument::from_toml(text).expect_err(text);
            assert!(error.to_string().contains(word), "{word}: {error}");
        }
    }
}
