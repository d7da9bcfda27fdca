//! Device events: "this device's key-sync inbox, or its prekey stock, may have changed", seen
//! by every Keyhold process on the database, not only the one that made the change.
//!
//! Watch streams (`DeviceSync.WatchKeyPackages`, `KeyDirectory.WatchPrekeyStock`) wait on a
//! [`DeviceWatch`] and then read the database again. An event carries no record, only which
//! device to look at, so a lost or spurious event costs at most a late or an extra read; the
//! database stays the only source of what is delivered.
//!
//! How an event crosses processes differs per backend; this module is the one place that knows:
//!
//! - **PostgreSQL**: every transaction that changes an inbox or a prekey stock runs
//!   `SELECT pg_notify('keyhold_device_events', '<kind> <user id> <device id>')`
//!   ([`notify_in_tx`]); PostgreSQL delivers it at commit to every listening session of every
//!   process, and drops it on rollback. Each process opens **one** listening connection (outside
//!   the pool) when its first watch starts, fans the notifications out to its watches, and
//!   closes it when the last watch ends. After the connection drops and is opened again, every
//!   watch is woken, since notifications may have been missed in between.
//! - **SQLite**: SQLite has no notifications, and other processes may write the same file. One
//!   task per process polls `PRAGMA data_version` every [`SQLITE_POLL_INTERVAL`]; the value
//!   changes when *another* connection committed, and then every watch is woken. Commits made
//!   through this store's own connection do not change it, so the store announces those to its
//!   own watches after they commit ([`Store::announce_committed`]).
//!
//! A watch subscribes before its first read ([`Store::watch_device`] returns only once the
//! listener is in place), so a change committed after that read always wakes it.
//!
//! Ids never contain spaces (printable ASCII without spaces, [`crate::crypto::ids`]), so the
//! space-separated payload is unambiguous.

use std::time::Duration;

use diesel::sql_types::{BigInt, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
use tokio::sync::{broadcast, oneshot, Mutex};
use tokio_stream::StreamExt as _;

use super::{db_run, Backend, Conn, DbConn, PgConn, Store, StoreError};
use crate::crypto::ids::{DeviceId, UserId};

/// The PostgreSQL notification channel.
const CHANNEL: &str = "keyhold_device_events";
/// How often a SQLite store looks for other processes' commits.
pub const SQLITE_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often an idle PostgreSQL listener checks whether anyone still watches.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// Longest wait between attempts to open the PostgreSQL listening connection again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Events buffered per watch; a watch that falls further behind is woken once for all.
const BUFFER: usize = 1024;

/// Which records of a device an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// The device's key-sync inbox (key packages sent to it, or acknowledged by it).
    KeyPackages,
    /// The device's prekey stock (claims and uploads).
    Prekeys,
}

impl EventKind {
    fn tag(self) -> &'static str {
        match self {
            EventKind::KeyPackages => "kp",
            EventKind::Prekeys => "pk",
        }
    }

    fn from_tag(tag: &str) -> Option<Self> {
        match tag {
            "kp" => Some(EventKind::KeyPackages),
            "pk" => Some(EventKind::Prekeys),
            _ => None,
        }
    }
}

/// A change to one device's records, as announced inside or after the transaction making it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DeviceEvent {
    pub(crate) kind: EventKind,
    pub(crate) user: UserId,
    pub(crate) device: DeviceId,
}

impl DeviceEvent {
    pub(crate) fn new(kind: EventKind, user: &UserId, device: &DeviceId) -> Self {
        DeviceEvent {
            kind,
            user: user.clone(),
            device: device.clone(),
        }
    }

    fn payload(&self) -> String {
        format!("{} {} {}", self.kind.tag(), self.user, self.device)
    }

    fn parse(payload: &str) -> Option<Self> {
        let mut parts = payload.split(' ');
        let kind = EventKind::from_tag(parts.next()?)?;
        let user = UserId::new(parts.next()?).ok()?;
        let device = DeviceId::new(parts.next()?).ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(DeviceEvent { kind, user, device })
    }
}

/// What the fan-out hands each watch.
#[derive(Clone, Debug)]
enum Signal {
    /// One device's records changed.
    Device(DeviceEvent),
    /// Anything may have changed (SQLite: another process committed; PostgreSQL: the
    /// listening connection was opened again).
    Everything,
}

/// The per-process fan-out: the running listener's channel, if one runs.
#[derive(Default)]
pub(crate) struct Hub {
    running: Mutex<Option<broadcast::Sender<Signal>>>,
}

impl Hub {
    /// Sends `signal` to this process's watches, if any listen.
    async fn local(&self, signal: Signal) {
        if let Some(tx) = self.running.lock().await.as_ref() {
            // No receiver left is fine: nobody watches.
            let _ = tx.send(signal);
        }
    }

    /// Ends the listener behind `tx` if no watch uses it any more. Checked under the lock that
    /// [`Store::watch_device`] subscribes under, so a new watch never joins a listener that
    /// is about to stop.
    async fn stop_if_unwatched(&self, tx: &broadcast::Sender<Signal>) -> bool {
        let mut running = self.running.lock().await;
        if tx.receiver_count() > 0 {
            return false;
        }
        if running.as_ref().is_some_and(|r| r.same_channel(tx)) {
            *running = None;
        }
        true
    }
}

/// Waits for changes to one device's records of one kind; see the module docs.
pub struct DeviceWatch {
    rx: broadcast::Receiver<Signal>,
    kind: EventKind,
    user: UserId,
    device: DeviceId,
}

impl std::fmt::Debug for DeviceWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceWatch")
            .field("kind", &self.kind)
            .field("user", &self.user)
            .field("device", &self.device)
            .finish()
    }
}

impl DeviceWatch {
    /// Returns when the watched records may have changed since the last return (or since the
    /// watch started). Wakes may be spurious: read the database and compare.
    pub async fn changed(&mut self) -> Result<(), StoreError> {
        loop {
            match self.rx.recv().await {
                Ok(Signal::Everything) => return Ok(()),
                Ok(Signal::Device(e))
                    if e.kind == self.kind && e.user == self.user && e.device == self.device =>
                {
                    return Ok(())
                }
                Ok(Signal::Device(_)) => {}
                // Fell behind: something of ours may be among the dropped events.
                Err(broadcast::error::RecvError::Lagged(_)) => return Ok(()),
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(StoreError::Unavailable(
                        "the device event listener stopped".into(),
                    ))
                }
            }
        }
    }
}

/// Announces `event` to every process, from inside the transaction that makes the change:
/// a PostgreSQL notification, delivered at commit. Nothing on SQLite (see
/// [`Store::announce_committed`]).
pub(crate) async fn notify_in_tx(conn: &mut DbConn, event: &DeviceEvent) -> Result<(), StoreError> {
    let payload = event.payload();
    db_run!(conn: sqlite {
    } postgres {
        diesel::sql_query("SELECT pg_notify($1, $2)")
            .bind::<Text, _>(CHANNEL)
            .bind::<Text, _>(payload)
            .execute(conn)
            .await?;
    });
    Ok(())
}

#[derive(QueryableByName)]
struct DataVersion {
    #[diesel(sql_type = BigInt)]
    data_version: i64,
}

impl Conn {
    /// SQLite's `data_version` of this connection: it moves when another connection commits.
    async fn sqlite_data_version(&mut self) -> Result<i64, StoreError> {
        let conn = &mut self.db;
        let v: i64 = db_run!(conn: sqlite {
            diesel::sql_query("PRAGMA data_version")
                .get_result::<DataVersion>(conn)
                .await?
                .data_version
        } postgres {
            return Err(StoreError::Internal("data_version is a SQLite pragma".into()));
        });
        Ok(v)
    }
}

/// Polls `data_version` until no watch is left (SQLite).
async fn poll_sqlite(
    store: Store,
    tx: broadcast::Sender<Signal>,
    ready: oneshot::Sender<Result<(), StoreError>>,
) {
    // A connection from the pool per look, so the poll never holds SQLite's one connection.
    let data_version =
        async || -> Result<i64, StoreError> { store.conn().await?.sqlite_data_version().await };
    let mut last = match data_version().await {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut failing = false;
    loop {
        tokio::time::sleep(SQLITE_POLL_INTERVAL).await;
        if store.events.stop_if_unwatched(&tx).await {
            return;
        }
        match data_version().await {
            Ok(v) => {
                failing = false;
                if v != last {
                    last = v;
                    let _ = tx.send(Signal::Everything);
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot poll SQLite for other processes' changes");
                }
                failing = true;
            }
        }
    }
}

/// Opens a connection of its own (LISTEN is per session; the pool would hand it to others).
async fn pg_listener(url: &str) -> Result<PgConn, StoreError> {
    let mut conn = PgConn::establish(url).await?;
    conn.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok(conn)
}

/// Listens for notifications and fans them out until no watch is left (PostgreSQL).
async fn listen_postgres(
    store: Store,
    tx: broadcast::Sender<Signal>,
    ready: oneshot::Sender<Result<(), StoreError>>,
) {
    let mut conn = match pg_listener(&store.url).await {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut backoff = Duration::from_millis(100);
    loop {
        // Forward notifications until the connection fails or nobody watches.
        {
            let mut notifications = std::pin::pin!(conn.notifications_stream());
            let mut idle = tokio::time::interval(IDLE_CHECK);
            loop {
                tokio::select! {
                    n = notifications.next() => match n {
                        Some(Ok(n)) => {
                            if let Some(event) = DeviceEvent::parse(&n.payload) {
                                let _ = tx.send(Signal::Device(event));
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "device event listener lost its connection");
                            break;
                        }
                        None => break,
                    },
                    _ = idle.tick() => {
                        if store.events.stop_if_unwatched(&tx).await {
                            return;
                        }
                    }
                }
            }
        }
        // Open it again; until then nothing is heard, so wake everyone once it is back.
        conn = loop {
            tokio::time::sleep(backoff).await;
            if store.events.stop_if_unwatched(&tx).await {
                return;
            }
            match pg_listener(&store.url).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reopen the device event listener");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        backoff = Duration::from_millis(100);
        let _ = tx.send(Signal::Everything);
    }
}

impl Store {
    /// Starts watching one device's records of `kind`. Returns once the process listens for
    /// changes, so a change committed after the caller's next read wakes the watch.
    ///
    /// [`StoreError::Unavailable`] if the listener cannot start (PostgreSQL unreachable).
    pub async fn watch_device(
        &self,
        kind: EventKind,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<DeviceWatch, StoreError> {
        let mut running = self.events.running.lock().await;
        let rx = match running.as_ref() {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(BUFFER);
                let (ready_tx, ready_rx) = oneshot::channel();
                match self.backend() {
                    Backend::Sqlite => {
                        tokio::spawn(poll_sqlite(self.clone(), tx.clone(), ready_tx));
                    }
                    Backend::Postgres => {
                        tokio::spawn(listen_postgres(self.clone(), tx.clone(), ready_tx));
                    }
                }
                let wait = self.options.acquire_timeout;
                match tokio::time::timeout(wait, ready_rx).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => return Err(e),
                    Ok(Err(_)) | Err(_) => {
                        return Err(StoreError::Unavailable(format!(
                            "the device event listener did not start within {wait:?}"
                        )))
                    }
                }
                *running = Some(tx);
                rx
            }
        };
        Ok(DeviceWatch {
            rx,
            kind,
            user: user.clone(),
            device: device.clone(),
        })
    }

    /// Tells this process's watches about changes its own transaction just committed. Needed
    /// on SQLite only, where this connection's commits do not move `data_version`; on
    /// PostgreSQL the notifications sent by [`notify_in_tx`] arrive through the listener.
    pub(crate) async fn announce_committed(&self, events: &[DeviceEvent]) {
        if self.backend() == Backend::Sqlite {
            for e in events {
                self.events.local(Signal::Device(e.clone())).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_refuses_junk() {
        let e = DeviceEvent::new(
            EventKind::KeyPackages,
            &UserId::new("alice").unwrap(),
            &DeviceId::new("phone/1").unwrap(),
        );
        assert_eq!(e.payload(), "kp alice phone/1");
        assert_eq!(DeviceEvent::parse(&e.payload()), Some(e));
        for junk in ["", "kp", "kp alice", "xx alice phone", "pk a b c"] {
            assert_eq!(DeviceEvent::parse(junk), None, "{junk}");
        }
    }
}
