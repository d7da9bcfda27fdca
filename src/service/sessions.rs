//! The Sessions service: sessions, their members and epochs, and the wrapped DEKs of each
//! recipient device.
//!
//! **Who gets which key.** Recipients are named by user; each user's *current* device keys at
//! the time of the call get the epoch's DEK (the author's user is always a recipient). A
//! device that publishes its first key after the session was created, or after it was added,
//! gets nothing of the session until it is added (AddRecipients with its user) or a later
//! epoch starts (RotateSession, RemoveRecipients): the service never wraps a DEK for a key the
//! session's members did not see. A revoked device gets nothing new: a new epoch skips it and
//! ends its membership. A removed device keeps the keys of the epochs it had, and gets none of
//! a later one.
//!
//! **Modes.** SERVICE_WRAPPED (app role): the service draws each DEK, wraps it per device,
//! seals it to the staff escrow key and keeps a copy under the KEK to wrap for devices added
//! later; the plaintext DEK is returned only when asked and zeroized once sent.
//! CLIENT_WRAPPED (the author device): the device uploads the wraps and the escrow wrap signed
//! with its identity key ([`crate::crypto::sign::ClientWrappedKeySet`]); the service checks
//! the signature and that the wraps cover exactly the expected devices' current keys.

use std::collections::BTreeSet;
use std::num::NonZeroUsize;

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::key_directory::parse_suite;
use super::{check_list_len, crypto_internal, invalid, parse_field, store_status, AppState};
use crate::auth::{principal, Principal};
use crate::crypto::envelope::{
    open_under_kek, seal_under_kek, wrap_dek, wrap_dek_for_recipients, DekEnvelope, KekContext,
    Recipient, WrapContext,
};
use crate::crypto::ids::{DeviceId, Epoch, KeyId, SessionId, UserId};
use crate::crypto::keys::Dek;
use crate::crypto::sign::{
    ClientWrap, ClientWrappedKeySet, EscrowWrap, IdentityPublicKey, Signature,
};
use crate::crypto::xwing::EncapsulationKey;
use crate::crypto::Suite;
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::sessions_server::Sessions;
use crate::store::sessions::{EpochKeys, Member, NewSession, NewSessionKey, Session, SessionMode};
use crate::store::user_keys::UserKey;
use crate::store::StoreError;

/// Most session keys one call produces (devices of all recipients together).
pub const MAX_KEYS_PER_CALL: usize = 2000;
/// Page size of SyncSessionKeys when the caller gives none.
pub const DEFAULT_SYNC_PAGE: u32 = 100;
/// Largest SyncSessionKeys page.
pub const MAX_SYNC_PAGE: u32 = 500;

/// The Sessions gRPC service.
#[derive(Clone)]
pub struct SessionsService {
    state: AppState,
}

impl SessionsService {
    /// The service over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

/// A device a DEK is to be wrapped for: who it is and its current key.
#[derive(Clone)]
struct Target {
    user: UserId,
    device: DeviceId,
    key: EncapsulationKey,
}

fn targets_from_keys(keys: Vec<UserKey>) -> Result<Vec<Target>, Status> {
    keys.into_iter()
        .map(|k| {
            // Keys were validated when published; a key that no longer parses is corruption.
            let key = EncapsulationKey::from_slice(&k.encapsulation_key).map_err(|e| {
                tracing::error!(error = %e, key_id = %k.key_id, "stored encapsulation key does not parse");
                Status::internal("internal error")
            })?;
            Ok(Target {
                user: k.user,
                device: k.device,
                key,
            })
        })
        .collect()
}

fn parse_user_list(field: &str, ids: &[String], max: usize) -> Result<Vec<UserId>, Status> {
    check_list_len(field, ids.len(), max, false)?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(ids.len());
    for (i, u) in ids.iter().enumerate() {
        let user = parse_field(&format!("{field}[{i}]"), UserId::new(u.clone()))?;
        if seen.insert(user.clone()) {
            out.push(user);
        }
    }
    Ok(out)
}

fn too_many_keys(n: usize) -> Result<(), Status> {
    if n > MAX_KEYS_PER_CALL {
        return Err(Status::resource_exhausted(format!(
            "user_ids: the recipients have {n} devices; at most {MAX_KEYS_PER_CALL} session keys per call"
        )));
    }
    Ok(())
}

/// Wraps `dek` for every target (on the blocking pool, over all cores), and for a
/// service-wrapped epoch seals the escrow copy and the KEK copy.
async fn wrap_epoch(
    state: &AppState,
    session_id: SessionId,
    epoch: Epoch,
    dek: Dek,
    targets: Vec<Target>,
    with_escrow_and_service_copy: bool,
) -> Result<EpochKeys, Status> {
    let kek = state.kek.clone();
    let escrow = state.escrow_public_key.clone();
    tokio::task::spawn_blocking(move || {
        let recipients: Vec<(Recipient, &EncapsulationKey)> = targets
            .iter()
            .map(|t| {
                (
                    Recipient::Device {
                        user: t.user.clone(),
                        device: t.device.clone(),
                    },
                    &t.key,
                )
            })
            .collect();
        let parallelism = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
        let envelopes = wrap_dek_for_recipients(&dek, session_id, epoch, &recipients, parallelism)?;
        let session_keys = targets
            .iter()
            .zip(envelopes)
            .map(|(t, env)| NewSessionKey {
                user: t.user.clone(),
                device: t.device.clone(),
                key_id: t.key.key_id(),
                envelope: env.into_bytes(),
            })
            .collect();
        let (staff_key, service_key) = if with_escrow_and_service_copy {
            let escrow_ctx = WrapContext {
                session_id,
                epoch,
                recipient: Recipient::Escrow,
            };
            let staff = wrap_dek(&dek, &escrow, &escrow_ctx)?;
            let service = seal_under_kek(
                &kek,
                dek.expose_secret(),
                &KekContext::ServiceDek { session_id, epoch },
            )?;
            (
                Some((escrow.key_id(), staff.into_bytes())),
                Some((kek.version().0, service)),
            )
        } else {
            (None, None)
        };
        Ok(EpochKeys {
            epoch,
            session_keys,
            staff_key,
            service_key,
        })
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "wrapping task failed");
        Status::internal("internal error")
    })?
    .map_err(crypto_internal)
}

fn session_keys_to_wire(
    session_id: SessionId,
    epoch: Epoch,
    keys: &[NewSessionKey],
) -> Vec<pb::SessionKey> {
    keys.iter()
        .map(|k| pb::SessionKey {
            session_id: session_id.to_string(),
            epoch: epoch.get(),
            user_id: k.user.to_string(),
            device_id: k.device.to_string(),
            key_id: k.key_id.as_bytes().to_vec(),
            envelope: k.envelope.clone(),
        })
        .collect()
}

fn members_of(targets: &[Target]) -> Vec<Member> {
    targets
        .iter()
        .map(|t| Member {
            user: t.user.clone(),
            device: t.device.clone(),
            key_id: t.key.key_id(),
        })
        .collect()
}

/// A client-wrapped key set as parsed from the wire, before it is checked.
struct ParsedKeySet {
    epoch: Epoch,
    wraps: Vec<ClientWrap>,
    escrow: Option<EscrowWrap>,
    signature: Signature,
}

fn parse_key_set(ks: Option<&pb::ClientWrappedKeySet>) -> Result<ParsedKeySet, Status> {
    let ks = ks.ok_or_else(|| invalid("key_set", "required for CLIENT_WRAPPED sessions"))?;
    let epoch = parse_field("key_set.epoch", Epoch::new(ks.epoch))?;
    check_list_len("key_set.wraps", ks.wraps.len(), MAX_KEYS_PER_CALL, false)?;
    let mut wraps = Vec::with_capacity(ks.wraps.len());
    for (i, w) in ks.wraps.iter().enumerate() {
        wraps.push(ClientWrap {
            user: parse_field(
                &format!("key_set.wraps[{i}].user_id"),
                UserId::new(w.user_id.clone()),
            )?,
            device: parse_field(
                &format!("key_set.wraps[{i}].device_id"),
                DeviceId::new(w.device_id.clone()),
            )?,
            key_id: parse_field(
                &format!("key_set.wraps[{i}].key_id"),
                KeyId::from_slice(&w.key_id),
            )?,
            envelope: parse_field(
                &format!("key_set.wraps[{i}].envelope"),
                DekEnvelope::from_bytes(&w.envelope),
            )?,
        });
    }
    let escrow = ks
        .escrow
        .as_ref()
        .map(|e| {
            Ok::<_, Status>(EscrowWrap {
                key_id: parse_field(
                    "key_set.escrow.escrow_key_id",
                    KeyId::from_slice(&e.escrow_key_id),
                )?,
                envelope: parse_field(
                    "key_set.escrow.envelope",
                    DekEnvelope::from_bytes(&e.envelope),
                )?,
            })
        })
        .transpose()?;
    let signature = parse_field("key_set.signature", Signature::from_slice(&ks.signature))?;
    Ok(ParsedKeySet {
        epoch,
        wraps,
        escrow,
        signature,
    })
}

/// Checks a client-wrapped key set against what the call expects: the epoch, exactly one wrap
/// per expected device with its current key id, the escrow wrap to the configured escrow key
/// when `escrow_required`, and the author's signature. Returns the epoch keys to store.
#[allow(
    clippy::too_many_arguments,
    reason = "each argument is one fact the check needs"
)]
fn check_key_set(
    state: &AppState,
    ks: ParsedKeySet,
    suite: Suite,
    session_id: SessionId,
    expected_epoch: Epoch,
    author: (&UserId, &DeviceId, &IdentityPublicKey),
    expected: &[Target],
    escrow_required: bool,
) -> Result<EpochKeys, Status> {
    if ks.epoch != expected_epoch {
        return Err(Status::aborted(format!(
            "key_set.epoch: this call needs the wraps of epoch {expected_epoch}, got {}",
            ks.epoch
        )));
    }
    let mut wanted: std::collections::BTreeMap<(UserId, DeviceId), KeyId> = expected
        .iter()
        .map(|t| ((t.user.clone(), t.device.clone()), t.key.key_id()))
        .collect();
    for (i, w) in ks.wraps.iter().enumerate() {
        match wanted.remove(&(w.user.clone(), w.device.clone())) {
            Some(key_id) if key_id == w.key_id => {}
            Some(_) => {
                return Err(Status::failed_precondition(format!(
                    "key_set.wraps[{i}]: device {}/{} has another current key; fetch the keys again",
                    w.user, w.device
                )))
            }
            None => {
                return Err(Status::failed_precondition(format!(
                    "key_set.wraps[{i}]: device {}/{} is not expected (not a recipient, duplicated, or without a current key)",
                    w.user, w.device
                )))
            }
        }
    }
    if let Some(((user, device), _)) = wanted.into_iter().next() {
        return Err(Status::failed_precondition(format!(
            "key_set.wraps: no wrap for device {user}/{device}; fetch the keys again"
        )));
    }
    match (&ks.escrow, escrow_required) {
        (Some(e), true) if e.key_id == state.escrow_public_key.key_id() => {}
        (Some(_), true) => {
            return Err(Status::failed_precondition(format!(
                "key_set.escrow.escrow_key_id: the escrow key is {}",
                state.escrow_public_key.key_id()
            )))
        }
        (None, true) => {
            return Err(Status::failed_precondition(
                "key_set.escrow: required: every epoch's DEK is escrowed (see KeyDirectory.GetEscrowKey)",
            ))
        }
        (Some(_), false) => {
            return Err(invalid(
                "key_set.escrow",
                "this epoch is already escrowed; leave it out",
            ))
        }
        (None, false) => {}
    }
    let set = ClientWrappedKeySet {
        suite,
        session_id,
        epoch: ks.epoch,
        author_user: author.0.clone(),
        author_device: author.1.clone(),
        wraps: ks.wraps,
        escrow: ks.escrow,
    };
    author
        .2
        .verify(&set, &ks.signature)
        .map_err(|e| invalid("key_set.signature", e))?;
    Ok(EpochKeys {
        epoch: ks.epoch,
        session_keys: set
            .wraps
            .into_iter()
            .map(|w| NewSessionKey {
                user: w.user,
                device: w.device,
                key_id: w.key_id,
                envelope: w.envelope.into_bytes(),
            })
            .collect(),
        staff_key: set.escrow.map(|e| (e.key_id, e.envelope.into_bytes())),
        service_key: None,
    })
}

/// Checks a key set uploaded for an existing client-wrapped session against its author
/// device's current identity key (from `author_keys`); see [`check_key_set`].
fn check_author_key_set(
    state: &AppState,
    ks: ParsedKeySet,
    session: &Session,
    author_keys: &[UserKey],
    epoch: Epoch,
    expected: &[Target],
    escrow_required: bool,
) -> Result<EpochKeys, Status> {
    let author_device = session.author_device.as_ref().ok_or_else(|| {
        tracing::error!(session = %session.session_id, "client-wrapped session without an author device");
        Status::internal("internal error")
    })?;
    let identity = author_identity(author_keys, &session.author_user, author_device)?;
    check_key_set(
        state,
        ks,
        session.suite,
        session.session_id,
        epoch,
        (&session.author_user, author_device, &identity),
        expected,
        escrow_required,
    )
}

/// The author device's current identity key, from the recipients' current keys.
fn author_identity(
    keys: &[UserKey],
    user: &UserId,
    device: &DeviceId,
) -> Result<IdentityPublicKey, Status> {
    let key = keys
        .iter()
        .find(|k| &k.user == user && &k.device == device)
        .ok_or_else(|| {
            Status::failed_precondition("author_device_id: the author device has no current key")
        })?;
    IdentityPublicKey::from_slice(&key.identity_key).map_err(|e| {
        tracing::error!(error = %e, "stored identity key does not parse");
        Status::internal("internal error")
    })
}

/// Who may change a session: an app server for a service-wrapped one; for a client-wrapped
/// one, its author device (which must also provide the wraps).
fn require_session_owner(caller: &Principal, session: &Session) -> Result<(), Status> {
    match (session.mode, caller) {
        (SessionMode::ServiceWrapped, Principal::App { .. }) => Ok(()),
        (SessionMode::ClientWrapped, Principal::Device { user, device, .. })
            if user == &session.author_user && Some(device) == session.author_device.as_ref() =>
        {
            Ok(())
        }
        _ => Err(Status::permission_denied(
            "only an app server (service-wrapped) or the author device (client-wrapped) may change this session",
        )),
    }
}

fn live(session: Option<Session>) -> Result<Session, StoreError> {
    match session {
        Some(s) if s.deleted_at.is_none() => Ok(s),
        _ => Err(StoreError::NotFound),
    }
}

#[tonic::async_trait]
impl Sessions for SessionsService {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner();
        let suite = match req.suite {
            0 => Suite::XWingAes256GcmV1,
            v => parse_suite("suite", v)?,
        };
        let author = parse_field("author_user_id", UserId::new(req.author_user_id.clone()))?;
        let listed = match &req.recipients {
            Some(pb::create_session_request::Recipients::UserIds(list)) => {
                parse_user_list("user_ids.user_ids", &list.user_ids, self.state.max_list_len)?
            }
            Some(pb::create_session_request::Recipients::TrustedUsersOfAuthor(true)) => {
                // Only someone acting for the author may learn (and use) whom it trusts.
                super::require_acts_for(&caller, &author, None)?;
                super::trust::trusted_recipients(&self.state, &author).await?
            }
            Some(pb::create_session_request::Recipients::TrustedUsersOfAuthor(false)) => {
                return Err(invalid(
                    "trusted_users_of_author",
                    "set it to true, or name the recipients in user_ids",
                ))
            }
            None => return Err(invalid("recipients", "name the recipient users (user_ids)")),
        };
        let mut users = vec![author.clone()];
        users.extend(listed.into_iter().filter(|u| u != &author));

        match pb::SessionMode::try_from(req.mode) {
            Ok(pb::SessionMode::ServiceWrapped) => {
                if !matches!(caller, Principal::App { .. }) {
                    return Err(Status::permission_denied(
                        "SERVICE_WRAPPED sessions are created by app servers",
                    ));
                }
                if !req.session_id.is_empty() {
                    return Err(invalid(
                        "session_id",
                        "chosen by the service for SERVICE_WRAPPED sessions",
                    ));
                }
                if !req.author_device_id.is_empty() {
                    return Err(invalid(
                        "author_device_id",
                        "only for CLIENT_WRAPPED sessions",
                    ));
                }
                if req.key_set.is_some() {
                    return Err(invalid("key_set", "only for CLIENT_WRAPPED sessions"));
                }
                self.create_service_wrapped(author, users, suite, req.return_plaintext_dek)
                    .await
            }
            Ok(pb::SessionMode::ClientWrapped) => {
                if req.return_plaintext_dek {
                    return Err(invalid(
                        "return_plaintext_dek",
                        "the service never holds a CLIENT_WRAPPED DEK",
                    ));
                }
                let session_id = parse_field("session_id", SessionId::parse(&req.session_id))?;
                let author_device = parse_field(
                    "author_device_id",
                    DeviceId::new(req.author_device_id.clone()),
                )?;
                let key_set = parse_key_set(req.key_set.as_ref())?;
                match &caller {
                    Principal::Device { user, device, .. }
                        if user == &author && device == &author_device => {}
                    _ => {
                        return Err(Status::permission_denied(
                            "CLIENT_WRAPPED sessions are created by their author device",
                        ))
                    }
                }
                self.create_client_wrapped(session_id, author, author_device, users, suite, key_set)
                    .await
            }
            Ok(pb::SessionMode::Unspecified) => Err(invalid("mode", "must be set")),
            Err(_) => Err(invalid("mode", format!("unknown value {}", req.mode))),
        }
    }

    async fn add_recipients(
        &self,
        request: Request<pb::AddRecipientsRequest>,
    ) -> Result<Response<pb::AddRecipientsResponse>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner();
        let session_id = parse_field("session_id", SessionId::parse(&req.session_id))?;
        let users = parse_user_list("user_ids", &req.user_ids, self.state.max_list_len)?;
        if users.is_empty() {
            return Err(invalid("user_ids", "must not be empty"));
        }
        let session = live(
            self.state
                .store
                .session(&session_id)
                .await
                .map_err(store_status)?,
        )
        .map_err(store_status)?;
        require_session_owner(&caller, &session)?;
        let key_set = match session.mode {
            SessionMode::ServiceWrapped if req.key_set.is_some() => {
                return Err(invalid("key_set", "only for CLIENT_WRAPPED sessions"))
            }
            SessionMode::ServiceWrapped => None,
            SessionMode::ClientWrapped => Some(parse_key_set(req.key_set.as_ref())?),
        };

        let keys = (self.state.store.conn().await?)
            .current_user_keys(&users)
            .await?;
        let candidates = targets_from_keys(keys)?;
        too_many_keys(candidates.len())?;
        let state = self.state.clone();
        let author_keys = match session.mode {
            SessionMode::ClientWrapped => {
                (self.state.store.conn().await?)
                    .current_user_keys(std::slice::from_ref(&session.author_user))
                    .await?
            }
            SessionMode::ServiceWrapped => Vec::new(),
        };
        let result = self
            .state
            .store
            .transaction(async move |tx| {
                let session = live(tx.session(&session_id).await?)?;
                let epoch = session.current_epoch;
                let members = tx.active_members(&session_id).await?;
                let new: Vec<Target> = candidates
                    .into_iter()
                    .filter(|t| {
                        !members
                            .iter()
                            .any(|m| m.user == t.user && m.device == t.device)
                    })
                    .collect();
                let keys = match key_set {
                    None => {
                        let Some((version, envelope)) = tx.service_key(&session_id, epoch).await?
                        else {
                            return Ok(Err(Status::failed_precondition(
                                "the session has no service copy of its key",
                            )));
                        };
                        if version != state.kek.version().0 {
                            return Ok(Err(Status::failed_precondition(format!(
                                "the session key is under KEK version {version}; rotate the session"
                            ))));
                        }
                        let dek = match open_under_kek(
                            &state.kek,
                            &envelope,
                            &KekContext::ServiceDek { session_id, epoch },
                        )
                        .and_then(|b| Dek::from_slice(&b))
                        {
                            Ok(d) => d,
                            Err(e) => return Ok(Err(crypto_internal(e))),
                        };
                        match wrap_epoch(&state, session_id, epoch, dek, new.clone(), false).await {
                            Ok(k) => k,
                            Err(s) => return Ok(Err(s)),
                        }
                    }
                    Some(ks) => {
                        match check_author_key_set(
                            &state,
                            ks,
                            &session,
                            &author_keys,
                            epoch,
                            &new,
                            false,
                        ) {
                            Ok(k) => k,
                            Err(s) => return Ok(Err(s)),
                        }
                    }
                };
                // Every refusal above came before any write. Writing now: first make sure no
                // rotation moved the session on since it was read (row lock on PostgreSQL).
                tx.lock_epoch(&session_id, epoch).await?;
                tx.insert_epoch_keys(&session_id, &keys).await?;
                tx.add_members(&session_id, epoch, &members_of(&new))
                    .await?;
                Ok(Ok((epoch, keys)))
            })
            .await
            .map_err(store_status)?;
        let (epoch, keys) = result?;
        Ok(Response::new(pb::AddRecipientsResponse {
            epoch: epoch.get(),
            session_keys: session_keys_to_wire(session_id, epoch, &keys.session_keys),
        }))
    }

    async fn remove_recipients(
        &self,
        request: Request<pb::RemoveRecipientsRequest>,
    ) -> Result<Response<pb::RemoveRecipientsResponse>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner();
        let session_id = parse_field("session_id", SessionId::parse(&req.session_id))?;
        let users = parse_user_list("user_ids", &req.user_ids, self.state.max_list_len)?;
        if users.is_empty() {
            return Err(invalid("user_ids", "must not be empty"));
        }
        let (epoch, keys) = self
            .new_epoch(&caller, session_id, users, req.key_set.as_ref())
            .await?;
        Ok(Response::new(pb::RemoveRecipientsResponse {
            epoch: epoch.get(),
            session_keys: session_keys_to_wire(session_id, epoch, &keys),
        }))
    }

    async fn rotate_session(
        &self,
        request: Request<pb::RotateSessionRequest>,
    ) -> Result<Response<pb::RotateSessionResponse>, Status> {
        let caller = principal(&request)?.clone();
        let req = request.into_inner();
        let session_id = parse_field("session_id", SessionId::parse(&req.session_id))?;
        let (epoch, keys) = self
            .new_epoch(&caller, session_id, Vec::new(), req.key_set.as_ref())
            .await?;
        Ok(Response::new(pb::RotateSessionResponse {
            epoch: epoch.get(),
            session_keys: session_keys_to_wire(session_id, epoch, &keys),
        }))
    }

    async fn get_session_keys(
        &self,
        request: Request<pb::GetSessionKeysRequest>,
    ) -> Result<Response<pb::GetSessionKeysResponse>, Status> {
        let caller = principal(&request)?.clone();
        let Principal::Device { user, device, .. } = &caller else {
            return Err(Status::permission_denied(
                "session keys are fetched by the device they are wrapped for",
            ));
        };
        let req = request.get_ref();
        let session_id = parse_field("session_id", SessionId::parse(&req.session_id))?;
        let epoch = req
            .epoch
            .map(|e| parse_field("epoch", Epoch::new(e)))
            .transpose()?;
        live(
            self.state
                .store
                .session(&session_id)
                .await
                .map_err(store_status)?,
        )
        .map_err(store_status)?;
        let keys = self
            .state
            .store
            .device_session_keys(&session_id, user, device, epoch)
            .await
            .map_err(store_status)?;
        if keys.is_empty() {
            return Err(Status::not_found(match epoch {
                Some(e) => {
                    format!("session_id: this device holds no key of epoch {e} of this session")
                }
                None => "session_id: this device holds no key of this session".to_string(),
            }));
        }
        Ok(Response::new(pb::GetSessionKeysResponse {
            session_keys: keys.into_iter().map(record_to_wire).collect(),
        }))
    }

    async fn sync_session_keys(
        &self,
        request: Request<pb::SyncSessionKeysRequest>,
    ) -> Result<Response<pb::SyncSessionKeysResponse>, Status> {
        let caller = principal(&request)?.clone();
        let Principal::Device { user, device, .. } = &caller else {
            return Err(Status::permission_denied(
                "session keys are synced by the device they are wrapped for",
            ));
        };
        let req = request.get_ref();
        let after = parse_cursor(&req.cursor)?;
        let page = match req.page_size {
            0 => DEFAULT_SYNC_PAGE,
            n => n.min(MAX_SYNC_PAGE),
        };
        let keys = self
            .state
            .store
            .sync_device_session_keys(user, device, after, i64::from(page))
            .await
            .map_err(store_status)?;
        let next = keys.last().map_or(after, |k| k.seq);
        Ok(Response::new(pb::SyncSessionKeysResponse {
            session_keys: keys.into_iter().map(record_to_wire).collect(),
            next_cursor: format_cursor(next),
        }))
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let caller = principal(&request)?.clone();
        let session_id = parse_field(
            "session_id",
            SessionId::parse(&request.get_ref().session_id),
        )?;
        let session = self
            .state
            .store
            .session(&session_id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found("session_id: no such session"))?;
        // The same owner rule as every other change: app servers own service-wrapped
        // sessions, the author device owns a client-wrapped one.
        require_session_owner(&caller, &session)?;
        let deleted_at = self
            .state
            .store
            .transaction(async move |tx| tx.delete_session(&session_id).await)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::DeleteSessionResponse {
            deleted_at: deleted_at.unix_micros(),
        }))
    }
}

fn record_to_wire(k: crate::store::sessions::SessionKeyRecord) -> pb::SessionKey {
    pb::SessionKey {
        session_id: k.session_id.to_string(),
        epoch: k.epoch.get(),
        user_id: k.user.to_string(),
        device_id: k.device.to_string(),
        key_id: k.key_id.as_bytes().to_vec(),
        envelope: k.envelope,
    }
}

const CURSOR_PREFIX: &str = "sk1.";

/// The opaque sync cursor: a version prefix and the last delivered position.
fn format_cursor(seq: i64) -> String {
    format!("{CURSOR_PREFIX}{seq:x}")
}

fn parse_cursor(cursor: &str) -> Result<i64, Status> {
    if cursor.is_empty() {
        return Ok(0);
    }
    cursor
        .strip_prefix(CURSOR_PREFIX)
        .filter(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|hex| i64::from_str_radix(hex, 16).ok())
        .filter(|v| *v >= 0)
        .ok_or_else(|| invalid("cursor", "not a cursor this service returned"))
}

impl SessionsService {
    /// Stores a new session at epoch 1 with its members and first epoch's keys, in one
    /// transaction. A taken session id (client-chosen) is ALREADY_EXISTS.
    async fn store_new_session(
        &self,
        session: NewSession,
        targets: &[Target],
        keys: EpochKeys,
    ) -> Result<(), Status> {
        let members = members_of(targets);
        let session_id = session.session_id;
        self.state
            .store
            .transaction(async move |tx| {
                tx.insert_session(&session).await?;
                tx.add_members(&session_id, Epoch::FIRST, &members).await?;
                tx.insert_epoch_keys(&session_id, &keys).await?;
                Ok(())
            })
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists(_) => {
                    Status::already_exists("session_id: a session with this id exists")
                }
                other => store_status(other),
            })
    }

    async fn create_service_wrapped(
        &self,
        author: UserId,
        users: Vec<UserId>,
        suite: Suite,
        return_plaintext_dek: bool,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let keys = (self.state.store.conn().await?)
            .current_user_keys(&users)
            .await?;
        let targets = targets_from_keys(keys)?;
        too_many_keys(targets.len())?;
        let session_id = SessionId::generate();
        let epoch = Epoch::FIRST;
        let dek = Dek::generate().map_err(crypto_internal)?;
        let plaintext = return_plaintext_dek.then(|| Zeroizing::new(dek.expose_secret().to_vec()));
        let keys = wrap_epoch(&self.state, session_id, epoch, dek, targets.clone(), true).await?;
        let session = NewSession {
            session_id,
            author_user: author,
            author_device: None,
            mode: SessionMode::ServiceWrapped,
            suite,
        };
        let wire = session_keys_to_wire(session_id, epoch, &keys.session_keys);
        self.store_new_session(session, &targets, keys).await?;
        Ok(Response::new(pb::CreateSessionResponse {
            session_id: session_id.to_string(),
            epoch: epoch.get(),
            session_keys: wire,
            // The response type's Debug redacts this field; the copy here is zeroized on drop,
            // the encoder's copy is freed with the response buffer.
            plaintext_dek: plaintext.map(|p| p.to_vec()),
        }))
    }

    async fn create_client_wrapped(
        &self,
        session_id: SessionId,
        author: UserId,
        author_device: DeviceId,
        users: Vec<UserId>,
        suite: Suite,
        key_set: ParsedKeySet,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let keys = (self.state.store.conn().await?)
            .current_user_keys(&users)
            .await?;
        let identity = author_identity(&keys, &author, &author_device)?;
        let targets = targets_from_keys(keys)?;
        too_many_keys(targets.len())?;
        let epoch = Epoch::FIRST;
        let epoch_keys = check_key_set(
            &self.state,
            key_set,
            suite,
            session_id,
            epoch,
            (&author, &author_device, &identity),
            &targets,
            true,
        )?;
        let session = NewSession {
            session_id,
            author_user: author,
            author_device: Some(author_device),
            mode: SessionMode::ClientWrapped,
            suite,
        };
        let wire = session_keys_to_wire(session_id, epoch, &epoch_keys.session_keys);
        self.store_new_session(session, &targets, epoch_keys)
            .await?;
        Ok(Response::new(pb::CreateSessionResponse {
            session_id: session_id.to_string(),
            epoch: epoch.get(),
            session_keys: wire,
            plaintext_dek: None,
        }))
    }

    /// Starts a new epoch without the devices of `removed_users`: RemoveRecipients and
    /// RotateSession. Remaining devices get the new DEK on their current key; a device whose
    /// key was revoked gets nothing and stops being a member.
    async fn new_epoch(
        &self,
        caller: &Principal,
        session_id: SessionId,
        removed_users: Vec<UserId>,
        key_set: Option<&pb::ClientWrappedKeySet>,
    ) -> Result<(Epoch, Vec<NewSessionKey>), Status> {
        let session = live(
            self.state
                .store
                .session(&session_id)
                .await
                .map_err(store_status)?,
        )
        .map_err(store_status)?;
        require_session_owner(caller, &session)?;
        if removed_users.contains(&session.author_user) {
            return Err(invalid(
                "user_ids",
                "the author cannot be removed from its session",
            ));
        }
        let key_set = match session.mode {
            SessionMode::ServiceWrapped if key_set.is_some() => {
                return Err(invalid("key_set", "only for CLIENT_WRAPPED sessions"))
            }
            SessionMode::ServiceWrapped => None,
            SessionMode::ClientWrapped => Some(parse_key_set(key_set)?),
        };
        let state = self.state.clone();
        let result = self
            .state
            .store
            .transaction(async move |tx| {
                let session = live(tx.session(&session_id).await?)?;
                let from = session.current_epoch;
                let members = tx.active_members(&session_id).await?;
                for u in &removed_users {
                    if !members.iter().any(|m| &m.user == u) {
                        return Ok(Err(Status::not_found(format!(
                            "user_ids: {u} is not a recipient of this session"
                        ))));
                    }
                }
                let staying: Vec<UserId> = members
                    .iter()
                    .map(|m| m.user.clone())
                    .filter(|u| !removed_users.contains(u))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let current = tx.current_user_keys(&staying).await?;
                let targets: Vec<Target> = match targets_from_keys(
                    current
                        .into_iter()
                        .filter(|k| {
                            members
                                .iter()
                                .any(|m| m.user == k.user && m.device == k.device)
                        })
                        .collect(),
                ) {
                    Ok(t) => t,
                    Err(s) => return Ok(Err(s)),
                };
                let leaving: Vec<(UserId, DeviceId)> = members
                    .iter()
                    .filter(|m| {
                        !targets
                            .iter()
                            .any(|t| t.user == m.user && t.device == m.device)
                    })
                    .map(|m| (m.user.clone(), m.device.clone()))
                    .collect();
                let Some(to) = from.next() else {
                    return Ok(Err(Status::failed_precondition(
                        "the session has used every epoch",
                    )));
                };
                let keys = match key_set {
                    None => {
                        let dek = match Dek::generate() {
                            Ok(d) => d,
                            Err(e) => return Ok(Err(crypto_internal(e))),
                        };
                        match wrap_epoch(&state, session_id, to, dek, targets.clone(), true).await {
                            Ok(k) => k,
                            Err(s) => return Ok(Err(s)),
                        }
                    }
                    Some(ks) => {
                        let author_keys = tx
                            .current_user_keys(std::slice::from_ref(&session.author_user))
                            .await?;
                        match check_author_key_set(
                            &state,
                            ks,
                            &session,
                            &author_keys,
                            to,
                            &targets,
                            true,
                        ) {
                            Ok(k) => k,
                            Err(s) => return Ok(Err(s)),
                        }
                    }
                };
                // Every refusal above came before any write; the compare-and-swap on the epoch
                // makes a concurrent rotation of the same session lose with ABORTED.
                tx.advance_epoch(&session_id, from).await?;
                tx.remove_members(&session_id, to, &leaving).await?;
                tx.add_members(&session_id, to, &members_of(&targets))
                    .await?;
                tx.insert_epoch_keys(&session_id, &keys).await?;
                Ok(Ok((to, keys.session_keys)))
            })
            .await
            .map_err(store_status)?;
        result
    }
}
