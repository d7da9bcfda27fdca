//! Deadlines, against a real server with real gRPC clients on SQLite and PostgreSQL: a write
//! past its deadline (the caller's `grpc-timeout` or the server's default) is
//! DEADLINE_EXCEEDED, stores nothing and leaves no transaction open nor any connection
//! half-used; a transaction dropped mid-flight is rolled back and its connection reused; a
//! watch stream outlives the default deadline but not its own `grpc-timeout`.
//!
//! The slowness is real, never mocked: a lock the test holds in the database (a row lock on
//! PostgreSQL, the write lock on SQLite) holds a write past its deadline.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::limits::{metric, transport, wait_until};
use common::raw_db::RawDb;
use common::requests::{role_client, service_wrapped_session};
use common::server::{TestDevice, TestServer};
use common::{Kind, TestDb};
use keyhold::config::Limits;
use keyhold::crypto::ids::MessageId;
use keyhold::proto::keyhold::v1 as pb;
use keyhold::store::audit::NewAuditEvent;
use keyhold::store::{Store, StoreError, StoreOptions};
use tonic::Code;

fn short_default_deadline() -> Limits {
    transport(|t| t.default_deadline = Some(Duration::from_millis(1500)))
}

fn default_limits() -> Limits {
    Limits::default()
}

on_both_servers_with! {
    a_write_past_its_grpc_timeout_is_deadline_exceeded_and_writes_nothing => expired_write(default_limits);
    a_write_past_the_default_deadline_is_deadline_exceeded_and_writes_nothing => expired_default_write(short_default_deadline);
    a_watch_outlives_the_default_deadline_but_not_its_grpc_timeout => watch_deadlines(short_default_deadline);
}

/// A database lock the test holds, which a PutMessages batch waits for: on PostgreSQL a row
/// lock on every session (the messages' foreign key check waits for it), on SQLite the write
/// lock.
async fn hold_write_lock(raw: &mut RawDb) {
    use diesel::connection::SimpleConnection;
    use diesel_async::SimpleAsyncConnection;
    match raw {
        RawDb::Sqlite(conn) => conn.batch_execute("BEGIN IMMEDIATE").expect("lock"),
        RawDb::Postgres(conn) => conn
            .batch_execute("BEGIN; SELECT session_id FROM sessions FOR UPDATE")
            .await
            .expect("lock"),
    }
}

async fn release_lock(raw: &mut RawDb) {
    use diesel::connection::SimpleConnection;
    use diesel_async::SimpleAsyncConnection;
    match raw {
        RawDb::Sqlite(conn) => conn.batch_execute("ROLLBACK").expect("unlock"),
        RawDb::Postgres(conn) => conn.batch_execute("ROLLBACK").await.expect("unlock"),
    }
}

/// Whether no connection to the database, other than the test's, is inside a transaction:
/// on SQLite the write lock can be taken (waiting up to the raw connection's busy timeout),
/// on PostgreSQL no other backend is idle in a transaction or running one's statement.
async fn no_transaction_left(raw: &mut RawDb) -> bool {
    use diesel::connection::SimpleConnection;
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    match raw {
        RawDb::Sqlite(conn) => {
            tokio::task::block_in_place(|| conn.batch_execute("BEGIN IMMEDIATE; ROLLBACK").is_ok())
        }
        RawDb::Postgres(conn) => {
            let query = diesel::sql_query(
                "SELECT COUNT(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND (state LIKE 'idle in transaction%' OR xact_start IS NOT NULL AND state = 'active' AND query NOT ILIKE '%pg_stat_activity%')",
            );
            let count: Count = diesel_async::RunQueryDsl::get_result(query, conn.as_mut())
                .await
                .expect("pg_stat_activity");
            count.n == 0
        }
    }
}

/// Waits until [`no_transaction_left`] holds; fails after 30 s.
async fn wait_until_no_transaction_left(raw: &mut RawDb) {
    let give_up = Instant::now() + Duration::from_secs(30);
    while !no_transaction_left(raw).await {
        assert!(Instant::now() < give_up, "a transaction is left open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn filler(session: &str, n: usize) -> pb::NewMessage {
    pb::NewMessage {
        message_id: MessageId::generate().to_string(),
        session_id: session.into(),
        epoch: 1,
        nonce: vec![7; 12],
        ciphertext: format!("filler message {n:08}------").into_bytes(),
        associated_data: None,
    }
}

/// A gRPC transport of one HTTP/2 connection which, unlike tonic's `Channel`, does not enforce
/// the `grpc-timeout` it sends: the answer a test sees at the deadline is the server's.
#[derive(Clone)]
struct Unenforced {
    send: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
    origin: String,
}

impl Unenforced {
    async fn connect(endpoint: &str) -> Unenforced {
        let tcp = tokio::net::TcpStream::connect(endpoint.trim_start_matches("http://"))
            .await
            .expect("connect");
        let (send, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        Unenforced {
            send,
            origin: endpoint.to_string(),
        }
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for Unenforced {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), hyper::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        *request.uri_mut() = format!("{}{path}", self.origin).parse().expect("uri");
        Box::pin(self.send.send_request(request))
    }
}

async fn expired_write(server: &TestServer) {
    expired_write_case(server, Some(Duration::from_millis(300)), "grpc-timeout").await;
}

async fn expired_default_write(server: &TestServer) {
    expired_write_case(server, None, "--default-deadline-ms").await;
}

/// A PutMessages batch held by a database lock past its deadline (`timeout` as its
/// `grpc-timeout`, or the server's default): DEADLINE_EXCEEDED naming `names`, nothing stored,
/// no transaction left open, and the same batch stored afterwards.
async fn expired_write_case(server: &TestServer, timeout: Option<Duration>, names: &str) {
    let rolled_back = "keyhold_db_transactions_abandoned_total{outcome=\"rolled_back\"}";
    let abandoned_before = metric(rolled_back);
    TestDevice::enroll(server, "alice", "phone").await;
    TestDevice::enroll(server, "bob", "phone").await;
    let app = role_client(server, pb::Role::App).await;
    let session = service_wrapped_session(&app, "alice", &["bob"])
        .await
        .to_string();
    // Two messages: one transaction on both backends.
    let batch = pb::PutMessagesRequest {
        author_user_id: "alice".into(),
        author_device_id: String::new(),
        messages: vec![filler(&session, 1), filler(&session, 2)],
    };

    let token = server.token(pb::Role::App, "", "").await;
    let mut unenforced =
        pb::messages_client::MessagesClient::new(Unenforced::connect(&server.endpoint).await);
    let mut raw = RawDb::open(&server.db).await;
    hold_write_lock(&mut raw).await;
    let mut request = tonic::Request::new(batch.clone());
    let bearer = format!("Bearer {token}").parse().expect("header");
    request.metadata_mut().insert("authorization", bearer);
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    let refused = unenforced.put_messages(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");
    assert!(refused.message().contains(names), "{refused:?}");
    // The write was still waiting for the lock: let it go, and let the server finish with it.
    release_lock(&mut raw).await;
    let pool = || {
        let s = server.store.pool_status();
        async move { s.idle == s.size }
    };
    wait_until("every pooled connection to be back", pool).await;
    wait_until_no_transaction_left(&mut raw).await;
    assert_eq!(
        raw.fingerprint().await.messages,
        0,
        "a write past its deadline was stored"
    );
    assert!(metric(rolled_back) > abandoned_before);

    // Nothing is half-used: the same batch, retried by the same ids, is stored now.
    let stored = app.messages().put_messages(batch).await.expect("stored");
    assert_eq!(stored.into_inner().results.len(), 2);
    assert_eq!(raw.fingerprint().await.messages, 2);
}

/// A package for `to` (its payload is the test's).
fn package(to: &TestDevice, payload: &[u8]) -> pb::OutgoingKeyPackage {
    pb::OutgoingKeyPackage {
        recipient_user_id: to.user.to_string(),
        recipient_device_id: to.device.to_string(),
        recipient_key_id: to.xwing.encapsulation_key().key_id().as_bytes().to_vec(),
        payload: payload.to_vec(),
    }
}

async fn watch_deadlines(server: &TestServer) {
    let phone = TestDevice::enroll(server, "alice", "phone").await;
    let laptop = TestDevice::enroll(server, "alice", "laptop").await;
    let phone_client = phone.client(server).await;
    let mut watch = phone_client
        .device_sync()
        .watch_key_packages(pb::WatchKeyPackagesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    // Well past the server's default deadline (300 ms), the stream is still open.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    laptop
        .client(server)
        .await
        .device_sync()
        .send_key_packages(pb::SendKeyPackagesRequest {
            packages: vec![package(&phone, b"still watching")],
            idempotency_key: String::new(),
        })
        .await
        .expect("send");
    let delivered = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("delivered")
        .expect("no error")
        .expect("a package");
    assert_eq!(
        delivered.package.expect("package").payload,
        b"still watching"
    );

    // The caller's own grpc-timeout ends a stream, with DEADLINE_EXCEEDED.
    let mut request = tonic::Request::new(pb::WatchKeyPackagesRequest {
        cursor: delivered.cursor,
    });
    request.set_timeout(Duration::from_millis(500));
    let mut timed = phone_client
        .device_sync()
        .watch_key_packages(request)
        .await
        .expect("watch")
        .into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(30), timed.message())
        .await
        .expect("the stream ended")
        .unwrap_err();
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    assert!(ended.message().contains("grpc-timeout"), "{ended:?}");
}

async fn dropped_transaction_is_rolled_back(db: TestDb) {
    let rolled_back = "keyhold_db_transactions_abandoned_total{outcome=\"rolled_back\"}";
    let before = metric(rolled_back);
    // No idle-in-transaction timeout: the server would otherwise end it for us.
    let options = StoreOptions {
        idle_in_transaction_timeout: Duration::ZERO,
        ..StoreOptions::default()
    };
    let store = Store::open_with(&db.url, options).await.expect("open");
    store.migrate().await.expect("migrate");
    let (wrote, written) = tokio::sync::oneshot::channel();
    let running = store.clone();
    let task = tokio::spawn(async move {
        running
            .transaction(async move |tx| -> Result<(), StoreError> {
                let event = NewAuditEvent::new("test", "test.abandoned", "nothing");
                tx.append_audit_event(&event).await?;
                let _ = wrote.send(());
                std::future::pending::<()>().await;
                Ok(())
            })
            .await
    });
    written.await.expect("the transaction wrote");
    // Its call goes away (as when a deadline passes): the future is dropped mid-transaction.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());

    // With no other store call, the transaction ends and its connection comes back, reused.
    let mut raw = RawDb::open(&db).await;
    wait_until("the abandoned transaction to end", || {
        let s = store.pool_status();
        async move { s.size == 1 && s.idle == 1 }
    })
    .await;
    wait_until_no_transaction_left(&mut raw).await;
    assert!(metric(rolled_back) > before);
    assert_eq!(raw.fingerprint().await.audit_events, 0);
    store
        .transaction(async |tx| -> Result<(), StoreError> {
            tx.append_audit_event(&NewAuditEvent::new("test", "test.after", "nothing"))
                .await
                .map(drop)
        })
        .await
        .expect("the connection works");
    assert_eq!(raw.fingerprint().await.audit_events, 1);
    assert_eq!(store.pool_status().size, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_dropped_mid_flight_is_rolled_back_on_sqlite() {
    dropped_transaction_is_rolled_back(common::sqlite_db()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_dropped_mid_flight_is_rolled_back_on_postgres() {
    if let Some(db) = common::postgres_db().await {
        assert_eq!(db.kind, Kind::Postgres);
        dropped_transaction_is_rolled_back(db).await;
    }
}
