//! The memory a listing takes is bounded by its page's byte bound, not by its row count: with
//! 128 messages of 256 KiB readable (32 MiB), a 200-row page with a 1 MiB byte bound allocates
//! a few MiB at most while the store reads it, on SQLite and on PostgreSQL. Before the bound
//! was applied in the store, every row of the page was loaded (32 MiB here) and cut afterwards.
//!
//! Measured with a counting global allocator, so this binary holds this one test: anything
//! else running in the process at the same time would count too.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::requests::service_wrapped_session;
use common::server::TestServer;
use common::world::World;
use keyhold::crypto::ids::{DeviceId, Epoch, MessageId, SessionId, UserId};
use keyhold::store::messages::{message_bytes, Author, NewMessage, PageLimit, Reader, Writer};

/// Counts the bytes allocated now and the most allocated since the last reset.
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = ALLOCATED.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is passed to the system allocator unchanged; the counters are atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is the system allocator's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                grew(new_size - layout.size());
            } else {
                ALLOCATED.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

const KIB: usize = 1024;
const MESSAGE: usize = 256 * KIB;
const MESSAGES: usize = 128;
const PAGE_BYTES: usize = 1024 * KIB;
/// What a page may cost beyond its bytes: the driver's buffers, the rows' copies, vectors
/// growing. A fifth of what the unbounded read loaded.
const ALLOWED_PEAK: usize = 6 * 1024 * KIB;

async fn fill(server: &TestServer, s: SessionId) {
    let author = Author {
        user: UserId::new("alice").expect("user"),
        device: None,
    };
    for _ in 0..MESSAGES / 8 {
        let batch: Vec<NewMessage> = (0..8)
            .map(|i| NewMessage {
                message_id: MessageId::generate(),
                session_id: s,
                epoch: Epoch::FIRST,
                nonce: vec![1; 12],
                ciphertext: vec![i; MESSAGE],
                associated_data: None,
            })
            .collect();
        server
            .store
            .put_messages(Writer::AppServer, author.clone(), batch)
            .await
            .expect("put");
    }
}

/// The most bytes allocated above the level at the start while `listing` ran, and its result.
async fn peak_during<T>(listing: impl std::future::Future<Output = T>) -> (usize, T) {
    let start = ALLOCATED.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    let out = listing.await;
    (PEAK.load(Ordering::Relaxed).saturating_sub(start), out)
}

async fn a_page_allocates_about_its_byte_bound(server: &TestServer) {
    let w = World::new(server).await;
    let s = service_wrapped_session(&w.app, "alice", &["carol"]).await;
    fill(server, s).await;
    let reader = Reader {
        user: UserId::new("carol").expect("user"),
        device: DeviceId::new("phone").expect("device"),
    };
    let author = UserId::new("alice").expect("user");
    let limit = PageLimit {
        rows: 200,
        bytes: PAGE_BYTES,
    };
    for list in ["timeline", "session", "author"] {
        // Warm the connection (prepared statements, buffers) outside the measurement.
        let mut conn = server.store.conn().await.expect("connection");
        let _ = conn.readable_messages(&reader, None, None, limit).await;
        let (peak, page) = peak_during(async {
            match list {
                "timeline" => conn.readable_messages(&reader, None, None, limit).await,
                "session" => conn.readable_messages(&reader, Some(s), None, limit).await,
                _ => conn.author_messages(&reader, &author, None, limit).await,
            }
        })
        .await;
        let page = page.expect("list");
        let bytes: usize = page.messages.iter().map(message_bytes).sum();
        assert_eq!(
            page.messages.len(),
            3,
            "{list}: three of 256 KiB fit in 1 MiB"
        );
        assert!(page.full);
        eprintln!(
            "{:?} {list}: page of {bytes} bytes, peak allocation {peak} bytes ({} MiB readable)",
            server.kind(),
            MESSAGE * MESSAGES / (1024 * KIB)
        );
        assert!(
            peak <= ALLOWED_PEAK,
            "{list}: {peak} bytes allocated for a page of {bytes} bytes"
        );
    }
}

/// Both backends, one after the other (see the module docs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_allocates_about_its_byte_bound_not_its_rows() {
    let server = TestServer::start(common::sqlite_db()).await;
    a_page_allocates_about_its_byte_bound(&server).await;
    server.stop().await;
    if let Some(db) = common::postgres_db().await {
        let server = TestServer::start(db).await;
        a_page_allocates_about_its_byte_bound(&server).await;
        server.stop().await;
    }
}
