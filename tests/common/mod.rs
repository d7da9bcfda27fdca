//! Helpers shared by the integration tests: a fresh database per test, on either backend.
//!
//! - SQLite: a file in a new temporary directory, removed when the [`TestDb`] drops.
//! - PostgreSQL: a new database `keyhold_test_<uuid>` created through the admin URL in
//!   `KEYHOLD_TEST_DATABASE_URL` and dropped (`WITH (FORCE)`) when the [`TestDb`] drops, so
//!   tests run in parallel without seeing each other. Without that variable the PostgreSQL
//!   half of a test is skipped with a notice, unless `CI` is set, in which case it fails.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;

use diesel::connection::SimpleConnection;
use diesel::Connection;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};

/// The variable naming the PostgreSQL server the tests may create databases on.
pub const PG_URL_VAR: &str = "KEYHOLD_TEST_DATABASE_URL";

/// Which backend a [`TestDb`] is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

/// A database of its own for one test, removed on drop.
pub struct TestDb {
    /// The URL to hand to `Store::open`.
    pub url: String,
    /// Its backend.
    pub kind: Kind,
    cleanup: Cleanup,
}

enum Cleanup {
    Dir(PathBuf),
    PgDatabase { admin_url: String, name: String },
}

/// A fresh SQLite database file in a new temporary directory.
pub fn sqlite_db() -> TestDb {
    let dir = std::env::temp_dir().join(format!("keyhold-test-{}", uuid::Uuid::now_v7().simple()));
    // The store creates the directory itself; the file does not exist yet.
    let url = format!("sqlite://{}", dir.join("keyhold.db").display());
    TestDb {
        url,
        kind: Kind::Sqlite,
        cleanup: Cleanup::Dir(dir),
    }
}

/// A fresh SQLite database file in `dir` (created by the store), which is removed with the
/// [`TestDb`]: for a test that puts the database on a file system of its own.
pub fn sqlite_db_in(dir: PathBuf) -> TestDb {
    let url = format!("sqlite://{}", dir.join("keyhold.db").display());
    TestDb {
        url,
        kind: Kind::Sqlite,
        cleanup: Cleanup::Dir(dir),
    }
}

/// The admin URL for PostgreSQL tests, or `None` (after a printed notice) to skip them.
///
/// Panics when the variable is unset and `CI` is set: CI must not pass by skipping.
pub fn postgres_admin_url() -> Option<String> {
    match std::env::var(PG_URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{PG_URL_VAR} is not set, and CI is: the PostgreSQL tests must run in CI")
        }
        _ => {
            eprintln!("note: {PG_URL_VAR} is not set; skipping the PostgreSQL half of this test");
            None
        }
    }
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let mut out = format!("{scheme}://{authority}/{name}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A fresh PostgreSQL database, or `None` when PostgreSQL tests are skipped.
pub async fn postgres_db() -> Option<TestDb> {
    let admin_url = postgres_admin_url()?;
    let name = format!("keyhold_test_{}", uuid::Uuid::now_v7().simple());
    let mut admin = AsyncPgConnection::establish(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {PG_URL_VAR}: {e}"));
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create the test database");
    Some(TestDb {
        url: with_database(&admin_url, &name),
        kind: Kind::Postgres,
        cleanup: Cleanup::PgDatabase { admin_url, name },
    })
}

impl TestDb {
    /// Runs SQL on the database behind the store's back (to tamper with rows, for example).
    pub async fn execute_raw(&self, sql: &str) {
        match self.kind {
            Kind::Sqlite => {
                let path = self.url.trim_start_matches("sqlite://");
                let mut conn = diesel::SqliteConnection::establish(path).expect("open SQLite");
                conn.batch_execute(sql).expect("raw SQL on SQLite");
            }
            Kind::Postgres => {
                let mut conn = AsyncPgConnection::establish(&self.url)
                    .await
                    .expect("connect");
                conn.batch_execute(sql)
                    .await
                    .expect("raw SQL on PostgreSQL");
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::Dir(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::PgDatabase { admin_url, name } => {
                // Drop runs outside any async context we could await in, so the cleanup gets
                // a thread and a small runtime of its own. FORCE ends the store's sessions.
                let (admin_url, db) = (admin_url.clone(), name.clone());
                let dropped = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    rt.block_on(async {
                        let mut admin = AsyncPgConnection::establish(&admin_url)
                            .await
                            .map_err(|e| e.to_string())?;
                        admin
                            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                            .await
                            .map_err(|e| e.to_string())
                    })
                })
                .join();
                if !matches!(dropped, Ok(Ok(()))) {
                    eprintln!("warning: could not drop test database {name}: {dropped:?}");
                }
            }
        }
    }
}
pub mod callers;
pub mod cli;
pub mod held;
pub mod leaks;
pub mod limits;
pub mod low_order;
pub mod pki;
pub mod raw;
pub mod raw_db;
pub mod requests;
pub mod server;
pub mod world;
