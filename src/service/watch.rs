//! Server-streaming calls that follow the database (WatchKeyPackages, WatchPrekeyStock).
//!
//! Each open stream is a task that reads the database, sends what is new, and waits on a
//! [`crate::store::events::DeviceWatch`] for the next change, whichever replica made it. It
//! ends when the client goes away, when the server shuts down ([`StreamStop`]), or on an error,
//! which it sends as the stream's last item.
//!
//! A watch also reads again after [`REREAD_INTERVAL`] without any event: a safety net for a
//! notification lost to a dropped listening connection, not the delivery path.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::store::events::DeviceWatch;

/// How long a watch waits for an event before it reads the database again anyway.
pub(crate) const REREAD_INTERVAL: Duration = Duration::from_secs(30);

/// Gauge: watch streams open now, of either kind.
pub(crate) const WATCH_STREAMS_OPEN: &str = "keyhold_watch_streams_open";

/// Messages buffered per stream before the task waits for the client to read.
const STREAM_BUFFER: usize = 16;

/// Tells every open stream that the server is shutting down: a graceful shutdown waits for
/// in-flight calls, and a watch stream would otherwise never end. Clones share one signal.
#[derive(Clone, Debug)]
pub(crate) struct StreamStop(Arc<watch::Sender<bool>>);

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

/// Runs `body` as a stream task and returns the stream for tonic. The task ends when `body`
/// returns, when the client drops the stream, or when `stop` fires (the client then gets
/// UNAVAILABLE, to reconnect to a replica that is still up).
pub(crate) fn spawn_stream<T, F, Fut>(
    stop: StreamStop,
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
        let _open = OpenStream::new();
        tokio::select! {
            () = task => {}
            () = watcher.closed() => {}
            () = stop.stopped() => {
                let _ = watcher.try_send(Err(Status::unavailable(
                    "the server is shutting down; watch again",
                )));
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Counts one open stream in [`WATCH_STREAMS_OPEN`] for as long as it lives, however its task
/// ends.
struct OpenStream;

impl OpenStream {
    fn new() -> Self {
        metrics::gauge!(WATCH_STREAMS_OPEN).increment(1.0);
        OpenStream
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics::gauge!(WATCH_STREAMS_OPEN).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn stop_ends_a_stream_with_unavailable() {
        let stop = StreamStop::default();
        let mut stream = spawn_stream::<u32, _, _>(stop.clone(), |tx| async move {
            let _ = tx.send(Ok(1)).await;
            std::future::pending::<()>().await;
        });
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        stop.stop();
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(stream.next().await.is_none());
        // A stream opened after the stop ends at once.
        let mut late = spawn_stream::<u32, _, _>(stop, |_tx| std::future::pending());
        assert_eq!(
            late.next().await.unwrap().unwrap_err().code(),
            tonic::Code::Unavailable
        );
    }
}
