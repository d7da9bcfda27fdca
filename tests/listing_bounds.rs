//! Listing pages are bounded in bytes inside the store, on SQLite and PostgreSQL: a page of
//! many large messages is cut where the next message would pass the byte bound (the longest
//! prefix within it, at least one message), the store returns no more than that, and the next
//! page continues exactly below it, through Timeline, ListSessionMessages and
//! ListAuthorMessages alike. `tests/listing_memory.rs` measures the memory a listing takes.

mod common;

use std::collections::BTreeSet;

use common::requests::service_wrapped_session;
use common::server::TestServer;
use common::world::World;
use keyhold::crypto::ids::{DeviceId, Epoch, MessageId, SessionId, UserId};
use keyhold::proto::keyhold::v1 as pb;
use keyhold::store::messages::{message_bytes, Author, NewMessage, PageLimit, Reader, Writer};
use keyhold::store::messages::{Page, PutOutcome};

/// The byte bound of a page the Messages service sets (3 MiB).
const PAGE_BYTES: usize = 3 * 1024 * 1024;
const MIB: usize = 1024 * 1024;
const NONCE: usize = 12;

/// A well-formed message of `len` ciphertext bytes (never opened).
fn message(session: SessionId, len: usize, fill: u8) -> pb::NewMessage {
    pb::NewMessage {
        message_id: MessageId::generate().to_string(),
        session_id: session.to_string(),
        epoch: Epoch::FIRST.get(),
        nonce: vec![7; NONCE],
        ciphertext: vec![fill; len],
        associated_data: None,
    }
}

fn wire_bytes(m: &pb::EncryptedMessage) -> usize {
    m.nonce.len() + m.ciphertext.len() + m.associated_data.as_ref().map_or(0, Vec::len)
}

#[derive(Clone, Copy, Debug)]
enum List {
    Timeline,
    Session(SessionId),
    Author,
}

/// Every page of a listing, as carol's phone reads it, from the top to the end.
async fn pages(server: &TestServer, w: &World, list: List) -> Vec<Vec<pb::EncryptedMessage>> {
    let client = w.carol_phone.client(server).await;
    let mut messages = client.messages();
    let (user_id, device_id) = ("carol".to_string(), "phone".to_string());
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (page, next) = match list {
            List::Timeline => {
                let r = messages
                    .timeline(pb::TimelineRequest {
                        user_id: user_id.clone(),
                        device_id: device_id.clone(),
                        cursor: cursor.clone(),
                        page_size: 200,
                    })
                    .await
                    .expect("timeline")
                    .into_inner();
                (r.messages, r.next_cursor)
            }
            List::Session(s) => {
                let r = messages
                    .list_session_messages(pb::ListSessionMessagesRequest {
                        user_id: user_id.clone(),
                        device_id: device_id.clone(),
                        session_id: s.to_string(),
                        cursor: cursor.clone(),
                        page_size: 200,
                    })
                    .await
                    .expect("session messages")
                    .into_inner();
                (r.messages, r.next_cursor)
            }
            List::Author => {
                let r = messages
                    .list_author_messages(pb::ListAuthorMessagesRequest {
                        user_id: user_id.clone(),
                        device_id: device_id.clone(),
                        author_user_id: "alice".into(),
                        cursor: cursor.clone(),
                        page_size: 200,
                    })
                    .await
                    .expect("author messages")
                    .into_inner();
                (r.messages, r.next_cursor)
            }
        };
        out.push(page);
        if next.is_empty() {
            return out;
        }
        cursor = next;
    }
}

/// Messages of 1 MiB and of a few bytes, mixed: each listing pages through them in pages that
/// are the longest newest-first prefix within 3 MiB (so a page ends exactly where the next
/// message would pass it), and the pages together hold every message once, in order.
async fn pages_of_large_messages_are_cut_at_the_byte_bound(server: &TestServer) {
    let w = World::new(server).await;
    let s = service_wrapped_session(&w.app, "alice", &["carol"]).await;
    let alice = w.alice_phone.client(server).await;
    // Oldest first: L s L L s s L L L s L (L: 1 MiB, s: 100 bytes), one call each so that
    // their server times order them.
    let sizes = [MIB, 100, MIB, MIB, 100, 100, MIB, MIB, MIB, 100, MIB];
    let mut stored = Vec::new();
    for (i, len) in sizes.into_iter().enumerate() {
        let m = message(s, len, i as u8);
        alice
            .messages()
            .put_messages(pb::PutMessagesRequest {
                author_user_id: "alice".into(),
                author_device_id: "phone".into(),
                messages: vec![m.clone()],
            })
            .await
            .expect("put");
        stored.push(m.message_id);
    }
    let newest_first: Vec<String> = stored.iter().rev().cloned().collect();
    for list in [List::Timeline, List::Session(s), List::Author] {
        let pages = pages(server, &w, list).await;
        let listed: Vec<String> = pages
            .iter()
            .flatten()
            .map(|m| m.message_id.clone())
            .collect();
        assert_eq!(
            listed, newest_first,
            "{list:?}: every message once, in order"
        );
        assert!(pages.len() > 1, "{list:?}: 6 MiB must take several pages");
        for (i, page) in pages.iter().enumerate() {
            let bytes: usize = page.iter().map(wire_bytes).sum();
            assert!(!page.is_empty(), "{list:?}: page {i} is empty");
            assert!(
                bytes <= PAGE_BYTES || page.len() == 1,
                "{list:?}: page {i} holds {bytes} bytes"
            );
            if let Some(next) = pages.get(i + 1).and_then(|p| p.first()) {
                assert!(
                    bytes + wire_bytes(next) > PAGE_BYTES,
                    "{list:?}: page {i} ({bytes} bytes) stopped before a message that fit"
                );
            }
        }
        // 1 MiB + 12 bytes each: two large ones fit in 3 MiB, three do not.
        let large_per_page: Vec<usize> = pages
            .iter()
            .map(|p| p.iter().filter(|m| m.ciphertext.len() == MIB).count())
            .collect();
        assert!(
            large_per_page.iter().all(|&n| n <= 2),
            "{list:?}: {large_per_page:?}"
        );
    }
}

/// Stores `lens.len()` messages by alice into `s`, one batch, through the store.
async fn store_messages(server: &TestServer, s: SessionId, lens: &[usize]) -> Vec<MessageId> {
    let batch: Vec<NewMessage> = lens
        .iter()
        .map(|&len| NewMessage {
            message_id: MessageId::generate(),
            session_id: s,
            epoch: Epoch::FIRST,
            nonce: vec![1; NONCE],
            ciphertext: vec![2; len],
            associated_data: Some(vec![3; 10]),
        })
        .collect();
    let ids = batch.iter().map(|m| m.message_id).collect();
    let author = Author {
        user: UserId::new("alice").expect("user"),
        device: None,
    };
    let outcome = server
        .store
        .put_messages(Writer::AppServer, author, batch)
        .await
        .expect("put");
    assert!(matches!(outcome, PutOutcome::Stored(_)), "{outcome:?}");
    ids
}

/// The store itself returns no more than a page's byte bound (plus nothing: the bound is
/// counted in the statement, not after loading), for every listing, and says whether the page
/// was full; following the last position reaches every message exactly once.
async fn the_store_returns_no_more_than_the_byte_bound(server: &TestServer) {
    let w = World::new(server).await;
    let s = service_wrapped_session(&w.app, "alice", &["carol"]).await;
    // 30 messages of 3,000 bytes (plus 22 of nonce and associated data); a bound of 10,000
    // bytes holds three of them.
    let ids = store_messages(server, s, &[3_000; 30]).await;
    let reader = Reader {
        user: UserId::new("carol").expect("user"),
        device: DeviceId::new("phone").expect("device"),
    };
    let author = UserId::new("alice").expect("user");
    let limit = PageLimit {
        rows: 200,
        bytes: 10_000,
    };
    for list in ["timeline", "session", "author"] {
        let mut listed = Vec::new();
        let mut before = None;
        loop {
            let mut conn = server.store.conn().await.expect("connection");
            let page: Page = match list {
                "timeline" => conn.readable_messages(&reader, None, before, limit).await,
                "session" => {
                    conn.readable_messages(&reader, Some(s), before, limit)
                        .await
                }
                _ => conn.author_messages(&reader, &author, before, limit).await,
            }
            .expect("list");
            let bytes: usize = page.messages.iter().map(message_bytes).sum();
            assert!(
                bytes <= limit.bytes,
                "{list}: the store returned {bytes} bytes"
            );
            if !page.full {
                // The last three: the page was cut by neither bound, so it says the end.
                assert_eq!(page.messages.len(), 3, "{list}: the last page");
                listed.extend(page.messages.iter().map(|m| m.message_id));
                break;
            }
            assert_eq!(
                page.messages.len(),
                3,
                "{list}: the longest prefix that fits"
            );
            before = page.messages.last().map(|m| m.position());
            listed.extend(page.messages.iter().map(|m| m.message_id));
        }
        // One batch shares one server time, so its ids order it.
        let mut newest_first = ids.clone();
        newest_first.sort_unstable_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
        assert_eq!(listed, newest_first, "{list}: every message once, in order");
    }

    // One message larger than the bound is a page of its own, and paging moves past it.
    let big = store_messages(server, s, &[20_000]).await;
    let mut conn = server.store.conn().await.expect("connection");
    let page = conn
        .readable_messages(&reader, Some(s), None, limit)
        .await
        .expect("list");
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].message_id, big[0]);
    assert!(page.full, "cut by bytes: more may follow");
    let next = conn
        .readable_messages(&reader, Some(s), Some(page.messages[0].position()), limit)
        .await
        .expect("list");
    let newest_of_the_rest = ids.iter().max_by_key(|id| *id.as_bytes()).copied();
    assert_eq!(
        next.messages.first().map(|m| m.message_id),
        newest_of_the_rest
    );
    // The row bound still applies, and a page that stops at it is full too.
    let rows = PageLimit {
        rows: 2,
        bytes: usize::MAX,
    };
    let page = conn
        .readable_messages(&reader, None, None, rows)
        .await
        .expect("list");
    assert_eq!(page.messages.len(), 2);
    assert!(page.full);
    let seen: BTreeSet<MessageId> = page.messages.iter().map(|m| m.message_id).collect();
    assert!(seen.contains(&big[0]));
}

on_both_servers! {
    pages_of_large_messages_are_cut_at_the_byte_bound_and_continue_exactly => pages_of_large_messages_are_cut_at_the_byte_bound;
    the_store_returns_no_more_than_a_pages_byte_bound => the_store_returns_no_more_than_the_byte_bound;
}
