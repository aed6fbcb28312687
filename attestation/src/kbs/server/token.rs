//! The attestation token `/attest` answers: a JWT (RFC 7519) signed ES256
//! with the broker's own P-256 key, kept in the state folder
//! (`token-signing-key.pem`, mode 0600). It tells the guest what the broker
//! verified, and it is the guest's passport: presented as
//! `Authorization: Bearer` on a resource request (Trustee's passport mode),
//! it names (`jti`) the attestation the broker holds for it until `exp`.
//! A resource is released on that held attestation, never on what a token
//! claims.
//!
//! This module must never put a secret in a claim, and never accept a
//! token it did not sign or whose lifetime is over.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::{Private, Public};
use serde_json::Value;

/// The key's file name in the state folder.
pub const SIGNING_KEY_FILE: &str = "token-signing-key.pem";

/// The `iss` of every token.
pub const ISSUER: &str = "hsev-kbs";

/// The JOSE header of every token, as signed.
const HEADER: &[u8] = br#"{"alg":"ES256","typ":"JWT"}"#;

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
    /// A presented token that is not one this broker issued, or is over.
    #[error("attestation token: {0}")]
    Invalid(String),
    /// OpenSSL failed while signing.
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

/// A token whose signature and lifetime checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// Its `jti`: the attestation it stands for.
    pub id: String,
    /// Its `exp`, in seconds since the epoch.
    pub expires: i64,
}

fn invalid(problem: impl Into<String>) -> TokenError {
    TokenError::Invalid(problem.into())
}

/// Signs attestation tokens, and verifies those presented back.
pub struct TokenSigner {
    key: EcKey<Private>,
    public: EcKey<Public>,
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
        let public = EcKey::from_public_key(key.group(), key.public_key())?;
        Ok(TokenSigner { key, public })
    }

    /// The compact JWS of `claims`.
    pub fn sign(&self, claims: &Value) -> Result<String, TokenError> {
        let header = URL_SAFE_NO_PAD.encode(HEADER);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        let digest = openssl::sha::sha256(signing_input.as_bytes());
        let signature = EcdsaSig::sign(&digest, &self.key)?;
        let mut raw = signature.r().to_vec_padded(32)?;
        raw.extend_from_slice(&signature.s().to_vec_padded(32)?);
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(raw)))
    }

    /// Checks a presented token: this broker's header and ES256 signature,
    /// its issuer, an `exp` after `now` (seconds since the epoch), and a
    /// `jti`. Says which of these fails, never more.
    pub fn verify(&self, token: &str, now: i64) -> Result<VerifiedToken, TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("not a compact JWS (three base64url parts)"));
        };
        if header != URL_SAFE_NO_PAD.encode(HEADER) {
            return Err(invalid("not issued by this broker (another JOSE header)"));
        }
        let raw = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| invalid("the signature is not base64url"))?;
        if raw.len() != 64 {
            return Err(invalid("the signature is not an ES256 one (64 bytes)"));
        }
        let signature = EcdsaSig::from_private_components(
            BigNum::from_slice(&raw[..32])?,
            BigNum::from_slice(&raw[32..])?,
        )?;
        let digest = openssl::sha::sha256(format!("{header}.{payload}").as_bytes());
        if !signature.verify(&digest, &self.public)? {
            return Err(invalid(
                "the signature does not verify with this broker's key",
            ));
        }
        let claims: Value = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or_else(|| invalid("the claims are not base64url JSON"))?;
        if claims["iss"] != ISSUER {
            return Err(invalid(format!("issuer {}, not {ISSUER}", claims["iss"])));
        }
        let expires = claims["exp"]
            .as_i64()
            .ok_or_else(|| invalid("no exp claim"))?;
        if expires <= now {
            return Err(invalid(format!(
                "expired {} s ago: attest again",
                now.saturating_sub(expires)
            )));
        }
        let id = claims["jti"]
            .as_str()
            .ok_or_else(|| invalid("no jti claim"))?
            .to_owned();
        Ok(VerifiedToken { id, expires })
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn presented_tokens_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        TokenSigner::create(dir.path()).expect("creates");
        let signer = TokenSigner::load(dir.path()).expect("loads");
        let claims = serde_json::json!({"iss": ISSUER, "exp": 1000, "jti": "a-1"});
        let token = signer.sign(&claims).expect("signs");
        assert_eq!(
            signer.verify(&token, 999).expect("valid"),
            VerifiedToken {
                id: "a-1".into(),
                expires: 1000
            }
        );
        let refused = |token: &str, now: i64, word: &str| {
            let error = signer.verify(token, now).expect_err(word).to_string();
            assert!(error.contains(word), "{word}: {error}");
        };
        refused(&token, 1000, "expired");
        // Another broker's key, a flipped signature bit, other claims.
        let other_dir = tempfile::tempdir().expect("tempdir");
        TokenSigner::create(other_dir.path()).expect("creates");
        let other = TokenSigner::load(other_dir.path()).expect("loads");
        refused(&other.sign(&claims).expect("signs"), 999, "does not verify");
        let mut bytes = token.clone().into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        refused(&String::from_utf8(bytes).expect("ascii"), 999, "signature");
        let (signed, _) = token.rsplit_once('.').expect("three parts");
        let forged_claims =
            URL_SAFE_NO_PAD.encode(br#"{"iss":"hsev-kbs","exp":99999,"jti":"a-1"}"#);
        let header = signed.split('.').next().expect("header");
        let signature = token.rsplit('.').next().expect("signature");
        refused(
            &format!("{header}.{forged_claims}.{signature}"),
            999,
            "does not verify",
        );
        refused("a.b", 999, "three");
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        refused(&format!("{none_header}.{forged_claims}."), 999, "header");
        for claims in [
            serde_json::json!({"iss": "trustee", "exp": 1000, "jti": "a"}),
            serde_json::json!({"iss": ISSUER, "jti": "a"}),
            serde_json::json!({"iss": ISSUER, "exp": 1000}),
        ] {
            let token = signer.sign(&claims).expect("signs");
            assert!(signer.verify(&token, 999).is_err(), "{claims}");
        }
    }
}
