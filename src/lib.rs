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
//! The byte formats are documented in the module that writes them, precisely enough for a
//! client in another language; `docs/formats.md` gathers them in one place.
//!
//! ## Cargo features
//!
//! None yet: the default build is the whole crate.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
pub mod backup;
pub mod client;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod dbcopy;
pub mod key_screening;
pub mod keyfiles;
pub mod observe;
pub mod ops;
pub mod progress;
pub mod proto;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
