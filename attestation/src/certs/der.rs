//! The few DER encodings AMD's certificate extensions use. Hand-written
//! because they are three fixed, tiny shapes, and a strict reading of each
//! (one-byte INTEGERs with a minimal encoding, an IA5String) is the check.

/// Reads a DER INTEGER that must fit in one unsigned byte: `02 01 vv`, or
/// `02 02 00 vv` for values of 0x80 and above.
pub(crate) fn small_integer(value: &[u8]) -> Result<u8, String> {
    match value {
        [0x02, 0x01, byte] if *byte < 0x80 => Ok(*byte),
        [0x02, 0x02, 0x00, byte] if *byte >= 0x80 => Ok(*byte),
        [0x02, ..] => Err("INTEGER is not a minimally encoded value of 0..=255".into()),
        _ => Err("expected a DER INTEGER".into()),
    }
}

/// Reads a DER IA5String of fewer than 128 bytes.
pub(crate) fn ia5_string(value: &[u8]) -> Result<String, String> {
    match value {
        [0x16, length, rest @ ..] if usize::from(*length) == rest.len() && *length < 0x80 => {
            if rest.is_ascii() {
                Ok(String::from_utf8_lossy(rest).into_owned())
            } else {
                Err("IA5String holds non-ASCII bytes".into())
            }
        }
        _ => Err("expected a short DER IA5String".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_integers() {
        assert_eq!(small_integer(&[2, 1, 8]), Ok(8));
        assert_eq!(small_integer(&[2, 2, 0, 0xd9]), Ok(0xd9));
        assert!(small_integer(&[2, 1, 0x80]).is_err());
        assert!(small_integer(&[2, 2, 0, 0x10]).is_err());
        assert!(small_integer(&[2, 2, 1, 0x10]).is_err());
        assert!(small_integer(&[4, 1, 8]).is_err());
        assert!(small_integer(&[]).is_err());
    }

    #[test]
    fn ia5_strings() {
        assert_eq!(ia5_string(b"\x16\x08Milan-B0"), Ok("Milan-B0".into()));
        assert!(ia5_string(b"\x16\x09Milan-B0").is_err());
        assert!(ia5_string(b"\x0c\x08Milan-B0").is_err());
    }
}
