//! Server-streaming calls that follow the database (WatchKeyPackages, WatchPrekeyStock).
//!
//! Each open stream is a task that reads the database, sends what is new, and waits on a
//! [`crate::store::events::DeviceWatch`] for the next change, whichever replica made it. It
//! ends when the client goes away, when the server shuts down ([`StreamStop`]), when its token
//! is revoked (`slots`), or on an error, which it sends as the stream's last item.
//!
//! A device has at most [`crate::config::Limits::max_watch_streams_per_device`] streams open
//! on one server process (`slots`): a stream past it is refused with RESOURCE_EXHAUSTED before
//! it starts.
//!
//! A watch also reads again after [`REREAD_INTERVAL`] without any event: a safety net for a
//! notification lost to a dropped listening connection, not the delivery path.

mod slots;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::crypto::ids::{DeviceId, UserId};
use crate::store::events::DeviceWatch;
use crate::store::tokens::TokenId;
use crate::store::Store;

use slots::{revoked_status, StreamSlots};
pub(crate) use slots::{StreamSlot, WATCH_STREAMS_OPEN};

/// How long a watch waits for an event before it reads the database again anyway.
pub(crate) const REREAD_INTERVAL: Duration = Duration::from_secs(30);

/// How long a stream ended by its token's revocation waits for room to tell its client so,
/// before it ends without saying (a client that reads nothing sees nothing either way).
const REVOKED_NOTICE_WAIT: Duration = Duration::from_secs(2);

/// Messages buffered per stream before the task waits for the client to read.
const STREAM_BUFFER: usize = 16;

/// What the server-streaming calls of one server share: the shutdown signal and the open
/// streams' slots. Clones share both.
#[derive(Clone, Debug, Default)]
pub(crate) struct Streams {
    stop: StreamStop,
    slots: StreamSlots,
}

impl Streams {
    /// Ends every stream, now and later: the server is shutting down.
    pub(crate) fn stop(&self) {
        self.stop.stop();
    }

    /// Takes a slot for a new stream of `user`/`device` authenticated by `token`; see
    /// [`slots::StreamSlots::claim`]. Call it before any work for the stream starts.
    pub(crate) fn claim(
        &self,
        store: &Store,
        token: &TokenId,
        user: &UserId,
        device: &DeviceId,
        cap: usize,
    ) -> Result<StreamSlot, Status> {
        self.slots.claim(store, token, user, device, cap)
    }

    /// Runs `body` as the stream of `slot`; see [`spawn_stream`].
    pub(crate) fn spawn<T, F, Fut>(
        &self,
        slot: StreamSlot,
        body: F,
    ) -> ReceiverStream<Result<T, Status>>
    where
        T: Send + 'static,
        F: FnOnce(StreamSender<T>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        spawn_stream(self.stop.clone(), slot, body)
    }
}

/// Tells every open stream that the server is shutting down: a graceful shutdown waits for
/// in-flight calls, and a watch stream would otherwise never end. Clones share one signal.
#[derive(Clone, Debug)]
struct StreamStop(Arc<watch::Sender<bool>>);

impl Default for StreamStop {
    fn default() -> Self {
        StreamStop(Arc::new(watch::channel(false).0))
    }
}

impl StreamStop {
    /// Ends every stream opened with this signal, now and later.
    pub(crate) fn stop(&self) {
        self.0.send_replace(true);
    }

    /// Completes once [`StreamStop::stop`] was called.
    pub(crate) async fn stopped(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`, so this waits for `true` or returns at once.
        let _ = rx.wait_for(|stopped| *stopped).await;
    }
}

/// The sending half a stream task writes to; `send` fails once the client has gone.
pub(crate) type StreamSender<T> = mpsc::Sender<Result<T, Status>>;

/// Waits for the next change `watch` reports, or [`REREAD_INTERVAL`] without one. False when
/// the watch failed: the error went to the client as the stream's last item and the task ends.
pub(crate) async fn next_change<T>(watch: &mut DeviceWatch, tx: &StreamSender<T>) -> bool {
    tokio::select! {
        changed = watch.changed() => match changed {
            Ok(()) => true,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                false
            }
        },
        () = tokio::time::sleep(REREAD_INTERVAL) => true,
    }
}

/// Runs `body` as a stream task holding `slot` and returns the stream for tonic. The task
/// ends, and frees the slot, when `body` returns, when the client drops the stream (or its
/// connection), when `stop` fires (the client then gets UNAVAILABLE, to reconnect to a replica
/// that is still up), or when the slot's token is revoked (UNAUTHENTICATED).
fn spawn_stream<T, F, Fut>(
    stop: StreamStop,
    mut slot: StreamSlot,
    body: F,
) -> ReceiverStream<Result<T, Status>>
where
    T: Send + 'static,
    F: FnOnce(StreamSender<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let watcher = tx.clone();
    let task = body(tx);
    tokio::spawn(async move {
        let revoked = {
            let task = std::pin::pin!(task);
            tokio::select! {
                () = task => false,
                () = watcher.closed() => false,
                () = stop.stopped() => {
                    let _ = watcher.try_send(Err(Status::unavailable(
                        "the server is shutting down; watch again",
                    )));
                    false
                }
                () = slot.revoked() => true,
            }
        };
        // The body has stopped (dropped above), so the notice is the stream's last item.
        if revoked {
            let notice = watcher.send(Err(revoked_status()));
            let _ = tokio::time::timeout(REVOKED_NOTICE_WAIT, notice).await;
        }
        drop(slot);
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt as _;

    async fn slot(streams: &Streams) -> StreamSlot {
        let store = Store::open("sqlite::memory:").await.unwrap();
        let user = UserId::new("alice").unwrap();
        let device = DeviceId::new("phone").unwrap();
        let token = TokenId::from_bytes([1; 16]);
        streams.claim(&store, &token, &user, &device, 8).unwrap()
    }

    #[tokio::test]
    async fn stop_ends_a_stream_with_unavailable() {
        let streams = Streams::default();
        let mut stream = streams.spawn::<u32, _, _>(slot(&streams).await, |tx| async move {
            let _ = tx.send(Ok(1)).await;
            std::future::pending::<()>().await;
        });
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        streams.stop();
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(stream.next().await.is_none());
        // A stream opened after the stop ends at once.
        let mut late =
            streams.spawn::<u32, _, _>(slot(&streams).await, |_tx| std::future::pending());
        assert_eq!(
            late.next().await.unwrap().unwrap_err().code(),
            tonic::Code::Unavailable
        );
    }

    #[tokio::test]
    async fn a_revoked_token_ends_its_stream_with_unauthenticated_as_the_last_item() {
        let streams = Streams::default();
        let mut stream = streams.spawn::<u32, _, _>(slot(&streams).await, |tx| async move {
            let _ = tx.send(Ok(1)).await;
            std::future::pending::<()>().await;
        });
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        streams.slots.revoke(&[TokenId::from_bytes([1; 16])]);
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("revoked"), "{}", err.message());
        assert!(stream.next().await.is_none());
    }
}
