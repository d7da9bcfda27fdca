//! Messages end to end over gRPC, on SQLite and PostgreSQL: the epoch access rule, idempotent
//! batches, keyset pages that never skip or repeat while others write, soft deletes, the
//! authorization matrix of every Messages call, and bad input on every field.
//!
//! Messages are sealed for real with the crypto core (`seal_message` under the epoch DEK a
//! device opens from its own session key), so a test that reads one back also opens it.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use common::callers::{check_every_caller, Callers, Who, DENIED, OK};
use common::held::HeldWriter;
use common::requests::{
    add_recipients, assert_code, fingerprint, open_own_key, remove_recipients,
    service_wrapped_session,
};
use common::server::{TestDevice, TestServer};
use common::world::World;
use common::Kind;
use keyhold::client::Client;
use keyhold::config::Limits;
use keyhold::crypto::ids::{Epoch, MessageId, SessionId};
use keyhold::crypto::keys::Dek;
use keyhold::crypto::message::{open_message, seal_message, MessageContext};
use keyhold::proto::keyhold::v1 as pb;
use keyhold::store::messages::{Author, NewMessage, PutOutcome, Writer};
use tonic::{Code, Status};

// Who is in the tests (`common::world`): alice (phone, laptop) authors; bob (phone, laptop)
// and carol (phone) are recipients; erin (phone) is in no session. An app server token drives
// sessions.

impl World {
    /// A service-wrapped session by `author` with `recipients`, created by the app server.
    async fn session(&self, author: &str, recipients: &[&str]) -> SessionId {
        service_wrapped_session(&self.app, author, recipients).await
    }

    /// Removes `user` from a session through the app server; returns the new epoch.
    async fn remove(&self, session: SessionId, user: &str) -> Epoch {
        let epoch = remove_recipients(&self.app, session, &[user]).await.epoch;
        Epoch::new(epoch).expect("epoch")
    }
}

/// A message sealed for real under `dek`, with `text` as its plaintext.
fn seal(session: SessionId, epoch: Epoch, dek: &Dek, text: &str) -> pb::NewMessage {
    let message_id = MessageId::generate();
    let ctx = MessageContext {
        session_id: session,
        epoch,
        message_id,
    };
    let sealed = seal_message(dek, &ctx, text.as_bytes(), b"kind=text").expect("seal");
    pb::NewMessage {
        message_id: message_id.to_string(),
        session_id: session.to_string(),
        epoch: epoch.get(),
        nonce: sealed.nonce.to_vec(),
        ciphertext: sealed.ciphertext,
        associated_data: Some(b"kind=text".to_vec()),
    }
}

/// A well-formed message whose bytes are not a real seal (for tests that never open it).
fn filler(session: SessionId, epoch: Epoch, n: usize) -> pb::NewMessage {
    pb::NewMessage {
        message_id: MessageId::generate().to_string(),
        session_id: session.to_string(),
        epoch: epoch.get(),
        nonce: vec![7; 12],
        ciphertext: format!("filler message {n:08}------").into_bytes(),
        associated_data: None,
    }
}

/// Opens a listed message with `dek`, as its reader would.
fn open(m: &pb::EncryptedMessage, dek: &Dek) -> String {
    let ctx = MessageContext {
        session_id: SessionId::parse(&m.session_id).expect("session id"),
        epoch: Epoch::new(m.epoch).expect("epoch"),
        message_id: MessageId::parse(&m.message_id).expect("message id"),
    };
    let aad = m.associated_data.clone().unwrap_or_default();
    String::from_utf8(open_message(dek, &ctx, &m.nonce, &m.ciphertext, &aad).expect("opens"))
        .expect("utf-8")
}

async fn put(
    client: &Client,
    user: &str,
    device: &str,
    messages: Vec<pb::NewMessage>,
) -> Result<Vec<pb::PutMessageResult>, Status> {
    client
        .messages()
        .put_messages(pb::PutMessagesRequest {
            author_user_id: user.into(),
            author_device_id: device.into(),
            messages,
        })
        .await
        .map(|r| r.into_inner().results)
}

/// Which listing to page through.
#[derive(Clone, Copy)]
enum List<'a> {
    Timeline,
    Session(SessionId),
    Author(&'a str),
}

/// The reading device a listing names: (user id, device id).
fn reader(d: &TestDevice) -> (String, String) {
    (d.user.to_string(), d.device.to_string())
}

/// One page of a listing, read as the device `reader` names (with `client`'s token).
async fn page(
    client: &Client,
    reader: &(String, String),
    list: List<'_>,
    cursor: &str,
    page_size: u32,
) -> Result<(Vec<pb::EncryptedMessage>, String), Status> {
    let mut messages = client.messages();
    let (user_id, device_id) = reader.clone();
    let cursor = cursor.to_string();
    Ok(match list {
        List::Timeline => {
            let r = messages
                .timeline(pb::TimelineRequest {
                    user_id,
                    device_id,
                    cursor,
                    page_size,
                })
                .await?
                .into_inner();
            (r.messages, r.next_cursor)
        }
        List::Session(s) => {
            let r = messages
                .list_session_messages(pb::ListSessionMessagesRequest {
                    user_id,
                    device_id,
                    session_id: s.to_string(),
                    cursor,
                    page_size,
                })
                .await?
                .into_inner();
            (r.messages, r.next_cursor)
        }
        List::Author(a) => {
            let r = messages
                .list_author_messages(pb::ListAuthorMessagesRequest {
                    user_id,
                    device_id,
                    author_user_id: a.into(),
                    cursor,
                    page_size,
                })
                .await?
                .into_inner();
            (r.messages, r.next_cursor)
        }
    })
}

/// Every message of a listing, following cursors from the newest page to the end.
async fn all(
    server: &TestServer,
    d: &TestDevice,
    list: List<'_>,
    page_size: u32,
) -> Vec<pb::EncryptedMessage> {
    let client = d.client(server).await;
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (messages, next) = page(&client, &reader(d), list, &cursor, page_size)
            .await
            .expect("list");
        out.extend(messages);
        if next.is_empty() {
            return out;
        }
        cursor = next;
    }
}

fn ids(messages: &[pb::EncryptedMessage]) -> Vec<String> {
    messages.iter().map(|m| m.message_id.clone()).collect()
}

fn id_set<'a>(ids: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
    ids.into_iter().cloned().collect()
}

/// A message's place in every listing: (server time, raw id bytes).
fn position(m: &pb::EncryptedMessage) -> (i64, [u8; 16]) {
    let id = MessageId::parse(&m.message_id).expect("message id");
    (m.created_at, *id.as_bytes())
}

fn assert_newest_first(messages: &[pb::EncryptedMessage]) {
    for pair in messages.windows(2) {
        assert!(
            position(&pair[0]) > position(&pair[1]),
            "not strictly newest first: {} then {}",
            pair[0].message_id,
            pair[1].message_id
        );
    }
}

async fn access_follows_keys(server: &TestServer) {
    let w = World::new(server).await;
    let s = w.session("alice", &["bob", "carol"]).await;
    let e1 = Epoch::FIRST;
    let dek1 = open_own_key(server, &w.alice_phone, s, e1)
        .await
        .expect("alice holds epoch 1");
    let alice = w.alice_phone.client(server).await;
    let epoch1: Vec<pb::NewMessage> = (0..3)
        .map(|i| seal(s, e1, &dek1, &format!("epoch one #{i}")))
        .collect();
    let stored = put(&alice, "alice", "phone", epoch1.clone())
        .await
        .expect("alice stores into epoch 1");
    assert!(stored.iter().all(|r| r.created));

    // Bob reads epoch 1 with the DEK his own session key opens to.
    let bob_dek1 = open_own_key(server, &w.bob_phone, s, e1)
        .await
        .expect("bob holds epoch 1");
    let seen = all(server, &w.bob_phone, List::Timeline, 50).await;
    assert_eq!(seen.len(), 3);
    let texts: BTreeSet<String> = seen.iter().map(|m| open(m, &bob_dek1)).collect();
    assert_eq!(
        texts,
        (0..3)
            .map(|i| format!("epoch one #{i}"))
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(seen[0].author_user_id, "alice");
    assert_eq!(seen[0].author_device_id, "phone");

    // Bob is removed at epoch 2; alice writes epoch 2.
    let e2 = w.remove(s, "bob").await;
    assert_eq!(e2.get(), 2);
    let dek2 = open_own_key(server, &w.alice_phone, s, e2)
        .await
        .expect("alice holds epoch 2");
    let epoch2: Vec<pb::NewMessage> = (0..2)
        .map(|i| seal(s, e2, &dek2, &format!("epoch two #{i}")))
        .collect();
    put(&alice, "alice", "phone", epoch2.clone())
        .await
        .expect("alice stores into epoch 2");
    let epoch1_ids = id_set(epoch1.iter().map(|m| &m.message_id));
    let every_id = id_set(epoch1.iter().chain(&epoch2).map(|m| &m.message_id));

    // Bob's devices read epoch 1 and never epoch 2, in every listing.
    for bob in [&w.bob_phone, &w.bob_laptop] {
        for list in [List::Timeline, List::Session(s), List::Author("alice")] {
            let got = all(server, bob, list, 2).await;
            assert_eq!(
                id_set(&ids(&got)),
                epoch1_ids,
                "{}/{}",
                bob.user,
                bob.device
            );
            assert!(got.iter().all(|m| m.epoch == 1));
        }
        assert!(open_own_key(server, bob, s, e2).await.is_none());
    }
    // Carol reads both epochs, and opens epoch 2 with her own epoch-2 key.
    let carol_all = all(server, &w.carol_phone, List::Session(s), 50).await;
    assert_eq!(id_set(&ids(&carol_all)), every_id);
    let carol_dek2 = open_own_key(server, &w.carol_phone, s, e2)
        .await
        .expect("carol holds epoch 2");
    let newest = &carol_all[0];
    assert_eq!(newest.epoch, 2);
    assert!(open(newest, &carol_dek2).starts_with("epoch two"));

    // Storing follows keys too: bob holds no epoch-2 key; he still holds epoch 1's.
    let bob = w.bob_phone.client(server).await;
    let before = fingerprint(&server.db).await;
    assert_code(
        put(&bob, "bob", "phone", vec![seal(s, e2, &dek2, "sneaky")]).await,
        Code::PermissionDenied,
        "messages[0]",
    );
    assert_eq!(fingerprint(&server.db).await, before, "nothing written");
    put(
        &bob,
        "bob",
        "phone",
        vec![seal(s, e1, &bob_dek1, "late reply")],
    )
    .await
    .expect("bob still holds his epoch-1 key");

    // Erin is in no session: she reads nothing and stores nothing.
    let erin = w.erin_phone.client(server).await;
    assert!(all(server, &w.erin_phone, List::Timeline, 50)
        .await
        .is_empty());
    assert_code(
        page(&erin, &reader(&w.erin_phone), List::Session(s), "", 10).await,
        Code::NotFound,
        "session_id",
    );
    assert_code(
        put(&erin, "erin", "phone", vec![filler(s, e1, 0)]).await,
        Code::PermissionDenied,
        "messages[0]",
    );

    // An app server stores on a user's behalf into any epoch up to the current one.
    let by_app = put(&w.app, "carol", "", vec![filler(s, e2, 1)])
        .await
        .expect("app stores for carol");
    let listed = all(server, &w.carol_phone, List::Author("carol"), 50).await;
    assert_eq!(ids(&listed), vec![by_app[0].message_id.clone()]);
    assert_eq!(listed[0].author_device_id, "");
    assert_code(
        put(
            &w.app,
            "carol",
            "",
            vec![filler(s, Epoch::new(3).expect("epoch"), 2)],
        )
        .await,
        Code::FailedPrecondition,
        "messages[0].epoch",
    );
    assert_code(
        put(
            &w.app,
            "carol",
            "",
            vec![filler(SessionId::generate(), e1, 3)],
        )
        .await,
        Code::NotFound,
        "messages[0].session_id",
    );

    // Keys decide, not history: bob added back gets epoch 2's key and now reads epoch 2.
    add_recipients(&w.app, s, &["bob"]).await;
    let bob_now = all(server, &w.bob_phone, List::Session(s), 50).await;
    assert!(bob_now.iter().any(|m| m.epoch == 2));
}

async fn retries_are_idempotent_and_other_bytes_conflict(server: &TestServer) {
    let w = World::new(server).await;
    let s = w.session("alice", &["carol"]).await;
    let dek = open_own_key(server, &w.alice_phone, s, Epoch::FIRST)
        .await
        .expect("dek");
    let alice = w.alice_phone.client(server).await;
    let batch: Vec<pb::NewMessage> = (0..4)
        .map(|i| seal(s, Epoch::FIRST, &dek, &format!("hello #{i}")))
        .collect();
    let first = put(&alice, "alice", "phone", batch.clone())
        .await
        .expect("store");
    assert!(first.iter().all(|r| r.created));
    assert_eq!(
        first.iter().map(|r| &r.message_id).collect::<Vec<_>>(),
        batch.iter().map(|m| &m.message_id).collect::<Vec<_>>(),
        "results in request order"
    );

    // The same batch again (a client retrying after a timeout): success, the first times,
    // nothing stored twice. A retry mixing old and new messages stores only the new one.
    let before = fingerprint(&server.db).await;
    let again = put(&alice, "alice", "phone", batch.clone())
        .await
        .expect("retry");
    assert!(again.iter().all(|r| !r.created));
    assert_eq!(
        again.iter().map(|r| r.created_at).collect::<Vec<_>>(),
        first.iter().map(|r| r.created_at).collect::<Vec<_>>()
    );
    assert_eq!(fingerprint(&server.db).await, before);
    let mut mixed = batch.clone();
    mixed.push(seal(s, Epoch::FIRST, &dek, "one more"));
    let mixed_result = put(&alice, "alice", "phone", mixed).await.expect("mixed");
    assert_eq!(
        mixed_result.iter().map(|r| r.created).collect::<Vec<_>>(),
        vec![false, false, false, false, true]
    );
    assert_eq!(
        all(server, &w.carol_phone, List::Session(s), 50)
            .await
            .len(),
        5
    );

    // The same id with other bytes, with a new message before it: ALREADY_EXISTS naming the
    // message, and the whole batch is refused. Every field counts.
    let mut changed_ciphertext = batch[2].clone();
    changed_ciphertext.ciphertext[0] ^= 1;
    let mut changed_nonce = batch[2].clone();
    changed_nonce.nonce[0] ^= 1;
    let mut changed_aad = batch[2].clone();
    changed_aad.associated_data = None;
    let mut changed_epoch = batch[2].clone();
    changed_epoch.epoch = 2;
    for changed in [changed_ciphertext, changed_nonce, changed_aad] {
        let before = fingerprint(&server.db).await;
        let fresh = seal(s, Epoch::FIRST, &dek, "would be new");
        assert_code(
            put(&alice, "alice", "phone", vec![fresh, changed]).await,
            Code::AlreadyExists,
            "messages[1].message_id",
        );
        assert_eq!(fingerprint(&server.db).await, before, "nothing written");
    }
    // Another author (a sibling device) with the very same bytes is another message.
    assert_code(
        put(
            &w.alice_laptop.client(server).await,
            "alice",
            "laptop",
            vec![batch[0].clone()],
        )
        .await,
        Code::AlreadyExists,
        "messages[0].message_id",
    );
    // An epoch the session does not have yet is refused before the id is looked at.
    assert_code(
        put(&w.app, "alice", "phone", vec![changed_epoch]).await,
        Code::FailedPrecondition,
        "messages[0].epoch",
    );
    // The stored message is still the original and still opens.
    let listed = all(server, &w.carol_phone, List::Session(s), 50).await;
    let original = listed
        .iter()
        .find(|m| m.message_id == batch[2].message_id)
        .expect("stored");
    assert_eq!(open(original, &dek), "hello #2");
}

async fn concurrent_writers_of_one_id_store_one_version(server: &TestServer) {
    let w = World::new(server).await;
    let s = w.session("alice", &["carol"]).await;
    let author = Author {
        user: w.alice_phone.user.clone(),
        device: Some(w.alice_phone.device.clone()),
    };
    let id = MessageId::generate();
    let version = |byte: u8| NewMessage {
        message_id: id,
        session_id: s,
        epoch: Epoch::FIRST,
        nonce: vec![byte; 12],
        ciphertext: vec![byte; 32],
        associated_data: None,
    };
    // The first writer holds its transaction open after inserting; the second writes the same
    // id with other bytes meanwhile (on PostgreSQL its insert waits for the first to commit).
    let holder = HeldWriter::start(&server.store, &author, vec![version(1)]).await;
    let store = server.store.clone();
    let (a, second) = (author.clone(), version(2));
    let racer = tokio::spawn(async move {
        store
            .transaction(async move |tx| tx.put_messages(Writer::Device, &a, &[second]).await)
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = holder.commit().await.expect("first writer commits");
    assert!(
        matches!(first, PutOutcome::Stored(ref v) if v[0].1),
        "{first:?}"
    );
    match racer.await.expect("join") {
        Ok(PutOutcome::Conflict(0)) => {}
        other => panic!("the second writer must lose, got {other:?}"),
    }
    let listed = all(server, &w.carol_phone, List::Session(s), 50).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].nonce, vec![1; 12], "the first version is kept");
}

async fn pages_never_skip_or_repeat_while_others_write(server: &TestServer) {
    let w = World::new(server).await;
    let s1 = w.session("alice", &["bob", "carol"]).await;
    let s2 = w.session("bob", &["carol"]).await;
    let alice = w.alice_phone.client(server).await;
    let bob = w.bob_phone.client(server).await;
    let mut before: Vec<String> = Vec::new();
    for round in 0..10 {
        let a: Vec<_> = (0..4)
            .map(|i| filler(s1, Epoch::FIRST, round * 10 + i))
            .collect();
        let b: Vec<_> = (0..3)
            .map(|i| filler(s2, Epoch::FIRST, round * 10 + i))
            .collect();
        before.extend(a.iter().chain(&b).map(|m| m.message_id.clone()));
        put(&alice, "alice", "phone", a).await.expect("alice");
        put(&bob, "bob", "phone", b).await.expect("bob");
    }

    // Two writers keep storing through a second replica (its own connection pool) while
    // carol pages through her timeline seven messages at a time.
    let replica = server.replica(Limits::default()).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (n, (d, s)) in [(&w.alice_phone, s1), (&w.bob_phone, s2)]
        .into_iter()
        .enumerate()
    {
        let client = replica.client(&d.token).await;
        let (user, device) = (d.user.to_string(), d.device.to_string());
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<_> = (0..2)
                    .map(|k| filler(s, Epoch::FIRST, 100_000 * (n + 1) + i * 2 + k))
                    .collect();
                written.extend(batch.iter().map(|m| m.message_id.clone()));
                put(&client, &user, &device, batch).await.expect("writer");
                i += 1;
            }
            written
        }));
    }
    let carol = w.carol_phone.client(server).await;
    let mut first_pass: Vec<pb::EncryptedMessage> = Vec::new();
    let mut cursor = String::new();
    loop {
        let (messages, next) = page(&carol, &reader(&w.carol_phone), List::Timeline, &cursor, 7)
            .await
            .expect("page");
        first_pass.extend(messages);
        if next.is_empty() {
            break;
        }
        cursor = next;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = Vec::new();
    for wr in writers {
        written.extend(wr.await.expect("writer joins"));
    }
    replica.stop().await;
    assert!(written.len() >= 4, "the writers wrote while carol paged");

    // No repeat, strictly newest first, every message that existed before paging began.
    let first_ids = ids(&first_pass);
    assert_eq!(
        first_ids.iter().collect::<HashSet<_>>().len(),
        first_ids.len(),
        "a message was repeated"
    );
    assert_newest_first(&first_pass);
    let first_set = id_set(&first_ids);
    let missing: Vec<_> = before
        .iter()
        .filter(|id| !first_set.contains(*id))
        .collect();
    assert!(missing.is_empty(), "skipped: {missing:?}");

    // Catching up from the top down to the newest message already listed yields exactly the
    // messages written since: nothing stored meanwhile landed below what was listed.
    let top = position(&first_pass[0]);
    let mut caught_up: Vec<pb::EncryptedMessage> = Vec::new();
    let mut cursor = String::new();
    'pages: loop {
        let (messages, next) = page(&carol, &reader(&w.carol_phone), List::Timeline, &cursor, 5)
            .await
            .expect("page");
        for m in messages {
            if position(&m) <= top {
                break 'pages;
            }
            caught_up.push(m);
        }
        if next.is_empty() {
            break;
        }
        cursor = next;
    }
    let caught = id_set(&ids(&caught_up));
    assert!(caught.is_disjoint(&first_set), "listed twice across passes");
    let everything: BTreeSet<String> = before.iter().chain(&written).cloned().collect();
    let union: BTreeSet<String> = first_set.union(&caught).cloned().collect();
    assert_eq!(union, everything, "a message was skipped by both passes");
}

async fn a_late_commit_never_lands_below_a_listed_message(server: &TestServer) {
    let w = World::new(server).await;
    let s = w.session("alice", &["carol"]).await;
    let alice = w.alice_phone.client(server).await;
    put(&alice, "alice", "phone", vec![filler(s, Epoch::FIRST, 0)])
        .await
        .expect("an older message");
    let author = Author {
        user: w.alice_phone.user.clone(),
        device: Some(w.alice_phone.device.clone()),
    };
    // The slow writer takes its time first and commits last.
    let slow = NewMessage {
        message_id: MessageId::generate(),
        session_id: s,
        epoch: Epoch::FIRST,
        nonce: vec![1; 12],
        ciphertext: vec![1; 40],
        associated_data: None,
    };
    let slow_id = slow.message_id.to_string();
    let holder = HeldWriter::start(&server.store, &author, vec![slow]).await;
    // A fast writer stores after it and commits first (SQLite: it waits for the slow one).
    let fast = filler(s, Epoch::FIRST, 1);
    let fast_id = fast.message_id.clone();
    let fast_put = {
        let alice = alice.clone();
        tokio::spawn(async move { put(&alice, "alice", "phone", vec![fast]).await })
    };
    if server.kind() == Kind::Postgres {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !fast_put.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the fast writer commits while the slow one is open");
    }
    // Carol reads while the slow writer is still open (on SQLite this waits for it).
    let early_read = {
        let carol = w.carol_phone.client(server).await;
        let who = reader(&w.carol_phone);
        tokio::spawn(async move { page(&carol, &who, List::Timeline, "", 50).await })
    };
    if server.kind() == Kind::Postgres {
        let (early, _) = early_read.await.expect("join").expect("read while open");
        // The fast message exists, but an older write is still open: it is not listed yet.
        assert!(
            !ids(&early).contains(&fast_id),
            "listed above an open writer"
        );
        holder.commit().await.expect("slow writer commits");
        check_only_above(server, &w, &early).await;
    } else {
        tokio::time::sleep(Duration::from_millis(300)).await;
        holder.commit().await.expect("slow writer commits");
        let (early, _) = early_read.await.expect("join").expect("read");
        check_only_above(server, &w, &early).await;
    }
    fast_put.await.expect("join").expect("fast writer");
    let now = all(server, &w.carol_phone, List::Timeline, 50).await;
    let now_ids = ids(&now);
    assert_eq!(
        now_ids[..2],
        [fast_id, slow_id],
        "newest first, both listed"
    );
}

/// Every message listed now but not in `earlier` must be newer than everything `earlier`
/// listed: that is what lets a client catch up by paging down to what it already has.
async fn check_only_above(server: &TestServer, w: &World, earlier: &[pb::EncryptedMessage]) {
    let earlier_ids = id_set(&ids(earlier));
    let top = earlier.first().map(position).expect("an earlier message");
    for m in all(server, &w.carol_phone, List::Timeline, 50).await {
        if !earlier_ids.contains(&m.message_id) {
            assert!(
                position(&m) > top,
                "message {} appeared below a message already listed",
                m.message_id
            );
        }
    }
}

async fn deleted_messages_and_sessions_vanish(server: &TestServer) {
    let w = World::new(server).await;
    let s = w.session("alice", &["carol"]).await;
    let other = w.session("alice", &["carol"]).await;
    let alice = w.alice_phone.client(server).await;
    let stored = put(
        &alice,
        "alice",
        "phone",
        (0..3).map(|i| filler(s, Epoch::FIRST, i)).collect(),
    )
    .await
    .expect("store");
    let kept = put(
        &alice,
        "alice",
        "phone",
        vec![filler(other, Epoch::FIRST, 9)],
    )
    .await
    .expect("store")[0]
        .message_id
        .clone();
    let delete = |client: Client, id: String| async move {
        client
            .messages()
            .delete_message(pb::DeleteMessageRequest { message_id: id })
            .await
            .map(|r| r.into_inner().deleted_at)
    };

    // The author device deletes; again returns the first time.
    let gone = stored[0].message_id.clone();
    let at = delete(alice.clone(), gone.clone()).await.expect("delete");
    assert_eq!(
        delete(alice.clone(), gone.clone()).await.expect("again"),
        at
    );
    for list in [List::Timeline, List::Session(s), List::Author("alice")] {
        let listed = ids(&all(server, &w.carol_phone, list, 50).await);
        assert!(!listed.contains(&gone));
        assert!(listed.contains(&stored[1].message_id));
    }
    // Carol can read alice's message but may not delete it; erin cannot even see it; a
    // sibling device of the author's user and an app server may.
    let carol = w.carol_phone.client(server).await;
    assert_code(
        delete(carol, stored[1].message_id.clone()).await,
        Code::PermissionDenied,
        "message_id",
    );
    assert_code(
        delete(
            w.erin_phone.client(server).await,
            stored[1].message_id.clone(),
        )
        .await,
        Code::NotFound,
        "message_id",
    );
    delete(
        w.alice_laptop.client(server).await,
        stored[1].message_id.clone(),
    )
    .await
    .expect("a device of the author's user deletes");
    delete(w.app.clone(), stored[2].message_id.clone())
        .await
        .expect("an app server deletes");
    assert!(all(server, &w.carol_phone, List::Session(s), 50)
        .await
        .is_empty());
    assert_code(
        delete(alice.clone(), MessageId::generate().to_string()).await,
        Code::NotFound,
        "message_id",
    );

    // Deleting a session hides its messages everywhere; other sessions stay.
    let live = put(&alice, "alice", "phone", vec![filler(s, Epoch::FIRST, 5)])
        .await
        .expect("store")[0]
        .message_id
        .clone();
    w.app
        .sessions()
        .delete_session(pb::DeleteSessionRequest {
            session_id: s.to_string(),
        })
        .await
        .expect("delete session");
    for d in [&w.alice_phone, &w.carol_phone] {
        assert_eq!(
            ids(&all(server, d, List::Timeline, 50).await),
            vec![kept.clone()]
        );
        assert_eq!(
            ids(&all(server, d, List::Author("alice"), 50).await),
            vec![kept.clone()]
        );
        assert_code(
            page(
                &d.client(server).await,
                &reader(d),
                List::Session(s),
                "",
                10,
            )
            .await,
            Code::NotFound,
            "session_id",
        );
    }
    assert_code(
        delete(alice.clone(), live).await,
        Code::NotFound,
        "message_id",
    );
    assert_code(
        put(&alice, "alice", "phone", vec![filler(s, Epoch::FIRST, 6)]).await,
        Code::PermissionDenied,
        "messages[0]",
    );
}

/// Who makes a call, relative to alice's phone, whose messages and views the calls touch:
/// sibling is alice's laptop (the same user, a member of the session), member carol's phone
/// (another user, a member), other erin's phone (another user, in no session).
const COLUMNS: [Who; 7] = [
    Who::App,
    Who::Own,
    Who::Sibling,
    Who::Member,
    Who::Other,
    Who::Staff,
    Who::Admin,
];

#[derive(Clone, Copy, Debug)]
enum Rpc {
    PutMessages,
    ListSessionMessages,
    Timeline,
    ListAuthorMessages,
    DeleteMessage,
}

const PD: Code = DENIED;
const NF: Code = Code::NotFound;

/// The `Roles:` lines of messages.proto, for requests about alice's phone: a device acts only
/// as itself; a message is deleted by its author's user or an app server, and a device that
/// cannot read it is told it does not exist.
const MATRIX: [(Rpc, [Code; 7]); 5] = [
    (Rpc::PutMessages, [OK, OK, PD, PD, PD, PD, PD]),
    (Rpc::ListSessionMessages, [OK, OK, PD, PD, PD, PD, PD]),
    (Rpc::Timeline, [OK, OK, PD, PD, PD, PD, PD]),
    (Rpc::ListAuthorMessages, [OK, OK, PD, PD, PD, PD, PD]),
    (Rpc::DeleteMessage, [OK, OK, OK, PD, NF, PD, PD]),
];

/// The first page of `list`, read as alice's phone with `client`'s token.
async fn list_as_alice(client: &Client, list: List<'_>) -> Result<(), Status> {
    let alice_phone = ("alice".to_string(), "phone".to_string());
    page(client, &alice_phone, list, "", 10).await.map(|_| ())
}

async fn every_messages_call_by_every_caller(server: &TestServer) {
    let w = World::new(server).await;
    let s = w.session("alice", &["carol"]).await;
    let callers = Callers::new(server, &w.alice_phone, &w.alice_laptop, &w.erin_phone)
        .await
        .with_member(&w.carol_phone);
    let alice = w.alice_phone.client(server).await;
    check_every_caller(
        server,
        &callers,
        COLUMNS,
        &MATRIX,
        async |rpc, _, client| {
            // Each cell starts from a message of its own.
            let mine = put(&alice, "alice", "phone", vec![filler(s, Epoch::FIRST, 0)])
                .await
                .expect("a message of alice's phone")[0]
                .message_id
                .clone();
            let new = filler(s, Epoch::FIRST, 1);
            let new_id = new.message_id.clone();
            let before = fingerprint(&server.db).await;
            let outcome = match rpc {
                Rpc::PutMessages => put(&client, "alice", "phone", vec![new]).await.map(|_| ()),
                Rpc::ListSessionMessages => list_as_alice(&client, List::Session(s)).await,
                Rpc::Timeline => list_as_alice(&client, List::Timeline).await,
                Rpc::ListAuthorMessages => list_as_alice(&client, List::Author("alice")).await,
                Rpc::DeleteMessage => client
                    .messages()
                    .delete_message(pb::DeleteMessageRequest {
                        message_id: mine.clone(),
                    })
                    .await
                    .map(|_| ()),
            };
            (outcome, (mine, new_id, before))
        },
        async |rpc, who, code, (mine, new_id, before)| {
            if code != Code::Ok {
                let after = fingerprint(&server.db).await;
                assert_eq!(after, before, "{rpc:?} as {who:?} was refused but wrote");
            }
            let listed = ids(&all(server, &w.carol_phone, List::Session(s), 200).await);
            let put_landed = listed.contains(&new_id);
            let still_there = listed.contains(&mine);
            let want = match (rpc, code) {
                (Rpc::PutMessages, Code::Ok) => (true, true),
                (Rpc::DeleteMessage, Code::Ok) => (false, false),
                _ => (false, true),
            };
            assert_eq!(
                (put_landed, still_there),
                want,
                "{rpc:?} as {who:?}: (stored new, message kept)"
            );
        },
    )
    .await;

    // Without a usable token every Messages call is UNAUTHENTICATED.
    let nobody = server
        .client("kh_00000000000000000000000000000000_0000000000000000000000000000000000000000000000000000000000000000")
        .await;
    let results = [
        put(&nobody, "alice", "phone", vec![filler(s, Epoch::FIRST, 2)])
            .await
            .map(|_| ()),
        list_as_alice(&nobody, List::Session(s)).await,
        list_as_alice(&nobody, List::Timeline).await,
        list_as_alice(&nobody, List::Author("alice")).await,
        nobody
            .messages()
            .delete_message(pb::DeleteMessageRequest {
                message_id: MessageId::generate().to_string(),
            })
            .await
            .map(|_| ()),
    ];
    for r in results {
        assert_eq!(r.expect_err("no token").code(), Code::Unauthenticated);
    }
}

async fn bad_input_on_every_field(server: &TestServer) {
    let w = World::new(server).await;
    let s = w.session("alice", &["carol"]).await;
    let alice = w.alice_phone.client(server).await;
    let good = || filler(s, Epoch::FIRST, 0);
    let v4 = uuid::Builder::from_random_bytes([7u8; 16])
        .into_uuid()
        .to_string();
    let request = |messages: Vec<pb::NewMessage>| pb::PutMessagesRequest {
        author_user_id: "alice".into(),
        author_device_id: "phone".into(),
        messages,
    };
    // One field changed in a batch whose first message is valid; nothing may be stored.
    let with = |f: &dyn Fn(&mut pb::NewMessage)| {
        let mut bad = good();
        f(&mut bad);
        request(vec![good(), bad])
    };
    let mut cases: Vec<(&str, pb::PutMessagesRequest, Code, &str)> = vec![
        (
            "author user id empty",
            pb::PutMessagesRequest {
                author_user_id: String::new(),
                ..request(vec![good()])
            },
            Code::InvalidArgument,
            "author_user_id",
        ),
        (
            "author user id with a space",
            pb::PutMessagesRequest {
                author_user_id: "al ice".into(),
                ..request(vec![good()])
            },
            Code::InvalidArgument,
            "author_user_id",
        ),
        (
            "author device id with a space",
            pb::PutMessagesRequest {
                author_device_id: "my phone".into(),
                ..request(vec![good()])
            },
            Code::InvalidArgument,
            "author_device_id",
        ),
        (
            "a device token without its device id",
            pb::PutMessagesRequest {
                author_device_id: String::new(),
                ..request(vec![good()])
            },
            Code::InvalidArgument,
            "author_device_id",
        ),
        (
            "no message",
            request(Vec::new()),
            Code::InvalidArgument,
            "messages",
        ),
        (
            "message id not a UUID",
            with(&|m| m.message_id = "message-1".into()),
            Code::InvalidArgument,
            "messages[1].message_id",
        ),
        (
            "message id a UUIDv4",
            with(&|m| m.message_id = v4.clone()),
            Code::InvalidArgument,
            "messages[1].message_id",
        ),
        (
            "message id nil",
            with(&|m| m.message_id = "00000000-0000-0000-0000-000000000000".into()),
            Code::InvalidArgument,
            "messages[1].message_id",
        ),
        (
            "session id not a UUID",
            with(&|m| m.session_id = "session".into()),
            Code::InvalidArgument,
            "messages[1].session_id",
        ),
        (
            "epoch zero",
            with(&|m| m.epoch = 0),
            Code::InvalidArgument,
            "messages[1].epoch",
        ),
        (
            "nonce of 11 bytes",
            with(&|m| m.nonce = vec![0; 11]),
            Code::InvalidArgument,
            "messages[1].nonce",
        ),
        (
            "nonce of 13 bytes",
            with(&|m| m.nonce = vec![0; 13]),
            Code::InvalidArgument,
            "messages[1].nonce",
        ),
        (
            "ciphertext shorter than a tag",
            with(&|m| m.ciphertext = vec![0; 15]),
            Code::InvalidArgument,
            "messages[1].ciphertext",
        ),
        (
            "ciphertext over 1 MiB",
            with(&|m| m.ciphertext = vec![0; 1024 * 1024 + 1]),
            Code::ResourceExhausted,
            "messages[1].ciphertext",
        ),
        (
            "associated data taking the message over 1 MiB",
            with(&|m| {
                m.ciphertext = vec![0; 1024 * 1024 - 100];
                m.associated_data = Some(vec![0; 101]);
            }),
            Code::ResourceExhausted,
            "messages[1].ciphertext",
        ),
        (
            "501 messages",
            request((0..501).map(|i| filler(s, Epoch::FIRST, i)).collect()),
            Code::ResourceExhausted,
            "messages",
        ),
    ];
    let dup = good();
    cases.push((
        "the same id twice",
        request(vec![dup.clone(), dup]),
        Code::InvalidArgument,
        "messages[1].message_id",
    ));
    let before = fingerprint(&server.db).await;
    for (what, req, code, field) in cases {
        let result = alice.messages().put_messages(req).await;
        let err = result.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{what}: must name {field}: {}",
            err.message()
        );
        assert_eq!(
            fingerprint(&server.db).await,
            before,
            "{what}: nothing written"
        );
    }
    // Exactly at the limits is accepted: that is what shows the cases failed on their field.
    let mut largest = good();
    largest.ciphertext = vec![0; 1024 * 1024 - 10];
    largest.associated_data = Some(vec![0; 10]);
    put(&alice, "alice", "phone", vec![largest])
        .await
        .expect("a message of exactly 1 MiB");
    put(
        &alice,
        "alice",
        "phone",
        (0..500).map(|i| filler(s, Epoch::FIRST, i)).collect(),
    )
    .await
    .expect("a batch of exactly 500");

    // The listings: every field of each.
    let me = reader(&w.alice_phone);
    let long_device = "d".repeat(65);
    let cursor_cases = [
        "x",
        "m1.",
        "m1.zz",
        "sk1.10",
        &format!("m1.{}", "0".repeat(48)),
    ];
    for list in [List::Timeline, List::Session(s), List::Author("alice")] {
        for bad in cursor_cases {
            assert_code(
                page(&alice, &me, list, bad, 10).await,
                Code::InvalidArgument,
                "cursor:",
            );
        }
        for bad_user in ["", "al ice"] {
            assert_code(
                page(&alice, &(bad_user.into(), "phone".into()), list, "", 10).await,
                Code::InvalidArgument,
                "user_id:",
            );
        }
        for bad_device in ["", long_device.as_str()] {
            assert_code(
                page(&alice, &("alice".into(), bad_device.into()), list, "", 10).await,
                Code::InvalidArgument,
                "device_id:",
            );
        }
    }
    for bad in ["", "nope", &v4] {
        let result = alice
            .messages()
            .list_session_messages(pb::ListSessionMessagesRequest {
                user_id: "alice".into(),
                device_id: "phone".into(),
                session_id: bad.to_string(),
                ..Default::default()
            })
            .await;
        assert_code(result, Code::InvalidArgument, "session_id:");
    }
    for bad in ["", "a b", &"a".repeat(129)] {
        assert_code(
            page(&alice, &me, List::Author(bad), "", 10).await,
            Code::InvalidArgument,
            "author_user_id:",
        );
    }
    for bad in ["", "nope", &v4] {
        let result = alice
            .messages()
            .delete_message(pb::DeleteMessageRequest {
                message_id: bad.to_string(),
            })
            .await;
        assert_code(result, Code::InvalidArgument, "message_id:");
    }
    assert_eq!(
        fingerprint(&server.db).await.deleted_messages,
        0,
        "nothing deleted"
    );

    // Page sizes are bounded: 0 means 50, anything over 200 is 200.
    let (default_page, _) = page(&alice, &me, List::Timeline, "", 0)
        .await
        .expect("page");
    assert_eq!(default_page.len(), 50);
    let (largest_page, next) = page(&alice, &me, List::Session(s), "", 100_000)
        .await
        .expect("page");
    assert_eq!(largest_page.len(), 200);
    assert!(!next.is_empty());
}

async fn large_messages_page_by_bytes(server: &TestServer) {
    let w = World::new(server).await;
    let s = w.session("alice", &["carol"]).await;
    let alice = w.alice_phone.client(server).await;
    let big: Vec<pb::NewMessage> = (0..4)
        .map(|i| {
            let mut m = filler(s, Epoch::FIRST, i);
            m.ciphertext = vec![i as u8; 1024 * 1024];
            m
        })
        .collect();
    put(&alice, "alice", "phone", big.clone())
        .await
        .expect("four messages of 1 MiB");
    // A page stops before 3 MiB of message bytes, with a cursor to the rest: every page fits
    // the 4 MiB a gRPC client accepts by default, and paging still reaches every message.
    let carol = w.carol_phone.client(server).await;
    let me = reader(&w.carol_phone);
    let (first, next) = page(&carol, &me, List::Session(s), "", 10)
        .await
        .expect("first page");
    assert_eq!(first.len(), 2);
    assert!(!next.is_empty());
    let (rest, last) = page(&carol, &me, List::Session(s), &next, 10)
        .await
        .expect("second page");
    assert_eq!(rest.len(), 2);
    assert!(last.is_empty());
    let got: BTreeSet<String> = first
        .iter()
        .chain(&rest)
        .map(|m| m.message_id.clone())
        .collect();
    assert_eq!(got, id_set(big.iter().map(|m| &m.message_id)));
    assert_eq!(
        all(server, &w.carol_phone, List::Timeline, 50).await.len(),
        4
    );
}

/// Smaller message limits than the defaults.
fn small_messages() -> Limits {
    Limits {
        max_message_bytes: 64,
        max_message_batch: 3,
        ..Limits::default()
    }
}

/// The limits are settings: a server started with smaller ones enforces those.
async fn configured_limits_apply(server: &TestServer) {
    let w = World::new(server).await;
    let s = w.session("alice", &[]).await;
    let alice = w.alice_phone.client(server).await;
    let mut big = filler(s, Epoch::FIRST, 0);
    big.ciphertext = vec![0; 60];
    big.associated_data = Some(vec![0; 5]);
    assert_code(
        put(&alice, "alice", "phone", vec![big.clone()]).await,
        Code::ResourceExhausted,
        "messages[0].ciphertext",
    );
    big.associated_data = Some(vec![0; 4]);
    put(&alice, "alice", "phone", vec![big])
        .await
        .expect("64 bytes");
    assert_code(
        put(
            &alice,
            "alice",
            "phone",
            (0..4).map(|i| filler(s, Epoch::FIRST, i)).collect(),
        )
        .await,
        Code::ResourceExhausted,
        "messages",
    );
    put(
        &alice,
        "alice",
        "phone",
        (0..3).map(|i| filler(s, Epoch::FIRST, i)).collect(),
    )
    .await
    .expect("3 messages");
}

on_both_servers! {
    access_follows_keys_epoch_by_epoch => access_follows_keys;
    retried_batches_store_once_and_other_bytes_are_already_exists => retries_are_idempotent_and_other_bytes_conflict;
    concurrent_writers_of_one_id_keep_the_first => concurrent_writers_of_one_id_store_one_version;
    pages_never_skip_or_repeat_while_replicas_write => pages_never_skip_or_repeat_while_others_write;
    late_commit_never_lands_below_a_listed_message => a_late_commit_never_lands_below_a_listed_message;
    deleted_messages_and_deleted_sessions_vanish => deleted_messages_and_sessions_vanish;
    authorization_matrix_of_messages => every_messages_call_by_every_caller;
    bad_input_on_every_messages_field => bad_input_on_every_field;
    large_messages_page_by_bytes_under_the_client_limit => large_messages_page_by_bytes;
}

on_both_servers_with! {
    configured_limits_apply => configured_limits_apply(small_messages);
}
