//! The SEV-SNP ID block and its authentication structure (SNP ABI,
//! `SNP_LAUNCH_FINISH`): how a guest owner authorises a launch with a key of
//! its own, before the guest runs.
//!
//! The owner signs a 96-byte `ID_BLOCK` (the launch digest it expects, a
//! family and an image id, a guest SVN and the guest policy) with its ID key,
//! and optionally signs the ID key with an author key; the 4096-byte
//! `ID_AUTH_INFO` carries both signatures and both public keys in AMD's
//! layout. The firmware refuses a launch whose digest or policy differ, or
//! whose signatures fail, and puts SHA-384 of each public key into every
//! report as `ID_KEY_DIGEST` / `AUTHOR_KEY_DIGEST`.
//!
//! This module owns the byte layouts, signing (what `hsev idblock sign`
//! does on the owner's machine) and the firmware's checks (what the
//! simulated Secure Processor does). It never sees a launch: the caller
//! hands it the digest and policy to compare with. The raw bytes are the
//! interchange format, so that an ID block signed elsewhere (sev-snp-measure,
//! snpguest, a hardware key) is taken as it is.

use openssl::bn::{BigNum, BigNumContext, BigNumRef};
use openssl::ec::{EcGroup, EcKey, EcKeyRef, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::{HasPublic, Private, Public};

/// Length of the `ID_BLOCK` structure.
pub const ID_BLOCK_LEN: usize = 0x60;
/// Length of the `ID_AUTH_INFO` structure.
pub const ID_AUTH_LEN: usize = 0x1000;
/// Length of a public key in AMD's layout (`ID_KEY`, `AUTHOR_KEY`).
pub const PUBLIC_KEY_LEN: usize = 0x404;

/// `ID_KEY_ALGO` / `AUTH_KEY_ALGO`: ECDSA P-384 with SHA-384, the only
/// algorithm the ABI defines.
const ALGO_ECDSA_P384_SHA384: u32 = 1;
/// The curve field of an AMD public key: P-384.
const CURVE_P384: u32 = 2;
/// Every coordinate and signature component: 72 bytes, little-endian.
const COMPONENT: usize = 72;
/// The only `ID_BLOCK` version.
const ID_BLOCK_VERSION: u32 = 1;

/// Offsets in `ID_AUTH_INFO`.
mod offset {
    pub const ID_KEY_ALGO: usize = 0x00;
    pub const AUTH_KEY_ALGO: usize = 0x04;
    pub const ID_BLOCK_SIG: usize = 0x40;
    pub const ID_KEY: usize = 0x240;
    pub const ID_KEY_SIG: usize = 0x680;
    pub const AUTHOR_KEY: usize = 0x880;
}

/// Why an ID block is malformed, cannot be signed, or is refused. The
/// refusals carry the firmware's status names.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdBlockError {
    /// Bytes of the wrong length.
    #[error("{what} must be {expected} bytes, not {actual}")]
    Length {
        /// `ID_BLOCK` or `ID_AUTH_INFO`.
        what: &'static str,
        /// The length the ABI fixes.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// A field that no firmware accepts (INVALID_PARAM).
    #[error("INVALID_PARAM: {0}")]
    InvalidParam(String),
    /// A signature that does not verify (BAD_SIGNATURE).
    #[error("BAD_SIGNATURE: {0}")]
    BadSignature(&'static str),
    /// The launch digest differs from the ID block's (BAD_MEASUREMENT).
    #[error("BAD_MEASUREMENT: the launch digest {actual} differs from the ID block's {expected}")]
    BadMeasurement {
        /// The ID block's digest, hex.
        expected: String,
        /// The launch's digest, hex.
        actual: String,
    },
    /// The launch policy differs from the ID block's (POLICY_FAILURE).
    #[error(
        "POLICY_FAILURE: the launch policy {actual:#x} differs from the ID block's {expected:#x}"
    )]
    PolicyFailure {
        /// The ID block's policy.
        expected: u64,
        /// The launch's policy.
        actual: u64,
    },
    /// A key that is not an ECDSA P-384 key.
    #[error("{0} is not an ECDSA P-384 key")]
    NotP384(&'static str),
    /// OpenSSL failed (signing, or a point operation).
    #[error("openssl: {0}")]
    Crypto(String),
}

impl From<openssl::error::ErrorStack> for IdBlockError {
    fn from(error: openssl::error::ErrorStack) -> Self {
        IdBlockError::Crypto(error.to_string())
    }
}

/// The `ID_BLOCK`: what the owner authorises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdBlock {
    /// The launch digest the guest must have.
    pub launch_digest: [u8; 48],
    /// Family id, reported back.
    pub family_id: [u8; 16],
    /// Image id, reported back.
    pub image_id: [u8; 16],
    /// Guest SVN, reported back.
    pub guest_svn: u32,
    /// The guest policy the launch must have.
    pub policy: u64,
}

impl IdBlock {
    /// The structure's bytes, as signed and as handed to the firmware.
    pub fn to_bytes(&self) -> [u8; ID_BLOCK_LEN] {
        let mut bytes = [0u8; ID_BLOCK_LEN];
        bytes[..0x30].copy_from_slice(&self.launch_digest);
        bytes[0x30..0x40].copy_from_slice(&self.family_id);
        bytes[0x40..0x50].copy_from_slice(&self.image_id);
        bytes[0x50..0x54].copy_from_slice(&ID_BLOCK_VERSION.to_le_bytes());
        bytes[0x54..0x58].copy_from_slice(&self.guest_svn.to_le_bytes());
        bytes[0x58..0x60].copy_from_slice(&self.policy.to_le_bytes());
        bytes
    }

    /// Parses the structure; only version 1 exists.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdBlockError> {
        let bytes: &[u8; ID_BLOCK_LEN] = bytes.try_into().map_err(|_| IdBlockError::Length {
            what: "ID_BLOCK",
            expected: ID_BLOCK_LEN,
            actual: bytes.len(),
        })?;
        let version = u32::from_le_bytes(field(bytes, 0x50));
        if version != ID_BLOCK_VERSION {
            return Err(IdBlockError::InvalidParam(format!(
                "ID_BLOCK version {version} (only {ID_BLOCK_VERSION} exists)"
            )));
        }
        Ok(IdBlock {
            launch_digest: field(bytes, 0),
            family_id: field(bytes, 0x30),
            image_id: field(bytes, 0x40),
            guest_svn: u32::from_le_bytes(field(bytes, 0x54)),
            policy: u64::from_le_bytes(field(bytes, 0x58)),
        })
    }
}

fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

/// The digests a launch authorised by an ID block reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdKeyDigests {
    /// SHA-384 of the ID key in AMD's layout.
    pub id_key: [u8; 48],
    /// SHA-384 of the author key, or zeros when none signed the ID key.
    pub author_key: [u8; 48],
}

/// An `ID_BLOCK` with its `ID_AUTH_INFO`: what `SNP_LAUNCH_FINISH` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIdBlock {
    /// The block.
    pub block: IdBlock,
    auth: Box<[u8; ID_AUTH_LEN]>,
}

impl SignedIdBlock {
    /// Signs `block` with the owner's ID key and, if given, the ID key with
    /// the author key: what the owner does on its own machine.
    pub fn sign(
        block: IdBlock,
        id_key: &EcKeyRef<Private>,
        author_key: Option<&EcKeyRef<Private>>,
    ) -> Result<Self, IdBlockError> {
        check_p384(id_key, "the ID key")?;
        let mut auth = Box::new([0u8; ID_AUTH_LEN]);
        put_u32(&mut auth[..], offset::ID_KEY_ALGO, ALGO_ECDSA_P384_SHA384);
        let id_public = amd_public_key(id_key)?;
        put(&mut auth[..], offset::ID_KEY, &id_public);
        put(
            &mut auth[..],
            offset::ID_BLOCK_SIG,
            &amd_signature(&block.to_bytes(), id_key)?,
        );
        if let Some(author_key) = author_key {
            check_p384(author_key, "the author key")?;
            put_u32(&mut auth[..], offset::AUTH_KEY_ALGO, ALGO_ECDSA_P384_SHA384);
            put(
                &mut auth[..],
                offset::AUTHOR_KEY,
                &amd_public_key(author_key)?,
            );
            put(
                &mut auth[..],
                offset::ID_KEY_SIG,
                &amd_signature(&id_public, author_key)?,
            );
        }
        Ok(SignedIdBlock { block, auth })
    }

    /// A block and an authentication structure as the owner handed them.
    /// Only their lengths and the block's version are checked here; the
    /// signatures are checked by [`SignedIdBlock::check`], as the firmware
    /// checks them at launch.
    pub fn from_bytes(block: &[u8], auth: &[u8]) -> Result<Self, IdBlockError> {
        let block = IdBlock::from_bytes(block)?;
        let auth: &[u8; ID_AUTH_LEN] = auth.try_into().map_err(|_| IdBlockError::Length {
            what: "ID_AUTH_INFO",
            expected: ID_AUTH_LEN,
            actual: auth.len(),
        })?;
        Ok(SignedIdBlock {
            block,
            auth: Box::new(*auth),
        })
    }

    /// The `ID_AUTH_INFO` bytes.
    pub fn auth_bytes(&self) -> &[u8] {
        &self.auth[..]
    }

    /// Whether an author key signed the ID key (`AUTHOR_KEY_EN`).
    pub fn author_key_enabled(&self) -> bool {
        u32::from_le_bytes(field(&self.auth[..], offset::AUTH_KEY_ALGO)) != 0
    }

    /// What `SNP_LAUNCH_FINISH` checks, in the firmware's order: the ID
    /// key's signature over the block, the author key's over the ID key (if
    /// enabled), then the launch digest and the policy. On success, the
    /// digests the launch's reports carry.
    pub fn check(
        &self,
        launch_digest: &[u8; 48],
        policy: u64,
    ) -> Result<IdKeyDigests, IdBlockError> {
        let auth = &self.auth[..];
        let id_key_algo = u32::from_le_bytes(field(auth, offset::ID_KEY_ALGO));
        if id_key_algo != ALGO_ECDSA_P384_SHA384 {
            return Err(IdBlockError::InvalidParam(format!(
                "ID_KEY_ALGO {id_key_algo} (only {ALGO_ECDSA_P384_SHA384}, ECDSA P-384 with SHA-384, exists)"
            )));
        }
        let id_public: [u8; PUBLIC_KEY_LEN] = field(auth, offset::ID_KEY);
        let id_key = parse_amd_public_key(&id_public, "ID_KEY")?;
        if !verify_amd_signature(
            &self.block.to_bytes(),
            &field::<0x200>(auth, offset::ID_BLOCK_SIG),
            &id_key,
        )? {
            return Err(IdBlockError::BadSignature(
                "the ID block's signature does not verify with the ID key",
            ));
        }
        let mut digests = IdKeyDigests {
            id_key: openssl::sha::sha384(&id_public),
            author_key: [0; 48],
        };
        if self.author_key_enabled() {
            let auth_key_algo = u32::from_le_bytes(field(auth, offset::AUTH_KEY_ALGO));
            if auth_key_algo != ALGO_ECDSA_P384_SHA384 {
                return Err(IdBlockError::InvalidParam(format!(
                    "AUTH_KEY_ALGO {auth_key_algo} (only {ALGO_ECDSA_P384_SHA384} exists)"
                )));
            }
            let author_public: [u8; PUBLIC_KEY_LEN] = field(auth, offset::AUTHOR_KEY);
            let author_key = parse_amd_public_key(&author_public, "AUTHOR_KEY")?;
            if !verify_amd_signature(
                &id_public,
                &field::<0x200>(auth, offset::ID_KEY_SIG),
                &author_key,
            )? {
                return Err(IdBlockError::BadSignature(
                    "the ID key's signature does not verify with the author key",
                ));
            }
            digests.author_key = openssl::sha::sha384(&author_public);
        }
        if &self.block.launch_digest != launch_digest {
            return Err(IdBlockError::BadMeasurement {
                expected: hex::encode(self.block.launch_digest),
                actual: hex::encode(launch_digest),
            });
        }
        if self.block.policy != policy {
            return Err(IdBlockError::PolicyFailure {
                expected: self.block.policy,
                actual: policy,
            });
        }
        Ok(digests)
    }
}

/// SHA-384 of `key` in AMD's public key layout: the value a report's
/// `ID_KEY_DIGEST` (or `AUTHOR_KEY_DIGEST`) holds for it, and the value an
/// appraisal policy's `allowed_id_key_digests` lists.
pub fn public_key_digest<T: HasPublic>(key: &EcKeyRef<T>) -> Result<[u8; 48], IdBlockError> {
    check_p384(key, "the key")?;
    Ok(openssl::sha::sha384(&amd_public_key(key)?))
}

fn check_p384<T: HasPublic>(key: &EcKeyRef<T>, what: &'static str) -> Result<(), IdBlockError> {
    if key.group().curve_name() == Some(Nid::SECP384R1) {
        Ok(())
    } else {
        Err(IdBlockError::NotP384(what))
    }
}

fn put(buffer: &mut [u8], at: usize, bytes: &[u8]) {
    buffer[at..at + bytes.len()].copy_from_slice(bytes);
}

fn put_u32(buffer: &mut [u8], at: usize, value: u32) {
    put(buffer, at, &value.to_le_bytes());
}

/// `number` as a 72-byte little-endian component.
fn component(number: &BigNumRef) -> Result<[u8; COMPONENT], IdBlockError> {
    let mut bytes = number.to_vec_padded(COMPONENT as i32)?;
    bytes.reverse();
    let mut out = [0u8; COMPONENT];
    out.copy_from_slice(&bytes);
    Ok(out)
}

fn big(component: &[u8]) -> Result<BigNum, IdBlockError> {
    let big_endian: Vec<u8> = component.iter().rev().copied().collect();
    Ok(BigNum::from_slice(&big_endian)?)
}

/// A P-384 public key in AMD's layout: curve 2, Qx, Qy.
fn amd_public_key<T: HasPublic>(key: &EcKeyRef<T>) -> Result<[u8; PUBLIC_KEY_LEN], IdBlockError> {
    let (mut x, mut y) = (BigNum::new()?, BigNum::new()?);
    let mut context = BigNumContext::new()?;
    key.public_key()
        .affine_coordinates(key.group(), &mut x, &mut y, &mut context)?;
    let mut layout = [0u8; PUBLIC_KEY_LEN];
    put_u32(&mut layout, 0, CURVE_P384);
    put(&mut layout, 4, &component(&x)?);
    put(&mut layout, 4 + COMPONENT, &component(&y)?);
    Ok(layout)
}

fn parse_amd_public_key(
    layout: &[u8; PUBLIC_KEY_LEN],
    what: &'static str,
) -> Result<EcKey<Public>, IdBlockError> {
    let curve = u32::from_le_bytes(field(layout, 0));
    if curve != CURVE_P384 {
        return Err(IdBlockError::InvalidParam(format!(
            "{what} curve {curve} (only {CURVE_P384}, P-384, exists)"
        )));
    }
    let group = EcGroup::from_curve_name(Nid::SECP384R1)?;
    let mut context = BigNumContext::new()?;
    let x = big(&layout[4..4 + COMPONENT])?;
    let y = big(&layout[4 + COMPONENT..4 + 2 * COMPONENT])?;
    let point = EcPoint::new(&group)
        .and_then(|mut point| {
            point.set_affine_coordinates_gfp(&group, &x, &y, &mut context)?;
            Ok(point)
        })
        .map_err(|_| IdBlockError::InvalidParam(format!("{what} is not a point on P-384")))?;
    EcKey::from_public_key(&group, &point)
        .and_then(|key| key.check_key().map(|()| key))
        .map_err(|_| IdBlockError::InvalidParam(format!("{what} is not a valid P-384 key")))
}

/// An ECDSA P-384 / SHA-384 signature of `message` in AMD's layout: R, S.
fn amd_signature(message: &[u8], key: &EcKeyRef<Private>) -> Result<[u8; 0x200], IdBlockError> {
    let signature = EcdsaSig::sign(&openssl::sha::sha384(message), key)?;
    let mut layout = [0u8; 0x200];
    put(&mut layout, 0, &component(signature.r())?);
    put(&mut layout, COMPONENT, &component(signature.s())?);
    Ok(layout)
}

fn verify_amd_signature(
    message: &[u8],
    layout: &[u8; 0x200],
    key: &EcKeyRef<Public>,
) -> Result<bool, IdBlockError> {
    let signature = EcdsaSig::from_private_components(
        big(&layout[..COMPONENT])?,
        big(&layout[COMPONENT..2 * COMPONENT])?,
    )?;
    Ok(signature
        .verify(&openssl::sha::sha384(message), key)
        .unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p384() -> EcKey<Private> {
        EcKey::generate(&EcGroup::from_curve_name(Nid::SECP384R1).expect("P-384")).expect("key")
    }

    fn block() -> IdBlock {
        IdBlock {
            launch_digest: [7; 48],
            family_id: [0xfa; 16],
            image_id: [0x1d; 16],
            guest_svn: 5,
            policy: 0x30000,
        }
    }

    #[test]
    fn the_block_layout_follows_the_abi() {
        let bytes = block().to_bytes();
        assert_eq!(&bytes[..48], &[7; 48]);
        assert_eq!(&bytes[0x50..0x54], &1u32.to_le_bytes(), "version 1");
        assert_eq!(&bytes[0x54..0x58], &5u32.to_le_bytes());
        assert_eq!(&bytes[0x58..0x60], &0x30000u64.to_le_bytes());
        assert_eq!(IdBlock::from_bytes(&bytes), Ok(block()));
        let mut version_2 = bytes;
        version_2[0x50] = 2;
        assert!(matches!(
            IdBlock::from_bytes(&version_2),
            Err(IdBlockError::InvalidParam(reason)) if reason.contains("version 2")
        ));
        assert!(matches!(
            IdBlock::from_bytes(&bytes[1..]),
            Err(IdBlockError::Length {
                expected: 0x60,
                actual: 0x5f,
                ..
            })
        ));
    }

    #[test]
    fn a_signed_block_passes_and_reports_both_digests() {
        let (id_key, author_key) = (p384(), p384());
        let signed = SignedIdBlock::sign(block(), &id_key, Some(&author_key)).expect("signs");
        assert!(signed.author_key_enabled());
        let digests = signed.check(&[7; 48], 0x30000).expect("passes");
        assert_eq!(digests.id_key, public_key_digest(&id_key).expect("digest"));
        assert_eq!(
            digests.author_key,
            public_key_digest(&author_key).expect("digest")
        );

        // What the owner hands over is taken back byte for byte.
        let again = SignedIdBlock::from_bytes(&signed.block.to_bytes(), signed.auth_bytes())
            .expect("parses");
        assert_eq!(again.check(&[7; 48], 0x30000), Ok(digests));

        let alone = SignedIdBlock::sign(block(), &id_key, None).expect("signs");
        assert!(!alone.author_key_enabled());
        let digests = alone.check(&[7; 48], 0x30000).expect("passes");
        assert_eq!(digests.author_key, [0; 48]);
        // The AMD layout: curve 2, then Qx little-endian.
        let auth = alone.auth_bytes();
        assert_eq!(&auth[0x240..0x244], &2u32.to_le_bytes());
        assert_eq!(&auth[..4], &1u32.to_le_bytes());
    }

    #[test]
    fn the_firmware_checks_refuse_with_their_status_names() {
        let id_key = p384();
        let signed = SignedIdBlock::sign(block(), &id_key, Some(&p384())).expect("signs");
        assert!(matches!(
            signed.check(&[8; 48], 0x30000),
            Err(IdBlockError::BadMeasurement { .. })
        ));
        assert!(matches!(
            signed.check(&[7; 48], 0x30001),
            Err(IdBlockError::PolicyFailure {
                expected: 0x30000,
                actual: 0x30001
            })
        ));
        // One byte changed anywhere the signatures cover is BAD_SIGNATURE.
        let mut block_bytes = signed.block.to_bytes();
        block_bytes[0x54] ^= 1;
        let tampered =
            SignedIdBlock::from_bytes(&block_bytes, signed.auth_bytes()).expect("parses");
        assert!(matches!(
            tampered.check(&[7; 48], 0x30000),
            Err(IdBlockError::BadSignature(reason)) if reason.contains("ID block")
        ));
        let mut auth = signed.auth_bytes().to_vec();
        auth[offset::ID_KEY_SIG] ^= 1;
        let tampered = SignedIdBlock::from_bytes(&signed.block.to_bytes(), &auth).expect("parses");
        assert!(matches!(
            tampered.check(&[7; 48], 0x30000),
            Err(IdBlockError::BadSignature(reason)) if reason.contains("author key")
        ));
        // Another ID key over the same block: its signature fails.
        let mut auth = signed.auth_bytes().to_vec();
        let other = amd_public_key(&p384()).expect("layout");
        auth[offset::ID_KEY..offset::ID_KEY + PUBLIC_KEY_LEN].copy_from_slice(&other);
        let swapped = SignedIdBlock::from_bytes(&signed.block.to_bytes(), &auth).expect("parses");
        assert!(matches!(
            swapped.check(&[7; 48], 0x30000),
            Err(IdBlockError::BadSignature(_))
        ));
        // A key that is not on the curve.
        let mut auth = signed.auth_bytes().to_vec();
        auth[offset::ID_KEY + 4] ^= 1;
        let off_curve = SignedIdBlock::from_bytes(&signed.block.to_bytes(), &auth).expect("parses");
        assert!(matches!(
            off_curve.check(&[7; 48], 0x30000),
            Err(IdBlockError::InvalidParam(reason)) if reason.contains("ID_KEY")
        ));
        assert!(matches!(
            SignedIdBlock::from_bytes(&signed.block.to_bytes(), &[0; 10]),
            Err(IdBlockError::Length {
                what: "ID_AUTH_INFO",
                ..
            })
        ));
        let p256 =
            EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256"))
                .expect("key");
        assert_eq!(
            SignedIdBlock::sign(block(), &p256, None),
            Err(IdBlockError::NotP384("the ID key"))
        );
    }
}
