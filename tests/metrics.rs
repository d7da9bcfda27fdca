//! Prometheus metrics over HTTP: a real server on each backend, its `/metrics` listener
//! scraped over TCP and parsed with a Prometheus text-format parser, and the counters seen to
//! move by exactly what a set of gRPC calls did: requests by method and code with their
//! latency histogram, prekey claims by outcome, low-stock messages, escrow reads, audit
//! appends, open watch streams; the pool, KEK and database gauges are there.
//!
//! The recorder is global to the process, so both backends run one after the other in one
//! test and every check is a difference between two scrapes.

mod common;

use std::time::{Duration, Instant};

use common::requests::service_wrapped_request;
use common::server::{TestDevice, TestServer};
use keyhold::crypto::sign::{Prekey, PrekeyKind};
use keyhold::crypto::xwing::DecapsulationKey;
use keyhold::crypto::Suite;
use keyhold::proto::keyhold::v1 as pb;
use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt as _;
use tonic::Code;

/// A `/metrics` listener serving one test server's store.
struct MetricsEndpoint {
    address: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsEndpoint {
    async fn start(server: &TestServer) -> MetricsEndpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let store = server.store.clone();
        let task = tokio::spawn(async move {
            keyhold::observe::serve_metrics(listener, store, std::future::pending())
                .await
                .expect("metrics listener");
        });
        MetricsEndpoint { address, task }
    }

    /// One HTTP/1.1 GET: the status line, the headers and the body.
    async fn get(&self, path: &str) -> (String, String, String) {
        let mut stream = tokio::net::TcpStream::connect(self.address)
            .await
            .expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: keyhold\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("response");
        let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (status.to_string(), headers.to_lowercase(), body.to_string())
    }

    async fn scrape(&self) -> Scrape {
        let (status, headers, body) = self.get("/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            headers.contains("content-type: text/plain; version=0.0.4"),
            "{headers}"
        );
        Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
    }
}

/// The value of the sample of `metric` whose labels are exactly `labels` (0 when absent:
/// a counter not yet incremented is not rendered).
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && s.labels.len() == labels.len())
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{metric} is not a single number: {other:?}"),
        })
        .unwrap_or(0.0)
}

fn present(scrape: &Scrape, metric: &str) -> bool {
    scrape.samples.iter().any(|s| s.metric == metric)
}

/// A prekey of `kind` signed by `d`.
fn signed_prekey(d: &TestDevice, kind: PrekeyKind) -> pb::SignedPrekey {
    let key = DecapsulationKey::generate().expect("keygen");
    let prekey = Prekey {
        suite: Suite::XWingAes256GcmV1,
        user: d.user.clone(),
        device: d.device.clone(),
        kind,
        key: key.encapsulation_key().clone(),
    };
    pb::SignedPrekey {
        suite: pb::Suite::XwingAes256gcmV1 as i32,
        encapsulation_key: prekey.key.to_bytes(),
        signature: d.identity.sign(&prekey).as_bytes().to_vec(),
    }
}

const GET_USER_KEYS: [(&str, &str); 2] = [
    ("service", "keyhold.v1.KeyDirectory"),
    ("method", "GetUserKeys"),
];

fn requests(code: &'static str) -> [(&'static str, &'static str); 3] {
    [GET_USER_KEYS[0], GET_USER_KEYS[1], ("code", code)]
}

async fn get_user_keys(
    server: &TestServer,
    token: &str,
    users: &[&str],
) -> Result<tonic::Response<pb::GetUserKeysResponse>, tonic::Status> {
    server
        .client(token)
        .await
        .key_directory()
        .get_user_keys(pb::GetUserKeysRequest {
            user_ids: users.iter().map(|u| u.to_string()).collect(),
        })
        .await
}

/// The calls, and the differences they make between two scrapes.
async fn counters_move_with_calls(server: &TestServer) {
    let metrics = MetricsEndpoint::start(server).await;
    let (status, _, _) = metrics.get("/other").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    let app = server.token(pb::Role::App, "", "").await;
    let staff = server.token(pb::Role::Staff, "", "").await;
    let alice = TestDevice::enroll(server, "alice", "phone").await;
    let bob = TestDevice::enroll(server, "bob", "phone").await;
    let carol = TestDevice::enroll(server, "carol", "phone").await;
    let before = metrics.scrape().await;

    // Requests by code: three answered, one refused before the service, one bad argument.
    for _ in 0..3 {
        get_user_keys(server, &app, &["alice"])
            .await
            .expect("lookup");
    }
    let unknown_token = format!("kh_{}_{}", "0".repeat(32), "0".repeat(64));
    let refused = get_user_keys(server, &unknown_token, &["alice"]).await;
    assert_eq!(
        refused.expect_err("unknown token").code(),
        Code::Unauthenticated
    );
    let bad = get_user_keys(server, &app, &[]).await;
    assert_eq!(bad.expect_err("no users").code(), Code::InvalidArgument);

    // Claims: bob has one one-time prekey and a last-resort one; carol has none.
    bob.client(server)
        .await
        .key_directory()
        .upload_prekeys(pb::UploadPrekeysRequest {
            user_id: "bob".into(),
            device_id: "phone".into(),
            one_time_prekeys: vec![signed_prekey(&bob, PrekeyKind::OneTime)],
            last_resort_prekey: Some(signed_prekey(&bob, PrekeyKind::LastResort)),
        })
        .await
        .expect("upload");
    let mut stock = bob
        .client(server)
        .await
        .key_directory()
        .watch_prekey_stock(pb::WatchPrekeyStockRequest {
            user_id: "bob".into(),
            device_id: "phone".into(),
            low_water: 5,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(15), stock.next())
        .await
        .expect("a stock message in time")
        .expect("open")
        .expect("stock");
    assert!(first.low, "1 one-time prekey is below 5");
    let claimer = alice.client(server).await;
    let claim = |user: &str| pb::ClaimPrekeysRequest {
        devices: vec![pb::DeviceRef {
            user_id: user.into(),
            device_id: "phone".into(),
        }],
        user_ids: Vec::new(),
        idempotency_key: String::new(),
    };
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let r = claimer
            .key_directory()
            .claim_prekeys(claim("bob"))
            .await
            .expect("claim")
            .into_inner();
        kinds.push(r.prekeys[0].kind);
    }
    assert_eq!(
        kinds,
        [
            pb::PrekeyKind::OneTime as i32,
            pb::PrekeyKind::LastResort as i32,
            pb::PrekeyKind::LastResort as i32
        ]
    );
    let none = claimer
        .key_directory()
        .claim_prekeys(claim("carol"))
        .await
        .expect("claim")
        .into_inner();
    assert_eq!(none.unavailable.len(), 1);
    drop(carol);
    // The one-time claim took bob to 0: a second low-stock message (last-resort claims leave
    // the stock as it is).
    let second = tokio::time::timeout(Duration::from_secs(15), stock.next())
        .await
        .expect("a stock message in time")
        .expect("open")
        .expect("stock");
    assert!(second.low);
    assert_eq!(second.stock.expect("stock").one_time_remaining, 0);

    // An escrow read, audited.
    let session = server
        .client(&app)
        .await
        .sessions()
        .create_session(service_wrapped_request("alice", &[]))
        .await
        .expect("create session")
        .into_inner();
    server
        .client(&staff)
        .await
        .escrow()
        .get_escrowed_keys(pb::GetEscrowedKeysRequest {
            session_id: session.session_id.clone(),
            epochs: Vec::new(),
            reason: "metrics test".into(),
        })
        .await
        .expect("escrow read");
    let during = metrics.scrape().await;

    let moved = |metric: &str, labels: &[(&str, &str)]| {
        value(&during, metric, labels) - value(&before, metric, labels)
    };
    assert_eq!(moved("keyhold_grpc_requests_total", &requests("OK")), 3.0);
    assert_eq!(
        moved("keyhold_grpc_requests_total", &requests("UNAUTHENTICATED")),
        1.0
    );
    assert_eq!(
        moved("keyhold_grpc_requests_total", &requests("INVALID_ARGUMENT")),
        1.0
    );
    assert_eq!(
        moved(
            "keyhold_grpc_request_duration_seconds_count",
            &GET_USER_KEYS
        ),
        5.0
    );
    assert!(moved("keyhold_grpc_request_duration_seconds_sum", &GET_USER_KEYS) > 0.0);
    for (outcome, n) in [("one_time", 1.0), ("last_resort", 2.0), ("none", 1.0)] {
        assert_eq!(
            moved("keyhold_prekey_claims_total", &[("outcome", outcome)]),
            n,
            "{outcome}"
        );
    }
    assert_eq!(moved("keyhold_prekey_low_stock_events_total", &[]), 2.0);
    assert_eq!(moved("keyhold_escrow_reads_total", &[]), 1.0);
    assert_eq!(
        moved("keyhold_audit_appends_total", &[("action", "escrow.read")]),
        1.0
    );
    // The open stock stream, counted as a watch stream and as a call in flight.
    assert_eq!(moved("keyhold_watch_streams_open", &[]), 1.0);
    assert!(value(&during, "keyhold_grpc_requests_in_flight", &[]) >= 1.0);
    for gauge in [
        "keyhold_db_pool_max_connections",
        "keyhold_db_pool_connections",
        "keyhold_db_pool_idle_connections",
        "keyhold_db_pool_waiting",
    ] {
        assert!(present(&during, gauge), "{gauge}");
    }
    assert!(value(&during, "keyhold_db_pool_max_connections", &[]) >= 1.0);
    assert!(moved("keyhold_db_pool_acquire_duration_seconds_count", &[]) > 0.0);
    assert_eq!(value(&during, "keyhold_kek_version", &[]), 1.0);
    assert_eq!(value(&during, "keyhold_db_up", &[]), 1.0);
    assert!(during.docs.contains_key("keyhold_grpc_requests_total"));

    // The stream's end: no longer open, and counted as a call the client cancelled.
    let stream_call = [
        ("service", "keyhold.v1.KeyDirectory"),
        ("method", "WatchPrekeyStock"),
        ("code", "CANCELLED"),
    ];
    drop(stock);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = metrics.scrape().await;
        let closed = value(&after, "keyhold_watch_streams_open", &[])
            == value(&before, "keyhold_watch_streams_open", &[]);
        let counted = value(&after, "keyhold_grpc_requests_total", &stream_call)
            - value(&before, "keyhold_grpc_requests_total", &stream_call)
            == 1.0;
        if closed && counted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stream's end was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    metrics.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_on_sqlite_then_postgres() {
    keyhold::observe::install_recorder().expect("recorder");
    // Installing again hands back the same recorder.
    keyhold::observe::install_recorder().expect("the same recorder");
    let server = TestServer::start(common::sqlite_db()).await;
    counters_move_with_calls(&server).await;
    server.stop().await;
    if let Some(db) = common::postgres_db().await {
        let server = TestServer::start(db).await;
        counters_move_with_calls(&server).await;
        server.stop().await;
    }
}

/// The request id a caller sends comes back; without one, the server makes one up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_returned() {
    let server = TestServer::start(common::sqlite_db()).await;
    let app = server.token(pb::Role::App, "", "").await;
    let mut request = tonic::Request::new(pb::GetUserKeysRequest {
        user_ids: vec!["alice".into()],
    });
    request
        .metadata_mut()
        .insert("x-request-id", "trace-7f3a".parse().expect("ascii"));
    let response = server
        .client(&app)
        .await
        .key_directory()
        .get_user_keys(request)
        .await
        .expect("lookup");
    assert_eq!(
        response.metadata().get("x-request-id").expect("echoed"),
        "trace-7f3a"
    );
    // Refused calls carry one too, and a generated id is a UUID.
    let refused = get_user_keys(&server, "not a token", &["alice"])
        .await
        .expect_err("refused");
    let id = refused
        .metadata()
        .get("x-request-id")
        .expect("generated")
        .to_str()
        .expect("ascii");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    server.stop().await;
}
