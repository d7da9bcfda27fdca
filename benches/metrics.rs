//! The cost of the metrics layer: GetUserKeys throughput and server CPU per call with
//! Prometheus metrics on and off, in the same run.
//!
//! Run: `cargo bench --bench metrics` (on PostgreSQL when `KEYHOLD_TEST_DATABASE_URL` names a
//! server the bench may create databases on, which it drops afterwards; on SQLite otherwise).
//! A fixed load on loopback, about a minute; it stops by itself.
//!
//! It starts the `keyhold` binary three times, each a process of its own on a database of its
//! own, as an operator would run it:
//!
//! - `metrics on`: `--metrics-listen` set, so the Prometheus recorder is installed and every
//!   call is counted and timed (and the pool gauges are read at each scrape);
//! - `metrics off`: the same server without `--metrics-listen`: the metrics calls are the
//!   facade's no-ops, the reference;
//! - `metrics off, no call log`: also `KEYHOLD_LOG=warn`, which drops the per-call log line,
//!   to show what that line costs beside the metrics.
//!
//! The first two log at `info` (the default), to /dev/null. Then, in rounds that alternate
//! between the servers so that the machine's background load falls on all of them alike, 32
//! concurrent callers (each with a connection of its own) make 250 GetUserKeys calls each
//! (authentication plus one indexed SELECT of one user's one device key). Each round records
//! the throughput and the server process's CPU time (user + system, from `/proc`) per call;
//! the bench prints the medians over the rounds and the ratios of on to off.

mod common;

use common::ab::{self, BoxError, Variant, CALLERS, CALLS_PER_CALLER, ROUNDS};

const VARIANTS: [Variant; 3] = [
    Variant {
        name: "metrics off",
        flags: &[],
        log: "info",
        metrics: false,
    },
    Variant {
        name: "metrics on",
        flags: &[],
        log: "info",
        metrics: true,
    },
    Variant {
        name: "metrics off, no call log",
        flags: &[],
        log: "warn",
        metrics: false,
    },
];

/// `/metrics` of the server with metrics on: its GetUserKeys OK counter, to show that the
/// calls were counted.
async fn counted_calls(address: std::net::SocketAddr) -> Result<f64, BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    let line = body
        .lines()
        .find(|l| {
            l.starts_with("keyhold_grpc_requests_total{")
                && l.contains("method=\"GetUserKeys\"")
                && l.contains("code=\"OK\"")
        })
        .ok_or("no GetUserKeys counter in /metrics")?;
    Ok(line.rsplit(' ').next().unwrap_or("0").parse()?)
}

async fn run() -> Result<(), BoxError> {
    let (servers, summary) = ab::compare("metrics", &VARIANTS).await?;
    let (off, on, quiet) = (summary[0], summary[1], summary[2]);
    println!("ratio                                         value    target  met");
    let ratio = on.calls_per_second / off.calls_per_second;
    println!(
        "throughput, metrics on / off                   {ratio:.3}   >= 0.95  {}",
        if ratio >= 0.95 { "yes" } else { "no" }
    );
    println!(
        "server CPU per call, metrics on / off          {:.3}",
        on.cpu_us_per_call / off.cpu_us_per_call
    );
    println!(
        "server CPU per call, call log / no call log    {:.3}",
        off.cpu_us_per_call / quiet.cpu_us_per_call
    );
    if let Some(address) = servers[1].metrics {
        let counted = counted_calls(address).await?;
        let made = ((ROUNDS + 1) * CALLERS * CALLS_PER_CALLER) as f64;
        println!("the metrics server counted {counted} GetUserKeys calls (made {made})");
    }
    for server in servers {
        server.stop().await?;
    }
    Ok(())
}

fn main() -> Result<(), BoxError> {
    common::main_with(run)
}
