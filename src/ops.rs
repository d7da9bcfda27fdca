//! What each `keyhold` command does: serve, migrations, tokens, escrow keys and staff reads.
//! `main.rs` only parses the command line and calls these.

use std::path::Path;
use std::time::Duration;

use crate::auth::Role;
use crate::config::{LogFormat, Settings};
use crate::crypto::envelope::{open_dek, DekEnvelope, Recipient, WrapContext};
use crate::crypto::ids::{DeviceId, Epoch, SessionId, UserId};
use crate::keyfiles;
use crate::service::admin::{issue_token, TokenRequest};
use crate::store::{Backend, Store, StoreOptions};

/// A command's failure, shown to the operator as one line.
pub type OpError = Box<dyn std::error::Error + Send + Sync>;

/// Logs to stderr with the given filter (tracing's `EnvFilter` syntax), as text or JSON
/// ([`crate::observe::logs`]).
pub fn init_logging(filter: &str, format: LogFormat) {
    crate::observe::logs::init_logging(filter, format);
}

/// Refuses, on PostgreSQL, to serve with development keys unless `dev` says so: a database
/// that replicas share is a deployment, and its KEK and escrow key must come from files the
/// operator keeps. SQLite, the laptop default, keeps generating them (with its warnings).
pub(crate) fn check_key_files(settings: &Settings, dev: bool) -> Result<(), OpError> {
    let on_postgres = Backend::of_url(&settings.database_url) == Some(Backend::Postgres);
    let missing: Vec<&str> = [
        (settings.kek_file.is_none(), "--kek-file (KEYHOLD_KEK_FILE)"),
        (
            settings.escrow_public_key_file.is_none(),
            "--escrow-public-key-file (KEYHOLD_ESCROW_PUBLIC_KEY_FILE)",
        ),
    ]
    .into_iter()
    .filter_map(|(missing, name)| missing.then_some(name))
    .collect();
    if on_postgres && !dev && !missing.is_empty() {
        return Err(format!(
            "on PostgreSQL, serve needs {}; or start with --dev (KEYHOLD_DEV=true) to use development keys generated in the data directory",
            missing.join(" and ")
        )
        .into());
    }
    Ok(())
}

/// The store's options as the settings give them: the PostgreSQL session timeouts and the
/// bound on message writes; the rest keep [`StoreOptions::default`].
pub fn store_options(settings: &Settings) -> StoreOptions {
    let ms = |v: u32| Duration::from_millis(u64::from(v));
    StoreOptions {
        statement_timeout: ms(settings.db_statement_timeout_ms),
        lock_timeout: ms(settings.db_lock_timeout_ms),
        idle_in_transaction_timeout: ms(settings.db_idle_in_transaction_timeout_ms),
        message_write_timeout: ms(settings.message_write_timeout_ms),
        ..StoreOptions::default()
    }
}

/// Opens the store and applies the migration policy: SQLite is migrated on start; PostgreSQL
/// only with `migrate`, and refuses to start with pending migrations otherwise.
pub async fn open_store_for_serving(settings: &Settings, migrate: bool) -> Result<Store, OpError> {
    let store = Store::open_with(&settings.database_url, store_options(settings)).await?;
    match store.backend() {
        // `migrate` logs each migration it applies.
        Backend::Sqlite => {
            store.migrate().await?;
        }
        Backend::Postgres if migrate => {
            store.migrate().await?;
        }
        Backend::Postgres => {
            let pending = store.pending_migrations().await?;
            if !pending.is_empty() {
                return Err(format!(
                    "{} pending migration(s) ({}): run `keyhold migrate deploy` or start with --migrate",
                    pending.len(),
                    pending.join(", ")
                )
                .into());
            }
        }
    }
    Ok(store)
}

/// `keyhold serve`; `dev` allows development keys on PostgreSQL ([`check_key_files`]).
pub async fn serve(settings: &Settings, migrate: bool, dev: bool) -> Result<(), OpError> {
    check_key_files(settings, dev)?;
    // Before anything else: a bad certificate or an unsafe plaintext address stops the start.
    let tls = match crate::tls::listen_mode(settings)? {
        crate::tls::ListenMode::Tls(files) => Some(crate::tls::ServerTls::load(files)?),
        crate::tls::ListenMode::Plaintext => None,
    };
    // Installed before anything records, so the gauges set at start are kept; bound before
    // the store is opened, so an address in use fails the start at once.
    let metrics_listener = match settings.metrics_listen {
        Some(address) => {
            crate::observe::install_recorder()?;
            Some(tokio::net::TcpListener::bind(address).await.map_err(|e| {
                format!("cannot listen for metrics on {address} (--metrics-listen): {e}")
            })?)
        }
        None => None,
    };
    let store = open_store_for_serving(settings, migrate).await?;
    let screened = crate::key_screening::screen_stored_keys(&store).await?;
    if screened.ran {
        tracing::info!(
            device_keys_checked = screened.device_keys_checked,
            prekeys_checked = screened.prekeys_checked,
            device_keys_revoked = screened.device_keys_revoked,
            prekeys_deleted = screened.prekeys_deleted,
            "screened the stored encapsulation keys"
        );
    }
    let (keys, warnings) = keyfiles::load_or_generate(
        &settings.data_dir,
        settings.kek_file.as_deref(),
        settings.escrow_public_key_file.as_deref(),
    )?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let state = crate::server::app_state(
        store,
        keys,
        settings.max_list_len,
        crate::config::Limits::from_settings(settings),
    );
    let admins = state
        .store
        .conn()
        .await?
        .count_active_admin_tokens()
        .await?;
    if admins == 0 {
        let issued = issue_token(
            &state.store,
            "bootstrap".to_string(),
            TokenRequest {
                role: Role::Admin,
                binding: None,
                label: Some("bootstrap".to_string()),
            },
        )
        .await?;
        // Printed once, to the terminal only: never through the logger.
        println!(
            "Bootstrap admin token (shown once; create others with Admin.CreateToken):\n{}",
            issued.expose_plaintext()
        );
    }
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    let address = listener.local_addr()?;
    let metrics_task = match metrics_listener {
        Some(metrics_listener) => {
            tracing::info!(address = %metrics_listener.local_addr()?, "metrics listening on /metrics");
            let store = state.store.clone();
            Some(tokio::spawn(async move {
                let served =
                    crate::observe::serve_metrics(metrics_listener, store, std::future::pending())
                        .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "metrics listener stopped");
                }
            }))
        }
        None => None,
    };
    let served = match tls {
        None => {
            if !address.ip().is_loopback() {
                tracing::warn!(%address, "serving plaintext gRPC on a non-loopback address (--insecure-plaintext)");
            }
            tracing::info!(%address, "keyhold listening (plaintext)");
            crate::server::serve(listener, state, crate::server::shutdown_signal()).await
        }
        Some(tls) => {
            let poll = match settings.tls_reload_interval_secs {
                0 => None,
                secs => Some(std::time::Duration::from_secs(u64::from(secs))),
            };
            let watcher = tls.watch(poll);
            tracing::info!(
                %address,
                mutual_tls = tls.files().client_ca_file.is_some(),
                "keyhold listening (TLS)"
            );
            let transport = crate::server::Transport::Tls(listener, tls);
            let served =
                crate::server::serve(transport, state, crate::server::shutdown_signal()).await;
            watcher.abort();
            served
        }
    };
    // Scrapes stop with the server.
    if let Some(task) = metrics_task {
        task.abort();
    }
    served
}

/// `keyhold migrate status`.
pub async fn migrate_status(settings: &Settings) -> Result<(), OpError> {
    let store = Store::open(&settings.database_url).await?;
    for m in store.migration_status().await? {
        println!(
            "{}  {}",
            if m.applied { "applied" } else { "pending" },
            m.name
        );
    }
    Ok(())
}

/// `keyhold migrate deploy`.
pub async fn migrate_deploy(settings: &Settings) -> Result<(), OpError> {
    let store = Store::open(&settings.database_url).await?;
    let applied = store.migrate().await?;
    if applied.is_empty() {
        println!("nothing to apply");
    }
    for m in applied {
        println!("applied  {m}");
    }
    Ok(())
}

/// `keyhold token create`: writes the token straight to the database (migrating SQLite
/// first, as `serve` would) and prints it once.
pub async fn token_create(
    settings: &Settings,
    role: Role,
    binding: Option<(UserId, DeviceId)>,
    label: Option<String>,
) -> Result<(), OpError> {
    if (role == Role::Device) != binding.is_some() {
        return Err("--user and --device are required for device tokens, and only for them".into());
    }
    let store = open_store_for_serving(settings, false).await?;
    let issued = issue_token(
        &store,
        "cli".to_string(),
        TokenRequest {
            role,
            binding,
            label,
        },
    )
    .await?;
    println!("{}", issued.expose_plaintext());
    eprintln!(
        "token id {} (role {}): shown once, keep it safe",
        hex::encode(issued.token_id.as_bytes()),
        role.name()
    );
    Ok(())
}

/// `keyhold escrow keygen`.
pub fn escrow_keygen(private_key: &Path, public_key: &Path) -> Result<(), OpError> {
    let public = keyfiles::generate_escrow_key_pair(private_key, public_key)?;
    eprintln!(
        "escrow key {} written: private key {} (mode 0600, keep it with staff tooling), public key {}",
        public.key_id(),
        private_key.display(),
        public_key.display()
    );
    println!("{}", hex::encode(public.to_bytes()));
    Ok(())
}

/// `keyhold escrow open`: staff tooling. Fetches a session's escrowed envelopes through the
/// Escrow service (which audits the read with the reason) and opens each with the escrow
/// private key; prints `epoch <n> dek <hex>` per epoch.
pub async fn escrow_open(
    endpoint: &str,
    token: &str,
    session: &str,
    reason: &str,
    private_key: &Path,
    tls: &crate::client::ClientTls,
) -> Result<(), OpError> {
    let session_id = SessionId::parse(session)?;
    let key = keyfiles::read_escrow_private_key(private_key)?;
    let client = crate::client::Client::connect_with(endpoint, token, tls).await?;
    let response = client
        .escrow()
        .get_escrowed_keys(crate::proto::keyhold::v1::GetEscrowedKeysRequest {
            session_id: session_id.to_string(),
            epochs: Vec::new(),
            reason: reason.to_string(),
        })
        .await?
        .into_inner();
    for staff_key in response.staff_keys {
        let context = WrapContext {
            session_id,
            epoch: Epoch::new(staff_key.epoch)?,
            recipient: Recipient::Escrow,
        };
        let envelope = DekEnvelope::from_bytes(&staff_key.envelope)?;
        let dek = open_dek(&envelope, &key, &context)?;
        println!(
            "epoch {} dek {}",
            staff_key.epoch,
            hex::encode(dek.expose_secret())
        );
    }
    Ok(())
}
