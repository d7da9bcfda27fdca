//! Idempotency records: the answer of each call made with an idempotency key, written in the
//! transaction that does the call's work, so that a retry with the same key returns the first
//! answer and writes nothing.
//!
//! **Claim first, answer last, one transaction.** A keyed call's transaction
//! ([`Store::transaction_recorded`]) starts by claiming its key: it inserts the record with no
//! answer yet (`INSERT … ON CONFLICT DO NOTHING`). It then does the work and, before it commits,
//! writes the encoded answer into the record. A record is therefore committed with its answer
//! or not at all. A second call with the same key, on any replica, finds the committed record
//! and replays it; one that arrives while the first is still running waits at its claim — on
//! PostgreSQL the unique index makes the insert wait for the transaction holding the same key,
//! on SQLite the one write lock does — and then finds the key taken:
//! [`StoreError::VersionConflict`], its transaction rolls back having written nothing, and the
//! caller reads the record the winner committed. Nothing rests on process memory.
//!
//! **Scope and retention.** A key belongs to a scope (the calling token's principal), so keys
//! of different callers never meet. A record older than its key's retention counts as absent:
//! lookups pass over it, and a claim of the same key deletes it first and starts afresh. Each
//! claim also deletes up to [`PURGE_PER_CLAIM`] expired records of any scope (on PostgreSQL
//! skipping rows another transaction holds, so purges never wait for each other), which keeps
//! the table at the records of one retention window plus a backlog that only shrinks, at a
//! bounded cost per call.
//!
//! **No secret in the clear.** The store keeps the answer as the caller encodes it: the
//! service removes every plaintext secret first and passes the one secret a replay needs
//! again (a token) already sealed under the KEK.

use std::fmt;
use std::time::Duration;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::idempotency_records;
use super::{db_run, Conn, Store, StoreError, Timestamp, Tx, TxFn};

/// Most expired records one claim deletes.
pub const PURGE_PER_CLAIM: i64 = 16;

/// An idempotency key as the store keeps it: whose, which, the request it names, and how long
/// its answer is kept.
#[derive(Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// Whose key it is (the calling token's principal): keys of different scopes never meet.
    pub scope: String,
    /// The client's key.
    pub key: String,
    /// The call the key is used for, for messages and operators.
    pub rpc: &'static str,
    /// SHA-256 of the canonical request without its key.
    pub request_hash: [u8; 32],
    /// How long the answer is kept; an older record counts as absent.
    pub retention: Duration,
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyKey")
            .field("scope", &self.scope)
            .field("key", &self.key)
            .field("rpc", &self.rpc)
            .finish_non_exhaustive()
    }
}

impl IdempotencyKey {
    /// The oldest creation time a record of this key may have and still count, at `now`.
    fn cutoff(&self, now: Timestamp) -> i64 {
        let retention = i64::try_from(self.retention.as_micros()).unwrap_or(i64::MAX);
        now.unix_micros().saturating_sub(retention)
    }
}

/// A keyed call's answer as recorded: the encoded response without its secrets, and the one
/// secret a replay needs again, sealed under the KEK.
pub struct KeptAnswer {
    /// The encoded response, every secret removed.
    pub response: Vec<u8>,
    /// The secret the response held, sealed under the KEK; `None` if it held none.
    pub sealed_secret: Option<Vec<u8>>,
}

/// A committed record of a key, within its retention.
#[derive(Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The call the key was first used for.
    pub rpc: String,
    /// SHA-256 of that call's canonical request without its key.
    pub request_hash: Vec<u8>,
    /// Its encoded answer, without secrets.
    pub response: Vec<u8>,
    /// The answer's secret, sealed under the KEK, if it had one.
    pub sealed_secret: Option<Vec<u8>>,
    /// When the key was first used.
    pub created_at: Timestamp,
}

impl fmt::Debug for IdempotencyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyRecord")
            .field("rpc", &self.rpc)
            .field("response_bytes", &self.response.len())
            .field(
                "sealed_secret",
                &self.sealed_secret.as_ref().map(|_| "<sealed>"),
            )
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// The answer encoder of a [`Recorder`].
type Encoder<'a, R> = Box<dyn Fn(&R) -> Result<KeptAnswer, StoreError> + Send + Sync + 'a>;

/// What a keyed call records in its transaction ([`Store::transaction_recorded`]): its key, and
/// how the transaction's result `R` becomes the recorded answer. [`Recorder::unkeyed`] records
/// nothing, for calls made without a key.
pub struct Recorder<'a, R> {
    keyed: Option<(IdempotencyKey, Encoder<'a, R>)>,
}

impl<R> fmt::Debug for Recorder<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("key", &self.keyed.as_ref().map(|(k, _)| k))
            .finish()
    }
}

impl<'a, R> Recorder<'a, R> {
    /// Records nothing: the call carries no key.
    pub fn unkeyed() -> Self {
        Recorder { keyed: None }
    }

    /// Records the answer `encode` makes of the transaction's result under `key`.
    pub fn new(
        key: IdempotencyKey,
        encode: impl Fn(&R) -> Result<KeptAnswer, StoreError> + Send + Sync + 'a,
    ) -> Self {
        Recorder {
            keyed: Some((key, Box::new(encode))),
        }
    }

    /// Claims the key, first thing in the transaction.
    pub(crate) async fn claim(&self, tx: &mut Tx) -> Result<(), StoreError> {
        match &self.keyed {
            Some((key, _)) => tx.claim_idempotency_key(key).await,
            None => Ok(()),
        }
    }

    /// Writes the answer of `result`, last thing before the commit.
    pub(crate) async fn keep(&self, tx: &mut Tx, result: &R) -> Result<(), StoreError> {
        match &self.keyed {
            Some((key, encode)) => tx.keep_idempotent_answer(key, &encode(result)?).await,
            None => Ok(()),
        }
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = idempotency_records)]
struct RecordRow {
    rpc: String,
    request_hash: Vec<u8>,
    response: Option<Vec<u8>>,
    sealed_secret: Option<Vec<u8>>,
    created_at: i64,
}

impl Store {
    /// [`Store::transaction`] for a call made with an idempotency key
    /// (this module): the transaction first claims the recorder's key (a concurrent call
    /// with the same key waits here, then fails with [`StoreError::VersionConflict`] once it
    /// has committed), runs `f`, and writes the recorded answer of its result before the
    /// commit. With [`Recorder::unkeyed`] it is [`Store::transaction`].
    pub async fn transaction_recorded<R, E, F>(
        &self,
        recorder: &Recorder<'_, R>,
        f: F,
    ) -> Result<R, E>
    where
        for<'r> F: AsyncFnOnce(&'r mut Tx) -> Result<R, E>
            + TxFn<&'r mut Tx, Result<R, E>, Fut: Send>
            + Send,
        R: Send + Sync,
        E: From<StoreError> + fmt::Display + Send,
    {
        let mut tx = Tx::new(self.conn().await?);
        tx.begin(None).await?;
        let result = async {
            recorder.claim(&mut tx).await?;
            let value = f(&mut tx).await?;
            recorder.keep(&mut tx, &value).await?;
            Ok(value)
        }
        .await;
        tx.finish(result).await
    }
}

impl Conn {
    /// The committed record of `key` within its retention, if there is one.
    pub async fn idempotency_record(
        &mut self,
        key: &IdempotencyKey,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let cutoff = key.cutoff(Timestamp::now());
        let conn = &mut self.db;
        let row: Option<RecordRow> = db_run!(conn: {
            idempotency_records::table
                .filter(idempotency_records::scope.eq(key.scope.as_str()))
                .filter(idempotency_records::idempotency_key.eq(key.key.as_str()))
                .filter(idempotency_records::created_at.ge(cutoff))
                .select(RecordRow::as_select())
                .first(conn)
                .await
                .optional()?
        });
        row.map(|r| {
            let response = r.response.ok_or_else(|| {
                StoreError::corrupt("idempotency record", "committed without an answer")
            })?;
            Ok(IdempotencyRecord {
                rpc: r.rpc,
                request_hash: r.request_hash,
                response,
                sealed_secret: r.sealed_secret,
                created_at: Timestamp::from_unix_micros(r.created_at),
            })
        })
        .transpose()
    }

    /// Deletes up to `limit` records created before `before`, oldest first, on their own (for
    /// operators and tests; claims purge as they go). Returns how many were deleted.
    pub async fn purge_idempotency_records(
        &mut self,
        before: Timestamp,
        limit: i64,
    ) -> Result<u64, StoreError> {
        purge(self, before.unix_micros(), limit).await
    }
}

/// Deletes up to `limit` records created before `cutoff`, oldest first. On PostgreSQL rows
/// another transaction holds (a concurrent purge) are skipped rather than waited for.
async fn purge(conn: &mut Conn, cutoff: i64, limit: i64) -> Result<u64, StoreError> {
    let conn = &mut conn.db;
    let old = diesel::alias!(idempotency_records as old);
    let oldest = old
        .filter(old.field(idempotency_records::created_at).lt(cutoff))
        .order(old.field(idempotency_records::created_at))
        .select(old.field(idempotency_records::id))
        .limit(limit);
    let deleted = db_run!(conn: sqlite {
        diesel::delete(idempotency_records::table.filter(idempotency_records::id.eq_any(oldest)))
            .execute(conn)
            .await?
    } postgres {
        diesel::delete(
            idempotency_records::table
                .filter(idempotency_records::id.eq_any(oldest.for_update().skip_locked())),
        )
        .execute(conn)
        .await?
    });
    Ok(deleted as u64)
}

impl Tx {
    /// Claims `key` for this transaction: deletes an expired record of it, inserts the record
    /// without an answer, and purges a few expired records. If a committed record of the key
    /// is within its retention (or a concurrent transaction committed one while this one
    /// waited for it), [`StoreError::VersionConflict`]: roll back and read that record.
    pub(crate) async fn claim_idempotency_key(
        &mut self,
        key: &IdempotencyKey,
    ) -> Result<(), StoreError> {
        let now = Timestamp::now();
        let cutoff = key.cutoff(now);
        let (scope, k) = (key.scope.as_str(), key.key.as_str());
        let conn = &mut self.db;
        db_run!(conn: {
            diesel::delete(
                idempotency_records::table
                    .filter(idempotency_records::scope.eq(scope))
                    .filter(idempotency_records::idempotency_key.eq(k))
                    .filter(idempotency_records::created_at.lt(cutoff)),
            )
            .execute(conn)
            .await?;
        });
        let claimed: Result<Option<i64>, diesel::result::Error> = db_run!(conn: {
            diesel::insert_into(idempotency_records::table)
                .values((
                    idempotency_records::scope.eq(scope),
                    idempotency_records::idempotency_key.eq(k),
                    idempotency_records::rpc.eq(key.rpc),
                    idempotency_records::request_hash.eq(key.request_hash.as_slice()),
                    idempotency_records::created_at.eq(now.unix_micros()),
                ))
                .on_conflict((idempotency_records::scope, idempotency_records::idempotency_key))
                .do_nothing()
                .returning(idempotency_records::id)
                .get_result(conn)
                .await
                .optional()
        });
        let claimed = match claimed {
            Err(diesel_error) => match StoreError::from(diesel_error) {
                StoreError::LockTimeout(_) => {
                    return Err(StoreError::LockTimeout(format!(
                        "idempotency_key: a call with the same key ({}) is still running; \
                         retry with the same key shortly",
                        key.rpc
                    )))
                }
                other => return Err(other),
            },
            Ok(claimed) => claimed,
        };
        if claimed.is_none() {
            return Err(StoreError::VersionConflict(format!(
                "idempotency_key: a call with the same key ({}) finished first",
                key.rpc
            )));
        }
        purge(self, cutoff, PURGE_PER_CLAIM).await?;
        Ok(())
    }

    /// Writes the answer into the record this transaction claimed.
    pub(crate) async fn keep_idempotent_answer(
        &mut self,
        key: &IdempotencyKey,
        answer: &KeptAnswer,
    ) -> Result<(), StoreError> {
        let conn = &mut self.db;
        let updated = db_run!(conn: {
            diesel::update(
                idempotency_records::table
                    .filter(idempotency_records::scope.eq(key.scope.as_str()))
                    .filter(idempotency_records::idempotency_key.eq(key.key.as_str())),
            )
            .set((
                idempotency_records::response.eq(Some(answer.response.as_slice())),
                idempotency_records::sealed_secret.eq(answer.sealed_secret.as_deref()),
            ))
            .execute(conn)
            .await?
        });
        if updated != 1 {
            return Err(StoreError::Internal(format!(
                "the idempotency record this transaction claimed is gone ({updated} rows)"
            )));
        }
        Ok(())
    }
}
