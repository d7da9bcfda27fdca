//! Identifiers that crypto contexts bind: users, devices, sessions, epochs, keys, messages.
//!
//! Each is a newtype so that a function taking a [`SessionId`] cannot be handed a [`UserId`].
//! They live in the crypto core because envelopes and signatures bind them; the store and the
//! services use the same types.

use std::fmt;

use uuid::Uuid;

use super::error::CryptoError;

/// Longest user id accepted, in bytes.
pub const MAX_USER_ID_LEN: usize = 128;
/// Longest device id accepted, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 64;
/// Longest conversation id accepted, in bytes.
pub const MAX_CONVERSATION_ID_LEN: usize = 128;

fn check_token(what: &'static str, s: &str, max: usize) -> Result<(), CryptoError> {
    if s.is_empty() {
        return Err(CryptoError::InvalidId {
            what,
            reason: "must not be empty",
        });
    }
    if s.len() > max {
        return Err(CryptoError::InvalidId {
            what,
            reason: "too long",
        });
    }
    // Printable ASCII without spaces: ids appear in logs, URLs and canonical encodings, and
    // one spelling per id rules out look-alike Unicode.
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CryptoError::InvalidId {
            what,
            reason: "only printable ASCII without spaces is allowed",
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Parses and validates an id: 1 to
            #[doc = stringify!($max)]
            /// bytes of printable ASCII without spaces.
            pub fn new(s: impl Into<String>) -> Result<Self, CryptoError> {
                let s = s.into();
                check_token($what, &s, $max)?;
                Ok(Self(s))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = CryptoError;
            fn from_str(s: &str) -> Result<Self, CryptoError> {
                Self::new(s)
            }
        }
    };
}

string_id!(
    /// A user, as the app server names it (opaque to Keyhold).
    UserId,
    "user id",
    MAX_USER_ID_LEN
);
string_id!(
    /// One device of a user, as the device or app names it (unique within its user).
    DeviceId,
    "device id",
    MAX_DEVICE_ID_LEN
);
string_id!(
    /// A conversation whose Double Ratchet state a device backs up (chosen by the device).
    ConversationId,
    "conversation id",
    MAX_CONVERSATION_ID_LEN
);

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh, time-sortable id (UUIDv7).
            pub fn generate() -> Self {
                Self(Uuid::now_v7())
            }

            /// Wraps a UUID.
            pub fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            /// Parses the 16 raw bytes of a UUID.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
                Self::checked(Uuid::from_bytes(super::error::exact::<16>($what, bytes)?))
            }

            fn checked(id: Uuid) -> Result<Self, CryptoError> {
                if id.is_nil() {
                    return Err(CryptoError::InvalidId {
                        what: $what,
                        reason: "must not be the nil UUID",
                    });
                }
                Ok(Self(id))
            }

            /// Parses the canonical text form, a lower-case hyphenated UUIDv7.
            pub fn parse(s: &str) -> Result<Self, CryptoError> {
                let id = Uuid::parse_str(s).map_err(|_| CryptoError::InvalidId {
                    what: $what,
                    reason: "not a UUID",
                })?;
                if id.hyphenated().to_string() != s {
                    return Err(CryptoError::InvalidId {
                        what: $what,
                        reason: "not in lower-case hyphenated form",
                    });
                }
                if id.get_version_num() != 7 {
                    return Err(CryptoError::InvalidId {
                        what: $what,
                        reason: "not a UUIDv7",
                    });
                }
                Self::checked(id)
            }

            /// The UUID.
            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }

            /// The 16 raw bytes, as bound in canonical encodings.
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

uuid_id!(
    /// An encryption session (UUIDv7).
    SessionId,
    "session id"
);
uuid_id!(
    /// An encrypted message, chosen by its author (UUIDv7).
    MessageId,
    "message id"
);

/// A session's key generation: starts at 1 and grows by one at each rotation or removal.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Epoch(u32);

impl Epoch {
    /// The first epoch of every session.
    pub const FIRST: Epoch = Epoch(1);
    /// The last epoch: 2^31 - 1, so that every epoch fits a signed 32-bit database column.
    pub const MAX: Epoch = Epoch(i32::MAX as u32);

    /// An epoch number; zero is refused.
    pub fn new(n: u32) -> Result<Self, CryptoError> {
        if n == 0 {
            return Err(CryptoError::InvalidId {
                what: "epoch",
                reason: "epochs start at 1",
            });
        }
        if n > Epoch::MAX.0 {
            return Err(CryptoError::InvalidId {
                what: "epoch",
                reason: "epochs end at 2^31 - 1",
            });
        }
        Ok(Self(n))
    }

    /// The epoch number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The epoch after this one, or `None` after [`Epoch::MAX`].
    pub fn next(self) -> Option<Epoch> {
        (self < Epoch::MAX).then(|| Epoch(self.0 + 1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Length of a [`KeyId`] in bytes.
pub const KEY_ID_LEN: usize = 16;

/// The fingerprint of a public key: the first 16 bytes of SHA-256 over a label and the key.
///
/// Anyone holding the public key computes the same id, so envelopes, signatures and rows can
/// name a key without carrying its 1,216 bytes, and an id cannot be attached to another key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId([u8; KEY_ID_LEN]);

impl KeyId {
    /// Parses the 16 raw bytes of a key id.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        Ok(Self(super::error::exact::<KEY_ID_LEN>("key id", bytes)?))
    }

    /// Wraps 16 bytes already known to be a key id.
    pub fn from_bytes(bytes: [u8; KEY_ID_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_ID_LEN] {
        &self.0
    }

    /// Lower-case hex, as shown to people and in logs.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_rejects_empty_long_and_non_ascii() {
        assert!(UserId::new("alice").is_ok());
        assert!(UserId::new("").is_err());
        assert!(UserId::new("a".repeat(MAX_USER_ID_LEN + 1)).is_err());
        assert!(UserId::new("a".repeat(MAX_USER_ID_LEN)).is_ok());
        assert!(UserId::new("al ice").is_err());
        assert!(UserId::new("alicé").is_err());
        assert!(DeviceId::new("d".repeat(MAX_DEVICE_ID_LEN + 1)).is_err());
    }

    #[test]
    fn epoch_zero_is_refused_and_next_saturates() {
        assert!(Epoch::new(0).is_err());
        assert_eq!(Epoch::FIRST.next(), Some(Epoch::new(2).unwrap()));
        assert_eq!(Epoch::MAX.next(), None);
        assert!(Epoch::new(i32::MAX as u32 + 1).is_err());
        assert_eq!(Epoch::new(i32::MAX as u32), Ok(Epoch::MAX));
    }

    #[test]
    fn uuid_ids_parse_and_refuse_nil() {
        let id = SessionId::generate();
        assert_eq!(SessionId::parse(&id.to_string()).unwrap(), id);
        assert!(SessionId::parse("00000000-0000-0000-0000-000000000000").is_err());
        assert!(SessionId::parse("nope").is_err());
        // Only the canonical lower-case hyphenated UUIDv7 form.
        assert!(SessionId::parse(&id.to_string().to_uppercase()).is_err());
        assert!(SessionId::parse(&id.as_uuid().simple().to_string()).is_err());
        let v4 = uuid::Builder::from_random_bytes([7u8; 16]).into_uuid();
        assert!(SessionId::parse(&v4.to_string()).is_err());
        assert!(SessionId::from_slice(&[0u8; 15]).is_err());
    }
}
