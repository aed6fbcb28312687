//! The attestation token `/attest` answers: a JWT (RFC 7519) signed ES256
//! with the broker's own P-256 key, kept in the state folder
//! (`token-signing-key.pem`, mode 0600). It tells the guest what the broker
//! verified; resources are released on the session, never on the token.
//!
//! This module must never put a secret in a claim.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::Private;
use serde_json::Value;

/// The key's file name in the state folder.
pub const SIGNING_KEY_FILE: &str = "token-signing-key.pem";

/// Why the signing key cannot be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The key file is missing, unreadable, too open, or not a P-256 key.
    #[error("token signing key {path}: {problem}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// OpenSSL failed while signing.
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

/// Signs attestation tokens.
pub struct TokenSigner {
    key: EcKey<Private>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(..)")
    }
}

fn p256() -> Result<EcGroup, TokenError> {
    Ok(EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?)
}

impl TokenSigner {
    /// Writes a fresh key to `<state_dir>/token-signing-key.pem` (0600),
    /// never over an existing one.
    pub fn create(state_dir: &Path) -> Result<(), TokenError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = state_dir.join(SIGNING_KEY_FILE);
        let problem = |error: std::io::Error| TokenError::Key {
            path: path.display().to_string(),
            problem: error.to_string(),
        };
        let key = EcKey::generate(p256()?.as_ref())?;
        let pem = zeroize::Zeroizing::new(key.private_key_to_pem()?);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(problem)?;
        file.write_all(&pem)
            .and_then(|()| file.sync_all())
            .map_err(problem)
    }

    /// Reads the key of `state_dir`.
    pub fn load(state_dir: &Path) -> Result<Self, TokenError> {
        use std::os::unix::fs::PermissionsExt;
        let path = state_dir.join(SIGNING_KEY_FILE);
        let problem = |problem: String| TokenError::Key {
            path: path.display().to_string(),
            problem,
        };
        let metadata = std::fs::metadata(&path)
            .map_err(|error| problem(format!("{error} (hsev-kbs init creates it)")))?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(problem(format!(
                "mode {mode:04o} lets group or others read it: chmod 600"
            )));
        }
        let pem = zeroize::Zeroizing::new(
            std::fs::read(&path).map_err(|error| problem(error.to_string()))?,
        );
        let key = EcKey::private_key_from_pem(&pem)
            .map_err(|error| problem(format!("not an EC private key: {error}")))?;
        if key.group().curve_name() != Some(Nid::X9_62_PRIME256V1) {
            return Err(problem("not a P-256 key".into()));
        }
        Ok(TokenSigner { key })
    }

    /// The compact JWS of `claims`.
    pub fn sign(&self, claims: &Value) -> Result<String, TokenError> {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        let digest = openssl::sha::sha256(signing_input.as_bytes());
        let signature = EcdsaSig::sign(&digest, &self.key)?;
        let mut raw = signature.r().to_vec_padded(32)?;
        raw.extend_from_slice(&signature.s().to_vec_padded(32)?);
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(raw)))
    }
}

#[cfg(test)]
mod tests {
    use openssl::bn::BigNum;

    use super::*;

    #[test]
    fn tokens_verify_with_the_public_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        TokenSigner::create(dir.path()).expect("creates");
        assert!(TokenSigner::create(dir.path()).is_err(), "never overwrites");
        let signer = TokenSigner::load(dir.path()).expect("loads");
        let token = signer
            .sign(&serde_json::json!({"iss": "hsev-kbs"}))
            .expect("signs");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let raw = URL_SAFE_NO_PAD.decode(parts[2]).expect("b64");
        assert_eq!(raw.len(), 64);
        let signature = EcdsaSig::from_private_components(
            BigNum::from_slice(&raw[..32]).expect("r"),
            BigNum::from_slice(&raw[32..]).expect("s"),
        )
        .expect("signature");
        let public =
            EcKey::from_public_key(signer.key.group(), signer.key.public_key()).expect("public");
        let digest = openssl::sha::sha256(format!("{}.{}", parts[0], parts[1]).as_bytes());
        assert!(signature.verify(&digest, &public).expect("verifies"));
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        assert_eq!(claims["iss"], "hsev-kbs");
    }
}
