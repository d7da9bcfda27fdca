//! What each `keyhold` command does: serve, migrations, tokens, escrow keys and staff reads.
//! `main.rs` only parses the command line and calls these.

use std::path::Path;

use tracing_subscriber::EnvFilter;

use crate::auth::Role;
use crate::config::Settings;
use crate::crypto::envelope::{open_dek, DekEnvelope, Recipient, WrapContext};
use crate::crypto::ids::{DeviceId, Epoch, SessionId, UserId};
use crate::keyfiles;
use crate::service::admin::{create_token, TokenRequest};
use crate::store::{Backend, Store};

/// A command's failure, shown to the operator as one line.
pub type OpError = Box<dyn std::error::Error + Send + Sync>;

/// Logs to stderr with the given filter (tracing's `EnvFilter` syntax).
pub fn init_logging(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Opens the store and applies the migration policy: SQLite is migrated on start; PostgreSQL
/// only with `migrate`, and refuses to start with pending migrations otherwise.
pub async fn open_store_for_serving(settings: &Settings, migrate: bool) -> Result<Store, OpError> {
    let store = Store::open(&settings.database_url).await?;
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

/// `keyhold serve`.
pub async fn serve(settings: &Settings, migrate: bool) -> Result<(), OpError> {
    // Before anything else: a bad certificate or an unsafe plaintext address stops the start.
    let tls = match crate::tls::listen_mode(settings)? {
        crate::tls::ListenMode::Tls(files) => Some(crate::tls::ServerTls::load(files)?),
        crate::tls::ListenMode::Plaintext => None,
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
        let issued = create_token(
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
    let Some(tls) = tls else {
        if !address.ip().is_loopback() {
            tracing::warn!(%address, "serving plaintext gRPC on a non-loopback address (--insecure-plaintext)");
        }
        tracing::info!(%address, "keyhold listening (plaintext)");
        return crate::server::serve(listener, state, crate::server::shutdown_signal()).await;
    };
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
    let served = crate::server::serve(transport, state, crate::server::shutdown_signal()).await;
    watcher.abort();
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
    let issued = create_token(
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
