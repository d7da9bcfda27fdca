//! Bad input on every call that takes any, over gRPC, on SQLite and PostgreSQL.
//!
//! Each case changes one field of a request that is otherwise valid (a signature is made
//! again over exactly the bytes sent, so the changed field is the only fault), and must be
//! refused with INVALID_ARGUMENT, or RESOURCE_EXHAUSTED for a list over its limit, whose
//! message names the field, without writing anything: the tables, read behind the server's
//! back, and the audit log, read through the store, are the same before and after. Each
//! group ends by sending its unchanged request, which must succeed: that is what shows the
//! cases failed for their one changed field. (ListAuditEvents, VerifyAuditLog and
//! GetEscrowKey take no input that can be wrong.)

mod common;

use common::raw_db::RawDb;
use common::requests::{
    self, client_wrapped_request, current_keys, role_client, service_wrapped_request,
    service_wrapped_session, user_ids, wire_key_set, WrapTarget,
};
use common::server::{TestDevice, TestServer};
use keyhold::client::Client;
use keyhold::crypto::ids::{Epoch, SessionId, UserId};
use keyhold::crypto::keys::Dek;
use keyhold::crypto::sign::{DeviceKeyBundle, IdentityKeyPair, Signable};
use keyhold::crypto::xwing::DecapsulationKey;
use keyhold::crypto::Suite;
use keyhold::proto::keyhold::v1 as pb;
use keyhold::store::user_keys::UserKey;
use tonic::{Code, Status};

const NIL_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// A user or device id one byte over its limit.
fn too_long(limit: usize) -> String {
    "x".repeat(limit + 1)
}

/// `n` distinct, valid user ids.
fn many_users(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i}")).collect()
}

/// The bad user ids every user id field refuses, by what is wrong with them.
fn bad_user_ids() -> [(&'static str, String); 3] {
    [
        ("empty user id", String::new()),
        ("user id with a space", "al ice".into()),
        ("user id of 129 bytes", too_long(128)),
    ]
}

/// The bad device ids every device id field refuses, by what is wrong with them.
fn bad_device_ids() -> [(&'static str, String); 3] {
    [
        ("empty device id", String::new()),
        ("device id with a space", "ph one".into()),
        ("device id of 65 bytes", too_long(64)),
    ]
}

/// One INVALID_ARGUMENT case naming `field` for each of the `bad` ids, which `with` puts into
/// an otherwise valid request of `call`.
fn id_cases(
    call: &str,
    field: &str,
    bad: [(&str, String); 3],
    with: &dyn Fn(String) -> Call,
) -> Vec<Case> {
    bad.into_iter()
        .map(|(what, id)| invalid(format!("{call}: {what}"), field, with(id)))
        .collect()
}

/// A request ready to send to one call.
#[derive(Clone)]
enum Call {
    PublishDeviceKey(pb::PublishDeviceKeyRequest),
    RevokeDeviceKey(pb::RevokeDeviceKeyRequest),
    GetUserKeys(pb::GetUserKeysRequest),
    CreateSession(pb::CreateSessionRequest),
    AddRecipients(pb::AddRecipientsRequest),
    RemoveRecipients(pb::RemoveRecipientsRequest),
    RotateSession(pb::RotateSessionRequest),
    GetSessionKeys(pb::GetSessionKeysRequest),
    SyncSessionKeys(pb::SyncSessionKeysRequest),
    DeleteSession(pb::DeleteSessionRequest),
    GetEscrowedKeys(pb::GetEscrowedKeysRequest),
    CreateToken(pb::CreateTokenRequest),
    RevokeToken(pb::RevokeTokenRequest),
}

/// Sends `call` as the holder of `client`'s token.
async fn send(client: &Client, call: Call) -> Result<(), Status> {
    fn done<T>(_: T) {}
    match call {
        Call::PublishDeviceKey(r) => client.key_directory().publish_device_key(r).await.map(done),
        Call::RevokeDeviceKey(r) => client.key_directory().revoke_device_key(r).await.map(done),
        Call::GetUserKeys(r) => client.key_directory().get_user_keys(r).await.map(done),
        Call::CreateSession(r) => client.sessions().create_session(r).await.map(done),
        Call::AddRecipients(r) => client.sessions().add_recipients(r).await.map(done),
        Call::RemoveRecipients(r) => client.sessions().remove_recipients(r).await.map(done),
        Call::RotateSession(r) => client.sessions().rotate_session(r).await.map(done),
        Call::GetSessionKeys(r) => client.sessions().get_session_keys(r).await.map(done),
        Call::SyncSessionKeys(r) => client.sessions().sync_session_keys(r).await.map(done),
        Call::DeleteSession(r) => client.sessions().delete_session(r).await.map(done),
        Call::GetEscrowedKeys(r) => client.escrow().get_escrowed_keys(r).await.map(done),
        Call::CreateToken(r) => client.admin().create_token(r).await.map(done),
        Call::RevokeToken(r) => client.admin().revoke_token(r).await.map(done),
    }
}

/// One bad request and how it must be refused.
struct Case {
    what: String,
    call: Call,
    code: Code,
    /// What the status message must contain: the field's name (with its index in a list);
    /// empty for a NOT_FOUND, which names no field.
    field: String,
}

/// A request refused as INVALID_ARGUMENT naming `field`.
fn invalid(what: impl Into<String>, field: &str, call: Call) -> Case {
    Case {
        what: what.into(),
        call,
        code: Code::InvalidArgument,
        field: field.into(),
    }
}

/// A request over a list limit: RESOURCE_EXHAUSTED naming `field`.
fn over_limit(what: impl Into<String>, field: &str, call: Call) -> Case {
    Case {
        what: what.into(),
        call,
        code: Code::ResourceExhausted,
        field: field.into(),
    }
}

/// Sends each case as `client` and checks it: the code, the field named, nothing written.
/// Collects every difference, then fails once with all of them.
async fn refuse_all(server: &TestServer, db: &mut RawDb, client: &Client, cases: Vec<Case>) {
    assert!(!cases.is_empty());
    let mut differences = Vec::new();
    for case in cases {
        let before = db.fingerprint().await;
        let audit_before = server.audit_events().await;
        let outcome = send(client, case.call).await;
        let what = &case.what;
        match outcome {
            Ok(()) => differences.push(format!("{what}: accepted, expected {:?}", case.code)),
            Err(status) if status.code() != case.code => differences.push(format!(
                "{what}: {:?} {:?}, expected {:?}",
                status.code(),
                status.message(),
                case.code
            )),
            Err(status) if !status.message().contains(&case.field) => differences.push(format!(
                "{what}: the message {:?} does not name {:?}",
                status.message(),
                case.field
            )),
            Err(_) => {}
        }
        let after = db.fingerprint().await;
        if after != before {
            differences.push(format!("{what}: wrote {before:?} -> {after:?}"));
        }
        let audit_after = server.audit_events().await;
        if audit_after.len() != audit_before.len() {
            differences.push(format!(
                "{what}: audit log went from {} to {} events",
                audit_before.len(),
                audit_after.len()
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "{} cases were not refused as documented:\n{}",
        differences.len(),
        differences.join("\n")
    );
}

/// Bytes signed as they are: lets a test sign over exactly what it sends, malformed or not.
struct Encoded(Vec<u8>);

impl Signable for Encoded {
    fn canonical_encoding(&self) -> Vec<u8> {
        self.0.clone()
    }
}

/// The canonical encoding rules of `src/crypto/canon.rs`, over raw fields.
#[derive(Default)]
struct Canon(Vec<u8>);

impl Canon {
    fn label(label: &str) -> Canon {
        let mut c = Canon::default();
        c.0.extend_from_slice(
            &u16::try_from(label.len())
                .expect("short label")
                .to_be_bytes(),
        );
        c.0.extend_from_slice(label.as_bytes());
        c
    }
    fn fixed(mut self, bytes: &[u8]) -> Canon {
        self.0.extend_from_slice(bytes);
        self
    }
    fn var(mut self, bytes: &[u8]) -> Canon {
        let len = u32::try_from(bytes.len()).expect("short field");
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(bytes);
        self
    }
    fn u8(mut self, v: u8) -> Canon {
        self.0.push(v);
        self
    }
    fn u32(mut self, v: u32) -> Canon {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
}

/// The device key bundle encoding of a PublishDeviceKey request, whatever its fields hold.
fn bundle_encoding(r: &pb::PublishDeviceKeyRequest) -> Vec<u8> {
    Canon::label("keyhold/v1/device-key-bundle")
        .u8(r.suite as u8)
        .var(r.user_id.as_bytes())
        .var(r.device_id.as_bytes())
        .fixed(&r.identity_key)
        .var(&r.encapsulation_key)
        .0
}

/// Signs a PublishDeviceKey request with `identity`, over exactly its fields.
fn sign_bundle(mut r: pb::PublishDeviceKeyRequest, identity: &IdentityKeyPair) -> Call {
    r.signature = identity
        .sign(&Encoded(bundle_encoding(&r)))
        .as_bytes()
        .to_vec();
    Call::PublishDeviceKey(r)
}

/// What a client-wrapped key set's signature binds besides the set itself.
struct KeySetContext<'a> {
    session: SessionId,
    author: &'a TestDevice,
}

/// The client-wrapped key set encoding of a wire key set, whatever its fields hold.
fn key_set_encoding(ctx: &KeySetContext<'_>, ks: &pb::ClientWrappedKeySet) -> Vec<u8> {
    let mut wraps: Vec<&pb::ClientWrap> = ks.wraps.iter().collect();
    wraps.sort_by(|a, b| {
        (a.user_id.as_bytes(), a.device_id.as_bytes(), &a.key_id).cmp(&(
            b.user_id.as_bytes(),
            b.device_id.as_bytes(),
            &b.key_id,
        ))
    });
    let mut c = Canon::label("keyhold/v1/client-wrapped-key-set")
        .u8(Suite::XWingAes256GcmV1 as u8)
        .fixed(ctx.session.as_bytes())
        .u32(ks.epoch)
        .var(ctx.author.user.as_str().as_bytes())
        .var(ctx.author.device.as_str().as_bytes())
        .u32(u32::try_from(wraps.len()).expect("count"));
    for w in wraps {
        c = c
            .var(w.user_id.as_bytes())
            .var(w.device_id.as_bytes())
            .fixed(&w.key_id)
            .var(&w.envelope);
    }
    match &ks.escrow {
        None => c.u8(0),
        Some(e) => c.u8(1).fixed(&e.escrow_key_id).var(&e.envelope),
    }
    .0
}

/// Signs a wire key set as its author, over exactly its fields.
fn sign_key_set(ctx: &KeySetContext<'_>, ks: &mut pb::ClientWrappedKeySet) {
    ks.signature = ctx
        .author
        .identity
        .sign(&Encoded(key_set_encoding(ctx, ks)))
        .as_bytes()
        .to_vec();
}

/// A valid key set: a fresh DEK wrapped by `ctx.author` to `targets` for `epoch`, with an
/// escrow wrap when `escrow`, signed.
fn key_set(
    server: &TestServer,
    ctx: &KeySetContext<'_>,
    epoch: u32,
    targets: &[UserKey],
    escrow: bool,
) -> pb::ClientWrappedKeySet {
    let dek = Dek::generate().expect("dek");
    let epoch = Epoch::new(epoch).expect("epoch");
    let targets = WrapTarget::all_stored(targets);
    let escrow = escrow.then(|| server.escrow_key.encapsulation_key());
    let set = requests::key_set(ctx.author, ctx.session, epoch, &dek, &targets, escrow);
    let mut wire = wire_key_set(&set, Vec::new());
    // The raw signer is the crypto core's encoding: the malformed sets below are signed the
    // way a client would sign them.
    assert_eq!(key_set_encoding(ctx, &wire), set.canonical_encoding());
    sign_key_set(ctx, &mut wire);
    wire
}

/// The bad key set cases shared by the client-wrapped calls: each changes one field of
/// `base`'s key set (and signs again); `wrap` puts the changed set back into a request.
fn key_set_cases(
    ctx: &KeySetContext<'_>,
    call: &str,
    base: &pb::ClientWrappedKeySet,
    wrap: &dyn Fn(Option<pb::ClientWrappedKeySet>) -> Call,
) -> Vec<Case> {
    let changed = |f: &dyn Fn(&mut pb::ClientWrappedKeySet)| {
        let mut ks = base.clone();
        f(&mut ks);
        sign_key_set(ctx, &mut ks);
        wrap(Some(ks))
    };
    let laptop_signed = {
        let other = IdentityKeyPair::generate().expect("identity");
        let mut ks = base.clone();
        ks.signature = other
            .sign(&Encoded(key_set_encoding(ctx, &ks)))
            .as_bytes()
            .to_vec();
        wrap(Some(ks))
    };
    let mut flipped = base.clone();
    flipped.signature[0] ^= 1;
    let mut short_signature = base.clone();
    short_signature.signature.pop();
    let mut cases = vec![
        invalid(format!("{call}: no key set"), "key_set", wrap(None)),
        invalid(
            format!("{call}: key set of epoch 0"),
            "key_set.epoch",
            changed(&|ks| ks.epoch = 0),
        ),
        invalid(
            format!("{call}: signature cut to 63 bytes"),
            "key_set.signature",
            wrap(Some(short_signature)),
        ),
        invalid(
            format!("{call}: signature with a bit flipped"),
            "key_set.signature",
            wrap(Some(flipped)),
        ),
        invalid(
            format!("{call}: signed by another identity key"),
            "key_set.signature",
            laptop_signed,
        ),
    ];
    if !base.wraps.is_empty() {
        cases.extend([
            invalid(
                format!("{call}: wrap key id of 15 bytes"),
                "key_set.wraps[0].key_id",
                changed(&|ks| {
                    ks.wraps[0].key_id.pop();
                }),
            ),
            invalid(
                format!("{call}: wrap with an empty user id"),
                "key_set.wraps[0].user_id",
                changed(&|ks| ks.wraps[0].user_id.clear()),
            ),
            invalid(
                format!("{call}: wrap with a device id with a space"),
                "key_set.wraps[0].device_id",
                changed(&|ks| ks.wraps[0].device_id = "lap top".into()),
            ),
            invalid(
                format!("{call}: wrap envelope of 1168 bytes"),
                "key_set.wraps[0].envelope",
                changed(&|ks| {
                    ks.wraps[0].envelope.pop();
                }),
            ),
            invalid(
                format!("{call}: wrap envelope of an unknown suite"),
                "key_set.wraps[0].envelope",
                changed(&|ks| ks.wraps[0].envelope[0] = 0x07),
            ),
            over_limit(
                format!("{call}: 2001 wraps"),
                "key_set.wraps",
                changed(&|ks| ks.wraps = vec![ks.wraps[0].clone(); 2001]),
            ),
        ]);
    }
    if base.escrow.is_some() {
        cases.extend([
            invalid(
                format!("{call}: escrow key id of 15 bytes"),
                "key_set.escrow.escrow_key_id",
                changed(&|ks| {
                    ks.escrow.as_mut().expect("escrow").escrow_key_id.pop();
                }),
            ),
            invalid(
                format!("{call}: escrow envelope of 1168 bytes"),
                "key_set.escrow.envelope",
                changed(&|ks| {
                    ks.escrow.as_mut().expect("escrow").envelope.pop();
                }),
            ),
        ]);
    }
    cases
}

/// The bad session id cases shared by every call that names a session.
fn session_id_cases(call: &str, with: &dyn Fn(&str) -> Call) -> Vec<Case> {
    [
        ("empty session id", ""),
        ("session id that is not a UUID", "not-a-session"),
        (
            "session id with a trailing space",
            "01890a5d-ac96-774b-bcce-b302099a8057 ",
        ),
        ("nil UUID session id", NIL_UUID),
    ]
    .into_iter()
    .map(|(what, id)| invalid(format!("{call}: {what}"), "session_id", with(id)))
    .collect()
}

/// The bad entries of a user id list `field` of at most `limit` users, which `with` puts
/// into an otherwise valid request of `call`.
fn user_list_entry_cases(
    call: &str,
    field: &str,
    limit: usize,
    with: &dyn Fn(Vec<String>) -> Call,
) -> Vec<Case> {
    let mut cases = vec![invalid(
        format!("{call}: an empty user id second"),
        &format!("{field}[1]"),
        with(vec!["carol".into(), String::new()]),
    )];
    cases.extend(id_cases(
        call,
        &format!("{field}[0]"),
        bad_user_ids(),
        &|id| with(vec![id]),
    ));
    cases.push(over_limit(
        format!("{call}: {} users", limit + 1),
        field,
        with(many_users(limit + 1)),
    ));
    cases
}

/// The bad user id lists of a call that needs at least one user: none, and bad entries.
fn user_list_cases(call: &str, limit: usize, with: &dyn Fn(Vec<String>) -> Call) -> Vec<Case> {
    let mut cases = vec![invalid(
        format!("{call}: no users"),
        "user_ids",
        with(Vec::new()),
    )];
    cases.extend(user_list_entry_cases(call, "user_ids", limit, with));
    cases
}

async fn key_directory_refuses_bad_input(server: &TestServer) {
    let mut db = RawDb::open(&server.db).await;
    let app = role_client(server, pb::Role::App).await;
    let carol = TestDevice::enroll(server, "carol", "phone").await;

    // PublishDeviceKey, for dave's phone, which has no key yet.
    let identity = IdentityKeyPair::generate().expect("identity");
    let xwing = DecapsulationKey::generate().expect("keygen");
    let base = pb::PublishDeviceKeyRequest {
        user_id: "dave".into(),
        device_id: "phone".into(),
        suite: pb::Suite::XwingAes256gcmV1 as i32,
        encapsulation_key: xwing.encapsulation_key().to_bytes(),
        identity_key: identity.public_key().as_bytes().to_vec(),
        signature: Vec::new(),
    };
    let typed = DeviceKeyBundle {
        suite: Suite::XWingAes256GcmV1,
        user: UserId::new("dave").expect("user"),
        device: "phone".parse().expect("device"),
        identity_key: identity.public_key(),
        encapsulation_key: xwing.encapsulation_key().clone(),
    };
    assert_eq!(bundle_encoding(&base), typed.canonical_encoding());
    let publish = |f: &dyn Fn(&mut pb::PublishDeviceKeyRequest)| {
        let mut r = base.clone();
        f(&mut r);
        sign_bundle(r, &identity)
    };
    let signed = match sign_bundle(base.clone(), &identity) {
        Call::PublishDeviceKey(r) => r,
        _ => unreachable!(),
    };
    let with_signature = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut r = signed.clone();
        f(&mut r.signature);
        Call::PublishDeviceKey(r)
    };
    let mut unreduced = xwing.encapsulation_key().to_bytes();
    // ML-KEM coefficient 0 is 12 bits little-endian in the first 1.5 bytes: 0xFFF >= q = 3329.
    unreduced[0] = 0xFF;
    unreduced[1] |= 0x0F;
    // The Ed25519 identity point: of small order, so one forged signature fits every message.
    let mut small_order = [0u8; 32];
    small_order[0] = 1;
    let other_identity = IdentityKeyPair::generate().expect("identity");
    let mut cases = id_cases("publish", "user_id", bad_user_ids(), &|id| {
        publish(&|r| r.user_id = id.clone())
    });
    cases.extend(id_cases("publish", "device_id", bad_device_ids(), &|id| {
        publish(&|r| r.device_id = id.clone())
    }));
    cases.extend([
        invalid(
            "user id outside printable ASCII",
            "user_id",
            publish(&|r| r.user_id = "dävé".into()),
        ),
        invalid("suite unset", "suite", publish(&|r| r.suite = 0)),
        invalid("unknown suite 5", "suite", publish(&|r| r.suite = 5)),
        invalid(
            "encapsulation key of 1215 bytes",
            "encapsulation_key",
            publish(&|r| {
                r.encapsulation_key.pop();
            }),
        ),
        invalid(
            "encapsulation key of 1217 bytes",
            "encapsulation_key",
            publish(&|r| r.encapsulation_key.push(0)),
        ),
        invalid(
            "empty encapsulation key",
            "encapsulation_key",
            publish(&|r| r.encapsulation_key.clear()),
        ),
        invalid(
            "unreduced ML-KEM key",
            "encapsulation_key",
            publish(&|r| r.encapsulation_key = unreduced.clone()),
        ),
        invalid(
            "X-Wing key whose X25519 part is a low-order point",
            "encapsulation_key",
            publish(&|r| {
                let x25519 = r.encapsulation_key.len() - 32;
                r.encapsulation_key[x25519..].fill(0);
            }),
        ),
        invalid(
            "identity key of 31 bytes",
            "identity_key",
            publish(&|r| {
                r.identity_key.pop();
            }),
        ),
        invalid(
            "small-order identity key",
            "identity_key",
            publish(&|r| r.identity_key = small_order.to_vec()),
        ),
        invalid(
            "signature of 63 bytes",
            "signature",
            with_signature(&|s| {
                s.pop();
            }),
        ),
        invalid(
            "empty signature",
            "signature",
            with_signature(&|s| s.clear()),
        ),
        invalid(
            "signature with a bit flipped",
            "signature",
            with_signature(&|s| s[10] ^= 0x01),
        ),
        invalid("signature by another identity key", "signature", {
            let mut r = base.clone();
            r.signature = other_identity
                .sign(&Encoded(bundle_encoding(&r)))
                .as_bytes()
                .to_vec();
            Call::PublishDeviceKey(r)
        }),
        invalid("signature made for another user", "signature", {
            let mut r = signed.clone();
            r.user_id = "erin".into();
            Call::PublishDeviceKey(r)
        }),
    ]);

    // RevokeDeviceKey of carol's phone's key.
    let carol_key = carol.xwing.encapsulation_key().key_id().as_bytes().to_vec();
    let revoke = |f: &dyn Fn(&mut pb::RevokeDeviceKeyRequest)| {
        let mut r = pb::RevokeDeviceKeyRequest {
            user_id: "carol".into(),
            device_id: "phone".into(),
            key_id: carol_key.clone(),
        };
        f(&mut r);
        Call::RevokeDeviceKey(r)
    };
    cases.extend(id_cases("revoke", "user_id", bad_user_ids(), &|id| {
        revoke(&|r| r.user_id = id.clone())
    }));
    cases.extend(id_cases("revoke", "device_id", bad_device_ids(), &|id| {
        revoke(&|r| r.device_id = id.clone())
    }));
    cases.extend([
        invalid(
            "revoke: key id of 15 bytes",
            "key_id",
            revoke(&|r| {
                r.key_id.pop();
            }),
        ),
        invalid(
            "revoke: key id of 17 bytes",
            "key_id",
            revoke(&|r| r.key_id.push(0)),
        ),
        invalid(
            "revoke: empty key id",
            "key_id",
            revoke(&|r| r.key_id.clear()),
        ),
    ]);

    // GetUserKeys.
    let lookup = |user_ids: Vec<String>| Call::GetUserKeys(pb::GetUserKeysRequest { user_ids });
    cases.extend(user_list_cases("lookup", 100, &lookup));
    refuse_all(server, &mut db, &app, cases).await;

    // Nothing of dave's was recorded, and carol's key is still current.
    let dave = UserId::new("dave").expect("user");
    let mut conn = server.store.conn().await.expect("conn");
    assert!(conn
        .current_user_keys(std::slice::from_ref(&dave))
        .await
        .expect("keys")
        .is_empty());
    assert!(conn
        .user_key(&xwing.encapsulation_key().key_id())
        .await
        .expect("key")
        .is_none());
    drop(conn);
    let carol_keys = current_keys(server, &["carol"]).await;
    assert_eq!(carol_keys.len(), 1);
    assert_eq!(carol_keys[0].key_id.as_bytes().to_vec(), carol_key);

    // The unchanged requests are valid.
    send(&app, Call::PublishDeviceKey(signed))
        .await
        .expect("publish");
    assert_eq!(current_keys(server, &["dave"]).await.len(), 1);
    send(&app, revoke(&|_| {})).await.expect("revoke");
    assert!(current_keys(server, &["carol"]).await.is_empty());
    let hundred = app
        .key_directory()
        .get_user_keys(pb::GetUserKeysRequest {
            user_ids: many_users(100),
        })
        .await
        .expect("100 users is within the limit")
        .into_inner();
    assert_eq!(hundred.users.len(), 100);
}

/// The CreateSession cases of both modes.
async fn create_session_cases(
    server: &TestServer,
    db: &mut RawDb,
    app: &Client,
    alice_phone: &TestDevice,
) {
    // SERVICE_WRAPPED, by the app server.
    let service_wrapped = service_wrapped_request("alice", &["carol"]);
    let sw = |f: &dyn Fn(&mut pb::CreateSessionRequest)| {
        let mut r = service_wrapped.clone();
        f(&mut r);
        Call::CreateSession(r)
    };
    let recipients = |user_ids: Vec<String>| {
        Some(pb::create_session_request::Recipients::UserIds(
            pb::UserIdList { user_ids },
        ))
    };
    let some_key_set = pb::ClientWrappedKeySet {
        epoch: 1,
        ..Default::default()
    };
    let mut cases = vec![
        invalid("mode unset", "mode", sw(&|r| r.mode = 0)),
        invalid("unknown mode 7", "mode", sw(&|r| r.mode = 7)),
        invalid("unknown suite 5", "suite", sw(&|r| r.suite = 5)),
        invalid("no recipients", "recipients", sw(&|r| r.recipients = None)),
    ];
    cases.extend(id_cases(
        "author",
        "author_user_id",
        bad_user_ids(),
        &|id| sw(&|r| r.author_user_id = id.clone()),
    ));
    cases.extend(user_list_entry_cases(
        "recipients",
        "user_ids.user_ids",
        1000,
        &|users| sw(&|r| r.recipients = recipients(users.clone())),
    ));
    cases.extend([
        invalid(
            "service-wrapped with a session id",
            "session_id",
            sw(&|r| r.session_id = SessionId::generate().to_string()),
        ),
        invalid(
            "service-wrapped with an author device",
            "author_device_id",
            sw(&|r| r.author_device_id = "phone".into()),
        ),
        invalid(
            "service-wrapped with a key set",
            "key_set",
            sw(&|r| r.key_set = Some(some_key_set.clone())),
        ),
    ]);
    refuse_all(server, db, app, cases).await;
    send(app, sw(&|_| {}))
        .await
        .expect("the service-wrapped base is valid");

    // CLIENT_WRAPPED, by alice's phone.
    let phone = alice_phone.client(server).await;
    let session = SessionId::generate();
    let ctx = KeySetContext {
        session,
        author: alice_phone,
    };
    let members = current_keys(server, &["alice", "carol"]).await;
    let base_set = key_set(server, &ctx, 1, &members, true);
    let client_wrapped =
        client_wrapped_request(alice_phone, session, user_ids(&["carol"]), base_set.clone());
    let cw = |f: &dyn Fn(&mut pb::CreateSessionRequest)| {
        let mut r = client_wrapped.clone();
        f(&mut r);
        Call::CreateSession(r)
    };
    let mut cases = session_id_cases("client-wrapped", &|id| {
        cw(&|r| r.session_id = id.to_string())
    });
    cases.extend([
        invalid(
            "client-wrapped: unknown mode 7",
            "mode",
            cw(&|r| r.mode = 7),
        ),
        invalid(
            "client-wrapped: unknown suite 5",
            "suite",
            cw(&|r| r.suite = 5),
        ),
        invalid(
            "client-wrapped: asks for the plaintext DEK",
            "return_plaintext_dek",
            cw(&|r| r.return_plaintext_dek = true),
        ),
        over_limit(
            "client-wrapped: 1001 recipients",
            "user_ids",
            cw(&|r| r.recipients = recipients(many_users(1001))),
        ),
    ]);
    cases.extend(id_cases(
        "client-wrapped",
        "author_device_id",
        bad_device_ids(),
        &|id| cw(&|r| r.author_device_id = id.clone()),
    ));
    cases.extend(key_set_cases(
        &ctx,
        "client-wrapped",
        &base_set,
        &|key_set| {
            let mut r = client_wrapped.clone();
            r.key_set = key_set;
            Call::CreateSession(r)
        },
    ));
    let stored = async || {
        let mut conn = server.store.conn().await.expect("conn");
        conn.session(&session).await.expect("read")
    };
    refuse_all(server, db, &phone, cases).await;
    assert!(stored().await.is_none());
    send(&phone, cw(&|_| {}))
        .await
        .expect("the client-wrapped base is valid");
    assert!(stored().await.is_some());
}

async fn sessions_refuse_bad_input(server: &TestServer) {
    let mut db = RawDb::open(&server.db).await;
    let app = role_client(server, pb::Role::App).await;
    let alice_phone = TestDevice::enroll(server, "alice", "phone").await;
    TestDevice::enroll(server, "alice", "laptop").await;
    TestDevice::enroll(server, "bob", "phone").await;
    TestDevice::enroll(server, "carol", "phone").await;
    let phone = alice_phone.client(server).await;

    create_session_cases(server, &mut db, &app, &alice_phone).await;

    // One session of each mode, of alice with carol, for the calls that change a session.
    let sw_session = service_wrapped_session(&app, "alice", &["carol"]).await;
    let cw_session = SessionId::generate();
    let ctx = KeySetContext {
        session: cw_session,
        author: &alice_phone,
    };
    let members = current_keys(server, &["alice", "carol"]).await;
    phone
        .sessions()
        .create_session(client_wrapped_request(
            &alice_phone,
            cw_session,
            user_ids(&["carol"]),
            key_set(server, &ctx, 1, &members, true),
        ))
        .await
        .expect("client-wrapped session");
    let some_key_set = pb::ClientWrappedKeySet {
        epoch: 2,
        ..Default::default()
    };

    // AddRecipients: bob joins, at epoch 1.
    let add_sw = |user_ids: Vec<String>, key_set: Option<pb::ClientWrappedKeySet>| {
        Call::AddRecipients(pb::AddRecipientsRequest {
            session_id: sw_session.to_string(),
            user_ids,
            key_set,
            idempotency_key: String::new(),
        })
    };
    let mut cases = session_id_cases("add", &|id| {
        Call::AddRecipients(pb::AddRecipientsRequest {
            session_id: id.into(),
            user_ids: vec!["bob".into()],
            key_set: None,
            idempotency_key: String::new(),
        })
    });
    cases.extend(user_list_cases("add", 1000, &|users| add_sw(users, None)));
    cases.push(invalid(
        "add: key set for a service-wrapped session",
        "key_set",
        add_sw(vec!["bob".into()], Some(some_key_set.clone())),
    ));
    refuse_all(server, &mut db, &app, cases).await;
    send(&app, add_sw(vec!["bob".into()], None))
        .await
        .expect("the service-wrapped add is valid");

    let bob_keys = current_keys(server, &["bob"]).await;
    let add_set = key_set(server, &ctx, 1, &bob_keys, false);
    let add_cw = |key_set: Option<pb::ClientWrappedKeySet>| {
        Call::AddRecipients(pb::AddRecipientsRequest {
            session_id: cw_session.to_string(),
            user_ids: vec!["bob".into()],
            key_set,
            idempotency_key: String::new(),
        })
    };
    let mut cases = key_set_cases(&ctx, "add client-wrapped", &add_set, &add_cw);
    let with_escrow = key_set(server, &ctx, 1, &bob_keys, true);
    cases.push(invalid(
        "add client-wrapped: an escrow wrap for an epoch that has one",
        "key_set.escrow",
        add_cw(Some(with_escrow)),
    ));
    refuse_all(server, &mut db, &phone, cases).await;
    send(&phone, add_cw(Some(add_set)))
        .await
        .expect("the client-wrapped add is valid");

    // RemoveRecipients: bob leaves, epoch 2 starts.
    let remove_sw = |user_ids: Vec<String>, key_set: Option<pb::ClientWrappedKeySet>| {
        Call::RemoveRecipients(pb::RemoveRecipientsRequest {
            session_id: sw_session.to_string(),
            user_ids,
            key_set,
            idempotency_key: String::new(),
        })
    };
    let mut cases = session_id_cases("remove", &|id| {
        Call::RemoveRecipients(pb::RemoveRecipientsRequest {
            session_id: id.into(),
            user_ids: vec!["bob".into()],
            key_set: None,
            idempotency_key: String::new(),
        })
    });
    cases.extend(user_list_cases("remove", 1000, &|users| {
        remove_sw(users, None)
    }));
    cases.extend([
        invalid(
            "remove: the author",
            "user_ids",
            remove_sw(vec!["alice".into()], None),
        ),
        invalid(
            "remove: key set for a service-wrapped session",
            "key_set",
            remove_sw(vec!["bob".into()], Some(some_key_set.clone())),
        ),
    ]);
    refuse_all(server, &mut db, &app, cases).await;
    send(&app, remove_sw(vec!["bob".into()], None))
        .await
        .expect("the service-wrapped remove is valid");

    let staying = current_keys(server, &["alice", "carol"]).await;
    let remove_set = key_set(server, &ctx, 2, &staying, true);
    let remove_cw = |user_ids: Vec<String>, key_set: Option<pb::ClientWrappedKeySet>| {
        Call::RemoveRecipients(pb::RemoveRecipientsRequest {
            session_id: cw_session.to_string(),
            user_ids,
            key_set,
            idempotency_key: String::new(),
        })
    };
    let mut cases = key_set_cases(&ctx, "remove client-wrapped", &remove_set, &|ks| {
        remove_cw(vec!["bob".into()], ks)
    });
    cases.push(invalid(
        "remove client-wrapped: the author",
        "user_ids",
        remove_cw(vec!["alice".into()], Some(remove_set.clone())),
    ));
    refuse_all(server, &mut db, &phone, cases).await;
    send(&phone, remove_cw(vec!["bob".into()], Some(remove_set)))
        .await
        .expect("the client-wrapped remove is valid");

    // RotateSession: epoch 3 starts.
    let rotate = |session: SessionId, key_set: Option<pb::ClientWrappedKeySet>| {
        Call::RotateSession(pb::RotateSessionRequest {
            session_id: session.to_string(),
            key_set,
            idempotency_key: String::new(),
        })
    };
    let mut cases = session_id_cases("rotate", &|id| {
        Call::RotateSession(pb::RotateSessionRequest {
            session_id: id.into(),
            key_set: None,
            idempotency_key: String::new(),
        })
    });
    cases.push(invalid(
        "rotate: key set for a service-wrapped session",
        "key_set",
        rotate(sw_session, Some(some_key_set.clone())),
    ));
    refuse_all(server, &mut db, &app, cases).await;
    send(&app, rotate(sw_session, None))
        .await
        .expect("the service-wrapped rotation is valid");

    let rotate_set = key_set(server, &ctx, 3, &staying, true);
    let cases = key_set_cases(&ctx, "rotate client-wrapped", &rotate_set, &|ks| {
        rotate(cw_session, ks)
    });
    refuse_all(server, &mut db, &phone, cases).await;
    send(&phone, rotate(cw_session, Some(rotate_set)))
        .await
        .expect("the client-wrapped rotation is valid");

    // GetSessionKeys and SyncSessionKeys, as alice's phone.
    let get = |session_id: String, epoch: Option<u32>| {
        Call::GetSessionKeys(pb::GetSessionKeysRequest { session_id, epoch })
    };
    let mut cases = session_id_cases("get keys", &|id| get(id.into(), None));
    cases.push(invalid(
        "get keys: epoch 0",
        "epoch",
        get(sw_session.to_string(), Some(0)),
    ));
    let sync = |cursor: &str| {
        Call::SyncSessionKeys(pb::SyncSessionKeysRequest {
            cursor: cursor.into(),
            page_size: 0,
        })
    };
    for cursor in [
        "garbage",
        "sk1.",
        "sk1.zz",
        "sk1.-1",
        "sk2.10",
        "sk1.10000000000000000",
    ] {
        cases.push(invalid(
            format!("sync: cursor {cursor:?}"),
            "cursor",
            sync(cursor),
        ));
    }
    refuse_all(server, &mut db, &phone, cases).await;
    send(&phone, get(sw_session.to_string(), Some(3)))
        .await
        .expect("the key request is valid");
    let page = phone
        .sessions()
        .sync_session_keys(pb::SyncSessionKeysRequest::default())
        .await
        .expect("sync from the start")
        .into_inner();
    assert!(!page.session_keys.is_empty());
    send(&phone, sync(&page.next_cursor))
        .await
        .expect("a cursor the service returned is valid");

    // DeleteSession.
    let cases = session_id_cases("delete", &|id| {
        Call::DeleteSession(pb::DeleteSessionRequest {
            session_id: id.into(),
        })
    });
    refuse_all(server, &mut db, &app, cases).await;
    send(
        &app,
        Call::DeleteSession(pb::DeleteSessionRequest {
            session_id: sw_session.to_string(),
        }),
    )
    .await
    .expect("the delete is valid");
}

async fn escrow_refuses_bad_input(server: &TestServer) {
    let mut db = RawDb::open(&server.db).await;
    let app = role_client(server, pb::Role::App).await;
    let staff = role_client(server, pb::Role::Staff).await;
    TestDevice::enroll(server, "alice", "phone").await;
    let session = service_wrapped_session(&app, "alice", &[])
        .await
        .to_string();
    let read = |f: &dyn Fn(&mut pb::GetEscrowedKeysRequest)| {
        let mut r = pb::GetEscrowedKeysRequest {
            session_id: session.clone(),
            epochs: vec![1],
            reason: "case 42".into(),
        };
        f(&mut r);
        Call::GetEscrowedKeys(r)
    };
    let mut cases = session_id_cases("escrow read", &|id| read(&|r| r.session_id = id.into()));
    cases.extend([
        invalid("no reason", "reason", read(&|r| r.reason.clear())),
        invalid(
            "a reason of blanks only",
            "reason",
            read(&|r| r.reason = " \t\n ".into()),
        ),
        invalid(
            "a reason of 1001 characters",
            "reason",
            read(&|r| r.reason = "é".repeat(1001)),
        ),
        invalid("epoch 0", "epochs[0]", read(&|r| r.epochs = vec![0])),
        invalid(
            "epoch 0 second",
            "epochs[1]",
            read(&|r| r.epochs = vec![1, 0]),
        ),
        over_limit(
            "1001 epochs",
            "epochs",
            read(&|r| r.epochs = (1..=1001).collect()),
        ),
    ]);
    refuse_all(server, &mut db, &staff, cases).await;

    // The unchanged request is valid, and so is a reason of exactly 1000 characters.
    send(&staff, read(&|_| {})).await.expect("escrow read");
    send(&staff, read(&|r| r.reason = "é".repeat(1000)))
        .await
        .expect("a reason of 1000 characters (2000 bytes) is within the limit");
}

async fn admin_refuses_bad_input(server: &TestServer) {
    let mut db = RawDb::open(&server.db).await;
    let admin = server.client(&server.admin_token).await;
    let create = |f: &dyn Fn(&mut pb::CreateTokenRequest)| {
        let mut r = pb::CreateTokenRequest {
            role: pb::Role::Device as i32,
            user_id: "alice".into(),
            device_id: "phone".into(),
            label: "alice's phone".into(),
            idempotency_key: String::new(),
        };
        f(&mut r);
        Call::CreateToken(r)
    };
    let app_role = pb::Role::App as i32;
    let issued = admin
        .admin()
        .create_token(pb::CreateTokenRequest {
            role: app_role,
            ..Default::default()
        })
        .await
        .expect("token")
        .into_inner();
    let revoke = |token_id: &str| {
        Call::RevokeToken(pb::RevokeTokenRequest {
            token_id: token_id.into(),
        })
    };
    let mut cases = vec![
        invalid("role unset", "role", create(&|r| r.role = 0)),
        invalid("unknown role 9", "role", create(&|r| r.role = 9)),
        invalid(
            "app token bound to a user",
            "user_id",
            create(&|r| {
                r.role = app_role;
                r.device_id.clear();
            }),
        ),
        invalid(
            "app token bound to a device",
            "device_id",
            create(&|r| {
                r.role = app_role;
                r.user_id.clear();
            }),
        ),
        invalid("revoke: empty token id", "token_id", revoke("")),
        invalid(
            "revoke: token id that is not hex",
            "token_id",
            revoke(&"z".repeat(32)),
        ),
        invalid(
            "revoke: token id of 31 hex digits",
            "token_id",
            revoke(&issued.token_id[..31]),
        ),
        invalid(
            "revoke: token id of 33 hex digits",
            "token_id",
            revoke(&format!("{}0", issued.token_id)),
        ),
        invalid(
            "revoke: the whole token instead of its id",
            "token_id",
            revoke(&issued.token),
        ),
    ];
    cases.extend(id_cases("device token", "user_id", bad_user_ids(), &|id| {
        create(&|r| r.user_id = id.clone())
    }));
    cases.extend(id_cases(
        "device token",
        "device_id",
        bad_device_ids(),
        &|id| create(&|r| r.device_id = id.clone()),
    ));
    // A well-formed id of no token is NOT_FOUND, and records no revocation.
    cases.push(Case {
        what: "revoke: unknown token id".into(),
        call: revoke(&"0".repeat(32)),
        code: Code::NotFound,
        field: String::new(),
    });
    refuse_all(server, &mut db, &admin, cases).await;

    // The unchanged requests are valid.
    send(&admin, create(&|_| {})).await.expect("create token");
    send(&admin, revoke(&issued.token_id))
        .await
        .expect("revoke token");
}

on_both_servers! {
    key_directory_refuses_bad_input_naming_the_field_and_writes_nothing => key_directory_refuses_bad_input;
    sessions_refuse_bad_input_naming_the_field_and_write_nothing => sessions_refuse_bad_input;
    escrow_refuses_bad_input_naming_the_field_and_writes_nothing => escrow_refuses_bad_input;
    admin_refuses_bad_input_naming_the_field_and_writes_nothing => admin_refuses_bad_input;
    token_label_is_at_most_128_characters_without_control_characters => token_label_beyond_the_documented_limit;
    client_wrapped_epoch_without_escrow_is_failed_precondition => client_wrapped_epoch_without_escrow_wrap;
    client_wrapped_session_id_must_be_a_uuid_v7 => client_wrapped_session_id_that_is_not_a_uuid_v7;
    session_keys_of_an_epoch_past_the_last_is_invalid => session_keys_of_an_epoch_past_i32;
    escrow_read_beyond_the_current_epoch_is_not_found => escrow_read_of_an_epoch_beyond_the_current_one;
    escrow_reason_with_a_nul_is_invalid_argument => escrow_reason_with_a_nul;
    republishing_the_current_key_is_a_safe_retry => republishing_the_current_key;
}

async fn token_label_beyond_the_documented_limit(server: &TestServer) {
    let mut db = RawDb::open(&server.db).await;
    let admin = server.client(&server.admin_token).await;
    let labelled = |label: &str| {
        Call::CreateToken(pb::CreateTokenRequest {
            role: pb::Role::App as i32,
            label: label.into(),
            ..Default::default()
        })
    };
    let cases = vec![
        invalid(
            "label of 129 characters",
            "label",
            labelled(&"x".repeat(129)),
        ),
        invalid(
            "label with a line feed",
            "label",
            labelled("chat backend\neu-west"),
        ),
        invalid("label with a NUL", "label", labelled("chat\0backend")),
    ];
    refuse_all(server, &mut db, &admin, cases).await;
    send(&admin, labelled(&"é".repeat(128)))
        .await
        .expect("a label of 128 characters (256 bytes) is within the limit");
}

async fn client_wrapped_epoch_without_escrow_wrap(server: &TestServer) {
    let mut db = RawDb::open(&server.db).await;
    let alice_phone = TestDevice::enroll(server, "alice", "phone").await;
    let phone = alice_phone.client(server).await;
    let session = SessionId::generate();
    let ctx = KeySetContext {
        session,
        author: &alice_phone,
    };
    let members = current_keys(server, &["alice"]).await;
    let key_set = key_set(server, &ctx, 1, &members, false);
    let request = client_wrapped_request(&alice_phone, session, user_ids(&[]), key_set);
    let case = Case {
        what: "client-wrapped epoch without its escrow wrap".into(),
        call: Call::CreateSession(request),
        code: Code::FailedPrecondition,
        field: "key_set.escrow".into(),
    };
    refuse_all(server, &mut db, &phone, vec![case]).await;
}

async fn client_wrapped_session_id_that_is_not_a_uuid_v7(server: &TestServer) {
    let mut db = RawDb::open(&server.db).await;
    let alice_phone = TestDevice::enroll(server, "alice", "phone").await;
    let phone = alice_phone.client(server).await;
    let mut bytes = *SessionId::generate().as_uuid().as_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    let session = SessionId::from_uuid(uuid::Uuid::from_bytes(bytes));
    let ctx = KeySetContext {
        session,
        author: &alice_phone,
    };
    let members = current_keys(server, &["alice"]).await;
    let key_set = key_set(server, &ctx, 1, &members, true);
    let request = client_wrapped_request(&alice_phone, session, user_ids(&[]), key_set);
    let case = invalid(
        "client-wrapped session id that is a UUIDv4",
        "session_id",
        Call::CreateSession(request),
    );
    refuse_all(server, &mut db, &phone, vec![case]).await;
}

/// A service-wrapped session of alice alone, at epoch 1, made by the app server.
async fn lone_session(server: &TestServer) -> SessionId {
    TestDevice::enroll(server, "alice", "phone").await;
    let app = role_client(server, pb::Role::App).await;
    service_wrapped_session(&app, "alice", &[]).await
}

async fn session_keys_of_an_epoch_past_i32(server: &TestServer) {
    let mut db = RawDb::open(&server.db).await;
    let session = lone_session(server).await;
    let phone = server
        .client(&server.token(pb::Role::Device, "alice", "phone").await)
        .await;
    // Epochs end at 2^31 - 1 (they fit a signed 32-bit column): 2^31 is out of range.
    let case = invalid(
        "session keys of epoch 2^31",
        "epoch",
        Call::GetSessionKeys(pb::GetSessionKeysRequest {
            session_id: session.to_string(),
            epoch: Some(1 << 31),
        }),
    );
    refuse_all(server, &mut db, &phone, vec![case]).await;
}

async fn escrow_read_of_an_epoch_beyond_the_current_one(server: &TestServer) {
    let mut db = RawDb::open(&server.db).await;
    let session = lone_session(server).await;
    let staff = role_client(server, pb::Role::Staff).await;
    let read = |epochs: Vec<u32>| {
        Call::GetEscrowedKeys(pb::GetEscrowedKeysRequest {
            session_id: session.to_string(),
            epochs,
            reason: "case 42".into(),
        })
    };
    let not_found = |what: &str, epochs: Vec<u32>| Case {
        what: what.into(),
        call: read(epochs),
        code: Code::NotFound,
        field: String::new(),
    };
    let cases = vec![
        not_found("escrow read of epoch 2 at epoch 1", vec![1, 2]),
        invalid(
            "escrow read of epoch 2^31",
            "epochs[0]",
            read(vec![1 << 31]),
        ),
    ];
    refuse_all(server, &mut db, &staff, cases).await;
}

async fn escrow_reason_with_a_nul(server: &TestServer) {
    let mut db = RawDb::open(&server.db).await;
    let session = lone_session(server).await;
    let staff = role_client(server, pb::Role::Staff).await;
    let before = db.fingerprint().await;
    let outcome = staff
        .escrow()
        .get_escrowed_keys(pb::GetEscrowedKeysRequest {
            session_id: session.to_string(),
            epochs: vec![1],
            reason: "case\u{0}42".into(),
        })
        .await;
    // Control characters (but newline and tab) are refused as bad input on every backend,
    // before anything is recorded: PostgreSQL's text cannot even hold a NUL.
    let status = outcome.expect_err("a NUL in a reason is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("reason"), "{status:?}");
    assert_eq!(db.fingerprint().await, before);
}

async fn republishing_the_current_key(server: &TestServer) {
    let mut db = RawDb::open(&server.db).await;
    let phone = TestDevice::enroll(server, "alice", "phone").await;
    let before = db.fingerprint().await;
    let again = phone
        .client(server)
        .await
        .key_directory()
        .publish_device_key(phone.publish_request())
        .await
        .expect("publishing the current key again is a safe retry")
        .into_inner();
    assert_eq!(
        again.key_id,
        phone.xwing.encapsulation_key().key_id().as_bytes().to_vec()
    );
    assert_eq!(again.version, 1);
    assert_eq!(db.fingerprint().await, before, "a retry changes nothing");
}
