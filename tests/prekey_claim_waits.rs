//! Issue 10: on PostgreSQL a claim never hands out the last-resort prekey while a one-time
//! prekey of the device is still committed. A one-time row held by an unfinished claim (here a
//! second connection's open transaction) is waited for, bounded by the lock timeout: a holder
//! that rolls back leaves it to the waiting claim, one that commits its claim leaves the
//! last-resort prekey, and a holder that outlasts the lock timeout gets the claim UNAVAILABLE
//! with a message saying why. SQLite has one writer at a time, so nothing is ever held there.

mod common;

use std::time::Duration;

use common::requests::{signed_prekey, upload_request};
use common::server::{TestDevice, TestServer};
use common::TestDb;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use keyhold::config::Limits;
use keyhold::crypto::ids::KeyId;
use keyhold::crypto::sign::PrekeyKind;
use keyhold::proto::keyhold::v1 as pb;
use keyhold::store::StoreOptions;
use tonic::Code;

/// A server on a fresh PostgreSQL database (or `None` when PostgreSQL tests are skipped), and
/// a device holding exactly one one-time prekey and a last-resort prekey.
async fn one_left(lock_timeout: Duration) -> Option<(TestServer, TestDevice, KeyId, KeyId)> {
    one_left_with(StoreOptions {
        lock_timeout,
        ..StoreOptions::default()
    })
    .await
}

/// [`one_left`] with any store options.
async fn one_left_with(options: StoreOptions) -> Option<(TestServer, TestDevice, KeyId, KeyId)> {
    let db: TestDb = common::postgres_db().await?;
    let server = TestServer::start_with_options(db, Limits::default(), options).await;
    let device = TestDevice::enroll(&server, "alice", "phone").await;
    let (one_time, one_time_id) = signed_prekey(&device, PrekeyKind::OneTime);
    let (last_resort, last_resort_id) = signed_prekey(&device, PrekeyKind::LastResort);
    device
        .client(&server)
        .await
        .key_directory()
        .upload_prekeys(upload_request(&device, vec![one_time], Some(last_resort)))
        .await
        .expect("upload");
    Some((server, device, one_time_id, last_resort_id))
}

/// A second connection that holds the device's one remaining one-time row in an open
/// transaction, as an unfinished claim on another replica would.
async fn lock_the_one_time_row(server: &TestServer) -> AsyncPgConnection {
    let mut locker = AsyncPgConnection::establish(&server.db.url)
        .await
        .expect("connect");
    locker
        .batch_execute("BEGIN; SELECT id FROM prekeys WHERE kind = 1 FOR UPDATE")
        .await
        .expect("lock the row");
    locker
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Waits (with a deadline) until a connection of the database waits for a row lock: the
/// claim has found the held row and is waiting for its holder.
async fn until_a_claim_waits(server: &TestServer) {
    let mut watcher = AsyncPgConnection::establish(&server.db.url)
        .await
        .expect("connect");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: Count = diesel::sql_query(
            "SELECT COUNT(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .get_result(&mut watcher)
        .await
        .expect("pg_stat_activity");
        if waiting.n > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim never waited for the held row"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn claim_request(d: &TestDevice) -> pb::ClaimPrekeysRequest {
    pb::ClaimPrekeysRequest {
        devices: vec![pb::DeviceRef {
            user_id: d.user.to_string(),
            device_id: d.device.to_string(),
        }],
        user_ids: Vec::new(),
        idempotency_key: String::new(),
    }
}

/// Starts a claim of `device`'s prekey by another device, in the background.
async fn start_claim(
    server: &TestServer,
    device: &TestDevice,
) -> tokio::task::JoinHandle<Result<pb::ClaimedPrekey, tonic::Status>> {
    let claimer = server.token(pb::Role::Device, "bob", "laptop").await;
    let client = server.client(&claimer).await;
    let request = claim_request(device);
    tokio::spawn(async move {
        let mut response = client
            .key_directory()
            .claim_prekeys(request)
            .await?
            .into_inner();
        assert_eq!(response.prekeys.len(), 1, "{response:?}");
        Ok(response.prekeys.remove(0))
    })
}

async fn stock_of(server: &TestServer, d: &TestDevice) -> pb::PrekeyStock {
    d.client(server)
        .await
        .key_directory()
        .count_prekeys(pb::CountPrekeysRequest {
            user_id: d.user.to_string(),
            device_id: d.device.to_string(),
        })
        .await
        .expect("count")
        .into_inner()
        .stock
        .expect("stock")
}

/// The reproduction of issue 10: lock the one remaining row, claim, roll the locker back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_one_time_prekey_rolled_back_is_handed_out_never_the_last_resort() {
    let Some((server, device, one_time_id, _)) = one_left(Duration::from_secs(30)).await else {
        return;
    };
    let mut locker = lock_the_one_time_row(&server).await;
    let claim = start_claim(&server, &device).await;
    until_a_claim_waits(&server).await;
    assert!(!claim.is_finished(), "the claim must wait, not answer");
    locker.batch_execute("ROLLBACK").await.expect("roll back");
    let claimed = claim.await.expect("join").expect("claim");
    assert_eq!(claimed.kind, pb::PrekeyKind::OneTime as i32, "{claimed:?}");
    assert_eq!(claimed.key_id, one_time_id.as_bytes().to_vec());
    let stock = stock_of(&server, &device).await;
    assert_eq!(stock.one_time_remaining, 0, "the one-time prekey was taken");
    assert!(stock.has_last_resort);
    // Now none is left: the next claim gets the last-resort prekey at once.
    let next = start_claim(&server, &device).await;
    let next = next.await.expect("join").expect("claim");
    assert_eq!(next.kind, pb::PrekeyKind::LastResort as i32);
    server.stop().await;
}

/// A holder that commits its own claim of the row took it: the waiting claim then finds no
/// one-time prekey committed and gets the last-resort prekey.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_one_time_prekey_claimed_by_its_holder_leaves_the_last_resort() {
    let Some((server, device, _, last_resort_id)) = one_left(Duration::from_secs(30)).await else {
        return;
    };
    let mut locker = lock_the_one_time_row(&server).await;
    let claim = start_claim(&server, &device).await;
    until_a_claim_waits(&server).await;
    locker
        .batch_execute("DELETE FROM prekeys WHERE kind = 1; COMMIT")
        .await
        .expect("the holder claims and commits");
    let claimed = claim.await.expect("join").expect("claim");
    assert_eq!(
        claimed.kind,
        pb::PrekeyKind::LastResort as i32,
        "{claimed:?}"
    );
    assert_eq!(claimed.key_id, last_resort_id.as_bytes().to_vec());
    let stock = stock_of(&server, &device).await;
    assert_eq!(stock.one_time_remaining, 0);
    assert!(stock.has_last_resort, "the last-resort prekey is kept");
    server.stop().await;
}

/// A holder that outlasts the lock timeout: the claim is UNAVAILABLE (retryable), says why,
/// and hands out nothing; the row is still there for a later claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_waits_past_the_lock_timeout_is_unavailable_not_last_resort() {
    let Some((server, device, one_time_id, _)) = one_left(Duration::from_millis(300)).await else {
        return;
    };
    let mut locker = lock_the_one_time_row(&server).await;
    let claim = start_claim(&server, &device).await;
    let refused = claim
        .await
        .expect("join")
        .expect_err("no prekey while held");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("held by an unfinished claim")
            && refused.message().contains("alice/phone"),
        "{refused:?}"
    );
    locker.batch_execute("ROLLBACK").await.expect("roll back");
    assert_eq!(stock_of(&server, &device).await.one_time_remaining, 1);
    let claimed = start_claim(&server, &device)
        .await
        .await
        .expect("join")
        .expect("claim after the holder is gone");
    assert_eq!(claimed.key_id, one_time_id.as_bytes().to_vec());
    server.stop().await;
}

/// The session settings reach every pooled connection: with the lock timeout off, the same
/// wait is cut by `statement_timeout` instead, still UNAVAILABLE and still no last resort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_timeout_of_every_connection_cuts_a_wait_the_lock_timeout_does_not() {
    let options = StoreOptions {
        lock_timeout: Duration::ZERO,
        statement_timeout: Duration::from_millis(300),
        ..StoreOptions::default()
    };
    let Some((server, device, _, _)) = one_left_with(options).await else {
        return;
    };
    let mut locker = lock_the_one_time_row(&server).await;
    let refused = start_claim(&server, &device)
        .await
        .await
        .expect("join")
        .expect_err("cut by the statement timeout");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    locker.batch_execute("ROLLBACK").await.expect("roll back");
    assert_eq!(stock_of(&server, &device).await.one_time_remaining, 1);
    server.stop().await;
}
