//! The one canonical byte encoding that envelope contexts and signatures are computed over.
//!
//! Rules, so that a client in any language produces the same bytes:
//!
//! - a **label** (domain separator) is its ASCII bytes behind a big-endian `u16` length;
//! - a **variable-length field** (ids, keys, envelopes) is its bytes behind a big-endian `u32`
//!   length;
//! - a **fixed-length field** (suite byte, UUIDs, key ids, identity keys) is its bytes as they are;
//! - integers are big-endian (`u8`, `u32`, `u64`).
//!
//! Every encoding starts with its own label, so no encoding of one kind can be read as another.

/// Builds a canonical encoding field by field.
#[derive(Default)]
pub(crate) struct Canon(Vec<u8>);

impl Canon {
    /// Starts an encoding with its domain label.
    pub(crate) fn new(label: &str) -> Self {
        let mut c = Canon(Vec::with_capacity(128));
        c.0.extend_from_slice(&(label.len() as u16).to_be_bytes());
        c.0.extend_from_slice(label.as_bytes());
        c
    }

    /// Appends a fixed-length field.
    pub(crate) fn fixed(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    /// Appends a variable-length field behind its `u32` length.
    pub(crate) fn var(mut self, bytes: &[u8]) -> Self {
        // Every field the crypto core encodes is far below 4 GiB (ids are capped at 128 bytes,
        // envelopes at a few KiB), so the length always fits.
        self.0
            .extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
        self.0.extend_from_slice(bytes);
        self
    }

    /// Appends one byte.
    pub(crate) fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }

    /// Appends a big-endian `u32`.
    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// The finished encoding.
    pub(crate) fn finish(self) -> Vec<u8> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_length_prefixed_and_big_endian() {
        let bytes = Canon::new("ab")
            .u8(1)
            .u32(2)
            .var(b"xyz")
            .fixed(&[9, 9])
            .finish();
        assert_eq!(
            bytes,
            vec![0, 2, b'a', b'b', 1, 0, 0, 0, 2, 0, 0, 0, 3, b'x', b'y', b'z', 9, 9]
        );
    }

    #[test]
    fn moving_bytes_between_fields_changes_the_encoding() {
        let a = Canon::new("l").var(b"ab").var(b"c").finish();
        let b = Canon::new("l").var(b"a").var(b"bc").finish();
        assert_ne!(a, b);
    }
}
