//! The callers of the authorization matrices: who makes a call, relative to the device whose
//! resource it touches (alice's phone), and a token for each.
//!
//! Every `tests/api_*.rs` file that checks "every call by every caller" names its rows by RPC
//! and its columns by [`Who`], in the order of [`WHO`], with the codes below.

use tonic::Code;

use super::server::{TestDevice, TestServer};
use keyhold::proto::keyhold::v1 as pb;

/// Who makes a call, relative to the resource it touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// No usable token.
    Nobody,
    /// An app server token.
    App,
    /// The device that owns the resource (alice's phone).
    Own,
    /// Another device of the same user (alice's laptop).
    Sibling,
    /// A device of another user (bob's phone).
    Other,
    /// A staff token.
    Staff,
    /// An admin token.
    Admin,
}

/// The columns of a matrix, in order.
pub const WHO: [Who; 7] = [
    Who::Nobody,
    Who::App,
    Who::Own,
    Who::Sibling,
    Who::Other,
    Who::Staff,
    Who::Admin,
];

/// Allowed.
pub const OK: Code = Code::Ok;
/// Refused for the caller's role or identity.
pub const DENIED: Code = Code::PermissionDenied;
/// Refused for want of a valid token.
pub const NOAUTH: Code = Code::Unauthenticated;

/// The three devices of a matrix and a token for every [`Who`].
pub struct Callers {
    /// alice's phone.
    pub own: TestDevice,
    /// alice's laptop.
    pub sibling: TestDevice,
    /// bob's phone.
    pub other: TestDevice,
    tokens: Vec<String>,
}

impl Callers {
    /// Enrolls alice's phone (`own`), alice's laptop and bob's phone, and makes the tokens.
    pub async fn enroll(server: &TestServer, own: &str, sibling: &str) -> Callers {
        let own = TestDevice::enroll(server, "alice", own).await;
        let sibling = TestDevice::enroll(server, "alice", sibling).await;
        let other = TestDevice::enroll(server, "bob", "phone").await;
        let mut tokens = Vec::with_capacity(WHO.len());
        for who in WHO {
            tokens.push(match who {
                Who::Nobody => "kh_not_a_token".to_string(),
                Who::App => server.token(pb::Role::App, "", "").await,
                Who::Own => own.token.clone(),
                Who::Sibling => sibling.token.clone(),
                Who::Other => other.token.clone(),
                Who::Staff => server.token(pb::Role::Staff, "", "").await,
                Who::Admin => server.token(pb::Role::Admin, "", "").await,
            });
        }
        Callers {
            own,
            sibling,
            other,
            tokens,
        }
    }

    /// The token `who` calls with.
    pub fn token(&self, who: Who) -> &str {
        let i = WHO.iter().position(|w| *w == who).unwrap_or(0);
        &self.tokens[i]
    }

    /// Each column's caller with its token, in [`WHO`] order.
    pub fn columns(&self) -> impl Iterator<Item = (Who, &str)> {
        WHO.iter().copied().zip(self.tokens.iter().map(String::as_str))
    }
}
