//! The callers of an authorization matrix: one of each kind, relative to the device whose
//! resource the calls touch, each with a token of its own; and the loop that makes every call
//! of a matrix as every caller and checks the code in its cell.
//!
//! A matrix is a list of rows `(rpc, [Code; N])`, one code per column; the columns are a list
//! of [`Who`] (usually [`WHO`]). Each file keeps its own `Rpc` enum and says how to make one
//! call; what "own", "sibling" and "other" mean is said where its [`Callers`] are made.

use std::fmt::Debug;

use keyhold::client::Client;
use keyhold::proto::keyhold::v1 as pb;
use tonic::{Code, Status};

use super::server::{TestDevice, TestServer};

/// Who makes a call, relative to the device whose resource it touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// No usable token (a malformed one).
    Nobody,
    /// An app server token.
    App,
    /// The device that owns the resource.
    Own,
    /// Another device of the same user.
    Sibling,
    /// A device of another user.
    Other,
    /// A device of another user that shares the resource (a member of its session); only in
    /// the matrices that name it, with [`Callers::with_member`].
    Member,
    /// A staff token.
    Staff,
    /// An admin token.
    Admin,
}

/// Every kind of caller, in the column order of the matrices.
pub const WHO: [Who; 7] = [
    Who::Nobody,
    Who::App,
    Who::Own,
    Who::Sibling,
    Who::Other,
    Who::Staff,
    Who::Admin,
];

/// Every kind of caller that holds a valid token ([`WHO`] but [`Who::Nobody`]).
pub const WITH_TOKEN: [Who; 6] = {
    let [_, with_token @ ..] = WHO;
    with_token
};

/// The call succeeds.
pub const OK: Code = Code::Ok;
/// The caller may not make the call.
pub const DENIED: Code = Code::PermissionDenied;
/// The caller has no usable token.
pub const NOAUTH: Code = Code::Unauthenticated;

/// The token `Who::Nobody` sends: not a Keyhold token at all.
pub const NO_TOKEN: &str = "kh_not_a_token";

/// A token of every [`Who`], for the devices given as own, sibling and other.
pub struct Callers {
    tokens: Vec<(Who, String)>,
}

impl Callers {
    /// Tokens for every caller: the three devices' own, and fresh app, staff and admin tokens.
    pub async fn new(
        server: &TestServer,
        own: &TestDevice,
        sibling: &TestDevice,
        other: &TestDevice,
    ) -> Callers {
        let mut tokens = Vec::with_capacity(WHO.len());
        for who in WHO {
            let token = match who {
                Who::Nobody => NO_TOKEN.to_string(),
                Who::App => server.token(pb::Role::App, "", "").await,
                Who::Own => own.token.clone(),
                Who::Sibling => sibling.token.clone(),
                Who::Other => other.token.clone(),
                Who::Staff => server.token(pb::Role::Staff, "", "").await,
                Who::Admin => server.token(pb::Role::Admin, "", "").await,
                Who::Member => continue,
            };
            tokens.push((who, token));
        }
        Callers { tokens }
    }

    /// These callers and `member` as [`Who::Member`].
    pub fn with_member(mut self, member: &TestDevice) -> Callers {
        self.tokens.push((Who::Member, member.token.clone()));
        self
    }

    /// The token `who` calls with.
    pub fn token(&self, who: Who) -> &str {
        self.tokens
            .iter()
            .find(|(w, _)| *w == who)
            .map(|(_, t)| t.as_str())
            .expect("a token for every caller")
    }

    /// A client holding `who`'s token.
    pub async fn client(&self, server: &TestServer, who: Who) -> Client {
        server.client(self.token(who)).await
    }
}

/// The code of a call's outcome: `Code::Ok` on success.
pub fn code_of<T>(outcome: &Result<T, Status>) -> Code {
    outcome.as_ref().err().map_or(Code::Ok, Status::code)
}

/// Makes every call of `matrix` as every caller of `columns`, with a fresh client of that
/// caller, and asserts that each ends with the code in its cell.
///
/// `cell(rpc, who, client)` sets the cell up, makes the call and returns its outcome and
/// whatever the check needs (the state before the call, say); `then(rpc, who, code, that)`
/// runs once the code matched, to check what the call wrote or served.
pub async fn check_every_caller<R: Copy + Debug, S, const N: usize>(
    server: &TestServer,
    callers: &Callers,
    columns: [Who; N],
    matrix: &[(R, [Code; N])],
    mut cell: impl AsyncFnMut(R, Who, Client) -> (Result<(), Status>, S),
    mut then: impl AsyncFnMut(R, Who, Code, S),
) {
    for (rpc, codes) in matrix {
        for (who, want) in columns.iter().zip(codes) {
            let client = callers.client(server, *who).await;
            let (outcome, state) = cell(*rpc, *who, client).await;
            let code = code_of(&outcome);
            assert_eq!(code, *want, "{rpc:?} by {who:?}: {outcome:?}");
            then(*rpc, *who, code, state).await;
        }
    }
}
