//! Requests and checks the integration tests share: signed prekeys and uploads, the two kinds
//! of CreateSession request, client-wrapped key sets signed by their author, a device opening
//! its own session key, revoking a device's current key, and the check that a call was refused
//! with a code and a message naming the field.

use keyhold::client::Client;
use keyhold::crypto::envelope::{open_dek, wrap_dek, DekEnvelope, Recipient, WrapContext};
use keyhold::crypto::ids::{DeviceId, Epoch, KeyId, SessionId, UserId};
use keyhold::crypto::keys::Dek;
use keyhold::crypto::sign::{ClientWrap, ClientWrappedKeySet, EscrowWrap, Prekey, PrekeyKind};
use keyhold::crypto::xwing::{DecapsulationKey, EncapsulationKey};
use keyhold::crypto::Suite;
use keyhold::proto::keyhold::v1 as pb;
use keyhold::store::user_keys::UserKey;
use tonic::{Code, Status};

use super::raw_db::{Fingerprint, RawDb};
use super::server::{TestDevice, TestServer};
use super::TestDb;

/// The status `result` was refused with, after checking its code is `code`.
fn refusal<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    let err = result.expect_err("the call must be refused");
    assert_eq!(err.code(), code, "{err:?}");
    err
}

/// Asserts that `result` was refused with `code` and a message that starts with `field` (the
/// field comes first in every message that names one; an empty `field` names none).
pub fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, field: &str) {
    let err = refusal(result, code);
    assert!(
        err.message().starts_with(field),
        "the message must name {field}: {:?}",
        err.message()
    );
}

/// Asserts that `result` was refused with `code` and a message that contains `text` anywhere
/// (for refusals that name a device or a state rather than a field).
pub fn assert_code_mentions<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, text: &str) {
    let err = refusal(result, code);
    assert!(
        err.message().contains(text),
        "the message must mention {text}: {:?}",
        err.message()
    );
}

/// Every table's row counts, read behind the server's back (`common::raw_db`): equal before
/// and after a call means the call wrote nothing.
pub async fn fingerprint(db: &TestDb) -> Fingerprint {
    RawDb::open(db).await.fingerprint().await
}

/// A client holding a fresh unbound token of `role` (app, staff or admin).
pub async fn role_client(server: &TestServer, role: pb::Role) -> Client {
    server.client(&server.token(role, "", "").await).await
}

// ---------------------------------------------------------------------------------------------
// Device keys and prekeys.

/// `d`'s PublishDeviceKey request for the X-Wing key `xwing`, signed with its identity key.
pub fn bundle_request(d: &TestDevice, xwing: &DecapsulationKey) -> pb::PublishDeviceKeyRequest {
    let bundle = keyhold::crypto::sign::DeviceKeyBundle {
        suite: Suite::XWingAes256GcmV1,
        user: d.user.clone(),
        device: d.device.clone(),
        identity_key: d.identity.public_key(),
        encapsulation_key: xwing.encapsulation_key().clone(),
    };
    pb::PublishDeviceKeyRequest {
        user_id: d.user.to_string(),
        device_id: d.device.to_string(),
        suite: pb::Suite::XwingAes256gcmV1 as i32,
        encapsulation_key: xwing.encapsulation_key().to_bytes(),
        identity_key: d.identity.public_key().as_bytes().to_vec(),
        signature: d.identity.sign(&bundle).as_bytes().to_vec(),
    }
}

/// The RevokeDeviceKey request for `d`'s current key.
pub fn revoke_request(d: &TestDevice) -> pb::RevokeDeviceKeyRequest {
    pb::RevokeDeviceKeyRequest {
        user_id: d.user.to_string(),
        device_id: d.device.to_string(),
        key_id: d.xwing.encapsulation_key().key_id().as_bytes().to_vec(),
    }
}

/// Revokes `d`'s current key, as `d` itself.
pub async fn revoke_current_key(server: &TestServer, d: &TestDevice) {
    d.client(server)
        .await
        .key_directory()
        .revoke_device_key(revoke_request(d))
        .await
        .expect("revoke");
}

/// A fresh prekey signed by `d`'s identity key as `kind`, and its key id.
pub fn signed_prekey(d: &TestDevice, kind: PrekeyKind) -> (pb::SignedPrekey, KeyId) {
    let key = DecapsulationKey::generate().expect("keygen");
    let prekey = Prekey {
        suite: Suite::XWingAes256GcmV1,
        user: d.user.clone(),
        device: d.device.clone(),
        kind,
        key: key.encapsulation_key().clone(),
    };
    let signature = d.identity.sign(&prekey);
    (
        pb::SignedPrekey {
            suite: pb::Suite::XwingAes256gcmV1 as i32,
            encapsulation_key: prekey.key.to_bytes(),
            signature: signature.as_bytes().to_vec(),
        },
        prekey.key.key_id(),
    )
}

/// `n` fresh one-time prekeys of `d`, and their key ids.
pub fn signed_prekeys(d: &TestDevice, n: usize) -> (Vec<pb::SignedPrekey>, Vec<KeyId>) {
    (0..n)
        .map(|_| signed_prekey(d, PrekeyKind::OneTime))
        .unzip()
}

/// The UploadPrekeys request of `d` for these prekeys.
pub fn upload_request(
    d: &TestDevice,
    one_time: Vec<pb::SignedPrekey>,
    last_resort: Option<pb::SignedPrekey>,
) -> pb::UploadPrekeysRequest {
    pb::UploadPrekeysRequest {
        user_id: d.user.to_string(),
        device_id: d.device.to_string(),
        one_time_prekeys: one_time,
        last_resort_prekey: last_resort,
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions.

/// A recipient list naming `users`.
pub fn user_ids(users: &[&str]) -> Option<pb::create_session_request::Recipients> {
    Some(pb::create_session_request::Recipients::UserIds(
        pb::UserIdList {
            user_ids: users.iter().map(|u| u.to_string()).collect(),
        },
    ))
}

/// A SERVICE_WRAPPED CreateSession request by `author` with `recipients`.
pub fn service_wrapped_request(author: &str, recipients: &[&str]) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        mode: pb::SessionMode::ServiceWrapped as i32,
        author_user_id: author.into(),
        recipients: user_ids(recipients),
        ..Default::default()
    }
}

/// A new SERVICE_WRAPPED session by `author` with `recipients`, created through `app`.
pub async fn service_wrapped_session(app: &Client, author: &str, recipients: &[&str]) -> SessionId {
    let created = app
        .sessions()
        .create_session(service_wrapped_request(author, recipients))
        .await
        .expect("create a service-wrapped session")
        .into_inner();
    SessionId::parse(&created.session_id).expect("session id")
}

/// A CLIENT_WRAPPED CreateSession request by `author` for `session`, carrying `key_set`.
pub fn client_wrapped_request(
    author: &TestDevice,
    session: SessionId,
    recipients: Option<pb::create_session_request::Recipients>,
    key_set: pb::ClientWrappedKeySet,
) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        mode: pb::SessionMode::ClientWrapped as i32,
        author_user_id: author.user.to_string(),
        author_device_id: author.device.to_string(),
        session_id: session.to_string(),
        recipients,
        key_set: Some(key_set),
        ..Default::default()
    }
}

/// What a DEK is wrapped to for `d` at `epoch` of `session`.
pub fn device_context(d: &TestDevice, session: SessionId, epoch: Epoch) -> WrapContext {
    WrapContext {
        session_id: session,
        epoch,
        recipient: Recipient::Device {
            user: d.user.clone(),
            device: d.device.clone(),
        },
    }
}

/// A device a client-wrapped key set wraps the DEK to, and the key it wraps to.
pub struct WrapTarget {
    /// The device's user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// The id of `key`.
    pub key_id: KeyId,
    /// The device's encapsulation key.
    pub key: EncapsulationKey,
}

impl WrapTarget {
    /// `d`, wrapped to its current key as the test knows it.
    pub fn device(d: &TestDevice) -> WrapTarget {
        WrapTarget {
            user: d.user.clone(),
            device: d.device.clone(),
            key_id: d.xwing.encapsulation_key().key_id(),
            key: d.xwing.encapsulation_key().clone(),
        }
    }

    /// A device key as the store holds it.
    pub fn stored(k: &UserKey) -> WrapTarget {
        WrapTarget {
            user: k.user.clone(),
            device: k.device.clone(),
            key_id: k.key_id,
            key: EncapsulationKey::from_slice(&k.encapsulation_key).expect("stored key"),
        }
    }

    /// Every device of `devices`.
    pub fn devices(devices: &[&TestDevice]) -> Vec<WrapTarget> {
        devices.iter().map(|d| WrapTarget::device(d)).collect()
    }

    /// Every stored key of `keys`.
    pub fn all_stored(keys: &[UserKey]) -> Vec<WrapTarget> {
        keys.iter().map(WrapTarget::stored).collect()
    }
}

/// The key set `author` signs for `epoch` of `session`: `dek` wrapped to every target, and to
/// `escrow` when given.
pub fn key_set(
    author: &TestDevice,
    session: SessionId,
    epoch: Epoch,
    dek: &Dek,
    targets: &[WrapTarget],
    escrow: Option<&EncapsulationKey>,
) -> ClientWrappedKeySet {
    let wraps = targets
        .iter()
        .map(|t| {
            let ctx = WrapContext {
                session_id: session,
                epoch,
                recipient: Recipient::Device {
                    user: t.user.clone(),
                    device: t.device.clone(),
                },
            };
            ClientWrap {
                user: t.user.clone(),
                device: t.device.clone(),
                key_id: t.key_id,
                envelope: wrap_dek(dek, &t.key, &ctx).expect("wrap"),
            }
        })
        .collect();
    let escrow = escrow.map(|key| {
        let ctx = WrapContext {
            session_id: session,
            epoch,
            recipient: Recipient::Escrow,
        };
        EscrowWrap {
            key_id: key.key_id(),
            envelope: wrap_dek(dek, key, &ctx).expect("escrow wrap"),
        }
    });
    ClientWrappedKeySet {
        suite: Suite::XWingAes256GcmV1,
        session_id: session,
        epoch,
        author_user: author.user.clone(),
        author_device: author.device.clone(),
        wraps,
        escrow,
    }
}

/// `set` on the wire, with `signature`.
pub fn wire_key_set(set: &ClientWrappedKeySet, signature: Vec<u8>) -> pb::ClientWrappedKeySet {
    pb::ClientWrappedKeySet {
        epoch: set.epoch.get(),
        wraps: set
            .wraps
            .iter()
            .map(|w| pb::ClientWrap {
                user_id: w.user.to_string(),
                device_id: w.device.to_string(),
                key_id: w.key_id.as_bytes().to_vec(),
                envelope: w.envelope.as_bytes().to_vec(),
            })
            .collect(),
        escrow: set.escrow.as_ref().map(|e| pb::EscrowWrap {
            escrow_key_id: e.key_id.as_bytes().to_vec(),
            envelope: e.envelope.as_bytes().to_vec(),
        }),
        signature,
    }
}

/// `set` on the wire, signed with `author`'s identity key.
pub fn signed_key_set(author: &TestDevice, set: &ClientWrappedKeySet) -> pb::ClientWrappedKeySet {
    wire_key_set(set, author.identity.sign(set).as_bytes().to_vec())
}

/// A fresh DEK wrapped by `author` to `targets` for `epoch` of `session`, with an escrow wrap
/// to the server's escrow key when `escrow`, signed, on the wire.
pub fn fresh_key_set(
    server: &TestServer,
    author: &TestDevice,
    session: SessionId,
    epoch: u32,
    targets: &[WrapTarget],
    escrow: bool,
) -> pb::ClientWrappedKeySet {
    let epoch = Epoch::new(epoch).expect("epoch");
    let dek = Dek::generate().expect("dek");
    let escrow = escrow.then(|| server.escrow_key.encapsulation_key());
    signed_key_set(
        author,
        &key_set(author, session, epoch, &dek, targets, escrow),
    )
}

/// The current device keys of `users`, read from the store.
pub async fn current_keys(server: &TestServer, users: &[&str]) -> Vec<UserKey> {
    let users: Vec<UserId> = users
        .iter()
        .map(|u| UserId::new(*u).expect("user id"))
        .collect();
    (server.store.conn().await.expect("conn"))
        .current_user_keys(&users)
        .await
        .expect("current keys")
}

/// The DEK of `epoch` of `session` that `d` opens from its own session key, fetched as `d`
/// through GetSessionKeys; `None` when `d` holds no key of the epoch (NOT_FOUND).
pub async fn open_own_key(
    server: &TestServer,
    d: &TestDevice,
    session: SessionId,
    epoch: Epoch,
) -> Option<Dek> {
    let response = d
        .client(server)
        .await
        .sessions()
        .get_session_keys(pb::GetSessionKeysRequest {
            session_id: session.to_string(),
            epoch: Some(epoch.get()),
        })
        .await;
    let keys = match response {
        Ok(r) => r.into_inner().session_keys,
        Err(status) if status.code() == Code::NotFound => return None,
        Err(status) => panic!("get session keys: {status:?}"),
    };
    assert!(!keys.is_empty(), "an OK answer carries the keys");
    let k = keys.into_iter().next()?;
    assert_eq!(
        k.key_id,
        d.xwing.encapsulation_key().key_id().as_bytes().to_vec()
    );
    Some(
        open_dek(
            &DekEnvelope::from_bytes(&k.envelope).expect("envelope"),
            &d.xwing,
            &device_context(d, session, epoch),
        )
        .expect("own envelope opens"),
    )
}

/// Adds `users` to the service-wrapped `session` through `app`.
pub async fn add_recipients(
    app: &Client,
    session: SessionId,
    users: &[&str],
) -> pb::AddRecipientsResponse {
    app.sessions()
        .add_recipients(pb::AddRecipientsRequest {
            session_id: session.to_string(),
            user_ids: users.iter().map(|u| u.to_string()).collect(),
            key_set: None,
            idempotency_key: String::new(),
        })
        .await
        .expect("add recipients")
        .into_inner()
}

/// Removes `users` from the service-wrapped `session` through `app`: a new epoch.
pub async fn remove_recipients(
    app: &Client,
    session: SessionId,
    users: &[&str],
) -> pb::RemoveRecipientsResponse {
    app.sessions()
        .remove_recipients(pb::RemoveRecipientsRequest {
            session_id: session.to_string(),
            user_ids: users.iter().map(|u| u.to_string()).collect(),
            key_set: None,
            idempotency_key: String::new(),
        })
        .await
        .expect("remove recipients")
        .into_inner()
}

/// The audit chain's verdict, asked for with a fresh staff token.
pub async fn verify_audit_log(server: &TestServer) -> pb::VerifyAuditLogResponse {
    role_client(server, pb::Role::Staff)
        .await
        .escrow()
        .verify_audit_log(pb::VerifyAuditLogRequest {})
        .await
        .expect("verify the audit log")
        .into_inner()
}

/// Every message of `reader`'s timeline through `client`, newest first, following cursors in
/// pages of `page_size`.
pub async fn whole_timeline(
    client: &Client,
    reader: &TestDevice,
    page_size: u32,
) -> Vec<pb::EncryptedMessage> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = client
            .messages()
            .timeline(pb::TimelineRequest {
                user_id: reader.user.to_string(),
                device_id: reader.device.to_string(),
                cursor: cursor.clone(),
                page_size,
            })
            .await
            .expect("timeline")
            .into_inner();
        out.extend(page.messages);
        if page.next_cursor.is_empty() {
            return out;
        }
        cursor = page.next_cursor;
    }
}
