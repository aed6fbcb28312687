//! The SEV-SNP guest context launch digest (a port of sev-snp-measure's
//! `gctx.py`).
//!
//! Every page the launch adds extends the digest: `digest = SHA-384(PAGE_INFO)`
//! where `PAGE_INFO` (SEV-SNP firmware ABI, section 8.17.2, table 67) is
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! | 0x00   | 48   | current launch digest                   |
//! | 0x30   | 48   | page contents digest (zero for non-data)|
//! | 0x60   | 2    | `LENGTH` = 0x70                         |
//! | 0x62   | 1    | `PAGE_TYPE`                             |
//! | 0x63   | 1    | `IMI_PAGE` = 0                          |
//! | 0x64   | 1    | VMPL3 permissions = 0                   |
//! | 0x65   | 1    | VMPL2 permissions = 0                   |
//! | 0x66   | 1    | VMPL1 permissions = 0                   |
//! | 0x67   | 1    | reserved                                |
//! | 0x68   | 8    | `GPA`                                   |

use openssl::sha::sha384;

use super::MeasurementError;

/// Size of a launch digest (SHA-384).
pub const LAUNCH_DIGEST_SIZE: usize = 48;
/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;
/// Size of the `PAGE_INFO` structure hashed for every page.
pub const PAGE_INFO_LEN: usize = 0x70;

const PAGE_SIZE_U64: u64 = 4096;
const ZEROS: [u8; LAUNCH_DIGEST_SIZE] = [0; LAUNCH_DIGEST_SIZE];

/// The SNP page types of `SNP_LAUNCH_UPDATE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageType {
    /// A page of measured data.
    Normal = 0x01,
    /// A VMSA page.
    Vmsa = 0x02,
    /// A page filled with zeros.
    Zero = 0x03,
    /// A page whose contents are not measured.
    Unmeasured = 0x04,
    /// The secrets page.
    Secrets = 0x05,
    /// The CPUID page.
    Cpuid = 0x06,
}

/// The SEV-SNP guest context: the running launch digest.
///
/// The simulated Secure Processor extends it exactly as `SNP_LAUNCH_UPDATE`
/// and `SNP_LAUNCH_FINISH` would, page by page:
///
/// ```
/// use hsev_attestation::measurement::{Gctx, PAGE_SIZE};
///
/// let mut gctx = Gctx::new();
/// gctx.update_normal_page(0xffff_f000, &[0x90; PAGE_SIZE]);
/// gctx.update_zero_pages(0x80_0000, 0x9000)?;
/// gctx.update_secrets_page(0x80_d000);
/// gctx.update_cpuid_page(0x80_e000);
/// gctx.update_vmsa_page(&[0; PAGE_SIZE]);
/// assert_ne!(gctx.launch_digest(), [0; 48]);
/// # Ok::<(), hsev_attestation::measurement::MeasurementError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gctx {
    launch_digest: [u8; LAUNCH_DIGEST_SIZE],
}

impl Default for Gctx {
    fn default() -> Self {
        Self::new()
    }
}

impl Gctx {
    /// The GPA recorded for VMSA pages: `(u64)-1`, page aligned, with bits
    /// above 51 cleared.
    pub const VMSA_GPA: u64 = 0xFFFF_FFFF_F000;

    /// A fresh context: the launch digest starts as 48 zero bytes.
    pub const fn new() -> Self {
        Gctx {
            launch_digest: ZEROS,
        }
    }

    /// A context resuming from a known digest, e.g. a precalculated OVMF
    /// hash (`--snp-ovmf-hash`).
    pub const fn with_seed(seed: [u8; LAUNCH_DIGEST_SIZE]) -> Self {
        Gctx {
            launch_digest: seed,
        }
    }

    /// The current launch digest.
    pub const fn launch_digest(&self) -> [u8; LAUNCH_DIGEST_SIZE] {
        self.launch_digest
    }

    /// The `PAGE_INFO` structure extending the current digest.
    fn page_info(
        &self,
        page_type: PageType,
        gpa: u64,
        contents: &[u8; LAUNCH_DIGEST_SIZE],
    ) -> [u8; PAGE_INFO_LEN] {
        let mut info = [0u8; PAGE_INFO_LEN];
        info[..LAUNCH_DIGEST_SIZE].copy_from_slice(&self.launch_digest);
        info[LAUNCH_DIGEST_SIZE..2 * LAUNCH_DIGEST_SIZE].copy_from_slice(contents);
        // PAGE_INFO_LEN is 0x70, which fits a u16.
        info[0x60..0x62].copy_from_slice(&(PAGE_INFO_LEN as u16).to_le_bytes());
        info[0x62] = page_type as u8;
        // 0x63 IMI_PAGE, 0x64..0x67 VMPL3/2/1 permissions and reserved: 0.
        info[0x68..0x70].copy_from_slice(&gpa.to_le_bytes());
        info
    }

    fn update(&mut self, page_type: PageType, gpa: u64, contents: &[u8; LAUNCH_DIGEST_SIZE]) {
        self.launch_digest = sha384(&self.page_info(page_type, gpa, contents));
    }

    /// Adds one page of measured data at `gpa`.
    pub fn update_normal_page(&mut self, gpa: u64, page: &[u8; PAGE_SIZE]) {
        self.update(PageType::Normal, gpa, &sha384(page));
    }

    /// Adds `data`, a whole number of pages, from `start_gpa` on.
    pub fn update_normal_pages(
        &mut self,
        start_gpa: u64,
        data: &[u8],
    ) -> Result<(), MeasurementError> {
        if !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(MeasurementError::UnalignedSize {
                what: "measured data",
                size: u64::try_from(data.len()).unwrap_or(u64::MAX),
            });
        }
        // Check the last page's GPA first so that a failure leaves the
        // context untouched.
        page_gpa(start_gpa, data.len().saturating_sub(PAGE_SIZE))?;
        let mut gpa = start_gpa;
        for page in data.chunks_exact(PAGE_SIZE) {
            self.update(PageType::Normal, gpa, &sha384(page));
            gpa = gpa.wrapping_add(PAGE_SIZE_U64);
        }
        Ok(())
    }

    /// Adds a VMSA page (recorded at [`Gctx::VMSA_GPA`]).
    pub fn update_vmsa_page(&mut self, page: &[u8; PAGE_SIZE]) {
        self.update(PageType::Vmsa, Self::VMSA_GPA, &sha384(page));
    }

    /// Adds `length` bytes (a whole number of pages) of zero pages at `gpa`.
    pub fn update_zero_pages(&mut self, gpa: u64, length: u64) -> Result<(), MeasurementError> {
        self.update_contentless_pages(PageType::Zero, gpa, length)
    }

    /// Adds `length` bytes (a whole number of pages) of unmeasured pages at `gpa`.
    pub fn update_unmeasured_pages(
        &mut self,
        gpa: u64,
        length: u64,
    ) -> Result<(), MeasurementError> {
        self.update_contentless_pages(PageType::Unmeasured, gpa, length)
    }

    /// Adds the secrets page at `gpa`.
    pub fn update_secrets_page(&mut self, gpa: u64) {
        self.update(PageType::Secrets, gpa, &ZEROS);
    }

    /// Adds the CPUID page at `gpa`.
    pub fn update_cpuid_page(&mut self, gpa: u64) {
        self.update(PageType::Cpuid, gpa, &ZEROS);
    }

    fn update_contentless_pages(
        &mut self,
        page_type: PageType,
        gpa: u64,
        length: u64,
    ) -> Result<(), MeasurementError> {
        if !length.is_multiple_of(PAGE_SIZE_U64) {
            return Err(MeasurementError::UnalignedSize {
                what: "metadata section",
                size: length,
            });
        }
        if length == 0 {
            return Ok(());
        }
        page_gpa(
            gpa,
            usize::try_from(length - PAGE_SIZE_U64).unwrap_or(usize::MAX),
        )?;
        let mut offset = 0;
        while offset < length {
            self.update(page_type, gpa.wrapping_add(offset), &ZEROS);
            offset += PAGE_SIZE_U64;
        }
        Ok(())
    }
}

/// `start + offset`, or an error if it leaves the 64-bit GPA space.
fn page_gpa(start: u64, offset: usize) -> Result<u64, MeasurementError> {
    u64::try_from(offset)
        .ok()
        .and_then(|offset| start.checked_add(offset))
        .ok_or(MeasurementError::GpaOutOfRange { what: "page" })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failing unwrap is a failing test.
mod tests {
    use super::*;

    #[test]
    fn page_info_layout() {
        let gctx = Gctx::with_seed([0xaa; LAUNCH_DIGEST_SIZE]);
        let info = gctx.page_info(
            PageType::Cpuid,
            0x0123_4567_89ab_c000,
            &[0xbb; LAUNCH_DIGEST_SIZE],
        );
        assert_eq!(&info[..0x30], &[0xaa; 48]);
        assert_eq!(&info[0x30..0x60], &[0xbb; 48]);
        assert_eq!(&info[0x60..0x62], &[0x70, 0x00]);
        assert_eq!(info[0x62], 0x06);
        assert_eq!(&info[0x63..0x68], &[0; 5]);
        assert_eq!(
            &info[0x68..0x70],
            &[0x00, 0xc0, 0xab, 0x89, 0x67, 0x45, 0x23, 0x01]
        );
    }

    #[test]
    fn update_hashes_page_info() {
        let mut gctx = Gctx::new();
        gctx.update_secrets_page(0x80_d000);
        let mut info = [0u8; PAGE_INFO_LEN];
        info[0x60] = 0x70;
        info[0x62] = 0x05;
        info[0x68..0x70].copy_from_slice(&0x80_d000u64.to_le_bytes());
        assert_eq!(gctx.launch_digest(), sha384(&info));
    }

    #[test]
    fn known_vector() {
        // python3 -c 'from sevsnpmeasure.gctx import GCTX; g=GCTX();
        //   g.update_normal_pages(0xfffff000, bytes(range(256))*16);
        //   g.update_zero_pages(0x1000, 0x2000); g.update_unmeasured_pages(0x3000, 0x1000);
        //   g.update_secrets_page(0x4000); g.update_cpuid_page(0x5000);
        //   g.update_vmsa_page(bytes(4096)); print(g.hex_ld())'
        let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 256) as u8).collect();
        let mut gctx = Gctx::new();
        gctx.update_normal_pages(0xffff_f000, &page).unwrap();
        gctx.update_zero_pages(0x1000, 0x2000).unwrap();
        gctx.update_unmeasured_pages(0x3000, 0x1000).unwrap();
        gctx.update_secrets_page(0x4000);
        gctx.update_cpuid_page(0x5000);
        gctx.update_vmsa_page(&[0; PAGE_SIZE]);
        assert_eq!(hex::encode(gctx.launch_digest()), KNOWN_VECTOR);
    }

    const KNOWN_VECTOR: &str = "085ac9d1501c1d4fdfc67111765d00361581bf6a2c6d0f4380b9b0981dcb35105f94dc6726f39bdcf2150349d2a12080";

    #[test]
    fn single_page_matches_bulk() {
        let page = [7u8; PAGE_SIZE];
        let mut one = Gctx::new();
        one.update_normal_page(0x1000, &page);
        one.update_normal_page(0x2000, &page);
        let mut bulk = Gctx::new();
        bulk.update_normal_pages(0x1000, &[7u8; 2 * PAGE_SIZE])
            .unwrap();
        assert_eq!(one, bulk);
    }

    #[test]
    fn rejects_unaligned_and_overflowing() {
        let mut gctx = Gctx::new();
        assert!(matches!(
            gctx.update_normal_pages(0, &[0; 100]),
            Err(MeasurementError::UnalignedSize { size: 100, .. })
        ));
        assert!(matches!(
            gctx.update_zero_pages(0, 0x800),
            Err(MeasurementError::UnalignedSize { size: 0x800, .. })
        ));
        assert!(matches!(
            gctx.update_unmeasured_pages(u64::MAX - 0xfff, 0x2000),
            Err(MeasurementError::GpaOutOfRange { .. })
        ));
        assert!(matches!(
            gctx.update_normal_pages(u64::MAX - 0xfff, &[0; 2 * PAGE_SIZE]),
            Err(MeasurementError::GpaOutOfRange { .. })
        ));
        // Failures leave the digest untouched; empty ranges are no-ops.
        assert_eq!(gctx.launch_digest(), [0; LAUNCH_DIGEST_SIZE]);
        gctx.update_zero_pages(u64::MAX, 0).unwrap();
        gctx.update_normal_pages(u64::MAX - 0xfff, &[0; PAGE_SIZE])
            .unwrap();
        assert_ne!(gctx.launch_digest(), [0; LAUNCH_DIGEST_SIZE]);
    }
}
