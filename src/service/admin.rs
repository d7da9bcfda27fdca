//! The Admin service: creating and revoking API tokens. Admin role only.

use tonic::Status;

use super::error::{into_status, DomainError, ErrorClass};
use super::idempotency::{Answer, Keyed};
use super::{invalid, parse_field, AppState};
use crate::auth::{IssuedToken, Principal, Role};
use crate::crypto::ids::{DeviceId, UserId};
use crate::crypto::CryptoError;
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::admin_server::Admin;
use crate::store::audit::NewAuditEvent;
use crate::store::idempotency::Recorder;
use crate::store::tokens::{NewApiToken, TokenId};
use crate::store::{Store, StoreError};

/// Longest token label accepted, in characters.
pub(crate) const MAX_LABEL_CHARS: usize = 128;

/// What creating or revoking a token can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Drawing a new token's secret failed (the system's random source).
    #[error("generating a token: {0}")]
    Generate(#[from] CryptoError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DomainError for AdminError {
    fn class(&self) -> ErrorClass {
        match self {
            AdminError::Generate(_) => ErrorClass::Internal,
            AdminError::Store(e) => e.class(),
        }
    }

    fn public_message(&self) -> String {
        match self {
            AdminError::Store(e) => e.public_message(),
            other => other.to_string(),
        }
    }
}

into_status!(AdminError);

/// What a valid CreateToken request asks for.
pub struct TokenRequest {
    /// The role.
    pub role: Role,
    /// For device tokens: the bound user and device.
    pub binding: Option<(UserId, DeviceId)>,
    /// A label for operators.
    pub label: Option<String>,
}

/// Parses CreateToken's fields, naming the field that is wrong.
pub(crate) fn parse_token_request(req: &pb::CreateTokenRequest) -> Result<TokenRequest, Status> {
    let role = match pb::Role::try_from(req.role) {
        Ok(pb::Role::App) => Role::App,
        Ok(pb::Role::Device) => Role::Device,
        Ok(pb::Role::Staff) => Role::Staff,
        Ok(pb::Role::Admin) => Role::Admin,
        Ok(pb::Role::Unspecified) => return Err(invalid("role", "must be set")),
        Err(_) => return Err(invalid("role", format!("unknown value {}", req.role))),
    };
    let binding = if role == Role::Device {
        Some((
            parse_field("user_id", UserId::new(req.user_id.clone()))?,
            parse_field("device_id", DeviceId::new(req.device_id.clone()))?,
        ))
    } else {
        if !req.user_id.is_empty() {
            return Err(invalid("user_id", "only device tokens are bound to a user"));
        }
        if !req.device_id.is_empty() {
            return Err(invalid(
                "device_id",
                "only device tokens are bound to a device",
            ));
        }
        None
    };
    if req.label.chars().count() > MAX_LABEL_CHARS {
        return Err(invalid(
            "label",
            format!("at most {MAX_LABEL_CHARS} characters"),
        ));
    }
    if req.label.chars().any(char::is_control) {
        return Err(invalid("label", "control characters are not allowed"));
    }
    let label = (!req.label.is_empty()).then(|| req.label.clone());
    Ok(TokenRequest {
        role,
        binding,
        label,
    })
}

/// Creates a token in the store and records it in the audit log, in one transaction.
/// Returns the issued token; its plaintext exists only in the returned value.
pub async fn issue_token(
    store: &Store,
    actor: String,
    request: TokenRequest,
) -> Result<IssuedToken, AdminError> {
    let issued = IssuedToken::generate()?;
    store_token(store, actor, request, &issued, &Recorder::unkeyed()).await?;
    Ok(issued)
}

/// Stores `issued` and its audit event in one transaction, with the answer `recorder` records
/// for a call made with an idempotency key.
async fn store_token(
    store: &Store,
    actor: String,
    request: TokenRequest,
    issued: &IssuedToken,
    recorder: &Recorder<'_, ()>,
) -> Result<(), AdminError> {
    let (user, device) = match &request.binding {
        Some((u, d)) => (Some(u.clone()), Some(d.clone())),
        None => (None, None),
    };
    let token = NewApiToken {
        token_id: issued.token_id,
        token_hash: issued.secret_hash,
        role: request.role,
        user,
        device,
        label: request.label,
    };
    let event = NewAuditEvent::new(
        actor,
        "token.create",
        format!(
            "token:{}:{}",
            hex::encode(issued.token_id.as_bytes()),
            request.role.name()
        ),
    );
    store
        .transaction_recorded(recorder, async move |tx| -> Result<_, StoreError> {
            tx.insert_token(&token).await?;
            tx.append_audit_event(&event).await?;
            Ok(())
        })
        .await?;
    Ok(())
}

/// The answer of a CreateToken.
fn token_to_wire(issued: &IssuedToken) -> pb::CreateTokenResponse {
    pb::CreateTokenResponse {
        token: issued.expose_plaintext().to_string(),
        token_id: hex::encode(issued.token_id.as_bytes()),
    }
}

rpc_service! {
    /// The Admin gRPC service.
    AdminService: Admin {
        fn create_token(pb::CreateTokenRequest) -> pb::CreateTokenResponse, by [Admin];
        fn revoke_token(pb::RevokeTokenRequest) -> pb::RevokeTokenResponse, by [Admin];
    }
}

async fn create_token(
    state: &AppState,
    caller: &Principal,
    mut req: pb::CreateTokenRequest,
) -> Result<pb::CreateTokenResponse, Status> {
    let parsed = parse_token_request(&req)?;
    let keyed = Keyed::take(state, caller, &mut req)?;
    keyed
        .replay_or_run(state, |keyed| async move {
            let issued = IssuedToken::generate().map_err(AdminError::from)?;
            // The record keeps the token sealed under the KEK, never in clear.
            let recorder = keyed.recorder(|_: &()| token_to_wire(&issued));
            store_token(&state.store, caller.actor(), parsed, &issued, &recorder).await?;
            Ok(token_to_wire(&issued))
        })
        .await
        .map(Answer::into_response)
}

async fn revoke_token(
    state: &AppState,
    caller: &Principal,
    req: pb::RevokeTokenRequest,
) -> Result<pb::RevokeTokenResponse, Status> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(&req.token_id, &mut id)
        .map_err(|_| invalid("token_id", "expected 32 hex digits"))?;
    let token_id = TokenId::from_bytes(id);
    let event = NewAuditEvent::new(
        caller.actor(),
        "token.revoke",
        format!("token:{}", hex::encode(id)),
    );
    state
        .store
        .transaction(async move |tx| -> Result<_, StoreError> {
            tx.revoke_token(&token_id).await?;
            tx.append_audit_event(&event).await
        })
        .await?;
    let token = (state.store.conn().await?).find_token(&token_id).await?;
    Ok(pb::RevokeTokenResponse {
        revoked_at: token
            .and_then(|t| t.revoked_at)
            .map_or(0, |t| t.unix_micros()),
    })
}
