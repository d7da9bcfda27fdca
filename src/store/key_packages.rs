//! Key-sync packages (KeySyncPackage): sealed payloads one device of a user sends to another
//! device of the same user, kept in the recipient device's inbox until it acknowledges them.
//!
//! The store keeps payloads as given; they are sealed by the sending device to the recipient
//! device's key and the service cannot open them.
//!
//! **Order.** An inbox is read oldest first by id, and a reader's cursor is the last id it saw.
//! A send takes the recipient inbox's lock ([`super::locks`]) before drawing ids, so on
//! PostgreSQL ids of one inbox follow commit order and a cursor never steps past a package that
//! commits later with a lower id; SQLite's ids are drawn under its one write lock and never
//! reused (`AUTOINCREMENT`). The same lock makes the inbox bound exact across replicas.
//!
//! **Wake-ups.** Each send announces the recipient device ([`super::events`]) so that watch
//! streams on every process read the inbox again.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::events::{notify_in_tx, DeviceEvent, EventKind};
use super::idempotency::Recorder;
use super::locks::{lock, DeviceScope, TxLock};
use super::schema::key_packages;
use super::{db_run, unsigned, Conn, Store, StoreError, Timestamp, Tx};
use crate::crypto::ids::{DeviceId, KeyId, UserId};
use crate::store::error::Stored;

/// Most package ids one acknowledgement names per statement (bound-parameter limits).
const IDS_PER_DELETE: usize = 500;

/// A package to send, already checked by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewKeyPackage {
    /// The recipient device (of the sender's user).
    pub recipient_device: DeviceId,
    /// The recipient device key the payload is sealed to (its current key at sending).
    pub recipient_key_id: KeyId,
    /// The sealed payload.
    pub payload: Vec<u8>,
}

/// Why a send was refused before anything was written.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendRefusal {
    /// The sending device has no current (non-revoked) key.
    SenderNotCurrent,
    /// The recipient of the package at `index` has no current (non-revoked) key.
    RecipientNotCurrent {
        /// The package's position in the request.
        index: usize,
    },
    /// The package at `index` names another key than its recipient's current one.
    RecipientKeyChanged {
        /// The package's position in the request.
        index: usize,
        /// The recipient's current key.
        current: KeyId,
    },
    /// A recipient's inbox would hold more than the bound.
    InboxFull {
        /// The recipient device.
        device: DeviceId,
        /// How many packages its inbox holds.
        held: u64,
        /// How many this send adds to it.
        adding: usize,
        /// The bound.
        max: usize,
    },
}

/// Why a send wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Refused before anything was written.
    #[error("send refused: {0:?}")]
    Refused(SendRefusal),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<SendRefusal> for SendError {
    fn from(refusal: SendRefusal) -> Self {
        SendError::Refused(refusal)
    }
}

/// A stored package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPackage {
    /// Its id: the position in the recipient's inbox, and the inbox cursor.
    pub id: i64,
    /// The user both devices belong to.
    pub user: UserId,
    /// The sending device.
    pub sender_device: DeviceId,
    /// The recipient device.
    pub recipient_device: DeviceId,
    /// The recipient device key the payload is sealed to.
    pub recipient_key_id: KeyId,
    /// The sealed payload.
    pub payload: Vec<u8>,
    /// When it was sent.
    pub created_at: Timestamp,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = key_packages)]
struct KeyPackageRow {
    id: i64,
    user_id: String,
    sender_device_id: String,
    recipient_device_id: String,
    recipient_key_id: Vec<u8>,
    payload: Vec<u8>,
    created_at: i64,
}

impl TryFrom<KeyPackageRow> for KeyPackage {
    type Error = StoreError;
    fn try_from(r: KeyPackageRow) -> Result<Self, StoreError> {
        Ok(KeyPackage {
            id: r.id,
            user: UserId::new(r.user_id).stored("user id")?,
            sender_device: DeviceId::new(r.sender_device_id).stored("sender device id")?,
            recipient_device: DeviceId::new(r.recipient_device_id).stored("recipient device id")?,
            recipient_key_id: KeyId::from_slice(&r.recipient_key_id).stored("recipient key id")?,
            payload: r.payload,
            created_at: Timestamp::from_unix_micros(r.created_at),
        })
    }
}

impl Conn {
    /// One page of a device's inbox: packages with `id > after`, oldest first, at most `limit`.
    pub async fn key_package_inbox(
        &mut self,
        user: &UserId,
        device: &DeviceId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<KeyPackage>, StoreError> {
        let conn = &mut self.db;
        let rows: Vec<KeyPackageRow> = db_run!(conn: {
            key_packages::table
                .filter(key_packages::user_id.eq(user.as_str()))
                .filter(key_packages::recipient_device_id.eq(device.as_str()))
                .filter(key_packages::id.gt(after))
                .order(key_packages::id)
                .limit(limit)
                .select(KeyPackageRow::as_select())
                .load(conn)
                .await?
        });
        rows.into_iter().map(KeyPackage::try_from).collect()
    }

    /// How many packages a device's inbox holds.
    async fn inbox_len(&mut self, user: &UserId, device: &DeviceId) -> Result<u64, StoreError> {
        let conn = &mut self.db;
        let n: i64 = db_run!(conn: {
            key_packages::table
                .filter(key_packages::user_id.eq(user.as_str()))
                .filter(key_packages::recipient_device_id.eq(device.as_str()))
                .count()
                .get_result(conn)
                .await?
        });
        unsigned("inbox length", n)
    }

    /// Stores one package sent at `now`; its id.
    async fn insert_key_package(
        &mut self,
        user: &UserId,
        sender: &DeviceId,
        p: &NewKeyPackage,
        now: Timestamp,
    ) -> Result<i64, StoreError> {
        let conn = &mut self.db;
        Ok(db_run!(conn: {
            diesel::insert_into(key_packages::table)
                .values((
                    key_packages::user_id.eq(user.as_str()),
                    key_packages::sender_device_id.eq(sender.as_str()),
                    key_packages::recipient_device_id.eq(p.recipient_device.as_str()),
                    key_packages::recipient_key_id.eq(p.recipient_key_id.as_bytes().as_slice()),
                    key_packages::payload.eq(p.payload.as_slice()),
                    key_packages::created_at.eq(now.unix_micros()),
                ))
                .returning(key_packages::id)
                .get_result(conn)
                .await?
        }))
    }
}

impl Tx {
    /// Removes packages from a device's inbox; ids of other devices' packages, or already
    /// removed, are passed over. Returns how many were removed. (Long lists take several
    /// statements, all in this transaction.)
    pub async fn ack_key_packages(
        &mut self,
        user: &UserId,
        device: &DeviceId,
        ids: &[i64],
    ) -> Result<u64, StoreError> {
        let conn = &mut self.db;
        let mut removed = 0u64;
        for chunk in ids.chunks(IDS_PER_DELETE) {
            let n = db_run!(conn: {
                diesel::delete(
                    key_packages::table
                        .filter(key_packages::user_id.eq(user.as_str()))
                        .filter(key_packages::recipient_device_id.eq(device.as_str()))
                        .filter(key_packages::id.eq_any(chunk)),
                )
                .execute(conn)
                .await?
            });
            removed += n as u64;
        }
        Ok(removed)
    }

    /// The transaction of [`Store::send_key_packages`]: the checks, the inbox bound under
    /// each recipient inbox's lock, the inserts and the notifications.
    async fn put_in_inboxes(
        &mut self,
        user: &UserId,
        sender: &DeviceId,
        packages: &[NewKeyPackage],
        inbox_max: usize,
    ) -> Result<Vec<i64>, SendError> {
        let current = self.current_user_keys(std::slice::from_ref(user)).await?;
        let key_of = |d: &DeviceId| current.iter().find(|k| &k.device == d).map(|k| k.key_id);
        if key_of(sender).is_none() {
            return Err(SendRefusal::SenderNotCurrent.into());
        }
        for (index, p) in packages.iter().enumerate() {
            match key_of(&p.recipient_device) {
                None => return Err(SendRefusal::RecipientNotCurrent { index }.into()),
                Some(k) if k != p.recipient_key_id => {
                    return Err(SendRefusal::RecipientKeyChanged { index, current: k }.into())
                }
                Some(_) => {}
            }
        }
        // Inboxes in one sorted order, so two sends to overlapping devices cannot deadlock.
        for r in recipients(packages) {
            lock(&mut self.db, TxLock::Device(DeviceScope::Inbox, user, r)).await?;
            let held = self.inbox_len(user, r).await?;
            let adding = packages.iter().filter(|p| &p.recipient_device == r).count();
            if usize::try_from(held)
                .unwrap_or(usize::MAX)
                .saturating_add(adding)
                > inbox_max
            {
                return Err(SendRefusal::InboxFull {
                    device: r.clone(),
                    held,
                    adding,
                    max: inbox_max,
                }
                .into());
            }
        }
        let now = Timestamp::now();
        let mut ids = Vec::with_capacity(packages.len());
        for p in packages {
            ids.push(self.insert_key_package(user, sender, p, now).await?);
        }
        for r in recipients(packages) {
            let event = DeviceEvent::new(EventKind::KeyPackages, user, r);
            notify_in_tx(&mut self.db, &event).await?;
        }
        Ok(ids)
    }
}

/// The recipient devices of a send, sorted, each once.
fn recipients(packages: &[NewKeyPackage]) -> Vec<&DeviceId> {
    let mut recipients: Vec<&DeviceId> = packages.iter().map(|p| &p.recipient_device).collect();
    recipients.sort();
    recipients.dedup();
    recipients
}

impl Store {
    /// Puts packages from `sender` into the inboxes of other devices of `user`, in one
    /// transaction, and once it has committed wakes the recipients' watches. Returns the
    /// packages' ids in the order given.
    ///
    /// Checked in the same transaction, before anything is written: the sender and every
    /// recipient have a current (non-revoked) key, each package names its recipient's
    /// current key, and no inbox would hold more than `inbox_max` packages; otherwise the
    /// [`SendRefusal`] says which, and nothing is written. `recorder` records the answer of a
    /// send made with an idempotency key in the same transaction ([`super::idempotency`]).
    pub async fn send_key_packages(
        &self,
        user: &UserId,
        sender: &DeviceId,
        packages: &[NewKeyPackage],
        inbox_max: usize,
        recorder: &Recorder<'_, Vec<i64>>,
    ) -> Result<Vec<i64>, SendError> {
        let ids = self
            .transaction_recorded(recorder, async |tx| {
                tx.put_in_inboxes(user, sender, packages, inbox_max).await
            })
            .await?;
        let events: Vec<DeviceEvent> = recipients(packages)
            .into_iter()
            .map(|r| DeviceEvent::new(EventKind::KeyPackages, user, r))
            .collect();
        self.announce_committed(&events).await;
        Ok(ids)
    }
}
