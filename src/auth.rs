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

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
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
#[non_exhaustive]
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

/// The roles that may call each `keyhold.v1.*` method, by gRPC path
/// (`/keyhold.v1.Admin/CreateToken`). The auth layer checks it before the request body is
/// decoded, so a caller who may not call a method is PERMISSION_DENIED whatever it sent; a
/// path not in the table is UNIMPLEMENTED, never let through unchecked.
#[derive(Clone, Debug, Default)]
pub struct RpcRoles(HashMap<String, &'static [Role]>);

impl RpcRoles {
    /// Adds the methods of the gRPC service `service` (its full name, `keyhold.v1.Admin`),
    /// each named as its Rust method (`create_token`), with the roles that may call it.
    pub fn with_service(mut self, service: &str, rpcs: &[(&str, &'static [Role])]) -> Self {
        for (rpc, roles) in rpcs {
            self.0
                .insert(format!("/{service}/{}", camel_case(rpc)), roles);
        }
        self
    }

    /// The roles that may call the method at `path`; `None` for a path that is no method.
    pub fn roles(&self, path: &str) -> Option<&'static [Role]> {
        self.0.get(path).copied()
    }

    /// Every method path in the table.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// The protobuf name of a method from its Rust name: `get_user_keys` → `GetUserKeys`.
fn camel_case(snake: &str) -> String {
    snake
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

/// Whether `principal` may call the method at `path`, as a status to answer with if not.
fn check_method(roles: &RpcRoles, path: &str, principal: &Principal) -> Result<(), tonic::Status> {
    let Some(allowed) = roles.roles(path) else {
        return Err(tonic::Status::unimplemented(format!(
            "unknown method {path}"
        )));
    };
    if allowed.contains(&principal.role()) {
        Ok(())
    } else {
        Err(tonic::Status::permission_denied(format!(
            "role {} may not call {path}",
            principal.role().name()
        )))
    }
}

/// The tower layer that authenticates every `keyhold.v1.*` call and checks that the caller's
/// role may call the method.
#[derive(Clone)]
pub struct AuthLayer<L> {
    lookup: L,
    roles: Arc<RpcRoles>,
}

impl<L> AuthLayer<L> {
    /// A layer that resolves tokens with `lookup` and checks roles against `roles`.
    pub fn new(lookup: L, roles: RpcRoles) -> Self {
        Self {
            lookup,
            roles: Arc::new(roles),
        }
    }
}

impl<S, L: Clone> tower_layer::Layer<S> for AuthLayer<L> {
    type Service = AuthService<S, L>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            lookup: self.lookup.clone(),
            roles: self.roles.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the router.
#[derive(Clone)]
pub struct AuthService<S, L> {
    inner: S,
    lookup: L,
    roles: Arc<RpcRoles>,
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
        let roles = self.roles.clone();
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
                    // A role that may not call the method is refused before the body is read.
                    let mut response = match check_method(&roles, req.uri().path(), &principal) {
                        Err(status) => status.into_http(),
                        Ok(()) => {
                            req.extensions_mut().insert(principal);
                            inner.call(req).await?
                        }
                    };
                    // The role goes back out with the response, for the call's log line.
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
    fn method_paths_are_the_protobuf_names() {
        let roles = RpcRoles::default().with_service(
            "keyhold.v1.KeyDirectory",
            &[
                ("get_user_keys", &[Role::App]),
                ("timeline", &[Role::Device]),
            ],
        );
        assert_eq!(
            roles.roles("/keyhold.v1.KeyDirectory/GetUserKeys"),
            Some(&[Role::App][..])
        );
        assert!(roles.roles("/keyhold.v1.KeyDirectory/Timeline").is_some());
        assert!(roles
            .roles("/keyhold.v1.KeyDirectory/get_user_keys")
            .is_none());
    }

    #[test]
    fn a_role_not_listed_is_denied_and_an_unknown_method_unimplemented() {
        let roles = RpcRoles::default()
            .with_service("keyhold.v1.Admin", &[("create_token", &[Role::Admin])]);
        let admin = Principal::Admin {
            token_id: TokenId::from_bytes([1; 16]),
        };
        let app = Principal::App {
            token_id: TokenId::from_bytes([2; 16]),
        };
        assert!(check_method(&roles, "/keyhold.v1.Admin/CreateToken", &admin).is_ok());
        let denied = check_method(&roles, "/keyhold.v1.Admin/CreateToken", &app).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied.message().contains("role app"),
            "{}",
            denied.message()
        );
        let unknown = check_method(&roles, "/keyhold.v1.Admin/Nope", &admin).unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::Unimplemented);
    }

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
