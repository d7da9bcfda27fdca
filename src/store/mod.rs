//! Keyhold's records, kept through Diesel on SQLite or PostgreSQL.
//!
//! [`Store`] is the one door: the services call its async methods with domain types (the ids
//! of [`crate::crypto::ids`], the records of each module) and never build SQL. Behind it:
//!
//! - **Backends**, chosen by the URL scheme ([`Store::open`]): `sqlite://path` (bundled
//!   SQLite, WAL, the embedded default) and `postgres://…` (diesel-async with a deadpool pool;
//!   TLS as the URL's `sslmode` and `sslrootcert` say, read as libpq reads them: `pg_tls`).
//! - **One module per record**, its queries beside it: [`tokens`] (API tokens),
//!   [`user_keys`] (device key bundles), [`sessions`] (sessions, their members and wrapped
//!   keys), [`audit`] (the hash-chained audit log), [`prekeys`] (signed prekeys and their claim
//!   rate windows), [`ratchet_states`] (ratchet state backups), [`key_packages`] (key-sync
//!   inboxes), [`idempotency`] (the recorded answers of calls made with an idempotency
//!   key); [`events`] wakes watch streams across processes. Each query is
//!   written once and compiled for both backends by the `db_run!` macro below; where the
//!   backends must differ (locking, `BEGIN IMMEDIATE`) the macro's two-armed form keeps both
//!   spellings side by side in the one place that needs them. [`messages`] keeps encrypted
//!   messages and their keyset listings, [`trust`] the trusted users of each author.
//! - **Transactions**: every store call that writes is one transaction; [`Store::transaction`]
//!   runs several calls on a [`Tx`] as one (for example an audit event and the read it
//!   records, so that the read fails if the audit write does). A transaction whose future is
//!   dropped before it ends (its call's deadline passed) never commits and never goes back to
//!   the pool half-used (`tx.rs`).
//! - **Migrations**, embedded from `migrations/{sqlite,postgres}/`: [`Store::migrate`],
//!   [`Store::migration_status`], [`Store::pending_migrations`]. On PostgreSQL they run under
//!   an advisory lock taken with a timeout, so replicas starting together apply each
//!   migration once.
//! - **Errors**: [`StoreError`]; every database and pool error is sorted into it in one place
//!   (`error.rs`).
//!
//! Times are unix microseconds ([`Timestamp`]) set by the store, not by callers.
//!
//! # SQLite and concurrency
//!
//! SQLite lets one writer at a time into a database file. The store therefore keeps a pool of
//! exactly **one** connection for SQLite: calls queue for it in the process instead of
//! failing with `SQLITE_BUSY`, and write transactions start with `BEGIN IMMEDIATE` so that a
//! second process (`keyhold migrate` beside `keyhold serve`) waits up to the busy timeout
//! rather than failing halfway through a transaction. Reads in WAL mode never block on that
//! writer from another process. PostgreSQL is the backend for more than one replica.
//!
//! Inside [`Store::transaction`] use only the [`Tx`] it hands you: on SQLite a second store
//! call would wait for the connection the transaction holds, until the acquire timeout.

pub mod audit;
mod error;
pub mod events;
mod health;
pub mod idempotency;
pub mod key_packages;
mod locks;
pub mod messages;
mod migrations;
pub(crate) mod pg_tls;
pub mod prekeys;
pub mod ratchet_states;
pub(crate) mod schema;
pub mod screening;
pub mod sessions;
pub mod tokens;
pub mod trust;
mod tx;
pub mod user_keys;

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use diesel::SqliteConnection;
use diesel_async::pooled_connection::deadpool::{Hook, HookError, Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};

pub use error::StoreError;
pub use migrations::MigrationStatus;
pub use tx::Tx;
pub(crate) use tx::DB_TRANSACTIONS_ABANDONED;

/// The SQLite connection type: Diesel's sync connection run on tokio's blocking pool.
pub(crate) type SqliteConn = SyncConnectionWrapper<SqliteConnection>;
/// The PostgreSQL connection type.
pub(crate) type PgConn = AsyncPgConnection;

/// Runs one block of Diesel code against whichever backend a [`DbConn`] holds.
///
/// `db_run!(conn: { ... })` compiles the block twice, once per backend, with `conn` rebound
/// to `&mut` the concrete connection; each query is written once. The two-armed form,
/// `db_run!(conn: sqlite { ... } postgres { ... })`, is for the few places where the SQL must
/// differ; keep those to locking and transaction control.
macro_rules! db_run {
    ($conn:ident: $body:block) => {
        match $conn {
            $crate::store::DbConn::Sqlite($conn) => {
                let $conn: &mut $crate::store::SqliteConn = &mut *$conn;
                $body
            }
            $crate::store::DbConn::Postgres($conn) => {
                let $conn: &mut $crate::store::PgConn = &mut *$conn;
                $body
            }
        }
    };
    ($conn:ident: sqlite $sqlite:block postgres $postgres:block) => {
        match $conn {
            // An arm may have nothing to do on its backend.
            #[allow(unused_variables)]
            $crate::store::DbConn::Sqlite($conn) => {
                let $conn: &mut $crate::store::SqliteConn = &mut *$conn;
                $sqlite
            }
            #[allow(unused_variables)]
            $crate::store::DbConn::Postgres($conn) => {
                let $conn: &mut $crate::store::PgConn = &mut *$conn;
                $postgres
            }
        }
    };
}
pub(crate) use db_run;

/// SQL functions both backends have that Diesel does not declare.
mod sql {
    diesel::define_sql_function! {
        /// The first of its arguments that is not NULL.
        fn coalesce<ST: diesel::sql_types::SingleValue>(
            value: diesel::sql_types::Nullable<ST>,
            otherwise: ST,
        ) -> diesel::sql_types::Nullable<ST>;
    }
}

/// A point in time as the store keeps it: microseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current time of this server (clamped to the epoch if the clock is before it).
    pub fn now() -> Self {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Timestamp(micros)
    }

    /// A time given in microseconds since the Unix epoch.
    pub fn from_unix_micros(micros: i64) -> Self {
        Timestamp(micros)
    }

    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.0
    }
}

/// Which database engine a [`Store`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// Embedded SQLite (`sqlite://…`).
    Sqlite,
    /// PostgreSQL (`postgres://…` or `postgresql://…`).
    Postgres,
}

impl Backend {
    /// The backend a database URL names, without opening it; `None` for a scheme Keyhold
    /// does not support (which [`Store::open`] refuses).
    pub fn of_url(url: &str) -> Option<Backend> {
        if sqlite_path(url).is_some() {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// Histogram: seconds a call waited for a pooled connection, failures included.
pub(crate) const DB_POOL_ACQUIRE_DURATION: &str = "keyhold_db_pool_acquire_duration_seconds";

/// The connection pool as it is at one moment ([`Store::pool_status`]), for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStatus {
    /// Most connections the pool opens.
    pub max_size: usize,
    /// Connections open now, idle or in use.
    pub size: usize,
    /// Idle connections.
    pub idle: usize,
    /// Calls waiting for a connection.
    pub waiting: usize,
}

/// Tuning for [`Store::open_with`]; [`StoreOptions::default`] suits a small deployment.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Most PostgreSQL connections the pool opens (SQLite always uses one).
    pub max_connections: usize,
    /// How long a call waits for a pooled connection, including opening a new one, before it
    /// fails with [`StoreError::Unavailable`].
    pub acquire_timeout: Duration,
    /// How long [`Store::migrate`] and friends wait on PostgreSQL for another replica's
    /// migration lock before failing with [`StoreError::Unavailable`].
    pub migration_lock_timeout: Duration,
    /// How long SQLite waits for another process's write lock (`PRAGMA busy_timeout`).
    pub sqlite_busy_timeout: Duration,
    /// PostgreSQL `statement_timeout` of every pooled connection: a statement that runs
    /// longer is cancelled and its call fails with [`StoreError::Unavailable`]. Zero turns
    /// it off. (Migrations run on a connection of their own, without it.)
    pub statement_timeout: Duration,
    /// PostgreSQL `lock_timeout` of every pooled connection: a statement that waits longer
    /// for a row or table lock another transaction holds fails with
    /// [`StoreError::LockTimeout`]. A prekey claim waiting for a one-time prekey held by an
    /// unfinished claim waits at most this long. Zero turns it off.
    pub lock_timeout: Duration,
    /// PostgreSQL `idle_in_transaction_session_timeout` of every pooled connection: a
    /// connection left idle inside a transaction longer (its process paused or partitioned
    /// away) is closed by the server and its transaction rolled back. Zero turns it off.
    pub idle_in_transaction_timeout: Duration,
    /// The bound on a PutMessages write on PostgreSQL: it commits within this long of its
    /// transaction's start or not at all (a commit-time check refuses it), and its
    /// statements have this `statement_timeout`. Listings stop waiting for a writer older
    /// than this (plus a margin) that is waiting for its client: see
    /// [`messages`]' visibility horizon. Zero turns the bound off (listings then wait for
    /// every running writer, however long).
    pub message_write_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
            migration_lock_timeout: Duration::from_secs(60),
            sqlite_busy_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(5),
            idle_in_transaction_timeout: Duration::from_secs(5),
            message_write_timeout: Duration::from_secs(5),
        }
    }
}

/// PostgreSQL session settings, run on every new pooled connection ([`StoreOptions`]): the
/// statement, lock and idle-in-transaction timeouts. Values are whole milliseconds, zero
/// meaning off, as PostgreSQL reads them.
fn postgres_session_settings(options: &StoreOptions) -> String {
    let ms = |d: Duration| d.as_millis().min(i32::MAX as u128);
    format!(
        "SET statement_timeout = {};\
         SET lock_timeout = {};\
         SET idle_in_transaction_session_timeout = {};",
        ms(options.statement_timeout),
        ms(options.lock_timeout),
        ms(options.idle_in_transaction_timeout),
    )
}

#[derive(Clone)]
enum Pools {
    Sqlite(Pool<SqliteConn>),
    Postgres(Pool<PgConn>),
}

/// The handle to Keyhold's database. Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct Store {
    pools: Pools,
    /// Kept for migrations, which run on a connection of their own on PostgreSQL.
    url: Arc<str>,
    options: Arc<StoreOptions>,
    /// Wakes watch streams when a device's inbox or prekey stock changes ([`events`]).
    events: Arc<events::Hub>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password: only the backend is shown.
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

/// A connection taken from the pool, of either backend. Queries match on it with `db_run!`.
// One DbConn lives for the length of one store call and is hardly moved; boxing the larger
// variant would cost an allocation per call to save stack space nobody is short of.
#[allow(clippy::large_enum_variant)]
pub(crate) enum DbConn {
    Sqlite(Object<SqliteConn>),
    Postgres(Object<PgConn>),
}

/// A connection taken from the pool ([`Store::conn`]), outside any transaction.
///
/// This is the one shape of store access: each record module writes a query once, as a
/// method of `Conn` when it may run on its own (a read, or a write that is one statement) or
/// of [`Tx`] when it must share a transaction with other statements. A `Tx` derefs to its
/// `Conn`, so every `Conn` query also runs inside a transaction.
pub struct Conn {
    pub(crate) db: DbConn,
    /// [`StoreOptions::message_write_timeout`], which message writes on this connection carry.
    pub(crate) message_write_timeout: Duration,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Conn")
    }
}

/// The closures [`Store::transaction`] accepts: an `async` closure taking the [`Tx`].
///
/// Implemented for every suitable closure; it exists so that the future the closure returns
/// can be required to be `Send` (the same device as diesel-async's `transaction`), which an
/// `AsyncFnOnce` bound alone cannot say on stable Rust.
pub trait TxFn<T, R>: AsyncFnOnce(T) -> R + FnOnce(T) -> <Self as TxFn<T, R>>::Fut {
    /// The future the closure returns.
    type Fut: Future<Output = R>;
}

impl<F, T, Fut, R> TxFn<T, R> for F
where
    F: AsyncFnOnce(T) -> R + FnOnce(T) -> Fut,
    Fut: Future<Output = R>,
{
    type Fut = Fut;
}

/// SQLite connection setup, run on every new connection (pragmas are per connection).
fn sqlite_pragmas(busy_timeout: Duration) -> String {
    format!(
        "PRAGMA journal_mode = WAL;\
         PRAGMA synchronous = NORMAL;\
         PRAGMA foreign_keys = ON;\
         PRAGMA busy_timeout = {};",
        busy_timeout.as_millis()
    )
}

/// The path in a `sqlite://` URL: `sqlite://keyhold.db` is relative to the working directory,
/// `sqlite:///var/lib/keyhold.db` is absolute, `sqlite::memory:` is a private in-memory
/// database (for tests; it lives as long as the store's one connection).
fn sqlite_path(url: &str) -> Option<&str> {
    if url == "sqlite::memory:" {
        return Some(":memory:");
    }
    url.strip_prefix("sqlite://").filter(|p| !p.is_empty())
}

impl Store {
    /// Opens the database a URL names, with default [`StoreOptions`].
    ///
    /// See [`Store::open_with`].
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        Store::open_with(url, StoreOptions::default()).await
    }

    /// Opens the database a URL names: `sqlite://path` or `postgres://…`.
    ///
    /// For SQLite the parent directory is created and the file is opened in WAL mode with
    /// foreign keys on. One connection is opened at once in either case, so that a wrong URL
    /// or an unreachable server is reported here ([`StoreError::Unavailable`]) rather than at
    /// the first request. Migrations are not run; see [`Store::migrate`].
    ///
    /// Every checkout from the pool first checks the connection with `SELECT 1`, so a
    /// connection the server dropped is replaced instead of failing a call. Every new
    /// PostgreSQL connection gets the session settings of [`StoreOptions`] (statement, lock
    /// and idle-in-transaction timeouts) before its first use.
    pub async fn open_with(url: &str, options: StoreOptions) -> Result<Store, StoreError> {
        let pools = if let Some(path) = sqlite_path(url) {
            if path != ":memory:" {
                if let Some(parent) = Path::new(path).parent() {
                    if !parent.as_os_str().is_empty() {
                        std::fs::create_dir_all(parent).map_err(|e| {
                            StoreError::Unavailable(format!(
                                "cannot create the directory {}: {e}",
                                parent.display()
                            ))
                        })?;
                    }
                }
            }
            let pragmas = sqlite_pragmas(options.sqlite_busy_timeout);
            let mut config = ManagerConfig::<SqliteConn>::default();
            config.custom_setup = Box::new(move |path| {
                let path = path.to_owned();
                let pragmas = pragmas.clone();
                Box::pin(async move {
                    let mut conn = SqliteConn::establish(&path).await?;
                    conn.batch_execute(&pragmas)
                        .await
                        .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                    Ok(conn)
                })
            });
            let manager = AsyncDieselConnectionManager::new_with_config(path, config);
            // One connection: SQLite has one writer at a time (see the module docs).
            let pool = Pool::builder(manager)
                .max_size(1)
                .build()
                .map_err(|e| StoreError::Internal(format!("building the SQLite pool: {e}")))?;
            Pools::Sqlite(pool)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // TLS as the URL's sslmode and sslrootcert say (libpq's rules): `pg_tls`.
            let mut config = ManagerConfig::<PgConn>::default();
            config.custom_setup = Box::new(|url| Box::pin(pg_tls::establish(url)));
            let manager = AsyncDieselConnectionManager::new_with_config(url, config);
            let settings: Arc<str> = postgres_session_settings(&options).into();
            let pool = Pool::builder(manager)
                .max_size(options.max_connections.max(1))
                .post_create(Hook::async_fn(move |conn: &mut PgConn, _| {
                    let settings = Arc::clone(&settings);
                    Box::pin(async move {
                        conn.batch_execute(&settings).await.map_err(|e| {
                            HookError::Backend(
                                diesel_async::pooled_connection::PoolError::QueryError(e),
                            )
                        })
                    })
                }))
                .build()
                .map_err(|e| StoreError::Internal(format!("building the PostgreSQL pool: {e}")))?;
            Pools::Postgres(pool)
        } else {
            return Err(StoreError::InvalidUrl(
                "expected sqlite://PATH or postgres://… (KEYHOLD_DATABASE_URL)".into(),
            ));
        };
        let store = Store {
            pools,
            url: Arc::from(url),
            options: Arc::new(options),
            events: Arc::default(),
        };
        // Fail now, not at the first request, if the database cannot be reached.
        drop(store.db_conn().await?);
        Ok(store)
    }

    /// Which backend this store uses.
    pub fn backend(&self) -> Backend {
        match self.pools {
            Pools::Sqlite(_) => Backend::Sqlite,
            Pools::Postgres(_) => Backend::Postgres,
        }
    }

    /// Closes the connection pool: calls waiting for a connection, and any later call, fail
    /// with [`StoreError::Unavailable`]; connections in use close when they are returned.
    /// For a graceful shutdown, after the server has stopped taking calls.
    pub fn close(&self) {
        match &self.pools {
            Pools::Sqlite(pool) => pool.close(),
            Pools::Postgres(pool) => pool.close(),
        }
    }

    /// Takes a connection from the pool, waiting at most the acquire timeout, for queries
    /// that need no transaction of their own: `store.conn().await?.trusted_users(..)`.
    pub async fn conn(&self) -> Result<Conn, StoreError> {
        Ok(Conn {
            db: self.db_conn().await?,
            message_write_timeout: self.options.message_write_timeout,
        })
    }

    /// The pool's size, idle connections and waiting calls now.
    pub fn pool_status(&self) -> PoolStatus {
        let s = match &self.pools {
            Pools::Sqlite(pool) => pool.status(),
            Pools::Postgres(pool) => pool.status(),
        };
        PoolStatus {
            max_size: s.max_size,
            size: s.size,
            idle: s.available,
            waiting: s.waiting,
        }
    }

    /// Takes a connection from the pool, waiting at most the acquire timeout.
    pub(crate) async fn db_conn(&self) -> Result<DbConn, StoreError> {
        let started = std::time::Instant::now();
        let conn = self.db_conn_untimed().await;
        metrics::histogram!(DB_POOL_ACQUIRE_DURATION).record(started.elapsed().as_secs_f64());
        conn
    }

    async fn db_conn_untimed(&self) -> Result<DbConn, StoreError> {
        let wait = self.options.acquire_timeout;
        let timed_out =
            || StoreError::Unavailable(format!("no database connection within {wait:?}"));
        Ok(match &self.pools {
            Pools::Sqlite(pool) => DbConn::Sqlite(
                tokio::time::timeout(wait, pool.get())
                    .await
                    .map_err(|_| timed_out())??,
            ),
            Pools::Postgres(pool) => DbConn::Postgres(
                tokio::time::timeout(wait, pool.get())
                    .await
                    .map_err(|_| timed_out())??,
            ),
        })
    }

    /// Runs `f` in one transaction: committed if it returns `Ok`, rolled back if it returns
    /// `Err` (which is then returned as is) or if its future is dropped.
    ///
    /// The error is any type a [`StoreError`] converts into, so a domain workflow returns its
    /// own error (a refusal rolls back like a database failure) with no `Result` nested in
    /// another.
    ///
    /// ```no_run
    /// # async fn example(store: keyhold::store::Store) -> Result<(), keyhold::store::StoreError> {
    /// use keyhold::store::audit::NewAuditEvent;
    /// let event = NewAuditEvent::new("staff:alice", "escrow.read", "session:…")
    ///     .with_reason("case 7");
    /// store
    ///     .transaction(async move |tx| {
    ///         tx.append_audit_event(&event).await?;
    ///         // ... the read the event records, on the same `tx` ...
    ///         Ok(())
    ///     })
    ///     .await
    /// # }
    /// ```
    pub async fn transaction<R, E, F>(&self, f: F) -> Result<R, E>
    where
        for<'r> F: AsyncFnOnce(&'r mut Tx) -> Result<R, E>
            + TxFn<&'r mut Tx, Result<R, E>, Fut: Send>
            + Send,
        R: Send,
        E: From<StoreError> + fmt::Display + Send,
    {
        self.transaction_begun_with(None, f).await
    }

    /// [`Store::transaction`], begun on PostgreSQL with `postgres_begin` (a `BEGIN` followed
    /// by `SET LOCAL` settings, in one round trip) when given.
    pub(crate) async fn transaction_begun_with<R, E, F>(
        &self,
        postgres_begin: Option<&str>,
        f: F,
    ) -> Result<R, E>
    where
        for<'r> F: AsyncFnOnce(&'r mut Tx) -> Result<R, E>
            + TxFn<&'r mut Tx, Result<R, E>, Fut: Send>
            + Send,
        R: Send,
        E: From<StoreError> + fmt::Display + Send,
    {
        let mut tx = Tx::new(self.conn().await?);
        tx.begin(postgres_begin).await?;
        let result = f(&mut tx).await;
        tx.finish(result).await
    }
}

/// Converts a count or number the database keeps as a signed integer into the unsigned one
/// the domain uses, treating a negative value as corrupt data.
pub(crate) fn unsigned<T, U>(what: &str, value: T) -> Result<U, StoreError>
where
    T: Copy + fmt::Display,
    U: TryFrom<T>,
{
    U::try_from(value).map_err(|_| StoreError::corrupt(what, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_name_paths() {
        assert_eq!(sqlite_path("sqlite://keyhold.db"), Some("keyhold.db"));
        assert_eq!(sqlite_path("sqlite:///var/lib/k.db"), Some("/var/lib/k.db"));
        assert_eq!(sqlite_path("sqlite::memory:"), Some(":memory:"));
        assert_eq!(sqlite_path("sqlite://"), None);
        assert_eq!(sqlite_path("postgres://x"), None);
    }

    #[tokio::test]
    async fn unknown_scheme_is_invalid_url() {
        let err = Store::open("mysql://localhost/k").await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidUrl(_)), "{err:?}");
    }
}
