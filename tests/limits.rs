//! The limits on calls, against a real server with real gRPC clients, on SQLite and
//! PostgreSQL where the database is involved: a flood past the concurrency limit is shed at
//! once while health keeps answering; one request size limit holds on every service; the
//! settings parse. Deadlines are in `limits_deadlines.rs`, the connection limits (HTTP/2
//! streams, keepalive, age) in `limits_connections.rs`.
//!
//! The load is real, never mocked: calls whose request bodies never arrive hold the
//! concurrency limit.

mod common;

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use common::limits::{metric, transport, wait_until};
use common::raw::RawCodec;
use common::requests::fingerprint;
use common::server::TestServer;
use keyhold::config::{Limits, SettingsArgs};
use keyhold::proto::keyhold::v1 as pb;
use prost::Message;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

on_both_servers_with! {
    a_flood_past_the_concurrency_limit_is_shed_while_health_answers => flood_is_shed(two_calls_at_once);
}

fn two_calls_at_once() -> Limits {
    transport(|t| t.max_concurrent_calls = NonZeroUsize::new(2))
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
        assert!(
            keyhold::client::is_retryable(&status),
            "a shed call carries gRPC's retry pushback, so clients retry it: {status:?}"
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
