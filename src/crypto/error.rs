//! The crypto core's one error type.

/// Everything that can go wrong in the crypto core.
///
/// Malformed input of any length or content maps to one of these variants; no function of the
/// crypto core panics on bytes it is handed. Failures to open or verify carry no detail on
/// purpose: telling a caller *which* check failed would help an attacker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A byte string had the wrong length for what it was parsed as.
    #[error("{what}: expected {expected} bytes, got {actual}")]
    InvalidLength {
        /// What was being parsed (for example `"X-Wing encapsulation key"`).
        what: &'static str,
        /// The length that was required.
        expected: usize,
        /// The length that was given.
        actual: usize,
    },
    /// A byte string was shorter than the smallest value of its kind.
    #[error("{what}: at least {min} bytes needed, got {actual}")]
    TooShort {
        /// What was being parsed.
        what: &'static str,
        /// The smallest acceptable length.
        min: usize,
        /// The length that was given.
        actual: usize,
    },
    /// A byte string was longer than the crypto core accepts for its kind.
    #[error("{what}: at most {max} bytes allowed, got {actual}")]
    TooLong {
        /// What was being parsed.
        what: &'static str,
        /// The largest acceptable length.
        max: usize,
        /// The length that was given.
        actual: usize,
    },
    /// The leading suite byte names no suite this version knows.
    #[error("unknown suite id {0:#04x}")]
    UnknownSuite(u8),
    /// A key had the right length but its content is not a valid key (for example an
    /// ML-KEM encapsulation key whose coefficients are not reduced).
    #[error("invalid {0}")]
    InvalidKey(&'static str),
    /// An identifier was empty, too long or used characters outside its alphabet.
    #[error("invalid {what}: {reason}")]
    InvalidId {
        /// Which identifier (for example `"user id"`).
        what: &'static str,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An envelope or ciphertext did not open: wrong key, wrong context, or changed bytes.
    #[error("decryption failed")]
    OpenFailed,
    /// A signature did not verify over the canonical encoding it was checked against.
    #[error("signature verification failed")]
    BadSignature,
    /// A KEK envelope names a KEK version that is not the one given to open it.
    #[error("envelope is under KEK version {found}, not {expected}")]
    KekVersionMismatch {
        /// The version the caller's KEK has.
        expected: u32,
        /// The version written in the envelope.
        found: u32,
    },
    /// The operating system's random number generator or the underlying library failed.
    #[error("cryptographic backend failure")]
    Backend,
}

impl From<aws_lc_rs::error::Unspecified> for CryptoError {
    fn from(_: aws_lc_rs::error::Unspecified) -> Self {
        CryptoError::Backend
    }
}

/// Checks that `bytes` is exactly `N` long and returns it as an array.
pub(crate) fn exact<const N: usize>(
    what: &'static str,
    bytes: &[u8],
) -> Result<[u8; N], CryptoError> {
    bytes.try_into().map_err(|_| CryptoError::InvalidLength {
        what,
        expected: N,
        actual: bytes.len(),
    })
}
