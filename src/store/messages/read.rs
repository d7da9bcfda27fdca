//! The listings, newest first by keyset cursors below the visibility horizon, and the reads of
//! a device's keys that access decisions take.
//!
//! Each listing is written once per backend where the backends must differ: on PostgreSQL
//! one statement (`timeline.sql`, `author.sql`), on SQLite, where calls are local, the same
//! steps through Diesel's query builder.

use std::collections::HashSet;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Text};
use diesel_async::RunQueryDsl;

use super::{epoch_db, epoch_from_db, Message, MessageRow, Position, Reader, ROWS_PER_STATEMENT};
use crate::crypto::ids::{DeviceId, Epoch, MessageId, SessionId, UserId};
use crate::store::schema::{messages, session_keys};
use crate::store::{db_run, Conn, StoreError};

/// The PostgreSQL timeline: the reader's live keys, one bounded backward scan per key, the
/// newest page of those, and only then the page's rows. `{session}` is empty or a filter
/// ([`postgres_timeline_sql`]).
///
/// The rows are fetched by `= ANY (ARRAY(…))` rather than joined: a join makes the planner
/// weigh a merge join, whose costing reads the extremes of the primary key index, and on
/// PostgreSQL 15 that walks every dead entry at the index's end (recently deleted or retried
/// messages): thousands of buffers and milliseconds of planning per call at 10 million rows.
const TIMELINE_SQL: &str = include_str!("timeline.sql");

/// The PostgreSQL listing of an author's messages a device can read: a backward range scan
/// of `messages_by_author_time`, each row kept if its (session, epoch) is among the reader's
/// live keys. The keys are an array computed once, not a join, for the reason given at
/// [`TIMELINE_SQL`] (a semi-join's costing walked ~3,000 buffers per call at 10 million rows).
const AUTHOR_SQL: &str = include_str!("author.sql");

/// The timeline statement for PostgreSQL, with or without the one-session filter (`$7`).
///
/// Its parameters: `$1` the reader's user, `$2` its device, `$3` the visibility horizon,
/// `$4` and `$5` the position to start below, `$6` the page size.
pub fn postgres_timeline_sql(one_session: bool) -> String {
    TIMELINE_SQL.replace(
        "{session}",
        if one_session {
            " AND session_id = $7"
        } else {
            ""
        },
    )
}

/// The bound a listing starts below: the cursor, or above every message.
fn start_below(before: Option<Position>) -> (i64, Vec<u8>) {
    match before {
        Some(p) => (p.created_at.unix_micros(), p.message_id.as_bytes().to_vec()),
        None => (i64::MAX, vec![0xFF; 16]),
    }
}

impl Conn {
    /// The messages a device can read (of the epochs it holds live keys for), across
    /// sessions or in one session, newest first, strictly older than `before`, at most
    /// `limit`. See the module docs for the order and the visibility horizon: call it on a
    /// connection outside a transaction.
    pub async fn readable_messages(
        &mut self,
        reader: &Reader,
        session: Option<SessionId>,
        before: Option<Position>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let horizon = self.horizon().await?;
        let (below_at, below_id) = start_below(before);
        let conn = &mut self.db;
        let rows: Vec<MessageRow> = db_run!(conn: sqlite {
            let (user, device) = (reader.user.to_string(), reader.device.to_string());
            conn.spawn_blocking(move |c| {
                sqlite_timeline(c, &user, &device, session, below_at, below_id, i64::from(limit))
            })
            .await?
        } postgres {
            let query = diesel::sql_query(postgres_timeline_sql(session.is_some()))
                .bind::<Text, _>(reader.user.as_str())
                .bind::<Text, _>(reader.device.as_str())
                .bind::<BigInt, _>(horizon)
                .bind::<BigInt, _>(below_at)
                .bind::<Binary, _>(below_id)
                .bind::<BigInt, _>(i64::from(limit));
            match session {
                Some(s) => query.bind::<Binary, _>(s.as_bytes().to_vec()).load(conn).await?,
                None => query.load(conn).await?,
            }
        });
        rows.into_iter().map(Message::try_from).collect()
    }

    /// The messages `author` wrote that a device can read, newest first, strictly older
    /// than `before`, at most `limit`; like [`Conn::readable_messages`], outside a
    /// transaction.
    pub async fn author_messages(
        &mut self,
        reader: &Reader,
        author: &UserId,
        before: Option<Position>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let horizon = self.horizon().await?;
        let (below_at, below_id) = start_below(before);
        let conn = &mut self.db;
        let rows: Vec<MessageRow> = db_run!(conn: sqlite {
            let readable = session_keys::table
                .filter(session_keys::session_id.eq(messages::session_id))
                .filter(session_keys::epoch.eq(messages::epoch))
                .filter(session_keys::recipient_user_id.eq(reader.user.as_str()))
                .filter(session_keys::recipient_device_id.eq(reader.device.as_str()))
                .filter(session_keys::revoked_at.is_null());
            messages::table
                .filter(messages::author_user_id.eq(author.as_str()))
                .filter(messages::deleted_at.is_null())
                .filter(messages::created_at.le(below_at))
                .filter(messages::created_at.lt(below_at).or(messages::message_id.lt(&below_id)))
                .filter(diesel::dsl::exists(readable))
                .order((messages::created_at.desc(), messages::message_id.desc()))
                .limit(i64::from(limit))
                .select(MessageRow::as_select())
                .load(conn)
                .await?
        } postgres {
            diesel::sql_query(AUTHOR_SQL)
                .bind::<Text, _>(author.as_str())
                .bind::<BigInt, _>(horizon)
                .bind::<BigInt, _>(below_at)
                .bind::<Binary, _>(below_id)
                .bind::<Text, _>(reader.user.as_str())
                .bind::<Text, _>(reader.device.as_str())
                .bind::<BigInt, _>(i64::from(limit))
                .load(conn)
                .await?
        });
        rows.into_iter().map(Message::try_from).collect()
    }

    /// The epochs of one session the device holds a live key for, ascending.
    pub async fn readable_session_epochs(
        &mut self,
        user: &UserId,
        device: &DeviceId,
        session: &SessionId,
    ) -> Result<Vec<Epoch>, StoreError> {
        let conn = &mut self.db;
        let sid = session.as_bytes().as_slice();
        let epochs: Vec<i32> = db_run!(conn: {
            session_keys::table
                .filter(session_keys::recipient_user_id.eq(user.as_str()))
                .filter(session_keys::recipient_device_id.eq(device.as_str()))
                .filter(session_keys::session_id.eq(sid))
                .filter(session_keys::revoked_at.is_null())
                .select(session_keys::epoch)
                .order(session_keys::epoch)
                .load(conn)
                .await?
        });
        epochs
            .into_iter()
            .map(|e| epoch_from_db("session key epoch", e))
            .collect()
    }

    /// Of `pairs`, the (session, epoch) pairs the device holds a live session key for, in
    /// the order given, each once.
    pub async fn readable_epochs(
        &mut self,
        user: &UserId,
        device: &DeviceId,
        pairs: &[(SessionId, Epoch)],
    ) -> Result<Vec<(SessionId, Epoch)>, StoreError> {
        let conn = &mut self.db;
        let mut sessions: Vec<&[u8]> = pairs.iter().map(|(s, _)| s.as_bytes().as_slice()).collect();
        sessions.sort_unstable();
        sessions.dedup();
        let mut held: HashSet<(Vec<u8>, i32)> = HashSet::new();
        for chunk in sessions.chunks(ROWS_PER_STATEMENT) {
            let rows: Vec<(Vec<u8>, i32)> = db_run!(conn: {
                session_keys::table
                    .filter(session_keys::recipient_user_id.eq(user.as_str()))
                    .filter(session_keys::recipient_device_id.eq(device.as_str()))
                    .filter(session_keys::session_id.eq_any(chunk))
                    .filter(session_keys::revoked_at.is_null())
                    .select((session_keys::session_id, session_keys::epoch))
                    .load(conn)
                    .await?
            });
            held.extend(rows);
        }
        let mut out = Vec::new();
        for &(s, e) in pairs {
            if held.remove(&(s.as_bytes().to_vec(), epoch_db(e)?)) {
                out.push((s, e));
            }
        }
        Ok(out)
    }

    /// The message with this id, deleted or not.
    pub async fn message(&mut self, id: &MessageId) -> Result<Option<Message>, StoreError> {
        let conn = &mut self.db;
        let row: Option<MessageRow> = db_run!(conn: {
            messages::table
                .find(id.as_bytes().as_slice())
                .select(MessageRow::as_select())
                .first(conn)
                .await
                .optional()?
        });
        row.map(Message::try_from).transpose()
    }
}

/// The SQLite timeline, the same steps as [`TIMELINE_SQL`] run on the connection's thread:
/// SQLite has no `LATERAL`, and each statement is a local call.
fn sqlite_timeline(
    c: &mut diesel::SqliteConnection,
    user: &str,
    device: &str,
    session: Option<SessionId>,
    below_at: i64,
    below_id: Vec<u8>,
    limit: i64,
) -> QueryResult<Vec<MessageRow>> {
    let mut keys = session_keys::table
        .filter(session_keys::recipient_user_id.eq(user))
        .filter(session_keys::recipient_device_id.eq(device))
        .filter(session_keys::revoked_at.is_null())
        .select((session_keys::session_id, session_keys::epoch))
        .into_boxed();
    if let Some(s) = session {
        keys = keys.filter(session_keys::session_id.eq(s.as_bytes().to_vec()));
    }
    let keys: Vec<(Vec<u8>, i32)> = diesel::RunQueryDsl::load(keys, c)?;
    let mut page: Vec<(i64, Vec<u8>)> = Vec::new();
    for (sid, epoch) in keys {
        let positions = messages::table
            .filter(messages::session_id.eq(sid))
            .filter(messages::epoch.eq(epoch))
            .filter(messages::deleted_at.is_null())
            .filter(messages::created_at.le(below_at))
            .filter(
                messages::created_at
                    .lt(below_at)
                    .or(messages::message_id.lt(&below_id)),
            )
            .order((messages::created_at.desc(), messages::message_id.desc()))
            .limit(limit)
            .select((messages::created_at, messages::message_id));
        let positions: Vec<(i64, Vec<u8>)> = diesel::RunQueryDsl::load(positions, c)?;
        page.extend(positions);
        page.sort_unstable_by(|a, b| b.cmp(a));
        page.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    let ids: Vec<Vec<u8>> = page.into_iter().map(|(_, id)| id).collect();
    let rows = messages::table
        .filter(messages::message_id.eq_any(&ids))
        .select(MessageRow::as_select());
    let mut rows: Vec<MessageRow> = diesel::RunQueryDsl::load(rows, c)?;
    rows.sort_unstable_by(|a, b| (b.created_at, &b.message_id).cmp(&(a.created_at, &a.message_id)));
    Ok(rows)
}
