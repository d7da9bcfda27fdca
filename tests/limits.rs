//! The limits on calls, against a real server with real gRPC clients, on SQLite and
//! PostgreSQL where the database is involved: a flood past the concurrency limit is shed at
//! once while health keeps answering; a write past its deadline is DEADLINE_EXCEEDED and
//! leaves nothing written and no connection half-used; a watch stream outlives the default
//! deadline but not its own `grpc-timeout`; one request size limit holds on every service;
//! the settings parse. The connection limits (HTTP/2 streams, keepalive, age) are in
//! `limits_connections.rs`.
//!
//! The slowness is real, never mocked: calls whose request bodies never arrive hold the
//! concurrency limit, and a lock the test holds in the database (a row lock on PostgreSQL,
//! the write lock on SQLite) holds a write past its deadline.

mod common;

use std::future::Future;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use common::raw_db::RawDb;
use common::requests::{fingerprint, role_client, service_wrapped_session};
use common::server::{TestDevice, TestServer};
use common::{Kind, TestDb};
use keyhold::config::{Limits, SettingsArgs, TransportLimits};
use keyhold::crypto::ids::MessageId;
use keyhold::proto::keyhold::v1 as pb;
use keyhold::store::audit::NewAuditEvent;
use keyhold::store::{Store, StoreError, StoreOptions};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The default limits with the transport limits `f` sets.
fn transport(f: impl FnOnce(&mut TransportLimits)) -> Limits {
    let mut limits = Limits::default();
    f(&mut limits.transport);
    limits
}

fn two_calls_at_once() -> Limits {
    transport(|t| t.max_concurrent_calls = NonZeroUsize::new(2))
}

fn short_default_deadline() -> Limits {
    transport(|t| t.default_deadline = Some(Duration::from_millis(1500)))
}

fn default_limits() -> Limits {
    Limits::default()
}

on_both_servers_with! {
    a_flood_past_the_concurrency_limit_is_shed_while_health_answers => flood_is_shed(two_calls_at_once);
    a_write_past_its_grpc_timeout_is_deadline_exceeded_and_writes_nothing => expired_write(default_limits);
    a_write_past_the_default_deadline_is_deadline_exceeded_and_writes_nothing => expired_default_write(short_default_deadline);
    a_watch_outlives_the_default_deadline_but_not_its_grpc_timeout => watch_deadlines(short_default_deadline);
}

/// Waits until `check` holds, polling; fails after 30 s naming `what`.
async fn wait_until<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let give_up = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < give_up, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one sample in the process's Prometheus rendering (0 when absent).
fn metric(sample: &str) -> f64 {
    let rendered = keyhold::observe::install_recorder()
        .expect("recorder")
        .render();
    rendered
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().expect("a number"))
}

/// Whether the server at `endpoint` says SERVING overall and for the Trust service.
async fn serving(endpoint: &str) -> bool {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    for service in ["", "keyhold.v1.Trust"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status;
        if status != ServingStatus::Serving as i32 {
            return false;
        }
    }
    true
}

/// An AddTrustedUser call whose request body never comes: it holds a place in the server's
/// concurrency limit until its task is aborted (which resets the stream).
async fn stalled_call(
    endpoint: &str,
    token: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::AddTrustedUserResponse>, Status>> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut request = tonic::Request::new(tokio_stream::pending::<pb::AddTrustedUserRequest>());
    let bearer = format!("Bearer {token}").parse().expect("header");
    request.metadata_mut().insert("authorization", bearer);
    tokio::spawn(async move {
        grpc.ready()
            .await
            .map_err(|e| Status::unknown(e.to_string()))?;
        let path = http::uri::PathAndQuery::from_static("/keyhold.v1.Trust/AddTrustedUser");
        grpc.client_streaming(request, path, tonic_prost::ProstCodec::default())
            .await
    })
}

fn trust(author: &str, trusted: &str) -> pb::AddTrustedUserRequest {
    pb::AddTrustedUserRequest {
        author_user_id: author.into(),
        trusted_user_id: trusted.into(),
    }
}

async fn flood_is_shed(server: &TestServer) {
    let shed_before = metric("keyhold_calls_shed_total");
    let token = server.token(pb::Role::App, "", "").await;
    let app = server.client(&token).await;
    let list = || {
        let mut trust = app.trust();
        async move {
            trust
                .list_trusted_users(pb::ListTrustedUsersRequest {
                    author_user_id: "alice".into(),
                    ..Default::default()
                })
                .await
        }
    };
    // Two calls whose bodies never arrive fill the limit of two: from then on every Keyhold
    // call is shed, for as long as they stay. (A stalled call that met the probe in the limit
    // was shed itself: it is started again.)
    let mut held = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < give_up,
            "the stalled calls never filled the limit"
        );
        held.retain(|call: &tokio::task::JoinHandle<_>| !call.is_finished());
        while held.len() < 2 {
            held.push(stalled_call(&server.endpoint, &token).await);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if matches!(list().await, Err(s) if s.code() == Code::ResourceExhausted) {
            break;
        }
    }

    // The flood: 64 writes at once over 8 connections, health checked all the while.
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(server.client(&token).await);
    }
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..64 {
        let client = clients[i % clients.len()].clone();
        flood.spawn(async move {
            client
                .trust()
                .add_trusted_user(trust("alice", &format!("u{i}")))
                .await
        });
    }
    let mut checks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let endpoint = server.endpoint.clone();
        checks.spawn(async move { serving(&endpoint).await });
    }
    let mut shed = 0;
    while let Some(outcome) = flood.join_next().await {
        let status = outcome
            .expect("task")
            .expect_err("shed while the limit is full");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("overloaded") && status.message().contains("retry later"),
            "{status:?}"
        );
        shed += 1;
    }
    while let Some(up) = checks.join_next().await {
        assert!(
            up.expect("task"),
            "health must answer SERVING while calls are shed"
        );
    }
    assert_eq!(
        fingerprint(&server.db).await.trusted_users,
        0,
        "a shed call wrote"
    );
    assert!(metric("keyhold_calls_shed_total") >= shed_before + f64::from(shed));

    // The stalled calls gone, calls are answered again.
    for call in &held {
        call.abort();
    }
    wait_until("calls to be answered again", || async {
        list().await.is_ok()
    })
    .await;

    // A real flood, nothing held: each call is answered or shed, never anything else, and
    // exactly the answered ones wrote.
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..96 {
        let client = clients[i % clients.len()].clone();
        flood.spawn(async move {
            client
                .trust()
                .add_trusted_user(trust("bob", &format!("v{i}")))
                .await
        });
    }
    let mut answered = 0;
    while let Some(outcome) = flood.join_next().await {
        match outcome.expect("task") {
            Ok(_) => answered += 1,
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
        }
    }
    assert_eq!(fingerprint(&server.db).await.trusted_users, answered);
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

/// Sends and receives bodies as they are.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// `message` with an unknown field (number 15, which the service skips) of `padding` bytes.
fn padded(message: &impl Message, padding: usize) -> Vec<u8> {
    let mut body = message.encode_to_vec();
    prost::encoding::encode_key(15, prost::encoding::WireType::LengthDelimited, &mut body);
    prost::encoding::encode_varint(padding as u64, &mut body);
    body.resize(body.len() + padding, 0);
    body
}

/// One unary call with a raw body.
async fn raw_call(
    server: &TestServer,
    token: &str,
    path: &'static str,
    body: Vec<u8>,
) -> Result<(), Status> {
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(body);
    let bearer = format!("Bearer {token}").parse().expect("header");
    request.metadata_mut().insert("authorization", bearer);
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(drop)
}

/// A call on each of Trust, Escrow and Admin (which had tonic's 4 MiB default before) and on
/// KeyDirectory, with its body padded by `padding` bytes.
async fn padded_calls(
    server: &TestServer,
    padding: usize,
) -> Vec<(&'static str, usize, Result<(), Status>)> {
    let app = server.token(pb::Role::App, "", "").await;
    let staff = server.token(pb::Role::Staff, "", "").await;
    let calls: [(&str, &'static str, Vec<u8>); 4] = [
        (
            &app,
            "/keyhold.v1.Trust/AddTrustedUser",
            padded(&trust("alice", "bob"), padding),
        ),
        (
            &staff,
            "/keyhold.v1.Escrow/ListAuditEvents",
            padded(&pb::ListAuditEventsRequest::default(), padding),
        ),
        (
            &server.admin_token,
            "/keyhold.v1.Admin/CreateToken",
            padded(
                &pb::CreateTokenRequest {
                    role: pb::Role::App as i32,
                    ..Default::default()
                },
                padding,
            ),
        ),
        (
            &app,
            "/keyhold.v1.KeyDirectory/GetUserKeys",
            padded(
                &pb::GetUserKeysRequest {
                    user_ids: vec!["alice".into()],
                },
                padding,
            ),
        ),
    ];
    let mut out = Vec::new();
    for (token, path, body) in calls {
        let len = body.len();
        out.push((path, len, raw_call(server, token, path, body).await));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_size_limit_holds_on_every_service() {
    let small = transport(|t| t.max_request_bytes = 64 * 1024);
    let server = TestServer::start_with_limits(common::sqlite_db(), small).await;
    for (path, len, outcome) in padded_calls(&server, 100 * 1024).await {
        let status = outcome.expect_err(path);
        assert_eq!(status.code(), Code::ResourceExhausted, "{path}: {status:?}");
        let message = status.message();
        assert!(
            message.contains(&format!("found {len} bytes"))
                && message.contains("65536 bytes")
                && message.contains("--max-request-bytes"),
            "{path}: {message}"
        );
    }
    assert_eq!(fingerprint(&server.db).await.trusted_users, 0);
    server.stop().await;

    // Past tonic's own default (4 MiB), within Keyhold's (16 MiB): taken everywhere.
    let server = TestServer::start(common::sqlite_db()).await;
    for (path, _, outcome) in padded_calls(&server, 6 * 1024 * 1024).await {
        outcome.unwrap_or_else(|s| panic!("{path}: {s:?}"));
    }
    assert_eq!(fingerprint(&server.db).await.trusted_users, 1);
    server.stop().await;
}

#[test]
fn the_limit_settings_parse_from_flags_and_the_config_file() {
    let dir = common::cli::temp_dir();
    let file = dir.join("keyhold.toml");
    std::fs::write(
        &file,
        "max_concurrent_calls = 7\ndefault_deadline_ms = 1500\nhttp2_max_concurrent_streams = 9\n\
         http2_keepalive_interval_secs = 0\nmax_connection_age_secs = 600\n",
    )
    .expect("write the config file");
    let args = SettingsArgs {
        config: Some(file),
        max_request_bytes: Some("1048576".into()),
        max_connection_age_grace_secs: Some("5".into()),
        ..Default::default()
    };
    let limits = Limits::from_settings(&args.resolve().expect("settings")).transport;
    assert_eq!(limits.max_concurrent_calls, NonZeroUsize::new(7));
    assert_eq!(limits.default_deadline, Some(Duration::from_millis(1500)));
    assert_eq!(limits.http2_max_concurrent_streams.get(), 9);
    assert_eq!(limits.http2_keepalive_interval, None);
    assert_eq!(limits.http2_keepalive_timeout, Duration::from_secs(20));
    assert_eq!(limits.max_connection_age, Some(Duration::from_secs(600)));
    assert_eq!(
        limits.max_connection_age_grace,
        Some(Duration::from_secs(5))
    );
    assert_eq!(limits.max_request_bytes, 1024 * 1024);

    let bad = SettingsArgs {
        default_deadline_ms: Some("soon".into()),
        ..Default::default()
    };
    let err = bad.resolve().unwrap_err().to_string();
    assert!(
        err.contains("--default-deadline-ms")
            && err.contains("KEYHOLD_DEFAULT_DEADLINE_MS")
            && err.contains("`default_deadline_ms`"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}
