//! A connection of a test's own to the database behind a running server, and a fingerprint of
//! every table: equal fingerprints before and after a refused call prove it wrote nothing.

use super::{Kind, TestDb};

/// Row counts (and revocation, deletion and epoch counters) of every table, read behind the
/// server's back: equal before and after a call means the call wrote nothing.
#[derive(diesel::QueryableByName, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub user_keys: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub revoked_user_keys: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub superseded_user_keys: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub sessions: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub deleted_sessions: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub epochs: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub session_keys: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub revoked_session_keys: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub session_members: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub removed_members: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub staff_keys: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub service_keys: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub audit_events: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub api_tokens: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub revoked_tokens: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub messages: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub deleted_messages: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub trusted_users: i64,
}

/// The query behind [`Fingerprint`].
pub const FINGERPRINT_SQL: &str = "SELECT \
    (SELECT COUNT(*) FROM user_keys) AS user_keys, \
    (SELECT COUNT(*) FROM user_keys WHERE revoked_at IS NOT NULL) AS revoked_user_keys, \
    (SELECT COUNT(*) FROM user_keys WHERE superseded_at IS NOT NULL) AS superseded_user_keys, \
    (SELECT COUNT(*) FROM sessions) AS sessions, \
    (SELECT COUNT(*) FROM sessions WHERE deleted_at IS NOT NULL) AS deleted_sessions, \
    (SELECT COALESCE(SUM(current_epoch), 0) FROM sessions) AS epochs, \
    (SELECT COUNT(*) FROM session_keys) AS session_keys, \
    (SELECT COUNT(*) FROM session_keys WHERE revoked_at IS NOT NULL) AS revoked_session_keys, \
    (SELECT COUNT(*) FROM session_members) AS session_members, \
    (SELECT COUNT(*) FROM session_members WHERE removed_epoch IS NOT NULL) AS removed_members, \
    (SELECT COUNT(*) FROM staff_keys) AS staff_keys, \
    (SELECT COUNT(*) FROM service_keys) AS service_keys, \
    (SELECT COUNT(*) FROM audit_events) AS audit_events, \
    (SELECT COUNT(*) FROM api_tokens) AS api_tokens, \
    (SELECT COUNT(*) FROM api_tokens WHERE revoked_at IS NOT NULL) AS revoked_tokens, \
    (SELECT COUNT(*) FROM messages) AS messages, \
    (SELECT COUNT(*) FROM messages WHERE deleted_at IS NOT NULL) AS deleted_messages, \
    (SELECT COUNT(*) FROM trusted_users) AS trusted_users";

/// A connection of the test's own to the server's database.
pub enum RawDb {
    /// A SQLite connection.
    Sqlite(diesel::SqliteConnection),
    /// A PostgreSQL connection.
    Postgres(Box<diesel_async::AsyncPgConnection>),
}

impl RawDb {
    /// Opens a connection to the test database behind the server's back.
    pub async fn open(db: &TestDb) -> RawDb {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        use diesel_async::AsyncConnection;
        match db.kind {
            Kind::Sqlite => {
                let mut conn =
                    diesel::SqliteConnection::establish(db.url.trim_start_matches("sqlite://"))
                        .expect("open SQLite");
                conn.batch_execute("PRAGMA busy_timeout = 10000")
                    .expect("busy timeout");
                RawDb::Sqlite(conn)
            }
            Kind::Postgres => RawDb::Postgres(Box::new(
                diesel_async::AsyncPgConnection::establish(&db.url)
                    .await
                    .expect("connect to PostgreSQL"),
            )),
        }
    }

    /// The current [`Fingerprint`].
    pub async fn fingerprint(&mut self) -> Fingerprint {
        let query = diesel::sql_query(FINGERPRINT_SQL);
        match self {
            RawDb::Sqlite(conn) => diesel::RunQueryDsl::get_result(query, conn),
            RawDb::Postgres(conn) => {
                diesel_async::RunQueryDsl::get_result(query, conn.as_mut()).await
            }
        }
        .expect("fingerprint query")
    }
}
