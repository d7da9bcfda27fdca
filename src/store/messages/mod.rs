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
//!   A writer that stalls is not waited for past its bound (`horizon.rs`: it can no longer
//!   commit), so a paused replica delays listings by seconds, not for as long as it is paused.
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
//!
//! # Where it is written
//!
//! The records are here; the write path (PutMessages batches, their retries, deletion) is
//! `write.rs`, the listings and the key reads access decisions take are `read.rs`, and the
//! PostgreSQL visibility horizon is `horizon.rs`. The PostgreSQL statements Diesel's query
//! builder cannot express are `.sql` files beside them, compiled in with `include_str!`.
//! Every difference between the backends stays in these files.

mod horizon;
mod read;
mod write;

use diesel::prelude::*;

use super::schema::messages;
use super::{unsigned, StoreError, Timestamp};
use crate::crypto::ids::{DeviceId, Epoch, MessageId, SessionId, UserId};
use crate::store::error::Stored;

pub use horizon::MESSAGE_WRITER_APPLICATION_NAME;
pub use read::postgres_timeline_sql;

/// Rows per multi-row INSERT or `IN` list, under both backends' limits on bound parameters.
const ROWS_PER_STATEMENT: usize = 500;

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

/// How much one page of a listing may hold. The store reads no more than this: the rows'
/// sizes are read first (in the same statement on PostgreSQL), and only the bodies that fit
/// are fetched, so a page of large messages never passes through memory whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLimit {
    /// Most messages.
    pub rows: u32,
    /// Most message bytes: nonce, ciphertext and associated data, summed over the page. A
    /// page holds at least one message, however large, so that paging always moves on.
    pub bytes: usize,
}

/// One page of a listing, newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The messages.
    pub messages: Vec<Message>,
    /// Whether the page stopped at one of its limits (rows or bytes), so that more may
    /// follow below its last message; `false` means the listing ended.
    pub full: bool,
}

/// The bytes of a message a page's byte limit counts: nonce, ciphertext, associated data.
pub fn message_bytes(m: &Message) -> usize {
    m.nonce.len() + m.ciphertext.len() + m.associated_data.as_ref().map_or(0, Vec::len)
}

/// Whose view a listing takes: a device, by its keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reader {
    /// The device's user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
}

/// A `messages` row as both backends return it, by the query builder or by raw SQL, and as
/// SQLite inserts it.
#[derive(Queryable, Selectable, QueryableByName, Insertable)]
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
            message_id: MessageId::from_slice(&r.message_id).stored("message id")?,
            session_id: SessionId::from_slice(&r.session_id).stored("message session id")?,
            epoch: epoch_from_db("message epoch", r.epoch)?,
            author: Author {
                user: UserId::new(r.author_user_id).stored("message author user id")?,
                device: r
                    .author_device_id
                    .map(DeviceId::new)
                    .transpose()
                    .stored("message author device id")?,
            },
            nonce: r.nonce,
            ciphertext: r.ciphertext,
            associated_data: r.associated_data,
            created_at: Timestamp::from_unix_micros(r.created_at),
            deleted_at: r.deleted_at.map(Timestamp::from_unix_micros),
        })
    }
}

/// An epoch as the database keeps it.
fn epoch_db(e: Epoch) -> Result<i32, StoreError> {
    i32::try_from(e.get())
        .map_err(|_| StoreError::Internal(format!("epoch {e} does not fit the database")))
}

/// An epoch the database kept, treating one out of range as corrupt data.
fn epoch_from_db(what: &str, e: i32) -> Result<Epoch, StoreError> {
    Epoch::new(unsigned(what, e)?).map_err(|err| StoreError::corrupt(what, err))
}
