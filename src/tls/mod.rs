//! TLS for the gRPC listener, on rustls with the aws-lc-rs provider.
//!
//! - [`TlsFiles`] names the PEM files: the server's certificate chain and private key, and for
//!   mutual TLS the CA certificates a client's certificate must chain to.
//! - [`ServerTls`] holds the rustls `ServerConfig` built from them (ALPN `h2`, TLS 1.2 and 1.3,
//!   client certificates required when a client CA is set). Each new connection takes the
//!   configuration in force when it arrives, so [`ServerTls::reload`] changes what new
//!   handshakes see and leaves open connections alone. A reload that fails (a file missing or
//!   unparsable, a key that does not match its certificate) keeps the previous configuration.
//! - [`ServerTls::watch`] reloads on SIGHUP and whenever the files' contents change (polled),
//!   logging each outcome; an operator rotates certificates without a restart.
//! - [`incoming`] (in `accept.rs`) is the accept loop: TCP accept, `TCP_NODELAY`, the TLS
//!   handshake on a task of its own with a deadline, and only finished handshakes handed to
//!   tonic. A failed handshake is logged and dropped; the loop goes on.
//! - [`listen_mode`] decides from the settings whether to serve TLS or plaintext, and refuses
//!   plaintext on a non-loopback address unless `--insecure-plaintext` says so.

mod accept;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use zeroize::Zeroizing;

use crate::config::Settings;

pub use accept::{incoming, TlsIncoming};

/// The ALPN protocol gRPC runs on.
const ALPN_H2: &[u8] = b"h2";

/// Why TLS could not be set up, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// A file held no usable PEM section of the kind expected.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// rustls refused the certificate, key or client CA (for example a key that does not
    /// match the certificate).
    #[error("the TLS configuration from {cert} and {key} was refused: {reason}")]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        reason: String,
    },
    /// The settings ask for something inconsistent or unsafe; the text names the flags.
    #[error("{0}")]
    Settings(String),
}

/// The PEM files the server's TLS configuration is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// For mutual TLS: the CA certificates a client certificate must chain to.
    pub client_ca_file: Option<PathBuf>,
}

/// How `serve` takes connections, as the settings decide ([`listen_mode`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenMode {
    /// TLS, with these files.
    Tls(TlsFiles),
    /// Plaintext HTTP/2: on loopback, or where `--insecure-plaintext` allows it.
    Plaintext,
}

/// Decides between TLS and plaintext from the settings.
///
/// TLS needs both `--tls-cert-file` and `--tls-key-file`; `--tls-client-ca-file` needs them.
/// Without TLS, a non-loopback `--listen` address is refused unless `--insecure-plaintext`
/// is set: bearer tokens and DEKs would cross the network in clear.
pub fn listen_mode(settings: &Settings) -> Result<ListenMode, TlsError> {
    let tls = match (&settings.tls_cert_file, &settings.tls_key_file) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert_file: cert.clone(),
            key_file: key.clone(),
            client_ca_file: settings.tls_client_ca_file.clone(),
        }),
        (Some(_), None) => {
            return Err(TlsError::Settings(
                "--tls-cert-file is set but --tls-key-file (KEYHOLD_TLS_KEY_FILE) is not".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(TlsError::Settings(
                "--tls-key-file is set but --tls-cert-file (KEYHOLD_TLS_CERT_FILE) is not".into(),
            ))
        }
        (None, None) => None,
    };
    match tls {
        Some(_) if settings.insecure_plaintext => Err(TlsError::Settings(
            "--insecure-plaintext and --tls-cert-file are both set: choose TLS or plaintext".into(),
        )),
        Some(files) => Ok(ListenMode::Tls(files)),
        None if settings.tls_client_ca_file.is_some() => Err(TlsError::Settings(
            "--tls-client-ca-file needs --tls-cert-file and --tls-key-file".into(),
        )),
        None if settings.listen.ip().is_loopback() || settings.insecure_plaintext => {
            Ok(ListenMode::Plaintext)
        }
        None => Err(TlsError::Settings(format!(
            "refusing to serve plaintext gRPC on {}, which is not a loopback address: bearer \
             tokens and DEKs would cross the network in clear. Set --tls-cert-file and \
             --tls-key-file, or pass --insecure-plaintext (KEYHOLD_INSECURE_PLAINTEXT=true) if a \
             TLS-terminating proxy stands in front",
            settings.listen
        ))),
    }
}

/// The server's TLS configuration, re-read from its [`TlsFiles`] on [`ServerTls::reload`].
/// Cheap to clone: clones share the configuration.
#[derive(Clone)]
pub struct ServerTls {
    inner: Arc<Inner>,
}

struct Inner {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    /// What the last reload attempt read, so that polling acts (and logs) once per change.
    last_seen: Mutex<Seen>,
}

#[derive(Clone, PartialEq, Eq)]
enum Seen {
    /// The SHA-256 of the files' contents.
    Contents([u8; 32]),
    /// The files could not be read, for this reason.
    Unreadable(String),
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.inner.files)
            .finish_non_exhaustive()
    }
}

/// The files' contents, read together. The key is wiped when dropped.
struct Material {
    cert: Vec<u8>,
    key: Zeroizing<Vec<u8>>,
    client_ca: Option<Vec<u8>>,
}

impl Material {
    fn read(files: &TlsFiles) -> Result<Material, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| TlsError::Read {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        };
        Ok(Material {
            cert: read(&files.cert_file)?,
            key: Zeroizing::new(read(&files.key_file)?),
            client_ca: files.client_ca_file.as_deref().map(read).transpose()?,
        })
    }

    fn digest(&self) -> [u8; 32] {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        // Length-prefixed, so that moving bytes from one file to the next changes the digest.
        for part in [
            Some(self.cert.as_slice()),
            Some(self.key.as_slice()),
            self.client_ca.as_deref(),
        ] {
            let part = part.unwrap_or_default();
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// The rustls provider every TLS configuration of Keyhold uses.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate in a PEM file's contents; at least one.
pub(crate) fn parse_certificates(
    pem: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE section".into(),
        });
    }
    Ok(certs)
}

/// A root store of every certificate in a PEM file's contents; each must parse as a CA.
pub(crate) fn parse_roots(pem: &[u8], path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certificates(pem, path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// The first private key in a PEM file's contents.
pub(crate) fn parse_private_key(
    pem: &[u8],
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY section".into()
            }
            // The error may quote the file; it never reaches a log for a key.
            _ => "not a PEM private key file".into(),
        },
    })
}

fn build_config(files: &TlsFiles, material: &Material) -> Result<Arc<ServerConfig>, TlsError> {
    let refused = |reason: String| TlsError::Config {
        cert: files.cert_file.clone(),
        key: files.key_file.clone(),
        reason,
    };
    let chain = parse_certificates(&material.cert, &files.cert_file)?;
    let key = parse_private_key(&material.key, &files.key_file)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| refused(e.to_string()))?;
    let builder = match (&files.client_ca_file, &material.client_ca) {
        (Some(path), Some(pem)) => {
            let roots = parse_roots(pem, path)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Pem {
                    path: path.clone(),
                    reason: format!("cannot verify client certificates with it: {e}"),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    // Checks that the key is the certificate's.
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| refused(e.to_string()))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// What [`ServerTls::reload_if_changed`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The files are as last read: nothing was done.
    Unchanged,
    /// The files changed and the new configuration is in force.
    Reloaded,
}

impl ServerTls {
    /// Reads the files and builds the first configuration; any failure is returned (at start,
    /// the server must not come up without its certificate).
    pub fn load(files: TlsFiles) -> Result<ServerTls, TlsError> {
        let material = Material::read(&files)?;
        let config = build_config(&files, &material)?;
        Ok(ServerTls {
            inner: Arc::new(Inner {
                files,
                current: RwLock::new(config),
                last_seen: Mutex::new(Seen::Contents(material.digest())),
            }),
        })
    }

    /// The files this configuration is read from.
    pub fn files(&self) -> &TlsFiles {
        &self.inner.files
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        // A poisoned lock still holds a whole Arc: the writer only swaps it.
        self.inner
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the files now and, if they make a valid configuration, puts it in force for
    /// new handshakes. On failure the previous configuration stays and the reason is returned.
    /// Blocking file I/O: call it off the async workers (as [`ServerTls::watch`] does).
    pub fn reload(&self) -> Result<(), TlsError> {
        let material = match Material::read(&self.inner.files) {
            Ok(m) => m,
            Err(e) => {
                self.set_seen(Seen::Unreadable(e.to_string()));
                return Err(e);
            }
        };
        self.install(&material)
    }

    /// Re-reads the files and reloads if their contents differ from what was last read
    /// (successfully or not): a change that fails is reported once, not at every poll.
    pub fn reload_if_changed(&self) -> Result<ReloadOutcome, TlsError> {
        let material = match Material::read(&self.inner.files) {
            Ok(m) => m,
            Err(e) => {
                let seen = Seen::Unreadable(e.to_string());
                return if self.set_seen(seen) {
                    Err(e)
                } else {
                    Ok(ReloadOutcome::Unchanged)
                };
            }
        };
        if !self.set_seen(Seen::Contents(material.digest())) {
            return Ok(ReloadOutcome::Unchanged);
        }
        self.install(&material).map(|()| ReloadOutcome::Reloaded)
    }

    /// Records what a reload attempt read; whether it differs from the last.
    fn set_seen(&self, seen: Seen) -> bool {
        let mut last = self
            .inner
            .last_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let changed = *last != seen;
        *last = seen;
        changed
    }

    fn install(&self, material: &Material) -> Result<(), TlsError> {
        self.set_seen(Seen::Contents(material.digest()));
        let config = build_config(&self.inner.files, material)?;
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    /// Reloads on SIGHUP and, every `poll` (unless `None`), when the files changed; logs each
    /// reload and each refusal. Runs until the returned task is aborted.
    pub fn watch(&self, poll: Option<Duration>) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut hangup = match signal(SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP: TLS files reload on change only");
                    None
                }
            };
            let mut ticks = poll.map(|every| {
                let mut t = tokio::time::interval(every);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            loop {
                // A source that is off (or whose signal stream ended) never fires.
                let forced = tokio::select! {
                    () = async {
                        let received = match hangup.as_mut() {
                            Some(h) => h.recv().await,
                            None => None,
                        };
                        if received.is_none() {
                            std::future::pending::<()>().await;
                        }
                    } => true,
                    () = async {
                        match ticks.as_mut() {
                            Some(t) => {
                                t.tick().await;
                            }
                            None => std::future::pending().await,
                        }
                    } => false,
                };
                let job = tls.clone();
                let outcome = tokio::task::spawn_blocking(move || {
                    if forced {
                        job.reload().map(|()| ReloadOutcome::Reloaded)
                    } else {
                        job.reload_if_changed()
                    }
                })
                .await;
                let trigger = if forced { "SIGHUP" } else { "file change" };
                match outcome {
                    Ok(Ok(ReloadOutcome::Reloaded)) => {
                        tracing::info!(trigger, cert = %tls.files().cert_file.display(), "reloaded the TLS certificate and key");
                    }
                    Ok(Ok(ReloadOutcome::Unchanged)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(trigger, error = %e, "TLS reload failed: keeping the previous certificate and key");
                    }
                    Err(e) => {
                        tracing::error!(trigger, error = %e, "TLS reload task failed: keeping the previous certificate and key");
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
