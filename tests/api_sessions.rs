//! Sessions end to end over gRPC: three users with two devices each, service-wrapped and
//! client-wrapped sessions, epochs, revocation and escrow, on SQLite and PostgreSQL.

mod common;

use common::server::{TestDevice, TestServer};
use keyhold::crypto::envelope::{open_dek, wrap_dek, DekEnvelope, Recipient, WrapContext};
use keyhold::crypto::ids::{Epoch, SessionId};
use keyhold::crypto::keys::Dek;
use keyhold::crypto::sign::{ClientWrap, ClientWrappedKeySet, EscrowWrap};
use keyhold::crypto::xwing::EncapsulationKey;
use keyhold::crypto::Suite;
use keyhold::proto::keyhold::v1 as pb;

async fn enroll_three_users(server: &TestServer) -> Vec<TestDevice> {
    let mut devices = Vec::new();
    for user in ["alice", "bob", "carol"] {
        for device in ["phone", "laptop"] {
            devices.push(TestDevice::enroll(server, user, device).await);
        }
    }
    devices
}

/// Opens the device's envelope of `epoch` fetched through GetSessionKeys.
async fn open_own_key(
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
    // A device that holds no key of the epoch is told NOT_FOUND.
    let keys = match response {
        Ok(r) => r.into_inner().session_keys,
        Err(status) if status.code() == tonic::Code::NotFound => return None,
        Err(status) => panic!("get session keys: {status:?}"),
    };
    assert!(!keys.is_empty(), "an OK answer carries the keys");
    let k = keys.into_iter().next()?;
    assert_eq!(
        k.key_id,
        d.xwing.encapsulation_key().key_id().as_bytes().to_vec()
    );
    let ctx = WrapContext {
        session_id: session,
        epoch,
        recipient: Recipient::Device {
            user: d.user.clone(),
            device: d.device.clone(),
        },
    };
    Some(
        open_dek(
            &DekEnvelope::from_bytes(&k.envelope).expect("envelope"),
            &d.xwing,
            &ctx,
        )
        .expect("opens"),
    )
}

async fn escrowed_dek(server: &TestServer, session: SessionId, epoch: Epoch) -> Dek {
    let staff = server.token(pb::Role::Staff, "", "").await;
    let resp = server
        .client(&staff)
        .await
        .escrow()
        .get_escrowed_keys(pb::GetEscrowedKeysRequest {
            session_id: session.to_string(),
            epochs: vec![epoch.get()],
            reason: "test: compliance case 1".into(),
        })
        .await
        .expect("escrow read")
        .into_inner();
    assert_eq!(resp.staff_keys.len(), 1);
    let sk = &resp.staff_keys[0];
    assert_eq!(
        sk.escrow_key_id,
        server
            .escrow_key
            .encapsulation_key()
            .key_id()
            .as_bytes()
            .to_vec()
    );
    let ctx = WrapContext {
        session_id: session,
        epoch,
        recipient: Recipient::Escrow,
    };
    open_dek(
        &DekEnvelope::from_bytes(&sk.envelope).expect("envelope"),
        &server.escrow_key,
        &ctx,
    )
    .expect("escrow opens")
}

async fn service_wrapped_lifecycle(server: &TestServer) {
    let devices = enroll_three_users(server).await;
    let app = server
        .client(&server.token(pb::Role::App, "", "").await)
        .await;
    let created = app
        .sessions()
        .create_session(pb::CreateSessionRequest {
            mode: pb::SessionMode::ServiceWrapped as i32,
            author_user_id: "alice".into(),
            recipients: Some(pb::create_session_request::Recipients::UserIds(
                pb::UserIdList {
                    user_ids: vec!["bob".into(), "carol".into()],
                },
            )),
            return_plaintext_dek: true,
            ..Default::default()
        })
        .await
        .expect("create session")
        .into_inner();
    let session = SessionId::parse(&created.session_id).expect("session id");
    assert_eq!(created.epoch, 1);
    assert_eq!(
        created.session_keys.len(),
        6,
        "one key per device of the three users"
    );
    let plaintext = Dek::from_slice(
        created
            .plaintext_dek
            .as_deref()
            .expect("plaintext asked for"),
    )
    .expect("dek");

    // Every device opens its own envelope with its own private key and gets the same DEK.
    for d in &devices {
        let dek = open_own_key(server, d, session, Epoch::FIRST)
            .await
            .expect("a key for every device");
        assert_eq!(dek, plaintext);
    }
    // The escrow copy opens with the staff key.
    assert_eq!(escrowed_dek(server, session, Epoch::FIRST).await, plaintext);

    // Carol's laptop is revoked, then Bob is removed: a new epoch for Alice and Carol's phone.
    let carol_laptop = &devices[5];
    carol_laptop
        .client(server)
        .await
        .key_directory()
        .revoke_device_key(pb::RevokeDeviceKeyRequest {
            user_id: "carol".into(),
            device_id: "laptop".into(),
            key_id: carol_laptop
                .xwing
                .encapsulation_key()
                .key_id()
                .as_bytes()
                .to_vec(),
        })
        .await
        .expect("revoke");
    let removed = app
        .sessions()
        .remove_recipients(pb::RemoveRecipientsRequest {
            session_id: session.to_string(),
            user_ids: vec!["bob".into()],
            key_set: None,
        })
        .await
        .expect("remove bob")
        .into_inner();
    assert_eq!(removed.epoch, 2);
    let epoch2 = Epoch::new(2).expect("epoch");
    let got: Vec<(String, String)> = removed
        .session_keys
        .iter()
        .map(|k| (k.user_id.clone(), k.device_id.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("alice".to_string(), "laptop".to_string()),
            ("alice".to_string(), "phone".to_string()),
            ("carol".to_string(), "phone".to_string()),
        ]
    );
    let new_dek = open_own_key(server, &devices[0], session, epoch2)
        .await
        .expect("alice gets epoch 2");
    assert_ne!(new_dek, plaintext, "a new epoch has a fresh DEK");
    assert_eq!(
        open_own_key(server, &devices[4], session, epoch2).await,
        Some(new_dek.clone())
    );
    // Removed and revoked devices get nothing of epoch 2, but keep epoch 1.
    for d in [&devices[2], &devices[3], carol_laptop] {
        assert!(
            open_own_key(server, d, session, epoch2).await.is_none(),
            "{}/{}",
            d.user,
            d.device
        );
    }
    assert_eq!(
        open_own_key(server, &devices[2], session, Epoch::FIRST).await,
        Some(plaintext)
    );
    assert_eq!(escrowed_dek(server, session, epoch2).await, new_dek);

    // Bob comes back: he gets the current epoch's DEK, wrapped from the service copy.
    let added = app
        .sessions()
        .add_recipients(pb::AddRecipientsRequest {
            session_id: session.to_string(),
            user_ids: vec!["bob".into()],
            key_set: None,
        })
        .await
        .expect("add bob")
        .into_inner();
    assert_eq!(added.epoch, 2);
    assert_eq!(added.session_keys.len(), 2);
    assert_eq!(
        open_own_key(server, &devices[2], session, epoch2).await,
        Some(new_dek)
    );

    // The audit chain holds the escrow reads and verifies.
    let staff = server
        .client(&server.token(pb::Role::Staff, "", "").await)
        .await;
    let check = staff
        .escrow()
        .verify_audit_log(pb::VerifyAuditLogRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(check.ok);
    assert!(check.events_checked >= 2);
}

async fn client_wrapped_session(server: &TestServer) {
    let devices = enroll_three_users(server).await;
    let author = &devices[0];
    let session = SessionId::generate();
    let dek = Dek::generate().expect("dek");
    let mut wraps = Vec::new();
    for d in &devices {
        let ctx = WrapContext {
            session_id: session,
            epoch: Epoch::FIRST,
            recipient: Recipient::Device {
                user: d.user.clone(),
                device: d.device.clone(),
            },
        };
        wraps.push(ClientWrap {
            user: d.user.clone(),
            device: d.device.clone(),
            key_id: d.xwing.encapsulation_key().key_id(),
            envelope: wrap_dek(&dek, d.xwing.encapsulation_key(), &ctx).expect("wrap"),
        });
    }
    // The author learns the escrow key from the service, as a real device would.
    let escrow = author
        .client(server)
        .await
        .key_directory()
        .get_escrow_key(pb::GetEscrowKeyRequest {})
        .await
        .expect("escrow key")
        .into_inner();
    let escrow_key =
        EncapsulationKey::from_slice(&escrow.encapsulation_key).expect("escrow key parses");
    assert_eq!(
        escrow.escrow_key_id,
        escrow_key.key_id().as_bytes().to_vec()
    );
    assert_eq!(&escrow_key, server.escrow_key.encapsulation_key());
    let escrow_ctx = WrapContext {
        session_id: session,
        epoch: Epoch::FIRST,
        recipient: Recipient::Escrow,
    };
    let escrow = EscrowWrap {
        key_id: escrow_key.key_id(),
        envelope: wrap_dek(&dek, &escrow_key, &escrow_ctx).expect("escrow wrap"),
    };
    let set = ClientWrappedKeySet {
        suite: Suite::XWingAes256GcmV1,
        session_id: session,
        epoch: Epoch::FIRST,
        author_user: author.user.clone(),
        author_device: author.device.clone(),
        wraps: wraps.clone(),
        escrow: Some(escrow.clone()),
    };
    let signature = author.identity.sign(&set);
    let wire_set = |signature: Vec<u8>| pb::ClientWrappedKeySet {
        epoch: 1,
        wraps: wraps
            .iter()
            .map(|w| pb::ClientWrap {
                user_id: w.user.to_string(),
                device_id: w.device.to_string(),
                key_id: w.key_id.as_bytes().to_vec(),
                envelope: w.envelope.as_bytes().to_vec(),
            })
            .collect(),
        escrow: Some(pb::EscrowWrap {
            escrow_key_id: escrow.key_id.as_bytes().to_vec(),
            envelope: escrow.envelope.as_bytes().to_vec(),
        }),
        signature,
    };
    let request = |signature: Vec<u8>| pb::CreateSessionRequest {
        mode: pb::SessionMode::ClientWrapped as i32,
        author_user_id: "alice".into(),
        author_device_id: "phone".into(),
        session_id: session.to_string(),
        recipients: Some(pb::create_session_request::Recipients::UserIds(
            pb::UserIdList {
                user_ids: vec!["bob".into(), "carol".into()],
            },
        )),
        key_set: Some(wire_set(signature)),
        ..Default::default()
    };
    let mut sessions = author.client(server).await.sessions();
    // A signature that does not verify is refused, naming the field, and writes nothing.
    let mut bad = signature.as_bytes().to_vec();
    bad[0] ^= 1;
    let err = sessions
        .create_session(request(bad))
        .await
        .expect_err("bad signature");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("key_set.signature"),
        "{}",
        err.message()
    );
    let mut conn = server.store.conn().await.expect("conn");
    assert!(conn.session(&session).await.expect("read").is_none());
    drop(conn);

    let created = sessions
        .create_session(request(signature.as_bytes().to_vec()))
        .await
        .expect("client-wrapped session")
        .into_inner();
    assert_eq!(created.plaintext_dek, None);
    for d in &devices {
        assert_eq!(
            open_own_key(server, d, session, Epoch::FIRST).await,
            Some(dek.clone())
        );
    }
    assert_eq!(escrowed_dek(server, session, Epoch::FIRST).await, dek);
    // The same id again is ALREADY_EXISTS.
    let again = sessions
        .create_session(request(signature.as_bytes().to_vec()))
        .await
        .expect_err("duplicate");
    assert_eq!(again.code(), tonic::Code::AlreadyExists);
}

on_both_servers! {
    service_wrapped_session_lifecycle => service_wrapped_lifecycle;
    client_wrapped_session_checks_signature_and_opens_everywhere => client_wrapped_session;
}
