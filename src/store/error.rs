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
fn is_transient(message: &str) -> bool {
    const TRANSIENT: &[&str] = &[
        // SQLite: SQLITE_BUSY / SQLITE_LOCKED after busy_timeout ran out.
        "database is locked",
        "database table is locked",
        "database is busy",
        // PostgreSQL: lock_timeout, admin shutdown, server starting or stopping.
        "lock timeout",
        "terminating connection",
        "the database system is",
        "server closed the connection",
    ];
    TRANSIENT.iter().any(|t| message.contains(t))
}

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
}
