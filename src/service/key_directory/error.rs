//! What the KeyDirectory workflows refuse, and how each refusal is reported
//! ([`crate::service::error`], the one mapping to `Status`).

use crate::crypto::ids::{DeviceId, UserId};
use crate::crypto::CryptoError;
use crate::service::error::{into_status, DomainError, ErrorClass};
use crate::store::StoreError;

/// A refusal or failure of a KeyDirectory call past its wire parsing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyDirectoryError {
    /// A prekey call for a device that has no current key bundle, so no identity key to check
    /// or count prekeys under.
    #[error("device {user}/{device} has no current key bundle: publish one first")]
    NoCurrentKey {
        /// The user.
        user: UserId,
        /// The device.
        device: DeviceId,
    },
    /// A claim names a device that has no current key (never published, or revoked).
    #[error("devices[{index}]: device {user}/{device} has no current key")]
    ClaimTargetWithoutKey {
        /// The position of the device in the request's `devices`.
        index: usize,
        /// The user.
        user: UserId,
        /// The device.
        device: DeviceId,
    },
    /// The users a claim names have more devices between them than one call may claim from.
    #[error("user_ids: the call reaches {reached} devices; at most {max} per call")]
    TooManyClaimTargets {
        /// The devices the call reaches.
        reached: usize,
        /// The most one call may reach.
        max: usize,
    },
    /// An upload would take the device past its bound of unused one-time prekeys (the store's
    /// account of the counts).
    #[error("one_time_prekeys: {0}")]
    PrekeyBound(String),
    /// The claimer is past its claim rate on one of the devices (the store's account of which).
    #[error("devices: {0}")]
    ClaimRateLimited(String),
    /// The identity key stored for a device does not parse: corrupt data.
    #[error("the stored identity key of {user}/{device} does not parse: {source}")]
    StoredIdentityKey {
        /// The user.
        user: UserId,
        /// The device.
        device: DeviceId,
        /// Why it does not parse.
        source: CryptoError,
    },
    /// The blocking task that verifies an upload's signatures did not finish (it panicked or
    /// the runtime is shutting down).
    #[error("prekey verification task failed: {0}")]
    VerifyTask(#[from] tokio::task::JoinError),
    /// The store failed, or refused with a meaning of its own (a key id already published, a
    /// concurrent publish that won, an unknown key).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl KeyDirectoryError {
    /// A store failure of an upload: a limit there is the device's prekey bound.
    pub(crate) fn of_upload(e: StoreError) -> Self {
        match e {
            StoreError::LimitExceeded(what) => KeyDirectoryError::PrekeyBound(what),
            other => KeyDirectoryError::Store(other),
        }
    }

    /// A store failure of a claim: a limit there is the claimer's rate on a device.
    pub(crate) fn of_claim(e: StoreError) -> Self {
        match e {
            StoreError::LimitExceeded(what) => KeyDirectoryError::ClaimRateLimited(what),
            other => KeyDirectoryError::Store(other),
        }
    }
}

impl DomainError for KeyDirectoryError {
    fn class(&self) -> ErrorClass {
        match self {
            KeyDirectoryError::NoCurrentKey { .. } => ErrorClass::FailedPrecondition,
            KeyDirectoryError::ClaimTargetWithoutKey { .. } => ErrorClass::NotFound,
            KeyDirectoryError::TooManyClaimTargets { .. }
            | KeyDirectoryError::PrekeyBound(_)
            | KeyDirectoryError::ClaimRateLimited(_) => ErrorClass::ResourceExhausted,
            KeyDirectoryError::StoredIdentityKey { .. } | KeyDirectoryError::VerifyTask(_) => {
                ErrorClass::Internal
            }
            KeyDirectoryError::Store(e) => e.class(),
        }
    }

    fn public_message(&self) -> String {
        match self {
            KeyDirectoryError::Store(e) => e.public_message(),
            other => other.to_string(),
        }
    }
}

into_status!(KeyDirectoryError);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_limits_name_the_field_of_the_call_and_other_store_errors_keep_their_meaning() {
        let bound = tonic::Status::from(KeyDirectoryError::of_upload(StoreError::LimitExceeded(
            "device a/b holds 9".into(),
        )));
        assert_eq!(bound.code(), tonic::Code::ResourceExhausted);
        assert_eq!(bound.message(), "one_time_prekeys: device a/b holds 9");
        let rate = tonic::Status::from(KeyDirectoryError::of_claim(StoreError::LimitExceeded(
            "device a/b: at most 3".into(),
        )));
        assert_eq!(rate.code(), tonic::Code::ResourceExhausted);
        assert_eq!(rate.message(), "devices: device a/b: at most 3");
        let exists = tonic::Status::from(KeyDirectoryError::of_upload(StoreError::AlreadyExists(
            "prekeys_pkey".into(),
        )));
        assert_eq!(exists.code(), tonic::Code::AlreadyExists);
        assert!(!exists.message().contains("prekeys_pkey"));
        let gone = tonic::Status::from(KeyDirectoryError::of_claim(StoreError::Unavailable(
            "pool closed".into(),
        )));
        assert_eq!(gone.code(), tonic::Code::Unavailable);
        assert!(!gone.message().contains("pool closed"));
    }
}
