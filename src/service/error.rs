//! The one path from a failure to a gRPC status.
//!
//! Each service area has its own domain error (thiserror, every variant documented) for what
//! its workflow can refuse; a variant says which [`ErrorClass`] it is and what the caller may
//! read. [`status`] turns any of them into a [`Status`], here and nowhere else: the class
//! picks the code as `DESIGN.md` ("API") lays down, internal details are logged and never
//! sent, and a store error keeps the meaning [`StoreError`] gives it.
//!
//! A new area writes its enum, `impl DomainError`, and `impl From<ItsError> for Status` by
//! [`into_status!`](crate::service::error::into_status).

use std::fmt;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::Status;

use crate::crypto::CryptoError;
use crate::store::StoreError;

/// How a failure is reported: one gRPC code each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// Bad input; the message names the field. INVALID_ARGUMENT.
    InvalidArgument,
    /// The thing asked for does not exist (or is not the caller's to see). NOT_FOUND.
    NotFound,
    /// It exists already, with other contents. ALREADY_EXISTS.
    AlreadyExists,
    /// The caller's role or identity may not do this. PERMISSION_DENIED.
    PermissionDenied,
    /// A concurrent change won; reading again and retrying may succeed. ABORTED.
    Aborted,
    /// The system is not in the state the call needs (a stale version, a key that cannot be
    /// used); retrying the same call will not help. FAILED_PRECONDITION.
    FailedPrecondition,
    /// Over a size, count or rate limit. RESOURCE_EXHAUSTED.
    ResourceExhausted,
    /// The database cannot be used now; retry later. UNAVAILABLE.
    Unavailable,
    /// A bug or corrupt data: logged, never described to the caller. INTERNAL.
    Internal,
}

/// A domain error: it knows its class, and its `Display` is the message a caller may read
/// (for [`ErrorClass::Internal`] and [`ErrorClass::Unavailable`] it is only logged: an
/// UNAVAILABLE status carries [`DomainError::public_message`], which for a store error is the
/// store's own text, never the driver's, so an area whose error is UNAVAILABLE delegates it
/// to the [`StoreError`] it wraps).
pub(crate) trait DomainError: fmt::Display {
    /// How this failure is reported.
    fn class(&self) -> ErrorClass;

    /// The message the caller reads; by default the `Display` text.
    fn public_message(&self) -> String {
        self.to_string()
    }

    /// Metadata sent beside the message, for a caller that acts on more than the text (the
    /// current version of a stale write); none by default, and never for
    /// [`ErrorClass::Internal`] or [`ErrorClass::Unavailable`].
    fn metadata(&self) -> Vec<(&'static str, MetadataValue<Ascii>)> {
        Vec::new()
    }
}

/// The status of any domain error: the one mapping.
pub(crate) fn status<E: DomainError>(e: E) -> Status {
    let mut status = match e.class() {
        ErrorClass::InvalidArgument => Status::invalid_argument(e.public_message()),
        ErrorClass::NotFound => Status::not_found(e.public_message()),
        ErrorClass::AlreadyExists => Status::already_exists(e.public_message()),
        ErrorClass::PermissionDenied => Status::permission_denied(e.public_message()),
        ErrorClass::Aborted => Status::aborted(e.public_message()),
        ErrorClass::FailedPrecondition => Status::failed_precondition(e.public_message()),
        ErrorClass::ResourceExhausted => Status::resource_exhausted(e.public_message()),
        ErrorClass::Unavailable => {
            tracing::warn!(error = %e, "database unavailable");
            return Status::unavailable(e.public_message());
        }
        ErrorClass::Internal => {
            tracing::error!(error = %e, "internal failure");
            return Status::internal("internal error");
        }
    };
    for (key, value) in e.metadata() {
        status.metadata_mut().insert(key, value);
    }
    status
}

/// What a store error means to a caller when the workflow gives it no meaning of its own.
impl DomainError for StoreError {
    fn class(&self) -> ErrorClass {
        match self {
            StoreError::NotFound => ErrorClass::NotFound,
            StoreError::AlreadyExists(_) => ErrorClass::AlreadyExists,
            StoreError::VersionConflict(_) => ErrorClass::Aborted,
            StoreError::LimitExceeded(_) => ErrorClass::ResourceExhausted,
            StoreError::Unavailable(_) | StoreError::LockTimeout(_) => ErrorClass::Unavailable,
            StoreError::OutOfResources(_) => ErrorClass::ResourceExhausted,
            StoreError::InvalidUrl(_) | StoreError::Internal(_) => ErrorClass::Internal,
        }
    }

    /// Never the database's own text (constraint names, driver messages): only what the
    /// store itself wrote for a limit.
    fn public_message(&self) -> String {
        match self {
            StoreError::NotFound => "not found".into(),
            StoreError::AlreadyExists(_) => "already exists".into(),
            StoreError::VersionConflict(_) => "conflict with a concurrent change; retry".into(),
            StoreError::LimitExceeded(what) => what.clone(),
            StoreError::Unavailable(_) => "database unavailable".into(),
            StoreError::LockTimeout(what) => what.clone(),
            StoreError::OutOfResources(_) => "the database is out of disk space or memory; \
                 nothing was written, and writes succeed again once it is freed: retry later"
                .into(),
            other => other.to_string(),
        }
    }
}

/// A crypto failure on the service's own keys or stored data (never the caller's input, which
/// is parsed into a field error): INTERNAL.
#[derive(Debug, thiserror::Error)]
#[error("crypto failure on service keys: {0}")]
pub(crate) struct ServiceCrypto(#[from] pub(crate) CryptoError);

impl DomainError for ServiceCrypto {
    fn class(&self) -> ErrorClass {
        ErrorClass::Internal
    }
}

/// Writes `impl From<$error> for Status` through [`status`], for each domain error named.
macro_rules! into_status {
    ($($error:ty),+ $(,)?) => {
        $(impl From<$error> for ::tonic::Status {
            fn from(e: $error) -> ::tonic::Status {
                $crate::service::error::status(e)
            }
        })+
    };
}
pub(crate) use into_status;

into_status!(StoreError, ServiceCrypto);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_keep_their_codes_and_hide_internal_text() {
        let cases = [
            (StoreError::NotFound, tonic::Code::NotFound),
            (
                StoreError::AlreadyExists("t_pkey".into()),
                tonic::Code::AlreadyExists,
            ),
            (
                StoreError::VersionConflict("x".into()),
                tonic::Code::Aborted,
            ),
            (
                StoreError::LimitExceeded("inbox".into()),
                tonic::Code::ResourceExhausted,
            ),
            (
                StoreError::Unavailable("pool closed".into()),
                tonic::Code::Unavailable,
            ),
            (
                StoreError::Internal("constraint user_keys_pkey".into()),
                tonic::Code::Internal,
            ),
        ];
        for (e, code) in cases {
            let s = Status::from(e);
            assert_eq!(s.code(), code);
            assert!(!s.message().contains("pool closed"));
            assert!(!s.message().contains("user_keys_pkey"));
        }
        let s = Status::from(ServiceCrypto(CryptoError::OpenFailed));
        assert_eq!(s.code(), tonic::Code::Internal);
        assert_eq!(s.message(), "internal error");
    }
}
