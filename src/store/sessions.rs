//! Encryption sessions and what hangs off them: members (recipient devices), per-device
//! wrapped DEKs (SessionKey), the escrow copy (StaffKey) and the service copy (ServiceKey) of
//! each epoch's DEK.
//!
//! Epoch changes are compare-and-swap on `sessions.current_epoch`
//! ([`Tx::advance_epoch`]), so two replicas rotating the same session at once cannot both
//! win: the loser gets [`StoreError::VersionConflict`] and its transaction rolls back.
//!
//! Deleting a session is soft: the session row gets `deleted_at`, its session keys get
//! `revoked_at`, and every listing leaves them out. Escrow copies stay for audited staff reads.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::locks::{lock, TxLock};
use super::schema::{service_keys, session_keys, session_members, sessions, staff_keys};
use super::sql::coalesce;
use super::{db_run, unsigned, DbConn, Store, StoreError, Timestamp, Tx};
use crate::crypto::ids::{DeviceId, Epoch, KeyId, SessionId, UserId};
use crate::crypto::Suite;

/// Who wraps a session's DEKs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionMode {
    /// The service draws, wraps and escrows each DEK.
    ServiceWrapped,
    /// The author device draws the DEK and uploads signed wraps.
    ClientWrapped,
}

impl SessionMode {
    fn to_db(self) -> i16 {
        match self {
            SessionMode::ServiceWrapped => 1,
            SessionMode::ClientWrapped => 2,
        }
    }

    fn from_db(v: i16) -> Result<Self, StoreError> {
        match v {
            1 => Ok(SessionMode::ServiceWrapped),
            2 => Ok(SessionMode::ClientWrapped),
            other => Err(StoreError::corrupt("session mode", other)),
        }
    }
}

/// A session to create (at epoch 1).
#[derive(Clone, Debug)]
pub struct NewSession {
    /// Its id.
    pub session_id: SessionId,
    /// The author's user.
    pub author_user: UserId,
    /// The author's device, for client-wrapped sessions.
    pub author_device: Option<DeviceId>,
    /// Who wraps.
    pub mode: SessionMode,
    /// The envelopes' suite.
    pub suite: Suite,
}

/// A session as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Its id.
    pub session_id: SessionId,
    /// The author's user.
    pub author_user: UserId,
    /// The author's device, for client-wrapped sessions.
    pub author_device: Option<DeviceId>,
    /// Who wraps.
    pub mode: SessionMode,
    /// The envelopes' suite.
    pub suite: Suite,
    /// The epoch new keys belong to.
    pub current_epoch: Epoch,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was deleted, if it was.
    pub deleted_at: Option<Timestamp>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = sessions)]
struct SessionRow {
    session_id: Vec<u8>,
    author_user_id: String,
    author_device_id: Option<String>,
    mode: i16,
    suite: i16,
    current_epoch: i32,
    created_at: i64,
    deleted_at: Option<i64>,
}

fn epoch_of(what: &str, v: i32) -> Result<Epoch, StoreError> {
    Epoch::new(unsigned(what, v)?).map_err(|e| StoreError::corrupt(what, e))
}

fn epoch_db(e: Epoch) -> Result<i32, StoreError> {
    i32::try_from(e.get())
        .map_err(|_| StoreError::Internal(format!("epoch {e} does not fit the database")))
}

impl TryFrom<SessionRow> for Session {
    type Error = StoreError;
    fn try_from(r: SessionRow) -> Result<Self, StoreError> {
        let suite = u8::try_from(r.suite)
            .ok()
            .and_then(|b| Suite::from_byte(b).ok())
            .ok_or_else(|| StoreError::corrupt("session suite", r.suite))?;
        Ok(Session {
            session_id: SessionId::from_slice(&r.session_id)
                .map_err(|e| StoreError::corrupt("session id", e))?,
            author_user: UserId::new(r.author_user_id)
                .map_err(|e| StoreError::corrupt("author user id", e))?,
            author_device: r
                .author_device_id
                .map(DeviceId::new)
                .transpose()
                .map_err(|e| StoreError::corrupt("author device id", e))?,
            mode: SessionMode::from_db(r.mode)?,
            suite,
            current_epoch: epoch_of("session epoch", r.current_epoch)?,
            created_at: Timestamp::from_unix_micros(r.created_at),
            deleted_at: r.deleted_at.map(Timestamp::from_unix_micros),
        })
    }
}

/// One recipient device's wrapped DEK to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSessionKey {
    /// The recipient user.
    pub user: UserId,
    /// The recipient device.
    pub device: DeviceId,
    /// The device key the DEK is wrapped to.
    pub key_id: KeyId,
    /// The DEK envelope.
    pub envelope: Vec<u8>,
}

/// A stored session key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionKeyRecord {
    /// Position in the store's order of session keys: the sync cursor.
    pub seq: i64,
    /// The session.
    pub session_id: SessionId,
    /// The epoch.
    pub epoch: Epoch,
    /// The recipient user.
    pub user: UserId,
    /// The recipient device.
    pub device: DeviceId,
    /// The device key the DEK is wrapped to.
    pub key_id: KeyId,
    /// The DEK envelope.
    pub envelope: Vec<u8>,
    /// When it was stored.
    pub created_at: Timestamp,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = session_keys)]
struct SessionKeyRow {
    id: i64,
    session_id: Vec<u8>,
    epoch: i32,
    recipient_user_id: String,
    recipient_device_id: String,
    key_id: Vec<u8>,
    envelope: Vec<u8>,
    created_at: i64,
}

impl TryFrom<SessionKeyRow> for SessionKeyRecord {
    type Error = StoreError;
    fn try_from(r: SessionKeyRow) -> Result<Self, StoreError> {
        Ok(SessionKeyRecord {
            seq: r.id,
            session_id: SessionId::from_slice(&r.session_id)
                .map_err(|e| StoreError::corrupt("session id", e))?,
            epoch: epoch_of("session key epoch", r.epoch)?,
            user: UserId::new(r.recipient_user_id)
                .map_err(|e| StoreError::corrupt("user id", e))?,
            device: DeviceId::new(r.recipient_device_id)
                .map_err(|e| StoreError::corrupt("device id", e))?,
            key_id: KeyId::from_slice(&r.key_id).map_err(|e| StoreError::corrupt("key id", e))?,
            envelope: r.envelope,
            created_at: Timestamp::from_unix_micros(r.created_at),
        })
    }
}

/// A current member device of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// The device key the member was last wrapped to.
    pub key_id: KeyId,
}

/// A stored escrow copy of an epoch's DEK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaffKeyRecord {
    /// The epoch.
    pub epoch: Epoch,
    /// The escrow key the DEK is sealed to.
    pub escrow_key_id: KeyId,
    /// The DEK envelope.
    pub envelope: Vec<u8>,
}

/// Everything stored for one epoch's DEK.
#[derive(Clone, Debug)]
pub struct EpochKeys {
    /// The epoch.
    pub epoch: Epoch,
    /// One wrapped DEK per recipient device.
    pub session_keys: Vec<NewSessionKey>,
    /// The escrow copy (always present for service-wrapped sessions).
    pub staff_key: Option<(KeyId, Vec<u8>)>,
    /// The service copy under the KEK: (KEK version, envelope), service-wrapped only.
    pub service_key: Option<(u32, Vec<u8>)>,
}

#[derive(Insertable)]
#[diesel(table_name = session_keys)]
struct SessionKeyInsert<'a> {
    session_id: &'a [u8],
    epoch: i32,
    recipient_user_id: &'a str,
    recipient_device_id: &'a str,
    key_id: &'a [u8],
    envelope: &'a [u8],
    created_at: i64,
}

#[derive(Insertable)]
#[diesel(table_name = session_members)]
struct MemberInsert<'a> {
    session_id: &'a [u8],
    user_id: &'a str,
    device_id: &'a str,
    key_id: &'a [u8],
    added_epoch: i32,
}

/// Rows per multi-row INSERT, under both backends' limits on bound parameters.
const ROWS_PER_INSERT: usize = 500;

async fn insert_session(conn: &mut DbConn, s: &NewSession) -> Result<(), StoreError> {
    let now = Timestamp::now().unix_micros();
    let sid = s.session_id.as_bytes().as_slice();
    let device = s.author_device.as_ref().map(DeviceId::as_str);
    db_run!(conn: {
        diesel::insert_into(sessions::table)
            .values((
                sessions::session_id.eq(sid),
                sessions::author_user_id.eq(s.author_user.as_str()),
                sessions::author_device_id.eq(device),
                sessions::mode.eq(s.mode.to_db()),
                sessions::suite.eq(i16::from(s.suite as u8)),
                sessions::current_epoch.eq(1),
                sessions::created_at.eq(now),
            ))
            .execute(conn)
            .await?;
    });
    Ok(())
}

async fn get_session(conn: &mut DbConn, id: &SessionId) -> Result<Option<Session>, StoreError> {
    let sid = id.as_bytes().as_slice();
    let row: Option<SessionRow> = db_run!(conn: {
        sessions::table
            .find(sid)
            .select(SessionRow::as_select())
            .first(conn)
            .await
            .optional()?
    });
    row.map(Session::try_from).transpose()
}

async fn insert_epoch_keys(
    conn: &mut DbConn,
    id: &SessionId,
    keys: &EpochKeys,
) -> Result<(), StoreError> {
    let now = Timestamp::now().unix_micros();
    let sid = id.as_bytes().as_slice();
    let epoch = epoch_db(keys.epoch)?;
    // Sync cursors read session keys in `id` order: ids must follow commit order.
    lock(conn, TxLock::SessionKeyOrder).await?;
    for chunk in keys.session_keys.chunks(ROWS_PER_INSERT) {
        let rows: Vec<SessionKeyInsert<'_>> = chunk
            .iter()
            .map(|k| SessionKeyInsert {
                session_id: sid,
                epoch,
                recipient_user_id: k.user.as_str(),
                recipient_device_id: k.device.as_str(),
                key_id: k.key_id.as_bytes(),
                envelope: &k.envelope,
                created_at: now,
            })
            .collect();
        // PostgreSQL takes the chunk in one statement; Diesel's SQLite backend has no
        // multi-row INSERT with a defaulted (autoincrement) column, and SQLite's inserts are
        // local calls inside the same transaction anyway.
        db_run!(conn: sqlite {
            for row in &rows {
                diesel::insert_into(session_keys::table).values(row).execute(conn).await?;
            }
        } postgres {
            diesel::insert_into(session_keys::table).values(&rows).execute(conn).await?;
        });
    }
    if let Some((escrow_key_id, envelope)) = &keys.staff_key {
        db_run!(conn: {
            diesel::insert_into(staff_keys::table)
                .values((
                    staff_keys::session_id.eq(sid),
                    staff_keys::epoch.eq(epoch),
                    staff_keys::escrow_key_id.eq(escrow_key_id.as_bytes().as_slice()),
                    staff_keys::envelope.eq(envelope.as_slice()),
                    staff_keys::created_at.eq(now),
                ))
                .execute(conn)
                .await?;
        });
    }
    if let Some((kek_version, envelope)) = &keys.service_key {
        let kek_version = i32::try_from(*kek_version).map_err(|_| {
            StoreError::Internal(format!(
                "KEK version {kek_version} does not fit the database"
            ))
        })?;
        db_run!(conn: {
            diesel::insert_into(service_keys::table)
                .values((
                    service_keys::session_id.eq(sid),
                    service_keys::epoch.eq(epoch),
                    service_keys::kek_version.eq(kek_version),
                    service_keys::envelope.eq(envelope.as_slice()),
                    service_keys::created_at.eq(now),
                ))
                .execute(conn)
                .await?;
        });
    }
    Ok(())
}

async fn add_members(
    conn: &mut DbConn,
    id: &SessionId,
    epoch: Epoch,
    members: &[Member],
) -> Result<(), StoreError> {
    let sid = id.as_bytes().as_slice();
    let epoch = epoch_db(epoch)?;
    for m in members {
        let row = MemberInsert {
            session_id: sid,
            user_id: m.user.as_str(),
            device_id: m.device.as_str(),
            key_id: m.key_id.as_bytes(),
            added_epoch: epoch,
        };
        // A device removed earlier and added again becomes a member from this epoch on.
        db_run!(conn: {
            diesel::insert_into(session_members::table)
                .values(&row)
                .on_conflict((session_members::session_id, session_members::user_id, session_members::device_id))
                .do_update()
                .set((
                    session_members::key_id.eq(m.key_id.as_bytes().as_slice()),
                    session_members::added_epoch.eq(epoch),
                    session_members::removed_epoch.eq(None::<i32>),
                ))
                .execute(conn)
                .await?;
        });
    }
    Ok(())
}

async fn active_members(conn: &mut DbConn, id: &SessionId) -> Result<Vec<Member>, StoreError> {
    let sid = id.as_bytes().as_slice();
    let rows: Vec<(String, String, Vec<u8>)> = db_run!(conn: {
        session_members::table
            .filter(session_members::session_id.eq(sid))
            .filter(session_members::removed_epoch.is_null())
            .order((session_members::user_id, session_members::device_id))
            .select((session_members::user_id, session_members::device_id, session_members::key_id))
            .load(conn)
            .await?
    });
    rows.into_iter()
        .map(|(u, d, k)| {
            Ok(Member {
                user: UserId::new(u).map_err(|e| StoreError::corrupt("member user id", e))?,
                device: DeviceId::new(d).map_err(|e| StoreError::corrupt("member device id", e))?,
                key_id: KeyId::from_slice(&k)
                    .map_err(|e| StoreError::corrupt("member key id", e))?,
            })
        })
        .collect()
}

async fn remove_members(
    conn: &mut DbConn,
    id: &SessionId,
    epoch: Epoch,
    members: &[(UserId, DeviceId)],
) -> Result<(), StoreError> {
    let sid = id.as_bytes().as_slice();
    let epoch = epoch_db(epoch)?;
    for (user, device) in members {
        db_run!(conn: {
            diesel::update(
                session_members::table
                    .filter(session_members::session_id.eq(sid))
                    .filter(session_members::user_id.eq(user.as_str()))
                    .filter(session_members::device_id.eq(device.as_str()))
                    .filter(session_members::removed_epoch.is_null()),
            )
            .set(session_members::removed_epoch.eq(epoch))
            .execute(conn)
            .await?;
        });
    }
    Ok(())
}

async fn advance_epoch(
    conn: &mut DbConn,
    id: &SessionId,
    from: Epoch,
) -> Result<Epoch, StoreError> {
    let next = from
        .next()
        .ok_or_else(|| StoreError::VersionConflict("the session has used every epoch".into()))?;
    let sid = id.as_bytes().as_slice();
    let (from_db, next_db) = (epoch_db(from)?, epoch_db(next)?);
    let updated = db_run!(conn: {
        diesel::update(
            sessions::table
                .filter(sessions::session_id.eq(sid))
                .filter(sessions::current_epoch.eq(from_db))
                .filter(sessions::deleted_at.is_null()),
        )
        .set(sessions::current_epoch.eq(next_db))
        .execute(conn)
        .await?
    });
    if updated == 0 {
        return Err(StoreError::VersionConflict(format!(
            "session {id} is no longer at epoch {from}"
        )));
    }
    Ok(next)
}

async fn lock_epoch(conn: &mut DbConn, id: &SessionId, epoch: Epoch) -> Result<(), StoreError> {
    let sid = id.as_bytes().as_slice();
    let e = epoch_db(epoch)?;
    // A no-op update: it takes the row lock on PostgreSQL and matches nothing if the session
    // moved to another epoch or was deleted since the caller read it.
    let updated = db_run!(conn: {
        diesel::update(
            sessions::table
                .filter(sessions::session_id.eq(sid))
                .filter(sessions::current_epoch.eq(e))
                .filter(sessions::deleted_at.is_null()),
        )
        .set(sessions::current_epoch.eq(e))
        .execute(conn)
        .await?
    });
    if updated == 0 {
        return Err(StoreError::VersionConflict(format!(
            "session {id} is no longer at epoch {epoch}"
        )));
    }
    Ok(())
}

async fn service_key(
    conn: &mut DbConn,
    id: &SessionId,
    epoch: Epoch,
) -> Result<Option<(u32, Vec<u8>)>, StoreError> {
    let sid = id.as_bytes().as_slice();
    let epoch = epoch_db(epoch)?;
    let row: Option<(i32, Vec<u8>)> = db_run!(conn: {
        service_keys::table
            .find((sid, epoch))
            .select((service_keys::kek_version, service_keys::envelope))
            .first(conn)
            .await
            .optional()?
    });
    row.map(|(v, env)| Ok((unsigned("KEK version", v)?, env)))
        .transpose()
}

async fn staff_keys_of(
    conn: &mut DbConn,
    id: &SessionId,
    epochs: &[Epoch],
) -> Result<Vec<StaffKeyRecord>, StoreError> {
    let sid = id.as_bytes().as_slice();
    let wanted: Vec<i32> = epochs
        .iter()
        .map(|e| epoch_db(*e))
        .collect::<Result<_, _>>()?;
    let rows: Vec<(i32, Vec<u8>, Vec<u8>)> = db_run!(conn: {
        let mut q = staff_keys::table
            .filter(staff_keys::session_id.eq(sid))
            .select((staff_keys::epoch, staff_keys::escrow_key_id, staff_keys::envelope))
            .order(staff_keys::epoch)
            .into_boxed();
        if !wanted.is_empty() {
            q = q.filter(staff_keys::epoch.eq_any(&wanted));
        }
        q.load(conn).await?
    });
    rows.into_iter()
        .map(|(e, k, env)| {
            Ok(StaffKeyRecord {
                epoch: epoch_of("staff key epoch", e)?,
                escrow_key_id: KeyId::from_slice(&k)
                    .map_err(|e| StoreError::corrupt("escrow key id", e))?,
                envelope: env,
            })
        })
        .collect()
}

async fn device_session_keys(
    conn: &mut DbConn,
    id: &SessionId,
    user: &UserId,
    device: &DeviceId,
    epoch: Option<Epoch>,
) -> Result<Vec<SessionKeyRecord>, StoreError> {
    let sid = id.as_bytes().as_slice();
    let epoch = epoch.map(epoch_db).transpose()?;
    let rows: Vec<SessionKeyRow> = db_run!(conn: {
        let mut q = session_keys::table
            .filter(session_keys::session_id.eq(sid))
            .filter(session_keys::recipient_user_id.eq(user.as_str()))
            .filter(session_keys::recipient_device_id.eq(device.as_str()))
            .filter(session_keys::revoked_at.is_null())
            .order(session_keys::id)
            .select(SessionKeyRow::as_select())
            .into_boxed();
        if let Some(e) = epoch {
            q = q.filter(session_keys::epoch.eq(e));
        }
        q.load(conn).await?
    });
    rows.into_iter().map(SessionKeyRecord::try_from).collect()
}

async fn sync_device_keys(
    conn: &mut DbConn,
    user: &UserId,
    device: &DeviceId,
    after: i64,
    limit: i64,
) -> Result<Vec<SessionKeyRecord>, StoreError> {
    let rows: Vec<SessionKeyRow> = db_run!(conn: {
        session_keys::table
            .filter(session_keys::recipient_user_id.eq(user.as_str()))
            .filter(session_keys::recipient_device_id.eq(device.as_str()))
            .filter(session_keys::id.gt(after))
            .filter(session_keys::revoked_at.is_null())
            .order(session_keys::id)
            .limit(limit)
            .select(SessionKeyRow::as_select())
            .load(conn)
            .await?
    });
    rows.into_iter().map(SessionKeyRecord::try_from).collect()
}

async fn soft_delete(conn: &mut DbConn, id: &SessionId) -> Result<Timestamp, StoreError> {
    let now = Timestamp::now().unix_micros();
    let sid = id.as_bytes().as_slice();
    let updated = db_run!(conn: {
        diesel::update(sessions::table.filter(sessions::session_id.eq(sid)))
            .set(sessions::deleted_at.eq(coalesce(sessions::deleted_at, now)))
            .execute(conn)
            .await?
    });
    if updated == 0 {
        return Err(StoreError::NotFound);
    }
    db_run!(conn: {
        diesel::update(
            session_keys::table
                .filter(session_keys::session_id.eq(sid))
                .filter(session_keys::revoked_at.is_null()),
        )
        .set(session_keys::revoked_at.eq(now))
        .execute(conn)
        .await?;
    });
    let deleted_at: Option<i64> = db_run!(conn: {
        sessions::table.find(sid).select(sessions::deleted_at).first(conn).await?
    });
    Ok(Timestamp::from_unix_micros(deleted_at.unwrap_or(now)))
}

impl Tx {
    /// Creates a session at epoch 1.
    pub async fn insert_session(&mut self, session: &NewSession) -> Result<(), StoreError> {
        insert_session(&mut self.conn.db, session).await
    }

    /// The session with this id, deleted or not.
    pub async fn session(&mut self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        get_session(&mut self.conn.db, id).await
    }

    /// Stores one epoch's session keys, escrow copy and service copy.
    pub async fn insert_epoch_keys(
        &mut self,
        id: &SessionId,
        keys: &EpochKeys,
    ) -> Result<(), StoreError> {
        insert_epoch_keys(&mut self.conn.db, id, keys).await
    }

    /// Makes these devices members from `epoch` on (again, if they were removed).
    pub async fn add_members(
        &mut self,
        id: &SessionId,
        epoch: Epoch,
        members: &[Member],
    ) -> Result<(), StoreError> {
        add_members(&mut self.conn.db, id, epoch, members).await
    }

    /// The session's current member devices, ordered by user then device.
    pub async fn active_members(&mut self, id: &SessionId) -> Result<Vec<Member>, StoreError> {
        active_members(&mut self.conn.db, id).await
    }

    /// Ends these devices' membership at `epoch` (they get no key of it or later).
    pub async fn remove_members(
        &mut self,
        id: &SessionId,
        epoch: Epoch,
        members: &[(UserId, DeviceId)],
    ) -> Result<(), StoreError> {
        remove_members(&mut self.conn.db, id, epoch, members).await
    }

    /// Moves the session from epoch `from` to the next one, if it is still at `from` and not
    /// deleted; [`StoreError::VersionConflict`] otherwise.
    pub async fn advance_epoch(
        &mut self,
        id: &SessionId,
        from: Epoch,
    ) -> Result<Epoch, StoreError> {
        advance_epoch(&mut self.conn.db, id, from).await
    }

    /// Holds the session at `epoch` until the transaction ends; [`StoreError::VersionConflict`]
    /// if it is no longer there (or was deleted).
    pub async fn lock_epoch(&mut self, id: &SessionId, epoch: Epoch) -> Result<(), StoreError> {
        lock_epoch(&mut self.conn.db, id, epoch).await
    }

    /// The service copy of an epoch's DEK: (KEK version, envelope).
    pub async fn service_key(
        &mut self,
        id: &SessionId,
        epoch: Epoch,
    ) -> Result<Option<(u32, Vec<u8>)>, StoreError> {
        service_key(&mut self.conn.db, id, epoch).await
    }

    /// The escrow copies of the given epochs of a session (all epochs when `epochs` is empty).
    pub async fn staff_keys(
        &mut self,
        id: &SessionId,
        epochs: &[Epoch],
    ) -> Result<Vec<StaffKeyRecord>, StoreError> {
        staff_keys_of(&mut self.conn.db, id, epochs).await
    }

    /// Soft-deletes a session and revokes its session keys; returns when it was deleted
    /// (the first time, if it already was).
    pub async fn delete_session(&mut self, id: &SessionId) -> Result<Timestamp, StoreError> {
        soft_delete(&mut self.conn.db, id).await
    }
}

impl Store {
    /// The session with this id, deleted or not.
    pub async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        get_session(&mut self.db_conn().await?, id).await
    }

    /// One device's live session keys of a session, oldest first; one epoch or all.
    pub async fn device_session_keys(
        &self,
        id: &SessionId,
        user: &UserId,
        device: &DeviceId,
        epoch: Option<Epoch>,
    ) -> Result<Vec<SessionKeyRecord>, StoreError> {
        device_session_keys(&mut self.db_conn().await?, id, user, device, epoch).await
    }

    /// One device's live session keys across sessions with `seq > after`, in `seq` order,
    /// at most `limit`.
    pub async fn sync_device_session_keys(
        &self,
        user: &UserId,
        device: &DeviceId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<SessionKeyRecord>, StoreError> {
        sync_device_keys(&mut self.db_conn().await?, user, device, after, limit).await
    }
}
