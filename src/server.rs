//! `keyhold serve`: the gRPC server with every service, health and reflection, behind the
//! authentication layer, until a shutdown signal.
//!
//! Every bound on calls and connections ([`crate::config::TransportLimits`]) is applied here,
//! in [`serve`]: HTTP/2 max concurrent streams, keepalive pings and the maximum connection age
//! by tonic's builder; the grace after that age by `server::connection`; the largest request
//! message on every service at once; the concurrency limit and deadlines by `server::limits`.

mod connection;
mod deadline;
mod limits;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::auth::{AuthLayer, PresentedToken, Principal, Role, RpcRoles, TokenLookup};
use crate::config::Limits;
use crate::keyfiles::ServiceKeys;
use crate::proto::keyhold::v1::admin_server::AdminServer;
use crate::proto::keyhold::v1::device_sync_server::DeviceSyncServer;
use crate::proto::keyhold::v1::escrow_server::EscrowServer;
use crate::proto::keyhold::v1::key_directory_server::KeyDirectoryServer;
use crate::proto::keyhold::v1::messages_server::MessagesServer;
use crate::proto::keyhold::v1::ratchet_server::RatchetServer;
use crate::proto::keyhold::v1::sessions_server::SessionsServer;
use crate::proto::keyhold::v1::trust_server::TrustServer;
use crate::service::admin::AdminService;
use crate::service::device_sync::DeviceSyncService;
use crate::service::escrow::EscrowService;
use crate::service::key_directory::KeyDirectoryService;
use crate::service::messages::MessagesService;
use crate::service::ratchet::RatchetService;
use crate::service::sessions::SessionsService;
use crate::service::trust::TrustService;
use crate::service::AppState;
use crate::store::Store;
use crate::tls::ServerTls;

pub(crate) use limits::{CALLS_SHED, CONCURRENT_CALLS_LIMIT};

/// Gauge: the version of the KEK the server wraps with.
pub(crate) const KEK_VERSION: &str = "keyhold_kek_version";

/// Resolves bearer tokens against the `api_tokens` records.
#[derive(Clone)]
pub struct StoreTokens(pub Store);

impl TokenLookup for StoreTokens {
    async fn authenticate(
        &self,
        token: PresentedToken,
    ) -> Result<Option<Principal>, tonic::Status> {
        let Some(row) = self.0.conn().await?.find_token(&token.token_id).await? else {
            return Ok(None);
        };
        if row.revoked_at.is_some() || !token.matches(&row.token_hash) {
            return Ok(None);
        }
        let token_id = token.token_id;
        Ok(match row.role {
            Role::App => Some(Principal::App { token_id }),
            Role::Staff => Some(Principal::Staff { token_id }),
            Role::Admin => Some(Principal::Admin { token_id }),
            // A device token without its binding is a corrupt row: refuse it.
            Role::Device => match (row.user, row.device) {
                (Some(user), Some(device)) => Some(Principal::Device {
                    token_id,
                    user,
                    device,
                }),
                _ => None,
            },
        })
    }
}

/// The roles that may call each method of every Keyhold service, for the auth layer.
pub fn rpc_roles() -> RpcRoles {
    fn name<S: NamedService>() -> &'static str {
        S::NAME
    }
    RpcRoles::default()
        .with_service(
            name::<KeyDirectoryServer<KeyDirectoryService>>(),
            KeyDirectoryService::ROLES,
        )
        .with_service(
            name::<SessionsServer<SessionsService>>(),
            SessionsService::ROLES,
        )
        .with_service(name::<EscrowServer<EscrowService>>(), EscrowService::ROLES)
        .with_service(name::<AdminServer<AdminService>>(), AdminService::ROLES)
        .with_service(
            name::<MessagesServer<MessagesService>>(),
            MessagesService::ROLES,
        )
        .with_service(name::<TrustServer<TrustService>>(), TrustService::ROLES)
        .with_service(
            name::<RatchetServer<RatchetService>>(),
            RatchetService::ROLES,
        )
        .with_service(
            name::<DeviceSyncServer<DeviceSyncService>>(),
            DeviceSyncService::ROLES,
        )
}

/// Builds the application state the services share.
pub fn app_state(store: Store, keys: ServiceKeys, max_list_len: usize, limits: Limits) -> AppState {
    metrics::gauge!(KEK_VERSION).set(f64::from(keys.kek.version().0));
    AppState {
        store,
        kek: Arc::new(keys.kek),
        escrow_public_key: Arc::new(keys.escrow_public_key),
        max_list_len,
        limits,
        streams: Default::default(),
    }
}

/// How [`serve`] takes connections.
pub enum Transport {
    /// Plaintext HTTP/2 on a TCP listener: loopback, or behind a TLS-terminating proxy
    /// (`crate::tls::listen_mode` decides which the settings allow).
    Plaintext(TcpListener),
    /// TLS on a TCP listener, with the reloadable configuration of [`ServerTls`].
    Tls(TcpListener, ServerTls),
}

impl From<TcpListener> for Transport {
    fn from(listener: TcpListener) -> Self {
        Transport::Plaintext(listener)
    }
}

/// Serves every Keyhold service on `transport` (a plaintext [`TcpListener`] or
/// [`Transport::Tls`]) until `shutdown` completes; in-flight calls finish first.
pub async fn serve(
    transport: impl Into<Transport>,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<KeyDirectoryServer<KeyDirectoryService>>()
        .await;
    health
        .set_serving::<SessionsServer<SessionsService>>()
        .await;
    health.set_serving::<EscrowServer<EscrowService>>().await;
    health.set_serving::<AdminServer<AdminService>>().await;
    health
        .set_serving::<MessagesServer<MessagesService>>()
        .await;
    health.set_serving::<TrustServer<TrustService>>().await;
    health.set_serving::<RatchetServer<RatchetService>>().await;
    health
        .set_serving::<DeviceSyncServer<DeviceSyncService>>()
        .await;
    // Health follows the database from now on; the task ends with the server.
    let health_task = tokio::spawn(crate::observe::health::follow_database(
        state.store.clone(),
        health.clone(),
        service_names(),
    ));
    let _stop_health = AbortOnDrop(health_task);

    let limits = state.limits.transport.clone();
    // One largest request message for every service, health and reflection included.
    let max_request = limits.max_request_bytes;
    macro_rules! bounded {
        ($server:expr) => {
            $server.max_decoding_message_size(max_request)
        };
    }
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = bounded!(reflection().build_v1()?);
    let reflection_v1alpha = bounded!(reflection().build_v1alpha()?);

    // Watch streams never end by themselves; a graceful shutdown ends them first.
    let streams = state.streams.clone();
    let shutdown = async move {
        shutdown.await;
        streams.stop();
    };

    let tokens = StoreTokens(state.store.clone());
    let mut builder = Server::builder()
        .max_concurrent_streams(limits.http2_max_concurrent_streams.get())
        .http2_keepalive_interval(limits.http2_keepalive_interval)
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout));
    // The age alone: with a grace, tonic 0.14 skips the GOAWAY (`connection` keeps the grace).
    if let Some(age) = limits.max_connection_age {
        builder = builder.max_connection_age(age);
    }
    let router = builder
        // Outside authentication, so refused calls are counted and logged too.
        .layer(crate::observe::CallLayer)
        // Outside authentication too: a shed call costs no token lookup.
        .layer(limits::LimitLayer::new(&limits))
        .layer(AuthLayer::new(tokens, rpc_roles()))
        .add_service(bounded!(health_service))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(bounded!(KeyDirectoryServer::new(KeyDirectoryService::new(
            state.clone()
        ))))
        .add_service(bounded!(SessionsServer::new(SessionsService::new(
            state.clone()
        ))))
        .add_service(bounded!(RatchetServer::new(RatchetService::new(
            state.clone()
        ))))
        .add_service(bounded!(DeviceSyncServer::new(DeviceSyncService::new(
            state.clone()
        ))))
        .add_service(bounded!(MessagesServer::new(MessagesService::new(
            state.clone()
        ))))
        .add_service(bounded!(TrustServer::new(TrustService::new(state.clone()))))
        .add_service(bounded!(EscrowServer::new(EscrowService::new(
            state.clone()
        ))))
        .add_service(bounded!(AdminServer::new(AdminService::new(state))));
    // A connection is closed once past its age and grace (no grace: when its calls end).
    let lifetime = limits
        .max_connection_age
        .zip(limits.max_connection_age_grace)
        .map(|(age, grace)| age + grace);
    // TCP_NODELAY, on both transports: a response goes out as several small writes (headers,
    // message, trailers); with Nagle's algorithm the later ones wait for the client's delayed
    // ACK, about 40 ms per call on Linux.
    match transport.into() {
        Transport::Plaintext(listener) => {
            let incoming = TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(move |io| io.map(|io| connection::AgedConnection::new(io, lifetime)));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?
        }
        Transport::Tls(listener, tls) => {
            let incoming = crate::tls::incoming(listener, tls)
                .map(move |io| io.map(|io| connection::AgedConnection::new(io, lifetime)));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?
        }
    }
    Ok(())
}

/// The health service names of every Keyhold service, as `grpc.health.v1.Health` knows them.
pub fn service_names() -> Vec<&'static str> {
    use tonic::server::NamedService;
    vec![
        KeyDirectoryServer::<KeyDirectoryService>::NAME,
        SessionsServer::<SessionsService>::NAME,
        EscrowServer::<EscrowService>::NAME,
        AdminServer::<AdminService>::NAME,
        MessagesServer::<MessagesService>::NAME,
        TrustServer::<TrustService>::NAME,
        RatchetServer::<RatchetService>::NAME,
        DeviceSyncServer::<DeviceSyncService>::NAME,
    ]
}

/// Aborts a background task when dropped, so it ends with the function that started it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing in-flight calls");
}
