//! Message encryption: AES-256-GCM under a per-message key derived from the epoch DEK.
//!
//! ```text
//! message key = HKDF-SHA256(salt = "keyhold/v1/message-key", IKM = DEK,
//!                           info = suite (1) || session id (16) || epoch (u32) || message id (16),
//!                           L = 32)
//! nonce       = 12 random bytes, stored beside the ciphertext
//! ciphertext  = AES-256-GCM(message key, nonce, plaintext, associated data from the caller) || tag (16)
//! ```
//!
//! A distinct key per message means a message copied to another session, epoch or message id
//! does not open; the random nonce keeps a key safe even if a buggy client re-seals a message id.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};

use super::error::{exact, CryptoError};
use super::ids::{Epoch, MessageId, SessionId};
use super::keys::{random_bytes, Dek};
use super::Suite;

/// Length of a message nonce.
pub const MESSAGE_NONCE_LEN: usize = NONCE_LEN;
/// Length of the tag appended to every message ciphertext.
pub const MESSAGE_TAG_LEN: usize = 16;

/// Where a message belongs; every field goes into its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageContext {
    /// The session.
    pub session_id: SessionId,
    /// The epoch whose DEK seals the message.
    pub epoch: Epoch,
    /// The message's own id.
    pub message_id: MessageId,
}

/// The per-message AES-256-GCM key. Key material stays inside AWS-LC, which cleanses it when
/// dropped; `Debug` shows nothing.
pub struct MessageKey(LessSafeKey);

impl std::fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageKey(<redacted>)")
    }
}

/// Derives the key of one message from its epoch's DEK.
pub fn message_key(dek: &Dek, context: &MessageContext) -> Result<MessageKey, CryptoError> {
    let suite = [Suite::XWingAes256GcmV1 as u8];
    let epoch = context.epoch.get().to_be_bytes();
    let info = [
        suite.as_slice(),
        context.session_id.as_bytes(),
        &epoch,
        context.message_id.as_bytes(),
    ];
    let prk = Salt::new(HKDF_SHA256, b"keyhold/v1/message-key").extract(dek.expose_secret());
    let okm = prk.expand(&info, &AES_256_GCM)?;
    Ok(MessageKey(LessSafeKey::new(UnboundKey::from(okm))))
}

impl MessageKey {
    /// Encrypts `buffer` in place and appends the tag; returns the random nonce.
    pub fn seal_in_place(
        &self,
        buffer: &mut Vec<u8>,
        aad: &[u8],
    ) -> Result<[u8; MESSAGE_NONCE_LEN], CryptoError> {
        let nonce = *random_bytes::<MESSAGE_NONCE_LEN>()?;
        self.seal_in_place_with_nonce(nonce, buffer, aad)?;
        Ok(nonce)
    }

    /// AES-256-GCM under this key with a given nonce: the one seal the core runs.
    pub(crate) fn seal_in_place_with_nonce(
        &self,
        nonce: [u8; MESSAGE_NONCE_LEN],
        buffer: &mut Vec<u8>,
        aad: &[u8],
    ) -> Result<(), CryptoError> {
        self.0.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            buffer,
        )?;
        Ok(())
    }

    /// Decrypts `buffer` (ciphertext and tag) in place, leaving the plaintext in it.
    pub fn open_in_place(
        &self,
        nonce: &[u8],
        buffer: &mut Vec<u8>,
        aad: &[u8],
    ) -> Result<(), CryptoError> {
        let nonce = exact::<MESSAGE_NONCE_LEN>("message nonce", nonce)?;
        if buffer.len() < MESSAGE_TAG_LEN {
            return Err(CryptoError::TooShort {
                what: "message ciphertext",
                min: MESSAGE_TAG_LEN,
                actual: buffer.len(),
            });
        }
        let len = self
            .0
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buffer)
            .map_err(|_| CryptoError::OpenFailed)?
            .len();
        buffer.truncate(len);
        Ok(())
    }
}

/// A sealed message: the nonce and the ciphertext with its tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedMessage {
    /// The random nonce.
    pub nonce: [u8; MESSAGE_NONCE_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

/// Seals `plaintext` for `context` under the epoch's DEK, with caller-supplied associated data.
pub fn seal_message(
    dek: &Dek,
    context: &MessageContext,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<SealedMessage, CryptoError> {
    let mut ciphertext = Vec::with_capacity(plaintext.len() + MESSAGE_TAG_LEN);
    ciphertext.extend_from_slice(plaintext);
    let nonce = message_key(dek, context)?.seal_in_place(&mut ciphertext, aad)?;
    Ok(SealedMessage { nonce, ciphertext })
}

/// Opens a message sealed by [`seal_message`]; the same DEK, context and associated data are
/// needed.
pub fn open_message(
    dek: &Dek,
    context: &MessageContext,
    nonce: &[u8],
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut buffer = ciphertext.to_vec();
    message_key(dek, context)?.open_in_place(nonce, &mut buffer, aad)?;
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> MessageContext {
        MessageContext {
            session_id: SessionId::generate(),
            epoch: Epoch::FIRST,
            message_id: MessageId::generate(),
        }
    }

    #[test]
    fn seal_open_round_trip() {
        let dek = Dek::generate().unwrap();
        let c = ctx();
        for len in [0usize, 1, 16, 1024, 70_000] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let sealed = seal_message(&dek, &c, &plain, b"ad").unwrap();
            assert_eq!(sealed.ciphertext.len(), len + MESSAGE_TAG_LEN);
            assert_eq!(
                open_message(&dek, &c, &sealed.nonce, &sealed.ciphertext, b"ad").unwrap(),
                plain
            );
        }
    }

    #[test]
    fn any_change_fails_to_open() {
        let dek = Dek::generate().unwrap();
        let c = ctx();
        let sealed = seal_message(&dek, &c, b"hello world", b"ad").unwrap();
        for i in 0..sealed.ciphertext.len() {
            let mut ct = sealed.ciphertext.clone();
            ct[i] ^= 1;
            assert!(
                open_message(&dek, &c, &sealed.nonce, &ct, b"ad").is_err(),
                "byte {i}"
            );
        }
        for i in 0..MESSAGE_NONCE_LEN {
            let mut nonce = sealed.nonce;
            nonce[i] ^= 1;
            assert!(open_message(&dek, &c, &nonce, &sealed.ciphertext, b"ad").is_err());
        }
        let open = |dek: &Dek, c: &MessageContext, aad: &[u8]| {
            open_message(dek, c, &sealed.nonce, &sealed.ciphertext, aad)
        };
        assert!(open(&dek, &c, b"other ad").is_err());
        assert!(open(&Dek::generate().unwrap(), &c, b"ad").is_err());
        assert!(open(
            &dek,
            &MessageContext {
                session_id: SessionId::generate(),
                ..c
            },
            b"ad"
        )
        .is_err());
        assert!(open(
            &dek,
            &MessageContext {
                epoch: Epoch::new(2).unwrap(),
                ..c
            },
            b"ad"
        )
        .is_err());
        assert!(open(
            &dek,
            &MessageContext {
                message_id: MessageId::generate(),
                ..c
            },
            b"ad"
        )
        .is_err());
    }

    #[test]
    fn malformed_inputs_give_typed_errors() {
        let dek = Dek::generate().unwrap();
        let c = ctx();
        assert!(matches!(
            open_message(&dek, &c, &[0u8; 11], &[0u8; 32], b""),
            Err(CryptoError::InvalidLength { .. })
        ));
        assert!(matches!(
            open_message(&dek, &c, &[0u8; 12], &[0u8; 15], b""),
            Err(CryptoError::TooShort { .. })
        ));
    }

    #[derive(serde::Deserialize)]
    struct AeadFile {
        #[serde(rename = "testGroups")]
        test_groups: Vec<AeadGroup>,
    }

    #[derive(serde::Deserialize)]
    struct AeadGroup {
        #[serde(rename = "keySize")]
        key_size: u32,
        #[serde(rename = "ivSize")]
        iv_size: u32,
        #[serde(rename = "tagSize")]
        tag_size: u32,
        tests: Vec<AeadCase>,
    }

    #[derive(serde::Deserialize)]
    struct AeadCase {
        #[serde(rename = "tcId")]
        tc_id: u32,
        key: String,
        iv: String,
        aad: String,
        msg: String,
        ct: String,
        tag: String,
        result: String,
    }

    /// Project Wycheproof's AES-GCM cases with 256-bit keys, 96-bit nonces and 128-bit tags
    /// (the only shape the core uses) through its seal and open: a valid case seals to the
    /// expected ciphertext and tag and opens back; an invalid one fails to open.
    #[test]
    fn wycheproof_aes_256_gcm_cases() {
        let file: AeadFile = serde_json::from_str(include_str!(
            "../../tests/vectors/wycheproof-aes_gcm_test.json"
        ))
        .unwrap();
        let (mut valid, mut invalid) = (0, 0);
        let groups = file
            .test_groups
            .iter()
            .filter(|g| g.key_size == 256 && g.iv_size == 96 && g.tag_size == 128);
        for case in groups.flat_map(|g| &g.tests) {
            let key = hex::decode(&case.key).unwrap();
            let key = MessageKey(LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, &key).unwrap(),
            ));
            let nonce: [u8; MESSAGE_NONCE_LEN] = hex::decode(&case.iv).unwrap().try_into().unwrap();
            let aad = hex::decode(&case.aad).unwrap();
            let msg = hex::decode(&case.msg).unwrap();
            let sealed = [
                hex::decode(&case.ct).unwrap(),
                hex::decode(&case.tag).unwrap(),
            ]
            .concat();

            let mut opened = sealed.clone();
            let open = key.open_in_place(&nonce, &mut opened, &aad);
            match case.result.as_str() {
                "valid" => {
                    assert_eq!(open, Ok(()), "tcId {}", case.tc_id);
                    assert_eq!(opened, msg, "tcId {}", case.tc_id);
                    let mut buffer = msg.clone();
                    key.seal_in_place_with_nonce(nonce, &mut buffer, &aad)
                        .unwrap();
                    assert_eq!(buffer, sealed, "tcId {}", case.tc_id);
                    valid += 1;
                }
                "invalid" => {
                    assert_eq!(open, Err(CryptoError::OpenFailed), "tcId {}", case.tc_id);
                    invalid += 1;
                }
                other => panic!("tcId {}: unexpected result {other}", case.tc_id),
            }
        }
        // The file's 256-bit, 96-bit-nonce group.
        assert_eq!(valid + invalid, 66);
        assert!(valid > 0 && invalid > 0);
    }
}
