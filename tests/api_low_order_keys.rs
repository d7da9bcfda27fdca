//! Issue 16: a device key bundle whose X-Wing X25519 part is a low-order point is refused over
//! gRPC as INVALID_ARGUMENT naming `encapsulation_key`, on SQLite and PostgreSQL, and nothing
//! is stored: neither a first key nor a replacement of the current one. (Every wrap to such a
//! key would fail, so one device could break every session it is a recipient of.)
//!
//! The requests are self-signed properly (`tests/common/low_order.rs`), and the same signing
//! path with a valid key is accepted, so the refusal is the key check.

mod common;

use common::low_order::{self, publish_request, with_x25519_part, LOW_ORDER_X25519};
use common::server::{TestDevice, TestServer};
use keyhold::client::Client;
use keyhold::proto::keyhold::v1 as pb;

/// The devices GetUserKeys lists for `user`, as (device id, key id, version).
async fn listed_keys(app: &Client, user: &str) -> Vec<(String, Vec<u8>, u32)> {
    let users = app
        .key_directory()
        .get_user_keys(pb::GetUserKeysRequest {
            user_ids: vec![user.into()],
        })
        .await
        .expect("get user keys")
        .into_inner()
        .users;
    assert_eq!(users.len(), 1);
    users[0]
        .devices
        .iter()
        .map(|k| (k.device_id.clone(), k.key_id.clone(), k.version))
        .collect()
}

/// Publishes a bundle of `d` carrying each low-order X25519 part, through `client`: each is
/// INVALID_ARGUMENT naming `encapsulation_key`.
async fn refuse_every_low_order_key(client: &Client, d: &TestDevice) {
    for (name, u) in LOW_ORDER_X25519 {
        let key = with_x25519_part(d.xwing.encapsulation_key(), u);
        low_order::assert_refused(
            client
                .key_directory()
                .publish_device_key(publish_request(d, &key))
                .await,
            name,
            "encapsulation_key",
        );
    }
}

async fn low_order_device_keys_are_refused_and_nothing_is_stored(server: &TestServer) {
    let app = server
        .client(&server.token(pb::Role::App, "", "").await)
        .await;
    let phone = TestDevice::new(
        "alice",
        "phone",
        server.token(pb::Role::Device, "alice", "phone").await,
    );
    let laptop = TestDevice::new("alice", "laptop", String::new());

    // A first key: by the device itself, and by an app server acting for a user.
    refuse_every_low_order_key(&phone.client(server).await, &phone).await;
    refuse_every_low_order_key(&app, &laptop).await;
    assert!(
        listed_keys(&app, "alice").await.is_empty(),
        "nothing stored"
    );

    // The same signing path with the device's valid key is accepted.
    let valid = phone.xwing.encapsulation_key();
    let published = phone
        .client(server)
        .await
        .key_directory()
        .publish_device_key(publish_request(&phone, &valid.to_bytes()))
        .await
        .expect("the valid key is published")
        .into_inner();
    assert_eq!(published.version, 1);
    let current = vec![("phone".to_string(), valid.key_id().as_bytes().to_vec(), 1)];
    assert_eq!(listed_keys(&app, "alice").await, current);

    // A replacement of the current key: refused, and the current key stays as it was.
    refuse_every_low_order_key(&phone.client(server).await, &phone).await;
    refuse_every_low_order_key(&app, &phone).await;
    assert_eq!(listed_keys(&app, "alice").await, current);
}

on_both_servers! {
    low_order_x25519_device_keys_are_invalid_argument_and_store_nothing => low_order_device_keys_are_refused_and_nothing_is_stored;
}
