//! Transactions: the [`Tx`] a [`super::Store::transaction`] closure works on, BEGIN, COMMIT
//! and ROLLBACK on either backend, and what becomes of a transaction dropped before it ended.

use std::fmt;
use std::time::Duration;

use diesel_async::pooled_connection::deadpool::Object;
use diesel_async::sync_connection_wrapper::SyncTransactionManagerWrapper;
use diesel_async::{AsyncConnection, TransactionManager};

use super::{db_run, Conn, DbConn, PgConn, StoreError};

/// An open transaction, handed to the closure given to [`Store::transaction`].
///
/// Each record module adds the methods that need a transaction; all of them commit or roll
/// back together. Through `Deref` the [`Conn`] queries run in it as well.
///
/// A transaction dropped before it ended (its call's deadline passed, or its client went
/// away, while a statement ran) never commits, and does not go back to the pool as it is: it
/// is rolled back on a task of its own and its connection returned clean, or, when it was
/// dropped in the middle of BEGIN or COMMIT on PostgreSQL (what the server did is then
/// unknown), its connection is closed, which rolls back whatever was open.
/// [`DB_TRANSACTIONS_ABANDONED`] counts both.
pub struct Tx {
    /// `Some` until the transaction is dropped (its `Drop` takes the connection).
    conn: Option<Conn>,
    stage: TxStage,
}

/// How far a [`Tx`] has gone, which says what its connection needs if it is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TxStage {
    /// BEGIN is running.
    Beginning,
    /// Begun: the caller's statements run.
    Open,
    /// COMMIT or ROLLBACK is running.
    Ending,
    /// Committed or rolled back, or failed trying (the pool's checkout check then discards a
    /// connection left in a transaction).
    Ended,
}

/// Counter: transactions dropped before they ended, by `outcome`: `rolled_back` (the
/// connection went back to the pool clean) or `closed`.
pub(crate) const DB_TRANSACTIONS_ABANDONED: &str = "keyhold_db_transactions_abandoned_total";

/// How long the rollback of an abandoned transaction may wait (behind the statement that was
/// running, on PostgreSQL) before its connection is closed instead.
const ABANDONED_ROLLBACK_WAIT: Duration = Duration::from_secs(60);

impl Tx {
    /// A transaction about to begin on `conn`.
    pub(super) fn new(conn: Conn) -> Tx {
        Tx {
            conn: Some(conn),
            stage: TxStage::Beginning,
        }
    }
}

impl fmt::Debug for Tx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tx")
    }
}

impl std::ops::Deref for Tx {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        match &self.conn {
            Some(conn) => conn,
            // cannot fail: only `Drop` takes the connection, and nothing runs after it.
            None => unreachable!("a transaction's connection is taken only when it drops"),
        }
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut Conn {
        match &mut self.conn {
            Some(conn) => conn,
            // cannot fail: only `Drop` takes the connection, and nothing runs after it.
            None => unreachable!("a transaction's connection is taken only when it drops"),
        }
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        // While unwinding, leave the connection to the pool's own check (deadpool discards a
        // connection returned during a panic).
        if self.stage == TxStage::Ended || std::thread::panicking() {
            return;
        }
        if let Some(conn) = self.conn.take() {
            abandon(conn.db, self.stage);
        }
    }
}

/// Takes care of the connection of a transaction dropped at `stage`: see [`Tx`].
fn abandon(db: DbConn, stage: TxStage) {
    match db {
        // diesel-async cannot know what the server did with a BEGIN or COMMIT whose answer
        // was never read (it marks the connection broken); closing it is the safe end.
        DbConn::Postgres(_) if stage != TxStage::Open => close_abandoned(db),
        // SQLite's statement has finished (diesel-async waits for it when its future drops),
        // so the connection's state is known on either stage.
        db => match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(roll_back_abandoned(db));
            }
            // No runtime left (the process is ending): the pool's checkout check discards
            // the connection if it is still in a transaction.
            Err(_) => drop(db),
        },
    }
}

/// Rolls back an abandoned transaction and returns its connection to the pool clean, or
/// closes it when that fails.
async fn roll_back_abandoned(mut db: DbConn) {
    let rolled_back = !db.in_transaction()
        || matches!(
            tokio::time::timeout(ABANDONED_ROLLBACK_WAIT, end_transaction(&mut db, false)).await,
            Ok(Ok(()))
        ) && !db.in_transaction();
    if rolled_back {
        metrics::counter!(DB_TRANSACTIONS_ABANDONED, "outcome" => "rolled_back").increment(1);
        tracing::debug!("rolled back a transaction its call abandoned");
    } else {
        close_abandoned(db);
    }
}

/// Closes the connection of an abandoned transaction instead of returning it to the pool
/// (which opens a new one when needed); the database rolls back whatever it left open.
fn close_abandoned(db: DbConn) {
    metrics::counter!(DB_TRANSACTIONS_ABANDONED, "outcome" => "closed").increment(1);
    tracing::debug!("closed the connection of a transaction its call abandoned");
    match db {
        DbConn::Sqlite(conn) => drop(Object::take(conn)),
        DbConn::Postgres(conn) => drop(Object::take(conn)),
    }
}

impl DbConn {
    /// Whether the connection is in a transaction, or in a state the pool would not hand out
    /// (diesel-async's `is_broken`, which the pool checks at every checkout).
    fn in_transaction(&mut self) -> bool {
        use diesel_async::pooled_connection::PoolableConnection;
        match self {
            DbConn::Sqlite(conn) => conn.is_broken(),
            DbConn::Postgres(conn) => conn.is_broken(),
        }
    }
}

impl Tx {
    /// BEGIN (`postgres_begin` on PostgreSQL when given).
    pub(super) async fn begin(&mut self, postgres_begin: Option<&str>) -> Result<(), StoreError> {
        let begun = begin_transaction(&mut self.db, postgres_begin).await;
        self.stage = match begun {
            Ok(()) => TxStage::Open,
            Err(_) => TxStage::Ended,
        };
        begun
    }

    /// COMMIT when `commit`, otherwise ROLLBACK.
    pub(super) async fn end(&mut self, commit: bool) -> Result<(), StoreError> {
        self.stage = TxStage::Ending;
        let ended = end_transaction(&mut self.db, commit).await;
        self.stage = TxStage::Ended;
        ended
    }

    /// Commits when `result` is `Ok`, rolls back otherwise, and hands `result` on.
    pub(super) async fn finish<R, E>(mut self, result: Result<R, E>) -> Result<R, E>
    where
        E: From<StoreError> + fmt::Display,
    {
        match result {
            Ok(value) => {
                self.end(true).await?;
                Ok(value)
            }
            Err(e) => {
                if let Err(rollback) = self.end(false).await {
                    // The pool discards a connection whose transaction state is broken.
                    tracing::warn!(error = %rollback, "rollback failed after {e}");
                }
                Err(e)
            }
        }
    }
}

async fn begin_transaction(
    conn: &mut DbConn,
    postgres_begin: Option<&str>,
) -> Result<(), StoreError> {
    db_run!(conn: sqlite {
        // Take the write lock now, not at the first write, so that a read-then-write
        // transaction never fails on lock upgrade; a busy database is waited for.
        conn.spawn_blocking(|c| {
            diesel::connection::AnsiTransactionManager::begin_transaction_sql(
                c,
                "BEGIN IMMEDIATE",
            )
        })
        .await?;
    } postgres {
        match postgres_begin {
            Some(sql) => {
                diesel_async::AnsiTransactionManager::begin_transaction_sql(conn, sql).await?
            }
            None => {
                <PgConn as AsyncConnection>::TransactionManager::begin_transaction(conn).await?
            }
        }
    });
    Ok(())
}

/// COMMIT when `commit`, otherwise ROLLBACK, of the transaction open on `conn`.
async fn end_transaction(conn: &mut DbConn, commit: bool) -> Result<(), StoreError> {
    db_run!(conn: sqlite {
        type Manager =
            SyncTransactionManagerWrapper<diesel::connection::AnsiTransactionManager>;
        match commit {
            true => Manager::commit_transaction(conn).await?,
            false => Manager::rollback_transaction(conn).await?,
        }
    } postgres {
        type Manager = <PgConn as AsyncConnection>::TransactionManager;
        match commit {
            true => Manager::commit_transaction(conn).await?,
            false => Manager::rollback_transaction(conn).await?,
        }
    });
    Ok(())
}
