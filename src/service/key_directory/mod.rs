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

use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::key_directory_server::KeyDirectory;
use device_keys::{
    get_escrow_key, get_user_keys, publish as publish_device_key, revoke as revoke_device_key,
};
use prekeys::{claim as claim_prekeys, count as count_prekeys, upload as upload_prekeys};
use stock::watch as watch_prekey_stock;

pub(crate) use device_keys::parse_suite;
pub(crate) use prekeys::PREKEY_CLAIMS;
pub(crate) use stock::PREKEY_LOW_STOCK_EVENTS;

rpc_service! {
    /// The KeyDirectory gRPC service.
    KeyDirectoryService: KeyDirectory {
        type WatchPrekeyStockStream = stock::WatchPrekeyStockStream;
        fn publish_device_key(pb::PublishDeviceKeyRequest) -> pb::PublishDeviceKeyResponse, by [App, Device];
        fn revoke_device_key(pb::RevokeDeviceKeyRequest) -> pb::RevokeDeviceKeyResponse, by [App, Device];
        fn get_user_keys(pb::GetUserKeysRequest) -> pb::GetUserKeysResponse, by [App, Device];
        fn get_escrow_key(pb::GetEscrowKeyRequest) -> pb::GetEscrowKeyResponse, by [App, Device];
        fn upload_prekeys(pb::UploadPrekeysRequest) -> pb::UploadPrekeysResponse, by [Device];
        fn claim_prekeys(pb::ClaimPrekeysRequest) -> pb::ClaimPrekeysResponse, by [Device];
        fn count_prekeys(pb::CountPrekeysRequest) -> pb::CountPrekeysResponse, by [Device];
        fn watch_prekey_stock(pb::WatchPrekeyStockRequest) -> Self::WatchPrekeyStockStream, by [Device];
    }
}
