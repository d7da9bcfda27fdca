//! The audit log (AuditEvent): append-only and hash-chained.
//!
//! Each event carries the hash of the one before it, so changing, removing or reordering any
//! stored event breaks the chain from that event on, and [`Store::verify_audit_chain`] names
//! the first sequence number where it breaks. (Cutting events off the *end* leaves a shorter
//! valid chain; tooling that must notice that keeps the latest head it has seen —
//! [`AuditChainCheck::head`] — somewhere the database cannot rewrite.)
//!
//! # The hash
//!
//! Event `seq` (1, 2, 3, … with no gaps) has
//!
//! ```text
//! prev_hash = hash of event seq - 1, or 32 zero bytes for seq 1
//! hash      = SHA-256(prev_hash || encoding)
//! ```
//!
//! where `encoding` follows the crate's canonical-encoding rules (big-endian integers,
//! variable-length fields behind a `u32` length, a label behind a `u16` length):
//!
//! ```text
//! u16 len || "keyhold/v1/audit-event"      the label
//! u64 seq
//! i64 at                                   unix microseconds, two's complement
//! u32 len || actor                         UTF-8
//! u32 len || action                        UTF-8
//! u32 len || target                        UTF-8
//! 0x00                                     if there is no reason, or
//! 0x01 || u32 len || reason                UTF-8
//! ```
//!
//! [`event_hash`] computes it, so tools outside the store can check exported events.
//!
//! # Concurrency
//!
//! `seq` is the last `seq` plus one, read and written in the caller's transaction. On
//! PostgreSQL the transaction first takes the audit chain's transaction-scoped advisory lock
//! (`locks::TxLock::AuditChain`), so concurrent appends (from any replica) queue instead of reading the
//! same last event; on SQLite the write transaction already excludes other writers. `seq` is
//! the primary key, so if that ever failed, the second insert would fail loudly rather than
//! fork the chain.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::locks::{lock, TxLock};
use super::schema::audit_events;
use super::{db_run, unsigned, Conn, Store, StoreError, Timestamp, Tx};

/// The label that starts every event encoding.
const LABEL: &str = "keyhold/v1/audit-event";

/// Longest page [`Conn::list_audit_events`] returns.
pub const MAX_AUDIT_PAGE: u32 = 1000;

/// An event to record; the store assigns its sequence number, time and hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewAuditEvent {
    /// Who acted, for example `"staff:alice"` or `"token:<id>"`.
    pub actor: String,
    /// What was done, for example `"escrow.read"`.
    pub action: String,
    /// What it was done to, for example `"session:<uuid>"`.
    pub target: String,
    /// Why, when the action requires a reason (escrow reads do).
    pub reason: Option<String>,
}

impl NewAuditEvent {
    /// An event without a reason.
    pub fn new(
        actor: impl Into<String>,
        action: impl Into<String>,
        target: impl Into<String>,
    ) -> Self {
        NewAuditEvent {
            actor: actor.into(),
            action: action.into(),
            target: target.into(),
            reason: None,
        }
    }

    /// The same event with a reason.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

/// A recorded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    /// Its place in the log: 1 for the first event, then one more each.
    pub seq: u64,
    /// When it was recorded.
    pub at: Timestamp,
    /// Who acted.
    pub actor: String,
    /// What was done.
    pub action: String,
    /// What it was done to.
    pub target: String,
    /// Why, if a reason was given.
    pub reason: Option<String>,
    /// The previous event's hash (zeros for the first event).
    pub prev_hash: [u8; 32],
    /// This event's hash (see the module docs).
    pub hash: [u8; 32],
}

/// What [`Store::verify_audit_chain`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditChainCheck {
    /// How many events were checked and found intact, from seq 1 on.
    pub intact: u64,
    /// The first sequence number where the chain breaks (an event changed, missing or out of
    /// place), or `None` if the whole log is intact.
    pub first_broken: Option<u64>,
    /// The last intact event's seq and hash, to compare with a copy kept elsewhere.
    pub head: Option<(u64, [u8; 32])>,
}

fn put_var(out: &mut Vec<u8>, field: &str) -> Result<(), StoreError> {
    let len = u32::try_from(field.len())
        .map_err(|_| StoreError::Internal("audit field longer than 4 GiB".into()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(field.as_bytes());
    Ok(())
}

/// The canonical encoding of an event's content (see the module docs).
pub fn canonical_encoding(
    seq: u64,
    at: Timestamp,
    actor: &str,
    action: &str,
    target: &str,
    reason: Option<&str>,
) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(64 + actor.len() + action.len() + target.len());
    // The label is a constant far below 64 KiB.
    out.extend_from_slice(&(LABEL.len() as u16).to_be_bytes());
    out.extend_from_slice(LABEL.as_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&at.unix_micros().to_be_bytes());
    put_var(&mut out, actor)?;
    put_var(&mut out, action)?;
    put_var(&mut out, target)?;
    match reason {
        None => out.push(0),
        Some(reason) => {
            out.push(1);
            put_var(&mut out, reason)?;
        }
    }
    Ok(out)
}

/// An event's hash: SHA-256 over the previous hash and the event's canonical encoding.
pub fn event_hash(
    prev_hash: &[u8; 32],
    seq: u64,
    at: Timestamp,
    actor: &str,
    action: &str,
    target: &str,
    reason: Option<&str>,
) -> Result<[u8; 32], StoreError> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(prev_hash);
    ctx.update(&canonical_encoding(seq, at, actor, action, target, reason)?);
    let mut hash = [0u8; 32];
    // A SHA-256 digest is always 32 bytes, so the lengths match.
    hash.copy_from_slice(ctx.finish().as_ref());
    Ok(hash)
}

#[derive(Insertable, Queryable, Selectable)]
#[diesel(table_name = audit_events)]
struct AuditRow {
    seq: i64,
    at: i64,
    actor: String,
    action: String,
    target: String,
    reason: Option<String>,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

fn hash32(what: &str, bytes: &[u8]) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(bytes).map_err(|_| StoreError::corrupt(what, hex::encode(bytes)))
}

impl TryFrom<AuditRow> for AuditEvent {
    type Error = StoreError;

    fn try_from(row: AuditRow) -> Result<Self, StoreError> {
        Ok(AuditEvent {
            seq: unsigned("audit seq", row.seq)?,
            at: Timestamp::from_unix_micros(row.at),
            prev_hash: hash32("audit prev_hash", &row.prev_hash)?,
            hash: hash32("audit hash", &row.hash)?,
            actor: row.actor,
            action: row.action,
            target: row.target,
            reason: row.reason,
        })
    }
}

/// Counter: audit events written, by `action` (an action is one of the few names the code
/// writes, never caller input). Counted at the write: a transaction that rolls back after it
/// still counts.
pub(crate) const AUDIT_APPENDS: &str = "keyhold_audit_appends_total";

impl Tx {
    /// Appends an event to the audit log as part of this transaction: if the transaction
    /// rolls back, the event was never written; if the append fails, so does the
    /// transaction. (It must share a transaction: the chain's lock is transaction-scoped.)
    pub async fn append_audit_event(
        &mut self,
        event: &NewAuditEvent,
    ) -> Result<AuditEvent, StoreError> {
        let conn = &mut self.db;
        lock(conn, TxLock::AuditChain).await?;

        let last: Option<(i64, Vec<u8>)> = db_run!(conn: {
            audit_events::table
                .order(audit_events::seq.desc())
                .select((audit_events::seq, audit_events::hash))
                .first(conn)
                .await
                .optional()?
        });
        let (seq, prev_hash) = match last {
            None => (1u64, [0u8; 32]),
            Some((seq, hash)) => {
                let seq: u64 = unsigned("audit seq", seq)?;
                let next = seq
                    .checked_add(1)
                    .ok_or_else(|| StoreError::corrupt("audit seq", seq))?;
                (next, hash32("audit hash", &hash)?)
            }
        };
        let at = Timestamp::now();
        let reason = event.reason.as_deref();
        let hash = event_hash(
            &prev_hash,
            seq,
            at,
            &event.actor,
            &event.action,
            &event.target,
            reason,
        )?;
        let row = AuditRow {
            seq: i64::try_from(seq).map_err(|_| StoreError::corrupt("audit seq", seq))?,
            at: at.unix_micros(),
            actor: event.actor.clone(),
            action: event.action.clone(),
            target: event.target.clone(),
            reason: event.reason.clone(),
            prev_hash: prev_hash.to_vec(),
            hash: hash.to_vec(),
        };
        db_run!(conn: {
            diesel::insert_into(audit_events::table)
                .values(&row)
                .execute(conn)
                .await?;
        });
        metrics::counter!(AUDIT_APPENDS, "action" => event.action.clone()).increment(1);
        row.try_into()
    }
}

impl Conn {
    /// Up to `limit` events (at most [`MAX_AUDIT_PAGE`]) with a sequence number above
    /// `after`, oldest first. Start with `after = 0`; pass the last seq seen to page on.
    pub async fn list_audit_events(
        &mut self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        self.audit_rows_after(after, limit)
            .await?
            .into_iter()
            .map(AuditEvent::try_from)
            .collect()
    }

    /// The stored rows behind [`Conn::list_audit_events`], unchecked, for the chain walk.
    async fn audit_rows_after(
        &mut self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let conn = &mut self.db;
        // Sequence numbers past i64::MAX cannot exist, so "after" such a number is nothing.
        let Ok(after) = i64::try_from(after) else {
            return Ok(Vec::new());
        };
        let limit = i64::from(limit.min(MAX_AUDIT_PAGE));
        Ok(db_run!(conn: {
            audit_events::table
                .filter(audit_events::seq.gt(after))
                .order(audit_events::seq.asc())
                .limit(limit)
                .select(AuditRow::as_select())
                .load(conn)
                .await?
        }))
    }
}

/// Checks one stored row against the chain so far; `false` if it breaks it.
fn row_is_intact(row: &AuditRow, expected_seq: u64, prev_hash: &[u8; 32]) -> bool {
    if u64::try_from(row.seq).ok() != Some(expected_seq) || row.prev_hash != prev_hash {
        return false;
    }
    let at = Timestamp::from_unix_micros(row.at);
    match event_hash(
        prev_hash,
        expected_seq,
        at,
        &row.actor,
        &row.action,
        &row.target,
        row.reason.as_deref(),
    ) {
        Ok(hash) => row.hash == hash,
        Err(_) => false,
    }
}

impl Store {
    /// Recomputes the whole chain from seq 1 and reports the first event that breaks it.
    ///
    /// The chain is walked a page at a time, taking a pooled connection per page so that a
    /// long log does not hold SQLite's one connection for the whole walk.
    pub async fn verify_audit_chain(&self) -> Result<AuditChainCheck, StoreError> {
        let mut expected_seq = 1u64;
        let mut prev_hash = [0u8; 32];
        let mut intact = 0u64;
        let head = |intact: u64, seq: u64, hash: [u8; 32]| (intact > 0).then_some((seq, hash));
        loop {
            let page = (self.conn().await?)
                .audit_rows_after(expected_seq - 1, MAX_AUDIT_PAGE)
                .await?;
            if page.is_empty() {
                break;
            }
            for row in &page {
                if !row_is_intact(row, expected_seq, &prev_hash) {
                    return Ok(AuditChainCheck {
                        intact,
                        first_broken: Some(expected_seq),
                        head: head(intact, expected_seq - 1, prev_hash),
                    });
                }
                prev_hash = hash32("audit hash", &row.hash)?;
                intact += 1;
                expected_seq += 1;
            }
        }
        Ok(AuditChainCheck {
            intact,
            first_broken: None,
            head: head(intact, expected_seq - 1, prev_hash),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_pinned() {
        let enc =
            canonical_encoding(1, Timestamp::from_unix_micros(2), "a", "b", "c", None).unwrap();
        let mut expected = vec![0, 22];
        expected.extend_from_slice(b"keyhold/v1/audit-event");
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2]);
        expected.extend_from_slice(&[0, 0, 0, 1, b'a', 0, 0, 0, 1, b'b', 0, 0, 0, 1, b'c', 0]);
        assert_eq!(enc, expected);
    }

    #[test]
    fn an_empty_reason_differs_from_no_reason() {
        let at = Timestamp::from_unix_micros(0);
        let zero = [0u8; 32];
        assert_ne!(
            event_hash(&zero, 1, at, "a", "b", "c", None).unwrap(),
            event_hash(&zero, 1, at, "a", "b", "c", Some("")).unwrap()
        );
    }

    #[test]
    fn moving_bytes_between_fields_changes_the_hash() {
        let at = Timestamp::from_unix_micros(0);
        let zero = [0u8; 32];
        assert_ne!(
            event_hash(&zero, 1, at, "ab", "c", "d", None).unwrap(),
            event_hash(&zero, 1, at, "a", "bc", "d", None).unwrap()
        );
    }
}
