//! The KeyDirectory service: devices publish and revoke their public key bundles; app servers
//! and devices look up users' current keys. Devices upload signed post-quantum prekeys, claim
//! other devices' prekeys, and count or watch their own stock.
//!
//! The calls live by concern, each from the wire to the store and back; this module is only
//! the tonic door that hands each call to its concern:
//!
//! - [`device_keys`]: PublishDeviceKey, RevokeDeviceKey, GetUserKeys, GetEscrowKey, and the
//!   wire form of suites ([`parse_suite`], [`suite_to_wire`]) that other services share;
//! - [`prekeys`]: UploadPrekeys, CountPrekeys, ClaimPrekeys. Each prekey is checked against
//!   the device's current identity key before it is stored, and remembers that key. Claims
//!   hand out each one-time prekey exactly once, across replicas ([`crate::store::prekeys`]),
//!   rate-limited per claimer and target device with the counter in the database;
//! - [`stock`]: WatchPrekeyStock, the low-stock signal as a stream of its own, woken by claims
//!   on any replica ([`crate::store::events`]).
//!
//! What the workflows refuse is a [`KeyDirectoryError`](error::KeyDirectoryError), reported
//! through the one mapping to `Status` ([`crate::service::error`]).

mod device_keys;
mod error;
mod prekeys;
mod stock;

use tonic::{Request, Response, Status};

use super::AppState;
use crate::auth::{principal, Principal};
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::key_directory_server::KeyDirectory;

pub use device_keys::{parse_bundle, parse_suite, suite_to_wire};
pub use prekeys::MAX_CLAIM_USERS;
pub(crate) use prekeys::PREKEY_CLAIMS;
pub(crate) use stock::PREKEY_LOW_STOCK_EVENTS;

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

/// The authenticated caller of a request, and its message.
fn caller_and_message<T>(request: Request<T>) -> Result<(Principal, T), Status> {
    let caller = principal(&request)?.clone();
    Ok((caller, request.into_inner()))
}

#[tonic::async_trait]
impl KeyDirectory for KeyDirectoryService {
    type WatchPrekeyStockStream = stock::WatchPrekeyStockStream;

    async fn publish_device_key(
        &self,
        request: Request<pb::PublishDeviceKeyRequest>,
    ) -> Result<Response<pb::PublishDeviceKeyResponse>, Status> {
        let (caller, req) = caller_and_message(request)?;
        device_keys::publish(&self.state, &caller, req)
            .await
            .map(Response::new)
    }

    async fn revoke_device_key(
        &self,
        request: Request<pb::RevokeDeviceKeyRequest>,
    ) -> Result<Response<pb::RevokeDeviceKeyResponse>, Status> {
        let (caller, req) = caller_and_message(request)?;
        device_keys::revoke(&self.state, &caller, req)
            .await
            .map(Response::new)
    }

    async fn get_user_keys(
        &self,
        request: Request<pb::GetUserKeysRequest>,
    ) -> Result<Response<pb::GetUserKeysResponse>, Status> {
        let (caller, req) = caller_and_message(request)?;
        device_keys::get_user_keys(&self.state, &caller, req)
            .await
            .map(Response::new)
    }

    async fn get_escrow_key(
        &self,
        request: Request<pb::GetEscrowKeyRequest>,
    ) -> Result<Response<pb::GetEscrowKeyResponse>, Status> {
        let (caller, _) = caller_and_message(request)?;
        device_keys::get_escrow_key(&self.state, &caller).map(Response::new)
    }

    async fn upload_prekeys(
        &self,
        request: Request<pb::UploadPrekeysRequest>,
    ) -> Result<Response<pb::UploadPrekeysResponse>, Status> {
        let (caller, req) = caller_and_message(request)?;
        prekeys::upload(&self.state, &caller, req)
            .await
            .map(Response::new)
    }

    async fn claim_prekeys(
        &self,
        request: Request<pb::ClaimPrekeysRequest>,
    ) -> Result<Response<pb::ClaimPrekeysResponse>, Status> {
        let (caller, req) = caller_and_message(request)?;
        prekeys::claim(&self.state, &caller, req)
            .await
            .map(Response::new)
    }

    async fn count_prekeys(
        &self,
        request: Request<pb::CountPrekeysRequest>,
    ) -> Result<Response<pb::CountPrekeysResponse>, Status> {
        let (caller, req) = caller_and_message(request)?;
        prekeys::count(&self.state, &caller, req)
            .await
            .map(Response::new)
    }

    async fn watch_prekey_stock(
        &self,
        request: Request<pb::WatchPrekeyStockRequest>,
    ) -> Result<Response<Self::WatchPrekeyStockStream>, Status> {
        let (caller, req) = caller_and_message(request)?;
        stock::watch(&self.state, &caller, req)
            .await
            .map(Response::new)
    }
}
