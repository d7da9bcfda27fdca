//! A device key stored before the key parser refused it (here: an X25519 part that is the
//! low-order point u = p − 1) must not break the sessions it would be wrapped for with an
//! INTERNAL error, nor be half-written around: every call that would wrap a DEK to it is
//! FAILED_PRECONDITION naming the user and device, and writes nothing; the same call without
//! that device succeeds, and once the device publishes a new key it is served again.
//! On SQLite and PostgreSQL.

mod common;

use common::raw_db::RawDb;
use common::server::{TestDevice, TestServer};
use keyhold::proto::keyhold::v1 as pb;
use tonic::Code;

/// u = p − 1 = 2^255 − 20, little-endian: a point of order 2 on the curve.
const X25519_P_MINUS_1: &str = "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f";

/// Overwrites the current key of `user`/`device` behind the server's back, as a key stored
/// before the parser's check would be.
async fn store_unsafe_key(db: &mut RawDb, d: &TestDevice) {
    use diesel::sql_types::{Binary, Text};
    let mut key = d.xwing.encapsulation_key().to_bytes();
    let len = key.len();
    key[len - 32..].copy_from_slice(&hex::decode(X25519_P_MINUS_1).expect("hex"));
    let sql = |p: [&str; 3]| {
        format!(
            "UPDATE user_keys SET encapsulation_key = {} WHERE user_id = {} AND device_id = {} \
             AND superseded_at IS NULL AND revoked_at IS NULL",
            p[0], p[1], p[2]
        )
    };
    let updated = match db {
        RawDb::Sqlite(conn) => diesel::RunQueryDsl::execute(
            diesel::sql_query(sql(["?", "?", "?"]))
                .bind::<Binary, _>(&key)
                .bind::<Text, _>(d.user.as_str())
                .bind::<Text, _>(d.device.as_str()),
            conn,
        ),
        RawDb::Postgres(conn) => {
            diesel_async::RunQueryDsl::execute(
                diesel::sql_query(sql(["$1", "$2", "$3"]))
                    .bind::<Binary, _>(&key)
                    .bind::<Text, _>(d.user.as_str())
                    .bind::<Text, _>(d.device.as_str()),
                conn.as_mut(),
            )
            .await
        }
    }
    .expect("overwrite the stored key");
    assert_eq!(updated, 1, "one current key overwritten");
}

fn users(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|u| u.to_string()).collect()
}

fn service_wrapped(author: &str, recipients: &[&str]) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        mode: pb::SessionMode::ServiceWrapped as i32,
        author_user_id: author.into(),
        recipients: Some(pb::create_session_request::Recipients::UserIds(
            pb::UserIdList {
                user_ids: users(recipients),
            },
        )),
        ..Default::default()
    }
}

fn add(session_id: &str, recipients: &[&str]) -> pb::AddRecipientsRequest {
    pb::AddRecipientsRequest {
        session_id: session_id.into(),
        user_ids: users(recipients),
        key_set: None,
        idempotency_key: String::new(),
    }
}

fn remove(session_id: &str, recipients: &[&str]) -> pb::RemoveRecipientsRequest {
    pb::RemoveRecipientsRequest {
        session_id: session_id.into(),
        user_ids: users(recipients),
        key_set: None,
        idempotency_key: String::new(),
    }
}

/// Runs `call` and checks it gets the refusal every call that would wrap to carol's phone
/// gets, and that it wrote nothing (no session, no key, no member, nothing else either).
async fn refused_naming_carols_phone<T: std::fmt::Debug>(
    db: &mut RawDb,
    what: &str,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) {
    let before = db.fingerprint().await;
    let err = call.await.expect_err(what);
    assert_eq!(err.code(), Code::FailedPrecondition, "{what}: {err:?}");
    let message = err.message();
    assert!(
        message
            .starts_with("user_ids: the current key of device carol/phone cannot be wrapped to (")
            && message.ends_with("; the device must publish a new key"),
        "{what}: {message}"
    );
    let after = db.fingerprint().await;
    assert_eq!(
        after.sessions, before.sessions,
        "{what}: a session was created"
    );
    assert_eq!(
        after.session_keys, before.session_keys,
        "{what}: a key was stored"
    );
    assert_eq!(after, before, "{what}: the refused call wrote something");
}

async fn unsafe_stored_key_refuses_every_wrap_to_it(server: &TestServer) {
    let mut db = RawDb::open(&server.db).await;
    let app = server
        .client(&server.token(pb::Role::App, "", "").await)
        .await;
    let mut sessions = app.sessions();
    let alice = TestDevice::enroll(server, "alice", "phone").await;
    TestDevice::enroll(server, "bob", "phone").await;
    let carol = TestDevice::enroll(server, "carol", "phone").await;
    // A session carol's phone is a member of, while its key was still fine.
    let with_carol = sessions
        .create_session(service_wrapped("alice", &["bob", "carol"]))
        .await
        .expect("create with carol")
        .into_inner()
        .session_id
        .clone();

    store_unsafe_key(&mut db, &carol).await;

    // CreateSession, service-wrapped, with carol among the recipients or as the author.
    let call = sessions.create_session(service_wrapped("alice", &["bob", "carol"]));
    refused_naming_carols_phone(&mut db, "create service-wrapped", call).await;
    let call = sessions.create_session(service_wrapped("carol", &["bob"]));
    refused_naming_carols_phone(&mut db, "create with carol as author", call).await;
    // CreateSession, client-wrapped by alice's phone: refused before its wraps are looked at.
    let client_wrapped = pb::CreateSessionRequest {
        mode: pb::SessionMode::ClientWrapped as i32,
        session_id: keyhold::crypto::ids::SessionId::generate().to_string(),
        author_user_id: "alice".into(),
        author_device_id: "phone".into(),
        recipients: Some(pb::create_session_request::Recipients::UserIds(
            pb::UserIdList {
                user_ids: users(&["carol"]),
            },
        )),
        key_set: Some(pb::ClientWrappedKeySet {
            epoch: 1,
            wraps: Vec::new(),
            escrow: None,
            signature: vec![0; 64],
        }),
        ..Default::default()
    };
    let mut by_alice = alice.client(server).await.sessions();
    let call = by_alice.create_session(client_wrapped);
    refused_naming_carols_phone(&mut db, "create client-wrapped", call).await;
    // A new epoch of a session carol's phone stays in: RotateSession, RemoveRecipients of
    // someone else.
    let call = sessions.rotate_session(pb::RotateSessionRequest {
        session_id: with_carol.clone(),
        key_set: None,
        idempotency_key: String::new(),
    });
    refused_naming_carols_phone(&mut db, "rotate", call).await;
    let call = sessions.remove_recipients(remove(&with_carol, &["bob"]));
    refused_naming_carols_phone(&mut db, "remove bob", call).await;

    // The same session without carol is created; adding carol to it is refused.
    let without_carol = sessions
        .create_session(service_wrapped("alice", &["bob"]))
        .await
        .expect("create without carol")
        .into_inner()
        .session_id
        .clone();
    let call = sessions.add_recipients(add(&without_carol, &["carol"]));
    refused_naming_carols_phone(&mut db, "add carol", call).await;

    // Removing carol from the session she is in needs no wrap to her key: it goes through.
    let removed = sessions
        .remove_recipients(remove(&with_carol, &["carol"]))
        .await
        .expect("remove carol")
        .into_inner();
    assert_eq!(removed.epoch, 2);
    assert!(removed.session_keys.iter().all(|k| k.user_id != "carol"));

    // Once carol's phone publishes a new key, it is wrapped for again.
    let carol = TestDevice::enroll(server, "carol", "phone").await;
    let added = sessions
        .add_recipients(add(&without_carol, &["carol"]))
        .await
        .expect("add carol with her new key")
        .into_inner();
    let new_key = carol.xwing.encapsulation_key().key_id();
    let keys: Vec<_> = added
        .session_keys
        .iter()
        .map(|k| {
            (
                k.user_id.as_str(),
                k.device_id.as_str(),
                k.key_id.as_slice(),
            )
        })
        .collect();
    assert_eq!(keys, [("carol", "phone", new_key.as_bytes().as_slice())]);
}

on_both_servers! {
    a_stored_low_order_key_is_failed_precondition_and_writes_nothing =>
        unsafe_stored_key_refuses_every_wrap_to_it;
}
