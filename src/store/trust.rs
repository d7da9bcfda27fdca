//! Trust relationships (TrustedUser): the users an author trusts, who become the recipients
//! of a session created "with the author's trusted users".
//!
//! The primary key `(author_user_id, trusted_user_id)` is also the index of "trusted users of
//! an author", listed in user-id order with a keyset cursor. An author trusts at most a given
//! number of users (the service passes its recipient-list limit): the count and the insert
//! run in one transaction under the author's lock (`locks::TxLock::Trust`), so two
//! concurrent additions cannot both pass the count.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::locks::{lock, TxLock};
use super::schema::trusted_users;
use super::{db_run, Conn, StoreError, Timestamp, Tx};
use crate::crypto::ids::UserId;
use crate::store::error::Stored;

/// One trusted user of an author.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedUser {
    /// The trusted user.
    pub user: UserId,
    /// When the author started trusting them.
    pub created_at: Timestamp,
}

/// What adding a trusted user did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddTrust {
    /// Added now.
    Added(Timestamp),
    /// Already trusted since this time; nothing changed.
    AlreadyTrusted(Timestamp),
    /// The author already trusts the most users allowed; nothing changed.
    LimitReached,
}

impl Tx {
    /// Makes `author` trust `trusted`, unless it already does or already trusts `max` users.
    pub async fn add_trusted_user(
        &mut self,
        author: &UserId,
        trusted: &UserId,
        max: usize,
    ) -> Result<AddTrust, StoreError> {
        let conn = &mut self.db;
        lock(conn, TxLock::Trust(author)).await?;
        let since: Option<i64> = db_run!(conn: {
            trusted_users::table
                .find((author.as_str(), trusted.as_str()))
                .select(trusted_users::created_at)
                .first(conn)
                .await
                .optional()?
        });
        if let Some(at) = since {
            return Ok(AddTrust::AlreadyTrusted(Timestamp::from_unix_micros(at)));
        }
        let count: i64 = db_run!(conn: {
            trusted_users::table
                .filter(trusted_users::author_user_id.eq(author.as_str()))
                .count()
                .get_result(conn)
                .await?
        });
        if usize::try_from(count).unwrap_or(usize::MAX) >= max {
            return Ok(AddTrust::LimitReached);
        }
        let now = Timestamp::now();
        db_run!(conn: {
            diesel::insert_into(trusted_users::table)
                .values((
                    trusted_users::author_user_id.eq(author.as_str()),
                    trusted_users::trusted_user_id.eq(trusted.as_str()),
                    trusted_users::created_at.eq(now.unix_micros()),
                ))
                .execute(conn)
                .await?;
        });
        Ok(AddTrust::Added(now))
    }

    /// Ends `author`'s trust in `trusted`; [`StoreError::NotFound`] if it did not trust them.
    pub async fn remove_trusted_user(
        &mut self,
        author: &UserId,
        trusted: &UserId,
    ) -> Result<(), StoreError> {
        let conn = &mut self.db;
        lock(conn, TxLock::Trust(author)).await?;
        let deleted = db_run!(conn: {
            diesel::delete(trusted_users::table.find((author.as_str(), trusted.as_str())))
                .execute(conn)
                .await?
        });
        if deleted == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }
}

impl Conn {
    /// The users `author` trusts, in user-id order, after `after`, at most `limit`.
    pub async fn trusted_users(
        &mut self,
        author: &UserId,
        after: Option<&UserId>,
        limit: i64,
    ) -> Result<Vec<TrustedUser>, StoreError> {
        let conn = &mut self.db;
        let after = after.map(UserId::as_str).unwrap_or("");
        let rows: Vec<(String, i64)> = db_run!(conn: {
            trusted_users::table
                .filter(trusted_users::author_user_id.eq(author.as_str()))
                .filter(trusted_users::trusted_user_id.gt(after))
                .order(trusted_users::trusted_user_id)
                .limit(limit)
                .select((trusted_users::trusted_user_id, trusted_users::created_at))
                .load(conn)
                .await?
        });
        rows.into_iter()
            .map(|(u, at)| {
                Ok(TrustedUser {
                    user: UserId::new(u).stored("trusted user id")?,
                    created_at: Timestamp::from_unix_micros(at),
                })
            })
            .collect()
    }
}
