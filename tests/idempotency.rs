//! Idempotency keys (issue 10), end to end over gRPC on SQLite and PostgreSQL, and across two
//! replicas on one PostgreSQL:
//!
//! - each of the seven calls that create or consume (CreateSession in both modes,
//!   AddRecipients, RemoveRecipients, RotateSession, ClaimPrekeys, SendKeyPackages,
//!   CreateToken) replays its first answer to a retry with the same key and writes nothing:
//!   every table it could write is counted before and after;
//! - the same key with another request, or for another call, is INVALID_ARGUMENT naming
//!   `idempotency_key`; another caller's same key is its own;
//! - a SERVICE_WRAPPED replay returns the same plaintext DEK (opened again from the service
//!   copy) and CreateToken's replay the same token, while no stored byte holds either;
//! - a key past its retention counts as new, and expired records are purged;
//! - concurrent calls with one key, on one server or two replicas, do the work once;
//! - the lost answer: the first try commits but its answer never reaches the client, which
//!   retries with the same key ([`Client::retrying`]) — also after the replica that committed
//!   has stopped.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::leaks::{contains, forms, stored_bytes};
use common::raw_db::RawDb;
use common::requests::{
    assert_code, current_keys, fresh_key_set, open_own_key, service_wrapped_request,
    signed_prekeys, upload_request, user_ids, WrapTarget,
};
use common::server::{TestDevice, TestServer};
use common::world::World;
use common::TestDb;
use diesel::QueryableByName;
use keyhold::client::Client;
use keyhold::config::Limits;
use keyhold::crypto::ids::{Epoch, SessionId};
use keyhold::proto::keyhold::v1 as pb;
use tonic::{Code, Status};

// ---------------------------------------------------------------------------------------------
// What a call wrote.

/// Rows of every table a keyed call may write, read behind the server's back.
#[derive(QueryableByName, Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    sessions: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    epochs: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    session_keys: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    session_members: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    removed_members: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    staff_keys: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    service_keys: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    audit_events: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    api_tokens: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    prekeys: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    prekey_claims: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    key_packages: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    idempotency_records: i64,
}

const COUNTS_SQL: &str = "SELECT \
    (SELECT COUNT(*) FROM sessions) AS sessions, \
    (SELECT CAST(COALESCE(SUM(current_epoch), 0) AS BIGINT) FROM sessions) AS epochs, \
    (SELECT COUNT(*) FROM session_keys) AS session_keys, \
    (SELECT COUNT(*) FROM session_members) AS session_members, \
    (SELECT COUNT(*) FROM session_members WHERE removed_epoch IS NOT NULL) AS removed_members, \
    (SELECT COUNT(*) FROM staff_keys) AS staff_keys, \
    (SELECT COUNT(*) FROM service_keys) AS service_keys, \
    (SELECT COUNT(*) FROM audit_events) AS audit_events, \
    (SELECT COUNT(*) FROM api_tokens) AS api_tokens, \
    (SELECT COUNT(*) FROM prekeys) AS prekeys, \
    (SELECT CAST(COALESCE(SUM(claims), 0) AS BIGINT) FROM prekey_claim_windows) AS prekey_claims, \
    (SELECT COUNT(*) FROM key_packages) AS key_packages, \
    (SELECT COUNT(*) FROM idempotency_records) AS idempotency_records";

async fn counts(db: &TestDb) -> Counts {
    let query = diesel::sql_query(COUNTS_SQL);
    match &mut RawDb::open(db).await {
        RawDb::Sqlite(conn) => diesel::RunQueryDsl::get_result(query, conn),
        RawDb::Postgres(conn) => diesel_async::RunQueryDsl::get_result(query, conn.as_mut()).await,
    }
    .expect("count rows")
}

/// `counts` with `change` applied: what a call is expected to have written.
fn plus(counts: Counts, change: impl FnOnce(&mut Counts)) -> Counts {
    let mut c = counts;
    change(&mut c);
    c
}

/// Runs `call` once and checks it wrote `expected` (from the counts before it), then runs it
/// again — a retry with the same key — and checks the retry returned the same answer and wrote
/// nothing. Returns the answer.
async fn replayed<T, F, Fut>(
    server: &TestServer,
    what: &str,
    expected: impl FnOnce(&mut Counts),
    mut call: F,
) -> T
where
    T: PartialEq + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let before = counts(&server.db).await;
    let first = call().await.unwrap_or_else(|e| panic!("{what}: {e:?}"));
    let after = counts(&server.db).await;
    assert_eq!(
        after,
        plus(before, |c| {
            expected(c);
            c.idempotency_records += 1;
        }),
        "{what}: the first call wrote what it does, and one idempotency record"
    );
    let again = call()
        .await
        .unwrap_or_else(|e| panic!("{what}, retried: {e:?}"));
    assert_eq!(again, first, "{what}: the retry returns the first answer");
    assert_eq!(
        counts(&server.db).await,
        after,
        "{what}: the retry wrote nothing"
    );
    first
}

/// A key unique to this test run.
fn key(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::now_v7().simple())
}

fn claim_request(target: &TestDevice, key: &str) -> pb::ClaimPrekeysRequest {
    pb::ClaimPrekeysRequest {
        devices: vec![pb::DeviceRef {
            user_id: target.user.to_string(),
            device_id: target.device.to_string(),
        }],
        user_ids: Vec::new(),
        idempotency_key: key.into(),
    }
}

fn dek_request(key: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        return_plaintext_dek: true,
        idempotency_key: key.into(),
        ..service_wrapped_request("alice", &["bob"])
    }
}

async fn create(
    client: &Client,
    request: &pb::CreateSessionRequest,
) -> Result<pb::CreateSessionResponse, Status> {
    client
        .sessions()
        .create_session(request.clone())
        .await
        .map(tonic::Response::into_inner)
}

async fn claim(
    client: &Client,
    request: &pb::ClaimPrekeysRequest,
) -> Result<pb::ClaimPrekeysResponse, Status> {
    client
        .key_directory()
        .claim_prekeys(request.clone())
        .await
        .map(tonic::Response::into_inner)
}

async fn stock_up(server: &TestServer, d: &TestDevice, n: usize) {
    let (one_time, _) = signed_prekeys(d, n);
    d.client(server)
        .await
        .key_directory()
        .upload_prekeys(upload_request(d, one_time, None))
        .await
        .expect("upload prekeys");
}

// ---------------------------------------------------------------------------------------------
// Each call replays.

async fn every_keyed_call_replays_its_answer_and_writes_nothing(server: &TestServer) {
    let w = World::new(server).await;
    stock_up(server, &w.bob_phone, 3).await;

    // CreateSession, SERVICE_WRAPPED, with the plaintext DEK.
    let request = dek_request(&key("create-sw"));
    let created = replayed(
        server,
        "CreateSession SERVICE_WRAPPED",
        |c| {
            c.sessions += 1;
            c.epochs += 1;
            c.session_keys += 4;
            c.session_members += 4;
            c.staff_keys += 1;
            c.service_keys += 1;
        },
        || create(&w.app, &request),
    )
    .await;
    assert_eq!(created.epoch, 1);
    assert_eq!(created.session_keys.len(), 4, "alice's and bob's devices");
    let session = SessionId::parse(&created.session_id).expect("session id");
    let opened = open_own_key(server, &w.bob_phone, session, Epoch::FIRST)
        .await
        .expect("bob's key");
    assert_eq!(
        created.plaintext_dek.as_deref(),
        Some(opened.expose_secret().as_slice()),
        "the replayed DEK is the session's DEK"
    );

    // CreateSession, CLIENT_WRAPPED, by alice's phone.
    let cw_session = SessionId::generate();
    let targets = WrapTarget::all_stored(&current_keys(server, &["alice", "bob"]).await);
    let mut cw_request = common::requests::client_wrapped_request(
        &w.alice_phone,
        cw_session,
        user_ids(&["bob"]),
        fresh_key_set(server, &w.alice_phone, cw_session, 1, &targets, true),
    );
    cw_request.idempotency_key = key("create-cw");
    let alice = w.alice_phone.client(server).await;
    let cw = replayed(
        server,
        "CreateSession CLIENT_WRAPPED",
        |c| {
            c.sessions += 1;
            c.epochs += 1;
            c.session_keys += 4;
            c.session_members += 4;
            c.staff_keys += 1;
        },
        || create(&alice, &cw_request),
    )
    .await;
    assert_eq!(cw.session_id, cw_session.to_string());

    // AddRecipients: carol joins epoch 1.
    let add = pb::AddRecipientsRequest {
        session_id: session.to_string(),
        user_ids: vec!["carol".into()],
        key_set: None,
        idempotency_key: key("add"),
    };
    let added = replayed(
        server,
        "AddRecipients",
        |c| {
            c.session_keys += 1;
            c.session_members += 1;
        },
        || async {
            w.app
                .sessions()
                .add_recipients(add.clone())
                .await
                .map(tonic::Response::into_inner)
        },
    )
    .await;
    assert_eq!((added.epoch, added.session_keys.len()), (1, 1));

    // RemoveRecipients: carol leaves, epoch 2.
    let remove = pb::RemoveRecipientsRequest {
        session_id: session.to_string(),
        user_ids: vec!["carol".into()],
        key_set: None,
        idempotency_key: key("remove"),
    };
    let removed = replayed(
        server,
        "RemoveRecipients",
        |c| {
            c.epochs += 1;
            c.session_keys += 4;
            c.removed_members += 1;
            c.staff_keys += 1;
            c.service_keys += 1;
        },
        || async {
            w.app
                .sessions()
                .remove_recipients(remove.clone())
                .await
                .map(tonic::Response::into_inner)
        },
    )
    .await;
    assert_eq!(removed.epoch, 2);

    // RotateSession: epoch 3, and only one.
    let rotate = pb::RotateSessionRequest {
        session_id: session.to_string(),
        key_set: None,
        idempotency_key: key("rotate"),
    };
    let rotated = replayed(
        server,
        "RotateSession",
        |c| {
            c.epochs += 1;
            c.session_keys += 4;
            c.staff_keys += 1;
            c.service_keys += 1;
        },
        || async {
            w.app
                .sessions()
                .rotate_session(rotate.clone())
                .await
                .map(tonic::Response::into_inner)
        },
    )
    .await;
    assert_eq!(rotated.epoch, 3);

    // ClaimPrekeys: one prekey burnt, however often the claim is retried.
    let claim_req = claim_request(&w.bob_phone, &key("claim"));
    let claimed = replayed(
        server,
        "ClaimPrekeys",
        |c| {
            c.prekeys -= 1;
            c.prekey_claims += 1;
        },
        || claim(&alice, &claim_req),
    )
    .await;
    assert_eq!(claimed.prekeys.len(), 1);
    assert_eq!(claimed.prekeys[0].kind, pb::PrekeyKind::OneTime as i32);

    // SendKeyPackages: one package in the laptop's inbox.
    let send = pb::SendKeyPackagesRequest {
        packages: vec![pb::OutgoingKeyPackage {
            recipient_user_id: "alice".into(),
            recipient_device_id: "laptop".into(),
            recipient_key_id: w
                .alice_laptop
                .xwing
                .encapsulation_key()
                .key_id()
                .as_bytes()
                .to_vec(),
            payload: b"sealed to the laptop".to_vec(),
        }],
        idempotency_key: key("send"),
    };
    let sent = replayed(
        server,
        "SendKeyPackages",
        |c| c.key_packages += 1,
        || async {
            alice
                .device_sync()
                .send_key_packages(send.clone())
                .await
                .map(tonic::Response::into_inner)
        },
    )
    .await;
    assert_eq!(sent.package_ids.len(), 1);

    // CreateToken: one token, one audit event.
    let admin = server.client(&server.admin_token).await;
    let token_req = pb::CreateTokenRequest {
        role: pb::Role::App as i32,
        label: "retried".into(),
        idempotency_key: key("token"),
        ..Default::default()
    };
    let token = replayed(
        server,
        "CreateToken",
        |c| {
            c.api_tokens += 1;
            c.audit_events += 1;
        },
        || async {
            admin
                .admin()
                .create_token(token_req.clone())
                .await
                .map(tonic::Response::into_inner)
        },
    )
    .await;
    assert!(token.token.starts_with("kh_"), "a token came back");
    server
        .client(&token.token)
        .await
        .key_directory()
        .get_escrow_key(pb::GetEscrowKeyRequest {})
        .await
        .expect("the replayed token is the token that was created");
}

// ---------------------------------------------------------------------------------------------
// Refusals and scope.

async fn a_key_names_one_request_of_one_caller(server: &TestServer) {
    let w = World::new(server).await;
    let k = key("once");
    let mut request = service_wrapped_request("alice", &["bob"]);
    request.idempotency_key = k.clone();
    let first = create(&w.app, &request).await.expect("create");
    let before = counts(&server.db).await;

    // The same key with other recipients, or for another call: refused, nothing written.
    let mut other = service_wrapped_request("alice", &["carol"]);
    other.idempotency_key = k.clone();
    assert_code(
        create(&w.app, &other).await,
        Code::InvalidArgument,
        "idempotency_key",
    );
    let rotate = pb::RotateSessionRequest {
        session_id: first.session_id.clone(),
        key_set: None,
        idempotency_key: k.clone(),
    };
    let err = w
        .app
        .sessions()
        .rotate_session(rotate)
        .await
        .expect_err("another call under the same key");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("idempotency_key") && err.message().contains("CreateSession"),
        "{err:?}"
    );
    // Malformed keys.
    for bad in ["with space".to_string(), "k".repeat(129), "tab\t".into()] {
        let mut bad_request = service_wrapped_request("alice", &["bob"]);
        bad_request.idempotency_key = bad;
        assert_code(
            create(&w.app, &bad_request).await,
            Code::InvalidArgument,
            "idempotency_key",
        );
    }
    assert_eq!(counts(&server.db).await, before, "refusals wrote nothing");

    // Another caller's key of the same text is its own: it does the work.
    let other_app = common::requests::role_client(server, pb::Role::App).await;
    let theirs = create(&other_app, &request).await.expect("another caller");
    assert_ne!(theirs.session_id, first.session_id);
    // And the first caller still gets its own answer.
    let again = create(&w.app, &request).await.expect("replay");
    assert_eq!(again.session_id, first.session_id);
    // A device's claim under the same text is its own too.
    stock_up(server, &w.bob_phone, 1).await;
    let claimed = claim(
        &w.alice_phone.client(server).await,
        &claim_request(&w.bob_phone, &k),
    )
    .await
    .expect("a device's claim under the same key text");
    assert_eq!(claimed.prekeys.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Secrets.

async fn replayed_secrets_come_back_but_are_never_stored(server: &TestServer) {
    let w = World::new(server).await;
    let request = dek_request(&key("dek"));
    let first = create(&w.app, &request).await.expect("create");
    let again = create(&w.app, &request).await.expect("replay");
    let dek = first.plaintext_dek.clone().expect("a DEK");
    assert_eq!(dek.len(), 32);
    assert_eq!(
        again.plaintext_dek.as_deref(),
        Some(dek.as_slice()),
        "the same DEK"
    );

    let admin = server.client(&server.admin_token).await;
    let token_req = pb::CreateTokenRequest {
        role: pb::Role::Device as i32,
        user_id: "dave".into(),
        device_id: "phone".into(),
        idempotency_key: key("token"),
        ..Default::default()
    };
    let mut issued = Vec::new();
    for _ in 0..2 {
        let mut r = admin
            .admin()
            .create_token(token_req.clone())
            .await
            .expect("create token")
            .into_inner();
        issued.push((std::mem::take(&mut r.token), r.token_id.clone()));
    }
    assert_eq!(issued[0], issued[1], "the replay returns the same token");
    let token = issued[0].0.clone();
    let secret = hex::decode(token.rsplit('_').next().expect("secret part")).expect("hex");

    // The store holds the token sealed, and neither secret in any form.
    let (stored, _) = stored_bytes(server).await;
    for (what, secret) in [
        ("the plaintext DEK", dek.as_slice()),
        ("the token", token.as_bytes()),
        ("the token's secret", secret.as_slice()),
    ] {
        for form in forms(secret) {
            assert!(
                !contains(&stored, &form),
                "{what} is stored ({})",
                String::from_utf8_lossy(&form)
            );
        }
    }
    let sealed: i64 = {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let q = diesel::sql_query(
            "SELECT COUNT(*) AS n FROM idempotency_records WHERE sealed_secret IS NOT NULL",
        );
        let row: N = match &mut RawDb::open(&server.db).await {
            RawDb::Sqlite(conn) => diesel::RunQueryDsl::get_result(q, conn),
            RawDb::Postgres(conn) => diesel_async::RunQueryDsl::get_result(q, conn.as_mut()).await,
        }
        .expect("count sealed");
        row.n
    };
    assert_eq!(sealed, 1, "only the token answer keeps a (sealed) secret");

    // Once the session is deleted, the DEK is no longer handed out, even to a replay.
    w.app
        .sessions()
        .delete_session(pb::DeleteSessionRequest {
            session_id: first.session_id.clone(),
        })
        .await
        .expect("delete");
    let err = create(&w.app, &request)
        .await
        .expect_err("a replay after the delete");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Retention.

const SHORT_RETENTION: Duration = Duration::from_secs(3);

fn short_retention() -> Limits {
    Limits {
        idempotency_retention: SHORT_RETENTION,
        ..Limits::default()
    }
}

async fn a_key_past_its_retention_is_new(server: &TestServer) {
    let w = World::new(server).await;
    let k = key("short");
    let mut request = service_wrapped_request("alice", &["bob"]);
    request.idempotency_key = k.clone();
    let first = create(&w.app, &request).await.expect("create");
    let replay = create(&w.app, &request)
        .await
        .expect("replay within retention");
    assert_eq!(replay.session_id, first.session_id);
    for name in ["a", "b", "c"] {
        let mut other = service_wrapped_request("alice", &["bob"]);
        other.idempotency_key = key(name);
        create(&w.app, &other).await.expect("more keys");
    }
    assert_eq!(counts(&server.db).await.idempotency_records, 4);
    tokio::time::sleep(SHORT_RETENTION + Duration::from_millis(500)).await;

    let before = counts(&server.db).await;
    let later = create(&w.app, &request)
        .await
        .expect("the same key, expired");
    assert_ne!(
        later.session_id, first.session_id,
        "an expired key is a new key"
    );
    let after = counts(&server.db).await;
    assert_eq!(after.sessions, before.sessions + 1);
    // Claiming the key purged the expired records (its own old one was replaced).
    assert_eq!(after.idempotency_records, 1, "expired records are purged");
    // The new record replays as usual.
    assert_eq!(
        create(&w.app, &request).await.expect("replay").session_id,
        later.session_id
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrency and lost answers.

const CONCURRENT: usize = 8;

/// `CONCURRENT` calls of `call` at once (`call(i)` for the i-th): every answer.
async fn all_at_once<T, F, Fut>(call: F) -> Vec<Result<T, Status>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>> + Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(CONCURRENT));
    let tasks: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let (barrier, call) = (Arc::clone(&barrier), call(i));
            tokio::spawn(async move {
                barrier.wait().await;
                call.await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// Concurrent CreateSession and ClaimPrekeys calls, each with one key, spread over `clients`
/// (one server, or replicas of one database): each does its work once, and every caller gets
/// the same answer.
async fn concurrent_calls_do_the_work_once(server: &TestServer, app: &[Client], alice: &[Client]) {
    let before = counts(&server.db).await;
    let request = dek_request(&key("together"));
    let answers = all_at_once(|i| {
        let (client, request) = (app[i % app.len()].clone(), request.clone());
        async move { create(&client, &request).await }
    })
    .await;
    let answers: Vec<_> = answers
        .into_iter()
        .map(|a| a.expect("every concurrent call gets the answer"))
        .collect();
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "one answer for all"
    );
    let after = counts(&server.db).await;
    assert_eq!(after.sessions, before.sessions + 1, "one session");
    assert_eq!(after.idempotency_records, before.idempotency_records + 1);

    let request = claim_request_for("bob", "phone", &key("claim-together"));
    let answers = all_at_once(|i| {
        let (client, request) = (alice[i % alice.len()].clone(), request.clone());
        async move { claim(&client, &request).await }
    })
    .await;
    let answers: Vec<_> = answers
        .into_iter()
        .map(|a| a.expect("every concurrent claim gets the answer"))
        .collect();
    assert_eq!(answers[0].prekeys.len(), 1);
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "one prekey for all"
    );
    let claimed = counts(&server.db).await;
    assert_eq!(claimed.prekeys, after.prekeys - 1, "one prekey burnt");
    assert_eq!(
        claimed.prekey_claims,
        after.prekey_claims + 1,
        "one claim counted"
    );
}

fn claim_request_for(user: &str, device: &str, key: &str) -> pb::ClaimPrekeysRequest {
    pb::ClaimPrekeysRequest {
        devices: vec![pb::DeviceRef {
            user_id: user.into(),
            device_id: device.into(),
        }],
        user_ids: Vec::new(),
        idempotency_key: key.into(),
    }
}

async fn concurrent_calls_with_one_key_do_the_work_once(server: &TestServer) {
    let w = World::new(server).await;
    stock_up(server, &w.bob_phone, 5).await;
    let alice = w.alice_phone.client(server).await;
    concurrent_calls_do_the_work_once(server, std::slice::from_ref(&w.app), &[alice]).await;
}

/// The first try's answer never reaches the caller (it is dropped after the server committed);
/// [`Client::retrying`] tries again with the same key and gets the committed answer. `first`
/// and `retry` are the clients of the two tries (two replicas, or one server twice); `between`
/// runs after the first try (a replica stopping, say).
async fn a_lost_answer_is_replayed(
    server: &TestServer,
    first: &Client,
    retry: &Client,
    between: impl std::future::Future<Output = ()>,
) {
    let before = counts(&server.db).await;
    let request = pb::CreateSessionRequest {
        return_plaintext_dek: true,
        ..service_wrapped_request("alice", &["bob"])
    };
    assert!(
        request.idempotency_key.is_empty(),
        "the client draws the key"
    );
    let tries = AtomicU32::new(0);
    let lost = std::sync::Mutex::new(None);
    let between = std::sync::Mutex::new(Some(Box::pin(between)));
    let answer = first
        .retrying(request, |r| {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            let mut sessions = if n == 0 {
                first.sessions()
            } else {
                retry.sessions()
            };
            let (lost, between) = (&lost, &between);
            async move {
                let response = sessions.create_session(r.clone()).await?;
                if n == 0 {
                    // Committed; the answer is lost on the way back.
                    *lost.lock().unwrap() =
                        Some((r.idempotency_key.clone(), response.into_inner()));
                    let step = between.lock().unwrap().take();
                    if let Some(step) = step {
                        step.await;
                    }
                    return Err(Status::unavailable(
                        "the connection dropped before the answer",
                    ));
                }
                Ok(response)
            }
        })
        .await
        .expect("the retry gets the answer");
    assert_eq!(tries.load(Ordering::SeqCst), 2, "one retry");
    let (key, lost) = lost.lock().unwrap().take().expect("the first try ran");
    assert_eq!(key.len(), 32, "a 128-bit hex key");
    assert_eq!(
        answer, lost,
        "the retry returns the committed answer, DEK included"
    );
    let after = counts(&server.db).await;
    assert_eq!(after.sessions, before.sessions + 1, "one session, not two");
    assert_eq!(after.idempotency_records, before.idempotency_records + 1);
}

async fn a_lost_answer_on_one_server(server: &TestServer) {
    let w = World::new(server).await;
    a_lost_answer_is_replayed(server, &w.app, &w.app, async {}).await;
    // The plain client methods set a key of their own too.
    let before = counts(&server.db).await;
    w.app
        .create_session(service_wrapped_request("alice", &["bob"]))
        .await
        .expect("create through the retrying client");
    assert_eq!(
        counts(&server.db).await.idempotency_records,
        before.idempotency_records + 1,
        "Client::create_session sends a key"
    );
}

/// Two replicas on one PostgreSQL: concurrent same-key calls split over both do the work once,
/// and a retry on the second replica replays what the first committed, after the first has
/// stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_postgres_share_the_records() {
    let Some(db) = common::postgres_db().await else {
        return;
    };
    let server = TestServer::start(db).await;
    let replica = server.replica(Limits::default()).await;
    let w = World::new(&server).await;
    stock_up(&server, &w.bob_phone, 5).await;
    let app_token = server.token(pb::Role::App, "", "").await;
    let apps = [
        server.client(&app_token).await,
        replica.client(&app_token).await,
    ];
    let alices = [
        server.client(&w.alice_phone.token).await,
        replica.client(&w.alice_phone.token).await,
    ];
    concurrent_calls_do_the_work_once(&server, &apps, &alices).await;

    // A claim committed on the replica is replayed by the server.
    let request = claim_request(&w.bob_phone, &key("claim-across"));
    let there = claim(&alices[1], &request)
        .await
        .expect("claim on the replica");
    let before = counts(&server.db).await;
    let here = claim(&alices[0], &request)
        .await
        .expect("retry on the server");
    assert_eq!(here, there);
    assert_eq!(counts(&server.db).await, before, "the retry wrote nothing");

    // The replica that committed stops before the answer arrives; the retry goes elsewhere.
    let on_replica = replica.client(&app_token).await;
    a_lost_answer_is_replayed(&server, &on_replica, &apps[0], replica.stop()).await;
    server.stop().await;
}

/// On PostgreSQL a call whose key another unfinished transaction holds waits for it at the
/// unique index: past the lock timeout it is UNAVAILABLE naming `idempotency_key` and writes
/// nothing; once the holder has rolled back, the same call does the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_held_by_an_unfinished_call_is_waited_for() {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let Some(db) = common::postgres_db().await else {
        return;
    };
    let options = keyhold::store::StoreOptions {
        lock_timeout: Duration::from_millis(500),
        ..keyhold::store::StoreOptions::default()
    };
    let server = TestServer::start_with_options(db, Limits::default(), options).await;
    let _world = World::new(&server).await;
    let app_token = server.token(pb::Role::App, "", "").await;
    let app = server.client(&app_token).await;
    let token_id = app_token.split('_').nth(1).expect("token id");
    let k = key("held");
    let mut holder = diesel_async::AsyncPgConnection::establish(&server.db.url)
        .await
        .expect("connect");
    holder
        .batch_execute(&format!(
            "BEGIN; INSERT INTO idempotency_records \
             (scope, idempotency_key, rpc, request_hash, created_at) VALUES \
             ('app:{token_id}', '{k}', 'held', decode(repeat('00', 32), 'hex'), \
              (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)"
        ))
        .await
        .expect("hold the key");
    let before = counts(&server.db).await;
    let mut request = service_wrapped_request("alice", &["bob"]);
    request.idempotency_key = k;
    let err = create(&app, &request).await.expect_err("the key is held");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .starts_with("idempotency_key: a call with the same key"),
        "{err:?}"
    );
    assert_eq!(
        counts(&server.db).await,
        before,
        "the waiting call wrote nothing"
    );
    holder.batch_execute("ROLLBACK").await.expect("roll back");
    create(&app, &request)
        .await
        .expect("after the holder rolled back");
    assert_eq!(counts(&server.db).await.sessions, before.sessions + 1);
    server.stop().await;
}

on_both_servers! {
    every_keyed_call_replays => every_keyed_call_replays_its_answer_and_writes_nothing;
    a_key_is_one_request_of_one_caller => a_key_names_one_request_of_one_caller;
    replayed_secrets_are_never_stored => replayed_secrets_come_back_but_are_never_stored;
    concurrent_calls_with_one_key => concurrent_calls_with_one_key_do_the_work_once;
    lost_answers_are_replayed => a_lost_answer_on_one_server;
}

on_both_servers_with! {
    keys_past_their_retention_are_new => a_key_past_its_retention_is_new(short_retention);
}
