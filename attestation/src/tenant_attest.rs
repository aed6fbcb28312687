//! A tenant's own attestation of its running VM (`hsev vm attest`): the
//! tenant sends a fresh nonce, the guest's agent answers with evidence whose
//! `report_data` binds it, the host only relays the two lines over the
//! virtio-serial port [`PORT_NAME`], and the tenant judges the evidence on
//! its own machine.
//!
//! The agent never puts a caller's bytes into `report_data` as they are: it
//! binds SHA-512 of a label and the nonce ([`report_data_for`]). A host that
//! relays the requests therefore cannot make the guest sign a `report_data`
//! of its choosing, such as the binding a key broker expects for a key pair
//! the host holds.
//!
//! This module owns the wire shapes and the binding; it never does I/O.

use serde::{Deserialize, Serialize};

/// The virtio-serial port the agent answers attestation requests on.
pub const PORT_NAME: &str = "org.hypersev.attest.0";

/// The longest line either side reads (evidence with its certificates).
pub const MAX_LINE: usize = 64 * 1024;

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 64;

/// The label that separates this binding from every other use of a report.
const LABEL: &[u8] = b"hsev vm attest v1\0";

/// The `report_data` evidence for `nonce` must carry.
pub fn report_data_for(nonce: &[u8; NONCE_LEN]) -> [u8; 64] {
    let mut hasher = openssl::sha::Sha512::new();
    hasher.update(LABEL);
    hasher.update(nonce);
    hasher.finish()
}

/// A request line: the tenant's nonce, hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestRequest {
    /// 128 hex digits.
    pub nonce: String,
}

impl AttestRequest {
    /// The request for `nonce`.
    pub fn new(nonce: &[u8; NONCE_LEN]) -> Self {
        AttestRequest {
            nonce: hex::encode(nonce),
        }
    }

    /// The nonce, checked.
    pub fn nonce(&self) -> Result<[u8; NONCE_LEN], String> {
        hex::decode(&self.nonce)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| format!("the nonce must be {} hex digits", 2 * NONCE_LEN))
    }
}

/// An answer line: the evidence (Trustee's JSON form, with the
/// certificates), or why there is none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttestAnswer {
    /// `SnpEvidence` as JSON.
    Evidence(serde_json::Value),
    /// The guest could not produce evidence.
    Error(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binding_is_labelled_and_never_the_nonce_itself() {
        let nonce = [7u8; NONCE_LEN];
        let bound = report_data_for(&nonce);
        assert_ne!(bound, nonce, "a caller never chooses report_data");
        assert_ne!(bound, report_data_for(&[8u8; NONCE_LEN]));
        let mut expected = LABEL.to_vec();
        expected.extend_from_slice(&nonce);
        assert_eq!(bound, openssl::sha::sha512(&expected));
    }

    #[test]
    fn lines_round_trip() {
        let request = AttestRequest::new(&[0xab; NONCE_LEN]);
        let line = serde_json::to_string(&request).expect("serializes");
        let back: AttestRequest = serde_json::from_str(&line).expect("parses");
        assert_eq!(back.nonce(), Ok([0xab; NONCE_LEN]));
        assert!(AttestRequest { nonce: "00".into() }.nonce().is_err());
        let answer: AttestAnswer =
            serde_json::from_str(r#"{"error":"no Secure Processor"}"#).expect("parses");
        assert_eq!(answer, AttestAnswer::Error("no Secure Processor".into()));
    }
}
