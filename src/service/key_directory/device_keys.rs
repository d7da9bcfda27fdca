//! Device keys: PublishDeviceKey, RevokeDeviceKey, GetUserKeys and GetEscrowKey, from the wire
//! to the store and back, and the wire form of suites the other services share.
//!
//! A bundle is parsed and its self-signature checked before anything is stored: every field
//! well-formed (the encapsulation key validated by [`EncapsulationKey::from_slice`], which
//! refuses, among others, an X25519 part of low order), and the signature valid under the
//! bundle's own identity key.

use tonic::Status;

use super::error::KeyDirectoryError;
use crate::auth::Principal;
use crate::crypto::ids::{DeviceId, KeyId, UserId};
use crate::crypto::sign::{DeviceKeyBundle, IdentityPublicKey, Signature};
use crate::crypto::xwing::EncapsulationKey;
use crate::crypto::Suite;
use crate::proto::keyhold::v1 as pb;
use crate::service::{check_list_len, invalid, parse_field, require_acts_for, AppState};
use crate::store::user_keys::{NewUserKey, UserKey};
use crate::store::StoreError;

/// Most users one GetUserKeys call may name (fewer if `max_list_len` is lower).
const MAX_LOOKUP_USERS: usize = 100;

/// Parses a wire suite, naming the field.
pub(crate) fn parse_suite(field: &str, value: i32) -> Result<Suite, Status> {
    match pb::Suite::try_from(value) {
        Ok(pb::Suite::XwingAes256gcmV1) => Ok(Suite::XWingAes256GcmV1),
        Ok(pb::Suite::Unspecified) => Err(invalid(field, "must be set")),
        Err(_) => Err(invalid(field, format!("unknown value {value}"))),
    }
}

/// The wire value of a suite.
pub(crate) fn suite_to_wire(suite: Suite) -> i32 {
    match suite {
        Suite::XWingAes256GcmV1 => pb::Suite::XwingAes256gcmV1 as i32,
    }
}

/// Parses and verifies a PublishDeviceKey request: every field well-formed and the bundle's
/// self-signature valid under its own identity key.
pub(crate) fn parse_bundle(
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

/// Parses the users of a lookup, `field[i]` each, dropping repeats (first occurrence kept).
pub(super) fn parse_users(field: &str, ids: &[String]) -> Result<Vec<UserId>, Status> {
    let mut users = Vec::with_capacity(ids.len());
    for (i, u) in ids.iter().enumerate() {
        let user = parse_field(&format!("{field}[{i}]"), UserId::new(u.clone()))?;
        if !users.contains(&user) {
            users.push(user);
        }
    }
    Ok(users)
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

/// The device's current identity key bytes, or [`KeyDirectoryError::NoCurrentKey`].
pub(super) async fn current_identity_key(
    state: &AppState,
    user: &UserId,
    device: &DeviceId,
) -> Result<Vec<u8>, KeyDirectoryError> {
    let keys = (state.store.conn().await?)
        .current_user_keys(std::slice::from_ref(user))
        .await?;
    keys.into_iter()
        .find(|k| &k.device == device)
        .map(|k| k.identity_key)
        .ok_or_else(|| KeyDirectoryError::NoCurrentKey {
            user: user.clone(),
            device: device.clone(),
        })
}

/// PublishDeviceKey: a checked bundle becomes the device's current key.
pub(super) async fn publish(
    state: &AppState,
    caller: &Principal,
    req: pb::PublishDeviceKeyRequest,
) -> Result<pb::PublishDeviceKeyResponse, Status> {
    let (bundle, signature) = parse_bundle(&req)?;
    require_acts_for(caller, &bundle.user, Some(&bundle.device))?;
    let key_id = bundle.encapsulation_key.key_id();
    let key = NewUserKey {
        key_id,
        user: bundle.user,
        device: bundle.device,
        suite: bundle.suite,
        encapsulation_key: bundle.encapsulation_key.to_bytes(),
        identity_key: bundle.identity_key.as_bytes().to_vec(),
        signature: signature.as_bytes().to_vec(),
    };
    let published = state
        .store
        .transaction(async |tx| tx.publish_user_key(&key).await)
        .await?;
    Ok(pb::PublishDeviceKeyResponse {
        key_id: key_id.as_bytes().to_vec(),
        version: published.version,
    })
}

/// RevokeDeviceKey: the key stays on file, no longer current; answers when it was revoked.
pub(super) async fn revoke(
    state: &AppState,
    caller: &Principal,
    req: pb::RevokeDeviceKeyRequest,
) -> Result<pb::RevokeDeviceKeyResponse, Status> {
    let user = parse_field("user_id", UserId::new(req.user_id))?;
    let device = parse_field("device_id", DeviceId::new(req.device_id))?;
    let key_id = parse_field("key_id", KeyId::from_slice(&req.key_id))?;
    require_acts_for(caller, &user, Some(&device))?;
    let key = state
        .store
        .transaction(async |tx| -> Result<_, StoreError> {
            tx.revoke_user_key(&user, &device, &key_id).await?;
            tx.user_key(&key_id).await
        })
        .await?;
    Ok(pb::RevokeDeviceKeyResponse {
        revoked_at: key
            .and_then(|k| k.revoked_at)
            .map_or(0, |t| t.unix_micros()),
    })
}

/// GetUserKeys: the current keys of every device of each user named, in the order named.
pub(super) async fn get_user_keys(
    state: &AppState,
    _caller: &Principal,
    req: pb::GetUserKeysRequest,
) -> Result<pb::GetUserKeysResponse, Status> {
    check_list_len(
        "user_ids",
        req.user_ids.len(),
        state.max_list_len.min(MAX_LOOKUP_USERS),
        true,
    )?;
    let users = parse_users("user_ids", &req.user_ids)?;
    let keys = (state.store.conn().await?)
        .current_user_keys(&users)
        .await?;
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
    Ok(pb::GetUserKeysResponse { users: out })
}

/// GetEscrowKey: the staff escrow public key every DEK is sealed to.
pub(super) async fn get_escrow_key(
    state: &AppState,
    _caller: &Principal,
    _req: pb::GetEscrowKeyRequest,
) -> Result<pb::GetEscrowKeyResponse, Status> {
    let key = &state.escrow_public_key;
    Ok(pb::GetEscrowKeyResponse {
        escrow_key_id: key.key_id().as_bytes().to_vec(),
        encapsulation_key: key.to_bytes(),
        suite: suite_to_wire(Suite::XWingAes256GcmV1),
    })
}
