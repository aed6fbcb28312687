//! JWE (RFC 7516) in the flattened JSON serialization, for exactly the
//! algorithms Trustee's client uses: key management `ECDH-ES+A256KW` on
//! P-256 or P-521 (Concat KDF, RFC 7518 section 4.6, and AES key wrap,
//! RFC 3394) or `RSA-OAEP-256`, content encryption `A256GCM` with the
//! protected header as additional authenticated data.
//!
//! The protected header is written in its RFC 8785 canonical form (keys
//! sorted, no whitespace): Trustee's client does not authenticate the
//! bytes it receives but re-serialises the header it parsed with sorted
//! keys (kbs-types' `ProtectedHeader::generate_aad`), so only a canonical
//! header authenticates on both sides. A receiver that uses the received
//! bytes, as RFC 7516 says and this module does, authenticates it too.
//!
//! `RSA1_5` (PKCS #1 v1.5 key transport), which Trustee's KBS still
//! offers, is refused: its padding oracles are why JOSE deprecates it.
//!
//! Built on the `openssl` crate the rest of this crate already trusts: the
//! JOSE crates that are well kept build on other cryptographic back ends
//! (or on none), and none covers these algorithms over OpenSSL, so the few
//! steps the RFCs define are written here, each checked against the RFCs'
//! published vectors in the tests below.
//!
//! This module owns the client's ephemeral key pair and the wrapping of a
//! resource to it. It must never accept a ciphertext it cannot
//! authenticate, never say which step of a decryption failed (no oracle),
//! and never keep a content key or secret past its use (all zeroized).

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::encrypt::{Decrypter, Encrypter};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private, Public};
use openssl::rsa::{Padding, Rsa};
use openssl::symm::Cipher;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::protocol::{JweResponse, TeePubKey};

/// `alg` of ECDH-ES with AES-256 key wrap.
const ECDH_ES_A256KW: &str = "ECDH-ES+A256KW";
/// `alg` of RSA-OAEP with SHA-256 and MGF1-SHA-256.
const RSA_OAEP_256: &str = "RSA-OAEP-256";
/// `alg` of RSA PKCS #1 v1.5 key transport: refused.
const RSA1_5: &str = "RSA1_5";
/// `enc` of AES-256-GCM.
const A256GCM: &str = "A256GCM";
/// Modulus size of the RSA keys this module generates.
const RSA_BITS: u32 = 3072;
/// Smallest RSA modulus accepted from a peer.
const RSA_MIN_BITS: u32 = 2048;
const GCM_IV_LEN: usize = 12;
const GCM_TAG_LEN: usize = 16;
const CEK_LEN: usize = 32;

/// Why a JWE cannot be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum JweError {
    /// A field or header is missing, not base64url, or of the wrong shape.
    #[error("malformed JWE {field}: {problem}")]
    Malformed {
        /// The field (`protected`, `iv`, `epk`, ...).
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A public key this module refuses to encrypt to.
    #[error("unusable tee-pubkey: {0}")]
    UnusableKey(String),
    /// An algorithm this module does not implement, or not the key's.
    #[error("unsupported JWE algorithm: {0}")]
    Unsupported(String),
    /// Authentication failed: the JWE was altered or is not for this key.
    #[error("the JWE does not decrypt with this key (altered, or for another key)")]
    Decrypt,
    /// The protected header has no canonical form (cannot happen for the
    /// headers this module writes; kept so no error is swallowed).
    #[error("protected header: {0}")]
    Canonical(#[from] serde_json::Error),
    /// OpenSSL failed while making a JWE.
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

fn malformed(field: &'static str, problem: impl Into<String>) -> JweError {
    JweError::Malformed {
        field,
        problem: problem.into(),
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(field: &'static str, text: &str) -> Result<Vec<u8>, JweError> {
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|error| malformed(field, format!("not base64url without padding: {error}")))
}

/// The curves ECDH-ES+A256KW is accepted on: those Trustee's client
/// offers (P-256, its default, and P-521).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P521,
}

impl Curve {
    fn from_jose(name: &str) -> Option<Self> {
        match name {
            "P-256" => Some(Curve::P256),
            "P-521" => Some(Curve::P521),
            _ => None,
        }
    }

    fn jose_name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P521 => "P-521",
        }
    }

    /// Bytes of one affine coordinate (RFC 7518 section 6.2.1.2).
    fn coordinate_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P521 => 66,
        }
    }

    /// The curve's group, built once: building it costs as much as an ECDH.
    fn group(self) -> Result<&'static EcGroup, JweError> {
        static P256_GROUP: OnceLock<EcGroup> = OnceLock::new();
        static P521_GROUP: OnceLock<EcGroup> = OnceLock::new();
        let (cell, nid) = match self {
            Curve::P256 => (&P256_GROUP, Nid::X9_62_PRIME256V1),
            Curve::P521 => (&P521_GROUP, Nid::SECP521R1),
        };
        if let Some(group) = cell.get() {
            return Ok(group);
        }
        let group = EcGroup::from_curve_name(nid)?;
        Ok(cell.get_or_init(|| group))
    }
}

/// The key-management algorithms of [`TeeKeyPair`], as Trustee's client
/// names them (`TeeKeyAlgorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// ECDH-ES on P-256, the derived key wrapping the content key (A256KW).
    EcdhEsA256kwP256,
    /// The same on P-521.
    EcdhEsA256kwP521,
    /// RSA-OAEP with SHA-256 (3072-bit keys generated, 2048 accepted).
    RsaOaep256,
}

impl KeyAlgorithm {
    /// The JOSE `alg` name.
    pub fn jose_name(self) -> &'static str {
        match self {
            KeyAlgorithm::EcdhEsA256kwP256 | KeyAlgorithm::EcdhEsA256kwP521 => ECDH_ES_A256KW,
            KeyAlgorithm::RsaOaep256 => RSA_OAEP_256,
        }
    }

    fn curve(self) -> Option<Curve> {
        match self {
            KeyAlgorithm::EcdhEsA256kwP256 => Some(Curve::P256),
            KeyAlgorithm::EcdhEsA256kwP521 => Some(Curve::P521),
            KeyAlgorithm::RsaOaep256 => None,
        }
    }

    fn for_curve(curve: Curve) -> Self {
        match curve {
            Curve::P256 => KeyAlgorithm::EcdhEsA256kwP256,
            Curve::P521 => KeyAlgorithm::EcdhEsA256kwP521,
        }
    }
}

/// The affine coordinates of an EC public key on `curve`, padded to the
/// curve's coordinate length.
fn ec_coordinates(
    key: &EcKey<impl openssl::pkey::HasPublic>,
    curve: Curve,
) -> Result<(Vec<u8>, Vec<u8>), JweError> {
    let group = key.group();
    let mut x = BigNum::new()?;
    let mut y = BigNum::new()?;
    let mut context = BigNumContext::new()?;
    key.public_key()
        .affine_coordinates(group, &mut x, &mut y, &mut context)?;
    let length = i32::try_from(curve.coordinate_len()).unwrap_or(i32::MAX);
    Ok((x.to_vec_padded(length)?, y.to_vec_padded(length)?))
}

/// A public key on `curve` from base64url coordinates, checked to lie on
/// the curve (an invalid point would leak the private key through ECDH).
/// Decoding the uncompressed point runs OpenSSL's on-curve check; P-256
/// and P-521 have cofactor 1, so a point on the curve is in the
/// prime-order group and the costlier order multiplication of
/// `EC_KEY_check_key` adds nothing (the point at infinity has no
/// uncompressed encoding). Derivations therefore need not check the peer
/// again.
fn ec_public_key(
    curve: Curve,
    x: &str,
    y: &str,
    field: &'static str,
) -> Result<PKey<Public>, JweError> {
    let x = unb64(field, x)?;
    let y = unb64(field, y)?;
    let length = curve.coordinate_len();
    if x.len() != length || y.len() != length {
        return Err(malformed(
            field,
            format!("{} coordinates are {length} bytes each", curve.jose_name()),
        ));
    }
    let group = curve.group()?;
    let mut encoded = Vec::with_capacity(1 + 2 * length);
    encoded.push(0x04);
    encoded.extend_from_slice(&x);
    encoded.extend_from_slice(&y);
    let mut context = BigNumContext::new()?;
    let point = EcPoint::from_bytes(group, &encoded, &mut context)
        .map_err(|_| malformed(field, format!("the point is not on {}", curve.jose_name())))?;
    Ok(PKey::from_ec_key(EcKey::from_public_key(group, &point)?)?)
}
/// The Concat KDF of NIST SP 800-56A as JWA profiles it (RFC 7518 section
/// 4.6.2): SHA-256 rounds over `counter || Z || OtherInfo`, OtherInfo being
/// the length-prefixed AlgorithmID, PartyUInfo and PartyVInfo and the key
/// length in bits.
fn concat_kdf(
    shared_secret: &[u8],
    algorithm_id: &[u8],
    party_u: &[u8],
    party_v: &[u8],
    key_bits: u32,
) -> Zeroizing<Vec<u8>> {
    let key_len = (key_bits as usize).div_ceil(8);
    let mut other_info = Vec::new();
    for field in [algorithm_id, party_u, party_v] {
        let length = u32::try_from(field.len()).unwrap_or(u32::MAX);
        other_info.extend_from_slice(&length.to_be_bytes());
        other_info.extend_from_slice(field);
    }
    other_info.extend_from_slice(&key_bits.to_be_bytes());
    let mut derived = Zeroizing::new(Vec::with_capacity(key_len + 32));
    let mut counter: u32 = 1;
    while derived.len() < key_len {
        let mut hasher = openssl::sha::Sha256::new();
        hasher.update(&counter.to_be_bytes());
        hasher.update(shared_secret);
        hasher.update(&other_info);
        let round = Zeroizing::new(hasher.finish());
        derived.extend_from_slice(round.as_slice());
        counter += 1;
    }
    derived.truncate(key_len);
    derived
}

/// The ECDH-ES+A256KW key-encryption key shared by `private` and `peer`.
fn ecdh_kek(private: &PKey<Private>, peer: &PKey<Public>) -> Result<Zeroizing<Vec<u8>>, JweError> {
    let mut deriver = openssl::derive::Deriver::new(private)?;
    // `peer` was checked when it was built (see `ec_public_key`).
    deriver.set_peer_ex(peer, false)?;
    let shared = Zeroizing::new(deriver.derive_to_vec()?);
    Ok(concat_kdf(
        &shared,
        ECDH_ES_A256KW.as_bytes(),
        b"",
        b"",
        256,
    ))
}

/// RFC 3394 AES key wrap of `cek` under `kek`.
fn aes_wrap(kek: &[u8], cek: &[u8]) -> Result<Vec<u8>, JweError> {
    let key = openssl::aes::AesKey::new_encrypt(kek)
        .map_err(|_| JweError::Unsupported("AES key-wrap key of a wrong size".into()))?;
    let mut wrapped = vec![0u8; cek.len() + 8];
    openssl::aes::wrap_key(&key, None, &mut wrapped, cek)
        .map_err(|_| JweError::Unsupported("AES key wrap of a wrong-sized key".into()))?;
    Ok(wrapped)
}

/// RFC 3394 AES key unwrap; fails on any alteration.
fn aes_unwrap(kek: &[u8], wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, JweError> {
    if wrapped.len() != CEK_LEN + 8 {
        return Err(JweError::Decrypt);
    }
    let key = openssl::aes::AesKey::new_decrypt(kek).map_err(|_| JweError::Decrypt)?;
    let mut cek = Zeroizing::new(vec![0u8; CEK_LEN]);
    openssl::aes::unwrap_key(&key, None, &mut cek, wrapped).map_err(|_| JweError::Decrypt)?;
    Ok(cek)
}

/// The AAD of the content encryption: ASCII(protected), or with `aad`
/// present ASCII(protected || '.' || aad) (RFC 7516 section 5.1 step 14).
fn content_aad(protected: &str, aad: Option<&str>) -> Vec<u8> {
    match aad {
        Some(aad) => format!("{protected}.{aad}").into_bytes(),
        None => protected.as_bytes().to_vec(),
    }
}

/// A parsed public key a resource can be encrypted to.
#[derive(Clone)]
pub struct RecipientKey {
    algorithm: KeyAlgorithm,
    key: PKey<Public>,
}

impl std::fmt::Debug for RecipientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecipientKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl RecipientKey {
    /// Checks a JWK from runtime data: a P-256 or P-521 point on its curve
    /// for ECDH-ES+A256KW, an RSA key of at least 2048 bits for
    /// RSA-OAEP-256.
    pub fn from_jwk(jwk: &TeePubKey) -> Result<Self, JweError> {
        match jwk {
            TeePubKey::EC { crv, alg, x, y } => {
                if alg != ECDH_ES_A256KW {
                    return Err(JweError::UnusableKey(format!(
                        "EC key for alg {alg:?}; only {ECDH_ES_A256KW} is supported"
                    )));
                }
                let curve = Curve::from_jose(crv).ok_or_else(|| {
                    JweError::UnusableKey(format!("curve {crv:?}; P-256 and P-521 are supported"))
                })?;
                let key = ec_public_key(curve, x, y, "tee-pubkey")
                    .map_err(|error| JweError::UnusableKey(error.to_string()))?;
                Ok(RecipientKey {
                    algorithm: KeyAlgorithm::for_curve(curve),
                    key,
                })
            }
            TeePubKey::RSA { alg, k_mod, k_exp } => {
                if alg == RSA1_5 {
                    return Err(JweError::UnusableKey(format!(
                        "RSA key for alg {RSA1_5}: this broker refuses PKCS #1 v1.5 key transport \
                         (open to padding-oracle attacks, deprecated for JOSE); use {RSA_OAEP_256} \
                         or {ECDH_ES_A256KW}"
                    )));
                }
                if alg != RSA_OAEP_256 {
                    return Err(JweError::UnusableKey(format!(
                        "RSA key for alg {alg:?}; only {RSA_OAEP_256} is supported"
                    )));
                }
                let unusable = |error: JweError| JweError::UnusableKey(error.to_string());
                let modulus = BigNum::from_slice(&unb64("tee-pubkey.n", k_mod).map_err(unusable)?)?;
                let exponent =
                    BigNum::from_slice(&unb64("tee-pubkey.e", k_exp).map_err(unusable)?)?;
                if modulus.num_bits() < i32::try_from(RSA_MIN_BITS).unwrap_or(i32::MAX) {
                    return Err(JweError::UnusableKey(format!(
                        "RSA modulus of {} bits; at least {RSA_MIN_BITS} required",
                        modulus.num_bits()
                    )));
                }
                if !exponent.is_bit_set(0) || exponent.num_bits() < 2 || exponent.num_bits() > 32 {
                    return Err(JweError::UnusableKey(
                        "RSA public exponent must be odd, at least 3 and fit 32 bits".into(),
                    ));
                }
                let key = PKey::from_rsa(Rsa::from_public_components(modulus, exponent)?)?;
                Ok(RecipientKey {
                    algorithm: KeyAlgorithm::RsaOaep256,
                    key,
                })
            }
            TeePubKey::AKP { alg, .. } => Err(JweError::UnusableKey(format!(
                "AKP key for alg {alg:?}: post-quantum key encapsulation is not supported; use \
                 {ECDH_ES_A256KW} or {RSA_OAEP_256}"
            ))),
        }
    }

    /// The key-management algorithm the key is for.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// Encrypts `plaintext` to this key: a fresh content key, and for
    /// ECDH-ES a fresh ephemeral key, for every call. The protected header
    /// is canonical (see the module documentation).
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<JweResponse, JweError> {
        let mut cek = Zeroizing::new([0u8; CEK_LEN]);
        openssl::rand::rand_bytes(cek.as_mut_slice())?;
        let (header, encrypted_key) = match self.algorithm.curve() {
            Some(curve) => {
                let ephemeral = EcKey::generate(curve.group()?)?;
                let (x, y) = ec_coordinates(&ephemeral, curve)?;
                let kek = ecdh_kek(&PKey::from_ec_key(ephemeral)?, &self.key)?;
                let header = serde_json::json!({
                    "alg": ECDH_ES_A256KW,
                    "enc": A256GCM,
                    "epk": {"crv": curve.jose_name(), "kty": "EC", "x": b64(&x), "y": b64(&y)},
                });
                (header, aes_wrap(&kek, cek.as_slice())?)
            }
            None => {
                let mut encrypter = Encrypter::new(&self.key)?;
                encrypter.set_rsa_padding(Padding::PKCS1_OAEP)?;
                encrypter.set_rsa_oaep_md(MessageDigest::sha256())?;
                encrypter.set_rsa_mgf1_md(MessageDigest::sha256())?;
                let mut encrypted = vec![0u8; encrypter.encrypt_len(cek.as_slice())?];
                let length = encrypter.encrypt(cek.as_slice(), &mut encrypted)?;
                encrypted.truncate(length);
                let header = serde_json::json!({"alg": RSA_OAEP_256, "enc": A256GCM});
                (header, encrypted)
            }
        };
        let protected = b64(&serde_json_canonicalizer::to_vec(&header)?);
        let mut iv = [0u8; GCM_IV_LEN];
        openssl::rand::rand_bytes(&mut iv)?;
        let mut tag = [0u8; GCM_TAG_LEN];
        let ciphertext = openssl::symm::encrypt_aead(
            Cipher::aes_256_gcm(),
            cek.as_slice(),
            Some(&iv),
            &content_aad(&protected, None),
            plaintext,
            &mut tag,
        )?;
        Ok(JweResponse {
            protected,
            encrypted_key: b64(&encrypted_key),
            iv: b64(&iv),
            ciphertext: b64(&ciphertext),
            tag: b64(&tag),
            aad: None,
        })
    }
}

/// Encrypts `plaintext` to the JWK `recipient` (see [`RecipientKey`]).
pub fn encrypt(recipient: &TeePubKey, plaintext: &[u8]) -> Result<JweResponse, JweError> {
    RecipientKey::from_jwk(recipient)?.encrypt(plaintext)
}

/// The protected header fields this module reads; any other than the
/// registered informational ones is refused, and so is `crit`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProtectedHeader {
    alg: String,
    enc: String,
    #[serde(default)]
    epk: Option<EphemeralKey>,
    #[serde(default, rename = "kid")]
    _kid: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "typ")]
    _typ: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "cty")]
    _cty: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EphemeralKey {
    kty: String,
    crv: String,
    x: String,
    y: String,
}

/// The client's ephemeral key pair: its public half goes into the runtime
/// data, and only it can open the resource the broker wraps to it.
pub struct TeeKeyPair {
    algorithm: KeyAlgorithm,
    key: PKey<Private>,
}

impl std::fmt::Debug for TeeKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeeKeyPair")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl TeeKeyPair {
    /// A fresh key pair (P-256, P-521, or RSA-3072).
    pub fn generate(algorithm: KeyAlgorithm) -> Result<Self, JweError> {
        let key = match algorithm.curve() {
            Some(curve) => PKey::from_ec_key(EcKey::generate(curve.group()?)?)?,
            None => PKey::from_rsa(Rsa::generate(RSA_BITS)?)?,
        };
        Ok(TeeKeyPair { algorithm, key })
    }

    /// The key-management algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The public half as a JWK, for the runtime data.
    pub fn public_jwk(&self) -> Result<TeePubKey, JweError> {
        match self.algorithm.curve() {
            Some(curve) => {
                let (x, y) = ec_coordinates(&self.key.ec_key()?, curve)?;
                Ok(TeePubKey::EC {
                    crv: curve.jose_name().into(),
                    alg: ECDH_ES_A256KW.into(),
                    x: b64(&x),
                    y: b64(&y),
                })
            }
            None => {
                let rsa = self.key.rsa()?;
                Ok(TeePubKey::RSA {
                    alg: RSA_OAEP_256.into(),
                    k_mod: b64(&rsa.n().to_vec()),
                    k_exp: b64(&rsa.e().to_vec()),
                })
            }
        }
    }

    /// Opens a JWE made for this key; any altered field is refused.
    pub fn decrypt(&self, jwe: &JweResponse) -> Result<Zeroizing<Vec<u8>>, JweError> {
        let header_json = unb64("protected", &jwe.protected)?;
        let header: ProtectedHeader = serde_json::from_slice(&header_json)
            .map_err(|error| malformed("protected", error.to_string()))?;
        if header.alg != self.algorithm.jose_name() {
            return Err(JweError::Unsupported(format!(
                "alg {:?}, but this key is for {}",
                header.alg,
                self.algorithm.jose_name()
            )));
        }
        if header.enc != A256GCM {
            return Err(JweError::Unsupported(format!(
                "enc {:?}; only {A256GCM} is supported",
                header.enc
            )));
        }
        let encrypted_key = unb64("encrypted_key", &jwe.encrypted_key)?;
        let iv = unb64("iv", &jwe.iv)?;
        let ciphertext = unb64("ciphertext", &jwe.ciphertext)?;
        let tag = unb64("tag", &jwe.tag)?;
        if iv.len() != GCM_IV_LEN {
            return Err(malformed("iv", format!("{} bytes, expected 12", iv.len())));
        }
        // GCM accepts truncated tags; a JWE's is always 128 bits.
        if tag.len() != GCM_TAG_LEN {
            return Err(malformed(
                "tag",
                format!("{} bytes, expected 16", tag.len()),
            ));
        }
        if let Some(aad) = &jwe.aad {
            unb64("aad", aad)?;
        }
        let cek = match self.algorithm.curve() {
            Some(curve) => {
                let epk = header
                    .epk
                    .ok_or_else(|| malformed("protected", "no epk for ECDH-ES"))?;
                if epk.kty != "EC" || epk.crv != curve.jose_name() {
                    return Err(malformed(
                        "epk",
                        format!("not a {} EC key", curve.jose_name()),
                    ));
                }
                let peer = ec_public_key(curve, &epk.x, &epk.y, "epk")?;
                let kek = ecdh_kek(&self.key, &peer).map_err(|_| JweError::Decrypt)?;
                aes_unwrap(&kek, &encrypted_key)?
            }
            None => {
                if header.epk.is_some() {
                    return Err(malformed("protected", "epk with RSA-OAEP-256"));
                }
                let unwrap = || -> Result<Zeroizing<Vec<u8>>, openssl::error::ErrorStack> {
                    let mut decrypter = Decrypter::new(&self.key)?;
                    decrypter.set_rsa_padding(Padding::PKCS1_OAEP)?;
                    decrypter.set_rsa_oaep_md(MessageDigest::sha256())?;
                    decrypter.set_rsa_mgf1_md(MessageDigest::sha256())?;
                    let mut cek = Zeroizing::new(vec![0u8; decrypter.decrypt_len(&encrypted_key)?]);
                    let length = decrypter.decrypt(&encrypted_key, &mut cek)?;
                    cek.truncate(length);
                    Ok(cek)
                };
                let cek = unwrap().map_err(|_| JweError::Decrypt)?;
                if cek.len() != CEK_LEN {
                    return Err(JweError::Decrypt);
                }
                cek
            }
        };
        let plaintext = openssl::symm::decrypt_aead(
            Cipher::aes_256_gcm(),
            &cek,
            Some(&iv),
            &content_aad(&jwe.protected, jwe.aad.as_deref()),
            &ciphertext,
            &tag,
        )
        .map_err(|_| JweError::Decrypt)?;
        Ok(Zeroizing::new(plaintext))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(algorithm: KeyAlgorithm) {
        let pair = TeeKeyPair::generate(algorithm).expect("key pair");
        let jwk = pair.public_jwk().expect("jwk");
        let secret = b"the disk key of vm 7".to_vec();
        let jwe = encrypt(&jwk, &secret).expect("encrypts");
        assert_eq!(pair.decrypt(&jwe).expect("decrypts").as_slice(), secret);
        // Two encryptions of the same plaintext share nothing.
        let again = encrypt(&jwk, &secret).expect("encrypts");
        assert_ne!(again.encrypted_key, jwe.encrypted_key);
        assert_ne!(again.ciphertext, jwe.ciphertext);

        // Flipping one bit of any field is refused.
        let flip = |text: &str| -> String {
            let mut bytes = URL_SAFE_NO_PAD.decode(text).expect("base64url");
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            b64(&bytes)
        };
        let tampered: [(&str, JweResponse); 5] = [
            (
                "protected",
                JweResponse {
                    protected: flip(&jwe.protected),
                    ..jwe.clone()
                },
            ),
            (
                "encrypted_key",
                JweResponse {
                    encrypted_key: flip(&jwe.encrypted_key),
                    ..jwe.clone()
                },
            ),
            (
                "iv",
                JweResponse {
                    iv: flip(&jwe.iv),
                    ..jwe.clone()
                },
            ),
            (
                "ciphertext",
                JweResponse {
                    ciphertext: flip(&jwe.ciphertext),
                    ..jwe.clone()
                },
            ),
            (
                "tag",
                JweResponse {
                    tag: flip(&jwe.tag),
                    ..jwe.clone()
                },
            ),
        ];
        for (field, jwe) in tampered {
            assert!(
                pair.decrypt(&jwe).is_err(),
                "{algorithm:?}: altered {field} accepted"
            );
        }
        // Added AAD, a truncated tag, or another key: refused.
        let with_aad = JweResponse {
            aad: Some(b64(b"extra")),
            ..jwe.clone()
        };
        assert!(pair.decrypt(&with_aad).is_err());
        let short_tag = JweResponse {
            tag: b64(&[0u8; 8]),
            ..jwe.clone()
        };
        assert!(matches!(
            pair.decrypt(&short_tag),
            Err(JweError::Malformed { field: "tag", .. })
        ));
        let other = TeeKeyPair::generate(algorithm).expect("key pair");
        assert!(matches!(other.decrypt(&jwe), Err(JweError::Decrypt)));
    }

    #[test]
    fn ecdh_es_a256kw_round_trip() {
        round_trip(KeyAlgorithm::EcdhEsA256kwP256);
    }

    #[test]
    fn ecdh_es_a256kw_on_p521_round_trip() {
        round_trip(KeyAlgorithm::EcdhEsA256kwP521);
        let pair = TeeKeyPair::generate(KeyAlgorithm::EcdhEsA256kwP521).expect("key pair");
        let TeePubKey::EC { crv, x, .. } = pair.public_jwk().expect("jwk") else {
            panic!("EC key expected")
        };
        assert_eq!(crv, "P-521");
        assert_eq!(URL_SAFE_NO_PAD.decode(x).expect("b64").len(), 66);
    }

    /// The header is what Trustee's client rebuilds from what it parsed
    /// (kbs-types' `ProtectedHeader`: `alg`, `enc`, then the other members,
    /// every object's keys sorted, no whitespace), byte for byte.
    #[test]
    fn protected_header_is_canonical() {
        for algorithm in [KeyAlgorithm::EcdhEsA256kwP256, KeyAlgorithm::RsaOaep256] {
            let pair = TeeKeyPair::generate(algorithm).expect("key pair");
            let jwe = encrypt(&pair.public_jwk().expect("jwk"), b"x").expect("encrypts");
            let text = String::from_utf8(URL_SAFE_NO_PAD.decode(&jwe.protected).expect("b64"))
                .expect("utf-8");
            let value: serde_json::Value = serde_json::from_str(&text).expect("json");
            let rebuilt = match value.get("epk") {
                Some(epk) => format!(
                    r#"{{"alg":{},"enc":{},"epk":{{"crv":{},"kty":{},"x":{},"y":{}}}}}"#,
                    value["alg"], value["enc"], epk["crv"], epk["kty"], epk["x"], epk["y"]
                ),
                None => format!(r#"{{"alg":{},"enc":{}}}"#, value["alg"], value["enc"]),
            };
            assert_eq!(text, rebuilt, "{algorithm:?}");
        }
    }

    #[test]
    fn rsa_oaep_256_round_trip() {
        round_trip(KeyAlgorithm::RsaOaep256);
    }

    #[test]
    fn header_of_another_algorithm_is_refused() {
        let ec = TeeKeyPair::generate(KeyAlgorithm::EcdhEsA256kwP256).expect("key pair");
        let jwe = encrypt(&ec.public_jwk().expect("jwk"), b"x").expect("encrypts");
        let header =
            String::from_utf8(URL_SAFE_NO_PAD.decode(&jwe.protected).expect("b64")).expect("utf-8");
        for (from, to) in [("ECDH-ES+A256KW", "ECDH-ES"), ("A256GCM", "A128GCM")] {
            let altered = JweResponse {
                protected: b64(header.replace(from, to).as_bytes()),
                ..jwe.clone()
            };
            assert!(matches!(
                ec.decrypt(&altered),
                Err(JweError::Unsupported(_))
            ));
        }
        let critical = JweResponse {
            protected: b64(header.replacen('{', r#"{"crit":["exp"],"#, 1).as_bytes()),
            ..jwe.clone()
        };
        assert!(matches!(
            ec.decrypt(&critical),
            Err(JweError::Malformed { .. })
        ));
    }

    #[test]
    fn unusable_public_keys_are_refused() {
        let ec = TeeKeyPair::generate(KeyAlgorithm::EcdhEsA256kwP256).expect("key pair");
        let TeePubKey::EC { x, y, .. } = ec.public_jwk().expect("jwk") else {
            panic!("EC key expected")
        };
        let off_curve = TeePubKey::EC {
            crv: "P-256".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: x.clone(),
            y: x.clone(),
        };
        assert!(matches!(
            encrypt(&off_curve, b"x"),
            Err(JweError::UnusableKey(_))
        ));
        let p384 = TeePubKey::EC {
            crv: "P-384".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: x.clone(),
            y: y.clone(),
        };
        assert!(encrypt(&p384, b"x").is_err());
        // P-256 coordinates named P-521: the wrong length.
        let mislabelled = TeePubKey::EC {
            crv: "P-521".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: x.clone(),
            y: y.clone(),
        };
        let error = encrypt(&mislabelled, b"x").expect_err("P-521 with 32-byte coordinates");
        assert!(error.to_string().contains("66 bytes"), "{error}");
        let small = Rsa::generate(1024).expect("rsa");
        let small = TeePubKey::RSA {
            alg: "RSA-OAEP-256".into(),
            k_mod: b64(&small.n().to_vec()),
            k_exp: b64(&small.e().to_vec()),
        };
        let error = encrypt(&small, b"x").expect_err("1024-bit RSA");
        assert!(error.to_string().contains("2048"), "{error}");
        let rsa = Rsa::generate(2048).expect("rsa");
        let pkcs1 = TeePubKey::RSA {
            alg: "RSA1_5".into(),
            k_mod: b64(&rsa.n().to_vec()),
            k_exp: b64(&rsa.e().to_vec()),
        };
        let error = encrypt(&pkcs1, b"x").expect_err("RSA1_5");
        assert!(
            error.to_string().contains("RSA1_5") && error.to_string().contains("RSA-OAEP-256"),
            "{error}"
        );
        let akp = TeePubKey::AKP {
            alg: "ML-KEM-768+A192KW".into(),
            public_key: "AA".into(),
        };
        assert!(matches!(encrypt(&akp, b"x"), Err(JweError::UnusableKey(_))));
    }

    /// RFC 7518 Appendix C: ECDH-ES between Alice's ephemeral key and Bob's
    /// key, Concat KDF with apu "Alice", apv "Bob" for A128GCM.
    #[test]
    fn concat_kdf_matches_rfc7518_appendix_c() {
        let alice_d = unb64("d", "0_NxaRPUMQoAJt50Gz8YiTr8gRTwyEaCumd-MToTmIo").expect("d");
        let alice_public = ec_public_key(
            Curve::P256,
            "gI0GAILBdu7T53akrFmMyGcsF3n5dO7MmwNBHKW5SV0",
            "SLW_xSffzlPWrHEVI30DHM_4egVwt3NQqeUD7nMFpps",
            "alice",
        )
        .expect("alice");
        let alice = EcKey::from_private_components(
            Curve::P256.group().expect("group"),
            &BigNum::from_slice(&alice_d).expect("d"),
            alice_public.ec_key().expect("ec").public_key(),
        )
        .expect("alice private");
        let bob = ec_public_key(
            Curve::P256,
            "weNJy2HscCSM6AEDTDg04biOvhFhyyWvOHQfeF_PxMQ",
            "e8lnCO-AlStT-NJVX-crhB7QRYhiix03illJOVAOyck",
            "bob",
        )
        .expect("bob");
        let alice = PKey::from_ec_key(alice).expect("pkey");
        let mut deriver = openssl::derive::Deriver::new(&alice).expect("deriver");
        deriver.set_peer(&bob).expect("peer");
        let shared = deriver.derive_to_vec().expect("Z");
        assert_eq!(
            shared,
            [
                158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49,
                110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196
            ]
        );
        let key = concat_kdf(&shared, b"A128GCM", b"Alice", b"Bob", 128);
        assert_eq!(b64(&key), "VqqN6vgjbSBcIijNcacQGg");
    }

    /// RFC 3394 section 4.6: 256 bits of key data wrapped with a 256-bit KEK.
    #[test]
    fn key_wrap_matches_rfc3394() {
        let kek = hex::decode("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
            .expect("hex");
        let key = hex::decode("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
            .expect("hex");
        let wrapped = aes_wrap(&kek, &key).expect("wraps");
        assert_eq!(
            hex::encode_upper(&wrapped),
            "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"
        );
        assert_eq!(aes_unwrap(&kek, &wrapped).expect("unwraps").as_slice(), key);
        let mut altered = wrapped;
        altered[0] ^= 1;
        assert!(aes_unwrap(&kek, &altered).is_err());
    }
}
