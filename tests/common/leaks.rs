//! Looking for secrets where they must not be: every form a secret could take in stored bytes
//! or log text, and every byte a test database holds.

use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::server::TestServer;
use super::Kind;

const BASE64_STANDARD: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        for _ in chunk.len()..3 {
            out.push('=');
        }
    }
    out
}

/// The base64 text `secret` shows inside a longer base64 string, whatever its offset there:
/// for each of the three alignments, the characters that depend on the secret's bytes alone.
fn base64_needles(secret: &[u8], alphabet: &[u8; 64]) -> Vec<String> {
    (0..3)
        .map(|shift| {
            let mut data = vec![0u8; shift];
            data.extend_from_slice(secret);
            let encoded = base64(&data, alphabet);
            let first = shift.div_ceil(3);
            let last = (shift + secret.len()) / 3; // groups [first, last) hold secret bytes only
            encoded[4 * first..4 * last].to_string()
        })
        .collect()
}

/// Every form of `secret` searched for: raw, lower and upper hex, base64 (both alphabets, any
/// alignment) and Rust's `Debug` of a byte slice (`1, 2, 3`).
pub fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
    ];
    for alphabet in [BASE64_STANDARD, BASE64_URL] {
        out.extend(
            base64_needles(secret, alphabet)
                .into_iter()
                .map(String::into_bytes),
        );
    }
    let debug = format!("{secret:?}");
    out.push(
        debug
            .trim_start_matches('[')
            .trim_end_matches(']')
            .as_bytes()
            .to_vec(),
    );
    out
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(haystack, needle).is_some()
}

/// Which form of `secret`, if any, occurs in `haystack`.
pub fn leaked_form(haystack: &[u8], secret: &[u8]) -> Option<String> {
    forms(secret)
        .into_iter()
        .find(|f| contains(haystack, f))
        .map(|f| {
            String::from_utf8(f.clone())
                .unwrap_or_else(|_| format!("raw bytes {}", hex::encode(&f)))
        })
}

#[derive(QueryableByName)]
struct Line {
    #[diesel(sql_type = diesel::sql_types::Text)]
    line: String,
}

/// Every byte the database holds: SQLite's database, WAL and shared-memory files as they are on
/// disk; for PostgreSQL, every row of every table of the schema as JSON (bytea as `\x` hex).
/// Also returns the tables read (PostgreSQL) so the caller can check none was missed.
pub async fn stored_bytes(server: &TestServer) -> (Vec<u8>, Vec<String>) {
    match server.kind() {
        Kind::Sqlite => {
            let path = server.db.url.trim_start_matches("sqlite://").to_string();
            let mut all = Vec::new();
            let mut files = Vec::new();
            for suffix in ["", "-wal", "-shm"] {
                let file = format!("{path}{suffix}");
                if let Ok(bytes) = std::fs::read(&file) {
                    files.push(format!("{file} ({} bytes)", bytes.len()));
                    all.extend_from_slice(&bytes);
                }
            }
            assert!(
                std::fs::metadata(&path).is_ok(),
                "the SQLite file exists at {path}"
            );
            (all, files)
        }
        Kind::Postgres => {
            let mut conn = AsyncPgConnection::establish(&server.db.url)
                .await
                .expect("connect");
            let tables: Vec<Line> = diesel::sql_query(
                "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) AS line \
                 FROM information_schema.tables \
                 WHERE table_schema NOT IN ('pg_catalog', 'information_schema') \
                 AND table_type = 'BASE TABLE' ORDER BY 1",
            )
            .load(&mut conn)
            .await
            .expect("list tables");
            let mut all = Vec::new();
            let mut names = Vec::new();
            for t in tables {
                let rows: Vec<Line> = diesel::sql_query(format!(
                    "SELECT row_to_json(t)::text AS line FROM {} t",
                    t.line
                ))
                .load(&mut conn)
                .await
                .expect("dump table");
                for r in rows {
                    all.extend_from_slice(r.line.as_bytes());
                    all.push(b'\n');
                }
                names.push(t.line);
            }
            (all, names)
        }
    }
}
