//! Encryption sessions and their members (recipient devices); what each epoch's DEK is
//! stored as, per device, in escrow and under the KEK, is in [`keys`] (re-exported here).
//!
//! Epoch changes are compare-and-swap on `sessions.current_epoch`
//! ([`Tx::advance_epoch`]), so two replicas rotating the same session at once cannot both
//! win: the loser gets [`StoreError::VersionConflict`] and its transaction rolls back.
//!
//! Deleting a session is soft: the session row gets `deleted_at`, its session keys get
//! `revoked_at`, and every listing leaves them out. Escrow copies stay for audited staff reads.

mod keys;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

pub use keys::{EpochKeys, NewSessionKey, SessionKeyRecord, StaffKeyRecord};

use super::schema::{session_keys, session_members, sessions};
use super::sql::coalesce;
use super::{db_run, unsigned, Conn, StoreError, Timestamp, Tx};
use crate::crypto::ids::{DeviceId, Epoch, KeyId, SessionId, UserId};
use crate::crypto::Suite;
use crate::store::error::Stored;

/// Who wraps a session's DEKs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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
    Epoch::new(unsigned(what, v)?).stored(what)
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
            session_id: SessionId::from_slice(&r.session_id).stored("session id")?,
            author_user: UserId::new(r.author_user_id).stored("author user id")?,
            author_device: r
                .author_device_id
                .map(DeviceId::new)
                .transpose()
                .stored("author device id")?,
            mode: SessionMode::from_db(r.mode)?,
            suite,
            current_epoch: epoch_of("session epoch", r.current_epoch)?,
            created_at: Timestamp::from_unix_micros(r.created_at),
            deleted_at: r.deleted_at.map(Timestamp::from_unix_micros),
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

#[derive(Insertable)]
#[diesel(table_name = session_members)]
struct MemberInsert<'a> {
    session_id: &'a [u8],
    user_id: &'a str,
    device_id: &'a str,
    key_id: &'a [u8],
    added_epoch: i32,
}

impl Conn {
    /// The session with this id, deleted or not.
    pub async fn session(&mut self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let conn = &mut self.db;
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

    /// The session's current member devices, ordered by user then device.
    pub async fn active_members(&mut self, id: &SessionId) -> Result<Vec<Member>, StoreError> {
        let conn = &mut self.db;
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
                    user: UserId::new(u).stored("member user id")?,
                    device: DeviceId::new(d).stored("member device id")?,
                    key_id: KeyId::from_slice(&k).stored("member key id")?,
                })
            })
            .collect()
    }
}

impl Tx {
    /// Creates a session at epoch 1 (its members and keys follow in the same transaction).
    pub async fn insert_session(&mut self, s: &NewSession) -> Result<(), StoreError> {
        let conn = &mut self.db;
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

    /// Makes these devices members from `epoch` on (again, if they were removed).
    pub async fn add_members(
        &mut self,
        id: &SessionId,
        epoch: Epoch,
        members: &[Member],
    ) -> Result<(), StoreError> {
        let conn = &mut self.db;
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

    /// Ends these devices' membership at `epoch` (they get no key of it or later).
    pub async fn remove_members(
        &mut self,
        id: &SessionId,
        epoch: Epoch,
        members: &[(UserId, DeviceId)],
    ) -> Result<(), StoreError> {
        let conn = &mut self.db;
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

    /// Moves the session from epoch `from` to the next one, if it is still at `from` and not
    /// deleted; [`StoreError::VersionConflict`] otherwise.
    pub async fn advance_epoch(
        &mut self,
        id: &SessionId,
        from: Epoch,
    ) -> Result<Epoch, StoreError> {
        let next = from.next().ok_or_else(|| {
            StoreError::VersionConflict("the session has used every epoch".into())
        })?;
        self.move_epoch(id, from, next).await?;
        Ok(next)
    }

    /// Holds the session at `epoch` until the transaction ends; [`StoreError::VersionConflict`]
    /// if it is no longer there (or was deleted).
    pub async fn lock_epoch(&mut self, id: &SessionId, epoch: Epoch) -> Result<(), StoreError> {
        // A no-op move: it takes the row lock on PostgreSQL and matches nothing if the
        // session moved to another epoch or was deleted since the caller read it.
        self.move_epoch(id, epoch, epoch).await
    }

    /// Compare-and-swap of a live session's epoch from `at` to `to`.
    async fn move_epoch(&mut self, id: &SessionId, at: Epoch, to: Epoch) -> Result<(), StoreError> {
        let conn = &mut self.db;
        let sid = id.as_bytes().as_slice();
        let (at_db, to_db) = (epoch_db(at)?, epoch_db(to)?);
        let updated = db_run!(conn: {
            diesel::update(
                sessions::table
                    .filter(sessions::session_id.eq(sid))
                    .filter(sessions::current_epoch.eq(at_db))
                    .filter(sessions::deleted_at.is_null()),
            )
            .set(sessions::current_epoch.eq(to_db))
            .execute(conn)
            .await?
        });
        if updated == 0 {
            return Err(StoreError::VersionConflict(format!(
                "session {id} is no longer at epoch {at}"
            )));
        }
        Ok(())
    }

    /// Soft-deletes a session and revokes its session keys; returns when it was deleted
    /// (the first time, if it already was). [`StoreError::NotFound`] if there is no such
    /// session.
    pub async fn delete_session(&mut self, id: &SessionId) -> Result<Timestamp, StoreError> {
        let conn = &mut self.db;
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
}
