//! Key sync between a user's devices over gRPC, on SQLite and PostgreSQL: sending sealed
//! packages, the inbox (paged, oldest first, acknowledged), the watch stream fed by another
//! server over the same database, refusals that write nothing, and who may make each call.

mod common;

use std::time::Duration;

use common::callers::{check_every_caller, Callers, Who, DENIED, NOAUTH, OK, WHO};
use common::requests::{assert_code, assert_code_mentions, revoke_current_key};
use common::server::{TestDevice, TestServer};
use keyhold::client::Client;
use keyhold::config::Limits;
use keyhold::crypto::envelope::{open_dek, wrap_dek, DekEnvelope, Recipient, WrapContext};
use keyhold::crypto::ids::{Epoch, SessionId};
use keyhold::crypto::keys::Dek;
use keyhold::proto::keyhold::v1 as pb;
use tokio_stream::StreamExt as _;
use tonic::Code;

/// A package for `to`, sealed to its current key (the payload is whatever the test says).
fn package(to: &TestDevice, payload: &[u8]) -> pb::OutgoingKeyPackage {
    pb::OutgoingKeyPackage {
        recipient_user_id: to.user.to_string(),
        recipient_device_id: to.device.to_string(),
        recipient_key_id: to.xwing.encapsulation_key().key_id().as_bytes().to_vec(),
        payload: payload.to_vec(),
    }
}

async fn send(
    client: &Client,
    packages: Vec<pb::OutgoingKeyPackage>,
) -> Result<Vec<u64>, tonic::Status> {
    Ok(client
        .device_sync()
        .send_key_packages(pb::SendKeyPackagesRequest {
            packages,
            idempotency_key: String::new(),
        })
        .await?
        .into_inner()
        .package_ids)
}

async fn fetch(client: &Client, cursor: &str, page_size: u32) -> pb::FetchKeyPackagesResponse {
    client
        .device_sync()
        .fetch_key_packages(pb::FetchKeyPackagesRequest {
            cursor: cursor.into(),
            page_size,
        })
        .await
        .expect("fetch")
        .into_inner()
}

/// Every payload in the device's inbox, oldest first.
async fn inbox(client: &Client) -> Vec<Vec<u8>> {
    fetch(client, "", 500)
        .await
        .packages
        .into_iter()
        .map(|p| p.payload)
        .collect()
}

async fn ack(client: &Client, ids: Vec<u64>) -> u64 {
    client
        .device_sync()
        .ack_key_packages(pb::AckKeyPackagesRequest { package_ids: ids })
        .await
        .expect("ack")
        .into_inner()
        .removed
}

async fn send_fetch_and_ack(server: &TestServer) {
    let phone = TestDevice::enroll(server, "alice", "phone").await;
    let laptop = TestDevice::enroll(server, "alice", "laptop").await;
    let tablet = TestDevice::enroll(server, "alice", "tablet").await;
    let (phone_c, laptop_c, tablet_c) = (
        phone.client(server).await,
        laptop.client(server).await,
        tablet.client(server).await,
    );

    // What a key package is for: the phone hands a session DEK to the laptop, sealed to it.
    let dek = Dek::generate().expect("dek");
    let ctx = WrapContext {
        session_id: SessionId::generate(),
        epoch: Epoch::FIRST,
        recipient: Recipient::Device {
            user: laptop.user.clone(),
            device: laptop.device.clone(),
        },
    };
    let sealed = wrap_dek(&dek, laptop.xwing.encapsulation_key(), &ctx).expect("wrap");
    let ids = send(
        &phone_c,
        vec![
            package(&laptop, sealed.as_bytes()),
            package(&tablet, b"for the tablet"),
            package(&laptop, b"second"),
            package(&laptop, b"third"),
        ],
    )
    .await
    .expect("send");
    assert_eq!(ids.len(), 4);

    // Oldest first, in pages.
    let first = fetch(&laptop_c, "", 2).await;
    assert_eq!(first.packages.len(), 2);
    let p = &first.packages[0];
    assert_eq!(p.package_id, ids[0]);
    assert_eq!(
        (p.user_id.as_str(), p.sender_device_id.as_str()),
        ("alice", "phone")
    );
    assert_eq!(
        p.recipient_key_id,
        laptop
            .xwing
            .encapsulation_key()
            .key_id()
            .as_bytes()
            .to_vec()
    );
    let opened = open_dek(
        &DekEnvelope::from_bytes(&p.payload).expect("envelope"),
        &laptop.xwing,
        &ctx,
    )
    .expect("the laptop opens what the phone sealed");
    assert_eq!(opened, dek);
    assert_eq!(first.packages[1].payload, b"second");
    let second = fetch(&laptop_c, &first.next_cursor, 2).await;
    assert_eq!(
        second
            .packages
            .iter()
            .map(|p| p.package_id)
            .collect::<Vec<_>>(),
        vec![ids[3]]
    );
    let third = fetch(&laptop_c, &second.next_cursor, 2).await;
    assert!(third.packages.is_empty());
    assert_eq!(third.next_cursor, second.next_cursor);
    let bad = laptop_c
        .device_sync()
        .fetch_key_packages(pb::FetchKeyPackagesRequest {
            cursor: "not-a-cursor".into(),
            page_size: 0,
        })
        .await
        .expect_err("bad cursor");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("cursor"), "{}", bad.message());

    // Each device sees its own inbox only.
    assert_eq!(inbox(&tablet_c).await, vec![b"for the tablet".to_vec()]);
    assert!(inbox(&phone_c).await.is_empty());

    // Acknowledging removes; again removes nothing; another device's ids are passed over.
    assert_eq!(ack(&laptop_c, vec![ids[0], ids[2]]).await, 2);
    assert_eq!(ack(&laptop_c, vec![ids[0], ids[2]]).await, 0);
    assert_eq!(ack(&laptop_c, vec![ids[1], u64::MAX]).await, 0);
    assert_eq!(inbox(&laptop_c).await, vec![b"third".to_vec()]);
    assert_eq!(inbox(&tablet_c).await, vec![b"for the tablet".to_vec()]);
}

fn tight() -> Limits {
    Limits {
        max_key_package_bytes: 1024,
        max_inbox_packages: 5,
        ..Limits::default()
    }
}

async fn refused_sends_write_nothing(server: &TestServer) {
    let phone = TestDevice::enroll(server, "alice", "phone").await;
    let laptop = TestDevice::enroll(server, "alice", "laptop").await;
    let tablet = TestDevice::enroll(server, "alice", "tablet").await;
    let bob = TestDevice::enroll(server, "bob", "phone").await;
    let phone_c = phone.client(server).await;
    let laptop_c = laptop.client(server).await;
    // Another user's device, after a valid package: refused, and the valid one is not sent.
    assert_code(
        send(
            &phone_c,
            vec![package(&laptop, b"ok"), package(&bob, b"to bob")],
        )
        .await,
        Code::PermissionDenied,
        "packages[1].recipient_user_id",
    );
    // Naming bob as the user of alice's laptop does not help either.
    let mut disguised = package(&laptop, b"x");
    disguised.recipient_user_id = "bob".into();
    assert_code(
        send(&phone_c, vec![disguised]).await,
        Code::PermissionDenied,
        "packages[0].recipient_user_id",
    );
    assert_code(
        send(
            &phone_c,
            vec![package(&laptop, b"ok"), package(&phone, b"me")],
        )
        .await,
        Code::InvalidArgument,
        "packages[1].recipient_device_id",
    );
    assert_code(
        send(&phone_c, vec![package(&laptop, &[1; 1025])]).await,
        Code::ResourceExhausted,
        "packages[0].payload",
    );
    assert_code(
        send(&phone_c, vec![package(&laptop, b"")]).await,
        Code::InvalidArgument,
        "packages[0].payload",
    );
    assert_code(
        send(&phone_c, Vec::new()).await,
        Code::InvalidArgument,
        "packages",
    );
    let mut unknown = package(&laptop, b"x");
    unknown.recipient_device_id = "watch".into();
    assert_code(
        send(&phone_c, vec![package(&laptop, b"ok"), unknown]).await,
        Code::FailedPrecondition,
        "packages[1].recipient_device_id",
    );
    // Sealed to a key the laptop no longer has.
    let stale = package(&laptop, b"sealed to the old key");
    let relaunched = TestDevice::new("alice", "laptop", laptop.token.clone());
    relaunched.publish(server).await;
    assert_code(
        send(&phone_c, vec![stale]).await,
        Code::FailedPrecondition,
        "packages[0].recipient_key_id",
    );
    // A revoked device gets nothing, and sends nothing.
    revoke_current_key(server, &tablet).await;
    assert_code(
        send(&phone_c, vec![package(&tablet, b"x")]).await,
        Code::FailedPrecondition,
        "packages[0].recipient_device_id",
    );
    assert_code_mentions(
        send(
            &tablet.client(server).await,
            vec![package(&relaunched, b"x")],
        )
        .await,
        Code::FailedPrecondition,
        "has no current key",
    );
    assert!(inbox(&laptop_c).await.is_empty(), "a refused send wrote");

    // The inbox bound: 5 packages; a send that would pass it sends none of its packages.
    send(
        &phone_c,
        (0..4).map(|i| package(&relaunched, &[i; 8])).collect(),
    )
    .await
    .expect("four");
    assert_code_mentions(
        send(
            &phone_c,
            vec![package(&relaunched, b"five"), package(&relaunched, b"six")],
        )
        .await,
        Code::ResourceExhausted,
        "alice/laptop",
    );
    assert_eq!(inbox(&laptop_c).await.len(), 4);
    send(&phone_c, vec![package(&relaunched, b"five")])
        .await
        .expect("up to the bound");
    assert_eq!(inbox(&laptop_c).await.len(), 5);
    // Acknowledging makes room again.
    let first = fetch(&laptop_c, "", 1).await.packages[0].package_id;
    assert_eq!(ack(&laptop_c, vec![first]).await, 1);
    send(&phone_c, vec![package(&relaunched, b"six")])
        .await
        .expect("room again");
}

/// The next package on a watch stream, within a generous time.
async fn next_package(
    stream: &mut tonic::Streaming<pb::WatchKeyPackagesResponse>,
) -> (Vec<u8>, String) {
    let m = tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .expect("a package in time")
        .expect("stream open")
        .expect("no error");
    (m.package.expect("package").payload, m.cursor)
}

async fn watch(client: &Client, cursor: &str) -> tonic::Streaming<pb::WatchKeyPackagesResponse> {
    client
        .device_sync()
        .watch_key_packages(pb::WatchKeyPackagesRequest {
            cursor: cursor.into(),
        })
        .await
        .expect("watch")
        .into_inner()
}

/// A watch on one server delivers what was already waiting, then what is sent through another
/// server over the same database (PostgreSQL: notifications; SQLite: the shared file), and
/// through its own.
async fn watch_delivers_packages_sent_through_another_server(server: &TestServer) {
    let replica = server.replica(Limits::default()).await;
    let phone = TestDevice::enroll(server, "alice", "phone").await;
    let laptop = TestDevice::enroll(server, "alice", "laptop").await;
    let phone_there = replica.client(&phone.token).await;
    let phone_here = phone.client(server).await;
    let laptop_here = laptop.client(server).await;

    send(&phone_here, vec![package(&laptop, b"waiting")])
        .await
        .expect("send");
    let mut stream = watch(&laptop_here, "").await;
    assert_eq!(next_package(&mut stream).await.0, b"waiting");
    send(&phone_there, vec![package(&laptop, b"via the replica")])
        .await
        .expect("send through the replica");
    let (payload, cursor) = next_package(&mut stream).await;
    assert_eq!(payload, b"via the replica");
    for i in 0..3u8 {
        send(&phone_there, vec![package(&laptop, &[b'a' + i])])
            .await
            .expect("send");
    }
    send(&phone_here, vec![package(&laptop, b"here")])
        .await
        .expect("send");
    for want in [b"a".as_slice(), b"b", b"c", b"here"] {
        assert_eq!(next_package(&mut stream).await.0, want);
    }
    drop(stream);

    // Resuming from a cursor skips what was delivered before it; nothing is acked yet, so
    // a watch from the start delivers everything again.
    let mut resumed = watch(&laptop_here, &cursor).await;
    assert_eq!(next_package(&mut resumed).await.0, b"a");
    let mut again = watch(&replica.client(&laptop.token).await, "").await;
    assert_eq!(next_package(&mut again).await.0, b"waiting");

    // A server shutting down ends its watch streams (it would otherwise wait for them).
    tokio::time::timeout(Duration::from_secs(30), replica.stop())
        .await
        .expect("the replica stops with a watch open");
    let mut ended = false;
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_secs(15), again.next()).await {
        match item {
            Ok(_) => continue,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                ended = true;
                break;
            }
        }
    }
    assert!(ended, "the watch did not end with UNAVAILABLE");
}

#[derive(Clone, Copy, Debug)]
enum Rpc {
    /// A package for alice's laptop.
    Send,
    /// The caller's inbox: alice's laptop's only when the caller is the laptop.
    Fetch,
    /// The laptop's package ids.
    Ack,
    /// The caller's inbox.
    Watch,
}

/// The laptop sending to itself.
const SELF: Code = Code::InvalidArgument;

#[rustfmt::skip]
const MATRIX: &[(Rpc, [Code; 7])] = &[
    //            nobody  app     own   sibling other   staff   admin
    (Rpc::Send,  [NOAUTH, DENIED, SELF, OK,     DENIED, DENIED, DENIED]),
    (Rpc::Fetch, [NOAUTH, DENIED, OK,   OK,     OK,     DENIED, DENIED]),
    (Rpc::Ack,   [NOAUTH, DENIED, OK,   OK,     OK,     DENIED, DENIED]),
    (Rpc::Watch, [NOAUTH, DENIED, OK,   OK,     OK,     DENIED, DENIED]),
];

/// Every call by every kind of caller. Devices other than the laptop may fetch, watch and
/// acknowledge, but only in their own inbox: they see none of the laptop's packages and
/// remove none.
async fn every_sync_call_checks_who_calls(server: &TestServer) {
    let laptop = TestDevice::enroll(server, "alice", "laptop").await;
    let phone = TestDevice::enroll(server, "alice", "phone").await;
    let bob = TestDevice::enroll(server, "bob", "phone").await;
    let laptop_c = laptop.client(server).await;
    let phone_c = phone.client(server).await;
    // Own is the laptop, whose inbox the calls touch; the phone is its sibling.
    let callers = Callers::new(server, &laptop, &phone, &bob).await;
    check_every_caller(
        server,
        &callers,
        WHO,
        MATRIX,
        async |rpc, who, caller| {
            // Each cell starts with one package in the laptop's inbox.
            let waiting = fetch(&laptop_c, "", 500).await;
            let ids: Vec<u64> = waiting.packages.iter().map(|p| p.package_id).collect();
            if !ids.is_empty() {
                ack(&laptop_c, ids).await;
            }
            let id = send(&phone_c, vec![package(&laptop, b"for the laptop")])
                .await
                .expect("setup send")[0];
            let mut sync = caller.device_sync();
            let mut seen: Vec<u64> = Vec::new();
            let got = match rpc {
                Rpc::Send => sync
                    .send_key_packages(pb::SendKeyPackagesRequest {
                        packages: vec![package(&laptop, b"sent in the matrix")],
                        idempotency_key: String::new(),
                    })
                    .await
                    .map(|_| ()),
                Rpc::Fetch => sync
                    .fetch_key_packages(pb::FetchKeyPackagesRequest::default())
                    .await
                    .map(|r| {
                        seen = r
                            .into_inner()
                            .packages
                            .iter()
                            .map(|p| p.package_id)
                            .collect()
                    }),
                Rpc::Ack => sync
                    .ack_key_packages(pb::AckKeyPackagesRequest {
                        package_ids: vec![id],
                    })
                    .await
                    .map(|_| ()),
                Rpc::Watch => match sync
                    .watch_key_packages(pb::WatchKeyPackagesRequest::default())
                    .await
                {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        // The laptop's own watch delivers its package at once; any other
                        // caller's stays silent.
                        let wait = if who == Who::Own { 15 } else { 1 };
                        if let Ok(Some(Ok(m))) =
                            tokio::time::timeout(Duration::from_secs(wait), stream.next()).await
                        {
                            seen.push(m.package.expect("package").package_id);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            (got, (id, seen))
        },
        async |rpc, who, code, (id, seen)| {
            let laptop_has: Vec<Vec<u8>> = inbox(&laptop_c).await;
            match (rpc, who, code) {
                (Rpc::Send, _, Code::Ok) => assert_eq!(
                    laptop_has,
                    vec![b"for the laptop".to_vec(), b"sent in the matrix".to_vec()]
                ),
                (Rpc::Ack, Who::Own, Code::Ok) => assert!(laptop_has.is_empty()),
                _ => assert_eq!(
                    laptop_has,
                    vec![b"for the laptop".to_vec()],
                    "{rpc:?} by {who:?}"
                ),
            }
            match (rpc, who) {
                (Rpc::Fetch | Rpc::Watch, Who::Own) => assert_eq!(seen, vec![id]),
                _ => assert!(
                    seen.is_empty(),
                    "{rpc:?} by {who:?} saw the laptop's package"
                ),
            }
        },
    )
    .await;
}

on_both_servers! {
    packages_are_sent_fetched_in_order_and_acknowledged => send_fetch_and_ack;
    a_watch_on_one_server_receives_packages_sent_through_another => watch_delivers_packages_sent_through_another_server;
    authorization_matrix_covers_every_sync_call => every_sync_call_checks_who_calls;
}

on_both_servers_with! {
    refused_sends_write_nothing => refused_sends_write_nothing(tight);
}
