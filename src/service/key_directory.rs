//! The KeyDirectory service: devices publish and revoke their public key bundles; app servers
//! and devices look up users' current keys. Devices upload signed post-quantum prekeys, claim
//! other devices' prekeys, and count or watch their own stock.
//!
//! **Prekeys.** Each prekey is checked against the device's current identity key before it is
//! stored, and remembers that key, so that a claimer gets the identity key to check it with.
//! Claims hand out each one-time prekey exactly once, across replicas (the store deletes it in
//! the statement that picks it, see [`crate::store::prekeys`]), and fall back to the device's
//! last-resort prekey. A claimer (the calling device) is rate-limited per target device, with
//! the counter in the database. The low-stock signal is a stream of its own,
//! `WatchPrekeyStock`, woken by claims on any replica ([`crate::store::events`]).

use std::collections::BTreeSet;

use tonic::{Request, Response, Status};

use super::watch::{spawn_stream, StreamSender, REREAD_INTERVAL};
use super::{
    check_list_len, invalid, parse_field, require_acts_for, require_own_device, require_role,
    store_status, AppState,
};
use crate::auth::{principal, Principal, Role};
use crate::crypto::ids::{DeviceId, KeyId, UserId};
use crate::crypto::sign::{DeviceKeyBundle, IdentityPublicKey, Prekey, PrekeyKind, Signature};
use crate::crypto::xwing::EncapsulationKey;
use crate::crypto::Suite;
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::key_directory_server::KeyDirectory;
use crate::store::events::{DeviceWatch, EventKind};
use crate::store::prekeys::{
    ClaimRateLimit, ClaimTarget, ClaimedPrekey, NewPrekey, PrekeyStock, PrekeyUpload,
};
use crate::store::user_keys::{NewUserKey, UserKey};
use crate::store::StoreError;

/// Most users whose every device one ClaimPrekeys call may name.
pub const MAX_CLAIM_USERS: usize = 100;

/// The KeyDirectory gRPC service.
#[derive(Clone)]
pub struct KeyDirectoryService {
    state: AppState,
}

impl KeyDirectoryService {
    /// The service over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

/// Parses a wire suite, naming the field.
pub fn parse_suite(field: &str, value: i32) -> Result<Suite, Status> {
    match pb::Suite::try_from(value) {
        Ok(pb::Suite::XwingAes256gcmV1) => Ok(Suite::XWingAes256GcmV1),
        Ok(pb::Suite::Unspecified) => Err(invalid(field, "must be set")),
        Err(_) => Err(invalid(field, format!("unknown value {value}"))),
    }
}

/// The wire value of a suite.
pub fn suite_to_wire(suite: Suite) -> i32 {
    match suite {
        Suite::XWingAes256GcmV1 => pb::Suite::XwingAes256gcmV1 as i32,
    }
}

/// Parses and verifies a PublishDeviceKey request: every field well-formed and the bundle's
/// self-signature valid under its own identity key.
pub fn parse_bundle(
    req: &pb::PublishDeviceKeyRequest,
) -> Result<(DeviceKeyBundle, Signature), Status> {
    let bundle = DeviceKeyBundle {
        suite: parse_suite("suite", req.suite)?,
        user: parse_field("user_id", UserId::new(req.user_id.clone()))?,
        device: parse_field("device_id", DeviceId::new(req.device_id.clone()))?,
        identity_key: parse_field(
            "identity_key",
            IdentityPublicKey::from_slice(&req.identity_key),
        )?,
        encapsulation_key: parse_field(
            "encapsulation_key",
            EncapsulationKey::from_slice(&req.encapsulation_key),
        )?,
    };
    let signature = parse_field("signature", Signature::from_slice(&req.signature))?;
    bundle
        .identity_key
        .verify(&bundle, &signature)
        .map_err(|e| invalid("signature", e))?;
    Ok((bundle, signature))
}

fn device_key_to_wire(k: UserKey) -> pb::DeviceKey {
    pb::DeviceKey {
        device_id: k.device.to_string(),
        key_id: k.key_id.as_bytes().to_vec(),
        version: k.version,
        suite: suite_to_wire(k.suite),
        encapsulation_key: k.encapsulation_key,
        identity_key: k.identity_key,
        signature: k.signature,
        created_at: k.created_at.unix_micros(),
    }
}

/// The wire kind of a prekey.
fn prekey_kind_to_wire(kind: PrekeyKind) -> i32 {
    match kind {
        PrekeyKind::OneTime => pb::PrekeyKind::OneTime as i32,
        PrekeyKind::LastResort => pb::PrekeyKind::LastResort as i32,
    }
}

fn stock_to_wire(stock: PrekeyStock, max_one_time: usize) -> pb::PrekeyStock {
    pb::PrekeyStock {
        one_time_remaining: u32::try_from(stock.one_time).unwrap_or(u32::MAX),
        has_last_resort: stock.has_last_resort,
        max_one_time: u32::try_from(max_one_time).unwrap_or(u32::MAX),
    }
}

fn claimed_to_wire(p: ClaimedPrekey) -> pb::ClaimedPrekey {
    pb::ClaimedPrekey {
        user_id: p.user.to_string(),
        device_id: p.device.to_string(),
        kind: prekey_kind_to_wire(p.kind),
        key_id: p.key_id.as_bytes().to_vec(),
        suite: suite_to_wire(p.suite),
        encapsulation_key: p.encapsulation_key,
        signature: p.signature,
        identity_key: p.identity_key,
    }
}

/// Parses one uploaded prekey and checks its signature under the device's identity key.
fn parse_prekey(
    field: &str,
    wire: &pb::SignedPrekey,
    kind: PrekeyKind,
    (user, device, identity): (&UserId, &DeviceId, &IdentityPublicKey),
) -> Result<NewPrekey, Status> {
    let prekey = Prekey {
        suite: parse_suite(&format!("{field}.suite"), wire.suite)?,
        user: user.clone(),
        device: device.clone(),
        kind,
        key: parse_field(
            &format!("{field}.encapsulation_key"),
            EncapsulationKey::from_slice(&wire.encapsulation_key),
        )?,
    };
    let signature = parse_field(
        &format!("{field}.signature"),
        Signature::from_slice(&wire.signature),
    )?;
    identity
        .verify(&prekey, &signature)
        .map_err(|e| invalid(&format!("{field}.signature"), e))?;
    Ok(NewPrekey {
        key_id: prekey.key.key_id(),
        suite: prekey.suite,
        encapsulation_key: wire.encapsulation_key.clone(),
        signature: wire.signature.clone(),
    })
}

/// Parses and verifies every prekey of an upload; a key listed twice is refused. Runs on the
/// blocking pool: a full upload is a thousand signature checks.
fn parse_upload(
    req: &pb::UploadPrekeysRequest,
    user: &UserId,
    device: &DeviceId,
    identity: &IdentityPublicKey,
) -> Result<(Vec<NewPrekey>, Option<NewPrekey>), Status> {
    let owner = (user, device, identity);
    let mut seen = BTreeSet::new();
    let mut one_time = Vec::with_capacity(req.one_time_prekeys.len());
    for (i, p) in req.one_time_prekeys.iter().enumerate() {
        let field = format!("one_time_prekeys[{i}]");
        let parsed = parse_prekey(&field, p, PrekeyKind::OneTime, owner)?;
        if !seen.insert(parsed.key_id) {
            return Err(invalid(&field, "the same prekey is listed twice"));
        }
        one_time.push(parsed);
    }
    let last_resort = req
        .last_resort_prekey
        .as_ref()
        .map(|p| parse_prekey("last_resort_prekey", p, PrekeyKind::LastResort, owner))
        .transpose()?;
    if let Some(lr) = &last_resort {
        if seen.contains(&lr.key_id) {
            return Err(invalid(
                "last_resort_prekey",
                "the same key is also a one-time prekey",
            ));
        }
    }
    Ok((one_time, last_resort))
}

/// The device's current key, if it has one.
async fn current_key(
    state: &AppState,
    user: &UserId,
    device: &DeviceId,
) -> Result<Option<UserKey>, Status> {
    let keys = state
        .store
        .current_user_keys(std::slice::from_ref(user))
        .await
        .map_err(store_status)?;
    Ok(keys.into_iter().find(|k| &k.device == device))
}

/// The device's current identity key bytes, or FAILED_PRECONDITION.
async fn current_identity_key(
    state: &AppState,
    user: &UserId,
    device: &DeviceId,
) -> Result<Vec<u8>, Status> {
    current_key(state, user, device)
        .await?
        .map(|k| k.identity_key)
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "device {user}/{device} has no current key bundle: publish one first"
            ))
        })
}

/// The user and device fields of a request that only the device itself may make.
fn own_device(
    caller: &Principal,
    user_id: &str,
    device_id: &str,
) -> Result<(UserId, DeviceId), Status> {
    let user = parse_field("user_id", UserId::new(user_id))?;
    let device = parse_field("device_id", DeviceId::new(device_id))?;
    require_own_device(caller, &user, &device)?;
    Ok((user, device))
}

/// A limit error from the store, naming the request field it is about.
fn limit_status(field: &str, e: StoreError) -> Status {
    match e {
        StoreError::LimitExceeded(what) => Status::resource_exhausted(format!("{field}: {what}")),
        other => store_status(other),
    }
}

/// The body of a WatchPrekeyStock stream: send the stock when it changes while low, and once
/// when it stops being low.
async fn watch_prekey_stock(
    state: AppState,
    user: UserId,
    device: DeviceId,
    low_water: u64,
    mut watch: DeviceWatch,
    tx: StreamSender<pb::WatchPrekeyStockResponse>,
) {
    let mut last: Option<PrekeyStock> = None;
    loop {
        let stock = match current_identity_key(&state, &user, &device).await {
            Ok(ik) => state.store.prekey_stock(&user, &device, &ik).await,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let stock = match stock {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(store_status(e))).await;
                return;
            }
        };
        let low = stock.one_time < low_water;
        let was_low = last.is_some_and(|l| l.one_time < low_water);
        if last != Some(stock) && (last.is_none() || low || was_low) {
            let message = pb::WatchPrekeyStockResponse {
                stock: Some(stock_to_wire(stock, state.limits.max_unused_prekeys)),
                low,
            };
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
        last = Some(stock);
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
impl KeyDirectory for KeyDirectoryService {
    type WatchPrekeyStockStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::WatchPrekeyStockResponse, Status>>;

    async fn publish_device_key(
        &self,
        request: Request<pb::PublishDeviceKeyRequest>,
    ) -> Result<Response<pb::PublishDeviceKeyResponse>, Status> {
        let caller = principal(&request)?.clone();
        let (bundle, signature) = parse_bundle(request.get_ref())?;
        require_acts_for(&caller, &bundle.user, Some(&bundle.device))?;
        let key_id = bundle.encapsulation_key.key_id();
        let published = self
            .state
            .store
            .publish_user_key(NewUserKey {
                key_id,
                user: bundle.user,
                device: bundle.device,
                suite: bundle.suite,
                encapsulation_key: bundle.encapsulation_key.to_bytes(),
                identity_key: bundle.identity_key.as_bytes().to_vec(),
                signature: signature.as_bytes().to_vec(),
            })
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::PublishDeviceKeyResponse {
            key_id: key_id.as_bytes().to_vec(),
            version: published.version,
        }))
    }

    async fn revoke_device_key(
        &self,
        request: Request<pb::RevokeDeviceKeyRequest>,
    ) -> Result<Response<pb::RevokeDeviceKeyResponse>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.get_ref();
        let user = parse_field("user_id", UserId::new(req.user_id.clone()))?;
        let device = parse_field("device_id", DeviceId::new(req.device_id.clone()))?;
        let key_id = parse_field("key_id", KeyId::from_slice(&req.key_id))?;
        require_acts_for(&caller, &user, Some(&device))?;
        self.state
            .store
            .revoke_user_key(user, device, key_id)
            .await
            .map_err(store_status)?;
        let key = self
            .state
            .store
            .user_key(&key_id)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::RevokeDeviceKeyResponse {
            revoked_at: key
                .and_then(|k| k.revoked_at)
                .map_or(0, |t| t.unix_micros()),
        }))
    }

    async fn get_user_keys(
        &self,
        request: Request<pb::GetUserKeysRequest>,
    ) -> Result<Response<pb::GetUserKeysResponse>, Status> {
        let caller = principal(&request)?.clone();
        super::require_role(
            &caller,
            &[crate::auth::Role::App, crate::auth::Role::Device],
        )?;
        let req = request.get_ref();
        check_list_len(
            "user_ids",
            req.user_ids.len(),
            self.state.max_list_len.min(100),
            true,
        )?;
        let mut users = Vec::with_capacity(req.user_ids.len());
        for (i, u) in req.user_ids.iter().enumerate() {
            let user = parse_field(&format!("user_ids[{i}]"), UserId::new(u.clone()))?;
            if !users.contains(&user) {
                users.push(user);
            }
        }
        let keys = self
            .state
            .store
            .current_user_keys(&users)
            .await
            .map_err(store_status)?;
        let mut out: Vec<pb::UserKeys> = users
            .iter()
            .map(|u| pb::UserKeys {
                user_id: u.to_string(),
                devices: Vec::new(),
            })
            .collect();
        for k in keys {
            if let Some(entry) = out.iter_mut().find(|e| e.user_id == k.user.as_str()) {
                entry.devices.push(device_key_to_wire(k));
            }
        }
        Ok(Response::new(pb::GetUserKeysResponse { users: out }))
    }

    async fn get_escrow_key(
        &self,
        request: Request<pb::GetEscrowKeyRequest>,
    ) -> Result<Response<pb::GetEscrowKeyResponse>, Status> {
        let caller = principal(&request)?.clone();
        super::require_role(
            &caller,
            &[crate::auth::Role::App, crate::auth::Role::Device],
        )?;
        let key = &self.state.escrow_public_key;
        Ok(Response::new(pb::GetEscrowKeyResponse {
            escrow_key_id: key.key_id().as_bytes().to_vec(),
            encapsulation_key: key.to_bytes(),
            suite: suite_to_wire(Suite::XWingAes256GcmV1),
        }))
    }

    async fn upload_prekeys(
        &self,
        request: Request<pb::UploadPrekeysRequest>,
    ) -> Result<Response<pb::UploadPrekeysResponse>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner();
        let (user, device) = own_device(&caller, &req.user_id, &req.device_id)?;
        let max = self.state.limits.max_unused_prekeys;
        if req.one_time_prekeys.is_empty() && req.last_resort_prekey.is_none() {
            return Err(invalid(
                "one_time_prekeys",
                "upload at least one prekey (one-time or last-resort)",
            ));
        }
        check_list_len("one_time_prekeys", req.one_time_prekeys.len(), max, false)?;
        let identity_key = current_identity_key(&self.state, &user, &device).await?;
        let identity = IdentityPublicKey::from_slice(&identity_key).map_err(|e| {
            tracing::error!(error = %e, "stored identity key does not parse");
            Status::internal("internal error")
        })?;
        let (one_time, last_resort) = {
            let (user, device) = (user.clone(), device.clone());
            tokio::task::spawn_blocking(move || parse_upload(&req, &user, &device, &identity))
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "prekey verification task failed");
                    Status::internal("internal error")
                })??
        };
        let stock = self
            .state
            .store
            .upload_prekeys(PrekeyUpload {
                user,
                device,
                identity_key,
                one_time,
                last_resort,
                max_unused: max,
            })
            .await
            .map_err(|e| limit_status("one_time_prekeys", e))?;
        Ok(Response::new(pb::UploadPrekeysResponse {
            stock: Some(stock_to_wire(stock, max)),
        }))
    }

    async fn claim_prekeys(
        &self,
        request: Request<pb::ClaimPrekeysRequest>,
    ) -> Result<Response<pb::ClaimPrekeysResponse>, Status> {
        let caller = principal(&request)?.clone();
        require_role(&caller, &[Role::Device])?;
        let Principal::Device {
            user: own_user,
            device: own_device,
            ..
        } = &caller
        else {
            return Err(Status::permission_denied("only devices claim prekeys"));
        };
        let req = request.get_ref();
        let max_targets = self.state.max_list_len;
        if req.devices.is_empty() && req.user_ids.is_empty() {
            return Err(invalid("devices", "name at least one device or user"));
        }
        check_list_len("devices", req.devices.len(), max_targets, false)?;
        check_list_len("user_ids", req.user_ids.len(), MAX_CLAIM_USERS, false)?;
        let mut named = Vec::with_capacity(req.devices.len());
        for (i, d) in req.devices.iter().enumerate() {
            let user = parse_field(
                &format!("devices[{i}].user_id"),
                UserId::new(d.user_id.clone()),
            )?;
            let device = parse_field(
                &format!("devices[{i}].device_id"),
                DeviceId::new(d.device_id.clone()),
            )?;
            if &user == own_user && &device == own_device {
                return Err(invalid(
                    &format!("devices[{i}]"),
                    "a device does not claim its own prekeys",
                ));
            }
            named.push((user, device));
        }
        let mut users = Vec::with_capacity(req.user_ids.len());
        for (i, u) in req.user_ids.iter().enumerate() {
            let user = parse_field(&format!("user_ids[{i}]"), UserId::new(u.clone()))?;
            if !users.contains(&user) {
                users.push(user);
            }
        }
        let mut lookup: Vec<UserId> = named.iter().map(|(u, _)| u.clone()).collect();
        lookup.extend(users.iter().cloned());
        lookup.sort();
        lookup.dedup();
        let keys = self
            .state
            .store
            .current_user_keys(&lookup)
            .await
            .map_err(store_status)?;

        let mut targets: Vec<ClaimTarget> = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, (user, device)) in named.into_iter().enumerate() {
            let key = keys
                .iter()
                .find(|k| k.user == user && k.device == device)
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "devices[{i}]: device {user}/{device} has no current key"
                    ))
                })?;
            if seen.insert((user.clone(), device.clone())) {
                targets.push(ClaimTarget {
                    user,
                    device,
                    identity_key: key.identity_key.clone(),
                });
            }
        }
        for user in &users {
            // current_user_keys orders a user's devices by device id.
            for k in keys.iter().filter(|k| &k.user == user) {
                let own = &k.user == own_user && &k.device == own_device;
                if !own && seen.insert((k.user.clone(), k.device.clone())) {
                    targets.push(ClaimTarget {
                        user: k.user.clone(),
                        device: k.device.clone(),
                        identity_key: k.identity_key.clone(),
                    });
                }
            }
        }
        if targets.len() > max_targets {
            return Err(Status::resource_exhausted(format!(
                "user_ids: the call reaches {} devices; at most {max_targets} per call",
                targets.len()
            )));
        }
        let claimer = format!("device {own_user} {own_device}");
        let limit = ClaimRateLimit {
            claims: self.state.limits.prekey_claim_limit,
            window: self.state.limits.prekey_claim_window,
        };
        let claimed = self
            .state
            .store
            .claim_prekeys(claimer, targets.clone(), limit)
            .await
            .map_err(|e| limit_status("devices", e))?;
        let mut response = pb::ClaimPrekeysResponse::default();
        for (target, claimed) in targets.into_iter().zip(claimed) {
            match claimed {
                Some(p) => response.prekeys.push(claimed_to_wire(p)),
                None => response.unavailable.push(pb::DeviceRef {
                    user_id: target.user.to_string(),
                    device_id: target.device.to_string(),
                }),
            }
        }
        Ok(Response::new(response))
    }

    async fn count_prekeys(
        &self,
        request: Request<pb::CountPrekeysRequest>,
    ) -> Result<Response<pb::CountPrekeysResponse>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.get_ref();
        let (user, device) = own_device(&caller, &req.user_id, &req.device_id)?;
        let identity_key = current_identity_key(&self.state, &user, &device).await?;
        let stock = self
            .state
            .store
            .prekey_stock(&user, &device, &identity_key)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::CountPrekeysResponse {
            stock: Some(stock_to_wire(stock, self.state.limits.max_unused_prekeys)),
        }))
    }

    async fn watch_prekey_stock(
        &self,
        request: Request<pb::WatchPrekeyStockRequest>,
    ) -> Result<Response<Self::WatchPrekeyStockStream>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.get_ref();
        let (user, device) = own_device(&caller, &req.user_id, &req.device_id)?;
        // Refuse at once, rather than as the stream's first item, a device without keys.
        current_identity_key(&self.state, &user, &device).await?;
        let low_water = match req.low_water {
            0 => (self.state.limits.max_unused_prekeys / 10).max(1) as u64,
            n => u64::from(n),
        };
        // Listen before the first read, so no claim committed after it is missed.
        let watch = self
            .state
            .store
            .watch_device(EventKind::Prekeys, &user, &device)
            .await
            .map_err(store_status)?;
        let state = self.state.clone();
        Ok(Response::new(spawn_stream(
            self.state.streams.clone(),
            move |tx| watch_prekey_stock(state, user, device, low_water, watch, tx),
        )))
    }
}
