//! Property tests for the crypto core: round trips over arbitrary keys, payloads and contexts;
//! every parser on arbitrary bytes (no panic, and the error class the format calls for); and
//! single-bit tampering with envelopes and messages.
//!
//! Cases that do KEM work or Edwards-curve arithmetic are few (32) and share fixed keys, so the
//! whole file runs in a few seconds in the debug profile.

use std::sync::OnceLock;

use curve25519_dalek::constants::EIGHT_TORSION;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::traits::Identity;
use keyhold::crypto::envelope::{
    self, open_dek, open_under_kek, seal_under_kek, wrap_dek, DekEnvelope, KekContext, Recipient,
    WrapContext, DEK_ENVELOPE_LEN,
};
use keyhold::crypto::ids::{
    ConversationId, DeviceId, Epoch, MessageId, SessionId, UserId, MAX_DEVICE_ID_LEN,
    MAX_USER_ID_LEN,
};
use keyhold::crypto::keys::{Dek, Kek, KekVersion};
use keyhold::crypto::message::{
    open_message, seal_message, MessageContext, MESSAGE_NONCE_LEN, MESSAGE_TAG_LEN,
};
use keyhold::crypto::sign::{IdentityKeyPair, IdentityPublicKey, Signature, SIGNATURE_LEN};
use keyhold::crypto::xwing::{
    Ciphertext, DecapsulationKey, EncapsulationKey, CIPHERTEXT_LEN, DECAPSULATION_KEY_LEN,
    ENCAPSULATION_KEY_LEN,
};
use keyhold::crypto::CryptoError;
use proptest::collection::vec;
use proptest::prelude::*;
use uuid::Uuid;

/// KEK envelope header: suite (1) || KEK version (4) || salt (32).
const KEK_HEADER_LEN: usize = 37;
/// AES-256-GCM tag.
const TAG_LEN: usize = 16;
/// ML-KEM-768 encapsulation key: 384 bytes of twelve-bit coefficients per polynomial, three
/// polynomials, then the 32-byte seed rho.
const MLKEM_EK_LEN: usize = 1184;
/// ML-KEM-768 ciphertext, the first part of an X-Wing ciphertext; ct_X follows.
const MLKEM_CT_LEN: usize = 1088;
const MLKEM_Q: u16 = 3329;

/// The one recipient key every KEM case wraps to: key generation is the slow part in debug.
fn recipient_key() -> &'static DecapsulationKey {
    static KEY: OnceLock<DecapsulationKey> = OnceLock::new();
    KEY.get_or_init(|| DecapsulationKey::from_seed(&[0x5a; 32]).expect("fixed seed derives a key"))
}

/// A second key, to check that an envelope opens only with the key it was wrapped to.
fn other_key() -> &'static DecapsulationKey {
    static KEY: OnceLock<DecapsulationKey> = OnceLock::new();
    KEY.get_or_init(|| DecapsulationKey::from_seed(&[0xa5; 32]).expect("fixed seed derives a key"))
}

/// What the id rules promise: 1 to `max` bytes of printable ASCII without spaces.
fn is_valid_token(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn token() -> impl Strategy<Value = String> {
    "[!-~]{1,40}"
}

fn user_id() -> impl Strategy<Value = UserId> {
    token().prop_map(|s| UserId::new(s).expect("strategy yields valid user ids"))
}

fn device_id() -> impl Strategy<Value = DeviceId> {
    token().prop_map(|s| DeviceId::new(s).expect("strategy yields valid device ids"))
}

fn conversation_id() -> impl Strategy<Value = ConversationId> {
    token().prop_map(|s| ConversationId::new(s).expect("strategy yields valid conversation ids"))
}

fn non_nil_uuid() -> impl Strategy<Value = Uuid> {
    any::<[u8; 16]>()
        .prop_filter("the nil UUID is not an id", |b| *b != [0u8; 16])
        .prop_map(Uuid::from_bytes)
}

fn session_id() -> impl Strategy<Value = SessionId> {
    non_nil_uuid().prop_map(SessionId::from_uuid)
}

fn message_id() -> impl Strategy<Value = MessageId> {
    non_nil_uuid().prop_map(MessageId::from_uuid)
}

fn epoch() -> impl Strategy<Value = Epoch> {
    (1..=Epoch::MAX.get()).prop_map(|n| Epoch::new(n).expect("epoch in range"))
}

fn recipient() -> impl Strategy<Value = Recipient> {
    prop_oneof![
        3 => (user_id(), device_id()).prop_map(|(user, device)| Recipient::Device { user, device }),
        1 => Just(Recipient::Escrow),
    ]
}

fn wrap_context() -> impl Strategy<Value = WrapContext> {
    (session_id(), epoch(), recipient()).prop_map(|(session_id, epoch, recipient)| WrapContext {
        session_id,
        epoch,
        recipient,
    })
}

fn kek_context() -> impl Strategy<Value = KekContext> {
    prop_oneof![
        (session_id(), epoch())
            .prop_map(|(session_id, epoch)| KekContext::ServiceDek { session_id, epoch }),
        (user_id(), device_id(), conversation_id()).prop_map(|(user, device, conversation)| {
            KekContext::RatchetState {
                user,
                device,
                conversation,
            }
        }),
        (record_text(), record_text())
            .prop_map(|(scope, key)| KekContext::IdempotentAnswer { scope, key }),
    ]
}

/// An idempotency record's scope or key: printable ASCII.
fn record_text() -> impl Strategy<Value = String> {
    "[!-~]{1,128}"
}

fn message_context() -> impl Strategy<Value = MessageContext> {
    (session_id(), epoch(), message_id()).prop_map(|(session_id, epoch, message_id)| {
        MessageContext {
            session_id,
            epoch,
            message_id,
        }
    })
}

/// A context and a copy of it with exactly one field changed, so that each field's binding is
/// checked on its own rather than all at once.
fn wrap_context_and_one_change() -> impl Strategy<Value = (WrapContext, WrapContext)> {
    (
        wrap_context(),
        0..5usize,
        (session_id(), epoch(), user_id(), device_id()),
    )
        .prop_filter_map(
            "the change must change something",
            |(ctx, field, (session_id, epoch, user, device))| {
                let mut other = ctx.clone();
                match (field, &ctx.recipient) {
                    (0, _) => other.session_id = session_id,
                    (1, _) => other.epoch = epoch,
                    (2, Recipient::Device { device, .. }) => {
                        other.recipient = Recipient::Device {
                            user,
                            device: device.clone(),
                        }
                    }
                    (3, Recipient::Device { user, .. }) => {
                        other.recipient = Recipient::Device {
                            user: user.clone(),
                            device,
                        }
                    }
                    (_, Recipient::Device { .. }) => other.recipient = Recipient::Escrow,
                    (_, Recipient::Escrow) => other.recipient = Recipient::Device { user, device },
                }
                (other != ctx).then_some((ctx, other))
            },
        )
}

/// A KEK context and a copy with exactly one field (or its kind) changed.
fn kek_context_and_one_change() -> impl Strategy<Value = (KekContext, KekContext)> {
    (
        kek_context(),
        0..4usize,
        (session_id(), epoch()),
        (user_id(), device_id(), conversation_id()),
        (record_text(), record_text()),
    )
        .prop_filter_map(
            "the change must change something",
            |(
                ctx,
                field,
                (new_session, new_epoch),
                (new_user, new_device, new_conversation),
                (new_scope, new_key),
            )| {
                let other = match (field, ctx.clone()) {
                    (0, KekContext::ServiceDek { epoch, .. }) => KekContext::ServiceDek {
                        session_id: new_session,
                        epoch,
                    },
                    (1, KekContext::ServiceDek { session_id, .. }) => KekContext::ServiceDek {
                        session_id,
                        epoch: new_epoch,
                    },
                    (
                        0,
                        KekContext::RatchetState {
                            device,
                            conversation,
                            ..
                        },
                    ) => KekContext::RatchetState {
                        user: new_user,
                        device,
                        conversation,
                    },
                    (
                        1,
                        KekContext::RatchetState {
                            user, conversation, ..
                        },
                    ) => KekContext::RatchetState {
                        user,
                        device: new_device,
                        conversation,
                    },
                    (2, KekContext::RatchetState { user, device, .. }) => {
                        KekContext::RatchetState {
                            user,
                            device,
                            conversation: new_conversation,
                        }
                    }
                    (_, KekContext::ServiceDek { .. }) => KekContext::RatchetState {
                        user: new_user,
                        device: new_device,
                        conversation: new_conversation,
                    },
                    (0, KekContext::IdempotentAnswer { key, .. }) => KekContext::IdempotentAnswer {
                        scope: new_scope,
                        key,
                    },
                    (1, KekContext::IdempotentAnswer { scope, .. }) => {
                        KekContext::IdempotentAnswer {
                            scope,
                            key: new_key,
                        }
                    }
                    (_, KekContext::RatchetState { .. }) => KekContext::IdempotentAnswer {
                        scope: new_scope,
                        key: new_key,
                    },
                    (_, KekContext::IdempotentAnswer { .. }) => KekContext::ServiceDek {
                        session_id: new_session,
                        epoch: new_epoch,
                    },
                };
                (other != ctx).then_some((ctx, other))
            },
        )
}

/// A message context and a copy with exactly one field changed.
fn message_context_and_one_change() -> impl Strategy<Value = (MessageContext, MessageContext)> {
    (
        message_context(),
        0..3usize,
        session_id(),
        epoch(),
        message_id(),
    )
        .prop_filter_map(
            "the change must change something",
            |(ctx, field, session_id, epoch, message_id)| {
                let other = match field {
                    0 => MessageContext { session_id, ..ctx },
                    1 => MessageContext { epoch, ..ctx },
                    _ => MessageContext { message_id, ..ctx },
                };
                (other != ctx).then_some((ctx, other))
            },
        )
}

/// Arbitrary bytes, with extra weight on `len` so the exact-length branch is reached too.
fn bytes_around(len: usize, max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![vec(any::<u8>(), 0..max), vec(any::<u8>(), len..=len)]
}

/// Packs twelve-bit coefficients little-endian, two per three bytes (FIPS 203 ByteEncode_12).
fn pack_coefficients(coefficients: &[u16]) -> Vec<u8> {
    coefficients
        .chunks(2)
        .flat_map(|pair| {
            let (a, b) = (pair[0], pair[1]);
            [
                a as u8,
                ((a >> 8) | ((b & 0x0f) << 4)) as u8,
                (b >> 4) as u8,
            ]
        })
        .collect()
}

/// Strings that hit every branch of the id rules: any Unicode, ASCII with spaces and control
/// characters, and printable ASCII right at the length limits (64 and 128).
fn id_candidate() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[!-~]{0,140}",
        "[ -~]{0,140}",
        "[\\x00-\\x7f]{0,140}",
        "[!-~]{63,65}",
        "[!-~]{127,129}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn wrapped_dek_opens_under_its_key_and_context_only(
        dek in any::<[u8; 32]>(),
        ctx in wrap_context(),
    ) {
        let key = recipient_key();
        let dek = Dek::from_bytes(dek);
        let env = wrap_dek(&dek, key.encapsulation_key(), &ctx).unwrap();
        prop_assert_eq!(env.as_bytes().len(), DEK_ENVELOPE_LEN);
        prop_assert_eq!(env.as_bytes()[0], 0x01);
        let parsed = DekEnvelope::from_bytes(env.as_bytes()).unwrap();
        prop_assert_eq!(&parsed, &env);
        prop_assert_eq!(open_dek(&parsed, key, &ctx).unwrap(), dek);
        prop_assert_eq!(open_dek(&parsed, other_key(), &ctx), Err(CryptoError::OpenFailed));
    }

    #[test]
    fn wrapped_dek_does_not_open_under_a_context_with_one_field_changed(
        (ctx, other) in wrap_context_and_one_change(),
    ) {
        let key = recipient_key();
        let env = wrap_dek(&Dek::generate().unwrap(), key.encapsulation_key(), &ctx).unwrap();
        prop_assert_eq!(open_dek(&env, key, &other), Err(CryptoError::OpenFailed));
    }

    #[test]
    fn arbitrary_dek_envelope_bytes_never_open(
        mut bytes in vec(any::<u8>(), DEK_ENVELOPE_LEN..=DEK_ENVELOPE_LEN),
        low_order_x25519 in any::<bool>(),
        ctx in wrap_context(),
    ) {
        bytes[0] = 0x01;
        if low_order_x25519 {
            // ct_X = 0: AWS-LC refuses the all-zero shared secret; still only OpenFailed.
            bytes[1 + MLKEM_CT_LEN..1 + CIPHERTEXT_LEN].fill(0);
        }
        let env = DekEnvelope::from_bytes(&bytes).unwrap();
        prop_assert_eq!(env.as_bytes(), bytes.as_slice());
        prop_assert_eq!(open_dek(&env, recipient_key(), &ctx), Err(CryptoError::OpenFailed));
    }

    #[test]
    fn one_flipped_bit_in_a_dek_envelope_fails_to_open(
        bit in 0..DEK_ENVELOPE_LEN * 8,
        ctx in wrap_context(),
    ) {
        let key = recipient_key();
        let env = wrap_dek(&Dek::generate().unwrap(), key.encapsulation_key(), &ctx).unwrap();
        let mut bytes = env.into_bytes();
        bytes[bit / 8] ^= 1 << (bit % 8);
        if bit < 8 {
            prop_assert_eq!(
                DekEnvelope::from_bytes(&bytes),
                Err(CryptoError::UnknownSuite(bytes[0]))
            );
        } else {
            let tampered = DekEnvelope::from_bytes(&bytes).unwrap();
            prop_assert_eq!(open_dek(&tampered, key, &ctx), Err(CryptoError::OpenFailed));
        }
    }

    #[test]
    fn encapsulation_key_parser_accepts_exactly_reduced_keys(
        coefficients in vec(0..MLKEM_Q, 768),
        rho in any::<[u8; 32]>(),
        x25519 in any::<[u8; 32]>(),
        unreduced in proptest::option::of((0..768usize, MLKEM_Q..4096u16)),
    ) {
        let mut coefficients = coefficients;
        if let Some((i, c)) = unreduced {
            coefficients[i] = c;
        }
        let mut bytes = pack_coefficients(&coefficients);
        bytes.extend_from_slice(&rho);
        prop_assert_eq!(bytes.len(), MLKEM_EK_LEN);
        bytes.extend_from_slice(&x25519);
        match EncapsulationKey::from_slice(&bytes) {
            Ok(ek) => {
                prop_assert!(unreduced.is_none(), "accepted coefficient {:?}", unreduced);
                prop_assert_eq!(ek.to_bytes(), bytes.clone());
                // Any reduced key can be encapsulated to (barring a low-order X25519 part,
                // which random bytes do not hit).
                let encapsulated = ek.encapsulate().map(|(ct, _)| ct);
                prop_assert!(encapsulated.is_ok(), "{:?}", encapsulated);
            }
            Err(e) => {
                prop_assert!(unreduced.is_some(), "refused a reduced key: {e}");
                prop_assert!(matches!(e, CryptoError::InvalidKey(_)), "{e:?}");
            }
        }
    }

    #[test]
    fn identity_keys_from_any_seed_parse_back(seed in any::<[u8; 32]>()) {
        let public = IdentityKeyPair::from_seed(&seed).unwrap().public_key();
        prop_assert_eq!(IdentityPublicKey::from_slice(public.as_bytes()), Ok(public));
    }

    #[test]
    fn identity_keys_with_a_small_order_component_are_refused(
        seed in any::<[u8; 32]>(),
        torsion in 0..8usize,
    ) {
        let public = IdentityKeyPair::from_seed(&seed).unwrap().public_key();
        let point = CompressedEdwardsY(*public.as_bytes()).decompress().unwrap();
        let torsion = EIGHT_TORSION[torsion];
        let mixed = (point + torsion).compress();
        if torsion == EdwardsPoint::identity() {
            prop_assert_eq!(IdentityPublicKey::from_slice(mixed.as_bytes()), Ok(public));
        } else {
            // A mixed-order key would let one forged signature verify for many messages.
            let result = IdentityPublicKey::from_slice(mixed.as_bytes());
            prop_assert!(matches!(result, Err(CryptoError::InvalidKey(_))), "{:?}", result);
        }
        let small = IdentityPublicKey::from_slice(torsion.compress().as_bytes());
        prop_assert!(matches!(small, Err(CryptoError::InvalidKey(_))), "{:?}", small);
    }

    #[test]
    fn decapsulation_key_parser_takes_exactly_a_32_byte_seed(
        bytes in bytes_around(DECAPSULATION_KEY_LEN, 80),
    ) {
        match DecapsulationKey::from_slice(&bytes) {
            Ok(dk) => {
                prop_assert_eq!(bytes.len(), DECAPSULATION_KEY_LEN);
                prop_assert_eq!(dk.expose_seed().as_slice(), bytes.as_slice());
            }
            Err(e) => prop_assert_eq!(
                e,
                CryptoError::InvalidLength {
                    what: "X-Wing decapsulation key",
                    expected: DECAPSULATION_KEY_LEN,
                    actual: bytes.len(),
                }
            ),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn kek_envelope_opens_under_its_kek_and_context(
        payload in vec(any::<u8>(), 0..4096),
        version in any::<u32>(),
        kek in any::<[u8; 32]>(),
        ctx in kek_context(),
    ) {
        let kek = Kek::from_bytes(KekVersion(version), kek);
        let env = seal_under_kek(&kek, &payload, &ctx).unwrap();
        prop_assert_eq!(env.len(), KEK_HEADER_LEN + payload.len() + TAG_LEN);
        prop_assert_eq!(envelope::kek_version_of(&env), Ok(KekVersion(version)));
        let opened = open_under_kek(&kek, &env, &ctx).unwrap();
        prop_assert_eq!(opened.as_slice(), payload.as_slice());

        let other_version = version.wrapping_add(1);
        let newer = Kek::from_bytes(KekVersion(other_version), *kek.expose_secret());
        prop_assert_eq!(
            open_under_kek(&newer, &env, &ctx),
            Err(CryptoError::KekVersionMismatch { expected: other_version, found: version })
        );
    }

    #[test]
    fn kek_envelope_does_not_open_under_a_context_with_one_field_changed(
        (ctx, other) in kek_context_and_one_change(),
    ) {
        let kek = Kek::generate(KekVersion(1)).unwrap();
        let env = seal_under_kek(&kek, b"ratchet state", &ctx).unwrap();
        prop_assert_eq!(open_under_kek(&kek, &env, &other), Err(CryptoError::OpenFailed));
    }

    #[test]
    fn one_flipped_bit_in_a_kek_envelope_fails_to_open(
        payload in vec(any::<u8>(), 0..512),
        bit_seed in any::<prop::sample::Index>(),
        version in any::<u32>(),
        ctx in kek_context(),
    ) {
        let kek = Kek::from_bytes(KekVersion(version), [0x11; 32]);
        let mut env = seal_under_kek(&kek, &payload, &ctx).unwrap();
        let bit = bit_seed.index(env.len() * 8);
        env[bit / 8] ^= 1 << (bit % 8);
        let expected = match bit / 8 {
            0 => CryptoError::UnknownSuite(env[0]),
            1..=4 => CryptoError::KekVersionMismatch {
                expected: version,
                found: u32::from_be_bytes([env[1], env[2], env[3], env[4]]),
            },
            _ => CryptoError::OpenFailed,
        };
        prop_assert_eq!(open_under_kek(&kek, &env, &ctx), Err(expected));
    }

    #[test]
    fn message_opens_with_its_dek_context_and_aad(
        dek in any::<[u8; 32]>(),
        ctx in message_context(),
        plaintext in vec(any::<u8>(), 0..8192),
        aad in vec(any::<u8>(), 0..256),
    ) {
        let dek = Dek::from_bytes(dek);
        let sealed = seal_message(&dek, &ctx, &plaintext, &aad).unwrap();
        prop_assert_eq!(sealed.ciphertext.len(), plaintext.len() + MESSAGE_TAG_LEN);
        let opened = open_message(&dek, &ctx, &sealed.nonce, &sealed.ciphertext, &aad).unwrap();
        prop_assert_eq!(opened, plaintext);
    }

    #[test]
    fn message_does_not_open_under_a_context_with_one_field_changed_or_another_dek(
        (ctx, other) in message_context_and_one_change(),
        dek in any::<[u8; 32]>(),
        other_dek in any::<[u8; 32]>(),
        plaintext in vec(any::<u8>(), 0..256),
    ) {
        let dek = Dek::from_bytes(dek);
        let sealed = seal_message(&dek, &ctx, &plaintext, b"ad").unwrap();
        prop_assert_eq!(
            open_message(&dek, &other, &sealed.nonce, &sealed.ciphertext, b"ad"),
            Err(CryptoError::OpenFailed)
        );
        if other_dek != *dek.expose_secret() {
            let other_dek = Dek::from_bytes(other_dek);
            prop_assert_eq!(
                open_message(&other_dek, &ctx, &sealed.nonce, &sealed.ciphertext, b"ad"),
                Err(CryptoError::OpenFailed)
            );
        }
    }

    #[test]
    fn one_flipped_bit_or_other_aad_fails_to_open_a_message(
        ctx in message_context(),
        plaintext in vec(any::<u8>(), 0..1024),
        aad in vec(any::<u8>(), 0..64),
        other_aad in vec(any::<u8>(), 0..64),
        bit_seed in any::<prop::sample::Index>(),
        nonce_bit in 0..MESSAGE_NONCE_LEN * 8,
    ) {
        let dek = Dek::generate().unwrap();
        let sealed = seal_message(&dek, &ctx, &plaintext, &aad).unwrap();

        let mut ct = sealed.ciphertext.clone();
        let bit = bit_seed.index(ct.len() * 8);
        ct[bit / 8] ^= 1 << (bit % 8);
        prop_assert_eq!(
            open_message(&dek, &ctx, &sealed.nonce, &ct, &aad),
            Err(CryptoError::OpenFailed)
        );

        let mut nonce = sealed.nonce;
        nonce[nonce_bit / 8] ^= 1 << (nonce_bit % 8);
        prop_assert_eq!(
            open_message(&dek, &ctx, &nonce, &sealed.ciphertext, &aad),
            Err(CryptoError::OpenFailed)
        );

        if other_aad != aad {
            prop_assert_eq!(
                open_message(&dek, &ctx, &sealed.nonce, &sealed.ciphertext, &other_aad),
                Err(CryptoError::OpenFailed)
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn dek_envelope_parser_classifies_any_bytes(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..2400),
            vec(any::<u8>(), DEK_ENVELOPE_LEN..=DEK_ENVELOPE_LEN),
            vec(any::<u8>(), 1..2400).prop_map(|mut v| { v[0] = 0x01; v }),
            vec(any::<u8>(), DEK_ENVELOPE_LEN..=DEK_ENVELOPE_LEN)
                .prop_map(|mut v| { v[0] = 0x01; v }),
        ],
    ) {
        let result = DekEnvelope::from_bytes(&bytes);
        match bytes.first() {
            None => prop_assert_eq!(
                result,
                Err(CryptoError::TooShort { what: "DEK envelope", min: 1, actual: 0 })
            ),
            Some(&suite) if suite != 0x01 => {
                prop_assert_eq!(result, Err(CryptoError::UnknownSuite(suite)))
            }
            Some(_) if bytes.len() != DEK_ENVELOPE_LEN => prop_assert_eq!(
                result,
                Err(CryptoError::InvalidLength {
                    what: "DEK envelope",
                    expected: DEK_ENVELOPE_LEN,
                    actual: bytes.len(),
                })
            ),
            Some(_) => {
                let parsed = result.unwrap();
                prop_assert_eq!(parsed.as_bytes(), bytes.as_slice());
            }
        }
    }

    #[test]
    fn encapsulation_key_parser_refuses_wrong_lengths_and_unreduced_keys(
        bytes in bytes_around(ENCAPSULATION_KEY_LEN, 2600),
    ) {
        let result = EncapsulationKey::from_slice(&bytes);
        if bytes.len() != ENCAPSULATION_KEY_LEN {
            prop_assert_eq!(
                result.unwrap_err(),
                CryptoError::InvalidLength {
                    what: "X-Wing encapsulation key",
                    expected: ENCAPSULATION_KEY_LEN,
                    actual: bytes.len(),
                }
            );
        } else {
            // Uniform bytes leave a twelve-bit coefficient >= q with overwhelming probability.
            let has_unreduced_coefficient = bytes[..MLKEM_EK_LEN - 32].chunks(3).any(|c| {
                let a = u16::from(c[0]) | (u16::from(c[1] & 0x0f) << 8);
                let b = u16::from(c[1] >> 4) | (u16::from(c[2]) << 4);
                a >= MLKEM_Q || b >= MLKEM_Q
            });
            prop_assume!(has_unreduced_coefficient);
            prop_assert!(matches!(result, Err(CryptoError::InvalidKey(_))), "{:?}", result);
        }
    }

    #[test]
    fn ciphertext_parser_takes_exactly_1120_bytes(
        bytes in bytes_around(CIPHERTEXT_LEN, 2400),
    ) {
        match Ciphertext::from_slice(&bytes) {
            Ok(ct) => {
                prop_assert_eq!(bytes.len(), CIPHERTEXT_LEN);
                prop_assert_eq!(ct.as_bytes().as_slice(), bytes.as_slice());
            }
            Err(e) => prop_assert_eq!(
                e,
                CryptoError::InvalidLength {
                    what: "X-Wing ciphertext",
                    expected: CIPHERTEXT_LEN,
                    actual: bytes.len(),
                }
            ),
        }
    }

    #[test]
    fn identity_key_parser_gives_a_key_or_a_typed_refusal(bytes in bytes_around(32, 80)) {
        match IdentityPublicKey::from_slice(&bytes) {
            Ok(key) => prop_assert_eq!(key.as_bytes().as_slice(), bytes.as_slice()),
            Err(CryptoError::InvalidLength { what, expected, actual }) => {
                prop_assert_eq!(what, "Ed25519 identity key");
                prop_assert_eq!(expected, 32);
                prop_assert_eq!(actual, bytes.len());
                prop_assert_ne!(actual, 32);
            }
            Err(e) => {
                prop_assert_eq!(bytes.len(), 32);
                prop_assert!(matches!(e, CryptoError::InvalidKey(_)), "{:?}", e);
            }
        }
    }

    #[test]
    fn signature_parser_takes_exactly_64_bytes(bytes in bytes_around(SIGNATURE_LEN, 160)) {
        match Signature::from_slice(&bytes) {
            Ok(sig) => {
                prop_assert_eq!(bytes.len(), SIGNATURE_LEN);
                prop_assert_eq!(sig.as_bytes().as_slice(), bytes.as_slice());
            }
            Err(e) => prop_assert_eq!(
                e,
                CryptoError::InvalidLength {
                    what: "Ed25519 signature",
                    expected: SIGNATURE_LEN,
                    actual: bytes.len(),
                }
            ),
        }
    }

    #[test]
    fn kek_version_parser_classifies_any_bytes(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..200),
            vec(any::<u8>(), 1..200).prop_map(|mut v| { v[0] = 0x01; v }),
        ],
    ) {
        let result = envelope::kek_version_of(&bytes);
        if bytes.len() < KEK_HEADER_LEN + TAG_LEN {
            prop_assert_eq!(
                result,
                Err(CryptoError::TooShort {
                    what: "KEK envelope",
                    min: KEK_HEADER_LEN + TAG_LEN,
                    actual: bytes.len(),
                })
            );
        } else if bytes[0] != 0x01 {
            prop_assert_eq!(result, Err(CryptoError::UnknownSuite(bytes[0])));
        } else {
            let version = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
            prop_assert_eq!(result, Ok(KekVersion(version)));
        }
    }

    #[test]
    fn arbitrary_kek_envelope_bytes_never_open(
        mut bytes in vec(any::<u8>(), 0..600),
        well_formed_header in any::<bool>(),
        ctx in kek_context(),
    ) {
        let kek = Kek::from_bytes(KekVersion(9), [0x22; 32]);
        if well_formed_header && bytes.len() >= 5 {
            bytes[0] = 0x01;
            bytes[1..5].copy_from_slice(&9u32.to_be_bytes());
        }
        let expected = if bytes.len() < KEK_HEADER_LEN + TAG_LEN {
            CryptoError::TooShort {
                what: "KEK envelope",
                min: KEK_HEADER_LEN + TAG_LEN,
                actual: bytes.len(),
            }
        } else if bytes[0] != 0x01 {
            CryptoError::UnknownSuite(bytes[0])
        } else {
            let found = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
            if found != 9 {
                CryptoError::KekVersionMismatch { expected: 9, found }
            } else {
                CryptoError::OpenFailed
            }
        };
        prop_assert_eq!(open_under_kek(&kek, &bytes, &ctx), Err(expected));
    }

    #[test]
    fn arbitrary_message_bytes_never_open(
        nonce in bytes_around(MESSAGE_NONCE_LEN, 32),
        ciphertext in vec(any::<u8>(), 0..256),
        aad in vec(any::<u8>(), 0..64),
        ctx in message_context(),
    ) {
        let dek = Dek::from_bytes([0x33; 32]);
        let expected = if nonce.len() != MESSAGE_NONCE_LEN {
            CryptoError::InvalidLength {
                what: "message nonce",
                expected: MESSAGE_NONCE_LEN,
                actual: nonce.len(),
            }
        } else if ciphertext.len() < MESSAGE_TAG_LEN {
            CryptoError::TooShort {
                what: "message ciphertext",
                min: MESSAGE_TAG_LEN,
                actual: ciphertext.len(),
            }
        } else {
            CryptoError::OpenFailed
        };
        prop_assert_eq!(open_message(&dek, &ctx, &nonce, &ciphertext, &aad), Err(expected));
    }

    #[test]
    fn user_ids_are_exactly_1_to_128_printable_ascii_bytes(s in id_candidate()) {
        match UserId::new(s.clone()) {
            Ok(id) => {
                prop_assert!(is_valid_token(&s, MAX_USER_ID_LEN), "accepted {:?}", s);
                prop_assert_eq!(id.as_str(), s.as_str());
            }
            Err(e) => {
                prop_assert!(!is_valid_token(&s, MAX_USER_ID_LEN), "refused {:?}: {}", s, e);
                prop_assert!(
                    matches!(e, CryptoError::InvalidId { what: "user id", .. }),
                    "{:?}",
                    e
                );
            }
        }
    }

    #[test]
    fn device_ids_are_exactly_1_to_64_printable_ascii_bytes(s in id_candidate()) {
        match DeviceId::new(s.clone()) {
            Ok(id) => {
                prop_assert!(is_valid_token(&s, MAX_DEVICE_ID_LEN), "accepted {:?}", s);
                prop_assert_eq!(id.as_str(), s.as_str());
            }
            Err(e) => {
                prop_assert!(!is_valid_token(&s, MAX_DEVICE_ID_LEN), "refused {:?}: {}", s, e);
                prop_assert!(
                    matches!(e, CryptoError::InvalidId { what: "device id", .. }),
                    "{:?}",
                    e
                );
            }
        }
    }
}
