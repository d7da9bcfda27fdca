//! PostgreSQL connections, over TLS as the database URL's `sslmode` and `sslrootcert` say,
//! read as libpq reads them, on rustls with the aws-lc-rs provider.
//!
//! | `sslmode` | TLS | server certificate checked |
//! | --- | --- | --- |
//! | `disable` | never | — |
//! | `prefer` (the default) | if the server offers it; plaintext if it does not or the handshake fails | chain only, if a root certificate is known |
//! | `require` | always | chain only, if a root certificate is known (libpq's rule) |
//! | `verify-ca` | always | chain up to the root certificate |
//! | `verify-full` | always | chain and host name |
//!
//! The root certificate is `sslrootcert=<file>` (PEM, one or more CAs), `sslrootcert=system`
//! (the system's roots; then `verify-full` is the default and weaker modes are refused, as in
//! libpq 16), or else `~/.postgresql/root.crt` if that file exists. Where libpq silently skips
//! verification for an explicitly named `sslrootcert` file that does not exist, Keyhold refuses
//! the URL. `allow`, client certificates (`sslcert`, `sslkey`) and the `PGSSL*` environment
//! variables are not supported. Under TLS, SCRAM authentication binds the channel
//! (`tls-server-end-point`) when the certificate's signature algorithm allows.
//!
//! Every connection — the pool's and the migration runner's — is made by [`establish`]; the
//! URL is read again for each, so a replaced root certificate file applies to new connections.

mod connector;

use std::path::{Path, PathBuf};

use diesel::ConnectionError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

use self::connector::{HandshakeFailure, RustlsConnect, Verify};
use super::PgConn;

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, else plaintext.
    Prefer,
    /// TLS; the certificate is checked only if a root certificate is known.
    Require,
    /// TLS; the chain is checked, not the host name.
    VerifyCa,
    /// TLS; the chain and the host name are checked.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => return Err("sslmode=allow is not supported: use prefer or stronger".into()),
            other => {
                return Err(format!(
                "sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            ))
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the root certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RootCert {
    /// A PEM file.
    File(PathBuf),
    /// The system's roots (`sslrootcert=system`).
    System,
}

/// A database URL split into what tokio-postgres reads and the TLS settings it does not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PgUrl {
    /// The URL without `sslmode` and `sslrootcert`.
    pub(crate) url: String,
    /// The `sslmode` (libpq's default, `prefer`, when absent).
    pub(crate) mode: SslMode,
    /// The `sslrootcert`, if given.
    pub(crate) root_cert: Option<RootCert>,
}

impl PgUrl {
    /// Splits `sslmode` and `sslrootcert` out of `url`; the other parameters stay as given.
    pub(crate) fn parse(url: &str) -> Result<PgUrl, String> {
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, query),
            None => (url, ""),
        };
        let mut kept = Vec::new();
        let (mut mode, mut root_cert) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match percent_decode(key)?.as_str() {
                // The last of a repeated parameter wins, as in libpq.
                "sslmode" => mode = Some(SslMode::parse(&percent_decode(value)?)?),
                "sslrootcert" => {
                    let value = percent_decode(value)?;
                    root_cert = match value.as_str() {
                        "" => None,
                        "system" => Some(RootCert::System),
                        path => Some(RootCert::File(PathBuf::from(path))),
                    };
                }
                "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" => {
                    return Err(format!(
                        "{key} is not supported: Keyhold presents no client certificate to PostgreSQL"
                    ))
                }
                _ => kept.push(pair),
            }
        }
        let mode = match (mode, &root_cert) {
            (Some(mode), _) => mode,
            // libpq 16: the system's roots mean a public CA, which only a name check makes safe.
            (None, Some(RootCert::System)) => SslMode::VerifyFull,
            (None, _) => SslMode::Prefer,
        };
        if root_cert == Some(RootCert::System) && mode != SslMode::VerifyFull {
            return Err(format!(
                "sslmode={} may not be used with sslrootcert=system (use verify-full)",
                mode.name()
            ));
        }
        let url = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok(PgUrl {
            url,
            mode,
            root_cert,
        })
    }

    /// What a connection does, with the root certificates read (the default file only if it
    /// exists).
    fn policy(&self) -> Result<Policy, String> {
        let explicit = self.root_cert.clone();
        let source = explicit.or_else(|| {
            default_root_cert_file()
                .filter(|p| p.is_file())
                .map(RootCert::File)
        });
        let verify = match (self.mode, &source) {
            (SslMode::Disable, _) => return Ok(Policy::Plain),
            (SslMode::VerifyFull, Some(_)) => Verify::ChainAndName,
            (_, Some(_)) => Verify::Chain,
            (SslMode::Prefer | SslMode::Require, None) => Verify::Nothing,
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(format!(
                    "sslmode={} needs a root certificate: give sslrootcert=<PEM file> (or \
                     sslrootcert=system) in the database URL, or put it in ~/.postgresql/root.crt",
                    self.mode.name()
                ))
            }
        };
        let roots = match &source {
            None => RootCertStore::empty(),
            Some(RootCert::File(path)) => read_roots(path)?,
            Some(RootCert::System) => system_roots()?,
        };
        Ok(Policy::Tls {
            connector: RustlsConnect::new(verify, roots)?,
            fallback_to_plaintext: self.mode == SslMode::Prefer,
        })
    }

    /// Names the TLS settings in an error (never the URL, which may hold a password).
    fn describe(&self) -> String {
        match &self.root_cert {
            Some(RootCert::File(path)) => {
                format!(
                    "sslmode={}, sslrootcert={}",
                    self.mode.name(),
                    path.display()
                )
            }
            Some(RootCert::System) => format!("sslmode={}, sslrootcert=system", self.mode.name()),
            None => format!("sslmode={}", self.mode.name()),
        }
    }
}

/// What one connection attempt does.
enum Policy {
    Plain,
    Tls {
        connector: RustlsConnect,
        /// `prefer`: a failed handshake is retried without TLS, as libpq does.
        fallback_to_plaintext: bool,
    },
}

/// Decodes `%XX` escapes (a `+` stays a `+`, as libpq reads URLs).
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape in the URL parameter {text:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("URL parameter {text:?} is not UTF-8"))
}

/// libpq's default root certificate file, `~/.postgresql/root.crt`.
fn default_root_cert_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".postgresql/root.crt"))
}

fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read sslrootcert {}: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert =
            cert.map_err(|e| format!("sslrootcert {} is not a PEM file: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("sslrootcert {}: not a usable CA: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "sslrootcert {} holds no certificate",
            path.display()
        ));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err("sslrootcert=system: no system root certificates were found".into());
    }
    Ok(roots)
}

/// A connected PostgreSQL session whose connection task has not been started yet.
// Made once per connection and consumed at once: boxing the TLS variant saves nothing.
#[allow(clippy::large_enum_variant)]
enum Opened {
    Tls(
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, connector::RustlsStream>,
    ),
    Plain(
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    ),
}

/// Opens one PostgreSQL connection as `url` says, TLS included. A URL error is
/// `InvalidConnectionUrl`; a refused server certificate says that TLS verification failed.
pub(crate) async fn establish(url: &str) -> Result<PgConn, ConnectionError> {
    match open(url).await? {
        Opened::Tls(client, connection) => {
            PgConn::try_from_client_and_connection(client, connection).await
        }
        Opened::Plain(client, connection) => {
            PgConn::try_from_client_and_connection(client, connection).await
        }
    }
}

/// Opens one PostgreSQL connection as [`establish`] does, as a plain `tokio_postgres`
/// client (its connection task spawned on the runtime): for the row-generic reader and
/// writer of `keyhold db copy`, which has no Diesel schema for the rows it moves.
pub(crate) async fn connect_client(url: &str) -> Result<tokio_postgres::Client, ConnectionError> {
    let log = |e: tokio_postgres::Error| tracing::warn!(error = %e, "PostgreSQL connection ended");
    Ok(match open(url).await? {
        Opened::Tls(client, connection) => {
            tokio::spawn(async move { connection.await.map_err(log) });
            client
        }
        Opened::Plain(client, connection) => {
            tokio::spawn(async move { connection.await.map_err(log) });
            client
        }
    })
}

async fn open(url: &str) -> Result<Opened, ConnectionError> {
    let target = PgUrl::parse(url).map_err(ConnectionError::InvalidConnectionUrl)?;
    let mut config: tokio_postgres::Config = target
        .url
        .parse()
        .map_err(|e: tokio_postgres::Error| ConnectionError::InvalidConnectionUrl(e.to_string()))?;
    // Reading the root certificates is file I/O (the system's roots: a directory of them).
    let policy = {
        let target = target.clone();
        tokio::task::spawn_blocking(move || target.policy())
            .await
            .map_err(|e| ConnectionError::BadConnection(format!("reading the TLS settings: {e}")))?
            .map_err(ConnectionError::InvalidConnectionUrl)?
    };
    let (connector, fallback) = match policy {
        Policy::Plain => return connect_plain(config).await,
        Policy::Tls {
            connector,
            fallback_to_plaintext,
        } => (connector, fallback_to_plaintext),
    };
    config.ssl_mode(if fallback {
        tokio_postgres::config::SslMode::Prefer
    } else {
        tokio_postgres::config::SslMode::Require
    });
    match config.connect(connector.clone()).await {
        Ok((client, connection)) => Ok(Opened::Tls(client, connection)),
        Err(e) => match connector.take_failure() {
            Some(failure) if fallback => {
                tracing::warn!(
                    reason = ?failure,
                    "TLS to PostgreSQL failed; sslmode=prefer: connecting without TLS"
                );
                connect_plain(config).await
            }
            Some(HandshakeFailure::Verification(reason)) => {
                Err(ConnectionError::BadConnection(format!(
                    "TLS verification of the PostgreSQL server's certificate failed ({}): {reason}",
                    target.describe()
                )))
            }
            Some(HandshakeFailure::Other(reason)) => Err(ConnectionError::BadConnection(format!(
                "TLS handshake with the PostgreSQL server failed ({}): {reason}",
                target.describe()
            ))),
            None => Err(ConnectionError::BadConnection(e.to_string())),
        },
    }
}

async fn connect_plain(mut config: tokio_postgres::Config) -> Result<Opened, ConnectionError> {
    config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
    Ok(Opened::Plain(client, connection))
}

#[cfg(test)]
mod tests;
