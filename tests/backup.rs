//! `keyhold backup` and `keyhold restore` on SQLite, taken while a server writes; and the
//! README's pg_dump/pg_restore recipe on PostgreSQL.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::cli::{keyhold, temp_dir, text};
use common::requests::service_wrapped_session;
use common::server::{TestDevice, TestServer};
use common::world::World;
use keyhold::client::Client;
use keyhold::crypto::ids::{MessageId, SessionId};
use keyhold::proto::keyhold::v1 as pb;

fn message(session: SessionId, n: usize) -> pb::NewMessage {
    pb::NewMessage {
        message_id: MessageId::generate().to_string(),
        session_id: session.to_string(),
        epoch: 1,
        nonce: vec![3; 12],
        ciphertext: format!("backup test message {n:08}").into_bytes(),
        associated_data: None,
    }
}

async fn put(client: &Client, d: &TestDevice, messages: Vec<pb::NewMessage>) {
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

async fn timeline_len(client: &Client) -> usize {
    let mut cursor = String::new();
    let mut n = 0;
    loop {
        let page = client
            .messages()
            .timeline(pb::TimelineRequest {
                user_id: "bob".into(),
                device_id: "phone".into(),
                cursor: cursor.clone(),
                page_size: 200,
            })
            .await
            .expect("timeline")
            .into_inner();
        n += page.messages.len();
        if page.next_cursor.is_empty() {
            return n;
        }
        cursor = page.next_cursor;
    }
}

async fn verify_audit(client: &Client) -> pb::VerifyAuditLogResponse {
    client
        .escrow()
        .verify_audit_log(pb::VerifyAuditLogRequest {})
        .await
        .expect("verify audit log")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_while_the_server_writes_restores_and_serves() {
    let server = TestServer::start(common::sqlite_db()).await;
    let w = World::new(&server).await;
    let session = service_wrapped_session(&w.app, "alice", &["bob"]).await;
    let alice = w.alice_phone.client(&server).await;
    for chunk in 0..5 {
        put(
            &alice,
            &w.alice_phone,
            (0..100)
                .map(|i| message(session, chunk * 100 + i))
                .collect(),
        )
        .await;
    }
    let staff_token = server.token(pb::Role::Staff, "", "").await;

    // A writer keeps putting messages (and audit events: escrow reads) during the backup.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, alice) = (stop.clone(), alice.clone());
        let staff = server.client(&staff_token).await;
        tokio::spawn(async move {
            let mut n = 10_000;
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) || rounds < 3 {
                alice
                    .messages()
                    .put_messages(pb::PutMessagesRequest {
                        author_user_id: "alice".into(),
                        author_device_id: "phone".into(),
                        messages: (0..20).map(|i| message(session, n + i)).collect(),
                    })
                    .await
                    .expect("put messages during the backup");
                staff
                    .escrow()
                    .get_escrowed_keys(pb::GetEscrowedKeysRequest {
                        session_id: session.to_string(),
                        epochs: vec![],
                        reason: "during the backup".into(),
                    })
                    .await
                    .expect("escrow read");
                n += 20;
                rounds += 1;
            }
            rounds
        })
    };
    let dir = temp_dir();
    let file = dir.join("keyhold.backup");
    let out = keyhold()
        .args(["backup", "--to", file.to_str().expect("utf-8")])
        .env("KEYHOLD_DATABASE_URL", &server.db.url)
        .env("KEYHOLD_PROGRESS", "plain")
        .output()
        .expect("run backup");
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.await.expect("writer");
    assert!(out.status.success(), "backup: {}", text(&out.stderr));
    assert!(rounds >= 3);
    assert!(
        text(&out.stderr).contains("backup: "),
        "{}",
        text(&out.stderr)
    );
    // Never overwritten.
    let again = keyhold()
        .args(["backup", "--to", file.to_str().expect("utf-8")])
        .env("KEYHOLD_DATABASE_URL", &server.db.url)
        .output()
        .expect("run backup");
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("exists"),
        "{}",
        text(&again.stderr)
    );

    // Restore into an empty data location; a second restore there is refused.
    let restored_url = format!("sqlite://{}", dir.join("restored/keyhold.db").display());
    let restore = |url: &str| {
        keyhold()
            .args(["restore", "--from", file.to_str().expect("utf-8")])
            .env("KEYHOLD_DATABASE_URL", url)
            .env("KEYHOLD_PROGRESS", "plain")
            .output()
            .expect("run restore")
    };
    let out = restore(&restored_url);
    assert!(out.status.success(), "restore: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("audit chain intact"),
        "{}",
        text(&out.stdout)
    );
    let refused = restore(&restored_url);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("empty data location"),
        "{}",
        text(&refused.stderr)
    );

    // A server over the restore serves the data: at least the messages before the backup,
    // an intact audit chain, and the tokens of the original.
    let replica = server.replica_over(&restored_url).await;
    let bob = replica.client(&w.bob_phone.token).await;
    let restored = timeline_len(&bob).await;
    assert!(restored >= 500, "{restored} messages restored");
    let live = timeline_len(&w.bob_phone.client(&server).await).await;
    assert!(restored <= live);
    let check = verify_audit(&replica.client(&staff_token).await).await;
    assert!(check.ok, "{check:?}");
    assert!(check.events_checked > 0);
    replica.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn restore_refuses_a_damaged_backup_and_backup_refuses_postgres() {
    let dir = temp_dir();
    let junk = dir.join("junk.backup");
    std::fs::write(&junk, vec![0x55; 8192]).expect("write");
    let url = format!("sqlite://{}", dir.join("data/keyhold.db").display());
    let out = keyhold()
        .args(["restore", "--from", junk.to_str().expect("utf-8")])
        .env("KEYHOLD_DATABASE_URL", &url)
        .output()
        .expect("run restore");
    assert!(!out.status.success());
    assert!(
        !dir.join("data/keyhold.db").exists(),
        "nothing left in place"
    );
    let out = keyhold()
        .args(["backup", "--to", dir.join("x").to_str().expect("utf-8")])
        .env("KEYHOLD_DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .output()
        .expect("run backup");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("pg_dump"),
        "{}",
        text(&out.stderr)
    );
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_pg_dump_recipe_restores_a_database_that_serves() {
    let Some(db) = common::postgres_db().await else {
        return;
    };
    let Some(fresh) = common::postgres_db().await else {
        return;
    };
    let server = TestServer::start(db).await;
    let w = World::new(&server).await;
    let session = service_wrapped_session(&w.app, "alice", &["bob"]).await;
    let alice = w.alice_phone.client(&server).await;
    put(
        &alice,
        &w.alice_phone,
        (0..50).map(|i| message(session, i)).collect(),
    )
    .await;
    let staff_token = server.token(pb::Role::Staff, "", "").await;
    let staff = server.client(&staff_token).await;
    staff
        .escrow()
        .get_escrowed_keys(pb::GetEscrowedKeysRequest {
            session_id: session.to_string(),
            epochs: vec![],
            reason: "before the dump".into(),
        })
        .await
        .expect("escrow read");

    // The recipe: pg_dump --format=custom, then pg_restore into a new, empty database.
    let dump = temp_dir().join("keyhold.dump");
    let out = std::process::Command::new(format!("{PG_BIN}/pg_dump"))
        .args(["--format=custom", "--no-owner", "--file"])
        .arg(&dump)
        .arg(&server.db.url)
        .output()
        .expect("pg_dump");
    assert!(out.status.success(), "pg_dump: {}", text(&out.stderr));
    let out = std::process::Command::new(format!("{PG_BIN}/pg_restore"))
        .args([
            "--no-owner",
            "--exit-on-error",
            "--single-transaction",
            "--dbname",
        ])
        .arg(&fresh.url)
        .arg(&dump)
        .output()
        .expect("pg_restore");
    assert!(out.status.success(), "pg_restore: {}", text(&out.stderr));

    let replica = server.replica_over(&fresh.url).await;
    let check = verify_audit(&replica.client(&staff_token).await).await;
    let original = verify_audit(&staff).await;
    assert!(check.ok, "{check:?}");
    assert_eq!(check.events_checked, original.events_checked);
    let bob = replica.client(&w.bob_phone.token).await;
    assert_eq!(timeline_len(&bob).await, 50);
    // New writes work on the restore (its sequences came along).
    put(
        &replica.client(&w.alice_phone.token).await,
        &w.alice_phone,
        vec![message(session, 99)],
    )
    .await;
    assert_eq!(timeline_len(&bob).await, 51);
    replica.stop().await;
    server.stop().await;
}
