//! The `keyhold` command line. Parsing only: each command calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keyhold::auth::Role;
use keyhold::config::SettingsArgs;
use keyhold::crypto::ids::{DeviceId, UserId};
use keyhold::ops;

/// Keyhold: an end-to-end encryption key service.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    settings: SettingsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API.
    Serve {
        /// On PostgreSQL, apply pending migrations before serving (SQLite always does).
        #[arg(long, env = "KEYHOLD_MIGRATE")]
        migrate: bool,
        /// On PostgreSQL, allow development keys generated in the data directory when
        /// --kek-file or --escrow-public-key-file is not given (SQLite always allows them).
        #[arg(long, env = "KEYHOLD_DEV")]
        dev: bool,
    },
    /// Show or apply database migrations.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Manage API tokens directly in the database (for bootstrapping and operators).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Staff escrow keys and escrowed DEKs.
    Escrow {
        #[command(subcommand)]
        action: EscrowAction,
    },
    /// Move the database between backends.
    Db {
        #[command(subcommand)]
        action: DbAction,
    },
    /// Back up the SQLite database (--database-url) online, while a server writes.
    Backup {
        /// The backup file to write (never overwritten).
        #[arg(long)]
        to: PathBuf,
    },
    /// Restore a SQLite backup into the empty data location --database-url names.
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
    },
}

#[derive(Subcommand)]
enum DbAction {
    /// Copy a SQLite database to PostgreSQL: check, migrate the target, copy, validate, report.
    Copy {
        /// The source, sqlite://PATH (opened read-only).
        #[arg(long, required_unless_present = "rollback")]
        from: Option<String>,
        /// The target, postgres://… (empty, unless --resume).
        #[arg(long, env = "KEYHOLD_DB_COPY_TO", hide_env_values = true)]
        to: String,
        /// Go on with an interrupted copy.
        #[arg(long)]
        resume: bool,
        /// Rows per batch; each batch is one target transaction.
        #[arg(long, default_value_t = keyhold::dbcopy::DEFAULT_BATCH_SIZE)]
        batch_size: usize,
        /// Write the JSON report (tables, counts, digests, durations) here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Only validate a finished copy against the source.
        #[arg(long, conflicts_with_all = ["resume", "rollback"])]
        validate_only: bool,
        /// Remove what a copy wrote to --to, leaving the target as it was before.
        #[arg(long, conflicts_with = "resume")]
        rollback: bool,
    },
}

#[derive(Subcommand)]
enum MigrateAction {
    /// List migrations and whether each is applied.
    Status,
    /// Apply pending migrations.
    Deploy,
}

#[derive(Subcommand)]
enum TokenAction {
    /// Create a token and print it once.
    Create {
        /// app, device, staff or admin.
        #[arg(long)]
        role: Role,
        /// For device tokens: the user.
        #[arg(long)]
        user: Option<String>,
        /// For device tokens: the device.
        #[arg(long)]
        device: Option<String>,
        /// A label for operators.
        #[arg(long)]
        label: Option<String>,
    },
}

#[derive(Subcommand)]
enum EscrowAction {
    /// Generate a staff escrow key pair: the private key file (mode 0600) and the public key
    /// file to give the service (KEYHOLD_ESCROW_PUBLIC_KEY_FILE).
    Keygen {
        /// Where to write the private key (refuses to overwrite).
        #[arg(long, default_value = "escrow.key")]
        private_key: PathBuf,
        /// Where to write the public key.
        #[arg(long, default_value = "escrow.pub")]
        public_key: PathBuf,
    },
    /// Staff tooling: fetch a session's escrowed DEKs through the Escrow service (the read is
    /// audited with the reason) and open them with the escrow private key.
    Open {
        /// The server, e.g. http://127.0.0.1:50051, or https://keyhold.example:50051 over TLS.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        endpoint: String,
        /// A staff token (or KEYHOLD_TOKEN).
        #[arg(long, env = "KEYHOLD_TOKEN", hide_env_values = true)]
        token: String,
        /// The session id.
        #[arg(long)]
        session: String,
        /// Why the key is read (recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// The escrow private key file.
        #[arg(long)]
        private_key: PathBuf,
        #[command(flatten)]
        tls: ClientTlsArgs,
    },
}

/// How a client command reaches an `https://` endpoint.
#[derive(clap::Args)]
struct ClientTlsArgs {
    /// The CA certificates (PEM) the server's certificate must chain to (default: the system's roots).
    #[arg(long, env = "KEYHOLD_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// For mutual TLS: this client's certificate chain (PEM).
    #[arg(long, env = "KEYHOLD_CLIENT_CERT_FILE", requires = "client_key_file")]
    client_cert_file: Option<PathBuf>,
    /// For mutual TLS: the private key of --client-cert-file (PEM).
    #[arg(long, env = "KEYHOLD_CLIENT_KEY_FILE", requires = "client_cert_file")]
    client_key_file: Option<PathBuf>,
    /// The name the server's certificate must be valid for, when it is not the endpoint's host.
    #[arg(long, env = "KEYHOLD_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match cli.settings.resolve() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keyhold: {e}");
            return ExitCode::from(2);
        }
    };
    ops::init_logging(&settings.log, settings.log_format);
    let result = match cli.command {
        Command::Serve { migrate, dev } => ops::serve(&settings, migrate, dev).await,
        Command::Migrate {
            action: MigrateAction::Status,
        } => ops::migrate_status(&settings).await,
        Command::Migrate {
            action: MigrateAction::Deploy,
        } => ops::migrate_deploy(&settings).await,
        Command::Token {
            action:
                TokenAction::Create {
                    role,
                    user,
                    device,
                    label,
                },
        } => {
            let binding = match (user, device) {
                (Some(u), Some(d)) => match (UserId::new(u), DeviceId::new(d)) {
                    (Ok(u), Ok(d)) => Ok(Some((u, d))),
                    (Err(e), _) | (_, Err(e)) => Err(e.to_string().into()),
                },
                (None, None) => Ok(None),
                _ => Err("--user and --device go together".into()),
            };
            match binding {
                Ok(binding) => ops::token_create(&settings, role, binding, label).await,
                Err(e) => Err(e),
            }
        }
        Command::Escrow {
            action:
                EscrowAction::Keygen {
                    private_key,
                    public_key,
                },
        } => ops::escrow_keygen(&private_key, &public_key),
        Command::Escrow {
            action:
                EscrowAction::Open {
                    endpoint,
                    token,
                    session,
                    reason,
                    private_key,
                    tls,
                },
        } => match keyhold::client::ClientTls::from_files(
            tls.ca_file.as_deref(),
            tls.client_cert_file.as_deref(),
            tls.client_key_file.as_deref(),
            tls.tls_server_name,
        ) {
            Ok(client_tls) => {
                ops::escrow_open(
                    &endpoint,
                    &token,
                    &session,
                    &reason,
                    &private_key,
                    &client_tls,
                )
                .await
            }
            Err(e) => Err(e),
        },
        Command::Db {
            action:
                DbAction::Copy {
                    from,
                    to,
                    resume,
                    batch_size,
                    report,
                    validate_only,
                    rollback,
                },
        } => {
            let options = keyhold::dbcopy::CopyOptions {
                from,
                to,
                resume,
                batch_size,
                report,
                validate_only,
                rollback,
            };
            keyhold::dbcopy::run(&options)
                .await
                .map(|_| ())
                .map_err(Into::into)
        }
        Command::Backup { to } => keyhold::backup::backup_command(&settings.database_url, &to)
            .await
            .map_err(Into::into),
        Command::Restore { from } => {
            keyhold::backup::restore_command(&settings.database_url, &from)
                .await
                .map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyhold: {e}");
            ExitCode::FAILURE
        }
    }
}
