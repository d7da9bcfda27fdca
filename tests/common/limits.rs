//! Helpers of the limits tests: servers with other transport limits, waiting for a state,
//! and the process's metrics.

use std::future::Future;
use std::time::{Duration, Instant};

use keyhold::config::{Limits, TransportLimits};

/// The default limits with the transport limits `f` sets.
pub fn transport(f: impl FnOnce(&mut TransportLimits)) -> Limits {
    let mut limits = Limits::default();
    f(&mut limits.transport);
    limits
}

/// Waits until `check` holds, polling; fails after 30 s naming `what`.
pub async fn wait_until<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let give_up = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < give_up, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one sample in the process's Prometheus rendering (0 when absent).
pub fn metric(sample: &str) -> f64 {
    let rendered = keyhold::observe::install_recorder()
        .expect("recorder")
        .render();
    rendered
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().expect("a number"))
}
