//! A minimal DER writer: just what the simulated Secure Processor needs to
//! lay out X.509 certificates the way AMD's are (RSASSA-PSS signatures,
//! which OpenSSL's certificate builder cannot produce through the `openssl`
//! crate). Hand-written because it is a few tag-length-value helpers.

/// Encodes a definite length.
fn length(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let first = bytes
            .iter()
            .position(|&byte| byte != 0)
            .unwrap_or(bytes.len() - 1);
        let significant = &bytes[first..];
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
}

/// A tag-length-value element.
pub(super) fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(contents.len() + 6);
    out.push(tag);
    length(contents.len(), &mut out);
    out.extend_from_slice(contents);
    out
}

/// A SEQUENCE of already-encoded elements.
pub(super) fn sequence(elements: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &elements.concat())
}

/// A non-negative INTEGER from big-endian magnitude bytes.
pub(super) fn unsigned_integer(magnitude: &[u8]) -> Vec<u8> {
    let first = magnitude
        .iter()
        .position(|&byte| byte != 0)
        .unwrap_or(magnitude.len());
    let mut contents = magnitude[first..].to_vec();
    if contents.first().is_none_or(|&byte| byte & 0x80 != 0) {
        contents.insert(0, 0);
    }
    tlv(0x02, &contents)
}

/// An OBJECT IDENTIFIER from its dotted form (first arc 0-2).
pub(super) fn object_identifier(dotted: &str) -> Vec<u8> {
    let arcs: Vec<u64> = dotted
        .split('.')
        .filter_map(|arc| arc.parse().ok())
        .collect();
    let mut contents = Vec::new();
    if let [first, second, rest @ ..] = arcs.as_slice() {
        base128(first * 40 + second, &mut contents);
        for &arc in rest {
            base128(arc, &mut contents);
        }
    }
    tlv(0x06, &contents)
}

fn base128(mut value: u64, out: &mut Vec<u8>) {
    let mut groups = vec![(value & 0x7f) as u8];
    value >>= 7;
    while value > 0 {
        groups.push(0x80 | (value & 0x7f) as u8);
        value >>= 7;
    }
    out.extend(groups.iter().rev());
}

/// A BIT STRING with no unused bits.
pub(super) fn bit_string(bytes: &[u8]) -> Vec<u8> {
    tlv(0x03, &[&[0u8][..], bytes].concat())
}

/// An OCTET STRING.
pub(super) fn octet_string(bytes: &[u8]) -> Vec<u8> {
    tlv(0x04, bytes)
}

/// An IA5String.
pub(super) fn ia5_string(text: &str) -> Vec<u8> {
    tlv(0x16, text.as_bytes())
}

/// A GeneralizedTime `YYYYMMDDHHMMSSZ`.
pub(super) fn generalized_time(time: time::OffsetDateTime) -> Vec<u8> {
    let utc = time.to_offset(time::UtcOffset::UTC);
    let text = format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}Z",
        utc.year(),
        u8::from(utc.month()),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second()
    );
    tlv(0x18, text.as_bytes())
}

/// A context-specific constructed tag `[n]`.
pub(super) fn explicit(n: u8, contents: &[u8]) -> Vec<u8> {
    tlv(0xa0 | n, contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_lengths_integers_and_oids() {
        assert_eq!(tlv(0x04, &[1, 2]), vec![4, 2, 1, 2]);
        assert_eq!(&tlv(0x04, &[0; 200])[..3], &[4, 0x81, 200]);
        assert_eq!(&tlv(0x04, &[0; 300])[..4], &[4, 0x82, 1, 44]);
        assert_eq!(unsigned_integer(&[0, 0, 5]), vec![2, 1, 5]);
        assert_eq!(unsigned_integer(&[0x80]), vec![2, 2, 0, 0x80]);
        assert_eq!(unsigned_integer(&[]), vec![2, 1, 0]);
        // 1.2.840.113549.1.1.10, RSASSA-PSS.
        assert_eq!(
            object_identifier("1.2.840.113549.1.1.10"),
            vec![6, 9, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 1, 1, 10]
        );
    }
}
