//! The cost of the limit layer (load shedding past `--max-concurrent-calls`, the default
//! deadline): GetUserKeys throughput and server CPU per call with the limits on and off, in
//! the same run.
//!
//! Run: `cargo bench --bench limits` (on PostgreSQL when `KEYHOLD_TEST_DATABASE_URL` names a
//! server the bench may create databases on, which it drops afterwards; on SQLite otherwise).
//! A fixed load on loopback, under a minute; it stops by itself.
//!
//! It starts the `keyhold` binary twice, each a process of its own on a database of its own:
//!
//! - `limits on`: the defaults: every Keyhold call takes a place among 256 (a semaphore) and
//!   runs against a 30 s deadline (a timer raced with the call);
//! - `limits off`: `--max-concurrent-calls 0 --default-deadline-ms 0`, the reference: the
//!   layer is still in the stack but only looks the method up and passes the call on (no
//!   place, no timer), which is what a server without limits does plus a map lookup.
//!
//! Both log at `warn` (no per-call log line), so that the layer's cost is not hidden behind the
//! log's. Then, in rounds that alternate between the servers so that the machine's
//! background load falls on both alike, 32 concurrent callers (each with a connection of its
//! own) make 250 GetUserKeys calls each (authentication plus one indexed SELECT). Each round
//! records the throughput and the server process's CPU time (user + system, from `/proc`) per
//! call; the bench prints the medians over the rounds and the ratios of on to off.

mod common;

use common::ab::{self, BoxError, Variant};

const VARIANTS: [Variant; 2] = [
    Variant {
        name: "limits off",
        flags: &["--max-concurrent-calls", "0", "--default-deadline-ms", "0"],
        log: "warn",
        metrics: false,
    },
    Variant {
        name: "limits on (defaults)",
        flags: &[],
        log: "warn",
        metrics: false,
    },
];

async fn run() -> Result<(), BoxError> {
    let (servers, summary) = ab::compare("limits", &VARIANTS).await?;
    let (off, on) = (summary[0], summary[1]);
    println!("ratio                                  value");
    println!(
        "throughput, limits on / off            {:.3}",
        on.calls_per_second / off.calls_per_second
    );
    println!(
        "server CPU per call, limits on / off   {:.3}  ({:+.1} us per call)",
        on.cpu_us_per_call / off.cpu_us_per_call,
        on.cpu_us_per_call - off.cpu_us_per_call
    );
    for server in servers {
        server.stop().await?;
    }
    Ok(())
}

fn main() -> Result<(), BoxError> {
    common::main_with(run)
}
