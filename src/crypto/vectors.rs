//! The published test vectors, `tests/vectors/keyhold-v1.json`, and the test that holds the
//! code, the vectors and `docs/formats.md` together.
//!
//! Every vector is made by the crypto core itself from fixed inputs, with the randomness an
//! operation would draw given as an input (`eseed` for X-Wing, the KEK envelope's salt, the
//! message nonce). The test regenerates the whole file and compares it with the committed one,
//! so a change to any format fails CI until the vectors (and the spec) are changed with it;
//! then it checks each vector the other way, as a second implementation would: keys derived
//! by the steps `docs/formats.md` writes down (not by the core's functions) open what the core
//! sealed.
//!
//! To write the file after a deliberate format change:
//!
//! ```text
//! KEYHOLD_WRITE_VECTORS=1 cargo test --lib crypto::vectors
//! ```

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::hkdf::{KeyType, Prk, Salt, HKDF_SHA256};
use serde_json::{json, Value};

use super::envelope::{
    open_dek, open_under_kek, seal_under_kek_salted, wrap_dek_deterministic, KekContext, KekSuite,
    Recipient, WrapContext,
};
use super::ids::{ConversationId, DeviceId, Epoch, KeyId, MessageId, SessionId, UserId};
use super::keys::{Dek, Kek, KekVersion};
use super::message::{message_key, open_message, MessageContext};
use super::sign::{
    ClientWrap, ClientWrappedKeySet, DeviceKeyBundle, EscrowWrap, IdentityKeyPair, Prekey,
    PrekeyKind, Signable,
};
use super::xwing::DecapsulationKey;
use super::Suite;

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/keyhold-v1.json");

const SESSION: &str = "01890a5d-ac96-774b-bcce-b302099a8057";
const MESSAGE: &str = "01890a5d-ac97-7a1f-8c11-2f5d7e9b0a42";

/// 32 bytes named by `name`: SHA-256 of `keyhold/v1/test-vector/<name>`, so that no input is
/// a hand-typed hex string.
fn bytes32(name: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("keyhold/v1/test-vector/{name}").as_bytes(),
    );
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn bytes64(name: &str) -> [u8; 64] {
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(&bytes32(&format!("{name}/0")));
    out[32..].copy_from_slice(&bytes32(&format!("{name}/1")));
    out
}

fn decap(name: &str) -> DecapsulationKey {
    DecapsulationKey::from_seed(&bytes32(name)).expect("a seed is a key")
}

fn identity(name: &str) -> IdentityKeyPair {
    IdentityKeyPair::from_seed(&bytes32(name)).expect("a seed is a key")
}

fn session() -> SessionId {
    SessionId::parse(SESSION).expect("a UUIDv7")
}

fn user(s: &str) -> UserId {
    UserId::new(s).expect("a user id")
}

fn device(s: &str) -> DeviceId {
    DeviceId::new(s).expect("a device id")
}

fn epoch(n: u32) -> Epoch {
    Epoch::new(n).expect("an epoch")
}

// ---------------------------------------------------------------------------------------------
// The steps docs/formats.md gives, written out with nothing but HKDF and AES-256-GCM.

struct Len32;

impl KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

fn expand(prk: &Prk, info: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    prk.expand(info, Len32)
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-Expand of 32 bytes");
    out
}

fn aes_gcm_open(key: &[u8; 32], nonce: [u8; 12], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).ok()?);
    let mut buf = sealed.to_vec();
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        .ok()?
        .len();
    buf.truncate(len);
    Some(buf)
}

/// `key = HKDF-Expand-SHA256(PRK = ss, info = "keyhold/v1/dek-wrap-key" || suite, L = 32)`.
fn dek_wrap_key(ss: &[u8; 32], suite: u8) -> [u8; 32] {
    expand(
        &Prk::new_less_safe(HKDF_SHA256, ss),
        &[b"keyhold/v1/dek-wrap-key", &[suite]],
    )
}

/// `key = HKDF-SHA256(salt, IKM = KEK, info = "keyhold/v1/kek-envelope-key", L = 32)`.
fn kek_envelope_key(kek: &[u8; 32], salt: &[u8]) -> [u8; 32] {
    expand(
        &Salt::new(HKDF_SHA256, salt).extract(kek),
        &[b"keyhold/v1/kek-envelope-key"],
    )
}

/// `key = HKDF-SHA256(salt = "keyhold/v1/message-key", IKM = DEK,
///                    info = suite || session id || epoch (u32 BE) || message id, L = 32)`.
fn message_key_bytes(dek: &[u8; 32], c: &MessageContext) -> [u8; 32] {
    expand(
        &Salt::new(HKDF_SHA256, b"keyhold/v1/message-key").extract(dek),
        &[
            &[Suite::XWingAes256GcmV1 as u8],
            c.session_id.as_bytes(),
            &c.epoch.get().to_be_bytes(),
            c.message_id.as_bytes(),
        ],
    )
}

/// `key id = SHA-256("keyhold/v1/key-id" || encapsulation key)[0..16]`, no length prefix.
fn key_id_bytes(encapsulation_key: &[u8]) -> Vec<u8> {
    let d = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &[b"keyhold/v1/key-id".as_slice(), encapsulation_key].concat(),
    );
    d.as_ref()[..16].to_vec()
}

// ---------------------------------------------------------------------------------------------
// Generation.

fn recipient_json(r: &Recipient) -> Value {
    match r {
        Recipient::Device { user, device } => {
            json!({"kind": "device", "user_id": user.as_str(), "device_id": device.as_str()})
        }
        Recipient::Escrow => json!({"kind": "escrow"}),
    }
}

fn xwing_vectors() -> Value {
    let mut out = Vec::new();
    for name in ["xwing/alice-phone", "xwing/escrow"] {
        let key = decap(name);
        let ek = key.encapsulation_key();
        let eseed = bytes64(&format!("{name}/eseed"));
        let (ct, ss) = ek.encapsulate_deterministic(&eseed).expect("encapsulate");
        out.push(json!({
            "seed": hex::encode(key.expose_seed()),
            "encapsulation_key": hex::encode(ek.to_bytes()),
            "key_id": hex::encode(ek.key_id().as_bytes()),
            "eseed": hex::encode(eseed),
            "ciphertext": hex::encode(ct.as_bytes()),
            "shared_secret": hex::encode(ss.expose_secret()),
        }));
    }
    Value::Array(out)
}

fn dek_envelope_vectors() -> Value {
    let cases = [
        (
            "dek/device",
            "xwing/alice-phone",
            1,
            Recipient::Device {
                user: user("alice"),
                device: device("phone"),
            },
        ),
        ("dek/escrow", "xwing/escrow", 7, Recipient::Escrow),
    ];
    let mut out = Vec::new();
    for (name, key_name, n, recipient) in cases {
        let key = decap(key_name);
        let ek = key.encapsulation_key();
        let context = WrapContext {
            session_id: session(),
            epoch: epoch(n),
            recipient: recipient.clone(),
        };
        let dek = Dek::from_bytes(bytes32(&format!("{name}/dek")));
        let eseed = bytes64(&format!("{name}/eseed"));
        let (_, ss) = ek.encapsulate_deterministic(&eseed).expect("encapsulate");
        let envelope = wrap_dek_deterministic(&dek, ek, &context, &eseed).expect("wrap");
        out.push(json!({
            "recipient_seed": hex::encode(key.expose_seed()),
            "recipient_key_id": hex::encode(ek.key_id().as_bytes()),
            "session_id": SESSION,
            "session_id_bytes": hex::encode(session().as_bytes()),
            "epoch": n,
            "recipient": recipient_json(&recipient),
            "dek": hex::encode(dek.expose_secret()),
            "eseed": hex::encode(eseed),
            "shared_secret": hex::encode(ss.expose_secret()),
            "wrap_key": hex::encode(dek_wrap_key(ss.expose_secret(), Suite::XWingAes256GcmV1 as u8)),
            "associated_data": hex::encode(context.associated_data(Suite::XWingAes256GcmV1, &ek.key_id())),
            "envelope": hex::encode(envelope.as_bytes()),
        }));
    }
    Value::Array(out)
}

fn kek_contexts() -> Vec<(&'static str, KekContext, Value)> {
    vec![
        (
            "kek/service-dek",
            KekContext::ServiceDek {
                session_id: session(),
                epoch: epoch(3),
            },
            json!({"kind": "service_dek", "session_id": SESSION, "epoch": 3}),
        ),
        (
            "kek/ratchet-state",
            KekContext::RatchetState {
                user: user("alice"),
                device: device("phone"),
                conversation: ConversationId::new("conv-1").expect("a conversation id"),
            },
            json!({"kind": "ratchet_state", "user_id": "alice", "device_id": "phone", "conversation_id": "conv-1"}),
        ),
        (
            "kek/idempotent-answer",
            KekContext::IdempotentAnswer {
                scope: "admin:0190c0ffee".into(),
                key: "create-token-1".into(),
            },
            json!({"kind": "idempotent_answer", "scope": "admin:0190c0ffee", "idempotency_key": "create-token-1"}),
        ),
    ]
}

fn kek_envelope_vectors() -> Value {
    let kek = Kek::from_bytes(KekVersion(2), bytes32("kek/key"));
    let mut out = Vec::new();
    for (name, context, context_json) in kek_contexts() {
        let salt = bytes32(&format!("{name}/salt"));
        let payload = match &context {
            KekContext::ServiceDek { .. } => bytes32(&format!("{name}/payload")).to_vec(),
            _ => format!("payload of {name}").into_bytes(),
        };
        let envelope = seal_under_kek_salted(&kek, &payload, &context, &salt).expect("seal");
        out.push(json!({
            "kek": hex::encode(kek.expose_secret()),
            "kek_version": kek.version().0,
            "context": context_json,
            "salt": hex::encode(salt),
            "payload": hex::encode(&payload),
            "envelope_key": hex::encode(kek_envelope_key(kek.expose_secret(), &salt)),
            "associated_data": hex::encode(context.associated_data(KekSuite::Aes256GcmHkdfV1, kek.version())),
            "envelope": hex::encode(&envelope),
        }));
    }
    Value::Array(out)
}

fn message_context() -> MessageContext {
    MessageContext {
        session_id: session(),
        epoch: epoch(2),
        message_id: MessageId::parse(MESSAGE).expect("a UUIDv7"),
    }
}

fn message_vectors() -> Value {
    let dek = Dek::from_bytes(bytes32("message/dek"));
    let context = message_context();
    let mut out = Vec::new();
    for (name, plaintext, aad) in [
        ("message/hello", b"hello, world".as_slice(), b"".as_slice()),
        (
            "message/with-ad",
            b"second message".as_slice(),
            b"header v1".as_slice(),
        ),
    ] {
        let nonce: [u8; 12] = bytes32(&format!("{name}/nonce"))[..12]
            .try_into()
            .expect("12 bytes");
        let mut ciphertext = plaintext.to_vec();
        message_key(&dek, &context)
            .expect("key")
            .seal_in_place_with_nonce(nonce, &mut ciphertext, aad)
            .expect("seal");
        out.push(json!({
            "dek": hex::encode(dek.expose_secret()),
            "session_id": SESSION,
            "epoch": context.epoch.get(),
            "message_id": MESSAGE,
            "message_id_bytes": hex::encode(context.message_id.as_bytes()),
            "message_key": hex::encode(message_key_bytes(dek.expose_secret(), &context)),
            "nonce": hex::encode(nonce),
            "plaintext": hex::encode(plaintext),
            "associated_data": hex::encode(aad),
            "ciphertext": hex::encode(&ciphertext),
        }));
    }
    Value::Array(out)
}

fn signed(item: &impl Signable, signer: &IdentityKeyPair, mut fields: Value) -> Value {
    fields["identity_seed"] = json!(hex::encode(signer.expose_seed()));
    fields["identity_key"] = json!(hex::encode(signer.public_key().as_bytes()));
    fields["canonical_encoding"] = json!(hex::encode(item.canonical_encoding()));
    fields["signature"] = json!(hex::encode(signer.sign(item).as_bytes()));
    fields
}

/// The key set of the vectors: its wraps listed out of order, two of them where comparing the
/// concatenated fields would give the other order than comparing field by field ("a"/"zz"
/// before "ab"/"a").
fn key_set() -> ClientWrappedKeySet {
    let wrap = |u: &str, d: &str, key: &str, n: u8| {
        let ek = decap(key).encapsulation_key().clone();
        let context = WrapContext {
            session_id: session(),
            epoch: epoch(1),
            recipient: Recipient::Device {
                user: user(u),
                device: device(d),
            },
        };
        let dek = Dek::from_bytes(bytes32("keyset/dek"));
        ClientWrap {
            user: user(u),
            device: device(d),
            key_id: ek.key_id(),
            envelope: wrap_dek_deterministic(
                &dek,
                &ek,
                &context,
                &bytes64(&format!("keyset/eseed/{n}")),
            )
            .expect("wrap"),
        }
    };
    let escrow_key = decap("xwing/escrow").encapsulation_key().clone();
    let escrow_context = WrapContext {
        session_id: session(),
        epoch: epoch(1),
        recipient: Recipient::Escrow,
    };
    ClientWrappedKeySet {
        suite: Suite::XWingAes256GcmV1,
        session_id: session(),
        epoch: epoch(1),
        author_user: user("a"),
        author_device: device("zz"),
        wraps: vec![
            wrap("ab", "a", "keyset/ab-a", 1),
            wrap("a", "zz", "keyset/a-zz", 2),
            wrap("a", "b", "keyset/a-b", 3),
        ],
        escrow: Some(EscrowWrap {
            key_id: escrow_key.key_id(),
            envelope: wrap_dek_deterministic(
                &Dek::from_bytes(bytes32("keyset/dek")),
                &escrow_key,
                &escrow_context,
                &bytes64("keyset/eseed/escrow"),
            )
            .expect("wrap"),
        }),
    }
}

fn signature_vectors() -> Value {
    let signer = identity("identity/a-zz");
    let ek = decap("xwing/alice-phone").encapsulation_key().clone();
    let bundle = DeviceKeyBundle {
        suite: Suite::XWingAes256GcmV1,
        user: user("alice"),
        device: device("phone"),
        identity_key: identity("identity/alice-phone").public_key(),
        encapsulation_key: ek.clone(),
    };
    let bundle_signer = identity("identity/alice-phone");
    let prekeys: Vec<Value> = [
        (PrekeyKind::OneTime, "prekey/one-time", "one_time"),
        (PrekeyKind::LastResort, "prekey/last-resort", "last_resort"),
    ]
    .into_iter()
    .map(|(kind, key, kind_name)| {
        let p = Prekey {
            suite: Suite::XWingAes256GcmV1,
            user: user("alice"),
            device: device("phone"),
            kind,
            key: decap(key).encapsulation_key().clone(),
        };
        signed(
            &p,
            &bundle_signer,
            json!({
                "suite": Suite::XWingAes256GcmV1 as u8,
                "user_id": "alice",
                "device_id": "phone",
                "kind": kind_name,
                "kind_byte": kind as u8,
                "encapsulation_key": hex::encode(p.key.to_bytes()),
            }),
        )
    })
    .collect();
    let set = key_set();
    let wraps: Vec<Value> = set
        .wraps
        .iter()
        .map(|w| {
            json!({
                "user_id": w.user.as_str(),
                "device_id": w.device.as_str(),
                "key_id": hex::encode(w.key_id.as_bytes()),
                "envelope": hex::encode(w.envelope.as_bytes()),
            })
        })
        .collect();
    let escrow = set.escrow.as_ref().map(|e| {
        json!({"key_id": hex::encode(e.key_id.as_bytes()), "envelope": hex::encode(e.envelope.as_bytes())})
    });
    json!({
        "device_key_bundle": [signed(&bundle, &bundle_signer, json!({
            "suite": Suite::XWingAes256GcmV1 as u8,
            "user_id": "alice",
            "device_id": "phone",
            "encapsulation_key": hex::encode(ek.to_bytes()),
        }))],
        "prekey": prekeys,
        "client_wrapped_key_set": [signed(&set, &signer, json!({
            "suite": Suite::XWingAes256GcmV1 as u8,
            "session_id": SESSION,
            "epoch": set.epoch.get(),
            "author_user_id": set.author_user.as_str(),
            "author_device_id": set.author_device.as_str(),
            "wraps_as_listed": wraps,
            "escrow": escrow,
        }))],
    })
}

fn all_vectors() -> Value {
    json!({
        "format": "keyhold-v1",
        "spec": "docs/formats.md",
        "generated_by": "KEYHOLD_WRITE_VECTORS=1 cargo test --lib crypto::vectors",
        "inputs": "every secret input is SHA-256(\"keyhold/v1/test-vector/<name>\"); the hex is what counts",
        "xwing": xwing_vectors(),
        "dek_envelope": dek_envelope_vectors(),
        "kek_envelope": kek_envelope_vectors(),
        "message": message_vectors(),
        "signatures": signature_vectors(),
    })
}

// ---------------------------------------------------------------------------------------------
// The checks.

fn h(v: &Value, field: &str) -> Vec<u8> {
    hex::decode(
        v[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} is a string")),
    )
    .unwrap_or_else(|e| panic!("{field} is hex: {e}"))
}

fn h32(v: &Value, field: &str) -> [u8; 32] {
    h(v, field)
        .try_into()
        .unwrap_or_else(|_| panic!("{field} is 32 bytes"))
}

/// The committed vectors (written first, once, under `KEYHOLD_WRITE_VECTORS`).
fn committed() -> Value {
    static WRITE: std::sync::Once = std::sync::Once::new();
    if std::env::var_os("KEYHOLD_WRITE_VECTORS").is_some() {
        WRITE.call_once(|| {
            let text = serde_json::to_string_pretty(&all_vectors()).expect("JSON") + "\n";
            std::fs::write(PATH, text).expect("write the vectors");
        });
    }
    let text = std::fs::read_to_string(PATH).expect("tests/vectors/keyhold-v1.json");
    serde_json::from_str(&text).expect("the vectors are JSON")
}

#[test]
fn the_committed_vectors_are_what_the_code_makes() {
    let made = all_vectors();
    let committed = committed();
    for section in [
        "xwing",
        "dek_envelope",
        "kek_envelope",
        "message",
        "signatures",
    ] {
        assert_eq!(
            committed[section], made[section],
            "the {section} vectors differ from what the code makes: a format changed. If that \
             was meant, change docs/formats.md and rerun with KEYHOLD_WRITE_VECTORS=1"
        );
    }
    assert_eq!(committed, made);
}

#[test]
fn key_ids_are_the_documented_hash() {
    let committed = committed();
    for v in committed["xwing"].as_array().expect("xwing vectors") {
        let key = DecapsulationKey::from_seed(&h32(v, "seed")).expect("seed");
        let ek = h(v, "encapsulation_key");
        assert_eq!(key.encapsulation_key().to_bytes(), ek);
        assert_eq!(key_id_bytes(&ek), h(v, "key_id"));
        let ct = super::xwing::Ciphertext::from_slice(&h(v, "ciphertext")).expect("ciphertext");
        assert_eq!(
            key.decapsulate(&ct).expect("decapsulate").expose_secret(),
            &h32(v, "shared_secret")
        );
    }
}

#[test]
fn dek_envelopes_open_by_the_documented_steps() {
    let committed = committed();
    for v in committed["dek_envelope"].as_array().expect("dek vectors") {
        let envelope = h(v, "envelope");
        assert_eq!(envelope.len(), 1169);
        assert_eq!(envelope[0], 0x01, "the suite byte");
        let key = dek_wrap_key(&h32(v, "shared_secret"), envelope[0]);
        assert_eq!(key, h32(v, "wrap_key"));
        let dek = aes_gcm_open(&key, [0u8; 12], &h(v, "associated_data"), &envelope[1121..])
            .expect("the documented steps open the envelope");
        assert_eq!(dek, h(v, "dek"));
        // And the core opens it with the recipient's key under the context the vector names.
        let recipient = match v["recipient"]["kind"].as_str() {
            Some("device") => Recipient::Device {
                user: user(v["recipient"]["user_id"].as_str().expect("user")),
                device: device(v["recipient"]["device_id"].as_str().expect("device")),
            },
            _ => Recipient::Escrow,
        };
        let context = WrapContext {
            session_id: SessionId::parse(v["session_id"].as_str().expect("session")).expect("id"),
            epoch: epoch(v["epoch"].as_u64().expect("epoch") as u32),
            recipient,
        };
        let key = DecapsulationKey::from_seed(&h32(v, "recipient_seed")).expect("seed");
        let parsed = super::envelope::DekEnvelope::from_bytes(&envelope).expect("envelope");
        let opened = open_dek(&parsed, &key, &context).expect("open");
        assert_eq!(opened.expose_secret().as_slice(), h(v, "dek"));
        assert_eq!(
            key.encapsulation_key().key_id(),
            KeyId::from_slice(&h(v, "recipient_key_id")).expect("id")
        );
    }
}

#[test]
fn kek_envelopes_open_by_the_documented_steps() {
    let committed = committed();
    let contexts = kek_contexts();
    for (v, (_, context, _)) in committed["kek_envelope"]
        .as_array()
        .expect("kek vectors")
        .iter()
        .zip(&contexts)
    {
        let envelope = h(v, "envelope");
        let version = u32::from_be_bytes(envelope[1..5].try_into().expect("4 bytes"));
        assert_eq!(
            u64::from(version),
            v["kek_version"].as_u64().expect("version")
        );
        assert_eq!(envelope[5..37], h(v, "salt"));
        let key = kek_envelope_key(&h32(v, "kek"), &envelope[5..37]);
        assert_eq!(key, h32(v, "envelope_key"));
        let payload = aes_gcm_open(&key, [0u8; 12], &h(v, "associated_data"), &envelope[37..])
            .expect("the documented steps open the envelope");
        assert_eq!(payload, h(v, "payload"));
        let kek = Kek::from_bytes(KekVersion(version), h32(v, "kek"));
        assert_eq!(
            open_under_kek(&kek, &envelope, context)
                .expect("open")
                .as_slice(),
            h(v, "payload").as_slice()
        );
    }
}

#[test]
fn messages_open_by_the_documented_steps() {
    let committed = committed();
    let context = message_context();
    for v in committed["message"].as_array().expect("message vectors") {
        let key = message_key_bytes(&h32(v, "dek"), &context);
        assert_eq!(key, h32(v, "message_key"));
        let nonce: [u8; 12] = h(v, "nonce").try_into().expect("12 bytes");
        let plain = aes_gcm_open(&key, nonce, &h(v, "associated_data"), &h(v, "ciphertext"))
            .expect("the documented steps open the message");
        assert_eq!(plain, h(v, "plaintext"));
        let dek = Dek::from_bytes(h32(v, "dek"));
        assert_eq!(
            open_message(
                &dek,
                &context,
                &nonce,
                &h(v, "ciphertext"),
                &h(v, "associated_data")
            )
            .expect("open"),
            h(v, "plaintext")
        );
    }
}

#[test]
fn signatures_verify_over_the_documented_encodings() {
    let committed = committed();
    let sigs = &committed["signatures"];
    for kind in ["device_key_bundle", "prekey", "client_wrapped_key_set"] {
        for v in sigs[kind].as_array().expect("signature vectors") {
            let public = aws_lc_rs::signature::UnparsedPublicKey::new(
                &aws_lc_rs::signature::ED25519,
                h(v, "identity_key"),
            );
            public
                .verify(&h(v, "canonical_encoding"), &h(v, "signature"))
                .unwrap_or_else(|_| panic!("{kind}: the signature covers the encoding"));
        }
    }
    // The key set's encoding lists its wraps sorted field by field, not as listed.
    let set = &sigs["client_wrapped_key_set"][0];
    let encoding = h(set, "canonical_encoding");
    let position = |user: &str, device: &str| {
        let mut needle = (user.len() as u32).to_be_bytes().to_vec();
        needle.extend_from_slice(user.as_bytes());
        needle.extend_from_slice(&(device.len() as u32).to_be_bytes());
        needle.extend_from_slice(device.as_bytes());
        encoding
            .windows(needle.len())
            .rposition(|w| w == needle.as_slice())
            .expect("the wrap is encoded")
    };
    assert!(position("a", "b") < position("a", "zz"));
    assert!(position("a", "zz") < position("ab", "a"));
}
