//! `keyhold db copy`: moves a SQLite database to PostgreSQL, validates the copy row by row,
//! and can resume an interrupted copy or roll a copy back.
//!
//! # Phases
//!
//! 1. **Check** ([`schema`]): the source (opened read-only, one snapshot for the whole run:
//!    [`source`]) must be exactly at this build's SQLite schema; the target must not have
//!    migrations this build does not know, and its app tables must be empty unless
//!    `--resume`. What the target was before is recorded in the copy's bookkeeping table
//!    ([`rollback`]), in the same transaction that creates it.
//! 2. **Migrate** the target with the project's PostgreSQL migrations (as
//!    `keyhold migrate deploy` does).
//! 3. **Copy** ([`copy`]) every app table, parents before children (foreign keys), in
//!    primary-key order, in batches of `--batch-size` rows, each batch one transaction. The
//!    tables, columns and keys come from the migrated target's `information_schema` and must
//!    match the source's: nothing is listed by hand, so a column a later migration adds is
//!    carried as is. A resumed copy goes on after the largest key each table holds.
//! 4. **Validate** ([`validate`]): per table the row count and SHA-256 over the canonical
//!    encoding of every row ([`value`]), computed on both sides in key order; the first row
//!    that differs fails the copy, naming the table and its key. Then the audit chain is
//!    verified on the target.
//! 5. **Report** ([`report`]): JSON with the tables, counts, digests and durations.
//!
//! The copy carries the source's snapshot at the time the run started: writes a server makes
//! to the source afterwards are not in it (stop the server, or make it read-only, for the
//! final copy; a resumed copy takes a new snapshot, and a row written since below a table's
//! resume point fails validation, which then calls for `--rollback` and a fresh copy).

mod copy;
mod report;
mod rollback;
mod schema;
mod source;
mod target;
mod validate;
mod value;

use std::path::{Path, PathBuf};
use std::time::Instant;

pub use report::{CopyReport, TableReport};

/// What `keyhold db copy` was asked to do.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// The source, `sqlite://PATH` (not needed for `rollback`).
    pub from: Option<String>,
    /// The target, `postgres://…`.
    pub to: String,
    /// Go on with a copy that was interrupted.
    pub resume: bool,
    /// Rows per batch (one target transaction each).
    pub batch_size: usize,
    /// Where to write the JSON report.
    pub report: Option<PathBuf>,
    /// Only validate a finished copy.
    pub validate_only: bool,
    /// Remove what a copy wrote to the target.
    pub rollback: bool,
}

/// The default `--batch-size`.
pub const DEFAULT_BATCH_SIZE: usize = 1000;

/// Why a copy, validation or rollback failed.
#[derive(Debug, thiserror::Error)]
pub enum DbCopyError {
    /// The command line asks for something impossible.
    #[error("{0}")]
    Usage(String),
    /// Reading the SQLite source failed.
    #[error("source: {0}")]
    Source(String),
    /// The PostgreSQL target failed.
    #[error("target: {0}")]
    Target(String),
    /// A schema or schema version does not allow the copy.
    #[error("schema check: {0}")]
    Schema(String),
    /// The target holds rows although the copy needs it empty.
    #[error("the target is not empty: {table} holds {rows} rows (copy into an empty database, or --resume a copy)")]
    NotEmpty {
        /// The table.
        table: String,
        /// Its rows.
        rows: u64,
    },
    /// The state of the target's copy bookkeeping does not allow this command.
    #[error("{0}")]
    State(String),
    /// A value of the source cannot be written to its target column.
    #[error("{table} at key {key}: column {column}: {reason}")]
    Unfit {
        /// The table.
        table: String,
        /// The row's key.
        key: String,
        /// The column.
        column: String,
        /// Why.
        reason: String,
    },
    /// Validation found a difference.
    #[error("validation failed: table {table}, first differing key {key}: {what}")]
    Mismatch {
        /// The table.
        table: String,
        /// The first key where source and target differ.
        key: String,
        /// How they differ.
        what: String,
    },
    /// The audit chain on the target is broken.
    #[error("the audit chain on the target is broken: {0}")]
    AuditChain(String),
    /// Writing the report failed.
    #[error("report {path}: {reason}")]
    Report {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl From<tokio_postgres::Error> for DbCopyError {
    fn from(e: tokio_postgres::Error) -> Self {
        let detail = e
            .as_db_error()
            .map(|d| format!("{}: {}", d.code().code(), d.message()))
            .unwrap_or_else(|| e.to_string());
        DbCopyError::Target(detail)
    }
}

impl From<crate::store::StoreError> for DbCopyError {
    fn from(e: crate::store::StoreError) -> Self {
        DbCopyError::Target(e.to_string())
    }
}

fn sqlite_path(url: &str) -> Result<&Path, DbCopyError> {
    url.strip_prefix("sqlite://")
        .filter(|p| !p.is_empty())
        .map(Path::new)
        .ok_or_else(|| DbCopyError::Usage(format!("--from must be sqlite://PATH, not {url:?}")))
}

fn check_target_url(url: &str) -> Result<(), DbCopyError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(())
    } else {
        Err(DbCopyError::Usage(
            "--to must be a postgres:// URL".to_string(),
        ))
    }
}

/// Runs `keyhold db copy` as `options` say and returns its report (also written to
/// `options.report` when given).
pub async fn run(options: &CopyOptions) -> Result<CopyReport, DbCopyError> {
    check_target_url(&options.to)?;
    let started = Instant::now();
    if options.rollback {
        if options.resume || options.validate_only {
            return Err(DbCopyError::Usage(
                "--rollback goes alone (without --resume or --validate-only)".into(),
            ));
        }
        rollback::run(&options.to).await?;
        let report = CopyReport::rollback(started.elapsed());
        report.write(options.report.as_deref())?;
        return Ok(report);
    }
    if options.resume && options.validate_only {
        return Err(DbCopyError::Usage(
            "--validate-only and --resume exclude each other".into(),
        ));
    }
    if options.batch_size == 0 {
        return Err(DbCopyError::Usage("--batch-size must be at least 1".into()));
    }
    let from = options
        .from
        .as_deref()
        .ok_or_else(|| DbCopyError::Usage("--from sqlite://PATH is required".into()))?;
    let path = sqlite_path(from)?;
    let source = source::Source::open(path).await?;
    schema::check_source_version(&source.applied().await?)?;
    let mut client = target::connect(&options.to).await?;
    let mut report = CopyReport::new(from);

    if !options.validate_only {
        let check_started = Instant::now();
        let before = rollback::load(&client).await?;
        match (options.resume, before) {
            (false, Some(_)) => {
                return Err(DbCopyError::State(
                    "the target holds a copy already (interrupted or finished): --resume it, \
                     or remove it with --rollback"
                        .into(),
                ))
            }
            (true, None) => {
                return Err(DbCopyError::State(
                    "there is no copy to resume on the target (its bookkeeping table is absent)"
                        .into(),
                ))
            }
            (true, Some(record)) => {
                if record.source != from {
                    return Err(DbCopyError::State(format!(
                        "the interrupted copy came from {}, not {from}",
                        record.source
                    )));
                }
            }
            (false, None) => {
                let applied = schema::pg_applied(&client).await?;
                if let Some(applied) = &applied {
                    schema::check_target_version(applied)?;
                }
                for table in schema::pg_table_names(&client).await? {
                    if schema::is_app_table(&table) {
                        let rows = target::count(&client, &table).await?;
                        if rows > 0 {
                            return Err(DbCopyError::NotEmpty { table, rows });
                        }
                    }
                }
                rollback::record(&mut client, from).await?;
            }
        }
        report.phase("check", check_started.elapsed());

        let migrate_started = Instant::now();
        let store = crate::store::Store::open_with(
            &options.to,
            crate::store::StoreOptions {
                max_connections: 2,
                ..Default::default()
            },
        )
        .await?;
        let applied = store.migrate().await?;
        for m in &applied {
            eprintln!("db copy: applied migration {m}");
        }
        report.phase("migrate", migrate_started.elapsed());
    }

    let tables = schema::target_tables(&client).await?;
    source.check_tables(&tables).await?;

    if !options.validate_only {
        let copy_started = Instant::now();
        for table in &tables {
            let outcome = copy::table(&source, &mut client, table, options.batch_size).await?;
            report.copied(&table.name, outcome);
        }
        report.phase("copy", copy_started.elapsed());
    }

    let validate_started = Instant::now();
    for table in &tables {
        let outcome = validate::table(&source, &mut client, table, options.batch_size).await?;
        report.validated(&table.name, outcome);
    }
    let store = crate::store::Store::open_with(
        &options.to,
        crate::store::StoreOptions {
            max_connections: 2,
            ..Default::default()
        },
    )
    .await?;
    let chain = store.verify_audit_chain().await?;
    if let Some(broken) = chain.first_broken {
        return Err(DbCopyError::AuditChain(format!(
            "first broken event: seq {broken} ({} intact before it)",
            chain.intact
        )));
    }
    report.audit_chain(chain.intact, chain.head.map(|(_, h)| hex::encode(h)));
    report.phase("validate", validate_started.elapsed());
    if !options.validate_only {
        rollback::mark_validated(&client).await?;
    }
    report.finish(started.elapsed());
    report.write(options.report.as_deref())?;
    eprintln!("{}", report.summary_line());
    Ok(report)
}

/// Refuses a SQLite backup whose schema has migrations this build does not know (an older
/// one is fine: the server migrates it when it starts).
pub(crate) fn check_backup_schema(
    applied: &std::collections::BTreeSet<String>,
) -> Result<(), DbCopyError> {
    schema::check_sqlite_known(applied)
}
