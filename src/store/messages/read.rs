//! The listings, newest first by keyset cursors below the visibility horizon, and the reads of
//! a device's keys that access decisions take.
//!
//! Each listing is written once per backend where the backends must differ: on PostgreSQL
//! one statement (`timeline.sql`, `author.sql`), on SQLite, where calls are local, the same
//! steps through Diesel's query builder.
//!
//! **Bounded pages.** A page is bounded in bytes as well as in rows ([`PageLimit`]), and the
//! bound holds inside the store, not only on the wire: a listing picks its page's positions,
//! sums the sizes of their messages in order (`octet_length`/`length`, which read a large
//! value's length from its header, not its bytes), and fetches only the bodies of the longest
//! prefix within the byte bound (at least one message). On PostgreSQL that is a running sum
//! in the listing's statement, so the page is still one snapshot; on SQLite three statements
//! in one read transaction. A page cut by bytes ends at a position like any other, and the
//! next page starts strictly below it, so nothing is skipped or repeated.

use std::collections::{HashMap, HashSet};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Text};
use diesel_async::RunQueryDsl;

use super::{
    epoch_db, epoch_from_db, Message, MessageRow, Page, PageLimit, Position, Reader,
    ROWS_PER_STATEMENT,
};
use crate::crypto::ids::{DeviceId, Epoch, MessageId, SessionId, UserId};
use crate::store::schema::{messages, session_keys};
use crate::store::{db_run, Conn, StoreError};

/// The PostgreSQL timeline: the reader's live keys, one bounded backward scan per key, the
/// newest page of those, then the page's rows with a running sum of their sizes, keeping the
/// rows within the byte bound. `{session}` is empty or a filter ([`postgres_timeline_sql`]).
///
/// The rows are fetched by `= ANY (ARRAY(…))` rather than joined: a join makes the planner
/// weigh a merge join, whose costing reads the extremes of the primary key index, and on
/// PostgreSQL 15 that walks every dead entry at the index's end (recently deleted or retried
/// messages): thousands of buffers and milliseconds of planning per call at 10 million rows.
/// The window functions run over the page's rows as they come from the heap, where a large
/// value is still a TOAST pointer; only the rows kept are sent, so only their bodies are read.
const TIMELINE_SQL: &str = include_str!("timeline.sql");

/// The PostgreSQL listing of an author's messages a device can read: a backward range scan
/// of `messages_by_author_time`, each row kept if its (session, epoch) is among the reader's
/// live keys, then the same running sum as [`TIMELINE_SQL`]. The keys are an array computed
/// once, not a join, for the reason given at [`TIMELINE_SQL`] (a semi-join's costing walked
/// ~3,000 buffers per call at 10 million rows).
const AUTHOR_SQL: &str = include_str!("author.sql");

/// The size a page's byte bound counts, in SQL (both backends' `length` of a BLOB reads its
/// header, not its bytes; PostgreSQL's `octet_length` likewise).
const SQLITE_MESSAGE_BYTES: &str =
    "length(nonce) + length(ciphertext) + coalesce(length(associated_data), 0)";

/// The timeline statement for PostgreSQL, with or without the one-session filter (`$8`).
///
/// Its parameters: `$1` the reader's user, `$2` its device, `$3` the visibility horizon,
/// `$4` and `$5` the position to start below, `$6` the page's rows, `$7` its bytes. Each row
/// carries, after the message's columns, `page_rows`: the rows of the page before the byte
/// bound cut it.
pub fn postgres_timeline_sql(one_session: bool) -> String {
    TIMELINE_SQL.replace(
        "{session}",
        if one_session {
            " AND session_id = $8"
        } else {
            ""
        },
    )
}

/// A row of a PostgreSQL listing: the message and the page's rows before the byte cut.
#[derive(QueryableByName)]
struct ListedRow {
    #[diesel(embed)]
    message: MessageRow,
    #[diesel(sql_type = BigInt)]
    page_rows: i64,
}

/// The bound a listing starts below: the cursor, or above every message.
fn start_below(before: Option<Position>) -> (i64, Vec<u8>) {
    match before {
        Some(p) => (p.created_at.unix_micros(), p.message_id.as_bytes().to_vec()),
        None => (i64::MAX, vec![0xFF; 16]),
    }
}

/// The byte bound as SQL takes it.
fn bytes_db(limit: PageLimit) -> i64 {
    i64::try_from(limit.bytes).unwrap_or(i64::MAX)
}

/// How many of a page's messages, newest first, of these sizes fit within `bytes`: the
/// longest prefix whose sum stays within it, and at least one.
fn rows_within(sizes: impl IntoIterator<Item = i64>, bytes: usize) -> usize {
    let bound = i64::try_from(bytes).unwrap_or(i64::MAX);
    let mut sum: i64 = 0;
    let mut kept = 0;
    for size in sizes {
        sum = sum.saturating_add(size);
        if sum > bound && kept > 0 {
            break;
        }
        kept += 1;
    }
    kept
}

/// A page from a PostgreSQL listing's rows.
fn page_of_listed(rows: Vec<ListedRow>, limit: PageLimit) -> Result<Page, StoreError> {
    let page_rows = <[ListedRow]>::first(&rows).map_or(0, |r| r.page_rows);
    let full = page_rows > 0
        && (page_rows >= i64::from(limit.rows)
            || usize::try_from(page_rows).is_ok_and(|n| n > rows.len()));
    let messages = rows
        .into_iter()
        .map(|r| Message::try_from(r.message))
        .collect::<Result<_, _>>()?;
    Ok(Page { messages, full })
}

impl Conn {
    /// The messages a device can read (of the epochs it holds live keys for), across
    /// sessions or in one session, newest first, strictly older than `before`, within
    /// `limit`. See the module docs for the order and the visibility horizon: call it on a
    /// connection outside a transaction.
    pub async fn readable_messages(
        &mut self,
        reader: &Reader,
        session: Option<SessionId>,
        before: Option<Position>,
        limit: PageLimit,
    ) -> Result<Page, StoreError> {
        let horizon = self.horizon().await?;
        let (below_at, below_id) = start_below(before);
        let conn = &mut self.db;
        let page: Page = db_run!(conn: sqlite {
            let (user, device) = (reader.user.to_string(), reader.device.to_string());
            let (rows, full) = conn
                .spawn_blocking(move |c| {
                    c.transaction(|c| {
                        let page = sqlite_timeline_page(
                            c, &user, &device, session, below_at, below_id, limit.rows,
                        )?;
                        sqlite_bodies_within(c, page, limit)
                    })
                })
                .await?;
            Page {
                messages: rows.into_iter().map(Message::try_from).collect::<Result<_, _>>()?,
                full,
            }
        } postgres {
            let query = diesel::sql_query(postgres_timeline_sql(session.is_some()))
                .bind::<Text, _>(reader.user.as_str())
                .bind::<Text, _>(reader.device.as_str())
                .bind::<BigInt, _>(horizon)
                .bind::<BigInt, _>(below_at)
                .bind::<Binary, _>(below_id)
                .bind::<BigInt, _>(i64::from(limit.rows))
                .bind::<BigInt, _>(bytes_db(limit));
            let rows: Vec<ListedRow> = match session {
                Some(s) => query.bind::<Binary, _>(s.as_bytes().to_vec()).load(conn).await?,
                None => query.load(conn).await?,
            };
            page_of_listed(rows, limit)?
        });
        Ok(page)
    }

    /// The messages `author` wrote that a device can read, newest first, strictly older
    /// than `before`, within `limit`; like [`Conn::readable_messages`], outside a
    /// transaction.
    pub async fn author_messages(
        &mut self,
        reader: &Reader,
        author: &UserId,
        before: Option<Position>,
        limit: PageLimit,
    ) -> Result<Page, StoreError> {
        let horizon = self.horizon().await?;
        let (below_at, below_id) = start_below(before);
        let conn = &mut self.db;
        let page: Page = db_run!(conn: sqlite {
            let (user, device) = (reader.user.to_string(), reader.device.to_string());
            let author = author.to_string();
            let (rows, full) = conn
                .spawn_blocking(move |c| {
                    c.transaction(|c| {
                        let page = sqlite_author_page(
                            c, &author, &user, &device, below_at, below_id, limit.rows,
                        )?;
                        sqlite_bodies_within(c, page, limit)
                    })
                })
                .await?;
            Page {
                messages: rows.into_iter().map(Message::try_from).collect::<Result<_, _>>()?,
                full,
            }
        } postgres {
            let rows: Vec<ListedRow> = diesel::sql_query(AUTHOR_SQL)
                .bind::<Text, _>(author.as_str())
                .bind::<BigInt, _>(horizon)
                .bind::<BigInt, _>(below_at)
                .bind::<Binary, _>(below_id)
                .bind::<Text, _>(reader.user.as_str())
                .bind::<Text, _>(reader.device.as_str())
                .bind::<BigInt, _>(i64::from(limit.rows))
                .bind::<BigInt, _>(bytes_db(limit))
                .load(conn)
                .await?;
            page_of_listed(rows, limit)?
        });
        Ok(page)
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

/// The SQLite timeline's positions, the same steps as [`TIMELINE_SQL`] run on the
/// connection's thread (SQLite has no `LATERAL`, and each statement is a local call): the ids
/// of at most `rows` messages, newest first.
fn sqlite_timeline_page(
    c: &mut diesel::SqliteConnection,
    user: &str,
    device: &str,
    session: Option<SessionId>,
    below_at: i64,
    below_id: Vec<u8>,
    rows: u32,
) -> QueryResult<Vec<Vec<u8>>> {
    let limit = i64::from(rows);
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
        page.truncate(usize::try_from(rows).unwrap_or(usize::MAX));
    }
    Ok(page.into_iter().map(|(_, id)| id).collect())
}

/// The SQLite listing of an author's messages a device can read: the ids of at most `rows`,
/// newest first.
fn sqlite_author_page(
    c: &mut diesel::SqliteConnection,
    author: &str,
    user: &str,
    device: &str,
    below_at: i64,
    below_id: Vec<u8>,
    rows: u32,
) -> QueryResult<Vec<Vec<u8>>> {
    let readable = session_keys::table
        .filter(session_keys::session_id.eq(messages::session_id))
        .filter(session_keys::epoch.eq(messages::epoch))
        .filter(session_keys::recipient_user_id.eq(user))
        .filter(session_keys::recipient_device_id.eq(device))
        .filter(session_keys::revoked_at.is_null());
    let ids = messages::table
        .filter(messages::author_user_id.eq(author))
        .filter(messages::deleted_at.is_null())
        .filter(messages::created_at.le(below_at))
        .filter(
            messages::created_at
                .lt(below_at)
                .or(messages::message_id.lt(&below_id)),
        )
        .filter(diesel::dsl::exists(readable))
        .order((messages::created_at.desc(), messages::message_id.desc()))
        .limit(i64::from(rows))
        .select(messages::message_id);
    diesel::RunQueryDsl::load(ids, c)
}

/// The rows of a SQLite page (`ids`, newest first) within `limit`'s bytes, and whether the
/// page was full: the sizes first, then only the bodies that fit.
fn sqlite_bodies_within(
    c: &mut diesel::SqliteConnection,
    ids: Vec<Vec<u8>>,
    limit: PageLimit,
) -> QueryResult<(Vec<MessageRow>, bool)> {
    let sizes = messages::table
        .filter(messages::message_id.eq_any(&ids))
        .select((
            messages::message_id,
            diesel::dsl::sql::<BigInt>(SQLITE_MESSAGE_BYTES),
        ));
    let sizes: HashMap<Vec<u8>, i64> = diesel::RunQueryDsl::load(sizes, c)?.into_iter().collect();
    let kept = rows_within(
        ids.iter().map(|id| sizes.get(id).copied().unwrap_or(0)),
        limit.bytes,
    );
    let full = kept < ids.len() || u32::try_from(ids.len()).is_ok_and(|n| n >= limit.rows);
    let ids = &ids[..kept];
    let rows = messages::table
        .filter(messages::message_id.eq_any(ids))
        .select(MessageRow::as_select());
    let mut rows: Vec<MessageRow> = diesel::RunQueryDsl::load(rows, c)?;
    rows.sort_unstable_by(|a, b| (b.created_at, &b.message_id).cmp(&(a.created_at, &a.message_id)));
    Ok((rows, full && !ids.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_keeps_the_longest_prefix_within_its_bytes_and_at_least_one() {
        assert_eq!(rows_within([], 10), 0);
        assert_eq!(rows_within([4, 4, 4], 10), 2);
        assert_eq!(rows_within([4, 6, 1], 10), 2);
        assert_eq!(
            rows_within([4, 7, 1], 10),
            1,
            "a prefix: nothing after a cut"
        );
        assert_eq!(rows_within([50, 1], 10), 1, "one message, however large");
        assert_eq!(rows_within([1, 1, 1], 10), 3);
        assert_eq!(rows_within([i64::MAX, 1], 10), 1);
        assert_eq!(
            rows_within([i64::MAX, i64::MAX], usize::MAX),
            2,
            "saturates, no overflow"
        );
    }
}
