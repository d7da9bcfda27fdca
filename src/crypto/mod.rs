//! The crypto core: keys, the X-Wing KEM, envelopes, message encryption and signatures.
//!
//! Pure: no I/O, no async, no database, no gRPC. The service uses it to wrap DEKs and keep
//! secrets under the KEK; device clients and staff tooling use it to open what is addressed to
//! them. Every byte format it produces is written down in the module that produces it:
//!
//! - [`xwing`]: the hybrid KEM (draft-connolly-cfrg-xwing-kem-06);
//! - [`envelope`]: DEK envelopes to a recipient key, KEK envelopes for secrets at rest;
//! - [`message`]: per-message keys and AES-256-GCM;
//! - [`sign`]: Ed25519 identity keys and the canonical encodings they sign;
//! - [`canon`](self) rules for those encodings, [`ids`] and [`keys`] for the types they bind.
//!
//! Every function returns [`CryptoError`] on bad input of any length or content; none panics.

mod canon;
pub mod envelope;
pub mod error;
pub mod ids;
pub mod keys;
pub mod message;
pub mod sign;
pub mod xwing;

#[cfg(test)]
mod vectors;

pub use error::CryptoError;

/// The algorithm suite of an envelope, named by its leading byte.
///
/// New suites get new bytes; old data keeps opening under the suite it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum Suite {
    /// X-Wing KEM (X25519 + ML-KEM-768), HKDF-SHA256, AES-256-GCM. The default.
    XWingAes256GcmV1 = 0x01,
}

impl Suite {
    /// The suite a leading byte names.
    pub fn from_byte(b: u8) -> Result<Self, CryptoError> {
        match b {
            0x01 => Ok(Suite::XWingAes256GcmV1),
            other => Err(CryptoError::UnknownSuite(other)),
        }
    }

    /// The suite's name as the API spells it.
    pub fn name(self) -> &'static str {
        match self {
            Suite::XWingAes256GcmV1 => "XWING_AES256GCM_V1",
        }
    }
}
