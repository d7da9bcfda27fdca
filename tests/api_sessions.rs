//! Sessions end to end over gRPC: three users with two devices each, service-wrapped and
//! client-wrapped sessions, epochs, revocation and escrow, on SQLite and PostgreSQL.

mod common;

use common::requests::{
    add_recipients, client_wrapped_request, key_set, open_own_key, remove_recipients,
    revoke_current_key, role_client, service_wrapped_request, user_ids, verify_audit_log,
    wire_key_set, WrapTarget,
};
use common::server::{TestDevice, TestServer};
use keyhold::crypto::envelope::{open_dek, DekEnvelope, Recipient, WrapContext};
use keyhold::crypto::ids::{Epoch, SessionId};
use keyhold::crypto::keys::Dek;
use keyhold::crypto::xwing::EncapsulationKey;
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

async fn escrowed_dek(server: &TestServer, session: SessionId, epoch: Epoch) -> Dek {
    let resp = role_client(server, pb::Role::Staff)
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
    let app = role_client(server, pb::Role::App).await;
    let created = app
        .sessions()
        .create_session(pb::CreateSessionRequest {
            return_plaintext_dek: true,
            ..service_wrapped_request("alice", &["bob", "carol"])
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
    revoke_current_key(server, carol_laptop).await;
    let removed = remove_recipients(&app, session, &["bob"]).await;
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
    let added = add_recipients(&app, session, &["bob"]).await;
    assert_eq!(added.epoch, 2);
    assert_eq!(added.session_keys.len(), 2);
    assert_eq!(
        open_own_key(server, &devices[2], session, epoch2).await,
        Some(new_dek)
    );

    // The audit chain holds the escrow reads and verifies.
    let check = verify_audit_log(server).await;
    assert!(check.ok);
    assert!(check.events_checked >= 2);
}

async fn client_wrapped_session(server: &TestServer) {
    let devices = enroll_three_users(server).await;
    let author = &devices[0];
    let session = SessionId::generate();
    let dek = Dek::generate().expect("dek");
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
    let members: Vec<&TestDevice> = devices.iter().collect();
    let set = key_set(
        author,
        session,
        Epoch::FIRST,
        &dek,
        &WrapTarget::devices(&members),
        Some(&escrow_key),
    );
    let signature = author.identity.sign(&set);
    let request = |signature: Vec<u8>| {
        client_wrapped_request(
            author,
            session,
            user_ids(&["bob", "carol"]),
            wire_key_set(&set, signature),
        )
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
