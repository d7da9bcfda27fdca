//! The limits on connections, seen from a real HTTP/2 client (the `h2` crate under tonic, and
//! bare frames on a TCP socket where a client must misbehave): the server announces its
//! maximum of concurrent streams; its keepalive pings close a connection whose peer stopped
//! answering and leave a live one alone; a connection past its maximum age gets GOAWAY, takes
//! no new calls, and is closed once its grace is over even with a call still open.
//!
//! The database plays no part (the calls are health checks), so SQLite alone serves.

mod common;

use std::num::NonZeroU32;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::server::TestServer;
use keyhold::config::{Limits, TransportLimits};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type H2Client = h2::client::SendRequest<Bytes>;
type H2Connection = h2::client::Connection<TcpStream, Bytes>;

async fn start(f: impl FnOnce(&mut TransportLimits)) -> TestServer {
    let mut limits = Limits::default();
    f(&mut limits.transport);
    TestServer::start_with_limits(common::sqlite_db(), limits).await
}

fn address(server: &TestServer) -> &str {
    server.endpoint.trim_start_matches("http://")
}

/// An HTTP/2 connection to `server`, its handshake done.
async fn connect(server: &TestServer) -> (H2Client, H2Connection) {
    let tcp = TcpStream::connect(address(server)).await.expect("connect");
    h2::client::handshake(tcp).await.expect("HTTP/2 handshake")
}

/// A `grpc.health.v1.Health/Check` request's head.
fn health_check(server: &TestServer) -> http::Request<()> {
    http::Request::post(format!("{}/grpc.health.v1.Health/Check", server.endpoint))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request")
}

/// A gRPC message frame holding the empty HealthCheckRequest (overall health).
fn health_body() -> Bytes {
    let message = tonic_health::pb::HealthCheckRequest::default().encode_to_vec();
    let mut frame = BytesMut::new();
    frame.put_u8(0);
    frame.put_u32(u32::try_from(message.len()).expect("small"));
    frame.put_slice(&message);
    frame.freeze()
}

/// One health check on `client`: its `grpc-status`.
async fn check(client: &H2Client, server: &TestServer) -> Result<String, h2::Error> {
    let mut client = client.clone().ready().await?;
    let (response, mut body) = client.send_request(health_check(server), false)?;
    body.send_data(health_body(), true)?;
    let mut response = response.await?.into_body();
    while let Some(data) = response.data().await {
        let data = data?;
        let _ = response.flow_control().release_capacity(data.len());
    }
    let trailers = response.trailers().await?.unwrap_or_default();
    Ok(trailers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("?").to_string())
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_announces_its_maximum_of_concurrent_streams() {
    let server = start(|t| t.http2_max_concurrent_streams = NonZeroU32::new(7).expect("7")).await;
    let (client, mut connection) = connect(&server).await;
    // After one exchange the server's SETTINGS have been read.
    let status = tokio::select! {
        status = check(&client, &server) => status.expect("health check"),
        ended = &mut connection => panic!("the connection ended: {ended:?}"),
    };
    assert_eq!(status, "0");
    assert_eq!(connection.max_concurrent_send_streams(), 7);
    // Closed first: a graceful stop waits for the connections to go.
    drop((client, connection));
    server.stop().await;
}

/// Frame types and flags of RFC 9113 that the bare client reads.
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_closes_a_silent_connection_and_keeps_a_live_one() {
    let server = start(|t| {
        t.http2_keepalive_interval = Some(Duration::from_secs(1));
        t.http2_keepalive_timeout = Duration::from_secs(1);
    })
    .await;
    // A client that opens HTTP/2 and then never answers: it acknowledges nothing.
    let mut silent = TcpStream::connect(address(&server)).await.expect("connect");
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    silent
        .write_all(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0])
        .await
        .expect("SETTINGS");
    // A client that answers pings (h2 does, while its connection is driven).
    let (live, connection) = connect(&server).await;
    let live_connection = tokio::spawn(connection);

    let read_until_closed = async {
        let (mut pings, mut buf) = (0, Vec::new());
        loop {
            let mut chunk = [0u8; 4096];
            match silent.read(&mut chunk).await {
                Ok(0) | Err(_) => return pings,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            // Whole frames: a 9-byte header (24-bit length, type, flags, stream) and payload.
            while buf.len() >= 9 {
                let len =
                    usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                if buf[3] == PING && buf[4] & ACK == 0 {
                    pings += 1;
                }
                buf.drain(..9 + len);
            }
        }
    };
    let pings = tokio::time::timeout(Duration::from_secs(30), read_until_closed)
        .await
        .expect("the silent connection is closed");
    assert!(pings >= 1, "the server pinged before closing");

    // The live connection outlasted the same pings and still answers.
    assert!(
        !live_connection.is_finished(),
        "the live connection was closed"
    );
    assert_eq!(check(&live, &server).await.expect("health check"), "0");
    drop(live);
    live_connection.abort();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_age_gets_goaway_and_is_closed_after_its_grace() {
    let server = start(|t| {
        t.max_connection_age = Some(Duration::from_secs(1));
        t.max_connection_age_grace = Some(Duration::from_secs(8));
        // No deadline, so that only the age can end the stalled call below.
        t.default_deadline = None;
    })
    .await;
    // An idle connection is asked to go away at its age, and closes cleanly.
    let (_idle, connection) = connect(&server).await;
    let ended = tokio::time::timeout(Duration::from_secs(30), connection)
        .await
        .expect("closed after its age");
    assert!(ended.is_ok(), "a graceful close: {ended:?}");

    // A connection with a call that never ends (its request body never comes).
    let (busy, connection) = connect(&server).await;
    let connection = tokio::spawn(connection);
    let mut sender = busy.clone().ready().await.expect("ready");
    let (stalled, _body) = sender
        .send_request(health_check(&server), false)
        .expect("a call");
    let stalled = tokio::spawn(stalled);
    // Past the age, within the grace: the call is still open, no new call is taken.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!stalled.is_finished(), "the open call survives the GOAWAY");
    assert!(
        !connection.is_finished(),
        "the connection stays for its open call"
    );
    assert!(
        check(&busy, &server).await.is_err(),
        "a connection past its age takes no new call"
    );
    // Past the grace: closed, the open call with it.
    tokio::time::timeout(Duration::from_secs(30), connection)
        .await
        .expect("closed after its grace")
        .expect("task")
        .ok();
    let cut = stalled.await.expect("task");
    assert!(
        cut.is_err(),
        "the open call ended with the connection: {cut:?}"
    );
    server.stop().await;
}
