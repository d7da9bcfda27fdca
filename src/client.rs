//! A Rust client for Keyhold: tonic clients for every service, each carrying the caller's
//! bearer token, for app servers, devices, staff tooling and the integration tests.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let client = keyhold::client::Client::connect("http://127.0.0.1:50051", "kh_…").await?;
//! let mut directory = client.key_directory();
//! # Ok(()) }
//! ```
//!
//! An `https://` endpoint is reached over TLS: [`Client::connect`] trusts the system's roots;
//! [`Client::connect_with`] takes a [`ClientTls`] with the CA to trust instead and, for
//! mutual TLS, the client's certificate and key.
//!
//! Opening what the service returns is the crypto core's job
//! ([`crate::crypto::envelope::open_dek`]): the client never sends a private key anywhere.
//!
//! # Safe retries
//!
//! Every call that creates or consumes something (CreateSession, AddRecipients,
//! RemoveRecipients, RotateSession, ClaimPrekeys, SendKeyPackages, CreateToken) takes an
//! idempotency key: the service records the answer with the work, and a retry with the same key
//! returns that answer instead of doing the work twice (a second session, a second burnt
//! prekey). [`Client::retrying`] runs such a call with a fresh random key (128 bits, hex) when
//! the request has none, and retries it with the *same* key when the answer was lost on the
//! way — UNAVAILABLE, DEADLINE_EXCEEDED, or a connection that broke before the server's status
//! arrived — up to [`RetryPolicy::attempts`] tries, waiting an exponential, jittered backoff
//! between them. Any other error is the call's answer and is returned at once. The methods
//! [`Client::create_session`], [`Client::add_recipients`], [`Client::remove_recipients`],
//! [`Client::rotate_session`], [`Client::claim_prekeys`], [`Client::send_key_packages`] and
//! [`Client::create_token`] do this for each such call:
//!
//! ```no_run
//! # async fn demo(client: keyhold::client::Client) -> Result<(), tonic::Status> {
//! use keyhold::client::RetryPolicy;
//! use keyhold::proto::keyhold::v1 as pb;
//! let client = client.with_retry_policy(RetryPolicy { attempts: 3, ..RetryPolicy::default() });
//! let claimed = client
//!     .claim_prekeys(pb::ClaimPrekeysRequest {
//!         user_ids: vec!["bob".into()],
//!         ..Default::default()
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! To retry across a restart of the client itself, set `idempotency_key` yourself, keep it with
//! the operation, and send it again. The service keeps answers for its retention window
//! (`idempotency_retention_secs`, 24 hours by default).

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};
use zeroize::Zeroizing;

use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::admin_client::AdminClient;
use crate::proto::keyhold::v1::device_sync_client::DeviceSyncClient;
use crate::proto::keyhold::v1::escrow_client::EscrowClient;
use crate::proto::keyhold::v1::key_directory_client::KeyDirectoryClient;
use crate::proto::keyhold::v1::messages_client::MessagesClient;
use crate::proto::keyhold::v1::ratchet_client::RatchetClient;
use crate::proto::keyhold::v1::sessions_client::SessionsClient;
use crate::proto::keyhold::v1::trust_client::TrustClient;
use crate::proto::IdempotentRequest;

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerToken {
    header: MetadataValue<tonic::metadata::Ascii>,
}

impl BearerToken {
    /// Prepares the header for `token`. Fails if the token is not valid header text.
    pub fn new(token: &str) -> Result<Self, Status> {
        let value = Zeroizing::new(format!("Bearer {token}"));
        let mut header: MetadataValue<tonic::metadata::Ascii> = value
            .parse()
            .map_err(|_| Status::invalid_argument("token: not valid header text"))?;
        header.set_sensitive(true);
        Ok(Self { header })
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert("authorization", self.header.clone());
        Ok(req)
    }
}

/// A channel shared by all service clients of one caller.
pub type Authed = InterceptedService<Channel, BearerToken>;

/// How a [`Client`] checks the server, and proves itself for mutual TLS, on an `https://`
/// endpoint.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// The CA certificates (PEM) the server's certificate must chain to; `None`: the system's
    /// roots.
    pub ca_pem: Option<Vec<u8>>,
    /// For mutual TLS: the client's certificate chain and its private key (PEM).
    pub identity: Option<(Vec<u8>, Zeroizing<Vec<u8>>)>,
    /// The name the server's certificate must be valid for, when it is not the endpoint's host.
    pub server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<set>"))
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl ClientTls {
    /// Reads the CA file and, for mutual TLS, the certificate and key files (both or neither).
    pub fn from_files(
        ca_file: Option<&Path>,
        cert_file: Option<&Path>,
        key_file: Option<&Path>,
        server_name: Option<String>,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let identity = match (cert_file, key_file) {
            (Some(cert), Some(key)) => Some((read(cert)?, Zeroizing::new(read(key)?))),
            (None, None) => None,
            _ => return Err("a client certificate and its key go together".into()),
        };
        Ok(ClientTls {
            ca_pem: ca_file.map(read).transpose()?,
            identity,
            server_name,
        })
    }

    fn is_set(&self) -> bool {
        self.ca_pem.is_some() || self.identity.is_some() || self.server_name.is_some()
    }

    fn config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_pem {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key.as_slice()));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        config
    }
}

/// How [`Client::retrying`] retries a call whose answer was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most tries in all, the first one included (1: never retry).
    pub attempts: u32,
    /// The wait before the first retry; it doubles after each retry up to `max_backoff`, and
    /// each wait is jittered to between half and all of it.
    pub first_backoff: Duration,
    /// The longest wait between two tries.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// Five tries, waiting about 0.1, 0.2, 0.4 and 0.8 s between them.
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// The trailer of gRPC's retry pushback (gRFC A6), which the server sets on a call it shed
/// before doing anything: the call may be sent again after a pause.
pub const RETRY_PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

/// Whether a failed try may have lost an answer the server gave (or never reached it), so that
/// the same request with the same key may be sent again: the server or the database was
/// unavailable, the deadline passed, the server shed the call before doing anything (RESOURCE_EXHAUSTED
/// with [`RETRY_PUSHBACK_HEADER`]), or the connection broke before a gRPC status arrived (a
/// status tonic made locally from a transport error carries that error as its source; one
/// the server sent carries none).
pub fn is_retryable(status: &Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => true,
        // Shed by the server's concurrency limit before any work: it says so with gRPC's
        // retry pushback. Other RESOURCE_EXHAUSTED answers (a full inbox, say) are final.
        tonic::Code::ResourceExhausted => status.metadata().contains_key(RETRY_PUSHBACK_HEADER),
        tonic::Code::Unknown | tonic::Code::Internal => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// A fresh idempotency key: 128 random bits in lower-case hex.
pub fn new_idempotency_key() -> Result<String, Status> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| {
        Status::internal("drawing an idempotency key: the system's random source failed")
    })?;
    Ok(hex::encode(bytes))
}

/// `wait` jittered to between half and all of it.
fn jittered(wait: Duration) -> Duration {
    let mut byte = [0u8; 1];
    // Without randomness the full wait is as good a wait.
    let fraction = match aws_lc_rs::rand::fill(&mut byte) {
        Ok(()) => 0.5 + f64::from(byte[0]) / 510.0,
        Err(_) => 1.0,
    };
    wait.mul_f64(fraction)
}

/// One caller's connection to Keyhold.
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    token: BearerToken,
    retry: RetryPolicy,
}

impl Client {
    /// Connects to `endpoint` (for example `http://127.0.0.1:50051`, or `https://…` over TLS
    /// checked against the system's roots) as the holder of `token`.
    pub async fn connect(
        endpoint: &str,
        token: &str,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Client::connect_with(endpoint, token, &ClientTls::default()).await
    }

    /// [`Client::connect`] with TLS settings of its own. They need an `https://` endpoint: a
    /// CA or client certificate given for `http://` is refused rather than ignored.
    pub async fn connect_with(
        endpoint: &str,
        token: &str,
        tls: &ClientTls,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let mut target = Endpoint::from_shared(endpoint.to_string())?;
        if target.uri().scheme_str() == Some("https") {
            target = target.tls_config(tls.config())?;
        } else if tls.is_set() {
            return Err(format!(
                "{endpoint}: a CA, client certificate or server name needs an https:// endpoint"
            )
            .into());
        }
        let channel = target.connect().await?;
        Ok(Self {
            channel,
            token: BearerToken::new(token)?,
            retry: RetryPolicy::default(),
        })
    }

    /// The same connection, with another token.
    pub fn with_token(&self, token: &str) -> Result<Self, Status> {
        Ok(Self {
            channel: self.channel.clone(),
            token: BearerToken::new(token)?,
            retry: self.retry,
        })
    }

    /// The KeyDirectory service.
    pub fn key_directory(&self) -> KeyDirectoryClient<Authed> {
        KeyDirectoryClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    /// The Sessions service.
    pub fn sessions(&self) -> SessionsClient<Authed> {
        SessionsClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    /// The Escrow service.
    pub fn escrow(&self) -> EscrowClient<Authed> {
        EscrowClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    /// The Ratchet service.
    pub fn ratchet(&self) -> RatchetClient<Authed> {
        RatchetClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    /// The DeviceSync service.
    pub fn device_sync(&self) -> DeviceSyncClient<Authed> {
        DeviceSyncClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    /// The Messages service.
    pub fn messages(&self) -> MessagesClient<Authed> {
        MessagesClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    /// The Trust service.
    pub fn trust(&self) -> TrustClient<Authed> {
        TrustClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    /// The Admin service.
    pub fn admin(&self) -> AdminClient<Authed> {
        AdminClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    /// The raw channel, for the health service or other clients.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The same client, retrying by `policy` ([`Client::retrying`]).
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How this client retries.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// Sends `request` with `call`, retrying a lost answer ([`is_retryable`]) with the same
    /// idempotency key by this client's [`RetryPolicy`]. A request without a key gets a fresh
    /// one ([`new_idempotency_key`]) first; a request that has one keeps it. Returns the first
    /// answer that is not retryable, or the last failure once the tries are spent.
    ///
    /// ```no_run
    /// # async fn demo(client: keyhold::client::Client, request: keyhold::proto::keyhold::v1::RotateSessionRequest)
    /// # -> Result<(), tonic::Status> {
    /// let rotated = client
    ///     .retrying(request, |r| {
    ///         let mut sessions = client.sessions();
    ///         async move { sessions.rotate_session(r).await }
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn retrying<Q, T, F, Fut>(&self, mut request: Q, mut call: F) -> Result<T, Status>
    where
        Q: IdempotentRequest + Clone,
        F: FnMut(Q) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        if request.idempotency_key().is_empty() {
            request.set_idempotency_key(new_idempotency_key()?);
        }
        let attempts = self.retry.attempts.max(1);
        let mut wait = self.retry.first_backoff;
        let mut tried = 1;
        loop {
            match call(request.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if tried < attempts && is_retryable(&status) => {
                    tracing::debug!(code = ?status.code(), tried, "retrying with the same idempotency key");
                    tokio::time::sleep(jittered(wait)).await;
                    wait = (wait * 2).min(self.retry.max_backoff);
                    tried += 1;
                }
                Err(status) => return Err(status),
            }
        }
    }

    /// Sessions.CreateSession through [`Client::retrying`].
    pub async fn create_session(
        &self,
        request: pb::CreateSessionRequest,
    ) -> Result<pb::CreateSessionResponse, Status> {
        self.retrying(request, |r| {
            let mut sessions = self.sessions();
            async move { sessions.create_session(r).await }
        })
        .await
    }

    /// Sessions.AddRecipients through [`Client::retrying`].
    pub async fn add_recipients(
        &self,
        request: pb::AddRecipientsRequest,
    ) -> Result<pb::AddRecipientsResponse, Status> {
        self.retrying(request, |r| {
            let mut sessions = self.sessions();
            async move { sessions.add_recipients(r).await }
        })
        .await
    }

    /// Sessions.RemoveRecipients through [`Client::retrying`].
    pub async fn remove_recipients(
        &self,
        request: pb::RemoveRecipientsRequest,
    ) -> Result<pb::RemoveRecipientsResponse, Status> {
        self.retrying(request, |r| {
            let mut sessions = self.sessions();
            async move { sessions.remove_recipients(r).await }
        })
        .await
    }

    /// Sessions.RotateSession through [`Client::retrying`].
    pub async fn rotate_session(
        &self,
        request: pb::RotateSessionRequest,
    ) -> Result<pb::RotateSessionResponse, Status> {
        self.retrying(request, |r| {
            let mut sessions = self.sessions();
            async move { sessions.rotate_session(r).await }
        })
        .await
    }

    /// KeyDirectory.ClaimPrekeys through [`Client::retrying`].
    pub async fn claim_prekeys(
        &self,
        request: pb::ClaimPrekeysRequest,
    ) -> Result<pb::ClaimPrekeysResponse, Status> {
        self.retrying(request, |r| {
            let mut directory = self.key_directory();
            async move { directory.claim_prekeys(r).await }
        })
        .await
    }

    /// DeviceSync.SendKeyPackages through [`Client::retrying`].
    pub async fn send_key_packages(
        &self,
        request: pb::SendKeyPackagesRequest,
    ) -> Result<pb::SendKeyPackagesResponse, Status> {
        self.retrying(request, |r| {
            let mut device_sync = self.device_sync();
            async move { device_sync.send_key_packages(r).await }
        })
        .await
    }

    /// Admin.CreateToken through [`Client::retrying`].
    pub async fn create_token(
        &self,
        request: pb::CreateTokenRequest,
    ) -> Result<pb::CreateTokenResponse, Status> {
        self.retrying(request, |r| {
            let mut admin = self.admin();
            async move { admin.create_token(r).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_keys_are_128_bit_hex_and_differ() {
        let a = new_idempotency_key().unwrap();
        let b = new_idempotency_key().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn only_lost_answers_are_retried() {
        assert!(is_retryable(&Status::unavailable("db")));
        assert!(is_retryable(&Status::deadline_exceeded("late")));
        // A status the server sent: the call was answered.
        assert!(!is_retryable(&Status::internal("internal error")));
        assert!(!is_retryable(&Status::invalid_argument("x")));
        assert!(!is_retryable(&Status::resource_exhausted("rate")));
        // A transport failure tonic turned into a status.
        let broken = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert_eq!(broken.code(), tonic::Code::Unknown);
        assert!(is_retryable(&broken));
    }

    #[test]
    fn waits_are_jittered_within_half_and_all() {
        let wait = Duration::from_millis(200);
        for _ in 0..100 {
            let j = jittered(wait);
            assert!(j >= wait / 2 && j <= wait, "{j:?}");
        }
    }
}
