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
use super::locks::{lock, DeviceScope, TxLock};
use super::schema::key_packages;
use super::{db_run, unsigned, DbConn, Store, StoreError, Timestamp};
use crate::crypto::ids::{DeviceId, KeyId, UserId};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
            user: UserId::new(r.user_id).map_err(|e| StoreError::corrupt("user id", e))?,
            sender_device: DeviceId::new(r.sender_device_id)
                .map_err(|e| StoreError::corrupt("sender device id", e))?,
            recipient_device: DeviceId::new(r.recipient_device_id)
                .map_err(|e| StoreError::corrupt("recipient device id", e))?,
            recipient_key_id: KeyId::from_slice(&r.recipient_key_id)
                .map_err(|e| StoreError::corrupt("recipient key id", e))?,
            payload: r.payload,
            created_at: Timestamp::from_unix_micros(r.created_at),
        })
    }
}

async fn inbox_len(conn: &mut DbConn, user: &UserId, device: &DeviceId) -> Result<u64, StoreError> {
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

async fn send(
    conn: &mut DbConn,
    user: &UserId,
    sender: &DeviceId,
    packages: &[NewKeyPackage],
    inbox_max: usize,
) -> Result<Vec<i64>, StoreError> {
    // Inboxes in one sorted order, so two sends to overlapping devices cannot deadlock.
    let mut recipients: Vec<&DeviceId> = packages.iter().map(|p| &p.recipient_device).collect();
    recipients.sort();
    recipients.dedup();
    for r in &recipients {
        lock(conn, TxLock::Device(DeviceScope::Inbox, user, r)).await?;
        let held = inbox_len(conn, user, r).await?;
        let adding = packages
            .iter()
            .filter(|p| &p.recipient_device == *r)
            .count();
        if usize::try_from(held)
            .unwrap_or(usize::MAX)
            .saturating_add(adding)
            > inbox_max
        {
            return Err(StoreError::LimitExceeded(format!(
                "the inbox of device {user}/{r} holds {held} packages; {adding} more would pass the bound of {inbox_max}"
            )));
        }
    }
    let now = Timestamp::now().unix_micros();
    let mut ids = Vec::with_capacity(packages.len());
    for p in packages {
        let id: i64 = db_run!(conn: {
            diesel::insert_into(key_packages::table)
                .values((
                    key_packages::user_id.eq(user.as_str()),
                    key_packages::sender_device_id.eq(sender.as_str()),
                    key_packages::recipient_device_id.eq(p.recipient_device.as_str()),
                    key_packages::recipient_key_id.eq(p.recipient_key_id.as_bytes().as_slice()),
                    key_packages::payload.eq(p.payload.as_slice()),
                    key_packages::created_at.eq(now),
                ))
                .returning(key_packages::id)
                .get_result(conn)
                .await?
        });
        ids.push(id);
    }
    for r in recipients {
        notify_in_tx(conn, &DeviceEvent::new(EventKind::KeyPackages, user, r)).await?;
    }
    Ok(ids)
}

async fn inbox(
    conn: &mut DbConn,
    user: &UserId,
    device: &DeviceId,
    after: i64,
    limit: i64,
) -> Result<Vec<KeyPackage>, StoreError> {
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

async fn ack(
    conn: &mut DbConn,
    user: &UserId,
    device: &DeviceId,
    ids: &[i64],
) -> Result<u64, StoreError> {
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

impl Store {
    /// One page of a device's inbox: packages with `id > after`, oldest first, at most `limit`.
    pub async fn key_package_inbox(
        &self,
        user: &UserId,
        device: &DeviceId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<KeyPackage>, StoreError> {
        inbox(&mut self.db_conn().await?, user, device, after, limit).await
    }

    /// Removes packages from a device's inbox (one transaction); ids of other devices'
    /// packages, or already removed, are passed over. Returns how many were removed.
    pub async fn ack_key_packages(
        &self,
        user: UserId,
        device: DeviceId,
        ids: Vec<i64>,
    ) -> Result<u64, StoreError> {
        self.transaction(async move |tx| ack(&mut tx.conn.db, &user, &device, &ids).await)
            .await
    }

    /// Puts packages from `sender` into the inboxes of other devices of `user`, in one
    /// transaction, and wakes the recipients' watches. Returns the packages' ids in the order
    /// given.
    ///
    /// Checked in the same transaction, before anything is written: the sender and every
    /// recipient have a current (non-revoked) key, and each package names its recipient's
    /// current key; otherwise the [`SendRefusal`] says which, and nothing is written.
    /// [`StoreError::LimitExceeded`] if an inbox would hold more than `inbox_max` packages.
    pub async fn send_key_packages(
        &self,
        user: UserId,
        sender: DeviceId,
        packages: Vec<NewKeyPackage>,
        inbox_max: usize,
    ) -> Result<Result<Vec<i64>, SendRefusal>, StoreError> {
        let mut recipients: Vec<DeviceId> = packages
            .iter()
            .map(|p| p.recipient_device.clone())
            .collect();
        recipients.sort();
        recipients.dedup();
        let sent = {
            let user = user.clone();
            self.transaction(async move |tx| {
                let current = tx.current_user_keys(std::slice::from_ref(&user)).await?;
                let key_of =
                    |d: &DeviceId| current.iter().find(|k| &k.device == d).map(|k| k.key_id);
                if key_of(&sender).is_none() {
                    return Ok(Err(SendRefusal::SenderNotCurrent));
                }
                for (index, p) in packages.iter().enumerate() {
                    match key_of(&p.recipient_device) {
                        None => return Ok(Err(SendRefusal::RecipientNotCurrent { index })),
                        Some(k) if k != p.recipient_key_id => {
                            return Ok(Err(SendRefusal::RecipientKeyChanged { index, current: k }))
                        }
                        Some(_) => {}
                    }
                }
                send(&mut tx.conn.db, &user, &sender, &packages, inbox_max)
                    .await
                    .map(Ok)
            })
            .await?
        };
        if sent.is_ok() {
            let events: Vec<DeviceEvent> = recipients
                .iter()
                .map(|r| DeviceEvent::new(EventKind::KeyPackages, &user, r))
                .collect();
            self.announce_committed(&events).await;
        }
        Ok(sent)
    }
}
