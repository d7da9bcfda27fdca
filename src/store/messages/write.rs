//! The write path: PutMessages batches, stored all or nothing with the writer's right checked,
//! a retried id found rather than stored twice, and deletion.
//!
//! On PostgreSQL a fresh batch is one statement whatever its length (`insert.sql`, an array
//! per column), prepared once per connection; a batch of one runs without a transaction. On
//! SQLite, where calls are local and one writer holds the lock, the right is checked by its
//! own queries and the rows go in one by one on the connection's thread.

use std::collections::{HashMap, HashSet};

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Binary, Bool, Integer, Nullable, Text, Untyped};
use diesel_async::RunQueryDsl;

use super::horizon::message_writer_name;
use super::{
    epoch_db, epoch_from_db, Author, Message, MessageRow, NewMessage, PutOutcome, Writer,
    ROWS_PER_STATEMENT,
};
use crate::crypto::ids::{DeviceId, Epoch, MessageId, SessionId};
use crate::store::schema::{messages, sessions};
use crate::store::sql::coalesce;
use crate::store::{db_run, Backend, Conn, DbConn, Store, StoreError, Timestamp, Tx};

/// The PostgreSQL insert of a batch: one statement whatever its length (one array per
/// column), which also checks the writer's right to every (session, epoch) and inserts
/// nothing if one is refused (`$10`: a device writer must hold a live key; an app server
/// needs a live session at or past the epoch). Its `writer` CTE first marks the transaction
/// as a message writer, then reads the clock for `created_at` (CASE evaluates its condition
/// first), so that listings hold their horizon at or below its start (module docs); it is
/// volatile, so it runs once, before the first row is inserted.
///
/// Parameters: `$1` the writer's name ([`message_writer_name`], which carries its bound for
/// the commit-time check and the horizon, see `horizon.rs`), `$2` the author user, `$3` the
/// author device or NULL, `$4`…`$9` the batch's columns (ids, sessions, epochs, nonces,
/// ciphertexts, associated data), `$10` whether the writer is a device.
const INSERT_SQL: &str = include_str!("insert.sql");

#[derive(QueryableByName)]
struct Inserted {
    #[diesel(sql_type = Binary)]
    message_id: Vec<u8>,
    #[diesel(sql_type = BigInt)]
    created_at: i64,
}

/// [`INSERT_SQL`] with its values, as a query type of its own with a static id, so that
/// diesel-async prepares it once per connection and PostgreSQL parses it once (a raw
/// `sql_query` is parsed and planned again at every call: measured ~0.6 ms of a single
/// message's ~1.2 ms in the database).
struct PgInsert<'a> {
    writer_name: &'a str,
    user: &'a str,
    device: Option<&'a str>,
    device_writer: bool,
    ids: Vec<Vec<u8>>,
    sessions: Vec<Vec<u8>>,
    epochs: Vec<i32>,
    nonces: Vec<Vec<u8>>,
    ciphertexts: Vec<Vec<u8>>,
    ads: Vec<Option<Vec<u8>>>,
}

impl QueryId for PgInsert<'_> {
    type QueryId = PgInsert<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for PgInsert<'_> {
    type SqlType = Untyped;
}

impl QueryFragment<Pg> for PgInsert<'_> {
    /// Writes [`INSERT_SQL`], each `$n` in it becoming a bind of the n-th value.
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        for piece in pieces(INSERT_SQL) {
            match piece {
                Piece::Sql(sql) => out.push_sql(sql),
                Piece::Param("1") => out.push_bind_param::<Text, _>(self.writer_name)?,
                Piece::Param("2") => out.push_bind_param::<Text, _>(self.user)?,
                Piece::Param("3") => out.push_bind_param::<Nullable<Text>, _>(&self.device)?,
                Piece::Param("4") => out.push_bind_param::<Array<Binary>, _>(&self.ids)?,
                Piece::Param("5") => out.push_bind_param::<Array<Binary>, _>(&self.sessions)?,
                Piece::Param("6") => out.push_bind_param::<Array<Integer>, _>(&self.epochs)?,
                Piece::Param("7") => out.push_bind_param::<Array<Binary>, _>(&self.nonces)?,
                Piece::Param("8") => out.push_bind_param::<Array<Binary>, _>(&self.ciphertexts)?,
                Piece::Param("9") => {
                    out.push_bind_param::<Array<Nullable<Binary>>, _>(&self.ads)?
                }
                Piece::Param("10") => out.push_bind_param::<Bool, _>(&self.device_writer)?,
                Piece::Param(other) => {
                    return Err(diesel::result::Error::QueryBuilderError(
                        format!("insert.sql has no parameter ${other}").into(),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// A piece of a raw statement's text: SQL to write as it is, or the number of a `$n`
/// placeholder (empty for a `$` without digits, which no statement here has).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece<'s> {
    Sql(&'s str),
    Param(&'s str),
}

/// The pieces of `sql`, split at its `$n` placeholders, in order.
///
/// Why a splitter of our own: a raw statement is prepared once per connection only if it is
/// a query type with a static id whose AST Diesel may cache, and Diesel's own ways of
/// binding values to raw SQL, `sql_query(..).bind(..)` and `dsl::sql(..).bind(..)`, both
/// mark the statement unsafe to cache (`AstPass::unsafe_to_cache_prepared`), so PostgreSQL
/// would parse and plan it at every call. The one call that binds a value to a `$n` already
/// in the text, `AstPass::push_bind_param_value_only`, is private to Diesel (public only
/// behind its `i-implement-a-third-party-backend-and-opt-into-breaking-changes` feature).
/// What stays is pushing each value where its placeholder stands, Diesel numbering the binds
/// itself; this keeps the statement readable in its `.sql` file, `$n` and all. The SQL files
/// hold no `$` but their placeholders (no dollar quoting), which the tests check.
fn pieces(sql: &str) -> impl Iterator<Item = Piece<'_>> {
    let mut rest = sql;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if let Some(after) = rest.strip_prefix('$') {
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            let (number, tail) = after.split_at(digits);
            rest = tail;
            return Some(Piece::Param(number));
        }
        let (sql, tail) = rest.split_at(rest.find('$').unwrap_or(rest.len()));
        rest = tail;
        Some(Piece::Sql(sql))
    })
}

impl Store {
    /// Stores a batch of messages by one author, all or nothing, or finds it already stored
    /// (a retry).
    ///
    /// An id already stored with the same bytes (session, epoch, author, nonce, ciphertext,
    /// associated data) is not stored again and keeps its first time; an id stored with other
    /// bytes, including by a concurrent call that commits first, is [`PutOutcome::Conflict`].
    /// The writer's right to every (session, epoch) is checked in the same statement as the
    /// insert on PostgreSQL; a refusal is [`PutOutcome::NoKey`], [`PutOutcome::NoSession`] or
    /// [`PutOutcome::EpochAhead`]. The batch's ids must be distinct.
    ///
    /// A batch of several messages is one transaction ([`Tx::put_messages`]). On PostgreSQL a
    /// batch of one is the insert statement alone, which is atomic by itself: with nothing to
    /// take back, it needs no BEGIN and COMMIT (three round trips fewer, most of a single
    /// message's cost). That choice, a backend difference, is made here and nowhere else,
    /// which is why this is a [`Store`] method and not only a [`Tx`] one.
    pub async fn put_messages(
        &self,
        writer: Writer,
        author: Author,
        batch: Vec<NewMessage>,
    ) -> Result<PutOutcome, StoreError> {
        if batch.len() == 1 && self.backend() == Backend::Postgres {
            return self.conn().await?.put(writer, &author, &batch).await;
        }
        // On PostgreSQL the transaction's statements run under the write bound (horizon.rs).
        let bound = self.options.message_write_timeout.as_millis();
        let begin = (bound > 0).then(|| format!("BEGIN; SET LOCAL statement_timeout = {bound}"));
        self.transaction_begun_with(begin.as_deref(), async move |tx| {
            tx.put_messages(writer, &author, &batch).await
        })
        .await
    }
}

impl Tx {
    /// Stores a batch of messages by one author, or finds it already stored (a retry), if the
    /// writer may write each of its (session, epoch) pairs; see [`Store::put_messages`].
    ///
    /// What this call inserted is taken back before it returns any outcome but
    /// [`PutOutcome::Stored`], so the transaction then commits nothing of the batch.
    pub async fn put_messages(
        &mut self,
        writer: Writer,
        author: &Author,
        batch: &[NewMessage],
    ) -> Result<PutOutcome, StoreError> {
        self.put(writer, author, batch).await
    }
}

impl Conn {
    /// Soft-deletes a message; returns when it was deleted (the first time, if it already
    /// was), or `None` if there is no such message.
    pub async fn delete_message(
        &mut self,
        id: &MessageId,
    ) -> Result<Option<Timestamp>, StoreError> {
        let conn = &mut self.db;
        let now = Timestamp::now().unix_micros();
        let deleted_at: Option<Option<i64>> = db_run!(conn: {
            diesel::update(messages::table.find(id.as_bytes().as_slice()))
                .set(messages::deleted_at.eq(coalesce(messages::deleted_at, now)))
                .returning(messages::deleted_at)
                .get_result(conn)
                .await
                .optional()?
        });
        Ok(deleted_at.map(|at| Timestamp::from_unix_micros(at.unwrap_or(now))))
    }

    /// The body of [`Tx::put_messages`]. Outside a transaction only for a batch of one on
    /// PostgreSQL, whose insert is one statement and which has nothing to take back.
    async fn put(
        &mut self,
        writer: Writer,
        author: &Author,
        batch: &[NewMessage],
    ) -> Result<PutOutcome, StoreError> {
        // Insert first: a fresh batch, the common case, costs one statement, the writer's right
        // checked in it. Ids already stored (a retry, or a concurrent writer PostgreSQL waited
        // for) are skipped and checked after.
        let inserted = self.insert_new(writer, author, batch).await?;
        if inserted.is_empty() {
            if let Some(refused) = self.refusal(writer, author, batch).await? {
                return Ok(refused);
            }
        }
        let times: HashMap<&[u8], i64> = inserted
            .iter()
            .map(|(id, at)| (id.as_slice(), *at))
            .collect();
        let time_of = |id: &MessageId| times.get(id.as_bytes().as_slice()).copied();
        let skipped: Vec<&[u8]> = batch
            .iter()
            .filter(|m| time_of(&m.message_id).is_none())
            .map(|m| m.message_id.as_bytes().as_slice())
            .collect();
        let existing = if skipped.is_empty() {
            Vec::new()
        } else {
            self.messages_by_id(&skipped).await?
        };
        let mut stored = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            if let Some(at) = time_of(&m.message_id) {
                stored.push((Timestamp::from_unix_micros(at), true));
                continue;
            }
            match existing.iter().find(|e| e.message_id == m.message_id) {
                Some(e) if e.is_same_as(author, m) => stored.push((e.created_at, false)),
                _ => {
                    // Another message has this id: take back what this call inserted, so that
                    // the transaction commits nothing of the batch. (A batch of one inserted
                    // nothing, so the statement that ran without a transaction wrote nothing.)
                    let ours: Vec<&[u8]> = inserted.iter().map(|(id, _)| id.as_slice()).collect();
                    let conn = &mut self.db;
                    for chunk in ours.chunks(ROWS_PER_STATEMENT) {
                        db_run!(conn: {
                            diesel::delete(messages::table.filter(messages::message_id.eq_any(chunk)))
                                .execute(conn)
                                .await?;
                        });
                    }
                    return Ok(PutOutcome::Conflict(i));
                }
            }
        }
        Ok(PutOutcome::Stored(stored))
    }

    /// Inserts a batch, skipping ids already stored, if the writer may write every (session,
    /// epoch) of it (nothing otherwise); returns the ids it stored and their time.
    async fn insert_new(
        &mut self,
        writer: Writer,
        author: &Author,
        batch: &[NewMessage],
    ) -> Result<Vec<(Vec<u8>, i64)>, StoreError> {
        let rows = batch
            .iter()
            .map(|m| {
                Ok(MessageRow {
                    message_id: m.message_id.as_bytes().to_vec(),
                    session_id: m.session_id.as_bytes().to_vec(),
                    epoch: epoch_db(m.epoch)?,
                    author_user_id: author.user.to_string(),
                    author_device_id: author.device.as_ref().map(DeviceId::to_string),
                    nonce: m.nonce.clone(),
                    ciphertext: m.ciphertext.clone(),
                    associated_data: m.associated_data.clone(),
                    created_at: 0,
                    deleted_at: None,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // On SQLite, where calls are local, the right is checked by its own queries first.
        if matches!(self.db, DbConn::Sqlite(_))
            && self.refusal(writer, author, batch).await?.is_some()
        {
            return Ok(Vec::new());
        }
        let conn = &mut self.db;
        db_run!(conn: sqlite {
            // The transaction holds SQLite's write lock already: later than every commit.
            // Diesel has no multi-row INSERT with ON CONFLICT for SQLite; the rows go one by
            // one on the connection's thread (each a local call).
            let now = Timestamp::now().unix_micros();
            Ok(conn
                .spawn_blocking(move |c| {
                    let mut stored = Vec::with_capacity(rows.len());
                    for mut row in rows {
                        row.created_at = now;
                        let id: Option<Vec<u8>> = diesel::RunQueryDsl::get_result(
                            diesel::insert_into(messages::table)
                                .values(&row)
                                .on_conflict_do_nothing()
                                .returning(messages::message_id),
                            c,
                        )
                        .optional()?;
                        stored.extend(id.map(|id| (id, now)));
                    }
                    Ok(stored)
                })
                .await?)
        } postgres {
            let writer_name = message_writer_name(
                u64::try_from(self.message_write_timeout.as_millis()).unwrap_or(u64::MAX),
            );
            let mut insert = PgInsert {
                writer_name: &writer_name,
                user: author.user.as_str(),
                device: author.device.as_ref().map(DeviceId::as_str),
                device_writer: writer == Writer::Device,
                ids: Vec::with_capacity(rows.len()),
                sessions: Vec::with_capacity(rows.len()),
                epochs: Vec::with_capacity(rows.len()),
                nonces: Vec::with_capacity(rows.len()),
                ciphertexts: Vec::with_capacity(rows.len()),
                ads: Vec::with_capacity(rows.len()),
            };
            for r in rows {
                insert.ids.push(r.message_id);
                insert.sessions.push(r.session_id);
                insert.epochs.push(r.epoch);
                insert.nonces.push(r.nonce);
                insert.ciphertexts.push(r.ciphertext);
                insert.ads.push(r.associated_data);
            }
            let stored: Vec<Inserted> = insert.load(conn).await?;
            Ok(stored.into_iter().map(|r| (r.message_id, r.created_at)).collect())
        })
    }

    /// The stored messages with these ids, in no particular order.
    async fn messages_by_id(&mut self, ids: &[&[u8]]) -> Result<Vec<Message>, StoreError> {
        let conn = &mut self.db;
        let mut out = Vec::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let rows: Vec<MessageRow> = db_run!(conn: {
                messages::table
                    .filter(messages::message_id.eq_any(chunk))
                    .select(MessageRow::as_select())
                    .load(conn)
                    .await?
            });
            for row in rows {
                out.push(Message::try_from(row)?);
            }
        }
        Ok(out)
    }

    /// Why a batch may not be written, if it may not: the first message whose (session,
    /// epoch) the writer has no right to.
    async fn refusal(
        &mut self,
        writer: Writer,
        author: &Author,
        batch: &[NewMessage],
    ) -> Result<Option<PutOutcome>, StoreError> {
        let mut seen = HashSet::new();
        let pairs: Vec<(SessionId, Epoch)> = batch
            .iter()
            .map(|m| (m.session_id, m.epoch))
            .filter(|p| seen.insert(*p))
            .collect();
        let first = |pair: (SessionId, Epoch)| {
            batch
                .iter()
                .position(|m| (m.session_id, m.epoch) == pair)
                .unwrap_or(0)
        };
        match (writer, &author.device) {
            (Writer::Device, Some(device)) => {
                let readable = self.readable_epochs(&author.user, device, &pairs).await?;
                Ok(pairs
                    .iter()
                    .find(|p| !readable.contains(p))
                    .map(|p| PutOutcome::NoKey(first(*p))))
            }
            (Writer::Device, None) => Ok(Some(PutOutcome::NoKey(0))),
            (Writer::AppServer, _) => {
                let mut sessions: HashMap<SessionId, Option<Epoch>> = HashMap::new();
                for &(s, e) in &pairs {
                    let current = match sessions.get(&s) {
                        Some(current) => *current,
                        None => {
                            let current = self.live_session_epoch(&s).await?;
                            sessions.insert(s, current);
                            current
                        }
                    };
                    match current {
                        None => {
                            return Ok(Some(PutOutcome::NoSession(
                                batch.iter().position(|m| m.session_id == s).unwrap_or(0),
                            )))
                        }
                        Some(current) if e > current => {
                            return Ok(Some(PutOutcome::EpochAhead {
                                index: first((s, e)),
                                current,
                            }))
                        }
                        Some(_) => {}
                    }
                }
                Ok(None)
            }
        }
    }

    /// The current epoch of a live (not deleted) session.
    async fn live_session_epoch(&mut self, id: &SessionId) -> Result<Option<Epoch>, StoreError> {
        let conn = &mut self.db;
        let sid = id.as_bytes().as_slice();
        let current: Option<i32> = db_run!(conn: {
            sessions::table
                .filter(sessions::session_id.eq(sid))
                .filter(sessions::deleted_at.is_null())
                .select(sessions::current_epoch)
                .first(conn)
                .await
                .optional()?
        });
        current
            .map(|e| epoch_from_db("session epoch", e))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_every_placeholder_and_keep_the_rest() {
        let split: Vec<Piece> = pieces("a = $1 AND b IN ($10, $2)$3").collect();
        assert_eq!(
            split,
            [
                Piece::Sql("a = "),
                Piece::Param("1"),
                Piece::Sql(" AND b IN ("),
                Piece::Param("10"),
                Piece::Sql(", "),
                Piece::Param("2"),
                Piece::Sql(")"),
                Piece::Param("3"),
            ]
        );
        assert_eq!(
            pieces("SELECT 1").collect::<Vec<_>>(),
            [Piece::Sql("SELECT 1")]
        );
        assert_eq!(pieces("").count(), 0);
        // A `$` that is no placeholder is an empty number, which the insert refuses.
        assert_eq!(
            pieces("$$x").collect::<Vec<_>>(),
            [Piece::Param(""), Piece::Param(""), Piece::Sql("x")]
        );
    }

    #[test]
    fn insert_sql_uses_each_of_its_ten_parameters_and_no_other() {
        let mut used: Vec<&str> = pieces(INSERT_SQL)
            .filter_map(|p| match p {
                Piece::Param(n) => Some(n),
                Piece::Sql(_) => None,
            })
            .collect();
        used.sort_unstable_by_key(|n| n.parse::<u32>().unwrap_or(0));
        used.dedup();
        let expected: Vec<String> = (1..=10).map(|n| n.to_string()).collect();
        assert_eq!(used, expected);
    }

    #[test]
    fn insert_binds_one_value_per_placeholder_and_caches_as_one_statement() {
        let insert = PgInsert {
            writer_name: "keyhold:put-messages/5000",
            user: "alice",
            device: Some("phone"),
            device_writer: true,
            ids: vec![vec![1; 16]],
            sessions: vec![vec![2; 16]],
            epochs: vec![1],
            nonces: vec![vec![3; 12]],
            ciphertexts: vec![vec![4; 32]],
            ads: vec![None],
        };
        let occurrences = pieces(INSERT_SQL)
            .filter(|p| matches!(p, Piece::Param(_)))
            .count();
        let sql = diesel::debug_query::<Pg, _>(&insert).to_string();
        assert!(sql.contains(&format!("${occurrences}")), "{sql}");
        assert!(!sql.contains(&format!("${}", occurrences + 1)), "{sql}");
        assert!(sql.starts_with("WITH writer AS ("), "{sql}");
        // Prepared once per connection: a static id, and nothing in it unsafe to cache.
        const { assert!(<PgInsert<'static> as QueryId>::HAS_STATIC_QUERY_ID) };
        assert!(insert.is_safe_to_cache_prepared(&Pg).expect("walks"));
    }
}
