//! Fixed-length byte strings written as hex in policies and JSON.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// `N` bytes, (de)serialized as `2 * N` hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HexBytes<const N: usize>(pub [u8; N]);

impl<const N: usize> HexBytes<N> {
    /// Parses exactly `2 * N` hex digits.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text).map_err(|error| format!("{text:?} is not hex: {error}"))?;
        let array: [u8; N] = bytes.as_slice().try_into().map_err(|_| {
            format!(
                "expected {N} bytes ({} hex digits), got {} bytes",
                2 * N,
                bytes.len()
            )
        })?;
        Ok(HexBytes(array))
    }
}

impl<const N: usize> fmt::Debug for HexBytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl<const N: usize> fmt::Display for HexBytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl<const N: usize> std::str::FromStr for HexBytes<N> {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        HexBytes::parse(text)
    }
}

impl<const N: usize> Serialize for HexBytes<N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(self.0))
    }
}

impl<'de, const N: usize> Deserialize<'de> for HexBytes<N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        HexBytes::parse(&text).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_lengths_only() {
        assert_eq!(HexBytes::<2>::parse("abcd").map(|h| h.0), Ok([0xab, 0xcd]));
        assert!(HexBytes::<2>::parse("abcdef").is_err());
        assert!(HexBytes::<2>::parse("zz00").is_err());
    }
}
