//! The check phase: schema versions on both sides, and the tables, columns and primary keys
//! the copy moves, read from the target's `information_schema` after its migration (never a
//! hand-kept list, so a column a new migration adds is carried without a change here).

use std::collections::{BTreeMap, BTreeSet};

use diesel::migration::MigrationSource;
use diesel_migrations::{embed_migrations, EmbeddedMigrations};
use tokio_postgres::Client;

use super::value::ColType;
use super::DbCopyError;

/// The SQLite migrations, to check the source is fully migrated.
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
/// The PostgreSQL migrations, to check and roll back the target.
pub(crate) const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Diesel's bookkeeping table of applied migrations (both backends).
pub(crate) const MIGRATIONS_TABLE: &str = "__diesel_schema_migrations";
/// The copy's own bookkeeping table on the target (`rollback.rs`), never copied or validated.
pub(crate) const COPY_TABLE: &str = "keyhold_db_copy";

/// One column of an app table.
#[derive(Clone, Debug)]
pub(crate) struct Column {
    pub(crate) name: String,
    pub(crate) ty: ColType,
}

/// One app table as the target's schema has it.
#[derive(Clone, Debug)]
pub(crate) struct Table {
    pub(crate) name: String,
    /// In the target's column order, which the canonical row encoding follows.
    pub(crate) columns: Vec<Column>,
    /// Indexes into `columns` of the primary key, in key order.
    pub(crate) key: Vec<usize>,
}

impl Table {
    pub(crate) fn key_names(&self) -> Vec<String> {
        self.key
            .iter()
            .map(|&i| self.columns[i].name.clone())
            .collect()
    }

    /// `"a", "b", …`: every column, quoted, in order.
    pub(crate) fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// An SQL identifier, quoted.
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The versions of the embedded migrations of a backend, oldest first.
fn embedded_versions<DB: diesel::backend::Backend>(
    source: &EmbeddedMigrations,
) -> Result<Vec<String>, DbCopyError>
where
    EmbeddedMigrations: MigrationSource<DB>,
{
    let mut versions: Vec<String> = MigrationSource::<DB>::migrations(source)
        .map_err(|e| DbCopyError::Schema(format!("embedded migrations: {e}")))?
        .iter()
        .map(|m| m.name().version().to_string())
        .collect();
    versions.sort();
    Ok(versions)
}

pub(crate) fn postgres_versions() -> Result<Vec<String>, DbCopyError> {
    embedded_versions::<diesel::pg::Pg>(&POSTGRES_MIGRATIONS)
}

/// Refuses a source that is not exactly at this build's SQLite schema.
pub(crate) fn check_source_version(applied: &BTreeSet<String>) -> Result<(), DbCopyError> {
    let known = embedded_versions::<diesel::sqlite::Sqlite>(&SQLITE_MIGRATIONS)?;
    let pending: Vec<&String> = known.iter().filter(|v| !applied.contains(*v)).collect();
    if !pending.is_empty() {
        return Err(DbCopyError::Schema(format!(
            "the source is not fully migrated (pending: {pending:?}); run `keyhold migrate deploy` \
             against it (or start the server once) and copy again"
        )));
    }
    let unknown: Vec<&String> = applied.iter().filter(|v| !known.contains(v)).collect();
    if !unknown.is_empty() {
        return Err(DbCopyError::Schema(format!(
            "the source has migrations this keyhold does not know (a newer version wrote it): {unknown:?}"
        )));
    }
    Ok(())
}

/// Refuses a SQLite database with migrations this build does not know.
pub(crate) fn check_sqlite_known(applied: &BTreeSet<String>) -> Result<(), DbCopyError> {
    let known = embedded_versions::<diesel::sqlite::Sqlite>(&SQLITE_MIGRATIONS)?;
    let unknown: Vec<&String> = applied.iter().filter(|v| !known.contains(v)).collect();
    if !unknown.is_empty() {
        return Err(DbCopyError::Schema(format!(
            "the database has migrations this keyhold does not know (a newer version wrote it): {unknown:?}"
        )));
    }
    Ok(())
}

/// Refuses a target that has migrations this build does not know.
pub(crate) fn check_target_version(applied: &BTreeSet<String>) -> Result<(), DbCopyError> {
    let known = postgres_versions()?;
    let unknown: Vec<&String> = applied.iter().filter(|v| !known.contains(v)).collect();
    if !unknown.is_empty() {
        return Err(DbCopyError::Schema(format!(
            "the target has migrations this keyhold does not know (a newer version wrote it): {unknown:?}"
        )));
    }
    Ok(())
}

/// The base tables of the target's current schema.
pub(crate) async fn pg_table_names(client: &Client) -> Result<BTreeSet<String>, DbCopyError> {
    let rows = client
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// The applied migration versions of the target, or `None` when it has no migrations table.
pub(crate) async fn pg_applied(client: &Client) -> Result<Option<BTreeSet<String>>, DbCopyError> {
    if !pg_table_names(client).await?.contains(MIGRATIONS_TABLE) {
        return Ok(None);
    }
    let rows = client
        .query("SELECT version::text FROM __diesel_schema_migrations", &[])
        .await?;
    Ok(Some(rows.iter().map(|r| r.get::<_, String>(0)).collect()))
}

/// Whether a table is one the copy moves (not a bookkeeping table).
pub(crate) fn is_app_table(name: &str) -> bool {
    name != MIGRATIONS_TABLE && name != COPY_TABLE
}

/// The app tables of the migrated target, parents before the tables whose foreign keys
/// reference them (so each batch's rows find their parents already copied).
pub(crate) async fn target_tables(client: &Client) -> Result<Vec<Table>, DbCopyError> {
    let names: Vec<String> = pg_table_names(client)
        .await?
        .into_iter()
        .filter(|n| is_app_table(n))
        .collect();
    let mut tables = BTreeMap::new();
    for name in &names {
        let cols = client
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = $1 \
                 ORDER BY ordinal_position",
                &[name],
            )
            .await?;
        let mut columns = Vec::with_capacity(cols.len());
        for c in &cols {
            let column: String = c.get(0);
            let data_type: String = c.get(1);
            let ty = ColType::from_information_schema(&data_type).ok_or_else(|| {
                DbCopyError::Schema(format!(
                    "{name}.{column}: the copy cannot carry the type {data_type}"
                ))
            })?;
            columns.push(Column { name: column, ty });
        }
        let keys = client
            .query(
                "SELECT k.column_name::text FROM information_schema.table_constraints t \
                 JOIN information_schema.key_column_usage k \
                   ON k.constraint_name = t.constraint_name AND k.table_schema = t.table_schema \
                  AND k.table_name = t.table_name \
                 WHERE t.table_schema = current_schema() AND t.table_name = $1 \
                   AND t.constraint_type = 'PRIMARY KEY' ORDER BY k.ordinal_position",
                &[name],
            )
            .await?;
        let mut key = Vec::new();
        for k in &keys {
            let column: String = k.get(0);
            let at = columns
                .iter()
                .position(|c| c.name == column)
                .ok_or_else(|| {
                    DbCopyError::Schema(format!(
                        "{name}: key column {column} not among its columns"
                    ))
                })?;
            key.push(at);
        }
        if key.is_empty() {
            return Err(DbCopyError::Schema(format!(
                "{name} has no primary key: the copy needs one to order and resume it"
            )));
        }
        tables.insert(
            name.clone(),
            Table {
                name: name.clone(),
                columns,
                key,
            },
        );
    }
    let edges = client
        .query(
            "SELECT c.relname::text, p.relname::text FROM pg_constraint f \
             JOIN pg_class c ON c.oid = f.conrelid JOIN pg_class p ON p.oid = f.confrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE f.contype = 'f' AND n.nspname = current_schema()",
            &[],
        )
        .await?;
    let mut parents: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in &edges {
        let (child, parent): (String, String) = (e.get(0), e.get(1));
        if child != parent {
            parents.entry(child).or_default().insert(parent);
        }
    }
    // Kahn's algorithm, alphabetical among the ready ones so the order is stable.
    let mut ordered = Vec::with_capacity(tables.len());
    let mut done = BTreeSet::new();
    while done.len() < tables.len() {
        let ready: Vec<String> = tables
            .keys()
            .filter(|n| !done.contains(*n))
            .filter(|n| {
                parents.get(*n).is_none_or(|ps| {
                    ps.iter()
                        .all(|p| done.contains(p) || !tables.contains_key(p))
                })
            })
            .cloned()
            .collect();
        if ready.is_empty() {
            return Err(DbCopyError::Schema(
                "the target's foreign keys form a cycle; the copy cannot order its tables".into(),
            ));
        }
        for n in ready {
            done.insert(n.clone());
            if let Some(t) = tables.get(&n) {
                ordered.push(t.clone());
            }
        }
    }
    Ok(ordered)
}
