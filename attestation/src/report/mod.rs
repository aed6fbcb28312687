//! The SEV-SNP attestation report (SNP ABI specification, ATTESTATION_REPORT).
//!
//! A [`AttestationReport`] can only be built from bytes that parse: the size
//! is exact, the version is one this code knows (2, 3 or 5), every
//! must-be-zero field is zero and every encoded field is well formed. Parsing
//! never panics; it is fuzzed (`attestation/fuzz`).

mod guest_policy;
mod json;
mod tcb;
mod view;

pub use guest_policy::{GuestPolicy, GuestPolicyError};
pub use json::{EvidenceCertificate, EvidenceError, SnpEvidence};
pub use tcb::{TcbError, TcbVersion};

use serde::Serialize;

use crate::product::{Product, TcbLayout};

/// Size of a report in bytes.
pub const REPORT_SIZE: usize = 0x4a0;
/// The signature covers bytes `0..SIGNED_LEN`.
pub const SIGNED_LEN: usize = 0x2a0;
/// Length of each little-endian ECDSA component field (r, s).
pub const SIGNATURE_COMPONENT_LEN: usize = 72;
/// ECDSA P-384 with SHA-384, the only signature algorithm SNP defines.
pub const SIGNATURE_ALGO_ECDSA_P384_SHA384: u32 = 1;

/// Byte offsets of the report's fields (SNP ABI, Table "ATTESTATION_REPORT").
mod offset {
    pub const VERSION: usize = 0x00;
    pub const GUEST_SVN: usize = 0x04;
    pub const POLICY: usize = 0x08;
    pub const FAMILY_ID: usize = 0x10;
    pub const IMAGE_ID: usize = 0x20;
    pub const VMPL: usize = 0x30;
    pub const SIGNATURE_ALGO: usize = 0x34;
    pub const CURRENT_TCB: usize = 0x38;
    pub const PLATFORM_INFO: usize = 0x40;
    pub const KEY_INFO: usize = 0x48;
    pub const RESERVED_1: (usize, usize) = (0x4c, 0x50);
    pub const REPORT_DATA: usize = 0x50;
    pub const MEASUREMENT: usize = 0x90;
    pub const HOST_DATA: usize = 0xc0;
    pub const ID_KEY_DIGEST: usize = 0xe0;
    pub const AUTHOR_KEY_DIGEST: usize = 0x110;
    pub const REPORT_ID: usize = 0x140;
    pub const REPORT_ID_MA: usize = 0x160;
    pub const REPORTED_TCB: usize = 0x180;
    pub const CPUID_FAMILY: usize = 0x188;
    pub const CPUID_MODEL: usize = 0x189;
    pub const CPUID_STEPPING: usize = 0x18a;
    /// v2 reserves the CPUID bytes too: 0x188..0x1a0.
    pub const RESERVED_2_V2: (usize, usize) = (0x188, 0x1a0);
    pub const RESERVED_2: (usize, usize) = (0x18b, 0x1a0);
    pub const CHIP_ID: usize = 0x1a0;
    pub const COMMITTED_TCB: usize = 0x1e0;
    pub const CURRENT_VERSION: usize = 0x1e8;
    pub const COMMITTED_VERSION: usize = 0x1ec;
    pub const LAUNCH_TCB: usize = 0x1f0;
    pub const LAUNCH_MIT_VECTOR: usize = 0x1f8;
    pub const CURRENT_MIT_VECTOR: usize = 0x200;
    /// v2 and v3 reserve everything after LAUNCH_TCB.
    pub const RESERVED_3_V3: (usize, usize) = (0x1f8, 0x2a0);
    pub const RESERVED_3_V5: (usize, usize) = (0x208, 0x2a0);
    pub const SIGNATURE_R: usize = 0x2a0;
    pub const SIGNATURE_S: usize = 0x2e8;
    pub const RESERVED_SIGNATURE: (usize, usize) = (0x330, 0x4a0);
}

/// Why bytes are not an attestation report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// The input is not exactly [`REPORT_SIZE`] bytes.
    #[error("a report is {REPORT_SIZE} bytes, got {0}")]
    WrongSize(usize),
    /// A version this code does not know.
    #[error("report version {0} is not supported (supported: 2, 3, 5)")]
    UnsupportedVersion(u32),
    /// A signature algorithm other than ECDSA P-384 / SHA-384.
    #[error("signature algorithm {0} is not supported (expected 1, ECDSA P-384 with SHA-384)")]
    UnsupportedSignatureAlgorithm(u32),
    /// A must-be-zero byte is set.
    #[error("reserved byte at offset {offset:#x} is {value:#04x}, must be zero")]
    ReservedByteSet {
        /// Offset of the first nonzero reserved byte.
        offset: usize,
        /// Its value.
        value: u8,
    },
    /// The VMPL field is above 3.
    #[error("VMPL {0} is out of range (0-3)")]
    VmplOutOfRange(u32),
    /// The key-info signing key is neither VCEK, VLEK nor none.
    #[error("key_info signing key {0} is undefined (0 VCEK, 1 VLEK, 7 none)")]
    UndefinedSigningKey(u32),
    /// Undefined bits of key_info are set.
    #[error("key_info {0:#x} has undefined bits set")]
    KeyInfoReservedBits(u32),
    /// The guest policy is malformed.
    #[error(transparent)]
    GuestPolicy(#[from] GuestPolicyError),
    /// A v3+ report names a CPU this code does not know.
    #[error("CPUID family {family:#x} model {model:#x} is not a known SEV-SNP product")]
    UnknownCpu {
        /// CPUID family.
        family: u8,
        /// CPUID model.
        model: u8,
    },
    /// A TCB field is malformed.
    #[error("{field}: {source}")]
    Tcb {
        /// Which TCB field.
        field: &'static str,
        /// What is wrong with it.
        source: TcbError,
    },
    /// A signature component has bytes beyond the 48 a P-384 scalar uses.
    #[error("signature {0} has nonzero bytes beyond the P-384 scalar")]
    SignatureComponentTooLong(&'static str),
}

/// Which key signed the report (key_info.SIGNING_KEY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SigningKey {
    /// Versioned Chip Endorsement Key: per chip and TCB.
    Vcek,
    /// Versioned Loaded Endorsement Key: per cloud provider and TCB.
    Vlek,
    /// The report is unsigned.
    None,
}

impl std::fmt::Display for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SigningKey::Vcek => "VCEK",
            SigningKey::Vlek => "VLEK",
            SigningKey::None => "no key",
        })
    }
}

/// key_info: who signed, and whether the author key and chip key are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// The digest of the author key is present in the report.
    pub author_key_en: bool,
    /// The chip key is masked: the report is signed by nothing.
    pub mask_chip_key: bool,
    /// The key that signed the report.
    pub signing_key: SigningKey,
}

impl KeyInfo {
    fn decode(raw: u32) -> Result<Self, ReportError> {
        if raw & !0x1f != 0 {
            return Err(ReportError::KeyInfoReservedBits(raw));
        }
        let signing_key = match (raw >> 2) & 0x7 {
            0 => SigningKey::Vcek,
            1 => SigningKey::Vlek,
            7 => SigningKey::None,
            other => return Err(ReportError::UndefinedSigningKey(other)),
        };
        Ok(KeyInfo {
            author_key_en: raw & 1 != 0,
            mask_chip_key: raw & 2 != 0,
            signing_key,
        })
    }

    pub(crate) fn encode(self) -> u32 {
        let signing_key = match self.signing_key {
            SigningKey::Vcek => 0,
            SigningKey::Vlek => 1,
            SigningKey::None => 7,
        };
        u32::from(self.author_key_en) | u32::from(self.mask_chip_key) << 1 | signing_key << 2
    }
}

/// Platform information bits (PLATFORM_INFO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformInfo(pub u64);

/// Named bits of PLATFORM_INFO.
const PLATFORM_INFO_BITS: [(u32, &str); 7] = [
    (0, "smt_enabled"),
    (1, "tsme_enabled"),
    (2, "ecc_enabled"),
    (3, "rapl_disabled"),
    (4, "ciphertext_hiding_enabled"),
    (5, "alias_check_complete"),
    (7, "tio_enabled"),
];

impl PlatformInfo {
    /// SMT is enabled on the host.
    pub fn smt_enabled(self) -> bool {
        self.0 & 1 != 0
    }

    /// The names of the bits that are set.
    pub fn flags(self) -> Vec<&'static str> {
        PLATFORM_INFO_BITS
            .iter()
            .filter(|(bit, _)| self.0 & (1 << bit) != 0)
            .map(|(_, name)| *name)
            .collect()
    }
}

impl Serialize for PlatformInfo {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut state = serializer.serialize_struct("PlatformInfo", 2)?;
        state.serialize_field("raw", &format!("{:#x}", self.0))?;
        state.serialize_field("flags", &self.flags())?;
        state.end()
    }
}

/// A firmware version (major.minor, build).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct FirmwareVersion {
    /// Major version.
    pub major: u8,
    /// Minor version.
    pub minor: u8,
    /// Build number.
    pub build: u8,
}

/// CPUID family, model and stepping of the chip (v3 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cpuid {
    /// Combined family (base + extended).
    pub family: u8,
    /// Combined model.
    pub model: u8,
    /// Stepping.
    pub stepping: u8,
}

/// The ECDSA signature, r and s as big-endian P-384 scalars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// r, big-endian, 48 bytes.
    pub r: [u8; 48],
    /// s, big-endian, 48 bytes.
    pub s: [u8; 48],
}

/// A parsed, well-formed SEV-SNP attestation report. Its signature is not
/// checked yet: that is the verifier's job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationReport {
    raw: Box<[u8; REPORT_SIZE]>,
    /// Report format version: 2, 3 or 5.
    pub version: u32,
    /// Guest security version number from the ID block.
    pub guest_svn: u32,
    /// The guest policy.
    pub policy: GuestPolicy,
    /// Family id from the ID block.
    pub family_id: [u8; 16],
    /// Image id from the ID block.
    pub image_id: [u8; 16],
    /// The VMPL the report was requested at.
    pub vmpl: u32,
    /// Current TCB of the platform.
    pub current_tcb: TcbVersion,
    /// Platform information.
    pub platform_info: PlatformInfo,
    /// Signing key information.
    pub key_info: KeyInfo,
    /// Guest-provided data (nonce, key hash).
    pub report_data: [u8; 64],
    /// The launch measurement.
    pub measurement: [u8; 48],
    /// Host-provided data bound at launch.
    pub host_data: [u8; 32],
    /// SHA-384 of the ID key that signed the ID block (zero if none).
    pub id_key_digest: [u8; 48],
    /// SHA-384 of the author key (zero if none).
    pub author_key_digest: [u8; 48],
    /// Guest report id.
    pub report_id: [u8; 32],
    /// Report id of the migration agent.
    pub report_id_ma: [u8; 32],
    /// The TCB the VCEK was derived from.
    pub reported_tcb: TcbVersion,
    /// CPU identification (v3 and later).
    pub cpuid: Option<Cpuid>,
    /// Chip identifier (zero when masked; Turin uses the first 8 bytes).
    pub chip_id: [u8; 64],
    /// Committed TCB.
    pub committed_tcb: TcbVersion,
    /// Current firmware version.
    pub current_version: FirmwareVersion,
    /// Committed firmware version.
    pub committed_version: FirmwareVersion,
    /// TCB at the time the guest was launched.
    pub launch_tcb: TcbVersion,
    /// Mitigation vector at launch (v5 and later).
    pub launch_mit_vector: Option<u64>,
    /// Current mitigation vector (v5 and later).
    pub current_mit_vector: Option<u64>,
    /// The signature over bytes `0..SIGNED_LEN`.
    pub signature: Signature,
}

fn array<const N: usize>(raw: &[u8; REPORT_SIZE], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&raw[at..at + N]);
    out
}

fn u32_at(raw: &[u8; REPORT_SIZE], at: usize) -> u32 {
    u32::from_le_bytes(array(raw, at))
}

fn u64_at(raw: &[u8; REPORT_SIZE], at: usize) -> u64 {
    u64::from_le_bytes(array(raw, at))
}

fn require_zero(raw: &[u8; REPORT_SIZE], (start, end): (usize, usize)) -> Result<(), ReportError> {
    match raw[start..end].iter().position(|&byte| byte != 0) {
        Some(index) => Err(ReportError::ReservedByteSet {
            offset: start + index,
            value: raw[start + index],
        }),
        None => Ok(()),
    }
}

/// Reads a 72-byte little-endian signature component into a 48-byte
/// big-endian scalar, refusing nonzero bytes past the scalar.
fn signature_component(
    raw: &[u8; REPORT_SIZE],
    at: usize,
    name: &'static str,
) -> Result<[u8; 48], ReportError> {
    let field = &raw[at..at + SIGNATURE_COMPONENT_LEN];
    if field[48..].iter().any(|&byte| byte != 0) {
        return Err(ReportError::SignatureComponentTooLong(name));
    }
    let mut scalar = [0u8; 48];
    for (target, source) in scalar.iter_mut().zip(field[..48].iter().rev()) {
        *target = *source;
    }
    Ok(scalar)
}

fn tcb_at(
    raw: &[u8; REPORT_SIZE],
    at: usize,
    layout: TcbLayout,
    field: &'static str,
) -> Result<TcbVersion, ReportError> {
    TcbVersion::decode(array(raw, at), layout).map_err(|source| ReportError::Tcb { field, source })
}

fn firmware_version(raw: &[u8; REPORT_SIZE], at: usize) -> Result<FirmwareVersion, ReportError> {
    require_zero(raw, (at + 3, at + 4))?;
    Ok(FirmwareVersion {
        build: raw[at],
        minor: raw[at + 1],
        major: raw[at + 2],
    })
}

impl AttestationReport {
    /// Parses and checks the raw bytes of a report.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ReportError> {
        let raw: Box<[u8; REPORT_SIZE]> = bytes
            .try_into()
            .map(Box::new)
            .map_err(|_| ReportError::WrongSize(bytes.len()))?;

        let version = u32_at(&raw, offset::VERSION);
        if !matches!(version, 2 | 3 | 5) {
            return Err(ReportError::UnsupportedVersion(version));
        }
        let signature_algo = u32_at(&raw, offset::SIGNATURE_ALGO);
        if signature_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384 {
            return Err(ReportError::UnsupportedSignatureAlgorithm(signature_algo));
        }
        let vmpl = u32_at(&raw, offset::VMPL);
        if vmpl > 3 {
            return Err(ReportError::VmplOutOfRange(vmpl));
        }

        require_zero(&raw, offset::RESERVED_1)?;
        let cpuid = if version >= 3 {
            require_zero(&raw, offset::RESERVED_2)?;
            Some(Cpuid {
                family: raw[offset::CPUID_FAMILY],
                model: raw[offset::CPUID_MODEL],
                stepping: raw[offset::CPUID_STEPPING],
            })
        } else {
            require_zero(&raw, offset::RESERVED_2_V2)?;
            None
        };
        let (launch_mit_vector, current_mit_vector) = if version >= 5 {
            require_zero(&raw, offset::RESERVED_3_V5)?;
            (
                Some(u64_at(&raw, offset::LAUNCH_MIT_VECTOR)),
                Some(u64_at(&raw, offset::CURRENT_MIT_VECTOR)),
            )
        } else {
            require_zero(&raw, offset::RESERVED_3_V3)?;
            (None, None)
        };
        require_zero(&raw, offset::RESERVED_SIGNATURE)?;

        // v2 reports come from Milan and Genoa only, which share a layout.
        let layout = match cpuid {
            None => TcbLayout::Legacy,
            Some(cpuid) => Product::from_cpuid(cpuid.family, cpuid.model)
                .ok_or(ReportError::UnknownCpu {
                    family: cpuid.family,
                    model: cpuid.model,
                })?
                .tcb_layout(),
        };

        Ok(AttestationReport {
            version,
            guest_svn: u32_at(&raw, offset::GUEST_SVN),
            policy: GuestPolicy::new(u64_at(&raw, offset::POLICY))?,
            family_id: array(&raw, offset::FAMILY_ID),
            image_id: array(&raw, offset::IMAGE_ID),
            vmpl,
            current_tcb: tcb_at(&raw, offset::CURRENT_TCB, layout, "current_tcb")?,
            platform_info: PlatformInfo(u64_at(&raw, offset::PLATFORM_INFO)),
            key_info: KeyInfo::decode(u32_at(&raw, offset::KEY_INFO))?,
            report_data: array(&raw, offset::REPORT_DATA),
            measurement: array(&raw, offset::MEASUREMENT),
            host_data: array(&raw, offset::HOST_DATA),
            id_key_digest: array(&raw, offset::ID_KEY_DIGEST),
            author_key_digest: array(&raw, offset::AUTHOR_KEY_DIGEST),
            report_id: array(&raw, offset::REPORT_ID),
            report_id_ma: array(&raw, offset::REPORT_ID_MA),
            reported_tcb: tcb_at(&raw, offset::REPORTED_TCB, layout, "reported_tcb")?,
            cpuid,
            chip_id: array(&raw, offset::CHIP_ID),
            committed_tcb: tcb_at(&raw, offset::COMMITTED_TCB, layout, "committed_tcb")?,
            current_version: firmware_version(&raw, offset::CURRENT_VERSION)?,
            committed_version: firmware_version(&raw, offset::COMMITTED_VERSION)?,
            launch_tcb: tcb_at(&raw, offset::LAUNCH_TCB, layout, "launch_tcb")?,
            launch_mit_vector,
            current_mit_vector,
            signature: Signature {
                r: signature_component(&raw, offset::SIGNATURE_R, "r")?,
                s: signature_component(&raw, offset::SIGNATURE_S, "s")?,
            },
            raw,
        })
    }

    /// The raw report bytes.
    pub fn as_bytes(&self) -> &[u8; REPORT_SIZE] {
        &self.raw
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.raw[..SIGNED_LEN]
    }

    /// The product, from the CPUID fields (v3 and later); `None` for v2.
    pub fn product(&self) -> Option<Product> {
        self.cpuid
            .and_then(|cpuid| Product::from_cpuid(cpuid.family, cpuid.model))
    }
}

/// Builds raw report bytes field by field: the inverse of parsing, used for
/// the JSON evidence form and by the simulated firmware.
#[derive(Debug, Clone)]
pub struct ReportWriter {
    raw: Box<[u8; REPORT_SIZE]>,
    layout: TcbLayout,
}

impl ReportWriter {
    /// Starts an all-zero report of `version` whose TCBs use `layout`.
    pub fn new(version: u32, layout: TcbLayout) -> Self {
        let mut writer = ReportWriter {
            raw: Box::new([0u8; REPORT_SIZE]),
            layout,
        };
        writer.put(offset::VERSION, &version.to_le_bytes());
        writer.put(
            offset::SIGNATURE_ALGO,
            &SIGNATURE_ALGO_ECDSA_P384_SHA384.to_le_bytes(),
        );
        writer
    }

    fn put(&mut self, at: usize, bytes: &[u8]) -> &mut Self {
        self.raw[at..at + bytes.len()].copy_from_slice(bytes);
        self
    }

    fn put_tcb(
        &mut self,
        at: usize,
        field: &'static str,
        tcb: &TcbVersion,
    ) -> Result<&mut Self, ReportError> {
        let encoded = tcb
            .encode(self.layout)
            .map_err(|source| ReportError::Tcb { field, source })?;
        Ok(self.put(at, &encoded))
    }

    /// Sets guest_svn, policy, family and image ids, VMPL.
    pub fn guest(
        &mut self,
        guest_svn: u32,
        policy: u64,
        family_id: &[u8; 16],
        image_id: &[u8; 16],
        vmpl: u32,
    ) -> &mut Self {
        self.put(offset::GUEST_SVN, &guest_svn.to_le_bytes())
            .put(offset::POLICY, &policy.to_le_bytes())
            .put(offset::FAMILY_ID, family_id)
            .put(offset::IMAGE_ID, image_id)
            .put(offset::VMPL, &vmpl.to_le_bytes())
    }

    /// Sets the platform info and key info fields.
    pub fn platform(&mut self, platform_info: u64, key_info: KeyInfo) -> &mut Self {
        self.put(offset::PLATFORM_INFO, &platform_info.to_le_bytes())
            .put(offset::KEY_INFO, &key_info.encode().to_le_bytes())
    }

    /// Sets report data, measurement and host data.
    pub fn contents(
        &mut self,
        report_data: &[u8; 64],
        measurement: &[u8; 48],
        host_data: &[u8; 32],
    ) -> &mut Self {
        self.put(offset::REPORT_DATA, report_data)
            .put(offset::MEASUREMENT, measurement)
            .put(offset::HOST_DATA, host_data)
    }

    /// Sets the ID-block key digests and report ids.
    pub fn identities(
        &mut self,
        id_key_digest: &[u8; 48],
        author_key_digest: &[u8; 48],
        report_id: &[u8; 32],
        report_id_ma: &[u8; 32],
    ) -> &mut Self {
        self.put(offset::ID_KEY_DIGEST, id_key_digest)
            .put(offset::AUTHOR_KEY_DIGEST, author_key_digest)
            .put(offset::REPORT_ID, report_id)
            .put(offset::REPORT_ID_MA, report_id_ma)
    }

    /// Sets the four TCB fields.
    pub fn tcbs(
        &mut self,
        current: &TcbVersion,
        reported: &TcbVersion,
        committed: &TcbVersion,
        launch: &TcbVersion,
    ) -> Result<&mut Self, ReportError> {
        self.put_tcb(offset::CURRENT_TCB, "current_tcb", current)?;
        self.put_tcb(offset::REPORTED_TCB, "reported_tcb", reported)?;
        self.put_tcb(offset::COMMITTED_TCB, "committed_tcb", committed)?;
        self.put_tcb(offset::LAUNCH_TCB, "launch_tcb", launch)
    }

    /// Sets the CPUID fields (v3 and later).
    pub fn cpuid(&mut self, cpuid: Cpuid) -> &mut Self {
        self.put(
            offset::CPUID_FAMILY,
            &[cpuid.family, cpuid.model, cpuid.stepping],
        )
    }

    /// Sets the chip id.
    pub fn chip_id(&mut self, chip_id: &[u8; 64]) -> &mut Self {
        self.put(offset::CHIP_ID, chip_id)
    }

    /// Sets the current and committed firmware versions.
    pub fn firmware_versions(
        &mut self,
        current: FirmwareVersion,
        committed: FirmwareVersion,
    ) -> &mut Self {
        self.put(
            offset::CURRENT_VERSION,
            &[current.build, current.minor, current.major],
        )
        .put(
            offset::COMMITTED_VERSION,
            &[committed.build, committed.minor, committed.major],
        )
    }

    /// Sets the mitigation vectors (v5 and later).
    pub fn mitigation_vectors(&mut self, launch: u64, current: u64) -> &mut Self {
        self.put(offset::LAUNCH_MIT_VECTOR, &launch.to_le_bytes())
            .put(offset::CURRENT_MIT_VECTOR, &current.to_le_bytes())
    }

    /// The bytes the signature will cover.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.raw[..SIGNED_LEN]
    }

    /// Sets the signature from big-endian r and s scalars (at most 48 bytes
    /// each) and parses the result.
    pub fn finish(mut self, r: &[u8], s: &[u8]) -> Result<AttestationReport, ReportError> {
        for (component, at, name) in [(r, offset::SIGNATURE_R, "r"), (s, offset::SIGNATURE_S, "s")]
        {
            if component.len() > 48 {
                return Err(ReportError::SignatureComponentTooLong(name));
            }
            let little_endian: Vec<u8> = component.iter().rev().copied().collect();
            self.put(at, &little_endian);
        }
        AttestationReport::from_bytes(&self.raw[..])
    }

    /// Sets raw little-endian 72-byte signature fields, as carried by the
    /// JSON evidence form, and parses the result.
    pub fn finish_raw(
        mut self,
        r: &[u8; SIGNATURE_COMPONENT_LEN],
        s: &[u8; SIGNATURE_COMPONENT_LEN],
    ) -> Result<AttestationReport, ReportError> {
        self.put(offset::SIGNATURE_R, r).put(offset::SIGNATURE_S, s);
        AttestationReport::from_bytes(&self.raw[..])
    }
}

#[cfg(test)]
mod tests;
