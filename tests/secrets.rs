//! Trust-model rules 2 and 4 end to end over gRPC, on SQLite and PostgreSQL:
//!
//! - no plaintext DEK, token, KEK or escrow private key is ever written to the database: every
//!   stored byte is read back (SQLite's files from disk, every row of every PostgreSQL table)
//!   and searched in raw, hex, base64 and `Debug` forms;
//! - no token or DEK reaches the logs, even at TRACE, on success or error paths;
//! - the audit chain verifies, and a changed or deleted row is named;
//! - an escrow read whose audit write fails returns an error and no key.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use common::leaks::{contains, leaked_form, stored_bytes};
use common::requests::{
    add_recipients, client_wrapped_request, device_context, key_set, remove_recipients,
    service_wrapped_request, signed_key_set, user_ids, WrapTarget,
};
use common::server::{TestDevice, TestServer};
use common::Kind;

use keyhold::crypto::envelope::{open_dek, DekEnvelope, Recipient, WrapContext};
use keyhold::crypto::ids::{Epoch, SessionId};
use keyhold::crypto::keys::Dek;
use keyhold::keyfiles;
use keyhold::proto::keyhold::v1 as pb;
use tonic::Code;

/// The 32-byte secret part of a `kh_<id>_<secret>` token.
fn token_secret(token: &str) -> Vec<u8> {
    let secret_hex = token.rsplit('_').next().expect("token has a secret part");
    let secret = hex::decode(secret_hex).expect("secret is hex");
    assert_eq!(secret.len(), 32, "token secret length");
    secret
}

/// What the store keeps of a token: SHA-256 of its secret part, computed here independently.
fn token_hash(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, &token_secret(token))
        .as_ref()
        .to_vec()
}

/// Asserts that none of the tokens or DEKs occurs in `haystack`, in any form.
fn assert_no_secret(
    place: &str,
    haystack: &[u8],
    tokens: &[String],
    secrets: &[(String, Vec<u8>)],
) {
    for t in tokens {
        assert!(
            !contains(haystack, t.as_bytes()),
            "{place}: a plaintext token occurs"
        );
        if let Some(form) = leaked_form(haystack, &token_secret(t)) {
            panic!("{place}: a token's secret occurs as {form}");
        }
    }
    for (name, secret) in secrets {
        if let Some(form) = leaked_form(haystack, secret) {
            panic!("{place}: {name} occurs as {form}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Driving the service.

async fn app_client(server: &TestServer, tokens: &mut Vec<String>) -> keyhold::client::Client {
    let token = server.token(pb::Role::App, "", "").await;
    tokens.push(token.clone());
    server.client(&token).await
}

async fn staff_client(server: &TestServer, tokens: &mut Vec<String>) -> keyhold::client::Client {
    let token = server.token(pb::Role::Staff, "", "").await;
    tokens.push(token.clone());
    server.client(&token).await
}

async fn enroll(
    server: &TestServer,
    tokens: &mut Vec<String>,
    user: &str,
    device: &str,
) -> TestDevice {
    let d = TestDevice::enroll(server, user, device).await;
    tokens.push(d.token.clone());
    d
}

/// Opens `d`'s envelope among `keys` (as returned by a Sessions call).
fn open_for(d: &TestDevice, keys: &[pb::SessionKey]) -> Dek {
    let k = keys
        .iter()
        .find(|k| k.user_id == d.user.as_str() && k.device_id == d.device.as_str())
        .unwrap_or_else(|| panic!("no key for {}/{}", d.user, d.device));
    let session = SessionId::parse(&k.session_id).expect("session id");
    let epoch = Epoch::new(k.epoch).expect("epoch");
    let envelope = DekEnvelope::from_bytes(&k.envelope).expect("envelope");
    open_dek(&envelope, &d.xwing, &device_context(d, session, epoch))
        .expect("device opens its envelope")
}

/// A SERVICE_WRAPPED session asking for the plaintext DEK.
async fn service_wrapped(
    app: &keyhold::client::Client,
    author: &str,
    recipients: &[&str],
) -> (SessionId, Dek, pb::CreateSessionResponse) {
    let created = app
        .sessions()
        .create_session(pb::CreateSessionRequest {
            return_plaintext_dek: true,
            ..service_wrapped_request(author, recipients)
        })
        .await
        .expect("create service-wrapped session")
        .into_inner();
    let session = SessionId::parse(&created.session_id).expect("session id");
    let dek = Dek::from_slice(
        created
            .plaintext_dek
            .as_deref()
            .expect("plaintext asked for"),
    )
    .expect("dek");
    (session, dek, created)
}

/// A CLIENT_WRAPPED session by `author` for every device in `devices` (the author's included),
/// with a DEK drawn here.
async fn client_wrapped(
    server: &TestServer,
    author: &TestDevice,
    devices: &[&TestDevice],
) -> (SessionId, Dek) {
    let session = SessionId::generate();
    let dek = Dek::generate().expect("dek");
    let set = key_set(
        author,
        session,
        Epoch::FIRST,
        &dek,
        &WrapTarget::devices(devices),
        Some(server.escrow_key.encapsulation_key()),
    );
    let recipients: BTreeSet<&str> = devices
        .iter()
        .filter(|d| d.user != author.user)
        .map(|d| d.user.as_str())
        .collect();
    let recipients: Vec<&str> = recipients.into_iter().collect();
    author
        .client(server)
        .await
        .sessions()
        .create_session(client_wrapped_request(
            author,
            session,
            user_ids(&recipients),
            signed_key_set(author, &set),
        ))
        .await
        .expect("create client-wrapped session");
    (session, dek)
}

/// Every escrowed DEK of `session`, opened with the staff key, by epoch.
async fn escrowed_deks(
    server: &TestServer,
    staff: &keyhold::client::Client,
    session: SessionId,
) -> Vec<(u32, Dek)> {
    let resp = staff
        .escrow()
        .get_escrowed_keys(pb::GetEscrowedKeysRequest {
            session_id: session.to_string(),
            epochs: Vec::new(),
            reason: "test: secrets at rest".into(),
        })
        .await
        .expect("escrow read")
        .into_inner();
    resp.staff_keys
        .iter()
        .map(|k| {
            let ctx = WrapContext {
                session_id: session,
                epoch: Epoch::new(k.epoch).expect("epoch"),
                recipient: Recipient::Escrow,
            };
            let env = DekEnvelope::from_bytes(&k.envelope).expect("envelope");
            (
                k.epoch,
                open_dek(&env, &server.escrow_key, &ctx).expect("escrow opens"),
            )
        })
        .collect()
}

/// What a run of the API left behind: every token, every DEK, and stored bytes it knows of.
struct Footprint {
    tokens: Vec<String>,
    deks: Vec<Dek>,
    /// An envelope the store must hold (the scan's positive control besides token hashes).
    stored_envelope: Vec<u8>,
}

impl Footprint {
    /// Every plaintext DEK, named for the scan's report.
    fn dek_secrets(&self) -> Vec<(String, Vec<u8>)> {
        self.deks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                (
                    format!("plaintext DEK #{}", i + 1),
                    d.expose_secret().to_vec(),
                )
            })
            .collect()
    }
}

/// Creates tokens of every role, two service-wrapped sessions (one rotated, extended and
/// shrunk) and a client-wrapped one, and returns every secret involved.
async fn exercise_sessions(server: &TestServer) -> Footprint {
    let mut tokens = vec![server.admin_token.clone()];
    let alice = enroll(server, &mut tokens, "alice", "phone").await;
    let bob = enroll(server, &mut tokens, "bob", "phone").await;
    let app = app_client(server, &mut tokens).await;
    let staff = staff_client(server, &mut tokens).await;

    // Session 1: service-wrapped, epoch 1 from the plaintext the service returns.
    let (s1, dek1, _) = service_wrapped(&app, "alice", &["bob"]).await;
    assert_eq!(open_for(&bob, &device_keys(&bob, server, s1).await), dek1);
    // Rotated: epoch 2, known by opening Alice's new envelope.
    let rotated = app
        .sessions()
        .rotate_session(pb::RotateSessionRequest {
            session_id: s1.to_string(),
            key_set: None,
            idempotency_key: String::new(),
        })
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(rotated.epoch, 2);
    let dek2 = open_for(&alice, &rotated.session_keys);
    assert_ne!(dek2, dek1);
    // Carol joins at epoch 2: wrapped from the service's KEK copy, the same DEK.
    let carol = enroll(server, &mut tokens, "carol", "laptop").await;
    let added = add_recipients(&app, s1, &["carol"]).await;
    assert_eq!(open_for(&carol, &added.session_keys), dek2);
    // Bob leaves: epoch 3.
    let removed = remove_recipients(&app, s1, &["bob"]).await;
    assert_eq!(removed.epoch, 3);
    let dek3 = open_for(&carol, &removed.session_keys);

    // Session 2: service-wrapped, another author.
    let (s2, dek4, _) = service_wrapped(&app, "bob", &["carol"]).await;
    // Session 3: client-wrapped, the DEK drawn here.
    let (s3, dek5) = client_wrapped(server, &alice, &[&alice, &bob, &carol]).await;

    // The escrow copies hold exactly these DEKs: nothing else was drawn.
    let escrowed: Vec<(SessionId, Vec<(u32, Dek)>)> = vec![
        (s1, escrowed_deks(server, &staff, s1).await),
        (s2, escrowed_deks(server, &staff, s2).await),
        (s3, escrowed_deks(server, &staff, s3).await),
    ];
    assert_eq!(
        escrowed[0].1,
        vec![(1, dek1.clone()), (2, dek2.clone()), (3, dek3.clone())]
    );
    assert_eq!(escrowed[1].1, vec![(1, dek4.clone())]);
    assert_eq!(escrowed[2].1, vec![(1, dek5.clone())]);

    let staff_envelope = staff
        .escrow()
        .get_escrowed_keys(pb::GetEscrowedKeysRequest {
            session_id: s1.to_string(),
            epochs: vec![1],
            reason: "test: positive control".into(),
        })
        .await
        .expect("escrow read")
        .into_inner()
        .staff_keys[0]
        .envelope
        .clone();
    Footprint {
        tokens,
        deks: vec![dek1, dek2, dek3, dek4, dek5],
        stored_envelope: staff_envelope,
    }
}

/// The device's envelopes of `session`, fetched as the device.
async fn device_keys(
    d: &TestDevice,
    server: &TestServer,
    session: SessionId,
) -> Vec<pb::SessionKey> {
    d.client(server)
        .await
        .sessions()
        .get_session_keys(pb::GetSessionKeysRequest {
            session_id: session.to_string(),
            epoch: None,
        })
        .await
        .expect("get session keys")
        .into_inner()
        .session_keys
}

/// The service's own secrets, which must not be in the database either.
fn service_secrets(server: &TestServer) -> Vec<(String, Vec<u8>)> {
    let kek = keyfiles::read_kek(&server.key_dir.join("dev-kek.key")).expect("read the KEK");
    vec![
        ("the KEK".to_string(), kek.expose_secret().to_vec()),
        (
            "the escrow private key".to_string(),
            server.escrow_key.expose_seed().to_vec(),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Reading every stored byte.

async fn no_plaintext_secret_in_the_database(server: &TestServer) {
    let footprint = exercise_sessions(server).await;
    let (stored, read) = stored_bytes(server).await;
    if server.kind() == Kind::Postgres {
        for table in [
            "api_tokens",
            "audit_events",
            "service_keys",
            "session_keys",
            "session_members",
            "sessions",
            "staff_keys",
            "user_keys",
        ] {
            assert!(
                read.contains(&format!("public.{table}")),
                "{table} was read: {read:?}"
            );
        }
    }
    assert!(!stored.is_empty(), "read nothing from {read:?}");

    // The scan sees the tables: every token's hash is there, and so is an escrow envelope
    // (raw bytes on SQLite, hex in PostgreSQL's JSON).
    let stored_form = |bytes: &[u8]| match server.kind() {
        Kind::Sqlite => bytes.to_vec(),
        Kind::Postgres => hex::encode(bytes).into_bytes(),
    };
    for t in &footprint.tokens {
        assert!(
            contains(&stored, &stored_form(&token_hash(t))),
            "a token's SHA-256 is stored (read {read:?})"
        );
    }
    assert!(
        contains(&stored, &stored_form(&footprint.stored_envelope)),
        "the escrow envelope is stored"
    );

    let mut secrets: Vec<(String, Vec<u8>)> = footprint.dek_secrets();
    secrets.extend(service_secrets(server));
    assert_no_secret(
        &format!("the database ({read:?})"),
        &stored,
        &footprint.tokens,
        &secrets,
    );
}

// ---------------------------------------------------------------------------------------------
// Logs.

/// Everything any thread logs through `tracing`, at every level, from the first call on.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .try_init()
            .expect("the only subscriber of this test binary");
        buffer
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn expect_code<T: std::fmt::Debug>(
    call: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
) -> tonic::Status {
    let status = call.expect_err("the call fails");
    assert_eq!(status.code(), code, "{status:?}");
    status
}

async fn no_token_or_dek_in_logs(server: &TestServer) {
    let logs = captured_logs();
    // Every service, on the happy paths.
    let mut footprint = exercise_sessions(server).await;
    let admin = server.client(&server.admin_token).await;
    let created = admin
        .admin()
        .create_token(pb::CreateTokenRequest {
            role: pb::Role::App as i32,
            label: "revoked at once".into(),
            ..Default::default()
        })
        .await
        .expect("create token")
        .into_inner();
    footprint.tokens.push(created.token.clone());
    admin
        .admin()
        .revoke_token(pb::RevokeTokenRequest {
            token_id: created.token_id.clone(),
        })
        .await
        .expect("revoke");
    let mut health = tonic_health::pb::health_client::HealthClient::new(admin.channel());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // And on error paths: bad tokens, wrong roles, bad input, unknown records.
    let revoked = server.client(&created.token).await;
    expect_code(
        revoked
            .admin()
            .create_token(pb::CreateTokenRequest::default())
            .await,
        Code::Unauthenticated,
    );
    let mut wrong_secret = footprint.tokens[1].clone();
    let last = wrong_secret.pop().expect("non-empty");
    wrong_secret.push(if last == '0' { '1' } else { '0' });
    footprint.tokens.push(wrong_secret.clone());
    let forged = server.client(&wrong_secret).await;
    expect_code(
        forged
            .key_directory()
            .get_user_keys(pb::GetUserKeysRequest {
                user_ids: vec!["alice".into()],
            })
            .await,
        Code::Unauthenticated,
    );
    let malformed = server.client("kh_not_a_token").await;
    expect_code(
        malformed
            .sessions()
            .sync_session_keys(pb::SyncSessionKeysRequest::default())
            .await,
        Code::Unauthenticated,
    );
    let app_token = server.token(pb::Role::App, "", "").await;
    footprint.tokens.push(app_token.clone());
    let app = server.client(&app_token).await;
    expect_code(
        app.escrow()
            .verify_audit_log(pb::VerifyAuditLogRequest {})
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        app.sessions()
            .create_session(pb::CreateSessionRequest {
                author_user_id: "alice".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        app.sessions()
            .rotate_session(pb::RotateSessionRequest {
                session_id: "not-a-session".into(),
                key_set: None,
                idempotency_key: String::new(),
            })
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        app.sessions()
            .delete_session(pb::DeleteSessionRequest {
                session_id: SessionId::generate().to_string(),
            })
            .await,
        Code::NotFound,
    );
    let staff_token = server.token(pb::Role::Staff, "", "").await;
    footprint.tokens.push(staff_token.clone());
    let staff = server.client(&staff_token).await;
    expect_code(
        staff
            .escrow()
            .get_escrowed_keys(pb::GetEscrowedKeysRequest {
                session_id: SessionId::generate().to_string(),
                epochs: Vec::new(),
                reason: "  ".into(),
            })
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        admin
            .admin()
            .revoke_token(pb::RevokeTokenRequest {
                token_id: "zz".into(),
            })
            .await,
        Code::InvalidArgument,
    );
    let (session, dek, response) = service_wrapped(&app, "alice", &["bob"]).await;
    footprint.deks.push(dek);
    app.sessions()
        .delete_session(pb::DeleteSessionRequest {
            session_id: session.to_string(),
        })
        .await
        .expect("delete");
    // An internal failure is logged by Keyhold itself (the positive control of the capture).
    refuse_audit_writes(server).await;
    expect_code(
        staff
            .escrow()
            .get_escrowed_keys(pb::GetEscrowedKeysRequest {
                session_id: session.to_string(),
                epochs: Vec::new(),
                reason: "test: audit refused".into(),
            })
            .await,
        Code::Internal,
    );
    allow_audit_writes(server).await;

    // Debug of the responses that carry a secret shows neither secret.
    let shown_session = format!("{response:?}");
    assert!(
        shown_session.contains(&response.session_id),
        "{shown_session}"
    );
    let shown_token = format!("{created:?}");
    assert!(shown_token.contains(&created.token_id), "{shown_token}");
    assert_no_secret(
        "Debug of CreateSessionResponse",
        shown_session.as_bytes(),
        &[],
        &[(
            "its plaintext DEK".into(),
            response.plaintext_dek.clone().expect("asked for"),
        )],
    );
    assert_no_secret(
        "Debug of CreateTokenResponse",
        shown_token.as_bytes(),
        std::slice::from_ref(&created.token),
        &[],
    );

    let captured = logs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let text = String::from_utf8_lossy(&captured);
    assert!(!captured.is_empty(), "the logs were captured");
    assert!(
        text.contains("internal failure"),
        "Keyhold's own error log was captured"
    );
    let secrets: Vec<(String, Vec<u8>)> = footprint.dek_secrets();
    assert_no_secret("the logs", &captured, &footprint.tokens, &secrets);
}

// ---------------------------------------------------------------------------------------------
// The audit chain.

async fn verify(staff: &keyhold::client::Client) -> pb::VerifyAuditLogResponse {
    staff
        .escrow()
        .verify_audit_log(pb::VerifyAuditLogRequest {})
        .await
        .expect("verify")
        .into_inner()
}

async fn audit_chain_detects_changed_and_deleted_rows(server: &TestServer) {
    let mut tokens = Vec::new();
    let staff = staff_client(server, &mut tokens).await;
    let app = app_client(server, &mut tokens).await;
    let _alice = enroll(server, &mut tokens, "alice", "phone").await;
    let (session, _, _) = service_wrapped(&app, "alice", &[]).await;
    escrowed_deks(server, &staff, session).await;
    let events = staff
        .escrow()
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .events;
    let n = events.len() as u64;
    assert!(
        n >= 5,
        "admin, staff, app and device tokens, one escrow read: {n}"
    );
    assert_eq!(
        events.last().map(|e| e.action.as_str()),
        Some("escrow.read")
    );
    let original_reason_of_2 = events[1].reason.clone();
    assert!(
        original_reason_of_2.is_empty(),
        "seq 2 is a token creation, without a reason"
    );

    let check = verify(&staff).await;
    assert!(check.ok, "{check:?}");
    assert_eq!(check.events_checked, n);
    assert_eq!(check.first_broken_seq, None);

    // A changed field breaks the chain at its row.
    server
        .db
        .execute_raw("UPDATE audit_events SET reason = 'x' WHERE seq = 2")
        .await;
    let check = verify(&staff).await;
    assert!(!check.ok, "{check:?}");
    assert_eq!(check.first_broken_seq, Some(2));
    assert_eq!(check.events_checked, 1);

    // Put back as it was, the chain verifies again.
    server
        .db
        .execute_raw("UPDATE audit_events SET reason = NULL WHERE seq = 2")
        .await;
    let check = verify(&staff).await;
    assert!(check.ok, "{check:?}");

    // A deleted row in the middle is named too.
    server
        .db
        .execute_raw("DELETE FROM audit_events WHERE seq = 3")
        .await;
    let check = verify(&staff).await;
    assert!(!check.ok, "{check:?}");
    assert_eq!(check.first_broken_seq, Some(3));
    assert_eq!(check.events_checked, 2);
}

// ---------------------------------------------------------------------------------------------
// An escrow read fails when its audit event cannot be written.

async fn refuse_audit_writes(server: &TestServer) {
    let sql = match server.kind() {
        Kind::Sqlite => {
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events \
             BEGIN SELECT RAISE(ABORT, 'audit write refused by the test'); END;"
        }
        Kind::Postgres => {
            "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'audit write refused by the test'; END $$; \
             CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events \
             FOR EACH ROW EXECUTE FUNCTION refuse_audit();"
        }
    };
    server.db.execute_raw(sql).await;
}

async fn allow_audit_writes(server: &TestServer) {
    let sql = match server.kind() {
        Kind::Sqlite => "DROP TRIGGER refuse_audit;",
        Kind::Postgres => {
            "DROP TRIGGER refuse_audit ON audit_events; DROP FUNCTION refuse_audit();"
        }
    };
    server.db.execute_raw(sql).await;
}

async fn escrow_read_fails_when_the_audit_write_fails(server: &TestServer) {
    let mut tokens = Vec::new();
    let staff = staff_client(server, &mut tokens).await;
    let app = app_client(server, &mut tokens).await;
    let _alice = enroll(server, &mut tokens, "alice", "phone").await;
    let (session, dek, _) = service_wrapped(&app, "alice", &[]).await;
    let before = server.audit_events().await.len();

    refuse_audit_writes(server).await;
    let request = pb::GetEscrowedKeysRequest {
        session_id: session.to_string(),
        epochs: Vec::new(),
        reason: "test: audit write refused".into(),
    };
    let status = staff
        .escrow()
        .get_escrowed_keys(request.clone())
        .await
        .expect_err("no key without its audit event");
    assert!(
        matches!(status.code(), Code::Internal | Code::Unavailable),
        "a server-side failure, not the caller's: {status:?}"
    );
    assert!(
        status.details().is_empty() && status.metadata().get("grpc-status-details-bin").is_none()
    );
    assert_no_secret(
        "the error",
        format!("{status:?}").as_bytes(),
        &tokens,
        &[("the DEK".into(), dek.expose_secret().to_vec())],
    );
    // The whole read rolled back: no event was half-written.
    allow_audit_writes(server).await;
    assert_eq!(server.audit_events().await.len(), before);

    // With the audit writable again, the same read succeeds and is recorded: the failure above
    // was the audit write's.
    let opened = escrowed_deks(server, &staff, session).await;
    assert_eq!(opened, vec![(1, dek)]);
    let after = server.audit_events().await;
    assert_eq!(after.len(), before + 1);
    assert_eq!(after.last().map(|e| e.action.as_str()), Some("escrow.read"));
    assert_eq!(
        after.last().and_then(|e| e.reason.as_deref()),
        Some("test: secrets at rest")
    );
    let check = verify(&staff).await;
    assert!(check.ok, "{check:?}");
}

on_both_servers! {
    no_plaintext_dek_token_or_key_is_stored => no_plaintext_secret_in_the_database;
    no_token_or_dek_reaches_the_logs => no_token_or_dek_in_logs;
    audit_chain_names_the_first_changed_or_deleted_row => audit_chain_detects_changed_and_deleted_rows;
    escrow_read_fails_and_returns_no_key_when_its_audit_write_fails => escrow_read_fails_when_the_audit_write_fails;
}
