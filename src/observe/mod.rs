//! Observability: health that follows the database, Prometheus metrics, and one structured
//! log line per call.
//!
//! - [`health`]: a task that checks the database every second and turns the
//!   `grpc.health.v1.Health` status of every service, and of the server (`""`), to
//!   NOT_SERVING while it does not answer.
//! - [`call`]: the tower layer around every call: request id (`x-request-id`, taken or
//!   generated, and returned), per-RPC counters and latency histogram, calls in flight, and
//!   the call's log line.
//! - [`recorder`] and [`endpoint`]: the `metrics` facade's Prometheus recorder, installed once
//!   per process, and the `--metrics-listen` HTTP listener that serves `GET /metrics`.
//! - [`logs`]: text or JSON logs, colour only on a terminal.
//!
//! Domain metrics are recorded where their event happens, each name declared beside its one
//! `metrics::counter!` (or `gauge!`) line: prekey claims by outcome and low-stock messages in
//! `service::key_directory`, escrow reads in `service::escrow`, audit appends in
//! `store::audit`, open watch streams in `service::watch`, the pool's acquire latency in
//! `store`, the KEK version in `server`. [`recorder`] describes them all. Metrics are cheap
//! no-ops until the recorder is installed, which only `--metrics-listen` does.

pub(crate) mod call;
pub(crate) mod endpoint;
pub(crate) mod health;
pub(crate) mod logs;
pub(crate) mod methods;
pub(crate) mod recorder;

pub(crate) use call::CallLayer;
pub use call::REQUEST_ID_HEADER;
pub use endpoint::serve_metrics;
pub use health::{CHECK_INTERVAL, CHECK_TIMEOUT};
pub use recorder::{install_recorder, RecorderError};
