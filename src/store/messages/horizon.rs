//! The PostgreSQL visibility horizon: the time below which every message that will ever exist
//! is already visible, so that a listing that stops there never has a message appear below
//! one it has shown (the proof and its conditions are in the module docs of
//! [`super`](crate::store::messages)). SQLite, one writer at a time, needs none.

use diesel::sql_types::{BigInt, Text};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use crate::store::{db_run, Conn, StoreError};

/// The `application_name` a PutMessages transaction carries on PostgreSQL while it runs: the
/// listings' visibility horizon waits for transactions that carry it (see the module docs).
pub const MESSAGE_WRITER_APPLICATION_NAME: &str = "keyhold:put-messages";

/// The horizon: the earlier of the statement's time and the start of the oldest other
/// transaction marked as a message writer in this database (`$1`:
/// [`MESSAGE_WRITER_APPLICATION_NAME`]).
const HORIZON_SQL: &str = include_str!("horizon.sql");

#[derive(QueryableByName)]
struct Micros {
    #[diesel(sql_type = BigInt)]
    micros: i64,
}

impl Conn {
    /// The visibility horizon of a listing, in unix microseconds: only messages older than it
    /// are listed. Read it on the listing's own connection, outside any transaction, in a
    /// statement before the listing's, so that the listing's snapshot is the later one.
    pub(super) async fn horizon(&mut self) -> Result<i64, StoreError> {
        let conn = &mut self.db;
        db_run!(conn: sqlite {
            Ok(i64::MAX)
        } postgres {
            let row: Micros = diesel::sql_query(HORIZON_SQL)
                .bind::<Text, _>(MESSAGE_WRITER_APPLICATION_NAME)
                .get_result(conn)
                .await?;
            Ok(row.micros)
        })
    }
}
