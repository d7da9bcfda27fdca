//! `keyhold backup` and `keyhold restore` on SQLite. (On PostgreSQL: `pg_dump` and
//! `pg_restore`, as the README says.)
//!
//! - **Backup** takes an online, consistent copy while a server writes: `VACUUM INTO` on a
//!   read-only connection copies the database as one read transaction sees it (in WAL mode the
//!   server's writer neither waits for it nor disturbs it), into a temporary file beside the
//!   destination. The copy is checked (`PRAGMA integrity_check`), flushed to disk (`fsync`)
//!   and only then renamed to its name, and the directory flushed: the backup file either is
//!   complete or does not exist.
//! - **Restore** puts a backup into an empty data location (it refuses one that holds a
//!   database) the same way (temporary name, `fsync`, rename), after checking the file's
//!   integrity and that its schema is not newer than this build; then it verifies the audit
//!   chain of the restored database, and removes it again if the chain is broken.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use crate::progress::Progress;
use crate::store::Store;

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The database URL is not a SQLite file.
    #[error("{0}")]
    Usage(String),
    /// The destination exists or the data location is not empty.
    #[error("{0}")]
    Refused(String),
    /// SQLite failed.
    #[error("{path}: {reason}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// File I/O failed.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file is damaged, its schema newer than this build or its audit chain broken.
    #[error("{0}")]
    Invalid(String),
}

fn sqlite_file(database_url: &str) -> Result<PathBuf, BackupError> {
    database_url
        .strip_prefix("sqlite://")
        .filter(|p| !p.is_empty() && *p != ":memory:")
        .map(PathBuf::from)
        .ok_or_else(|| {
            BackupError::Usage(
                "backup and restore work on a SQLite database (sqlite://PATH); on PostgreSQL use \
                 pg_dump and pg_restore (see the README, \"Backup and restore\")"
                    .into(),
            )
        })
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> BackupError + '_ {
    move |e| BackupError::Sqlite {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// A temporary name beside `path`, unique to this process.
fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "keyhold.db".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Flushes `file` and its directory entry, then renames it to `to` and flushes the directory.
fn sync_and_rename(file: &Path, to: &Path) -> Result<(), BackupError> {
    std::fs::File::open(file)
        .and_then(|f| f.sync_all())
        .map_err(io_err(file))?;
    std::fs::rename(file, to).map_err(io_err(to))?;
    let dir = parent_dir(to);
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&dir))?;
    Ok(())
}

fn integrity(conn: &Connection, path: &Path) -> Result<(), BackupError> {
    let verdict: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(sql_err(path))?;
    if verdict != "ok" {
        return Err(BackupError::Invalid(format!(
            "{}: integrity check failed: {verdict}",
            path.display()
        )));
    }
    Ok(())
}

/// What a backup wrote.
#[derive(Clone, Debug)]
pub struct BackupSummary {
    /// The backup file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
}

/// `keyhold backup --to FILE`: an online, consistent copy of the SQLite database.
pub fn backup(database_url: &str, to: &Path) -> Result<BackupSummary, BackupError> {
    let source = sqlite_file(database_url)?;
    if to.exists() {
        return Err(BackupError::Refused(format!(
            "{} exists already; backup never overwrites a file",
            to.display()
        )));
    }
    if !source.exists() {
        return Err(BackupError::Refused(format!(
            "there is no database at {}",
            source.display()
        )));
    }
    let conn = Connection::open_with_flags(&source, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(sql_err(&source))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sql_err(&source))?;
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .map_err(sql_err(&source))?;
    let progress = Progress::start("backup", "pages", u64::try_from(pages).ok());
    let tmp = temp_beside(to);
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let tmp_text = tmp
            .to_str()
            .ok_or_else(|| BackupError::Usage(format!("{} is not a UTF-8 path", tmp.display())))?;
        conn.execute("VACUUM INTO ?1", [tmp_text])
            .map_err(sql_err(&source))?;
        progress.inc(u64::try_from(pages).unwrap_or(0));
        let copy = Connection::open_with_flags(&tmp, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(sql_err(&tmp))?;
        integrity(&copy, &tmp)?;
        drop(copy);
        sync_and_rename(&tmp, to)
    })();
    progress.finish();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let bytes = std::fs::metadata(to).map_err(io_err(to))?.len();
    Ok(BackupSummary {
        path: to.to_owned(),
        bytes,
    })
}

/// What a restore put in place.
#[derive(Clone, Debug)]
pub struct RestoreSummary {
    /// The restored database file.
    pub path: PathBuf,
    /// Audit events verified intact.
    pub audit_events: u64,
}

fn is_empty_location(db: &Path) -> bool {
    let occupied = |p: PathBuf| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false);
    let with = |suffix: &str| PathBuf::from(format!("{}{suffix}", db.display()));
    !occupied(db.to_owned()) && !occupied(with("-wal"))
}

/// `keyhold restore --from FILE`: puts a backup into the empty data location the database
/// URL names and verifies it.
pub async fn restore(database_url: &str, from: &Path) -> Result<RestoreSummary, BackupError> {
    let target = sqlite_file(database_url)?;
    if !is_empty_location(&target) {
        return Err(BackupError::Refused(format!(
            "{} holds a database already; restore only into an empty data location",
            target.display()
        )));
    }
    let from_owned = from.to_owned();
    let target_owned = target.clone();
    tokio::task::spawn_blocking(move || place(&from_owned, &target_owned))
        .await
        .map_err(|e| BackupError::Invalid(e.to_string()))??;
    let checked = async {
        let store = Store::open(database_url)
            .await
            .map_err(|e| BackupError::Invalid(format!("opening the restored database: {e}")))?;
        let chain = store
            .verify_audit_chain()
            .await
            .map_err(|e| BackupError::Invalid(format!("reading the audit chain: {e}")))?;
        match chain.first_broken {
            Some(seq) => Err(BackupError::Invalid(format!(
                "the backup's audit chain is broken at event {seq}; the restore was removed"
            ))),
            None => Ok(chain.intact),
        }
    }
    .await;
    match checked {
        Ok(audit_events) => Ok(RestoreSummary {
            path: target,
            audit_events,
        }),
        Err(e) => {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", target.display()));
            }
            Err(e)
        }
    }
}

/// Checks the backup and copies it into place (temporary name, fsync, rename).
fn place(from: &Path, target: &Path) -> Result<(), BackupError> {
    let conn = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(sql_err(from))?;
    integrity(&conn, from)?;
    let applied: BTreeSet<String> = conn
        .prepare("SELECT version FROM __diesel_schema_migrations")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<_, _>>()
        })
        .map_err(|e| {
            BackupError::Invalid(format!("{}: not a Keyhold database: {e}", from.display()))
        })?;
    crate::dbcopy::check_backup_schema(&applied)
        .map_err(|e| BackupError::Invalid(e.to_string()))?;
    drop(conn);
    let dir = parent_dir(target);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let tmp = temp_beside(target);
    let total = std::fs::metadata(from).map_err(io_err(from))?.len();
    let progress = Progress::start("restore", "bytes", Some(total));
    let copied = std::fs::copy(from, &tmp).map_err(io_err(&tmp));
    if let Ok(n) = copied {
        progress.inc(n);
    }
    progress.finish();
    let placed = copied.and_then(|_| sync_and_rename(&tmp, target));
    if placed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    placed
}

/// `keyhold backup --to FILE`: [`backup`] off the async runtime, with its result line.
pub async fn backup_command(database_url: &str, to: &Path) -> Result<(), BackupError> {
    let (url, to) = (database_url.to_owned(), to.to_owned());
    let summary = tokio::task::spawn_blocking(move || backup(&url, &to))
        .await
        .map_err(|e| BackupError::Invalid(e.to_string()))??;
    println!(
        "backup written: {} ({} bytes)",
        summary.path.display(),
        summary.bytes
    );
    Ok(())
}

/// `keyhold restore --from FILE`: [`restore`], with its result line.
pub async fn restore_command(database_url: &str, from: &Path) -> Result<(), BackupError> {
    let summary = restore(database_url, from).await?;
    println!(
        "restored {} (audit chain intact, {} events)",
        summary.path.display(),
        summary.audit_events
    );
    Ok(())
}
