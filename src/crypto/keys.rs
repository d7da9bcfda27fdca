//! Symmetric secrets: data-encryption keys (DEKs) and versioned key-encryption keys (KEKs).
//!
//! Both zeroize on drop and print nothing of themselves in `Debug`.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::error::{exact, CryptoError};

/// Length of a DEK and of a KEK in bytes.
pub const SYMMETRIC_KEY_LEN: usize = 32;

/// Fills a buffer from the operating system's random number generator.
pub(crate) fn random_bytes<const N: usize>() -> Result<Zeroizing<[u8; N]>, CryptoError> {
    let mut out = Zeroizing::new([0u8; N]);
    aws_lc_rs::rand::fill(out.as_mut())?;
    Ok(out)
}

/// A session epoch's data-encryption key: 32 random bytes.
///
/// Messages of the epoch are sealed under keys derived from it
/// ([`crate::crypto::message`]); it travels only inside envelopes.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Dek([u8; SYMMETRIC_KEY_LEN]);

impl Dek {
    /// Draws a fresh DEK from the operating system's random number generator.
    pub fn generate() -> Result<Self, CryptoError> {
        Ok(Self(*random_bytes::<SYMMETRIC_KEY_LEN>()?))
    }

    /// Takes a DEK from raw bytes (for example after a client opened an envelope itself).
    pub fn from_bytes(bytes: [u8; SYMMETRIC_KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Parses a DEK from a slice of exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        Ok(Self(exact::<SYMMETRIC_KEY_LEN>("DEK", bytes)?))
    }

    /// The raw key. Handle with care: copies of it are not zeroized for you.
    pub fn expose_secret(&self) -> &[u8; SYMMETRIC_KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(<redacted>)")
    }
}

/// The version of a KEK. Envelopes carry it so that rotation finds what to re-wrap.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct KekVersion(pub u32);

impl fmt::Display for KekVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// The service's key-encryption key, with its version.
///
/// It keeps the service's copy of each DEK and ratchet state at rest
/// ([`crate::crypto::envelope::seal_under_kek`]).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Kek {
    #[zeroize(skip)]
    version: KekVersion,
    key: [u8; SYMMETRIC_KEY_LEN],
}

impl Kek {
    /// Draws a fresh KEK of the given version.
    pub fn generate(version: KekVersion) -> Result<Self, CryptoError> {
        Ok(Self {
            version,
            key: *random_bytes::<SYMMETRIC_KEY_LEN>()?,
        })
    }

    /// Takes a KEK from its raw bytes.
    pub fn from_bytes(version: KekVersion, key: [u8; SYMMETRIC_KEY_LEN]) -> Self {
        Self { version, key }
    }

    /// Parses a KEK from a slice of exactly 32 bytes.
    pub fn from_slice(version: KekVersion, key: &[u8]) -> Result<Self, CryptoError> {
        Ok(Self {
            version,
            key: exact::<SYMMETRIC_KEY_LEN>("KEK", key)?,
        })
    }

    /// This KEK's version.
    pub fn version(&self) -> KekVersion {
        self.version
    }

    /// The raw key, for writing it to its key file.
    pub fn expose_secret(&self) -> &[u8; SYMMETRIC_KEY_LEN] {
        &self.key
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek")
            .field("version", &self.version)
            .field("key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_no_key_bytes() {
        let dek = Dek::from_bytes([0xAB; 32]);
        let kek = Kek::from_bytes(KekVersion(7), [0xCD; 32]);
        let shown = format!("{dek:?} {kek:?}");
        for needle in ["abab", "171", "cdcd", "205"] {
            assert!(!shown.to_lowercase().contains(needle), "{shown}");
        }
        assert!(shown.contains("KekVersion(7)"));
    }

    #[test]
    fn generated_deks_differ() {
        assert_ne!(
            Dek::generate().unwrap().expose_secret(),
            Dek::generate().unwrap().expose_secret()
        );
    }

    #[test]
    fn zeroize_clears_the_key() {
        let mut dek = Dek::from_bytes([0x55; 32]);
        dek.zeroize();
        assert_eq!(dek.expose_secret(), &[0u8; 32]);
        let mut kek = Kek::from_bytes(KekVersion(1), [0x66; 32]);
        kek.zeroize();
        assert_eq!(kek.expose_secret(), &[0u8; 32]);
    }
}
