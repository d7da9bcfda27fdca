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
use tonic::{Request, Response, Status};

use super::watch::{spawn_stream, StreamSender, REREAD_INTERVAL};
use super::{check_list_len, invalid, parse_field, store_status, AppState};
use crate::auth::{principal, Principal};
use crate::crypto::ids::{DeviceId, KeyId, UserId};
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::device_sync_server::DeviceSync;
use crate::store::events::{DeviceWatch, EventKind};
use crate::store::key_packages::{KeyPackage, NewKeyPackage, SendRefusal};
use crate::store::StoreError;

/// Page size of FetchKeyPackages when the caller gives none, and of the watch's reads.
pub const DEFAULT_PAGE: u32 = 100;
/// Largest FetchKeyPackages page.
pub const MAX_PAGE: u32 = 500;

/// The DeviceSync gRPC service.
#[derive(Clone)]
pub struct DeviceSyncService {
    state: AppState,
}

impl DeviceSyncService {
    /// The service over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

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

/// The opaque inbox cursor: a version prefix and the last delivered package id.
fn format_cursor(id: i64) -> String {
    format!("kp1:{id}")
}

fn parse_cursor(cursor: &str) -> Result<i64, Status> {
    if cursor.is_empty() {
        return Ok(0);
    }
    cursor
        .strip_prefix("kp1:")
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| invalid("cursor", "not a cursor this service returned"))
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

fn refusal_status(refusal: SendRefusal, user: &UserId, sender: &DeviceId) -> Status {
    match refusal {
        SendRefusal::SenderNotCurrent => Status::failed_precondition(format!(
            "the sending device {user}/{sender} has no current key: publish one first"
        )),
        SendRefusal::RecipientNotCurrent { index } => Status::failed_precondition(format!(
            "packages[{index}].recipient_device_id: the device has no current (non-revoked) key"
        )),
        SendRefusal::RecipientKeyChanged { index, current } => Status::failed_precondition(
            format!(
                "packages[{index}].recipient_key_id: the device's current key is {current}; fetch the keys again"
            ),
        ),
    }
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
        let page = match state
            .store
            .key_package_inbox(&user, &device, after, i64::from(DEFAULT_PAGE))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(store_status(e))).await;
                return;
            }
        };
        let full = page.len() == DEFAULT_PAGE as usize;
        for p in page {
            after = p.id;
            let message = pb::WatchKeyPackagesResponse {
                package: Some(package_to_wire(p)),
                cursor: format_cursor(after),
            };
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
        if full {
            continue;
        }
        tokio::select! {
            changed = watch.changed() => {
                if let Err(e) = changed {
                    let _ = tx.send(Err(store_status(e))).await;
                    return;
                }
            }
            () = tokio::time::sleep(REREAD_INTERVAL) => {}
        }
    }
}

#[tonic::async_trait]
impl DeviceSync for DeviceSyncService {
    type WatchKeyPackagesStream = ReceiverStream<Result<pb::WatchKeyPackagesResponse, Status>>;

    async fn send_key_packages(
        &self,
        request: Request<pb::SendKeyPackagesRequest>,
    ) -> Result<Response<pb::SendKeyPackagesResponse>, Status> {
        let caller = principal(&request)?.clone();
        let (user, sender) = calling_device(&caller)?;
        let packages = parse_packages(
            request.get_ref(),
            user,
            sender,
            self.state.max_list_len,
            self.state.limits.max_key_package_bytes,
        )?;
        let sent = self
            .state
            .store
            .send_key_packages(
                user.clone(),
                sender.clone(),
                packages,
                self.state.limits.max_inbox_packages,
            )
            .await
            .map_err(|e| match e {
                StoreError::LimitExceeded(what) => {
                    Status::resource_exhausted(format!("packages: {what}"))
                }
                other => store_status(other),
            })?
            .map_err(|refusal| refusal_status(refusal, user, sender))?;
        Ok(Response::new(pb::SendKeyPackagesResponse {
            package_ids: sent
                .into_iter()
                .map(|id| u64::try_from(id).unwrap_or_default())
                .collect(),
        }))
    }

    async fn fetch_key_packages(
        &self,
        request: Request<pb::FetchKeyPackagesRequest>,
    ) -> Result<Response<pb::FetchKeyPackagesResponse>, Status> {
        let caller = principal(&request)?.clone();
        let (user, device) = calling_device(&caller)?;
        let req = request.get_ref();
        let after = parse_cursor(&req.cursor)?;
        let page = match req.page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let packages = self
            .state
            .store
            .key_package_inbox(user, device, after, i64::from(page))
            .await
            .map_err(store_status)?;
        let next = packages.last().map_or(after, |p| p.id);
        Ok(Response::new(pb::FetchKeyPackagesResponse {
            packages: packages.into_iter().map(package_to_wire).collect(),
            next_cursor: format_cursor(next),
        }))
    }

    async fn ack_key_packages(
        &self,
        request: Request<pb::AckKeyPackagesRequest>,
    ) -> Result<Response<pb::AckKeyPackagesResponse>, Status> {
        let caller = principal(&request)?.clone();
        let (user, device) = calling_device(&caller)?;
        let req = request.get_ref();
        check_list_len(
            "package_ids",
            req.package_ids.len(),
            self.state.max_list_len,
            true,
        )?;
        // An id past i64 was never handed out, so it names nothing to remove.
        let ids: Vec<i64> = req
            .package_ids
            .iter()
            .filter_map(|id| i64::try_from(*id).ok())
            .collect();
        let removed = self
            .state
            .store
            .ack_key_packages(user.clone(), device.clone(), ids)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::AckKeyPackagesResponse { removed }))
    }

    async fn watch_key_packages(
        &self,
        request: Request<pb::WatchKeyPackagesRequest>,
    ) -> Result<Response<Self::WatchKeyPackagesStream>, Status> {
        let caller = principal(&request)?.clone();
        let (user, device) = calling_device(&caller)?;
        let after = parse_cursor(&request.get_ref().cursor)?;
        // Listen before the first read, so nothing committed after it is missed.
        let watch = self
            .state
            .store
            .watch_device(EventKind::KeyPackages, user, device)
            .await
            .map_err(store_status)?;
        let (state, user, device) = (self.state.clone(), user.clone(), device.clone());
        Ok(Response::new(spawn_stream(
            self.state.streams.clone(),
            move |tx| deliver_inbox(state, user, device, after, watch, tx),
        )))
    }
}
