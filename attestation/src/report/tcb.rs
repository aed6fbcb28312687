//! TCB versions: the security patch levels of each firmware component.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::product::TcbLayout;

/// A TCB version, decoded by component. `fmc` exists on Turin only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TcbVersion {
    /// Firmware mask ROM patch level (Turin and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
    /// PSP bootloader security version.
    pub bootloader: u8,
    /// PSP operating system (TEE) security version.
    pub tee: u8,
    /// SNP firmware security version.
    pub snp: u8,
    /// Lowest microcode patch level across all cores.
    pub microcode: u8,
}

/// A TCB whose reserved bytes are not zero, or whose fmc field does not fit
/// the layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TcbError {
    /// A reserved byte of the 8-byte encoding is set.
    #[error("reserved TCB byte {index} is {value:#04x}, must be zero")]
    ReservedByteSet {
        /// Byte index within the TCB.
        index: usize,
        /// The offending value.
        value: u8,
    },
    /// A TCB with an fmc field in a layout that has none, or the reverse.
    #[error("fmc is {problem} for the {layout:?} TCB layout")]
    FmcMismatch {
        /// "present" or "missing".
        problem: &'static str,
        /// The layout being encoded.
        layout: TcbLayout,
    },
}

impl TcbVersion {
    /// Decodes the 8 raw bytes of a report's TCB field.
    pub fn decode(raw: [u8; 8], layout: TcbLayout) -> Result<Self, TcbError> {
        let reserved: &[usize] = match layout {
            TcbLayout::Legacy => &[2, 3, 4, 5],
            TcbLayout::Turin => &[4, 5, 6],
        };
        if let Some(&index) = reserved.iter().find(|&&index| raw[index] != 0) {
            return Err(TcbError::ReservedByteSet {
                index,
                value: raw[index],
            });
        }
        Ok(match layout {
            TcbLayout::Legacy => TcbVersion {
                fmc: None,
                bootloader: raw[0],
                tee: raw[1],
                snp: raw[6],
                microcode: raw[7],
            },
            TcbLayout::Turin => TcbVersion {
                fmc: Some(raw[0]),
                bootloader: raw[1],
                tee: raw[2],
                snp: raw[3],
                microcode: raw[7],
            },
        })
    }

    /// Encodes into the 8 raw bytes of `layout`.
    pub fn encode(&self, layout: TcbLayout) -> Result<[u8; 8], TcbError> {
        match (layout, self.fmc) {
            (TcbLayout::Legacy, None) => Ok([
                self.bootloader,
                self.tee,
                0,
                0,
                0,
                0,
                self.snp,
                self.microcode,
            ]),
            (TcbLayout::Turin, Some(fmc)) => Ok([
                fmc,
                self.bootloader,
                self.tee,
                self.snp,
                0,
                0,
                0,
                self.microcode,
            ]),
            (TcbLayout::Legacy, Some(_)) => Err(TcbError::FmcMismatch {
                problem: "present",
                layout,
            }),
            (TcbLayout::Turin, None) => Err(TcbError::FmcMismatch {
                problem: "missing",
                layout,
            }),
        }
    }

    /// The components as (name, value) pairs, fmc first where present.
    pub fn components(&self) -> Vec<(&'static str, u8)> {
        let mut components = Vec::with_capacity(5);
        if let Some(fmc) = self.fmc {
            components.push(("fmc", fmc));
        }
        components.extend([
            ("bootloader", self.bootloader),
            ("tee", self.tee),
            ("snp", self.snp),
            ("microcode", self.microcode),
        ]);
        components
    }
}

impl fmt::Display for TcbVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .components()
            .into_iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        f.write_str(&parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_layout_round_trips() {
        let raw = [3, 0, 0, 0, 0, 0, 8, 115];
        let tcb = TcbVersion::decode(raw, TcbLayout::Legacy).expect("valid TCB");
        assert_eq!(
            (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode),
            (3, 0, 8, 115)
        );
        assert_eq!(tcb.fmc, None);
        assert_eq!(tcb.encode(TcbLayout::Legacy).expect("encodes"), raw);
    }

    #[test]
    fn turin_layout_round_trips() {
        let raw = [1, 2, 3, 4, 0, 0, 0, 9];
        let tcb = TcbVersion::decode(raw, TcbLayout::Turin).expect("valid TCB");
        assert_eq!(tcb.fmc, Some(1));
        assert_eq!(
            (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode),
            (2, 3, 4, 9)
        );
        assert_eq!(tcb.encode(TcbLayout::Turin).expect("encodes"), raw);
    }

    #[test]
    fn reserved_bytes_are_refused() {
        let error = TcbVersion::decode([3, 0, 1, 0, 0, 0, 8, 115], TcbLayout::Legacy)
            .expect_err("reserved byte set");
        assert_eq!(error, TcbError::ReservedByteSet { index: 2, value: 1 });
        assert!(TcbVersion::decode([1, 2, 3, 4, 0, 5, 0, 9], TcbLayout::Turin).is_err());
    }

    #[test]
    fn fmc_must_fit_the_layout() {
        let legacy = TcbVersion {
            fmc: None,
            ..TcbVersion::default()
        };
        assert!(legacy.encode(TcbLayout::Turin).is_err());
        let turin = TcbVersion {
            fmc: Some(1),
            ..TcbVersion::default()
        };
        assert!(turin.encode(TcbLayout::Legacy).is_err());
    }
}
