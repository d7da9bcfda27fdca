//! The copy's bookkeeping on the target, and `--rollback`.
//!
//! Before it writes anything, a copy creates the table `keyhold_db_copy` on the target and
//! records in it, in the same transaction, what the target was: whether it had Diesel's
//! migrations table, which migrations it had applied, and the state of its sequences (its app
//! tables were empty, or the copy refuses to start). The table is never copied or
//! validated; `--resume` requires it, a fresh copy refuses a target that has it.
//!
//! `--rollback` undoes the copy from that record: it empties every app table, reverts the
//! migrations the copy applied (their `down.sql`, newest first), drops Diesel's migrations
//! table if the copy created it, puts the sequences back and finally drops the bookkeeping
//! table. Each step can be repeated, so a rollback interrupted at any point is finished by
//! running it again. Run it with no server using the target.

use std::collections::BTreeSet;

use diesel::migration::MigrationSource;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_migrations::MigrationHarness;
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::schema::{self, quote, COPY_TABLE, MIGRATIONS_TABLE, POSTGRES_MIGRATIONS};
use super::{target, DbCopyError};
use crate::store::{PgConn, Timestamp};

/// What the target was before the copy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Before {
    pub(crate) had_migrations_table: bool,
    pub(crate) migrations: Vec<String>,
    /// (sequence, last value if it was ever drawn from, start value)
    pub(crate) sequences: Vec<(String, Option<i64>, i64)>,
}

/// The bookkeeping row.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub(crate) source: String,
    pub(crate) before: Before,
}

async fn has_copy_table(client: &Client) -> Result<bool, DbCopyError> {
    Ok(schema::pg_table_names(client).await?.contains(COPY_TABLE))
}

/// The recorded copy, if the target has one.
pub(crate) async fn load(client: &Client) -> Result<Option<Record>, DbCopyError> {
    if !has_copy_table(client).await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT source, before FROM keyhold_db_copy WHERE id = 1",
            &[],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let before: String = row.get(1);
    let before = serde_json::from_str(&before)
        .map_err(|e| DbCopyError::State(format!("the copy's bookkeeping is unreadable: {e}")))?;
    Ok(Some(Record {
        source: row.get(0),
        before,
    }))
}

async fn sequences(client: &Client) -> Result<Vec<(String, Option<i64>, i64)>, DbCopyError> {
    let rows = client
        .query(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename), last_value, \
             start_value FROM pg_sequences WHERE schemaname = current_schema()",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Records what the target is now, creating the bookkeeping table.
pub(crate) async fn record(client: &mut Client, source: &str) -> Result<(), DbCopyError> {
    let applied = schema::pg_applied(client).await?;
    let before = Before {
        had_migrations_table: applied.is_some(),
        migrations: applied.unwrap_or_default().into_iter().collect(),
        sequences: sequences(client).await?,
    };
    let before = serde_json::to_string(&before)
        .map_err(|e| DbCopyError::State(format!("encoding the bookkeeping: {e}")))?;
    let tx = client.transaction().await?;
    tx.batch_execute(
        "CREATE TABLE keyhold_db_copy (
             id          SMALLINT PRIMARY KEY CHECK (id = 1),
             source      TEXT   NOT NULL,
             started_at  BIGINT NOT NULL,
             before      TEXT   NOT NULL,
             validated_at BIGINT
         )",
    )
    .await?;
    tx.execute(
        "INSERT INTO keyhold_db_copy (id, source, started_at, before) VALUES (1, $1, $2, $3)",
        &[&source, &Timestamp::now().unix_micros(), &before],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Notes that the copy validated.
pub(crate) async fn mark_validated(client: &Client) -> Result<(), DbCopyError> {
    client
        .execute(
            "UPDATE keyhold_db_copy SET validated_at = $1 WHERE id = 1",
            &[&Timestamp::now().unix_micros()],
        )
        .await?;
    Ok(())
}

/// Reverts the migrations applied since `before`, newest first, on a connection of its own.
async fn revert_migrations(url: &str, before: &[String]) -> Result<Vec<String>, DbCopyError> {
    let conn: PgConn = crate::store::pg_tls::establish(url)
        .await
        .map_err(|e| DbCopyError::Target(format!("cannot connect: {e}")))?;
    let before: BTreeSet<String> = before.iter().cloned().collect();
    tokio::task::spawn_blocking(move || {
        let mut wrapped: AsyncConnectionWrapper<PgConn> = AsyncConnectionWrapper::from(conn);
        let fail = |e: Box<dyn std::error::Error + Send + Sync>| {
            DbCopyError::Target(format!("reverting migrations: {e}"))
        };
        let applied: BTreeSet<String> = wrapped
            .applied_migrations()
            .map_err(fail)?
            .iter()
            .map(|v| v.to_string())
            .collect();
        let mut migrations =
            MigrationSource::<diesel::pg::Pg>::migrations(&POSTGRES_MIGRATIONS).map_err(fail)?;
        migrations.sort_by(|a, b| b.name().version().cmp(&a.name().version()));
        let mut reverted = Vec::new();
        for m in &migrations {
            let version = m.name().version().to_string();
            if applied.contains(&version) && !before.contains(&version) {
                wrapped.revert_migration(m.as_ref()).map_err(fail)?;
                reverted.push(m.name().to_string());
            }
        }
        Ok(reverted)
    })
    .await
    .map_err(|e| DbCopyError::Target(e.to_string()))?
}

/// `keyhold db copy --rollback --to URL`.
pub(crate) async fn run(url: &str) -> Result<(), DbCopyError> {
    let mut client = target::connect(url).await?;
    let Some(record) = load(&client).await? else {
        return Err(DbCopyError::State(
            "nothing to roll back: the target has no record of a copy (keyhold_db_copy)".into(),
        ));
    };
    let tables: Vec<String> = schema::pg_table_names(&client)
        .await?
        .into_iter()
        .filter(|t| schema::is_app_table(t))
        .map(|t| quote(&t))
        .collect();
    if !tables.is_empty() {
        client
            .batch_execute(&format!("TRUNCATE {}", tables.join(", ")))
            .await?;
    }
    eprintln!("db copy rollback: emptied {} tables", tables.len());
    for m in revert_migrations(url, &record.before.migrations).await? {
        eprintln!("db copy rollback: reverted migration {m}");
    }
    let tx = client.transaction().await?;
    if !record.before.had_migrations_table {
        tx.batch_execute(&format!("DROP TABLE IF EXISTS {}", quote(MIGRATIONS_TABLE)))
            .await?;
    }
    for (seq, last, start) in &record.before.sequences {
        let exists = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[seq])
            .await?
            .get::<_, bool>(0);
        if !exists {
            continue;
        }
        let (value, called) = match last {
            Some(v) => (*v, true),
            None => (*start, false),
        };
        tx.execute(
            "SELECT setval($1::text::regclass, $2, $3)",
            &[seq, &value, &called],
        )
        .await?;
    }
    tx.batch_execute(&format!("DROP TABLE {}", quote(COPY_TABLE)))
        .await?;
    tx.commit().await?;
    eprintln!("db copy rollback: the target is as it was before the copy");
    Ok(())
}
