//! The simulated platform's certificate authority, in AMD's format: an ARK
//! (RSA-4096, self-signed) signing an ASK and an ASVK, the ASK signing
//! P-384 VCEKs that carry AMD's TCB, hwID and product-name extensions, all
//! with RSASSA-PSS / SHA-384 / salt 48 as AMD signs. Every name says it is
//! simulated: the organization reads "HyperSEV simulated AMD Secure
//! Processor (no confidentiality)", never AMD's own.

use std::path::Path;

use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, PKeyRef, Private};
use openssl::rsa::{Padding, Rsa};
use openssl::sign::{RsaPssSaltlen, Signer};
use openssl::x509::{X509Name, X509};
use time::OffsetDateTime;

use super::der;
use super::state::{read_private, write_private, write_public};
use crate::certs::{RootOrigin, TrustAnchor};
use crate::firmware::FirmwareError;
use crate::product::Product;
use crate::report::TcbVersion;

/// The organization every simulated certificate names.
pub const SIMULATED_ORGANIZATION: &str =
    "HyperSEV simulated AMD Secure Processor (no confidentiality)";

/// RSASSA-PSS with SHA-384, MGF1-SHA-384, salt 48, trailer 1, exactly as
/// AMD's certificates spell it (including the explicit trailerField).
const RSASSA_PSS_SHA384: [u8; 67] = [
    0x30, 0x41, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a, 0x30, 0x34, 0xa0,
    0x0f, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00,
    0xa1, 0x1c, 0x30, 0x1a, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08, 0x30,
    0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0xa2, 0x03,
    0x02, 0x01, 0x30,
];

/// AMD's extension OIDs on endorsement keys.
mod oid {
    pub const STRUCT_VERSION: &str = "1.3.6.1.4.1.3704.1.1";
    pub const PRODUCT_NAME: &str = "1.3.6.1.4.1.3704.1.2";
    pub const BOOTLOADER: &str = "1.3.6.1.4.1.3704.1.3.1";
    pub const TEE: &str = "1.3.6.1.4.1.3704.1.3.2";
    pub const SNP: &str = "1.3.6.1.4.1.3704.1.3.3";
    pub const RESERVED_SPL: [&str; 4] = [
        "1.3.6.1.4.1.3704.1.3.4",
        "1.3.6.1.4.1.3704.1.3.5",
        "1.3.6.1.4.1.3704.1.3.6",
        "1.3.6.1.4.1.3704.1.3.7",
    ];
    pub const MICROCODE: &str = "1.3.6.1.4.1.3704.1.3.8";
    pub const FMC: &str = "1.3.6.1.4.1.3704.1.3.9";
    pub const HW_ID: &str = "1.3.6.1.4.1.3704.1.4";
    pub const BASIC_CONSTRAINTS: &str = "2.5.29.19";
    pub const KEY_USAGE: &str = "2.5.29.15";
}

/// One extension: `SEQUENCE { OID, [critical BOOLEAN,] OCTET STRING }`.
fn extension(oid: &str, critical: bool, value: &[u8]) -> Vec<u8> {
    let oid = der::object_identifier(oid);
    let value = der::octet_string(value);
    if critical {
        der::sequence(&[&oid, &[0x01, 0x01, 0xff], &value])
    } else {
        der::sequence(&[&oid, &value])
    }
}

fn small_integer(value: u8) -> Vec<u8> {
    der::unsigned_integer(&[value])
}

/// The extensions of a CA certificate (ARK, ASK, ASVK).
fn ca_extensions() -> Vec<Vec<u8>> {
    vec![
        // keyCertSign | cRLSign.
        extension(oid::KEY_USAGE, true, &der::tlv(0x03, &[0x01, 0x06])),
        extension(
            oid::BASIC_CONSTRAINTS,
            true,
            &der::sequence(&[&[0x01, 0x01, 0xff]]),
        ),
    ]
}

fn subject_name(common_name: &str) -> Result<Vec<u8>, FirmwareError> {
    let mut name = X509Name::builder()?;
    name.append_entry_by_text("OU", "Engineering")?;
    name.append_entry_by_text("C", "US")?;
    name.append_entry_by_text("O", SIMULATED_ORGANIZATION)?;
    name.append_entry_by_text("CN", common_name)?;
    Ok(name.build().to_der()?)
}

/// What a certificate says, before it is signed.
struct CertificateFields<'a> {
    serial: u32,
    issuer: &'a str,
    subject: &'a str,
    subject_public_key: Vec<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    extensions: Vec<Vec<u8>>,
}

impl CertificateFields<'_> {
    /// Lays out the TBSCertificate and signs it with RSASSA-PSS.
    fn sign(&self, issuer_key: &PKeyRef<Private>) -> Result<X509, FirmwareError> {
        let extensions: Vec<&[u8]> = self.extensions.iter().map(Vec::as_slice).collect();
        let tbs = der::sequence(&[
            &der::explicit(0, &small_integer(2)),
            &der::unsigned_integer(&self.serial.to_be_bytes()),
            &RSASSA_PSS_SHA384,
            &subject_name(self.issuer)?,
            &der::sequence(&[
                &der::generalized_time(self.not_before),
                &der::generalized_time(self.not_after),
            ]),
            &subject_name(self.subject)?,
            &self.subject_public_key,
            &der::explicit(3, &der::sequence(&extensions)),
        ]);
        let mut signer = Signer::new(MessageDigest::sha384(), issuer_key)?;
        signer.set_rsa_padding(Padding::PKCS1_PSS)?;
        signer.set_rsa_pss_saltlen(RsaPssSaltlen::custom(48))?;
        signer.set_rsa_mgf1_md(MessageDigest::sha384())?;
        signer.update(&tbs)?;
        let signature = signer.sign_to_vec()?;
        let certificate = der::sequence(&[&tbs, &RSASSA_PSS_SHA384, &der::bit_string(&signature)]);
        Ok(X509::from_der(&certificate)?)
    }
}

/// The roots of one simulated platform, with their private keys.
pub struct SimRoots {
    product: Product,
    ark_key: PKey<Private>,
    ark: X509,
    ask_key: PKey<Private>,
    ask: X509,
    asvk: X509,
}

impl std::fmt::Debug for SimRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimRoots")
            .field("product", &self.product)
            .finish_non_exhaustive()
    }
}

impl SimRoots {
    /// New roots for `product` with RSA keys of `rsa_bits` (4096 as AMD's).
    pub fn generate(product: Product, rsa_bits: u32) -> Result<Self, FirmwareError> {
        let name = product.amd_name();
        let now = OffsetDateTime::now_utc();
        let (ark_key, ask_key, asvk_key) = (rsa(rsa_bits)?, rsa(rsa_bits)?, rsa(rsa_bits)?);
        let ark_name = format!("ARK-{name}");
        let issue = |serial, subject: &str, key: &PKey<Private>| -> Result<X509, FirmwareError> {
            CertificateFields {
                serial,
                issuer: &ark_name,
                subject,
                subject_public_key: key.public_key_to_der()?,
                not_before: now - time::Duration::days(1),
                not_after: now + time::Duration::days(25 * 365),
                extensions: ca_extensions(),
            }
            .sign(&ark_key)
        };
        let ark = issue(0x10000, &ark_name, &ark_key)?;
        let ask = issue(0x10001, &format!("SEV-{name}"), &ask_key)?;
        let asvk = issue(0x10002, &format!("SEV-VLEK-{name}"), &asvk_key)?;
        Ok(SimRoots {
            product,
            ark_key,
            ark,
            ask_key,
            ask,
            asvk,
        })
    }

    /// Writes the roots into `dir` (private keys readable by the owner only;
    /// the ASVK's key is not kept: the simulated platform issues no VLEKs).
    pub fn save(&self, dir: &Path) -> Result<(), FirmwareError> {
        write_private(
            &dir.join("ark.key.pem"),
            &self.ark_key.private_key_to_pem_pkcs8()?,
        )?;
        write_public(&dir.join("ark.pem"), &self.ark.to_pem()?)?;
        write_private(
            &dir.join("ask.key.pem"),
            &self.ask_key.private_key_to_pem_pkcs8()?,
        )?;
        write_public(&dir.join("ask.pem"), &self.ask.to_pem()?)?;
        write_public(&dir.join("asvk.pem"), &self.asvk.to_pem()?)
    }

    /// Reads roots written by [`SimRoots::save`].
    pub fn load(product: Product, dir: &Path) -> Result<Self, FirmwareError> {
        let certificate = |name: &str| -> Result<X509, FirmwareError> {
            let bytes = read_private(&dir.join(name))?;
            X509::from_pem(&bytes).map_err(|error| state_error(dir, name, &error))
        };
        let key = |name: &str| -> Result<PKey<Private>, FirmwareError> {
            let bytes = read_private(&dir.join(name))?;
            PKey::private_key_from_pem(&bytes).map_err(|error| state_error(dir, name, &error))
        };
        Ok(SimRoots {
            product,
            ark_key: key("ark.key.pem")?,
            ark: certificate("ark.pem")?,
            ask_key: key("ask.key.pem")?,
            ask: certificate("ask.pem")?,
            asvk: certificate("asvk.pem")?,
        })
    }

    /// The product these roots serve.
    pub fn product(&self) -> Product {
        self.product
    }

    /// ARK, ASK and ASVK as one PEM bundle (AMD's `ask_ark_asvk.pem` form):
    /// what a verifier adds as a simulated trust anchor.
    pub fn bundle_pem(&self) -> Result<Vec<u8>, FirmwareError> {
        Ok([self.ask.to_pem()?, self.ark.to_pem()?, self.asvk.to_pem()?].concat())
    }

    /// The roots as a trust anchor marked simulated.
    pub fn anchor(&self) -> Result<TrustAnchor, FirmwareError> {
        TrustAnchor::from_pem_bundle(self.product, RootOrigin::Simulated, &self.bundle_pem()?)
            .map_err(|error| FirmwareError::Device(error.to_string()))
    }

    /// The ARK, DER.
    pub fn ark_der(&self) -> Result<Vec<u8>, FirmwareError> {
        Ok(self.ark.to_der()?)
    }

    /// The ASK, DER.
    pub fn ask_der(&self) -> Result<Vec<u8>, FirmwareError> {
        Ok(self.ask.to_der()?)
    }

    /// A VCEK certificate for `key`, the chip `chip_id` and `tcb`.
    pub fn issue_vcek(
        &self,
        key: &EcKey<Private>,
        chip_id: &[u8; 64],
        tcb: &TcbVersion,
    ) -> Result<X509, FirmwareError> {
        let public = PKey::from_ec_key(key.clone())?;
        let mut extensions = vec![
            extension(oid::STRUCT_VERSION, false, &small_integer(0)),
            extension(
                oid::PRODUCT_NAME,
                false,
                &der::ia5_string(self.product.amd_name()),
            ),
            extension(oid::BOOTLOADER, false, &small_integer(tcb.bootloader)),
            extension(oid::TEE, false, &small_integer(tcb.tee)),
        ];
        for reserved in oid::RESERVED_SPL {
            extensions.push(extension(reserved, false, &small_integer(0)));
        }
        extensions.push(extension(oid::SNP, false, &small_integer(tcb.snp)));
        extensions.push(extension(
            oid::MICROCODE,
            false,
            &small_integer(tcb.microcode),
        ));
        if let Some(fmc) = tcb.fmc {
            extensions.push(extension(oid::FMC, false, &small_integer(fmc)));
        }
        extensions.push(extension(
            oid::HW_ID,
            false,
            &chip_id[..self.product.hw_id_len()],
        ));
        let now = OffsetDateTime::now_utc();
        CertificateFields {
            // AMD's endorsement certificates carry serial number 0.
            serial: 0,
            issuer: &format!("SEV-{}", self.product.amd_name()),
            subject: "SEV-VCEK",
            subject_public_key: public.public_key_to_der()?,
            not_before: now - time::Duration::days(1),
            not_after: now + time::Duration::days(7 * 365),
            extensions,
        }
        .sign(&self.ask_key)
    }
}

fn rsa(bits: u32) -> Result<PKey<Private>, FirmwareError> {
    Ok(PKey::from_rsa(Rsa::generate(bits)?)?)
}

fn state_error(dir: &Path, name: &str, error: &dyn std::fmt::Display) -> FirmwareError {
    FirmwareError::State {
        path: dir.join(name).display().to_string(),
        problem: error.to_string(),
    }
}

/// The VCEK private key of a chip secret at a TCB: a P-384 scalar derived
/// with HMAC-SHA-384, so every TCB yields its own key, as on real chips.
pub fn derive_vcek(
    secret: &[u8; 32],
    product: Product,
    tcb: &TcbVersion,
) -> Result<EcKey<Private>, FirmwareError> {
    let group = EcGroup::from_curve_name(Nid::SECP384R1)?;
    let raw_tcb = tcb
        .encode(product.tcb_layout())
        .map_err(|error| FirmwareError::Device(format!("TCB does not fit {product}: {error}")))?;
    let material = super::hmac_sha384(
        secret,
        &[b"hsev-sim-vcek", product.amd_name().as_bytes(), &raw_tcb],
    );
    let mut context = BigNumContext::new()?;
    let mut order = BigNum::new()?;
    group.order(&mut order, &mut context)?;
    // d = material mod (n - 1) + 1, in [1, n - 1].
    let one = BigNum::from_u32(1)?;
    let mut order_minus_one = BigNum::new()?;
    order_minus_one.checked_sub(&order, &one)?;
    let mut scalar = BigNum::new()?;
    let material = BigNum::from_slice(&material)?;
    scalar.nnmod(&material, &order_minus_one, &mut context)?;
    let mut private = BigNum::new()?;
    private.checked_add(&scalar, &one)?;
    let mut public = EcPoint::new(&group)?;
    public.mul_generator2(&group, &private, &mut context)?;
    Ok(EcKey::from_private_components(&group, &private, &public)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{EndorsementKey, TrustStore};

    const TCB: TcbVersion = TcbVersion {
        fmc: None,
        bootloader: 3,
        tee: 0,
        snp: 8,
        microcode: 115,
    };

    #[test]
    fn the_chain_verifies_as_simulated_and_carries_amds_extensions() {
        let roots = SimRoots::generate(Product::Genoa, 2048).expect("roots");
        let store = TrustStore::empty().with_anchor(roots.anchor().expect("anchor"));
        let key = derive_vcek(&[7; 32], Product::Genoa, &TCB).expect("vcek key");
        let certificate = roots.issue_vcek(&key, &[9; 64], &TCB).expect("vcek");
        let parsed =
            EndorsementKey::parse(&certificate.to_der().expect("der")).expect("parses as a VCEK");
        assert_eq!(parsed.tcb, TCB);
        assert_eq!(parsed.hw_id.as_deref(), Some(&[9u8; 64][..]));
        assert_eq!(parsed.product_name.as_deref(), Some("Genoa"));
        let trusted = store
            .verify(&parsed, Some(Product::Genoa), None)
            .expect("chains");
        assert_eq!(trusted.origin, RootOrigin::Simulated);
        assert!(
            TrustStore::amd().verify(&parsed, None, None).is_err(),
            "AMD's roots never vouch for it"
        );
        let text = String::from_utf8(certificate.to_text().expect("text")).expect("utf-8");
        assert!(
            text.contains("rsassaPss") && text.contains("Salt Length: 0x30"),
            "{text}"
        );
        assert!(text.contains(SIMULATED_ORGANIZATION));
    }

    #[test]
    fn each_tcb_and_secret_has_its_own_vcek() {
        let key = |secret: [u8; 32], tcb: TcbVersion| {
            derive_vcek(&secret, Product::Milan, &tcb)
                .expect("key")
                .private_key()
                .to_vec()
        };
        assert_eq!(
            key([1; 32], TCB),
            key([1; 32], TCB),
            "derivation is deterministic"
        );
        assert_ne!(key([1; 32], TCB), key([2; 32], TCB));
        assert_ne!(
            key([1; 32], TCB),
            key([1; 32], TcbVersion { snp: 9, ..TCB })
        );
    }
}
