//! The gRPC services: each parses its request into domain types, checks the caller's rights,
//! calls the store or the crypto core, and maps the result. No SQL here, no crypto of its own.
//!
//! Errors map to gRPC codes in one place ([`error`], and [`invalid`] for wire parsing): bad input is
//! INVALID_ARGUMENT naming the field, unknown is NOT_FOUND, wrong role or owner is
//! PERMISSION_DENIED, a conflict is ALREADY_EXISTS or ABORTED, an unreachable database is
//! UNAVAILABLE. Internal details are logged, never sent.

/// Writes a gRPC service: the struct over the shared [`AppState`], its tonic impl, and the
/// roles that may call each RPC (`ROLES`, which the auth layer checks before the request
/// body is even decoded). Every RPC takes the authenticated caller and the request message,
/// calls the module's handler of the same name — `async fn rpc(state: &AppState, caller:
/// &Principal, req: Request) -> Result<Response, Status>` — and wraps its answer. The tonic
/// impl thus holds no logic; a handler checks only what depends on the request (whose keys,
/// which device).
macro_rules! rpc_service {
    (
        $(#[$doc:meta])*
        $service:ident: $trait:ident {
            $(type $stream:ident = $stream_ty:ty;)*
            $(fn $rpc:ident($req:ty) -> $resp:ty, by [$($role:ident),+];)*
        }
    ) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub(crate) struct $service {
            state: $crate::service::AppState,
        }

        impl $service {
            /// The service over the shared state.
            pub(crate) fn new(state: $crate::service::AppState) -> Self {
                Self { state }
            }

            /// Each RPC (by its Rust name) and the roles that may call it.
            pub(crate) const ROLES: &'static [(&'static str, &'static [$crate::auth::Role])] = &[
                $((stringify!($rpc), &[$($crate::auth::Role::$role),+]),)*
            ];
        }

        #[tonic::async_trait]
        impl $trait for $service {
            $(type $stream = $stream_ty;)*
            $(
                async fn $rpc(
                    &self,
                    request: tonic::Request<$req>,
                ) -> Result<tonic::Response<$resp>, tonic::Status> {
                    let caller = $crate::auth::principal(&request)?.clone();
                    $rpc(&self.state, &caller, request.into_inner())
                        .await
                        .map(tonic::Response::new)
                }
            )*
        }
    };
}

pub(crate) mod admin;
pub(crate) mod cursor;
pub(crate) mod device_sync;
pub(crate) mod error;
pub(crate) mod escrow;
pub(crate) mod idempotency;
pub(crate) mod key_directory;
pub(crate) mod messages;
pub(crate) mod ratchet;
pub(crate) mod sessions;
pub(crate) mod trust;
pub(crate) mod watch;

pub use admin::{issue_token, TokenRequest};
pub use ratchet::CURRENT_VERSION_TRAILER;

use std::sync::Arc;

use tonic::Status;

use crate::auth::Principal;
use crate::config::Limits;
use crate::crypto::ids::{DeviceId, UserId};
use crate::crypto::keys::Kek;
use crate::crypto::xwing::EncapsulationKey;
use crate::crypto::CryptoError;
use crate::store::Store;

/// What every service shares: the store, the keys, the limits.
#[derive(Clone)]
pub struct AppState {
    /// The records.
    pub(crate) store: Store,
    /// The service KEK.
    pub(crate) kek: Arc<Kek>,
    /// The staff escrow public key every DEK is sealed to.
    pub(crate) escrow_public_key: Arc<EncapsulationKey>,
    /// Most items accepted in one list (user ids, recipients).
    pub(crate) max_list_len: usize,
    /// Bounds on prekeys, ratchet states, inboxes and messages.
    pub(crate) limits: Limits,
    /// The server-streaming calls: their slots (per-device cap, revocation) and shutdown.
    pub(crate) streams: watch::Streams,
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
