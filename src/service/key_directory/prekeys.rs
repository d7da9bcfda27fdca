//! Prekeys: UploadPrekeys, CountPrekeys and ClaimPrekeys, from the wire to the store and back.
//!
//! Each uploaded prekey is parsed (its encapsulation key validated, an X25519 part of low order
//! refused) and its signature checked under the device's *current* identity key before
//! anything is stored, and it remembers that key, so that a claimer gets the identity key to
//! check it with. Claims hand out each one-time prekey exactly once, across replicas, and fall
//! back to the device's last-resort prekey ([`crate::store::prekeys`]). A claimer (the calling
//! device) is rate-limited per target device, with the counter in the database.

use std::collections::BTreeSet;

use tonic::Status;

use super::device_keys::{current_identity_key, parse_suite, parse_users, suite_to_wire};
use super::error::KeyDirectoryError;
use crate::auth::Principal;
use crate::crypto::ids::{DeviceId, UserId};
use crate::crypto::sign::{IdentityPublicKey, Prekey, PrekeyKind, Signature};
use crate::crypto::xwing::EncapsulationKey;
use crate::proto::keyhold::v1 as pb;
use crate::service::idempotency::{Answer, Keyed};
use crate::service::{check_list_len, invalid, parse_field, require_own_device, AppState};
use crate::store::prekeys::{
    ClaimRateLimit, ClaimTarget, ClaimedPrekey, NewPrekey, PrekeyStock, PrekeyUpload,
};
use crate::store::user_keys::UserKey;

/// Most users whose every device one ClaimPrekeys call may name.
pub(crate) const MAX_CLAIM_USERS: usize = 100;

/// Counter: prekeys ClaimPrekeys handed out, by `outcome` (`one_time`, `last_resort`, or
/// `none` for a device that had neither), counted once the claim has committed.
pub(crate) const PREKEY_CLAIMS: &str = "keyhold_prekey_claims_total";

/// The user and device fields of a request that only the device itself may make.
pub(super) fn own_device(
    caller: &Principal,
    user_id: &str,
    device_id: &str,
) -> Result<(UserId, DeviceId), Status> {
    let user = parse_field("user_id", UserId::new(user_id))?;
    let device = parse_field("device_id", DeviceId::new(device_id))?;
    require_own_device(caller, &user, &device)?;
    Ok((user, device))
}

/// The device's stock under its current identity key; [`KeyDirectoryError::NoCurrentKey`]
/// if it has none.
pub(super) async fn current_stock(
    state: &AppState,
    user: &UserId,
    device: &DeviceId,
) -> Result<PrekeyStock, KeyDirectoryError> {
    let identity_key = current_identity_key(state, user, device).await?;
    Ok((state.store.conn().await?)
        .prekey_stock(user, device, &identity_key)
        .await?)
}

/// The wire form of a stock, with the bound the device may fill up to.
pub(super) fn stock_to_wire(stock: PrekeyStock, max_one_time: usize) -> pb::PrekeyStock {
    pb::PrekeyStock {
        one_time_remaining: u32::try_from(stock.one_time).unwrap_or(u32::MAX),
        has_last_resort: stock.has_last_resort,
        max_one_time: u32::try_from(max_one_time).unwrap_or(u32::MAX),
    }
}

/// The wire kind of a prekey.
fn prekey_kind_to_wire(kind: PrekeyKind) -> i32 {
    match kind {
        PrekeyKind::OneTime => pb::PrekeyKind::OneTime as i32,
        PrekeyKind::LastResort => pb::PrekeyKind::LastResort as i32,
    }
}

fn claimed_to_wire(p: &ClaimedPrekey) -> pb::ClaimedPrekey {
    pb::ClaimedPrekey {
        user_id: p.user.to_string(),
        device_id: p.device.to_string(),
        kind: prekey_kind_to_wire(p.kind),
        key_id: p.key_id.as_bytes().to_vec(),
        suite: suite_to_wire(p.suite),
        encapsulation_key: p.encapsulation_key.clone(),
        signature: p.signature.clone(),
        identity_key: p.identity_key.clone(),
    }
}

/// The answer of a claim: the prekey of each target that had one, in target order, and the
/// targets that had none.
fn claims_to_wire(
    targets: &[ClaimTarget],
    claimed: &[Option<ClaimedPrekey>],
) -> pb::ClaimPrekeysResponse {
    let mut response = pb::ClaimPrekeysResponse::default();
    for (target, claimed) in targets.iter().zip(claimed) {
        match claimed {
            Some(p) => response.prekeys.push(claimed_to_wire(p)),
            None => response.unavailable.push(pb::DeviceRef {
                user_id: target.user.to_string(),
                device_id: target.device.to_string(),
            }),
        }
    }
    response
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

/// Parses and verifies every prekey of an upload; a key listed twice is refused. Run it on the
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

/// UploadPrekeys: the device's own prekeys, checked under its current identity key, within
/// its bound of unused one-time prekeys.
pub(super) async fn upload(
    state: &AppState,
    caller: &Principal,
    req: pb::UploadPrekeysRequest,
) -> Result<pb::UploadPrekeysResponse, Status> {
    let (user, device) = own_device(caller, &req.user_id, &req.device_id)?;
    let max = state.limits.max_unused_prekeys;
    if req.one_time_prekeys.is_empty() && req.last_resort_prekey.is_none() {
        return Err(invalid(
            "one_time_prekeys",
            "upload at least one prekey (one-time or last-resort)",
        ));
    }
    check_list_len("one_time_prekeys", req.one_time_prekeys.len(), max, false)?;
    let identity_key = current_identity_key(state, &user, &device).await?;
    let identity = IdentityPublicKey::from_slice(&identity_key).map_err(|source| {
        KeyDirectoryError::StoredIdentityKey {
            user: user.clone(),
            device: device.clone(),
            source,
        }
    })?;
    let verified = {
        let (user, device) = (user.clone(), device.clone());
        tokio::task::spawn_blocking(move || parse_upload(&req, &user, &device, &identity))
            .await
            .map_err(KeyDirectoryError::VerifyTask)?
    };
    let (one_time, last_resort) = verified?;
    let upload = PrekeyUpload {
        user,
        device,
        identity_key,
        one_time,
        last_resort,
        max_unused: max,
    };
    let stock = state
        .store
        .upload_prekeys(&upload)
        .await
        .map_err(KeyDirectoryError::of_upload)?;
    Ok(pb::UploadPrekeysResponse {
        stock: Some(stock_to_wire(stock, max)),
    })
}

/// CountPrekeys: the device's own stock.
pub(super) async fn count(
    state: &AppState,
    caller: &Principal,
    req: pb::CountPrekeysRequest,
) -> Result<pb::CountPrekeysResponse, Status> {
    let (user, device) = own_device(caller, &req.user_id, &req.device_id)?;
    let stock = current_stock(state, &user, &device).await?;
    Ok(pb::CountPrekeysResponse {
        stock: Some(stock_to_wire(stock, state.limits.max_unused_prekeys)),
    })
}

/// The devices a claim reaches, each once, with the identity key it has now: first the
/// devices named (in order; one without a current key is an error naming its place), then
/// every device of each user named (in device-id order), leaving out the claimer itself.
fn claim_targets(
    keys: &[UserKey],
    named: Vec<(UserId, DeviceId)>,
    users: &[UserId],
    (own_user, own_device): (&UserId, &DeviceId),
) -> Result<Vec<ClaimTarget>, KeyDirectoryError> {
    let mut targets: Vec<ClaimTarget> = Vec::new();
    let mut seen = BTreeSet::new();
    for (index, (user, device)) in named.into_iter().enumerate() {
        let Some(key) = keys.iter().find(|k| k.user == user && k.device == device) else {
            return Err(KeyDirectoryError::ClaimTargetWithoutKey {
                index,
                user,
                device,
            });
        };
        if seen.insert((user.clone(), device.clone())) {
            targets.push(ClaimTarget {
                user,
                device,
                identity_key: key.identity_key.clone(),
            });
        }
    }
    for user in users {
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
    Ok(targets)
}

/// ClaimPrekeys: one prekey of each device named or reached through its user, for the calling
/// device; the devices with none are listed as unavailable. With an idempotency key, a retry
/// replays the first answer and claims nothing more.
pub(super) async fn claim(
    state: &AppState,
    caller: &Principal,
    mut req: pb::ClaimPrekeysRequest,
) -> Result<pb::ClaimPrekeysResponse, Status> {
    let Principal::Device {
        user: own_user,
        device: own_device,
        ..
    } = caller
    else {
        return Err(Status::permission_denied("only devices claim prekeys"));
    };
    let max_targets = state.max_list_len;
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
    let users = parse_users("user_ids", &req.user_ids)?;
    let keyed = Keyed::take(state, caller, &mut req)?;
    keyed
        .replay_or_run(state, |keyed| async move {
            let mut lookup: Vec<UserId> = named.iter().map(|(u, _)| u.clone()).collect();
            lookup.extend(users.iter().cloned());
            lookup.sort();
            lookup.dedup();
            let keys = (state.store.conn().await?)
                .current_user_keys(&lookup)
                .await?;
            let targets = claim_targets(&keys, named, &users, (own_user, own_device))?;
            if targets.len() > max_targets {
                return Err(KeyDirectoryError::TooManyClaimTargets {
                    reached: targets.len(),
                    max: max_targets,
                }
                .into());
            }
            let claimer = format!("device {own_user} {own_device}");
            let limit = ClaimRateLimit {
                claims: state.limits.prekey_claim_limit,
                window: state.limits.prekey_claim_window,
            };
            let recorder = keyed
                .recorder(|claimed: &Vec<Option<ClaimedPrekey>>| claims_to_wire(&targets, claimed));
            let claimed = state
                .store
                .claim_prekeys(&claimer, &targets, limit, &recorder)
                .await
                .map_err(KeyDirectoryError::of_claim)?;
            for claimed in &claimed {
                let outcome = match claimed {
                    Some(p) if p.kind == PrekeyKind::OneTime => "one_time",
                    Some(_) => "last_resort",
                    None => "none",
                };
                metrics::counter!(PREKEY_CLAIMS, "outcome" => outcome).increment(1);
            }
            Ok(claims_to_wire(&targets, &claimed))
        })
        .await
        .map(Answer::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::ids::KeyId;
    use crate::crypto::Suite;
    use crate::store::Timestamp;

    fn key(n: u8, user: &str, device: &str) -> UserKey {
        UserKey {
            key_id: KeyId::from_bytes([n; 16]),
            user: UserId::new(user).unwrap(),
            device: DeviceId::new(device).unwrap(),
            version: 1,
            suite: Suite::XWingAes256GcmV1,
            encapsulation_key: vec![n; 8],
            identity_key: vec![n; 32],
            signature: vec![n; 64],
            created_at: Timestamp::from_unix_micros(0),
            superseded_at: None,
            revoked_at: None,
        }
    }

    fn ids(user: &str, device: &str) -> (UserId, DeviceId) {
        (UserId::new(user).unwrap(), DeviceId::new(device).unwrap())
    }

    fn names(targets: &[ClaimTarget]) -> Vec<(String, String, u8)> {
        targets
            .iter()
            .map(|t| (t.user.to_string(), t.device.to_string(), t.identity_key[0]))
            .collect()
    }

    #[test]
    fn claim_targets_are_named_devices_then_each_users_devices_once_without_the_claimer() {
        // As current_user_keys returns them: by user, then device.
        let keys = [
            key(1, "alice", "laptop"),
            key(2, "alice", "phone"),
            key(3, "bob", "phone"),
            key(4, "carol", "phone"),
        ];
        let (own_user, own_device) = ids("alice", "laptop");
        let named = vec![
            ids("bob", "phone"),
            ids("alice", "phone"),
            ids("bob", "phone"),
        ];
        let users = [UserId::new("alice").unwrap(), UserId::new("carol").unwrap()];
        let targets = claim_targets(&keys, named, &users, (&own_user, &own_device)).unwrap();
        assert_eq!(
            names(&targets),
            vec![
                ("bob".into(), "phone".into(), 3),
                ("alice".into(), "phone".into(), 2),
                ("carol".into(), "phone".into(), 4),
            ]
        );
    }

    #[test]
    fn a_named_device_without_a_current_key_is_not_found_at_its_place() {
        let keys = [key(1, "alice", "phone")];
        let (own_user, own_device) = ids("bob", "phone");
        let named = vec![ids("alice", "phone"), ids("alice", "tablet")];
        let err = claim_targets(&keys, named, &[], (&own_user, &own_device)).unwrap_err();
        assert!(
            matches!(
                err,
                KeyDirectoryError::ClaimTargetWithoutKey { index: 1, .. }
            ),
            "{err:?}"
        );
        let status = Status::from(err);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(
            status.message(),
            "devices[1]: device alice/tablet has no current key"
        );
    }
}
