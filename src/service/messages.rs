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
//! **Cursors** are opaque strings holding the position `(server time, message id)` of the
//! last message of a page; see [`crate::store::messages`] for why paging never skips or
//! repeats a message, even while others are stored.

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};

use super::{
    check_list_len, invalid, parse_field, require_acts_for, require_role, store_status, AppState,
};
use crate::auth::{principal, Principal, Role};
use crate::config::Limits;
use crate::crypto::ids::{DeviceId, Epoch, MessageId, SessionId, UserId};
use crate::crypto::message::{MESSAGE_NONCE_LEN, MESSAGE_TAG_LEN};
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::messages_server::Messages;
use crate::store::messages::{Author, Message, NewMessage, Position, PutOutcome, Reader, Writer};
use crate::store::{StoreError, Timestamp};

/// Page size of the listings when the caller gives none.
pub const DEFAULT_PAGE: u32 = 50;
/// Largest page of the listings.
pub const MAX_PAGE: u32 = 200;
/// Most message bytes (nonce, ciphertext, associated data) in one page: under the 4 MiB a
/// gRPC client accepts by default.
pub const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

/// The Messages gRPC service.
#[derive(Clone)]
pub struct MessagesService {
    state: AppState,
}

impl MessagesService {
    /// The service over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

/// The page size a request asks for: 0 means the default, more than the maximum is capped.
pub fn page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

const CURSOR_PREFIX: &str = "m1.";

/// The opaque cursor of a position: a version prefix, the time and the id, in hex.
pub fn format_cursor(p: Position) -> String {
    format!(
        "{CURSOR_PREFIX}{:016x}{}",
        p.created_at.unix_micros(),
        hex::encode(p.message_id.as_bytes())
    )
}

/// Parses a cursor this service returned; empty means the newest page.
pub fn parse_cursor(cursor: &str) -> Result<Option<Position>, Status> {
    if cursor.is_empty() {
        return Ok(None);
    }
    let bad = || invalid("cursor", "not a cursor this service returned");
    let body = cursor.strip_prefix(CURSOR_PREFIX).ok_or_else(bad)?;
    if body.len() != 48 || !body.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let (at, id) = body.split_at(16);
    let at = i64::from_str_radix(at, 16).map_err(|_| bad())?;
    let id = hex::decode(id).map_err(|_| bad())?;
    let message_id = MessageId::from_slice(&id).map_err(|_| bad())?;
    Ok(Some(Position {
        created_at: Timestamp::from_unix_micros(at),
        message_id,
    }))
}

/// Parses a message id: the text form of a UUIDv7, as the author chose it.
pub fn parse_message_id(field: &str, text: &str) -> Result<MessageId, Status> {
    let id = parse_field(field, MessageId::parse(text))?;
    if id.as_uuid().get_version_num() != 7 {
        return Err(invalid(field, "not a UUIDv7"));
    }
    Ok(id)
}

/// The device a listing reads as: named in the request, and one the caller acts for (a device
/// token only itself, an app server any).
fn parse_reader(caller: &Principal, user: &str, device: &str) -> Result<Reader, Status> {
    let user = parse_field("user_id", UserId::new(user))?;
    let device = parse_field("device_id", DeviceId::new(device))?;
    require_acts_for(caller, &user, Some(&device))?;
    Ok(Reader { user, device })
}

fn message_to_wire(m: Message) -> pb::EncryptedMessage {
    pb::EncryptedMessage {
        message_id: m.message_id.to_string(),
        session_id: m.session_id.to_string(),
        epoch: m.epoch.get(),
        author_user_id: m.author.user.to_string(),
        author_device_id: m.author.device.map(|d| d.to_string()).unwrap_or_default(),
        nonce: m.nonce,
        ciphertext: m.ciphertext,
        associated_data: m.associated_data,
        created_at: m.created_at.unix_micros(),
    }
}

/// A page on the wire and the cursor of the next one: empty when the page was not full. A
/// page also ends before its messages' bytes pass [`MAX_PAGE_BYTES`] (it always holds at
/// least one message), and then has a next cursor too.
fn page_to_wire(messages: Vec<Message>, limit: u32) -> (Vec<pb::EncryptedMessage>, String) {
    let mut full = u32::try_from(messages.len()).is_ok_and(|n| n >= limit);
    let mut bytes = 0;
    let mut page = Vec::with_capacity(messages.len());
    let mut last = None;
    for m in messages {
        bytes +=
            m.nonce.len() + m.ciphertext.len() + m.associated_data.as_ref().map_or(0, Vec::len);
        if bytes > MAX_PAGE_BYTES && !page.is_empty() {
            full = true;
            break;
        }
        last = Some(m.position());
        page.push(message_to_wire(m));
    }
    let next = match last {
        Some(p) if full => format_cursor(p),
        _ => String::new(),
    };
    (page, next)
}

/// Parses and checks one message of a batch, naming `messages[i].<field>` on failure.
fn parse_new_message(i: usize, m: pb::NewMessage, limits: &Limits) -> Result<NewMessage, Status> {
    let field = |name: &str| format!("messages[{i}].{name}");
    let message_id = parse_message_id(&field("message_id"), &m.message_id)?;
    let session_id = parse_field(&field("session_id"), SessionId::parse(&m.session_id))?;
    let epoch = parse_field(&field("epoch"), Epoch::new(m.epoch))?;
    if m.nonce.len() != MESSAGE_NONCE_LEN {
        return Err(invalid(
            &field("nonce"),
            format!("must be {MESSAGE_NONCE_LEN} bytes, got {}", m.nonce.len()),
        ));
    }
    if m.ciphertext.len() < MESSAGE_TAG_LEN {
        return Err(invalid(
            &field("ciphertext"),
            format!(
                "must hold at least the {MESSAGE_TAG_LEN}-byte tag, got {} bytes",
                m.ciphertext.len()
            ),
        ));
    }
    let size = m.ciphertext.len() + m.associated_data.as_ref().map_or(0, Vec::len);
    if size > limits.max_message_bytes {
        return Err(Status::resource_exhausted(format!(
            "{}: {size} bytes of ciphertext and associated data; at most {} per message",
            field("ciphertext"),
            limits.max_message_bytes
        )));
    }
    Ok(NewMessage {
        message_id,
        session_id,
        epoch,
        nonce: m.nonce,
        ciphertext: m.ciphertext,
        associated_data: m.associated_data,
    })
}

/// Parses a whole PutMessages request: the author, the caller's right to write as it, and
/// every message.
fn parse_put(
    caller: &Principal,
    req: pb::PutMessagesRequest,
    limits: &Limits,
) -> Result<(Author, Vec<NewMessage>), Status> {
    let user = parse_field("author_user_id", UserId::new(req.author_user_id))?;
    let device = match req.author_device_id.as_str() {
        "" if matches!(caller, Principal::Device { .. }) => {
            return Err(invalid(
                "author_device_id",
                "required: a device stores as itself",
            ))
        }
        "" => None,
        d => Some(parse_field("author_device_id", DeviceId::new(d))?),
    };
    require_acts_for(caller, &user, device.as_ref())?;
    check_list_len(
        "messages",
        req.messages.len(),
        limits.max_message_batch,
        true,
    )?;
    let mut batch = Vec::with_capacity(req.messages.len());
    let mut seen = BTreeMap::new();
    for (i, m) in req.messages.into_iter().enumerate() {
        let m = parse_new_message(i, m, limits)?;
        if let Some(first) = seen.insert(m.message_id, i) {
            return Err(invalid(
                &format!("messages[{i}].message_id"),
                format!("repeats messages[{first}].message_id"),
            ));
        }
        batch.push(m);
    }
    Ok((Author { user, device }, batch))
}

#[tonic::async_trait]
impl Messages for MessagesService {
    async fn put_messages(
        &self,
        request: Request<pb::PutMessagesRequest>,
    ) -> Result<Response<pb::PutMessagesResponse>, Status> {
        let caller = principal(&request)?.clone();
        require_role(&caller, &[Role::App, Role::Device])?;
        let (author, batch) = parse_put(&caller, request.into_inner(), &self.state.limits)?;
        let ids: Vec<(MessageId, SessionId, Epoch)> = batch
            .iter()
            .map(|m| (m.message_id, m.session_id, m.epoch))
            .collect();
        let writer = match caller {
            Principal::App { .. } => Writer::AppServer,
            _ => Writer::Device,
        };
        let outcome = self
            .state
            .store
            .put_messages(writer, author, batch)
            .await
            .map_err(store_status)?;
        let stored = match outcome {
            PutOutcome::Stored(stored) => stored,
            PutOutcome::Conflict(i) => {
                return Err(Status::already_exists(format!(
                    "messages[{i}].message_id: a message with this id is already stored with other bytes"
                )))
            }
            PutOutcome::NoKey(i) => {
                let (_, s, e) = ids[i];
                return Err(Status::permission_denied(format!(
                    "messages[{i}]: this device holds no session key for session {s} epoch {e}"
                )));
            }
            PutOutcome::NoSession(i) => {
                return Err(Status::not_found(format!(
                    "messages[{i}].session_id: no such session"
                )))
            }
            PutOutcome::EpochAhead { index, current } => {
                let (_, _, e) = ids[index];
                return Err(Status::failed_precondition(format!(
                    "messages[{index}].epoch: the session is at epoch {current}, not {e}"
                )));
            }
        };
        Ok(Response::new(pb::PutMessagesResponse {
            results: ids
                .into_iter()
                .zip(stored)
                .map(|((id, _, _), (at, created))| pb::PutMessageResult {
                    message_id: id.to_string(),
                    created_at: at.unix_micros(),
                    created,
                })
                .collect(),
        }))
    }

    async fn list_session_messages(
        &self,
        request: Request<pb::ListSessionMessagesRequest>,
    ) -> Result<Response<pb::ListSessionMessagesResponse>, Status> {
        let caller = principal(&request)?.clone();
        require_role(&caller, &[Role::App, Role::Device])?;
        let req = request.get_ref();
        let reader = parse_reader(&caller, &req.user_id, &req.device_id)?;
        let session_id = parse_field("session_id", SessionId::parse(&req.session_id))?;
        let before = parse_cursor(&req.cursor)?;
        let limit = page_size(req.page_size);
        let epochs = (self.state.store.conn().await.map_err(store_status)?)
            .readable_session_epochs(&reader.user, &reader.device, &session_id)
            .await
            .map_err(store_status)?;
        if epochs.is_empty() {
            return Err(Status::not_found(
                "session_id: no such session, or this device holds none of its keys",
            ));
        }
        let page = (self.state.store.conn().await.map_err(store_status)?)
            .readable_messages(&reader, Some(session_id), before, limit)
            .await
            .map_err(store_status)?;
        let (messages, next_cursor) = page_to_wire(page, limit);
        Ok(Response::new(pb::ListSessionMessagesResponse {
            messages,
            next_cursor,
        }))
    }

    async fn timeline(
        &self,
        request: Request<pb::TimelineRequest>,
    ) -> Result<Response<pb::TimelineResponse>, Status> {
        let caller = principal(&request)?.clone();
        require_role(&caller, &[Role::App, Role::Device])?;
        let req = request.get_ref();
        let reader = parse_reader(&caller, &req.user_id, &req.device_id)?;
        let before = parse_cursor(&req.cursor)?;
        let limit = page_size(req.page_size);
        let page = (self.state.store.conn().await.map_err(store_status)?)
            .readable_messages(&reader, None, before, limit)
            .await
            .map_err(store_status)?;
        let (messages, next_cursor) = page_to_wire(page, limit);
        Ok(Response::new(pb::TimelineResponse {
            messages,
            next_cursor,
        }))
    }

    async fn list_author_messages(
        &self,
        request: Request<pb::ListAuthorMessagesRequest>,
    ) -> Result<Response<pb::ListAuthorMessagesResponse>, Status> {
        let caller = principal(&request)?.clone();
        require_role(&caller, &[Role::App, Role::Device])?;
        let req = request.get_ref();
        let reader = parse_reader(&caller, &req.user_id, &req.device_id)?;
        let author = parse_field("author_user_id", UserId::new(req.author_user_id.clone()))?;
        let before = parse_cursor(&req.cursor)?;
        let limit = page_size(req.page_size);
        let page = (self.state.store.conn().await.map_err(store_status)?)
            .author_messages(&reader, &author, before, limit)
            .await
            .map_err(store_status)?;
        let (messages, next_cursor) = page_to_wire(page, limit);
        Ok(Response::new(pb::ListAuthorMessagesResponse {
            messages,
            next_cursor,
        }))
    }

    async fn delete_message(
        &self,
        request: Request<pb::DeleteMessageRequest>,
    ) -> Result<Response<pb::DeleteMessageResponse>, Status> {
        let caller = principal(&request)?.clone();
        require_role(&caller, &[Role::App, Role::Device])?;
        let message_id = parse_message_id("message_id", &request.get_ref().message_id)?;
        let deleted_at = self
            .state
            .store
            .transaction(async move |tx| {
                let not_found = || Status::not_found("message_id: no such message");
                let Some(message) = tx.message(&message_id).await? else {
                    return Ok(Err(not_found()));
                };
                let session = tx.session(&message.session_id).await?;
                if session.is_none_or(|s| s.deleted_at.is_some()) {
                    return Ok(Err(not_found()));
                }
                if let Principal::Device { user, device, .. } = &caller {
                    if user != &message.author.user {
                        // Someone else's message: say so only to a device that can read it.
                        let readable = tx
                            .readable_epochs(user, device, &[(message.session_id, message.epoch)])
                            .await?;
                        return Ok(Err(if readable.is_empty() {
                            not_found()
                        } else {
                            Status::permission_denied(
                                "message_id: only its author's devices or an app server may delete it",
                            )
                        }));
                    }
                }
                Ok(tx.delete_message(&message_id).await?.ok_or_else(not_found))
            })
            .await
            .map_err(|e| match e {
                StoreError::NotFound => Status::not_found("message_id: no such message"),
                other => store_status(other),
            })??;
        Ok(Response::new(pb::DeleteMessageResponse {
            deleted_at: deleted_at.unix_micros(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let p = Position {
            created_at: Timestamp::from_unix_micros(1_700_000_000_123_456),
            message_id: MessageId::generate(),
        };
        assert_eq!(parse_cursor(&format_cursor(p)).unwrap(), Some(p));
        assert_eq!(parse_cursor("").unwrap(), None);
        let good = format_cursor(p);
        for bad in [
            "m1.".to_string(),
            "sk1.10".to_string(),
            good.replace("m1.", "m2."),
            format!("{good}0"),
            good[..good.len() - 1].to_string(),
            format!("m1.{}", "g".repeat(48)),
            format!("m1.{:016x}{}", 5, "0".repeat(32)), // the nil id
        ] {
            let err = parse_cursor(&bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(err.message().starts_with("cursor:"), "{bad}");
        }
    }

    fn stored(len: usize, at: i64) -> Message {
        Message {
            message_id: MessageId::generate(),
            session_id: SessionId::generate(),
            epoch: Epoch::FIRST,
            author: Author {
                user: UserId::new("alice").unwrap(),
                device: None,
            },
            nonce: vec![0; MESSAGE_NONCE_LEN],
            ciphertext: vec![0; len],
            associated_data: None,
            created_at: Timestamp::from_unix_micros(at),
            deleted_at: None,
        }
    }

    #[test]
    fn pages_stop_before_their_byte_budget_with_a_cursor_to_the_rest() {
        let big = MAX_PAGE_BYTES / 3;
        let messages: Vec<Message> = (0..5).map(|i| stored(big, 100 - i)).collect();
        let (page, next) = page_to_wire(messages.clone(), 50);
        assert_eq!(page.len(), 2, "a third message would pass the budget");
        assert_eq!(next, format_cursor(messages[1].position()));
        // One message larger than the budget still makes a page of one.
        let (page, next) = page_to_wire(vec![stored(MAX_PAGE_BYTES + 1, 1)], 50);
        assert_eq!(page.len(), 1);
        assert!(
            next.is_empty(),
            "fewer than the page size and nothing cut: the end"
        );
        // Small messages: the page size decides.
        let small: Vec<Message> = (0..3).map(|i| stored(32, 10 - i)).collect();
        assert_eq!(
            page_to_wire(small.clone(), 3).1,
            format_cursor(small[2].position())
        );
        assert!(page_to_wire(small, 4).1.is_empty());
    }

    #[test]
    fn page_sizes_are_bounded() {
        assert_eq!(page_size(0), DEFAULT_PAGE);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(u32::MAX), MAX_PAGE);
    }

    fn wire_message(len: usize, ad: Option<usize>) -> pb::NewMessage {
        pb::NewMessage {
            message_id: MessageId::generate().to_string(),
            session_id: SessionId::generate().to_string(),
            epoch: 1,
            nonce: vec![0; MESSAGE_NONCE_LEN],
            ciphertext: vec![0; len],
            associated_data: ad.map(|n| vec![0; n]),
        }
    }

    #[test]
    fn message_size_limit_counts_ciphertext_and_associated_data() {
        let limits = Limits {
            max_message_bytes: 100,
            ..Limits::DEFAULT
        };
        assert!(parse_new_message(0, wire_message(100, None), &limits).is_ok());
        assert!(parse_new_message(0, wire_message(60, Some(40)), &limits).is_ok());
        for m in [wire_message(101, None), wire_message(60, Some(41))] {
            let err = parse_new_message(3, m, &limits).unwrap_err();
            assert_eq!(err.code(), tonic::Code::ResourceExhausted);
            assert!(
                err.message().starts_with("messages[3].ciphertext"),
                "{err:?}"
            );
        }
    }
}
