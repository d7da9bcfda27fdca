//! Health that follows the database: the `grpc.health.v1.Health` statuses of every service,
//! and of the server as a whole (`""`), are SERVING while the database answers and
//! NOT_SERVING while it does not, so a load balancer stops sending calls to a replica that
//! could only answer UNAVAILABLE.
//!
//! [`follow_database`] checks the store every [`CHECK_INTERVAL`]: it takes a pooled
//! connection and runs `SELECT 1` ([`crate::store::Conn::ping`]), all within
//! [`CHECK_TIMEOUT`]. One failed check turns every status to NOT_SERVING; one good check turns
//! them back. Either way the change is seen within `CHECK_INTERVAL + CHECK_TIMEOUT` (3 s) of
//! the database going or coming back. A pool that gives no connection within the timeout
//! counts as down: calls on this replica would wait for one too.

use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::store::Store;

/// How often the database is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long one check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Gauge: 1 while the database answers the health check, 0 while it does not.
pub(crate) const DB_UP: &str = "keyhold_db_up";

/// Checks the database forever, setting the status of `services` and of `""` on `reporter`
/// whenever the answer changes. The statuses are taken to be SERVING when it starts (the
/// store has just been opened). Run it as a task and abort it when the server stops.
pub(crate) async fn follow_database(
    store: Store,
    reporter: HealthReporter,
    services: Vec<&'static str>,
) {
    let mut up = true;
    metrics::gauge!(DB_UP).set(1.0);
    let mut ticks = tokio::time::interval(CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let check =
            tokio::time::timeout(CHECK_TIMEOUT, async { store.conn().await?.ping().await }).await;
        let now_up = match check {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                if up {
                    tracing::warn!(error = %e, "health: the database check failed; NOT_SERVING");
                }
                false
            }
            Err(_) => {
                if up {
                    tracing::warn!(
                        timeout = ?CHECK_TIMEOUT,
                        "health: the database did not answer in time; NOT_SERVING"
                    );
                }
                false
            }
        };
        if now_up == up {
            continue;
        }
        up = now_up;
        if up {
            tracing::info!("health: the database answers again; SERVING");
        }
        let status = if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        metrics::gauge!(DB_UP).set(if up { 1.0 } else { 0.0 });
        for service in services.iter().copied().chain([""]) {
            reporter.set_service_status(service, status).await;
        }
    }
}
