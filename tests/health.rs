//! Health follows the database: with the real `grpc.health.v1` client, every Keyhold service
//! and the server as a whole (`""`) turn NOT_SERVING within 5 s of the database going away and
//! SERVING within 5 s of its return, and calls made meanwhile are UNAVAILABLE, quickly.
//!
//! On PostgreSQL the outage is real and undone by the test: the test's own database stops
//! accepting connections (`ALTER DATABASE … ALLOW_CONNECTIONS false`) and its sessions are
//! ended (`pg_terminate_backend`), then connections are allowed again; the shared server keeps
//! running. On SQLite the one outage a process can meet is its store closing.

mod common;

use std::time::{Duration, Instant};

use common::server::TestServer;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use keyhold::proto::keyhold::v1 as pb;
use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// The bound the issue sets on noticing a change, either way.
const HEALTH_BOUND: Duration = Duration::from_secs(5);

/// Every health name the server reports: each service, and `""` for the whole server.
fn health_names() -> Vec<&'static str> {
    let mut names = keyhold::server::service_names();
    names.push("");
    names
}

/// One `Health.Watch` stream per name: each yields the status now, then every change.
async fn watch_all(
    server: &TestServer,
) -> Vec<(&'static str, tonic::Streaming<HealthCheckResponse>)> {
    let mut health = HealthClient::new(server.client("unused").await.channel());
    let mut streams = Vec::new();
    for name in health_names() {
        let stream = health
            .watch(HealthCheckRequest {
                service: name.to_string(),
            })
            .await
            .expect("watch")
            .into_inner();
        streams.push((name, stream));
    }
    streams
}

/// Reads every stream until it reports `want`, failing past `deadline`.
async fn await_status(
    streams: &mut [(&'static str, tonic::Streaming<HealthCheckResponse>)],
    want: ServingStatus,
    deadline: Instant,
) {
    for (name, stream) in streams.iter_mut() {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, stream.next())
                .await
                .unwrap_or_else(|_| panic!("health of {name:?} did not turn {want:?} in time"))
                .expect("the watch stream ended")
                .expect("a watch message");
            if next.status == want as i32 {
                break;
            }
        }
    }
}

/// Checks every name once with `Health.Check`.
async fn check_all(server: &TestServer) -> Vec<(&'static str, i32)> {
    let mut health = HealthClient::new(server.client("unused").await.channel());
    let mut out = Vec::new();
    for name in health_names() {
        let status = health
            .check(HealthCheckRequest {
                service: name.to_string(),
            })
            .await
            .expect("check")
            .into_inner()
            .status;
        out.push((name, status));
    }
    out
}

/// A GetUserKeys call and how long its answer took.
async fn lookup(server: &TestServer, token: &str) -> (Result<(), tonic::Status>, Duration) {
    let started = Instant::now();
    let result = server
        .client(token)
        .await
        .key_directory()
        .get_user_keys(pb::GetUserKeysRequest {
            user_ids: vec!["alice".into()],
        })
        .await
        .map(drop);
    (result, started.elapsed())
}

/// The database name in a PostgreSQL URL.
fn database_name(url: &str) -> &str {
    let path = url.rsplit('/').next().unwrap_or(url);
    path.split('?').next().unwrap_or(path)
}

async fn admin_sql(sql: &str) {
    let admin_url = common::postgres_admin_url().expect("admin url");
    let mut admin = AsyncPgConnection::establish(&admin_url)
        .await
        .expect("admin connection");
    admin.batch_execute(sql).await.expect("admin SQL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_turns_every_service_not_serving_and_back() {
    let Some(db) = common::postgres_db().await else {
        return;
    };
    let name = database_name(&db.url).to_string();
    let server = TestServer::start(db).await;
    let app = server.token(pb::Role::App, "", "").await;
    assert!(check_all(&server)
        .await
        .iter()
        .all(|(_, s)| *s == ServingStatus::Serving as i32));
    let mut streams = watch_all(&server).await;
    await_status(
        &mut streams,
        ServingStatus::Serving,
        Instant::now() + HEALTH_BOUND,
    )
    .await;
    assert!(lookup(&server, &app).await.0.is_ok());

    // The outage: no new sessions, and the open ones (the pool's) ended.
    admin_sql(&format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS false; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid();"
    ))
    .await;
    let lost = Instant::now();
    await_status(&mut streams, ServingStatus::NotServing, lost + HEALTH_BOUND).await;
    eprintln!("NOT_SERVING {:?} after the outage", lost.elapsed());
    assert!(check_all(&server)
        .await
        .iter()
        .all(|(_, s)| *s == ServingStatus::NotServing as i32));

    // Calls meanwhile: UNAVAILABLE, saying why, without waiting out the pool's 10 s.
    for _ in 0..3 {
        let (result, took) = lookup(&server, &app).await;
        let status = result.expect_err("a call while the database is down");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "database unavailable");
        assert!(took < HEALTH_BOUND, "the call took {took:?}");
    }

    admin_sql(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).await;
    let back = Instant::now();
    await_status(&mut streams, ServingStatus::Serving, back + HEALTH_BOUND).await;
    eprintln!("SERVING {:?} after the database came back", back.elapsed());
    let (result, _) = lookup(&server, &app).await;
    result.expect("a call once the database is back");
    drop(streams);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_health_is_serving_and_turns_not_serving_when_the_store_closes() {
    let server = TestServer::start(common::sqlite_db()).await;
    let app = server.token(pb::Role::App, "", "").await;
    assert!(check_all(&server)
        .await
        .iter()
        .all(|(_, s)| *s == ServingStatus::Serving as i32));
    let mut streams = watch_all(&server).await;
    server.store.close();
    let lost = Instant::now();
    await_status(&mut streams, ServingStatus::NotServing, lost + HEALTH_BOUND).await;
    let (result, _) = lookup(&server, &app).await;
    assert_eq!(result.expect_err("store closed").code(), Code::Unavailable);
    drop(streams);
    server.stop().await;
}
