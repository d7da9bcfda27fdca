//! # Keyhold
//!
//! Keyhold is an end-to-end encryption key service. It keeps device public keys and
//! post-quantum prekeys, draws data-encryption keys (DEKs) for encryption sessions and wraps
//! them for every recipient device with the hybrid X-Wing KEM (X25519 + ML-KEM-768), escrows
//! each DEK to a staff key for audited access, and never holds a private key or a plaintext
//! secret at rest.
//!
//! ## How the crate is laid out
//!
//! - [`crypto`] is the pure core: keys, X-Wing, envelopes, message encryption, signatures.
//!   No I/O, no async, no database, no gRPC; device clients and staff tooling use it too.
//!   Everything else depends on it; it depends on nothing else of ours.
//! - [`proto`] is the `keyhold.v1` gRPC API generated from `proto/keyhold/v1/` (wire types only).
//! - [`observe`] is health that follows the database, Prometheus metrics and the per-call log
//!   line.
//! - [`store`] keeps the records through Diesel on SQLite or PostgreSQL, one module per record;
//!   PostgreSQL is reached over TLS as the URL's `sslmode` and `sslrootcert` say (libpq's rules).
//! - [`tls`] is the gRPC listener's TLS: certificates from PEM files, reloaded on SIGHUP or when
//!   they change, optional mutual TLS, and the rule that plaintext stays on loopback.
//! - [`server`] assembles the services behind the authentication layer and serves them on a
//!   [`server::Transport`], within the limits on calls and connections of
//!   [`config::TransportLimits`] (load shedding, deadlines, HTTP/2 streams, keepalive,
//!   connection age); [`client`] is the Rust client (`https://` with [`client::ClientTls`]).
//!
//! The byte formats are documented in the module that writes them; `docs/formats.md` is their
//! normative description for a client in another language, with test vectors in
//! `tests/vectors/keyhold-v1.json` that CI regenerates from the crypto core and compares.
//!
//! ## Cargo features
//!
//! - `server` (default): the whole crate, the `keyhold` binary's service, store and server.
//! - `device`: [`crypto`], [`proto`] and [`client`] only, for device and staff apps that must
//!   not compile a database driver: `cargo build --no-default-features --features device`.
//! - no features: the crypto core alone (what the fuzz crate builds).

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod backup;
#[cfg(feature = "device")]
pub mod client;
#[cfg(feature = "device")]
pub mod codec;
#[cfg(feature = "server")]
pub mod config;
pub mod crypto;
#[cfg(feature = "server")]
pub mod dbcopy;
#[cfg(feature = "server")]
pub mod key_screening;
#[cfg(feature = "server")]
pub mod keyfiles;
#[cfg(feature = "server")]
pub mod observe;
#[cfg(feature = "server")]
pub mod ops;
#[cfg(feature = "server")]
pub mod progress;
#[cfg(feature = "device")]
pub mod proto;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod service;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod tls;
