//! API tokens: who may call Keyhold, with which role.
//!
//! Only the SHA-256 of a token is stored ([`TokenHash`]); the plaintext is shown once when it
//! is created and never written anywhere. Two ways to authenticate a presented token:
//!
//! - by id ([`Conn::find_token`]) when the token carries its id, then compare the stored
//!   hash with [`TokenHash::matches`] in constant time;
//! - by hash ([`Conn::find_active_token`]) through the unique index on `token_hash`: the
//!   lookup's timing depends on the hash of the presented token, not on any stored token, so
//!   it tells an attacker nothing useful.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use super::schema::api_tokens;
use super::sql::coalesce;
use super::{db_run, Conn, StoreError, Timestamp};
use crate::crypto::ids::{DeviceId, UserId};
use crate::store::error::Stored;

/// Ids per statement of [`Conn::inactive_tokens`], under both backends' limits on bound
/// parameters.
const TOKENS_PER_STATEMENT: usize = 500;

/// A token's public identifier (16 bytes, UUIDv7), used to name it when revoking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenId([u8; 16]);

impl TokenId {
    /// A fresh, time-sortable token id.
    pub fn generate() -> Self {
        TokenId(*Uuid::now_v7().as_bytes())
    }

    /// Wraps 16 raw bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        TokenId(bytes)
    }

    /// Parses 16 raw bytes; `None` for any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 16]>::try_from(bytes).ok().map(TokenId)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl std::fmt::Display for TokenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&Uuid::from_bytes(self.0), f)
    }
}

/// The SHA-256 of a token, the only form in which tokens are stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Hashes a token as presented by a caller.
    pub fn of(token: &[u8]) -> Self {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token);
        let mut hash = [0u8; 32];
        // A SHA-256 digest is always 32 bytes, so the lengths match.
        hash.copy_from_slice(digest.as_ref());
        TokenHash(hash)
    }

    /// Wraps 32 bytes already known to be a token hash.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        TokenHash(bytes)
    }

    /// The 32 bytes of the hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether two hashes are equal, compared in constant time.
    pub fn matches(&self, other: &TokenHash) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(&self.0, &other.0).is_ok()
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A hash of a high-entropy token is not secret, but there is no reason to log it.
        f.write_str("TokenHash(..)")
    }
}

/// What a token allows (see `DESIGN.md`, "Auth").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i16)]
#[non_exhaustive]
pub enum Role {
    /// An app server: acts for any user.
    App = 1,
    /// One device: acts as its own (user, device) only.
    Device = 2,
    /// Staff tooling: escrow reads with a reason, audit events.
    Staff = 3,
    /// Administration: tokens.
    Admin = 4,
}

impl Role {
    fn from_db(value: i16) -> Result<Self, StoreError> {
        match value {
            1 => Ok(Role::App),
            2 => Ok(Role::Device),
            3 => Ok(Role::Staff),
            4 => Ok(Role::Admin),
            other => Err(StoreError::corrupt("token role", other)),
        }
    }
}

/// A token to record; [`Conn::insert_token`] adds the creation time.
#[derive(Clone, Debug)]
pub struct NewApiToken {
    /// The token's id.
    pub token_id: TokenId,
    /// The SHA-256 of the token.
    pub token_hash: TokenHash,
    /// Its role.
    pub role: Role,
    /// The user it is bound to (device tokens).
    pub user: Option<UserId>,
    /// The device it is bound to (device tokens).
    pub device: Option<DeviceId>,
    /// A note for operators ("chat backend, eu-1").
    pub label: Option<String>,
}

/// A stored token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiToken {
    /// The token's id.
    pub token_id: TokenId,
    /// The SHA-256 of the token.
    pub token_hash: TokenHash,
    /// Its role.
    pub role: Role,
    /// The user it is bound to, if any.
    pub user: Option<UserId>,
    /// The device it is bound to, if any.
    pub device: Option<DeviceId>,
    /// The operators' note.
    pub label: Option<String>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was revoked; a revoked token authenticates nothing.
    pub revoked_at: Option<Timestamp>,
}

#[derive(Insertable)]
#[diesel(table_name = api_tokens)]
struct TokenInsert<'a> {
    token_id: &'a [u8],
    token_hash: &'a [u8],
    role: i16,
    user_id: Option<&'a str>,
    device_id: Option<&'a str>,
    label: Option<&'a str>,
    created_at: i64,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = api_tokens)]
struct TokenRow {
    token_id: Vec<u8>,
    token_hash: Vec<u8>,
    role: i16,
    user_id: Option<String>,
    device_id: Option<String>,
    label: Option<String>,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl TryFrom<TokenRow> for ApiToken {
    type Error = StoreError;

    fn try_from(row: TokenRow) -> Result<Self, StoreError> {
        Ok(ApiToken {
            token_id: TokenId::from_slice(&row.token_id)
                .ok_or_else(|| StoreError::corrupt("token id", hex::encode(&row.token_id)))?,
            token_hash: <[u8; 32]>::try_from(row.token_hash.as_slice())
                .map(TokenHash)
                .map_err(|_| StoreError::corrupt("token hash", hex::encode(&row.token_hash)))?,
            role: Role::from_db(row.role)?,
            user: row
                .user_id
                .map(UserId::new)
                .transpose()
                .stored("token user id")?,
            device: row
                .device_id
                .map(DeviceId::new)
                .transpose()
                .stored("token device id")?,
            label: row.label,
            created_at: Timestamp::from_unix_micros(row.created_at),
            revoked_at: row.revoked_at.map(Timestamp::from_unix_micros),
        })
    }
}

impl Conn {
    /// Records a new token. [`StoreError::AlreadyExists`] if its id or hash is taken.
    pub async fn insert_token(&mut self, token: &NewApiToken) -> Result<ApiToken, StoreError> {
        let conn = &mut self.db;
        let insert = TokenInsert {
            token_id: token.token_id.as_bytes(),
            token_hash: token.token_hash.as_bytes(),
            role: token.role as i16,
            user_id: token.user.as_ref().map(UserId::as_str),
            device_id: token.device.as_ref().map(DeviceId::as_str),
            label: token.label.as_deref(),
            created_at: Timestamp::now().unix_micros(),
        };
        let row: TokenRow = db_run!(conn: {
            diesel::insert_into(api_tokens::table)
                .values(&insert)
                .returning(TokenRow::as_returning())
                .get_result(conn)
                .await?
        });
        row.try_into()
    }

    /// The unrevoked token with this hash, if any: how a bearer token is authenticated.
    pub async fn find_active_token(
        &mut self,
        hash: &TokenHash,
    ) -> Result<Option<ApiToken>, StoreError> {
        let conn = &mut self.db;
        let row: Option<TokenRow> = db_run!(conn: {
            api_tokens::table
                .filter(api_tokens::token_hash.eq(hash.as_bytes().as_slice()))
                .filter(api_tokens::revoked_at.is_null())
                .select(TokenRow::as_select())
                .first(conn)
                .await
                .optional()?
        });
        row.map(ApiToken::try_from).transpose()
    }

    /// The token with this id, revoked or not; the caller checks `revoked_at` and compares
    /// the hash with [`TokenHash::matches`].
    pub async fn find_token(&mut self, token_id: &TokenId) -> Result<Option<ApiToken>, StoreError> {
        let conn = &mut self.db;
        let row: Option<TokenRow> = db_run!(conn: {
            api_tokens::table
                .find(token_id.as_bytes().as_slice())
                .select(TokenRow::as_select())
                .first(conn)
                .await
                .optional()?
        });
        row.map(ApiToken::try_from).transpose()
    }

    /// Revokes a token by id; revoking a revoked token changes nothing.
    /// [`StoreError::NotFound`] if no token has this id.
    pub async fn revoke_token(&mut self, token_id: &TokenId) -> Result<(), StoreError> {
        let conn = &mut self.db;
        let now = Timestamp::now().unix_micros();
        // COALESCE keeps the first revocation time; the row count then says only whether the
        // token exists, so revoking twice is not an error.
        let updated = db_run!(conn: {
            diesel::update(api_tokens::table.find(token_id.as_bytes().as_slice()))
                .set(api_tokens::revoked_at.eq(coalesce(api_tokens::revoked_at, now)))
                .execute(conn)
                .await?
        });
        if updated == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Of `ids`, the tokens that no longer authenticate: revoked, or not stored at all. One
    /// statement per [`TOKENS_PER_STATEMENT`] ids, by primary key; open streams are checked
    /// against it (the watch streams of `service::watch`), so a revocation made through any replica, or
    /// straight in the database, reaches them.
    pub async fn inactive_tokens(&mut self, ids: &[TokenId]) -> Result<Vec<TokenId>, StoreError> {
        let mut active: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        for chunk in ids.chunks(TOKENS_PER_STATEMENT) {
            let keys: Vec<&[u8]> = chunk.iter().map(|id| id.as_bytes().as_slice()).collect();
            let conn = &mut self.db;
            let found: Vec<Vec<u8>> = db_run!(conn: {
                api_tokens::table
                    .filter(api_tokens::token_id.eq_any(&keys))
                    .filter(api_tokens::revoked_at.is_null())
                    .select(api_tokens::token_id)
                    .load(conn)
                    .await?
            });
            active.extend(found);
        }
        Ok(ids
            .iter()
            .filter(|id| !active.contains(id.as_bytes().as_slice()))
            .copied()
            .collect())
    }

    /// The number of unrevoked admin tokens (so the last one is not revoked by mistake).
    pub async fn count_active_admin_tokens(&mut self) -> Result<u64, StoreError> {
        let conn = &mut self.db;
        let count: i64 = db_run!(conn: {
            api_tokens::table
                .filter(api_tokens::role.eq(Role::Admin as i16))
                .filter(api_tokens::revoked_at.is_null())
                .count()
                .get_result(conn)
                .await?
        });
        super::unsigned("token count", count)
    }
}
