//! The Sessions workflows, as domain code over the store: create a session, add recipients to
//! its epoch, start a new epoch (RemoveRecipients, RotateSession), delete it, read and sync a
//! device's keys. Each change is one transaction that returns [`SessionError`]: every refusal
//! comes before the first write, and a refusal rolls the transaction back.
//!
//! Who gets which key is the module rule of [`super`]: each recipient user's devices with a
//! current key at the time of the call; a revoked device gets nothing of a new epoch and
//! stops being a member.

use std::collections::BTreeSet;

use zeroize::Zeroizing;

use super::error::SessionError;
use super::key_set::{self, author_identity, EscrowRule, Expected, ParsedKeySet};
use super::wrapping::{
    members_of, open_service_copy, targets_from_keys, wrap_epoch, Copies, Target,
};
use super::MAX_KEYS_PER_CALL;
use crate::auth::Principal;
use crate::crypto::ids::{DeviceId, Epoch, SessionId, UserId};
use crate::crypto::keys::Dek;
use crate::crypto::Suite;
use crate::service::AppState;
use crate::store::idempotency::Recorder;
use crate::store::sessions::{
    EpochKeys, Member, NewSession, NewSessionKey, Session, SessionKeyRecord, SessionMode,
};
use crate::store::user_keys::UserKey;
use crate::store::{Conn, StoreError, Timestamp};

/// A session just created.
pub(crate) struct CreatedSession {
    /// Its id.
    pub(crate) session_id: SessionId,
    /// Its first epoch.
    pub(crate) epoch: Epoch,
    /// The keys stored for its devices.
    pub(crate) session_keys: Vec<NewSessionKey>,
    /// The plaintext DEK, when a service-wrapped session's caller asked for it; zeroized
    /// on drop.
    pub(crate) plaintext_dek: Option<Zeroizing<Vec<u8>>>,
}

/// What a new session is, whatever its mode.
pub(crate) struct SessionSpec {
    /// The author's user.
    pub(crate) author: UserId,
    /// The recipient users, the author's first: each one's current devices get the DEK.
    pub(crate) users: Vec<UserId>,
    /// The envelopes' suite.
    pub(crate) suite: Suite,
}

impl SessionSpec {
    fn into_new_session(
        self,
        session_id: SessionId,
        mode: SessionMode,
        author_device: Option<DeviceId>,
    ) -> NewSession {
        NewSession {
            session_id,
            author_user: self.author,
            author_device,
            mode,
            suite: self.suite,
        }
    }
}

/// A change to a session's membership or epoch: AddRecipients, RemoveRecipients,
/// RotateSession.
pub(crate) struct SessionChange {
    /// The session.
    pub(crate) session_id: SessionId,
    /// The users added or removed (none for a rotation).
    pub(crate) users: Vec<UserId>,
    /// The author device's key set, for a client-wrapped session.
    pub(crate) key_set: Option<ParsedKeySet>,
}

/// The keys a change to a session stored, and the epoch they are of.
pub(crate) struct StoredKeys {
    /// The session.
    pub(crate) session_id: SessionId,
    /// The epoch.
    pub(crate) epoch: Epoch,
    /// One per device wrapped for.
    pub(crate) session_keys: Vec<NewSessionKey>,
}

/// The targets of a new session's current device keys, at most [`MAX_KEYS_PER_CALL`].
fn targets_within_limit(keys: Vec<UserKey>) -> Result<Vec<Target>, SessionError> {
    let targets = targets_from_keys(keys)?;
    check_key_count(targets.len())?;
    Ok(targets)
}

fn check_key_count(devices: usize) -> Result<(), SessionError> {
    if devices > MAX_KEYS_PER_CALL {
        return Err(SessionError::TooManyKeys {
            devices,
            max: MAX_KEYS_PER_CALL,
        });
    }
    Ok(())
}

/// The session, unless it does not exist or was deleted.
fn live(session: Option<Session>) -> Result<Session, SessionError> {
    match session {
        Some(s) if s.deleted_at.is_none() => Ok(s),
        _ => Err(SessionError::NoSuchSession),
    }
}

/// Who may change a session: an app server for a service-wrapped one; for a client-wrapped
/// one, its author device (which must also provide the wraps).
fn require_session_owner(caller: &Principal, session: &Session) -> Result<(), SessionError> {
    match (session.mode, caller) {
        (SessionMode::ServiceWrapped, Principal::App { .. }) => Ok(()),
        (SessionMode::ClientWrapped, Principal::Device { user, device, .. })
            if user == &session.author_user && Some(device) == session.author_device.as_ref() =>
        {
            Ok(())
        }
        _ => Err(SessionError::NotOwner),
    }
}

/// The live session a change is for, if the caller owns it, and the change's key set, which
/// comes with every change of a client-wrapped session and never with a service-wrapped one.
async fn session_to_change(
    state: &AppState,
    caller: &Principal,
    session_id: &SessionId,
    key_set: Option<ParsedKeySet>,
) -> Result<(Session, Option<ParsedKeySet>), SessionError> {
    let session = live(state.store.conn().await?.session(session_id).await?)?;
    require_session_owner(caller, &session)?;
    let key_set = key_set_for_mode(&session, key_set)?;
    Ok((session, key_set))
}

/// The key set, if the session's mode takes one; refused if it is missing or extra.
fn key_set_for_mode(
    session: &Session,
    key_set: Option<ParsedKeySet>,
) -> Result<Option<ParsedKeySet>, SessionError> {
    match (session.mode, key_set) {
        (SessionMode::ServiceWrapped, Some(_)) => Err(SessionError::KeySetNotAllowed),
        (SessionMode::ServiceWrapped, None) => Ok(None),
        (SessionMode::ClientWrapped, None) => Err(SessionError::KeySetRequired),
        (SessionMode::ClientWrapped, Some(ks)) => Ok(Some(ks)),
    }
}

/// Checks a key set uploaded for an existing client-wrapped session against its author
/// device's current identity key (found in `author_keys`).
fn check_author_key_set(
    ks: ParsedKeySet,
    session: &Session,
    author_keys: &[UserKey],
    epoch: Epoch,
    devices: &[Member],
    escrow: EscrowRule,
) -> Result<EpochKeys, SessionError> {
    let author_device = session.author_device.as_ref().ok_or_else(|| {
        SessionError::Internal(format!(
            "client-wrapped session {} without an author device",
            session.session_id
        ))
    })?;
    let identity = author_identity(author_keys, &session.author_user, author_device)?;
    Ok(key_set::check_key_set(
        ks,
        &Expected {
            suite: session.suite,
            session_id: session.session_id,
            epoch,
            author_user: &session.author_user,
            author_device,
            author_identity: &identity,
            devices,
            escrow,
        },
    )?)
}

/// Stores a new session at epoch 1 with its members and first epoch's keys, in one
/// transaction. A taken session id (client-chosen) is [`SessionError::SessionIdTaken`].
///
/// `recorder` records the answer of a call made with an idempotency key in the same
/// transaction; the plaintext DEK is attached after it and never recorded.
async fn store_new_session(
    state: &AppState,
    session: NewSession,
    (members, keys): (Vec<Member>, EpochKeys),
    plaintext_dek: Option<Zeroizing<Vec<u8>>>,
    recorder: &Recorder<'_, CreatedSession>,
) -> Result<CreatedSession, SessionError> {
    let session_id = session.session_id;
    let mut created = state
        .store
        .transaction_recorded(recorder, async move |tx| -> Result<_, SessionError> {
            let stored = async {
                tx.insert_session(&session).await?;
                tx.add_members(&session_id, Epoch::FIRST, &members).await?;
                tx.insert_epoch_keys(&session_id, &keys).await
            };
            match stored.await {
                Err(StoreError::AlreadyExists(_)) => Err(SessionError::SessionIdTaken),
                Err(e) => Err(e.into()),
                Ok(()) => Ok(CreatedSession {
                    session_id,
                    epoch: Epoch::FIRST,
                    session_keys: keys.session_keys,
                    plaintext_dek: None,
                }),
            }
        })
        .await?;
    created.plaintext_dek = plaintext_dek;
    Ok(created)
}

/// Creates a SERVICE_WRAPPED session: draws the DEK, wraps it for each current device of the
/// recipients, escrows it and keeps the KEK copy.
pub(crate) async fn create_service_wrapped(
    state: &AppState,
    spec: SessionSpec,
    return_plaintext_dek: bool,
    recorder: &Recorder<'_, CreatedSession>,
) -> Result<CreatedSession, SessionError> {
    let keys = (state.store.conn().await?)
        .current_user_keys(&spec.users)
        .await?;
    let targets = targets_within_limit(keys)?;
    let session_id = SessionId::generate();
    let dek = Dek::generate().map_err(SessionError::ServiceCrypto)?;
    let plaintext_dek = return_plaintext_dek.then(|| Zeroizing::new(dek.expose_secret().to_vec()));
    let members = members_of(&targets);
    let keys = wrap_epoch(state, session_id, Epoch::FIRST, dek, targets, Copies::Seal).await?;
    let session = spec.into_new_session(session_id, SessionMode::ServiceWrapped, None);
    store_new_session(state, session, (members, keys), plaintext_dek, recorder).await
}

/// Creates a CLIENT_WRAPPED session from the author device's key set, checked against the
/// current devices of the recipients and the author device's identity key.
pub(crate) async fn create_client_wrapped(
    state: &AppState,
    spec: SessionSpec,
    session_id: SessionId,
    author_device: DeviceId,
    key_set: ParsedKeySet,
    recorder: &Recorder<'_, CreatedSession>,
) -> Result<CreatedSession, SessionError> {
    let keys = (state.store.conn().await?)
        .current_user_keys(&spec.users)
        .await?;
    let identity = author_identity(&keys, &spec.author, &author_device)?;
    let targets = targets_within_limit(keys)?;
    let members = members_of(&targets);
    let expected = Expected {
        suite: spec.suite,
        session_id,
        epoch: Epoch::FIRST,
        author_user: &spec.author,
        author_device: &author_device,
        author_identity: &identity,
        devices: &members,
        escrow: EscrowRule::Required(state.escrow_public_key.key_id()),
    };
    let keys = key_set::check_key_set(key_set, &expected)?;
    let session =
        spec.into_new_session(session_id, SessionMode::ClientWrapped, Some(author_device));
    store_new_session(state, session, (members, keys), None, recorder).await
}

/// Adds the current devices of the change's users that are not members yet to the session's
/// current epoch: the service wraps the epoch's DEK (from its KEK copy) for them, or checks
/// the author device's wraps.
pub(crate) async fn add_recipients(
    state: &AppState,
    caller: &Principal,
    change: SessionChange,
    recorder: &Recorder<'_, StoredKeys>,
) -> Result<StoredKeys, SessionError> {
    let session_id = change.session_id;
    let (session, key_set) = session_to_change(state, caller, &session_id, change.key_set).await?;
    let candidates = (state.store.conn().await?)
        .current_user_keys(&change.users)
        .await?;
    check_key_count(candidates.len())?;
    let author_keys = match session.mode {
        SessionMode::ClientWrapped => {
            (state.store.conn().await?)
                .current_user_keys(std::slice::from_ref(&session.author_user))
                .await?
        }
        SessionMode::ServiceWrapped => Vec::new(),
    };
    state
        .store
        .transaction_recorded(recorder, async move |tx| -> Result<_, SessionError> {
            let session = live(tx.session(&session_id).await?)?;
            let epoch = session.current_epoch;
            let members = tx.active_members(&session_id).await?;
            // Devices already in the session keep what they have; only the others are
            // wrapped for, so only their keys need to parse.
            let new = targets_from_keys(
                candidates
                    .into_iter()
                    .filter(|k| !is_member(&members, &k.user, &k.device))
                    .collect(),
            )?;
            let new_members = members_of(&new);
            let keys = match key_set {
                None => {
                    let dek = service_copy(tx, state, session_id, epoch).await?;
                    wrap_epoch(state, session_id, epoch, dek, new, Copies::Existing).await?
                }
                Some(ks) => check_author_key_set(
                    ks,
                    &session,
                    &author_keys,
                    epoch,
                    &new_members,
                    EscrowRule::AlreadyEscrowed,
                )?,
            };
            // Every refusal above came before any write. Writing now: first make sure no
            // rotation moved the session on since it was read (row lock on PostgreSQL).
            tx.lock_epoch(&session_id, epoch).await?;
            tx.insert_epoch_keys(&session_id, &keys).await?;
            tx.add_members(&session_id, epoch, &new_members).await?;
            Ok(StoredKeys {
                session_id,
                epoch,
                session_keys: keys.session_keys,
            })
        })
        .await
}

fn is_member(members: &[Member], user: &UserId, device: &DeviceId) -> bool {
    members
        .iter()
        .any(|m| &m.user == user && &m.device == device)
}

/// The DEK of a service-wrapped session's epoch, from its KEK copy.
async fn service_copy(
    conn: &mut Conn,
    state: &AppState,
    session_id: SessionId,
    epoch: Epoch,
) -> Result<Dek, SessionError> {
    let (version, envelope) = conn
        .service_key(&session_id, epoch)
        .await?
        .ok_or(SessionError::NoServiceCopy)?;
    if version != state.kek.version().0 {
        return Err(SessionError::OldKekVersion(version));
    }
    open_service_copy(state, session_id, epoch, &envelope)
}

/// The first epoch's DEK of a live SERVICE_WRAPPED session, opened again from its service copy:
/// what a replayed CreateSession that asked for the plaintext DEK returns (the idempotency
/// record never holds it). A session deleted since is [`SessionError::NoSuchSession`].
pub(crate) async fn first_epoch_dek(
    state: &AppState,
    session_id: &str,
) -> Result<Dek, SessionError> {
    let session_id = SessionId::parse(session_id).map_err(|e| {
        SessionError::Internal(format!("a recorded CreateSession answer's session id: {e}"))
    })?;
    let mut conn = state.store.conn().await?;
    live(conn.session(&session_id).await?)?;
    service_copy(&mut conn, state, session_id, Epoch::FIRST).await
}

/// Starts a new epoch without the devices of the change's users: RemoveRecipients and
/// RotateSession. Remaining devices get the new DEK on their current key; a device whose
/// key was revoked gets nothing and stops being a member.
pub(crate) async fn new_epoch(
    state: &AppState,
    caller: &Principal,
    change: SessionChange,
    recorder: &Recorder<'_, StoredKeys>,
) -> Result<StoredKeys, SessionError> {
    let (session_id, removed_users) = (change.session_id, change.users);
    let (session, key_set) = session_to_change(state, caller, &session_id, change.key_set).await?;
    if removed_users.contains(&session.author_user) {
        return Err(SessionError::AuthorNotRemovable);
    }
    state
        .store
        .transaction_recorded(recorder, async move |tx| -> Result<_, SessionError> {
            let session = live(tx.session(&session_id).await?)?;
            let from = session.current_epoch;
            let members = tx.active_members(&session_id).await?;
            if let Some(u) = removed_users
                .iter()
                .find(|u| !members.iter().any(|m| &m.user == *u))
            {
                return Err(SessionError::NotARecipient(u.clone()));
            }
            let staying: Vec<UserId> = members
                .iter()
                .map(|m| m.user.clone())
                .filter(|u| !removed_users.contains(u))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let current = tx.current_user_keys(&staying).await?;
            let targets: Vec<Target> = targets_from_keys(
                current
                    .into_iter()
                    .filter(|k| is_member(&members, &k.user, &k.device))
                    .collect(),
            )?;
            let leaving: Vec<(UserId, DeviceId)> = members
                .iter()
                .filter(|m| {
                    !targets
                        .iter()
                        .any(|t| t.user == m.user && t.device == m.device)
                })
                .map(|m| (m.user.clone(), m.device.clone()))
                .collect();
            let to = from.next().ok_or(SessionError::EpochsExhausted)?;
            let target_members = members_of(&targets);
            let keys = match key_set {
                None => {
                    let dek = Dek::generate().map_err(SessionError::ServiceCrypto)?;
                    wrap_epoch(state, session_id, to, dek, targets, Copies::Seal).await?
                }
                Some(ks) => {
                    let author_keys = tx
                        .current_user_keys(std::slice::from_ref(&session.author_user))
                        .await?;
                    check_author_key_set(
                        ks,
                        &session,
                        &author_keys,
                        to,
                        &target_members,
                        EscrowRule::Required(state.escrow_public_key.key_id()),
                    )?
                }
            };
            // Every refusal above came before any write; the compare-and-swap on the epoch
            // makes a concurrent rotation of the same session lose with ABORTED.
            tx.advance_epoch(&session_id, from).await?;
            tx.remove_members(&session_id, to, &leaving).await?;
            tx.add_members(&session_id, to, &target_members).await?;
            tx.insert_epoch_keys(&session_id, &keys).await?;
            Ok(StoredKeys {
                session_id,
                epoch: to,
                session_keys: keys.session_keys,
            })
        })
        .await
}

/// Soft-deletes a session (the same owner rule as every other change) and revokes its keys;
/// returns when it was first deleted.
pub(crate) async fn delete_session(
    state: &AppState,
    caller: &Principal,
    session_id: SessionId,
) -> Result<Timestamp, SessionError> {
    let session = state
        .store
        .conn()
        .await?
        .session(&session_id)
        .await?
        .ok_or(SessionError::NoSuchSession)?;
    require_session_owner(caller, &session)?;
    state
        .store
        .transaction(async move |tx| -> Result<_, SessionError> {
            match tx.delete_session(&session_id).await {
                Err(StoreError::NotFound) => Err(SessionError::NoSuchSession),
                other => Ok(other?),
            }
        })
        .await
}

/// A device's live keys of a live session, one epoch or all; NOT_FOUND when it holds none.
pub(crate) async fn device_session_keys(
    state: &AppState,
    user: &UserId,
    device: &DeviceId,
    session_id: SessionId,
    epoch: Option<Epoch>,
) -> Result<Vec<SessionKeyRecord>, SessionError> {
    let mut conn = state.store.conn().await?;
    live(conn.session(&session_id).await?)?;
    let keys = conn
        .device_session_keys(&session_id, user, device, epoch)
        .await?;
    if keys.is_empty() {
        return Err(match epoch {
            Some(e) => SessionError::NoKeysOfEpoch(e),
            None => SessionError::NoKeysHeld,
        });
    }
    Ok(keys)
}

/// A device's live session keys across sessions after position `after`, at most `page`,
/// and the position after them (`after` itself when there are none).
pub(crate) async fn sync_session_keys(
    state: &AppState,
    user: &UserId,
    device: &DeviceId,
    after: i64,
    page: u32,
) -> Result<(Vec<SessionKeyRecord>, i64), SessionError> {
    let keys = (state.store.conn().await?)
        .sync_device_session_keys(user, device, after, i64::from(page))
        .await?;
    let next = keys.last().map_or(after, |k| k.seq);
    Ok((keys, next))
}
