//! Fault injection on PostgreSQL (issue 10), bounded in time and counted: no acknowledged
//! write is ever lost, and the server recovers by itself.
//!
//! - **kill -9 of a replica under concurrent writers.** A `keyhold serve` process (the real
//!   binary) takes PutMessages from several concurrent writers; it is killed with SIGKILL in
//!   the middle of them, started again on the same database, and every write it acknowledged
//!   before it died is checked present, through the restarted process and in the database.
//! - **The database drops every connection under load.** What a PostgreSQL restart looks
//!   like to its clients, without restarting the cluster other tests share: every connection
//!   of the server to its own test database is ended with `pg_terminate_backend`, several
//!   times while writers run. Every acknowledged write is present afterwards, every failed
//!   call was UNAVAILABLE (retryable, never INTERNAL), and the same server, not restarted,
//!   takes writes again.
//!
//! Each test asserts acknowledged > 0 and lost == 0.

mod common;

use std::collections::HashSet;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cli::{free_port, keyhold, wait_until_serving_within};
use common::requests::{service_wrapped_session, whole_timeline};
use common::server::{TestDevice, TestServer};
use diesel::sql_types::{Array, BigInt, Binary, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use keyhold::client::Client;
use keyhold::crypto::ids::{Epoch, MessageId, SessionId};
use keyhold::proto::keyhold::v1 as pb;
use tonic::Code;

/// Concurrent writers in each test.
const WRITERS: usize = 8;

/// An app server writing to a session alice authors and carol reads.
struct World {
    app_token: String,
    carol: TestDevice,
    session: SessionId,
}

impl World {
    async fn new(server: &TestServer) -> World {
        let app_token = server.token(pb::Role::App, "", "").await;
        let app = server.client(&app_token).await;
        TestDevice::enroll(server, "alice", "phone").await;
        let carol = TestDevice::enroll(server, "carol", "phone").await;
        let session = service_wrapped_session(&app, "alice", &["carol"]).await;
        World {
            app_token,
            carol,
            session,
        }
    }

    /// A batch of `n` fresh messages of the session.
    fn batch(&self, n: usize) -> Vec<pb::NewMessage> {
        (0..n)
            .map(|i| pb::NewMessage {
                message_id: MessageId::generate().to_string(),
                session_id: self.session.to_string(),
                epoch: Epoch::FIRST.get(),
                nonce: vec![7; 12],
                ciphertext: format!("fault-injection message {i:04}").into_bytes(),
                associated_data: None,
            })
            .collect()
    }
}

async fn put(client: &Client, batch: Vec<pb::NewMessage>) -> Result<(), tonic::Status> {
    client
        .messages()
        .put_messages(pb::PutMessagesRequest {
            author_user_id: "alice".into(),
            author_device_id: String::new(),
            messages: batch,
        })
        .await
        .map(|_| ())
}

/// What the writers saw: the ids of every acknowledged message, and the codes of failures.
#[derive(Default)]
struct Tally {
    acked: Vec<String>,
    failures: Vec<Code>,
}

/// Runs [`WRITERS`] concurrent writers against `endpoint` until `stop` is set or `limit`
/// passes; each writes batches of one to three messages and records what was acknowledged.
fn start_writers(
    endpoint: String,
    token: String,
    world: Arc<World>,
    stop: Arc<AtomicBool>,
    limit: Duration,
    tally: Arc<Mutex<Tally>>,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (endpoint, token, world, stop, tally) = (
            endpoint.clone(),
            token.clone(),
            Arc::clone(&world),
            Arc::clone(&stop),
            Arc::clone(&tally),
        );
        tasks.spawn(async move {
            let deadline = Instant::now() + limit;
            let mut client: Option<Client> = None;
            let mut n = w;
            while !AtomicBool::load(&stop, Ordering::SeqCst) && Instant::now() < deadline {
                n += 1;
                let c = match &client {
                    Some(c) => c.clone(),
                    None => match Client::connect(&endpoint, &token).await {
                        Ok(c) => {
                            client = Some(c.clone());
                            c
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                };
                let batch = world.batch(1 + n % 3);
                let ids: Vec<String> = batch.iter().map(|m| m.message_id.clone()).collect();
                match put(&c, batch).await {
                    Ok(()) => tally.lock().expect("tally").acked.extend(ids),
                    Err(status) => {
                        tally.lock().expect("tally").failures.push(status.code());
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    tasks
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// How many of `ids` the database holds, read behind the server's back.
async fn stored_count(url: &str, ids: &[String]) -> usize {
    let bytes: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| MessageId::parse(id).expect("id").as_bytes().to_vec())
        .collect();
    let mut conn = AsyncPgConnection::establish(url).await.expect("connect");
    let found: Count =
        diesel::sql_query("SELECT COUNT(*) AS n FROM messages WHERE message_id = ANY($1)")
            .bind::<Array<Binary>, _>(bytes)
            .get_result(&mut conn)
            .await
            .expect("count");
    usize::try_from(found.n).expect("count")
}

/// Every message id carol's timeline lists through `endpoint`.
async fn listed_ids(endpoint: &str, carol: &TestDevice) -> HashSet<String> {
    let client = Client::connect(endpoint, &carol.token)
        .await
        .expect("connect");
    whole_timeline(&client, carol, 200)
        .await
        .into_iter()
        .map(|m| m.message_id)
        .collect()
}

/// A `keyhold serve` process on the test database, with the test server's key files.
struct Replica {
    child: Child,
    endpoint: String,
}

impl Replica {
    async fn start(server: &TestServer, port: u16) -> Replica {
        let child = keyhold()
            .arg("serve")
            .arg("--database-url")
            .arg(&server.db.url)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&server.key_dir)
            .arg("--kek-file")
            .arg(server.key_dir.join("dev-kek.key"))
            .arg("--escrow-public-key-file")
            .arg(server.key_dir.join("dev-escrow.pub"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keyhold serve");
        let endpoint = format!("http://127.0.0.1:{port}");
        let replica = Replica { child, endpoint };
        replica.until_serving().await;
        replica
    }

    async fn until_serving(&self) {
        wait_until_serving_within(&self.endpoint, Duration::from_secs(60)).await
    }

    /// SIGKILL, and reap the process.
    fn kill_9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_replica_under_concurrent_writers_loses_no_acknowledged_write() {
    let Some(db) = common::postgres_db().await else {
        return;
    };
    let server = TestServer::start(db).await;
    let world = Arc::new(World::new(&server).await);
    let port = free_port();
    let replica = Replica::start(&server, port).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut writers = start_writers(
        replica.endpoint.clone(),
        world.app_token.clone(),
        Arc::clone(&world),
        Arc::clone(&stop),
        Duration::from_secs(60),
        Arc::clone(&tally),
    );
    // Kill it in the middle of the writes: once a few hundred are acknowledged (or 20 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    while tally.lock().expect("tally").acked.len() < 300 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_kill = tally.lock().expect("tally").failures.clone();
    replica.kill_9();
    // Let the writers meet the dead process, then stop them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    while writers.join_next().await.is_some() {}
    let (acked, failures) = {
        let t = tally.lock().expect("tally");
        (t.acked.clone(), t.failures.clone())
    };
    assert!(
        !acked.is_empty(),
        "no write was acknowledged before the kill"
    );
    assert!(
        before_kill.iter().all(|c| *c == Code::Unavailable),
        "failures before the kill: {before_kill:?}"
    );
    assert!(
        !failures.contains(&Code::Internal),
        "a write failed INTERNAL: {failures:?}"
    );

    // Restarted on the same database: every acknowledged write is there.
    let restarted = Replica::start(&server, port).await;
    let listed = listed_ids(&restarted.endpoint, &world.carol).await;
    let lost: Vec<&String> = acked.iter().filter(|id| !listed.contains(*id)).collect();
    let stored = stored_count(&server.db.url, &acked).await;
    eprintln!(
        "kill -9: {} acknowledged, {} failed calls, {} lost, {} listed after restart",
        acked.len(),
        failures.len(),
        lost.len(),
        listed.len()
    );
    assert_eq!(lost.len(), 0, "acknowledged writes lost: {lost:?}");
    assert_eq!(
        stored,
        acked.len(),
        "acknowledged writes missing in the database"
    );
    // And it takes writes.
    let client = Client::connect(&restarted.endpoint, &world.app_token)
        .await
        .expect("connect");
    put(&client, world.batch(2))
        .await
        .expect("a write after the restart");
    restarted.kill_9();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_database_connections_under_load_lose_no_write_and_the_server_recovers() {
    let Some(db) = common::postgres_db().await else {
        return;
    };
    let server = TestServer::start(db).await;
    let world = Arc::new(World::new(&server).await);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut writers = start_writers(
        server.endpoint.clone(),
        world.app_token.clone(),
        Arc::clone(&world),
        Arc::clone(&stop),
        Duration::from_secs(60),
        Arc::clone(&tally),
    );
    // Five times, every 600 ms: end every connection to the test database but this one.
    let mut admin = AsyncPgConnection::establish(&server.db.url)
        .await
        .expect("connect");
    let mut terminated = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let ended: Count = diesel::sql_query(
            "SELECT COUNT(*) AS n FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()) AS t",
        )
        .bind::<Text, _>(db_name(&server.db.url))
        .get_result(&mut admin)
        .await
        .expect("terminate");
        terminated += ended.n;
    }
    // Writes go on after the last disruption, on the same server.
    let after = tally.lock().expect("tally").acked.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tally.lock().expect("tally").acked.len() < after + 100 {
        assert!(Instant::now() < deadline, "writes did not recover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    while writers.join_next().await.is_some() {}
    let (acked, failures) = {
        let t = tally.lock().expect("tally");
        (t.acked.clone(), t.failures.clone())
    };
    let listed = listed_ids(&server.endpoint, &world.carol).await;
    let lost: Vec<&String> = acked.iter().filter(|id| !listed.contains(*id)).collect();
    eprintln!(
        "terminated backends: {terminated} connections in 5 rounds, {} acknowledged, {} failed \
         calls, {} lost",
        acked.len(),
        failures.len(),
        lost.len()
    );
    assert!(terminated > 0, "no connection was ended");
    assert!(!acked.is_empty(), "no write was acknowledged");
    assert_eq!(lost.len(), 0, "acknowledged writes lost: {lost:?}");
    assert_eq!(stored_count(&server.db.url, &acked).await, acked.len());
    assert!(
        failures.iter().all(|c| *c == Code::Unavailable),
        "every failure is UNAVAILABLE (retryable): {failures:?}"
    );
    // A fresh connection after the writers stopped: the first write succeeds.
    let client = server.client(&world.app_token).await;
    put(&client, world.batch(3))
        .await
        .expect("the server took writes again without a restart");
    server.stop().await;
}

/// The database name in a PostgreSQL URL.
fn db_name(url: &str) -> String {
    let path = url.rsplit('/').next().unwrap_or_default();
    path.split('?').next().unwrap_or_default().to_string()
}
