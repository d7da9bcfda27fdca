//! Configuration, each setting declared once: its flag, its `KEYHOLD_*` variable, its key in
//! the optional TOML file, its default and its doc.
//!
//! Precedence: command-line flag, then environment variable, then the TOML file named by
//! `--config` / `KEYHOLD_CONFIG`, then the default. A bad value is reported with every name it
//! could have come from, so the operator finds it whichever way it was set.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A setting could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value did not parse.
    #[error("invalid value {value:?} for {flag} / {env} / `{key}` in the config file: {reason}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// The environment variable.
        env: &'static str,
        /// The TOML key.
        key: &'static str,
        /// The value given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// The TOML file could not be read or parsed.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        $field:ident: $ty:ty = $default:expr, flag $flag:literal, env $env:literal;
    )*) => {
        /// The settings as given on the command line or in the environment (clap reads both).
        #[derive(clap::Args, Debug, Default, Clone)]
        pub struct SettingsArgs {
            /// A TOML file with any of the settings below (by their snake_case names).
            #[arg(long = "config", env = "KEYHOLD_CONFIG", global = true)]
            pub config: Option<PathBuf>,
            $(
                $(#[doc = $doc])*
                // A switch (a bool setting) may be given bare, `--flag`, or as `--flag=false`.
                #[arg(
                    long = $flag,
                    env = $env,
                    global = true,
                    num_args = if <$ty as Setting>::SWITCH { 0..=1 } else { 1..=1 },
                    require_equals = <$ty as Setting>::SWITCH,
                    default_missing_value = if <$ty as Setting>::SWITCH { Some("true") } else { None },
                )]
                pub $field: Option<String>,
            )*
        }

        /// The resolved settings.
        #[derive(Debug, Clone)]
        pub struct Settings {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl SettingsArgs {
            /// Resolves every setting: flag or variable, then file, then default.
            pub fn resolve(&self) -> Result<Settings, ConfigError> {
                let file = match &self.config {
                    Some(path) => read_file(path)?,
                    None => toml::Table::new(),
                };
                Ok(Settings {
                    $( $field: resolve_one::<$ty>(
                        self.$field.as_deref(),
                        &file,
                        concat!("--", $flag),
                        $env,
                        stringify!($field),
                        || $default,
                    )?, )*
                })
            }
        }

    };
}

settings! {
    /// Where records are kept: `sqlite://<path>` (embedded) or `postgres://user:pass@host/db`.
    database_url: String = "sqlite://data/keyhold.db".to_string(), flag "database-url", env "KEYHOLD_DATABASE_URL";
    /// The address the gRPC server listens on.
    listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 50051)), flag "listen", env "KEYHOLD_LISTEN";
    /// The directory for the development KEK and escrow key pair generated on first start.
    data_dir: PathBuf = PathBuf::from("data"), flag "data-dir", env "KEYHOLD_DATA_DIR";
    /// The KEK file (`<version>:<64 hex digits>`); a development KEK is generated in the data directory when unset.
    kek_file: Option<PathBuf> = None, flag "kek-file", env "KEYHOLD_KEK_FILE";
    /// The staff escrow public key file (X-Wing encapsulation key, hex), as `keyhold escrow keygen` writes it.
    escrow_public_key_file: Option<PathBuf> = None, flag "escrow-public-key-file", env "KEYHOLD_ESCROW_PUBLIC_KEY_FILE";
    /// Most user ids or recipients accepted in one call.
    max_list_len: usize = 1000, flag "max-list-len", env "KEYHOLD_MAX_LIST_LEN";
    /// Most unused one-time prekeys one device may hold; an upload past it is refused.
    max_unused_prekeys: usize = Limits::DEFAULT.max_unused_prekeys, flag "max-unused-prekeys", env "KEYHOLD_MAX_UNUSED_PREKEYS";
    /// Prekey claims one claimer may make on one device per claim window (kept in the database, so it holds across replicas).
    prekey_claim_limit: u32 = Limits::DEFAULT.prekey_claim_limit, flag "prekey-claim-limit", env "KEYHOLD_PREKEY_CLAIM_LIMIT";
    /// The prekey claim window, in seconds.
    prekey_claim_window_secs: u32 = Limits::DEFAULT_CLAIM_WINDOW_SECS, flag "prekey-claim-window-secs", env "KEYHOLD_PREKEY_CLAIM_WINDOW_SECS";
    /// Largest ratchet state a device may back up, in bytes.
    max_ratchet_state_bytes: usize = Limits::DEFAULT.max_ratchet_state_bytes, flag "max-ratchet-state-bytes", env "KEYHOLD_MAX_RATCHET_STATE_BYTES";
    /// Largest key package payload, in bytes.
    max_key_package_bytes: usize = Limits::DEFAULT.max_key_package_bytes, flag "max-key-package-bytes", env "KEYHOLD_MAX_KEY_PACKAGE_BYTES";
    /// Most unacknowledged key packages one device's inbox holds.
    max_inbox_packages: usize = Limits::DEFAULT.max_inbox_packages, flag "max-inbox-packages", env "KEYHOLD_MAX_INBOX_PACKAGES";
    /// Largest message PutMessages accepts: ciphertext plus associated data, in bytes (default 1 MiB).
    max_message_bytes: usize = Limits::DEFAULT.max_message_bytes, flag "max-message-bytes", env "KEYHOLD_MAX_MESSAGE_BYTES";
    /// Most messages one PutMessages call may carry.
    max_message_batch: usize = Limits::DEFAULT.max_message_batch, flag "max-message-batch", env "KEYHOLD_MAX_MESSAGE_BATCH";
    /// Most watch streams (WatchKeyPackages and WatchPrekeyStock together) one device may hold open on one server process; a stream past it is refused with RESOURCE_EXHAUSTED, and a closed one frees its place.
    max_watch_streams_per_device: usize = Limits::DEFAULT.max_watch_streams_per_device, flag "max-watch-streams-per-device", env "KEYHOLD_MAX_WATCH_STREAMS_PER_DEVICE";
    /// How long, in seconds, the answer of a call made with an idempotency key is kept: a retry with the same key within it returns that answer and writes nothing; after it the key counts as new (at least 1; default 24 hours).
    idempotency_retention_secs: u32 = Limits::DEFAULT_IDEMPOTENCY_RETENTION_SECS, flag "idempotency-retention-secs", env "KEYHOLD_IDEMPOTENCY_RETENTION_SECS";
    /// PostgreSQL `statement_timeout` of every database connection, in milliseconds (0: off): a statement running longer is cancelled and its call answers UNAVAILABLE.
    db_statement_timeout_ms: u32 = 30_000, flag "db-statement-timeout-ms", env "KEYHOLD_DB_STATEMENT_TIMEOUT_MS";
    /// PostgreSQL `lock_timeout` of every database connection, in milliseconds (0: off): a call waiting longer for a row another unfinished call holds (a prekey claim waiting for a one-time prekey, say) answers UNAVAILABLE.
    db_lock_timeout_ms: u32 = 5_000, flag "db-lock-timeout-ms", env "KEYHOLD_DB_LOCK_TIMEOUT_MS";
    /// PostgreSQL `idle_in_transaction_session_timeout` of every database connection, in milliseconds (0: off): the server closes a connection idle inside a transaction for longer (a paused or cut-off replica) and rolls the transaction back.
    db_idle_in_transaction_timeout_ms: u32 = 5_000, flag "db-idle-in-transaction-timeout-ms", env "KEYHOLD_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS";
    /// The bound on a PutMessages write on PostgreSQL, in milliseconds (0: off): it commits within this long of its start or not at all, and listings stop waiting for a writer older than this (plus one second) that waits on its client. Every replica must run a version that knows it.
    message_write_timeout_ms: u32 = 5_000, flag "message-write-timeout-ms", env "KEYHOLD_MESSAGE_WRITE_TIMEOUT_MS";
    /// The server's TLS certificate chain (PEM, leaf first); with `--tls-key-file`, gRPC is served over TLS only. Re-read on SIGHUP and when it changes.
    tls_cert_file: Option<PathBuf> = None, flag "tls-cert-file", env "KEYHOLD_TLS_CERT_FILE";
    /// The private key of `--tls-cert-file` (PEM: PKCS#8, PKCS#1 or SEC1). Re-read with the certificate.
    tls_key_file: Option<PathBuf> = None, flag "tls-key-file", env "KEYHOLD_TLS_KEY_FILE";
    /// Mutual TLS: the CA certificates (PEM) a client certificate must chain to; a client without one is refused in the handshake.
    tls_client_ca_file: Option<PathBuf> = None, flag "tls-client-ca-file", env "KEYHOLD_TLS_CLIENT_CA_FILE";
    /// How often, in seconds, the TLS files are checked for changes (0: only on SIGHUP).
    tls_reload_interval_secs: u32 = 10, flag "tls-reload-interval-secs", env "KEYHOLD_TLS_RELOAD_INTERVAL_SECS";
    /// Serve plaintext gRPC on a non-loopback address (behind a TLS-terminating proxy only): tokens and DEKs cross the network in clear.
    insecure_plaintext: bool = false, flag "insecure-plaintext", env "KEYHOLD_INSECURE_PLAINTEXT";
    /// Log filter, in tracing's `EnvFilter` syntax (e.g. `info`, `keyhold=debug`).
    log: String = "info".to_string(), flag "log", env "KEYHOLD_LOG";
    /// Log format: `text` (for people; colours only on a terminal) or `json` (one object per line).
    log_format: LogFormat = LogFormat::Text, flag "log-format", env "KEYHOLD_LOG_FORMAT";
    /// The address of the Prometheus metrics listener (`GET /metrics`); metrics are off when unset.
    metrics_listen: Option<SocketAddr> = None, flag "metrics-listen", env "KEYHOLD_METRICS_LISTEN";
    /// Most Keyhold calls this process works on at once (0: no limit); a call past it is refused at once with RESOURCE_EXHAUSTED ("overloaded; retry later"), never queued. Health and reflection are not counted.
    max_concurrent_calls: usize = TransportLimits::DEFAULT_MAX_CONCURRENT_CALLS, flag "max-concurrent-calls", env "KEYHOLD_MAX_CONCURRENT_CALLS";
    /// The deadline, in milliseconds, of a call whose caller sets none or a longer one (`grpc-timeout`; the smaller wins); 0: none. A call past its deadline answers DEADLINE_EXCEEDED and its transaction is rolled back. Streams (the Watch calls) end only at the caller's own `grpc-timeout`.
    default_deadline_ms: u32 = TransportLimits::DEFAULT_DEADLINE_MS, flag "default-deadline-ms", env "KEYHOLD_DEFAULT_DEADLINE_MS";
    /// Largest request message any service decodes, in bytes (default 16 MiB); a larger one is refused with RESOURCE_EXHAUSTED naming both sizes.
    max_request_bytes: usize = TransportLimits::DEFAULT.max_request_bytes, flag "max-request-bytes", env "KEYHOLD_MAX_REQUEST_BYTES";
    /// Most calls (streams) one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS); a client queues the rest itself.
    http2_max_concurrent_streams: NonZeroU32 = TransportLimits::DEFAULT.http2_max_concurrent_streams, flag "http2-max-concurrent-streams", env "KEYHOLD_HTTP2_MAX_CONCURRENT_STREAMS";
    /// How often, in seconds, the server pings an HTTP/2 connection to check that its peer is still there (0: never).
    http2_keepalive_interval_secs: u32 = TransportLimits::DEFAULT_KEEPALIVE_INTERVAL_SECS, flag "http2-keepalive-interval-secs", env "KEYHOLD_HTTP2_KEEPALIVE_INTERVAL_SECS";
    /// How long, in seconds, a keepalive ping may go unanswered before the connection is closed.
    http2_keepalive_timeout_secs: NonZeroU32 = TransportLimits::DEFAULT_KEEPALIVE_TIMEOUT_SECS, flag "http2-keepalive-timeout-secs", env "KEYHOLD_HTTP2_KEEPALIVE_TIMEOUT_SECS";
    /// Age, in seconds, at which a connection is asked to go away (HTTP/2 GOAWAY: its calls finish, the client reconnects, so load spreads over new replicas); 0: never.
    max_connection_age_secs: u32 = TransportLimits::DEFAULT_MAX_CONNECTION_AGE_SECS, flag "max-connection-age-secs", env "KEYHOLD_MAX_CONNECTION_AGE_SECS";
    /// How long, in seconds, a connection past its maximum age may stay open for its last calls (open streams included) before it is closed; 0: until they end.
    max_connection_age_grace_secs: u32 = TransportLimits::DEFAULT_MAX_CONNECTION_AGE_GRACE_SECS, flag "max-connection-age-grace-secs", env "KEYHOLD_MAX_CONNECTION_AGE_GRACE_SECS";
}

/// Bounds on what devices store, how fast they claim prekeys, and how much work calls and
/// connections may make, from the settings ([`Settings`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most unused one-time prekeys one device may hold.
    pub max_unused_prekeys: usize,
    /// Prekey claims one claimer may make on one device per `prekey_claim_window`.
    pub prekey_claim_limit: u32,
    /// The prekey claim rate window.
    pub prekey_claim_window: Duration,
    /// Largest ratchet state, in bytes.
    pub max_ratchet_state_bytes: usize,
    /// Largest key package payload, in bytes.
    pub max_key_package_bytes: usize,
    /// Most unacknowledged key packages one device's inbox holds.
    pub max_inbox_packages: usize,
    /// Largest message PutMessages accepts: ciphertext plus associated data, in bytes.
    pub max_message_bytes: usize,
    /// Most messages in one PutMessages call.
    pub max_message_batch: usize,
    /// Most watch streams one device may hold open on one server process.
    pub max_watch_streams_per_device: usize,
    /// How long the answer of a call made with an idempotency key is kept for its retries.
    pub idempotency_retention: Duration,
    /// Bounds on calls and connections, applied by the server ([`crate::server`]).
    pub transport: TransportLimits,
}

impl Limits {
    /// The default prekey claim window, in seconds.
    pub const DEFAULT_CLAIM_WINDOW_SECS: u32 = 60;
    /// The default retention of idempotency records, in seconds: 24 hours.
    pub const DEFAULT_IDEMPOTENCY_RETENTION_SECS: u32 = 24 * 60 * 60;

    /// The defaults, which the settings also use.
    pub const DEFAULT: Limits = Limits {
        max_unused_prekeys: 1000,
        prekey_claim_limit: 20,
        prekey_claim_window: Duration::from_secs(Limits::DEFAULT_CLAIM_WINDOW_SECS as u64),
        max_ratchet_state_bytes: 64 * 1024,
        max_key_package_bytes: 64 * 1024,
        max_inbox_packages: 1000,
        max_message_bytes: 1024 * 1024,
        max_message_batch: 500,
        max_watch_streams_per_device: 8,
        idempotency_retention: Duration::from_secs(
            Limits::DEFAULT_IDEMPOTENCY_RETENTION_SECS as u64,
        ),
        transport: TransportLimits::DEFAULT,
    };

    /// The limits the settings name.
    pub fn from_settings(settings: &Settings) -> Self {
        Limits {
            max_unused_prekeys: settings.max_unused_prekeys,
            prekey_claim_limit: settings.prekey_claim_limit,
            prekey_claim_window: Duration::from_secs(u64::from(settings.prekey_claim_window_secs)),
            max_ratchet_state_bytes: settings.max_ratchet_state_bytes,
            max_key_package_bytes: settings.max_key_package_bytes,
            max_inbox_packages: settings.max_inbox_packages,
            max_message_bytes: settings.max_message_bytes,
            max_message_batch: settings.max_message_batch,
            max_watch_streams_per_device: settings.max_watch_streams_per_device,
            idempotency_retention: Duration::from_secs(u64::from(
                settings.idempotency_retention_secs.max(1),
            )),
            transport: TransportLimits::from_settings(settings),
        }
    }
}

/// Bounds on the work calls and connections make in one process, from the settings; the
/// server applies them all (`server::serve`, `server::limits`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportLimits {
    /// Most Keyhold calls in progress at once; `None`: no limit. Past it a call is shed.
    pub max_concurrent_calls: Option<NonZeroUsize>,
    /// The deadline of a unary call whose caller sets none or a longer one; `None`: none.
    pub default_deadline: Option<Duration>,
    /// Largest request message any service decodes, in bytes.
    pub max_request_bytes: usize,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS of every connection.
    pub http2_max_concurrent_streams: NonZeroU32,
    /// Interval of the HTTP/2 keepalive pings; `None`: no pings.
    pub http2_keepalive_interval: Option<Duration>,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    pub http2_keepalive_timeout: Duration,
    /// Age at which a connection is sent GOAWAY; `None`: never.
    pub max_connection_age: Option<Duration>,
    /// How long a connection past its age may stay open for its last calls; `None`: until
    /// they end.
    pub max_connection_age_grace: Option<Duration>,
}

impl TransportLimits {
    /// The default concurrency limit.
    pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 256;
    /// The default deadline, in milliseconds: as long as the database's statement timeout.
    pub const DEFAULT_DEADLINE_MS: u32 = 30_000;
    /// The default keepalive ping interval, in seconds.
    pub const DEFAULT_KEEPALIVE_INTERVAL_SECS: u32 = 60;
    /// The default keepalive ping timeout, in seconds.
    pub const DEFAULT_KEEPALIVE_TIMEOUT_SECS: NonZeroU32 = nonzero_u32(20);
    /// The default maximum connection age, in seconds (30 minutes).
    pub const DEFAULT_MAX_CONNECTION_AGE_SECS: u32 = 30 * 60;
    /// The default grace after the maximum age, in seconds: longer than the default deadline,
    /// so every unary call begun before the GOAWAY can finish.
    pub const DEFAULT_MAX_CONNECTION_AGE_GRACE_SECS: u32 = 60;

    /// The defaults, which the settings also use.
    pub const DEFAULT: TransportLimits = TransportLimits {
        max_concurrent_calls: Some(nonzero_usize(TransportLimits::DEFAULT_MAX_CONCURRENT_CALLS)),
        default_deadline: Some(Duration::from_millis(
            TransportLimits::DEFAULT_DEADLINE_MS as u64,
        )),
        max_request_bytes: 16 * 1024 * 1024,
        http2_max_concurrent_streams: nonzero_u32(200),
        http2_keepalive_interval: Some(Duration::from_secs(
            TransportLimits::DEFAULT_KEEPALIVE_INTERVAL_SECS as u64,
        )),
        http2_keepalive_timeout: Duration::from_secs(
            TransportLimits::DEFAULT_KEEPALIVE_TIMEOUT_SECS.get() as u64,
        ),
        max_connection_age: Some(Duration::from_secs(
            TransportLimits::DEFAULT_MAX_CONNECTION_AGE_SECS as u64,
        )),
        max_connection_age_grace: Some(Duration::from_secs(
            TransportLimits::DEFAULT_MAX_CONNECTION_AGE_GRACE_SECS as u64,
        )),
    };

    /// The limits the settings name (zero meaning "none" where the setting says so).
    pub fn from_settings(settings: &Settings) -> Self {
        let secs = |v: u32| (v > 0).then(|| Duration::from_secs(u64::from(v)));
        TransportLimits {
            max_concurrent_calls: NonZeroUsize::new(settings.max_concurrent_calls),
            default_deadline: (settings.default_deadline_ms > 0)
                .then(|| Duration::from_millis(u64::from(settings.default_deadline_ms))),
            max_request_bytes: settings.max_request_bytes,
            http2_max_concurrent_streams: settings.http2_max_concurrent_streams,
            http2_keepalive_interval: secs(settings.http2_keepalive_interval_secs),
            http2_keepalive_timeout: Duration::from_secs(u64::from(
                settings.http2_keepalive_timeout_secs.get(),
            )),
            max_connection_age: secs(settings.max_connection_age_secs),
            max_connection_age_grace: secs(settings.max_connection_age_grace_secs),
        }
    }
}

/// A non-zero constant; zero fails the build (a panic in constant evaluation is a compile
/// error), never a run.
const fn nonzero_u32(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => panic!("a non-zero constant is zero"),
    }
}

/// [`nonzero_u32`] for `usize`.
const fn nonzero_usize(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => panic!("a non-zero constant is zero"),
    }
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits::DEFAULT
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

fn read_file(path: &PathBuf) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    text.parse::<toml::Table>().map_err(|e| ConfigError::File {
        path: path.clone(),
        reason: e.to_string(),
    })
}

/// A setting's type: parsed from the text of a flag, variable or TOML value.
pub trait Setting: Sized {
    /// Whether the flag is a switch: `--flag` alone means `true` (a value needs `--flag=v`).
    const SWITCH: bool = false;

    /// Parses the text form.
    fn parse_setting(s: &str) -> Result<Self, String>;
}

macro_rules! setting_from_str {
    ($($t:ty),*) => {$(
        impl Setting for $t {
            fn parse_setting(s: &str) -> Result<Self, String> {
                <$t as FromStr>::from_str(s).map_err(|e| e.to_string())
            }
        }
    )*};
}
setting_from_str!(String, SocketAddr, PathBuf, usize, u32, NonZeroU32);

impl Setting for bool {
    const SWITCH: bool = true;

    fn parse_setting(s: &str) -> Result<Self, String> {
        <bool as FromStr>::from_str(s).map_err(|e| e.to_string())
    }
}

/// How log lines are written ([`Settings::log_format`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Setting for LogFormat {
    fn parse_setting(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected text or json"
            )),
        }
    }
}

impl<T: Setting> Setting for Option<T> {
    const SWITCH: bool = T::SWITCH;

    fn parse_setting(s: &str) -> Result<Self, String> {
        T::parse_setting(s).map(Some)
    }
}

fn resolve_one<T: Setting>(
    given: Option<&str>,
    file: &toml::Table,
    flag: &'static str,
    env: &'static str,
    key: &'static str,
    default: impl FnOnce() -> T,
) -> Result<T, ConfigError> {
    let text = match (given, file.get(key)) {
        (Some(v), _) => v.to_string(),
        (None, Some(toml::Value::String(s))) => s.clone(),
        (None, Some(other)) => other.to_string(),
        (None, None) => return Ok(default()),
    };
    T::parse_setting(&text).map_err(|reason| ConfigError::Invalid {
        flag,
        env,
        key,
        value: text,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_when_nothing_is_given() {
        let s = SettingsArgs::default().resolve().unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(s.database_url, "sqlite://data/keyhold.db");
        assert_eq!(s.kek_file, None);
        assert_eq!(s.db_statement_timeout_ms, 30_000);
        assert_eq!(s.db_lock_timeout_ms, 5_000);
        assert_eq!(s.db_idle_in_transaction_timeout_ms, 5_000);
        assert_eq!(s.message_write_timeout_ms, 5_000);
        assert_eq!(s.idempotency_retention_secs, 86_400);
        assert_eq!(
            Limits::from_settings(&s).idempotency_retention,
            Duration::from_secs(86_400)
        );
    }

    #[test]
    fn transport_limits_default_sanely_and_zero_turns_them_off() {
        let defaults = SettingsArgs::default().resolve().unwrap();
        let limits = Limits::from_settings(&defaults);
        assert_eq!(limits, Limits::DEFAULT);
        let t = limits.transport;
        assert_eq!(t.max_concurrent_calls.map(NonZeroUsize::get), Some(256));
        assert_eq!(t.default_deadline, Some(Duration::from_secs(30)));
        assert_eq!(t.max_request_bytes, 16 * 1024 * 1024);
        assert_eq!(t.http2_max_concurrent_streams.get(), 200);
        assert_eq!(t.http2_keepalive_interval, Some(Duration::from_secs(60)));
        assert_eq!(t.http2_keepalive_timeout, Duration::from_secs(20));
        assert_eq!(t.max_connection_age, Some(Duration::from_secs(1800)));
        assert_eq!(t.max_connection_age_grace, Some(Duration::from_secs(60)));
        // The grace outlasts the deadline: a call begun before the GOAWAY can finish.
        assert!(t.max_connection_age_grace > t.default_deadline);

        let off = SettingsArgs {
            max_concurrent_calls: Some("0".into()),
            default_deadline_ms: Some("0".into()),
            http2_keepalive_interval_secs: Some("0".into()),
            max_connection_age_secs: Some("0".into()),
            max_connection_age_grace_secs: Some("0".into()),
            ..Default::default()
        };
        let t = TransportLimits::from_settings(&off.resolve().unwrap());
        assert_eq!(t.max_concurrent_calls, None);
        assert_eq!(t.default_deadline, None);
        assert_eq!(t.http2_keepalive_interval, None);
        assert_eq!(
            (t.max_connection_age, t.max_connection_age_grace),
            (None, None)
        );
    }

    #[test]
    fn settings_that_cannot_be_zero_refuse_it_by_name() {
        for (args, flag, env) in [
            (
                SettingsArgs {
                    http2_max_concurrent_streams: Some("0".into()),
                    ..Default::default()
                },
                "--http2-max-concurrent-streams",
                "KEYHOLD_HTTP2_MAX_CONCURRENT_STREAMS",
            ),
            (
                SettingsArgs {
                    http2_keepalive_timeout_secs: Some("0".into()),
                    ..Default::default()
                },
                "--http2-keepalive-timeout-secs",
                "KEYHOLD_HTTP2_KEEPALIVE_TIMEOUT_SECS",
            ),
            (
                SettingsArgs {
                    max_request_bytes: Some("16MiB".into()),
                    ..Default::default()
                },
                "--max-request-bytes",
                "KEYHOLD_MAX_REQUEST_BYTES",
            ),
        ] {
            let err = args.resolve().unwrap_err().to_string();
            assert!(err.contains(flag) && err.contains(env), "{err}");
        }
    }

    #[test]
    fn log_format_and_metrics_listen_parse_or_name_their_sources() {
        let s = SettingsArgs::default().resolve().unwrap();
        assert_eq!((s.log_format, s.metrics_listen), (LogFormat::Text, None));
        let args = SettingsArgs {
            log_format: Some("json".into()),
            metrics_listen: Some("127.0.0.1:9464".into()),
            ..Default::default()
        };
        let s = args.resolve().unwrap();
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.metrics_listen.unwrap().to_string(), "127.0.0.1:9464");
        let bad = SettingsArgs {
            log_format: Some("xml".into()),
            ..Default::default()
        };
        let err = bad.resolve().unwrap_err().to_string();
        assert!(
            err.contains("--log-format") && err.contains("KEYHOLD_LOG_FORMAT"),
            "{err}"
        );
    }

    #[test]
    fn a_bool_setting_is_a_switch_and_other_flags_still_take_values() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            settings: SettingsArgs,
            command: Option<String>,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("keyhold").chain(args.iter().copied())).unwrap()
        };
        let bare = parse(&["--insecure-plaintext", "serve", "--listen", "0.0.0.0:1"]);
        assert_eq!(bare.command.as_deref(), Some("serve"));
        assert!(bare.settings.resolve().unwrap().insecure_plaintext);
        let off = parse(&["--insecure-plaintext=false", "serve"]);
        assert!(!off.settings.resolve().unwrap().insecure_plaintext);
        let unset = parse(&["serve"]);
        assert!(!unset.settings.resolve().unwrap().insecure_plaintext);
        assert!(Cli::try_parse_from(["keyhold", "--listen"]).is_err());
    }

    #[test]
    fn flag_beats_file_and_bad_values_name_every_source() {
        let dir = std::env::temp_dir().join(format!("keyhold-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k.toml");
        std::fs::write(&path, "listen = \"0.0.0.0:1\"\nmax_list_len = 7\n").unwrap();
        let args = SettingsArgs {
            config: Some(path.clone()),
            listen: Some("127.0.0.1:2".into()),
            ..Default::default()
        };
        let s = args.resolve().unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:2");
        assert_eq!(s.max_list_len, 7);

        let bad = SettingsArgs {
            listen: Some("not an address".into()),
            ..Default::default()
        };
        let err = bad.resolve().unwrap_err().to_string();
        assert!(
            err.contains("--listen") && err.contains("KEYHOLD_LISTEN") && err.contains("`listen`"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
