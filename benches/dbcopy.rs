//! `keyhold db copy` throughput: rows/s copying N messages from SQLite to PostgreSQL, against
//! a plain read-and-write of the same rows in the same run.
//!
//! Run: `KEYHOLD_TEST_DATABASE_URL=postgres://… cargo bench --bench dbcopy` (the bench creates
//! its databases on that server and drops them afterwards). N is 100 000 messages of 256
//! bytes of ciphertext; `KEYHOLD_BENCH_DBCOPY_ROWS=1000000` for the 1M figure.
//!
//! - **reference**: read the messages from SQLite in key order (rusqlite) and write them to a
//!   migrated PostgreSQL database with multi-row `INSERT`s of 1000 rows, one transaction
//!   each: no digest, no validation, no bookkeeping.
//! - **db copy**: `keyhold::dbcopy::run` with `--batch-size 1000` into an empty database:
//!   the check, the migration, the copy (binary `COPY`, one transaction per batch) and the
//!   full validation (both sides read again, every row encoded and hashed with SHA-256).
//!
//! Each is timed wall-clock, and the CPU time (user + system, `/proc`) of this process and of
//! the PostgreSQL server processes on the machine is taken per row; the PostgreSQL server's
//! CPU is read as the sum over all `postgres` processes (the postmaster's count includes its
//! ended backends), so it includes other clients' load: run it on a quiet machine.

use std::time::Instant;

use keyhold::dbcopy::{run, CopyOptions};
use keyhold::store::Store;
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

fn ticks_per_second() -> f64 {
    100.0
}

/// user + system CPU seconds of a process, from /proc/<pid>/stat (with `children`, also
/// those of its exited and reaped children: the postmaster's count the ended backends').
fn cpu_of(pid: &str, children: bool) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let stime: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let reaped: f64 = if children {
        f[13..15.min(f.len())]
            .iter()
            .filter_map(|v| v.parse::<f64>().ok())
            .sum()
    } else {
        0.0
    };
    (utime + stime + reaped) / ticks_per_second()
}

/// CPU seconds of every `postgres` process.
fn postgres_cpu() -> f64 {
    let mut total = 0.0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let comm = std::fs::read_to_string(format!("/proc/{name}/comm")).unwrap_or_default();
            if comm.trim() == "postgres" {
                total += cpu_of(&name, true);
            }
        }
    }
    total
}

struct Measured {
    seconds: f64,
    own_cpu: f64,
    pg_cpu: f64,
}

async fn measure<F: std::future::Future<Output = ()>>(f: F) -> Measured {
    let (c0, p0, t0) = (cpu_of("self", false), postgres_cpu(), Instant::now());
    f.await;
    Measured {
        seconds: t0.elapsed().as_secs_f64(),
        own_cpu: cpu_of("self", false) - c0,
        pg_cpu: postgres_cpu() - p0,
    }
}

fn with_database(admin: &str, name: &str) -> String {
    match admin.rfind('/') {
        Some(i) if admin[..i].contains("://") && admin[..i].ends_with(|c: char| c != '/') => {
            let (base, rest) = admin.split_at(i);
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{base}/{name}{query}")
        }
        _ => format!("{admin}/{name}"),
    }
}

fn fill_source(path: &std::path::Path, rows: usize) {
    let mut conn = rusqlite::Connection::open(path).expect("open source");
    let tx = conn.transaction().expect("tx");
    let session = [1u8; 16];
    tx.execute(
        "INSERT INTO sessions (session_id, author_user_id, author_device_id, mode, suite, \
         current_epoch, created_at) VALUES (?1, 'alice', 'phone', 1, 1, 1, 1)",
        [&session[..]],
    )
    .expect("session");
    {
        let mut stmt = tx
            .prepare(
                "INSERT INTO messages (message_id, session_id, epoch, author_user_id, \
                 author_device_id, nonce, ciphertext, associated_data, created_at) \
                 VALUES (?1, ?2, 1, 'alice', 'phone', ?3, ?4, NULL, ?5)",
            )
            .expect("prepare");
        for i in 0..rows {
            let id = uuid::Uuid::now_v7();
            let ciphertext: Vec<u8> = (0..256).map(|b| (b as u8) ^ (i as u8)).collect();
            stmt.execute(rusqlite::params![
                &id.as_bytes()[..],
                &session[..],
                &[7u8; 12][..],
                ciphertext,
                i as i64
            ])
            .expect("insert");
        }
    }
    tx.commit().expect("commit");
}

/// The reference: read in key order, multi-row INSERTs of 1000 rows, a transaction each.
async fn plain_copy(source: &std::path::Path, target: &str) {
    let (mut client, conn) = tokio_postgres::connect(target, NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .execute(
            "INSERT INTO sessions (session_id, author_user_id, author_device_id, mode, suite, \
             current_epoch, created_at) VALUES ($1, 'alice', 'phone', 1, 1, 1, 1)",
            &[&vec![1u8; 16]],
        )
        .await
        .expect("session");
    type Row = (
        Vec<u8>,
        Vec<u8>,
        i64,
        String,
        Option<String>,
        Vec<u8>,
        Vec<u8>,
        Option<Vec<u8>>,
        i64,
        Option<i64>,
    );
    let (tx_rows, mut rx_rows) = tokio::sync::mpsc::channel::<Vec<Row>>(2);
    let path = source.to_owned();
    let reader = tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open(path).expect("open");
        let mut stmt = conn
            .prepare(
                "SELECT message_id, session_id, epoch, author_user_id, author_device_id, nonce, \
                 ciphertext, associated_data, created_at, deleted_at FROM messages ORDER BY message_id",
            )
            .expect("prepare");
        let mut rows = stmt.query([]).expect("query");
        let mut batch = Vec::with_capacity(1000);
        while let Some(r) = rows.next().expect("row") {
            batch.push((
                r.get(0).expect("c"),
                r.get(1).expect("c"),
                r.get(2).expect("c"),
                r.get(3).expect("c"),
                r.get(4).expect("c"),
                r.get(5).expect("c"),
                r.get(6).expect("c"),
                r.get(7).expect("c"),
                r.get(8).expect("c"),
                r.get(9).expect("c"),
            ));
            if batch.len() == 1000 {
                tx_rows
                    .blocking_send(std::mem::take(&mut batch))
                    .expect("send");
            }
        }
        if !batch.is_empty() {
            tx_rows.blocking_send(batch).expect("send");
        }
    });
    while let Some(batch) = rx_rows.recv().await {
        let mut sql = String::from(
            "INSERT INTO messages (message_id, session_id, epoch, author_user_id, author_device_id, \
             nonce, ciphertext, associated_data, created_at, deleted_at) VALUES ",
        );
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(batch.len() * 10);
        let epochs: Vec<i32> = batch.iter().map(|r| r.2 as i32).collect();
        for (i, r) in batch.iter().enumerate() {
            let b = i * 10;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${},${},${},${},${},${},${},${},${},${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7,
                b + 8,
                b + 9,
                b + 10
            ));
            params.extend_from_slice(&[
                &r.0, &r.1, &epochs[i], &r.3, &r.4, &r.5, &r.6, &r.7, &r.8, &r.9,
            ]);
        }
        let tx = client.transaction().await.expect("tx");
        tx.execute(&sql, &params).await.expect("insert");
        tx.commit().await.expect("commit");
    }
    reader.await.expect("reader");
}

#[tokio::main]
async fn main() {
    let Ok(admin) = std::env::var("KEYHOLD_TEST_DATABASE_URL") else {
        eprintln!("dbcopy bench: set KEYHOLD_TEST_DATABASE_URL to a PostgreSQL server");
        return;
    };
    std::env::set_var("KEYHOLD_PROGRESS", "plain");
    let rows: usize = std::env::var("KEYHOLD_BENCH_DBCOPY_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = std::env::temp_dir().join(format!(
        "keyhold-bench-dbcopy-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let source = dir.join("source.db");
    let source_url = format!("sqlite://{}", source.display());
    Store::open(&source_url)
        .await
        .expect("open")
        .migrate()
        .await
        .expect("migrate");
    fill_source(&source, rows);

    let (admin_client, conn) = tokio_postgres::connect(&admin, NoTls).await.expect("admin");
    tokio::spawn(conn);
    let names = [
        format!("keyhold_bench_ref_{}", uuid::Uuid::now_v7().simple()),
        format!("keyhold_bench_copy_{}", uuid::Uuid::now_v7().simple()),
    ];
    for n in &names {
        admin_client
            .batch_execute(&format!("CREATE DATABASE {n}"))
            .await
            .expect("create db");
    }
    let reference_url = with_database(&admin, &names[0]);
    let copy_url = with_database(&admin, &names[1]);
    Store::open(&reference_url)
        .await
        .expect("open")
        .migrate()
        .await
        .expect("migrate");

    let reference = measure(plain_copy(&source, &reference_url)).await;
    let copy = measure(async {
        run(&CopyOptions {
            from: Some(source_url.clone()),
            to: copy_url.clone(),
            resume: false,
            batch_size: 1000,
            report: None,
            validate_only: false,
            rollback: false,
        })
        .await
        .expect("db copy");
    })
    .await;

    let per = |m: &Measured| {
        (
            rows as f64 / m.seconds,
            m.own_cpu * 1e6 / rows as f64,
            m.pg_cpu * 1e6 / rows as f64,
        )
    };
    let (r_rate, r_own, r_pg) = per(&reference);
    let (c_rate, c_own, c_pg) = per(&copy);
    println!("dbcopy bench: {rows} messages (256-byte ciphertext)");
    println!("| run | rows/s | process CPU µs/row | PostgreSQL CPU µs/row |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| plain read + multi-row INSERT (reference) | {r_rate:.0} | {r_own:.1} | {r_pg:.1} |"
    );
    println!("| keyhold db copy (check, migrate, copy, validate) | {c_rate:.0} | {c_own:.1} | {c_pg:.1} |");
    println!("ratio db copy / reference: {:.2}x", c_rate / r_rate);

    for n in &names {
        let _ = admin_client
            .batch_execute(&format!("DROP DATABASE {n} WITH (FORCE)"))
            .await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
