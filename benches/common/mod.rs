//! What the benches share: running under `cargo bench` only, and running a bench on SQLite
//! and on PostgreSQL (when `KEYHOLD_TEST_DATABASE_URL` names a server the bench may create a
//! database on, dropped afterwards).

// Each bench that includes this module uses a part of it.
#![allow(dead_code)]

pub mod ab;

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs `run` on a multi-threaded runtime when the binary was started by `cargo bench`;
/// `cargo test --benches` runs bench binaries without `--bench`: nothing then.
pub fn main_with<F: std::future::Future<Output = Result<(), BoxError>>>(
    run: impl FnOnce() -> F,
) -> Result<(), BoxError> {
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    match query {
        Some(q) => format!("{scheme}://{authority}/{name}?{q}"),
        None => format!("{scheme}://{authority}/{name}"),
    }
}

/// Runs `bench` on a fresh SQLite file, then on a fresh PostgreSQL database when
/// `KEYHOLD_TEST_DATABASE_URL` is set, and hands each result to `report` with the backend's
/// name.
pub async fn each_backend<R, Fut>(
    mut bench: impl FnMut(String) -> Fut,
    mut report: impl FnMut(&str, &R),
) -> Result<(), BoxError>
where
    Fut: std::future::Future<Output = Result<R, BoxError>>,
{
    let dir = std::env::temp_dir().join(format!("keyhold-bench-{}", uuid::Uuid::now_v7().simple()));
    let sqlite = bench(format!("sqlite://{}", dir.join("keyhold.db").display())).await;
    let _ = std::fs::remove_dir_all(&dir);
    report("SQLite", &sqlite?);

    match std::env::var("KEYHOLD_TEST_DATABASE_URL") {
        Ok(admin_url) if !admin_url.is_empty() => {
            let name = format!("keyhold_bench_{}", uuid::Uuid::now_v7().simple());
            let mut admin = AsyncPgConnection::establish(&admin_url).await?;
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await?;
            let result = bench(with_database(&admin_url, &name)).await;
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await?;
            report("PostgreSQL", &result?);
        }
        _ => println!("\nPostgreSQL: skipped (set KEYHOLD_TEST_DATABASE_URL)"),
    }
    Ok(())
}
