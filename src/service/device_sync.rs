//! The DeviceSync service: a device sends sealed key packages to the other devices of its own
//! user, and each device reads its inbox (a page at a time, or as a stream) and acknowledges
//! what it kept.
//!
//! The service never opens a payload; it checks who may send to whom: the recipient is a
//! device of the caller's own user, not the caller, and both have a current, non-revoked key,
//! the payload naming the recipient's current key. Those checks run in the transaction that
//! writes ([`crate::store::key_packages`]), so a refused send writes nothing.
//!
//! `WatchKeyPackages` reads the inbox, then waits for a device event
//! ([`crate::store::events`]): a PostgreSQL notification sent by whichever replica stored the
//! package, or on SQLite the poll of the database file. It never relies on this process having
//! seen the send.

use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::cursor::{self, Cursor, CursorKind};
use super::error::{into_status, DomainError, ErrorClass};
use super::idempotency::{Answer, Keyed};
use super::watch::{next_change, StreamSender};
use super::{check_list_len, invalid, parse_field, AppState};
use crate::auth::Principal;
use crate::crypto::ids::{DeviceId, KeyId, UserId};
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::device_sync_server::DeviceSync;
use crate::store::events::{DeviceWatch, EventKind};
use crate::store::key_packages::{KeyPackage, NewKeyPackage, SendError, SendRefusal};
use crate::store::StoreError;

/// Page size of FetchKeyPackages when the caller gives none, and of the watch's reads.
pub(crate) const DEFAULT_PAGE: u32 = 100;
/// Largest FetchKeyPackages page.
pub(crate) const MAX_PAGE: u32 = 500;

/// The calling device, or PERMISSION_DENIED: only devices have an inbox.
fn calling_device(caller: &Principal) -> Result<(&UserId, &DeviceId), Status> {
    match caller {
        Principal::Device { user, device, .. } => Ok((user, device)),
        other => Err(Status::permission_denied(format!(
            "role {} may not call this: key packages are sent and read by devices",
            other.role().name()
        ))),
    }
}

/// What the DeviceSync workflow refuses.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeviceSyncError {
    /// A send by `user`'s device `sender` was refused before anything was written.
    #[error("{}", refusal_message(refusal, user, sender))]
    Refused {
        /// Why.
        refusal: SendRefusal,
        /// The sender's user.
        user: UserId,
        /// The sending device.
        sender: DeviceId,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DeviceSyncError {
    /// How a send by `user`'s device `sender` failed.
    fn of_send(e: SendError, user: &UserId, sender: &DeviceId) -> Self {
        match e {
            SendError::Refused(refusal) => DeviceSyncError::Refused {
                refusal,
                user: user.clone(),
                sender: sender.clone(),
            },
            SendError::Store(e) => DeviceSyncError::Store(e),
        }
    }
}

/// What the caller reads of a refused send: the field to fix, and how.
fn refusal_message(refusal: &SendRefusal, user: &UserId, sender: &DeviceId) -> String {
    match refusal {
        SendRefusal::SenderNotCurrent => {
            format!("the sending device {user}/{sender} has no current key: publish one first")
        }
        SendRefusal::RecipientNotCurrent { index } => format!(
            "packages[{index}].recipient_device_id: the device has no current (non-revoked) key"
        ),
        SendRefusal::RecipientKeyChanged { index, current } => format!(
            "packages[{index}].recipient_key_id: the device's current key is {current}; fetch the keys again"
        ),
        SendRefusal::InboxFull {
            device,
            held,
            adding,
            max,
        } => format!(
            "packages: the inbox of device {user}/{device} holds {held} packages; {adding} more would pass the bound of {max}"
        ),
    }
}

impl DomainError for DeviceSyncError {
    fn class(&self) -> ErrorClass {
        match self {
            DeviceSyncError::Refused {
                refusal: SendRefusal::InboxFull { .. },
                ..
            } => ErrorClass::ResourceExhausted,
            DeviceSyncError::Refused { .. } => ErrorClass::FailedPrecondition,
            DeviceSyncError::Store(e) => e.class(),
        }
    }

    fn public_message(&self) -> String {
        match self {
            DeviceSyncError::Store(e) => e.public_message(),
            other => other.to_string(),
        }
    }
}

into_status!(DeviceSyncError);

/// A position in a device's inbox: the last delivered package id (0 before the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InboxPosition(i64);

/// The inbox cursor. Devices persist it, so the `kp1:<decimal id>` cursors handed out before
/// the one codec still parse.
impl Cursor for InboxPosition {
    const KIND: CursorKind = CursorKind::KeyPackages;
    const LEGACY_PREFIX: Option<&'static str> = Some("kp1:");

    fn encode(&self, out: &mut Vec<u8>) {
        cursor::encode_i64(self.0, out);
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        cursor::decode_i64(bytes).map(InboxPosition)
    }

    fn decode_legacy(text: &str) -> Option<Self> {
        text.parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(InboxPosition)
    }
}

/// The inbox position of a request's `cursor`: the start when empty.
fn parse_inbox_cursor(text: &str) -> Result<i64, Status> {
    Ok(cursor::parse::<InboxPosition>("cursor", text)?.map_or(0, |p| p.0))
}

/// The cursor after package `id`.
fn inbox_cursor(id: i64) -> String {
    cursor::format(&InboxPosition(id))
}

fn package_to_wire(p: KeyPackage) -> pb::KeyPackage {
    pb::KeyPackage {
        package_id: u64::try_from(p.id).unwrap_or_default(),
        user_id: p.user.to_string(),
        sender_device_id: p.sender_device.to_string(),
        recipient_key_id: p.recipient_key_id.as_bytes().to_vec(),
        payload: p.payload,
        created_at: p.created_at.unix_micros(),
    }
}

/// Parses the packages of a send; every check that needs no database.
fn parse_packages(
    req: &pb::SendKeyPackagesRequest,
    user: &UserId,
    sender: &DeviceId,
    max_list_len: usize,
    max_payload: usize,
) -> Result<Vec<NewKeyPackage>, Status> {
    check_list_len("packages", req.packages.len(), max_list_len, true)?;
    let mut out = Vec::with_capacity(req.packages.len());
    for (i, p) in req.packages.iter().enumerate() {
        let field = |name: &str| format!("packages[{i}].{name}");
        let recipient_user = parse_field(
            &field("recipient_user_id"),
            UserId::new(p.recipient_user_id.clone()),
        )?;
        if &recipient_user != user {
            return Err(Status::permission_denied(format!(
                "{}: key packages go only to devices of the sender's own user ({user})",
                field("recipient_user_id")
            )));
        }
        let recipient_device = parse_field(
            &field("recipient_device_id"),
            DeviceId::new(p.recipient_device_id.clone()),
        )?;
        if &recipient_device == sender {
            return Err(invalid(
                &field("recipient_device_id"),
                "a device does not send key packages to itself",
            ));
        }
        let recipient_key_id = parse_field(
            &field("recipient_key_id"),
            KeyId::from_slice(&p.recipient_key_id),
        )?;
        if p.payload.is_empty() {
            return Err(invalid(&field("payload"), "must not be empty"));
        }
        if p.payload.len() > max_payload {
            return Err(Status::resource_exhausted(format!(
                "{}: {} bytes; at most {max_payload}",
                field("payload"),
                p.payload.len()
            )));
        }
        out.push(NewKeyPackage {
            recipient_device,
            recipient_key_id,
            payload: p.payload.clone(),
        });
    }
    Ok(out)
}

/// One page of a device's inbox after package `after`.
async fn read_inbox(
    state: &AppState,
    user: &UserId,
    device: &DeviceId,
    after: i64,
    page: u32,
) -> Result<Vec<KeyPackage>, DeviceSyncError> {
    Ok((state.store.conn().await?)
        .key_package_inbox(user, device, after, i64::from(page))
        .await?)
}

/// The body of a WatchKeyPackages stream: deliver the inbox after `after`, then wait for the
/// next change and deliver again.
async fn deliver_inbox(
    state: AppState,
    user: UserId,
    device: DeviceId,
    mut after: i64,
    mut watch: DeviceWatch,
    tx: StreamSender<pb::WatchKeyPackagesResponse>,
) {
    loop {
        let page = match read_inbox(&state, &user, &device, after, DEFAULT_PAGE).await {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let full = page.len() == DEFAULT_PAGE as usize;
        for p in page {
            after = p.id;
            let message = pb::WatchKeyPackagesResponse {
                package: Some(package_to_wire(p)),
                cursor: inbox_cursor(after),
            };
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
        if full {
            continue;
        }
        if !next_change(&mut watch, &tx).await {
            return;
        }
    }
}

rpc_service! {
    /// The DeviceSync gRPC service.
    DeviceSyncService: DeviceSync {
        type WatchKeyPackagesStream = ReceiverStream<Result<pb::WatchKeyPackagesResponse, Status>>;
        fn send_key_packages(pb::SendKeyPackagesRequest) -> pb::SendKeyPackagesResponse, by [Device];
        fn fetch_key_packages(pb::FetchKeyPackagesRequest) -> pb::FetchKeyPackagesResponse, by [Device];
        fn ack_key_packages(pb::AckKeyPackagesRequest) -> pb::AckKeyPackagesResponse, by [Device];
        fn watch_key_packages(pb::WatchKeyPackagesRequest) -> Self::WatchKeyPackagesStream, by [Device];
    }
}

/// The answer of a send: the packages' ids, in request order.
fn sent_to_wire(ids: &[i64]) -> pb::SendKeyPackagesResponse {
    pb::SendKeyPackagesResponse {
        package_ids: ids
            .iter()
            .map(|id| u64::try_from(*id).unwrap_or_default())
            .collect(),
    }
}

async fn send_key_packages(
    state: &AppState,
    caller: &Principal,
    mut req: pb::SendKeyPackagesRequest,
) -> Result<pb::SendKeyPackagesResponse, Status> {
    let (user, sender) = calling_device(caller)?;
    let packages = parse_packages(
        &req,
        user,
        sender,
        state.max_list_len,
        state.limits.max_key_package_bytes,
    )?;
    let keyed = Keyed::take(state, caller, &mut req)?;
    keyed
        .replay_or_run(state, |keyed| async move {
            let recorder = keyed.recorder(|ids: &Vec<i64>| sent_to_wire(ids));
            let inbox_max = state.limits.max_inbox_packages;
            let sent = state
                .store
                .send_key_packages(user, sender, &packages, inbox_max, &recorder)
                .await
                .map_err(|e| DeviceSyncError::of_send(e, user, sender))?;
            Ok(sent_to_wire(&sent))
        })
        .await
        .map(Answer::into_response)
}

async fn fetch_key_packages(
    state: &AppState,
    caller: &Principal,
    req: pb::FetchKeyPackagesRequest,
) -> Result<pb::FetchKeyPackagesResponse, Status> {
    let (user, device) = calling_device(caller)?;
    let after = parse_inbox_cursor(&req.cursor)?;
    let page = match req.page_size {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let packages = read_inbox(state, user, device, after, page).await?;
    let next = packages.last().map_or(after, |p| p.id);
    Ok(pb::FetchKeyPackagesResponse {
        packages: packages.into_iter().map(package_to_wire).collect(),
        next_cursor: inbox_cursor(next),
    })
}

async fn ack_key_packages(
    state: &AppState,
    caller: &Principal,
    req: pb::AckKeyPackagesRequest,
) -> Result<pb::AckKeyPackagesResponse, Status> {
    let (user, device) = calling_device(caller)?;
    check_list_len(
        "package_ids",
        req.package_ids.len(),
        state.max_list_len,
        true,
    )?;
    // An id past i64 was never handed out, so it names nothing to remove.
    let ids: Vec<i64> = req
        .package_ids
        .iter()
        .filter_map(|id| i64::try_from(*id).ok())
        .collect();
    let removed = state
        .store
        .transaction(async |tx| tx.ack_key_packages(user, device, &ids).await)
        .await?;
    Ok(pb::AckKeyPackagesResponse { removed })
}

async fn watch_key_packages(
    state: &AppState,
    caller: &Principal,
    req: pb::WatchKeyPackagesRequest,
) -> Result<ReceiverStream<Result<pb::WatchKeyPackagesResponse, Status>>, Status> {
    let (user, device) = calling_device(caller)?;
    let after = parse_inbox_cursor(&req.cursor)?;
    let slot = state.streams.claim(
        &state.store,
        caller.token_id(),
        user,
        device,
        state.limits.max_watch_streams_per_device,
    )?;
    // Listen before the first read, so nothing committed after it is missed.
    let watch = state
        .store
        .watch_device(EventKind::KeyPackages, user, device)
        .await?;
    let (state, user, device) = (state.clone(), user.clone(), device.clone());
    let streams = state.streams.clone();
    Ok(streams.spawn(slot, move |tx| {
        deliver_inbox(state, user, device, after, watch, tx)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbox_cursors_round_trip_and_legacy_ones_still_parse() {
        for id in [0, 1, 41, i64::MAX] {
            let text = inbox_cursor(id);
            assert!(text.starts_with("c1."), "{text}");
            assert_eq!(parse_inbox_cursor(&text).unwrap(), id);
        }
        assert_eq!(parse_inbox_cursor("").unwrap(), 0);
        // Persisted by devices before the one codec.
        assert_eq!(parse_inbox_cursor("kp1:0").unwrap(), 0);
        assert_eq!(parse_inbox_cursor("kp1:42").unwrap(), 42);
    }

    #[test]
    fn anything_else_is_invalid_argument_naming_the_cursor() {
        let trusted = cursor::format(&UserId::new("bob").unwrap());
        let bad = [
            "not-a-cursor",
            "kp1:",
            "kp1:-1",
            "kp1:x",
            "kp2:5",
            "42",
            "c1.",
            "c1.04",
            trusted.as_str(),
        ];
        cursor::assert_refused(parse_inbox_cursor, bad);
    }

    #[test]
    fn refused_sends_name_what_to_fix() {
        let user = UserId::new("alice").unwrap();
        let sender = DeviceId::new("phone").unwrap();
        let laptop = DeviceId::new("laptop").unwrap();
        let status =
            |r: SendRefusal| Status::from(DeviceSyncError::of_send(r.into(), &user, &sender));
        let s = status(SendRefusal::SenderNotCurrent);
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.message().contains("alice/phone"), "{}", s.message());
        let s = status(SendRefusal::RecipientNotCurrent { index: 2 });
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.message().starts_with("packages[2].recipient_device_id:"));
        let s = status(SendRefusal::InboxFull {
            device: laptop,
            held: 4,
            adding: 2,
            max: 5,
        });
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "packages: the inbox of device alice/laptop holds 4 packages; 2 more would pass the bound of 5"
        );
    }
}
