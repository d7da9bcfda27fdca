//! Envelopes: a DEK wrapped to a recipient's X-Wing key, and any secret sealed under the KEK.
//!
//! # DEK envelope (suite `XWING_AES256GCM_V1`, 1,169 bytes)
//!
//! ```text
//! offset  length  field
//! 0       1       suite id, 0x01
//! 1       1120    X-Wing ciphertext (ct_M 1088 || ct_X 32), draft-connolly-cfrg-xwing-kem-06
//! 1121    32      AES-256-GCM ciphertext of the 32-byte DEK
//! 1153    16      AES-256-GCM tag
//! ```
//!
//! To wrap: encapsulate to the recipient's encapsulation key, getting `ct` and `ss`;
//! `key = HKDF-Expand-SHA256(PRK = ss, info = "keyhold/v1/dek-wrap-key" || suite, L = 32)`;
//! seal the DEK with AES-256-GCM under `key`, a nonce of twelve zero bytes (each key seals
//! exactly one message, since `ss` is fresh for every wrap) and the associated data
//! `AD = context encoding` below. Opening reverses the steps; any change to a byte or to the
//! context fails the tag check.
//!
//! The context encoding ([`crate::crypto::canon`] rules):
//!
//! ```text
//! label "keyhold/v1/dek-envelope" || suite (1) || session id (16, UUID bytes)
//!   || epoch (u32) || recipient kind (1) || recipient fields || key id (16)
//! recipient kind 0x01 (device): var(user id) || var(device id)
//! recipient kind 0x02 (staff escrow): nothing
//! ```
//!
//! The key id is the fingerprint of the recipient's encapsulation key ([`crate::crypto::ids::KeyId`]),
//! taken from the key itself, so an envelope cannot claim another key than the one it was
//! wrapped to.
//!
//! # KEK envelope (suite `AES256GCM_HKDF_V1`)
//!
//! ```text
//! offset  length  field
//! 0       1       KEK suite id, 0x01
//! 1       4       KEK version (u32, big-endian)
//! 5       32      random salt
//! 37      n       AES-256-GCM ciphertext of the payload
//! 37+n    16      AES-256-GCM tag
//! ```
//!
//! `key = HKDF-SHA256(salt, IKM = KEK, info = "keyhold/v1/kek-envelope-key", L = 32)`, nonce
//! twelve zero bytes (the random 256-bit salt makes every key single-use, so no nonce budget
//! limits how much one KEK seals), and
//! `AD = label "keyhold/v1/kek-envelope" || suite || KEK version (u32) || context encoding`,
//! where the context is one of [`KekContext`]'s variants:
//!
//! ```text
//! 0x01 service DEK:    session id (16) || epoch (u32)
//! 0x02 ratchet state:  var(user id) || var(device id) || var(conversation id)
//! 0x03 idempotent answer: var(scope) || var(idempotency key)
//! ```

use std::fmt;
use std::num::NonZeroUsize;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::hkdf::{Prk, Salt, HKDF_SHA256};
use zeroize::Zeroizing;

use super::canon::Canon;
use super::error::{exact, CryptoError};
use super::ids::{ConversationId, DeviceId, Epoch, SessionId, UserId};
use super::keys::{random_bytes, Dek, Kek, KekVersion, SYMMETRIC_KEY_LEN};
use super::xwing::{self, DecapsulationKey, EncapsulationKey};
use super::Suite;

const TAG_LEN: usize = 16;
const ZERO_NONCE: [u8; 12] = [0u8; 12];
/// Length of a DEK envelope of suite `XWING_AES256GCM_V1`.
pub const DEK_ENVELOPE_LEN: usize = 1 + xwing::CIPHERTEXT_LEN + SYMMETRIC_KEY_LEN + TAG_LEN;

/// Whom a DEK envelope is addressed to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Recipient {
    /// One device of one user.
    Device {
        /// The device's user.
        user: UserId,
        /// The device.
        device: DeviceId,
    },
    /// The staff escrow key (StaffKey records).
    Escrow,
}

/// Everything a DEK envelope is bound to, besides the recipient key's id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrapContext {
    /// The session the DEK belongs to.
    pub session_id: SessionId,
    /// The session epoch the DEK belongs to.
    pub epoch: Epoch,
    /// Who the envelope is for.
    pub recipient: Recipient,
}

impl WrapContext {
    pub(crate) fn associated_data(&self, suite: Suite, key_id: &super::ids::KeyId) -> Vec<u8> {
        let c = Canon::new("keyhold/v1/dek-envelope")
            .u8(suite as u8)
            .fixed(self.session_id.as_bytes())
            .u32(self.epoch.get());
        let c = match &self.recipient {
            Recipient::Device { user, device } => c
                .u8(0x01)
                .var(user.as_str().as_bytes())
                .var(device.as_str().as_bytes()),
            Recipient::Escrow => c.u8(0x02),
        };
        c.fixed(key_id.as_bytes()).finish()
    }
}

/// A wrapped DEK, checked for length and suite when parsed.
#[derive(Clone, PartialEq, Eq)]
pub struct DekEnvelope(Vec<u8>);

impl DekEnvelope {
    /// Parses an envelope: a known suite byte and the exact length of that suite.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let suite = Suite::from_byte(*bytes.first().ok_or(CryptoError::TooShort {
            what: "DEK envelope",
            min: 1,
            actual: 0,
        })?)?;
        match suite {
            Suite::XWingAes256GcmV1 => {
                exact::<DEK_ENVELOPE_LEN>("DEK envelope", bytes)?;
            }
        }
        Ok(Self(bytes.to_vec()))
    }

    /// The envelope's suite.
    pub fn suite(&self) -> Suite {
        // The first byte was checked in `from_bytes` and by `wrap_dek`.
        Suite::from_byte(self.0[0]).unwrap_or(Suite::XWingAes256GcmV1)
    }

    /// The envelope's bytes, as stored and sent.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Takes the bytes out.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for DekEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DekEnvelope({:?}, {} bytes)", self.suite(), self.0.len())
    }
}

fn wrap_key(ss: &xwing::SharedSecret, suite: Suite) -> Result<LessSafeKey, CryptoError> {
    let prk = Prk::new_less_safe(HKDF_SHA256, ss.expose_secret());
    let info = [b"keyhold/v1/dek-wrap-key".as_slice(), &[suite as u8]];
    let okm = prk.expand(&info, &AES_256_GCM)?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

/// Wraps `dek` for the holder of `recipient_key`, bound to `context`.
pub fn wrap_dek(
    dek: &Dek,
    recipient_key: &EncapsulationKey,
    context: &WrapContext,
) -> Result<DekEnvelope, CryptoError> {
    let (ct, ss) = recipient_key.encapsulate()?;
    seal_dek(dek, recipient_key, context, &ct, &ss)
}

/// [`wrap_dek`] with caller-chosen encapsulation randomness (the X-Wing draft's `eseed`), for
/// the published test vectors only.
#[cfg(test)]
pub(crate) fn wrap_dek_deterministic(
    dek: &Dek,
    recipient_key: &EncapsulationKey,
    context: &WrapContext,
    eseed: &[u8; 64],
) -> Result<DekEnvelope, CryptoError> {
    let (ct, ss) = recipient_key.encapsulate_deterministic(eseed)?;
    seal_dek(dek, recipient_key, context, &ct, &ss)
}

/// The envelope of `dek` once the X-Wing encapsulation gave `ct` and `ss`.
fn seal_dek(
    dek: &Dek,
    recipient_key: &EncapsulationKey,
    context: &WrapContext,
    ct: &xwing::Ciphertext,
    ss: &xwing::SharedSecret,
) -> Result<DekEnvelope, CryptoError> {
    let suite = Suite::XWingAes256GcmV1;
    let key = wrap_key(ss, suite)?;
    let ad = context.associated_data(suite, &recipient_key.key_id());

    let mut out = Vec::with_capacity(DEK_ENVELOPE_LEN);
    out.push(suite as u8);
    out.extend_from_slice(ct.as_bytes());
    out.extend_from_slice(dek.expose_secret());
    let tag = key.seal_in_place_separate_tag(
        Nonce::assume_unique_for_key(ZERO_NONCE),
        Aad::from(ad.as_slice()),
        &mut out[1 + xwing::CIPHERTEXT_LEN..],
    )?;
    out.extend_from_slice(tag.as_ref());
    Ok(DekEnvelope(out))
}

/// Opens a DEK envelope with the recipient's decapsulation key under the same context it was
/// wrapped with. Any other key, context or changed byte gives [`CryptoError::OpenFailed`].
pub fn open_dek(
    envelope: &DekEnvelope,
    key: &DecapsulationKey,
    context: &WrapContext,
) -> Result<Dek, CryptoError> {
    let suite = envelope.suite();
    let bytes = envelope.as_bytes();
    let ct = xwing::Ciphertext::from_slice(&bytes[1..1 + xwing::CIPHERTEXT_LEN])?;
    let ss = key.decapsulate(&ct)?;
    let aead = wrap_key(&ss, suite)?;
    let ad = context.associated_data(suite, &key.encapsulation_key().key_id());

    let mut sealed = Zeroizing::new(bytes[1 + xwing::CIPHERTEXT_LEN..].to_vec());
    let plain = aead
        .open_in_place(
            Nonce::assume_unique_for_key(ZERO_NONCE),
            Aad::from(ad.as_slice()),
            &mut sealed,
        )
        .map_err(|_| CryptoError::OpenFailed)?;
    Dek::from_slice(plain)
}

/// Why [`wrap_dek_for_recipients`] failed: which recipient, and the crypto failure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("recipient {index}: {error}")]
pub struct RecipientWrapError {
    /// The position in `recipients` of the recipient the DEK could not be wrapped for.
    pub index: usize,
    /// Why the wrap failed.
    pub error: CryptoError,
}

/// Wraps one DEK for many recipients, spread over up to `parallelism` threads.
///
/// The envelopes come back in the order of `recipients`. Each wrap is independent (a fresh
/// encapsulation), so the work splits into even chunks with no shared state. A failure names
/// the recipient it happened for (the first one in order, if several fail).
pub fn wrap_dek_for_recipients(
    dek: &Dek,
    session_id: SessionId,
    epoch: Epoch,
    recipients: &[(Recipient, &EncapsulationKey)],
    parallelism: NonZeroUsize,
) -> Result<Vec<DekEnvelope>, RecipientWrapError> {
    let wrap_one = |index: usize, (recipient, key): &(Recipient, &EncapsulationKey)| {
        let context = WrapContext {
            session_id,
            epoch,
            recipient: recipient.clone(),
        };
        wrap_dek(dek, key, &context).map_err(|error| RecipientWrapError { index, error })
    };
    let threads = parallelism.get().min(recipients.len().max(1));
    if threads == 1 {
        return recipients
            .iter()
            .enumerate()
            .map(|(i, r)| wrap_one(i, r))
            .collect();
    }
    let chunk = recipients.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = recipients
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                let start = c * chunk;
                let handle = scope.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(i, r)| wrap_one(start + i, r))
                        .collect::<Result<Vec<_>, _>>()
                });
                (start, handle)
            })
            .collect();
        let mut out = Vec::with_capacity(recipients.len());
        for (start, handle) in handles {
            // A wrap never panics on any input; a panic here would be a bug in a dependency,
            // reported as a backend failure at the first recipient of the thread's share
            // rather than propagated.
            out.extend(handle.join().map_err(|_| RecipientWrapError {
                index: start,
                error: CryptoError::Backend,
            })??);
        }
        Ok(out)
    })
}

/// The suite of a KEK envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum KekSuite {
    /// HKDF-SHA256 per-envelope key from a random salt, AES-256-GCM.
    Aes256GcmHkdfV1 = 0x01,
}

const KEK_HEADER_LEN: usize = 1 + 4 + 32;
/// Largest payload a KEK envelope takes (ratchet states are capped well below this).
pub const MAX_KEK_PAYLOAD_LEN: usize = 16 * 1024 * 1024;

/// What a KEK envelope is bound to: the row it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KekContext {
    /// The service's copy of a SERVICE_WRAPPED session epoch's DEK (ServiceKey).
    ServiceDek {
        /// The session.
        session_id: SessionId,
        /// The epoch.
        epoch: Epoch,
    },
    /// A device's Double Ratchet state backup for one conversation (RatchetState).
    RatchetState {
        /// The owning user.
        user: UserId,
        /// The owning device.
        device: DeviceId,
        /// The conversation the state belongs to.
        conversation: ConversationId,
    },
    /// The secret of an answer recorded for a call made with an idempotency key (the bearer
    /// token CreateToken returned), kept sealed until the record's retention ends.
    IdempotentAnswer {
        /// Whose key it is: the calling token's principal.
        scope: String,
        /// The client's idempotency key.
        key: String,
    },
}

impl KekContext {
    pub(crate) fn associated_data(&self, suite: KekSuite, version: KekVersion) -> Vec<u8> {
        let c = Canon::new("keyhold/v1/kek-envelope")
            .u8(suite as u8)
            .u32(version.0);
        match self {
            KekContext::ServiceDek { session_id, epoch } => {
                c.u8(0x01).fixed(session_id.as_bytes()).u32(epoch.get())
            }
            KekContext::RatchetState {
                user,
                device,
                conversation,
            } => c
                .u8(0x02)
                .var(user.as_str().as_bytes())
                .var(device.as_str().as_bytes())
                .var(conversation.as_str().as_bytes()),
            KekContext::IdempotentAnswer { scope, key } => {
                c.u8(0x03).var(scope.as_bytes()).var(key.as_bytes())
            }
        }
        .finish()
    }
}

fn kek_key(kek: &Kek, salt: &[u8]) -> Result<LessSafeKey, CryptoError> {
    let prk = Salt::new(HKDF_SHA256, salt).extract(kek.expose_secret());
    let info = [b"keyhold/v1/kek-envelope-key".as_slice()];
    let okm = prk.expand(&info, &AES_256_GCM)?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

/// Seals `payload` under the KEK, bound to `context`.
pub fn seal_under_kek(
    kek: &Kek,
    payload: &[u8],
    context: &KekContext,
) -> Result<Vec<u8>, CryptoError> {
    seal_under_kek_salted(kek, payload, context, &*random_bytes::<32>()?)
}

/// [`seal_under_kek`] with the envelope's salt given: the one seal, and (in tests) the
/// published test vectors.
pub(crate) fn seal_under_kek_salted(
    kek: &Kek,
    payload: &[u8],
    context: &KekContext,
    salt: &[u8; 32],
) -> Result<Vec<u8>, CryptoError> {
    if payload.len() > MAX_KEK_PAYLOAD_LEN {
        return Err(CryptoError::TooLong {
            what: "KEK envelope payload",
            max: MAX_KEK_PAYLOAD_LEN,
            actual: payload.len(),
        });
    }
    let suite = KekSuite::Aes256GcmHkdfV1;
    let key = kek_key(kek, salt.as_ref())?;
    let ad = context.associated_data(suite, kek.version());

    let mut out = Vec::with_capacity(KEK_HEADER_LEN + payload.len() + TAG_LEN);
    out.push(suite as u8);
    out.extend_from_slice(&kek.version().0.to_be_bytes());
    out.extend_from_slice(salt.as_ref());
    out.extend_from_slice(payload);
    let tag = key.seal_in_place_separate_tag(
        Nonce::assume_unique_for_key(ZERO_NONCE),
        Aad::from(ad.as_slice()),
        &mut out[KEK_HEADER_LEN..],
    )?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Reads the KEK version a KEK envelope was sealed under, so that rotation can find what to
/// re-wrap and opening can pick the right KEK.
pub fn kek_version_of(envelope: &[u8]) -> Result<KekVersion, CryptoError> {
    if envelope.len() < KEK_HEADER_LEN + TAG_LEN {
        return Err(CryptoError::TooShort {
            what: "KEK envelope",
            min: KEK_HEADER_LEN + TAG_LEN,
            actual: envelope.len(),
        });
    }
    if envelope[0] != KekSuite::Aes256GcmHkdfV1 as u8 {
        return Err(CryptoError::UnknownSuite(envelope[0]));
    }
    Ok(KekVersion(u32::from_be_bytes(exact::<4>(
        "KEK version",
        &envelope[1..5],
    )?)))
}

/// Opens a KEK envelope under the same context it was sealed with. The payload comes back in
/// a buffer that zeroizes on drop.
pub fn open_under_kek(
    kek: &Kek,
    envelope: &[u8],
    context: &KekContext,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let version = kek_version_of(envelope)?;
    if version != kek.version() {
        return Err(CryptoError::KekVersionMismatch {
            expected: kek.version().0,
            found: version.0,
        });
    }
    let key = kek_key(kek, &envelope[5..KEK_HEADER_LEN])?;
    let ad = context.associated_data(KekSuite::Aes256GcmHkdfV1, version);
    let mut buf = Zeroizing::new(envelope[KEK_HEADER_LEN..].to_vec());
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(ZERO_NONCE),
            Aad::from(ad.as_slice()),
            &mut buf,
        )
        .map_err(|_| CryptoError::OpenFailed)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests;
