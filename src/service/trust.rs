//! The Trust service: the users an author trusts, who become the recipients of a session
//! created with `trusted_users_of_author` ([`trusted_recipients`]).
//!
//! An app server manages any author's trusted users, a device only its own user's. An author
//! trusts at most `max_list_len` users: the most recipients one CreateSession takes.

use tonic::Status;

use super::cursor::{self, Cursor, CursorKind};
use super::error::{into_status, DomainError, ErrorClass};
use super::{invalid, parse_field, require_acts_for, AppState};
use crate::auth::Principal;
use crate::crypto::ids::UserId;
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::trust_server::Trust;
use crate::store::trust::AddTrust;
use crate::store::StoreError;

/// Page size of ListTrustedUsers when the caller gives none.
pub(crate) const DEFAULT_PAGE: u32 = 100;
/// Largest ListTrustedUsers page.
pub(crate) const MAX_PAGE: u32 = 1000;

/// What the Trust workflow refuses.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TrustError {
    /// RemoveTrustedUser of a user the author does not trust.
    #[error("trusted_user_id: the author does not trust this user")]
    NotTrusted,
    /// AddTrustedUser past the per-author bound.
    #[error("trusted_user_id: {author} already trusts {max} users, the most allowed")]
    LimitReached {
        /// The author.
        author: UserId,
        /// The bound.
        max: usize,
    },
    /// A session "with the author's trusted users" when they are more than one call takes
    /// (possible if the setting was lowered since they were added).
    #[error("trusted_users_of_author: {author} trusts more than {max} users, the most recipients one call takes")]
    TooManyRecipients {
        /// The author.
        author: UserId,
        /// The most recipients one call takes.
        max: usize,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DomainError for TrustError {
    fn class(&self) -> ErrorClass {
        match self {
            TrustError::NotTrusted => ErrorClass::NotFound,
            TrustError::LimitReached { .. } | TrustError::TooManyRecipients { .. } => {
                ErrorClass::ResourceExhausted
            }
            TrustError::Store(e) => e.class(),
        }
    }

    fn public_message(&self) -> String {
        match self {
            TrustError::Store(e) => e.public_message(),
            other => other.to_string(),
        }
    }
}

into_status!(TrustError);

/// The cursor after a trusted user: the user id's UTF-8 bytes.
impl Cursor for UserId {
    const KIND: CursorKind = CursorKind::TrustedUsers;
    const LEGACY_PREFIX: Option<&'static str> = Some("tu1.");

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_str().as_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        UserId::new(std::str::from_utf8(bytes).ok()?).ok()
    }

    fn decode_legacy(text: &str) -> Option<Self> {
        Self::decode(&hex::decode(text).ok()?)
    }
}

/// Parses the author of a Trust call and checks the caller acts for it.
fn parse_author(caller: &Principal, author: &str) -> Result<UserId, Status> {
    let author = parse_field("author_user_id", UserId::new(author))?;
    require_acts_for(caller, &author, None)?;
    Ok(author)
}

/// The recipients of a session created with the author's trusted users: all of them as they
/// stand now. More than `max_list_len` (possible if the setting was lowered since they were
/// added) is RESOURCE_EXHAUSTED, as a longer explicit list would be.
pub(crate) async fn trusted_recipients(
    state: &AppState,
    author: &UserId,
) -> Result<Vec<UserId>, Status> {
    let max = state.max_list_len;
    let limit = i64::try_from(max).unwrap_or(i64::MAX - 1) + 1;
    let trusted = (state.store.conn().await?)
        .trusted_users(author, None, limit)
        .await?;
    if trusted.len() > max {
        return Err(TrustError::TooManyRecipients {
            author: author.clone(),
            max,
        }
        .into());
    }
    Ok(trusted.into_iter().map(|t| t.user).collect())
}

rpc_service! {
    /// The Trust gRPC service.
    TrustService: Trust {
        fn add_trusted_user(pb::AddTrustedUserRequest) -> pb::AddTrustedUserResponse, by [App, Device];
        fn remove_trusted_user(pb::RemoveTrustedUserRequest) -> pb::RemoveTrustedUserResponse, by [App, Device];
        fn list_trusted_users(pb::ListTrustedUsersRequest) -> pb::ListTrustedUsersResponse, by [App, Device];
    }
}

async fn add_trusted_user(
    state: &AppState,
    caller: &Principal,
    req: pb::AddTrustedUserRequest,
) -> Result<pb::AddTrustedUserResponse, Status> {
    let author = parse_author(caller, &req.author_user_id)?;
    let trusted = parse_field("trusted_user_id", UserId::new(req.trusted_user_id.clone()))?;
    if trusted == author {
        return Err(invalid(
            "trusted_user_id",
            "an author does not trust itself",
        ));
    }
    let max = state.max_list_len;
    let added = state
        .store
        .transaction(async |tx| tx.add_trusted_user(&author, &trusted, max).await)
        .await?;
    let (created_at, created) = match added {
        AddTrust::Added(at) => (at, true),
        AddTrust::AlreadyTrusted(at) => (at, false),
        AddTrust::LimitReached => return Err(TrustError::LimitReached { author, max }.into()),
    };
    Ok(pb::AddTrustedUserResponse {
        created_at: created_at.unix_micros(),
        created,
    })
}

async fn remove_trusted_user(
    state: &AppState,
    caller: &Principal,
    req: pb::RemoveTrustedUserRequest,
) -> Result<pb::RemoveTrustedUserResponse, Status> {
    let author = parse_author(caller, &req.author_user_id)?;
    let trusted = parse_field("trusted_user_id", UserId::new(req.trusted_user_id.clone()))?;
    state
        .store
        .transaction(
            async |tx| match tx.remove_trusted_user(&author, &trusted).await {
                Err(StoreError::NotFound) => Err(TrustError::NotTrusted),
                other => Ok(other?),
            },
        )
        .await?;
    Ok(pb::RemoveTrustedUserResponse {})
}

async fn list_trusted_users(
    state: &AppState,
    caller: &Principal,
    req: pb::ListTrustedUsersRequest,
) -> Result<pb::ListTrustedUsersResponse, Status> {
    let author = parse_author(caller, &req.author_user_id)?;
    let after = cursor::parse::<UserId>("cursor", &req.cursor)?;
    let limit = match req.page_size {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let page = (state.store.conn().await?)
        .trusted_users(&author, after.as_ref(), i64::from(limit))
        .await?;
    let next_cursor = match page.last() {
        Some(last) if page.len() >= limit as usize => cursor::format(&last.user),
        _ => String::new(),
    };
    Ok(pb::ListTrustedUsersResponse {
        trusted_users: page
            .into_iter()
            .map(|t| pb::TrustedUser {
                user_id: t.user.to_string(),
                created_at: t.created_at.unix_micros(),
            })
            .collect(),
        next_cursor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let u = UserId::new("bob@example").unwrap();
        let parse = |c: &str| cursor::parse::<UserId>("cursor", c);
        assert_eq!(parse(&cursor::format(&u)).unwrap(), Some(u.clone()));
        assert_eq!(parse("tu1.626f62406578616d706c65").unwrap(), Some(u));
        assert_eq!(parse("").unwrap(), None);
        for bad in [
            "tu1.",
            "tu1.zz",
            "tu2.626f62",
            "626f62",
            "tu1.20",
            "c1.03",
            "c1.0320",
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
