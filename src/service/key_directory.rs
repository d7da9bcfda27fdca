//! The KeyDirectory service: devices publish and revoke their public key bundles; app servers
//! and devices look up users' current keys.

use tonic::{Request, Response, Status};

use super::{check_list_len, invalid, parse_field, require_acts_for, store_status, AppState};
use crate::auth::principal;
use crate::crypto::ids::{DeviceId, KeyId, UserId};
use crate::crypto::sign::{DeviceKeyBundle, IdentityPublicKey, Signature};
use crate::crypto::xwing::EncapsulationKey;
use crate::crypto::Suite;
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::key_directory_server::KeyDirectory;
use crate::store::user_keys::{NewUserKey, UserKey};

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

#[tonic::async_trait]
impl KeyDirectory for KeyDirectoryService {
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
}
