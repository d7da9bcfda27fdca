//! The process's one metrics recorder: the Prometheus exporter's, installed on first use.
//!
//! `metrics` has one global recorder per process. [`install_recorder`] installs the
//! Prometheus one the first time it is called and hands the same handle to every later
//! caller, so several servers in one process (tests, benchmarks) share it: their counters add
//! up, which is why tests compare a counter before and after, never its absolute value. Until
//! it is installed every `metrics::counter!` is a no-op, which is what `--metrics-listen`
//! left unset means.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::Store;

/// Gauge: connections the database pool may open.
pub(crate) const DB_POOL_MAX: &str = "keyhold_db_pool_max_connections";
/// Gauge: connections the database pool holds now (idle and in use).
pub(crate) const DB_POOL_SIZE: &str = "keyhold_db_pool_connections";
/// Gauge: idle connections in the pool.
pub(crate) const DB_POOL_IDLE: &str = "keyhold_db_pool_idle_connections";
/// Gauge: calls waiting for a pooled connection.
pub(crate) const DB_POOL_WAITING: &str = "keyhold_db_pool_waiting";

/// Upper bounds, in seconds, of the latency histograms' buckets: 0.5 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes, so the
/// samples of an unscraped server do not pile up in memory.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Could not install the recorder: another recorder holds the process's one slot.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the Prometheus metrics recorder: {0}")]
pub struct RecorderError(String);

/// Installs the Prometheus recorder once per process and returns its handle (the same handle
/// on every call).
pub fn install_recorder() -> Result<PrometheusHandle, RecorderError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = LATENCY_HISTOGRAMS
                .iter()
                .try_fold(PrometheusBuilder::new(), |builder, name| {
                    builder.set_buckets_for_metric(
                        Matcher::Full((*name).to_string()),
                        &LATENCY_BUCKETS,
                    )
                })
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| e.to_string())?;
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("keyhold-metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                })
                .map_err(|e| format!("cannot start the metrics upkeep thread: {e}"))?;
            Ok(handle)
        })
        .clone()
        .map_err(RecorderError)
}

/// The histograms rendered with [`LATENCY_BUCKETS`] (the exporter renders any other
/// histogram as a summary).
const LATENCY_HISTOGRAMS: [&str; 2] = [
    super::call::REQUEST_DURATION,
    crate::store::DB_POOL_ACQUIRE_DURATION,
];

/// The `# HELP` text of every metric Keyhold records.
fn describe() {
    use super::call::{IN_FLIGHT, REQUESTS, REQUEST_DURATION};
    describe_counter!(
        REQUESTS,
        "gRPC calls answered, by service, method and status code (a stream counts when it ends)"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "gRPC call latency, by service and method, until the last byte of the response (for a stream: how long it stayed open)"
    );
    describe_gauge!(IN_FLIGHT, "gRPC calls in progress, open streams included");
    describe_gauge!(DB_POOL_MAX, "connections the database pool may open");
    describe_gauge!(
        DB_POOL_SIZE,
        "connections the database pool holds, idle or in use"
    );
    describe_gauge!(DB_POOL_IDLE, "idle connections in the database pool");
    describe_gauge!(DB_POOL_WAITING, "calls waiting for a database connection");
    describe_histogram!(
        crate::store::DB_POOL_ACQUIRE_DURATION,
        Unit::Seconds,
        "time to take a connection from the database pool, failures included"
    );
    describe_gauge!(
        super::health::DB_UP,
        "1 while the database answers the health check, 0 while it does not"
    );
    describe_counter!(
        crate::service::key_directory::PREKEY_CLAIMS,
        "prekeys handed out by ClaimPrekeys, by outcome: one_time, last_resort, none (the device had neither)"
    );
    describe_counter!(
        crate::service::key_directory::PREKEY_LOW_STOCK_EVENTS,
        "WatchPrekeyStock messages telling a device its one-time prekey stock is low"
    );
    describe_counter!(
        crate::service::escrow::ESCROW_READS,
        "audited staff reads of escrowed DEKs (GetEscrowedKeys calls that returned)"
    );
    describe_counter!(
        crate::store::audit::AUDIT_APPENDS,
        "audit events written, by action (counted at the write; a transaction that then rolls back still counts)"
    );
    describe_gauge!(
        crate::service::watch::WATCH_STREAMS_OPEN,
        "watch streams (WatchKeyPackages, WatchPrekeyStock) open now"
    );
    describe_counter!(
        crate::server::CALLS_SHED,
        "Keyhold calls refused at once with RESOURCE_EXHAUSTED because the server was at --max-concurrent-calls"
    );
    describe_gauge!(
        crate::server::CONCURRENT_CALLS_LIMIT,
        "the concurrency limit on Keyhold calls (--max-concurrent-calls; 0: none)"
    );
    describe_counter!(
        crate::store::DB_TRANSACTIONS_ABANDONED,
        "transactions whose call was dropped mid-way (deadline passed, client gone), by outcome: rolled_back (the connection went back to the pool clean) or closed (its connection was closed)"
    );
    describe_gauge!(
        crate::server::KEK_VERSION,
        "version of the key-encryption key the server wraps with"
    );
}

/// Sets the pool gauges from `store`'s pool as it is now (called before each scrape).
pub(crate) fn record_pool_status(store: &Store) {
    let status = store.pool_status();
    metrics::gauge!(DB_POOL_MAX).set(status.max_size as f64);
    metrics::gauge!(DB_POOL_SIZE).set(status.size as f64);
    metrics::gauge!(DB_POOL_IDLE).set(status.idle as f64);
    metrics::gauge!(DB_POOL_WAITING).set(status.waiting as f64);
}
