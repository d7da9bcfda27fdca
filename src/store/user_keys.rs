//! Device key bundles (UserKey): a device's X-Wing encapsulation key, Ed25519 identity key
//! and self-signature, one row per key version.
//!
//! A device has at most one *current* key: the latest published one, unless revoked.
//! Publishing a new key supersedes the current one in the same transaction; revoking keeps
//! the row. The database enforces "at most one current key per device" with a partial unique
//! index, so even a bug or a race cannot leave a device with two.
//!
//! The store keeps the key bytes as given: the service checks the bundle's signature and
//! shape before publishing, and the key id is the encapsulation key's fingerprint
//! ([`KeyId`]).

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::user_keys;
use super::sql::coalesce;
use super::{db_run, unsigned, Conn, StoreError, Timestamp, Tx};
use crate::crypto::ids::{DeviceId, KeyId, UserId};
use crate::crypto::Suite;
use crate::store::error::Stored;

/// Most users whose keys one query asks for; longer lists are split, because each backend
/// caps the number of bound parameters in a statement.
const USERS_PER_QUERY: usize = 1000;

/// A device key bundle to publish, already checked by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewUserKey {
    /// The fingerprint of the encapsulation key.
    pub key_id: KeyId,
    /// The owning user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// The bundle's suite.
    pub suite: Suite,
    /// The X-Wing encapsulation key.
    pub encapsulation_key: Vec<u8>,
    /// The Ed25519 identity key that signed the bundle.
    pub identity_key: Vec<u8>,
    /// The identity key's signature over the bundle.
    pub signature: Vec<u8>,
}

/// A published device key bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserKey {
    /// The fingerprint of the encapsulation key.
    pub key_id: KeyId,
    /// The owning user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// 1 for the device's first key, one more for each key it published after.
    pub version: u32,
    /// The bundle's suite.
    pub suite: Suite,
    /// The X-Wing encapsulation key.
    pub encapsulation_key: Vec<u8>,
    /// The Ed25519 identity key.
    pub identity_key: Vec<u8>,
    /// The identity key's signature over the bundle.
    pub signature: Vec<u8>,
    /// When it was published.
    pub created_at: Timestamp,
    /// When a newer key of the device replaced it.
    pub superseded_at: Option<Timestamp>,
    /// When it was revoked.
    pub revoked_at: Option<Timestamp>,
}

impl UserKey {
    /// Whether this is its device's current key: neither superseded nor revoked.
    pub fn is_current(&self) -> bool {
        self.superseded_at.is_none() && self.revoked_at.is_none()
    }
}

#[derive(Insertable)]
#[diesel(table_name = user_keys)]
struct UserKeyInsert<'a> {
    key_id: &'a [u8],
    user_id: &'a str,
    device_id: &'a str,
    version: i32,
    suite: i16,
    encapsulation_key: &'a [u8],
    identity_key: &'a [u8],
    signature: &'a [u8],
    created_at: i64,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = user_keys)]
struct UserKeyRow {
    key_id: Vec<u8>,
    user_id: String,
    device_id: String,
    version: i32,
    suite: i16,
    encapsulation_key: Vec<u8>,
    identity_key: Vec<u8>,
    signature: Vec<u8>,
    created_at: i64,
    superseded_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl TryFrom<UserKeyRow> for UserKey {
    type Error = StoreError;

    fn try_from(row: UserKeyRow) -> Result<Self, StoreError> {
        let suite = u8::try_from(row.suite)
            .map_err(|_| StoreError::corrupt("user key suite", row.suite))
            .and_then(|b| Suite::from_byte(b).stored("user key suite"))?;
        Ok(UserKey {
            key_id: KeyId::from_slice(&row.key_id).stored("user key id")?,
            user: UserId::new(row.user_id).stored("user id")?,
            device: DeviceId::new(row.device_id).stored("device id")?,
            version: unsigned("user key version", row.version)?,
            suite,
            encapsulation_key: row.encapsulation_key,
            identity_key: row.identity_key,
            signature: row.signature,
            created_at: Timestamp::from_unix_micros(row.created_at),
            superseded_at: row.superseded_at.map(Timestamp::from_unix_micros),
            revoked_at: row.revoked_at.map(Timestamp::from_unix_micros),
        })
    }
}

impl Tx {
    /// Publishes a device key as the device's new current key: the previous current key is
    /// marked superseded and the new one gets the next version number. A transaction, because
    /// it reads, updates and inserts.
    ///
    /// [`StoreError::AlreadyExists`] if this key id was ever published (by any device);
    /// [`StoreError::VersionConflict`] if a concurrent publish for the same device won.
    /// Publishing the device's current bundle again is a retry: it returns that key and changes
    /// nothing.
    pub async fn publish_user_key(&mut self, key: &NewUserKey) -> Result<UserKey, StoreError> {
        let key_id = key.key_id.as_bytes().as_slice();
        let (user, device) = (key.user.as_str(), key.device.as_str());
        let now = Timestamp::now().unix_micros();

        if let Some(existing) = self.user_key(&key.key_id).await? {
            // Publishing the device's current bundle again is a retry: answer as the first
            // time did and change nothing. Any other reuse of a key id is a conflict.
            let same_bundle = existing.user == key.user
                && existing.device == key.device
                && existing.identity_key == key.identity_key
                && existing.signature == key.signature;
            if same_bundle && existing.is_current() {
                return Ok(existing);
            }
            return Err(StoreError::AlreadyExists(format!(
                "user key {}",
                key.key_id
            )));
        }

        let conn = &mut self.db;
        let latest: Option<i32> = db_run!(conn: {
            user_keys::table
                .filter(user_keys::user_id.eq(user))
                .filter(user_keys::device_id.eq(device))
                .select(diesel::dsl::max(user_keys::version))
                .get_result(conn)
                .await?
        });
        let version = latest
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| StoreError::corrupt("user key version", i32::MAX))?;

        db_run!(conn: {
            diesel::update(
                user_keys::table
                    .filter(user_keys::user_id.eq(user))
                    .filter(user_keys::device_id.eq(device))
                    .filter(user_keys::superseded_at.is_null())
                    .filter(user_keys::revoked_at.is_null()),
            )
            .set(user_keys::superseded_at.eq(now))
            .execute(conn)
            .await?;
        });

        let insert = UserKeyInsert {
            key_id,
            user_id: user,
            device_id: device,
            version,
            suite: i16::from(key.suite as u8),
            encapsulation_key: &key.encapsulation_key,
            identity_key: &key.identity_key,
            signature: &key.signature,
            created_at: now,
        };
        let inserted: Result<UserKeyRow, StoreError> = db_run!(conn: {
            diesel::insert_into(user_keys::table)
                .values(&insert)
                .returning(UserKeyRow::as_returning())
                .get_result(conn)
                .await
                .map_err(StoreError::from)
        });
        match inserted {
            Ok(row) => row.try_into(),
            // The key id was checked above, so a unique violation here means a concurrent
            // publish for the same device took this version (or became current) first.
            Err(StoreError::AlreadyExists(what)) => Err(StoreError::VersionConflict(format!(
                "a concurrent publish for device {user}/{device} won ({what})"
            ))),
            Err(e) => Err(e),
        }
    }
}

impl Conn {
    /// Revokes one key of a device; the row is kept. Revoking twice changes nothing (the first
    /// revocation time stays). [`StoreError::NotFound`] if the device has no key with this id.
    pub async fn revoke_user_key(
        &mut self,
        user: &UserId,
        device: &DeviceId,
        key_id: &KeyId,
    ) -> Result<(), StoreError> {
        let conn = &mut self.db;
        let now = Timestamp::now().unix_micros();
        // COALESCE keeps the first revocation time, so revoking twice changes nothing.
        let updated = db_run!(conn: {
            diesel::update(
                user_keys::table
                    .filter(user_keys::key_id.eq(key_id.as_bytes().as_slice()))
                    .filter(user_keys::user_id.eq(user.as_str()))
                    .filter(user_keys::device_id.eq(device.as_str())),
            )
            .set(user_keys::revoked_at.eq(coalesce(user_keys::revoked_at, now)))
            .execute(conn)
            .await?
        });
        if updated == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// The key with this id, current or not.
    pub async fn user_key(&mut self, key_id: &KeyId) -> Result<Option<UserKey>, StoreError> {
        let conn = &mut self.db;
        let row: Option<UserKeyRow> = db_run!(conn: {
            user_keys::table
                .find(key_id.as_bytes().as_slice())
                .select(UserKeyRow::as_select())
                .first(conn)
                .await
                .optional()?
        });
        row.map(UserKey::try_from).transpose()
    }

    /// The current keys of every device of these users, ordered by user then device; users
    /// without keys are simply absent.
    pub async fn current_user_keys(
        &mut self,
        users: &[UserId],
    ) -> Result<Vec<UserKey>, StoreError> {
        let conn = &mut self.db;
        let mut keys = Vec::new();
        for chunk in users.chunks(USERS_PER_QUERY) {
            let ids: Vec<&str> = chunk.iter().map(UserId::as_str).collect();
            let rows: Vec<UserKeyRow> = db_run!(conn: {
                user_keys::table
                    .filter(user_keys::user_id.eq_any(&ids))
                    .filter(user_keys::superseded_at.is_null())
                    .filter(user_keys::revoked_at.is_null())
                    .order((user_keys::user_id, user_keys::device_id))
                    .select(UserKeyRow::as_select())
                    .load(conn)
                    .await?
            });
            for row in rows {
                keys.push(row.try_into()?);
            }
        }
        Ok(keys)
    }
}
