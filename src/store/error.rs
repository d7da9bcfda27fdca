//! The store's one error type, and the one place database errors are sorted into it.

use diesel::result::{DatabaseErrorInformation, DatabaseErrorKind, Error as DieselError};

/// Everything a store call can fail with.
///
/// The services map each variant to one gRPC code (see `DESIGN.md`, "API"); the messages are
/// for logs and never carry secret values, only table, constraint and driver text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record asked for does not exist, or a record the write refers to does not
    /// (a foreign key refused it).
    #[error("not found")]
    NotFound,
    /// A record with the same identity already exists: a unique constraint refused the write.
    /// The text names the constraint or table when the database says which.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// Another writer changed the same record first (a compare-and-swap lost, or a concurrent
    /// write won a race on a version number). Reading again and retrying may succeed.
    #[error("version conflict: {0}")]
    VersionConflict(String),
    /// The write would take a record past a configured bound (a device's unused prekeys, an
    /// inbox) or a caller past a rate limit. Nothing was written; the text says which limit.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// The database cannot be used right now: connecting failed or timed out, no pooled
    /// connection came free in time, the connection dropped, a lock wait timed out, or the
    /// server is shutting down. Nothing was written.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A row or table lock the call needs stayed held by another unfinished transaction for
    /// longer than the lock timeout (`StoreOptions::lock_timeout`). Nothing was written;
    /// retrying shortly may succeed. The text is the store's own (no driver text) and may be
    /// shown to the caller.
    #[error("{0}")]
    LockTimeout(String),
    /// The database has run out of disk space or memory, or past another server resource
    /// (SQLite's `SQLITE_FULL`; PostgreSQL's class 53 errors: disk full, out of memory, too
    /// many connections, a configuration limit). Nothing was written; reads may still work,
    /// and writes succeed again once the resource is freed, without a restart. The text is
    /// the driver's, for logs only.
    #[error("database out of resources: {0}")]
    OutOfResources(String),
    /// The database URL names no backend Keyhold supports, or cannot be used as given.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// Anything else: a failed migration, a row the store cannot read back (corrupt data), or
    /// a bug. Never the caller's fault.
    #[error("internal store error: {0}")]
    Internal(String),
}

impl StoreError {
    /// A stored value that does not parse as its domain type.
    pub(crate) fn corrupt(what: &str, detail: impl std::fmt::Display) -> Self {
        StoreError::Internal(format!("corrupt {what} in the database: {detail}"))
    }
}

/// Reading a stored value back into its domain type: one that no longer parses is a corrupt
/// record ([`StoreError::corrupt`] naming `what`), never the caller's fault.
pub(crate) trait Stored<T> {
    /// The parsed value, or a corrupt-record error naming `what`.
    fn stored(self, what: &str) -> Result<T, StoreError>;
}

impl<T, E: std::fmt::Display> Stored<T> for Result<T, E> {
    fn stored(self, what: &str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::corrupt(what, e))
    }
}

fn describe(info: &dyn DatabaseErrorInformation) -> String {
    match (info.table_name(), info.constraint_name()) {
        (_, Some(constraint)) => constraint.to_owned(),
        (Some(table), None) => table.to_owned(),
        // SQLite names the columns in its message ("UNIQUE constraint failed: t.c").
        (None, None) => info.message().to_owned(),
    }
}

/// Messages (SQLite and PostgreSQL) that mean "try again later" rather than "bug".
///
/// Diesel hands over PostgreSQL's message but not its SQLSTATE, so errors are sorted by the
/// server's message text as PostgreSQL words it with `lc_messages` in English (`C`, the
/// default of most installations); under another language they fall through to
/// [`StoreError::Internal`], which is logged with the text.
fn is_transient(message: &str) -> bool {
    const TRANSIENT: &[&str] = &[
        // SQLite: SQLITE_BUSY / SQLITE_LOCKED after busy_timeout ran out; SQLITE_IOERR.
        "database is locked",
        "database table is locked",
        "database is busy",
        "disk I/O error",
        // PostgreSQL: statement_timeout, a cancel, admin shutdown, idle-in-transaction
        // timeout, server starting or stopping, a replica in recovery.
        "statement timeout",
        "canceling statement due to user request",
        "terminating connection",
        "the database system is",
        "server closed the connection",
        "connection to server",
        "cannot execute",
        // A PutMessages write refused at commit for being older than its bound.
        "message write not committed",
    ];
    TRANSIENT.iter().any(|t| message.contains(t))
}

/// Messages that mean the database ran out of space, memory or another server resource:
/// SQLite's `SQLITE_FULL` ("database or disk is full") and PostgreSQL's class 53
/// (53100 disk_full: "could not extend file … No space left on device", "could not write …";
/// 53200 out_of_memory; 53300 too_many_connections; 53400 configuration_limit_exceeded).
/// English texts, as [`is_transient`] explains.
fn is_out_of_resources(message: &str) -> bool {
    const EXHAUSTED: &[&str] = &[
        "database or disk is full",
        "No space left on device",
        "could not extend file",
        "out of memory",
        "too many clients",
        "remaining connection slots are reserved",
        "out of shared memory",
        "too many connections",
    ];
    EXHAUSTED.iter().any(|t| message.contains(t))
}

/// PostgreSQL's lock_timeout (55P03): "canceling statement due to lock timeout".
fn is_lock_timeout(message: &str) -> bool {
    message.contains("lock timeout")
}

/// PostgreSQL's deadlock_detected (40P01): one transaction of a cycle was rolled back.
fn is_deadlock(message: &str) -> bool {
    message.contains("deadlock detected")
}

/// The public text of a lock timeout the store gives no more precise meaning.
pub(crate) const LOCK_TIMEOUT_TEXT: &str =
    "a record this call needs is held by another unfinished call past the lock timeout; retry";

impl From<DieselError> for StoreError {
    fn from(e: DieselError) -> Self {
        match e {
            DieselError::NotFound => StoreError::NotFound,
            DieselError::DatabaseError(kind, info) => match kind {
                DatabaseErrorKind::UniqueViolation => {
                    StoreError::AlreadyExists(describe(info.as_ref()))
                }
                DatabaseErrorKind::ForeignKeyViolation => StoreError::NotFound,
                DatabaseErrorKind::SerializationFailure => {
                    StoreError::VersionConflict(info.message().to_owned())
                }
                DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::UnableToSendCommand
                | DatabaseErrorKind::ReadOnlyTransaction => {
                    StoreError::Unavailable(info.message().to_owned())
                }
                _ if is_out_of_resources(info.message()) => {
                    StoreError::OutOfResources(info.message().to_owned())
                }
                _ if is_lock_timeout(info.message()) => {
                    tracing::debug!(error = info.message(), "lock timeout");
                    StoreError::LockTimeout(LOCK_TIMEOUT_TEXT.to_owned())
                }
                _ if is_deadlock(info.message()) => {
                    StoreError::VersionConflict(info.message().to_owned())
                }
                _ if is_transient(info.message()) => {
                    StoreError::Unavailable(info.message().to_owned())
                }
                _ => StoreError::Internal(format!("{kind:?}: {}", info.message())),
            },
            other => StoreError::Internal(other.to_string()),
        }
    }
}

impl From<diesel::ConnectionError> for StoreError {
    fn from(e: diesel::ConnectionError) -> Self {
        match e {
            diesel::ConnectionError::InvalidConnectionUrl(msg) => StoreError::InvalidUrl(msg),
            // Setting a new connection up failed: what the database said, but never a bug.
            diesel::ConnectionError::CouldntSetupConfiguration(e) => match StoreError::from(e) {
                StoreError::Internal(text) => StoreError::Unavailable(text),
                sorted => sorted,
            },
            other if is_out_of_resources(&other.to_string()) => {
                StoreError::OutOfResources(other.to_string())
            }
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

impl From<diesel_async::pooled_connection::PoolError> for StoreError {
    fn from(e: diesel_async::pooled_connection::PoolError) -> Self {
        match e {
            diesel_async::pooled_connection::PoolError::ConnectionError(e) => e.into(),
            diesel_async::pooled_connection::PoolError::QueryError(e) => e.into(),
        }
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for StoreError {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        // deadpool is reached through diesel-async's alias, so its variants are named there.
        use diesel_async::pooled_connection::deadpool::PoolError as P;
        match e {
            P::Backend(e) => e.into(),
            P::Timeout(_) => {
                StoreError::Unavailable("no database connection came free in time".into())
            }
            P::Closed => StoreError::Unavailable("the connection pool is closed".into()),
            P::NoRuntimeSpecified => StoreError::Internal("connection pool has no runtime".into()),
            P::PostCreateHook(e) => StoreError::Unavailable(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_busy_is_unavailable_not_internal() {
        let e = DieselError::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("database is locked".to_owned()),
        );
        assert!(matches!(StoreError::from(e), StoreError::Unavailable(_)));
    }

    #[test]
    fn unique_violation_is_already_exists() {
        let e = DieselError::DatabaseError(
            DatabaseErrorKind::UniqueViolation,
            Box::new("UNIQUE constraint failed: api_tokens.token_hash".to_owned()),
        );
        match StoreError::from(e) {
            StoreError::AlreadyExists(what) => assert!(what.contains("api_tokens.token_hash")),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn unknown(message: &str) -> StoreError {
        StoreError::from(DieselError::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new(message.to_owned()),
        ))
    }

    /// The texts SQLite and PostgreSQL 15 give for a full disk and the other class 53
    /// errors, as they reach the store through Diesel (an injected error at the driver
    /// boundary; tests/full_disk.rs fills a real disk under SQLite).
    #[test]
    fn full_disk_and_exhausted_server_resources_are_out_of_resources() {
        for message in [
            // SQLITE_FULL.
            "database or disk is full",
            // 53100 disk_full, from md.c and fd.c.
            "could not extend file \"base/16384/16397\": No space left on device",
            "could not write to file \"pg_wal/xlogtemp.123\": No space left on device",
            "could not write block 7 of relation base/16384/16397: No space left on device",
            // 53200 out_of_memory.
            "out of memory",
            // 53300 too_many_connections.
            "sorry, too many clients already",
            "remaining connection slots are reserved for non-replication superuser connections",
            // 53200 from the lock manager.
            "out of shared memory",
        ] {
            assert!(
                matches!(unknown(message), StoreError::OutOfResources(_)),
                "{message}: {:?}",
                unknown(message)
            );
        }
    }

    #[test]
    fn timeouts_and_disconnects_are_retryable_never_internal() {
        assert!(matches!(
            unknown("canceling statement due to lock timeout"),
            StoreError::LockTimeout(text) if text == LOCK_TIMEOUT_TEXT
        ));
        assert!(matches!(
            unknown("deadlock detected"),
            StoreError::VersionConflict(_)
        ));
        for message in [
            "canceling statement due to statement timeout",
            "terminating connection due to idle-in-transaction timeout",
            "terminating connection due to administrator command",
            "the database system is shutting down",
            "disk I/O error",
            "message write not committed: its transaction began more than 5000 ms ago",
        ] {
            assert!(
                matches!(unknown(message), StoreError::Unavailable(_)),
                "{message}"
            );
        }
        let setup = diesel::ConnectionError::CouldntSetupConfiguration(DieselError::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("weird".to_owned()),
        ));
        assert!(matches!(
            StoreError::from(setup),
            StoreError::Unavailable(_)
        ));
    }
}
