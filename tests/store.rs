//! The store against real databases: every case runs on SQLite (`sqlite::…`) and on
//! PostgreSQL (`postgres::…`, needs `KEYHOLD_TEST_DATABASE_URL`; see `tests/common`).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::TestDb;
use keyhold::crypto::ids::{DeviceId, KeyId, UserId};
use keyhold::crypto::Suite;
use keyhold::store::audit::{AuditEvent, NewAuditEvent};
use keyhold::store::tokens::{NewApiToken, Role, TokenHash, TokenId};
use keyhold::store::user_keys::{NewUserKey, UserKey};
use keyhold::store::{Store, StoreError, StoreOptions};

/// Generates `sqlite::$case` and `postgres::$case` tests that run `$case(&TestDb)`.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let db = crate::common::sqlite_db();
                    super::$case(&db).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(db) = crate::common::postgres_db().await else { return };
                    super::$case(&db).await;
                }
            )*
        }
    };
}

on_both_backends!(
    migrate_reports_status_and_is_idempotent,
    concurrent_migrations_from_three_stores_apply_once,
    tokens_are_found_by_hash_and_id_until_revoked,
    publishing_a_key_supersedes_the_previous_version,
    concurrent_publishes_leave_one_current_key,
    audit_chain_links_lists_and_verifies,
    tampered_audit_row_is_found_at_its_seq,
    concurrent_audit_appends_keep_one_chain,
    audit_event_in_a_rolled_back_transaction_is_not_kept,
    closed_store_is_unavailable,
);

async fn migrated(db: &TestDb) -> Store {
    let store = Store::open(&db.url).await.expect("open");
    store.migrate().await.expect("migrate");
    store
}

fn user(s: &str) -> UserId {
    UserId::new(s).unwrap()
}

fn device(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn new_key(n: u8, u: &str, d: &str) -> NewUserKey {
    NewUserKey {
        key_id: KeyId::from_bytes([n; 16]),
        user: user(u),
        device: device(d),
        suite: Suite::XWingAes256GcmV1,
        encapsulation_key: vec![n; 1216],
        identity_key: vec![n; 32],
        signature: vec![n; 64],
    }
}

async fn migrate_reports_status_and_is_idempotent(db: &TestDb) {
    let store = Store::open(&db.url).await.unwrap();
    let before = store.migration_status().await.unwrap();
    assert!(!before.is_empty());
    assert!(before.iter().all(|m| !m.applied), "{before:?}");
    let names: Vec<String> = before.iter().map(|m| m.name.clone()).collect();
    assert_eq!(store.pending_migrations().await.unwrap(), names);
    assert!(names.iter().any(|n| n.ends_with("_init")), "{names:?}");

    assert_eq!(store.migrate().await.unwrap(), names);
    assert!(store
        .migration_status()
        .await
        .unwrap()
        .iter()
        .all(|m| m.applied));
    assert!(store.pending_migrations().await.unwrap().is_empty());

    // Again, and from another store on the same database: nothing left to do.
    assert!(store.migrate().await.unwrap().is_empty());
    let other = Store::open(&db.url).await.unwrap();
    assert!(other.migrate().await.unwrap().is_empty());
    assert!(other.pending_migrations().await.unwrap().is_empty());
}

async fn concurrent_migrations_from_three_stores_apply_once(db: &TestDb) {
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(Store::open(&db.url).await.unwrap());
    }
    let runs = stores.iter().map(|s| {
        let s = s.clone();
        tokio::spawn(async move { s.migrate().await })
    });
    let mut applied = Vec::new();
    for run in runs {
        applied.extend(
            run.await
                .unwrap()
                .expect("every replica's migrate succeeds"),
        );
    }
    let expected: Vec<String> = stores[0]
        .migration_status()
        .await
        .unwrap()
        .into_iter()
        .map(|m| {
            assert!(m.applied);
            m.name
        })
        .collect();
    // Each migration was applied by exactly one of the three.
    applied.sort();
    assert_eq!(applied, expected);
}

async fn tokens_are_found_by_hash_and_id_until_revoked(db: &TestDb) {
    let store = migrated(db).await;
    let mut conn = store.conn().await.unwrap();
    let app_hash = TokenHash::of(b"kh_app_secret");
    let app = conn
        .insert_token(&NewApiToken {
            token_id: TokenId::generate(),
            token_hash: app_hash,
            role: Role::App,
            user: None,
            device: None,
            label: Some("chat backend".into()),
        })
        .await
        .unwrap();
    assert_eq!(app.role, Role::App);
    assert_eq!(app.label.as_deref(), Some("chat backend"));
    assert!(app.revoked_at.is_none());

    let found = conn.find_active_token(&app_hash).await.unwrap();
    assert_eq!(found.as_ref(), Some(&app));
    assert_eq!(
        conn.find_token(&app.token_id).await.unwrap(),
        Some(app.clone())
    );
    assert!(conn
        .find_active_token(&TokenHash::of(b"other"))
        .await
        .unwrap()
        .is_none());
    assert!(conn
        .find_token(&TokenId::generate())
        .await
        .unwrap()
        .is_none());

    // Device tokens keep their binding.
    let dev = conn
        .insert_token(&NewApiToken {
            token_id: TokenId::generate(),
            token_hash: TokenHash::of(b"kh_device_secret"),
            role: Role::Device,
            user: Some(user("alice")),
            device: Some(device("phone")),
            label: None,
        })
        .await
        .unwrap();
    assert_eq!(
        (dev.user, dev.device),
        (Some(user("alice")), Some(device("phone")))
    );

    // The same hash twice is refused.
    let dup = conn
        .insert_token(&NewApiToken {
            token_id: TokenId::generate(),
            token_hash: app_hash,
            role: Role::Staff,
            user: None,
            device: None,
            label: None,
        })
        .await;
    assert!(matches!(dup, Err(StoreError::AlreadyExists(_))), "{dup:?}");

    // Admin count follows inserts and revocations.
    assert_eq!(conn.count_active_admin_tokens().await.unwrap(), 0);
    let mut admins = Vec::new();
    for i in 0..2u8 {
        let t = conn
            .insert_token(&NewApiToken {
                token_id: TokenId::generate(),
                token_hash: TokenHash::of(&[b'a', i]),
                role: Role::Admin,
                user: None,
                device: None,
                label: None,
            })
            .await
            .unwrap();
        admins.push(t.token_id);
    }
    assert_eq!(conn.count_active_admin_tokens().await.unwrap(), 2);
    conn.revoke_token(&admins[0]).await.unwrap();
    assert_eq!(conn.count_active_admin_tokens().await.unwrap(), 1);

    // Revocation hides the token from authentication but keeps the row; twice is fine.
    conn.revoke_token(&app.token_id).await.unwrap();
    assert!(conn.find_active_token(&app_hash).await.unwrap().is_none());
    let revoked = conn.find_token(&app.token_id).await.unwrap().unwrap();
    let first_revocation = revoked.revoked_at.expect("revoked_at set");
    conn.revoke_token(&app.token_id).await.unwrap();
    let again = conn.find_token(&app.token_id).await.unwrap().unwrap();
    assert_eq!(again.revoked_at, Some(first_revocation));

    let unknown = conn.revoke_token(&TokenId::generate()).await;
    assert!(matches!(unknown, Err(StoreError::NotFound)), "{unknown:?}");
}

/// Publishes `key` in a transaction of its own.
async fn publish(store: &Store, key: NewUserKey) -> Result<UserKey, StoreError> {
    store
        .transaction(async |tx| tx.publish_user_key(&key).await)
        .await
}

/// The current keys of `users`.
async fn current_keys(store: &Store, users: &[UserId]) -> Vec<UserKey> {
    let mut conn = store.conn().await.unwrap();
    conn.current_user_keys(users).await.unwrap()
}

/// The key with this id, current or not.
async fn key_of(store: &Store, key_id: &KeyId) -> Option<UserKey> {
    let mut conn = store.conn().await.unwrap();
    conn.user_key(key_id).await.unwrap()
}

async fn publishing_a_key_supersedes_the_previous_version(db: &TestDb) {
    let store = migrated(db).await;
    let k1 = publish(&store, new_key(1, "alice", "phone")).await.unwrap();
    assert_eq!(k1.version, 1);
    assert!(k1.is_current());
    assert_eq!(k1.encapsulation_key, vec![1; 1216]);

    let k2 = publish(&store, new_key(2, "alice", "phone")).await.unwrap();
    assert_eq!(k2.version, 2);
    let old = key_of(&store, &k1.key_id).await.unwrap();
    assert!(old.superseded_at.is_some() && old.revoked_at.is_none());
    assert!(!old.is_current());

    // The same key id again, even for another device, is refused and changes nothing.
    for (u, d) in [("alice", "phone"), ("bob", "tablet")] {
        let mut again = new_key(1, u, d);
        again.key_id = k1.key_id;
        let dup = publish(&store, again).await;
        assert!(matches!(dup, Err(StoreError::AlreadyExists(_))), "{dup:?}");
    }
    let current = current_keys(&store, &[user("alice")]).await;
    assert_eq!(current, vec![k2.clone()]);

    // Publishing the current bundle again is a retry: the same answer, nothing changed.
    let retry = publish(&store, new_key(2, "alice", "phone")).await.unwrap();
    assert_eq!(retry, k2);
    let current = current_keys(&store, &[user("alice")]).await;
    assert_eq!(current, vec![k2.clone()]);

    // Many users at once: current keys only, ordered by user then device.
    let laptop = publish(&store, new_key(3, "alice", "laptop"))
        .await
        .unwrap();
    let bob = publish(&store, new_key(4, "bob", "phone")).await.unwrap();
    assert_eq!(laptop.version, 1);
    let current = current_keys(&store, &[user("bob"), user("alice"), user("carol")]).await;
    assert_eq!(current, vec![laptop.clone(), k2.clone(), bob.clone()]);

    // Revoking: the row stays, the key is no longer current, the device has none.
    let mut conn = store.conn().await.unwrap();
    conn.revoke_user_key(&user("alice"), &device("phone"), &k2.key_id)
        .await
        .unwrap();
    drop(conn);
    let revoked = key_of(&store, &k2.key_id).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    let current = current_keys(&store, &[user("alice")]).await;
    assert_eq!(current, vec![laptop.clone()]);

    // Revoking needs the right device and a known key.
    for (u, d, id) in [
        ("alice", "laptop", k2.key_id),
        ("bob", "phone", k2.key_id),
        ("alice", "phone", KeyId::from_bytes([9; 16])),
    ] {
        let mut conn = store.conn().await.unwrap();
        let r = conn.revoke_user_key(&user(u), &device(d), &id).await;
        assert!(matches!(r, Err(StoreError::NotFound)), "{u}/{d}: {r:?}");
    }

    // A new key after a revocation takes the next version and is current.
    let k5 = publish(&store, new_key(5, "alice", "phone")).await.unwrap();
    assert_eq!(k5.version, 3);
    let current = current_keys(&store, &[user("alice")]).await;
    assert_eq!(current, vec![laptop, k5]);
    assert!(key_of(&store, &KeyId::from_bytes([42; 16])).await.is_none());
    assert!(current_keys(&store, &[]).await.is_empty());
}

async fn concurrent_publishes_leave_one_current_key(db: &TestDb) {
    let store = migrated(db).await;
    let publishes = (1..=6u8).map(|n| {
        let store = store.clone();
        tokio::spawn(async move { publish(&store, new_key(n, "alice", "phone")).await })
    });
    let mut published = Vec::new();
    for p in publishes {
        match p.await.unwrap() {
            Ok(key) => published.push(key),
            // Losing a race is reported as a conflict, never as a second current key.
            Err(StoreError::VersionConflict(_)) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(!published.is_empty());
    let versions: HashSet<u32> = published.iter().map(|k| k.version).collect();
    assert_eq!(versions.len(), published.len(), "versions are unique");
    let current = current_keys(&store, &[user("alice")]).await;
    assert_eq!(current.len(), 1);
    let newest = published.iter().map(|k| k.version).max().unwrap();
    assert_eq!(current[0].version, newest);
}

fn event(i: u32) -> NewAuditEvent {
    NewAuditEvent::new(format!("staff:{i}"), "escrow.read", format!("session:{i}"))
}

/// Appends one event in a transaction of its own.
async fn append(store: &Store, event: NewAuditEvent) -> Result<AuditEvent, StoreError> {
    store
        .transaction(async move |tx| tx.append_audit_event(&event).await)
        .await
}

/// One page of the audit log.
async fn list(store: &Store, after: u64, limit: u32) -> Vec<AuditEvent> {
    let mut conn = store.conn().await.unwrap();
    conn.list_audit_events(after, limit).await.unwrap()
}

async fn audit_chain_links_lists_and_verifies(db: &TestDb) {
    let store = migrated(db).await;
    let empty = store.verify_audit_chain().await.unwrap();
    assert_eq!(
        (empty.intact, empty.first_broken, empty.head),
        (0, None, None)
    );

    let e1 = append(&store, event(1)).await.unwrap();
    let e2 = append(&store, event(2).with_reason("case 7"))
        .await
        .unwrap();
    let e3 = append(&store, event(3)).await.unwrap();
    assert_eq!((e1.seq, e2.seq, e3.seq), (1, 2, 3));
    assert_eq!(e1.prev_hash, [0; 32]);
    assert_eq!(e2.prev_hash, e1.hash);
    assert_eq!(e3.prev_hash, e2.hash);
    assert_eq!(e2.reason.as_deref(), Some("case 7"));
    assert_eq!(e1.actor, "staff:1");

    assert_eq!(list(&store, 0, 2).await, vec![e1.clone(), e2.clone()]);
    assert_eq!(list(&store, 2, 100).await, vec![e3.clone()]);
    assert!(list(&store, 3, 100).await.is_empty());

    let check = store.verify_audit_chain().await.unwrap();
    assert_eq!(check.intact, 3);
    assert_eq!(check.first_broken, None);
    assert_eq!(check.head, Some((3, e3.hash)));
}

async fn tampered_audit_row_is_found_at_its_seq(db: &TestDb) {
    let store = migrated(db).await;
    for i in 1..=5 {
        append(&store, event(i).with_reason("routine"))
            .await
            .unwrap();
    }
    assert_eq!(store.verify_audit_chain().await.unwrap().first_broken, None);

    db.execute_raw("UPDATE audit_events SET reason = 'nothing to see' WHERE seq = 3")
        .await;
    let check = store.verify_audit_chain().await.unwrap();
    assert_eq!(check.first_broken, Some(3));
    assert_eq!(check.intact, 2);
    let e2 = &list(&store, 1, 1).await[0];
    assert_eq!(check.head, Some((2, e2.hash)));

    // Deleting an event is found too, at the missing seq.
    db.execute_raw("UPDATE audit_events SET reason = 'routine' WHERE seq = 3; DELETE FROM audit_events WHERE seq = 2")
        .await;
    assert_eq!(
        store.verify_audit_chain().await.unwrap().first_broken,
        Some(2)
    );
}

async fn concurrent_audit_appends_keep_one_chain(db: &TestDb) {
    let store = migrated(db).await;
    let appends = (0..12).map(|i| {
        let store = store.clone();
        tokio::spawn(async move { append(&store, event(i)).await })
    });
    let mut seqs = Vec::new();
    for a in appends {
        seqs.push(a.await.unwrap().expect("every append succeeds").seq);
    }
    seqs.sort();
    assert_eq!(seqs, (1..=12).collect::<Vec<u64>>());
    let check = store.verify_audit_chain().await.unwrap();
    assert_eq!((check.intact, check.first_broken), (12, None));
}

async fn audit_event_in_a_rolled_back_transaction_is_not_kept(db: &TestDb) {
    let store = migrated(db).await;
    append(&store, event(1)).await.unwrap();
    let failed: Result<(), StoreError> = store
        .transaction(async |tx| {
            let e = tx.append_audit_event(&event(2)).await?;
            assert_eq!(e.seq, 2);
            // The work the event records fails: the event must go with it.
            Err(StoreError::NotFound)
        })
        .await;
    assert!(matches!(failed, Err(StoreError::NotFound)));
    assert_eq!(list(&store, 0, 10).await.len(), 1);

    // A committed transaction keeps both its writes.
    let ev = event(3);
    let key = new_key(7, "dave", "phone");
    let (appended, published) = store
        .transaction(async |tx| -> Result<_, StoreError> {
            let appended = tx.append_audit_event(&ev).await?;
            let published = tx.publish_user_key(&key).await?;
            Ok((appended, published))
        })
        .await
        .unwrap();
    assert_eq!(appended.seq, 2);
    assert_eq!(key_of(&store, &published.key_id).await, Some(published));
    assert_eq!(store.verify_audit_chain().await.unwrap().intact, 2);
}

async fn closed_store_is_unavailable(db: &TestDb) {
    let store = migrated(db).await;
    store.close();
    let r = async { store.conn().await?.count_active_admin_tokens().await }.await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
}

#[tokio::test]
async fn unreachable_postgres_is_unavailable() {
    let options = StoreOptions {
        acquire_timeout: Duration::from_secs(2),
        ..StoreOptions::default()
    };
    // Nothing listens on port 1 (refused at once); 10.255.255.1 is unroutable (times out).
    for url in [
        "postgres://keyhold:keyhold@127.0.0.1:1/keyhold",
        "postgres://keyhold:keyhold@10.255.255.1:5432/keyhold",
    ] {
        // A generous guard against a hang, not a timing assertion.
        let opened = tokio::time::timeout(
            Duration::from_secs(30),
            Store::open_with(url, options.clone()),
        )
        .await
        .expect("open gives up on its own");
        assert!(
            matches!(opened, Err(StoreError::Unavailable(_))),
            "{url}: {opened:?}"
        );
    }
}

#[tokio::test]
async fn unknown_url_scheme_is_refused() {
    let opened = Store::open("mysql://localhost/keyhold").await;
    assert!(
        matches!(opened, Err(StoreError::InvalidUrl(_))),
        "{opened:?}"
    );
}

#[test]
fn test_database_urls_swap_the_database_name() {
    use common::with_database;
    assert_eq!(
        with_database("postgres://u:p@h:5432/postgres", "x"),
        "postgres://u:p@h:5432/x"
    );
    assert_eq!(
        with_database("postgres://u:p@h/postgres?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
}
