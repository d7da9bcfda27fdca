//! Prekeys over gRPC, on SQLite and PostgreSQL: upload checks, claims handed out exactly once
//! under heavy concurrency (and across three replicas on one PostgreSQL), the last-resort
//! fallback, the per-claimer rate limit across replicas, the low-stock stream, who may make
//! each call, and (issue 16) the refusal of prekeys whose X25519 part is a low-order point.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::callers::{check_every_caller, Callers, DENIED, NOAUTH, OK, WHO};
use common::low_order::{self, with_x25519_part, LOW_ORDER_X25519};
use common::requests::{
    assert_code, revoke_current_key, signed_prekey, signed_prekeys, upload_request,
};
use common::server::{TestDevice, TestServer};
use keyhold::client::Client;
use keyhold::config::{Limits, TransportLimits};
use keyhold::crypto::ids::KeyId;
use keyhold::crypto::sign::{IdentityPublicKey, Prekey, PrekeyKind, Signature};
use keyhold::crypto::xwing::{DecapsulationKey, EncapsulationKey};
use keyhold::crypto::Suite;
use keyhold::proto::keyhold::v1 as pb;
use tokio_stream::StreamExt as _;
use tonic::Code;

/// Uploads `n` one-time prekeys and a last-resort prekey as `d`; returns their key ids.
async fn stock_up(server: &TestServer, d: &TestDevice, n: usize) -> (Vec<KeyId>, KeyId) {
    let (one_time, ids) = signed_prekeys(d, n);
    let (last_resort, lr_id) = signed_prekey(d, PrekeyKind::LastResort);
    let stock = d
        .client(server)
        .await
        .key_directory()
        .upload_prekeys(upload_request(d, one_time, Some(last_resort)))
        .await
        .expect("upload prekeys")
        .into_inner()
        .stock
        .expect("stock");
    assert_eq!(stock.one_time_remaining as usize, n);
    assert!(stock.has_last_resort);
    (ids, lr_id)
}

/// The device's stock, counted by itself.
async fn stock_of(server: &TestServer, d: &TestDevice) -> pb::PrekeyStock {
    d.client(server)
        .await
        .key_directory()
        .count_prekeys(pb::CountPrekeysRequest {
            user_id: d.user.to_string(),
            device_id: d.device.to_string(),
        })
        .await
        .expect("count prekeys")
        .into_inner()
        .stock
        .expect("stock")
}

fn claim_of(d: &TestDevice) -> pb::ClaimPrekeysRequest {
    pb::ClaimPrekeysRequest {
        devices: vec![pb::DeviceRef {
            user_id: d.user.to_string(),
            device_id: d.device.to_string(),
        }],
        user_ids: Vec::new(),
        idempotency_key: String::new(),
    }
}

/// Claims one prekey of `target` through `client`.
async fn claim_one(
    client: &Client,
    target: &TestDevice,
) -> Result<pb::ClaimedPrekey, tonic::Status> {
    let mut resp = client
        .key_directory()
        .claim_prekeys(claim_of(target))
        .await?
        .into_inner();
    assert_eq!(resp.prekeys.len(), 1, "{resp:?}");
    Ok(resp.prekeys.remove(0))
}

/// Checks a claimed prekey the way a claimer must: its identity key is the device's, and the
/// signature verifies over the canonical encoding with the kind it is flagged with.
fn verify_claimed(p: &pb::ClaimedPrekey, owner: &TestDevice) {
    assert_eq!(
        p.identity_key,
        owner.identity.public_key().as_bytes().to_vec()
    );
    let kind = match pb::PrekeyKind::try_from(p.kind).expect("kind") {
        pb::PrekeyKind::OneTime => PrekeyKind::OneTime,
        pb::PrekeyKind::LastResort => PrekeyKind::LastResort,
        pb::PrekeyKind::Unspecified => panic!("unspecified kind"),
    };
    let key = EncapsulationKey::from_slice(&p.encapsulation_key).expect("prekey parses");
    assert_eq!(key.key_id().as_bytes().to_vec(), p.key_id);
    let prekey = Prekey {
        suite: Suite::XWingAes256GcmV1,
        user: owner.user.clone(),
        device: owner.device.clone(),
        kind,
        key,
    };
    IdentityPublicKey::from_slice(&p.identity_key)
        .expect("identity key")
        .verify(
            &prekey,
            &Signature::from_slice(&p.signature).expect("signature"),
        )
        .expect("claimed prekey verifies");
}

fn generous() -> Limits {
    Limits {
        prekey_claim_limit: 100_000,
        // A thousand claims at once are the point here, not load shedding (tests/limits.rs).
        transport: TransportLimits {
            max_concurrent_calls: None,
            ..TransportLimits::DEFAULT
        },
        ..Limits::default()
    }
}

/// Device tokens for `n` claimers (no key bundle needed to claim).
async fn claimers(server: &TestServer, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(
            server
                .token(pb::Role::Device, &format!("claimer{i}"), "phone")
                .await,
        );
    }
    out
}

/// How often one claim of [`claim_concurrently`] is tried while it answers UNAVAILABLE or is
/// shed.
const UNAVAILABLE_RETRIES: usize = 20;

/// Whether a claim's refusal says it did nothing and may be retried as it is.
fn retryable(status: &tonic::Status) -> bool {
    keyhold::client::is_retryable(status)
}

/// Fires `claims` concurrent claims of `target`, spread over `endpoints` and `tokens`, and
/// checks that exactly `one_time.len()` of them got distinct one-time prekeys (each one of
/// those uploaded) and the rest the last-resort prekey.
async fn claim_concurrently(
    endpoints: &[String],
    tokens: &[String],
    target: &TestDevice,
    claims: usize,
    one_time: &[KeyId],
    last_resort: KeyId,
) {
    let mut clients = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        clients.push(
            Client::connect(&endpoints[i % endpoints.len()], token)
                .await
                .expect("connect"),
        );
    }
    let target_ref = claim_of(target);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..claims {
        let mut directory = clients[i % clients.len()].key_directory();
        let request = target_ref.clone();
        tasks.spawn(async move {
            // UNAVAILABLE (a claim that waited past the lock or pool timeout on a loaded
            // machine: a thousand claims queue on one device's rows and each claimer's rate
            // window row) and a shed call (past the server's concurrency limit) wrote nothing
            // and are retried with backoff, as a client does; any other error fails.
            let mut backoff = Duration::from_millis(100);
            for _ in 0..UNAVAILABLE_RETRIES {
                match directory.claim_prekeys(request.clone()).await {
                    Err(status) if retryable(&status) => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    answer => return answer.expect("claim").into_inner(),
                }
            }
            panic!("a claim stayed UNAVAILABLE or shed {UNAVAILABLE_RETRIES} times");
        });
    }
    let mut handed_out = Vec::new();
    let mut last_resort_answers = 0;
    while let Some(resp) = tasks.join_next().await {
        let resp = resp.expect("claim task");
        assert_eq!(resp.prekeys.len(), 1, "{resp:?}");
        let p = &resp.prekeys[0];
        let key_id = KeyId::from_slice(&p.key_id).expect("key id");
        match pb::PrekeyKind::try_from(p.kind).expect("kind") {
            pb::PrekeyKind::OneTime => handed_out.push(key_id),
            pb::PrekeyKind::LastResort => {
                assert_eq!(key_id, last_resort);
                last_resort_answers += 1;
            }
            pb::PrekeyKind::Unspecified => panic!("unspecified kind"),
        }
    }
    let distinct: HashSet<KeyId> = handed_out.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        handed_out.len(),
        "a prekey was handed out twice"
    );
    assert_eq!(distinct, one_time.iter().copied().collect::<HashSet<_>>());
    assert_eq!(last_resort_answers, claims - one_time.len());
}

async fn thousand_claims_on_five_hundred_prekeys(server: &TestServer) {
    let target = TestDevice::enroll(server, "alice", "phone").await;
    let (one_time, last_resort) = stock_up(server, &target, 500).await;
    let tokens = claimers(server, 20).await;
    claim_concurrently(
        std::slice::from_ref(&server.endpoint),
        &tokens,
        &target,
        1000,
        &one_time,
        last_resort,
    )
    .await;
    let stock = stock_of(server, &target).await;
    assert_eq!(stock.one_time_remaining, 0);
    assert!(stock.has_last_resort, "the last-resort prekey is kept");
}

/// Three Keyhold servers, each with its own store and connection pool, over one PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_on_one_postgres_hand_out_each_prekey_once() {
    let Some(db) = common::postgres_db().await else {
        return;
    };
    let server = TestServer::start_with_limits(db, generous()).await;
    let second = server.replica(generous()).await;
    let third = server.replica(generous()).await;
    let target = TestDevice::enroll(&server, "alice", "phone").await;
    let (one_time, last_resort) = stock_up(&server, &target, 500).await;
    let tokens = claimers(&server, 30).await;
    let endpoints = [
        server.endpoint.clone(),
        second.endpoint.clone(),
        third.endpoint.clone(),
    ];
    claim_concurrently(&endpoints, &tokens, &target, 1000, &one_time, last_resort).await;
    assert_eq!(stock_of(&server, &target).await.one_time_remaining, 0);
    second.stop().await;
    third.stop().await;
    server.stop().await;
}

async fn claims_fall_back_to_last_resort_and_follow_identity(server: &TestServer) {
    let alice_phone = TestDevice::enroll(server, "alice", "phone").await;
    let alice_laptop = TestDevice::enroll(server, "alice", "laptop").await;
    let alice_tablet = TestDevice::enroll(server, "alice", "tablet").await;
    let bob = TestDevice::enroll(server, "bob", "phone").await;
    let bob_client = bob.client(server).await;
    let (phone_ids, phone_lr) = stock_up(server, &alice_phone, 2).await;
    let (laptop_ids, _) = stock_up(server, &alice_laptop, 1).await;

    // Oldest first, verified the way a claimer must.
    let first = claim_one(&bob_client, &alice_phone).await.expect("claim");
    verify_claimed(&first, &alice_phone);
    assert_eq!(first.key_id, phone_ids[0].as_bytes().to_vec());
    assert_eq!(first.kind, pb::PrekeyKind::OneTime as i32);

    // "Every device of alice": one prekey each; the tablet has none and is listed as such.
    let all = bob_client
        .key_directory()
        .claim_prekeys(pb::ClaimPrekeysRequest {
            devices: Vec::new(),
            user_ids: vec!["alice".into()],
            idempotency_key: String::new(),
        })
        .await
        .expect("claim by user")
        .into_inner();
    let got: Vec<(String, Vec<u8>)> = all
        .prekeys
        .iter()
        .map(|p| (p.device_id.clone(), p.key_id.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("laptop".to_string(), laptop_ids[0].as_bytes().to_vec()),
            ("phone".to_string(), phone_ids[1].as_bytes().to_vec()),
        ]
    );
    assert_eq!(
        all.unavailable,
        vec![pb::DeviceRef {
            user_id: "alice".into(),
            device_id: "tablet".into()
        }]
    );
    let _ = alice_tablet;

    // No one-time prekey left: the last-resort one, flagged, again and again.
    for _ in 0..2 {
        let p = claim_one(&bob_client, &alice_phone).await.expect("claim");
        assert_eq!(p.kind, pb::PrekeyKind::LastResort as i32);
        assert_eq!(p.key_id, phone_lr.as_bytes().to_vec());
        verify_claimed(&p, &alice_phone);
    }
    // A new last-resort prekey replaces the old one.
    let (new_lr, new_lr_id) = signed_prekey(&alice_phone, PrekeyKind::LastResort);
    alice_phone
        .client(server)
        .await
        .key_directory()
        .upload_prekeys(upload_request(&alice_phone, Vec::new(), Some(new_lr)))
        .await
        .expect("replace last resort");
    let p = claim_one(&bob_client, &alice_phone).await.expect("claim");
    assert_eq!(p.key_id, new_lr_id.as_bytes().to_vec());

    // The calling device never claims its own prekeys; "all of my user" leaves it out.
    let own = alice_laptop
        .client(server)
        .await
        .key_directory()
        .claim_prekeys(claim_of(&alice_laptop))
        .await
        .expect_err("own prekeys");
    assert_eq!(own.code(), Code::InvalidArgument);
    assert!(own.message().contains("devices[0]"), "{}", own.message());
    let siblings = alice_laptop
        .client(server)
        .await
        .key_directory()
        .claim_prekeys(pb::ClaimPrekeysRequest {
            devices: Vec::new(),
            user_ids: vec!["alice".into()],
            idempotency_key: String::new(),
        })
        .await
        .expect("claim siblings")
        .into_inner();
    assert!(siblings.prekeys.iter().all(|p| p.device_id != "laptop"));
    assert_eq!(siblings.prekeys.len(), 1, "{siblings:?}");

    // A new identity key strands the prekeys signed by the old one: none is handed out.
    let (fresh, _) = stock_up(server, &alice_phone, 3).await;
    assert_eq!(fresh.len(), 3);
    let rekeyed = TestDevice::new("alice", "phone", alice_phone.token.clone());
    rekeyed.publish(server).await;
    let after = bob_client
        .key_directory()
        .claim_prekeys(claim_of(&rekeyed))
        .await
        .expect("claim after re-key")
        .into_inner();
    assert!(after.prekeys.is_empty(), "{after:?}");
    assert_eq!(after.unavailable.len(), 1);
    let stock = stock_of(server, &rekeyed).await;
    assert_eq!(
        (stock.one_time_remaining, stock.has_last_resort),
        (0, false)
    );

    // A revoked device is not claimed from: NOT_FOUND when named, passed over by user.
    stock_up(server, &rekeyed, 1).await;
    revoke_current_key(server, &rekeyed).await;
    let err = claim_one(&bob_client, &rekeyed).await.expect_err("revoked");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("devices[0]"), "{}", err.message());
    let by_user = bob_client
        .key_directory()
        .claim_prekeys(pb::ClaimPrekeysRequest {
            devices: Vec::new(),
            user_ids: vec!["alice".into()],
            idempotency_key: String::new(),
        })
        .await
        .expect("claim by user")
        .into_inner();
    assert!(by_user.prekeys.iter().all(|p| p.device_id != "phone"));
}

async fn uploads_are_checked_and_refusals_write_nothing(server: &TestServer) {
    let d = TestDevice::enroll(server, "alice", "phone").await;
    let mallory = TestDevice::enroll(server, "mallory", "phone").await;
    let mut directory = d.client(server).await.key_directory();
    let max = Limits::default().max_unused_prekeys;

    // Each refused upload names its field, and stores nothing: not even the valid prekeys
    // beside the bad one.
    let (mut one_bad_signature, _) = signed_prekeys(&d, 5);
    one_bad_signature[3].signature[0] ^= 1;
    let (as_last_resort, _) = signed_prekey(&d, PrekeyKind::LastResort);
    let (foreign, _) = signed_prekey(&mallory, PrekeyKind::OneTime);
    let (mut short, _) = signed_prekey(&d, PrekeyKind::OneTime);
    short.encapsulation_key.truncate(100);
    let (mut unsuited, _) = signed_prekey(&d, PrekeyKind::OneTime);
    unsuited.suite = 0;
    let (twice, _) = signed_prekey(&d, PrekeyKind::OneTime);
    let (good, _) = signed_prekeys(&d, 2);
    let (mut bad_lr, _) = signed_prekey(&d, PrekeyKind::LastResort);
    bad_lr.signature[63] ^= 0x80;
    let refused = [
        // One bad signature among good ones.
        (one_bad_signature, None, "one_time_prekeys[3].signature"),
        // Signed as last-resort, uploaded as one-time: the kind is bound.
        (vec![as_last_resort], None, "one_time_prekeys[0].signature"),
        // Signed by another device's identity key.
        (vec![foreign], None, "one_time_prekeys[0].signature"),
        // Not a key; a missing suite; the same key twice; nothing at all.
        (vec![short], None, "one_time_prekeys[0].encapsulation_key"),
        (vec![unsuited], None, "one_time_prekeys[0].suite"),
        (vec![twice.clone(), twice], None, "one_time_prekeys[1]"),
        (Vec::new(), None, "one_time_prekeys"),
        // A bad last-resort prekey sinks the one-time prekeys uploaded with it.
        (good, Some(bad_lr), "last_resort_prekey.signature"),
    ];
    for (one_time, last_resort, field) in refused {
        assert_code(
            directory
                .upload_prekeys(upload_request(&d, one_time, last_resort))
                .await,
            Code::InvalidArgument,
            field,
        );
    }
    let stock = stock_of(server, &d).await;
    assert_eq!(
        (stock.one_time_remaining, stock.has_last_resort),
        (0, false)
    );

    // Over the bound: in one call, or by adding to what the device holds.
    let (too_many, _) = signed_prekeys(&d, max + 1);
    assert_code(
        directory
            .upload_prekeys(upload_request(&d, too_many, None))
            .await,
        Code::ResourceExhausted,
        "one_time_prekeys",
    );
    let (most, _) = signed_prekeys(&d, max - 2);
    directory
        .upload_prekeys(upload_request(&d, most, None))
        .await
        .expect("up to the bound");
    let (three, _) = signed_prekeys(&d, 3);
    assert_code(
        directory
            .upload_prekeys(upload_request(&d, three, None))
            .await,
        Code::ResourceExhausted,
        "one_time_prekeys",
    );
    assert_eq!(
        stock_of(server, &d).await.one_time_remaining as usize,
        max - 2
    );
    let (two, two_ids) = signed_prekeys(&d, 2);
    directory
        .upload_prekeys(upload_request(&d, two.clone(), None))
        .await
        .expect("exactly to the bound");
    assert_eq!(stock_of(server, &d).await.one_time_remaining as usize, max);
    assert_eq!(stock_of(server, &d).await.max_one_time as usize, max);

    // A prekey already stored: ALREADY_EXISTS, and the new key beside it is not stored.
    let mallory_client = mallory.client(server).await;
    let mut claimed = Vec::new();
    for _ in 0..2 {
        claimed.push(claim_one(&mallory_client, &d).await.expect("claim").key_id);
    }
    assert_eq!(
        stock_of(server, &d).await.one_time_remaining as usize,
        max - 2
    );
    // Claims take the oldest first, so the first of `two` is still stored.
    assert!(!claimed.contains(&two_ids[0].as_bytes().to_vec()));
    let (fresh, _) = signed_prekey(&d, PrekeyKind::OneTime);
    assert_code(
        directory
            .upload_prekeys(upload_request(&d, vec![fresh, two[0].clone()], None))
            .await,
        Code::AlreadyExists,
        "",
    );
    assert_eq!(
        stock_of(server, &d).await.one_time_remaining as usize,
        max - 2
    );

    // A device without a key bundle has no identity key to check signatures with.
    let bare = TestDevice::new(
        "carol",
        "phone",
        server.token(pb::Role::Device, "carol", "phone").await,
    );
    let (p, _) = signed_prekey(&bare, PrekeyKind::OneTime);
    let err = bare
        .client(server)
        .await
        .key_directory()
        .upload_prekeys(upload_request(&bare, vec![p], None))
        .await
        .expect_err("no key bundle");
    assert_eq!(err.code(), Code::FailedPrecondition);
}

/// Issue 16: a prekey whose X25519 part is a low-order point is INVALID_ARGUMENT naming its
/// field, wherever it stands in the upload, and sinks the whole upload. The prekeys are signed
/// properly (`tests/common/low_order.rs`), and the same path with a valid key is stored, so
/// the refusal is the key check.
async fn low_order_prekeys_are_refused_and_nothing_is_stored(server: &TestServer) {
    let d = TestDevice::enroll(server, "alice", "phone").await;
    let mut directory = d.client(server).await.key_directory();
    for (name, u) in LOW_ORDER_X25519 {
        let fresh = DecapsulationKey::generate().expect("keygen");
        let key = with_x25519_part(fresh.encapsulation_key(), u);
        let one_time = low_order::signed_prekey(&d, PrekeyKind::OneTime, &key);
        let last_resort = low_order::signed_prekey(&d, PrekeyKind::LastResort, &key);
        let (good, _) = signed_prekeys(&d, 2);
        let (good_lr, _) = signed_prekey(&d, PrekeyKind::LastResort);
        let uploads = [
            (
                upload_request(&d, vec![one_time.clone()], None),
                "one_time_prekeys[0].encapsulation_key",
            ),
            (
                upload_request(&d, [good.clone(), vec![one_time]].concat(), Some(good_lr)),
                "one_time_prekeys[2].encapsulation_key",
            ),
            (
                upload_request(&d, good, Some(last_resort)),
                "last_resort_prekey.encapsulation_key",
            ),
        ];
        for (request, field) in uploads {
            low_order::assert_refused(directory.upload_prekeys(request).await, name, field);
        }
    }
    let stock = stock_of(server, &d).await;
    assert_eq!(
        (stock.one_time_remaining, stock.has_last_resort),
        (0, false),
        "nothing stored"
    );

    // The same signing path with valid keys is stored.
    let valid = |kind| {
        let key = DecapsulationKey::generate().expect("keygen");
        low_order::signed_prekey(&d, kind, &key.encapsulation_key().to_bytes())
    };
    let stock = directory
        .upload_prekeys(upload_request(
            &d,
            vec![valid(PrekeyKind::OneTime)],
            Some(valid(PrekeyKind::LastResort)),
        ))
        .await
        .expect("valid prekeys are stored")
        .into_inner()
        .stock
        .expect("stock");
    assert_eq!((stock.one_time_remaining, stock.has_last_resort), (1, true));
    assert_eq!(stock_of(server, &d).await, stock);
}

fn three_per_hour() -> Limits {
    Limits {
        prekey_claim_limit: 3,
        prekey_claim_window: Duration::from_secs(3600),
        ..Limits::default()
    }
}

/// The limit holds per (claimer, target device), and across replicas: the counter is in the
/// database, so claims through two servers add up.
async fn claims_are_rate_limited_per_claimer_and_device(server: &TestServer) {
    let replica = server.replica(three_per_hour()).await;
    let target = TestDevice::enroll(server, "alice", "phone").await;
    let other_target = TestDevice::enroll(server, "alice", "laptop").await;
    stock_up(server, &target, 10).await;
    stock_up(server, &other_target, 10).await;
    let bob = TestDevice::enroll(server, "bob", "phone").await;
    let carol = TestDevice::enroll(server, "carol", "phone").await;
    let bob_here = bob.client(server).await;
    let bob_there = replica.client(&bob.token).await;

    claim_one(&bob_here, &target).await.expect("first");
    claim_one(&bob_there, &target)
        .await
        .expect("second, on the replica");
    claim_one(&bob_here, &target).await.expect("third");
    for client in [&bob_there, &bob_here] {
        let err = claim_one(client, &target)
            .await
            .expect_err("over the limit");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("alice/phone"), "{}", err.message());
    }
    assert_eq!(stock_of(server, &target).await.one_time_remaining, 7);

    // Another claimer, or another target, has its own count.
    claim_one(&carol.client(server).await, &target)
        .await
        .expect("another claimer");
    claim_one(&bob_here, &other_target)
        .await
        .expect("another target");
    // A call naming a device over the limit claims nothing, not even from the others.
    let err = bob_here
        .key_directory()
        .claim_prekeys(pb::ClaimPrekeysRequest {
            devices: vec![
                pb::DeviceRef {
                    user_id: "alice".into(),
                    device_id: "laptop".into(),
                },
                pb::DeviceRef {
                    user_id: "alice".into(),
                    device_id: "phone".into(),
                },
            ],
            user_ids: Vec::new(),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("one target over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(stock_of(server, &other_target).await.one_time_remaining, 9);
    assert_eq!(stock_of(server, &target).await.one_time_remaining, 6);
    replica.stop().await;
}

/// Receives the next stock message within a generous time, or fails.
async fn next_stock(
    stream: &mut tonic::Streaming<pb::WatchPrekeyStockResponse>,
) -> (u32, bool, bool) {
    let m = tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .expect("a stock message in time")
        .expect("stream open")
        .expect("no error");
    let stock = m.stock.expect("stock");
    (stock.one_time_remaining, stock.has_last_resort, m.low)
}

/// The device learns that its stock ran low without polling, also when the claims go through
/// another server.
async fn low_stock_is_pushed_to_the_device(server: &TestServer) {
    let replica = server.replica(generous()).await;
    let d = TestDevice::enroll(server, "alice", "phone").await;
    stock_up(server, &d, 5).await;
    let bob = TestDevice::enroll(server, "bob", "phone").await;
    let bob_here = bob.client(server).await;
    let bob_there = replica.client(&bob.token).await;
    let mut stream = d
        .client(server)
        .await
        .key_directory()
        .watch_prekey_stock(pb::WatchPrekeyStockRequest {
            user_id: "alice".into(),
            device_id: "phone".into(),
            low_water: 3,
        })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(next_stock(&mut stream).await, (5, true, false));
    // 4 and 3 are not low: nothing is sent. 2 is: the next message says so.
    for _ in 0..3 {
        claim_one(&bob_here, &d).await.expect("claim");
    }
    assert_eq!(next_stock(&mut stream).await, (2, true, true));
    // A claim through the other server reaches this stream too.
    claim_one(&bob_there, &d)
        .await
        .expect("claim on the replica");
    assert_eq!(next_stock(&mut stream).await, (1, true, true));
    // Restocking past the mark is reported once.
    let (more, _) = signed_prekeys(&d, 4);
    d.client(server)
        .await
        .key_directory()
        .upload_prekeys(upload_request(&d, more, None))
        .await
        .expect("restock");
    assert_eq!(next_stock(&mut stream).await, (5, true, false));
    claim_one(&bob_there, &d).await.expect("claim");
    claim_one(&bob_there, &d).await.expect("claim");
    claim_one(&bob_there, &d).await.expect("claim");
    assert_eq!(next_stock(&mut stream).await, (2, true, true));
    drop(stream);
    replica.stop().await;
}

#[derive(Clone, Copy, Debug)]
enum Rpc {
    Upload,
    Claim,
    Count,
    Watch,
}

/// A device claiming its own prekeys.
const OWN: Code = Code::InvalidArgument;

#[rustfmt::skip]
const MATRIX: &[(Rpc, [Code; 7])] = &[
    //              nobody  app     own     sibling other   staff   admin
    (Rpc::Upload, [NOAUTH, DENIED, OK,     DENIED, DENIED, DENIED, DENIED]),
    (Rpc::Claim,  [NOAUTH, DENIED, OWN,    OK,     OK,     DENIED, DENIED]),
    (Rpc::Count,  [NOAUTH, DENIED, OK,     DENIED, DENIED, DENIED, DENIED]),
    (Rpc::Watch,  [NOAUTH, DENIED, OK,     DENIED, DENIED, DENIED, DENIED]),
];

async fn every_prekey_call_checks_who_calls(server: &TestServer) {
    let own = TestDevice::enroll(server, "alice", "phone").await;
    let sibling = TestDevice::enroll(server, "alice", "laptop").await;
    let other = TestDevice::enroll(server, "bob", "phone").await;
    let (_, _) = stock_up(server, &own, 10).await;
    let callers = Callers::new(server, &own, &sibling, &other).await;
    check_every_caller(
        server,
        &callers,
        WHO,
        MATRIX,
        async |rpc, _, client| {
            let mut directory = client.key_directory();
            let before = stock_of(server, &own).await;
            let got = match rpc {
                Rpc::Upload => {
                    // Signed by alice's phone: valid in every respect but the caller.
                    let (p, _) = signed_prekey(&own, PrekeyKind::OneTime);
                    directory
                        .upload_prekeys(upload_request(&own, vec![p], None))
                        .await
                        .map(|_| ())
                }
                Rpc::Claim => directory.claim_prekeys(claim_of(&own)).await.map(|_| ()),
                Rpc::Count => directory
                    .count_prekeys(pb::CountPrekeysRequest {
                        user_id: "alice".into(),
                        device_id: "phone".into(),
                    })
                    .await
                    .map(|_| ()),
                Rpc::Watch => directory
                    .watch_prekey_stock(pb::WatchPrekeyStockRequest {
                        user_id: "alice".into(),
                        device_id: "phone".into(),
                        low_water: 0,
                    })
                    .await
                    .map(|_| ()),
            };
            (got, before)
        },
        async |rpc, who, code, before| {
            let after = stock_of(server, &own).await;
            let changed =
                i64::from(after.one_time_remaining) - i64::from(before.one_time_remaining);
            let expected_change = match (rpc, code) {
                (Rpc::Upload, Code::Ok) => 1,
                (Rpc::Claim, Code::Ok) => -1,
                _ => 0,
            };
            assert_eq!(changed, expected_change, "{rpc:?} by {who:?} wrote");
        },
    )
    .await;
}

on_both_servers! {
    prekeys_are_checked_on_upload_and_refusals_write_nothing => uploads_are_checked_and_refusals_write_nothing;
    claims_fall_back_to_last_resort_and_follow_the_identity_key => claims_fall_back_to_last_resort_and_follow_identity;
    authorization_matrix_covers_every_prekey_call => every_prekey_call_checks_who_calls;
    low_order_x25519_prekeys_are_invalid_argument_and_store_nothing => low_order_prekeys_are_refused_and_nothing_is_stored;
}

on_both_servers_with! {
    a_thousand_concurrent_claims_hand_out_five_hundred_prekeys_once => thousand_claims_on_five_hundred_prekeys(generous);
    claims_are_rate_limited_across_replicas => claims_are_rate_limited_per_claimer_and_device(three_per_hour);
    low_stock_reaches_the_device_from_any_replica => low_stock_is_pushed_to_the_device(generous);
}
