//! vCPU signatures: the CPUID `Fn0000_0001_EAX` value QEMU puts in RDX at
//! reset (a port of sev-snp-measure's `vcpu_types.py`).

/// The 32-bit CPUID signature for a family, model and stepping (AMD CPUID
/// Specification #25481, "CPUID Fn0000_0001_EAX Family, Model, Stepping
/// Identifiers").
///
/// Takes and returns the reference's Python integers: the result is what
/// a `c_uint64` VMSA field stores, i.e. modulo 2^64 (a negative family
/// yields a large value, as in the reference).
pub fn cpu_sig(family: i64, model: i64, stepping: i64) -> u64 {
    let (family, model, stepping) = (i128::from(family), i128::from(model), i128::from(stepping));
    let (family_low, family_high) = if family > 0xf {
        (0xf, (family - 0x0f) & 0xff)
    } else {
        (family, 0)
    };
    let model_low = model & 0xf;
    let model_high = (model >> 4) & 0xf;
    let stepping_low = stepping & 0xf;
    let sig = (family_high << 20)
        | (model_high << 16)
        | (family_low << 8)
        | (model_low << 4)
        | stepping_low;
    super::ovmf::wrap_u64(sig)
}

/// Every vCPU type sev-snp-measure 0.0.13 knows (QEMU's `builtin_x86_defs`
/// AMD EPYC models), with its signature, in the reference's order.
pub const CPU_SIGS: [(&str, u32); 16] = [
    ("EPYC", sig(23, 1, 2)),
    ("EPYC-v1", sig(23, 1, 2)),
    ("EPYC-v2", sig(23, 1, 2)),
    ("EPYC-IBPB", sig(23, 1, 2)),
    ("EPYC-v3", sig(23, 1, 2)),
    ("EPYC-v4", sig(23, 1, 2)),
    ("EPYC-Rome", sig(23, 49, 0)),
    ("EPYC-Rome-v1", sig(23, 49, 0)),
    ("EPYC-Rome-v2", sig(23, 49, 0)),
    ("EPYC-Rome-v3", sig(23, 49, 0)),
    ("EPYC-Milan", sig(25, 1, 1)),
    ("EPYC-Milan-v1", sig(25, 1, 1)),
    ("EPYC-Milan-v2", sig(25, 1, 1)),
    ("EPYC-Genoa", sig(25, 17, 0)),
    ("EPYC-Genoa-v1", sig(25, 17, 0)),
    ("EPYC-Turin", sig(26, 0, 0)),
];

/// The signature of a named vCPU type (case-sensitive, as in QEMU).
pub fn vcpu_sig_for_type(name: &str) -> Option<u32> {
    CPU_SIGS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, sig)| *sig)
}

/// [`cpu_sig`] for the in-range constants of the table.
const fn sig(family: u32, model: u32, stepping: u32) -> u32 {
    let (family_low, family_high) = if family > 0xf {
        (0xf, (family - 0x0f) & 0xff)
    } else {
        (family, 0)
    };
    (family_high << 20)
        | (((model >> 4) & 0xf) << 16)
        | (family_low << 8)
        | ((model & 0xf) << 4)
        | (stepping & 0xf)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failing unwrap is a failing test.
mod tests {
    use super::*;

    #[test]
    fn known_signatures() {
        assert_eq!(vcpu_sig_for_type("EPYC"), Some(0x0080_0f12));
        assert_eq!(vcpu_sig_for_type("EPYC-v4"), Some(0x0080_0f12));
        assert_eq!(vcpu_sig_for_type("EPYC-Rome"), Some(0x0083_0f10));
        assert_eq!(vcpu_sig_for_type("EPYC-Milan"), Some(0x00a0_0f11));
        assert_eq!(vcpu_sig_for_type("EPYC-Genoa"), Some(0x00a1_0f10));
        assert_eq!(vcpu_sig_for_type("EPYC-Turin"), Some(0x00b0_0f00));
        assert_eq!(vcpu_sig_for_type("epyc"), None);
    }

    #[test]
    fn table_agrees_with_cpu_sig() {
        assert_eq!(cpu_sig(23, 1, 2), 0x0080_0f12);
        assert_eq!(cpu_sig(25, 17, 0), 0x00a1_0f10);
        assert_eq!(cpu_sig(6, 0x5e, 3), 0x0005_06e3);
        for (name, value) in CPU_SIGS {
            assert!(!name.is_empty());
            assert!(value > 0);
        }
    }

    #[test]
    fn python_integer_semantics() {
        // family 0xf: low nibble only. model/stepping are masked.
        assert_eq!(cpu_sig(0xf, 0x1ff, 0x12), 0x000f_0ff2);
        // A negative family wraps like a c_uint64: -1 << 8 | ...
        assert_eq!(cpu_sig(-1, 0, 0), (-256i64) as u64);
        assert_eq!(cpu_sig(-1, -1, -1), u64::MAX);
        assert_eq!(cpu_sig(i64::MAX, i64::MIN, i64::MAX), 0x0f00_0f0f);
    }
}
