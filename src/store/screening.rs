//! What the stored-key screening job ([`crate::key_screening`]) reads and writes: the stored
//! encapsulation keys page by page, the two ways it takes an unusable key out of use, and the
//! record that a one-off maintenance job completed (`maintenance_runs`).
//!
//! The store does not judge keys: the job parses each with the crypto core and tells the
//! store which to take out.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::{maintenance_runs, prekeys, user_keys};
use super::{db_run, Conn, StoreError, Timestamp, Tx};
use crate::crypto::ids::{DeviceId, KeyId, UserId};
use crate::store::error::Stored;

/// Which record a stored encapsulation key sits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRecord {
    /// A device key bundle, by its key id.
    DeviceKey(KeyId),
    /// A prekey, by its row id.
    Prekey(i64),
}

/// An encapsulation key as stored, with the device it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEncapsulationKey {
    /// Where it is stored.
    pub record: KeyRecord,
    /// The owning user.
    pub user: UserId,
    /// The owning device.
    pub device: DeviceId,
    /// The key's bytes as stored.
    pub encapsulation_key: Vec<u8>,
}

fn owner(user: String, device: String) -> Result<(UserId, DeviceId), StoreError> {
    Ok((
        UserId::new(user).stored("user id")?,
        DeviceId::new(device).stored("device id")?,
    ))
}

impl Conn {
    /// Device keys not yet revoked, in key-id order after `after`, at most `limit`.
    pub async fn unrevoked_device_keys_after(
        &mut self,
        after: Option<&KeyId>,
        limit: i64,
    ) -> Result<Vec<StoredEncapsulationKey>, StoreError> {
        let conn = &mut self.db;
        let after: &[u8] = after.map(|k| k.as_bytes().as_slice()).unwrap_or(&[]);
        let rows: Vec<(Vec<u8>, String, String, Vec<u8>)> = db_run!(conn: {
            user_keys::table
                .filter(user_keys::revoked_at.is_null())
                .filter(user_keys::key_id.gt(after))
                .order(user_keys::key_id)
                .limit(limit)
                .select((
                    user_keys::key_id,
                    user_keys::user_id,
                    user_keys::device_id,
                    user_keys::encapsulation_key,
                ))
                .load(conn)
                .await?
        });
        rows.into_iter()
            .map(|(key_id, user, device, encapsulation_key)| {
                let key_id = KeyId::from_slice(&key_id).stored("key id")?;
                let (user, device) = owner(user, device)?;
                Ok(StoredEncapsulationKey {
                    record: KeyRecord::DeviceKey(key_id),
                    user,
                    device,
                    encapsulation_key,
                })
            })
            .collect()
    }

    /// Prekeys of every kind, in row-id order after `after`, at most `limit`.
    pub async fn prekeys_after(
        &mut self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredEncapsulationKey>, StoreError> {
        let conn = &mut self.db;
        let rows: Vec<(i64, String, String, Vec<u8>)> = db_run!(conn: {
            prekeys::table
                .filter(prekeys::id.gt(after))
                .order(prekeys::id)
                .limit(limit)
                .select((
                    prekeys::id,
                    prekeys::user_id,
                    prekeys::device_id,
                    prekeys::encapsulation_key,
                ))
                .load(conn)
                .await?
        });
        rows.into_iter()
            .map(|(id, user, device, encapsulation_key)| {
                let (user, device) = owner(user, device)?;
                Ok(StoredEncapsulationKey {
                    record: KeyRecord::Prekey(id),
                    user,
                    device,
                    encapsulation_key,
                })
            })
            .collect()
    }

    /// When the maintenance job `name` completed, if it did.
    pub async fn maintenance_completed_at(
        &mut self,
        name: &str,
    ) -> Result<Option<Timestamp>, StoreError> {
        let conn = &mut self.db;
        let at: Option<i64> = db_run!(conn: {
            maintenance_runs::table
                .find(name)
                .select(maintenance_runs::completed_at)
                .first(conn)
                .await
                .optional()?
        });
        Ok(at.map(Timestamp::from_unix_micros))
    }
}

impl Tx {
    /// Takes a stored key out of use: revokes a device key that is not yet revoked, deletes a
    /// prekey. False if another writer (a replica screening at the same time, the device
    /// itself) already did, so that the caller records the change once.
    pub async fn take_key_out_of_use(&mut self, record: KeyRecord) -> Result<bool, StoreError> {
        let conn = &mut self.db;
        let now = Timestamp::now().unix_micros();
        let changed = match record {
            KeyRecord::DeviceKey(key_id) => db_run!(conn: {
                diesel::update(
                    user_keys::table
                        .filter(user_keys::key_id.eq(key_id.as_bytes().as_slice()))
                        .filter(user_keys::revoked_at.is_null()),
                )
                .set(user_keys::revoked_at.eq(now))
                .execute(conn)
                .await?
            }),
            KeyRecord::Prekey(id) => db_run!(conn: {
                diesel::delete(prekeys::table.find(id)).execute(conn).await?
            }),
        };
        Ok(changed == 1)
    }

    /// Records that the maintenance job `name` completed; a second record of the same job
    /// (another replica finishing too) changes nothing.
    pub async fn record_maintenance_completed(
        &mut self,
        name: &str,
        details: &str,
    ) -> Result<(), StoreError> {
        let conn = &mut self.db;
        let now = Timestamp::now().unix_micros();
        db_run!(conn: {
            diesel::insert_into(maintenance_runs::table)
                .values((
                    maintenance_runs::name.eq(name),
                    maintenance_runs::completed_at.eq(now),
                    maintenance_runs::details.eq(details),
                ))
                .on_conflict_do_nothing()
                .execute(conn)
                .await?;
        });
        Ok(())
    }
}
