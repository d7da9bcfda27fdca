//! Who may call what, over gRPC, on SQLite and PostgreSQL.
//!
//! [`MATRIX`] is the authorization table the API documents (the `Roles:` line of each call in
//! `proto/keyhold/v1/*.proto`, and the Auth section of the design): every KeyDirectory,
//! Sessions, Escrow and Admin call, made by every kind of caller with a request that is valid
//! in every other respect, must end with exactly the code in its cell, and a refused call must
//! write nothing. Then callers without a usable token (none, malformed, unknown, revoked) are
//! UNAUTHENTICATED on every call, while the health service answers anyone.
//!
//! The cast: alice's phone owns the device key being published or revoked and authors the
//! client-wrapped sessions; alice's laptop is its sibling, a member of alice's sessions but not
//! their author; bob's phone belongs to another user, in none of the sessions; carol is the
//! recipient of every session. Each session call gets a fresh session, so every cell starts
//! from the same state.

mod common;

use common::callers::{Callers, Who, DENIED, OK, WITH_TOKEN};
use common::raw_db::{Fingerprint, RawDb};
use common::requests::{
    bundle_request, client_wrapped_request, current_keys, fresh_key_set, service_wrapped_request,
    user_ids, WrapTarget,
};
use common::server::{TestDevice, TestServer};
use keyhold::auth::IssuedToken;
use keyhold::crypto::ids::SessionId;
use keyhold::crypto::xwing::DecapsulationKey;
use keyhold::proto::keyhold::v1 as pb;
use keyhold::proto::keyhold::v1::admin_client::AdminClient;
use keyhold::proto::keyhold::v1::escrow_client::EscrowClient;
use keyhold::proto::keyhold::v1::key_directory_client::KeyDirectoryClient;
use keyhold::proto::keyhold::v1::sessions_client::SessionsClient;
use keyhold::store::user_keys::UserKey;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Code, Status};

// Who makes a call, relative to the resource it touches (`common::callers`): own is the
// device that owns it (the key's device, the client-wrapped session's author device, a member
// device for session keys: alice's phone); sibling another device of the same user (alice's
// laptop, a member of alice's sessions); other a device of another user (bob's phone, in none
// of the sessions). The columns of [`MATRIX`] are `WITH_TOKEN`, in order.

/// One row of [`MATRIX`]: a call, and for the session calls the mode of the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rpc {
    PublishDeviceKey,
    RevokeDeviceKey,
    GetUserKeys,
    GetEscrowKey,
    CreateSessionServiceWrapped,
    CreateSessionClientWrapped,
    AddRecipientsServiceWrapped,
    AddRecipientsClientWrapped,
    RemoveRecipientsServiceWrapped,
    RemoveRecipientsClientWrapped,
    RotateSessionServiceWrapped,
    RotateSessionClientWrapped,
    GetSessionKeys,
    SyncSessionKeys,
    DeleteSessionServiceWrapped,
    DeleteSessionClientWrapped,
    GetEscrowedKeys,
    ListAuditEvents,
    VerifyAuditLog,
    CreateToken,
    RevokeToken,
}

/// GetSessionKeys by a device with no key in the session: "NOT_FOUND", as for a session that
/// does not exist, so that a device cannot tell other people's sessions from no session.
const NOT_FOUND: Code = Code::NotFound;

/// The documented outcome of every call for every caller.
#[rustfmt::skip]
const MATRIX: &[(Rpc, [Code; 6])] = &[
    //                                   app     own     sibling other      staff   admin
    (Rpc::PublishDeviceKey,               [OK,     OK,     DENIED, DENIED,    DENIED, DENIED]),
    (Rpc::RevokeDeviceKey,                [OK,     OK,     DENIED, DENIED,    DENIED, DENIED]),
    (Rpc::GetUserKeys,                    [OK,     OK,     OK,     OK,        DENIED, DENIED]),
    (Rpc::GetEscrowKey,                   [OK,     OK,     OK,     OK,        DENIED, DENIED]),
    (Rpc::CreateSessionServiceWrapped,    [OK,     DENIED, DENIED, DENIED,    DENIED, DENIED]),
    (Rpc::CreateSessionClientWrapped,     [DENIED, OK,     DENIED, DENIED,    DENIED, DENIED]),
    (Rpc::AddRecipientsServiceWrapped,    [OK,     DENIED, DENIED, DENIED,    DENIED, DENIED]),
    (Rpc::AddRecipientsClientWrapped,     [DENIED, OK,     DENIED, DENIED,    DENIED, DENIED]),
    (Rpc::RemoveRecipientsServiceWrapped, [OK,     DENIED, DENIED, DENIED,    DENIED, DENIED]),
    (Rpc::RemoveRecipientsClientWrapped,  [DENIED, OK,     DENIED, DENIED,    DENIED, DENIED]),
    (Rpc::RotateSessionServiceWrapped,    [OK,     DENIED, DENIED, DENIED,    DENIED, DENIED]),
    (Rpc::RotateSessionClientWrapped,     [DENIED, OK,     DENIED, DENIED,    DENIED, DENIED]),
    (Rpc::GetSessionKeys,                 [DENIED, OK,     OK,     NOT_FOUND, DENIED, DENIED]),
    (Rpc::SyncSessionKeys,                [DENIED, OK,     OK,     OK,        DENIED, DENIED]),
    (Rpc::DeleteSessionServiceWrapped,    [OK,     DENIED, DENIED, DENIED,    DENIED, DENIED]),
    (Rpc::DeleteSessionClientWrapped,     [DENIED, OK,     DENIED, DENIED,    DENIED, DENIED]),
    (Rpc::GetEscrowedKeys,                [DENIED, DENIED, DENIED, DENIED,    OK,     DENIED]),
    (Rpc::ListAuditEvents,                [DENIED, DENIED, DENIED, DENIED,    OK,     DENIED]),
    (Rpc::VerifyAuditLog,                 [DENIED, DENIED, DENIED, DENIED,    OK,     DENIED]),
    (Rpc::CreateToken,                    [DENIED, DENIED, DENIED, DENIED,    DENIED, OK    ]),
    (Rpc::RevokeToken,                    [DENIED, DENIED, DENIED, DENIED,    DENIED, OK    ]),
];

/// Sets the `authorization` header of every call exactly as given, or leaves it out.
#[derive(Clone)]
struct Authorization(Option<MetadataValue<Ascii>>);

impl Interceptor for Authorization {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

type Authed = InterceptedService<Channel, Authorization>;

/// One caller's clients of the four services, sharing one connection.
#[derive(Clone)]
struct Caller {
    keys: KeyDirectoryClient<Authed>,
    sessions: SessionsClient<Authed>,
    escrow: EscrowClient<Authed>,
    admin: AdminClient<Authed>,
}

impl Caller {
    fn with_header(channel: &Channel, header: Option<&str>) -> Caller {
        let auth = Authorization(header.map(|h| h.parse().expect("valid header text")));
        Caller {
            keys: KeyDirectoryClient::with_interceptor(channel.clone(), auth.clone()),
            sessions: SessionsClient::with_interceptor(channel.clone(), auth.clone()),
            escrow: EscrowClient::with_interceptor(channel.clone(), auth.clone()),
            admin: AdminClient::with_interceptor(channel.clone(), auth),
        }
    }

    fn bearer(channel: &Channel, token: &str) -> Caller {
        Caller::with_header(channel, Some(&format!("Bearer {token}")))
    }
}

/// A request ready to send to one call.
#[derive(Clone)]
enum Call {
    PublishDeviceKey(pb::PublishDeviceKeyRequest),
    RevokeDeviceKey(pb::RevokeDeviceKeyRequest),
    GetUserKeys(pb::GetUserKeysRequest),
    GetEscrowKey,
    CreateSession(pb::CreateSessionRequest),
    AddRecipients(pb::AddRecipientsRequest),
    RemoveRecipients(pb::RemoveRecipientsRequest),
    RotateSession(pb::RotateSessionRequest),
    GetSessionKeys(pb::GetSessionKeysRequest),
    SyncSessionKeys(pb::SyncSessionKeysRequest),
    DeleteSession(pb::DeleteSessionRequest),
    GetEscrowedKeys(pb::GetEscrowedKeysRequest),
    ListAuditEvents(pb::ListAuditEventsRequest),
    VerifyAuditLog,
    CreateToken(pb::CreateTokenRequest),
    RevokeToken(pb::RevokeTokenRequest),
}

/// Sends `call` as `caller`. On success, returns the session keys served to the calling
/// device (GetSessionKeys, SyncSessionKeys; empty for every other call).
async fn send(caller: &Caller, call: Call) -> Result<Vec<pb::SessionKey>, Status> {
    fn none<T>(_: T) -> Vec<pb::SessionKey> {
        Vec::new()
    }
    let mut c = caller.clone();
    match call {
        Call::PublishDeviceKey(r) => c.keys.publish_device_key(r).await.map(none),
        Call::RevokeDeviceKey(r) => c.keys.revoke_device_key(r).await.map(none),
        Call::GetUserKeys(r) => c.keys.get_user_keys(r).await.map(none),
        Call::GetEscrowKey => c
            .keys
            .get_escrow_key(pb::GetEscrowKeyRequest {})
            .await
            .map(none),
        Call::CreateSession(r) => c.sessions.create_session(r).await.map(none),
        Call::AddRecipients(r) => c.sessions.add_recipients(r).await.map(none),
        Call::RemoveRecipients(r) => c.sessions.remove_recipients(r).await.map(none),
        Call::RotateSession(r) => c.sessions.rotate_session(r).await.map(none),
        Call::GetSessionKeys(r) => c
            .sessions
            .get_session_keys(r)
            .await
            .map(|resp| resp.into_inner().session_keys),
        Call::SyncSessionKeys(r) => c
            .sessions
            .sync_session_keys(r)
            .await
            .map(|resp| resp.into_inner().session_keys),
        Call::DeleteSession(r) => c.sessions.delete_session(r).await.map(none),
        Call::GetEscrowedKeys(r) => c.escrow.get_escrowed_keys(r).await.map(none),
        Call::ListAuditEvents(r) => c.escrow.list_audit_events(r).await.map(none),
        Call::VerifyAuditLog => c
            .escrow
            .verify_audit_log(pb::VerifyAuditLogRequest {})
            .await
            .map(none),
        Call::CreateToken(r) => c.admin.create_token(r).await.map(none),
        Call::RevokeToken(r) => c.admin.revoke_token(r).await.map(none),
    }
}

/// The server, the devices and the callers of every column.
struct Cast<'s> {
    server: &'s TestServer,
    alice_phone: TestDevice,
    alice_laptop: TestDevice,
    bob_phone: TestDevice,
    channel: Channel,
    /// The callers of every column, by who they are.
    callers: Vec<(Who, Caller)>,
    app: Caller,
    own: Caller,
    admin: Caller,
    db: tokio::sync::Mutex<RawDb>,
}

/// A fresh X-Wing key pair.
fn fresh_xwing() -> DecapsulationKey {
    DecapsulationKey::generate().expect("keygen")
}

/// The token id a plaintext token carries (`kh_<id>_<secret>`).
fn token_id_of(token: &str) -> String {
    token
        .strip_prefix("kh_")
        .and_then(|rest| rest.split('_').next())
        .expect("a kh_ token")
        .to_string()
}

impl<'s> Cast<'s> {
    async fn enroll(server: &'s TestServer) -> Cast<'s> {
        let alice_phone = TestDevice::enroll(server, "alice", "phone").await;
        let alice_laptop = TestDevice::enroll(server, "alice", "laptop").await;
        let bob_phone = TestDevice::enroll(server, "bob", "phone").await;
        TestDevice::enroll(server, "carol", "phone").await;
        let channel = server.client(&server.admin_token).await.channel();
        let tokens = Callers::new(server, &alice_phone, &alice_laptop, &bob_phone).await;
        let callers: Vec<(Who, Caller)> = WITH_TOKEN
            .iter()
            .map(|who| (*who, Caller::bearer(&channel, tokens.token(*who))))
            .collect();
        let of = |who: Who| {
            callers
                .iter()
                .find(|(w, _)| *w == who)
                .expect("caller")
                .1
                .clone()
        };
        Cast {
            server,
            app: of(Who::App),
            own: of(Who::Own),
            admin: of(Who::Admin),
            callers,
            alice_phone,
            alice_laptop,
            bob_phone,
            channel,
            db: tokio::sync::Mutex::new(RawDb::open(&server.db).await),
        }
    }

    fn caller(&self, who: Who) -> &Caller {
        &self
            .callers
            .iter()
            .find(|(w, _)| *w == who)
            .expect("a caller of every column")
            .1
    }

    /// The device behind a device column.
    fn device(&self, who: Who) -> Option<&TestDevice> {
        match who {
            Who::Own => Some(&self.alice_phone),
            Who::Sibling => Some(&self.alice_laptop),
            Who::Other => Some(&self.bob_phone),
            Who::Nobody | Who::App | Who::Staff | Who::Admin | Who::Member => None,
        }
    }

    async fn fingerprint(&self) -> Fingerprint {
        self.db.lock().await.fingerprint().await
    }

    /// The current device keys of `users`, read from the store.
    async fn current_keys(&self, users: &[&str]) -> Vec<UserKey> {
        current_keys(self.server, users).await
    }

    /// A fresh DEK wrapped by alice's phone to `targets` for `epoch` of `session`, with an
    /// escrow wrap when `escrow`, signed with the phone's identity key.
    fn key_set(
        &self,
        session: SessionId,
        epoch: u32,
        targets: &[UserKey],
        escrow: bool,
    ) -> pb::ClientWrappedKeySet {
        let targets = WrapTarget::all_stored(targets);
        fresh_key_set(
            self.server,
            &self.alice_phone,
            session,
            epoch,
            &targets,
            escrow,
        )
    }

    fn service_wrapped_request(&self) -> pb::CreateSessionRequest {
        service_wrapped_request("alice", &["carol"])
    }

    async fn client_wrapped_request(&self, session: SessionId) -> pb::CreateSessionRequest {
        let members = self.current_keys(&["alice", "carol"]).await;
        let key_set = self.key_set(session, 1, &members, true);
        client_wrapped_request(&self.alice_phone, session, user_ids(&["carol"]), key_set)
    }

    /// A new service-wrapped session of alice with carol, created by the app server.
    async fn service_wrapped_session(&self) -> SessionId {
        let created = self
            .app
            .sessions
            .clone()
            .create_session(self.service_wrapped_request())
            .await
            .expect("create a service-wrapped session")
            .into_inner();
        SessionId::parse(&created.session_id).expect("session id")
    }

    /// A new client-wrapped session of alice with carol, created by alice's phone.
    async fn client_wrapped_session(&self) -> SessionId {
        let session = SessionId::generate();
        let request = self.client_wrapped_request(session).await;
        self.own
            .sessions
            .clone()
            .create_session(request)
            .await
            .expect("create a client-wrapped session");
        session
    }

    /// Publishes `xwing` as the current key of alice's phone, as the phone itself.
    async fn publish_own_key(&self, xwing: &DecapsulationKey) {
        self.own
            .keys
            .clone()
            .publish_device_key(bundle_request(&self.alice_phone, xwing))
            .await
            .expect("publish a key of alice's phone");
    }

    /// A new token of `role` (unbound): its plaintext and its id.
    async fn create_token(&self, role: pb::Role) -> (String, String) {
        let created = self
            .admin
            .admin
            .clone()
            .create_token(pb::CreateTokenRequest {
                role: role as i32,
                ..Default::default()
            })
            .await
            .expect("create token")
            .into_inner();
        (created.token.clone(), created.token_id.clone())
    }

    /// A valid request for `rpc`, after whatever setup it needs (a fresh session, a key to
    /// revoke, a token to revoke). The request is the same whoever sends it.
    async fn prepare(&self, rpc: Rpc) -> Call {
        match rpc {
            Rpc::PublishDeviceKey => {
                Call::PublishDeviceKey(bundle_request(&self.alice_phone, &fresh_xwing()))
            }
            Rpc::RevokeDeviceKey => {
                // An older key of the phone, superseded by a newer one: revoking it leaves the
                // phone a current key for the session calls.
                let older = fresh_xwing();
                self.publish_own_key(&older).await;
                self.publish_own_key(&fresh_xwing()).await;
                Call::RevokeDeviceKey(pb::RevokeDeviceKeyRequest {
                    user_id: "alice".into(),
                    device_id: "phone".into(),
                    key_id: older.encapsulation_key().key_id().as_bytes().to_vec(),
                })
            }
            Rpc::GetUserKeys => Call::GetUserKeys(pb::GetUserKeysRequest {
                user_ids: vec!["alice".into(), "bob".into(), "carol".into()],
            }),
            Rpc::GetEscrowKey => Call::GetEscrowKey,
            Rpc::CreateSessionServiceWrapped => Call::CreateSession(self.service_wrapped_request()),
            Rpc::CreateSessionClientWrapped => {
                Call::CreateSession(self.client_wrapped_request(SessionId::generate()).await)
            }
            Rpc::AddRecipientsServiceWrapped => {
                let session = self.service_wrapped_session().await;
                Call::AddRecipients(pb::AddRecipientsRequest {
                    session_id: session.to_string(),
                    user_ids: vec!["bob".into()],
                    key_set: None,
                    idempotency_key: String::new(),
                })
            }
            Rpc::AddRecipientsClientWrapped => {
                let session = self.client_wrapped_session().await;
                let new_devices = self.current_keys(&["bob"]).await;
                Call::AddRecipients(pb::AddRecipientsRequest {
                    session_id: session.to_string(),
                    user_ids: vec!["bob".into()],
                    key_set: Some(self.key_set(session, 1, &new_devices, false)),
                    idempotency_key: String::new(),
                })
            }
            Rpc::RemoveRecipientsServiceWrapped => {
                let session = self.service_wrapped_session().await;
                Call::RemoveRecipients(pb::RemoveRecipientsRequest {
                    session_id: session.to_string(),
                    user_ids: vec!["carol".into()],
                    key_set: None,
                    idempotency_key: String::new(),
                })
            }
            Rpc::RemoveRecipientsClientWrapped => {
                let session = self.client_wrapped_session().await;
                let staying = self.current_keys(&["alice"]).await;
                Call::RemoveRecipients(pb::RemoveRecipientsRequest {
                    session_id: session.to_string(),
                    user_ids: vec!["carol".into()],
                    key_set: Some(self.key_set(session, 2, &staying, true)),
                    idempotency_key: String::new(),
                })
            }
            Rpc::RotateSessionServiceWrapped => {
                let session = self.service_wrapped_session().await;
                Call::RotateSession(pb::RotateSessionRequest {
                    session_id: session.to_string(),
                    key_set: None,
                    idempotency_key: String::new(),
                })
            }
            Rpc::RotateSessionClientWrapped => {
                let session = self.client_wrapped_session().await;
                let members = self.current_keys(&["alice", "carol"]).await;
                Call::RotateSession(pb::RotateSessionRequest {
                    session_id: session.to_string(),
                    key_set: Some(self.key_set(session, 2, &members, true)),
                    idempotency_key: String::new(),
                })
            }
            Rpc::GetSessionKeys => {
                let session = self.service_wrapped_session().await;
                Call::GetSessionKeys(pb::GetSessionKeysRequest {
                    session_id: session.to_string(),
                    epoch: None,
                })
            }
            Rpc::SyncSessionKeys => {
                self.service_wrapped_session().await;
                Call::SyncSessionKeys(pb::SyncSessionKeysRequest {
                    cursor: String::new(),
                    page_size: 0,
                })
            }
            Rpc::DeleteSessionServiceWrapped => {
                let session = self.service_wrapped_session().await;
                Call::DeleteSession(pb::DeleteSessionRequest {
                    session_id: session.to_string(),
                })
            }
            Rpc::DeleteSessionClientWrapped => {
                let session = self.client_wrapped_session().await;
                Call::DeleteSession(pb::DeleteSessionRequest {
                    session_id: session.to_string(),
                })
            }
            Rpc::GetEscrowedKeys => {
                let session = self.service_wrapped_session().await;
                Call::GetEscrowedKeys(pb::GetEscrowedKeysRequest {
                    session_id: session.to_string(),
                    epochs: Vec::new(),
                    reason: "authorization matrix".into(),
                })
            }
            Rpc::ListAuditEvents => Call::ListAuditEvents(pb::ListAuditEventsRequest {
                after_seq: 0,
                page_size: 0,
            }),
            Rpc::VerifyAuditLog => Call::VerifyAuditLog,
            Rpc::CreateToken => Call::CreateToken(pb::CreateTokenRequest {
                role: pb::Role::App as i32,
                label: "authorization matrix".into(),
                ..Default::default()
            }),
            Rpc::RevokeToken => {
                let (_, token_id) = self.create_token(pb::Role::App).await;
                Call::RevokeToken(pb::RevokeTokenRequest { token_id })
            }
        }
    }

    /// Prepares `rpc`, sends it as `who` and checks the outcome against `expected`: the code;
    /// nothing written when refused; only the caller's own keys when session keys are served.
    /// Returns what differs, if anything.
    async fn check_cell(&self, rpc: Rpc, who: Who, expected: Code) -> Option<String> {
        let call = self.prepare(rpc).await;
        let before = self.fingerprint().await;
        let outcome = send(self.caller(who), call).await;
        let code = outcome.as_ref().err().map_or(Code::Ok, Status::code);
        if code != expected {
            let message = outcome.err().map(|s| s.message().to_string());
            return Some(format!(
                "{rpc:?} as {who:?}: expected {expected:?}, got {code:?} {message:?}"
            ));
        }
        match outcome {
            Err(_) => {
                let after = self.fingerprint().await;
                (after != before).then(|| {
                    format!("{rpc:?} as {who:?} was refused but wrote: {before:?} -> {after:?}")
                })
            }
            Ok(served) => {
                let device = self.device(who)?;
                served
                    .iter()
                    .find(|k| {
                        k.user_id != device.user.as_str() || k.device_id != device.device.as_str()
                    })
                    .map(|k| {
                        format!(
                            "{rpc:?} as {who:?} served a key of {}/{}",
                            k.user_id, k.device_id
                        )
                    })
            }
        }
    }
}

async fn every_call_by_every_caller(server: &TestServer) {
    let cast = Cast::enroll(server).await;
    let mut differences = Vec::new();
    let mut checked = 0;
    for (rpc, row) in MATRIX {
        for (who, expected) in WITH_TOKEN.iter().zip(row) {
            checked += 1;
            differences.extend(cast.check_cell(*rpc, *who, *expected).await);
        }
    }
    assert_eq!(
        checked,
        MATRIX.len() * WITH_TOKEN.len(),
        "every cell was checked"
    );
    assert!(
        differences.is_empty(),
        "{} cells differ from the documented rules:\n{}",
        differences.len(),
        differences.join("\n")
    );
}

async fn callers_without_a_usable_token_are_unauthenticated(server: &TestServer) {
    let cast = Cast::enroll(server).await;
    let (app_token, _) = cast.create_token(pb::Role::App).await;
    let token_id = token_id_of(&app_token);
    let unknown = IssuedToken::generate().expect("token");
    let mut credentials: Vec<(String, Option<String>)> = vec![
        ("no authorization header".into(), None),
        ("Basic scheme".into(), Some("Basic YWxpY2U6c2VjcmV0".into())),
        (
            "token without the Bearer scheme".into(),
            Some(app_token.clone()),
        ),
        ("Bearer and nothing else".into(), Some("Bearer ".into())),
        (
            "not a Keyhold token".into(),
            Some("Bearer not-a-keyhold-token".into()),
        ),
        (
            "token id without its secret".into(),
            Some(format!("Bearer kh_{token_id}")),
        ),
        (
            "secret cut short".into(),
            Some(format!("Bearer {}", &app_token[..app_token.len() - 2])),
        ),
        (
            "well-formed unknown token".into(),
            Some(format!("Bearer {}", unknown.expose_plaintext())),
        ),
        (
            "known token id with another secret".into(),
            Some(format!(
                "Bearer kh_{token_id}_{}",
                unknown
                    .expose_plaintext()
                    .rsplit('_')
                    .next()
                    .expect("secret")
            )),
        ),
    ];

    // A token of each role works, is revoked through Admin.RevokeToken, and then does not.
    let revocable = [
        (pb::Role::App, "", "", Rpc::GetUserKeys),
        (pb::Role::Device, "alice", "phone", Rpc::SyncSessionKeys),
        (pb::Role::Staff, "", "", Rpc::VerifyAuditLog),
        (pb::Role::Admin, "", "", Rpc::CreateToken),
    ];
    for (role, user, device, allowed) in revocable {
        let token = server.token(role, user, device).await;
        let caller = Caller::bearer(&cast.channel, &token);
        send(&caller, cast.prepare(allowed).await)
            .await
            .unwrap_or_else(|e| panic!("{role:?} token before revocation: {e}"));
        cast.admin
            .admin
            .clone()
            .revoke_token(pb::RevokeTokenRequest {
                token_id: token_id_of(&token),
            })
            .await
            .expect("revoke token");
        credentials.push((
            format!("revoked {role:?} token"),
            Some(format!("Bearer {token}")),
        ));
    }

    let mut calls = Vec::new();
    for (rpc, _) in MATRIX {
        calls.push((*rpc, cast.prepare(*rpc).await));
    }
    let before = cast.fingerprint().await;
    let mut differences = Vec::new();
    for (what, header) in &credentials {
        let caller = Caller::with_header(&cast.channel, header.as_deref());
        for (rpc, call) in &calls {
            match send(&caller, call.clone()).await {
                Err(status) if status.code() == Code::Unauthenticated => {}
                Err(status) => differences.push(format!(
                    "{rpc:?} with {what}: {:?} {:?}",
                    status.code(),
                    status.message()
                )),
                Ok(_) => differences.push(format!("{rpc:?} with {what}: OK")),
            }
        }
    }
    assert!(
        differences.is_empty(),
        "not UNAUTHENTICATED:\n{}",
        differences.join("\n")
    );
    assert_eq!(
        cast.fingerprint().await,
        before,
        "unauthenticated calls wrote nothing"
    );
}

async fn health_answers_without_a_token(server: &TestServer) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let channel = server.client(&server.admin_token).await.channel();
    let mut health = HealthClient::new(channel);
    for service in [
        "",
        "keyhold.v1.KeyDirectory",
        "keyhold.v1.Sessions",
        "keyhold.v1.Escrow",
        "keyhold.v1.Admin",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?} without a token: {e}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

on_both_servers! {
    every_call_by_every_caller_gets_the_documented_code => every_call_by_every_caller;
    bad_credentials_are_unauthenticated_on_every_call => callers_without_a_usable_token_are_unauthenticated;
    health_is_served_without_a_token => health_answers_without_a_token;
}
