//! The SQLite source, opened read-only: one connection holding one read transaction for the
//! whole run, so every table is copied and validated from the same snapshot while a server
//! keeps writing to the file (WAL readers never block its writer, nor it them).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::mpsc;

use super::schema::{quote, Table, MIGRATIONS_TABLE};
use super::value::Value;
use super::DbCopyError;

/// Rows of one table, in key order, a batch at a time.
pub(crate) type Batches = mpsc::Receiver<Result<Vec<Vec<Value>>, DbCopyError>>;

/// The read-only source database.
#[derive(Clone)]
pub(crate) struct Source {
    conn: Arc<Mutex<Connection>>,
}

fn source_err(e: rusqlite::Error) -> DbCopyError {
    DbCopyError::Source(e.to_string())
}

impl Source {
    /// Opens `path` read-only and starts the snapshot.
    pub(crate) async fn open(path: &Path) -> Result<Source, DbCopyError> {
        let path = path.to_owned();
        let conn = tokio::task::spawn_blocking(move || {
            if !path.exists() {
                return Err(DbCopyError::Source(format!(
                    "{} does not exist",
                    path.display()
                )));
            }
            let conn = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(source_err)?;
            conn.busy_timeout(std::time::Duration::from_secs(5))
                .map_err(source_err)?;
            // A deferred transaction takes its snapshot at its first read.
            conn.execute_batch("BEGIN; SELECT count(*) FROM sqlite_master;")
                .map_err(source_err)?;
            Ok(conn)
        })
        .await
        .map_err(|e| DbCopyError::Source(e.to_string()))??;
        Ok(Source {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, DbCopyError> + Send + 'static,
    ) -> Result<T, DbCopyError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let guard = conn
                .lock()
                .map_err(|_| DbCopyError::Source("the source connection was poisoned".into()))?;
            f(&guard)
        })
        .await
        .map_err(|e| DbCopyError::Source(e.to_string()))?
    }

    /// The applied migration versions.
    pub(crate) async fn applied(&self) -> Result<BTreeSet<String>, DbCopyError> {
        self.with(|c| {
            let mut stmt = c
                .prepare("SELECT version FROM __diesel_schema_migrations")
                .map_err(|e| {
                    DbCopyError::Schema(format!("the source has no migrations table: {e}"))
                })?;
            let versions = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(source_err)?
                .collect::<Result<BTreeSet<_>, _>>()
                .map_err(source_err)?;
            Ok(versions)
        })
        .await
    }

    /// Refuses a source whose tables, columns or primary keys differ from the target's.
    pub(crate) async fn check_tables(&self, tables: &[Table]) -> Result<(), DbCopyError> {
        let tables = tables.to_vec();
        self.with(move |c| {
            let mut stmt = c
                .prepare(
                    "SELECT name FROM sqlite_master WHERE type = 'table' \
                     AND name NOT LIKE 'sqlite_%'",
                )
                .map_err(source_err)?;
            let names: BTreeSet<String> = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(source_err)?
                .collect::<Result<_, _>>()
                .map_err(source_err)?;
            for name in &names {
                if name != MIGRATIONS_TABLE && !tables.iter().any(|t| &t.name == name) {
                    return Err(DbCopyError::Schema(format!(
                        "the source table {name} has no counterpart in the target's schema"
                    )));
                }
            }
            for t in &tables {
                if !names.contains(&t.name) {
                    return Err(DbCopyError::Schema(format!(
                        "the target table {} is missing from the source",
                        t.name
                    )));
                }
                let mut info = c
                    .prepare(&format!("PRAGMA table_info({})", quote(&t.name)))
                    .map_err(source_err)?;
                let cols: Vec<(String, i64)> = info
                    .query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, i64>(5)?)))
                    .map_err(source_err)?
                    .collect::<Result<_, _>>()
                    .map_err(source_err)?;
                let have: BTreeSet<&str> = cols.iter().map(|(n, _)| n.as_str()).collect();
                let want: BTreeSet<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
                if have != want {
                    return Err(DbCopyError::Schema(format!(
                        "{}: the source's columns {have:?} differ from the target's {want:?}",
                        t.name
                    )));
                }
                let mut key: Vec<(i64, &str)> = cols
                    .iter()
                    .filter(|(_, pk)| *pk > 0)
                    .map(|(n, pk)| (*pk, n.as_str()))
                    .collect();
                key.sort();
                let key: Vec<&str> = key.into_iter().map(|(_, n)| n).collect();
                let want_key = t.key_names();
                if key != want_key.iter().map(String::as_str).collect::<Vec<_>>() {
                    return Err(DbCopyError::Schema(format!(
                        "{}: the source's primary key {key:?} differs from the target's {want_key:?}",
                        t.name
                    )));
                }
            }
            Ok(())
        })
        .await
    }

    /// How many rows `table` has.
    pub(crate) async fn count(&self, table: &Table) -> Result<u64, DbCopyError> {
        let sql = format!("SELECT count(*) FROM {}", quote(&table.name));
        self.with(move |c| {
            let n: i64 = c.query_row(&sql, [], |r| r.get(0)).map_err(source_err)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    /// Streams the rows of `table` after `after` (a key; `None`: from the start) in key
    /// order, `batch` rows at a time, reading ahead of the consumer by a batch or two.
    pub(crate) fn rows_after(
        &self,
        table: &Table,
        after: Option<Vec<Value>>,
        batch: usize,
    ) -> Batches {
        let key: Vec<String> = table.key_names().iter().map(|k| quote(k)).collect();
        let mut sql = format!("SELECT {} FROM {}", table.column_list(), quote(&table.name));
        if after.is_some() {
            let marks: Vec<String> = (1..=key.len()).map(|i| format!("?{i}")).collect();
            sql.push_str(&format!(
                " WHERE ({}) > ({})",
                key.join(", "),
                marks.join(", ")
            ));
        }
        sql.push_str(&format!(" ORDER BY {}", key.join(", ")));
        let width = table.columns.len();
        let (tx, rx) = mpsc::channel(2);
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let run = || -> Result<(), DbCopyError> {
                let guard = conn.lock().map_err(|_| {
                    DbCopyError::Source("the source connection was poisoned".into())
                })?;
                let mut stmt = guard.prepare(&sql).map_err(source_err)?;
                let params = after.unwrap_or_default();
                let mut rows = stmt
                    .query(rusqlite::params_from_iter(params.iter()))
                    .map_err(source_err)?;
                let mut out = Vec::with_capacity(batch);
                while let Some(row) = rows.next().map_err(source_err)? {
                    let mut values = Vec::with_capacity(width);
                    for i in 0..width {
                        let v = row.get_ref(i).map_err(source_err)?;
                        values.push(Value::from_sqlite(v).map_err(DbCopyError::Source)?);
                    }
                    out.push(values);
                    if out.len() == batch {
                        let full = std::mem::replace(&mut out, Vec::with_capacity(batch));
                        if tx.blocking_send(Ok(full)).is_err() {
                            return Ok(());
                        }
                    }
                }
                if !out.is_empty() {
                    let _ = tx.blocking_send(Ok(out));
                }
                Ok(())
            };
            if let Err(e) = run() {
                let _ = tx.blocking_send(Err(e));
            }
        });
        rx
    }
}
