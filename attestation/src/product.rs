//! AMD EPYC product lines that run SEV-SNP, and how to tell them apart.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An AMD EPYC product line with SEV-SNP. Each has its own AMD root of trust
/// (ARK, ASK, ASVK) and its own key-distribution-service path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Product {
    /// 3rd generation EPYC (Zen 3, family 19h models 00h-0Fh).
    Milan,
    /// 4th generation EPYC (Zen 4: Genoa, Bergamo, Siena).
    Genoa,
    /// 5th generation EPYC (Zen 5, family 1Ah).
    Turin,
}

/// How a product packs a TCB version into its 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcbLayout {
    /// Milan and Genoa: bootloader, tee, 4 reserved, snp, microcode.
    Legacy,
    /// Turin: fmc, bootloader, tee, snp, 3 reserved, microcode.
    Turin,
}

impl Product {
    /// Every product, in release order.
    pub const ALL: [Product; 3] = [Product::Milan, Product::Genoa, Product::Turin];

    /// The product of a CPU family / model pair as reported in v3+ reports.
    pub fn from_cpuid(family: u8, model: u8) -> Option<Product> {
        match (family, model) {
            (0x19, 0x00..=0x0f) => Some(Product::Milan),
            (0x19, 0x10..=0x1f | 0xa0..=0xaf) => Some(Product::Genoa),
            (0x1a, 0x00..=0x1f) => Some(Product::Turin),
            _ => None,
        }
    }

    /// The name AMD uses in certificates and in KDS paths (`Milan`, ...).
    pub fn amd_name(self) -> &'static str {
        match self {
            Product::Milan => "Milan",
            Product::Genoa => "Genoa",
            Product::Turin => "Turin",
        }
    }

    /// The TCB byte layout of this product.
    pub fn tcb_layout(self) -> TcbLayout {
        match self {
            Product::Milan | Product::Genoa => TcbLayout::Legacy,
            Product::Turin => TcbLayout::Turin,
        }
    }

    /// How many leading bytes of the chip id the VCEK's hwID carries.
    pub fn hw_id_len(self) -> usize {
        match self {
            Product::Milan | Product::Genoa => 64,
            Product::Turin => 8,
        }
    }
}

impl fmt::Display for Product {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Product::Milan => "milan",
            Product::Genoa => "genoa",
            Product::Turin => "turin",
        })
    }
}

/// The error for a product name that is none of milan, genoa, turin.
#[derive(Debug, thiserror::Error)]
#[error("unknown product {0:?} (expected milan, genoa or turin)")]
pub struct UnknownProduct(pub String);

impl FromStr for Product {
    type Err = UnknownProduct;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Product::ALL
            .into_iter()
            .find(|product| product.amd_name().eq_ignore_ascii_case(name))
            .ok_or_else(|| UnknownProduct(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_identifies_each_product() {
        assert_eq!(Product::from_cpuid(0x19, 0x01), Some(Product::Milan));
        assert_eq!(Product::from_cpuid(0x19, 0x11), Some(Product::Genoa));
        assert_eq!(Product::from_cpuid(0x19, 0xa0), Some(Product::Genoa));
        assert_eq!(Product::from_cpuid(0x1a, 0x02), Some(Product::Turin));
        assert_eq!(Product::from_cpuid(0x17, 0x31), None);
        assert_eq!(Product::from_cpuid(0x19, 0x50), None);
    }

    #[test]
    fn names_parse_case_insensitively() {
        assert_eq!("Genoa".parse::<Product>().ok(), Some(Product::Genoa));
        assert_eq!("turin".parse::<Product>().ok(), Some(Product::Turin));
        assert!("rome".parse::<Product>().is_err());
    }
}
