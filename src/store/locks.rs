//! Per-device write serialisation, the one place its spelling differs between backends.
//!
//! Some writes check a bound and then insert (a device's unused prekeys, an inbox's size), or
//! draw ids that a cursor later walks (an inbox). Two replicas doing that at once for the same
//! device could both pass the check, or commit ids out of order. [`lock_device`] makes them
//! take turns until their transactions end:
//!
//! - PostgreSQL: a transaction-scoped advisory lock on a 64-bit hash of the scope and the
//!   device (`pg_advisory_xact_lock(hashtextextended(..., 0))`). A hash collision only makes
//!   two devices take turns.
//! - SQLite: nothing to do; every write transaction already holds the database's one write
//!   lock (`BEGIN IMMEDIATE`).

use diesel::sql_types::Text;
use diesel_async::RunQueryDsl;

use super::{db_run, DbConn, StoreError};
use crate::crypto::ids::{DeviceId, UserId};

/// What a device lock protects; part of the lock's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockScope {
    /// The device's prekey stock (uploads).
    Prekeys,
    /// The device's key-sync inbox (sends to it).
    Inbox,
}

impl LockScope {
    fn name(self) -> &'static str {
        match self {
            LockScope::Prekeys => "keyhold/prekeys",
            LockScope::Inbox => "keyhold/inbox",
        }
    }
}

/// Holds the lock of (`scope`, `user`, `device`) until the transaction ends. Take several in
/// one sorted order, or two transactions may wait on each other.
pub(crate) async fn lock_device(
    conn: &mut DbConn,
    scope: LockScope,
    user: &UserId,
    device: &DeviceId,
) -> Result<(), StoreError> {
    // Ids contain no spaces, so the key text is unambiguous.
    let key = format!("{} {user} {device}", scope.name());
    db_run!(conn: sqlite {
    } postgres {
        diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind::<Text, _>(key)
            .execute(conn)
            .await?;
    });
    Ok(())
}
