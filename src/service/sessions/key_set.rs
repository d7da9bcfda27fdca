//! The checks of a client-wrapped key set: security-critical and pure.
//!
//! A CLIENT_WRAPPED session's author device draws each epoch's DEK and uploads its wraps,
//! signed with its identity key ([`ClientWrappedKeySet`]). The service never sees the DEK, so
//! these checks are all that stands between a device's upload and what every recipient is
//! handed: the set must be for the epoch the call starts or extends, hold exactly one wrap per
//! expected device and to that device's current key (no device left out, none added, none
//! twice), carry the escrow wrap to the configured escrow key when the epoch is new (and none
//! when it is already escrowed), and verify under the author device's current identity key.
//! A refusal names the field and the device, so the client can fetch the keys again.

use std::collections::BTreeMap;

use crate::crypto::ids::{DeviceId, Epoch, KeyId, SessionId, UserId};
use crate::crypto::sign::{
    ClientWrap, ClientWrappedKeySet, EscrowWrap, IdentityPublicKey, Signature,
};
use crate::crypto::{CryptoError, Suite};
use crate::service::error::{DomainError, ErrorClass};
use crate::store::sessions::{EpochKeys, Member, NewSessionKey};
use crate::store::user_keys::UserKey;

/// A client-wrapped key set as parsed from the wire, before it is checked.
#[derive(Clone, Debug)]
pub(crate) struct ParsedKeySet {
    /// The epoch the wraps claim to be of.
    pub(crate) epoch: Epoch,
    /// One wrap per recipient device, as uploaded.
    pub(crate) wraps: Vec<ClientWrap>,
    /// The escrow wrap, if uploaded.
    pub(crate) escrow: Option<EscrowWrap>,
    /// The author device's signature over the set.
    pub(crate) signature: Signature,
}

/// What the call expects of the escrow wrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EscrowRule {
    /// A new epoch: its DEK must be sealed to this escrow key.
    Required(KeyId),
    /// Devices added to an epoch already escrowed: no escrow wrap.
    AlreadyEscrowed,
}

/// Everything a key set is checked against.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Expected<'a> {
    /// The session's suite.
    pub(crate) suite: Suite,
    /// The session.
    pub(crate) session_id: SessionId,
    /// The epoch the call starts (or adds devices to).
    pub(crate) epoch: Epoch,
    /// The author's user.
    pub(crate) author_user: &'a UserId,
    /// The author device, whose identity key signs.
    pub(crate) author_device: &'a DeviceId,
    /// The author device's current identity key.
    pub(crate) author_identity: &'a IdentityPublicKey,
    /// The devices to wrap for, each with its current key.
    pub(crate) devices: &'a [Member],
    /// What the escrow wrap must be.
    pub(crate) escrow: EscrowRule,
}

/// Why a client-wrapped key set is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeySetError {
    /// The set is of another epoch than the one the call needs (a concurrent change moved
    /// the session on, or the client is behind): ABORTED, the client reads again.
    #[error("key_set.epoch: this call needs the wraps of epoch {expected}, got {got}")]
    WrongEpoch {
        /// The epoch the call needs.
        expected: Epoch,
        /// The epoch the set claims.
        got: Epoch,
    },
    /// A wrap is to a key that is not the device's current one.
    #[error(
        "key_set.wraps[{index}]: device {user}/{device} has another current key; fetch the keys again"
    )]
    NotTheCurrentKey {
        /// The wrap's position in the upload.
        index: usize,
        /// The device's user.
        user: UserId,
        /// The device.
        device: DeviceId,
    },
    /// A wrap for a device that is not expected: not a recipient, a second wrap for the same
    /// device, or a device without a current key.
    #[error(
        "key_set.wraps[{index}]: device {user}/{device} is not expected (not a recipient, duplicated, or without a current key)"
    )]
    UnexpectedDevice {
        /// The wrap's position in the upload.
        index: usize,
        /// The device's user.
        user: UserId,
        /// The device.
        device: DeviceId,
    },
    /// An expected device has no wrap.
    #[error("key_set.wraps: no wrap for device {user}/{device}; fetch the keys again")]
    MissingWrap {
        /// The device's user.
        user: UserId,
        /// The device.
        device: DeviceId,
    },
    /// The escrow wrap is to another key than the configured escrow key.
    #[error("key_set.escrow.escrow_key_id: the escrow key is {escrow_key}")]
    WrongEscrowKey {
        /// The configured escrow key.
        escrow_key: KeyId,
    },
    /// A new epoch without its escrow wrap.
    #[error(
        "key_set.escrow: required: every epoch's DEK is escrowed (see KeyDirectory.GetEscrowKey)"
    )]
    EscrowMissing,
    /// An escrow wrap for an epoch already escrowed.
    #[error("key_set.escrow: this epoch is already escrowed; leave it out")]
    EscrowNotAllowed,
    /// The signature does not verify under the author device's current identity key over
    /// this set.
    #[error("key_set.signature: {0}")]
    BadSignature(CryptoError),
    /// The author device has no current key to verify with.
    #[error("author_device_id: the author device has no current key")]
    AuthorWithoutKey,
    /// The author device's stored identity key does not parse: corrupt data.
    #[error("stored identity key does not parse: {0}")]
    CorruptIdentityKey(CryptoError),
}

impl DomainError for KeySetError {
    fn class(&self) -> ErrorClass {
        match self {
            KeySetError::WrongEpoch { .. } => ErrorClass::Aborted,
            KeySetError::NotTheCurrentKey { .. }
            | KeySetError::UnexpectedDevice { .. }
            | KeySetError::MissingWrap { .. }
            | KeySetError::WrongEscrowKey { .. }
            | KeySetError::EscrowMissing
            | KeySetError::AuthorWithoutKey => ErrorClass::FailedPrecondition,
            KeySetError::EscrowNotAllowed | KeySetError::BadSignature(_) => {
                ErrorClass::InvalidArgument
            }
            KeySetError::CorruptIdentityKey(_) => ErrorClass::Internal,
        }
    }
}

/// The author device's current identity key, found among the current keys read for the call.
pub(crate) fn author_identity(
    keys: &[UserKey],
    user: &UserId,
    device: &DeviceId,
) -> Result<IdentityPublicKey, KeySetError> {
    let key = keys
        .iter()
        .find(|k| &k.user == user && &k.device == device)
        .ok_or(KeySetError::AuthorWithoutKey)?;
    IdentityPublicKey::from_slice(&key.identity_key).map_err(KeySetError::CorruptIdentityKey)
}

/// Checks a key set against what the call expects (in this order: the epoch, the wraps, the
/// escrow wrap, the signature) and returns the epoch keys to store.
pub(crate) fn check_key_set(
    ks: ParsedKeySet,
    expected: &Expected<'_>,
) -> Result<EpochKeys, KeySetError> {
    if ks.epoch != expected.epoch {
        return Err(KeySetError::WrongEpoch {
            expected: expected.epoch,
            got: ks.epoch,
        });
    }
    check_wraps(&ks.wraps, expected.devices)?;
    check_escrow(ks.escrow.as_ref(), expected.escrow)?;
    let set = ClientWrappedKeySet {
        suite: expected.suite,
        session_id: expected.session_id,
        epoch: ks.epoch,
        author_user: expected.author_user.clone(),
        author_device: expected.author_device.clone(),
        wraps: ks.wraps,
        escrow: ks.escrow,
    };
    expected
        .author_identity
        .verify(&set, &ks.signature)
        .map_err(KeySetError::BadSignature)?;
    Ok(EpochKeys {
        epoch: set.epoch,
        session_keys: set
            .wraps
            .into_iter()
            .map(|w| NewSessionKey {
                user: w.user,
                device: w.device,
                key_id: w.key_id,
                envelope: w.envelope.into_bytes(),
            })
            .collect(),
        staff_key: set.escrow.map(|e| (e.key_id, e.envelope.into_bytes())),
        service_key: None,
    })
}

/// Exactly one wrap per expected device, each to that device's current key.
fn check_wraps(wraps: &[ClientWrap], devices: &[Member]) -> Result<(), KeySetError> {
    let mut wanted: BTreeMap<(&UserId, &DeviceId), KeyId> = devices
        .iter()
        .map(|m| ((&m.user, &m.device), m.key_id))
        .collect();
    for (index, w) in wraps.iter().enumerate() {
        match wanted.remove(&(&w.user, &w.device)) {
            Some(key_id) if key_id == w.key_id => {}
            Some(_) => {
                return Err(KeySetError::NotTheCurrentKey {
                    index,
                    user: w.user.clone(),
                    device: w.device.clone(),
                })
            }
            None => {
                return Err(KeySetError::UnexpectedDevice {
                    index,
                    user: w.user.clone(),
                    device: w.device.clone(),
                })
            }
        }
    }
    match wanted.into_keys().next() {
        Some((user, device)) => Err(KeySetError::MissingWrap {
            user: user.clone(),
            device: device.clone(),
        }),
        None => Ok(()),
    }
}

fn check_escrow(escrow: Option<&EscrowWrap>, rule: EscrowRule) -> Result<(), KeySetError> {
    match (escrow, rule) {
        (Some(e), EscrowRule::Required(key)) if e.key_id == key => Ok(()),
        (Some(_), EscrowRule::Required(key)) => {
            Err(KeySetError::WrongEscrowKey { escrow_key: key })
        }
        (None, EscrowRule::Required(_)) => Err(KeySetError::EscrowMissing),
        (Some(_), EscrowRule::AlreadyEscrowed) => Err(KeySetError::EscrowNotAllowed),
        (None, EscrowRule::AlreadyEscrowed) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use tonic::{Code, Status};

    use super::*;
    use crate::crypto::envelope::{DekEnvelope, DEK_ENVELOPE_LEN};
    use crate::crypto::sign::IdentityKeyPair;
    use crate::crypto::xwing::DecapsulationKey;
    use crate::service::error::status;
    use crate::store::Timestamp;

    /// A session, its author device, three expected devices and the escrow key.
    struct Fixture {
        session_id: SessionId,
        author_user: UserId,
        author_device: DeviceId,
        author: IdentityKeyPair,
        identity: IdentityPublicKey,
        devices: Vec<Member>,
        escrow_key: KeyId,
    }

    fn key_id() -> KeyId {
        DecapsulationKey::generate()
            .unwrap()
            .encapsulation_key()
            .key_id()
    }

    fn envelope(fill: u8) -> DekEnvelope {
        let mut bytes = vec![fill; DEK_ENVELOPE_LEN];
        bytes[0] = Suite::XWingAes256GcmV1 as u8;
        DekEnvelope::from_bytes(&bytes).unwrap()
    }

    fn member(user: &str, device: &str) -> Member {
        Member {
            user: UserId::new(user).unwrap(),
            device: DeviceId::new(device).unwrap(),
            key_id: key_id(),
        }
    }

    impl Fixture {
        fn new() -> Self {
            let author = IdentityKeyPair::generate().unwrap();
            Fixture {
                session_id: SessionId::generate(),
                author_user: UserId::new("alice").unwrap(),
                author_device: DeviceId::new("phone").unwrap(),
                identity: author.public_key(),
                author,
                devices: vec![
                    member("alice", "phone"),
                    member("alice", "laptop"),
                    member("bob", "phone"),
                ],
                escrow_key: key_id(),
            }
        }

        fn expected(&self, escrow: EscrowRule) -> Expected<'_> {
            Expected {
                suite: Suite::XWingAes256GcmV1,
                session_id: self.session_id,
                epoch: Epoch::FIRST,
                author_user: &self.author_user,
                author_device: &self.author_device,
                author_identity: &self.identity,
                devices: &self.devices,
                escrow,
            }
        }

        fn wraps(&self) -> Vec<ClientWrap> {
            self.devices
                .iter()
                .enumerate()
                .map(|(i, m)| ClientWrap {
                    user: m.user.clone(),
                    device: m.device.clone(),
                    key_id: m.key_id,
                    envelope: envelope(u8::try_from(i).unwrap() + 2),
                })
                .collect()
        }

        fn escrow(&self) -> Option<EscrowWrap> {
            Some(EscrowWrap {
                key_id: self.escrow_key,
                envelope: envelope(0xee),
            })
        }

        /// A key set as the author device signs it.
        fn signed(
            &self,
            epoch: Epoch,
            wraps: Vec<ClientWrap>,
            escrow: Option<EscrowWrap>,
        ) -> ParsedKeySet {
            let set = ClientWrappedKeySet {
                suite: Suite::XWingAes256GcmV1,
                session_id: self.session_id,
                epoch,
                author_user: self.author_user.clone(),
                author_device: self.author_device.clone(),
                wraps: wraps.clone(),
                escrow: escrow.clone(),
            };
            ParsedKeySet {
                epoch,
                wraps,
                escrow,
                signature: self.author.sign(&set),
            }
        }

        fn check(&self, ks: ParsedKeySet, escrow: EscrowRule) -> Result<EpochKeys, KeySetError> {
            check_key_set(ks, &self.expected(escrow))
        }

        /// The refusal of these wraps, signed and escrowed, for a new first epoch.
        fn refusal(&self, wraps: Vec<ClientWrap>) -> KeySetError {
            self.check(
                self.signed(Epoch::FIRST, wraps, self.escrow()),
                EscrowRule::Required(self.escrow_key),
            )
            .unwrap_err()
        }
    }

    fn code(e: KeySetError) -> Code {
        status(e).code()
    }

    #[test]
    fn the_exact_set_is_accepted_and_becomes_the_epoch_keys() {
        let f = Fixture::new();
        let required = EscrowRule::Required(f.escrow_key);
        let keys = f
            .check(f.signed(Epoch::FIRST, f.wraps(), f.escrow()), required)
            .unwrap();
        assert_eq!(keys.epoch, Epoch::FIRST);
        assert_eq!(keys.session_keys.len(), 3);
        for (k, w) in keys.session_keys.iter().zip(f.wraps()) {
            assert_eq!(
                (&k.user, &k.device, k.key_id),
                (&w.user, &w.device, w.key_id)
            );
            assert_eq!(k.envelope, w.envelope.as_bytes());
        }
        assert_eq!(
            keys.staff_key,
            Some((f.escrow_key, envelope(0xee).as_bytes().to_vec()))
        );
        assert_eq!(keys.service_key, None);

        // The order of the wraps is the client's: the signature covers them sorted.
        let mut reversed = f.wraps();
        reversed.reverse();
        f.check(f.signed(Epoch::FIRST, reversed, f.escrow()), required)
            .unwrap();

        // Devices added to an escrowed epoch: no escrow wrap, and none stored.
        let keys = f
            .check(
                f.signed(Epoch::FIRST, f.wraps(), None),
                EscrowRule::AlreadyEscrowed,
            )
            .unwrap();
        assert_eq!(keys.staff_key, None);
    }

    #[test]
    fn no_devices_expected_takes_no_wraps() {
        let mut f = Fixture::new();
        f.devices.clear();
        let keys = f
            .check(
                f.signed(Epoch::FIRST, Vec::new(), None),
                EscrowRule::AlreadyEscrowed,
            )
            .unwrap();
        assert!(keys.session_keys.is_empty());
        let extra = vec![ClientWrap {
            user: UserId::new("mallory").unwrap(),
            device: DeviceId::new("phone").unwrap(),
            key_id: key_id(),
            envelope: envelope(9),
        }];
        let err = f
            .check(
                f.signed(Epoch::FIRST, extra, None),
                EscrowRule::AlreadyEscrowed,
            )
            .unwrap_err();
        assert!(matches!(
            err,
            KeySetError::UnexpectedDevice { index: 0, .. }
        ));
    }

    #[test]
    fn another_epoch_is_aborted() {
        let f = Fixture::new();
        let two = Epoch::FIRST.next().unwrap();
        let err = f
            .check(
                f.signed(two, f.wraps(), f.escrow()),
                EscrowRule::Required(f.escrow_key),
            )
            .unwrap_err();
        assert_eq!(
            err,
            KeySetError::WrongEpoch {
                expected: Epoch::FIRST,
                got: two
            }
        );
        assert_eq!(code(err.clone()), Code::Aborted);
        assert_eq!(
            err.to_string(),
            "key_set.epoch: this call needs the wraps of epoch 1, got 2"
        );
    }

    #[test]
    fn the_wraps_must_be_the_expected_devices_current_keys_each_once() {
        type Change = Box<dyn Fn(&mut Vec<ClientWrap>)>;
        let f = Fixture::new();
        let unexpected = "is not expected (not a recipient, duplicated, or without a current key)";
        let cases: Vec<(&str, Change, String)> = vec![
            (
                "a wrap to an old key",
                Box::new(|w| w[1].key_id = key_id()),
                "key_set.wraps[1]: device alice/laptop has another current key; fetch the keys again"
                    .into(),
            ),
            (
                "a stranger",
                Box::new(|w| w[2].user = UserId::new("mallory").unwrap()),
                format!("key_set.wraps[2]: device mallory/phone {unexpected}"),
            ),
            (
                "a second wrap for a device",
                Box::new(|w| w.push(w[0].clone())),
                format!("key_set.wraps[3]: device alice/phone {unexpected}"),
            ),
            (
                "a device left out",
                Box::new(|w| {
                    w.remove(2);
                }),
                "key_set.wraps: no wrap for device bob/phone; fetch the keys again".into(),
            ),
            (
                // Not an empty epoch: the same refusal.
                "every device left out",
                Box::new(|w| w.clear()),
                "key_set.wraps: no wrap for device alice/laptop; fetch the keys again".into(),
            ),
        ];
        for (what, change, message) in cases {
            let mut wraps = f.wraps();
            change(&mut wraps);
            let err = f.refusal(wraps);
            assert_eq!(code(err.clone()), Code::FailedPrecondition, "{what}");
            assert_eq!(err.to_string(), message, "{what}");
        }
    }

    #[test]
    fn the_escrow_wrap_must_be_to_the_escrow_key_exactly_when_required() {
        let f = Fixture::new();
        let required = EscrowRule::Required(f.escrow_key);

        let other = Some(EscrowWrap {
            key_id: key_id(),
            envelope: envelope(0xee),
        });
        let err = f
            .check(f.signed(Epoch::FIRST, f.wraps(), other), required)
            .unwrap_err();
        assert_eq!(
            err,
            KeySetError::WrongEscrowKey {
                escrow_key: f.escrow_key
            }
        );
        assert_eq!(code(err), Code::FailedPrecondition);

        let err = f
            .check(f.signed(Epoch::FIRST, f.wraps(), None), required)
            .unwrap_err();
        assert_eq!(err, KeySetError::EscrowMissing);
        assert_eq!(code(err), Code::FailedPrecondition);

        let err = f
            .check(
                f.signed(Epoch::FIRST, f.wraps(), f.escrow()),
                EscrowRule::AlreadyEscrowed,
            )
            .unwrap_err();
        assert_eq!(err, KeySetError::EscrowNotAllowed);
        assert_eq!(code(err), Code::InvalidArgument);
    }

    #[test]
    fn the_signature_must_be_the_authors_over_this_very_set() {
        let f = Fixture::new();
        let required = EscrowRule::Required(f.escrow_key);
        let bad = |err: KeySetError| {
            assert_eq!(err, KeySetError::BadSignature(CryptoError::BadSignature));
            let s: Status = status(err);
            assert_eq!(s.code(), Code::InvalidArgument);
            assert!(
                s.message().starts_with("key_set.signature:"),
                "{}",
                s.message()
            );
        };

        // Signed by another device's identity key.
        let mut ks = f.signed(Epoch::FIRST, f.wraps(), f.escrow());
        let set = ClientWrappedKeySet {
            suite: Suite::XWingAes256GcmV1,
            session_id: f.session_id,
            epoch: Epoch::FIRST,
            author_user: f.author_user.clone(),
            author_device: f.author_device.clone(),
            wraps: f.wraps(),
            escrow: f.escrow(),
        };
        ks.signature = IdentityKeyPair::generate().unwrap().sign(&set);
        bad(f.check(ks, required).unwrap_err());

        // An envelope changed after signing.
        let mut ks = f.signed(Epoch::FIRST, f.wraps(), f.escrow());
        ks.wraps[0].envelope = envelope(0x55);
        bad(f.check(ks, required).unwrap_err());

        // The escrow envelope changed after signing.
        let mut ks = f.signed(Epoch::FIRST, f.wraps(), f.escrow());
        ks.escrow = Some(EscrowWrap {
            key_id: f.escrow_key,
            envelope: envelope(0x56),
        });
        bad(f.check(ks, required).unwrap_err());

        // Signed for another session, or as another author device.
        let ks = f.signed(Epoch::FIRST, f.wraps(), f.escrow());
        let other_session = SessionId::generate();
        let mut expected = f.expected(required);
        expected.session_id = other_session;
        bad(check_key_set(ks.clone(), &expected).unwrap_err());
        let laptop = DeviceId::new("laptop").unwrap();
        let mut expected = f.expected(required);
        expected.author_device = &laptop;
        bad(check_key_set(ks, &expected).unwrap_err());
    }

    fn user_key(user: &str, device: &str, identity_key: Vec<u8>) -> UserKey {
        UserKey {
            key_id: key_id(),
            user: UserId::new(user).unwrap(),
            device: DeviceId::new(device).unwrap(),
            version: 1,
            suite: Suite::XWingAes256GcmV1,
            encapsulation_key: Vec::new(),
            identity_key,
            signature: Vec::new(),
            created_at: Timestamp::now(),
            superseded_at: None,
            revoked_at: None,
        }
    }

    #[test]
    fn the_author_identity_is_its_devices_current_key() {
        let f = Fixture::new();
        let public = f.author.public_key();
        let keys = vec![
            user_key(
                "alice",
                "laptop",
                IdentityKeyPair::generate()
                    .unwrap()
                    .public_key()
                    .as_bytes()
                    .to_vec(),
            ),
            user_key("alice", "phone", public.as_bytes().to_vec()),
        ];
        assert_eq!(
            author_identity(&keys, &f.author_user, &f.author_device).unwrap(),
            public
        );
        let err = author_identity(&keys[..1], &f.author_user, &f.author_device).unwrap_err();
        assert_eq!(err, KeySetError::AuthorWithoutKey);
        assert_eq!(code(err), Code::FailedPrecondition);
        let corrupt = vec![user_key("alice", "phone", vec![1, 2, 3])];
        let err = author_identity(&corrupt, &f.author_user, &f.author_device).unwrap_err();
        assert!(matches!(err, KeySetError::CorruptIdentityKey(_)));
        let s = status(err);
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(s.message(), "internal error");
    }
}
