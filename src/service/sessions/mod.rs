//! The Sessions service: sessions, their members and epochs, and the wrapped DEKs of each
//! recipient device.
//!
//! **Who gets which key.** Recipients are named by user; each user's *current* device keys at
//! the time of the call get the epoch's DEK (the author's user is always a recipient). A
//! device that publishes its first key after the session was created, or after it was added,
//! gets nothing of the session until it is added (AddRecipients with its user) or a later
//! epoch starts (RotateSession, RemoveRecipients): the service never wraps a DEK for a key the
//! session's members did not see. A revoked device gets nothing new: a new epoch skips it and
//! ends its membership. A removed device keeps the keys of the epochs it had, and gets none of
//! a later one. A current key that cannot be wrapped to (stored before the key parser refused
//! it) refuses the call FAILED_PRECONDITION, naming the device, and nothing is written.
//!
//! **Modes.** SERVICE_WRAPPED (app role): the service draws each DEK, wraps it per device,
//! seals it to the staff escrow key and keeps a copy under the KEK to wrap for devices added
//! later; the plaintext DEK is returned only when asked and zeroized once sent.
//! CLIENT_WRAPPED (the author device): the device uploads the wraps and the escrow wrap signed
//! with its identity key ([`crate::crypto::sign::ClientWrappedKeySet`]); the service checks
//! the signature and that the wraps cover exactly the expected devices' current keys.
//!
//! **Retries.** Every change takes an idempotency key ([`crate::service::idempotency`]): the
//! workflow's transaction records the answer, and a retry with the same key replays it. A
//! SERVICE_WRAPPED creation's plaintext DEK is never recorded; its replay opens the DEK again
//! from the session's service copy ([`workflow::first_epoch_dek`]).
//!
//! **Layout.** This file is the tonic impl only: parse ([`wire`]), run the workflow
//! ([`workflow`], over the store, returning [`error::SessionError`]), map back ([`wire`]). The
//! client-wrapped key-set checks are pure functions in [`key_set`]; wrapping on the blocking
//! pool, with the escrow and KEK copies, is [`wrapping`].

mod error;
mod key_set;
mod wire;
mod workflow;
mod wrapping;

use tonic::Status;

use super::AppState;
use crate::auth::Principal;
use crate::crypto::ids::{DeviceId, UserId};
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::sessions_server::Sessions;
use crate::service::cursor;
use crate::service::idempotency::{Answer, Keyed};
use wire::{CreateMode, RecipientsSpec, SyncPosition};
use workflow::SessionSpec;

/// Most session keys one call produces (devices of all recipients together).
pub(crate) const MAX_KEYS_PER_CALL: usize = 2000;

/// The device a key read is for: only the device the keys are wrapped for reads them.
fn reading_device<'a>(
    caller: &'a Principal,
    refusal: &'static str,
) -> Result<(&'a UserId, &'a DeviceId), Status> {
    match caller {
        Principal::Device { user, device, .. } => Ok((user, device)),
        _ => Err(Status::permission_denied(refusal)),
    }
}

rpc_service! {
    /// The Sessions gRPC service.
    SessionsService: Sessions {
        fn create_session(pb::CreateSessionRequest) -> pb::CreateSessionResponse, by [App, Device];
        fn add_recipients(pb::AddRecipientsRequest) -> pb::AddRecipientsResponse, by [App, Device];
        fn remove_recipients(pb::RemoveRecipientsRequest) -> pb::RemoveRecipientsResponse, by [App, Device];
        fn rotate_session(pb::RotateSessionRequest) -> pb::RotateSessionResponse, by [App, Device];
        fn get_session_keys(pb::GetSessionKeysRequest) -> pb::GetSessionKeysResponse, by [Device];
        fn sync_session_keys(pb::SyncSessionKeysRequest) -> pb::SyncSessionKeysResponse, by [Device];
        fn delete_session(pb::DeleteSessionRequest) -> pb::DeleteSessionResponse, by [App, Device];
    }
}

async fn create_session(
    state: &AppState,
    caller: &Principal,
    mut req: pb::CreateSessionRequest,
) -> Result<pb::CreateSessionResponse, Status> {
    let (suite, author, recipients) = wire::parse_create_head(&req, state.max_list_len)?;
    let return_plaintext_dek = req.return_plaintext_dek;
    let keyed = Keyed::take(state, caller, &mut req)?;
    let answer = keyed
        .replay_or_run(state, |keyed| async move {
            let listed = match recipients {
                RecipientsSpec::Listed(users) => users,
                RecipientsSpec::TrustedUsersOfAuthor => {
                    // Only someone acting for the author may learn (and use) whom it trusts.
                    super::require_acts_for(caller, &author, None)?;
                    super::trust::trusted_recipients(state, &author).await?
                }
            };
            let mode = wire::parse_create_mode(caller, &author, &req)?;
            let users = wire::with_author_first(&author, listed);
            let spec = SessionSpec {
                author,
                users,
                suite,
            };
            let recorder = keyed.recorder(wire::created_to_wire);
            let created = match mode {
                CreateMode::ServiceWrapped {
                    return_plaintext_dek,
                } => {
                    workflow::create_service_wrapped(state, spec, return_plaintext_dek, &recorder)
                        .await?
                }
                CreateMode::ClientWrapped {
                    session_id,
                    author_device,
                    key_set,
                } => {
                    workflow::create_client_wrapped(
                        state,
                        spec,
                        session_id,
                        author_device,
                        key_set,
                        &recorder,
                    )
                    .await?
                }
            };
            let mut response = wire::created_to_wire(&created);
            // The response type's Debug redacts this field; the copy in `created` is zeroized
            // on drop, the encoder's copy is freed with the response buffer.
            response.plaintext_dek = created.plaintext_dek.as_ref().map(|p| p.to_vec());
            Ok(response)
        })
        .await?;
    match answer {
        // The record keeps no DEK: open it again from the session's service copy.
        Answer::Replayed(mut response) if return_plaintext_dek => {
            let dek = workflow::first_epoch_dek(state, &response.session_id).await?;
            response.plaintext_dek = Some(dek.expose_secret().to_vec());
            Ok(response)
        }
        answer => Ok(answer.into_response()),
    }
}

async fn add_recipients(
    state: &AppState,
    caller: &Principal,
    mut req: pb::AddRecipientsRequest,
) -> Result<pb::AddRecipientsResponse, Status> {
    let max = state.max_list_len;
    let change = wire::parse_change(&req.session_id, Some(&req.user_ids), &req.key_set, max)?;
    let keyed = Keyed::take(state, caller, &mut req)?;
    keyed
        .replay_or_run(state, |keyed| async move {
            let recorder = keyed.recorder(wire::added_to_wire);
            let stored = workflow::add_recipients(state, caller, change, &recorder).await?;
            Ok(wire::added_to_wire(&stored))
        })
        .await
        .map(Answer::into_response)
}

async fn remove_recipients(
    state: &AppState,
    caller: &Principal,
    mut req: pb::RemoveRecipientsRequest,
) -> Result<pb::RemoveRecipientsResponse, Status> {
    let max = state.max_list_len;
    let change = wire::parse_change(&req.session_id, Some(&req.user_ids), &req.key_set, max)?;
    let keyed = Keyed::take(state, caller, &mut req)?;
    keyed
        .replay_or_run(state, |keyed| async move {
            let recorder = keyed.recorder(wire::removed_to_wire);
            let stored = workflow::new_epoch(state, caller, change, &recorder).await?;
            Ok(wire::removed_to_wire(&stored))
        })
        .await
        .map(Answer::into_response)
}

async fn rotate_session(
    state: &AppState,
    caller: &Principal,
    mut req: pb::RotateSessionRequest,
) -> Result<pb::RotateSessionResponse, Status> {
    let change = wire::parse_change(&req.session_id, None, &req.key_set, 0)?;
    let keyed = Keyed::take(state, caller, &mut req)?;
    keyed
        .replay_or_run(state, |keyed| async move {
            let recorder = keyed.recorder(wire::rotated_to_wire);
            let stored = workflow::new_epoch(state, caller, change, &recorder).await?;
            Ok(wire::rotated_to_wire(&stored))
        })
        .await
        .map(Answer::into_response)
}

async fn get_session_keys(
    state: &AppState,
    caller: &Principal,
    req: pb::GetSessionKeysRequest,
) -> Result<pb::GetSessionKeysResponse, Status> {
    let (user, device) = reading_device(
        caller,
        "session keys are fetched by the device they are wrapped for",
    )?;
    let session_id = wire::parse_session_id(&req.session_id)?;
    let epoch = wire::parse_optional_epoch(req.epoch)?;
    let keys = workflow::device_session_keys(state, user, device, session_id, epoch).await?;
    Ok(pb::GetSessionKeysResponse {
        session_keys: keys.into_iter().map(wire::record_to_wire).collect(),
    })
}

async fn sync_session_keys(
    state: &AppState,
    caller: &Principal,
    req: pb::SyncSessionKeysRequest,
) -> Result<pb::SyncSessionKeysResponse, Status> {
    let (user, device) = reading_device(
        caller,
        "session keys are synced by the device they are wrapped for",
    )?;
    let SyncPosition(after) = wire::parse_sync_cursor(&req.cursor)?;
    let page = wire::sync_page(req.page_size);
    let (keys, next) = workflow::sync_session_keys(state, user, device, after, page).await?;
    Ok(pb::SyncSessionKeysResponse {
        session_keys: keys.into_iter().map(wire::record_to_wire).collect(),
        next_cursor: cursor::format(&SyncPosition(next)),
    })
}

async fn delete_session(
    state: &AppState,
    caller: &Principal,
    req: pb::DeleteSessionRequest,
) -> Result<pb::DeleteSessionResponse, Status> {
    let session_id = wire::parse_session_id(&req.session_id)?;
    let deleted_at = workflow::delete_session(state, caller, session_id).await?;
    Ok(pb::DeleteSessionResponse {
        deleted_at: deleted_at.unix_micros(),
    })
}
