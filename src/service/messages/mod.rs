//! The Messages service: authors store sealed messages in batches; devices (or app servers
//! reading as a device) list the messages they hold keys for; authors and app servers delete.
//!
//! **Access follows keys.** A device stores only into session epochs it holds a live session
//! key for, and reads exactly the messages of those epochs ([`crate::store::messages`]). An
//! app server acts for any user: it stores on a user's behalf into any epoch, up to the
//! current one, of a live session, and reads as whichever device it names.
//!
//! **Idempotent batches.** Message ids are UUIDv7s chosen by the author (the per-message key
//! binds them, so they exist before the message is sealed). A batch is one transaction: a
//! retried id with the same bytes is found, not stored twice; with other bytes the whole batch
//! is ALREADY_EXISTS and nothing is written.
//!
//! **Cursors** are opaque strings of the one codec ([`crate::service::cursor`]) holding the
//! position `(server time, message id)` of the last message of a page (the `m1.` cursors of
//! before still parse); see [`crate::store::messages`] for why paging never skips or repeats
//! a message, even while others are stored.
//!
//! Requests are parsed, and pages written back, in `wire.rs`; the workflows and what they
//! refuse (`MessagesError`, mapped to a status in one place) are here.

mod wire;

use tonic::Status;

use super::cursor;
use super::error::{into_status, DomainError, ErrorClass};
use super::{parse_field, AppState};
use crate::auth::Principal;
use crate::crypto::ids::{Epoch, MessageId, SessionId, UserId};
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::messages_server::Messages;
use crate::store::messages::{Position, PutOutcome, Writer};
use crate::store::{StoreError, Timestamp, Tx};
use wire::{page_limit, page_to_wire, parse_put, parse_reader};

pub(crate) use wire::parse_message_id;

/// What the Messages workflows refuse.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MessagesError {
    /// A message of the batch has an id already stored with other bytes.
    #[error(
        "messages[{index}].message_id: a message with this id is already stored with other bytes"
    )]
    Conflict {
        /// The message's index in the batch.
        index: usize,
    },
    /// A device writer holds no live session key for the epoch of a message of the batch.
    #[error(
        "messages[{index}]: this device holds no session key for session {session} epoch {epoch}"
    )]
    NoKey {
        /// The message's index in the batch.
        index: usize,
        /// Its session.
        session: SessionId,
        /// Its epoch.
        epoch: Epoch,
    },
    /// An app server wrote into a session that does not exist or is deleted.
    #[error("messages[{index}].session_id: no such session")]
    NoSession {
        /// The message's index in the batch.
        index: usize,
    },
    /// An app server wrote into an epoch its session has not reached.
    #[error("messages[{index}].epoch: the session is at epoch {current}, not {epoch}")]
    EpochAhead {
        /// The message's index in the batch.
        index: usize,
        /// The session's current epoch.
        current: Epoch,
        /// The message's epoch.
        epoch: Epoch,
    },
    /// ListSessionMessages of a session the reading device holds no live key of (or that
    /// does not exist: the two are not told apart).
    #[error("session_id: no such session, or this device holds none of its keys")]
    SessionNotReadable,
    /// DeleteMessage of a message that does not exist, is in a deleted session, or that the
    /// calling device may not read.
    #[error("message_id: no such message")]
    NoSuchMessage,
    /// DeleteMessage by a device of another user, of a message it can read.
    #[error("message_id: only its author's devices or an app server may delete it")]
    NotAuthor,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DomainError for MessagesError {
    fn class(&self) -> ErrorClass {
        match self {
            MessagesError::Conflict { .. } => ErrorClass::AlreadyExists,
            MessagesError::NoKey { .. } | MessagesError::NotAuthor => ErrorClass::PermissionDenied,
            MessagesError::NoSession { .. }
            | MessagesError::SessionNotReadable
            | MessagesError::NoSuchMessage => ErrorClass::NotFound,
            MessagesError::EpochAhead { .. } => ErrorClass::FailedPrecondition,
            MessagesError::Store(e) => e.class(),
        }
    }

    fn public_message(&self) -> String {
        match self {
            MessagesError::Store(e) => e.public_message(),
            other => other.to_string(),
        }
    }
}

into_status!(MessagesError);

/// What a PutMessages batch became: per message, in order, its server time and whether this
/// call stored it; or the refusal, naming the message by its index in `batch`.
fn stored_or_refused(
    outcome: PutOutcome,
    batch: &[(MessageId, SessionId, Epoch)],
) -> Result<Vec<(Timestamp, bool)>, MessagesError> {
    match outcome {
        PutOutcome::Stored(stored) => Ok(stored),
        PutOutcome::Conflict(index) => Err(MessagesError::Conflict { index }),
        PutOutcome::NoKey(index) => {
            let (_, session, epoch) = batch[index];
            Err(MessagesError::NoKey {
                index,
                session,
                epoch,
            })
        }
        PutOutcome::NoSession(index) => Err(MessagesError::NoSession { index }),
        PutOutcome::EpochAhead { index, current } => Err(MessagesError::EpochAhead {
            index,
            current,
            epoch: batch[index].2,
        }),
    }
}

/// Soft-deletes a message for `caller`: its author's devices and app servers may; another
/// user's device that can read it is refused, and one that cannot is told there is no such
/// message, as it is for a message of a deleted session.
async fn delete_as(
    tx: &mut Tx,
    caller: &Principal,
    id: &MessageId,
) -> Result<Timestamp, MessagesError> {
    let message = tx.message(id).await?.ok_or(MessagesError::NoSuchMessage)?;
    let session = tx.session(&message.session_id).await?;
    if session.is_none_or(|s| s.deleted_at.is_some()) {
        return Err(MessagesError::NoSuchMessage);
    }
    if let Principal::Device { user, device, .. } = caller {
        if user != &message.author.user {
            // Someone else's message: say so only to a device that can read it.
            let readable = tx
                .readable_epochs(user, device, &[(message.session_id, message.epoch)])
                .await?;
            return Err(if readable.is_empty() {
                MessagesError::NoSuchMessage
            } else {
                MessagesError::NotAuthor
            });
        }
    }
    tx.delete_message(id)
        .await?
        .ok_or(MessagesError::NoSuchMessage)
}

rpc_service! {
    /// The Messages gRPC service.
    MessagesService: Messages {
        fn put_messages(pb::PutMessagesRequest) -> pb::PutMessagesResponse, by [App, Device];
        fn list_session_messages(pb::ListSessionMessagesRequest) -> pb::ListSessionMessagesResponse, by [App, Device];
        fn timeline(pb::TimelineRequest) -> pb::TimelineResponse, by [App, Device];
        fn list_author_messages(pb::ListAuthorMessagesRequest) -> pb::ListAuthorMessagesResponse, by [App, Device];
        fn delete_message(pb::DeleteMessageRequest) -> pb::DeleteMessageResponse, by [App, Device];
    }
}

async fn put_messages(
    state: &AppState,
    caller: &Principal,
    req: pb::PutMessagesRequest,
) -> Result<pb::PutMessagesResponse, Status> {
    let (author, batch) = parse_put(caller, req, &state.limits)?;
    let ids: Vec<(MessageId, SessionId, Epoch)> = batch
        .iter()
        .map(|m| (m.message_id, m.session_id, m.epoch))
        .collect();
    let writer = match caller {
        Principal::App { .. } => Writer::AppServer,
        _ => Writer::Device,
    };
    let outcome = state.store.put_messages(writer, author, batch).await?;
    let stored = stored_or_refused(outcome, &ids)?;
    Ok(pb::PutMessagesResponse {
        results: ids
            .into_iter()
            .zip(stored)
            .map(|((id, _, _), (at, created))| pb::PutMessageResult {
                message_id: id.to_string(),
                created_at: at.unix_micros(),
                created,
            })
            .collect(),
    })
}

async fn list_session_messages(
    state: &AppState,
    caller: &Principal,
    req: pb::ListSessionMessagesRequest,
) -> Result<pb::ListSessionMessagesResponse, Status> {
    let reader = parse_reader(caller, &req.user_id, &req.device_id)?;
    let session_id = parse_field("session_id", SessionId::parse(&req.session_id))?;
    let before = cursor::parse::<Position>("cursor", &req.cursor)?;
    let limit = page_limit(req.page_size);
    let mut conn = state.store.conn().await?;
    let epochs = conn
        .readable_session_epochs(&reader.user, &reader.device, &session_id)
        .await?;
    if epochs.is_empty() {
        return Err(MessagesError::SessionNotReadable.into());
    }
    let page = conn
        .readable_messages(&reader, Some(session_id), before, limit)
        .await?;
    let (messages, next_cursor) = page_to_wire(page);
    Ok(pb::ListSessionMessagesResponse {
        messages,
        next_cursor,
    })
}

async fn timeline(
    state: &AppState,
    caller: &Principal,
    req: pb::TimelineRequest,
) -> Result<pb::TimelineResponse, Status> {
    let reader = parse_reader(caller, &req.user_id, &req.device_id)?;
    let before = cursor::parse::<Position>("cursor", &req.cursor)?;
    let limit = page_limit(req.page_size);
    let page = (state.store.conn().await?)
        .readable_messages(&reader, None, before, limit)
        .await?;
    let (messages, next_cursor) = page_to_wire(page);
    Ok(pb::TimelineResponse {
        messages,
        next_cursor,
    })
}

async fn list_author_messages(
    state: &AppState,
    caller: &Principal,
    req: pb::ListAuthorMessagesRequest,
) -> Result<pb::ListAuthorMessagesResponse, Status> {
    let reader = parse_reader(caller, &req.user_id, &req.device_id)?;
    let author = parse_field("author_user_id", UserId::new(req.author_user_id.clone()))?;
    let before = cursor::parse::<Position>("cursor", &req.cursor)?;
    let limit = page_limit(req.page_size);
    let page = (state.store.conn().await?)
        .author_messages(&reader, &author, before, limit)
        .await?;
    let (messages, next_cursor) = page_to_wire(page);
    Ok(pb::ListAuthorMessagesResponse {
        messages,
        next_cursor,
    })
}

async fn delete_message(
    state: &AppState,
    caller: &Principal,
    req: pb::DeleteMessageRequest,
) -> Result<pb::DeleteMessageResponse, Status> {
    let message_id = parse_message_id("message_id", &req.message_id)?;
    let deleted_at = state
        .store
        .transaction(async move |tx| delete_as(tx, caller, &message_id).await)
        .await?;
    Ok(pb::DeleteMessageResponse {
        deleted_at: deleted_at.unix_micros(),
    })
}
