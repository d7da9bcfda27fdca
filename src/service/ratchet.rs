//! The Ratchet service: a device backs up its Double Ratchet state per conversation.
//!
//! The service seals each state under the KEK bound to the row's identity
//! ([`KekContext::RatchetState`]: user, device, conversation), so a sealed state copied to
//! another row fails to open. Writes are compare-and-swap on the state's version, decided by
//! the database ([`crate::store::ratchet_states`]); a stale write is ABORTED, names the current
//! version in its message and in the [`CURRENT_VERSION_TRAILER`] metadata, and changes nothing.
//! Only the owning device may call; app servers, staff and admins are refused, and another
//! device is refused even for its own user.

use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use super::{crypto_internal, invalid, parse_field, require_own_device, store_status, AppState};
use crate::auth::{principal, Principal};
use crate::crypto::envelope::{open_under_kek, seal_under_kek, KekContext};
use crate::crypto::ids::{ConversationId, DeviceId, UserId};
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::ratchet_server::Ratchet;
use crate::store::ratchet_states::{CasOutcome, RatchetKey, RatchetWrite};

/// The metadata key of an ABORTED write's current version (decimal text).
pub const CURRENT_VERSION_TRAILER: &str = "keyhold-current-version";

/// The Ratchet gRPC service.
#[derive(Clone)]
pub struct RatchetService {
    state: AppState,
}

impl RatchetService {
    /// The service over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

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

fn sealing_context(key: &RatchetKey) -> KekContext {
    KekContext::RatchetState {
        user: key.user.clone(),
        device: key.device.clone(),
        conversation: key.conversation.clone(),
    }
}

/// ABORTED for a stale expected version, with the current one in the message and metadata.
fn stale(field: &str, current: u64) -> Status {
    let mut status = Status::aborted(format!(
        "{field}: stale; the current version is {current} (0: no state); read it again and retry"
    ));
    status
        .metadata_mut()
        .insert(CURRENT_VERSION_TRAILER, MetadataValue::from(current));
    status
}

#[tonic::async_trait]
impl Ratchet for RatchetService {
    async fn get_ratchet_state(
        &self,
        request: Request<pb::GetRatchetStateRequest>,
    ) -> Result<Response<pb::GetRatchetStateResponse>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.get_ref();
        let key = ratchet_key(&caller, &req.user_id, &req.device_id, &req.conversation_id)?;
        let stored = self
            .state
            .store
            .ratchet_state(&key)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found("conversation_id: no ratchet state stored"))?;
        // A state that does not open under its own row's context was moved or altered.
        let state = open_under_kek(&self.state.kek, &stored.envelope, &sealing_context(&key))
            .map_err(crypto_internal)?;
        Ok(Response::new(pb::GetRatchetStateResponse {
            state: state.to_vec(),
            version: stored.version,
            updated_at: stored.updated_at.unix_micros(),
        }))
    }

    async fn put_ratchet_state(
        &self,
        request: Request<pb::PutRatchetStateRequest>,
    ) -> Result<Response<pb::PutRatchetStateResponse>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.get_ref();
        let key = ratchet_key(&caller, &req.user_id, &req.device_id, &req.conversation_id)?;
        let max = self.state.limits.max_ratchet_state_bytes;
        if req.state.is_empty() {
            return Err(invalid("state", "must not be empty"));
        }
        if req.state.len() > max {
            return Err(Status::resource_exhausted(format!(
                "state: {} bytes; at most {max}",
                req.state.len()
            )));
        }
        let envelope = seal_under_kek(&self.state.kek, &req.state, &sealing_context(&key))
            .map_err(crypto_internal)?;
        let outcome = self
            .state
            .store
            .put_ratchet_state(
                key,
                RatchetWrite {
                    expected_version: req.expected_version,
                    kek_version: self.state.kek.version().0,
                    envelope,
                },
            )
            .await
            .map_err(store_status)?;
        match outcome {
            CasOutcome::Written(version) => {
                Ok(Response::new(pb::PutRatchetStateResponse { version }))
            }
            CasOutcome::Stale { current } => Err(stale("expected_version", current)),
        }
    }

    async fn delete_ratchet_state(
        &self,
        request: Request<pb::DeleteRatchetStateRequest>,
    ) -> Result<Response<pb::DeleteRatchetStateResponse>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.get_ref();
        let key = ratchet_key(&caller, &req.user_id, &req.device_id, &req.conversation_id)?;
        let expected = match req.expected_version {
            0 => None,
            v => Some(v),
        };
        let outcome = self
            .state
            .store
            .delete_ratchet_state(key, expected)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::NotFound => {
                    Status::not_found("conversation_id: no ratchet state stored")
                }
                other => store_status(other),
            })?;
        match outcome {
            CasOutcome::Written(_) => Ok(Response::new(pb::DeleteRatchetStateResponse {})),
            CasOutcome::Stale { current } => Err(stale("expected_version", current)),
        }
    }
}
