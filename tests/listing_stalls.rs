//! Issue 10: listings bounded under stalls, on PostgreSQL. A message writer paused while it
//! holds its transaction open (a replica frozen, SIGSTOP, a partition) no longer hides new
//! messages for as long as the pause lasts: past its bound the visibility horizon stops
//! waiting for it, and it can no longer commit (`src/store/messages/horizon.rs` has the
//! proof); a connection idle inside a transaction is closed by the server. The cursor
//! guarantee holds throughout: nothing appears below a message already listed.
//!
//! The paused writer is a raw PostgreSQL connection that does what a PutMessages transaction
//! does (names itself with its bound, inserts a message) and then sends nothing, the state a
//! paused replica leaves its backend in, with no server-side timeout of its own.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::held::HeldWriter;
use common::requests::{service_wrapped_session, whole_timeline};
use common::server::{TestDevice, TestServer};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use keyhold::client::Client;
use keyhold::config::Limits;
use keyhold::crypto::ids::{Epoch, MessageId, SessionId};
use keyhold::proto::keyhold::v1 as pb;
use keyhold::store::messages::{Author, NewMessage};
use keyhold::store::{StoreError, StoreOptions};
use tonic::Code;

/// alice (phone) writes to carol (phone), in one service-wrapped session.
struct World {
    alice: TestDevice,
    carol: TestDevice,
    session: SessionId,
}

impl World {
    async fn new(server: &TestServer) -> World {
        let app = server
            .client(&server.token(pb::Role::App, "", "").await)
            .await;
        let alice = TestDevice::enroll(server, "alice", "phone").await;
        let carol = TestDevice::enroll(server, "carol", "phone").await;
        let session = service_wrapped_session(&app, "alice", &["carol"]).await;
        World {
            alice,
            carol,
            session,
        }
    }

    fn message(&self, n: usize) -> pb::NewMessage {
        pb::NewMessage {
            message_id: MessageId::generate().to_string(),
            session_id: self.session.to_string(),
            epoch: Epoch::FIRST.get(),
            nonce: vec![7; 12],
            ciphertext: format!("message {n:04} of the stall tests").into_bytes(),
            associated_data: None,
        }
    }

    /// Stores one message as alice's phone; returns its id.
    async fn put(&self, server: &TestServer, n: usize) -> String {
        let m = self.message(n);
        let id = m.message_id.clone();
        self.alice
            .client(server)
            .await
            .messages()
            .put_messages(pb::PutMessagesRequest {
                author_user_id: "alice".into(),
                author_device_id: "phone".into(),
                messages: vec![m],
            })
            .await
            .expect("put");
        id
    }

    /// Carol's whole timeline, newest first (ids and positions).
    async fn timeline(&self, client: &Client) -> Vec<(String, i64)> {
        whole_timeline(client, &self.carol, 50)
            .await
            .into_iter()
            .map(|m| (m.message_id, m.created_at))
            .collect()
    }

    /// Polls carol's timeline until `id` is listed (deadline 30 s); returns when it was.
    async fn until_listed(&self, server: &TestServer, id: &str) -> Instant {
        let client = self.carol.client(server).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.timeline(&client).await.iter().any(|(m, _)| m == id) {
                return Instant::now();
            }
            assert!(Instant::now() < deadline, "{id} was never listed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every message listed in `later` but not in `earlier` is newer than all of `earlier`.
fn only_above(earlier: &[(String, i64)], later: &[(String, i64)]) {
    let seen: BTreeSet<&String> = earlier.iter().map(|(id, _)| id).collect();
    let top = earlier.iter().map(|(_, at)| *at).max().unwrap_or(i64::MIN);
    for (id, at) in later {
        if !seen.contains(id) {
            assert!(*at >= top, "{id} appeared below a message already listed");
        }
    }
}

async fn server_with(options: StoreOptions) -> Option<(TestServer, World)> {
    let db = common::postgres_db().await?;
    let server = TestServer::start_with_options(db, Limits::default(), options).await;
    let world = World::new(&server).await;
    Some((server, world))
}

/// The paused writer: a raw connection (no session timeouts) that marks itself as a writer
/// with `bound_ms`, inserts a message of the session at the database clock, and stops.
async fn paused_writer(
    server: &TestServer,
    w: &World,
    bound_ms: u64,
) -> (AsyncPgConnection, MessageId) {
    let mut conn = AsyncPgConnection::establish(&server.db.url)
        .await
        .expect("connect");
    let id = MessageId::generate();
    let sql = format!(
        "BEGIN; \
         SELECT set_config('application_name', 'keyhold:put-messages/{bound_ms}', true); \
         INSERT INTO messages (message_id, session_id, epoch, author_user_id, author_device_id, \
                               nonce, ciphertext, created_at) \
         VALUES ('\\x{id}', '\\x{session}', 1, 'alice', 'phone', '\\x070707070707070707070707', \
                 '\\x00', CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT))",
        id = hex::encode(id.as_bytes()),
        session = hex::encode(w.session.as_bytes()),
    );
    conn.batch_execute(&sql)
        .await
        .expect("the paused writer inserts");
    (conn, id)
}

/// A writer paused past its bound stops holding listings back after the bound (plus the
/// margin), and its commit is then refused: its message never appears, below or above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_writer_holds_listings_only_until_its_bound_and_then_cannot_commit() {
    let Some((server, w)) = server_with(StoreOptions::default()).await else {
        return;
    };
    let carol = w.carol.client(&server).await;
    w.put(&server, 0).await;
    let bound = Duration::from_millis(3000);
    let paused_at = Instant::now();
    let (mut paused, paused_id) = paused_writer(&server, &w, bound.as_millis() as u64).await;
    let fresh = w.put(&server, 1).await;
    // Within the bound the open writer may still commit: the fresh message waits for it.
    let early = w.timeline(&carol).await;
    if paused_at.elapsed() < bound {
        assert!(
            !early.iter().any(|(id, _)| *id == fresh),
            "listed above a writer within its bound"
        );
    }
    let listed_at = w.until_listed(&server, &fresh).await;
    assert!(
        listed_at - paused_at >= bound,
        "the horizon passed a writer within its bound"
    );
    // Past its bound, the paused writer can no longer commit.
    let refused = paused
        .batch_execute("COMMIT")
        .await
        .expect_err("a commit past the bound is refused");
    assert!(
        refused.to_string().contains("message write not committed"),
        "{refused}"
    );
    let now = w.timeline(&carol).await;
    let paused_hex = paused_id.to_string();
    assert!(
        !now.iter().any(|(id, _)| *id == paused_hex),
        "the refused write is not stored"
    );
    only_above(&early, &now);
    // Writes and listings go on as before.
    let after = w.put(&server, 2).await;
    w.until_listed(&server, &after).await;
    server.stop().await;
}

/// A writer within its bound that commits is listed, and where it belongs: the horizon waits
/// for it as long as it may commit, so nothing lands below a listed message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_writer_within_its_bound_commits_and_lands_above_what_was_listed() {
    let Some((server, w)) = server_with(StoreOptions::default()).await else {
        return;
    };
    let carol = w.carol.client(&server).await;
    w.put(&server, 0).await;
    let (mut slow, slow_id) = paused_writer(&server, &w, 60_000).await;
    let fresh = w.put(&server, 1).await;
    let early = w.timeline(&carol).await;
    assert!(
        !early.iter().any(|(id, _)| *id == fresh),
        "listed above an open writer"
    );
    slow.batch_execute("COMMIT")
        .await
        .expect("commits within its bound");
    w.until_listed(&server, &fresh).await;
    let now = w.timeline(&carol).await;
    assert!(now.iter().any(|(id, _)| *id == slow_id.to_string()));
    only_above(&early, &now);
    server.stop().await;
}

/// The store's own write path carries the bound: a PutMessages transaction held open past
/// `message_write_timeout` (here with the idle timeout off) is refused at its commit,
/// UNAVAILABLE to its caller, and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_transaction_past_its_bound_is_refused_at_commit() {
    let options = StoreOptions {
        message_write_timeout: Duration::from_millis(500),
        idle_in_transaction_timeout: Duration::ZERO,
        ..StoreOptions::default()
    };
    let Some((server, w)) = server_with(options).await else {
        return;
    };
    let carol = w.carol.client(&server).await;
    let author = Author {
        user: w.alice.user.clone(),
        device: Some(w.alice.device.clone()),
    };
    let held = NewMessage {
        message_id: MessageId::generate(),
        session_id: w.session,
        epoch: Epoch::FIRST,
        nonce: vec![1; 12],
        ciphertext: vec![1; 40],
        associated_data: None,
    };
    let held_id = held.message_id.to_string();
    let started = Instant::now();
    let holder = HeldWriter::start(&server.store, &author, vec![held]).await;
    let fresh = w.put(&server, 1).await;
    let listed_at = w.until_listed(&server, &fresh).await;
    assert!(
        listed_at - started >= Duration::from_millis(500),
        "the horizon passed a writer within its bound"
    );
    // Paused past the bound before committing.
    tokio::time::sleep_until((started + Duration::from_millis(2500)).into()).await;
    let refused = holder.commit().await.expect_err("refused at commit");
    assert!(matches!(refused, StoreError::Unavailable(_)), "{refused:?}");
    let now = w.timeline(&carol).await;
    assert!(
        !now.iter().any(|(id, _)| *id == held_id),
        "nothing of it is stored"
    );
    server.stop().await;
}

/// A pooled connection left idle inside a transaction is closed by PostgreSQL after
/// `idle_in_transaction_timeout` (here with the write bound off, so that only the timeout
/// frees listings): listings then move on, and the holder's commit fails, retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_idle_in_its_transaction_is_closed_and_listings_move_on() {
    let options = StoreOptions {
        message_write_timeout: Duration::ZERO,
        idle_in_transaction_timeout: Duration::from_millis(800),
        ..StoreOptions::default()
    };
    let Some((server, w)) = server_with(options).await else {
        return;
    };
    let author = Author {
        user: w.alice.user.clone(),
        device: Some(w.alice.device.clone()),
    };
    let held = NewMessage {
        message_id: MessageId::generate(),
        session_id: w.session,
        epoch: Epoch::FIRST,
        nonce: vec![1; 12],
        ciphertext: vec![1; 40],
        associated_data: None,
    };
    let holder = HeldWriter::start(&server.store, &author, vec![held]).await;
    let fresh = w.put(&server, 1).await;
    w.until_listed(&server, &fresh).await;
    let closed = holder
        .commit()
        .await
        .expect_err("its connection was closed");
    assert!(matches!(closed, StoreError::Unavailable(_)), "{closed:?}");
    // The pool replaces the closed connection: writes go on without a restart.
    let after = w.put(&server, 2).await;
    w.until_listed(&server, &after).await;
    let status = w
        .alice
        .client(&server)
        .await
        .messages()
        .put_messages(pb::PutMessagesRequest {
            author_user_id: "alice".into(),
            author_device_id: "phone".into(),
            messages: vec![w.message(3), w.message(4)],
        })
        .await
        .map(|_| ())
        .map_err(|s| s.code());
    assert_eq!(status, Ok::<(), Code>(()));
    server.stop().await;
}
