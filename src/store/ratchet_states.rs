//! Ratchet states (RatchetState): a device's Double Ratchet state for one conversation, kept
//! as a KEK envelope (sealed by the service, bound to the row's identity), with a version for
//! compare-and-swap.
//!
//! Writes are conditional in the statement itself (`INSERT … ON CONFLICT DO NOTHING` for a
//! create, `UPDATE … WHERE version = expected` for an update), so two writers racing on one
//! state, on one replica or several, cannot both win: the row lock makes the second wait, and
//! it then finds the version moved and writes nothing. The loser learns the current version
//! ([`CasOutcome::Stale`]).

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::ratchet_states;
use super::{db_run, unsigned, Conn, StoreError, Timestamp, Tx};
use crate::crypto::ids::{ConversationId, DeviceId, UserId};

/// Which ratchet state: the row's identity, also the sealing context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RatchetKey {
    /// The owning user.
    pub user: UserId,
    /// The owning device.
    pub device: DeviceId,
    /// The conversation.
    pub conversation: ConversationId,
}

/// A stored ratchet state, still sealed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRatchetState {
    /// 1 when created, one more at each successful write.
    pub version: u64,
    /// The KEK version the envelope is sealed under.
    pub kek_version: u32,
    /// The KEK envelope of the state.
    pub envelope: Vec<u8>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was last written.
    pub updated_at: Timestamp,
}

/// The result of a conditional write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written; the state's new version.
    Written(u64),
    /// The expected version was not the current one (0 when there is no state); nothing was
    /// written.
    Stale {
        /// The state's current version, 0 if it does not exist.
        current: u64,
    },
}

/// A sealed state to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RatchetWrite {
    /// The version the writer read: 0 to create.
    pub expected_version: u64,
    /// The KEK version of `envelope`.
    pub kek_version: u32,
    /// The KEK envelope.
    pub envelope: Vec<u8>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = ratchet_states)]
struct RatchetRow {
    version: i64,
    kek_version: i32,
    envelope: Vec<u8>,
    created_at: i64,
    updated_at: i64,
}

/// The row's primary key.
fn row_id(key: &RatchetKey) -> (&str, &str, &str) {
    (
        key.user.as_str(),
        key.device.as_str(),
        key.conversation.as_str(),
    )
}

impl TryFrom<RatchetRow> for StoredRatchetState {
    type Error = StoreError;
    fn try_from(r: RatchetRow) -> Result<Self, StoreError> {
        Ok(StoredRatchetState {
            version: unsigned("ratchet state version", r.version)?,
            kek_version: unsigned("KEK version", r.kek_version)?,
            envelope: r.envelope,
            created_at: Timestamp::from_unix_micros(r.created_at),
            updated_at: Timestamp::from_unix_micros(r.updated_at),
        })
    }
}

impl Conn {
    /// The sealed ratchet state of one conversation of one device.
    pub async fn ratchet_state(
        &mut self,
        key: &RatchetKey,
    ) -> Result<Option<StoredRatchetState>, StoreError> {
        let conn = &mut self.db;
        let row: Option<RatchetRow> = db_run!(conn: {
            ratchet_states::table
                .find(row_id(key))
                .select(RatchetRow::as_select())
                .first(conn)
                .await
                .optional()?
        });
        row.map(StoredRatchetState::try_from).transpose()
    }

    /// The state's current version, 0 if there is none.
    async fn ratchet_state_version(&mut self, key: &RatchetKey) -> Result<u64, StoreError> {
        let conn = &mut self.db;
        let v: Option<i64> = db_run!(conn: {
            ratchet_states::table
                .find(row_id(key))
                .select(ratchet_states::version)
                .first(conn)
                .await
                .optional()?
        });
        v.map_or(Ok(0), |v| unsigned("ratchet state version", v))
    }

    /// [`CasOutcome::Stale`] with the state's current version.
    async fn stale_ratchet_state(&mut self, key: &RatchetKey) -> Result<CasOutcome, StoreError> {
        Ok(CasOutcome::Stale {
            current: self.ratchet_state_version(key).await?,
        })
    }
}

impl Tx {
    /// Writes a sealed ratchet state if its current version is `write.expected_version`
    /// (0: if it does not exist yet). The new version is one more. In a transaction, so that
    /// the current version a stale write reports is the one that made it stale.
    pub async fn put_ratchet_state(
        &mut self,
        key: &RatchetKey,
        write: &RatchetWrite,
    ) -> Result<CasOutcome, StoreError> {
        let (u, d, c) = row_id(key);
        let now = Timestamp::now().unix_micros();
        let kek_version = i32::try_from(write.kek_version).map_err(|_| {
            StoreError::Internal(format!(
                "KEK version {} does not fit the database",
                write.kek_version
            ))
        })?;
        let env = write.envelope.as_slice();
        let written = if write.expected_version == 0 {
            let conn = &mut self.db;
            db_run!(conn: {
                diesel::insert_into(ratchet_states::table)
                    .values((
                        ratchet_states::user_id.eq(u),
                        ratchet_states::device_id.eq(d),
                        ratchet_states::conversation_id.eq(c),
                        ratchet_states::version.eq(1_i64),
                        ratchet_states::kek_version.eq(kek_version),
                        ratchet_states::envelope.eq(env),
                        ratchet_states::created_at.eq(now),
                        ratchet_states::updated_at.eq(now),
                    ))
                    .on_conflict_do_nothing()
                    .execute(conn)
                    .await?
            })
        } else {
            // A version past i64 cannot be stored, so it cannot be current either.
            let Some((expected, next)) = i64::try_from(write.expected_version)
                .ok()
                .and_then(|e| Some((e, e.checked_add(1)?)))
            else {
                return self.stale_ratchet_state(key).await;
            };
            let conn = &mut self.db;
            db_run!(conn: {
                diesel::update(
                    ratchet_states::table
                        .find((u, d, c))
                        .filter(ratchet_states::version.eq(expected)),
                )
                .set((
                    ratchet_states::version.eq(next),
                    ratchet_states::kek_version.eq(kek_version),
                    ratchet_states::envelope.eq(env),
                    ratchet_states::updated_at.eq(now),
                ))
                .execute(conn)
                .await?
            })
        };
        if written == 1 {
            Ok(CasOutcome::Written(write.expected_version + 1))
        } else {
            self.stale_ratchet_state(key).await
        }
    }

    /// Deletes a ratchet state: any version when `expected_version` is `None`, otherwise only
    /// that one. [`CasOutcome::Written`] (with version 0) when deleted,
    /// [`CasOutcome::Stale`] when another version is current, [`StoreError::NotFound`] when
    /// there is no state.
    pub async fn delete_ratchet_state(
        &mut self,
        key: &RatchetKey,
        expected_version: Option<u64>,
    ) -> Result<CasOutcome, StoreError> {
        let Ok(expected) = expected_version.map(i64::try_from).transpose() else {
            return self.stale_ratchet_state(key).await;
        };
        let conn = &mut self.db;
        let deleted = db_run!(conn: {
            let mut q = diesel::delete(ratchet_states::table.find(row_id(key))).into_boxed();
            if let Some(e) = expected {
                q = q.filter(ratchet_states::version.eq(e));
            }
            q.execute(conn).await?
        });
        if deleted == 1 {
            return Ok(CasOutcome::Written(0));
        }
        match self.ratchet_state_version(key).await? {
            0 => Err(StoreError::NotFound),
            current => Ok(CasOutcome::Stale { current }),
        }
    }
}
