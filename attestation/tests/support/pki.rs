//! A private PKI in AMD's certificate format: an ARK, ASK and ASVK per
//! product and P-384 VCEKs / VLEKs with AMD's TCB, hwID and product-name
//! extensions, so tests can sign report shapes no public vector carries.

use hsev_attestation::certs::{RootOrigin, TrustAnchor, TrustStore};
use hsev_attestation::report::{AttestationReport, ReportWriter, TcbVersion};
use hsev_attestation::Product;
use openssl::asn1::{Asn1Integer, Asn1Object, Asn1OctetString, Asn1Time};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::{
    X509Builder, X509Crl, X509CrlBuilder, X509Extension, X509Name, X509Revoked, X509RevokedBuilder,
    X509,
};

/// One product's test roots with their private keys.
pub struct TestRoots {
    pub product: Product,
    pub ark: X509,
    pub ask: X509,
    pub asvk: X509,
    ark_key: PKey<Private>,
    ask_key: PKey<Private>,
    asvk_key: PKey<Private>,
}

/// A signing key with its certificate.
pub struct TestEndorsement {
    pub certificate: X509,
    key: EcKey<Private>,
}

fn name(common_name: &str) -> X509Name {
    let mut builder = X509Name::builder().expect("name builder");
    builder
        .append_entry_by_text("OU", "Engineering")
        .expect("OU");
    builder.append_entry_by_text("C", "US").expect("C");
    builder
        .append_entry_by_text("O", "Advanced Micro Devices")
        .expect("O");
    builder.append_entry_by_text("CN", common_name).expect("CN");
    builder.build()
}

fn certificate(
    subject: &str,
    issuer: &str,
    public: &PKey<Private>,
    signer: &PKey<Private>,
    serial: u32,
    extensions: Vec<X509Extension>,
) -> X509 {
    let mut builder = X509Builder::new().expect("builder");
    builder.set_version(2).expect("v3");
    let serial = BigNum::from_u32(serial)
        .and_then(|serial| Asn1Integer::from_bn(&serial))
        .expect("serial");
    builder.set_serial_number(&serial).expect("serial");
    builder.set_subject_name(&name(subject)).expect("subject");
    builder.set_issuer_name(&name(issuer)).expect("issuer");
    builder.set_pubkey(public).expect("key");
    builder
        .set_not_before(&Asn1Time::from_unix(1_600_000_000).expect("time"))
        .expect("nb");
    builder
        .set_not_after(&Asn1Time::from_unix(2_400_000_000).expect("time"))
        .expect("na");
    for extension in extensions {
        builder.append_extension(extension).expect("extension");
    }
    builder.sign(signer, MessageDigest::sha384()).expect("sign");
    builder.build()
}

fn extension(oid: &str, value: &[u8]) -> X509Extension {
    let oid = Asn1Object::from_str(oid).expect("oid");
    let value = Asn1OctetString::new_from_bytes(value).expect("octets");
    X509Extension::new_from_der(&oid, false, &value).expect("extension")
}

fn der_integer(value: u8) -> Vec<u8> {
    if value < 0x80 {
        vec![0x02, 0x01, value]
    } else {
        vec![0x02, 0x02, 0x00, value]
    }
}

fn rsa_key() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).expect("rsa")).expect("pkey")
}

impl TestRoots {
    pub fn new(product: Product) -> Self {
        let product_name = product.amd_name();
        let (ark_key, ask_key, asvk_key) = (rsa_key(), rsa_key(), rsa_key());
        let ark_name = format!("ARK-{product_name}");
        TestRoots {
            product,
            ark: certificate(&ark_name, &ark_name, &ark_key, &ark_key, 1, Vec::new()),
            ask: certificate(
                &format!("SEV-{product_name}"),
                &ark_name,
                &ask_key,
                &ark_key,
                2,
                Vec::new(),
            ),
            asvk: certificate(
                &format!("SEV-VLEK-{product_name}"),
                &ark_name,
                &asvk_key,
                &ark_key,
                3,
                Vec::new(),
            ),
            ark_key,
            ask_key,
            asvk_key,
        }
    }

    /// The roots as an anchor of `origin`.
    pub fn anchor(&self, origin: RootOrigin) -> TrustAnchor {
        let mut pem = self.ark.to_pem().expect("pem");
        pem.extend(self.ask.to_pem().expect("pem"));
        pem.extend(self.asvk.to_pem().expect("pem"));
        TrustAnchor::from_pem_bundle(self.product, origin, &pem).expect("test bundle is valid")
    }

    /// A store trusting only these roots, as `origin`.
    pub fn store(&self, origin: RootOrigin) -> TrustStore {
        TrustStore::empty().with_anchor(self.anchor(origin))
    }

    fn endorsement(
        &self,
        subject: &str,
        tcb: &TcbVersion,
        hw_id: Option<&[u8]>,
    ) -> TestEndorsement {
        let group = EcGroup::from_curve_name(Nid::SECP384R1).expect("P-384");
        let key = EcKey::generate(&group).expect("ec key");
        let mut extensions = vec![
            extension(
                "1.3.6.1.4.1.3704.1.2",
                &[
                    &[0x16, 8][..],
                    format!("{}-B0", self.product.amd_name()).as_bytes(),
                ]
                .concat(),
            ),
            extension("1.3.6.1.4.1.3704.1.3.1", &der_integer(tcb.bootloader)),
            extension("1.3.6.1.4.1.3704.1.3.2", &der_integer(tcb.tee)),
            extension("1.3.6.1.4.1.3704.1.3.3", &der_integer(tcb.snp)),
            extension("1.3.6.1.4.1.3704.1.3.8", &der_integer(tcb.microcode)),
        ];
        if let Some(fmc) = tcb.fmc {
            extensions.push(extension("1.3.6.1.4.1.3704.1.3.9", &der_integer(fmc)));
        }
        if let Some(hw_id) = hw_id {
            extensions.push(extension("1.3.6.1.4.1.3704.1.4", hw_id));
        }
        let (issuer, signer) = if subject == "SEV-VLEK" {
            (
                format!("SEV-VLEK-{}", self.product.amd_name()),
                &self.asvk_key,
            )
        } else {
            (format!("SEV-{}", self.product.amd_name()), &self.ask_key)
        };
        let public = PKey::from_ec_key(key.clone()).expect("pkey");
        // Serial 0, as AMD's endorsement certificates have.
        TestEndorsement {
            certificate: certificate(subject, &issuer, &public, signer, 0, extensions),
            key,
        }
    }

    /// A VCEK for `chip_id` at `tcb`.
    pub fn vcek(&self, chip_id: &[u8; 64], tcb: &TcbVersion) -> TestEndorsement {
        self.endorsement("SEV-VCEK", tcb, Some(&chip_id[..self.product.hw_id_len()]))
    }

    /// A VLEK at `tcb`.
    pub fn vlek(&self, tcb: &TcbVersion) -> TestEndorsement {
        self.endorsement("SEV-VLEK", tcb, None)
    }

    /// A CRL signed by the ARK revoking `revoked`.
    pub fn crl(&self, revoked: &[&X509]) -> X509Crl {
        self.crl_signed_by(revoked, &self.ark_key)
    }

    /// A CRL naming the ARK as issuer but signed by another key.
    pub fn forged_crl(&self) -> X509Crl {
        self.crl_signed_by(&[], &rsa_key())
    }

    fn crl_signed_by(&self, revoked: &[&X509], key: &PKey<Private>) -> X509Crl {
        let mut builder = X509CrlBuilder::new().expect("crl builder");
        builder
            .set_issuer_name(self.ark.subject_name())
            .expect("issuer");
        builder
            .set_last_update(&Asn1Time::from_unix(1_700_000_000).expect("time"))
            .expect("last");
        builder
            .set_next_update(&Asn1Time::from_unix(2_400_000_000).expect("time"))
            .expect("next");
        for certificate in revoked {
            let entry: X509Revoked = {
                let mut entry = X509RevokedBuilder::new().expect("revoked");
                entry
                    .set_serial_number(certificate.serial_number())
                    .expect("serial");
                entry
                    .set_revocation_date(&Asn1Time::from_unix(1_700_000_000).expect("time"))
                    .expect("date");
                entry.build()
            };
            builder.add_revoked(entry).expect("add");
        }
        // OpenSSL demands an authority key identifier on CRLs:
        // SEQUENCE { [0] SHA-1 of the ARK's public key }.
        let key_id = openssl::sha::sha1(
            &self
                .ark
                .public_key()
                .and_then(|key| key.public_key_to_der())
                .expect("ark key"),
        );
        let authority_key_id = [&[0x30, 0x16, 0x80, 0x14][..], &key_id].concat();
        builder
            .append_extension(extension("2.5.29.35", &authority_key_id))
            .expect("aki");
        builder
            .append_extension(extension("2.5.29.20", &der_integer(1)))
            .expect("crl number");
        builder.sign(key, MessageDigest::sha384()).expect("sign");
        builder.build().expect("crl")
    }
}

impl TestEndorsement {
    pub fn der(&self) -> Vec<u8> {
        self.certificate.to_der().expect("der")
    }

    /// Signs the report `writer` holds and parses it.
    pub fn sign(&self, writer: ReportWriter) -> AttestationReport {
        let digest = openssl::sha::sha384(writer.signed_bytes());
        let signature = EcdsaSig::sign(&digest, &self.key).expect("sign");
        writer
            .finish(&signature.r().to_vec(), &signature.s().to_vec())
            .expect("signed report parses")
    }
}
