//! Trust relationships end to end over gRPC, on SQLite and PostgreSQL: adding, listing and
//! removing trusted users, sessions created "with the author's trusted users" in both modes,
//! the per-author limit under concurrent additions, the authorization matrix of every Trust
//! call (and of CreateSession with trusted users), and bad input on every field.

mod common;

use std::collections::BTreeSet;

use common::callers::{check_every_caller, Callers, DENIED, OK, WITH_TOKEN};
use common::requests::{
    self, assert_code, client_wrapped_request, fingerprint, key_set, role_client, signed_key_set,
    WrapTarget,
};
use common::server::{TestDevice, TestServer};
use common::world::World;
use keyhold::client::Client;
use keyhold::crypto::ids::{Epoch, SessionId};
use keyhold::crypto::keys::Dek;
use keyhold::proto::keyhold::v1 as pb;
use tonic::{Code, Status};

// The cast (`common::world`): alice (phone, laptop) is the author; bob (phone, laptop) and
// carol (phone) are the users she may trust; dave has no device at all.

async fn add(client: &Client, author: &str, trusted: &str) -> Result<(i64, bool), Status> {
    client
        .trust()
        .add_trusted_user(pb::AddTrustedUserRequest {
            author_user_id: author.into(),
            trusted_user_id: trusted.into(),
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.created_at, r.created)
        })
}

async fn remove(client: &Client, author: &str, trusted: &str) -> Result<(), Status> {
    client
        .trust()
        .remove_trusted_user(pb::RemoveTrustedUserRequest {
            author_user_id: author.into(),
            trusted_user_id: trusted.into(),
        })
        .await
        .map(|_| ())
}

async fn list_page(
    client: &Client,
    author: &str,
    cursor: &str,
    page_size: u32,
) -> Result<(Vec<pb::TrustedUser>, String), Status> {
    client
        .trust()
        .list_trusted_users(pb::ListTrustedUsersRequest {
            author_user_id: author.into(),
            cursor: cursor.into(),
            page_size,
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.trusted_users, r.next_cursor)
        })
}

/// Every trusted user of `author`, following cursors.
async fn list_all(client: &Client, author: &str, page_size: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (users, next) = list_page(client, author, &cursor, page_size)
            .await
            .expect("list trusted users");
        out.extend(users.into_iter().map(|u| u.user_id));
        if next.is_empty() {
            return out;
        }
        cursor = next;
    }
}

fn trusted_request(mode: pb::SessionMode, flag: bool) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        mode: mode as i32,
        author_user_id: "alice".into(),
        recipients: Some(pb::create_session_request::Recipients::TrustedUsersOfAuthor(flag)),
        ..Default::default()
    }
}

/// The devices a session's epoch-1 keys went to, as (user, device).
fn key_holders(keys: &[pb::SessionKey]) -> BTreeSet<(String, String)> {
    keys.iter()
        .map(|k| (k.user_id.clone(), k.device_id.clone()))
        .collect()
}

fn holders(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    pairs
        .iter()
        .map(|(u, d)| (u.to_string(), d.to_string()))
        .collect()
}

/// The epoch-1 DEK `d` opens of `session`, if it holds a key of it.
async fn open_own_key(server: &TestServer, d: &TestDevice, session: SessionId) -> Option<Dek> {
    requests::open_own_key(server, d, session, Epoch::FIRST).await
}

/// A CLIENT_WRAPPED CreateSession by alice's phone with her trusted users, wrapping a fresh
/// DEK for `devices` (which must be exactly the members' devices for the call to succeed).
async fn client_wrapped_trusted_request(
    server: &TestServer,
    author: &TestDevice,
    devices: &[&TestDevice],
    session: SessionId,
) -> (pb::CreateSessionRequest, Dek) {
    let dek = Dek::generate().expect("dek");
    let set = key_set(
        author,
        session,
        Epoch::FIRST,
        &dek,
        &WrapTarget::devices(devices),
        Some(server.escrow_key.encapsulation_key()),
    );
    let request = client_wrapped_request(
        author,
        session,
        Some(pb::create_session_request::Recipients::TrustedUsersOfAuthor(true)),
        signed_key_set(author, &set),
    );
    (request, dek)
}

async fn trust_is_added_listed_and_removed(server: &TestServer) {
    let w = World::new(server).await;
    let alice = w.alice_phone.client(server).await;
    let (at, created) = add(&w.app, "alice", "bob").await.expect("app adds");
    assert!(created);
    // Adding again changes nothing and returns the first time.
    assert_eq!(
        add(&alice, "alice", "bob").await.expect("again"),
        (at, false)
    );
    add(&alice, "alice", "carol")
        .await
        .expect("alice's phone adds");
    add(&w.alice_laptop.client(server).await, "alice", "dave")
        .await
        .expect("alice's laptop adds");
    // Another author's trust is separate.
    add(&w.bob_phone.client(server).await, "bob", "alice")
        .await
        .expect("bob adds");

    // Listed in user-id order, page by page.
    assert_eq!(list_all(&alice, "alice", 1).await, ["bob", "carol", "dave"]);
    assert_eq!(list_all(&w.app, "alice", 0).await, ["bob", "carol", "dave"]);
    let (first, next) = list_page(&alice, "alice", "", 2).await.expect("page");
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].created_at, at);
    let (rest, last) = list_page(&alice, "alice", &next, 2).await.expect("page");
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].user_id, "dave");
    assert!(last.is_empty());
    assert_eq!(list_all(&w.app, "bob", 10).await, ["alice"]);

    remove(&alice, "alice", "carol").await.expect("remove");
    assert_code(
        remove(&alice, "alice", "carol").await,
        Code::NotFound,
        "trusted_user_id",
    );
    assert_eq!(list_all(&alice, "alice", 10).await, ["bob", "dave"]);
    // Trust again after removal: a new relationship.
    let (again_at, created) = add(&w.app, "alice", "carol").await.expect("add back");
    assert!(created && again_at >= at);
}

async fn sessions_with_trusted_users(server: &TestServer) {
    let w = World::new(server).await;
    // Nobody trusted yet: a session of the author's own devices.
    let alone = w
        .app
        .sessions()
        .create_session(trusted_request(pb::SessionMode::ServiceWrapped, true))
        .await
        .expect("create with no trusted users")
        .into_inner();
    assert_eq!(
        key_holders(&alone.session_keys),
        holders(&[("alice", "laptop"), ("alice", "phone")])
    );

    add(&w.app, "alice", "bob").await.expect("trust bob");
    add(&w.app, "alice", "carol").await.expect("trust carol");
    add(&w.app, "alice", "dave")
        .await
        .expect("dave has no device");
    let created = w
        .app
        .sessions()
        .create_session(pb::CreateSessionRequest {
            return_plaintext_dek: true,
            ..trusted_request(pb::SessionMode::ServiceWrapped, true)
        })
        .await
        .expect("create with trusted users")
        .into_inner();
    let first = SessionId::parse(&created.session_id).expect("id");
    assert_eq!(
        key_holders(&created.session_keys),
        holders(&[
            ("alice", "laptop"),
            ("alice", "phone"),
            ("bob", "laptop"),
            ("bob", "phone"),
            ("carol", "phone"),
        ])
    );
    let dek = Dek::from_slice(created.plaintext_dek.as_deref().expect("dek")).expect("dek");
    for d in [&w.bob_phone, &w.bob_laptop, &w.carol_phone] {
        assert_eq!(open_own_key(server, d, first).await, Some(dek.clone()));
    }

    // The set as it stands at each call: carol removed later keeps the first session, and is
    // not in the next one.
    remove(&w.app, "alice", "carol")
        .await
        .expect("untrust carol");
    let second = w
        .app
        .sessions()
        .create_session(trusted_request(pb::SessionMode::ServiceWrapped, true))
        .await
        .expect("create again")
        .into_inner();
    assert_eq!(
        key_holders(&second.session_keys),
        holders(&[
            ("alice", "laptop"),
            ("alice", "phone"),
            ("bob", "laptop"),
            ("bob", "phone"),
        ])
    );
    assert_eq!(open_own_key(server, &w.carol_phone, first).await, Some(dek));

    // CLIENT_WRAPPED by alice's phone: the wraps must cover exactly the trusted users'
    // devices; one for carol (no longer trusted) is refused.
    let session = SessionId::generate();
    let members = [&w.alice_phone, &w.alice_laptop, &w.bob_phone, &w.bob_laptop];
    let mut with_carol = members.to_vec();
    with_carol.push(&w.carol_phone);
    let (too_many, _) =
        client_wrapped_trusted_request(server, &w.alice_phone, &with_carol, session).await;
    let alice = w.alice_phone.client(server).await;
    let err = alice
        .sessions()
        .create_session(too_many)
        .await
        .expect_err("carol is not trusted");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let (request, dek) =
        client_wrapped_trusted_request(server, &w.alice_phone, &members, session).await;
    alice
        .sessions()
        .create_session(request)
        .await
        .expect("client-wrapped session with trusted users");
    for d in members {
        assert_eq!(open_own_key(server, d, session).await, Some(dek.clone()));
    }
    assert_eq!(open_own_key(server, &w.carol_phone, session).await, None);

    // `false` names no recipients at all.
    let before = fingerprint(&server.db).await;
    assert_code(
        w.app
            .sessions()
            .create_session(trusted_request(pb::SessionMode::ServiceWrapped, false))
            .await,
        Code::InvalidArgument,
        "trusted_users_of_author",
    );
    assert_eq!(fingerprint(&server.db).await, before);
}

async fn an_author_trusts_at_most_the_list_limit(server: &TestServer) {
    // TestServer's list limit is 1000: eight writers race to add 1010 users.
    let app = role_client(server, pb::Role::App).await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let mut refused = 0;
            for i in (t..1010).step_by(8) {
                match add(&app, "alice", &format!("user-{i:04}")).await {
                    Ok(_) => {}
                    Err(e) if e.code() == Code::ResourceExhausted => {
                        assert!(e.message().starts_with("trusted_user_id"), "{e:?}");
                        refused += 1;
                    }
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            refused
        }));
    }
    let mut refused = 0;
    for t in tasks {
        refused += t.await.expect("join");
    }
    assert_eq!(refused, 10, "exactly the additions past 1000 are refused");
    assert_eq!(list_all(&app, "alice", 1000).await.len(), 1000);
    // Re-adding a trusted user at the limit is still fine (nothing new).
    let some = list_all(&app, "alice", 1).await.into_iter().next();
    let some = some.expect("a trusted user");
    assert!(!add(&app, "alice", &some).await.expect("again").1);

    // A session of 1000 trusted users (none with a device) is one recipient list at its limit.
    app.sessions()
        .create_session(trusted_request(pb::SessionMode::ServiceWrapped, true))
        .await
        .expect("1000 trusted users");
    // Past the limit (a lower setting after the fact, here a row written behind the
    // server's back): RESOURCE_EXHAUSTED, nothing created.
    let now = 1_i64;
    server
        .db
        .execute_raw(&format!(
            "INSERT INTO trusted_users (author_user_id, trusted_user_id, created_at) \
             VALUES ('alice', 'zzz-extra', {now})"
        ))
        .await;
    let before = fingerprint(&server.db).await;
    assert_code(
        app.sessions()
            .create_session(trusted_request(pb::SessionMode::ServiceWrapped, true))
            .await,
        Code::ResourceExhausted,
        "trusted_users_of_author",
    );
    assert_eq!(fingerprint(&server.db).await, before);
}

#[derive(Clone, Copy, Debug)]
enum Rpc {
    AddTrustedUser,
    RemoveTrustedUser,
    ListTrustedUsers,
    CreateServiceWrappedWithTrustedUsers,
    CreateClientWrappedWithTrustedUsers,
}

const PD: Code = DENIED;

/// Who makes a call about alice's trust: own is alice's phone, sibling her laptop, other
/// bob's phone. The `Roles:` lines of trust.proto (app for any author, a device for its own user) and of
/// CreateSession (service-wrapped: app only; client-wrapped: the author device only).
const MATRIX: [(Rpc, [Code; 6]); 5] = [
    (Rpc::AddTrustedUser, [OK, OK, OK, PD, PD, PD]),
    (Rpc::RemoveTrustedUser, [OK, OK, OK, PD, PD, PD]),
    (Rpc::ListTrustedUsers, [OK, OK, OK, PD, PD, PD]),
    (
        Rpc::CreateServiceWrappedWithTrustedUsers,
        [OK, PD, PD, PD, PD, PD],
    ),
    (
        Rpc::CreateClientWrappedWithTrustedUsers,
        [PD, OK, PD, PD, PD, PD],
    ),
];

async fn every_trust_call_by_every_caller(server: &TestServer) {
    let w = World::new(server).await;
    let callers = Callers::new(server, &w.alice_phone, &w.alice_laptop, &w.bob_phone).await;
    add(&w.app, "alice", "bob").await.expect("alice trusts bob");
    let mut cells = 0;
    check_every_caller(
        server,
        &callers,
        WITH_TOKEN,
        &MATRIX,
        async |rpc, _, client| {
            // Each cell has a trust relationship of its own to add or remove.
            cells += 1;
            let fresh = format!("user-{cells}");
            if matches!(rpc, Rpc::RemoveTrustedUser) {
                add(&w.app, "alice", &fresh).await.expect("set up");
            }
            let before = fingerprint(&server.db).await;
            let outcome = match rpc {
                Rpc::AddTrustedUser => add(&client, "alice", &fresh).await.map(|_| ()),
                Rpc::RemoveTrustedUser => remove(&client, "alice", &fresh).await,
                Rpc::ListTrustedUsers => list_page(&client, "alice", "", 10).await.map(|_| ()),
                Rpc::CreateServiceWrappedWithTrustedUsers => client
                    .sessions()
                    .create_session(trusted_request(pb::SessionMode::ServiceWrapped, true))
                    .await
                    .map(|_| ()),
                Rpc::CreateClientWrappedWithTrustedUsers => {
                    let members = [&w.alice_phone, &w.alice_laptop, &w.bob_phone, &w.bob_laptop];
                    let (request, _) = client_wrapped_trusted_request(
                        server,
                        &w.alice_phone,
                        &members,
                        SessionId::generate(),
                    )
                    .await;
                    client.sessions().create_session(request).await.map(|_| ())
                }
            };
            (outcome, (fresh, before))
        },
        async |rpc, who, code, (fresh, before)| {
            if code != Code::Ok {
                let after = fingerprint(&server.db).await;
                assert_eq!(after, before, "{rpc:?} as {who:?} was refused but wrote");
            }
            let listed = list_all(&w.app, "alice", 1000).await.contains(&fresh);
            let want = match (rpc, code) {
                (Rpc::AddTrustedUser, Code::Ok) => true,
                (Rpc::RemoveTrustedUser, Code::Ok) => false,
                (Rpc::RemoveTrustedUser, _) => true,
                _ => false,
            };
            assert_eq!(listed, want, "{rpc:?} as {who:?}: trusted afterwards");
        },
    )
    .await;

    // Without a usable token every Trust call is UNAUTHENTICATED.
    let nobody = server
        .client("kh_00000000000000000000000000000000_0000000000000000000000000000000000000000000000000000000000000000")
        .await;
    for r in [
        add(&nobody, "alice", "carol").await.map(|_| ()),
        remove(&nobody, "alice", "bob").await,
        list_page(&nobody, "alice", "", 10).await.map(|_| ()),
    ] {
        assert_eq!(r.expect_err("no token").code(), Code::Unauthenticated);
    }
}

async fn bad_input_on_every_trust_field(server: &TestServer) {
    let w = World::new(server).await;
    add(&w.app, "alice", "bob").await.expect("alice trusts bob");
    let alice = w.alice_phone.client(server).await;
    let too_long = "u".repeat(129);
    let bad_ids = ["", "al ice", too_long.as_str(), "é"];
    let before = fingerprint(&server.db).await;
    for bad in bad_ids {
        assert_code(
            add(&w.app, bad, "carol").await,
            Code::InvalidArgument,
            "author_user_id:",
        );
        assert_code(
            add(&w.app, "alice", bad).await,
            Code::InvalidArgument,
            "trusted_user_id:",
        );
        assert_code(
            remove(&w.app, bad, "bob").await,
            Code::InvalidArgument,
            "author_user_id:",
        );
        assert_code(
            remove(&w.app, "alice", bad).await,
            Code::InvalidArgument,
            "trusted_user_id:",
        );
        assert_code(
            list_page(&w.app, bad, "", 10).await,
            Code::InvalidArgument,
            "author_user_id:",
        );
    }
    assert_code(
        add(&alice, "alice", "alice").await,
        Code::InvalidArgument,
        "trusted_user_id:",
    );
    for bad in ["x", "tu1.", "tu1.zz", "tu2.626f62", "m1.00"] {
        assert_code(
            list_page(&alice, "alice", bad, 10).await,
            Code::InvalidArgument,
            "cursor:",
        );
    }
    assert_eq!(fingerprint(&server.db).await, before, "nothing written");
    // Page sizes are bounded: 0 means 100; more than 1000 is 1000.
    for i in 0..120 {
        add(&w.app, "carol", &format!("u{i:03}"))
            .await
            .expect("add");
    }
    assert_eq!(
        list_page(&w.app, "carol", "", 0)
            .await
            .expect("page")
            .0
            .len(),
        100
    );
    assert_eq!(
        list_page(&w.app, "carol", "", u32::MAX)
            .await
            .expect("page")
            .0
            .len(),
        120
    );
    // The unchanged requests succeed.
    add(&alice, "alice", "carol").await.expect("valid add");
    remove(&alice, "alice", "carol")
        .await
        .expect("valid remove");
}

on_both_servers! {
    trust_is_added_listed_and_removed_in_user_order => trust_is_added_listed_and_removed;
    sessions_with_trusted_users_take_the_set_at_the_call => sessions_with_trusted_users;
    concurrent_additions_stop_at_the_limit => an_author_trusts_at_most_the_list_limit;
    authorization_matrix_of_trust => every_trust_call_by_every_caller;
    bad_input_on_every_trust_field_writes_nothing => bad_input_on_every_trust_field;
}
