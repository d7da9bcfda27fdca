//! PostgreSQL over TLS, against the real server `scripts/test` configures (`ssl = on`, a
//! certificate for localhost and 127.0.0.1 signed by the CA in `KEYHOLD_TEST_PG_CA`): each
//! `sslmode` does what libpq's does, `verify-full` checks the chain and the host name, and a
//! wrong root certificate is refused at open with an error that says so.
//!
//! Without `KEYHOLD_TEST_PG_CA` the tests are skipped with a notice, unless `CI` is set, in
//! which case they fail.

mod common;

use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use keyhold::store::{Store, StoreError};

use common::pki::{PemDir, TestCa};

/// The variable naming the CA file of the test server's certificate.
const PG_CA_VAR: &str = "KEYHOLD_TEST_PG_CA";

/// A fresh database and the CA file, or `None` (after a notice) to skip.
async fn tls_db() -> Option<(common::TestDb, String)> {
    let ca = match std::env::var(PG_CA_VAR) {
        Ok(path) if !path.is_empty() => path,
        _ if std::env::var_os("CI").is_some() => panic!(
            "{PG_CA_VAR} is not set, and CI is: scripts/test configures PostgreSQL with TLS and \
             exports it"
        ),
        _ => {
            eprintln!(
                "note: {PG_CA_VAR} is not set (run `bash scripts/test --setup-postgres`); \
                 skipping the PostgreSQL TLS tests"
            );
            return None;
        }
    };
    Some((common::postgres_db().await?, ca))
}

/// `url` with more query parameters.
fn with_params(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

/// The test database's name: the last path segment of its URL.
fn db_name(db: &common::TestDb) -> String {
    let path = db.url.split('?').next().unwrap_or(&db.url);
    path.rsplit('/').next().unwrap_or_default().to_string()
}

#[derive(diesel::QueryableByName)]
struct SslCounts {
    #[diesel(sql_type = BigInt)]
    tls: i64,
    #[diesel(sql_type = BigInt)]
    plain: i64,
}

/// How many sessions on `db` use TLS and how many do not, asked behind the store's back.
async fn ssl_counts(db: &common::TestDb) -> (i64, i64) {
    let admin = common::postgres_admin_url().expect("admin URL");
    let mut conn = AsyncPgConnection::establish(&admin).await.expect("admin");
    let counts: SslCounts = diesel::sql_query(
        "SELECT count(*) FILTER (WHERE s.ssl) AS tls, count(*) FILTER (WHERE NOT s.ssl) AS plain \
         FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid WHERE a.datname = $1",
    )
    .bind::<diesel::sql_types::Text, _>(db_name(db))
    .get_result(&mut conn)
    .await
    .expect("pg_stat_ssl");
    (counts.tls, counts.plain)
}

#[tokio::test]
async fn verify_full_connects_over_tls_and_migrations_use_it_too() {
    let Some((db, ca)) = tls_db().await else {
        return;
    };
    let url = with_params(&db.url, &format!("sslmode=verify-full&sslrootcert={ca}"));
    let store = Store::open(&url)
        .await
        .expect("verify-full against the test CA");
    assert!(!store.migrate().await.expect("migrate over TLS").is_empty());
    assert_eq!(
        store
            .conn()
            .await
            .unwrap()
            .count_active_admin_tokens()
            .await
            .unwrap(),
        0
    );
    let (tls, plain) = ssl_counts(&db).await;
    assert!(tls >= 1 && plain == 0, "tls {tls}, plain {plain}");
    store.close();
}

#[tokio::test]
async fn a_wrong_root_certificate_is_refused_with_a_clear_error() {
    let Some((db, _ca)) = tls_db().await else {
        return;
    };
    let dir = PemDir::new();
    let other = dir.write("other-ca.pem", &TestCa::new("not the server's CA").pem());
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = with_params(
            &db.url,
            &format!("sslmode={mode}&sslrootcert={}", other.display()),
        );
        match Store::open(&url).await {
            Err(StoreError::Unavailable(msg)) => {
                assert!(msg.contains("TLS verification"), "{mode}: {msg}");
                assert!(msg.contains("other-ca.pem"), "{mode}: {msg}");
                assert!(!msg.contains("postgres:postgres"), "no password: {msg}");
            }
            other => panic!("{mode}: expected Unavailable, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let Some((db, ca)) = tls_db().await else {
        return;
    };
    // The certificate names localhost and 127.0.0.1; connect to 127.0.0.1 by another name.
    let name = db_name(&db);
    let other_name = format!(
        "postgres://postgres:postgres@not-the-server.invalid:5432/{name}?hostaddr=127.0.0.1&sslrootcert={ca}"
    );
    match Store::open(&with_params(&other_name, "sslmode=verify-full")).await {
        Err(StoreError::Unavailable(msg)) => {
            assert!(msg.contains("TLS verification"), "{msg}");
            assert!(msg.contains("NotValidForName"), "{msg}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let store = Store::open(&with_params(&other_name, "sslmode=verify-ca"))
        .await
        .expect("verify-ca ignores the name");
    store.close();
    // And by the name the certificate carries.
    let localhost = format!(
        "postgres://postgres:postgres@localhost:5432/{name}?sslmode=verify-full&sslrootcert={ca}"
    );
    Store::open(&localhost).await.expect("localhost").close();
}

#[tokio::test]
async fn disable_is_plaintext_and_prefer_and_require_use_tls() {
    let Some((db, _ca)) = tls_db().await else {
        return;
    };
    let plain = Store::open(&with_params(&db.url, "sslmode=disable"))
        .await
        .expect("disable");
    assert_eq!(ssl_counts(&db).await, (0, 1));
    plain.close();
    drop(plain);
    for params in ["sslmode=require", "sslmode=prefer", ""] {
        let url = if params.is_empty() {
            db.url.clone()
        } else {
            with_params(&db.url, params)
        };
        let store = Store::open(&url).await.expect(params);
        let (tls, _) = ssl_counts(&db).await;
        assert!(tls >= 1, "{params:?}: no TLS session");
        store.close();
    }
}
