//! Encrypted messages (EncryptedMessage): stored as their authors sealed them, listed newest
//! first by keyset cursors, hidden when deleted.
//!
//! # Who reads what
//!
//! Access follows keys: a device reads the messages of exactly the session epochs it holds a
//! live session key for (a `session_keys` row for it with `revoked_at` unset). A device removed
//! at epoch 2 keeps its epoch-1 key, so it still reads epoch-1 messages and never an epoch-2
//! one. Deleting a session revokes its keys in the same transaction, which hides its messages
//! from every listing; a deleted message (`deleted_at` set) is in no listing either.
//!
//! # Order and cursors
//!
//! Every listing is ordered by the **position** `(created_at, message_id)`, newest first.
//! `message_id` is the primary key, so positions are unique and the order is total; a cursor
//! is the position of the last message of a page, and the next page is the messages strictly
//! older than it (a keyset, never an offset, so an insert or a delete elsewhere shifts
//! nothing). `created_at` comes from the server, never from the caller: every message of one
//! PutMessages batch shares it, and the ids order them within the batch.
//!
//! A newest-first cursor only stays exact if messages never appear *below* positions a reader
//! has already been shown: otherwise a message committed late, with an older time than one
//! already listed, would be stepped over by a cursor that has passed its position, and a
//! client that catches up by paging from the top until it meets a message it already has
//! would miss it. The store keeps that invariant, **new messages only appear above every
//! message already listed**, on both backends:
//!
//! - **SQLite** has one writer at a time (`BEGIN IMMEDIATE`, and the store's single
//!   connection). A batch takes its time after the write lock is held, so it is later than
//!   every committed message, and no reader sees it before it commits.
//! - **PostgreSQL** runs writers concurrently, and a writer that took its time first may
//!   commit last. Taking times in commit order would need one lock for every message write
//!   on every replica; instead listings stop at a **visibility horizon**. A PutMessages
//!   transaction first marks itself as a message writer (`SET LOCAL application_name =
//!   'keyhold:put-messages'`, which `pg_stat_activity` shows at once) and only then reads
//!   the database clock for `created_at`, so each writer's messages are no older than its
//!   transaction start. A listing first reads the horizon, the earlier of its own statement
//!   time and the start of the oldest message writer still running in this database, and
//!   then, in a later statement (so with a later snapshot), lists only messages older than
//!   the horizon. A writer that was running when the horizon was read writes at or after
//!   it; one that had not yet marked itself takes its time after the horizon was read; one
//!   that had finished is committed and visible to the later snapshot. So every message
//!   that will ever exist below the horizon is already visible, and nothing can later
//!   appear below a listed one. The cost is that a message is listed only once every
//!   message write that started before it has ended: a few milliseconds with short batches.
//!   This needs the replicas to share one database role (so they see each other's
//!   `xact_start`; or hold `pg_read_all_stats`), `track_activities` on (the default), and a
//!   database clock that does not step backwards (NTP slews it).
//!
//! One case stays outside the invariant by design: a device given a key to an *older* epoch
//! (AddRecipients on a session it was not in) starts reading that epoch's older messages.
//! It learns of the key through SyncSessionKeys and can list that session.
//!
//! # Indexes (see the migration)
//!
//! - The timeline and ListSessionMessages: the reader's live keys come from
//!   `session_keys_live_by_recipient`; for each (session, epoch) a backward range scan of
//!   `messages_by_session_epoch_time` starting below the cursor yields at most one page;
//!   the newest page of those is kept and only its rows are read. On PostgreSQL that is one
//!   statement (`LATERAL`); on SQLite, where calls are local, the same steps run on the
//!   connection's thread. The cost depends on how many epochs the reader holds keys for and
//!   on the page size, and grows only with the logarithm of the number of messages.
//! - ListAuthorMessages: a backward range scan of `messages_by_author_time`, each row
//!   checked against the reader's keys (on PostgreSQL, against an array of them computed once).

use std::collections::{HashMap, HashSet};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Binary, Bool, Integer, Nullable, Text};
use diesel_async::RunQueryDsl;

use super::schema::{messages, session_keys, sessions};
use super::sql::coalesce;
use super::{db_run, unsigned, DbConn, Store, StoreError, Timestamp, Tx};
use crate::crypto::ids::{DeviceId, Epoch, MessageId, SessionId, UserId};

/// Rows per multi-row INSERT or `IN` list, under both backends' limits on bound parameters.
const ROWS_PER_STATEMENT: usize = 500;

/// The `application_name` a PutMessages transaction carries on PostgreSQL while it runs: the
/// listings' visibility horizon waits for transactions that carry it (see the module docs).
pub const MESSAGE_WRITER_APPLICATION_NAME: &str = "keyhold:put-messages";

/// A message to store, already checked by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    /// Its id, chosen by the author (UUIDv7).
    pub message_id: MessageId,
    /// The session.
    pub session_id: SessionId,
    /// The epoch whose DEK sealed it.
    pub epoch: Epoch,
    /// The AES-GCM nonce.
    pub nonce: Vec<u8>,
    /// The ciphertext with its tag.
    pub ciphertext: Vec<u8>,
    /// Associated data the author bound, if any (stored in the clear).
    pub associated_data: Option<Vec<u8>>,
}

/// Who wrote a batch: a user, and the device when a device wrote it itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Author {
    /// The author user.
    pub user: UserId,
    /// The author device; `None` when an app server stored the message for the user.
    pub device: Option<DeviceId>,
}

/// A stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Its id.
    pub message_id: MessageId,
    /// The session.
    pub session_id: SessionId,
    /// The epoch whose DEK sealed it.
    pub epoch: Epoch,
    /// Who wrote it.
    pub author: Author,
    /// The AES-GCM nonce.
    pub nonce: Vec<u8>,
    /// The ciphertext with its tag.
    pub ciphertext: Vec<u8>,
    /// Associated data, if any.
    pub associated_data: Option<Vec<u8>>,
    /// When the server stored it.
    pub created_at: Timestamp,
    /// When it was deleted, if it was.
    pub deleted_at: Option<Timestamp>,
}

impl Message {
    /// Its place in every listing.
    pub fn position(&self) -> Position {
        Position {
            created_at: self.created_at,
            message_id: self.message_id,
        }
    }

    /// Whether `new`, written by `author`, is this same message: every stored byte equal.
    pub fn is_same_as(&self, author: &Author, new: &NewMessage) -> bool {
        self.message_id == new.message_id
            && self.session_id == new.session_id
            && self.epoch == new.epoch
            && &self.author == author
            && self.nonce == new.nonce
            && self.ciphertext == new.ciphertext
            && self.associated_data == new.associated_data
    }
}

/// A place in the newest-first order of messages: `(created_at, message_id)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// The message's server time.
    pub created_at: Timestamp,
    /// The message's id, which breaks ties between messages of the same time.
    pub message_id: MessageId,
}

/// Who is writing a batch, which decides the right it needs for each (session, epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// The author device itself: it must hold a live session key for the epoch.
    Device,
    /// An app server on the author's behalf: the session must exist, not be deleted, and
    /// have reached the epoch.
    AppServer,
}

/// What PutMessages did with a batch. Every outcome but `Stored` wrote nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Every message is stored: per message of the batch, in order, its server time and
    /// whether this call stored it (`false`: it was already stored with the same bytes).
    Stored(Vec<(Timestamp, bool)>),
    /// The message at this index of the batch has an id already stored with other bytes.
    Conflict(usize),
    /// A device writer holds no live key for the epoch of the message at this index.
    NoKey(usize),
    /// The session of the message at this index does not exist or is deleted (app server).
    NoSession(usize),
    /// The message at `index` names an epoch its session has not reached (app server).
    EpochAhead {
        /// The message's index in the batch.
        index: usize,
        /// The session's current epoch.
        current: Epoch,
    },
}

/// Whose view a listing takes: a device, by its keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reader {
    /// The device's user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
}

#[derive(Queryable, Selectable, QueryableByName)]
#[diesel(table_name = messages)]
struct MessageRow {
    message_id: Vec<u8>,
    session_id: Vec<u8>,
    epoch: i32,
    author_user_id: String,
    author_device_id: Option<String>,
    nonce: Vec<u8>,
    ciphertext: Vec<u8>,
    associated_data: Option<Vec<u8>>,
    created_at: i64,
    deleted_at: Option<i64>,
}

impl TryFrom<MessageRow> for Message {
    type Error = StoreError;
    fn try_from(r: MessageRow) -> Result<Self, StoreError> {
        Ok(Message {
            message_id: MessageId::from_slice(&r.message_id)
                .map_err(|e| StoreError::corrupt("message id", e))?,
            session_id: SessionId::from_slice(&r.session_id)
                .map_err(|e| StoreError::corrupt("message session id", e))?,
            epoch: Epoch::new(unsigned("message epoch", r.epoch)?)
                .map_err(|e| StoreError::corrupt("message epoch", e))?,
            author: Author {
                user: UserId::new(r.author_user_id)
                    .map_err(|e| StoreError::corrupt("message author user id", e))?,
                device: r
                    .author_device_id
                    .map(DeviceId::new)
                    .transpose()
                    .map_err(|e| StoreError::corrupt("message author device id", e))?,
            },
            nonce: r.nonce,
            ciphertext: r.ciphertext,
            associated_data: r.associated_data,
            created_at: Timestamp::from_unix_micros(r.created_at),
            deleted_at: r.deleted_at.map(Timestamp::from_unix_micros),
        })
    }
}

#[derive(Insertable)]
#[diesel(table_name = messages)]
struct MessageInsert<'a> {
    message_id: &'a [u8],
    session_id: &'a [u8],
    epoch: i32,
    author_user_id: &'a str,
    author_device_id: Option<&'a str>,
    nonce: &'a [u8],
    ciphertext: &'a [u8],
    associated_data: Option<&'a [u8]>,
    created_at: i64,
}

/// A message row that owns its bytes, to move onto SQLite's connection thread.
struct OwnedInsert {
    message_id: Vec<u8>,
    session_id: Vec<u8>,
    epoch: i32,
    author_user_id: String,
    author_device_id: Option<String>,
    nonce: Vec<u8>,
    ciphertext: Vec<u8>,
    associated_data: Option<Vec<u8>>,
    created_at: i64,
}

impl OwnedInsert {
    fn borrowed(&self) -> MessageInsert<'_> {
        MessageInsert {
            message_id: &self.message_id,
            session_id: &self.session_id,
            epoch: self.epoch,
            author_user_id: &self.author_user_id,
            author_device_id: self.author_device_id.as_deref(),
            nonce: &self.nonce,
            ciphertext: &self.ciphertext,
            associated_data: self.associated_data.as_deref(),
            created_at: self.created_at,
        }
    }
}

fn epoch_db(e: Epoch) -> Result<i32, StoreError> {
    i32::try_from(e.get())
        .map_err(|_| StoreError::Internal(format!("epoch {e} does not fit the database")))
}

/// The bound a listing starts below: the cursor, or above every message.
fn start_below(before: Option<Position>) -> (i64, Vec<u8>) {
    match before {
        Some(p) => (p.created_at.unix_micros(), p.message_id.as_bytes().to_vec()),
        None => (i64::MAX, vec![0xFF; 16]),
    }
}

#[derive(QueryableByName)]
struct Micros {
    #[diesel(sql_type = BigInt)]
    micros: i64,
}

/// The PostgreSQL insert of a batch: one statement whatever its length (one array per
/// column), which also checks the writer's right to every (session, epoch) and inserts
/// nothing if one is refused (`$10`: a device writer must hold a live key; an app server
/// needs a live session at or past the epoch). Its `writer` CTE first marks the transaction
/// as a message writer, then reads the clock for `created_at` (CASE evaluates its condition
/// first), so that listings hold their horizon at or below its start (module docs); it is
/// volatile, so it runs once, before the first row is inserted.
const PG_INSERT: &str = "\
WITH writer AS (
    SELECT CAST(EXTRACT(EPOCH FROM CASE
               WHEN set_config('application_name', $1, true) IS NOT NULL
               THEN clock_timestamp() END) * 1000000 AS BIGINT) AS now
), batch AS (
    SELECT * FROM unnest($4::bytea[], $5::bytea[], $6::int4[], $7::bytea[], $8::bytea[],
                         $9::bytea[])
        AS b (message_id, session_id, epoch, nonce, ciphertext, associated_data)
), refused AS (
    SELECT 1 FROM batch b
    WHERE NOT CASE WHEN $10 THEN EXISTS (
              SELECT 1 FROM session_keys k
              WHERE k.recipient_user_id = $2 AND k.recipient_device_id = $3
                AND k.session_id = b.session_id AND k.epoch = b.epoch AND k.revoked_at IS NULL)
          ELSE EXISTS (
              SELECT 1 FROM sessions s
              WHERE s.session_id = b.session_id AND s.deleted_at IS NULL
                AND s.current_epoch >= b.epoch)
          END
    LIMIT 1
)
INSERT INTO messages (message_id, session_id, epoch, author_user_id, author_device_id, nonce,
                      ciphertext, associated_data, created_at)
SELECT b.message_id, b.session_id, b.epoch, $2, $3, b.nonce, b.ciphertext, b.associated_data,
       writer.now
FROM writer, batch b
WHERE NOT EXISTS (SELECT 1 FROM refused)
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id, created_at";

#[derive(QueryableByName)]
struct Inserted {
    #[diesel(sql_type = Binary)]
    message_id: Vec<u8>,
    #[diesel(sql_type = BigInt)]
    created_at: i64,
}

/// [`PG_INSERT`] with its values, as a query type of its own with a static id, so that
/// diesel-async prepares it once per connection and PostgreSQL parses it once (a raw
/// `sql_query` is parsed and planned again at every call: measured ~0.6 ms of a single
/// message's ~1.2 ms in the database).
struct PgInsert<'a> {
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

impl diesel::query_builder::QueryId for PgInsert<'_> {
    type QueryId = PgInsert<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for PgInsert<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for PgInsert<'_> {
    /// Writes [`PG_INSERT`], each `$n` in it becoming a bind of the n-th value (Diesel numbers
    /// the binds itself, in the order they are pushed).
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> QueryResult<()> {
        let mut rest = PG_INSERT;
        while let Some(at) = rest.find('$') {
            out.push_sql(&rest[..at]);
            let digits = rest[at + 1..]
                .bytes()
                .take_while(u8::is_ascii_digit)
                .count();
            match &rest[at + 1..at + 1 + digits] {
                "1" => out.push_bind_param::<Text, _>(MESSAGE_WRITER_APPLICATION_NAME)?,
                "2" => out.push_bind_param::<Text, _>(self.user)?,
                "3" => out.push_bind_param::<Nullable<Text>, _>(&self.device)?,
                "4" => out.push_bind_param::<Array<Binary>, _>(&self.ids)?,
                "5" => out.push_bind_param::<Array<Binary>, _>(&self.sessions)?,
                "6" => out.push_bind_param::<Array<Integer>, _>(&self.epochs)?,
                "7" => out.push_bind_param::<Array<Binary>, _>(&self.nonces)?,
                "8" => out.push_bind_param::<Array<Binary>, _>(&self.ciphertexts)?,
                "9" => out.push_bind_param::<Array<Nullable<Binary>>, _>(&self.ads)?,
                "10" => out.push_bind_param::<Bool, _>(&self.device_writer)?,
                other => {
                    return Err(diesel::result::Error::QueryBuilderError(
                        format!("PG_INSERT has no parameter ${other}").into(),
                    ))
                }
            }
            rest = &rest[at + 1 + digits..];
        }
        out.push_sql(rest);
        Ok(())
    }
}

/// Inserts a batch, skipping ids already stored, if the writer may write every (session,
/// epoch) of it (nothing otherwise); returns the ids it stored and their time.
async fn insert_new(
    conn: &mut DbConn,
    writer: Writer,
    author: &Author,
    batch: &[NewMessage],
) -> Result<Vec<(Vec<u8>, i64)>, StoreError> {
    let rows = batch
        .iter()
        .map(|m| {
            Ok(OwnedInsert {
                message_id: m.message_id.as_bytes().to_vec(),
                session_id: m.session_id.as_bytes().to_vec(),
                epoch: epoch_db(m.epoch)?,
                author_user_id: author.user.to_string(),
                author_device_id: author.device.as_ref().map(DeviceId::to_string),
                nonce: m.nonce.clone(),
                ciphertext: m.ciphertext.clone(),
                associated_data: m.associated_data.clone(),
                created_at: 0,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    // On SQLite, where calls are local, the right is checked by its own queries first.
    if matches!(conn, DbConn::Sqlite(_)) && refusal(conn, writer, author, batch).await?.is_some() {
        return Ok(Vec::new());
    }
    db_run!(conn: sqlite {
        // The transaction holds SQLite's write lock already: later than every commit. Diesel
        // has no multi-row INSERT with ON CONFLICT for SQLite; the rows go one by one on the
        // connection's thread (each a local call).
        let now = Timestamp::now().unix_micros();
        Ok(conn
            .spawn_blocking(move |c| {
                let mut stored = Vec::with_capacity(rows.len());
                for mut row in rows {
                    row.created_at = now;
                    let id: Option<Vec<u8>> = diesel::RunQueryDsl::get_result(
                        diesel::insert_into(messages::table)
                            .values(row.borrowed())
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
        let mut insert = PgInsert {
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

/// The visibility horizon of a listing: only messages older than it are listed (module
/// docs). Must run outside a transaction, before the listing's own statement.
async fn horizon(conn: &mut DbConn) -> Result<i64, StoreError> {
    db_run!(conn: sqlite {
        Ok(i64::MAX)
    } postgres {
        let row: Micros = diesel::sql_query(
            "SELECT CAST(EXTRACT(EPOCH FROM LEAST(statement_timestamp(), MIN(xact_start))) \
                 * 1000000 AS BIGINT) AS micros \
             FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = $1 \
               AND pid <> pg_backend_pid()",
        )
        .bind::<Text, _>(MESSAGE_WRITER_APPLICATION_NAME)
        .get_result(conn)
        .await?;
        Ok(row.micros)
    })
}

async fn messages_by_id(conn: &mut DbConn, ids: &[&[u8]]) -> Result<Vec<Message>, StoreError> {
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

/// Why a batch may not be written, if it may not: the first message whose (session, epoch)
/// the writer has no right to.
async fn refusal(
    conn: &mut DbConn,
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
            let readable = readable_pairs(conn, &author.user, device, &pairs).await?;
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
                        let current = get_session_epoch(conn, &s).await?;
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
async fn get_session_epoch(conn: &mut DbConn, id: &SessionId) -> Result<Option<Epoch>, StoreError> {
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
        .map(|e| {
            Epoch::new(unsigned("session epoch", e)?)
                .map_err(|err| StoreError::corrupt("session epoch", err))
        })
        .transpose()
}

async fn put(
    conn: &mut DbConn,
    writer: Writer,
    author: &Author,
    batch: &[NewMessage],
) -> Result<PutOutcome, StoreError> {
    // Insert first: a fresh batch, the common case, costs one statement, the writer's right
    // checked in it. Ids already stored (a retry, or a concurrent writer PostgreSQL waited
    // for) are skipped and checked after.
    let inserted = insert_new(conn, writer, author, batch).await?;
    if inserted.is_empty() {
        if let Some(refused) = refusal(conn, writer, author, batch).await? {
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
        messages_by_id(conn, &skipped).await?
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

/// Of `pairs`, the (session, epoch) pairs the device holds a live key for.
async fn readable_pairs(
    conn: &mut DbConn,
    user: &UserId,
    device: &DeviceId,
    pairs: &[(SessionId, Epoch)],
) -> Result<Vec<(SessionId, Epoch)>, StoreError> {
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

async fn get_message(conn: &mut DbConn, id: &MessageId) -> Result<Option<Message>, StoreError> {
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

async fn soft_delete(conn: &mut DbConn, id: &MessageId) -> Result<Timestamp, StoreError> {
    let now = Timestamp::now().unix_micros();
    let mid = id.as_bytes().as_slice();
    let updated = db_run!(conn: {
        diesel::update(messages::table.find(mid))
            .set(messages::deleted_at.eq(coalesce(messages::deleted_at, now)))
            .execute(conn)
            .await?
    });
    if updated == 0 {
        return Err(StoreError::NotFound);
    }
    let deleted_at: Option<i64> = db_run!(conn: {
        messages::table.find(mid).select(messages::deleted_at).first(conn).await?
    });
    Ok(Timestamp::from_unix_micros(deleted_at.unwrap_or(now)))
}

/// The PostgreSQL timeline: the reader's live keys, one bounded backward scan per key, the
/// newest page of those, and only then the page's rows. `{session}` is empty or a filter.
///
/// The rows are fetched by `= ANY (ARRAY(…))` rather than joined: a join makes the planner
/// weigh a merge join, whose costing reads the extremes of the primary key index, and on
/// PostgreSQL 15 that walks every dead entry at the index's end (recently deleted or retried
/// messages): thousands of buffers and milliseconds of planning per call at 10 million rows.
const PG_TIMELINE: &str = "\
WITH readable AS (
    SELECT session_id, epoch FROM session_keys
    WHERE recipient_user_id = $1 AND recipient_device_id = $2 AND revoked_at IS NULL{session}
), page AS (
    SELECT p.message_id AS id FROM readable r
    CROSS JOIN LATERAL (
        SELECT m.created_at, m.message_id FROM messages m
        WHERE m.session_id = r.session_id AND m.epoch = r.epoch AND m.deleted_at IS NULL
          AND m.created_at < $3 AND (m.created_at, m.message_id) < ($4, $5)
        ORDER BY m.created_at DESC, m.message_id DESC
        LIMIT $6
    ) p
    ORDER BY p.created_at DESC, p.message_id DESC
    LIMIT $6
)
SELECT m.message_id, m.session_id, m.epoch, m.author_user_id, m.author_device_id, m.nonce,
       m.ciphertext, m.associated_data, m.created_at, m.deleted_at
FROM messages m
WHERE m.message_id = ANY (ARRAY(SELECT id FROM page))
ORDER BY m.created_at DESC, m.message_id DESC";

/// The timeline statement for PostgreSQL, with or without the one-session filter (`$7`).
pub fn postgres_timeline_sql(one_session: bool) -> String {
    PG_TIMELINE.replace(
        "{session}",
        if one_session {
            " AND session_id = $7"
        } else {
            ""
        },
    )
}

async fn list_readable(
    conn: &mut DbConn,
    reader: &Reader,
    session: Option<SessionId>,
    before: Option<Position>,
    limit: u32,
) -> Result<Vec<Message>, StoreError> {
    let horizon = horizon(conn).await?;
    let (below_at, below_id) = start_below(before);
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

/// The SQLite timeline, the same steps as [`PG_TIMELINE`] run on the connection's thread:
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

/// The PostgreSQL listing of an author's messages a device can read: a backward range scan
/// of `messages_by_author_time`, each row kept if its (session, epoch) is among the reader's
/// live keys. The keys are an array computed once, not a join, for the reason given at
/// [`PG_TIMELINE`] (a semi-join's costing walked ~3,000 buffers per call at 10 million rows).
const PG_AUTHOR: &str = "\
SELECT m.message_id, m.session_id, m.epoch, m.author_user_id, m.author_device_id, m.nonce,
       m.ciphertext, m.associated_data, m.created_at, m.deleted_at
FROM messages m
WHERE m.author_user_id = $1 AND m.deleted_at IS NULL
  AND m.created_at < $2 AND (m.created_at, m.message_id) < ($3, $4)
  AND m.session_id || int4send(m.epoch) = ANY (ARRAY(
        SELECT k.session_id || int4send(k.epoch) FROM session_keys k
        WHERE k.recipient_user_id = $5 AND k.recipient_device_id = $6
          AND k.revoked_at IS NULL))
ORDER BY m.created_at DESC, m.message_id DESC
LIMIT $7";

async fn list_by_author(
    conn: &mut DbConn,
    reader: &Reader,
    author: &UserId,
    before: Option<Position>,
    limit: u32,
) -> Result<Vec<Message>, StoreError> {
    let horizon = horizon(conn).await?;
    let (below_at, below_id) = start_below(before);
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
        diesel::sql_query(PG_AUTHOR)
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
        put(&mut self.conn.db, writer, author, batch).await
    }

    /// Of `pairs`, the (session, epoch) pairs the device holds a live session key for, in
    /// the order given, each once.
    pub async fn readable_epochs(
        &mut self,
        user: &UserId,
        device: &DeviceId,
        pairs: &[(SessionId, Epoch)],
    ) -> Result<Vec<(SessionId, Epoch)>, StoreError> {
        readable_pairs(&mut self.conn.db, user, device, pairs).await
    }

    /// The message with this id, deleted or not.
    pub async fn message(&mut self, id: &MessageId) -> Result<Option<Message>, StoreError> {
        get_message(&mut self.conn.db, id).await
    }

    /// Soft-deletes a message; returns when it was deleted (the first time, if it already
    /// was). [`StoreError::NotFound`] if there is no such message.
    pub async fn delete_message(&mut self, id: &MessageId) -> Result<Timestamp, StoreError> {
        soft_delete(&mut self.conn.db, id).await
    }
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
    /// A batch of several messages is one transaction. On PostgreSQL a batch of one is the
    /// insert statement alone, which is atomic by itself: with nothing to take back, it needs
    /// no BEGIN and COMMIT (three round trips fewer, most of a single message's cost).
    pub async fn put_messages(
        &self,
        writer: Writer,
        author: Author,
        batch: Vec<NewMessage>,
    ) -> Result<PutOutcome, StoreError> {
        if batch.len() == 1 && self.backend() == super::Backend::Postgres {
            return put(&mut self.db_conn().await?, writer, &author, &batch).await;
        }
        self.transaction(async move |tx| tx.put_messages(writer, &author, &batch).await)
            .await
    }

    /// The messages a device can read (of the epochs it holds live keys for), across
    /// sessions or in one session, newest first, strictly older than `before`, at most
    /// `limit`. See the module docs for the order and the visibility horizon.
    pub async fn readable_messages(
        &self,
        reader: &Reader,
        session: Option<SessionId>,
        before: Option<Position>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        list_readable(&mut self.db_conn().await?, reader, session, before, limit).await
    }

    /// The messages `author` wrote that a device can read, newest first, strictly older
    /// than `before`, at most `limit`.
    pub async fn author_messages(
        &self,
        reader: &Reader,
        author: &UserId,
        before: Option<Position>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        list_by_author(&mut self.db_conn().await?, reader, author, before, limit).await
    }

    /// The epochs of one session the device holds a live key for, ascending.
    pub async fn readable_session_epochs(
        &self,
        user: &UserId,
        device: &DeviceId,
        session: &SessionId,
    ) -> Result<Vec<Epoch>, StoreError> {
        let mut conn = self.db_conn().await?;
        let conn = &mut conn;
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
            .map(|e| {
                Epoch::new(unsigned("session key epoch", e)?)
                    .map_err(|err| StoreError::corrupt("session key epoch", err))
            })
            .collect()
    }
}
