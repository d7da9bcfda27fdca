//! What each session epoch's DEK is stored as: one wrapped DEK per recipient device
//! (SessionKey), the escrow copy (StaffKey) and, for service-wrapped sessions, the service
//! copy under the KEK (ServiceKey); and the reads of a device's session keys, per session and
//! across sessions for sync.
//!
//! Session keys get their `id` in commit order (the insert takes
//! [`TxLock::SessionKeyOrder`]): that `id` is the sync position a device's cursor holds, so a
//! key committed later never appears behind a position already handed out.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::{epoch_db, epoch_of};
use crate::crypto::ids::{DeviceId, Epoch, KeyId, SessionId, UserId};
use crate::store::error::Stored;
use crate::store::locks::{lock, TxLock};
use crate::store::schema::{service_keys, session_keys, staff_keys};
use crate::store::{db_run, unsigned, Conn, StoreError, Timestamp, Tx};

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
            session_id: SessionId::from_slice(&r.session_id).stored("session id")?,
            epoch: epoch_of("session key epoch", r.epoch)?,
            user: UserId::new(r.recipient_user_id).stored("user id")?,
            device: DeviceId::new(r.recipient_device_id).stored("device id")?,
            key_id: KeyId::from_slice(&r.key_id).stored("key id")?,
            envelope: r.envelope,
            created_at: Timestamp::from_unix_micros(r.created_at),
        })
    }
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

/// Rows per multi-row INSERT, under both backends' limits on bound parameters.
const ROWS_PER_INSERT: usize = 500;

impl Conn {
    /// The service copy of an epoch's DEK: (KEK version, envelope).
    pub async fn service_key(
        &mut self,
        id: &SessionId,
        epoch: Epoch,
    ) -> Result<Option<(u32, Vec<u8>)>, StoreError> {
        let conn = &mut self.db;
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

    /// The escrow copies of the given epochs of a session (all epochs when `epochs` is empty).
    pub async fn staff_keys(
        &mut self,
        id: &SessionId,
        epochs: &[Epoch],
    ) -> Result<Vec<StaffKeyRecord>, StoreError> {
        let conn = &mut self.db;
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
                    escrow_key_id: KeyId::from_slice(&k).stored("escrow key id")?,
                    envelope: env,
                })
            })
            .collect()
    }

    /// One device's live session keys of a session, oldest first; one epoch or all.
    pub async fn device_session_keys(
        &mut self,
        id: &SessionId,
        user: &UserId,
        device: &DeviceId,
        epoch: Option<Epoch>,
    ) -> Result<Vec<SessionKeyRecord>, StoreError> {
        let conn = &mut self.db;
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

    /// One device's live session keys across sessions with `seq > after`, in `seq` order,
    /// at most `limit`.
    pub async fn sync_device_session_keys(
        &mut self,
        user: &UserId,
        device: &DeviceId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<SessionKeyRecord>, StoreError> {
        let conn = &mut self.db;
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
}

impl Tx {
    /// Stores one epoch's session keys, escrow copy and service copy.
    pub async fn insert_epoch_keys(
        &mut self,
        id: &SessionId,
        keys: &EpochKeys,
    ) -> Result<(), StoreError> {
        let conn = &mut self.db;
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
            // multi-row INSERT with a defaulted (autoincrement) column, and SQLite's inserts
            // are local calls inside the same transaction anyway.
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
}
