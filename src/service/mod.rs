//! The gRPC services: each parses its request into domain types, checks the caller's rights,
//! calls the store or the crypto core, and maps the result. No SQL here, no crypto of its own.
//!
//! Errors map to gRPC codes in one place ([`store_status`], [`invalid`]): bad input is
//! INVALID_ARGUMENT naming the field, unknown is NOT_FOUND, wrong role or owner is
//! PERMISSION_DENIED, a conflict is ALREADY_EXISTS or ABORTED, an unreachable database is
//! UNAVAILABLE. Internal details are logged, never sent.

pub mod admin;
pub mod device_sync;
pub mod escrow;
pub mod key_directory;
pub mod messages;
pub mod ratchet;
pub mod sessions;
pub mod trust;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::auth::{Principal, Role};
use crate::crypto::ids::{DeviceId, UserId};
use crate::crypto::keys::Kek;
use crate::crypto::xwing::EncapsulationKey;
use crate::crypto::CryptoError;
use crate::store::{Store, StoreError};

/// What every service shares: the store, the keys, the limits.
#[derive(Clone)]
pub struct AppState {
    /// The records.
    pub store: Store,
    /// The service KEK.
    pub kek: Arc<Kek>,
    /// The staff escrow public key every DEK is sealed to.
    pub escrow_public_key: Arc<EncapsulationKey>,
    /// Most items accepted in one list (user ids, recipients).
    pub max_list_len: usize,
    /// Bounds on prekeys, ratchet states, inboxes and messages.
    pub limits: Limits,
    /// Ends the server-streaming calls when the server shuts down.
    pub streams: watch::StreamStop,
}

/// Bounds on what devices store and how fast they claim prekeys, from the settings
/// ([`crate::config::Settings`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most unused one-time prekeys one device may hold.
    pub max_unused_prekeys: usize,
    /// Prekey claims one claimer may make on one device per `prekey_claim_window`.
    pub prekey_claim_limit: u32,
    /// The prekey claim rate window.
    pub prekey_claim_window: Duration,
    /// Largest ratchet state, in bytes.
    pub max_ratchet_state_bytes: usize,
    /// Largest key package payload, in bytes.
    pub max_key_package_bytes: usize,
    /// Most unacknowledged key packages one device's inbox holds.
    pub max_inbox_packages: usize,
    /// Largest message PutMessages accepts: ciphertext plus associated data, in bytes.
    pub max_message_bytes: usize,
    /// Most messages in one PutMessages call.
    pub max_message_batch: usize,
}

impl Limits {
    /// The default prekey claim window, in seconds.
    pub const DEFAULT_CLAIM_WINDOW_SECS: u32 = 60;

    /// The defaults, which the settings also use.
    pub const DEFAULT: Limits = Limits {
        max_unused_prekeys: 1000,
        prekey_claim_limit: 20,
        prekey_claim_window: Duration::from_secs(Limits::DEFAULT_CLAIM_WINDOW_SECS as u64),
        max_ratchet_state_bytes: 64 * 1024,
        max_key_package_bytes: 64 * 1024,
        max_inbox_packages: 1000,
        max_message_bytes: 1024 * 1024,
        max_message_batch: 500,
    };

    /// The limits the settings name.
    pub fn from_settings(settings: &crate::config::Settings) -> Self {
        Limits {
            max_unused_prekeys: settings.max_unused_prekeys,
            prekey_claim_limit: settings.prekey_claim_limit,
            prekey_claim_window: Duration::from_secs(u64::from(settings.prekey_claim_window_secs)),
            max_ratchet_state_bytes: settings.max_ratchet_state_bytes,
            max_key_package_bytes: settings.max_key_package_bytes,
            max_inbox_packages: settings.max_inbox_packages,
            max_message_bytes: settings.max_message_bytes,
            max_message_batch: settings.max_message_batch,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// INVALID_ARGUMENT naming `field`.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// Parses one field with a crypto-core parser, naming the field on failure.
pub fn parse_field<T>(field: &str, parsed: Result<T, CryptoError>) -> Result<T, Status> {
    parsed.map_err(|e| invalid(field, e))
}

/// Checks a list's length: not empty (when `required`), at most `max`.
pub fn check_list_len(field: &str, len: usize, max: usize, required: bool) -> Result<(), Status> {
    if required && len == 0 {
        return Err(invalid(field, "must not be empty"));
    }
    if len > max {
        return Err(Status::resource_exhausted(format!(
            "{field}: at most {max} items per call, got {len}"
        )));
    }
    Ok(())
}

/// Maps a store error to its gRPC status. Internal details are logged here and not sent.
pub fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound => Status::not_found("not found"),
        StoreError::AlreadyExists(what) => {
            Status::already_exists(format!("already exists ({what})"))
        }
        StoreError::VersionConflict(what) => Status::aborted(format!("conflict: {what}; retry")),
        StoreError::LimitExceeded(what) => Status::resource_exhausted(what),
        StoreError::Unavailable(what) => {
            tracing::warn!(error = %what, "database unavailable");
            Status::unavailable("database unavailable")
        }
        other => {
            tracing::error!(error = %other, "store failure");
            Status::internal("internal error")
        }
    }
}

/// Maps a crypto failure on the service's own keys (not the caller's input) to INTERNAL.
pub fn crypto_internal(e: CryptoError) -> Status {
    tracing::error!(error = %e, "crypto failure on service keys");
    Status::internal("internal error")
}

/// The caller must have one of `roles`.
pub fn require_role(principal: &Principal, roles: &[Role]) -> Result<(), Status> {
    if roles.contains(&principal.role()) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "role {} may not call this",
            principal.role().name()
        )))
    }
}

/// The caller is the device `(user, device)` itself: calls that touch what only the device
/// may see or change (its prekeys, its ratchet states). Every other caller, app servers
/// included, is refused.
pub fn require_own_device(
    principal: &Principal,
    user: &UserId,
    device: &DeviceId,
) -> Result<(), Status> {
    match principal {
        Principal::Device {
            user: own_user,
            device: own_device,
            ..
        } if own_user == user && own_device == device => Ok(()),
        Principal::Device { .. } => Err(Status::permission_denied(
            "a device token acts only for its own device",
        )),
        other => Err(Status::permission_denied(format!(
            "role {} may not call this: only the device itself may",
            other.role().name()
        ))),
    }
}

/// The caller acts for `user` (and, when given, `device`): an app server acts for anyone, a
/// device only for itself. Other roles are refused.
pub fn require_acts_for(
    principal: &Principal,
    user: &UserId,
    device: Option<&DeviceId>,
) -> Result<(), Status> {
    match principal {
        Principal::App { .. } => Ok(()),
        Principal::Device {
            user: own_user,
            device: own_device,
            ..
        } => {
            if own_user == user && device.is_none_or(|d| d == own_device) {
                Ok(())
            } else {
                Err(Status::permission_denied(
                    "a device token acts only for its own device",
                ))
            }
        }
        other => Err(Status::permission_denied(format!(
            "role {} may not call this",
            other.role().name()
        ))),
    }
}
