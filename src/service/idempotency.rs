//! Idempotency keys: a retry of a call that creates or consumes something, with the key of the
//! first try, returns the first answer and writes nothing (`common.proto`, "Idempotency keys").
//!
//! One mechanism for every keyed call, in two steps a handler takes:
//!
//! 1. [`Keyed::take`] takes the key out of the request (INVALID_ARGUMENT naming
//!    `idempotency_key` if it is malformed) and fingerprints the rest: SHA-256 over the call's
//!    name and the request's protobuf encoding without the key, which prost writes the same way
//!    for the same decoded fields. The key's scope is the calling token's principal
//!    ([`Principal::actor`]), so keys of different callers never meet.
//! 2. [`Keyed::replay_or_run`] replays the committed record of the key, if there is one within
//!    the retention window; otherwise it runs the handler's work, handing it the [`Keyed`] so
//!    that the work's transaction records its answer ([`Keyed::recorder`], then
//!    [`crate::store::Store::transaction_recorded`]). If the work fails because a concurrent
//!    call with the same key committed first (it waited for that call at its claim), or fails
//!    for any reason while such a record now exists, the record is replayed instead. The same
//!    key with another fingerprint is INVALID_ARGUMENT naming `idempotency_key`.
//!
//! **Secrets.** A recorded answer holds no plaintext secret ([`RecordedAnswer`]): CreateSession's
//! plaintext DEK is dropped, and the sessions handler opens it again from the session's service
//! copy on a replay; CreateToken's token is sealed under the KEK with the record's identity
//! (scope and key) as associated data ([`KekContext::IdempotentAnswer`]) and opened on replay.
//! A replay returns [`Answer::Replayed`], so that a handler can do what only it knows.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use prost::Message;
use tonic::Status;
use zeroize::Zeroizing;

use super::error::{into_status, DomainError, ErrorClass};
use super::AppState;
use crate::auth::Principal;
use crate::crypto::envelope::{open_under_kek, seal_under_kek, KekContext};
use crate::crypto::keys::Kek;
use crate::crypto::CryptoError;
use crate::proto::keyhold::v1 as pb;
use crate::proto::IdempotentRequest;
use crate::store::idempotency::{IdempotencyKey, IdempotencyRecord, KeptAnswer, Recorder};
use crate::store::StoreError;

/// Longest idempotency key, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 128;

/// The request of a call that takes an idempotency key, and the answer it records.
pub(crate) trait KeyedRequest: IdempotentRequest + Message + Default {
    /// The call's gRPC path, `keyhold.v1.<Service>/<Call>`: part of the fingerprint, so that
    /// one key cannot name requests of two calls.
    const RPC: &'static str;
    /// The call's answer.
    type Response: RecordedAnswer;
}

/// An answer as a record keeps it: without plaintext secrets.
pub(crate) trait RecordedAnswer: Message + Default {
    /// Removes every secret from the answer; returns the one a replay needs again, which the
    /// record keeps sealed under the KEK. None by default.
    fn remove_secrets(&mut self) -> Option<Zeroizing<Vec<u8>>> {
        None
    }

    /// Puts the opened secret back into a replayed answer; an answer without secrets refuses
    /// one (the record would be corrupt).
    fn restore_secret(&mut self, secret: Option<Zeroizing<Vec<u8>>>) -> Result<(), &'static str> {
        match secret {
            None => Ok(()),
            Some(_) => Err("a sealed secret recorded for an answer that holds none"),
        }
    }
}

macro_rules! keyed_requests {
    ($($request:ident => $response:ident, $rpc:literal;)+) => {$(
        impl KeyedRequest for pb::$request {
            const RPC: &'static str = $rpc;
            type Response = pb::$response;
        }
    )+};
}

keyed_requests! {
    CreateSessionRequest => CreateSessionResponse, "keyhold.v1.Sessions/CreateSession";
    AddRecipientsRequest => AddRecipientsResponse, "keyhold.v1.Sessions/AddRecipients";
    RemoveRecipientsRequest => RemoveRecipientsResponse, "keyhold.v1.Sessions/RemoveRecipients";
    RotateSessionRequest => RotateSessionResponse, "keyhold.v1.Sessions/RotateSession";
    ClaimPrekeysRequest => ClaimPrekeysResponse, "keyhold.v1.KeyDirectory/ClaimPrekeys";
    SendKeyPackagesRequest => SendKeyPackagesResponse, "keyhold.v1.DeviceSync/SendKeyPackages";
    CreateTokenRequest => CreateTokenResponse, "keyhold.v1.Admin/CreateToken";
}

impl RecordedAnswer for pb::AddRecipientsResponse {}
impl RecordedAnswer for pb::RemoveRecipientsResponse {}
impl RecordedAnswer for pb::RotateSessionResponse {}
impl RecordedAnswer for pb::ClaimPrekeysResponse {}
impl RecordedAnswer for pb::SendKeyPackagesResponse {}

/// The plaintext DEK is never recorded: a replay opens it again from the session's service
/// copy (the sessions handler does).
impl RecordedAnswer for pb::CreateSessionResponse {
    fn remove_secrets(&mut self) -> Option<Zeroizing<Vec<u8>>> {
        if let Some(dek) = self.plaintext_dek.take() {
            drop(Zeroizing::new(dek));
        }
        None
    }
}

/// The token is recorded sealed under the KEK, and given back on replay.
impl RecordedAnswer for pb::CreateTokenResponse {
    fn remove_secrets(&mut self) -> Option<Zeroizing<Vec<u8>>> {
        Some(Zeroizing::new(std::mem::take(&mut self.token).into_bytes()))
    }

    fn restore_secret(&mut self, secret: Option<Zeroizing<Vec<u8>>>) -> Result<(), &'static str> {
        let mut secret = secret.ok_or("a recorded token answer without its sealed token")?;
        // Moved out, not copied: the response wipes its token when dropped.
        self.token = String::from_utf8(std::mem::take(&mut *secret))
            .map_err(|_| "a sealed token that is not text")?;
        Ok(())
    }
}

/// What an idempotency key can be refused or fail with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IdempotencyError {
    /// The key is malformed.
    #[error("idempotency_key: {0}")]
    BadKey(&'static str),
    /// This caller used the key for another request within the retention window.
    #[error(
        "idempotency_key: already used by this caller for a different request ({call}) \
         within the retention window; use a new key for a new request"
    )]
    KeyReused {
        /// The call the key was first used for.
        call: String,
    },
    /// A recorded answer cannot be read back.
    #[error("corrupt idempotency record: {0}")]
    Corrupt(String),
    /// Sealing or opening a recorded answer's secret under the KEK failed.
    #[error("the sealed secret of an idempotency record: {0}")]
    Sealed(CryptoError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DomainError for IdempotencyError {
    fn class(&self) -> ErrorClass {
        match self {
            IdempotencyError::BadKey(_) | IdempotencyError::KeyReused { .. } => {
                ErrorClass::InvalidArgument
            }
            IdempotencyError::Corrupt(_) | IdempotencyError::Sealed(_) => ErrorClass::Internal,
            IdempotencyError::Store(e) => e.class(),
        }
    }

    fn public_message(&self) -> String {
        match self {
            IdempotencyError::Store(e) => e.public_message(),
            other => other.to_string(),
        }
    }
}

into_status!(IdempotencyError);

/// What a keyed call answered: what its work returned, or the recorded answer of an earlier
/// call with the same key.
pub(crate) enum Answer<R> {
    /// The work ran now.
    Ran(R),
    /// The answer of the first call with this key.
    Replayed(R),
}

impl<R> Answer<R> {
    /// The response, however it came.
    pub(crate) fn into_response(self) -> R {
        match self {
            Answer::Ran(r) | Answer::Replayed(r) => r,
        }
    }
}

/// A keyed call's key, taken out of its request ([`Keyed::take`]): none when the request
/// carries none, and then every step here runs the work as if keys did not exist.
pub(crate) struct Keyed<Q> {
    key: Option<IdempotencyKey>,
    kek: Arc<Kek>,
    request: PhantomData<fn() -> Q>,
}

impl<Q> Clone for Keyed<Q> {
    fn clone(&self) -> Self {
        Keyed {
            key: self.key.clone(),
            kek: Arc::clone(&self.kek),
            request: PhantomData,
        }
    }
}

/// The key of a request's `idempotency_key` field: none when empty.
fn parse_key(text: &str) -> Result<Option<&str>, IdempotencyError> {
    if text.is_empty() {
        return Ok(None);
    }
    if text.len() > MAX_KEY_LEN {
        return Err(IdempotencyError::BadKey("at most 128 bytes"));
    }
    if !text.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(IdempotencyError::BadKey(
            "printable ASCII without spaces only (0x21 to 0x7E)",
        ));
    }
    Ok(Some(text))
}

/// SHA-256 of the call's name and the request's encoding (its key already taken out).
fn fingerprint<Q: KeyedRequest>(request: &Q) -> [u8; 32] {
    let mut hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    hash.update(b"keyhold/v1/idempotent-request\0");
    hash.update(Q::RPC.as_bytes());
    hash.update(b"\0");
    hash.update(&request.encode_to_vec());
    let mut out = [0u8; 32];
    out.copy_from_slice(hash.finish().as_ref());
    out
}

/// The associated data that binds a sealed secret to its record.
fn sealing_context(key: &IdempotencyKey) -> KekContext {
    KekContext::IdempotentAnswer {
        scope: key.scope.clone(),
        key: key.key.clone(),
    }
}

/// The call a gRPC path names (`CreateSession` of `keyhold.v1.Sessions/CreateSession`).
fn call_name(rpc: &str) -> &str {
    rpc.rsplit('/').next().unwrap_or(rpc)
}

impl<Q: KeyedRequest> Keyed<Q> {
    /// Takes the idempotency key out of `request` and fingerprints what remains.
    pub(crate) fn take(
        state: &AppState,
        caller: &Principal,
        request: &mut Q,
    ) -> Result<Self, Status> {
        let text = request.idempotency_key().to_owned();
        let key = match parse_key(&text)? {
            None => None,
            Some(key) => {
                request.set_idempotency_key(String::new());
                Some(IdempotencyKey {
                    scope: caller.actor(),
                    key: key.to_owned(),
                    rpc: Q::RPC,
                    request_hash: fingerprint(request),
                    retention: state.limits.idempotency_retention,
                })
            }
        };
        Ok(Keyed {
            key,
            kek: Arc::clone(&state.kek),
            request: PhantomData,
        })
    }

    /// The recorder of the work's transaction: it records the answer `answer` makes of the
    /// transaction's result, without secrets (the one a replay needs sealed under the KEK).
    /// Records nothing for a request without a key.
    pub(crate) fn recorder<'a, T>(
        &self,
        answer: impl Fn(&T) -> Q::Response + Send + Sync + 'a,
    ) -> Recorder<'a, T> {
        let Some(key) = &self.key else {
            return Recorder::unkeyed();
        };
        let kek = Arc::clone(&self.kek);
        let context = sealing_context(key);
        Recorder::new(key.clone(), move |result: &T| {
            let mut response = answer(result);
            let sealed_secret = response
                .remove_secrets()
                .map(|secret| seal_under_kek(&kek, &secret, &context))
                .transpose()
                .map_err(|e| {
                    StoreError::Internal(format!("sealing an answer's secret under the KEK: {e}"))
                })?;
            Ok(KeptAnswer {
                response: response.encode_to_vec(),
                sealed_secret,
            })
        })
    }

    /// Replays the key's recorded answer if there is one; otherwise runs `work`, handing it
    /// this key for its recorder. If `work` fails and a record of the key now exists (a
    /// concurrent call with the same key committed first), that record is replayed.
    pub(crate) async fn replay_or_run<F, Fut>(
        self,
        state: &AppState,
        work: F,
    ) -> Result<Answer<Q::Response>, Status>
    where
        F: FnOnce(Keyed<Q>) -> Fut,
        Fut: Future<Output = Result<Q::Response, Status>>,
    {
        let Some(key) = self.key.clone() else {
            return work(self).await.map(Answer::Ran);
        };
        if let Some(record) = recorded(state, &key).await? {
            return Ok(Answer::Replayed(self.replay(&key, record)?));
        }
        let failure = match work(self.clone()).await {
            Ok(response) => return Ok(Answer::Ran(response)),
            Err(failure) => failure,
        };
        match recorded(state, &key).await {
            Ok(Some(record)) => Ok(Answer::Replayed(self.replay(&key, record)?)),
            _ => Err(failure),
        }
    }

    /// The answer a record holds, if it is this request's.
    fn replay(
        &self,
        key: &IdempotencyKey,
        record: IdempotencyRecord,
    ) -> Result<Q::Response, IdempotencyError> {
        if record.request_hash != key.request_hash {
            return Err(IdempotencyError::KeyReused {
                call: call_name(&record.rpc).to_owned(),
            });
        }
        let mut response = Q::Response::decode(record.response.as_slice())
            .map_err(|e| IdempotencyError::Corrupt(format!("{}: {e}", key.rpc)))?;
        let secret = record
            .sealed_secret
            .map(|sealed| open_under_kek(&self.kek, &sealed, &sealing_context(key)))
            .transpose()
            .map_err(IdempotencyError::Sealed)?;
        response
            .restore_secret(secret)
            .map_err(|e| IdempotencyError::Corrupt(format!("{}: {e}", key.rpc)))?;
        tracing::debug!(rpc = key.rpc, "replayed the answer of an idempotency key");
        Ok(response)
    }
}

/// The committed record of `key`, within its retention.
async fn recorded(
    state: &AppState,
    key: &IdempotencyKey,
) -> Result<Option<IdempotencyRecord>, IdempotencyError> {
    Ok(state.store.conn().await?.idempotency_record(key).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_printable_ascii_of_at_most_128_bytes() {
        assert_eq!(parse_key("").unwrap(), None);
        assert_eq!(parse_key("a").unwrap(), Some("a"));
        let longest = "k".repeat(MAX_KEY_LEN);
        assert_eq!(parse_key(&longest).unwrap(), Some(longest.as_str()));
        for bad in [
            "k".repeat(MAX_KEY_LEN + 1),
            "with space".into(),
            "tab\t".into(),
            "é".into(),
            "nul\0".into(),
        ] {
            let status = Status::from(parse_key(&bad).unwrap_err());
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status.message().starts_with("idempotency_key: "),
                "{status:?}"
            );
        }
    }

    #[test]
    fn the_fingerprint_leaves_out_the_key_and_tells_calls_and_fields_apart() {
        let request = |label: &str| pb::CreateTokenRequest {
            role: pb::Role::App as i32,
            label: label.into(),
            ..Default::default()
        };
        let a = fingerprint(&request("one"));
        assert_eq!(a, fingerprint(&request("one")));
        assert_ne!(a, fingerprint(&request("two")));
        // The same bytes of another call: an empty AddRecipients and an empty Rotate encode
        // alike, but their fingerprints differ.
        assert_ne!(
            fingerprint(&pb::AddRecipientsRequest::default()),
            fingerprint(&pb::RotateSessionRequest::default())
        );
    }

    #[test]
    fn recorded_answers_hold_no_plaintext_secret() {
        let mut created = pb::CreateSessionResponse {
            session_id: "s".into(),
            epoch: 1,
            session_keys: Vec::new(),
            plaintext_dek: Some(vec![7; 32]),
        };
        assert!(created.remove_secrets().is_none());
        assert_eq!(created.plaintext_dek, None);
        let mut token = pb::CreateTokenResponse {
            token: "kh_secret".into(),
            token_id: "id".into(),
        };
        let secret = token.remove_secrets().unwrap();
        assert_eq!(secret.as_slice(), b"kh_secret");
        assert!(token.token.is_empty());
        token.restore_secret(Some(secret)).unwrap();
        assert_eq!(token.token, "kh_secret");
        assert!(token.restore_secret(None).is_err());
        assert!(pb::AddRecipientsResponse::default()
            .restore_secret(Some(Zeroizing::new(vec![1])))
            .is_err());
    }
}
