//! The start-up screening of stored encapsulation keys, on SQLite and PostgreSQL: a device
//! key and a prekey stored before the parser refused low-order X25519 parts (u = p − 1) are
//! taken out of use once, each with an audit event in an intact chain; the job then records
//! its completion and does not run again; sessions that include the user work again.

mod common;

use common::requests::{
    self, role_client, service_wrapped_request, upload_request, verify_audit_log,
};
use common::server::{TestDevice, TestServer};
use common::Kind;
use keyhold::crypto::sign::PrekeyKind;
use keyhold::key_screening::{screen_stored_keys, ScreeningReport};
use keyhold::proto::keyhold::v1 as pb;

/// u = p − 1, a point of order 4 on the twist: every X25519 with it is all zero.
const P_MINUS_ONE: &str = "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f";

fn signed_prekey(d: &TestDevice, kind: PrekeyKind) -> pb::SignedPrekey {
    requests::signed_prekey(d, kind).0
}

async fn upload(server: &TestServer, d: &TestDevice, one_time: usize) {
    d.client(server)
        .await
        .key_directory()
        .upload_prekeys(upload_request(
            d,
            (0..one_time)
                .map(|_| signed_prekey(d, PrekeyKind::OneTime))
                .collect(),
            Some(signed_prekey(d, PrekeyKind::LastResort)),
        ))
        .await
        .expect("upload prekeys");
}

/// An SQL expression for `bytes` on the server's backend.
fn blob(server: &TestServer, bytes: &[u8]) -> String {
    match server.kind() {
        Kind::Sqlite => format!("X'{}'", hex::encode(bytes)),
        Kind::Postgres => format!("decode('{}', 'hex')", hex::encode(bytes)),
    }
}

/// `key` with its X25519 part replaced by u = p − 1.
fn with_low_order_x25519(mut key: Vec<u8>) -> Vec<u8> {
    let n = key.len();
    key[n - 32..].copy_from_slice(&hex::decode(P_MINUS_ONE).expect("hex"));
    key
}

async fn audit_events(server: &TestServer) -> Vec<pb::AuditEvent> {
    let staff = server.token(pb::Role::Staff, "", "").await;
    server
        .client(&staff)
        .await
        .escrow()
        .list_audit_events(pb::ListAuditEventsRequest {
            after_seq: 0,
            page_size: 1000,
        })
        .await
        .expect("list audit events")
        .into_inner()
        .events
}

async fn devices_of(server: &TestServer, user: &str) -> Vec<String> {
    let app = server.token(pb::Role::App, "", "").await;
    let answer = server
        .client(&app)
        .await
        .key_directory()
        .get_user_keys(pb::GetUserKeysRequest {
            user_ids: vec![user.into()],
        })
        .await
        .expect("get user keys")
        .into_inner();
    answer
        .users
        .into_iter()
        .flat_map(|u| u.devices)
        .map(|d| d.device_id)
        .collect()
}

async fn create_with(
    server: &TestServer,
    users: &[&str],
) -> Result<pb::CreateSessionResponse, tonic::Status> {
    role_client(server, pb::Role::App)
        .await
        .sessions()
        .create_session(service_wrapped_request("alice", users))
        .await
        .map(|r| r.into_inner())
}

async fn unusable_stored_keys_are_taken_out_once(server: &TestServer) {
    let alice = TestDevice::enroll(server, "alice", "phone").await;
    let mallory = TestDevice::enroll(server, "mallory", "phone").await;
    upload(server, &alice, 1).await;
    upload(server, &mallory, 2).await;
    // Keys stored before the parser had the rule: written behind the service's back (the test
    // server, unlike `keyhold serve`, does not screen at start).
    let bad_key = with_low_order_x25519(mallory.xwing.encapsulation_key().to_bytes());
    server
        .db
        .execute_raw(&format!(
            "UPDATE user_keys SET encapsulation_key = {} WHERE user_id = 'mallory';
             UPDATE prekeys SET encapsulation_key = {} WHERE id = \
               (SELECT MIN(id) FROM prekeys WHERE user_id = 'mallory');",
            blob(server, &bad_key),
            blob(server, &bad_key),
        ))
        .await;

    let report = screen_stored_keys(&server.store).await.expect("screen");
    assert_eq!(
        report,
        ScreeningReport {
            ran: true,
            device_keys_checked: 2,
            prekeys_checked: 5,
            device_keys_revoked: 1,
            prekeys_deleted: 1,
        }
    );

    // Once per database: the second start reads one row and nothing else.
    let again = screen_stored_keys(&server.store)
        .await
        .expect("screen again");
    assert_eq!(again, ScreeningReport::default());

    let events = audit_events(server).await;
    let revoked: Vec<_> = events
        .iter()
        .filter(|e| e.action == "device_key.revoke_unusable")
        .collect();
    assert_eq!(revoked.len(), 1, "{events:?}");
    assert_eq!(revoked[0].actor, "keyhold");
    assert!(
        revoked[0].target.contains("mallory/phone"),
        "{:?}",
        revoked[0]
    );
    assert!(revoked[0].reason.contains("low-order"), "{:?}", revoked[0]);
    let deleted: Vec<_> = events
        .iter()
        .filter(|e| e.action == "prekey.delete_unusable")
        .collect();
    assert_eq!(deleted.len(), 1, "{events:?}");
    assert!(
        deleted[0].target.contains("mallory/phone"),
        "{:?}",
        deleted[0]
    );

    let verdict = verify_audit_log(server).await;
    assert!(verdict.ok, "{verdict:?}");

    // mallory's device has no current key now; alice's was never touched.
    assert!(devices_of(server, "mallory").await.is_empty());
    assert_eq!(devices_of(server, "alice").await, vec!["phone".to_string()]);
    // So a session including mallory works again, and wraps for alice alone.
    let created = create_with(server, &["mallory"])
        .await
        .expect("create session");
    let holders: Vec<_> = created
        .session_keys
        .iter()
        .map(|k| (k.user_id.as_str(), k.device_id.as_str()))
        .collect();
    assert_eq!(holders, vec![("alice", "phone")]);

    // The device can publish a sound key again and is back in sessions.
    TestDevice::new("mallory", "phone", mallory.token.clone())
        .publish(server)
        .await;
    let created = create_with(server, &["mallory"])
        .await
        .expect("create session");
    assert_eq!(created.session_keys.len(), 2);
}

on_both_servers! {
    unusable_stored_keys_are_taken_out_once => unusable_stored_keys_are_taken_out_once;
}
