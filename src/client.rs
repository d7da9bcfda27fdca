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
//! Opening what the service returns is the crypto core's job
//! ([`crate::crypto::envelope::open_dek`]): the client never sends a private key anywhere.

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};
use zeroize::Zeroizing;

use crate::proto::keyhold::v1::admin_client::AdminClient;
use crate::proto::keyhold::v1::device_sync_client::DeviceSyncClient;
use crate::proto::keyhold::v1::escrow_client::EscrowClient;
use crate::proto::keyhold::v1::key_directory_client::KeyDirectoryClient;
use crate::proto::keyhold::v1::messages_client::MessagesClient;
use crate::proto::keyhold::v1::ratchet_client::RatchetClient;
use crate::proto::keyhold::v1::sessions_client::SessionsClient;
use crate::proto::keyhold::v1::trust_client::TrustClient;

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

/// One caller's connection to Keyhold.
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    token: BearerToken,
}

impl Client {
    /// Connects to `endpoint` (for example `http://127.0.0.1:50051`) as the holder of `token`.
    pub async fn connect(
        endpoint: &str,
        token: &str,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let channel = Endpoint::from_shared(endpoint.to_string())?
            .connect()
            .await?;
        Ok(Self {
            channel,
            token: BearerToken::new(token)?,
        })
    }

    /// The same connection, with another token.
    pub fn with_token(&self, token: &str) -> Result<Self, Status> {
        Ok(Self {
            channel: self.channel.clone(),
            token: BearerToken::new(token)?,
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
}
