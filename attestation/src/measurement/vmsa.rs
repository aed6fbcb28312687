//! Initial VMSA pages: the register state each vCPU starts with (a port of
//! sev-snp-measure's `vmsa.py`).
//!
//! The page is the SEV-ES save area (AMD APM vol. 2, table B-4; Linux
//! `struct sev_es_save_area`) padded to 4096 bytes. Only the fields below are
//! ever non-zero; their offsets are those of the reference's ctypes layout.

use super::{MeasurementError, VmmType};

/// Size of a VMSA page.
pub const VMSA_PAGE_SIZE: usize = 4096;

/// One VMSA page.
pub type VmsaPage = [u8; VMSA_PAGE_SIZE];

/// Reset address of the bootstrap processor.
pub const BSP_EIP: u32 = 0xffff_fff0;

/// The default PAT MSR value (AMD APM vol. 2, section A.3).
const DEFAULT_G_PAT: u64 = 0x0007_0406_0007_0406;

// Offsets in `struct sev_es_save_area`.
const ES: usize = 0x00;
const CS: usize = 0x10;
const SS: usize = 0x20;
const DS: usize = 0x30;
const FS: usize = 0x40;
const GS: usize = 0x50;
const GDTR: usize = 0x60;
const LDTR: usize = 0x70;
const IDTR: usize = 0x80;
const TR: usize = 0x90;
const EFER: usize = 0xd0;
const CR4: usize = 0x148;
const CR0: usize = 0x158;
const DR7: usize = 0x160;
const DR6: usize = 0x168;
const RFLAGS: usize = 0x170;
const RIP: usize = 0x178;
const G_PAT: usize = 0x268;
const RDX: usize = 0x310;
const SEV_FEATURES: usize = 0x3b0;
const XCR0: usize = 0x3e8;
const MXCSR: usize = 0x408;
const X87_FCW: usize = 0x410;

/// A VMCB segment register (`struct vmcb_seg`).
#[derive(Clone, Copy)]
struct Segment {
    selector: u16,
    attrib: u16,
    limit: u32,
    base: u64,
}

const fn seg(selector: u16, attrib: u16, limit: u32, base: u64) -> Segment {
    Segment {
        selector,
        attrib,
        limit,
        base,
    }
}

/// The register values that differ between save areas.
struct SaveArea {
    es: Segment,
    cs: Segment,
    ss: Segment,
    ds: Segment,
    fs: Segment,
    gs: Segment,
    gdtr: Segment,
    idtr: Segment,
    ldtr: Segment,
    tr: Segment,
    cr0: u64,
    rip: u64,
    g_pat: u64,
    rdx: u64,
    sev_features: u64,
    mxcsr: u32,
    x87_fcw: u16,
}

impl SaveArea {
    fn to_page(&self) -> Box<VmsaPage> {
        let mut page = Box::new([0u8; VMSA_PAGE_SIZE]);
        let mut put = |offset: usize, bytes: &[u8]| {
            page[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        for (offset, segment) in [
            (ES, self.es),
            (CS, self.cs),
            (SS, self.ss),
            (DS, self.ds),
            (FS, self.fs),
            (GS, self.gs),
            (GDTR, self.gdtr),
            (LDTR, self.ldtr),
            (IDTR, self.idtr),
            (TR, self.tr),
        ] {
            put(offset, &segment.selector.to_le_bytes());
            put(offset + 2, &segment.attrib.to_le_bytes());
            put(offset + 4, &segment.limit.to_le_bytes());
            put(offset + 8, &segment.base.to_le_bytes());
        }
        put(EFER, &0x1000u64.to_le_bytes()); // KVM enables EFER_SVME
        put(CR4, &0x40u64.to_le_bytes()); // KVM enables X86_CR4_MCE
        put(CR0, &self.cr0.to_le_bytes());
        put(DR7, &0x400u64.to_le_bytes());
        put(DR6, &0xffff_0ff0u64.to_le_bytes());
        put(RFLAGS, &0x2u64.to_le_bytes());
        put(RIP, &self.rip.to_le_bytes());
        put(G_PAT, &self.g_pat.to_le_bytes());
        put(RDX, &self.rdx.to_le_bytes());
        put(SEV_FEATURES, &self.sev_features.to_le_bytes());
        put(XCR0, &0x1u64.to_le_bytes());
        put(MXCSR, &self.mxcsr.to_le_bytes());
        put(X87_FCW, &self.x87_fcw.to_le_bytes());
        page
    }
}

/// The save area of a vCPU starting at `eip` under an OVMF launch.
fn ovmf_save_area(eip: u32, sev_features: u64, vcpu_sig: u64, vmm: VmmType) -> SaveArea {
    // QEMU, EC2 and GCE differ slightly on the initial register state.
    let (cs_flags, ss_flags, tr_flags, rdx, mxcsr, fcw, g_pat) = match vmm {
        VmmType::Qemu => (0x9b, 0x93, 0x8b, vcpu_sig, 0x1f80, 0x37f, DEFAULT_G_PAT),
        VmmType::Ec2 => {
            let cs_flags = if eip == BSP_EIP { 0x9a } else { 0x9b };
            (cs_flags, 0x92, 0x83, 0x600, 0, 0, DEFAULT_G_PAT)
        }
        // The GCE hypervisor overwrites the default g_pat.
        VmmType::Gce => (0x9b, 0x93, 0x8b, 0x600, 0, 0, 0x0007_0106),
    };
    SaveArea {
        es: seg(0, 0x93, 0xffff, 0),
        cs: seg(0xf000, cs_flags, 0xffff, u64::from(eip & 0xffff_0000)),
        ss: seg(0, ss_flags, 0xffff, 0),
        ds: seg(0, 0x93, 0xffff, 0),
        fs: seg(0, 0x93, 0xffff, 0),
        gs: seg(0, 0x93, 0xffff, 0),
        gdtr: seg(0, 0, 0xffff, 0),
        idtr: seg(0, 0, 0xffff, 0),
        ldtr: seg(0, 0x82, 0xffff, 0),
        tr: seg(0, tr_flags, 0xffff, 0),
        cr0: 0x10,
        rip: u64::from(eip & 0xffff),
        g_pat,
        rdx,
        sev_features,
        mxcsr,
        x87_fcw: fcw,
    }
}

/// The save area of every vCPU of a Coconut-SVSM launch, entering the SVSM
/// at `eip` in 32-bit protected mode.
fn svsm_save_area(eip: u64, vcpu_sig: u64) -> SaveArea {
    SaveArea {
        es: seg(16, 0xc93, 0xffff_ffff, 0),
        cs: seg(8, 0xc9b, 0xffff_ffff, 0),
        ss: seg(16, 0xc93, 0xffff_ffff, 0),
        ds: seg(16, 0xc93, 0xffff_ffff, 0),
        fs: seg(16, 0xc93, 0xffff_ffff, 0),
        gs: seg(0, 0x093, 0xffff, 0),
        gdtr: seg(0, 0, 0xffff, 0),
        idtr: seg(0, 0, 0xffff, 0),
        ldtr: seg(0, 0x82, 0xffff, 0),
        tr: seg(0, 0x8b, 0xffff, 0),
        cr0: 0x11,
        rip: eip,
        g_pat: DEFAULT_G_PAT,
        rdx: vcpu_sig,
        sev_features: 0x1,
        mxcsr: 0x1f80,
        // The reference passes `fcw=` to a structure whose field is
        // `x87_fcw`; ctypes ignores the unknown name, so FCW stays 0.
        x87_fcw: 0,
    }
}

/// The VMSA pages of a launch: the bootstrap processor's, then one per
/// application processor (all identical).
#[derive(Clone, PartialEq, Eq)]
pub struct VmsaPages {
    bsp: Box<VmsaPage>,
    ap: Box<VmsaPage>,
    vcpus: usize,
}

impl std::fmt::Debug for VmsaPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmsaPages")
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

impl VmsaPages {
    /// The VMSAs of an OVMF launch: the BSP starts at the reset vector, the
    /// APs at the firmware's SEV-ES reset address `ap_eip`.
    pub fn ovmf(
        vcpus: usize,
        ap_eip: u32,
        vcpu_sig: u64,
        sev_features: u64,
        vmm: VmmType,
    ) -> Result<Self, MeasurementError> {
        if ap_eip == 0 && vcpus > 1 {
            return Err(MeasurementError::ZeroApResetEip);
        }
        Ok(VmsaPages {
            bsp: ovmf_save_area(BSP_EIP, sev_features, vcpu_sig, vmm).to_page(),
            ap: ovmf_save_area(ap_eip, sev_features, vcpu_sig, vmm).to_page(),
            vcpus,
        })
    }

    /// The VMSAs of a Coconut-SVSM launch: every vCPU enters at `eip`.
    pub fn svsm(vcpus: usize, eip: u64, vcpu_sig: u64) -> Self {
        let page = svsm_save_area(eip, vcpu_sig).to_page();
        VmsaPages {
            bsp: page.clone(),
            ap: page,
            vcpus,
        }
    }

    /// Number of pages (one per vCPU).
    pub fn len(&self) -> usize {
        self.vcpus
    }

    /// Whether there are no vCPUs.
    pub fn is_empty(&self) -> bool {
        self.vcpus == 0
    }

    /// The page of vCPU `index`.
    pub fn get(&self, index: usize) -> Option<&VmsaPage> {
        match index {
            0 if self.vcpus > 0 => Some(&self.bsp),
            i if i < self.vcpus => Some(&self.ap),
            _ => None,
        }
    }

    /// The pages in vCPU order.
    pub fn iter(&self) -> impl Iterator<Item = &VmsaPage> + '_ {
        (0..self.vcpus).map(move |index| if index == 0 { &*self.bsp } else { &*self.ap })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failing unwrap is a failing test.
mod tests {
    use super::*;

    fn u64_at(page: &VmsaPage, offset: usize) -> u64 {
        u64::from_le_bytes(page[offset..offset + 8].try_into().unwrap())
    }

    #[test]
    fn qemu_bsp_and_ap() {
        let pages = VmsaPages::ovmf(3, 0x0080_b004, 0x0080_0f12, 0x1, VmmType::Qemu).unwrap();
        assert_eq!(pages.len(), 3);
        let bsp = pages.get(0).unwrap();
        let ap = pages.get(2).unwrap();
        assert!(pages.get(3).is_none());
        assert_eq!(u64_at(bsp, RIP), 0xfff0);
        assert_eq!(u64_at(bsp, CS + 8), 0xffff_0000);
        assert_eq!(u64_at(ap, RIP), 0xb004);
        assert_eq!(u64_at(ap, CS + 8), 0x0080_0000);
        assert_eq!(
            &bsp[CS..CS + 8],
            &[0x00, 0xf0, 0x9b, 0x00, 0xff, 0xff, 0x00, 0x00]
        );
        assert_eq!(u64_at(bsp, RDX), 0x0080_0f12);
        assert_eq!(u64_at(bsp, SEV_FEATURES), 1);
        assert_eq!(u64_at(bsp, G_PAT), DEFAULT_G_PAT);
        assert_eq!(&bsp[MXCSR..MXCSR + 4], &0x1f80u32.to_le_bytes());
        assert_eq!(&bsp[X87_FCW..X87_FCW + 2], &0x37fu16.to_le_bytes());
        assert_eq!(pages.iter().count(), 3);
    }

    #[test]
    fn ec2_and_gce_differences() {
        let ec2 = VmsaPages::ovmf(2, 0x0080_b004, 0x1234, 0x1, VmmType::Ec2).unwrap();
        assert_eq!(ec2.get(0).unwrap()[CS + 2], 0x9a);
        assert_eq!(ec2.get(1).unwrap()[CS + 2], 0x9b);
        assert_eq!(ec2.get(0).unwrap()[SS + 2], 0x92);
        assert_eq!(ec2.get(0).unwrap()[TR + 2], 0x83);
        assert_eq!(u64_at(ec2.get(0).unwrap(), RDX), 0x600);
        let gce = VmsaPages::ovmf(1, 0x0080_b004, 0x1234, 0x1, VmmType::Gce).unwrap();
        assert_eq!(u64_at(gce.get(0).unwrap(), G_PAT), 0x0007_0106);
        assert_eq!(u64_at(gce.get(0).unwrap(), RDX), 0x600);
    }

    #[test]
    fn zero_ap_eip_only_fails_with_aps() {
        assert!(VmsaPages::ovmf(1, 0, 0, 1, VmmType::Qemu).is_ok());
        assert!(matches!(
            VmsaPages::ovmf(2, 0, 0, 1, VmmType::Qemu),
            Err(MeasurementError::ZeroApResetEip)
        ));
    }

    #[test]
    fn svsm_pages() {
        let pages = VmsaPages::svsm(2, 0xffbf_0000 + 0x10, 0x00a0_0f11);
        let page = pages.get(1).unwrap();
        assert_eq!(pages.get(0), pages.get(1));
        assert_eq!(u64_at(page, RIP), 0xffbf_0010);
        assert_eq!(u64_at(page, CR0), 0x11);
        assert_eq!(&page[X87_FCW..X87_FCW + 2], &[0, 0]);
        assert_eq!(
            &page[CS..CS + 8],
            &[8, 0, 0x9b, 0x0c, 0xff, 0xff, 0xff, 0xff]
        );
    }
}
