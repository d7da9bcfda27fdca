//! The Trust service: the users an author trusts, who become the recipients of a session
//! created with `trusted_users_of_author` ([`trusted_recipients`]).
//!
//! An app server manages any author's trusted users, a device only its own user's. An author
//! trusts at most `max_list_len` users: the most recipients one CreateSession takes.

use tonic::{Request, Response, Status};

use super::{invalid, parse_field, require_acts_for, require_role, store_status, AppState};
use crate::auth::{principal, Principal, Role};
use crate::crypto::ids::UserId;
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::trust_server::Trust;
use crate::store::trust::AddTrust;
use crate::store::StoreError;

/// Page size of ListTrustedUsers when the caller gives none.
pub const DEFAULT_PAGE: u32 = 100;
/// Largest ListTrustedUsers page.
pub const MAX_PAGE: u32 = 1000;

const CURSOR_PREFIX: &str = "tu1.";

/// The Trust gRPC service.
#[derive(Clone)]
pub struct TrustService {
    state: AppState,
}

impl TrustService {
    /// The service over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

/// The opaque cursor after a trusted user: a version prefix and the user id in hex.
fn format_cursor(after: &UserId) -> String {
    format!("{CURSOR_PREFIX}{}", hex::encode(after.as_str()))
}

fn parse_cursor(cursor: &str) -> Result<Option<UserId>, Status> {
    if cursor.is_empty() {
        return Ok(None);
    }
    cursor
        .strip_prefix(CURSOR_PREFIX)
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| UserId::new(s).ok())
        .map(Some)
        .ok_or_else(|| invalid("cursor", "not a cursor this service returned"))
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
pub async fn trusted_recipients(state: &AppState, author: &UserId) -> Result<Vec<UserId>, Status> {
    let max = state.max_list_len;
    let limit = i64::try_from(max).unwrap_or(i64::MAX - 1) + 1;
    let trusted = state
        .store
        .trusted_users(author, None, limit)
        .await
        .map_err(store_status)?;
    if trusted.len() > max {
        return Err(Status::resource_exhausted(format!(
            "trusted_users_of_author: {author} trusts more than {max} users, the most recipients one call takes"
        )));
    }
    Ok(trusted.into_iter().map(|t| t.user).collect())
}

#[tonic::async_trait]
impl Trust for TrustService {
    async fn add_trusted_user(
        &self,
        request: Request<pb::AddTrustedUserRequest>,
    ) -> Result<Response<pb::AddTrustedUserResponse>, Status> {
        let caller = principal(&request)?.clone();
        require_role(&caller, &[Role::App, Role::Device])?;
        let req = request.get_ref();
        let author = parse_author(&caller, &req.author_user_id)?;
        let trusted = parse_field("trusted_user_id", UserId::new(req.trusted_user_id.clone()))?;
        if trusted == author {
            return Err(invalid(
                "trusted_user_id",
                "an author does not trust itself",
            ));
        }
        let max = self.state.max_list_len;
        let (created_at, created) = match self
            .state
            .store
            .add_trusted_user(author.clone(), trusted, max)
            .await
            .map_err(store_status)?
        {
            AddTrust::Added(at) => (at, true),
            AddTrust::AlreadyTrusted(at) => (at, false),
            AddTrust::LimitReached => {
                return Err(Status::resource_exhausted(format!(
                    "trusted_user_id: {author} already trusts {max} users, the most allowed"
                )))
            }
        };
        Ok(Response::new(pb::AddTrustedUserResponse {
            created_at: created_at.unix_micros(),
            created,
        }))
    }

    async fn remove_trusted_user(
        &self,
        request: Request<pb::RemoveTrustedUserRequest>,
    ) -> Result<Response<pb::RemoveTrustedUserResponse>, Status> {
        let caller = principal(&request)?.clone();
        require_role(&caller, &[Role::App, Role::Device])?;
        let req = request.get_ref();
        let author = parse_author(&caller, &req.author_user_id)?;
        let trusted = parse_field("trusted_user_id", UserId::new(req.trusted_user_id.clone()))?;
        self.state
            .store
            .remove_trusted_user(author, trusted)
            .await
            .map_err(|e| match e {
                StoreError::NotFound => {
                    Status::not_found("trusted_user_id: the author does not trust this user")
                }
                other => store_status(other),
            })?;
        Ok(Response::new(pb::RemoveTrustedUserResponse {}))
    }

    async fn list_trusted_users(
        &self,
        request: Request<pb::ListTrustedUsersRequest>,
    ) -> Result<Response<pb::ListTrustedUsersResponse>, Status> {
        let caller = principal(&request)?.clone();
        require_role(&caller, &[Role::App, Role::Device])?;
        let req = request.get_ref();
        let author = parse_author(&caller, &req.author_user_id)?;
        let after = parse_cursor(&req.cursor)?;
        let limit = match req.page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let page = self
            .state
            .store
            .trusted_users(&author, after.as_ref(), i64::from(limit))
            .await
            .map_err(store_status)?;
        let next_cursor = match page.last() {
            Some(last) if page.len() >= limit as usize => format_cursor(&last.user),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListTrustedUsersResponse {
            trusted_users: page
                .into_iter()
                .map(|t| pb::TrustedUser {
                    user_id: t.user.to_string(),
                    created_at: t.created_at.unix_micros(),
                })
                .collect(),
            next_cursor,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let u = UserId::new("bob@example").unwrap();
        assert_eq!(parse_cursor(&format_cursor(&u)).unwrap(), Some(u));
        assert_eq!(parse_cursor("").unwrap(), None);
        for bad in ["tu1.", "tu1.zz", "tu2.626f62", "626f62", "tu1.20"] {
            let err = parse_cursor(bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
