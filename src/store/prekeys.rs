//! Prekeys: a device's signed one-time and last-resort X-Wing prekeys, and the windows that
//! rate-limit claims on them.
//!
//! **Exactly once.** A claim *deletes* the one-time prekey it hands out, in the same statement
//! that picks it (`DELETE … WHERE id = (SELECT … LIMIT 1) RETURNING …`), so no prekey can be
//! handed out twice. When no one-time prekey is left, the device's last-resort prekey is
//! returned (and kept).
//!
//! **Backends.** The claim's statement is the one place the backends lock differently
//! (`Tx::take_oldest_one_time`, marked there): on PostgreSQL the inner select adds
//! `FOR UPDATE SKIP LOCKED`, so concurrent claims from any number of replicas each lock a
//! different row instead of queueing on the oldest one, and a row another claim has just
//! deleted is passed over; on SQLite every write transaction holds the database's write lock,
//! so claims simply take turns.
//!
//! **Last resort only when none is left.** Skipping locked rows must not turn into a
//! last-resort answer while a one-time prekey is still committed: the claim holding it may
//! roll back (a replica killed mid-claim, a multi-device claim refused by the rate limit on a
//! later device). So when the skipping pick finds nothing, a PostgreSQL claim looks for any
//! committed one-time row without skipping, and if there is one it waits for that row's holder
//! (bounded by the lock timeout, `StoreOptions::lock_timeout`) and takes the row if the holder
//! rolled back, or looks again if it committed (`Tx::claim_one`). Only when no one-time row
//! remains committed is the last-resort prekey handed out. A wait past the lock timeout is
//! [`StoreError::LockTimeout`] (UNAVAILABLE, retryable), never a last-resort answer. Waits
//! cannot deadlock: a multi-device claim takes its devices in one order, so it only ever
//! waits on a device later in that order than every device it holds a row of. (An upload also inserts row by row on SQLite, where Diesel has
//! no multi-row INSERT for this table; that changes no result.)
//!
//! **Current identity only.** Each prekey keeps the identity key its signature was checked
//! against at upload. Claims and counts consider only prekeys signed by the device's *current*
//! identity key; an upload removes the ones signed by an older identity key.
//!
//! **Bounds.** An upload takes a per-device lock ([`super::locks`]) and refuses to take the
//! device past its bound of unused one-time prekeys; nothing is written then.
//!
//! **Rate limit.** Each claim first counts itself in `prekey_claim_windows`, one row per
//! (target device, claimer, fixed time window), with an upsert that returns the new count. Past
//! the limit the whole transaction rolls back with [`StoreError::LimitExceeded`]. The counter
//! lives in the database, so the limit holds across replicas; the first claim of a new window
//! deletes the device's windows older than the previous one.
//!
//! **Shape.** Counting is a [`Conn`] query. Uploads and claims are [`Store`] calls: each runs
//! its transaction and then wakes this process's watches of the devices it changed, which only
//! the store can do after the commit ([`super::events`]).

use std::time::Duration;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::events::{notify_in_tx, DeviceEvent, EventKind};
use super::idempotency::Recorder;
use super::locks::{lock, DeviceScope, TxLock};
use super::schema::{prekey_claim_windows, prekeys};
use super::{db_run, unsigned, Conn, Store, StoreError, Timestamp, Tx};
use crate::crypto::ids::{DeviceId, KeyId, UserId};
use crate::crypto::sign::PrekeyKind;
use crate::crypto::Suite;
use crate::store::error::Stored;

/// Rows per multi-row INSERT, under both backends' limits on bound parameters.
const ROWS_PER_INSERT: usize = 500;

fn kind_to_db(kind: PrekeyKind) -> i16 {
    i16::from(kind as u8)
}

fn kind_from_db(v: i16) -> Result<PrekeyKind, StoreError> {
    match v {
        1 => Ok(PrekeyKind::OneTime),
        2 => Ok(PrekeyKind::LastResort),
        other => Err(StoreError::corrupt("prekey kind", other)),
    }
}

/// One prekey to store, already checked by the caller (signature, shape, key id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPrekey {
    /// The fingerprint of the encapsulation key.
    pub key_id: KeyId,
    /// The suite.
    pub suite: Suite,
    /// The X-Wing encapsulation key.
    pub encapsulation_key: Vec<u8>,
    /// The device identity key's signature over the prekey.
    pub signature: Vec<u8>,
}

/// A device's upload: one-time prekeys and, optionally, a new last-resort prekey.
#[derive(Clone, Debug)]
pub struct PrekeyUpload {
    /// The owning user.
    pub user: UserId,
    /// The owning device.
    pub device: DeviceId,
    /// The device identity key the signatures were checked against.
    pub identity_key: Vec<u8>,
    /// One-time prekeys, handed out once each, oldest upload first.
    pub one_time: Vec<NewPrekey>,
    /// A last-resort prekey replacing the device's previous one.
    pub last_resort: Option<NewPrekey>,
    /// Most unused one-time prekeys the device may hold after the upload.
    pub max_unused: usize,
}

/// What a device holds: unused one-time prekeys and whether it has a last-resort prekey, both
/// counted under its current identity key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrekeyStock {
    /// Unused one-time prekeys.
    pub one_time: u64,
    /// Whether a last-resort prekey is on file.
    pub has_last_resort: bool,
}

/// A device whose prekey a claim asks for, with the identity key it currently has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimTarget {
    /// The user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// The device's current identity key; only prekeys signed by it are handed out.
    pub identity_key: Vec<u8>,
}

/// How many claims one claimer may make on one device per window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimRateLimit {
    /// Claims allowed per window.
    pub claims: u32,
    /// The window's length (whole seconds are used, at least one).
    pub window: Duration,
}

/// A prekey handed out by a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimedPrekey {
    /// The owning user.
    pub user: UserId,
    /// The owning device.
    pub device: DeviceId,
    /// The fingerprint of the encapsulation key.
    pub key_id: KeyId,
    /// One-time (now gone from the store) or last-resort (kept).
    pub kind: PrekeyKind,
    /// The suite.
    pub suite: Suite,
    /// The X-Wing encapsulation key.
    pub encapsulation_key: Vec<u8>,
    /// The device identity key's signature over the prekey.
    pub signature: Vec<u8>,
    /// The identity key the signature was checked against at upload.
    pub identity_key: Vec<u8>,
}

#[derive(Insertable)]
#[diesel(table_name = prekeys)]
struct PrekeyInsert<'a> {
    key_id: &'a [u8],
    user_id: &'a str,
    device_id: &'a str,
    kind: i16,
    suite: i16,
    encapsulation_key: &'a [u8],
    identity_key: &'a [u8],
    signature: &'a [u8],
    created_at: i64,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = prekeys)]
struct PrekeyRow {
    key_id: Vec<u8>,
    user_id: String,
    device_id: String,
    kind: i16,
    suite: i16,
    encapsulation_key: Vec<u8>,
    identity_key: Vec<u8>,
    signature: Vec<u8>,
}

impl TryFrom<PrekeyRow> for ClaimedPrekey {
    type Error = StoreError;
    fn try_from(r: PrekeyRow) -> Result<Self, StoreError> {
        let suite = u8::try_from(r.suite)
            .ok()
            .and_then(|b| Suite::from_byte(b).ok())
            .ok_or_else(|| StoreError::corrupt("prekey suite", r.suite))?;
        Ok(ClaimedPrekey {
            user: UserId::new(r.user_id).stored("user id")?,
            device: DeviceId::new(r.device_id).stored("device id")?,
            key_id: KeyId::from_slice(&r.key_id).stored("prekey id")?,
            kind: kind_from_db(r.kind)?,
            suite,
            encapsulation_key: r.encapsulation_key,
            signature: r.signature,
            identity_key: r.identity_key,
        })
    }
}

impl Conn {
    /// A device's prekey stock: its unused one-time prekeys and whether it has a last-resort
    /// prekey, counting only those signed by `identity_key` (its current one).
    pub async fn prekey_stock(
        &mut self,
        user: &UserId,
        device: &DeviceId,
        identity_key: &[u8],
    ) -> Result<PrekeyStock, StoreError> {
        let conn = &mut self.db;
        let (u, d) = (user.as_str(), device.as_str());
        let one_time: i64 = db_run!(conn: {
            prekeys::table
                .filter(prekeys::user_id.eq(u))
                .filter(prekeys::device_id.eq(d))
                .filter(prekeys::kind.eq(kind_to_db(PrekeyKind::OneTime)))
                .filter(prekeys::identity_key.eq(identity_key))
                .count()
                .get_result(conn)
                .await?
        });
        let last_resort: i64 = db_run!(conn: {
            prekeys::table
                .filter(prekeys::user_id.eq(u))
                .filter(prekeys::device_id.eq(d))
                .filter(prekeys::kind.eq(kind_to_db(PrekeyKind::LastResort)))
                .filter(prekeys::identity_key.eq(identity_key))
                .count()
                .get_result(conn)
                .await?
        });
        Ok(PrekeyStock {
            one_time: unsigned("prekey count", one_time)?,
            has_last_resort: last_resort > 0,
        })
    }
}

impl Store {
    /// Stores a device's prekeys in one transaction, then wakes this process's watches of the
    /// device's stock: prekeys signed by another identity key than `upload.identity_key` are
    /// removed, a new last-resort prekey replaces the old one, and the one-time prekeys are
    /// added. Returns the stock after the upload.
    ///
    /// [`StoreError::LimitExceeded`] if the device would hold more than `max_unused` unused
    /// one-time prekeys; [`StoreError::AlreadyExists`] if a prekey id is already stored. Either
    /// way nothing is written.
    pub async fn upload_prekeys(&self, upload: &PrekeyUpload) -> Result<PrekeyStock, StoreError> {
        let stock = self
            .transaction(async |tx| tx.store_upload(upload).await)
            .await?;
        let event = DeviceEvent::new(EventKind::Prekeys, &upload.user, &upload.device);
        self.announce_committed(&[event]).await;
        Ok(stock)
    }

    /// Claims one prekey of each target for `claimer`, in one transaction: per target, the
    /// oldest one-time prekey (handed out exactly once, across replicas), or the last-resort
    /// prekey when none is left, or `None` when the device has neither. The result is in the
    /// order of `targets`. After the commit, this process's watches of the devices whose
    /// one-time stock went down are woken.
    ///
    /// Each target counts one claim against `limit` for this claimer;
    /// [`StoreError::LimitExceeded`] if any target is past it, and then nothing is claimed.
    /// `recorder` records the answer of a claim made with an idempotency key in the same
    /// transaction ([`super::idempotency`]).
    pub async fn claim_prekeys(
        &self,
        claimer: &str,
        targets: &[ClaimTarget],
        limit: ClaimRateLimit,
        recorder: &Recorder<'_, Vec<Option<ClaimedPrekey>>>,
    ) -> Result<Vec<Option<ClaimedPrekey>>, StoreError> {
        let claimed = self
            .transaction_recorded(recorder, async |tx| {
                tx.claim_each(claimer, targets, limit).await
            })
            .await?;
        let events: Vec<DeviceEvent> = targets
            .iter()
            .zip(&claimed)
            .filter(|(_, c)| matches!(c, Some(p) if p.kind == PrekeyKind::OneTime))
            .map(|(t, _)| DeviceEvent::new(EventKind::Prekeys, &t.user, &t.device))
            .collect();
        self.announce_committed(&events).await;
        Ok(claimed)
    }
}

/// The steps of [`Store::upload_prekeys`] and [`Store::claim_prekeys`], inside their
/// transactions.
impl Tx {
    /// Writes an upload; see [`Store::upload_prekeys`].
    async fn store_upload(&mut self, up: &PrekeyUpload) -> Result<PrekeyStock, StoreError> {
        let (u, d) = (up.user.as_str(), up.device.as_str());
        let ik = up.identity_key.as_slice();
        let conn = &mut self.db;
        lock(
            conn,
            TxLock::Device(DeviceScope::Prekeys, &up.user, &up.device),
        )
        .await?;
        // Prekeys signed by an identity key the device no longer has can never be handed out.
        db_run!(conn: {
            diesel::delete(
                prekeys::table
                    .filter(prekeys::user_id.eq(u))
                    .filter(prekeys::device_id.eq(d))
                    .filter(prekeys::identity_key.ne(ik)),
            )
            .execute(conn)
            .await?;
        });
        let before = self.prekey_stock(&up.user, &up.device, ik).await?;
        let after = usize::try_from(before.one_time)
            .unwrap_or(usize::MAX)
            .saturating_add(up.one_time.len());
        if after > up.max_unused {
            return Err(StoreError::LimitExceeded(format!(
                "device {}/{} holds {} unused one-time prekeys; {} more would pass the bound of {}",
                up.user,
                up.device,
                before.one_time,
                up.one_time.len(),
                up.max_unused
            )));
        }
        let now = Timestamp::now().unix_micros();
        fn row<'a>(
            p: &'a NewPrekey,
            kind: PrekeyKind,
            (u, d, ik, now): (&'a str, &'a str, &'a [u8], i64),
        ) -> PrekeyInsert<'a> {
            PrekeyInsert {
                key_id: p.key_id.as_bytes().as_slice(),
                user_id: u,
                device_id: d,
                kind: kind_to_db(kind),
                suite: i16::from(p.suite as u8),
                encapsulation_key: &p.encapsulation_key,
                identity_key: ik,
                signature: &p.signature,
                created_at: now,
            }
        }
        let conn = &mut self.db;
        if let Some(lr) = &up.last_resort {
            db_run!(conn: {
                diesel::delete(
                    prekeys::table
                        .filter(prekeys::user_id.eq(u))
                        .filter(prekeys::device_id.eq(d))
                        .filter(prekeys::kind.eq(kind_to_db(PrekeyKind::LastResort))),
                )
                .execute(conn)
                .await?;
            });
            let insert = row(lr, PrekeyKind::LastResort, (u, d, ik, now));
            db_run!(conn: {
                diesel::insert_into(prekeys::table).values(&insert).execute(conn).await?;
            });
        }
        for chunk in up.one_time.chunks(ROWS_PER_INSERT) {
            let rows: Vec<PrekeyInsert<'_>> = chunk
                .iter()
                .map(|p| row(p, PrekeyKind::OneTime, (u, d, ik, now)))
                .collect();
            // Diesel's SQLite backend has no multi-row INSERT with a defaulted id column;
            // SQLite's inserts are local calls inside the same transaction anyway.
            db_run!(conn: sqlite {
                for r in &rows {
                    diesel::insert_into(prekeys::table).values(r).execute(conn).await?;
                }
            } postgres {
                diesel::insert_into(prekeys::table).values(&rows).execute(conn).await?;
            });
        }
        notify_in_tx(
            conn,
            &DeviceEvent::new(EventKind::Prekeys, &up.user, &up.device),
        )
        .await?;
        Ok(PrekeyStock {
            one_time: before.one_time + up.one_time.len() as u64,
            has_last_resort: before.has_last_resort || up.last_resort.is_some(),
        })
    }

    /// Claims one prekey of each target; see [`Store::claim_prekeys`].
    async fn claim_each(
        &mut self,
        claimer: &str,
        targets: &[ClaimTarget],
        limit: ClaimRateLimit,
    ) -> Result<Vec<Option<ClaimedPrekey>>, StoreError> {
        // Counter rows are locked in one order, so two multi-device claims cannot deadlock.
        let mut order: Vec<usize> = (0..targets.len()).collect();
        order.sort_by(|&a, &b| {
            (targets[a].user.as_str(), targets[a].device.as_str())
                .cmp(&(targets[b].user.as_str(), targets[b].device.as_str()))
        });
        let mut out = vec![None; targets.len()];
        for i in order {
            let target = &targets[i];
            self.count_claim(claimer, target, limit).await?;
            out[i] = self.claim_one(target).await?;
            if matches!(&out[i], Some(p) if p.kind == PrekeyKind::OneTime) {
                notify_in_tx(
                    &mut self.db,
                    &DeviceEvent::new(EventKind::Prekeys, &target.user, &target.device),
                )
                .await?;
            }
        }
        Ok(out)
    }

    /// Counts one claim by `claimer` on `target` in the current window; past the limit, fails.
    async fn count_claim(
        &mut self,
        claimer: &str,
        target: &ClaimTarget,
        limit: ClaimRateLimit,
    ) -> Result<(), StoreError> {
        let conn = &mut self.db;
        let (u, d) = (target.user.as_str(), target.device.as_str());
        let window_us = i64::try_from(limit.window.as_secs().max(1))
            .unwrap_or(i64::MAX / 1_000_000)
            .saturating_mul(1_000_000);
        let now = Timestamp::now().unix_micros();
        let window_start = now - now.rem_euclid(window_us);
        let claims: i32 = db_run!(conn: {
            diesel::insert_into(prekey_claim_windows::table)
                .values((
                    prekey_claim_windows::user_id.eq(u),
                    prekey_claim_windows::device_id.eq(d),
                    prekey_claim_windows::claimer.eq(claimer),
                    prekey_claim_windows::window_start.eq(window_start),
                    prekey_claim_windows::claims.eq(1),
                ))
                .on_conflict((
                    prekey_claim_windows::user_id,
                    prekey_claim_windows::device_id,
                    prekey_claim_windows::claimer,
                    prekey_claim_windows::window_start,
                ))
                .do_update()
                .set(prekey_claim_windows::claims.eq(prekey_claim_windows::claims + 1))
                .returning(prekey_claim_windows::claims)
                .get_result(conn)
                .await?
        });
        if i64::from(claims) > i64::from(limit.claims) {
            return Err(StoreError::LimitExceeded(format!(
                "device {}/{}: at most {} prekey claims per {} s by one claimer",
                target.user,
                target.device,
                limit.claims,
                limit.window.as_secs().max(1)
            )));
        }
        if claims > 1 {
            return Ok(());
        }
        // The first claim of a window clears the windows before the previous one, which count
        // for nothing any more. (Keeping the previous one leaves room for replicas whose clocks
        // disagree by less than a window.) Later claims of the window skip this round trip.
        let stale = window_start.saturating_sub(window_us);
        db_run!(conn: {
            diesel::delete(
                prekey_claim_windows::table
                    .filter(prekey_claim_windows::user_id.eq(u))
                    .filter(prekey_claim_windows::device_id.eq(d))
                    .filter(prekey_claim_windows::window_start.lt(stale)),
            )
            .execute(conn)
            .await?;
        });
        Ok(())
    }

    /// Hands out one prekey of `target`: a one-time prekey, deleted as it is handed out, or
    /// the last-resort prekey only when no one-time prekey of the device remains committed.
    /// `None` when the device has neither.
    ///
    /// On PostgreSQL the pick skips rows other claims hold (`take_oldest_one_time`); when it
    /// finds none free, a one-time row may still be stored but held by an unfinished claim,
    /// which may yet roll back. So the claim looks for any such row without skipping locks
    /// (`oldest_one_time_id`) and, if there is one, deletes it by id, which waits for its
    /// holder (at most the lock timeout): a holder that rolls back leaves the row to this
    /// claim; one that commits took it, and the claim looks again. Each round either hands
    /// out a one-time prekey or sees one fewer stored (another claim committed taking it),
    /// so the loop ends. A wait past the lock timeout is [`StoreError::LockTimeout`], never
    /// a last-resort answer.
    async fn claim_one(
        &mut self,
        target: &ClaimTarget,
    ) -> Result<Option<ClaimedPrekey>, StoreError> {
        loop {
            if let Some(row) = self.take_oldest_one_time(target).await? {
                return Ok(Some(row.try_into()?));
            }
            if matches!(self.db, super::DbConn::Sqlite(_)) {
                // One writer at a time: nothing is held by another claim.
                break;
            }
            let Some(held) = self.oldest_one_time_id(target).await? else {
                break;
            };
            match self.take_one_time_waiting(held).await {
                Ok(Some(row)) => return Ok(Some(row.try_into()?)),
                // Its holder committed: it was handed out. Look again.
                Ok(None) => continue,
                Err(StoreError::LockTimeout(_)) => {
                    return Err(StoreError::LockTimeout(format!(
                        "a one-time prekey of device {}/{} is held by an unfinished claim; \
                         retry the claim shortly",
                        target.user, target.device
                    )))
                }
                Err(e) => return Err(e),
            }
        }
        let conn = &mut self.db;
        let last_resort: Option<PrekeyRow> = db_run!(conn: {
            prekeys::table
                .filter(prekeys::user_id.eq(target.user.as_str()))
                .filter(prekeys::device_id.eq(target.device.as_str()))
                .filter(prekeys::kind.eq(kind_to_db(PrekeyKind::LastResort)))
                .filter(prekeys::identity_key.eq(target.identity_key.as_slice()))
                .select(PrekeyRow::as_select())
                .first(conn)
                .await
                .optional()?
        });
        last_resort.map(ClaimedPrekey::try_from).transpose()
    }

    /// The id of the oldest committed one-time prekey of `target` under its current identity
    /// key, whether or not another transaction holds its row (a plain read takes no lock).
    async fn oldest_one_time_id(
        &mut self,
        target: &ClaimTarget,
    ) -> Result<Option<i64>, StoreError> {
        let conn = &mut self.db;
        let id: Option<i64> = db_run!(conn: {
            prekeys::table
                .filter(prekeys::user_id.eq(target.user.as_str()))
                .filter(prekeys::device_id.eq(target.device.as_str()))
                .filter(prekeys::kind.eq(kind_to_db(PrekeyKind::OneTime)))
                .filter(prekeys::identity_key.eq(target.identity_key.as_slice()))
                .order(prekeys::id)
                .select(prekeys::id)
                .first(conn)
                .await
                .optional()?
        });
        Ok(id)
    }

    /// Deletes and returns the one-time prekey `id`, waiting for a transaction that holds
    /// its row to end (at most the lock timeout): the row if that transaction rolled back,
    /// `None` if it deleted the row and committed (PostgreSQL re-reads a row whose lock it
    /// waited for, and a deleted one no longer matches).
    async fn take_one_time_waiting(&mut self, id: i64) -> Result<Option<PrekeyRow>, StoreError> {
        let conn = &mut self.db;
        let taken: Option<PrekeyRow> = db_run!(conn: {
            diesel::delete(prekeys::table.filter(prekeys::id.eq(id)))
                .returning(PrekeyRow::as_returning())
                .get_result(conn)
                .await
                .optional()?
        });
        Ok(taken)
    }

    /// Deletes and returns the oldest one-time prekey of `target` signed by its current
    /// identity key, in one statement: `DELETE … WHERE id = (SELECT … LIMIT 1) RETURNING …`.
    ///
    /// **The one backend difference of a claim.** On PostgreSQL the inner select adds
    /// `FOR UPDATE SKIP LOCKED`: concurrent claims, from any number of replicas, each lock a
    /// different row instead of queueing on the oldest one, and a row another claim has just
    /// deleted is passed over. On SQLite every write transaction holds the database's one
    /// write lock, so claims simply take turns and the plain subquery is exact.
    async fn take_oldest_one_time(
        &mut self,
        target: &ClaimTarget,
    ) -> Result<Option<PrekeyRow>, StoreError> {
        let conn = &mut self.db;
        // The subquery reads the same table, so it reads it under another name.
        let candidate = diesel::alias!(prekeys as candidate);
        let oldest = candidate
            .filter(candidate.field(prekeys::user_id).eq(target.user.as_str()))
            .filter(
                candidate
                    .field(prekeys::device_id)
                    .eq(target.device.as_str()),
            )
            .filter(
                candidate
                    .field(prekeys::kind)
                    .eq(kind_to_db(PrekeyKind::OneTime)),
            )
            .filter(
                candidate
                    .field(prekeys::identity_key)
                    .eq(target.identity_key.as_slice()),
            )
            .order(candidate.field(prekeys::id))
            .select(candidate.field(prekeys::id));
        let taken: Option<PrekeyRow> = db_run!(conn: sqlite {
            diesel::delete(prekeys::table.filter(prekeys::id.nullable().eq(oldest.single_value())))
                .returning(PrekeyRow::as_returning())
                .get_result(conn)
                .await
                .optional()?
        } postgres {
            diesel::delete(
                prekeys::table.filter(
                    prekeys::id
                        .nullable()
                        .eq(oldest.for_update().skip_locked().single_value()),
                ),
            )
            .returning(PrekeyRow::as_returning())
            .get_result(conn)
            .await
            .optional()?
        });
        Ok(taken)
    }
}
