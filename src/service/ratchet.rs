//! The Ratchet service: a device backs up its Double Ratchet state per conversation.
//!
//! The service seals each state under the KEK bound to the row's identity
//! ([`KekContext::RatchetState`]: user, device, conversation), so a sealed state copied to
//! another row fails to open. Writes are compare-and-swap on the state's version, decided by
//! the database ([`crate::store::ratchet_states`]); a stale write is ABORTED, names the current
//! version in its message and in the [`CURRENT_VERSION_TRAILER`] metadata, and changes nothing.
//! Only the owning device may call; app servers, staff and admins are refused, and another
//! device is refused even for its own user.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::Status;

use super::error::{into_status, DomainError, ErrorClass};
use super::{invalid, parse_field, require_own_device, AppState};
use crate::auth::Principal;
use crate::crypto::envelope::{open_under_kek, seal_under_kek, KekContext};
use crate::crypto::ids::{ConversationId, DeviceId, UserId};
use crate::crypto::CryptoError;
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::ratchet_server::Ratchet;
use crate::store::ratchet_states::{CasOutcome, RatchetKey, RatchetWrite};
use crate::store::StoreError;

/// The metadata key of an ABORTED write's current version (decimal text).
pub const CURRENT_VERSION_TRAILER: &str = "keyhold-current-version";

/// The row a request names, after checking the caller is its device.
fn ratchet_key(
    caller: &Principal,
    user_id: &str,
    device_id: &str,
    conversation_id: &str,
) -> Result<RatchetKey, Status> {
    let user = parse_field("user_id", UserId::new(user_id))?;
    let device = parse_field("device_id", DeviceId::new(device_id))?;
    require_own_device(caller, &user, &device)?;
    let conversation = parse_field("conversation_id", ConversationId::new(conversation_id))?;
    Ok(RatchetKey {
        user,
        device,
        conversation,
    })
}

/// The largest version the database can hold (`BIGINT`): 2^63 - 1.
const MAX_VERSION: u64 = i64::MAX as u64;

/// An `expected_version` as the request gives it: a version past what the database can hold
/// was never handed out and never will be, so it is a bad argument, not a stale version.
fn parse_expected_version(expected: u64) -> Result<u64, Status> {
    if expected > MAX_VERSION {
        return Err(invalid(
            "expected_version",
            format!("{expected} is out of range: versions go up to {MAX_VERSION} (2^63 - 1)"),
        ));
    }
    Ok(expected)
}

fn sealing_context(key: &RatchetKey) -> KekContext {
    KekContext::RatchetState {
        user: key.user.clone(),
        device: key.device.clone(),
        conversation: key.conversation.clone(),
    }
}

/// What the Ratchet workflow refuses.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RatchetError {
    /// The device has no state stored for the conversation.
    #[error("conversation_id: no ratchet state stored")]
    NoState,
    /// The expected version is not the current one; nothing was written. The caller reads
    /// the current version in the message and in the [`CURRENT_VERSION_TRAILER`] metadata.
    #[error("expected_version: stale; the current version is {current} (0: no state); read it again and retry")]
    Stale {
        /// The state's current version, 0 if there is none.
        current: u64,
    },
    /// Sealing or opening a state under the service KEK failed: a state that does not open
    /// under its own row's context was moved or altered.
    #[error("ratchet state envelope: {0}")]
    Envelope(#[from] CryptoError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DomainError for RatchetError {
    fn class(&self) -> ErrorClass {
        match self {
            RatchetError::NoState => ErrorClass::NotFound,
            RatchetError::Stale { .. } => ErrorClass::Aborted,
            RatchetError::Envelope(_) => ErrorClass::Internal,
            RatchetError::Store(e) => e.class(),
        }
    }

    fn public_message(&self) -> String {
        match self {
            RatchetError::Store(e) => e.public_message(),
            other => other.to_string(),
        }
    }

    fn metadata(&self) -> Vec<(&'static str, MetadataValue<Ascii>)> {
        match self {
            RatchetError::Stale { current } => {
                vec![(CURRENT_VERSION_TRAILER, MetadataValue::from(*current))]
            }
            _ => Vec::new(),
        }
    }
}

into_status!(RatchetError);

/// The new version of a written state, or [`RatchetError::Stale`].
fn written(outcome: CasOutcome) -> Result<u64, RatchetError> {
    match outcome {
        CasOutcome::Written(version) => Ok(version),
        CasOutcome::Stale { current } => Err(RatchetError::Stale { current }),
    }
}

rpc_service! {
    /// The Ratchet gRPC service.
    RatchetService: Ratchet {
        fn get_ratchet_state(pb::GetRatchetStateRequest) -> pb::GetRatchetStateResponse, by [Device];
        fn put_ratchet_state(pb::PutRatchetStateRequest) -> pb::PutRatchetStateResponse, by [Device];
        fn delete_ratchet_state(pb::DeleteRatchetStateRequest) -> pb::DeleteRatchetStateResponse, by [Device];
    }
}

async fn get_ratchet_state(
    state: &AppState,
    caller: &Principal,
    req: pb::GetRatchetStateRequest,
) -> Result<pb::GetRatchetStateResponse, Status> {
    let key = ratchet_key(caller, &req.user_id, &req.device_id, &req.conversation_id)?;
    let stored = (state.store.conn().await?)
        .ratchet_state(&key)
        .await?
        .ok_or(RatchetError::NoState)?;
    // A state that does not open under its own row's context was moved or altered.
    let state = open_under_kek(&state.kek, &stored.envelope, &sealing_context(&key))
        .map_err(RatchetError::from)?;
    Ok(pb::GetRatchetStateResponse {
        state: state.to_vec(),
        version: stored.version,
        updated_at: stored.updated_at.unix_micros(),
    })
}

async fn put_ratchet_state(
    state: &AppState,
    caller: &Principal,
    req: pb::PutRatchetStateRequest,
) -> Result<pb::PutRatchetStateResponse, Status> {
    let key = ratchet_key(caller, &req.user_id, &req.device_id, &req.conversation_id)?;
    let expected_version = parse_expected_version(req.expected_version)?;
    let max = state.limits.max_ratchet_state_bytes;
    if req.state.is_empty() {
        return Err(invalid("state", "must not be empty"));
    }
    if req.state.len() > max {
        return Err(Status::resource_exhausted(format!(
            "state: {} bytes; at most {max}",
            req.state.len()
        )));
    }
    let envelope = seal_under_kek(&state.kek, &req.state, &sealing_context(&key))
        .map_err(RatchetError::from)?;
    let write = RatchetWrite {
        expected_version,
        kek_version: state.kek.version().0,
        envelope,
    };
    let version = state
        .store
        .transaction(async |tx| written(tx.put_ratchet_state(&key, &write).await?))
        .await?;
    Ok(pb::PutRatchetStateResponse { version })
}

async fn delete_ratchet_state(
    state: &AppState,
    caller: &Principal,
    req: pb::DeleteRatchetStateRequest,
) -> Result<pb::DeleteRatchetStateResponse, Status> {
    let key = ratchet_key(caller, &req.user_id, &req.device_id, &req.conversation_id)?;
    let expected = match parse_expected_version(req.expected_version)? {
        0 => None,
        v => Some(v),
    };
    state
        .store
        .transaction(
            async |tx| match tx.delete_ratchet_state(&key, expected).await {
                Err(StoreError::NotFound) => Err(RatchetError::NoState),
                outcome => written(outcome?),
            },
        )
        .await?;
    Ok(pb::DeleteRatchetStateResponse {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_write_is_aborted_with_the_current_version_in_message_and_trailer() {
        let status = Status::from(RatchetError::Stale { current: 7 });
        assert_eq!(status.code(), tonic::Code::Aborted);
        assert_eq!(
            status.message(),
            "expected_version: stale; the current version is 7 (0: no state); read it again and retry"
        );
        let trailer = status.metadata().get(CURRENT_VERSION_TRAILER).unwrap();
        assert_eq!(trailer.to_str().unwrap(), "7");
        let missing = Status::from(RatchetError::NoState);
        assert_eq!(missing.code(), tonic::Code::NotFound);
        assert!(missing.metadata().get(CURRENT_VERSION_TRAILER).is_none());
    }

    #[test]
    fn a_version_past_the_database_is_a_bad_argument_not_a_stale_one() {
        assert_eq!(parse_expected_version(0).unwrap(), 0);
        assert_eq!(parse_expected_version(MAX_VERSION).unwrap(), MAX_VERSION);
        for v in [MAX_VERSION + 1, u64::MAX] {
            let err = parse_expected_version(v).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with("expected_version: "), "{err:?}");
        }
    }
}
