//! A real Keyhold server on an ephemeral port, over a fresh database of either backend, and
//! clients that talk to it over gRPC the way app servers, devices and staff tooling do.

use std::path::PathBuf;

use keyhold::auth::Role;
use keyhold::client::Client;
use keyhold::config::Limits;
use keyhold::crypto::ids::{DeviceId, UserId};
use keyhold::crypto::sign::IdentityKeyPair;
use keyhold::crypto::xwing::DecapsulationKey;
use keyhold::keyfiles;
use keyhold::proto::keyhold::v1 as pb;
use keyhold::service::{issue_token, TokenRequest};
use keyhold::store::audit::AuditEvent;
use keyhold::store::{Store, StoreOptions};
use tokio::sync::oneshot;

use super::{Kind, TestDb};

/// A running server and what a test needs to drive it.
pub struct TestServer {
    /// `http://127.0.0.1:<port>` (`https://` over TLS).
    pub endpoint: String,
    /// The store the server uses (for checks behind its back).
    pub store: Store,
    /// The database (dropped, and removed, with the server).
    pub db: TestDb,
    /// An admin token.
    pub admin_token: String,
    /// The staff escrow private key matching the server's escrow public key.
    pub escrow_key: DecapsulationKey,
    /// The directory holding the key files.
    pub key_dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server on `db`: migrations applied, fresh KEK and escrow key pair, an admin
    /// token issued directly in the store.
    pub async fn start(db: TestDb) -> TestServer {
        TestServer::start_with_limits(db, Limits::default()).await
    }

    /// [`TestServer::start`] with other prekey, ratchet and inbox limits.
    pub async fn start_with_limits(db: TestDb, limits: Limits) -> TestServer {
        TestServer::start_with_options(db, limits, StoreOptions::default()).await
    }

    /// [`TestServer::start`] serving over TLS with `tls`; the endpoint is
    /// `https://127.0.0.1:<port>` (clients need [`keyhold::client::ClientTls`]).
    pub async fn start_tls(db: TestDb, tls: keyhold::tls::ServerTls) -> TestServer {
        TestServer::start_on(db, Limits::default(), StoreOptions::default(), Some(tls)).await
    }

    /// [`TestServer::start_with_limits`] with other store options (timeouts, bounds).
    pub async fn start_with_options(
        db: TestDb,
        limits: Limits,
        options: StoreOptions,
    ) -> TestServer {
        TestServer::start_on(db, limits, options, None).await
    }

    async fn start_on(
        db: TestDb,
        limits: Limits,
        options: StoreOptions,
        tls: Option<keyhold::tls::ServerTls>,
    ) -> TestServer {
        let key_dir = std::env::temp_dir().join(format!(
            "keyhold-test-keys-{}",
            uuid::Uuid::now_v7().simple()
        ));
        let (keys, _warnings) =
            keyfiles::load_or_generate(&key_dir, None, None).expect("generate keys");
        let escrow_key = keyfiles::read_escrow_private_key(&key_dir.join("dev-escrow.key"))
            .expect("read escrow private key");
        let store = Store::open_with(&db.url, options)
            .await
            .expect("open store");
        store.migrate().await.expect("migrate");
        let admin = issue_token(
            &store,
            "test".into(),
            TokenRequest {
                role: Role::Admin,
                binding: None,
                label: None,
            },
        )
        .await
        .expect("admin token");
        let (endpoint, tx, handle) = serve(store.clone(), keys, limits, tls).await;
        TestServer {
            endpoint,
            store,
            db,
            admin_token: admin.expose_plaintext().to_string(),
            escrow_key,
            key_dir,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// Whether the server runs on SQLite or PostgreSQL.
    pub fn kind(&self) -> Kind {
        self.db.kind
    }

    /// A client holding `token`.
    pub async fn client(&self, token: &str) -> Client {
        Client::connect(&self.endpoint, token)
            .await
            .expect("connect")
    }

    /// Creates a token of `role` through the Admin service (device tokens need a binding).
    pub async fn token(&self, role: pb::Role, user: &str, device: &str) -> String {
        // The response wipes its token when dropped: take the token out first.
        let mut response = self
            .client(&self.admin_token)
            .await
            .admin()
            .create_token(pb::CreateTokenRequest {
                role: role as i32,
                user_id: user.into(),
                device_id: device.into(),
                label: String::new(),
                idempotency_key: String::new(),
            })
            .await
            .expect("create token")
            .into_inner();
        std::mem::take(&mut response.token)
    }

    /// The first 1000 events of the audit log, read behind the server's back.
    pub async fn audit_events(&self) -> Vec<AuditEvent> {
        let mut conn = self.store.conn().await.expect("connection");
        conn.list_audit_events(0, 1000).await.expect("audit events")
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
        let _ = std::fs::remove_dir_all(&self.key_dir);
    }
}

/// Serves `store` with `keys` and `limits` on an ephemeral port: the endpoint, the sender that
/// shuts the server down, and its task.
async fn serve(
    store: Store,
    keys: keyfiles::ServiceKeys,
    limits: Limits,
    tls: Option<keyhold::tls::ServerTls>,
) -> (String, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let state = keyhold::server::app_state(store, keys, 1000, limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = format!("{scheme}://{}", listener.local_addr().expect("addr"));
    let transport = match tls {
        Some(tls) => keyhold::server::Transport::Tls(listener, tls),
        None => keyhold::server::Transport::Plaintext(listener),
    };
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        keyhold::server::serve(transport, state, async {
            let _ = rx.await;
        })
        .await
        .expect("server runs");
    });
    (endpoint, tx, handle)
}

/// Another Keyhold server over the same database and keys as a [`TestServer`], with a store
/// (and connection pool) of its own: a second replica, as a separate process would be.
pub struct Replica {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Starts another server on this one's database and key files.
    pub async fn replica(&self, limits: Limits) -> Replica {
        let (keys, _warnings) =
            keyfiles::load_or_generate(&self.key_dir, None, None).expect("load keys");
        let store = Store::open(&self.db.url).await.expect("open store");
        let (endpoint, tx, handle) = serve(store, keys, limits, None).await;
        Replica {
            endpoint,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }
}

impl TestServer {
    /// Starts a server on another database (`url`: a copy or restore of this one's) with this
    /// server's key files, writing nothing to it first (no migration, no token).
    pub async fn replica_over(&self, url: &str) -> Replica {
        let (keys, _warnings) =
            keyfiles::load_or_generate(&self.key_dir, None, None).expect("load keys");
        let store = Store::open(url).await.expect("open store");
        let (endpoint, tx, handle) = serve(store, keys, Limits::default(), None).await;
        Replica {
            endpoint,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }
}

impl Replica {
    /// A client of this replica holding `token`.
    pub async fn client(&self, token: &str) -> Client {
        Client::connect(&self.endpoint, token)
            .await
            .expect("connect")
    }

    /// Stops the replica and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }
}

/// A device as a test drives it: its keys (private halves stay in the test) and its token.
pub struct TestDevice {
    /// The user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// The X-Wing key pair.
    pub xwing: DecapsulationKey,
    /// The identity key pair.
    pub identity: IdentityKeyPair,
    /// A device token bound to this device.
    pub token: String,
}

impl TestDevice {
    /// Generates keys, gets a device token and publishes the key bundle as the device itself.
    pub async fn enroll(server: &TestServer, user: &str, device: &str) -> TestDevice {
        let token = server.token(pb::Role::Device, user, device).await;
        let d = TestDevice::new(user, device, token);
        d.publish(server).await;
        d
    }

    /// A device with fresh keys and the given token, not yet published.
    pub fn new(user: &str, device: &str, token: String) -> TestDevice {
        TestDevice {
            user: UserId::new(user).expect("user id"),
            device: DeviceId::new(device).expect("device id"),
            xwing: DecapsulationKey::generate().expect("keygen"),
            identity: IdentityKeyPair::generate().expect("identity"),
            token,
        }
    }

    /// The signed PublishDeviceKey request for this device's current keys.
    pub fn publish_request(&self) -> pb::PublishDeviceKeyRequest {
        super::requests::bundle_request(self, &self.xwing)
    }

    /// Publishes the current keys as the device itself.
    pub async fn publish(&self, server: &TestServer) {
        server
            .client(&self.token)
            .await
            .key_directory()
            .publish_device_key(self.publish_request())
            .await
            .expect("publish device key");
    }

    /// This device's client.
    pub async fn client(&self, server: &TestServer) -> Client {
        server.client(&self.token).await
    }
}

/// Runs `body` against a server on SQLite and, when available, one on PostgreSQL.
#[macro_export]
macro_rules! on_both_servers {
    ($($name:ident => $body:ident;)*) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let server = $crate::common::server::TestServer::start($crate::common::sqlite_db()).await;
                    super::$body(&server).await;
                    server.stop().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = $crate::common::postgres_db().await else { return };
                    let server = $crate::common::server::TestServer::start(db).await;
                    super::$body(&server).await;
                    server.stop().await;
                }
            )*
        }
    };
}

/// Starts a server with `limits` on `db`, runs `body` against it and stops it.
pub async fn run_with_limits(db: TestDb, limits: Limits, body: impl AsyncFnOnce(&TestServer)) {
    let server = TestServer::start_with_limits(db, limits).await;
    body(&server).await;
    server.stop().await;
}

/// [`run_with_limits`] on a fresh PostgreSQL database, when PostgreSQL tests run.
pub async fn run_on_postgres_with_limits(limits: Limits, body: impl AsyncFnOnce(&TestServer)) {
    if let Some(db) = super::postgres_db().await {
        run_with_limits(db, limits, body).await;
    }
}

/// Runs `body` against a server started with `limits()` instead of the default limits, on
/// SQLite and, when available, on PostgreSQL.
#[macro_export]
macro_rules! on_both_servers_with {
    ($($name:ident => $body:ident ($limits:ident);)*) => {
        mod with_limits_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    $crate::common::server::run_with_limits(
                        $crate::common::sqlite_db(),
                        super::$limits(),
                        super::$body,
                    )
                    .await;
                }
            )*
        }
        mod with_limits_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    $crate::common::server::run_on_postgres_with_limits(super::$limits(), super::$body)
                        .await;
                }
            )*
        }
    };
}
