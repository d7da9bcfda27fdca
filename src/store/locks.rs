//! Write serialisation across replicas: every advisory lock Keyhold takes, and the one place
//! its spelling differs between the backends.
//!
//! Some writes check a bound and then insert (a device's unused prekeys, an inbox's size, an
//! author's trusted users), extend a chain (the audit log), or draw ids that a cursor later
//! walks (an inbox, session keys). Two replicas doing that at once could both pass the check,
//! fork the chain, or commit ids out of order. [`lock`] makes them take turns until their
//! transactions end:
//!
//! - PostgreSQL: a transaction-scoped advisory lock (`pg_advisory_xact_lock`) on a key each
//!   [`TxLock`] derives. A hash collision between two keys only makes two writers take turns.
//! - SQLite: nothing to do; every write transaction already holds the database's one write
//!   lock (`BEGIN IMMEDIATE`).
//!
//! Migrations take a *session*-level lock instead ([`try_lock_migrations`]), polled with a
//! timeout, so that replicas starting together apply each migration once.
//!
//! The keys are part of the protocol between replicas: a replica of another version must
//! derive the same key for the same thing, so they do not change.

use diesel::sql_types::{BigInt, Bool, Integer, Text};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use super::{db_run, DbConn, PgConn, StoreError};
use crate::crypto::ids::{DeviceId, UserId};

/// The lock key that serialises migrations across replicas ("keyhold" then 1).
const MIGRATION_LOCK_KEY: i64 = 0x6b65_7968_6f6c_6401;
/// The lock key that serialises audit appends ("keyhold" then 2).
const AUDIT_LOCK_KEY: i64 = 0x6b65_7968_6f6c_6402;
/// The lock key that orders session-key inserts ("kh-sk" in ASCII).
const SESSION_KEYS_LOCK_KEY: i64 = 0x6B68_2D73_6B00;
/// The lock class of per-author trust changes ("khtu" in ASCII); the second key is
/// `hashtext(author)`.
const TRUST_LOCK_CLASS: i32 = 0x6b68_7475;

/// What a device lock protects; part of the lock's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeviceScope {
    /// The device's prekey stock (uploads).
    Prekeys,
    /// The device's key-sync inbox (sends to it).
    Inbox,
}

impl DeviceScope {
    fn name(self) -> &'static str {
        match self {
            DeviceScope::Prekeys => "keyhold/prekeys",
            DeviceScope::Inbox => "keyhold/inbox",
        }
    }
}

/// A transaction-scoped lock, held until the transaction ends. Take several in one fixed
/// order (as listed here, devices sorted), or two transactions may wait on each other.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TxLock<'a> {
    /// The audit chain: appends read the last event and write the next.
    AuditChain,
    /// Session-key inserts: on PostgreSQL identity values are drawn before commit, so two
    /// transactions could commit out of id order and a sync cursor step past a row that
    /// commits later with a lower id. Holding this lock while drawing ids makes ids follow
    /// commit order.
    SessionKeyOrder,
    /// An author's trusted users (the count and the insert).
    Trust(&'a UserId),
    /// One device's prekey stock or inbox.
    Device(DeviceScope, &'a UserId, &'a DeviceId),
}

/// Takes `lock` until the transaction on `conn` ends. Call only inside a transaction.
pub(crate) async fn lock(conn: &mut DbConn, lock: TxLock<'_>) -> Result<(), StoreError> {
    db_run!(conn: sqlite {
        // BEGIN IMMEDIATE already made this transaction the only writer.
    } postgres {
        match lock {
            TxLock::AuditChain => xact_lock_key(conn, AUDIT_LOCK_KEY).await?,
            TxLock::SessionKeyOrder => xact_lock_key(conn, SESSION_KEYS_LOCK_KEY).await?,
            TxLock::Trust(author) => {
                diesel::sql_query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
                    .bind::<Integer, _>(TRUST_LOCK_CLASS)
                    .bind::<Text, _>(author.as_str())
                    .execute(conn)
                    .await?;
            }
            TxLock::Device(scope, user, device) => {
                // Ids contain no spaces, so the key text is unambiguous.
                let key = format!("{} {user} {device}", scope.name());
                diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                    .bind::<Text, _>(key)
                    .execute(conn)
                    .await?;
            }
        }
    });
    Ok(())
}

async fn xact_lock_key(conn: &mut PgConn, key: i64) -> Result<(), StoreError> {
    diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
        .bind::<BigInt, _>(key)
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(QueryableByName)]
struct Taken {
    #[diesel(sql_type = Bool)]
    taken: bool,
}

/// Takes the session-level migration lock on a PostgreSQL connection if it is free; true if
/// taken. It lasts until [`unlock_migrations`] or the end of the session.
pub(crate) async fn try_lock_migrations(conn: &mut PgConn) -> Result<bool, StoreError> {
    let row: Taken = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS taken")
        .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
        .get_result(conn)
        .await?;
    Ok(row.taken)
}

/// Releases the migration lock [`try_lock_migrations`] took; true if it was held.
pub(crate) async fn unlock_migrations(conn: &mut PgConn) -> Result<bool, StoreError> {
    let row: Taken = diesel::sql_query("SELECT pg_advisory_unlock($1) AS taken")
        .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
        .get_result(conn)
        .await?;
    Ok(row.taken)
}
