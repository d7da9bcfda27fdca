//! Bearer tokens, roles, and the one layer that authenticates every Keyhold call.
//!
//! A token looks like `kh_<token id, 32 hex>_<secret, 64 hex>`. The database keeps the token id
//! and SHA-256 of the secret, never the secret; the plaintext token is shown once, when it is
//! created. Authentication looks the row up by token id (which reveals nothing about the
//! secret) and compares the secret's hash in constant time.
//!
//! [`AuthLayer`] runs before every `keyhold.v1.*` call and puts the caller's [`Principal`] into
//! the request's extensions (and the caller's [`Role`] into the response's, for the call's log
//! line); the health and reflection services stay open, as load balancers and `grpcurl`
//! expect.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use zeroize::Zeroizing;

use crate::crypto::ids::{DeviceId, UserId};
use crate::crypto::CryptoError;

pub use crate::store::tokens::Role;
use crate::store::tokens::{TokenHash, TokenId};

impl Role {
    /// The role's name on the command line and in audit events.
    pub fn name(self) -> &'static str {
        match self {
            Role::App => "app",
            Role::Device => "device",
            Role::Staff => "staff",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "app" => Ok(Role::App),
            "device" => Ok(Role::Device),
            "staff" => Ok(Role::Staff),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}: expected app, device, staff or admin"
            )),
        }
    }
}

/// Who is calling: the authenticated token's role and, for a device, whom it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// An app server token.
    App {
        /// The token's id.
        token_id: TokenId,
    },
    /// A device token, bound to one user's device.
    Device {
        /// The token's id.
        token_id: TokenId,
        /// The device's user.
        user: UserId,
        /// The device.
        device: DeviceId,
    },
    /// A staff token.
    Staff {
        /// The token's id.
        token_id: TokenId,
    },
    /// An admin token.
    Admin {
        /// The token's id.
        token_id: TokenId,
    },
}

impl Principal {
    /// The role behind the principal.
    pub fn role(&self) -> Role {
        match self {
            Principal::App { .. } => Role::App,
            Principal::Device { .. } => Role::Device,
            Principal::Staff { .. } => Role::Staff,
            Principal::Admin { .. } => Role::Admin,
        }
    }

    /// The token's id, as recorded in audit events.
    pub fn token_id(&self) -> &TokenId {
        match self {
            Principal::App { token_id }
            | Principal::Device { token_id, .. }
            | Principal::Staff { token_id }
            | Principal::Admin { token_id } => token_id,
        }
    }

    /// How the principal appears in audit events: role and token id, never the secret.
    pub fn actor(&self) -> String {
        let id = hex::encode(self.token_id().as_bytes());
        match self {
            Principal::Device { user, device, .. } => format!("device:{user}/{device}:{id}"),
            other => format!("{}:{id}", other.role().name()),
        }
    }
}

const PREFIX: &str = "kh_";
const SECRET_LEN: usize = 32;

/// A freshly issued token: its id and the plaintext, which exists only until it is shown.
pub struct IssuedToken {
    /// The token's id (kept in the database in the clear).
    pub token_id: TokenId,
    /// SHA-256 of the secret part, as stored.
    pub secret_hash: TokenHash,
    plaintext: Zeroizing<String>,
}

impl IssuedToken {
    /// Draws a new random token.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut id = [0u8; 16];
        aws_lc_rs::rand::fill(&mut id)?;
        let token_id = TokenId::from_bytes(id);
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        aws_lc_rs::rand::fill(secret.as_mut())?;
        let plaintext = Zeroizing::new(format!(
            "{PREFIX}{}_{}",
            hex::encode(id),
            hex::encode(secret.as_ref())
        ));
        Ok(Self {
            token_id,
            secret_hash: TokenHash::of(secret.as_ref()),
            plaintext,
        })
    }

    /// The plaintext token, to show once to whoever asked for it.
    pub fn expose_plaintext(&self) -> &str {
        &self.plaintext
    }
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IssuedToken({}, <redacted>)",
            hex::encode(self.token_id.as_bytes())
        )
    }
}

/// A token as presented by a caller, parsed but not yet checked.
pub struct PresentedToken {
    /// The id part.
    pub token_id: TokenId,
    secret_hash: TokenHash,
}

impl PresentedToken {
    /// Parses an `authorization` header value: `Bearer kh_<id>_<secret>`.
    pub fn from_header(value: &str) -> Option<Self> {
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))?;
        let rest = token.trim().strip_prefix(PREFIX)?;
        let (id_hex, secret_hex) = rest.split_once('_')?;
        let mut token_id = [0u8; 16];
        hex::decode_to_slice(id_hex, &mut token_id).ok()?;
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        hex::decode_to_slice(secret_hex, secret.as_mut()).ok()?;
        Some(Self {
            token_id: TokenId::from_bytes(token_id),
            secret_hash: TokenHash::of(secret.as_ref()),
        })
    }

    /// Whether this token's secret matches the stored hash, compared in constant time.
    pub fn matches(&self, stored_hash: &TokenHash) -> bool {
        self.secret_hash.matches(stored_hash)
    }
}

/// Looks tokens up; the store implements it, tests may fake it.
pub trait TokenLookup: Clone + Send + Sync + 'static {
    /// Resolves a presented token to its principal: `Ok(None)` when the token is unknown,
    /// revoked or does not match; `Err` when the lookup itself failed (database down).
    fn authenticate(
        &self,
        token: PresentedToken,
    ) -> impl Future<Output = Result<Option<Principal>, tonic::Status>> + Send;
}

/// The tower layer that authenticates every `keyhold.v1.*` call.
#[derive(Clone)]
pub struct AuthLayer<L> {
    lookup: L,
}

impl<L> AuthLayer<L> {
    /// A layer that resolves tokens with `lookup`.
    pub fn new(lookup: L) -> Self {
        Self { lookup }
    }
}

impl<S, L: Clone> tower_layer::Layer<S> for AuthLayer<L> {
    type Service = AuthService<S, L>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            lookup: self.lookup.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the router.
#[derive(Clone)]
pub struct AuthService<S, L> {
    inner: S,
    lookup: L,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, L, B> tower_service::Service<http::Request<B>> for AuthService<S, L>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    L: TokenLookup,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // Take the service that was polled ready; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let lookup = self.lookup.clone();
        Box::pin(async move {
            if !req.uri().path().starts_with("/keyhold.v1.") {
                return inner.call(req).await;
            }
            let header = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let Some(token) = header.and_then(PresentedToken::from_header) else {
                return Ok(tonic::Status::unauthenticated(
                    "missing or malformed authorization header: expected 'Bearer kh_…'",
                )
                .into_http());
            };
            match lookup.authenticate(token).await {
                Ok(Some(principal)) => {
                    let role = principal.role();
                    req.extensions_mut().insert(principal);
                    // The role goes back out with the response, for the call's log line.
                    let mut response = inner.call(req).await?;
                    response.extensions_mut().insert(role);
                    Ok(response)
                }
                Ok(None) => {
                    Ok(tonic::Status::unauthenticated("unknown or revoked token").into_http())
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// The caller of a request, as [`AuthLayer`] recorded it.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<&Principal, tonic::Status> {
    req.extensions()
        .get::<Principal>()
        .ok_or_else(|| tonic::Status::unauthenticated("no authenticated caller"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_token_parses_back_and_matches_only_its_hash() {
        let t = IssuedToken::generate().unwrap();
        let header = format!("Bearer {}", t.expose_plaintext());
        let p = PresentedToken::from_header(&header).unwrap();
        assert_eq!(p.token_id, t.token_id);
        assert!(p.matches(&t.secret_hash));
        let mut other = *t.secret_hash.as_bytes();
        other[31] ^= 1;
        assert!(!p.matches(&TokenHash::from_bytes(other)));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for h in [
            "",
            "Bearer",
            "Basic abc",
            "Bearer kh_",
            "Bearer kh_00_11",
            "Bearer xx_00000000000000000000000000000000_0000000000000000000000000000000000000000000000000000000000000000",
            "Bearer kh_zz000000000000000000000000000000_0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(PresentedToken::from_header(h).is_none(), "{h}");
        }
    }

    #[test]
    fn debug_does_not_show_the_plaintext() {
        let t = IssuedToken::generate().unwrap();
        let shown = format!("{t:?}");
        let secret = t.expose_plaintext().rsplit('_').next().unwrap().to_string();
        assert!(!shown.contains(&secret));
    }
}
