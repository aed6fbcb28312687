//! The guest policy a VM was launched with (SNP ABI, GUEST_POLICY).

use serde::Serialize;

/// Bit 17 of the guest policy is reserved and must be one.
const RESERVED_MUST_BE_ONE: u64 = 1 << 17;
/// Bits 63..26 are reserved and must be zero.
const RESERVED_MUST_BE_ZERO: u64 = !((1 << 26) - 1);

/// Named bits of the guest policy, in bit order, starting at bit 16.
const NAMED_BITS: [(u32, &str); 9] = [
    (16, "smt"),
    (18, "migrate_ma"),
    (19, "debug"),
    (20, "single_socket"),
    (21, "cxl_allow"),
    (22, "mem_aes_256_xts"),
    (23, "rapl_dis"),
    (24, "ciphertext_hiding"),
    (25, "page_swap_disable"),
];

/// A guest policy whose reserved bits are as the ABI demands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPolicy(u64);

/// A policy value with reserved bits set or cleared wrongly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestPolicyError {
    /// Bit 17 is clear.
    #[error("guest policy {0:#x}: reserved bit 17 must be one")]
    ReservedBitClear(u64),
    /// A bit above 25 is set.
    #[error("guest policy {0:#x}: undefined bits {1:#x} are set")]
    UndefinedBitsSet(u64, u64),
}

impl GuestPolicy {
    /// Checks the reserved bits of a raw policy.
    pub fn new(raw: u64) -> Result<Self, GuestPolicyError> {
        if raw & RESERVED_MUST_BE_ONE == 0 {
            return Err(GuestPolicyError::ReservedBitClear(raw));
        }
        if raw & RESERVED_MUST_BE_ZERO != 0 {
            return Err(GuestPolicyError::UndefinedBitsSet(
                raw,
                raw & RESERVED_MUST_BE_ZERO,
            ));
        }
        Ok(GuestPolicy(raw))
    }

    /// The raw 64-bit value.
    pub fn raw(self) -> u64 {
        self.0
    }

    /// Minimum ABI major version the guest requires.
    pub fn abi_major(self) -> u8 {
        self.0.to_le_bytes()[1]
    }

    /// Minimum ABI minor version the guest requires.
    pub fn abi_minor(self) -> u8 {
        self.0.to_le_bytes()[0]
    }

    fn bit(self, index: u32) -> bool {
        self.0 & (1 << index) != 0
    }

    /// SMT is allowed on the host.
    pub fn smt_allowed(self) -> bool {
        self.bit(16)
    }

    /// Association with a migration agent is allowed.
    pub fn migrate_ma_allowed(self) -> bool {
        self.bit(18)
    }

    /// Debugging is allowed: the host can read and write guest memory.
    pub fn debug_allowed(self) -> bool {
        self.bit(19)
    }

    /// The guest may run on one socket only.
    pub fn single_socket_required(self) -> bool {
        self.bit(20)
    }

    /// The names of the flag bits that are set.
    pub fn flags(self) -> Vec<&'static str> {
        NAMED_BITS
            .iter()
            .filter(|(index, _)| self.bit(*index))
            .map(|(_, name)| *name)
            .collect()
    }
}

impl Serialize for GuestPolicy {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut state = serializer.serialize_struct("GuestPolicy", 4)?;
        state.serialize_field("raw", &format!("{:#x}", self.0))?;
        state.serialize_field("abi_major", &self.abi_major())?;
        state.serialize_field("abi_minor", &self.abi_minor())?;
        state.serialize_field("flags", &self.flags())?;
        state.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_named_bits() {
        let policy = GuestPolicy::new(0xb001f).expect("valid policy");
        assert_eq!((policy.abi_major(), policy.abi_minor()), (0, 0x1f));
        assert!(policy.smt_allowed());
        assert!(policy.debug_allowed());
        assert!(!policy.migrate_ma_allowed());
        assert_eq!(policy.flags(), vec!["smt", "debug"]);
    }

    #[test]
    fn reserved_bits_are_checked() {
        assert_eq!(
            GuestPolicy::new(0x10000),
            Err(GuestPolicyError::ReservedBitClear(0x10000))
        );
        assert!(matches!(
            GuestPolicy::new(0x30000 | 1 << 40),
            Err(GuestPolicyError::UndefinedBitsSet(_, _))
        ));
    }
}
