//! What the Sessions workflows refuse ([`SessionError`]), and through the one mapping
//! ([`crate::service::error`]) the status each refusal reaches the caller as.

use super::key_set::KeySetError;
use crate::crypto::ids::{DeviceId, Epoch, UserId};
use crate::crypto::CryptoError;
use crate::service::error::{into_status, DomainError, ErrorClass};
use crate::store::StoreError;

/// What a Sessions workflow refuses, or why it failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// The session does not exist, or was deleted.
    #[error("session_id: no such session")]
    NoSuchSession,
    /// A client-chosen session id is already taken.
    #[error("session_id: a session with this id exists")]
    SessionIdTaken,
    /// The caller is not the one who may change this session.
    #[error(
        "only an app server (service-wrapped) or the author device (client-wrapped) may change this session"
    )]
    NotOwner,
    /// RemoveRecipients named the session's author.
    #[error("user_ids: the author cannot be removed from its session")]
    AuthorNotRemovable,
    /// RemoveRecipients named a user with no device in the session.
    #[error("user_ids: {0} is not a recipient of this session")]
    NotARecipient(UserId),
    /// A key set was sent for a service-wrapped session.
    #[error("key_set: only for CLIENT_WRAPPED sessions")]
    KeySetNotAllowed,
    /// A change of a client-wrapped session came without its key set.
    #[error("key_set: required for CLIENT_WRAPPED sessions")]
    KeySetRequired,
    /// The client-wrapped key set does not match what the call expects.
    #[error(transparent)]
    KeySet(#[from] KeySetError),
    /// The recipients have more devices than one call produces keys for.
    #[error(
        "user_ids: the recipients have {devices} devices; at most {max} session keys per call"
    )]
    TooManyKeys {
        /// The devices the call would wrap for.
        devices: usize,
        /// The most session keys one call produces.
        max: usize,
    },
    /// A recipient device's current key cannot be wrapped to (for example a key stored before
    /// the key parser refused low-order X25519 parts). Nothing is written; the device must
    /// publish a new key, or its user be left out.
    #[error(
        "user_ids: the current key of device {user}/{device} cannot be wrapped to ({reason}); the device must publish a new key"
    )]
    UnwrappableDeviceKey {
        /// The device's user.
        user: UserId,
        /// The device.
        device: DeviceId,
        /// Why its key cannot be used.
        reason: CryptoError,
    },
    /// The session is at the last epoch there is.
    #[error("the session has used every epoch")]
    EpochsExhausted,
    /// A service-wrapped session without the KEK copy of its current DEK.
    #[error("the session has no service copy of its key")]
    NoServiceCopy,
    /// The KEK copy of the current DEK is under a KEK version the service no longer holds.
    #[error("the session key is under KEK version {0}; rotate the session")]
    OldKekVersion(u32),
    /// GetSessionKeys of a session the device holds no key of.
    #[error("session_id: this device holds no key of this session")]
    NoKeysHeld,
    /// GetSessionKeys of an epoch the device holds no key of.
    #[error("session_id: this device holds no key of epoch {0} of this session")]
    NoKeysOfEpoch(Epoch),
    /// A crypto failure on the service's own keys (the KEK, the escrow key, randomness).
    #[error("crypto failure on service keys: {0}")]
    ServiceCrypto(CryptoError),
    /// Stored data that breaks an invariant, or a failed wrapping task: a bug, not the
    /// caller's doing.
    #[error("{0}")]
    Internal(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DomainError for SessionError {
    fn class(&self) -> ErrorClass {
        use SessionError as E;
        match self {
            E::NoSuchSession | E::NotARecipient(_) | E::NoKeysHeld | E::NoKeysOfEpoch(_) => {
                ErrorClass::NotFound
            }
            E::SessionIdTaken => ErrorClass::AlreadyExists,
            E::NotOwner => ErrorClass::PermissionDenied,
            E::AuthorNotRemovable | E::KeySetNotAllowed | E::KeySetRequired => {
                ErrorClass::InvalidArgument
            }
            E::TooManyKeys { .. } => ErrorClass::ResourceExhausted,
            E::UnwrappableDeviceKey { .. }
            | E::EpochsExhausted
            | E::NoServiceCopy
            | E::OldKekVersion(_) => ErrorClass::FailedPrecondition,
            E::ServiceCrypto(_) | E::Internal(_) => ErrorClass::Internal,
            E::KeySet(e) => e.class(),
            E::Store(e) => e.class(),
        }
    }

    fn public_message(&self) -> String {
        match self {
            SessionError::KeySet(e) => e.public_message(),
            SessionError::Store(e) => e.public_message(),
            other => other.to_string(),
        }
    }
}

into_status!(SessionError);

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    #[test]
    fn an_unwrappable_key_is_failed_precondition_naming_the_device() {
        let s = Status::from(SessionError::UnwrappableDeviceKey {
            user: UserId::new("alice").unwrap(),
            device: DeviceId::new("phone").unwrap(),
            reason: CryptoError::InvalidKey("X-Wing encapsulation key"),
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(
            s.message(),
            "user_ids: the current key of device alice/phone cannot be wrapped to \
             (invalid X-Wing encapsulation key); the device must publish a new key"
        );
    }

    #[test]
    fn internal_failures_say_nothing_and_store_errors_keep_their_meaning() {
        for e in [
            SessionError::ServiceCrypto(CryptoError::Backend),
            SessionError::Internal("client-wrapped session without an author device".into()),
            SessionError::Store(StoreError::Internal("constraint sessions_pkey".into())),
        ] {
            let s = Status::from(e);
            assert_eq!(s.code(), Code::Internal);
            assert_eq!(s.message(), "internal error");
        }
        let s = Status::from(SessionError::Store(StoreError::VersionConflict(
            "session x is no longer at epoch 2".into(),
        )));
        assert_eq!(s.code(), Code::Aborted);
        assert!(!s.message().contains("epoch 2"), "{}", s.message());
    }
}
