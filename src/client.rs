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

use std::path::Path;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
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

/// One caller's connection to Keyhold.
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    token: BearerToken,
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
