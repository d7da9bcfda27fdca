//! `keyhold db copy`: a SQLite database with every kind of record, written through a real
//! server over gRPC, copied to PostgreSQL; every read RPC answers the same over the copy;
//! a copy killed with SIGKILL mid-table resumes and validates; a row changed in the target
//! is caught by `--validate-only`; `--rollback` leaves the target as it was.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};

use common::cli::{keyhold, text};
use common::requests::{
    client_wrapped_request, key_set, service_wrapped_session, signed_prekey, signed_prekeys,
    upload_request, user_ids, wire_key_set, WrapTarget,
};
use common::server::{TestDevice, TestServer};
use common::world::World;
use keyhold::client::Client;
use keyhold::crypto::ids::{Epoch, MessageId, SessionId};
use keyhold::crypto::keys::Dek;
use keyhold::crypto::sign::PrekeyKind;
use keyhold::proto::keyhold::v1 as pb;

fn filler(session: SessionId, n: usize) -> pb::NewMessage {
    pb::NewMessage {
        message_id: MessageId::generate().to_string(),
        session_id: session.to_string(),
        epoch: 1,
        nonce: vec![7; 12],
        ciphertext: format!("filler message {n:08}------").into_bytes(),
        associated_data: n.is_multiple_of(2).then(|| b"kind=text".to_vec()),
    }
}

async fn put_messages(client: &Client, d: &TestDevice, messages: Vec<pb::NewMessage>) {
    client
        .messages()
        .put_messages(pb::PutMessagesRequest {
            author_user_id: d.user.to_string(),
            author_device_id: d.device.to_string(),
            messages,
        })
        .await
        .expect("put messages");
}

/// Everything the comparison reads with.
struct Fixture {
    world: World,
    app_token: String,
    staff_token: String,
    service_session: SessionId,
    client_session: SessionId,
}

/// Writes every kind of record through the server.
async fn populate(server: &TestServer, messages: usize) -> Fixture {
    let w = World::new(server).await;
    // sessions of both modes
    let service_session = service_wrapped_session(&w.app, "alice", &["bob", "carol"]).await;
    let client_session = SessionId::generate();
    let dek = Dek::generate().expect("dek");
    let set = key_set(
        &w.alice_phone,
        client_session,
        Epoch::FIRST,
        &dek,
        &WrapTarget::devices(&[&w.alice_phone, &w.alice_laptop, &w.bob_phone, &w.bob_laptop]),
        Some(server.escrow_key.encapsulation_key()),
    );
    let signature = w.alice_phone.identity.sign(&set);
    w.alice_phone
        .client(server)
        .await
        .sessions()
        .create_session(client_wrapped_request(
            &w.alice_phone,
            client_session,
            user_ids(&["bob"]),
            wire_key_set(&set, signature.as_bytes().to_vec()),
        ))
        .await
        .expect("client-wrapped session");
    // messages, one deleted
    let alice = w.alice_phone.client(server).await;
    let mut left = messages;
    let mut n = 0;
    while left > 0 {
        let chunk = left.min(200);
        let batch = (0..chunk).map(|i| filler(service_session, n + i)).collect();
        put_messages(&alice, &w.alice_phone, batch).await;
        n += chunk;
        left -= chunk;
    }
    let doomed = filler(service_session, 999_999);
    let doomed_id = doomed.message_id.clone();
    put_messages(&alice, &w.alice_phone, vec![doomed]).await;
    alice
        .messages()
        .delete_message(pb::DeleteMessageRequest {
            message_id: doomed_id,
        })
        .await
        .expect("delete message");
    // trust
    w.app
        .trust()
        .add_trusted_user(pb::AddTrustedUserRequest {
            author_user_id: "alice".into(),
            trusted_user_id: "bob".into(),
        })
        .await
        .expect("trust");
    // prekeys, and a claim (its rate window)
    let (one_time, _) = signed_prekeys(&w.bob_phone, 4);
    let (last_resort, _) = signed_prekey(&w.bob_phone, PrekeyKind::LastResort);
    w.bob_phone
        .client(server)
        .await
        .key_directory()
        .upload_prekeys(upload_request(&w.bob_phone, one_time, Some(last_resort)))
        .await
        .expect("upload prekeys");
    alice
        .key_directory()
        .claim_prekeys(pb::ClaimPrekeysRequest {
            user_ids: vec!["bob".into()],
            ..Default::default()
        })
        .await
        .expect("claim prekeys");
    // a ratchet state
    w.bob_phone
        .client(server)
        .await
        .ratchet()
        .put_ratchet_state(pb::PutRatchetStateRequest {
            user_id: "bob".into(),
            device_id: "phone".into(),
            conversation_id: "conv-1".into(),
            expected_version: 0,
            state: b"ratchet state one".to_vec(),
        })
        .await
        .expect("ratchet state");
    // a key package from alice's phone to her laptop
    alice
        .device_sync()
        .send_key_packages(pb::SendKeyPackagesRequest {
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
                payload: b"sealed package".to_vec(),
            }],
            idempotency_key: "kp-1".into(),
        })
        .await
        .expect("key package");
    // a token made with an idempotency key, and a revoked one
    let staff_token = server.token(pb::Role::Staff, "", "").await;
    let app_token = server.token(pb::Role::App, "", "").await;
    let admin = server.client(&server.admin_token).await;
    let made = admin
        .admin()
        .create_token(pb::CreateTokenRequest {
            role: pb::Role::App as i32,
            label: "idempotent".into(),
            idempotency_key: "tok-1".into(),
            ..Default::default()
        })
        .await
        .expect("token")
        .into_inner();
    admin
        .admin()
        .revoke_token(pb::RevokeTokenRequest {
            token_id: made.token_id.clone(),
        })
        .await
        .expect("revoke");
    // an audited escrow read
    server
        .client(&staff_token)
        .await
        .escrow()
        .get_escrowed_keys(pb::GetEscrowedKeysRequest {
            session_id: service_session.to_string(),
            epochs: vec![],
            reason: "ticket 42".into(),
        })
        .await
        .expect("escrow read");
    Fixture {
        world: w,
        app_token,
        staff_token,
        service_session,
        client_session,
    }
}

/// The answers of every read RPC, as text, over the server at `endpoint`.
async fn read_everything(endpoint: &str, f: &Fixture) -> Vec<String> {
    let c = |token: &str| {
        let (endpoint, token) = (endpoint.to_string(), token.to_string());
        async move { Client::connect(&endpoint, &token).await.expect("connect") }
    };
    let w = &f.world;
    let app = c(&f.app_token).await;
    let bob = c(&w.bob_phone.token).await;
    let alice_laptop = c(&w.alice_laptop.token).await;
    let staff = c(&f.staff_token).await;
    let mut out = Vec::new();
    macro_rules! read {
        ($call:expr) => {
            out.push(format!("{:?}", $call.await.map(|r| r.into_inner())))
        };
    }
    read!(app.key_directory().get_user_keys(pb::GetUserKeysRequest {
        user_ids: vec!["alice".into(), "bob".into(), "carol".into(), "erin".into()],
    }));
    read!(app
        .key_directory()
        .get_escrow_key(pb::GetEscrowKeyRequest {}));
    read!(bob.key_directory().count_prekeys(pb::CountPrekeysRequest {
        user_id: "bob".into(),
        device_id: "phone".into(),
    }));
    for s in [f.service_session, f.client_session] {
        read!(bob.sessions().get_session_keys(pb::GetSessionKeysRequest {
            session_id: s.to_string(),
            epoch: None,
        }));
    }
    read!(bob
        .sessions()
        .sync_session_keys(pb::SyncSessionKeysRequest {
            cursor: String::new(),
            page_size: 100,
        }));
    let mut cursor = String::new();
    loop {
        let page = bob
            .messages()
            .timeline(pb::TimelineRequest {
                user_id: "bob".into(),
                device_id: "phone".into(),
                cursor: cursor.clone(),
                page_size: 100,
            })
            .await
            .map(|r| r.into_inner());
        out.push(format!("{page:?}"));
        match page {
            Ok(p) if !p.next_cursor.is_empty() => cursor = p.next_cursor,
            _ => break,
        }
    }
    read!(bob
        .messages()
        .list_session_messages(pb::ListSessionMessagesRequest {
            user_id: "bob".into(),
            device_id: "phone".into(),
            session_id: f.service_session.to_string(),
            cursor: String::new(),
            page_size: 50,
        }));
    read!(bob
        .messages()
        .list_author_messages(pb::ListAuthorMessagesRequest {
            user_id: "bob".into(),
            device_id: "phone".into(),
            author_user_id: "alice".into(),
            cursor: String::new(),
            page_size: 50,
        }));
    read!(app.trust().list_trusted_users(pb::ListTrustedUsersRequest {
        author_user_id: "alice".into(),
        cursor: String::new(),
        page_size: 50,
    }));
    read!(bob.ratchet().get_ratchet_state(pb::GetRatchetStateRequest {
        user_id: "bob".into(),
        device_id: "phone".into(),
        conversation_id: "conv-1".into(),
    }));
    read!(alice_laptop
        .device_sync()
        .fetch_key_packages(pb::FetchKeyPackagesRequest {
            cursor: String::new(),
            page_size: 50,
        }));
    read!(staff
        .escrow()
        .list_audit_events(pb::ListAuditEventsRequest {
            after_seq: 0,
            page_size: 500,
        }));
    read!(staff
        .escrow()
        .verify_audit_log(pb::VerifyAuditLogRequest {}));
    out
}

fn db_copy(args: &[&str]) -> Output {
    keyhold()
        .args(["db", "copy"])
        .args(args)
        .env("KEYHOLD_PROGRESS", "plain")
        .output()
        .expect("run keyhold db copy")
}

fn report(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("report")).expect("report is JSON")
}

fn table<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("{name} in the report"))
}

async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_read_answers_the_same_over_the_copy() {
    let Some(target) = common::postgres_db().await else {
        return;
    };
    let server = TestServer::start(common::sqlite_db()).await;
    let fixture = populate(&server, 120).await;
    let before = read_everything(&server.endpoint, &fixture).await;
    let dir = common::cli::temp_dir();
    let report_path = dir.join("report.json");
    // The source stays in use: the server keeps running during the copy.
    let out = db_copy(&[
        "--from",
        &server.db.url,
        "--to",
        &target.url,
        "--batch-size",
        "7",
        "--report",
        report_path.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "copy failed: {}", text(&out.stderr));
    let r = report(&report_path);
    for name in [
        "user_keys",
        "sessions",
        "session_keys",
        "session_members",
        "staff_keys",
        "service_keys",
        "audit_events",
        "api_tokens",
        "messages",
        "trusted_users",
        "prekeys",
        "prekey_claim_windows",
        "ratchet_states",
        "key_packages",
        "idempotency_records",
    ] {
        let t = table(&r, name);
        assert!(
            t["rows"].as_u64().expect("rows") > 0,
            "{name} has rows: {t}"
        );
        assert_eq!(t["source_sha256"], t["target_sha256"], "{name}");
    }
    assert_eq!(table(&r, "messages")["rows"], 121);
    assert!(r["audit_events"].as_u64().expect("audit") > 0);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("copy messages: started"), "{stderr}");
    assert!(stderr.contains("db copy: "), "{stderr}");

    let replica = server.replica_over(&target.url).await;
    let after = read_everything(&replica.endpoint, &fixture).await;
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert!(!b.starts_with("Err"), "the original answers: {b}");
        assert_eq!(b, a);
    }
    // The copy's sequences are past the copied ids: new rows get fresh ids on PostgreSQL.
    let bob = replica.client(&fixture.world.bob_phone.token).await;
    bob.ratchet()
        .put_ratchet_state(pb::PutRatchetStateRequest {
            user_id: "bob".into(),
            device_id: "phone".into(),
            conversation_id: "conv-2".into(),
            expected_version: 0,
            state: b"new on postgres".to_vec(),
        })
        .await
        .expect("a write over the copy");
    let (more, _) = signed_prekeys(&fixture.world.bob_phone, 2);
    bob.key_directory()
        .upload_prekeys(upload_request(&fixture.world.bob_phone, more, None))
        .await
        .expect("new prekeys get fresh ids");
    replica.stop().await;
    server.stop().await;
}

/// Runs `keyhold db copy` with a batch of one row and kills it (SIGKILL) once it reports
/// progress inside the messages table.
fn copy_killed_mid_messages(from: &str, to: &str) -> Vec<String> {
    let mut child: std::process::Child = keyhold()
        .args([
            "db",
            "copy",
            "--from",
            from,
            "--to",
            to,
            "--batch-size",
            "1",
        ])
        .env("KEYHOLD_PROGRESS", "plain")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn keyhold db copy");
    let stderr = child.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("line");
        seen.push(line.clone());
        // The periodic line, "copy messages: N/M rows (…)", comes after the first batches.
        if line.starts_with("copy messages: ") && !line.contains("started") {
            child.kill().expect("SIGKILL");
            break;
        }
    }
    let status = child.wait().expect("wait");
    assert!(
        !status.success(),
        "the copy was killed, not finished: {seen:?}"
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_copy_resumes_validation_catches_changes_and_rollback_restores() {
    let Some(target) = common::postgres_db().await else {
        return;
    };
    let server = TestServer::start(common::sqlite_db()).await;
    let w = World::new(&server).await;
    let session = service_wrapped_session(&w.app, "alice", &["bob"]).await;
    let alice = w.alice_phone.client(&server).await;
    const MESSAGES: usize = 3000;
    for chunk in 0..MESSAGES / 200 {
        let batch = (0..200).map(|i| filler(session, chunk * 200 + i)).collect();
        put_messages(&alice, &w.alice_phone, batch).await;
    }
    // The server keeps running on the source throughout.
    let from = server.db.url.clone();

    let seen = copy_killed_mid_messages(&from, &target.url);
    let db = pg(&target.url).await;
    let copied: i64 = db
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .expect("count")
        .get(0);
    assert!(
        copied > 0 && (copied as usize) < MESSAGES,
        "killed mid-table: {copied} of {MESSAGES} messages copied; {seen:?}"
    );

    // A fresh copy refuses the half-written target; --resume finishes it.
    let refused = db_copy(&["--from", &from, "--to", &target.url]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("--resume"),
        "{}",
        text(&refused.stderr)
    );
    let dir = common::cli::temp_dir();
    let report_path = dir.join("resumed.json");
    let resumed = db_copy(&[
        "--from",
        &from,
        "--to",
        &target.url,
        "--resume",
        "--batch-size",
        "500",
        "--report",
        report_path.to_str().expect("utf-8"),
    ]);
    assert!(
        resumed.status.success(),
        "resume: {}",
        text(&resumed.stderr)
    );
    let r = report(&report_path);
    let m = table(&r, "messages");
    assert_eq!(m["rows"], MESSAGES as u64);
    assert_eq!(m["already_copied"], copied as u64);
    assert_eq!(m["copied"], (MESSAGES as u64) - copied as u64);
    assert_eq!(m["source_sha256"], m["target_sha256"]);

    // --validate-only passes on the untouched copy, and names a changed row's table and key.
    let ok = db_copy(&["--from", &from, "--to", &target.url, "--validate-only"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let victim: Vec<u8> = db
        .query_one(
            "SELECT message_id FROM messages ORDER BY message_id OFFSET 17 LIMIT 1",
            &[],
        )
        .await
        .expect("a message")
        .get(0);
    db.execute(
        "UPDATE messages SET ciphertext = 'tampered'::bytea WHERE message_id = $1",
        &[&victim],
    )
    .await
    .expect("tamper");
    let caught = db_copy(&["--from", &from, "--to", &target.url, "--validate-only"]);
    assert!(!caught.status.success());
    let err = text(&caught.stderr);
    assert!(err.contains("table messages"), "{err}");
    assert!(err.contains(&hex::encode(&victim)), "{err}");
    assert!(err.contains("ciphertext"), "{err}");

    // Rollback: the target was an empty database, and is one again.
    let rolled = db_copy(&["--rollback", "--to", &target.url]);
    assert!(rolled.status.success(), "{}", text(&rolled.stderr));
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public'",
            &[],
        )
        .await
        .expect("relations")
        .get(0);
    assert_eq!(left, 0, "no table, index or sequence is left");
    let functions: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'public'",
            &[],
        )
        .await
        .expect("functions")
        .get(0);
    assert_eq!(functions, 0, "the migrations' functions are gone too");
    // And a copy into it starts afresh.
    let again = db_copy(&["--from", &from, "--to", &target.url]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    server.stop().await;
}
