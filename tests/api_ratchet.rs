//! Ratchet state backup over gRPC, on SQLite and PostgreSQL: compare-and-swap on the version
//! (two writers racing, on one server or two), sealing under the KEK bound to the row, the size
//! limit, and who may make each call.

mod common;

use common::callers::{check_every_caller, Callers, DENIED, NOAUTH, OK, WHO};
use common::requests::assert_code;
use common::server::{TestDevice, TestServer};
use keyhold::client::Client;
use keyhold::config::Limits;
use keyhold::crypto::ids::{ConversationId, DeviceId, UserId};
use keyhold::proto::keyhold::v1 as pb;
use keyhold::service::CURRENT_VERSION_TRAILER;
use keyhold::store::ratchet_states::RatchetKey;
use tonic::Code;

fn put(
    d: &TestDevice,
    conversation: &str,
    expected: u64,
    state: &[u8],
) -> pb::PutRatchetStateRequest {
    pb::PutRatchetStateRequest {
        user_id: d.user.to_string(),
        device_id: d.device.to_string(),
        conversation_id: conversation.into(),
        expected_version: expected,
        state: state.to_vec(),
    }
}

fn get(d: &TestDevice, conversation: &str) -> pb::GetRatchetStateRequest {
    pb::GetRatchetStateRequest {
        user_id: d.user.to_string(),
        device_id: d.device.to_string(),
        conversation_id: conversation.into(),
    }
}

fn delete(d: &TestDevice, conversation: &str, expected: u64) -> pb::DeleteRatchetStateRequest {
    pb::DeleteRatchetStateRequest {
        user_id: d.user.to_string(),
        device_id: d.device.to_string(),
        conversation_id: conversation.into(),
        expected_version: expected,
    }
}

/// (state, version) as the owner reads it back.
async fn read(
    client: &Client,
    d: &TestDevice,
    conversation: &str,
) -> Result<(Vec<u8>, u64), tonic::Status> {
    let r = client
        .ratchet()
        .get_ratchet_state(get(d, conversation))
        .await?
        .into_inner();
    Ok((r.state.clone(), r.version))
}

/// Checks an ABORTED write names `current` in its message and its trailer.
fn assert_stale(err: &tonic::Status, current: u64) {
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("the current version is {current}")),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("expected_version"),
        "{}",
        err.message()
    );
    let trailer = err
        .metadata()
        .get(CURRENT_VERSION_TRAILER)
        .expect("current version trailer")
        .to_str()
        .expect("ascii");
    assert_eq!(trailer, current.to_string());
}

async fn versions_move_by_compare_and_swap(server: &TestServer) {
    let d = TestDevice::enroll(server, "alice", "phone").await;
    let client = d.client(server).await;
    let mut ratchet = client.ratchet();

    let missing = read(&client, &d, "conv-1").await.expect_err("no state yet");
    assert_eq!(missing.code(), Code::NotFound);
    // Replacing a state that does not exist: stale, the current version is 0.
    let err = ratchet
        .put_ratchet_state(put(&d, "conv-1", 3, b"nope"))
        .await
        .expect_err("nothing to replace");
    assert_stale(&err, 0);

    let v1 = ratchet
        .put_ratchet_state(put(&d, "conv-1", 0, b"state one"))
        .await
        .expect("create")
        .into_inner()
        .version;
    assert_eq!(v1, 1);
    assert_eq!(
        read(&client, &d, "conv-1").await.expect("get"),
        (b"state one".to_vec(), 1)
    );
    // Creating again is stale: the state exists at version 1.
    let err = ratchet
        .put_ratchet_state(put(&d, "conv-1", 0, b"again"))
        .await
        .expect_err("exists");
    assert_stale(&err, 1);
    let v2 = ratchet
        .put_ratchet_state(put(&d, "conv-1", 1, b"state two"))
        .await
        .expect("replace")
        .into_inner()
        .version;
    assert_eq!(v2, 2);
    // The old version again, or one from the future: stale, nothing overwritten.
    for expected in [1, 3, i64::MAX as u64] {
        let err = ratchet
            .put_ratchet_state(put(&d, "conv-1", expected, b"lost write"))
            .await
            .expect_err("stale");
        assert_stale(&err, 2);
    }
    assert_eq!(
        read(&client, &d, "conv-1").await.expect("get"),
        (b"state two".to_vec(), 2)
    );

    // Conversations are separate rows.
    ratchet
        .put_ratchet_state(put(&d, "conv-2", 0, b"other"))
        .await
        .expect("second conversation");
    assert_eq!(read(&client, &d, "conv-1").await.expect("get").1, 2);

    // Delete: a stale version is refused; 0 deletes whatever is current.
    let err = ratchet
        .delete_ratchet_state(delete(&d, "conv-1", 1))
        .await
        .expect_err("stale delete");
    assert_stale(&err, 2);
    ratchet
        .delete_ratchet_state(delete(&d, "conv-1", 2))
        .await
        .expect("delete at the current version");
    assert_eq!(
        read(&client, &d, "conv-1")
            .await
            .expect_err("deleted")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        ratchet
            .delete_ratchet_state(delete(&d, "conv-1", 0))
            .await
            .expect_err("gone")
            .code(),
        Code::NotFound
    );
    ratchet
        .delete_ratchet_state(delete(&d, "conv-2", 0))
        .await
        .expect("delete any version");
    // After a delete the conversation starts again at version 1.
    assert_eq!(
        ratchet
            .put_ratchet_state(put(&d, "conv-1", 0, b"fresh"))
            .await
            .expect("create again")
            .into_inner()
            .version,
        1
    );
}

/// Two writers race on one state, through two servers over the same database, round after
/// round: exactly one wins each round, the other is ABORTED with the winner's version, and the
/// stored state is the winner's.
async fn two_writers_race_on_one_state(server: &TestServer) {
    let replica = server.replica(Limits::default()).await;
    let d = TestDevice::enroll(server, "alice", "phone").await;
    let here = d.client(server).await;
    let there = replica.client(&d.token).await;
    here.ratchet()
        .put_ratchet_state(put(&d, "race", 0, b"start"))
        .await
        .expect("create");
    let mut version = 1;
    for round in 0..20u64 {
        let a_state = format!("writer A, round {round}").into_bytes();
        let b_state = format!("writer B, round {round}").into_bytes();
        let (mut a, mut b) = (here.ratchet(), there.ratchet());
        let (ra, rb) = tokio::join!(
            a.put_ratchet_state(put(&d, "race", version, &a_state)),
            b.put_ratchet_state(put(&d, "race", version, &b_state)),
        );
        let (winner_state, loser) = match (ra, rb) {
            (Ok(w), Err(l)) => {
                assert_eq!(w.into_inner().version, version + 1);
                (a_state, l)
            }
            (Err(l), Ok(w)) => {
                assert_eq!(w.into_inner().version, version + 1);
                (b_state, l)
            }
            (ra, rb) => panic!("round {round}: expected one winner, got {ra:?} and {rb:?}"),
        };
        version += 1;
        assert_stale(&loser, version);
        assert_eq!(
            read(&here, &d, "race").await.expect("get"),
            (winner_state, version),
            "round {round}"
        );
    }
    replica.stop().await;
}

/// The state is sealed under the KEK, bound to its row: the database never holds it in the
/// clear, and a sealed state copied to another row does not open there.
async fn states_are_sealed_and_bound_to_their_row(server: &TestServer) {
    let d = TestDevice::enroll(server, "alice", "phone").await;
    let client = d.client(server).await;
    let secret = b"root key 0123456789abcdef, chain keys, skipped message keys".to_vec();
    for conversation in ["conv-a", "conv-b"] {
        client
            .ratchet()
            .put_ratchet_state(put(&d, conversation, 0, &secret))
            .await
            .expect("put");
    }
    let key = |c: &str| RatchetKey {
        user: UserId::new("alice").unwrap(),
        device: DeviceId::new("phone").unwrap(),
        conversation: ConversationId::new(c).unwrap(),
    };
    let stored = server
        .store
        .conn()
        .await
        .expect("connection")
        .ratchet_state(&key("conv-a"))
        .await
        .expect("read the row")
        .expect("row");
    assert!(
        !stored
            .envelope
            .windows(16)
            .any(|w| secret.windows(16).any(|s| s == w)),
        "the state is stored in the clear"
    );
    server
        .db
        .execute_raw(
            "UPDATE ratchet_states SET envelope = \
             (SELECT envelope FROM ratchet_states WHERE conversation_id = 'conv-a') \
             WHERE conversation_id = 'conv-b'",
        )
        .await;
    let err = read(&client, &d, "conv-b")
        .await
        .expect_err("moved envelope");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(!err.message().contains("root key"), "{}", err.message());
    assert_eq!(
        read(&client, &d, "conv-a").await.expect("own row opens").0,
        secret
    );
}

fn small_states() -> Limits {
    Limits {
        max_ratchet_state_bytes: 1024,
        ..Limits::default()
    }
}

async fn oversized_and_malformed_states_are_refused(server: &TestServer) {
    let d = TestDevice::enroll(server, "alice", "phone").await;
    let client = d.client(server).await;
    let mut ratchet = client.ratchet();
    assert_code(
        ratchet.put_ratchet_state(put(&d, "c", 0, &[7; 1025])).await,
        Code::ResourceExhausted,
        "state",
    );
    assert_code(
        ratchet.put_ratchet_state(put(&d, "c", 0, &[])).await,
        Code::InvalidArgument,
        "state",
    );
    assert_code(
        ratchet
            .put_ratchet_state(put(&d, "two words", 0, b"x"))
            .await,
        Code::InvalidArgument,
        "conversation_id",
    );
    assert_code(
        ratchet
            .put_ratchet_state(put(&d, &"c".repeat(129), 0, b"x"))
            .await,
        Code::InvalidArgument,
        "conversation_id",
    );
    assert_eq!(
        read(&client, &d, "c")
            .await
            .expect_err("nothing written")
            .code(),
        Code::NotFound
    );
    // At the limit is fine; growing past it later is refused and keeps the old state.
    ratchet
        .put_ratchet_state(put(&d, "c", 0, &[7; 1024]))
        .await
        .expect("at the limit");
    assert_code(
        ratchet.put_ratchet_state(put(&d, "c", 1, &[8; 1025])).await,
        Code::ResourceExhausted,
        "state",
    );
    assert_eq!(
        read(&client, &d, "c").await.expect("get"),
        (vec![7; 1024], 1)
    );
}

/// An `expected_version` the database cannot hold (2^63 or more) is INVALID_ARGUMENT naming
/// the field, for a write and a delete alike, with or without a stored state, and changes
/// nothing; not ABORTED as if some version were current.
async fn versions_past_the_database_are_invalid_arguments(server: &TestServer) {
    let d = TestDevice::enroll(server, "alice", "phone").await;
    let client = d.client(server).await;
    let mut ratchet = client.ratchet();
    let out_of_range = [1u64 << 63, (1u64 << 63) + 1, u64::MAX];
    for expected in out_of_range {
        assert_code(
            ratchet
                .put_ratchet_state(put(&d, "conv", expected, b"never"))
                .await,
            Code::InvalidArgument,
            "expected_version",
        );
        assert_code(
            ratchet
                .delete_ratchet_state(delete(&d, "conv", expected))
                .await,
            Code::InvalidArgument,
            "expected_version",
        );
    }
    assert_eq!(
        read(&client, &d, "conv")
            .await
            .expect_err("nothing written")
            .code(),
        Code::NotFound
    );
    ratchet
        .put_ratchet_state(put(&d, "conv", 0, b"kept"))
        .await
        .expect("create");
    for expected in out_of_range {
        let err = ratchet
            .put_ratchet_state(put(&d, "conv", expected, b"lost"))
            .await
            .expect_err("out of range");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("out of range"), "{}", err.message());
        assert!(err.metadata().get(CURRENT_VERSION_TRAILER).is_none());
        assert_code(
            ratchet
                .delete_ratchet_state(delete(&d, "conv", expected))
                .await,
            Code::InvalidArgument,
            "expected_version",
        );
    }
    // The largest version the database holds is a version like any other: stale here.
    let err = ratchet
        .put_ratchet_state(put(&d, "conv", i64::MAX as u64, b"lost"))
        .await
        .expect_err("stale");
    assert_stale(&err, 1);
    assert_eq!(
        read(&client, &d, "conv").await.expect("get"),
        (b"kept".to_vec(), 1)
    );
}

#[derive(Clone, Copy, Debug)]
enum Rpc {
    Get,
    Put,
    Delete,
}

#[rustfmt::skip]
const MATRIX: &[(Rpc, [Code; 7])] = &[
    //             nobody  app     own  sibling other   staff   admin
    (Rpc::Get,    [NOAUTH, DENIED, OK,  DENIED, DENIED, DENIED, DENIED]),
    (Rpc::Put,    [NOAUTH, DENIED, OK,  DENIED, DENIED, DENIED, DENIED]),
    (Rpc::Delete, [NOAUTH, DENIED, OK,  DENIED, DENIED, DENIED, DENIED]),
];

/// Every call by every kind of caller on alice's phone's state; a refused call changes
/// nothing (the owner reads the same state and version afterwards).
async fn every_ratchet_call_checks_who_calls(server: &TestServer) {
    let own = TestDevice::enroll(server, "alice", "phone").await;
    let sibling = TestDevice::enroll(server, "alice", "laptop").await;
    let other = TestDevice::enroll(server, "bob", "phone").await;
    let owner = own.client(server).await;
    let callers = Callers::new(server, &own, &sibling, &other).await;
    check_every_caller(
        server,
        &callers,
        WHO,
        MATRIX,
        async |rpc, _, client| {
            // Each cell starts from a state at version 1.
            owner
                .ratchet()
                .delete_ratchet_state(delete(&own, "conv", 0))
                .await
                .ok();
            owner
                .ratchet()
                .put_ratchet_state(put(&own, "conv", 0, b"alice's state"))
                .await
                .expect("owner creates");
            let mut ratchet = client.ratchet();
            let got = match rpc {
                Rpc::Get => ratchet
                    .get_ratchet_state(get(&own, "conv"))
                    .await
                    .map(|r| assert_eq!(r.into_inner().state, b"alice's state")),
                Rpc::Put => ratchet
                    .put_ratchet_state(put(&own, "conv", 1, b"overwritten"))
                    .await
                    .map(|_| ()),
                Rpc::Delete => ratchet
                    .delete_ratchet_state(delete(&own, "conv", 0))
                    .await
                    .map(|_| ()),
            };
            (got, ())
        },
        async |rpc, who, code, ()| {
            let after = read(&owner, &own, "conv").await;
            match (rpc, code) {
                (Rpc::Put, Code::Ok) => {
                    assert_eq!(after.expect("get"), (b"overwritten".to_vec(), 2))
                }
                (Rpc::Delete, Code::Ok) => {
                    assert_eq!(after.expect_err("deleted").code(), Code::NotFound)
                }
                _ => assert_eq!(
                    after.expect("unchanged"),
                    (b"alice's state".to_vec(), 1),
                    "{rpc:?} by {who:?} wrote"
                ),
            }
        },
    )
    .await;
    // Another device's own state under the same conversation id is a row of its own.
    let bob = other.client(server).await;
    bob.ratchet()
        .put_ratchet_state(put(&other, "conv", 0, b"bob's state"))
        .await
        .expect("bob's own state");
    assert_eq!(
        read(&bob, &other, "conv").await.expect("bob").0,
        b"bob's state"
    );
}

on_both_servers! {
    ratchet_state_versions_move_by_compare_and_swap => versions_move_by_compare_and_swap;
    two_writers_racing_on_one_state_give_exactly_one_winner => two_writers_race_on_one_state;
    ratchet_states_are_sealed_and_bound_to_their_row => states_are_sealed_and_bound_to_their_row;
    authorization_matrix_covers_every_ratchet_call => every_ratchet_call_checks_who_calls;
    expected_versions_of_2_pow_63_or_more_are_invalid_arguments => versions_past_the_database_are_invalid_arguments;
}

on_both_servers_with! {
    oversized_states_are_refused => oversized_and_malformed_states_are_refused(small_states);
}
