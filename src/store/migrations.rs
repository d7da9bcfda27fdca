//! The embedded migrations and the runner behind `keyhold migrate status|deploy`.
//!
//! Both directories under `migrations/` are compiled into the binary. Diesel's migration
//! harness is synchronous, so it runs on tokio's blocking pool: on SQLite directly on the
//! store's one connection, on PostgreSQL on a connection of its own wrapped by diesel-async's
//! `AsyncConnectionWrapper`.
//!
//! On SQLite the whole call runs in one `BEGIN IMMEDIATE` transaction, which holds SQLite's
//! write lock: a second process migrating the same file waits, then finds nothing to do.
//!
//! On PostgreSQL every migration call first takes a session-level advisory lock
//! (`locks::try_lock_migrations`), polling `pg_try_advisory_lock` until
//! [`StoreOptions::migration_lock_timeout`](super::StoreOptions) runs out. Replicas started
//! together therefore take turns: the first applies what is pending, the others then find
//! nothing to do. Even reading the status takes the lock, because Diesel creates its
//! bookkeeping table on first use and two replicas creating it at once would collide. The
//! connection is closed afterwards, which releases the lock even if unlocking failed.

use std::time::Instant;

use diesel::backend::Backend as DieselBackend;
use diesel::migration::{Migration, MigrationSource};
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::{PgConn, Store, StoreError};

/// The PostgreSQL migrations, from `migrations/postgres/`.
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
/// The SQLite migrations, from `migrations/sqlite/`.
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// One embedded migration and whether the database has applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationStatus {
    /// The migration's directory name, `<timestamp>_<name>`.
    pub name: String,
    /// Whether the database has applied it.
    pub applied: bool,
}

#[derive(Clone, Copy)]
enum Op {
    /// Report what is applied.
    Status,
    /// Apply what is pending, then report.
    Deploy,
}

/// What a migration call found and did.
struct Outcome {
    /// Every embedded migration, oldest first, with its state after the call.
    status: Vec<MigrationStatus>,
    /// The migrations this call applied, oldest first.
    applied_now: Vec<String>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The migration logic proper, the same for both backends.
fn run_op<DB, H>(harness: &mut H, source: &EmbeddedMigrations, op: Op) -> Result<Outcome, BoxError>
where
    DB: DieselBackend,
    H: MigrationHarness<DB>,
    EmbeddedMigrations: MigrationSource<DB>,
{
    let applied = harness.applied_migrations()?;
    let mut migrations: Vec<Box<dyn Migration<DB>>> = source.migrations()?;
    migrations.sort_by(|a, b| a.name().version().cmp(&b.name().version()));

    let mut status = Vec::with_capacity(migrations.len());
    let mut applied_now = Vec::new();
    for migration in &migrations {
        let name = migration.name().to_string();
        let mut is_applied = applied.contains(&migration.name().version());
        if !is_applied && matches!(op, Op::Deploy) {
            harness.run_migration(migration.as_ref())?;
            tracing::info!(migration = %name, "applied migration");
            applied_now.push(name.clone());
            is_applied = true;
        }
        status.push(MigrationStatus {
            name,
            applied: is_applied,
        });
    }
    Ok(Outcome {
        status,
        applied_now,
    })
}

fn migration_failed(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("migration: {e}"))
}

impl Store {
    /// Every embedded migration, oldest first, and whether this database has applied it.
    pub async fn migration_status(&self) -> Result<Vec<MigrationStatus>, StoreError> {
        Ok(self.run_migrations(Op::Status).await?.status)
    }

    /// The names of the embedded migrations this database has not applied yet, oldest first.
    ///
    /// `serve` on PostgreSQL refuses to start while this is not empty (unless told to
    /// migrate).
    pub async fn pending_migrations(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .migration_status()
            .await?
            .into_iter()
            .filter(|m| !m.applied)
            .map(|m| m.name)
            .collect())
    }

    /// Applies the pending migrations and returns the names of those applied (none if the
    /// database was up to date). Safe to call from several replicas at once on PostgreSQL.
    pub async fn migrate(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.run_migrations(Op::Deploy).await?.applied_now)
    }

    async fn run_migrations(&self, op: Op) -> Result<Outcome, StoreError> {
        match self.db_conn().await? {
            super::DbConn::Sqlite(mut conn) => conn
                .spawn_blocking(move |c| {
                    // One IMMEDIATE transaction around the lot is SQLite's migration lock:
                    // another process migrating the same file waits (busy_timeout) and then
                    // finds nothing pending. Each migration runs in a savepoint inside it.
                    Ok(
                        c.immediate_transaction(|c| run_op(c, &SQLITE_MIGRATIONS, op))
                            .map_err(|e: BoxError| e.to_string()),
                    )
                })
                .await?
                .map_err(migration_failed),
            super::DbConn::Postgres(pooled) => {
                // The pooled connection only proved the server is reachable; migrations get
                // a session of their own so the advisory lock dies with it.
                drop(pooled);
                self.run_postgres_migrations(op).await
            }
        }
    }

    async fn run_postgres_migrations(&self, op: Op) -> Result<Outcome, StoreError> {
        let wait = self.options.acquire_timeout;
        let mut conn = tokio::time::timeout(wait, super::pg_tls::establish(&self.url))
            .await
            .map_err(|_| StoreError::Unavailable(format!("no connection within {wait:?}")))??;

        let deadline = Instant::now() + self.options.migration_lock_timeout;
        loop {
            let locked = super::locks::try_lock_migrations(&mut conn).await?;
            if locked {
                break;
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "another replica held the migration lock for more than {:?}",
                    self.options.migration_lock_timeout
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }

        let joined = tokio::task::spawn_blocking(move || {
            let mut wrapped: AsyncConnectionWrapper<PgConn> = AsyncConnectionWrapper::from(conn);
            let outcome = run_op(&mut wrapped, &POSTGRES_MIGRATIONS, op).map_err(|e| e.to_string());
            (wrapped.into_inner(), outcome)
        })
        .await
        .map_err(migration_failed)?;
        let (mut conn, outcome) = joined;

        let unlocked = super::locks::unlock_migrations(&mut conn).await;
        if let Err(e) = unlocked {
            // Dropping the connection below ends the session, which releases the lock too.
            tracing::warn!(error = %e, "releasing the migration lock failed");
        }
        drop(conn);
        outcome.map_err(migration_failed)
    }
}
